"""Embeddings at scale: run a frozen CLIP over a whole data source once and write sharded parquet files.

The prior learns text -> image embedding and the decoder image embedding -> pixels; on millions of images
neither should run CLIP every step (unCLIP §2 trains both on precomputed CLIP embeddings). ``unclip-embed``
(:mod:`unclip.cli.embed`) splits every split of the source into *parts*, and each process of an ``accelerate
launch`` embeds the parts ``p = rank, rank + W, ...``:

- a cached (map-style) split is cut into parts of ``rows_per_part`` rows;
- a streamed split (WebDataset) is read as ``parts`` streams (:func:`unclip.data.sources.open_stream`, no
  shuffling, centre crops), one part file per stream.

A part is written to ``<out>/<split>/part-NNNNN.parquet`` through a temporary name, then its row count to
``part-NNNNN.json``; the JSON's presence marks a finished part, so a killed job, started again with the same
settings, embeds only the parts still missing and ends with the same files as an uninterrupted one. The
settings (CLIP fingerprint, data config, sizes) are recorded in ``<out>/job.json`` before any work: the same
folder with another CLIP or other data is refused, never overwritten. When every part is done the main process
writes ``<out>/manifest.json``, which the prior and decoder stages read (``stage.embeddings.path=<out>``); it
also counts, per split, the corrupt samples skipped on the way (``skipped``).

Each row: ``key``, ``caption``, the :data:`unclip.clip.cache.EMBEDDING_COLUMNS` with captions padded to the
CLIP's context length, the source's own attribute columns (``shapes``: colour, shape, ...) and, unless
``image_size`` is null, the image itself at ``image_size`` px (PNG), for the decoder.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow.parquet as pq
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from unclip.clip.cache import embed_batch
from unclip.clip.model import ClipEncoder
from unclip.data.sources import is_streaming, load_split, open_stream, skipped_samples, split_names
from unclip.errors import ConfigError, DataError
from unclip.io import atomic_write, write_text

FORMAT_VERSION = 1


@dataclass(frozen=True)
class Part:
    """One unit of work: rows ``[start, stop)`` of a cached split, or stream ``index`` of ``count``."""

    split: str
    index: int
    start: int = 0
    stop: int = 0
    streams: int = 0  # > 0: a streamed split read as this many streams

    def path(self, out: Path) -> Path:
        return out / self.split / f"part-{self.index:05d}.parquet"


def _job_settings(cfg: DictConfig, encoder: ClipEncoder) -> dict[str, Any]:
    return {
        "format": FORMAT_VERSION,
        "clip_fingerprint": encoder.fingerprint(),
        "data": OmegaConf.to_container(cfg.data, resolve=True),
        "image_size": cfg.image_size,
        "clip_image_size": encoder.image_size,
        "token_length": encoder.context_length,
        "rows_per_part": cfg.rows_per_part,
        "parts": cfg.parts,
    }


def _check_job(out: Path, settings: dict[str, Any]) -> None:
    """Refuse an output folder that holds another job's embeddings."""
    job = out / "job.json"
    if not job.is_file():
        return
    try:
        recorded = json.loads(job.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"{job} is unreadable ({err}); choose another out= or remove the folder") from err
    changed = sorted(k for k in settings.keys() | recorded.keys() if settings.get(k) != recorded.get(k))
    if changed:
        raise ConfigError(
            f"out={out} holds embeddings made with other settings ({', '.join(changed)} differ): "
            "choose another out= folder (nothing was overwritten)"
        )


def plan_parts(cfg: DictConfig, splits: dict[str, datasets.Dataset | None]) -> list[Part]:
    """Every part of every split; ``None`` marks a streamed split."""
    parts = []
    for name, split in splits.items():
        if split is None:
            parts.extend(Part(name, i, streams=cfg.parts) for i in range(cfg.parts))
        else:
            for index, start in enumerate(range(0, len(split), cfg.rows_per_part)):
                parts.append(Part(name, index, start, min(len(split), start + cfg.rows_per_part)))
    return parts


def _records(
    cfg: DictConfig, part: Part, splits: dict[str, Any], resolution: int
) -> Iterator[dict[str, Any]]:
    """The part's records at ``resolution`` px (image, caption, key, attributes)."""
    if part.streams:
        data = OmegaConf.merge(cfg.data, {"shuffle_buffer": 0, "crop": "center"})
        yield from open_stream(
            data, part.split, resolution, seed=0, epoch=0, stream_index=part.index, num_streams=part.streams
        )
        return
    rows = splits[part.split][resolution].select(range(part.start, part.stop))
    for offset, row in enumerate(rows):
        row.setdefault("key", f"{part.split}-{part.start + offset:09d}")
        yield row


