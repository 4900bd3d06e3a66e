"""Captioned-image sources behind the Hydra ``data=`` group, all exposed through :mod:`datasets`.

Every source yields the same records: an ``image`` (PIL, RGB, ``resolution`` px square) and a ``caption``,
plus what else it knows (``shapes`` knows colour, shape, size, position and background; the user's own data
a stable ``key``). Stages ask for ``load_split(cfg.data, split, resolution)`` and never look at where the
data came from.

Sources of the user's own data (``folder``, ``parquet``, ``webdataset``) offer ``train`` and ``eval``:

- ``eval`` holds out every sample whose key hashes under ``data.eval_fraction`` (a property of the key alone,
  so a growing dataset keeps its eval rows and train never contains one) and keeps at most
  ``data.eval_size`` of them; ``data.eval_path`` / ``data.eval_urls`` replace the hold-out with a source.
- A split is *materialised* once per (settings, input files, resolution): every image decoded once by
  :func:`unclip.images.decode_square`, centre-cropped, stored with ``datasets.Image()`` under
  :func:`cache_root`, with a ``manifest.json`` of the samples skipped as unusable (skip-and-count).
- The train split of a streaming ``webdataset`` is read with :func:`open_stream` instead: sharded across
  streams, shuffled while still compressed, decoded lazily.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import os
import re
import shutil
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import datasets
import fsspec
import numpy as np
import pyarrow.parquet as pq
from datasets.distributed import split_dataset_by_node
from omegaconf import DictConfig, OmegaConf

from unclip.data import shapes
from unclip.errors import ConfigError, DataError, UnclipError
from unclip.images import CROPS, ImageDecodeError, decode_square

SHAPES_FORMAT_VERSION = 1
SOURCE_FORMAT_VERSION = 1
_ROWS_PER_CHUNK = 2000
USER_SPLITS = ("train", "eval")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
TAR_IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")
CAPTION_COLUMNS = ("caption", "text")  # tried in order when no caption column is named
_METADATA_FILES = ("metadata.jsonl", "metadata.csv")
_HOLDOUT_BUCKETS = 10_000
_MANIFEST = "manifest.json"
_MANIFEST_EXAMPLES = 10
_FEATURES = datasets.Features(
    {"image": datasets.Image(), "caption": datasets.Value("string"), "key": datasets.Value("string")}
)
# settings that change how a split is read or streamed but not what a materialised split holds
_NOT_IN_DIGEST = ("cache_dir", "decoded_cache_mb", "streaming", "shuffle_buffer", "crop")


class Sample(NamedTuple):
    """One listed sample before decoding; ``problem`` says why it cannot be used (then it is skipped)."""

    key: str
    image: bytes | Path | None
    caption: str | None
    problem: str | None = None


def cache_root(data_cfg: DictConfig) -> Path:
    """The folder every cache of this data source lives under (``data.cache_dir``)."""
    folder = data_cfg.cache_dir or os.environ.get("UNCLIP_CACHE") or "~/.cache/unclip"
    return Path(os.path.expanduser(str(folder)))


def split_names(data_cfg: DictConfig) -> tuple[str, ...]:
    """The splits a source offers: ``train`` first, then its evaluation splits."""
    if data_cfg.source == "shapes":
        return shapes.SPLITS
    if data_cfg.source in _CHECKS:
        return USER_SPLITS
    raise ConfigError(f"data.source={data_cfg.source!r} is not one of {sorted(_CHECKS)}")


def is_streaming(data_cfg: DictConfig) -> bool:
    """Whether the train split is read with :func:`open_stream` (a ``webdataset`` with ``data.streaming``)."""
    return data_cfg.source == "webdataset" and bool(data_cfg.streaming)


def check_source(data_cfg: DictConfig) -> None:
    """Check, cheaply and before any training, everything about the source that can be checked.

    Settings in range, paths and shard patterns that exist and match files, a source that is not empty, and
    image and caption columns present (read from the metadata header, the parquet schema or the first tar
    record). Raises :class:`ConfigError` for a setting, :class:`DataError` for the data, naming the key,
    the file or the column.
    """
    check = _CHECKS.get(str(data_cfg.source))
    if check is None:
        raise ConfigError(f"data.source={data_cfg.source!r} is not one of {sorted(_CHECKS)}")
    if data_cfg.source != "shapes":
        _check_common(data_cfg)
    check(data_cfg)


def load_split(data_cfg: DictConfig, split: str, resolution: int) -> datasets.Dataset:
    """Load (building and caching on first use) one split of the configured source at ``resolution`` px.

    Rows hold ``image`` (RGB, ``resolution`` px square, centre-cropped), ``caption`` and, for the user's
    own data, ``key``. The train split of a streaming source is refused: read it with :func:`open_stream`.
    """
    _check_split(data_cfg, split, resolution)
    if data_cfg.source == "shapes":
        return _load_shapes(data_cfg, split, resolution)
    dataset, manifest = _materialise(data_cfg, split, resolution)
    if manifest["skipped"]:
        first = manifest["examples"][0]
        print(
            f"[unclip] data: skipped {manifest['skipped']} of {manifest['seen']} samples in {split} "
            f"(first: {first['key']}: {first['reason']})"
        )
    return dataset


def skipped_samples(data_cfg: DictConfig, split: str, resolution: int) -> int:
    """How many samples the materialised ``split`` dropped as unusable (0 for shapes); builds it if needed.

    The split's ``manifest.json`` in the cache also names the first few and why.
    """
    _check_split(data_cfg, split, resolution)
    if data_cfg.source == "shapes":
        return 0
    return int(_materialise(data_cfg, split, resolution)[1]["skipped"])


def _check_split(data_cfg: DictConfig, split: str, resolution: int) -> None:
    names = split_names(data_cfg)
    if split not in names:
        raise ConfigError(f"split {split!r} is not one of {names} for data.source={data_cfg.source}")
    if resolution <= 0:
        raise ConfigError(f"resolution={resolution} must be positive")
    if split == "train" and is_streaming(data_cfg):
        raise ConfigError(
            "the train split of data.source=webdataset with data.streaming=true is streamed: read it with "
            "unclip.data.sources.open_stream (or set data.streaming=false to materialise it)"
        )
    check_source(data_cfg)


def _check_common(data_cfg: DictConfig) -> None:
    for name in ("path", "urls"):
        # keys(): `name in data_cfg` is False for a key whose value is ??? (missing)
        if name in data_cfg.keys() and OmegaConf.is_missing(data_cfg, name):  # noqa: SIM118
            raise ConfigError(
                f"data.{name} is not set: add data.{name}=... for data.source={data_cfg.source}"
            )
    explicit = _explicit_eval(data_cfg)
    checks = [
        (
            explicit or 0.0 < data_cfg.eval_fraction < 1.0,
            f"data.eval_fraction={data_cfg.eval_fraction} must be in (0, 1) without an explicit eval source",
        ),
        (data_cfg.eval_size > 0, f"data.eval_size={data_cfg.eval_size} must be positive"),
        (
            data_cfg.max_image_pixels > 0,
            f"data.max_image_pixels={data_cfg.max_image_pixels} must be positive",
        ),
        (data_cfg.min_image_size >= 1, f"data.min_image_size={data_cfg.min_image_size} must be at least 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def _explicit_eval(data_cfg: DictConfig) -> bool:
    if data_cfg.source == "webdataset":
        return bool(data_cfg.eval_urls)
    return data_cfg.eval_path is not None


def holdout_bucket(key: str) -> int:
    """The key's place in [0, 10000): a sample is held out for eval when it is under eval_fraction * 10000."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % _HOLDOUT_BUCKETS


