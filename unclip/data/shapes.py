"""The embedded ``shapes`` dataset (DESIGN §4): one anti-aliased object on a flat background, with a caption.

Every image is a pure function of ``(seed, split, index)``: :func:`sample_spec` draws a resolution-free
:class:`ShapeSpec`, :func:`render` draws it at any size (the same spec feeds the 64 px decoder and the 256 and
1024 px upsamplers, standing in for the paper's 64 -> 256 -> 1024 cascade, Ramesh et al. 2022 §2.1), and
:func:`make_caption` describes it. Captions always name colour and shape and name size, position and
background only some of the time, so a caption fits many images and the prior (§2.1, p(z_i | y)) has real
uncertainty to model. ``holdout`` (colour, shape) pairs never occur in ``train`` or ``eval_seen``; the
``eval_holdout`` split draws only them, to measure compositional generalisation (§5.2 probes how unCLIP binds
attributes to objects).

Geometry: coordinates are fractions of the image side, x to the right and y downwards. ``extent`` is the
diameter of the object's circumscribed circle (the circle through a polygon's outer vertices), so an object
centred at (cx, cy) stays inside the image at every rotation exactly when its circle does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TypeVar

import numpy as np
from PIL import Image

from unclip.errors import ConfigError

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 75),
    "green": (60, 180, 75),
    "blue": (0, 130, 200),
    "yellow": (255, 225, 25),
    "orange": (245, 130, 48),
    "purple": (145, 30, 180),
    "white": (250, 250, 250),
    "black": (20, 20, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)  # fmt: skip
# One pair per shape, four different colours: every colour and shape is still seen in training.
DEFAULT_HOLDOUT: tuple[tuple[str, str], ...] = (
    ("red", "triangle"),
    ("blue", "star"),
    ("yellow", "circle"),
    ("purple", "square"),
)
SPLITS: tuple[str, ...] = ("train", "eval_seen", "eval_holdout")

EXTENT_RANGE: dict[str, tuple[float, float]] = {"small": (0.20, 0.30), "large": (0.45, 0.58)}
STAR_INNER_RATIO = 0.45
EDGE_MARGIN = 0.01  # gap between the circumscribed circle and the image border
CELL_MARGIN = 0.02  # gap between the centre and its grid-cell border, so the cell is unambiguous
# Rotational symmetry order (vertices of the outline) and the angle of the first vertex at rotation 0:
# triangle and star point up, the square sits axis-aligned.
_POLYGONS: dict[str, tuple[int, float]] = {"square": (4, -135.0), "triangle": (3, -90.0), "star": (5, -90.0)}
_SPLIT_CODES = {name: code for code, name in enumerate(SPLITS)}
_SPEC_STREAM, _CAPTION_STREAM = 0, 1
T = TypeVar("T")


@dataclass(frozen=True)
class ShapeSpec:
    """Everything needed to render one image, independent of resolution.

    ``cx``, ``cy``: centre as fractions of the side (y downwards); ``extent``: circumscribed-circle
    diameter as a fraction of the side; ``rotation``: degrees clockwise on screen, within the shape's
    symmetry period (0 for a circle).
    """

    colour: str
    shape: str
    size: str
    position: str
    background: str
    cx: float
    cy: float
    extent: float
    rotation: float


def _rng(seed: int, split: str, index: int, stream: int) -> np.random.Generator:
    if split not in _SPLIT_CODES:
        raise ConfigError(f"split {split!r} is not one of {SPLITS}")
    if seed < 0 or index < 0:
        raise ConfigError(f"shapes seed={seed} and index={index} must be non-negative")
    return np.random.default_rng([seed, _SPLIT_CODES[split], index, stream])


def _check_holdout(holdout: tuple[tuple[str, str], ...]) -> None:
    for pair in holdout:
        if len(pair) != 2 or pair[0] not in COLOURS or pair[1] not in SHAPES:
            raise ConfigError(
                f"holdout pair {pair!r} must be (colour, shape) from {list(COLOURS)} x {SHAPES}"
            )


def sample_spec(
    seed: int, split: str, index: int, holdout: tuple[tuple[str, str], ...] = DEFAULT_HOLDOUT
) -> ShapeSpec:
    """Draw the spec of image ``index`` of ``split``; every split and index has its own random stream.

    (colour, shape) is uniform over the pairs the split allows; size, position and background (any other
    palette colour) are uniform; extent, centre within its grid cell and rotation are uniform in their ranges.
    """
    _check_holdout(holdout)
    u = _rng(seed, split, index, _SPEC_STREAM).random(8)
    held = {tuple(p) for p in holdout}
    if split == "eval_holdout":
        pairs = sorted(held)
    else:
        pairs = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in held]
    if not pairs:
        raise ConfigError(f"holdout {sorted(held)} leaves no (colour, shape) pair for split {split!r}")
    colour, shape = _pick(pairs, u[0])
    size, position = _pick(SIZES, u[1]), _pick(POSITIONS, u[2])
    background = _pick([c for c in COLOURS if c != colour], u[3])
    low, high = EXTENT_RANGE[size]
    extent = low + (high - low) * float(u[4])
    row, col = divmod(POSITIONS.index(position), 3)
    reach = extent / 2 + EDGE_MARGIN
    cx, cy = (
        _lerp(max(cell / 3 + CELL_MARGIN, reach), min((cell + 1) / 3 - CELL_MARGIN, 1 - reach), float(t))
        for cell, t in ((col, u[5]), (row, u[6]))
    )
    rotation = 360.0 / _POLYGONS[shape][0] * float(u[7]) if shape in _POLYGONS else 0.0
    return ShapeSpec(colour, shape, size, position, background, cx, cy, extent, rotation)


def _pick(options: Sequence[T], u: float) -> T:
    """The option a uniform draw ``u`` in [0, 1) falls on."""
    return options[min(int(u * len(options)), len(options) - 1)]


def _lerp(low: float, high: float, t: float) -> float:
    return low + (high - low) * t


def outline(spec: ShapeSpec) -> np.ndarray:
    """Vertices (n, 2) of a polygonal shape in image fractions (x, y), clockwise on screen."""
    order, start = _POLYGONS[spec.shape]
    count = 2 * order if spec.shape == "star" else order
    step = 360.0 / count
    points = []
    for k in range(count):
        radius = spec.extent / 2 * (STAR_INNER_RATIO if k % 2 and spec.shape == "star" else 1.0)
        angle = math.radians(start + spec.rotation + step * k)
        points.append((spec.cx + radius * math.cos(angle), spec.cy + radius * math.sin(angle)))
    return np.array(points)


def _spans(spec: ShapeSpec, ys: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Inside intervals [starts, stops) along horizontal lines ``ys``, shape (len(ys), k), all in units of
    ``1 / scale`` of the side (pixels when ``scale`` is the resolution); unused intervals are empty."""
    if spec.shape == "circle":
        radius, cx, cy = spec.extent / 2 * scale, spec.cx * scale, spec.cy * scale
        half = np.sqrt(np.maximum(radius * radius - (ys - cy) ** 2, 0.0))
        return (cx - half)[:, None], (cx + half)[:, None]
    v = outline(spec) * scale
    if len(v) % 2:  # pad with a degenerate edge so crossings pair up
        v = np.concatenate([v, v[-1:]])
    nxt = np.concatenate([v[1:], v[:1]])
    x0, y0, x1, y1 = v[:, 0], v[:, 1], nxt[:, 0], nxt[:, 1]
    dy = y1 - y0
    slope = (x1 - x0) / np.where(dy == 0.0, 1.0, dy)
    y = ys[:, None]
    # Half-open in y so a line through a vertex counts it once; horizontal edges never cross.
    crosses = (np.minimum(y0, y1) <= y) & (y < np.maximum(y0, y1))
    xs = np.sort(np.where(crosses, x0 + (y - y0) * slope, np.inf), axis=1)
    xs = xs[:, : max(2, int(crosses.sum(axis=1).max()))]
    xs[xs == np.inf] = -1.0  # unused pairs become the empty span [-1, -1)
    return xs[:, 0::2], xs[:, 1::2]


