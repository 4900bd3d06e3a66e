"""The unCLIP decoder: a GLIDE text-conditional U-Net that also sees the CLIP image embedding.

Ramesh et al. 2022 §2.1: "we modify the architecture described in GLIDE by projecting and adding CLIP
embeddings to the existing timestep embedding, and by projecting CLIP embeddings into four extra tokens
of context that are concatenated to the sequence of outputs from the GLIDE text encoder". GLIDE's own
conditioning is kept: the caption transformer's pooled feature is projected into the timestep embedding
and its token outputs are attended to by every attention block (Nichol et al. 2021 §2.3).

Classifier-free guidance (Ho & Salimans 2021; unCLIP §2.1 drops the CLIP embedding 10 % and the caption
50 % of the time) is driven by per-sample boolean masks from the caller:

- ``drop_image_embedding``: the CLIP embedding is replaced by a learned null embedding (both paths);
- ``drop_caption``: every caption token is masked out of attention and the pooled caption feature is left
  out of the embedding, so the model sees nothing of the caption. This is exactly the output of
  ``caption_tokens=None`` (no caption at all), which is how image variations run.

The conditioning is computed once per sample with :meth:`Decoder.encode_condition` and reused at every
denoising step; :func:`cat_conditions` stacks a conditional and an unconditional one for a single batched
guidance forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from unclip.errors import ConfigError
from unclip.models.text_encoder import TextEncoder, TextEncoderConfig
from unclip.models.unet import UNet, UNetConfig


def _tiny_unet() -> UNetConfig:
    return UNetConfig(
        model_channels=24,
        channel_mult=(1, 2, 2),
        num_res_blocks=1,
        attention_downsample=(4, 8),
        num_head_channels=24,
        context_dim=32,
        learn_sigma=True,
        stem_factor=2,
        num_groups=8,
        output_norm=False,
    )


def _tiny_text() -> TextEncoderConfig:
    return TextEncoderConfig(width=32, layers=2, heads=2)


@dataclass
class DecoderConfig:
    """Decoder hyper-parameters: the U-Net (its ``context_dim`` must equal the caption transformer's
    width), the caption transformer, the CLIP image-embedding width, and the number of extra context
    tokens made from the CLIP embedding (4 in the paper). The defaults are the ``tiny`` preset."""

    unet: UNetConfig = field(default_factory=_tiny_unet)
    text: TextEncoderConfig = field(default_factory=_tiny_text)
    clip_embed_dim: int = 512
    num_clip_tokens: int = 4

    def __post_init__(self) -> None:
        if self.unet.context_dim != self.text.width:
            raise ConfigError(
                f"decoder: unet.context_dim={self.unet.context_dim} must equal text.width={self.text.width}"
            )
        if self.clip_embed_dim < 1 or self.num_clip_tokens < 1:
            raise ConfigError(
                f"decoder: clip_embed_dim={self.clip_embed_dim} and num_clip_tokens={self.num_clip_tokens} "
                "must be >= 1"
            )


def decoder_tiny() -> DecoderConfig:
    """CPU preset (64 px, 2.5M parameters, 1.6M of them the 49408 x 32 token table): a 2 x 2 space-to-depth
    stem, levels of 24/48/48 channels at 32/16/8 px, attention (24-channel heads) at 16 and 8 px, and no
    GroupNorm before the output convolution (``output_norm=False``). It replaced a 4 x 4 stem with 48/96/96
    channels, 1.2-1.5x faster per step on 2 CPU cores, whose x_0 estimates stayed blurred; the measurements
    and the recipe's learning curve are in recipes/shapes/DECODER.md."""
    return DecoderConfig()


def decoder_paper() -> DecoderConfig:
    """unCLIP Table 3 decoder (64 px, 3.5B parameters): 512 channels, 3 residual blocks, multipliers
    1,2,3,4, attention at 32, 16, 8 px, 64 channels per head, dropout 0.1, learned variance ("learned"
    sampling variance in Table 3); GLIDE's caption transformer (width 2048, 24 layers, 32 heads).

    Assumptions: CLIP ViT-H/16 image embeddings (1024 wide, as unCLIP used), and a 77-token context
    (the CLIP tokenizer's) instead of Table 3's 256 -- the difference is 0.4M parameters."""
    return DecoderConfig(
        unet=UNetConfig(
            model_channels=512,
            channel_mult=(1, 2, 3, 4),
            num_res_blocks=3,
            attention_downsample=(2, 4, 8),
            num_head_channels=64,
            context_dim=2048,
            dropout=0.1,
            learn_sigma=True,
        ),
        text=TextEncoderConfig(width=2048, layers=24, heads=32),
        clip_embed_dim=1024,
    )


