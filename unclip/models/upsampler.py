"""unCLIP's diffusion upsamplers, 64 -> 256 and 256 -> 1024 (Ramesh et al. 2022 §2.1 and App. C).

Conditioning by concatenation, as in ADM's super-resolution model and cascaded diffusion (Saharia et al.
2021, Ho et al. 2021): the low-resolution image is resized bicubically to the target size, clamped to the
[-1, 1] pixel range that bicubic overshoots at sharp edges (:func:`resize_condition`), and stacked with the
noisy image as extra input channels. No caption and no attention -- the paper's upsamplers use
"only spatial convolutions (i.e., no attention layers)" and are trained on random crops a quarter of the
image side, then run at full size, which only a convolutional network allows.

Optional noise augmentation of the low-resolution input (Ho et al. 2021 §4.2; unCLIP §2.1 corrupts the
conditioning image): the caller corrupts ``low_res`` and passes the level ``aug_level`` in [0, 1]
(fraction of the augmentation schedule), embedded like a timestep (of ``1000 * aug_level``) and added
to the timestep embedding.

Optional residual output (``residual``): the network's (mean) output is added to the resized low-res image,
so an untrained model already returns the (clamped) bicubic upsampling and training only learns the detail it
misses -- residual learning for super-resolution (Kim et al. 2016, VDSR; SRDiff, Li et al. 2022, diffuses
the residual itself). It is meant for x0 prediction, where the output is an image.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unclip.errors import ConfigError
from unclip.models.unet import UNet, UNetConfig, timestep_embedding


def resize_condition(low_res: Tensor, size: tuple[int, int]) -> Tensor:
    """The low-res image (in [-1, 1]) resized bicubically to ``size`` and clamped to [-1, 1]; a no-op when it
    already has that size (tiled sampling resizes once, then slices)."""
    if tuple(low_res.shape[-2:]) == tuple(size):
        return low_res
    return F.interpolate(low_res, size=size, mode="bicubic", align_corners=False).clamp(-1, 1)


def _tiny_unet(stem_factor: int = 2) -> UNetConfig:
    return UNetConfig(
        in_channels=6,
        model_channels=16,
        channel_mult=(1, 2, 2),
        num_res_blocks=1,
        stem_factor=stem_factor,
        num_groups=8,
    )


@dataclass
class UpsamplerConfig:
    """Upsampler hyper-parameters: a convolution-only U-Net whose input is the noisy image plus the
    resized low-res image (``in_channels = 2 * out_channels``), and whether the model takes a
    noise-augmentation level. The defaults are the ``sr256_tiny`` preset."""

    unet: UNetConfig = field(default_factory=_tiny_unet)
    noise_aug: bool = True
    residual: bool = False

    def __post_init__(self) -> None:
        u = self.unet
        if u.in_channels != 2 * u.out_channels:
            raise ConfigError(
                f"upsampler: unet.in_channels={u.in_channels} must be 2 * out_channels={2 * u.out_channels} "
                "(noisy image + resized low-res image)"
            )
        if u.attention_downsample or u.context_dim is not None:
            raise ConfigError(
                f"upsampler: the U-Net must be convolution-only, got "
                f"attention_downsample={u.attention_downsample} "
                f"and context_dim={u.context_dim}"
            )


def sr256_tiny() -> UpsamplerConfig:
    """CPU preset for 64 -> 256 (0.33M parameters): stem 2, levels of 16/32/32 channels at 1/2, 1/4, 1/8."""
    return UpsamplerConfig()


def sr1024_tiny() -> UpsamplerConfig:
    """CPU preset for 256 -> 1024 (0.35M parameters): stem 4, levels of 16/32/32 channels at 1/4, 1/8,
    1/16 of the image side."""
    return UpsamplerConfig(unet=_tiny_unet(stem_factor=4))


def sr256_paper() -> UpsamplerConfig:
    """unCLIP Table 3, 64 -> 256 (~700M parameters): 320 channels, 3 residual blocks, multipliers 1,2,3,4.
    Table 3 samples it with DDIM, so no learned variance; the paper corrupts the low-res input with blur
    rather than level-conditioned noise, so no ``aug_level``."""
    return UpsamplerConfig(
        unet=UNetConfig(in_channels=6, model_channels=320, channel_mult=(1, 2, 3, 4), num_res_blocks=3),
        noise_aug=False,
    )


def sr1024_paper() -> UpsamplerConfig:
    """unCLIP Table 3, 256 -> 1024 (~300M parameters): 192 channels, 2 residual blocks, multipliers
    1,1,2,2,4,4. Sampled with DDIM, so no learned variance; BSR-degraded low-res input, no ``aug_level``."""
    return UpsamplerConfig(
        unet=UNetConfig(in_channels=6, model_channels=192, channel_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2),
        noise_aug=False,
    )


class Upsampler(nn.Module):
    """Super-resolution diffusion model: ``forward(x_t, t, low_res, aug_level)``, see the module docstring."""

    def __init__(self, config: UpsamplerConfig) -> None:
        super().__init__()
        self.config = config
        mc, tdim = config.unet.model_channels, config.unet.time_embed_dim
        self.unet = UNet(config.unet)
        self.aug_embed = (
            nn.Sequential(nn.Linear(mc, tdim), nn.SiLU(), nn.Linear(tdim, tdim)) if config.noise_aug else None
        )

    def forward(self, x_t: Tensor, t: Tensor, low_res: Tensor, aug_level: Tensor | None = None) -> Tensor:
        """``x_t`` (B, C, H, W) noisy high-res image, ``t`` (B,) timesteps, ``low_res`` (B, C, h, w) with
        any h, w, ``aug_level`` (B,) in [0, 1], required exactly when the model has noise augmentation."""
        if (aug_level is None) == (self.aug_embed is not None):
            need = "requires" if self.aug_embed is not None else "was built without noise_aug and takes no"
            raise ValueError(f"this upsampler {need} aug_level")
        cond = resize_condition(low_res, x_t.shape[-2:])
        emb = None
        if self.aug_embed is not None:
            level = timestep_embedding(1000.0 * aug_level, self.config.unet.model_channels)
            emb = self.aug_embed(level.to(self.aug_embed[0].weight.dtype))
        out = self.unet(torch.cat([x_t, cond], dim=1), t, emb=emb)
        if self.config.residual:
            c = cond.shape[1]
            out = torch.cat([out[:, :c] + cond.to(out.dtype), out[:, c:]], dim=1)
        return out
