"""Config composition and validation, and the console script's behaviour on good and bad overrides."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from tests.conftest import FAST_CLIP, REPO
from unclip.config.schema import validate
from unclip.errors import ConfigError

TRAIN = [sys.executable, "-m", "unclip.cli.train"]


def _run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        args,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO), **env},
    )


def test_default_config_composes_and_validates(compose_cfg):
    cfg = compose_cfg([])
    validate(cfg)
    assert cfg.stage.name == "clip"
    assert cfg.stage.model.arch.conv_tower.image_size == 64
    assert cfg.data.source == "shapes"


def test_clip_architecture_group_selects_builtin(compose_cfg):
    cfg = compose_cfg(["clip_model@stage.model=vit_b_32", "stage.model.pretrained=openai"])
    assert cfg.stage.model.name == "ViT-B-32" and cfg.stage.model.arch is None
    assert cfg.stage.model.pretrained == "openai"


@pytest.mark.parametrize(
    "override, key",
    [
        ("bogus_key=1", "bogus_key"),
        ("seed=notanint", "seed"),
        ("stage.bogus=1", "bogus"),
        ("trainer.max_steps=abc", "max_steps"),
    ],
)
def test_typos_and_wrong_types_are_rejected_naming_the_key(compose_cfg, override, key):
    with pytest.raises(ConfigCompositionException) as err:
        compose_cfg([override])
    assert key in str(err.value) + str(err.value.__cause__)


@pytest.mark.parametrize(
    "override, key",
    [
        ("trainer.precision=fp8", "trainer.precision"),
        ("optim.schedule=linear", "optim.schedule"),
        ("trainer.grad_accum=3", "trainer.grad_accum"),
        ("logger.kind=tensorboard", "logger.kind"),
        ("data.decoded_cache_mb=-1", "data.decoded_cache_mb"),
    ],
)
def test_inconsistent_values_fail_validation(compose_cfg, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(compose_cfg([override]))


def test_cli_prints_job_config_from_another_directory(tmp_path):
    result = _run([*TRAIN, "stage=clip", "--cfg", "job"], tmp_path)
    assert result.returncode == 0, result.stderr
    cfg = OmegaConf.create(result.stdout)
    assert cfg.stage.name == "clip" and cfg.trainer.max_steps > 0


@pytest.mark.parametrize("override, key", [("bogus_key=1", "bogus_key"), ("seed=notanint", "seed")])
def test_cli_refuses_bad_overrides(tmp_path, override, key):
    result = _run([*TRAIN, override], tmp_path)
    assert result.returncode != 0
    assert key in result.stderr and "Traceback" not in result.stderr


def test_cli_reports_user_errors_in_one_line(tmp_path):
    result = _run([*TRAIN, "trainer.precision=fp8", "logger.kind=none"], tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: trainer.precision='fp8'")
    assert "Traceback" not in result.stderr


def test_auto_precision_is_decided_before_training_and_said(tmp_path):
    result = _run(
        [*TRAIN, *FAST_CLIP, "trainer.max_steps=1", "trainer.precision=auto", f"hydra.run.dir={tmp_path}"],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    said = [line for line in result.stdout.splitlines() if "trainer.precision=auto chose" in line]
    assert len(said) == 1 and "GFLOP/s" in said[0], result.stdout


def test_slurm_launcher_config_composes(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="the slurm extra is not installed")
    result = _run([*TRAIN, "hydra/launcher=slurm", "--cfg", "hydra"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "submitit" in result.stdout and "timeout_min: 1440" in result.stdout


@pytest.mark.slow
def test_multirun_sweep_gives_each_job_its_own_folder(tmp_path):
    result = _run(
        [
            *TRAIN,
            "-m",
            *FAST_CLIP,
            "trainer.max_steps=2",
            "optim.lr=1e-3,3e-4",
            f"hydra.sweep.dir={tmp_path}/sweep",
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    jobs = sorted(p for p in (tmp_path / "sweep").iterdir() if p.is_dir() and not p.name.startswith("."))
    assert len(jobs) == 2
    for job in jobs:
        assert (job / "export" / "model.safetensors").is_file()
        assert (job / "metrics.jsonl").is_file()
    assert {OmegaConf.load(j / ".hydra" / "config.yaml").optim.lr for j in jobs} == {1e-3, 3e-4}
