"""How well does an upsampler recover the true high-resolution image? (unCLIP §2.1's 64 -> 256 -> 1024.)

Each held-out low-res image is upsampled and compared, as 8-bit images, with the true high-resolution
image of the same content (for ``shapes``: the same spec rendered at both sizes):

- ``psnr``: PSNR of the output against the truth (dB, mean over images);
- ``psnr_bicubic``: the same for bicubic upsampling (Keys' cubic, a = -0.5, as PIL and MATLAB do it), the
  baseline every super-resolution model must beat; ``psnr_gain`` = ``psnr - psnr_bicubic``;
- ``psnr_consistency``: PSNR of the output, box-downsampled back to the input's size, against the input:
  whether the upsampler kept the image it was given rather than inventing another (Saharia et al. 2021,
  SR3 §4.2 report the same "consistency").
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from unclip.images import to_uint8
from unclip.upsampler_sampling import DiffusionUpsampler, upsample


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two uint8 images in dB (capped at 100 dB for identical images)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 100.0 if mse == 0 else 10 * np.log10(255.0**2 / mse)


def bicubic(image: np.ndarray, scale: int) -> np.ndarray:
    """A (H, W, 3) uint8 image upsampled ``scale`` times with PIL's bicubic filter."""
    h, w = image.shape[:2]
    return np.asarray(Image.fromarray(image).resize((w * scale, h * scale), Image.BICUBIC))


def box_downsample(images: torch.Tensor, factor: int) -> torch.Tensor:
    """(..., C, H, W) images averaged over ``factor`` x ``factor`` blocks (area resampling)."""
    return F.avg_pool2d(images, factor)


def evaluate_upsampler(
    model: DiffusionUpsampler,
    low_res: list[np.ndarray],
    truth: list[np.ndarray],
    *,
    batch_size: int = 8,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """Upsample the (h, w, 3) uint8 ``low_res`` images and score them against ``truth`` (see the module
    docstring); also reports ``seconds_per_image``, the sampling wall time."""
    scores: dict[str, list[float]] = {"psnr": [], "psnr_bicubic": [], "psnr_consistency": []}
    elapsed = 0.0
    for start in range(0, len(low_res), batch_size):
        lows = low_res[start : start + batch_size]
        batch = torch.from_numpy(np.stack(lows)).permute(0, 3, 1, 2).float() / 255
        begin = time.perf_counter()
        out = upsample(model, batch, generator=generator)
        elapsed += time.perf_counter() - begin
        back = to_uint8(box_downsample(out, model.scale))
        for low, high, image, small in zip(lows, truth[start : start + batch_size], to_uint8(out), back):
            scores["psnr"].append(psnr(image, high))
            scores["psnr_bicubic"].append(psnr(bicubic(low, model.scale), high))
            scores["psnr_consistency"].append(psnr(small, low))
    metrics = {name: float(np.mean(values)) for name, values in scores.items()}
    metrics["psnr_gain"] = metrics["psnr"] - metrics["psnr_bicubic"]
    metrics["seconds_per_image"] = elapsed / max(1, len(low_res))
    return metrics
