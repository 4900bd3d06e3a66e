"""The trained decoder as a component: CLIP image embedding (+ caption) in, 64 px image out (unCLIP §2.1).

:class:`DiffusionDecoder` wraps the network of :mod:`unclip.models.decoder` with what it needs around it:

- the Gaussian diffusion over images in [-1, 1] and its training loss (eps / x0 / v, fixed or learned
  variance with the hybrid loss: unCLIP Table 3 trains the decoder with learned variance), with the CLIP
  embedding dropped ``image_embedding_drop`` and the caption ``caption_drop`` of the time (§2.1: 10 % and
  50 %) for classifier-free guidance;
- the sampler settings it was exported with, and :func:`sample_decoder`: the conditioning computed once, the
  conditional and unconditional halves run as one batch per step (Ho & Salimans 2022), x_0 clipped to
  [-1, 1] (Ho et al. 2020 §3.3); and :func:`invert_decoder`, the DDIM inversion of §3.1's bipartite
  latent (z_i, x_T);
- its component folder (``config.yaml`` + ``model.safetensors``), loaded strictly and only against the CLIP
  it was trained with.

The unconditional half of guidance drops both the CLIP embedding and the caption, the pair of inputs the
decoder was trained to do without.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from unclip.diffusion import (
    check_sampler_settings,
    classifier_free_guidance,
    ddim_invert,
    sample_ddim,
    sample_images,
    space_timesteps,
)
from unclip.diffusion.gaussian import ModelFn, diffusion_from_options, edge_emphasis
from unclip.errors import CheckpointError, ConfigError
from unclip.io import load_state_strict, plain_lists, read_component_config, save_tensors, write_yaml
from unclip.models.decoder import Decoder, DecoderConfig, cat_conditions, decoder_paper, decoder_tiny
from unclip.models.text_encoder import TextEncoderConfig
from unclip.models.unet import UNetConfig

COMPONENT_KIND = "decoder"
PRESETS = {"tiny": decoder_tiny, "paper": decoder_paper}


def decoder_config(
    preset: str,
    *,
    clip_embed_dim: int,
    context_length: int,
    learn_sigma: bool,
    unet: Mapping[str, Any] | None = None,
    text: Mapping[str, Any] | None = None,
    num_clip_tokens: int | None = None,
) -> DecoderConfig:
    """A :class:`DecoderConfig` from a preset (``tiny`` | ``paper``) with field overrides.

    The CLIP sets the embedding width and the caption length (captions are CLIP token ids); the diffusion's
    variance sets ``learn_sigma``; the U-Net's ``context_dim`` follows the caption transformer's width.
    """
    if preset not in PRESETS:
        raise ConfigError(f"decoder model preset={preset!r} is not one of {sorted(PRESETS)}")
    base = PRESETS[preset]()
    try:
        text_config = TextEncoderConfig(
            **{**dataclasses.asdict(base.text), **dict(text or {}), "context_length": context_length}
        )
        unet_config = UNetConfig(
            **{
                **dataclasses.asdict(base.unet),
                **dict(unet or {}),
                "context_dim": text_config.width,
                "learn_sigma": learn_sigma,
            }
        )
    except TypeError as err:
        raise ConfigError(f"decoder model override: {err}") from err
    tokens = base.num_clip_tokens if num_clip_tokens is None else num_clip_tokens
    return DecoderConfig(unet_config, text_config, clip_embed_dim, tokens)


def check_sampling(options: Mapping[str, Any], num_timesteps: int) -> dict[str, Any]:
    """Validate decoder sampler settings; return them as a plain dict. Errors name the key."""
    return check_sampler_settings(dict(options), "decoder", num_timesteps)


class DiffusionDecoder(nn.Module):
    """unCLIP's decoder (§2.1) with its diffusion, image size and default sampling settings.

    ``diffusion`` holds ``schedule``, ``schedule_shift``, ``num_timesteps``, ``prediction``, ``variance``
    and ``loss_weighting`` (see :class:`GaussianDiffusion`); ``sampling`` the defaults of
    :func:`sample_decoder`. All three are exported with the weights.
    """

    def __init__(
        self,
        config: DecoderConfig,
        image_size: int,
        diffusion: Mapping[str, Any],
        sampling: Mapping[str, Any],
    ) -> None:
        super().__init__()
        self.diffusion_options, self.diffusion = diffusion_from_options(diffusion, "decoder")
        d = self.diffusion_options
        if config.unet.learn_sigma != (d["variance"] == "learned"):
            raise ConfigError(
                f"decoder unet.learn_sigma={config.unet.learn_sigma} does not fit variance={d['variance']!r}"
            )
        if image_size < 1 or image_size % config.unet.size_multiple:
            raise ConfigError(
                f"decoder image_size={image_size} must be a positive multiple of "
                f"{config.unet.size_multiple} (the U-Net's deepest downsampling factor)"
            )
        self.config = config
        self.image_size = image_size
        self.net = Decoder(config)
        self.sampling = check_sampling(sampling, self.diffusion.num_timesteps)

    def forward(
        self,
        images: Tensor,
        image_embedding: Tensor,
        caption_tokens: Tensor | None,
        image_embedding_drop: float = 0.0,
        caption_drop: float = 0.0,
        edge_loss_weight: float = 0.0,
    ) -> dict[str, Tensor]:
        """Per-sample training losses for (B, 3, S, S) images in [-1, 1] at uniform timesteps.

        Each sample's CLIP embedding is replaced by the learned null embedding with probability
        ``image_embedding_drop`` and, independently, its caption is hidden with probability ``caption_drop``
        (§2.1). ``edge_loss_weight`` > 0 weights the squared error near the images' edges that much more
        (:func:`~unclip.diffusion.gaussian.edge_emphasis`). Everything runs inside ``forward`` so that DDP
        sees every parameter used.
        """
        batch, device = len(images), images.device
        t = self.diffusion.sample_timesteps(batch, device=device)
        cond = self.net.encode_condition(
            image_embedding.float(),
            caption_tokens,
            drop_image_embedding=torch.rand(batch, device=device) < image_embedding_drop,
            drop_caption=torch.rand(batch, device=device) < caption_drop,
        )
        images = images.float()
        weight = edge_emphasis(images, edge_loss_weight) if edge_loss_weight > 0 else None
        return self.diffusion.training_losses(
            lambda x_t, t_: self.net(x_t, t_, cond), images, t, pixel_weight=weight
        )

    def guided_model(
        self,
        image_embedding: Tensor,
        caption_tokens: Tensor | None,
        guidance_scale: float,
        negative_tokens: Tensor | None = None,
    ) -> ModelFn:
        """``model_fn(x_t, t)`` for the samplers: the conditioning is encoded once here; with a scale other
        than 1 the conditional and the unconditional halves run as one batch. The unconditional half drops
        the CLIP embedding and the caption or, given ``negative_tokens`` (B, L), replaces the caption with
        that negative one, so guidance also steers away from what it describes."""
        device = self.net.null_image_embedding.device
        z = image_embedding.to(device, torch.float32)
        tokens = None if caption_tokens is None else caption_tokens.to(device)
        cond = self.net.encode_condition(z, tokens)
        if guidance_scale == 1.0:
            return lambda x, t: self.net(x, t, cond)
        everything = torch.ones(len(z), dtype=torch.bool, device=device)
        negative = None if negative_tokens is None else negative_tokens.to(device)
        null = self.net.encode_condition(z, negative, drop_image_embedding=everything)
        doubled = cat_conditions(cond, null)
        return classifier_free_guidance(
            lambda x, t: self.net(x, t, doubled),
            guidance_scale,
            learned_variance=self.diffusion.learned_variance,
        )

    def save(self, folder: str | Path, clip_fingerprint: str) -> None:
        """Write the component folder: ``config.yaml`` (kind, CLIP fingerprint, model, image size, diffusion,
        sampling defaults) and ``model.safetensors``."""
        folder = Path(folder)
        save_tensors(folder / "model.safetensors", self.state_dict(), {"clip_fingerprint": clip_fingerprint})
        write_yaml(
            folder / "config.yaml",
            {
                "kind": COMPONENT_KIND,
                "clip_fingerprint": clip_fingerprint,
                "model": plain_lists(dataclasses.asdict(self.config)),
                "image_size": self.image_size,
                "diffusion": self.diffusion_options,
                "sampling": self.sampling,
            },
        )

    @classmethod
    def load(cls, folder: str | Path, clip_fingerprint: str) -> DiffusionDecoder:
        """Load a folder written by :meth:`save`, refusing one of another kind or trained against another
        CLIP (its embeddings live in a different space)."""
        path, config = read_component_config(folder, COMPONENT_KIND, "decoder", clip_fingerprint)
        try:
            model = config["model"]
            model_config = DecoderConfig(
                unet=UNetConfig(**model["unet"]),
                text=TextEncoderConfig(**model["text"]),
                clip_embed_dim=model["clip_embed_dim"],
                num_clip_tokens=model["num_clip_tokens"],
            )
            decoder = cls(model_config, config["image_size"], config["diffusion"], config["sampling"])
        except (KeyError, TypeError, ConfigError) as err:
            raise CheckpointError(f"{path} is not a valid decoder config: {err}") from err
        load_state_strict(decoder, Path(folder) / "model.safetensors")
        return decoder.eval()


def _device(decoder: DiffusionDecoder) -> torch.device:
    return decoder.net.null_image_embedding.device


def inversion_timesteps(num_timesteps: int, steps: str) -> list[int]:
    """The timesteps the inverted path visits: as many as ``steps`` names, every (T // N)-th from 0.

    Inversion cannot end at the last timestep of a cosine schedule, where alpha_bar is ~1e-9: the first DDIM
    step back computes x_0 = (x_T - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar), which multiplies the small
    difference between eps(x_T) and the eps the inversion used by ~1e4. DDIM's own uniform spacing (Song et
    al. 2021 §4.2) stops one stride short of T, where consecutive sqrt(alpha_bar) differ by a factor of ~2.
    """
    count = len(space_timesteps(num_timesteps, steps))
    return list(range(0, num_timesteps, max(1, num_timesteps // count)))[:count]


def _inverted_options(decoder: DiffusionDecoder, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Sampling settings of the inverted path, which only DDIM can run."""
    if overrides.get("sampler", "ddim") != "ddim":
        raise ConfigError(
            f"inverted noise is decoded with ddim (the inversion's reverse), not {overrides['sampler']!r}"
        )
    return check_sampling(
        {**decoder.sampling, **overrides, "sampler": "ddim"}, decoder.diffusion.num_timesteps
    )