def coverage(spec: ShapeSpec, resolution: int, supersample: int = 4) -> np.ndarray:
    """Fraction of each pixel the object covers, float32 (resolution, resolution).

    Each pixel row is cut into ``supersample`` scanlines whose coverage along x is exact (interval
    overlap), then averaged: a box-filtered render, without the jagged, half-pixel-biased edges of drawing
    a polygon at a larger size and shrinking it.
    """
    if resolution < 1 or supersample < 1:
        raise ConfigError(f"resolution={resolution} and supersample={supersample} must be positive")
    alpha = np.zeros((resolution, resolution), np.float32)
    reach = spec.extent / 2
    r0, c0 = (max(0, math.floor((centre - reach) * resolution)) for centre in (spec.cy, spec.cx))
    r1, c1 = (min(resolution, math.ceil((centre + reach) * resolution)) for centre in (spec.cy, spec.cx))
    if r1 <= r0 or c1 <= c0:
        return alpha
    ys = (np.arange(r0 * supersample, r1 * supersample) + 0.5) / supersample
    starts, stops = _spans(spec, ys, float(resolution))
    cols = np.arange(c0, c1, dtype=np.float64)[:, None]
    # Overlap of each span with pixel column [j, j + 1), summed over the scanline's spans.
    right = np.minimum(np.maximum(stops[:, None, :] - cols, 0.0), 1.0)
    right -= np.minimum(np.maximum(starts[:, None, :] - cols, 0.0), 1.0)
    cover = right.sum(axis=2).reshape(r1 - r0, supersample, c1 - c0).sum(axis=1)
    alpha[r0:r1, c0:c1] = cover * (1.0 / supersample)
    return alpha


