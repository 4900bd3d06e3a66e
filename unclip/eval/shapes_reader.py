"""Read the object of a ``shapes`` image back from its pixels, to judge generated images without a model.

unCLIP is judged on whether samples match their captions (Ramesh et al. 2022 §5: human evaluations of
photorealism, caption similarity and diversity; §5.2 on attribute binding). On the embedded ``shapes`` data
the truth is known, so caption similarity becomes exact per-attribute accuracy: :func:`read_shape` recovers
colour, shape, size and 3x3 position from an RGB image, and :func:`attribute_accuracy` scores a batch
against the records it was generated from. No learned model is involved, so the judge cannot share a bias
with the model it judges.

The reader is built for noisy, blurred, slightly off-palette samples:

- background = median colour of the image border; object = the largest 8-connected blob of pixels far from
  it (after a 3x3 binomial blur that cuts pixel noise); colour = the palette colour whose mixing line with
  the background best explains the blob's core, since blur mixes background into small objects;
- every pixel near the blob gets a soft coverage ``alpha``, its projection onto the background -> object
  colour line, so anti-aliased and blurred edges count fractionally instead of being thresholded away;
- position: the ``alpha``-weighted centroid's 3x3 cell; shape: the complex moments ``|sum alpha z^n|``
  (z the offset from the centroid) for n = 3, 4, 5 vanish for a circle and single out the 3-fold triangle,
  4-fold square and 5-fold star at any rotation; each is compared with the value that polygon would have
  at the measured area, and neither the area nor these moments change under a symmetric blur; size: the
  circumscribed diameter (the generator's ``extent``) implied by the area for the shape read.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import cache
from typing import NamedTuple

import numpy as np
from PIL import Image

from unclip.data import shapes
from unclip.errors import ConfigError, DataError

ATTRIBUTES = ("colour", "shape", "size", "position", "background")
_WORK_SIDE = 128  # larger images are box-downsampled to this side first: faster, and it averages noise
_PALETTE_NAMES = tuple(shapes.COLOURS)
_PALETTE = np.array([shapes.COLOURS[name] for name in _PALETTE_NAMES], np.float32)
_OBJECT_DISTANCE = 40.0  # RGB distance from the background that marks an object pixel (palette gap >= 98)
_MIN_MIX = 0.8  # the core of a blurred object is mostly object colour
_MIN_OBJECT_FRACTION = 0.002  # a blob smaller than this fraction of the image is no object
_SMALL_LARGE_EXTENT = math.sqrt(shapes.EXTENT_RANGE["small"][1] * shapes.EXTENT_RANGE["large"][0])
_ORDERS = (3, 4, 5)
_POLYGON_ORDERS = {"triangle": 3, "square": 4, "star": 5}
_POLYGON_SCORE = 0.5


def _as_rgb(image: Image.Image | np.ndarray) -> np.ndarray:
    """float32 (H, W, 3) in [0, 255] from a PIL image or a uint8 (H, W), (H, W, 3) or (H, W, 4) array."""
    if isinstance(image, Image.Image):
        array = np.asarray(image.convert("RGB"))
    else:
        array = np.asarray(image)
        channels_ok = array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))
        if array.dtype != np.uint8 or not channels_ok:
            raise DataError(f"expected a uint8 (H, W[, 3|4]) image, got {array.dtype} of shape {array.shape}")
        array = np.repeat(array[..., None], 3, axis=2) if array.ndim == 2 else array[..., :3]
    if min(array.shape[:2]) < 1:
        raise DataError(f"image of shape {array.shape} is empty")
    if max(array.shape[:2]) > _WORK_SIDE:
        h, w = array.shape[:2]
        scale = _WORK_SIDE / max(h, w)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        array = np.asarray(Image.fromarray(np.ascontiguousarray(array)).resize(size, Image.Resampling.BOX))
    return array.astype(np.float32)


def _smooth(rgb: np.ndarray) -> np.ndarray:
    """3x3 binomial blur: cuts pixel noise ~2.7x and leaves area, centroid and moments all but unchanged."""
    padded = np.pad(rgb, ((1, 1), (1, 1), (0, 0)), mode="edge")
    rows = padded[:-2] + 2 * padded[1:-1] + padded[2:]
    return (rows[:, :-2] + 2 * rows[:, 1:-1] + rows[:, 2:]) / 16


def _nearest(colour: np.ndarray) -> str:
    return _PALETTE_NAMES[int(np.argmin(np.linalg.norm(_PALETTE - colour, axis=1)))]


def _object_colour(core: np.ndarray, bg: np.ndarray, background: str) -> str:
    """The palette colour (not the background's) that best explains ``core`` as ``bg + beta (p - bg)``.

    Blur mixes the background into a small object (grey inside a blurred black star on white), so the
    core is matched against each colour's mixing line, ``beta`` in [_MIN_MIX, 1], not the colour alone.
    """
    direction = _PALETTE - bg
    lengths = np.maximum((direction * direction).sum(axis=1), 1e-6)
    beta = np.clip(direction @ (core - bg) / lengths, _MIN_MIX, 1.0)
    errors = np.linalg.norm(bg + beta[:, None] * direction - core, axis=1)
    errors[_PALETTE_NAMES.index(background)] = np.inf
    return _PALETTE_NAMES[int(np.argmin(errors))]


def _neighbourhood(values: np.ndarray, fill: float, reduce: np.ufunc) -> np.ndarray:
    """``reduce`` over each pixel's 3x3 neighbourhood (8-connectivity), treating outside as ``fill``."""
    padded = np.pad(values, 1, constant_values=fill)
    h, w = values.shape
    views = [padded[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)]
    return reduce.reduce(views)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of ``mask``, by minimum-label propagation with pointer jumping."""
    none = mask.size
    labels = np.where(mask, np.arange(mask.size).reshape(mask.shape), none)
    while True:
        merged = np.where(mask, _neighbourhood(labels, none, np.minimum), none)
        flat = np.append(merged.ravel(), none)
        merged = flat[merged]  # jump to the label of the pixel our label names: halves path lengths
        if np.array_equal(merged, labels):
            break
        labels = merged
    counts = np.bincount(labels[mask], minlength=mask.size)
    return mask & (labels == int(np.argmax(counts)))


@cache
def _area_per_radius_squared() -> dict[str, float]:
    """Area of each shape with circumradius 1, from the generator's own outline (shoelace formula)."""
    areas = {"circle": math.pi}
    for name in shapes.SHAPES[1:]:
        spec = shapes.ShapeSpec("red", name, "large", "center", "black", 0.0, 0.0, 2.0, 0.0)
        x, y = shapes.outline(spec).T
        areas[name] = float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)
    return areas