@torch.no_grad()
def sample_decoder(
    decoder: DiffusionDecoder,
    image_embedding: Tensor,
    caption_tokens: Tensor | None = None,
    *,
    negative_tokens: Tensor | None = None,
    noise: Tensor | None = None,
    inverted_noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
    **overrides: Any,
) -> Tensor:
    """Decode (B, D) CLIP image embeddings, with (B, L) CLIP caption token ids or none, into (B, 3, S, S)
    images in [0, 1].

    ``overrides`` replace the decoder's exported sampling settings (sampler, steps, eta, guidance_scale);
    ``negative_tokens`` (B, L) are a caption to guide away from (see :meth:`DiffusionDecoder.guided_model`).
    By default x_T is fresh noise drawn with ``generator`` (or the given ``noise``, e.g. one x_T shared by
    every sample) and every predicted x_0 is clipped to [-1, 1]. ``inverted_noise`` is an x_T from
    :func:`invert_decoder` (same steps and guidance): then DDIM runs over the inversion's timesteps without
    clipping, so that eta = 0 retraces the inversion.
    """
    if noise is not None and inverted_noise is not None:
        raise ConfigError("give noise or inverted_noise, not both")
    inverted = inverted_noise is not None
    if inverted:
        options = _inverted_options(decoder, overrides)
    else:
        options = check_sampling({**decoder.sampling, **overrides}, decoder.diffusion.num_timesteps)
    device = _device(decoder)
    model_fn = decoder.guided_model(
        image_embedding, caption_tokens, options["guidance_scale"], negative_tokens
    )
    if not inverted:
        size = decoder.image_size
        start = (len(image_embedding), 3, size, size) if noise is None else noise.to(device, torch.float32)
        return sample_images(
            decoder.diffusion, model_fn, start, options, generator=generator, progress=progress, device=device
        )
    x = sample_ddim(
        decoder.diffusion,
        model_fn,
        inverted_noise.to(device, torch.float32),
        timesteps=inversion_timesteps(decoder.diffusion.num_timesteps, options["steps"]),
        eta=options["eta"],
        generator=generator,
        progress=progress,
    )
    return ((x + 1) / 2).clamp(0, 1)


@torch.no_grad()
def invert_decoder(
    decoder: DiffusionDecoder,
    images: Tensor,
    image_embedding: Tensor,
    caption_tokens: Tensor | None = None,
    *,
    progress: bool = False,
    **overrides: Any,
) -> Tensor:
    """The x_T that :func:`sample_decoder` with ``inverted_noise`` (eta = 0, same steps and guidance)
    decodes back into (B, 3, S, S) ``images`` in [0, 1]: unCLIP §3.1's inverted latent, found by
    :func:`unclip.diffusion.ddim_invert` over :func:`inversion_timesteps`."""
    options = _inverted_options(decoder, overrides)
    size = decoder.image_size
    if images.shape[1:] != (3, size, size):
        raise ConfigError(f"images to invert must be (batch, 3, {size}, {size}), got {tuple(images.shape)}")
    model_fn = decoder.guided_model(image_embedding, caption_tokens, options["guidance_scale"])
    x0 = images.to(_device(decoder), torch.float32) * 2 - 1
    timesteps = inversion_timesteps(decoder.diffusion.num_timesteps, options["steps"])
    return ddim_invert(decoder.diffusion, model_fn, x0, timesteps=timesteps, progress=progress)
