"""The contract between the one trainer and each stage (DESIGN §1).

A stage says how to build its model, turn a batch into a loss, evaluate and export; it never runs a loop.
The trainer (:mod:`unclip.train.trainer`) calls, in order: ``prepare_data`` (main process first, so caches are
built once), ``build_model``, ``train_dataset``, ``setup`` (after Accelerate has wrapped the model), then
``loss`` every micro-batch, ``after_optimizer_step`` after every optimizer step, and ``evaluate`` / ``export``
on an EMA copy of the model. ``unclip-eval`` calls ``prepare_data``, ``load_export``, ``setup`` and
``evaluate``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch.utils.data import Dataset, default_collate

from unclip.diffusion import make_schedule
from unclip.diffusion.gaussian import DIFFUSION_KEYS, LOSS_WEIGHTINGS, PREDICTIONS, VARIANCES
from unclip.diffusion.schedule import SCHEDULES
from unclip.errors import ConfigError


class Stage(ABC):
    """Base class of the stage plug-ins; subclasses override what they need."""

    name: str = ""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.accelerator: Any = None

    def prepare_data(self) -> None:
        """Build or load on-disk caches (renders, embeddings). Runs on the main process before the others."""

    @abstractmethod
    def build_model(self) -> torch.nn.Module:
        """A freshly initialised trainable model (built under the run's seed on every process)."""

    @abstractmethod
    def train_dataset(self) -> Dataset:
        """Map-style dataset of training examples, indexed deterministically."""

    def streams_training_data(self) -> bool:
        """Whether training reads :meth:`train_stream` (streamed data) instead of :meth:`train_dataset`."""
        return False

    def train_stream(self, **stream: int) -> Iterator[tuple[Any, int]]:
        """One stream of a streaming source (:mod:`unclip.data.streaming`), given as ``seed``, ``epoch``,
        ``stream_index`` and ``num_streams`` (what :func:`unclip.data.sources.open_stream` and
        :meth:`unclip.embed.EmbeddedParts.stream_rows` take): ``(example, skipped)`` pairs, each example what
        :meth:`collate` takes a list of, ``skipped`` the corrupt samples dropped before it."""
        raise ConfigError(f"the {self.name} stage cannot train on streamed data")

    def skipped_samples(self) -> int:
        """Corrupt samples dropped while building the cached training split (shown while training)."""
        return 0

    def collate(self, items: Any) -> Any:
        """Batch a list of examples with torch's default stacking. Anything else is already a batch: what a
        dataset's ``__getitems__`` returns when it reads a whole batch at once."""
        return default_collate(items) if isinstance(items, list) else items

    def setup(self, accelerator: Any) -> None:
        """Receive the Accelerator once the model is wrapped (process count, device, ...)."""
        self.accelerator = accelerator

    @abstractmethod
    def loss(self, model: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Scalar loss of one micro-batch, and detached extra values to log."""

    def after_optimizer_step(self, model: torch.nn.Module) -> None:
        """Called with the unwrapped model after each optimizer step (e.g. clamping a parameter)."""

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """The stage's own evaluation on held-out data, on the main process; returns named metrics."""
        return {}

    @abstractmethod
    def export(self, model: torch.nn.Module, folder: Path) -> None:
        """Write the component folder (``config.yaml`` + ``model.safetensors``) that a pipeline loads."""

    def load_export(self, folder: Path) -> torch.nn.Module:
        """The model :meth:`export` wrote to ``folder``, as :meth:`evaluate` takes it, with the sampling
        settings of the current config."""
        raise ConfigError(f"the {self.name} stage cannot load its export for evaluation")


def image_diffusion_settings(stage: DictConfig) -> dict[str, Any]:
    """The diffusion settings of an image stage (decoder, upsamplers): ``stage``'s values of
    :data:`unclip.diffusion.gaussian.DIFFUSION_KEYS`, checked before any data or model is built. Errors name
    the key (``stage.prediction=...``)."""
    for key, options in (
        ("schedule", SCHEDULES),
        ("prediction", PREDICTIONS),
        ("variance", VARIANCES),
        ("loss_weighting", LOSS_WEIGHTINGS),
    ):
        if stage[key] not in options:
            raise ConfigError(f"stage.{key}={stage[key]!r} must be one of {options}")
    if not stage.schedule_shift > 0 or stage.num_timesteps < 2:
        raise ConfigError(
            f"stage.schedule_shift={stage.schedule_shift} must be positive and "
            f"stage.num_timesteps={stage.num_timesteps} at least 2"
        )
    make_schedule(stage.schedule, stage.num_timesteps, stage.schedule_shift)
    return {key: stage[key] for key in DIFFUSION_KEYS}
