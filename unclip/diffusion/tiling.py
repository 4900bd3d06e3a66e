"""Tiled evaluation of a convolutional denoiser, so a large image samples in bounded memory.

At every denoising step the image is cut into overlapping square tiles, the network runs on one tile at a
time (with that tile's slice of the conditioning), and the tile outputs are blended with weights that ramp
linearly across each overlap, so no seam is a hard edge (the averaging of overlapping windows that
MultiDiffusion, Bar-Tal et al. 2023, formalises). A network whose receptive field fits in the overlap and
that normalises nothing over the whole image would give the untiled result exactly; the ADM U-Net's group
normalisation sees only its tile, so tiled outputs differ slightly -- the upsamplers are trained on crops of
about a tile's size, so a tile is what they know best.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from unclip.errors import ConfigError

Region = tuple[slice, slice]
TileFn = Callable[[Tensor, Tensor, Region], Tensor]


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of side ``tile`` covering ``size`` pixels with at least ``overlap`` shared."""
    if tile >= size:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile, stride))
    return [*starts, size - tile]


def _ramp(length: int, start: int, size: int, overlap: int) -> Tensor:
    """Blend weights along one axis of a tile: rising over ``overlap`` pixels where another tile precedes
    it, falling where one follows, 1 elsewhere (and at the image border)."""
    weight = torch.ones(length)
    if overlap:
        rise = (torch.arange(overlap) + 0.5) / overlap
        if start > 0:
            weight[:overlap] = torch.minimum(weight[:overlap], rise)
        if start + length < size:
            weight[-overlap:] = torch.minimum(weight[-overlap:], rise.flip(0))
    return weight


def tiled(fn: TileFn, tile: int, overlap: int, multiple: int = 1) -> Callable[[Tensor, Tensor], Tensor]:
    """A ``model_fn(x, t)`` that evaluates ``fn(x_tile, t, (rows, cols))`` tile by tile and blends.

    ``tile`` and ``overlap`` must be multiples of ``multiple`` (the network's size multiple) with
    ``0 <= overlap < tile``; images no larger than a tile run in one piece.
    """
    if tile <= 0 or tile % multiple or overlap % multiple or not 0 <= overlap < tile:
        raise ConfigError(
            f"tile_size={tile} and tile_overlap={overlap} must be multiples of {multiple} "
            "with 0 <= tile_overlap < tile_size"
        )

    def model_fn(x: Tensor, t: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        if h <= tile and w <= tile:
            return fn(x, t, (slice(0, h), slice(0, w)))
        out: Tensor | None = None
        total = torch.zeros(h, w, dtype=x.dtype, device=x.device)
        for top in tile_starts(h, tile, overlap):
            for left in tile_starts(w, tile, overlap):
                rows, cols = slice(top, min(top + tile, h)), slice(left, min(left + tile, w))
                piece = fn(x[..., rows, cols], t, (rows, cols))
                if out is None:
                    out = x.new_zeros(*piece.shape[:-2], h, w)
                weight = torch.outer(
                    _ramp(rows.stop - rows.start, top, h, overlap),
                    _ramp(cols.stop - cols.start, left, w, overlap),
                ).to(x)
                out[..., rows, cols] += piece * weight
                total[rows, cols] += weight
        assert out is not None
        return out / total

    return model_fn
