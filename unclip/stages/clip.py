"""The CLIP stage: contrastive image-text training (Radford et al. 2021 §2.3) with open_clip's loss.

Across processes the loss gathers every process's features with gradients (open_clip's
``gather_with_grad``), so the similarity matrix — and so the gradient — is that of the global batch: N
processes train exactly like one process with the same batch. Evaluation is image-text retrieval among the
held-out pairs (:mod:`unclip.eval.retrieval`) on any data, and on ``shapes`` also zero-shot colour and shape
classification of held-out images (:mod:`unclip.eval.zero_shot`), on seen and on held-out (colour, shape)
pairs.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from torch.utils.data import Dataset

from unclip.clip.model import ClipEncoder
from unclip.data.pixels import SplitPixels
from unclip.data.sources import is_streaming, load_split, open_stream, skipped_samples, split_names
from unclip.eval.retrieval import retrieval_recall
from unclip.eval.zero_shot import zero_shot_accuracy
from unclip.images import rgb_pixels
from unclip.stages.base import Stage

MAX_LOGIT_SCALE = float(np.log(100.0))  # CLIP clips its learned temperature at 100


def image_to_tensor(image: Any) -> torch.Tensor:
    """A PIL RGB image to a uint8 tensor (3, H, W)."""
    return torch.from_numpy(rgb_pixels(image).copy()).permute(2, 0, 1)


class CaptionedImages(Dataset):
    """Rows of a captioned-image split as a batch of uint8 images (B, 3, H, W) and caption token ids.

    Each distinct caption is tokenised once up front (open_clip's tokenizer took 6.4 s on one core for the
    20,000 captions of ``shapes``, 4.2 s for its 13,977 distinct ones), and a batch is read with one lookup
    (:class:`~unclip.data.pixels.SplitPixels`), so data loading stays a small fraction of a CPU step.
    """

    def __init__(self, split: Any, encoder: ClipEncoder, decoded_cache_mb: int) -> None:
        self.pixels = SplitPixels(split, decoded_cache_mb)
        captions = split["caption"]
        distinct = list(dict.fromkeys(captions))
        tokens = torch.cat([encoder.tokenize(distinct[i : i + 4096]) for i in range(0, len(distinct), 4096)])
        row_of = {caption: row for row, caption in enumerate(distinct)}
        self.tokens = tokens[torch.tensor([row_of[c] for c in captions], dtype=torch.long)]

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {name: value[0] for name, value in self.__getitems__([index]).items()}

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        images = torch.from_numpy(self.pixels[indices]).permute(0, 3, 1, 2)
        return {"image": images, "tokens": self.tokens[list(indices)]}


class ClipModule(torch.nn.Module):
    """The trainable wrapper: one forward returning normalised features and the logit scale, for DDP."""

    def __init__(self, encoder: ClipEncoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(
        self, images: torch.Tensor, tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        image_features = F.normalize(self.encoder.encode_image(images), dim=-1)
        text_features = F.normalize(self.encoder.model.encode_text(tokens), dim=-1)
        return image_features, text_features, self.encoder.model.logit_scale.exp()


class ClipStage(Stage):
    """Train (or fine-tune) an open_clip model on captioned images."""

    name = "clip"

    def _encoder(self) -> ClipEncoder:
        return ClipEncoder.from_config(self.cfg.stage.model)

    def prepare_data(self) -> None:
        encoder = self._encoder()
        self.image_size, self.tokenize = encoder.image_size, encoder.tokenize
        names = split_names(self.cfg.data)
        if self.streams_training_data():  # the training split is read shard by shard, never cached
            names = names[1:]
        self.splits = {s: load_split(self.cfg.data, s, self.image_size) for s in names}

    def build_model(self) -> torch.nn.Module:
        return ClipModule(self._encoder())

    def train_dataset(self) -> Dataset:
        return CaptionedImages(self.splits["train"], self._encoder(), self.cfg.data.decoded_cache_mb)

    def streams_training_data(self) -> bool:
        return is_streaming(self.cfg.data)

    def train_stream(self, **stream: int) -> Iterator[tuple[dict[str, torch.Tensor], int]]:
        for record in open_stream(self.cfg.data, "train", self.image_size, **stream):
            tokens = self.tokenize([record["caption"]])[0]
            yield {"image": image_to_tensor(record["image"]), "tokens": tokens}, record["skipped"]

    def skipped_samples(self) -> int:
        if "train" not in self.splits:
            return 0
        return skipped_samples(self.cfg.data, "train", self.image_size)

    def setup(self, accelerator: Any) -> None:
        super().setup(accelerator)
        self.criterion = ClipLoss(
            local_loss=False,
            gather_with_grad=True,
            rank=accelerator.process_index,
            world_size=accelerator.num_processes,
        )

    def loss(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        images = batch["image"].float().div_(255.0)
        image_features, text_features, scale = model(images, batch["tokens"])
        return self.criterion(image_features, text_features, scale), {"logit_scale": scale.detach()}

    def after_optimizer_step(self, model: torch.nn.Module) -> None:
        with torch.no_grad():
            model.encoder.model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        encoder: ClipEncoder = model.encoder
        device = next(encoder.parameters()).device
        metrics: dict[str, float] = {}
        for split in split_names(self.cfg.data)[1:]:
            rows = self.splits[split].select(range(min(self.cfg.stage.eval_images, len(self.splits[split]))))
            embeddings, texts = [], []
            for start in range(0, len(rows), 256):
                chunk = rows[start : start + 256]
                images = torch.stack([image_to_tensor(im) for im in chunk["image"]]).to(device).float() / 255
                embeddings.append(encoder.encode_image(images))
                texts.append(encoder.encode_text(encoder.tokenize(chunk["caption"]).to(device)).pooled)
            found = retrieval_recall(torch.cat(embeddings), torch.cat(texts), rows["caption"])
            if {"colour", "shape"} <= set(rows.column_names):  # shapes: the truth behind every image is known
                labels = {"colour": rows["colour"], "shape": rows["shape"]}
                found.update(zero_shot_accuracy(encoder, torch.cat(embeddings), labels))
            metrics.update({f"{split}/{key}": value for key, value in found.items()})
        return metrics

    def export(self, model: torch.nn.Module, folder: Path) -> None:
        model.encoder.save(folder)

    def load_export(self, folder: Path) -> torch.nn.Module:
        return ClipModule(ClipEncoder.load(folder))
