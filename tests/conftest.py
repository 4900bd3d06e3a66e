"""Shared fixtures: a per-session data cache, Hydra composition, and a CLIP small enough for fast tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra

from unclip.config.schema import register_configs

REPO = Path(__file__).resolve().parents[1]
# A very small CLIP and dataset so trainer tests run in seconds on 2 cores.
FAST_CLIP = [
    "stage.model.arch.embed_dim=32",
    "stage.model.arch.conv_tower.image_size=32",
    "stage.model.arch.conv_tower.channels=[8,16,16]",
    "stage.model.arch.conv_tower.strides=[2,2,1]",
    "stage.model.arch.text_cfg.width=32",
    "stage.model.arch.text_cfg.layers=1",
    "stage.model.arch.text_cfg.context_length=24",
    "stage.eval_images=32",
]
# Small data and a quiet, short run: shared by every stage's trainer tests.
FAST_RUN = [
    "data.train_size=128",
    "data.eval_size=32",
    "logger.kind=none",
    "trainer.progress=false",
    "trainer.batch_size=16",
    "optim.warmup_steps=2",
]
FAST_CLIP = [*FAST_CLIP, *FAST_RUN]


@pytest.fixture(scope="session", autouse=True)
def data_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every test shares one cache folder, so each shapes split is rendered once per session."""
    folder = tmp_path_factory.mktemp("unclip-cache")
    os.environ["UNCLIP_CACHE"] = str(folder)
    os.environ.setdefault("WANDB_MODE", "offline")
    torch.set_num_threads(min(2, torch.get_num_threads()))  # CI machines have 2 cores
    return folder


@pytest.fixture
def compose_cfg():
    """Compose the packaged ``train`` config with overrides, as ``unclip-train`` would."""
    register_configs()

    def _compose(overrides: list[str], config_name: str = "train"):
        GlobalHydra.instance().clear()
        with initialize_config_module(config_module="unclip.conf", version_base="1.3"):
            return compose(config_name=config_name, overrides=overrides)

    yield _compose
    GlobalHydra.instance().clear()
