"""The decoder stage (unCLIP §2.1): learn p(x | z_i, y), images from CLIP image embeddings and captions.

The decoder is trained against one frozen CLIP, given as a component folder (``stage.clip``, what the CLIP
stage exports). ``prepare_data`` renders every split at ``stage.image_size`` and embeds it once through that
CLIP (:func:`unclip.clip.cache.embed_split`, cached on disk under the CLIP's fingerprint; the embedding is of
the very image the decoder learns to draw). Training then never runs CLIP: each step reads pixels, the cached
image embedding and the caption's CLIP token ids, which GLIDE's caption transformer inside the decoder
encodes. Evaluation decodes the true embeddings of held-out images (:mod:`unclip.eval.decoder_eval`); export
writes the decoder's component folder, which records the CLIP fingerprint so it is never paired with another
CLIP.

Choices for ``shapes`` (``conf/experiment/shapes_decoder.yaml``), each measured; every table, the variants
tried and the learning curves are in ``recipes/shapes/DECODER.md``:

- x_0 prediction and a logSNR shift of 4 (the paper: eps, no shift). Flat images decide colour and layout at
  high noise, and through the space-to-depth stem a clean, flat x_0 is easier to draw than per-pixel noise.
- ``stage.variance=fixed_small`` in the recipe (the stage default stays the paper's learned variance): the
  learned variance's loss term cost low-noise accuracy, and DDIM, the default sampler, never uses it.
- ``stage.edge_loss_weight`` (off): weighting the x_0 error near edges keeps a star's points, but from the
  prior's embeddings it draws extra objects.

On the true CLIP embeddings of held-out images the recipe draws the right colour (0.90 / 0.90, seen / held-out
pairs) but squares, triangles and stars come out as discs (shape 0.32 / 0.20, chance 0.25); trained for 12,000
steps they become lumpy polygons, and shape stays at 0.36 / 0.32: the evaluation's ``attribute_sources`` shows
the decoder taking colour from its conditioning but shape from the noise. The rendering network, not the
embedding, is what limits shape: conditioned on the exact attributes in place of the CLIP embedding, it learns
within 1000 steps to colour, place and size the object from the code alone, but draws it as a disc, and with
every object re-rendered unrotated it begins to draw shape only after about 2500 steps.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Dataset

from unclip.clip.cache import embed_split
from unclip.clip.model import ClipEncoder
from unclip.data.pixels import SplitPixels
from unclip.data.sources import cache_root, load_split, skipped_samples, split_names
from unclip.decoder_sampling import DiffusionDecoder, check_sampling, decoder_config
from unclip.embed import EmbeddedParts
from unclip.errors import ConfigError
from unclip.eval.decoder_eval import attribute_sources, denoising_profile, evaluate_decoder
from unclip.eval.shapes_reader import ATTRIBUTES
from unclip.images import model_range
from unclip.models.decoder import DecoderConfig
from unclip.stages.base import Stage, image_diffusion_settings

# column of an unclip-embed part -> (batch key, dtype) of a streamed training example
STREAM_DTYPES = {
    "image": ("pixels", np.uint8),
    "image_embedding": ("image_embedding", np.float32),
    "token_ids": ("token_ids", np.int64),
}


class ImagesWithEmbeddings(Dataset):
    """Rows of a rendered split (``image``) beside the same rows of its embedding (``image_embedding``,
    ``token_ids``), read a batch at a time: pixels as uint8 (B, S, S, 3) (see :class:`SplitPixels`)."""

    def __init__(self, images: datasets.Dataset, embedded: datasets.Dataset, decoded_cache_mb: int) -> None:
        if len(images) != len(embedded):
            raise ConfigError(f"{len(images)} images but {len(embedded)} embeddings: the caches disagree")
        self.pixels = SplitPixels(images, decoded_cache_mb)
        self.embedded = embedded.select_columns(["image_embedding", "token_ids"]).with_format("numpy")

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {name: value[0] for name, value in self.__getitems__([index]).items()}

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        rows = self.embedded[indices]
        return {
            "pixels": torch.from_numpy(self.pixels[indices]),
            "image_embedding": torch.from_numpy(np.asarray(rows["image_embedding"], dtype=np.float32)),
            "token_ids": torch.from_numpy(np.asarray(rows["token_ids"], dtype=np.int64)),
        }


def _overrides(node: DictConfig) -> dict[str, Any]:
    """The fields of an overrides node that are set (null keeps the preset's)."""
    return {k: v for k, v in OmegaConf.to_container(node).items() if v is not None}


def _config(stage: DictConfig, clip_embed_dim: int, context_length: int) -> DecoderConfig:
    return decoder_config(
        stage.model.preset,
        clip_embed_dim=clip_embed_dim,
        context_length=context_length,
        learn_sigma=stage.variance == "learned",
        unet=_overrides(stage.model.unet),
        text=_overrides(stage.model.text),
        num_clip_tokens=stage.model.num_clip_tokens,
    )


def _check(stage: DictConfig) -> None:
    """Everything about ``stage`` that can be checked before CLIP is loaded; errors name the key."""
    if OmegaConf.is_missing(stage, "clip"):
        raise ConfigError("stage.clip is required: the folder of a trained CLIP (a CLIP run's export/)")
    for key in ("image_embedding_drop", "caption_drop"):
        if not 0.0 <= stage[key] < 1.0:
            raise ConfigError(f"stage.{key}={stage[key]} must be in [0, 1)")
    if not stage.edge_loss_weight >= 0.0:
        raise ConfigError(f"stage.edge_loss_weight={stage.edge_loss_weight} must be >= 0")
    if stage.eval_images < 2:
        raise ConfigError(f"stage.eval_images={stage.eval_images} must be at least 2")
    image_diffusion_settings(stage)
    config = _config(stage, clip_embed_dim=8, context_length=8)  # stand-ins: the CLIP is not loaded yet
    if stage.image_size < 1 or stage.image_size % config.unet.size_multiple:
        raise ConfigError(
            f"stage.image_size={stage.image_size} must be a positive multiple of {config.unet.size_multiple}"
        )
    check_sampling(OmegaConf.to_container(stage.sampling), stage.num_timesteps)


class DecoderStage(Stage):
    """Train the unCLIP decoder on images and the cached CLIP embeddings of the configured data."""

    name = "decoder"

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__(cfg)
        _check(cfg.stage)

    def prepare_data(self) -> None:
        data, size, precomputed = self.cfg.data, int(self.cfg.stage.image_size), self.cfg.stage.embeddings
        self.encoder = ClipEncoder.load(self.cfg.stage.clip).eval().requires_grad_(False)
        self.clip_fingerprint = self.encoder.fingerprint()
        if precomputed.path:  # an unclip-embed job's parts: each row carries its image too
            self.parts = EmbeddedParts(precomputed, self.clip_fingerprint, cache_root(data))
            if self.parts.manifest["image_size"] != size:
                raise ConfigError(
                    f"{precomputed.path} stores images at {self.parts.manifest['image_size']} px, not at "
                    f"stage.image_size={size}: run unclip-embed with image_size={size}"
                )
            self.split_names, self.embedded = self.parts.split_names, self.parts.splits
            self.images = self.embedded
            return
        self.split_names = split_names(data)
        self.images = {name: load_split(data, name, size) for name in self.split_names}
        self.embedded = {
            name: embed_split(self.encoder, split, cache_root(data)) for name, split in self.images.items()
        }

    def build_model(self) -> torch.nn.Module:
        stage = self.cfg.stage
        config = _config(stage, self.encoder.embed_dim, self.encoder.context_length)
        return DiffusionDecoder(
            config,
            int(stage.image_size),
            image_diffusion_settings(stage),
            OmegaConf.to_container(stage.sampling),
        )

    def setup(self, accelerator: Any) -> None:
        super().setup(accelerator)
        self.encoder.to(accelerator.device)  # evaluation embeds the decoded images next to the decoder

    def train_dataset(self) -> Dataset:
        return ImagesWithEmbeddings(
            self.images["train"], self.embedded["train"], self.cfg.data.decoded_cache_mb
        )

    def skipped_samples(self) -> int:
        if self.cfg.stage.embeddings.path:
            return self.parts.skipped  # counted by unclip-embed
        return skipped_samples(self.cfg.data, "train", int(self.cfg.stage.image_size))

    def streams_training_data(self) -> bool:
        return bool(self.cfg.stage.embeddings.path and self.cfg.stage.embeddings.stream)

    def train_stream(self, **stream: int) -> Iterator[tuple[dict[str, torch.Tensor], int]]:
        for row in self.parts.stream_rows("train", list(STREAM_DTYPES), **stream):
            example = {
                key: torch.tensor(np.asarray(row[column], dtype))
                for column, (key, dtype) in STREAM_DTYPES.items()
            }
            yield example, 0

    def loss(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        images = model_range(batch["pixels"].permute(0, 3, 1, 2))
        terms = model(
            images,
            batch["image_embedding"],
            batch["token_ids"],
            image_embedding_drop=self.cfg.stage.image_embedding_drop,
            caption_drop=self.cfg.stage.caption_drop,
            edge_loss_weight=self.cfg.stage.edge_loss_weight,
        )
        extras = {"mse": terms["mse"].mean().detach()}
        if "vb" in terms:
            extras["vb"] = terms["vb"].mean().detach()
        return terms["loss"].mean(), extras

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        stage = self.cfg.stage
        modes = [(True, "")] + ([(False, "no_caption/")] if stage.eval_without_caption else [])
        metrics: dict[str, float] = {}
        for split in self.split_names[1:]:
            rows = self.embedded[split]
            rows = rows.select(range(min(stage.eval_images, len(rows))))
            for with_caption, prefix in modes:
                generator = torch.Generator().manual_seed(int(self.cfg.seed))
                found = evaluate_decoder(
                    model, self.encoder, rows, generator=generator, with_caption=with_caption
                )
                metrics.update({f"{split}/{prefix}{key}": value for key, value in found.items()})
            examples = ImagesWithEmbeddings(self.images[split].select(range(len(rows))), rows, 0)
            batch = examples.__getitems__(list(range(len(rows))))
            profile = denoising_profile(
                model,
                model_range(batch["pixels"].permute(0, 3, 1, 2)),
                batch["image_embedding"],
                batch["token_ids"],
                generator=torch.Generator().manual_seed(int(self.cfg.seed)),
            )
            metrics.update({f"{split}/{key}": value for key, value in profile.items()})
            if set(ATTRIBUTES) <= set(rows.column_names):  # shapes data: the truth is known
                records = [dict(row) for row in rows.select_columns(list(ATTRIBUTES))]
                sources = attribute_sources(
                    model,
                    model_range(batch["pixels"].permute(0, 3, 1, 2)),
                    batch["image_embedding"],
                    batch["token_ids"],
                    records,
                    generator=torch.Generator().manual_seed(int(self.cfg.seed)),
                )
                metrics.update({f"{split}/{key}": value for key, value in sources.items()})
        return metrics

    def export(self, model: torch.nn.Module, folder: Path) -> None:
        model.save(folder, self.clip_fingerprint)

    def load_export(self, folder: Path) -> torch.nn.Module:
        model = DiffusionDecoder.load(folder, self.clip_fingerprint)
        model.sampling = check_sampling(
            OmegaConf.to_container(self.cfg.stage.sampling), model.diffusion.num_timesteps
        )
        return model
