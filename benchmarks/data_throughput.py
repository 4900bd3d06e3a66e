"""How fast the user's-data path runs on this machine: streamed WebDataset reads and the embedding job.

    python benchmarks/data_throughput.py [--images 1200] [--shards 8] [--side 512] [--work DIR]

Writes ``--images`` JPEG photographs (random crops of the scikit-image sample photos, ``--side`` px) into
``--shards`` WebDataset tar shards, then measures, in samples per second of wall time:

1. ``stream 64px, 1 process``: :func:`unclip.data.sources.open_stream` read end to end at 64 px (read the
   tar, shuffle buffer, decode, EXIF, resize, crop) in this process;
2. ``stream 64px, 2 workers``: the trainer's reader (:class:`unclip.data.streaming.StreamChunks`), two streams
   in two DataLoader worker processes, as ``trainer.num_workers=2`` runs it;
3. ``embed, tiny CLIP`` and ``embed, ViT-B-32``: ``unclip-embed`` (:func:`unclip.embed.embed_source`) over the
   same shards with the CPU recipe's tiny convolutional CLIP (64 px) and with open_clip's ViT-B-32 (random
   weights, 224 px: the cost per image is that of the pretrained model), storing 64 px images too.

Prints one JSON line per measurement and the machine's load average before and after (other work on the
machine slows every number down).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image
from skimage import data as samples
from torch.utils.data import DataLoader, default_collate

from unclip.clip.model import ClipEncoder
from unclip.data.sources import open_stream
from unclip.data.streaming import StreamChunks, micro_batches
from unclip.embed import embed_source

PHOTOS = ["chelsea", "coffee", "astronaut", "rocket", "hubble_deep_field", "immunohistochemistry", "retina"]
TINY_CLIP = OmegaConf.load(Path(__file__).parents[1] / "conf" / "clip_model" / "tiny_convnet.yaml")


def write_shards(folder: Path, images: int, shards: int, side: int) -> str:
    """``images`` JPEG crops of the sample photos in ``shards`` tars; their brace pattern."""
    rng = random.Random(0)
    photos = [Image.fromarray(getattr(samples, name)()).convert("RGB") for name in PHOTOS]
    folder.mkdir(parents=True, exist_ok=True)
    per_shard = images // shards
    for shard in range(shards):
        with tarfile.open(folder / f"{shard:05d}.tar", "w") as tar:
            for i in range(per_shard):
                photo = rng.choice(photos)
                crop = int(min(photo.size) * rng.uniform(0.6, 1.0))
                left, top = rng.randint(0, photo.width - crop), rng.randint(0, photo.height - crop)
                picture = photo.crop((left, top, left + crop, top + crop)).resize((side, side))
                encoded = io.BytesIO()
                picture.save(encoded, format="JPEG", quality=90)
                key = f"{shard:05d}{i:05d}"
                for suffix, payload in (("jpg", encoded.getvalue()), ("txt", b"a photo of something")):
                    info = tarfile.TarInfo(f"{key}.{suffix}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return str(folder / f"{{00000..{shards - 1:05d}}}.tar")


def data_config(pattern: str, cache: Path):
    return OmegaConf.create(
        {
            "source": "webdataset",
            "urls": [pattern],
            "eval_urls": [],
            "caption_key": "txt",
            "streaming": True,
            "shuffle_buffer": 1000,
            "crop": "random",
            "eval_fraction": 0.02,
            "eval_size": 16,
            "max_image_pixels": 89_478_485,
            "min_image_size": 16,
            "cache_dir": str(cache),
        }
    )


def report(name: str, samples_read: int, seconds: float) -> None:
    print(
        json.dumps(
            {
                "measure": name,
                "samples": samples_read,
                "seconds": round(seconds, 2),
                "samples_per_s": round(samples_read / seconds, 1),
            }
        ),
        flush=True,
    )


def stream_one_process(cfg) -> None:
    start = time.perf_counter()
    count = sum(1 for _ in open_stream(cfg, "train", 64, seed=0, epoch=0, stream_index=0, num_streams=1))
    report("stream 64px, 1 process", count, time.perf_counter() - start)


def stream_two_workers(cfg) -> None:
    def examples(index: int, epoch: int):
        for record in open_stream(cfg, "train", 64, seed=0, epoch=epoch, stream_index=index, num_streams=2):
            pixels = torch.from_numpy(np.asarray(record["image"], dtype=np.uint8).copy())
            yield pixels, record["skipped"]

    chunks = StreamChunks(examples, [0, 1], 16, default_collate)
    start = time.perf_counter()
    loader = DataLoader(chunks, batch_size=None, num_workers=2)
    count = sum(len(batch) for batch, _ in micro_batches(iter(loader), 2))
    report("stream 64px, 2 workers", count, time.perf_counter() - start)


def embed(cfg, clip_folder: Path, out: Path, name: str) -> None:
    from accelerate import Accelerator

    job = OmegaConf.create(
        {
            "data": cfg,
            "clip": str(clip_folder),
            "out": str(out),
            "batch_size": 64,
            "image_size": 64,
            "rows_per_part": 10000,
            "parts": 2,
            "cpu": True,
            "progress": False,
            "debug": False,
        }
    )
    start = time.perf_counter()
    manifest = embed_source(job, Accelerator(cpu=True))
    rows = sum(split["rows"] for split in manifest["splits"].values())
    report(name, rows, time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1200)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--side", type=int, default=512)
    parser.add_argument("--work", default="/tmp/unclip-data-bench")
    args = parser.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"loadavg_before": os.getloadavg(), "threads": torch.get_num_threads()}))
    pattern = write_shards(work / "shards", args.images, args.shards, args.side)
    cfg = data_config(pattern, work / "cache")
    stream_one_process(cfg)
    stream_two_workers(cfg)
    torch.manual_seed(0)
    ClipEncoder(str(TINY_CLIP.name), None, OmegaConf.to_container(TINY_CLIP.arch)).save(work / "tiny_clip")
    embed(cfg, work / "tiny_clip", work / "embedded_tiny", "embed, tiny CLIP (64 px)")
    ClipEncoder("ViT-B-32", None, None).save(work / "vit_b_32")
    embed(cfg, work / "vit_b_32", work / "embedded_vit", "embed, ViT-B-32 (224 px)")
    print(json.dumps({"loadavg_after": os.getloadavg()}))


if __name__ == "__main__":
    main()
