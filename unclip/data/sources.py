"""Captioned-image sources behind the Hydra ``data=`` group, all exposed as :class:`datasets.Dataset`.

Every source yields the same records: an ``image`` (PIL, RGB, ``resolution`` px square) and a ``caption``,
plus whatever attributes it knows (``shapes`` knows colour, shape, size, position and background). Stages ask
for ``load_split(cfg.data, split, resolution)`` and never look at where the data came from, so a new source is
one function registered in ``_LOADERS`` and one schema in :mod:`unclip.config.schema`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import datasets
from omegaconf import DictConfig

from unclip.data import shapes
from unclip.errors import ConfigError, DataError

SHAPES_FORMAT_VERSION = 1
_ROWS_PER_CHUNK = 2000


def cache_root(data_cfg: DictConfig) -> Path:
    """The folder every cache of this data source lives under (``data.cache_dir``)."""
    folder = data_cfg.cache_dir or os.environ.get("UNCLIP_CACHE") or "~/.cache/unclip"
    return Path(os.path.expanduser(str(folder)))


def split_names(data_cfg: DictConfig) -> tuple[str, ...]:
    """The splits a source offers: ``train`` first, then its evaluation splits."""
    if data_cfg.source == "shapes":
        return shapes.SPLITS
    raise ConfigError(f"data.source={data_cfg.source!r} is not a known source")


def load_split(data_cfg: DictConfig, split: str, resolution: int) -> datasets.Dataset:
    """Load (building and caching on first use) one split of the configured source at ``resolution`` px."""
    loader = _LOADERS.get(str(data_cfg.source))
    if loader is None:
        raise ConfigError(f"data.source={data_cfg.source!r} is not one of {sorted(_LOADERS)}")
    if split not in split_names(data_cfg):
        raise ConfigError(
            f"split {split!r} is not one of {split_names(data_cfg)} for data.source={data_cfg.source}"
        )
    return loader(data_cfg, split, resolution)


def _shapes_holdout(data_cfg: DictConfig) -> tuple[tuple[str, str], ...]:
    pairs = []
    for pair in data_cfg.holdout:
        if len(pair) != 2 or pair[0] not in shapes.COLOURS or pair[1] not in shapes.SHAPES:
            raise ConfigError(
                f"data.holdout entry {list(pair)} must be [colour, shape], colour in {list(shapes.COLOURS)} "
                f"and shape in {list(shapes.SHAPES)}"
            )
        pairs.append((str(pair[0]), str(pair[1])))
    return tuple(pairs)


def _load_shapes(data_cfg: DictConfig, split: str, resolution: int) -> datasets.Dataset:
    holdout = _shapes_holdout(data_cfg)
    size = int(data_cfg.train_size if split == "train" else data_cfg.eval_size)
    if size <= 0:
        raise ConfigError(f"data.{'train_size' if split == 'train' else 'eval_size'}={size} must be positive")
    key = {
        "v": SHAPES_FORMAT_VERSION,
        "seed": int(data_cfg.seed),
        "split": split,
        "size": size,
        "resolution": resolution,
        "holdout": sorted(holdout),
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_root(data_cfg) / "shapes" / f"{split}-{resolution}px-{size}-{digest}"
    if path.exists():
        try:
            return datasets.load_from_disk(str(path))
        except Exception as err:  # a cache we cannot read is rebuilt, never trusted
            shutil.rmtree(path, ignore_errors=True)
            print(f"[unclip] rebuilding unreadable shapes cache {path}: {err}")

    def rows(start: int, stop: int) -> dict[str, list]:
        records = [shapes.make_record(int(data_cfg.seed), split, i, holdout) for i in range(start, stop)]
        columns: dict[str, list] = {k: [r[k] for r in records] for k in records[0]}
        columns["image"] = [
            shapes.render(shapes.sample_spec(int(data_cfg.seed), split, i, holdout), resolution)
            for i in range(start, stop)
        ]
        return columns

    chunks = [
        datasets.Dataset.from_dict(rows(s, min(s + _ROWS_PER_CHUNK, size)), features=None).cast_column(
            "image", datasets.Image()
        )
        for s in range(0, size, _ROWS_PER_CHUNK)
    ]
    dataset = datasets.concatenate_datasets(chunks)
    _save_atomically(dataset, path)
    return datasets.load_from_disk(str(path))


def _save_atomically(dataset: datasets.Dataset, path: Path) -> None:
    """Write to a temporary sibling folder and rename, so a killed build never leaves a half cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    dataset.save_to_disk(str(tmp))
    try:
        os.replace(tmp, path)
    except OSError:  # another process finished first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
        if not path.exists():
            raise DataError(f"could not write the dataset cache {path}") from None


_LOADERS: dict[str, Callable[[DictConfig, str, int], datasets.Dataset]] = {"shapes": _load_shapes}
