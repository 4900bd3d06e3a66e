"""CLIP embeddings of a captioned-image split, computed once and cached on disk.

The prior learns text -> image embedding and the decoder learns image embedding -> pixels; neither should run
CLIP on every step. ``embed_split`` maps a split through the encoder in batches (``datasets.map``) and stores,
per example: the image embedding z_i, the pooled text embedding z_t, the caption's token ids, its per-token
encodings (float16, truncated to the longest caption of the split) and their padding mask. The cache folder is
keyed by the CLIP fingerprint and the split's own fingerprint, so another CLIP, or other data, never reads it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import datasets
import numpy as np
import torch

from unclip.clip.model import ClipEncoder
from unclip.images import rgb_pixels
from unclip.io import write_text

EMBEDDING_COLUMNS = ("image_embedding", "text_embedding", "token_ids", "text_tokens", "token_mask")


def _token_length(encoder: ClipEncoder, captions: list[str]) -> int:
    # <end> has the largest id, so argmax finds each caption's last real token
    chunks = (captions[i : i + 4096] for i in range(0, len(captions), 4096))
    ends = [int(encoder.tokenize(chunk).argmax(dim=-1).max()) for chunk in chunks]
    return max(ends) + 1


@torch.no_grad()
def embed_batch(
    encoder: ClipEncoder, images: list, captions: list[str], length: int
) -> dict[str, np.ndarray]:
    """The :data:`EMBEDDING_COLUMNS` of a batch of PIL images (at the encoder's size) and their captions, the
    caption columns cut to ``length`` tokens."""
    device = next(encoder.parameters()).device
    pixels = np.stack([rgb_pixels(im) for im in images])
    pixels = torch.from_numpy(pixels).to(device).permute(0, 3, 1, 2).float() / 255.0
    ids = encoder.tokenize(captions)
    text = encoder.encode_text(ids)
    return {
        "image_embedding": encoder.encode_image(pixels).float().cpu().numpy(),
        "text_embedding": text.pooled.float().cpu().numpy(),
        "token_ids": ids[:, :length].cpu().numpy().astype(np.int32),
        "text_tokens": text.tokens[:, :length].to(torch.float16).cpu().numpy(),
        "token_mask": text.mask[:, :length].cpu().numpy(),
    }


def embed_split(
    encoder: ClipEncoder,
    split: datasets.Dataset,
    cache_dir: str | Path,
    batch_size: int = 256,
    image_column: str = "image",
    caption_column: str = "caption",
) -> datasets.Dataset:
    """The split with its image column replaced by CLIP embeddings (loaded from the cache when present)."""
    fingerprint = encoder.fingerprint()
    folder = Path(cache_dir) / "embeddings" / fingerprint / split._fingerprint
    manifest = folder / "manifest.json"
    if manifest.is_file():
        return datasets.Dataset.from_file(str(folder / "embeddings.arrow"))
    length = _token_length(encoder, split[caption_column])
    encoder.eval()

    def embed(batch: dict[str, list]) -> dict[str, np.ndarray]:
        return embed_batch(encoder, batch[image_column], batch[caption_column], length)

    tmp = folder.with_name(f".tmp-{folder.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    embedded = split.map(
        embed,
        batched=True,
        batch_size=batch_size,
        remove_columns=[image_column],
        cache_file_name=str(tmp / "embeddings.arrow"),
        new_fingerprint=f"{fingerprint}-embed",
        desc=f"CLIP embeddings ({fingerprint})",
    )
    del embedded
    write_text(
        tmp / "manifest.json",
        json.dumps(
            {
                "clip_fingerprint": fingerprint,
                "split": split._fingerprint,
                "rows": len(split),
                "token_length": length,
            }
        ),
    )
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return datasets.Dataset.from_file(str(folder / "embeddings.arrow"))
