"""Training-time corruptions of an upsampler's low-resolution input (unCLIP §2.1 and App. C).

unCLIP trains its upsamplers on corrupted conditioning images so that they tolerate the artefacts of the
stage below them: "we slightly corrupt the conditioning image during training. For the first upsampling
stage, we use gaussian blur, and for the second, we use a more diverse BSR degradation". Both are here, on
batches of (B, C, H, W) images in [-1, 1], each sample drawn independently from ``generator`` (the torch
default generator when ``None``, whose state the trainer checkpoints, so a resumed run corrupts alike):

- :func:`random_blur`: a Gaussian blur of kernel 3 with a random sigma (the paper's 64 -> 256 stage: kernel
  3, sigma 0.6);
- :func:`bsr_degrade`: the shuffled degradation pipeline of Zhang et al. 2021 ("Designing a Practical
  Degradation Model for Deep Blind Image Super-Resolution", BSRGAN §3): blur, a down-and-up resize with a
  random interpolation, Gaussian noise and JPEG compression, each applied with probability
  :data:`BSR_PROBABILITY` in a random order per image.

The output keeps the input's size: these corrupt the condition, they do not change the upsampling factor.
"""

from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from unclip.errors import ConfigError
from unclip.images import model_range

DEGRADATIONS = ("none", "blur", "bsr")
BSR_PROBABILITY = 0.5
BSR_BLUR_SIGMA = (0.2, 1.5)  # in pixels of the low-res image
BSR_RESIZE_SCALE = (0.5, 1.0)  # down to this fraction of the side, then back up
BSR_RESIZE_MODES = ("bilinear", "bicubic", "area")
BSR_NOISE_STD = (1 / 255, 15 / 255)  # on the [0, 1] scale
BSR_JPEG_QUALITY = (40, 95)


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def gaussian_blur(images: Tensor, sigma: Tensor, kernel_size: int) -> Tensor:
    """Blur each image of (B, C, H, W) with its own sigma (B,) by a separable Gaussian of odd
    ``kernel_size``, reflecting at the borders. A sigma of 0 leaves the image unchanged."""
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ConfigError(f"blur kernel_size must be a positive odd number, got {kernel_size}")
    b, c, h, w = images.shape
    radius = kernel_size // 2
    offsets = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    safe = sigma.to(images).clamp_min(1e-6)[:, None]
    kernel = torch.exp(-0.5 * (offsets[None] / safe) ** 2)
    kernel = torch.where(sigma.to(images.device)[:, None] > 0, kernel, (offsets[None] == 0).to(images))
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (B*C, K)
    x = F.pad(images.reshape(1, b * c, h, w), (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, kernel[:, None, None, :], groups=b * c)
    x = F.conv2d(x, kernel[:, None, :, None], groups=b * c)
    return x.reshape(b, c, h, w)


def random_blur(
    images: Tensor,
    sigma_range: tuple[float, float],
    probability: float = 1.0,
    kernel_size: int = 3,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Blur each image with probability ``probability`` by a Gaussian with sigma uniform in
    ``sigma_range`` (unCLIP's first upsampler: kernel 3, sigma 0.6)."""
    low, high = sigma_range
    b = len(images)
    sigma = low + (high - low) * torch.rand(b, generator=generator)
    sigma = torch.where(torch.rand(b, generator=generator) < probability, sigma, torch.zeros_like(sigma))
    return gaussian_blur(images, sigma, kernel_size)


def _jpeg(image: Tensor, quality: int) -> Tensor:
    """Round-trip one (C, H, W) image in [-1, 1] through JPEG at ``quality``."""
    array = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array.permute(1, 2, 0).numpy()).save(buffer, format="JPEG", quality=quality)
    decoded = np.array(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))  # writable, for torch
    return model_range(torch.from_numpy(decoded).permute(2, 0, 1)).to(image)


def _resize_down_up(image: Tensor, scale: float, mode: str) -> Tensor:
    h, w = image.shape[-2:]
    small = (max(1, round(h * scale)), max(1, round(w * scale)))
    kwargs = {} if mode == "area" else {"align_corners": False}
    down = F.interpolate(image[None], size=small, mode=mode, **kwargs)
    back_mode = "bilinear" if mode == "area" else mode
    return F.interpolate(down, size=(h, w), mode=back_mode, align_corners=False)[0]


def bsr_degrade(images: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """BSR-style degradation (see the module docstring), independently per image; values stay in [-1, 1]."""
    out = []
    for image in images:
        operations = ["blur", "resize", "noise", "jpeg"]
        order = torch.randperm(len(operations), generator=generator).tolist()
        x = image
        for op in (operations[i] for i in order):
            if float(torch.rand((), generator=generator)) >= BSR_PROBABILITY:
                continue
            if op == "blur":
                sigma = torch.tensor([_uniform(*BSR_BLUR_SIGMA, generator)])
                x = gaussian_blur(x[None], sigma, kernel_size=2 * int(np.ceil(3 * BSR_BLUR_SIGMA[1])) + 1)[0]
            elif op == "resize":
                mode = BSR_RESIZE_MODES[int(torch.randint(len(BSR_RESIZE_MODES), (), generator=generator))]
                x = _resize_down_up(x, _uniform(*BSR_RESIZE_SCALE, generator), mode)
            elif op == "noise":
                std = 2 * _uniform(*BSR_NOISE_STD, generator)  # x2: [0, 1] scale to [-1, 1]
                x = x + std * torch.randn(x.shape, generator=generator).to(x)
            else:
                x = _jpeg(x, int(round(_uniform(*BSR_JPEG_QUALITY, generator))))
            x = x.clamp(-1, 1)
        out.append(x)
    return torch.stack(out)


def degrade(
    images: Tensor,
    kind: str,
    *,
    blur_sigma: tuple[float, float] = (0.6, 0.6),
    probability: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Apply the configured corruption ``kind`` (one of :data:`DEGRADATIONS`) to a batch: ``blur`` blurs a
    ``probability`` fraction of the images (kernel 3, sigma in ``blur_sigma``); ``bsr`` degrades that
    fraction with :func:`bsr_degrade`; ``none`` returns the batch unchanged."""
    if kind not in DEGRADATIONS:
        raise ConfigError(f"degradation {kind!r} is not one of {DEGRADATIONS}")
    if kind == "none":
        return images
    if kind == "blur":
        return random_blur(images, blur_sigma, probability, generator=generator)
    chosen = torch.rand(len(images), generator=generator) < probability
    if not chosen.any():
        return images
    out = images.clone()
    out[chosen] = bsr_degrade(images[chosen], generator=generator)
    return out