def _held_out(key: str, fraction: float) -> bool:
    return holdout_bucket(key) < round(fraction * _HOLDOUT_BUCKETS)


# --------------------------------------------------------------------------------------------------- shapes


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


def _check_shapes(data_cfg: DictConfig) -> None:
    _shapes_holdout(data_cfg)
    for name in ("train_size", "eval_size"):
        if int(data_cfg[name]) <= 0:
            raise ConfigError(f"data.{name}={data_cfg[name]} must be positive")


# ----------------------------------------------------------------------------------------------- materialised


def _materialise(data_cfg: DictConfig, split: str, resolution: int) -> tuple[datasets.Dataset, dict]:
    """The cached split and its manifest, built first if the settings or the input files changed."""
    side = "eval" if split == "eval" and _explicit_eval(data_cfg) else "main"
    settings = {
        k: v for k, v in OmegaConf.to_container(data_cfg, resolve=True).items() if k not in _NOT_IN_DIGEST
    }
    key = {
        "v": SOURCE_FORMAT_VERSION,
        "split": split,
        "resolution": resolution,
        "settings": settings,
        "inputs": _INPUTS[str(data_cfg.source)](data_cfg, side),
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = cache_root(data_cfg) / str(data_cfg.source) / f"{split}-{resolution}px-{digest}"
    if path.exists():
        try:
            manifest = json.loads((path / _MANIFEST).read_text())
            return datasets.load_from_disk(str(path)), manifest
        except Exception as err:  # a cache we cannot read is rebuilt, never trusted
            shutil.rmtree(path, ignore_errors=True)
            print(f"[unclip] rebuilding unreadable data cache {path}: {err}")

    samples = _SAMPLES[str(data_cfg.source)](data_cfg, side)
    if side == "main" and not _explicit_eval(data_cfg):
        fraction = float(data_cfg.eval_fraction)
        samples = (s for s in samples if _held_out(s.key, fraction) == (split == "eval"))
    limit = int(data_cfg.eval_size) if split == "eval" else None
    manifest: dict[str, Any] = {"rows": 0, "seen": 0, "skipped": 0, "examples": []}

    def rows() -> Iterator[dict]:
        seen_keys: set[str] = set()
        for sample in samples:
            if limit is not None and manifest["rows"] >= limit:
                break
            manifest["seen"] += 1
            try:
                if sample.key in seen_keys:
                    raise ImageDecodeError(sample.key, "duplicate key (another sample has the same name)")
                image = _decode(data_cfg, sample, resolution)
            except ImageDecodeError as err:
                manifest["skipped"] += 1
                if len(manifest["examples"]) < _MANIFEST_EXAMPLES:
                    manifest["examples"].append({"key": sample.key, "reason": err.reason})
                continue
            seen_keys.add(sample.key)
            manifest["rows"] += 1
            yield {"image": image, "caption": sample.caption, "key": sample.key}

    scratch = path.with_name(f".gen-{path.name}-{os.getpid()}")
    try:
        try:
            dataset = datasets.Dataset.from_generator(
                rows, features=_FEATURES, cache_dir=str(scratch), fingerprint=digest
            )
        except datasets.exceptions.DatasetGenerationError as err:
            if isinstance(err.__cause__, UnclipError):  # ours, raised while listing: say it plainly
                raise err.__cause__ from None
            raise
        except ValueError:  # datasets refuses a generator that yielded nothing
            if manifest["rows"]:
                raise
            dataset = None
        if not manifest["rows"]:
            reasons = "; ".join(f"{e['key']}: {e['reason']}" for e in manifest["examples"][:3])
            raise DataError(
                f"data.source={data_cfg.source}: the {split} split has no usable sample "
                f"({manifest['seen']} seen, {manifest['skipped']} skipped{': ' + reasons if reasons else ''})"
                + (" - raise data.eval_fraction or name an eval source" if split == "eval" else "")
            )
        _save_atomically(dataset, path, {_MANIFEST: json.dumps(manifest, indent=1)})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return datasets.load_from_disk(str(path)), manifest


def _decode(
    data_cfg: DictConfig,
    sample: Sample,
    resolution: int,
    crop: str = "center",
    rng: np.random.Generator | None = None,
) -> Any:
    if sample.problem is not None:
        raise ImageDecodeError(sample.key, sample.problem)
    if sample.image is None:
        raise ImageDecodeError(sample.key, "no image")
    if sample.caption is None:
        raise ImageDecodeError(sample.key, "no caption")
    return decode_square(
        sample.image,
        resolution,
        crop=crop,
        rng=rng,
        name=sample.key,
        max_pixels=int(data_cfg.max_image_pixels),
        min_size=int(data_cfg.min_image_size),
    )


def _save_atomically(dataset: datasets.Dataset, path: Path, extra: dict[str, str] | None = None) -> None:
    """Write to a temporary sibling folder (with the ``extra`` text files) and rename, so a killed build never
    leaves a half cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    dataset.save_to_disk(str(tmp))
    for name, text in (extra or {}).items():
        (tmp / name).write_text(text)
    try:
        os.replace(tmp, path)
    except OSError:  # another process finished first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
        if not path.exists():
            raise DataError(f"could not write the dataset cache {path}") from None


def _file_stats(paths: list[Path], root: Path | None = None) -> list[list]:
    stats = []
    for path in paths:
        info = path.stat()
        stats.append([str(path.relative_to(root) if root else path), info.st_size, info.st_mtime_ns])
    return stats


def _caption_column(data_cfg: DictConfig, columns: list[str], where: str) -> str:
    """The configured caption column, or the first of :data:`CAPTION_COLUMNS` present."""
    if data_cfg.caption_column is not None:
        if data_cfg.caption_column not in columns:
            raise DataError(
                f"data.caption_column={data_cfg.caption_column!r} is not a column of {where} "
                f"(its columns: {columns})"
            )
        return str(data_cfg.caption_column)
    for name in CAPTION_COLUMNS:
        if name in columns:
            return name
    raise DataError(
        f"{where} has no caption column: none of {list(CAPTION_COLUMNS)} among its columns {columns} "
        "(name one with data.caption_column)"
    )


# --------------------------------------------------------------------------------------------------- folder


def _folder_root(data_cfg: DictConfig, side: str) -> tuple[Path, str]:
    name = "data.eval_path" if side == "eval" else "data.path"
    value = data_cfg.eval_path if side == "eval" else data_cfg.path
    root = Path(os.path.expanduser(str(value)))
    if not root.exists():
        raise ConfigError(f"{name}={value} does not exist")
    if not root.is_dir():
        raise ConfigError(f"{name}={value} is not a folder")
    return root, name


def _folder_files(root: Path) -> list[Path]:
    """Every file under ``root``, sorted, leaving out hidden ones (``.DS_Store``, ``._x.jpg``, ``.git/``)."""
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


def _folder_layout(data_cfg: DictConfig, root: Path, name: str) -> Path | None:
    """The metadata file captioning the folder, or None when captions come from same-name .txt files."""
    modes = ("auto", "metadata", "txt")
    if data_cfg.captions not in modes:
        raise ConfigError(f"data.captions={data_cfg.captions!r} must be one of {modes}")
    found = [root / m for m in _METADATA_FILES if (root / m).is_file()]
    if data_cfg.captions == "txt" or (data_cfg.captions == "auto" and not found):
        return None
    if not found:
        raise DataError(f"data.captions=metadata, but {name}={root} has no {' or '.join(_METADATA_FILES)}")
    if len(found) > 1:
        raise DataError(f"{name}={root} has both {' and '.join(_METADATA_FILES)}: keep one")
    return found[0]


def _read_metadata(meta: Path, header_only: bool = False) -> tuple[list[str], list[dict]]:
    """The columns of a metadata.jsonl / metadata.csv (from its header or first record) and its rows."""
    try:
        with open(meta, newline="", encoding="utf-8") as f:
            if meta.suffix == ".csv":
                reader = csv.DictReader(f)
                columns = list(reader.fieldnames or [])
                return columns, [] if header_only else list(reader)
            rows = []
            for number, line in enumerate(f, 1):
                if line.strip():
                    row = json.loads(line)
                    if not isinstance(row, dict):
                        raise ValueError(f"line {number} is not a JSON object")
                    rows.append(row)
                    if header_only:
                        break
    except (ValueError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"{meta} is not a readable {meta.suffix[1:]} file: {err}") from err
    return (list(rows[0]) if rows else []), rows


def _check_folder(data_cfg: DictConfig) -> None:
    for side in ("main", "eval") if _explicit_eval(data_cfg) else ("main",):
        root, name = _folder_root(data_cfg, side)
        images = [p for p in _folder_files(root) if p.suffix.lower() in IMAGE_SUFFIXES]
        if not images:
            raise DataError(f"{name}={root} holds no image file ({' '.join(IMAGE_SUFFIXES)})")
        meta = _folder_layout(data_cfg, root, name)
        if meta is not None:
            columns, _ = _read_metadata(meta, header_only=True)
            if "file_name" not in columns:
                raise DataError(f"{meta} has no file_name column (its columns: {columns})")
            _caption_column(data_cfg, columns, str(meta))
        elif not any(p.with_suffix(".txt").is_file() for p in images):
            raise DataError(
                f"no image in {name}={root} has a same-name .txt caption, and there is no "
                f"{' or '.join(_METADATA_FILES)}"
            )


def _folder_samples(data_cfg: DictConfig, side: str) -> Iterator[Sample]:
    """Samples keyed by their path under the folder without the suffix (the file stem in a flat folder)."""
    root, name = _folder_root(data_cfg, side)
    meta = _folder_layout(data_cfg, root, name)
    if meta is not None:
        columns, rows = _read_metadata(meta)
        column = _caption_column(data_cfg, columns, str(meta))
        for row in sorted(rows, key=lambda r: str(r.get("file_name"))):
            relative = str(row.get("file_name") or "")
            key = Path(relative).with_suffix("").as_posix()
            caption = row.get(column)
            if not relative or not (root / relative).is_file():
                yield Sample(key, None, None, f"image file {relative!r} listed in {meta.name} does not exist")
            else:
                yield Sample(key, root / relative, None if caption is None else str(caption))
        return
    for path in _folder_files(root):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        key = path.relative_to(root).with_suffix("").as_posix()
        text = path.with_suffix(".txt")
        if not text.is_file():
            yield Sample(key, path, None, f"no caption file {text.name}")
            continue
        try:
            yield Sample(key, path, text.read_text(encoding="utf-8").strip())
        except UnicodeDecodeError:
            yield Sample(key, path, None, f"caption file {text.name} is not UTF-8 text")


def _folder_inputs(data_cfg: DictConfig, side: str) -> list[list]:
    root, _ = _folder_root(data_cfg, side)
    return _file_stats(_folder_files(root), root)


# --------------------------------------------------------------------------------------------------- parquet

_GLOB_CHARS = re.compile(r"[*?\[]")


def _parquet_files(data_cfg: DictConfig, side: str) -> list[Path]:
    name = "data.eval_path" if side == "eval" else "data.path"
    value = str(data_cfg.eval_path if side == "eval" else data_cfg.path)
    path = Path(os.path.expanduser(value))
    if _GLOB_CHARS.search(value):
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if os.path.isfile(p))
        if not files:
            raise ConfigError(f"{name}={value!r} matches no file")
        return files
    if path.is_dir():
        files = sorted(path.rglob("*.parquet"))
        if not files:
            raise DataError(f"{name}={value} holds no .parquet file")
        return files
    if not path.is_file():
        raise ConfigError(f"{name}={value} does not exist")
    return [path]


def _parquet_columns(data_cfg: DictConfig, file: Path) -> tuple[str, str]:
    """The image and caption columns of one parquet file, checked against its schema."""
    try:
        columns = list(pq.read_schema(file).names)
    except Exception as err:  # pyarrow raises ArrowInvalid, OSError, ...
        raise DataError(f"{file} is not a readable parquet file: {err}") from err
    for setting in ("image_column", "key_column"):
        if data_cfg[setting] is not None and data_cfg[setting] not in columns:
            raise DataError(
                f"data.{setting}={data_cfg[setting]!r} is not a column of {file} (its columns: {columns})"
            )
    return str(data_cfg.image_column), _caption_column(data_cfg, columns, str(file))


def _check_parquet(data_cfg: DictConfig) -> None:
    for side in ("main", "eval") if _explicit_eval(data_cfg) else ("main",):
        files = _parquet_files(data_cfg, side)
        for file in files:
            _parquet_columns(data_cfg, file)
        if sum(pq.ParquetFile(f).metadata.num_rows for f in files) == 0:
            raise DataError(
                f"the parquet file(s) of data.{'eval_path' if side == 'eval' else 'path'} have no rows"
            )


def _parquet_samples(data_cfg: DictConfig, side: str) -> Iterator[Sample]:
    """Samples keyed by ``data.key_column``, else by ``<file stem>-<row number>``."""
    key_column = data_cfg.key_column
    for file in _parquet_files(data_cfg, side):
        image_column, caption_column = _parquet_columns(data_cfg, file)
        columns = list(dict.fromkeys(c for c in (image_column, caption_column, key_column) if c is not None))
        row = 0
        for batch in pq.ParquetFile(file).iter_batches(batch_size=64, columns=columns):
            for record in batch.to_pylist():
                key = str(record[key_column]) if key_column is not None else f"{file.stem}-{row}"
                row += 1
                caption = record[caption_column]
                yield Sample(
                    key, _parquet_image(record[image_column], file), None if caption is None else str(caption)
                )


def _parquet_image(cell: Any, file: Path) -> bytes | Path | None:
    """Encoded bytes, a {bytes, path} struct (bytes win) or a path relative to the parquet file's folder."""
    if isinstance(cell, dict):
        cell = cell.get("bytes") or cell.get("path")
    if isinstance(cell, str) and cell:
        path = Path(os.path.expanduser(cell))
        return path if path.is_absolute() else file.parent / path
    return cell if isinstance(cell, bytes) and cell else None


def _parquet_inputs(data_cfg: DictConfig, side: str) -> list[list]:
    return _file_stats(_parquet_files(data_cfg, side))


# ------------------------------------------------------------------------------------------------- webdataset

_BRACES = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(\d+)\.\.(\d+)$")
_TAR_NAME = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # <key>.<field>, the WebDataset convention


def expand_braces(pattern: str) -> list[str]:
    """``a-{000..002}.tar`` -> ``a-000.tar a-001.tar a-002.tar`` (zero padding kept); ``{x,y}`` -> x, y."""
    match = _BRACES.search(pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    bounds = _RANGE.match(body)
    if bounds:
        first, last = bounds.groups()
        if int(last) < int(first):
            raise ConfigError(f"the range {{{body}}} in {pattern!r} runs backwards")
        items = [str(i).zfill(len(first)) for i in range(int(first), int(last) + 1)]
    else:
        items = body.split(",")
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [shard for item in items for shard in expand_braces(head + item + tail)]


def _shards(data_cfg: DictConfig, side: str) -> list[str]:
    """The shard list: brace ranges expanded, local globs matched and local paths checked; URLs kept."""
    name = "data.eval_urls" if side == "eval" else "data.urls"
    patterns = [str(p) for p in (data_cfg.eval_urls if side == "eval" else data_cfg.urls)]
    if not patterns:
        raise ConfigError(
            f"{name} is empty: list tar shards (paths or URLs, {{a..b}} ranges and globs allowed)"
        )
    shards: list[str] = []
    for pattern in patterns:
        for item in expand_braces(pattern):
            if "://" in item:
                shards.append(item)
                continue
            local = os.path.expanduser(item)
            if _GLOB_CHARS.search(local):
                found = sorted(p for p in glob.glob(local, recursive=True) if os.path.isfile(p))
                if not found:
                    raise ConfigError(f"{name}: {pattern!r} matches no shard")
                shards.extend(os.path.abspath(p) for p in found)
            elif os.path.isfile(local):
                shards.append(os.path.abspath(local))
            else:
                raise ConfigError(f"{name}: shard {item} (from {pattern!r}) does not exist")
    return shards


def _caption_path(data_cfg: DictConfig) -> tuple[str, list[str]]:
    """``data.caption_key`` as (tar field, path in its JSON): ``txt``, [] or ``json``, [a, b] for json.a.b."""
    field, *path = str(data_cfg.caption_key).split(".")
    if (field == "json") != bool(path) or not all(path):
        raise ConfigError(
            f"data.caption_key={data_cfg.caption_key!r} must name a text field (txt) or a field of the json "
            "(json.caption, json.meta.caption)"
        )
    return field, path


def _first_tar_record(url: str) -> tuple[str, dict[str, bytes]]:
    """The key and the fields of the first sample of a shard, read without downloading the rest."""
    key, fields = None, {}
    try:
        with fsspec.open(url, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for member in tar:
                match = _TAR_NAME.match(member.name)
                if not member.isfile() or match is None:
                    continue
                if key is not None and match.group(1) != key:
                    break
                key = match.group(1)
                fields[match.group(2)] = tar.extractfile(member).read()
    except (OSError, tarfile.TarError) as err:
        raise DataError(f"cannot read the tar shard {url}: {err}") from err
    if key is None:
        raise DataError(f"the tar shard {url} holds no sample")
    return key, fields


def _check_webdataset(data_cfg: DictConfig) -> None:
    if data_cfg.shuffle_buffer < 0:
        raise ConfigError(f"data.shuffle_buffer={data_cfg.shuffle_buffer} must be 0 (no shuffling) or more")
    if data_cfg.crop not in CROPS:
        raise ConfigError(f"data.crop={data_cfg.crop!r} must be one of {CROPS}")
    field, path = _caption_path(data_cfg)
    for side in ("main", "eval") if _explicit_eval(data_cfg) else ("main",):
        url = _shards(data_cfg, side)[0]
        key, fields = _first_tar_record(url)
        if not any(f in fields for f in TAR_IMAGE_FIELDS):
            raise DataError(
                f"the first sample {key!r} of {url} has no image ({', '.join(TAR_IMAGE_FIELDS)}); "
                f"its fields: {sorted(fields)}"
            )
        if field not in fields:
            raise DataError(
                f"data.caption_key={data_cfg.caption_key!r}: the first sample {key!r} of {url} has no "
                f".{field} (its fields: {sorted(fields)})"
            )
        if path:
            try:
                value = json.loads(fields[field])
            except ValueError as err:
                raise DataError(f"{key}.{field} in {url} is not JSON: {err}") from err
            for depth, name in enumerate(path):
                if not isinstance(value, dict) or name not in value:
                    found = sorted(value) if isinstance(value, dict) else type(value).__name__
                    raise DataError(
                        f"data.caption_key={data_cfg.caption_key!r}: {key}.{field} in {url} has no field "
                        f"{'.'.join(path[: depth + 1])!r} (its fields: {found})"
                    )
                value = value[name]


def _raw_stream(data_cfg: DictConfig, shards: list[str]) -> datasets.IterableDataset:
    """The shards as a lazy ``datasets`` stream of undecoded samples (image bytes, caption field)."""
    field, path = _caption_path(data_cfg)
    caption: Any = datasets.Value("string")
    for name in reversed(path):
        caption = {name: caption}
    features = datasets.Features(
        {
            "__key__": datasets.Value("string"),
            "__url__": datasets.Value("string"),
            **{ext: datasets.Image(decode=False) for ext in TAR_IMAGE_FIELDS},
            field: caption,
        }
    )
    return datasets.load_dataset(
        "webdataset", data_files={"train": shards}, split="train", streaming=True, features=features
    )


def _iterate(stream: datasets.IterableDataset, data_cfg: DictConfig) -> Iterator[Sample]:
    # .iter() rather than iter(): inside a DataLoader worker, iter() would split the shards among the
    # workers a second time; the stream is already this worker's part.
    field, path = _caption_path(data_cfg)
    for batch in stream.iter(batch_size=1):
        example = {name: values[0] for name, values in batch.items()}
        image = next((example[f]["bytes"] for f in TAR_IMAGE_FIELDS if example.get(f)), None)
        caption = example.get(field)
        for name in path:
            caption = caption.get(name) if isinstance(caption, dict) else None
        yield Sample(str(example["__key__"]), image, None if caption is None else str(caption))


def _webdataset_samples(data_cfg: DictConfig, side: str) -> Iterator[Sample]:
    return _iterate(_raw_stream(data_cfg, _shards(data_cfg, side)), data_cfg)


def _webdataset_inputs(data_cfg: DictConfig, side: str) -> list[list]:
    shards = _shards(data_cfg, side)
    local = [Path(s) for s in shards if "://" not in s]
    return _file_stats(local) + [[s] for s in shards if "://" in s]


def open_stream(
    data_cfg: DictConfig,
    split: str,
    resolution: int,
    *,
    seed: int,
    epoch: int,
    stream_index: int,
    num_streams: int,
) -> Iterator[dict]:
    """One stream's part of one epoch of a ``webdataset`` train split, decoded lazily.

    Yields ``{"image": PIL RGB resolution², "caption", "key", "skipped"}``, ``skipped`` being how many
    unusable samples this stream dropped right before this one (sum them for a count that is right across
    DataLoader workers and processes; unusable samples after the last good one of an epoch go uncounted).

    Streams ``0 .. num_streams-1`` (e.g. ``rank * workers + worker_id`` of ``world_size * workers``) share
    the epoch: with a number of shards that is a multiple of ``num_streams`` each reads whole shards;
    otherwise each reads every shard and keeps every ``num_streams``-th sample. Either way the union covers
    every train sample exactly once. Shard order and a ``data.shuffle_buffer`` of still-compressed samples
    are shuffled from (seed, epoch), the same for all streams (0: no shuffling); eval samples are dropped;
    ``data.crop=random`` draws each crop from (seed, epoch, key). The same arguments replay the same
    samples in the same order. Call it inside the DataLoader worker; nothing here is shared between calls.
    """
    if data_cfg.source != "webdataset":
        raise ConfigError(f"open_stream reads data.source=webdataset, not {data_cfg.source}: use load_split")
    if split != "train":
        raise ConfigError(f"only the train split is streamed, not {split!r}: read it with load_split")
    if not 0 <= stream_index < num_streams:
        raise ConfigError(f"stream_index={stream_index} must be in [0, num_streams={num_streams})")
    if resolution <= 0:
        raise ConfigError(f"resolution={resolution} must be positive")
    check_source(data_cfg)
    return _stream(data_cfg, resolution, seed, epoch, stream_index, num_streams)


def _stream(
    data_cfg: DictConfig, resolution: int, seed: int, epoch: int, stream_index: int, num_streams: int
) -> Iterator[dict]:
    raw = split_dataset_by_node(
        _raw_stream(data_cfg, _shards(data_cfg, "main")), rank=stream_index, world_size=num_streams
    )
    if data_cfg.shuffle_buffer > 0:
        generator = np.random.default_rng([seed % 2**63, epoch % 2**63])
        raw = raw.shuffle(generator=generator, buffer_size=int(data_cfg.shuffle_buffer))
    hold_out = not _explicit_eval(data_cfg)
    fraction, crop = float(data_cfg.eval_fraction), str(data_cfg.crop)
    skipped = 0
    for sample in _iterate(raw, data_cfg):
        if hold_out and _held_out(sample.key, fraction):
            continue
        rng = None
        if crop == "random":
            key_number = int.from_bytes(hashlib.sha256(sample.key.encode()).digest()[:8], "big")
            rng = np.random.default_rng([seed % 2**63, epoch % 2**63, key_number])
        try:
            image = _decode(data_cfg, sample, resolution, crop=crop, rng=rng)
        except ImageDecodeError:
            skipped += 1
            continue
        yield {"image": image, "caption": sample.caption, "key": sample.key, "skipped": skipped}
        skipped = 0


_CHECKS: dict[str, Callable[[DictConfig], None]] = {
    "shapes": _check_shapes,
    "folder": _check_folder,
    "parquet": _check_parquet,
    "webdataset": _check_webdataset,
}
_SAMPLES: dict[str, Callable[[DictConfig, str], Iterator[Sample]]] = {
    "folder": _folder_samples,
    "parquet": _parquet_samples,
    "webdataset": _webdataset_samples,
}
_INPUTS: dict[str, Callable[[DictConfig, str], list[list]]] = {
    "folder": _folder_inputs,
    "parquet": _parquet_inputs,
    "webdataset": _webdataset_inputs,
}
