"""A trained upsampler as a component: a low-res image in, one ``scale`` times larger out (unCLIP §2.1).

:class:`DiffusionUpsampler` wraps the convolution-only network of :mod:`unclip.models.upsampler` with:

- its Gaussian diffusion over high-resolution images in [-1, 1] and the training loss, with optional noise
  augmentation of the condition (Ho et al. 2021, "Cascaded Diffusion Models" §4.2): the low-res image is
  noised to a random level ``u`` of the model's own schedule (``u`` uniform in [0, ``aug_max``]) and ``u``
  is given to the network; sampling uses one fixed level, ``sampling.aug_level``;
- the sampler settings it was exported with, and :func:`upsample`: few-step DDIM or DPM-Solver++ (Table 3
  used 27 and 15 steps) at any image size, whole or in overlapping tiles (:mod:`unclip.diffusion.tiling`)
  so a 1024 px output fits in modest memory;
- its component folder (``config.yaml`` + ``model.safetensors``), loaded strictly.

Blur and BSR corruption of the condition (§2.1) are data augmentation and live in the stage
(:mod:`unclip.data.degrade`); noise augmentation lives here because the network is told its level.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unclip.diffusion import check_sampler_settings, sample_images
from unclip.diffusion.gaussian import GaussianDiffusion, diffusion_from_options
from unclip.diffusion.tiling import tiled
from unclip.errors import CheckpointError, ConfigError
from unclip.io import load_state_strict, plain_lists, read_component_config, save_tensors, write_yaml
from unclip.models.unet import UNetConfig
from unclip.models.upsampler import (
    Upsampler,
    UpsamplerConfig,
    resize_condition,
    sr256_paper,
    sr256_tiny,
    sr1024_paper,
    sr1024_tiny,
)

COMPONENT_KIND = "upsampler"
PRESETS = {
    "sr256_tiny": sr256_tiny,
    "sr256_paper": sr256_paper,
    "sr1024_tiny": sr1024_tiny,
    "sr1024_paper": sr1024_paper,
}
EXTRA_SAMPLING_KEYS = ("aug_level", "tile_size", "tile_overlap", "consistent")


def upsampler_config(
    preset: str, *, noise_aug: bool, residual: bool = False, unet: Mapping[str, Any] | None = None
) -> UpsamplerConfig:
    """An :class:`UpsamplerConfig` from a preset (:data:`PRESETS`) with U-Net field overrides."""
    if preset not in PRESETS:
        raise ConfigError(f"upsampler model preset={preset!r} is not one of {sorted(PRESETS)}")
    base = PRESETS[preset]()
    try:
        unet_config = UNetConfig(**{**dataclasses.asdict(base.unet), **dict(unet or {})})
    except TypeError as err:
        raise ConfigError(f"upsampler model override: {err}") from err
    return UpsamplerConfig(unet=unet_config, noise_aug=noise_aug, residual=residual)


def check_sampling(options: Mapping[str, Any], num_timesteps: int) -> dict[str, Any]:
    """Validate upsampler sampler settings: the shared ones less guidance (upsamplers have no condition to
    drop), plus ``aug_level`` in [0, 1), ``tile_size`` (0: untiled), ``tile_overlap`` and ``consistent``
    (see :func:`back_project`; exports made before it existed sample without it). Errors name the key."""
    options = dict(options)
    options.setdefault("consistent", False)
    if not isinstance(options["consistent"], bool):
        raise ConfigError(f"sampling.consistent={options['consistent']!r} must be true or false")
    if "guidance_scale" in options:
        raise ConfigError("upsampler sampling takes no guidance_scale: the upsamplers are unguided")
    options = check_sampler_settings(options, "upsampler", num_timesteps, EXTRA_SAMPLING_KEYS, guided=False)
    if not 0.0 <= options["aug_level"] < 1.0:
        raise ConfigError(f"sampling.aug_level={options['aug_level']} must be in [0, 1)")
    if options["tile_size"] < 0 or options["tile_overlap"] < 0:
        raise ConfigError(
            f"sampling.tile_size={options['tile_size']} and "
            f"tile_overlap={options['tile_overlap']} must be >= 0"
        )
    options["aug_level"] = float(options["aug_level"])
    options["tile_size"], options["tile_overlap"] = int(options["tile_size"]), int(options["tile_overlap"])
    return options


def back_project(x0: Tensor, low_res: Tensor, scale: int) -> Tensor:
    """Make a high-res estimate consistent with its low-res input: add back, spread evenly over each
    ``scale`` x ``scale`` block, what the block's mean misses of the input pixel (both (B, C, ., .), same
    value range). With A the block average and A^+ its pseudo-inverse (nearest upsampling), this is
    x0 + A^+(y - A x0), the range-space correction of DDNM (Wang et al. 2023, "Zero-Shot Image Restoration
    Using Denoising Diffusion Null-Space Model", eq. 13) and one step of Irani & Peleg's (1991) iterative
    back-projection; since A A^+ = I, one step makes A x0 = y exactly. The network keeps the null space, the
    detail inside each block; the correction fixes block means, so flat regions cannot drift off the input
    by the fraction of a grey level that costs PSNR on low-contrast images."""
    missing = low_res - F.avg_pool2d(x0, scale)
    return x0 + missing.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)


def noise_augment(
    diffusion: GaussianDiffusion, low_res: Tensor, level: Tensor, generator: torch.Generator | None = None
) -> Tensor:
    """Noise each (B, C, h, w) low-res image to its ``level`` (B,) in [0, 1] of the diffusion's schedule:
    q(x_t | x_0) at t = round(level * (T - 1)), so level 0 leaves it almost clean."""
    t = (level * (diffusion.num_timesteps - 1)).round().long().to(low_res.device)
    noise = torch.randn(low_res.shape, generator=generator).to(low_res)
    return diffusion.q_sample(low_res, t, noise)


class DiffusionUpsampler(nn.Module):
    """An upsampler (§2.1) with its diffusion, upsampling ``scale`` and default sampling settings.

    ``diffusion`` holds the keys of :data:`unclip.diffusion.gaussian.DIFFUSION_KEYS`; ``sampling`` the
    defaults of :func:`upsample`. All are exported with the weights. The network is fully convolutional,
    so the same weights run on training crops and on whole images of any size that is a multiple of
    ``size_multiple``.
    """

    def __init__(
        self,
        config: UpsamplerConfig,
        scale: int,
        diffusion: Mapping[str, Any],
        sampling: Mapping[str, Any],
    ) -> None:
        super().__init__()
        if scale < 2:
            raise ConfigError(f"upsampler scale={scale} must be at least 2")
        self.diffusion_options, self.diffusion = diffusion_from_options(diffusion, "upsampler")
        if config.unet.learn_sigma != (self.diffusion.variance == "learned"):
            raise ConfigError(
                f"upsampler unet.learn_sigma={config.unet.learn_sigma} does not fit "
                f"variance={self.diffusion.variance!r}"
            )
        if config.residual and self.diffusion.prediction != "x0":
            raise ConfigError(
                f"a residual upsampler adds its output to the low-res image, so it needs prediction='x0', "
                f"not {self.diffusion.prediction!r}"
            )
        self.config = config
        self.scale = scale
        self.net = Upsampler(config)
        self.sampling = check_sampling(sampling, self.diffusion.num_timesteps)

    @property
    def size_multiple(self) -> int:
        """High-resolution sides (and tiles) must be multiples of this."""
        return self.config.unet.size_multiple

    def forward(self, images: Tensor, low_res: Tensor, aug_max: float = 0.0) -> dict[str, Tensor]:
        """Per-sample training losses for (B, 3, S, S) high-res images and their (B, 3, S/scale, S/scale)
        (already degraded) conditions, both in [-1, 1], at uniform timesteps; with noise augmentation the
        condition is also noised to a level uniform in [0, ``aug_max``]."""
        batch, device = len(images), images.device
        if (
            low_res.shape[-1] * self.scale != images.shape[-1]
            or low_res.shape[-2] * self.scale != images.shape[-2]
        ):
            raise ValueError(
                f"low-res {tuple(low_res.shape)} is not 1/{self.scale} of the images {tuple(images.shape)}"
            )
        level = None
        if self.config.noise_aug:
            level = torch.rand(batch, device=device) * aug_max
            low_res = noise_augment(self.diffusion, low_res, level)
        t = self.diffusion.sample_timesteps(batch, device=device)
        return self.diffusion.training_losses(
            lambda x_t, t_: self.net(x_t, t_, low_res, level), images.float(), t
        )

    def save(self, folder: str | Path) -> None:
        """Write the component folder: ``config.yaml`` (kind, model, scale, diffusion, sampling defaults) and
        ``model.safetensors``."""
        folder = Path(folder)
        save_tensors(folder / "model.safetensors", self.state_dict())
        write_yaml(
            folder / "config.yaml",
            {
                "kind": COMPONENT_KIND,
                "model": plain_lists(dataclasses.asdict(self.config)),
                "scale": self.scale,
                "diffusion": self.diffusion_options,
                "sampling": self.sampling,
            },
        )

    @classmethod
    def load(cls, folder: str | Path) -> DiffusionUpsampler:
        """Load a folder written by :meth:`save`, refusing a component of another kind."""
        path, config = read_component_config(folder, COMPONENT_KIND, "upsampler")
        try:
            model = config["model"]
            model_config = UpsamplerConfig(
                unet=UNetConfig(**model["unet"]), noise_aug=model["noise_aug"], residual=model["residual"]
            )
            upsampler = cls(model_config, config["scale"], config["diffusion"], config["sampling"])
        except (KeyError, TypeError, ConfigError) as err:
            raise CheckpointError(f"{path} is not a valid upsampler config: {err}") from err
        load_state_strict(upsampler, Path(folder) / "model.safetensors")
        return upsampler.eval()


@torch.no_grad()
def upsample(
    upsampler: DiffusionUpsampler,
    low_res: Tensor,
    *,
    generator: torch.Generator | None = None,
    progress: bool = False,
    **overrides: Any,
) -> Tensor:
    """Upsample (B, 3, h, w) images in [0, 1] to (B, 3, scale h, scale w) in [0, 1].

    ``overrides`` replace the exported sampling settings (sampler, steps, eta, aug_level, tile_size,
    tile_overlap, consistent). The condition is resized once to the output size and, with noise
    augmentation, noised once to ``aug_level``; with ``tile_size`` > 0 every step runs tile by tile; with
    ``consistent`` every x_0 estimate is back-projected onto the (clean) input (:func:`back_project`).
    """
    options = check_sampling({**upsampler.sampling, **overrides}, upsampler.diffusion.num_timesteps)
    if low_res.ndim != 4 or low_res.shape[1] != 3:
        raise ConfigError(f"low-res images must be (batch, 3, height, width), got {tuple(low_res.shape)}")
    b, _, h, w = low_res.shape
    size = (h * upsampler.scale, w * upsampler.scale)
    m = upsampler.size_multiple
    if size[0] % m or size[1] % m:
        raise ConfigError(
            f"a {h}x{w} input upsamples to {size[0]}x{size[1]}, which this upsampler cannot run: "
            f"output sides must be multiples of {m}"
        )
    device = next(upsampler.parameters()).device
    condition = low_res.to(device, torch.float32) * 2 - 1
    # bound to the clean input: noise augmentation below replaces ``condition``
    x0_fn = partial(back_project, low_res=condition, scale=upsampler.scale) if options["consistent"] else None
    level = None
    if upsampler.config.noise_aug:
        level = torch.full((b,), options["aug_level"], device=device)
        condition = noise_augment(upsampler.diffusion, condition, level, generator)
    condition = resize_condition(condition, size)

    def on_region(x: Tensor, t: Tensor, region: tuple[slice, slice]) -> Tensor:
        return upsampler.net(x, t, condition[..., region[0], region[1]], level)

    if options["tile_size"]:
        model_fn = tiled(on_region, options["tile_size"], options["tile_overlap"], m)
    else:
        model_fn = lambda x, t: on_region(x, t, (slice(None), slice(None)))  # noqa: E731
    return sample_images(
        upsampler.diffusion,
        model_fn,
        (b, 3, *size),
        options,
        generator=generator,
        progress=progress,
        device=device,
        x0_fn=x0_fn,
    )