@dataclass
class DecoderCondition:
    """Per-sample conditioning, reusable across denoising steps: ``emb`` (B, time_embed_dim) added to the
    timestep embedding, ``context`` (B, L, width) tokens and ``context_mask`` (B, L) for attention."""

    emb: Tensor
    context: Tensor
    context_mask: Tensor


def cat_conditions(*conds: DecoderCondition) -> DecoderCondition:
    """Stack conditions along the batch (e.g. cond + uncond for one guided forward). Shorter contexts are
    padded with masked-out zero tokens, so a caption-less condition stacks with a captioned one."""
    length = max(c.context.shape[1] for c in conds)

    def pad(c: DecoderCondition) -> tuple[Tensor, Tensor]:
        extra = length - c.context.shape[1]
        b, _, width = c.context.shape
        tokens = torch.cat([c.context, c.context.new_zeros(b, extra, width)], dim=1)
        mask = torch.cat([c.context_mask, c.context_mask.new_zeros(b, extra)], dim=1)
        return tokens, mask

    padded = [pad(c) for c in conds]
    return DecoderCondition(
        emb=torch.cat([c.emb for c in conds]),
        context=torch.cat([p[0] for p in padded]),
        context_mask=torch.cat([p[1] for p in padded]),
    )


class Decoder(nn.Module):
    """unCLIP decoder (Ramesh et al. 2022 §2.1): ``model(x_t, t, model.encode_condition(...))``."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.config = config
        width, tdim = config.text.width, config.unet.time_embed_dim
        self.text_encoder = TextEncoder(config.text)
        self.unet = UNet(config.unet)
        self.null_image_embedding = nn.Parameter(torch.zeros(config.clip_embed_dim))
        self.image_to_emb = nn.Linear(config.clip_embed_dim, tdim)
        self.image_to_tokens = nn.Linear(config.clip_embed_dim, config.num_clip_tokens * width)
        # Bring the CLIP tokens to the scale of the caption transformer's LayerNorm-ed outputs.
        self.image_tokens_norm = nn.LayerNorm(width)
        self.caption_to_emb = nn.Linear(width, tdim)

    def encode_condition(
        self,
        image_embedding: Tensor,
        caption_tokens: Tensor | None,
        drop_image_embedding: Tensor | None = None,
        drop_caption: Tensor | None = None,
    ) -> DecoderCondition:
        """Conditioning for (B, clip_embed_dim) CLIP image embeddings and (B, L) CLIP BPE caption ids
        (``None``: no caption). ``drop_*`` are (B,) bool masks, True = drop for that sample."""
        b = image_embedding.shape[0]
        if image_embedding.shape != (b, self.config.clip_embed_dim):
            raise ValueError(
                f"image_embedding must be (batch, {self.config.clip_embed_dim}), "
                f"got {tuple(image_embedding.shape)}"
            )
        if drop_image_embedding is not None:
            null = self.null_image_embedding.to(image_embedding.dtype)
            image_embedding = torch.where(drop_image_embedding[:, None], null, image_embedding)
        emb = self.image_to_emb(image_embedding)
        context = self.image_tokens_norm(
            self.image_to_tokens(image_embedding).unflatten(-1, (self.config.num_clip_tokens, -1))
        )
        mask = torch.ones(context.shape[:2], dtype=torch.bool, device=context.device)
        if caption_tokens is not None:
            caption = self.text_encoder(caption_tokens)
            caption_emb, caption_mask = self.caption_to_emb(caption.pooled), caption.mask
            if drop_caption is not None:
                keep = ~drop_caption
                caption_emb = caption_emb * keep[:, None].to(caption_emb.dtype)
                caption_mask = caption_mask & keep[:, None]
            emb = emb + caption_emb
            context = torch.cat([context, caption.tokens], dim=1)
            mask = torch.cat([mask, caption_mask], dim=1)
        return DecoderCondition(emb=emb, context=context, context_mask=mask)

    def forward(self, x_t: Tensor, t: Tensor, cond: DecoderCondition) -> Tensor:
        """U-Net output (eps / x0 / v and, with learned variance, the variance channels) for noisy x_t."""
        return self.unet(x_t, t, emb=cond.emb, context=cond.context, context_mask=cond.context_mask)
