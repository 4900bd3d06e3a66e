"""Image files in and out: any file Pillow reads becomes an RGB image, and back to PNG.

This module is the one home of image decoding. Image variation (Ramesh et al. 2022 §3.1) starts from a user's
file and the data sources (:mod:`unclip.data.sources`) from a user's folder, parquet or tar shards; either may
hold anything a camera, an editor or a web page wrote. :func:`open_image` decodes it fully (so a truncated
file fails here, not halfway through a model), refuses an image over a pixel limit before decoding it (a
decompression bomb) or under a minimum side, and honours the EXIF orientation tag the way viewers do. Then
every pixel mode maps to RGB:

- alpha (``RGBA``, ``LA``, ``PA``, or a palette / greyscale image with a transparent colour) is composited
  over white, the background a viewer shows;
- 16-bit greyscale (``I;16*``, and ``I`` as Pillow opens some 16-bit files) keeps its precision: / 65535;
- 32-bit float greyscale (``F``) is taken to be in [0, 1] already and clipped;
- every other mode (``1``, ``L``, ``P``, ``CMYK``, ``YCbCr``, ...) goes through Pillow's own RGB conversion.

:func:`load_image` returns the whole picture as a float tensor; :func:`decode_square` returns the
``resolution`` px square a data source stores (shorter side resized with an antialiased filter, then a centre
or random crop). Anything unusable raises :class:`ImageDecodeError`, a :class:`DataError` naming the file and
carrying a short ``reason`` that a data source records when it skips the sample.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from unclip.errors import DataError
from unclip.io import atomic_write

_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")
# Pillow's own default limit; Pillow still refuses, by itself, anything over twice its global limit.
DEFAULT_MAX_PIXELS = 89_478_485
CROPS = ("center", "random")


class ImageDecodeError(DataError):
    """An image that cannot be used: unreadable, truncated, too many pixels or too small a side."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason


def open_image(
    source: bytes | str | Path,
    *,
    name: str | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    min_size: int = 1,
    draft: int | None = None,
) -> Image.Image:
    """Decode ``source`` (a file's bytes or path) fully and turn it upright, in its own pixel mode.

    ``max_pixels`` and ``min_size`` are checked on the header, before any pixel is decoded. ``draft`` lets a
    JPEG decode at a reduced scale that keeps both sides at least ``draft`` px (much faster for photos that
    will be shrunk anyway). ``name`` is what an error calls the image (default: the path).
    """
    label = name or (str(source) if isinstance(source, (str, Path)) else "image bytes")
    try:
        image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    except Exception as err:  # Pillow raises OSError, SyntaxError, DecompressionBombError, ...
        raise ImageDecodeError(label, f"not a readable image file ({err})") from err
    try:
        width, height = image.size
        if max_pixels is not None and width * height > max_pixels:
            raise ImageDecodeError(
                label, f"{width}x{height} = {width * height} pixels is over the limit of {max_pixels}"
            )
        if min(width, height) < min_size:
            raise ImageDecodeError(label, f"{width}x{height} has a side under {min_size} px")
        if draft and image.format == "JPEG":
            image.draft(None, (draft, draft))
        image.load()  # decode everything now: a truncated file fails here
        upright = ImageOps.exif_transpose(image)
    except ImageDecodeError:
        image.close()
        raise
    except Exception as err:
        image.close()
        raise ImageDecodeError(label, f"not a readable image file ({err})") from err
    if upright is not image:
        image.close()
    return upright


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


def rgb_pixels(image: Image.Image) -> np.ndarray:
    """uint8 (H, W, 3) pixels of an image through Pillow's RGB conversion: how the images of a data source's
    cached split (already RGB squares, written by :func:`decode_square`) are read back."""
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def model_range(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 channel-first pixels, (3, H, W) or (B, 3, H, W), as the image diffusion models see them:
    float32 in [-1, 1]."""
    return pixels.float() / 127.5 - 1.0


def detail_map(images: torch.Tensor, threshold: float) -> torch.Tensor:
    """(..., H, W) bool: pixels of float (..., C, H, W) images whose 3 x 3 neighbourhood spans more than
    ``threshold`` in some channel (edges and texture; flat regions are False)."""
    flat = images.reshape(-1, *images.shape[-3:])
    spread = F.max_pool2d(flat, 3, 1, 1) + F.max_pool2d(-flat, 3, 1, 1)
    return spread.amax(1).reshape(*images.shape[:-3], *images.shape[-2:]) > threshold


def load_image(path: str | Path) -> torch.Tensor:
    """Read an image file as a (3, H, W) float32 tensor in [0, 1], upright as its EXIF tag says."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image file {path} does not exist")
    with open_image(path) as image:
        rgb = _to_rgb(image)
    if min(rgb.shape[:2]) < 1:
        raise DataError(f"{path} is an empty image of size {rgb.shape[1]}x{rgb.shape[0]}")
    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)


def decode_square(
    source: bytes | str | Path,
    resolution: int,
    *,
    crop: str = "center",
    rng: np.random.Generator | None = None,
    name: str | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    min_size: int = 1,
) -> Image.Image:
    """Decode ``source`` with :func:`open_image` into an RGB ``resolution`` x ``resolution`` PIL image.

    The shorter side is resized to ``resolution`` (bicubic, antialiased when shrinking) and the longer one
    cropped: centred, or at a position drawn from ``rng`` when ``crop="random"``. 16-bit and float greyscale
    is resized at full precision and rounded to 8 bits only at the end.
    """
    if crop not in CROPS:
        raise ValueError(f"crop={crop!r} is not one of {CROPS}")
    with open_image(source, name=name, max_pixels=max_pixels, min_size=min_size, draft=resolution) as image:
        width, height = image.size
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        if crop == "random":
            rng = rng if rng is not None else np.random.default_rng()
            left, top = int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))
        box = (left, top, left + side, top + side)
        if image.mode in _SIXTEEN_BIT or image.mode == "F":
            grey = Image.fromarray(np.ascontiguousarray(_to_rgb(image)[..., 0]), "F")
            grey = grey.resize((resolution, resolution), Image.Resampling.BICUBIC, box=box)
            levels = np.clip(np.asarray(grey) * 255.0, 0, 255).round().astype(np.uint8)
            return Image.fromarray(levels, "L").convert("RGB")
        if image.mode in _ALPHA_MODES or "transparency" in image.info:
            rgba = image.convert("RGBA")
            rgb = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert(
                "RGB"
            )
        else:
            rgb = image.convert("RGB")
        return rgb.resize((resolution, resolution), Image.Resampling.BICUBIC, box=box, reducing_gap=3.0)


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
