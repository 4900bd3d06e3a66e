"""The real-scale recipe (recipes/laion/): every experiment, accelerate config and launcher composes."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO
from tests.test_config import TRAIN, _run
from unclip.cli.common import first_host, slurm_distributed_env
from unclip.config.schema import validate
from unclip.data.streaming import stream_layout
from unclip.stages import build_stage

REQUIRED = {
    "laion_clip": ["data.urls=['/data/laion/{00000..00511}.tar']"],
    "laion_prior": ["stage.clip=/models/clip", "stage.embeddings.path=/data/embeddings"],
    "laion_decoder": ["stage.clip=/models/clip", "stage.embeddings.path=/data/embeddings"],
    "laion_sr256": ["data.urls=['/data/laion/{00000..00511}.tar']"],
    "laion_sr1024": ["data.urls=['/data/laion/{00000..00511}.tar']"],
}


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_experiment_composes_validates_and_builds_its_stage(compose_cfg, name):
    cfg = compose_cfg([f"experiment={name}", *REQUIRED[name]])
    validate(cfg)
    build_stage(cfg)  # the stage's own checks (presets, diffusion settings, sampling) pass
    t = cfg.trainer
    # the stream layout the documented GPU counts give (8 GPUs as configured; 64 with grad_accum=1)
    for processes, accum in ((8, t.grad_accum), (64, 1)):
        stream_layout(t.streams, processes, t.num_workers, t.batch_size // accum)


def test_one_experiment_composes_through_the_console_script(tmp_path):
    result = _run([*TRAIN, "experiment=laion_decoder", *REQUIRED["laion_decoder"], "--cfg", "job"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "preset: paper" in result.stdout and "batch_size: 2048" in result.stdout


@pytest.mark.parametrize("config", sorted((REPO / "recipes" / "laion" / "accelerate").glob("*.yaml")))
def test_accelerate_configs_are_complete(config: Path):
    settings = yaml.safe_load(config.read_text())
    assert settings["mixed_precision"] == "bf16"
    assert settings["num_processes"] % settings["num_machines"] == 0
    assert settings["distributed_type"] in ("NO", "MULTI_GPU")


def test_multi_gpu_slurm_launcher_composes(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="the slurm extra is not installed")
    result = _run([*TRAIN, "hydra/launcher=slurm_multigpu", "--cfg", "hydra"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "tasks_per_node: 8" in result.stdout


def test_slurm_tasks_become_torch_distributed_ranks():
    env = {
        "SLURM_NTASKS": "16",
        "SLURM_PROCID": "9",
        "SLURM_LOCALID": "1",
        "SLURM_JOB_NODELIST": "gpu[07-08]",
    }
    found = slurm_distributed_env(env)
    assert found["RANK"] == "9" and found["WORLD_SIZE"] == "16" and found["LOCAL_RANK"] == "1"
    assert found["MASTER_ADDR"] == "gpu07"
    assert slurm_distributed_env({**env, "RANK": "3"}) == {}  # torchrun / accelerate launch set it already
    assert slurm_distributed_env({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) == {}
    assert first_host("node3,node4") == "node3" and first_host("a[3]") == "a3"
