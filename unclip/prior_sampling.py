"""The trained diffusion prior as a component: text encodings in, CLIP image embeddings out (unCLIP §2.2).

:class:`DiffusionPrior` wraps the network of :mod:`unclip.models.prior` with what it needs around it:

- the normalisation of CLIP image embeddings into the space the diffusion runs in
  (:class:`EmbeddingNormalizer`), whose statistics are buffers saved with the weights;
- the Gaussian diffusion with x0 prediction (§2.2: "we find it better to train our model to predict the
  unnoised z_i directly") and its training loss, with the caption dropped for classifier-free guidance;
- the sampler settings it was exported with, and :func:`sample_prior`: guided sampling (one batched forward
  per step) plus the paper's best-of-n trick (§2.2: draw two z_i and keep the one with the higher dot
  product with z_t);
- its pipeline folder (``config.yaml`` + ``model.safetensors``), loaded strictly and only against the CLIP it
  was trained with.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unclip.diffusion import (
    GaussianDiffusion,
    check_sampler_settings,
    classifier_free_guidance,
    make_schedule,
    sample,
)
from unclip.errors import CheckpointError, ConfigError
from unclip.io import load_state_strict, read_component_config, save_tensors, write_yaml
from unclip.models.prior import PriorCondition, PriorConfig, PriorTransformer, concat_conditions

if TYPE_CHECKING:  # only a type here: sampling needs no open_clip (the GPU benchmark runs without it)
    from unclip.clip.model import TextEncoding

COMPONENT_KIND = "prior"
NORMALIZATIONS = ("zscore", "unit_scale")


class EmbeddingNormalizer(nn.Module):
    """Maps CLIP image embeddings z (B, D) to the prior's diffusion space and back.

    - ``zscore``: x = (z - mu) / sigma per dimension, with mu and sigma measured on the training embeddings
      (as kakaobrain/karlo does). While sampling, the predicted x0 is clamped per dimension to the range the
      training embeddings span, the analogue of clipping images to [-1, 1] (Ho et al. 2020, §3.3).
    - ``unit_scale``: x = sqrt(D) z / |z|, so each coordinate has unit RMS like the noise. The predicted x0 is
      projected back onto that sphere; going back to CLIP space rescales to the mean training norm |z|.
    """

    def __init__(self, mode: str, dim: int) -> None:
        super().__init__()
        if mode not in NORMALIZATIONS:
            raise ConfigError(f"prior normalize={mode!r} must be one of {NORMALIZATIONS}")
        self.mode = mode
        self.dim = dim
        if mode == "zscore":
            for name, value in (("mean", 0.0), ("std", 1.0), ("low", -math.inf), ("high", math.inf)):
                self.register_buffer(name, torch.full((dim,), value))
        else:
            self.register_buffer("norm", torch.ones(()))

    @classmethod
    def fit(cls, mode: str, chunks: Iterable[Tensor]) -> EmbeddingNormalizer:
        """Measure the statistics on training embeddings given as (b, D) chunks (one pass, float64 sums)."""
        count, total, squares, norms, lowest, highest = 0, None, None, 0.0, None, None
        for chunk in chunks:
            z = chunk.double()
            if total is None:
                total, squares = z.sum(0), (z * z).sum(0)
                lowest, highest = z.min(0).values, z.max(0).values
            else:
                total, squares = total + z.sum(0), squares + (z * z).sum(0)
                lowest = torch.minimum(lowest, z.min(0).values)
                highest = torch.maximum(highest, z.max(0).values)
            norms += float(z.norm(dim=-1).sum())
            count += len(z)
        if count < 2:
            raise ConfigError(f"normalisation statistics need at least 2 training embeddings, got {count}")
        normalizer = cls(mode, len(total))
        with torch.no_grad():
            if mode == "zscore":
                mean = total / count
                std = ((squares - count * mean * mean) / (count - 1)).clamp_min(0).sqrt().clamp_min(1e-6)
                for name, value in (
                    ("mean", mean),
                    ("std", std),
                    ("low", (lowest - mean) / std),
                    ("high", (highest - mean) / std),
                ):
                    getattr(normalizer, name).copy_(value)
            else:
                normalizer.norm.fill_(norms / count)
        return normalizer

    def forward(self, z: Tensor) -> Tensor:
        """CLIP space -> diffusion space."""
        if self.mode == "zscore":
            return (z - self.mean) / self.std
        return F.normalize(z, dim=-1) * math.sqrt(self.dim)

    def inverse(self, x: Tensor) -> Tensor:
        """Diffusion space -> CLIP space (unnormalised, like ``ClipEncoder.encode_image``)."""
        if self.mode == "zscore":
            return x * self.std + self.mean
        return x * (self.norm / math.sqrt(self.dim))

    def clamp_x0(self, x0: Tensor) -> Tensor:
        """The sampler's ``x0_fn``: keep a predicted x0 inside the set the training embeddings occupy."""
        if self.mode == "zscore":
            return torch.maximum(torch.minimum(x0, self.high), self.low)
        return F.normalize(x0, dim=-1) * math.sqrt(self.dim)