def render(spec: ShapeSpec, resolution: int, supersample: int = 4) -> Image.Image:
    """Draw ``spec`` as an RGB image ``resolution`` px square, anti-aliased (see :func:`coverage`)."""
    alpha = coverage(spec, resolution, supersample)
    mask = Image.fromarray(np.rint(alpha * 255.0).astype(np.uint8), mode="L")
    size = (resolution, resolution)
    return Image.composite(
        Image.new("RGB", size, COLOURS[spec.colour]), Image.new("RGB", size, COLOURS[spec.background]), mask
    )


_SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
_PREFIXES = ("", "a picture of ", "an image of ", "a drawing of ", "there is ")
_BACKGROUND_PHRASES = ("on {} background", "against {} background", "with {} background")


def _position_phrases(position: str) -> tuple[str, ...]:
    if position == "center":
        return ("in the center", "in the middle", "in the center of the image")
    if " " in position:  # a corner
        vertical, horizontal = position.split()
        upper = {"top": "upper", "bottom": "lower"}[vertical]
        return (
            f"in the {position}",
            f"at the {position}",
            f"in the {position} corner",
            f"in the {upper} {horizontal}",
        )
    if position in ("top", "bottom"):
        return (f"at the {position}", f"near the {position}", f"at the {position} of the image")
    return (f"on the {position}", f"on the {position} side", f"at the {position}")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def make_caption(spec: ShapeSpec, seed: int, split: str, index: int) -> tuple[str, dict[str, bool]]:
    """Caption ``spec`` from its own random stream; returns the text and which optional attributes it names.

    Colour and shape always appear as the adjacent canonical words ``"{colour} {shape}"`` (the zero-shot
    prompts are ``"a {colour} {shape}"``); size, position and background each appear with probability 1/2.
    """
    u = iter(_rng(seed, split, index, _CAPTION_STREAM).random(9))
    names = {key: bool(next(u) < 0.5) for key in ("size", "position", "background")}
    words = [spec.colour, spec.shape]
    size_word, prefix = _pick(_SIZE_WORDS[spec.size], next(u)), _pick(_PREFIXES, next(u))
    if names["size"]:
        words.insert(0, size_word)
    bare = next(u) < 0.3 and prefix == ""  # "red circle on a black background"
    noun = " ".join(words) if bare else f"{_article(words[0])} {' '.join(words)}"
    position, background = (
        _pick(_position_phrases(spec.position), next(u)),
        _pick(_BACKGROUND_PHRASES, next(u)),
    )
    tails = []
    if names["position"]:
        tails.append(position)
    if names["background"]:
        tails.append(background.format(f"{_article(spec.background)} {spec.background}"))
    if next(u) < 0.5:
        tails.reverse()
    return " ".join([prefix + noun, *tails]), names


def make_record(
    seed: int, split: str, index: int, holdout: tuple[tuple[str, str], ...] = DEFAULT_HOLDOUT
) -> dict:
    """The caption and ground truth of one image: the spec's fields plus ``caption`` and ``names_*`` flags."""
    spec = sample_spec(seed, split, index, holdout)
    caption, names = make_caption(spec, seed, split, index)
    fields = asdict(spec)
    attributes = {key: fields.pop(key) for key in ("colour", "shape", "size", "position", "background")}
    flags = {f"names_{key}": flag for key, flag in names.items()}
    return {"caption": caption, **attributes, **flags, **fields}
