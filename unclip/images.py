"""Image files in and out: any file Pillow reads becomes an RGB float tensor in [0, 1], and back to PNG.

Image variation (Ramesh et al. 2022 §3.1) starts from a user's file, which may be anything a camera, an
editor or a web page wrote. :func:`load_image` decodes it fully (so a truncated file fails here, not halfway
through a model), honours the EXIF orientation tag the way viewers do, and maps every pixel mode to RGB:

- alpha (``RGBA``, ``LA``, ``PA``, or a palette / greyscale image with a transparent colour) is composited
  over white, the background a viewer shows;
- 16-bit greyscale (``I;16*``, and ``I`` as Pillow opens some 16-bit files) keeps its precision: / 65535;
- 32-bit float greyscale (``F``) is taken to be in [0, 1] already and clipped;
- every other mode (``1``, ``L``, ``P``, ``CMYK``, ``YCbCr``, ...) goes through Pillow's own RGB conversion.

Anything that is not a readable image raises :class:`DataError` naming the file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from unclip.errors import DataError
from unclip.io import atomic_write

_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _to_rgb(image: Image.Image) -> np.ndarray:
    """float32 (H, W, 3) in [0, 1] from a decoded image of any mode."""
    if image.mode in _SIXTEEN_BIT:
        grey = np.clip(np.asarray(image, dtype=np.float32) / 65535.0, 0.0, 1.0)
        return np.repeat(grey[..., None], 3, axis=2)
    if image.mode == "F":
        grey = np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)
        return np.repeat(grey[..., None], 3, axis=2)
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32) / 255.0
        alpha = rgba[..., 3:]
        return rgba[..., :3] * alpha + (1.0 - alpha)  # over white
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0


def load_image(path: str | Path) -> torch.Tensor:
    """Read an image file as a (3, H, W) float32 tensor in [0, 1], upright as its EXIF tag says."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image file {path} does not exist")
    try:
        with Image.open(path) as image:
            image.load()  # decode everything now: a truncated file fails here
            rgb = _to_rgb(ImageOps.exif_transpose(image))
    except Exception as err:  # Pillow raises OSError, SyntaxError, ValueError, ... for corrupt files
        raise DataError(f"{path} is not a readable image file: {err}") from err
    if min(rgb.shape[:2]) < 1:
        raise DataError(f"{path} is an empty image of size {rgb.shape[1]}x{rgb.shape[0]}")
    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)


def fit_square(images: torch.Tensor, size: int) -> torch.Tensor:
    """Crop the central square of (..., 3, H, W) images and resize it to ``size`` px (antialiased bicubic,
    clamped to [0, 1]), as CLIP's preprocessing does with the shorter side."""
    height, width = images.shape[-2:]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = images[..., top : top + side, left : left + side]
    if side == size:
        return square
    batch = square.reshape(-1, *square.shape[-3:])
    resized = F.interpolate(batch, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return resized.clamp(0, 1).reshape(*square.shape[:-2], size, size)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(..., 3, H, W) floats in [0, 1] to (..., H, W, 3) uint8, rounding to the nearest level."""
    array = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).movedim(-3, -1)
    return array.cpu().numpy()


def save_png(image: torch.Tensor, path: str | Path) -> None:
    """Write one (3, H, W) image in [0, 1] as an 8-bit RGB PNG, atomically."""
    picture = Image.fromarray(to_uint8(image))
    atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"))


def save_grid(images: torch.Tensor, path: str | Path, columns: int) -> None:
    """Write (N, 3, H, W) images in [0, 1] as one PNG grid, ``columns`` to a row, 2 px white gutters."""
    from torchvision.utils import make_grid

    grid = make_grid(images.detach().float().cpu(), nrow=max(1, columns), padding=2, pad_value=1.0)
    save_png(grid, path)