def check_sampling(options: Mapping[str, Any], num_timesteps: int) -> dict[str, Any]:
    """Validate prior sampler settings, best-of-n ``candidates`` included; return them as a plain dict."""
    options = check_sampler_settings(dict(options), "prior", num_timesteps, extra_keys=("candidates",))
    if not (isinstance(options["candidates"], int) and options["candidates"] >= 1):
        raise ConfigError(f"sampling.candidates={options['candidates']!r} must be a positive integer")
    return options


class DiffusionPrior(nn.Module):
    """unCLIP's diffusion prior (§2.2): p(z_i | y) as a Gaussian diffusion over normalised z_i, predicting x0.

    ``sampling`` holds the default settings of :func:`sample_prior` (sampler, steps, eta, guidance_scale,
    candidates); they are exported with the weights.
    """

    def __init__(
        self,
        config: PriorConfig,
        normalizer: EmbeddingNormalizer,
        schedule: str,
        sampling: Mapping[str, Any],
    ) -> None:
        super().__init__()
        if normalizer.dim != config.clip_embed_dim:
            raise ConfigError(
                f"normaliser dim {normalizer.dim} != prior clip_embed_dim {config.clip_embed_dim}"
            )
        self.config = config
        self.net = PriorTransformer(config)
        self.normalizer = normalizer
        self.schedule = schedule
        self.diffusion = GaussianDiffusion(make_schedule(schedule, config.num_timesteps), prediction="x0")
        self.sampling = check_sampling(sampling, config.num_timesteps)

    def forward(
        self,
        image_embedding: Tensor,
        text_tokens: Tensor,
        token_mask: Tensor,
        text_embedding: Tensor,
        caption_drop: float = 0.0,
    ) -> dict[str, Tensor]:
        """Per-sample training losses (``loss``, ``mse``): the x0-prediction MSE of §2.2 at uniform timesteps.

        Each sample's caption (tokens and pooled text embedding) is replaced by the null condition with
        probability ``caption_drop`` (§2.2, for classifier-free guidance); the noised input is never dropped.
        Everything runs inside ``forward`` so that DDP sees every parameter used.
        """
        x0 = self.normalizer(image_embedding.float())
        batch = len(x0)
        t = self.diffusion.sample_timesteps(batch, device=x0.device)
        # Drawn on the host: splitting the batch by it then needs no device sync.
        drop = torch.rand(batch) < caption_drop
        # A dropped caption is the null condition, whose prefix is one token: the dropped samples run as
        # their own group instead of carrying caption tokens that nothing attends to. Both groups run even
        # when empty, so that every parameter takes part in every step (DDP expects it).
        keep, dropped = (~drop).nonzero().squeeze(1), drop.nonzero().squeeze(1)
        caption = (text_tokens[keep].float(), token_mask[keep], text_embedding[keep].float())
        groups = [
            (keep, self.net.encode_condition(*caption)),
            (dropped, self.net.null_condition(len(dropped))),
        ]
        order = torch.cat([rows for rows, _ in groups]).argsort()

        def model_fn(x_t: Tensor, t_: Tensor) -> Tensor:
            return torch.cat([self.net(x_t[rows], t_[rows], cond) for rows, cond in groups])[order]

        return self.diffusion.training_losses(model_fn, x0, t)

    def save(self, folder: str | Path, clip_fingerprint: str) -> None:
        """Write the component folder: ``config.yaml`` (kind, model, normalisation, schedule, CLIP
        fingerprint, sampling defaults) and ``model.safetensors`` (weights and normalisation statistics)."""
        folder = Path(folder)
        save_tensors(folder / "model.safetensors", self.state_dict(), {"clip_fingerprint": clip_fingerprint})
        write_yaml(
            folder / "config.yaml",
            {
                "kind": COMPONENT_KIND,
                "clip_fingerprint": clip_fingerprint,
                "model": asdict(self.config),
                "normalize": self.normalizer.mode,
                "schedule": self.schedule,
                "sampling": self.sampling,
            },
        )

    @classmethod
    def load(cls, folder: str | Path, clip_fingerprint: str) -> DiffusionPrior:
        """Load a folder written by :meth:`save`, refusing one of another kind or trained against another CLIP
        (its embeddings live in a different space)."""
        path, config = read_component_config(folder, COMPONENT_KIND, "diffusion prior", clip_fingerprint)
        try:
            prior_config = PriorConfig(**config["model"])
            normalizer = EmbeddingNormalizer(config["normalize"], prior_config.clip_embed_dim)
            prior = cls(prior_config, normalizer, config["schedule"], config["sampling"])
        except (KeyError, TypeError, ConfigError) as err:
            raise CheckpointError(f"{path} is not a valid prior config: {err}") from err
        load_state_strict(prior, Path(folder) / "model.safetensors")
        return prior.eval()


