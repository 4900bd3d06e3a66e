"""How well does a whole pipeline draw what a caption asks for? The unCLIP cascade (Ramesh et al. 2022 §2:
text -> prior -> decoder, 64 px) judged on the ``shapes`` eval captions, whose truth is known.

For each eval split (``eval_seen``: (colour, shape) pairs drawn in training; ``eval_holdout``: pairs held out
of it) one image is sampled for each of the first ``captions`` captions, and:

- ``accuracy`` / ``counts``: the pixel reader (:mod:`unclip.eval.shapes_reader`) against the caption's truth,
  each attribute over the captions that name it only -- colour and shape over all, size, position and
  background over the rows whose ``names_*`` flag is set -- with the number of captions counted;
- ``clip_score``: mean cosine between the pipeline CLIP's embedding of each image and of its caption
  (CLIPScore, Hessel et al. 2021, reported as the raw mean cosine: no 2.5 weight, no clipping at 0);
  ``clip_score_real``: the same for the true renders of those rows, what a perfect generator reaches;
- ``frechet_distance``: the Fréchet distance (the FID formula of Heusel et al. 2017, with unit-normalised CLIP
  image embeddings in place of Inception features) between the generated images and the true renders of the
  same rows; ``frechet_distance_floor``: the same between two disjoint sets of true renders -- sampling noise
  alone, the best a generator can score. They are rows [0, n) and [n, 2n) of the split, ``n = captions``,
  when the split holds 2n rows; otherwise its two halves, and then ``floor_rows`` (the rows in each set) is
  below ``captions`` and the floor is an overestimate (the distance's bias grows as the sets shrink).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from unclip.data.sources import load_split, split_names
from unclip.decoder_sampling import check_sampling as check_decoder_sampling
from unclip.errors import CheckpointError, ConfigError, DataError
from unclip.eval.shapes_reader import ATTRIBUTES, attribute_accuracy
from unclip.images import save_grid, to_uint8
from unclip.io import write_text
from unclip.pipeline import UnCLIPPipeline
from unclip.precision import PRECISION_CHOICES, resolve_precision, sampling_precision
from unclip.prior_sampling import check_sampling as check_prior_sampling
from unclip.stages.clip import image_to_tensor


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to features ``a`` (N, D) and ``b`` (M, D), N, M >= 2
    (Heusel et al. 2017): ``||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))``.

    ``S_a S_b`` has the eigenvalues of the symmetric ``sqrt(S_a) S_b sqrt(S_a)``, so the trace of its square
    root is the sum of the square roots of that matrix's eigenvalues; computed in float64 with rounding's tiny
    negative eigenvalues clamped to 0, it stays real and stable for the singular covariances of N < D rows.
    """
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise DataError(
            f"Fréchet distance needs two (N >= 2, D) sets; got {tuple(a.shape)}, {tuple(b.shape)}"
        )
    a, b = a.double(), b.double()
    cov_a, cov_b = (torch.atleast_2d(torch.cov(x.T)) for x in (a, b))
    values, vectors = torch.linalg.eigh(cov_a)
    root_a = (vectors * values.clamp(min=0).sqrt()) @ vectors.T
    middle = root_a @ cov_b @ root_a
    cross = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    mean = (a.mean(0) - b.mean(0)).square().sum()
    return max(float(mean + cov_a.trace() + cov_b.trace() - 2 * cross), 0.0)