def _embed_part(
    cfg: DictConfig, encoder: ClipEncoder, part: Part, splits: dict[str, Any], out: Path
) -> dict[str, int]:
    """Embed one part into its parquet file; return its row count and the corrupt samples its stream
    skipped (a cached split's are counted once, when it was built)."""
    clip_rows = _records(cfg, part, splits, encoder.image_size)
    pixel_rows = _records(cfg, part, splits, cfg.image_size) if cfg.image_size else None
    writer: pq.ParquetWriter | None = None
    rows = skipped = 0

    def write(tmp: Path) -> None:
        nonlocal writer, rows, skipped
        while batch := list(islice(clip_rows, cfg.batch_size)):
            columns = embed_batch(
                encoder, [r["image"] for r in batch], [r["caption"] for r in batch], encoder.context_length
            )
            table: dict[str, Any] = {
                "key": [str(r["key"]) for r in batch],
                "caption": [r["caption"] for r in batch],
            }
            table.update({k: list(v) for k, v in columns.items()})
            for extra in sorted(set(batch[0]) - {"image", "caption", "key", "skipped"}):
                table[extra] = [r[extra] for r in batch]
            if pixel_rows is not None:
                pictures = list(islice(pixel_rows, len(batch)))
                if [str(p["key"]) for p in pictures] != table["key"]:
                    raise DataError(
                        f"{part.split} part {part.index}: the two resolutions disagree on the samples"
                    )
                table["image"] = [p["image"] for p in pictures]  # PIL images: stored as PNG (datasets.Image)
            arrow = datasets.Dataset.from_dict(table).data.table
            if writer is None:
                writer = pq.ParquetWriter(tmp, arrow.schema)
            writer.write_table(arrow)
            rows += len(batch)
            skipped += sum(int(r.get("skipped", 0)) for r in batch)
        if writer is None:
            raise DataError(
                f"{part.split} part {part.index} of {cfg.data.source} data has no readable samples"
            )
        writer.close()

    atomic_write(part.path(out), write)
    return {"rows": rows, "skipped": skipped}


def embed_source(cfg: DictConfig, accelerator: Any) -> dict[str, Any]:
    """Embed every split of ``cfg.data`` with the CLIP in ``cfg.clip`` into ``cfg.out`` (see the module
    docstring); every process of ``accelerator`` takes its share of the parts. Returns the manifest."""
    if cfg.batch_size < 1 or cfg.rows_per_part < 1 or cfg.parts < 1:
        raise ConfigError("batch_size, rows_per_part and parts must be positive")
    if cfg.image_size is not None and cfg.image_size < 1:
        raise ConfigError(f"image_size={cfg.image_size} must be positive (or null: store no images)")
    out = Path(str(cfg.out))
    encoder = ClipEncoder.load(cfg.clip).eval().requires_grad_(False).to(accelerator.device)
    settings = _job_settings(cfg, encoder)
    _check_job(out, settings)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_text(out / "job.json", json.dumps(settings, indent=2))

    sizes = sorted({encoder.image_size, *([cfg.image_size] if cfg.image_size else [])})
    splits: dict[str, Any] = {}
    with accelerator.main_process_first():  # cached splits are built once, by the main process
        for name in split_names(cfg.data):
            streamed = name == "train" and is_streaming(cfg.data)
            splits[name] = None if streamed else {size: load_split(cfg.data, name, size) for size in sizes}
    parts = plan_parts(cfg, {name: None if s is None else s[sizes[0]] for name, s in splits.items()})
    mine = parts[accelerator.process_index :: accelerator.num_processes]
    todo = [p for p in mine if not p.path(out).with_suffix(".json").is_file()]
    bar = tqdm(todo, desc=f"embed (process {accelerator.process_index})", disable=not cfg.progress)
    for part in bar:
        counts = _embed_part(cfg, encoder, part, splits, out)
        write_text(part.path(out).with_suffix(".json"), json.dumps(counts))
    accelerator.wait_for_everyone()
    manifest = {**settings, "splits": {}}
    for name in split_names(cfg.data):
        files = sorted(p.path(out) for p in parts if p.split == name)
        counts = [json.loads(f.with_suffix(".json").read_text()) for f in files]
        cached = 0 if splits[name] is None else skipped_samples(cfg.data, name, encoder.image_size)
        manifest["splits"][name] = {
            "rows": sum(c["rows"] for c in counts),
            "skipped": cached + sum(c["skipped"] for c in counts),
            "parts": [{"file": str(f.relative_to(out)), "rows": c["rows"]} for f, c in zip(files, counts)],
        }
    if accelerator.is_main_process:
        write_text(out / "manifest.json", json.dumps(manifest, indent=2))
    accelerator.wait_for_everyone()
    return manifest