def best_of_n(candidates: Tensor, text_embedding: Tensor) -> Tensor:
    """From candidates (B, n, D) keep, per caption, the one with the highest dot product with its text
    embedding (B, D), both unit-normalised as CLIP compares them (§2.2)."""
    scores = torch.einsum(
        "bnd,bd->bn", F.normalize(candidates.float(), dim=-1), F.normalize(text_embedding.float(), dim=-1)
    )
    index = scores.argmax(dim=1)
    return candidates[torch.arange(len(candidates), device=candidates.device), index]


@torch.no_grad()
def sample_prior(
    prior: DiffusionPrior,
    text: TextEncoding,
    *,
    negative: TextEncoding | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
    **overrides: Any,
) -> Tensor:
    """Sample CLIP image embeddings (B, D), in CLIP's own unnormalised space, for captions encoded by CLIP.

    ``overrides`` replace the prior's exported sampling settings (sampler, steps, eta, guidance_scale,
    candidates). Guidance runs the conditional and unconditional halves as one batch (Ho & Salimans 2022);
    with ``negative`` captions (B of them) the unconditional half is conditioned on those instead of the
    null caption, so guidance moves away from them. ``candidates`` samples are drawn per caption and the
    best by :func:`best_of_n` is kept.
    """
    options = check_sampling({**prior.sampling, **overrides}, prior.config.num_timesteps)
    device = prior.net.query.device
    n, batch = options["candidates"], len(text.pooled)
    net = prior.net

    def encode(caption: TextEncoding) -> PriorCondition:
        return net.encode_condition(
            caption.tokens.to(device, torch.float32).repeat_interleave(n, 0),
            caption.mask.to(device).repeat_interleave(n, 0),
            caption.pooled.to(device, torch.float32).repeat_interleave(n, 0),
        )

    cond = encode(text)
    scale = float(options["guidance_scale"])
    if scale == 1.0:
        cond = net.cache_prefix(cond)  # the caption's keys and values, once for every step
        model_fn = lambda x, t: net(x, t, cond)  # noqa: E731
    else:
        if negative is not None and len(negative.pooled) != batch:
            raise ConfigError(f"{len(negative.pooled)} negative captions for {batch} captions")
        uncond = net.null_condition(batch * n) if negative is None else encode(negative)
        doubled = net.cache_prefix(concat_conditions(cond, uncond))
        model_fn = classifier_free_guidance(lambda x, t: net(x, t, doubled), scale)
    x = sample(
        prior.diffusion,
        model_fn,
        (batch * n, prior.config.clip_embed_dim),
        sampler=options["sampler"],
        steps=options["steps"],
        eta=options["eta"],
        generator=generator,
        x0_fn=prior.normalizer.clamp_x0,
        progress=progress,
        device=device,
    )
    z = prior.normalizer.inverse(x).view(batch, n, -1)
    return best_of_n(z, text.pooled.to(device))