@torch.no_grad()
def _image_embeddings(pipeline: UnCLIPPipeline, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Unit-normalised CLIP image embeddings (N, D) of (N, 3, S, S) images in [0, 1]."""
    device = pipeline.clip.mean.device
    chunks = [images[i : i + batch_size].to(device) for i in range(0, len(images), batch_size)]
    return F.normalize(torch.cat([pipeline.clip.encode_image(c).float().cpu() for c in chunks]), dim=-1)


@torch.no_grad()
def _text_embeddings(pipeline: UnCLIPPipeline, captions: list[str], batch_size: int) -> torch.Tensor:
    """Unit-normalised pooled CLIP text embeddings (N, D) of the captions."""
    clip = pipeline.clip
    chunks = [captions[i : i + batch_size] for i in range(0, len(captions), batch_size)]
    pooled = [clip.encode_text(clip.tokenize(c)).pooled.float().cpu() for c in chunks]
    return F.normalize(torch.cat(pooled), dim=-1)


def _number(value: float) -> float | None:
    """A metric for JSON: NaN (no caption names the attribute) becomes null."""
    return None if math.isnan(value) else float(value)


def check_config(cfg: DictConfig) -> None:
    """Refuse settings the evaluation cannot honour, naming the key."""
    checks = [
        (cfg.captions >= 2, f"captions={cfg.captions} must be at least 2 (a Fréchet distance needs two)"),
        (
            cfg.captions <= cfg.data.eval_size,
            f"captions={cfg.captions} is more than an eval split holds (data.eval_size={cfg.data.eval_size})",
        ),
        (cfg.batch_size >= 1, f"batch_size={cfg.batch_size} must be at least 1"),
        (cfg.grid_images >= 0, f"grid_images={cfg.grid_images} must not be negative"),
        (
            cfg.precision in PRECISION_CHOICES,
            f"precision={cfg.precision!r} must be one of {list(PRECISION_CHOICES)}",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def _generate(
    pipeline: UnCLIPPipeline, captions: list[str], cfg: DictConfig, prior_options: dict, decoder_options: dict
) -> tuple[torch.Tensor, list[int]]:
    """One image per caption, ``batch_size`` captions at a time, batch ``b`` with seed ``cfg.seed + b``; the
    decoder's output (64 px for ``shapes``): the cascade stops before any upsampler stage."""
    images, seeds = [], []
    size = pipeline.decoder.image_size
    for b, start in enumerate(range(0, len(captions), cfg.batch_size)):
        prompts = captions[start : start + cfg.batch_size]
        with sampling_precision(cfg.device, cfg.precision):
            _, batch = pipeline.text_to_image(
                prompts, 1, cfg.seed + b, cfg.progress, prior_options, decoder_options, size=size
            )
        images.append(batch.float().cpu())
        seeds.append(cfg.seed + b)
    return torch.cat(images), seeds


def evaluate_split(
    pipeline: UnCLIPPipeline, cfg: DictConfig, split: str, prior_options: dict, decoder_options: dict
) -> tuple[dict[str, Any], torch.Tensor]:
    """The metrics of one eval split (see the module docstring), and its first ``grid_images`` images."""
    n, size = int(cfg.captions), pipeline.decoder.image_size
    rows = load_split(cfg.data, split, size)
    floor_rows = n if len(rows) >= 2 * n else len(rows) // 2
    wanted = ["caption", *ATTRIBUTES, "names_size", "names_position", "names_background"]
    records = list(rows.select(range(n)).select_columns(wanted))
    captions = [r["caption"] for r in records]
    start = time.perf_counter()
    generated, seeds = _generate(pipeline, captions, cfg, prior_options, decoder_options)
    sampling_seconds = time.perf_counter() - start
    pictures = rows.select(range(max(n, 2 * floor_rows)))["image"]
    real = torch.stack([image_to_tensor(p) for p in pictures]).float() / 255
    fake_z, real_z = (_image_embeddings(pipeline, x, cfg.batch_size) for x in (generated, real))
    text_z = _text_embeddings(pipeline, captions, cfg.batch_size)
    accuracy = attribute_accuracy(list(to_uint8(generated)), records, ATTRIBUTES)
    floor = None
    if floor_rows >= 2:
        floor = frechet_distance(real_z[:floor_rows], real_z[floor_rows : 2 * floor_rows])
    metrics = {
        "seeds": seeds,
        "sampling_seconds": sampling_seconds,  # text -> prior -> decoder for the split's captions
        "accuracy": {a: _number(accuracy[a]) for a in ATTRIBUTES},
        "counts": {a: int(accuracy[f"{a}_count"]) for a in ATTRIBUTES},
        "clip_score": float((fake_z * text_z).sum(-1).mean()),
        "clip_score_real": float((real_z[:n] * text_z).sum(-1).mean()),
        "frechet_distance": frechet_distance(fake_z, real_z[:n]),
        "frechet_distance_floor": floor,
        "floor_rows": floor_rows,
        "grid_captions": captions[: cfg.grid_images],
    }
    return metrics, generated[: cfg.grid_images]


def evaluate_pipeline(
    cfg: DictConfig, prior_options: dict[str, Any], decoder_options: dict[str, Any]
) -> tuple[dict[str, Any], list[torch.Tensor]]:
    """Evaluate ``cfg.pipeline`` (a ``PipelineEvalConfig``) with the given sampling overrides; return the
    report (settings and each split's metrics) and each split's grid images."""
    check_config(cfg)
    pipeline = UnCLIPPipeline.load(cfg.pipeline, device=cfg.device)
    for stage in ("prior", "decoder"):
        if getattr(pipeline, stage) is None:
            raise CheckpointError(f"{cfg.pipeline} has no {stage} stage: the pipeline evaluation needs one")
    prior = check_prior_sampling(
        {**pipeline.prior.sampling, **prior_options}, pipeline.prior.config.num_timesteps
    )
    decoder = check_decoder_sampling(
        {**pipeline.decoder.sampling, **decoder_options}, pipeline.decoder.diffusion.num_timesteps
    )
    precision = resolve_precision(cfg.precision, cfg.device)  # measured once; _generate reuses it
    report: dict[str, Any] = {
        "pipeline": str(Path(str(cfg.pipeline)).resolve()),
        "captions": int(cfg.captions),
        "image_size": pipeline.decoder.image_size,
        "seed": int(cfg.seed),
        "batch_size": int(cfg.batch_size),
        "precision": precision.precision,
        "precision_reason": precision.reason,
        "prior": prior,
        "decoder": decoder,
        "splits": {},
    }
    grids = []
    for split in split_names(cfg.data):
        if split != "train":
            report["splits"][split], grid = evaluate_split(
                pipeline, cfg, split, prior_options, decoder_options
            )
            grids.append(grid)
    return report, grids


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def markdown(report: dict[str, Any], grid: str | None) -> str:
    """The report as Markdown: settings, then per split the attribute table, CLIP score, Fréchet distance
    and the captions of its grid row."""
    lines = [
        "# Pipeline evaluation",
        "",
        f"Pipeline `{report['pipeline']}`: {report['captions']} captions per split, "
        f"{report['image_size']} px, seed {report['seed']}, precision `{report['precision']}`.",
        f"Prior sampling `{json.dumps(report['prior'])}`;",
        f"decoder sampling `{json.dumps(report['decoder'])}`.",
    ]
    for row, (split, m) in enumerate(report["splits"].items(), start=1):
        lines += ["", f"## {split}", "", "| attribute | accuracy | captions naming it |", "|---|---|---|"]
        lines += [f"| {a} | {_fmt(m['accuracy'][a])} | {m['counts'][a]} |" for a in ATTRIBUTES]
        lines += [
            "",
            "| metric | generated | reference |",
            "|---|---|---|",
            f"| CLIP score (image-caption cosine) | {_fmt(m['clip_score'])} | "
            f"{_fmt(m['clip_score_real'])} (true renders) |",
            f"| Fréchet distance to true renders (CLIP space) | {_fmt(m['frechet_distance'])} | "
            f"{_fmt(m['frechet_distance_floor'])} (floor: true vs true, {m['floor_rows']} rows each) |",
            "",
            f"Sampling its {report['captions']} captions (prior and decoder): {m['sampling_seconds']:.1f} s.",
        ]
        if grid is not None:
            lines += ["", f"Row {row} of [{grid}]({grid}), left to right:", ""]
            lines += [f"{i}. {caption}" for i, caption in enumerate(m["grid_captions"], start=1)]
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], grids: Sequence[torch.Tensor], out: Path) -> None:
    """Write ``eval.json``, ``grid.png`` (one row per split; none when ``grid_images=0``) and ``report.md``
    into ``out``, each atomically."""
    write_text(out / "eval.json", json.dumps(report, indent=2) + "\n")
    grid = None
    if grids and len(grids[0]):
        grid = "grid.png"
        save_grid(torch.cat(list(grids)), out / grid, columns=len(grids[0]))
    write_text(out / "report.md", markdown(report, grid))
