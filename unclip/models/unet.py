"""The ADM / GLIDE U-Net shared by the unCLIP decoder and both upsamplers.

Architecture of Dhariwal & Nichol 2021 ("Diffusion Models Beat GANs", §3 "Architecture improvements"):
residual blocks conditioned on the timestep through adaptive group normalisation (AdaGN, "scale-shift
norm"), BigGAN-style residual blocks for down- and upsampling, multi-head self-attention at chosen
resolutions with a fixed head width, and zero-initialised residual branches and output. The conditioning
tokens enter GLIDE's way (Nichol et al. 2021 §2.3 / App. A): each attention block projects them into
extra keys and values that the image tokens attend to alongside themselves.

One addition: an optional space-to-depth stem (``F.pixel_unshuffle`` by ``stem_factor`` at the input,
``F.pixel_shuffle`` at the output) so that the first U-Net level already works at ``H / stem_factor``,
which makes small CPU models several times faster per image.

Attention placement is given as ``attention_downsample``: downsampling factors relative to the *input
pixels*, stem included. Level ``i`` works at factor ``stem_factor * 2**i``, so a 64 px decoder with
attention at 32, 16 and 8 px uses ``(2, 4, 8)`` with or without a stem, and the same U-Net can run at any
image size (the upsamplers rely on this).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from unclip.errors import ConfigError


@dataclass
class UNetConfig:
    """Hyper-parameters of :class:`UNet` (the names follow ADM's ``create_model``).

    ``channel_mult[i] * model_channels`` channels at level ``i``; ``num_res_blocks`` residual blocks per
    level on the way down (one more on the way up, as in ADM); ``attention_downsample`` as explained in the
    module docstring (the middle block has attention when the deepest level's factor is listed);
    ``context_dim`` is the width of the conditioning tokens (``None``: self-attention only);
    ``learn_sigma`` doubles the output channels for the learned variance of Nichol & Dhariwal 2021 §3.1;
    ``output_norm`` keeps ADM's GroupNorm before the output convolution; an x_0 target of flat colours is
    learnt faster without it (measured in recipes/shapes/DECODER.md).
    """

    in_channels: int = 3
    out_channels: int = 3
    model_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 3, 4)
    num_res_blocks: int = 2
    attention_downsample: tuple[int, ...] = ()
    num_head_channels: int = 64
    context_dim: int | None = None
    dropout: float = 0.0
    learn_sigma: bool = False
    stem_factor: int = 1
    num_groups: int = 32
    use_checkpoint: bool = False
    output_norm: bool = True

    def __post_init__(self) -> None:
        # Hydra / OmegaConf hand sequences over as lists.
        self.channel_mult = tuple(self.channel_mult)
        self.attention_downsample = tuple(self.attention_downsample)
        for name in ("in_channels", "out_channels", "model_channels", "num_res_blocks", "stem_factor"):
            if getattr(self, name) < 1:
                raise ConfigError(f"unet.{name} must be >= 1, got {getattr(self, name)}")
        if self.model_channels % 2:
            raise ConfigError(
                f"unet.model_channels must be even (sinusoidal embedding), got {self.model_channels}"
            )
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise ConfigError(
                f"unet.channel_mult must be a non-empty list of positive ints, got {self.channel_mult}"
            )
        for mult in self.channel_mult:
            ch = mult * self.model_channels
            if ch % self.num_groups:
                raise ConfigError(
                    f"unet: {ch} channels (mult {mult}) not divisible by num_groups={self.num_groups}"
                )
        factors = self.level_factors
        for ds in self.attention_downsample:
            if ds not in factors:
                raise ConfigError(
                    f"unet.attention_downsample contains {ds}, but the levels work at downsampling factors "
                    f"{factors} (stem_factor={self.stem_factor}, {len(self.channel_mult)} levels)"
                )
            ch = self.channel_mult[factors.index(ds)] * self.model_channels
            if ch % self.num_head_channels:
                raise ConfigError(
                    f"unet: {ch} channels at factor {ds} not divisible by "
                    f"num_head_channels={self.num_head_channels}"
                )
        if self.context_dim is not None and (self.context_dim < 1 or not self.attention_downsample):
            raise ConfigError(
                f"unet.context_dim={self.context_dim} needs a positive width and attention layers "
                f"(attention_downsample={self.attention_downsample})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"unet.dropout must be in [0, 1), got {self.dropout}")

    @property
    def level_factors(self) -> tuple[int, ...]:
        """Downsampling factor (relative to input pixels) at which each level works."""
        return tuple(self.stem_factor * 2**i for i in range(len(self.channel_mult)))

    @property
    def time_embed_dim(self) -> int:
        """Width of the timestep embedding (4 x model_channels, as in ADM)."""
        return 4 * self.model_channels

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this."""
        return self.level_factors[-1]


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding (Vaswani et al. 2017 §3.5) of timesteps: (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def zero_init(module: nn.Module) -> nn.Module:
    """Zero a layer's parameters so its residual branch starts as the identity (as in ADM's released code)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """Residual block with AdaGN: ``GroupNorm(h) * (1 + s) + b`` with (s, b) from the timestep embedding
    (ADM §3), optionally resampling both branches BigGAN-style (Brock et al. 2019): average pooling down,
    nearest-neighbour up, applied after the first norm + activation."""

    def __init__(
        self,
        channels: int,
        emb_dim: int,
        out_channels: int,
        dropout: float,
        num_groups: int,
        resample: Literal["up", "down"] | None = None,
    ) -> None:
        super().__init__()
        self.resample = resample
        self.in_norm = nn.GroupNorm(num_groups, channels)
        self.in_conv = nn.Conv2d(channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, 2 * out_channels)
        self.out_norm = nn.GroupNorm(num_groups, out_channels)
        self.dropout = nn.Dropout(dropout)
        self.out_conv = zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)

    def _resample(self, x: Tensor) -> Tensor:
        if self.resample == "down":
            return F.avg_pool2d(x, 2)
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        return x

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_conv(self._resample(F.silu(self.in_norm(x))))
        x = self._resample(x)
        scale, shift = self.emb_proj(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.out_norm(h) * (1 + scale) + shift
        h = self.out_conv(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions (ADM §3: fixed 64 channels per head), with GLIDE's
    conditioning: the context tokens are projected to extra keys/values placed before the image's own,
    and ``context_mask`` (B, L), True = real token, hides padding from every query."""

    def __init__(self, channels: int, head_channels: int, num_groups: int, context_dim: int | None) -> None:
        super().__init__()
        self.heads = channels // head_channels
        self.norm = nn.GroupNorm(num_groups, channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.context_kv = nn.Linear(context_dim, 2 * channels) if context_dim is not None else None
        self.proj_out = zero_init(nn.Linear(channels, channels))

    def forward(self, x: Tensor, context: Tensor | None = None, context_mask: Tensor | None = None) -> Tensor:
        b, c, height, width = x.shape
        # (B, HW, C) is a view of a channels_last tensor, so no copy in the fast memory format.
        tokens = self.norm(x).flatten(2).transpose(1, 2)
        q, k, v = self.qkv(tokens).chunk(3, dim=-1)
        mask = None
        if context is not None and self.context_kv is not None:
            ck, cv = self.context_kv(context).chunk(2, dim=-1)
            k, v = torch.cat([ck, k], dim=1), torch.cat([cv, v], dim=1)
            if context_mask is not None:
                own = torch.ones(b, height * width, dtype=torch.bool, device=x.device)
                mask = torch.cat([context_mask, own], dim=1)[:, None, None, :]
        q, k, v = (z.unflatten(-1, (self.heads, -1)).transpose(1, 2) for z in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = self.proj_out(out.transpose(1, 2).flatten(2))
        return x + out.transpose(1, 2).reshape(b, c, height, width)


class Stage(nn.ModuleList):
    """A sequence of residual / attention layers fed the embedding and the context (ADM's
    ``TimestepEmbedSequential``), each optionally recomputed in the backward pass to save memory."""

    def __init__(self, layers: list[nn.Module], use_checkpoint: bool) -> None:
        super().__init__(layers)
        self.use_checkpoint = use_checkpoint

    def forward(self, h: Tensor, emb: Tensor, context: Tensor | None, context_mask: Tensor | None) -> Tensor:
        for layer in self:
            args = (h, emb) if isinstance(layer, ResBlock) else (h, context, context_mask)
            if self.use_checkpoint and torch.is_grad_enabled():
                h = checkpoint(layer, *args, use_reentrant=False)
            else:
                h = layer(*args)
        return h


class UNet(nn.Module):
    """The ADM / GLIDE U-Net (Dhariwal & Nichol 2021 §3; Nichol et al. 2021 §2.3), see the module docstring.

    ``forward(x, t, emb, context, context_mask)``: ``x`` (B, in_channels, H, W) with H and W multiples of
    ``config.size_multiple``; ``t`` (B,) timesteps (integer or fractional); ``emb`` (B, time_embed_dim) is
    added to the timestep embedding; ``context`` (B, L, context_dim) tokens that every attention block
    attends to, ``context_mask`` (B, L) bool marking the real ones. Returns (B, out_channels, H, W), or
    (B, 2 * out_channels, H, W) with ``learn_sigma`` (the mean output first, then the variance output).
    """

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = cfg = config
        mc, tdim, ckpt = cfg.model_channels, cfg.time_embed_dim, cfg.use_checkpoint
        self.time_embed = nn.Sequential(nn.Linear(mc, tdim), nn.SiLU(), nn.Linear(tdim, tdim))

        def res(ch_in: int, ch_out: int, resample: Literal["up", "down"] | None = None) -> ResBlock:
            return ResBlock(ch_in, tdim, ch_out, cfg.dropout, cfg.num_groups, resample)

        def attn(ch: int) -> AttentionBlock:
            return AttentionBlock(ch, cfg.num_head_channels, cfg.num_groups, cfg.context_dim)

        f = cfg.stem_factor
        ch = cfg.channel_mult[0] * mc
        self.conv_in = nn.Conv2d(cfg.in_channels * f * f, ch, 3, padding=1)
        skip_channels = [ch]
        self.down = nn.ModuleList()
        last = len(cfg.channel_mult) - 1
        for level, (mult, ds) in enumerate(zip(cfg.channel_mult, cfg.level_factors)):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [res(ch, mult * mc)]
                ch = mult * mc
                if ds in cfg.attention_downsample:
                    layers.append(attn(ch))
                self.down.append(Stage(layers, ckpt))
                skip_channels.append(ch)
            if level != last:
                self.down.append(Stage([res(ch, ch, "down")], ckpt))
                skip_channels.append(ch)

        middle: list[nn.Module] = [res(ch, ch)]
        if cfg.level_factors[-1] in cfg.attention_downsample:
            middle.append(attn(ch))
        middle.append(res(ch, ch))
        self.middle = Stage(middle, ckpt)

        self.up = nn.ModuleList()
        for level, (mult, ds) in reversed(list(enumerate(zip(cfg.channel_mult, cfg.level_factors)))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [res(ch + skip_channels.pop(), mult * mc)]
                ch = mult * mc
                if ds in cfg.attention_downsample:
                    layers.append(attn(ch))
                if level and i == cfg.num_res_blocks:
                    layers.append(res(ch, ch, "up"))
                self.up.append(Stage(layers, ckpt))

        out_channels = cfg.out_channels * (2 if cfg.learn_sigma else 1)
        # ADM normalises the features before the output convolution. That removes each image's mean and scale
        # per group, which an eps target (zero-mean noise) does not miss; an x_0 target of flat colours must
        # rebuild its absolute levels past it, and the tiny decoder learns sharp x_0 faster without it.
        self.out_norm = nn.GroupNorm(cfg.num_groups, ch) if cfg.output_norm else nn.Identity()
        self.out_conv = zero_init(nn.Conv2d(ch, out_channels * f * f, 3, padding=1))

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        emb: Tensor | None = None,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
    ) -> Tensor:
        cfg = self.config
        b, _, height, width = x.shape
        m = cfg.size_multiple
        if height % m or width % m:
            raise ValueError(f"UNet input {tuple(x.shape)}: height and width must be multiples of {m}")
        if context is not None and cfg.context_dim is None:
            raise ValueError("UNet was built without context_dim but was given context tokens")
        if t.ndim == 0:
            t = t.expand(b)
        e = self.time_embed(timestep_embedding(t, cfg.model_channels).to(self.time_embed[0].weight.dtype))
        if emb is not None:
            e = e + emb
        if cfg.stem_factor > 1:
            x = F.pixel_unshuffle(x, cfg.stem_factor)
        h = self.conv_in(x)
        skips = [h]
        for stage in self.down:
            h = stage(h, e, context, context_mask)
            skips.append(h)
        h = self.middle(h, e, context, context_mask)
        for stage in self.up:
            h = stage(torch.cat([h, skips.pop()], dim=1), e, context, context_mask)
        h = self.out_conv(F.silu(self.out_norm(h)))
        if cfg.stem_factor > 1:
            h = F.pixel_shuffle(h, cfg.stem_factor)
        return h
