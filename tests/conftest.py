"""Shared fixtures: a per-session data cache, Hydra composition, and a CLIP small enough for fast tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra

from unclip.clip.model import ClipEncoder
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


# A tiny random ViT CLIP for the stages that consume a frozen CLIP component folder.
TINY_ARCH = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def compose_train(overrides: list[str], config_name: str = "train"):
    """Compose the packaged config with overrides, as ``unclip-train`` would."""
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="unclip.conf", version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides)


def run_sample_cli(args: list[str], cwd) -> subprocess.CompletedProcess:
    """Run ``unclip-sample`` (as a module, from this checkout) in ``cwd``."""
    return subprocess.run(
        [sys.executable, "-m", "unclip.cli.sample", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def run_cli_in_process(main, argv: list[str], cwd: Path, monkeypatch, capsys) -> tuple[int, str]:
    """Run a console script's ``main`` in this process with ``argv`` (its name first) from ``cwd``: what
    its subprocess tests check (exit status, stderr) without a new Python and torch import per case.
    Returns (exit status, stderr)."""
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", argv)
    GlobalHydra.instance().clear()
    capsys.readouterr()
    try:
        main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        GlobalHydra.instance().clear()
    return code, capsys.readouterr().err


def _save_tiny_clip(folder: Path, seed: int) -> str:
    torch.manual_seed(seed)
    ClipEncoder("tiny-test", None, TINY_ARCH).save(folder)
    return str(folder)


@pytest.fixture(scope="module")
def clip_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """Two tiny random CLIP component folders with different weights (so different fingerprints)."""
    root = tmp_path_factory.mktemp("clips")
    return _save_tiny_clip(root / "a", 0), _save_tiny_clip(root / "b", 1)


@pytest.fixture(scope="session", autouse=True)
def data_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every test shares one cache folder, so each shapes split is rendered once per session."""
    folder = tmp_path_factory.mktemp("unclip-cache")
    os.environ["UNCLIP_CACHE"] = str(folder)
    os.environ.setdefault("WANDB_MODE", "offline")
    if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n N: one thread per worker, its subprocesses too
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)
    else:
        torch.set_num_threads(min(2, torch.get_num_threads()))  # CI machines have 2 cores
    return folder


@pytest.fixture
def compose_cfg():
    """Compose the packaged ``train`` config with overrides, as ``unclip-train`` would."""
    yield compose_train
    GlobalHydra.instance().clear()