# ------------------------------------------------------------------------------------------- reading back


class EmbeddedParts:
    """A finished ``unclip-embed`` job as the prior and decoder stages read it (``stage.embeddings``).

    Opening it checks the manifest against the CLIP the stage trains with. ``splits`` holds the splits as
    map-style datasets (converted to Arrow once under ``cache_dir``) -- all of them, or all but ``train`` when
    ``stream`` is set, in which case :meth:`stream_rows` reads ``train`` part by part.
    """

    def __init__(self, settings: DictConfig, clip_fingerprint: str, cache_dir: str | Path) -> None:
        self.folder = Path(str(settings.path))
        self.shuffle_buffer, self.cache_dir = int(settings.shuffle_buffer), cache_dir
        self.manifest = read_manifest(self.folder, clip_fingerprint)
        self.split_names = tuple(self.manifest["splits"])
        cached = self.split_names[1:] if settings.stream else self.split_names
        self.splits = {name: self._dataset(self.files(name)) for name in cached}

    @property
    def skipped(self) -> int:
        """Corrupt training samples the job skipped."""
        return int(self.manifest["splits"]["train"].get("skipped", 0))

    def files(self, split: str) -> list[str]:
        if split not in self.manifest["splits"]:
            raise DataError(
                f"{self.folder} has no {split!r} split (it has {sorted(self.manifest['splits'])})"
            )
        return [str(self.folder / part["file"]) for part in self.manifest["splits"][split]["parts"]]

    def first_part(self, split: str) -> datasets.Dataset:
        """The split's first part only: a sample of it that needs no conversion of the whole split."""
        return self.splits.get(split) or self._dataset(self.files(split)[:1])

    def column(self, split: str, column: str, batch_rows: int = 8192) -> Iterator[torch.Tensor]:
        """One column of a split, batch by batch, as float32 tensors: read column-wise, so a statistic
        over a billion rows' image embeddings never loads their text encodings."""
        for file in self.files(split):
            for batch in pq.ParquetFile(file).iter_batches(batch_size=batch_rows, columns=[column]):
                values = batch.column(0).flatten().to_numpy(zero_copy_only=False)
                yield torch.from_numpy(values.reshape(batch.num_rows, -1).astype(np.float32))

    def stream_rows(
        self, split: str, columns: list[str], *, seed: int, epoch: int, stream_index: int, num_streams: int
    ) -> Iterator[dict[str, Any]]:
        """Stream ``stream_index`` of ``num_streams`` of a split's rows (``columns`` only, as numpy),
        shuffled from (seed, epoch): part order and a buffer of ``shuffle_buffer`` rows."""
        from datasets.distributed import split_dataset_by_node

        raw = datasets.load_dataset("parquet", data_files=self.files(split), split="train", streaming=True)
        raw = split_dataset_by_node(raw.select_columns(columns), rank=stream_index, world_size=num_streams)
        if self.shuffle_buffer > 0:
            raw = raw.shuffle(seed=seed, buffer_size=self.shuffle_buffer)
            raw.set_epoch(epoch)
        yield from raw.with_format("numpy")

    def _dataset(self, files: list[str]) -> datasets.Dataset:
        return datasets.Dataset.from_parquet(files, cache_dir=str(Path(self.cache_dir) / "parquet"))


def read_manifest(folder: str | Path, clip_fingerprint: str) -> dict[str, Any]:
    """The manifest of a finished embedding job, checked against the CLIP a stage trains with."""
    path = Path(folder) / "manifest.json"
    if not path.is_file():
        hint = (
            " (the job has not finished: run it again to complete it)"
            if (Path(folder) / "job.json").is_file()
            else ""
        )
        raise DataError(f"{folder} is not a finished unclip-embed folder: no manifest.json{hint}")
    manifest = json.loads(path.read_text())
    if manifest.get("clip_fingerprint") != clip_fingerprint:
        raise DataError(
            f"{folder} holds embeddings of another CLIP (fingerprint {manifest.get('clip_fingerprint')}, "
            f"not {clip_fingerprint}): embed the data with stage.clip's CLIP"
        )
    return manifest
