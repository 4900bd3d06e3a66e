"""The upsampler stages ``sr256`` and ``sr1024`` (unCLIP §2.1 and App. C): learn p(x_high | x_low).

One stage class serves both; the config says the sizes (``low_res_size`` -> ``image_size``). ``prepare_data``
loads the training split at the high resolution and the evaluation splits at both (for ``shapes``: the same
specs rendered at both sizes, so the low-res input of evaluation is a true render, not a downsample). Each
training step takes, per image, a random square crop of ``crop_fraction`` of the side (the paper's 0.25:
64 px crops of 256 px images, 256 px crops of 1024 px images) aligned to the low-res pixel grid, makes the
condition by box-downsampling that very crop, corrupts the condition (blur or BSR, :mod:`unclip.data.degrade`)
for a ``degradation_probability`` fraction of the batch, and takes the diffusion loss of
:class:`unclip.upsampler_sampling.DiffusionUpsampler`. Crops and corruptions draw from the torch generator
whose state the trainer checkpoints, so a resumed run continues identically.

Evaluation upsamples held-out low-res images at full size (:mod:`unclip.eval.upsampler_eval`: PSNR against the
true high-res image, against bicubic, and the output's consistency with its input); export writes the
upsampler's component folder.

Choices measured on ``shapes`` (tiny presets, batch 32 of 64 px crops for sr256 and 8 of 256 px crops for
sr1024, lr 1e-3; screening runs on one core each, two side by side; 16 held-out images per split for
sr256 and 4 for sr1024; PSNR gain over bicubic on seen / held-out pairs):

    stage   x0 output                          steps  gain (dB)       consistency (dB)
    sr256   plain                              300    -5.8 / -6.9     31.5 / 31.6
    sr256   residual on bilinear               300    +1.8 / +0.4     42.8 / 43.6
    sr256   residual on bilinear, full-res     300    +0.7 / -0.5     41.1 / 41.5   (22 % slower; dropped)
            head (16 ch) after the 2x2 stem
    sr256   residual on bilinear               500    +2.7 / +1.4     44.0 / 45.2
    sr1024  residual on bilinear               200    -1.0 / -1.1     43.1 / 50.2
    sr1024  residual on bilinear, min-SNR      300    -1.0 / -1.0     43.1 / 50.9

Predicting x0 as a residual over the resized condition is what makes the tiny models useful: flat regions
come for free and training only has to add the edges. After these runs the residual's base became the
clamped bicubic resize (an untrained model then equals bicubic instead of the softer bilinear; it scores
+0.20 / +0.21 dB at 256 px and +0.24 / +0.20 dB at 1024 px, torch's clamped cubic against PIL's). With it, on
2 cores: ``experiment=shapes_sr256`` (500 steps, 3 min 51 s) gains +2.96 / +1.80 dB with consistency 45.6 /
46.1 dB; ``experiment=shapes_sr1024`` (500 steps, about 5 min 10 s) +0.18 / -0.29 dB, no better than its
untrained start. Variants of sr1024 (one core each, 300 steps, bicubic base): degradation_probability 0.1
+0.24 / +0.20; 32/64/64 channels +0.12 / +0.12 and 48/48/48 channels +0.23 / -0.30, both 2.6 x slower; a
2 x 2 stem with 8/16/32 channels +0.18 / -0.28, 1.5 x slower; no degradation and a cosine schedule (200
steps) +0.28 / +0.19. The 500-step checkpoint samples identically
with 15 and 50 DDIM steps (its x0 prediction follows the condition, not x_t). Why sr1024 learns nothing in
this budget while sr256 learns is not yet known. Two later probes (4 held-out images per split at 1024 px):
the sr256 recipe's weights, applied as they are to 256 -> 1024 (same 4x factor, 27 DDIM steps, 37 s an
image), gain +3.5 / -2.2 dB, so the local task transfers on seen pairs; but training sr1024 with sr256's
2 x 2 stem on 64 px crops (crop_fraction 0.0625, batch 32, 500 steps) gains -2.5 / -3.0 dB with consistency
falling to 38.8 / 45.9 dB. Suspects, not yet tested: the 4 x 4 stem packs 48 input values per position into
16 channels, too few to carry x_t through; and GroupNorm statistics of mostly flat small crops differ from
those of whole images. The second is not it: the recipe's model (retrained, +0.06 / -0.28 dB whole, 4 images
per split) sampled in 256 px tiles, so that every group norm sees a crop like those it trained on, gains
+0.11 / -0.25 dB. And sr256's settings on the 1024 px renders (its 2 x 2 stem preset, 64 px crops, batch 32,
blur instead of BSR, cosine schedule, 500 steps; 8.5 min for the command) gain +0.52 / -0.56 dB (8 images per
split): better than the recipe on seen pairs, worse on held-out ones, and short of +1 dB on both.

What it was: data and the last grey level. Per image, the recipe's model (and sr256's weights run at 1024 px)
gained on black-and-white edges and lost on low-contrast pairs such as red on orange, whose bicubic PSNR is
already ~50 dB: there a bias of half a grey level over flat regions (and, for sr256's weights, a band of
errors along the image border) outweighs everything the edges gain. Two changes, each measured on the same
4 + 4 images (gain over bicubic, seen / held-out pairs):

    recipe model, sampled as before                                         +0.06 / -0.28 dB
    the same weights, each x0 estimate back-projected (sampling.consistent)   +0.86 / +0.57
    retrained with clean conditions (degradation_probability 0)              +1.96 / +0.59   4:11
    ... and 3 crops in 4 centred on an edge (edge_crop_fraction 0.75)        +5.13 / +1.49   5:45

Back-projection makes every x0 estimate box-downsample exactly to the input (DDNM's range-space step), so
flat regions cannot drift; uniform 256 px crops of a 1024 px render of one object mostly hold no edge, and
edge-centred crops give the model several times the edges per step. The recipe now does both (the timing
of the last row was taken beside a test run; the recipe's own is in the README).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Dataset

from unclip.data.degrade import DEGRADATIONS, degrade
from unclip.data.pixels import SplitPixels
from unclip.data.sources import is_streaming, load_split, open_stream, skipped_samples, split_names
from unclip.errors import ConfigError
from unclip.eval.upsampler_eval import box_downsample, evaluate_upsampler
from unclip.images import detail_map, model_range, rgb_pixels
from unclip.models.upsampler import UpsamplerConfig
from unclip.stages.base import Stage, image_diffusion_settings
from unclip.upsampler_sampling import DiffusionUpsampler, check_sampling, upsampler_config


class Pictures(Dataset):
    """The ``image`` column of a split as uint8 (B, S, S, 3) pixels (see :class:`SplitPixels`)."""

    def __init__(self, images: datasets.Dataset, decoded_cache_mb: int) -> None:
        self.pixels = SplitPixels(images, decoded_cache_mb)

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> torch.Tensor:
        return torch.from_numpy(self.pixels[indices])


def _config(stage: DictConfig) -> UpsamplerConfig:
    overrides = {k: v for k, v in OmegaConf.to_container(stage.model.unet).items() if v is not None}
    overrides["learn_sigma"] = stage.variance == "learned"
    return upsampler_config(
        stage.model.preset, noise_aug=stage.noise_aug_max > 0, residual=stage.residual, unet=overrides
    )


def _scale(stage: DictConfig) -> int:
    return stage.image_size // stage.low_res_size


def crop_size(stage: DictConfig) -> int:
    """Side of the training crops: ``crop_fraction`` of ``image_size``, rounded down to a multiple of the
    U-Net's size multiple and of the upsampling factor (so the crop maps onto whole low-res pixels)."""
    multiple = int(np.lcm(_config(stage).unet.size_multiple, _scale(stage)))
    return max(multiple, int(stage.image_size * stage.crop_fraction) // multiple * multiple)


def _check(stage: DictConfig) -> None:
    """Everything about ``stage`` that can be checked before any data is loaded; errors name the key."""
    if (
        stage.low_res_size < 1
        or stage.image_size <= stage.low_res_size
        or stage.image_size % stage.low_res_size
    ):
        raise ConfigError(
            f"stage.image_size={stage.image_size} must be a whole multiple (at least 2) of "
            f"stage.low_res_size={stage.low_res_size}"
        )
    if not 0.0 < stage.crop_fraction <= 1.0:
        raise ConfigError(f"stage.crop_fraction={stage.crop_fraction} must be in (0, 1]")
    if not 0.0 <= stage.edge_crop_fraction <= 1.0:
        raise ConfigError(f"stage.edge_crop_fraction={stage.edge_crop_fraction} must be in [0, 1]")
    image_diffusion_settings(stage)
    if stage.degradation not in DEGRADATIONS:
        raise ConfigError(f"stage.degradation={stage.degradation!r} must be one of {DEGRADATIONS}")
    if not 0.0 <= stage.degradation_probability <= 1.0:
        raise ConfigError(f"stage.degradation_probability={stage.degradation_probability} must be in [0, 1]")
    low, high = (float(v) for v in stage.blur_sigma) if len(stage.blur_sigma) == 2 else (-1.0, -1.0)
    if not 0.0 <= low <= high:
        raise ConfigError(
            f"stage.blur_sigma={list(stage.blur_sigma)} must be [low, high] with 0 <= low <= high"
        )
    if not 0.0 <= stage.noise_aug_max < 1.0:
        raise ConfigError(f"stage.noise_aug_max={stage.noise_aug_max} must be in [0, 1)")
    if stage.sampling.aug_level and not stage.noise_aug_max:
        raise ConfigError(
            f"stage.sampling.aug_level={stage.sampling.aug_level} needs a noise-augmented model "
            "(stage.noise_aug_max > 0)"
        )
    if stage.eval_images < 1 or stage.eval_batch_size < 1:
        raise ConfigError(
            f"stage.eval_images={stage.eval_images} and "
            f"stage.eval_batch_size={stage.eval_batch_size} must be >= 1"
        )
    multiple = _config(stage).unet.size_multiple
    if stage.image_size % multiple:
        raise ConfigError(
            f"stage.image_size={stage.image_size} must be a multiple of {multiple} (the U-Net's)"
        )
    sampling = check_sampling(OmegaConf.to_container(stage.sampling), stage.num_timesteps)
    if sampling["tile_size"] and (sampling["tile_size"] % multiple or sampling["tile_overlap"] % multiple):
        raise ConfigError(
            f"stage.sampling.tile_size={sampling['tile_size']} and tile_overlap={sampling['tile_overlap']} "
            f"must be multiples of {multiple} (the U-Net's size multiple)"
        )


def random_crops(
    images: torch.Tensor,
    size: int,
    grid: int,
    generator: torch.Generator | None = None,
    edge_fraction: float = 0.0,
) -> torch.Tensor:
    """One random ``size`` x ``size`` crop of each (B, C, H, W) image (uint8, or float in [-1, 1]), at
    offsets that are multiples of ``grid`` (so the crop's box-downsample is exactly a crop of the image's).

    An ``edge_fraction`` share of the images (drawn at random) is cropped around a random pixel with detail
    (:func:`detail_map`, more than one grey level of spread, found on the ``grid`` x ``grid`` block means)
    instead: on images of flat regions, such as ``shapes`` at 1024 px, most uniform crops hold no edge and
    teach nothing beyond "keep the bicubic base" (Real-ESRGAN's data preparation drops such low-information
    patches for the same reason). Images without detail keep their uniform crop."""
    b, _, h, w = images.shape
    rows = torch.randint(0, (h - size) // grid + 1, (b,), generator=generator) * grid
    cols = torch.randint(0, (w - size) // grid + 1, (b,), generator=generator) * grid
    if edge_fraction > 0:  # no extra draw otherwise, so uniform crops stay as they were
        chosen = (torch.rand(b, generator=generator) < edge_fraction).nonzero().flatten().tolist()
        one_level = 1.0 if images.dtype == torch.uint8 else 2 / 255
        details = detail_map(F.avg_pool2d(images[chosen].float(), grid), one_level) if chosen else []
        for i, detail in zip(chosen, details):
            pixels = detail.nonzero()
            if len(pixels):
                pick = pixels[torch.randint(0, len(pixels), (1,), generator=generator)[0]]
                row, col = (pick * grid).tolist()
                rows[i] = min(max(row - size // 2, 0), h - size) // grid * grid
                cols[i] = min(max(col - size // 2, 0), w - size) // grid * grid
    return torch.stack([image[:, r : r + size, c : c + size] for image, r, c in zip(images, rows, cols)])


class UpsamplerStage(Stage):
    """Train a diffusion upsampler (``stage=sr256`` or ``stage=sr1024``) on crops of the configured data."""

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__(cfg)
        _check(cfg.stage)
        self.name = str(cfg.stage.name)
        self.crop = crop_size(cfg.stage)

    def prepare_data(self) -> None:
        data, stage = self.cfg.data, self.cfg.stage
        names = split_names(data)
        cached = names[1:] if self.streams_training_data() else names  # streamed: train is never cached
        self.images = {name: load_split(data, name, int(stage.image_size)) for name in cached}
        self.low_res = {name: load_split(data, name, int(stage.low_res_size)) for name in names[1:]}

    def build_model(self) -> torch.nn.Module:
        stage = self.cfg.stage
        return DiffusionUpsampler(
            _config(stage),
            _scale(stage),
            image_diffusion_settings(stage),
            OmegaConf.to_container(stage.sampling),
        )

    def train_dataset(self) -> Dataset:
        return Pictures(self.images["train"], self.cfg.data.decoded_cache_mb)

    def streams_training_data(self) -> bool:
        return is_streaming(self.cfg.data)

    def train_stream(self, **stream: int) -> Iterator[tuple[torch.Tensor, int]]:
        for record in open_stream(self.cfg.data, "train", int(self.cfg.stage.image_size), **stream):
            pixels = rgb_pixels(record["image"]).copy()
            yield torch.from_numpy(pixels), record["skipped"]

    def skipped_samples(self) -> int:
        if "train" not in self.images:
            return 0
        return skipped_samples(self.cfg.data, "train", int(self.cfg.stage.image_size))

    def loss(self, model: torch.nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        stage = self.cfg.stage
        scale = _scale(stage)
        crops = random_crops(
            batch.permute(0, 3, 1, 2), self.crop, scale, edge_fraction=stage.edge_crop_fraction
        )
        images = model_range(crops)
        condition = degrade(
            box_downsample(images, scale),
            stage.degradation,
            blur_sigma=tuple(stage.blur_sigma),
            probability=stage.degradation_probability,
        )
        terms = model(images, condition, aug_max=float(stage.noise_aug_max))
        return terms["loss"].mean(), {"mse": terms["mse"].mean().detach()}

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        stage = self.cfg.stage
        metrics: dict[str, float] = {}
        for split in split_names(self.cfg.data)[1:]:
            count = min(stage.eval_images, len(self.low_res[split]))
            lows = [rgb_pixels(self.low_res[split][i]["image"]) for i in range(count)]
            highs = [rgb_pixels(self.images[split][i]["image"]) for i in range(count)]
            found = evaluate_upsampler(
                model,
                lows,
                highs,
                batch_size=int(stage.eval_batch_size),
                generator=torch.Generator().manual_seed(int(self.cfg.seed)),
            )
            metrics.update({f"{split}/{key}": value for key, value in found.items()})
        return metrics

    def export(self, model: torch.nn.Module, folder: Path) -> None:
        model.save(folder)

    def load_export(self, folder: Path) -> torch.nn.Module:
        model = DiffusionUpsampler.load(folder)
        if model.scale != _scale(self.cfg.stage):
            raise ConfigError(
                f"{folder} upsamples {model.scale}x, but stage {self.name} is {_scale(self.cfg.stage)}x"
            )
        model.sampling = check_sampling(
            OmegaConf.to_container(self.cfg.stage.sampling), model.diffusion.num_timesteps
        )
        return model