def _moments(alpha: np.ndarray) -> tuple[float, float, float, np.ndarray]:
    """Total ``alpha``, its centroid (x, y) and ``|sum alpha z^n|`` for n = 3, 4, 5, all in pixels."""
    h, w = alpha.shape
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5
    total = float(alpha.sum())
    cx, cy = float((alpha * xs).sum()) / total, float((alpha * ys).sum()) / total
    z = (xs - cx) + 1j * (ys - cy)
    return total, cx, cy, np.array([abs((alpha * z**n).sum()) for n in _ORDERS])


@cache
def _unit_moments() -> dict[str, float]:
    """``|sum alpha z^n|`` of each polygon with circumradius 1, n its symmetry order, from a crisp render."""
    radius = 64.0  # pixels, at 256 px
    refs = {}
    for name, order in _POLYGON_ORDERS.items():
        spec = shapes.ShapeSpec("white", name, "large", "center", "black", 0.5, 0.5, 2 * radius / 256, 7.0)
        moment = _moments(shapes.coverage(spec, 256).astype(np.float64))[3][_ORDERS.index(order)]
        refs[name] = float(moment) / radius ** (order + 2)
    return refs


def _polygon_scores(area: float, moments: np.ndarray) -> dict[str, float]:
    """How well each polygon's own-order moment, predicted from the area, is matched (~1 true, ~0 others).

    For a polygon of circumradius R, ``|sum alpha z^n|`` is ``unit * R^(n+2)`` and R follows from the area;
    both the area and this moment are unchanged by a symmetric blur, so the scores survive blurry samples.
    """
    areas, units = _area_per_radius_squared(), _unit_moments()
    return {
        name: float(moments[_ORDERS.index(order)] / (units[name] * (area / areas[name]) ** ((order + 2) / 2)))
        for name, order in _POLYGON_ORDERS.items()
    }


class _Measurement(NamedTuple):
    colour: np.ndarray  # RGB of the object's core
    area: float  # object area in pixels of the working image
    cx: float  # centroid, fractions of the width / height
    cy: float
    scores: dict[str, float]  # see _polygon_scores


def _measure(rgb: np.ndarray) -> tuple[np.ndarray, _Measurement | None]:
    """The background colour, and the object's measurements (None when there is no object)."""
    h, w = rgb.shape[:2]
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    bg = np.median(border, axis=0)
    distance = np.linalg.norm(rgb - bg, axis=2)
    blob = distance > _OBJECT_DISTANCE
    min_pixels = max(2.0, _MIN_OBJECT_FRACTION * h * w)
    if blob.sum() < min_pixels:
        return bg, None
    blob = _largest_component(blob)
    if blob.sum() < min_pixels:
        return bg, None
    core = blob & (distance >= np.percentile(distance[blob], 80))
    fg = np.median(rgb[core], axis=0)
    direction = fg - bg
    alpha = np.clip((rgb - bg) @ direction / max(float(direction @ direction), 1.0), 0.0, 1.0)
    region = _neighbourhood(_neighbourhood(blob, False, np.logical_or), False, np.logical_or)
    alpha = np.where(region, alpha, 0.0).astype(np.float64)
    if alpha.sum() < min_pixels:  # a blob of mixed colours with no consistent object colour
        return bg, None
    area, cx, cy, moments = _moments(alpha)
    return bg, _Measurement(fg, area, cx / w, cy / h, _polygon_scores(area, moments))


def read_shape(image: Image.Image | np.ndarray) -> dict[str, str]:
    """Read ``{"colour", "shape", "size", "position", "background"}`` from one RGB image.

    Never raises on image content: an image with no object reads as ``"none"`` for every attribute but
    the background. Raises :class:`DataError` only for something that is not an image at all.
    """
    rgb = _smooth(_as_rgb(image))
    bg, found = _measure(rgb)
    background = _nearest(bg)
    if found is None:
        return dict.fromkeys(ATTRIBUTES, "none") | {"background": background}
    best = max(found.scores, key=found.scores.__getitem__)
    shape = best if found.scores[best] > _POLYGON_SCORE else "circle"
    h, w = rgb.shape[:2]
    extent = 2 * math.sqrt(found.area / _area_per_radius_squared()[shape] / (h * w))
    column, row = (min(int(3 * c), 2) for c in (found.cx, found.cy))
    return {
        "colour": _object_colour(found.colour, bg, background),
        "shape": shape,
        "size": "small" if extent < _SMALL_LARGE_EXTENT else "large",
        "position": shapes.POSITIONS[3 * row + column],
        "background": background,
    }


def attribute_accuracy(
    images: Sequence[Image.Image | np.ndarray],
    records: Sequence[dict],
    attributes: Sequence[str] = ("colour", "shape", "size", "position"),
) -> dict[str, float]:
    """Per-attribute accuracy of :func:`read_shape` against ``records`` (from ``shapes.make_record``).

    Colour and shape count every image; size, position and background count only the images whose caption
    names them (``names_size`` ...), since a caption that leaves one out asks for none in particular.
    Returns ``{attribute: accuracy, f"{attribute}_count": images counted}``; accuracy is NaN when none count.
    """
    unknown = [a for a in attributes if a not in ATTRIBUTES]
    if unknown:
        raise ConfigError(f"unknown attributes {unknown}; choose from {ATTRIBUTES}")
    if len(images) != len(records):
        raise DataError(f"{len(images)} images but {len(records)} records")
    readings = [read_shape(image) for image in images]
    result: dict[str, float] = {}
    for attribute in attributes:
        flag = f"names_{attribute}"
        pairs = [(r[attribute], rec[attribute]) for r, rec in zip(readings, records) if rec.get(flag, True)]
        hits = sum(read == truth for read, truth in pairs)
        result[attribute] = hits / len(pairs) if pairs else float("nan")
        result[f"{attribute}_count"] = float(len(pairs))
    return result
