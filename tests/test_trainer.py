"""The one training loop: learning, exact resume, EMA, crash-safe checkpoints, multi-process equivalence."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

import unclip.train.checkpoint as checkpoint_module
from tests.conftest import FAST_CLIP, REPO
from unclip.data import shapes
from unclip.errors import ConfigError
from unclip.io import load_tensors
from unclip.train.checkpoint import latest_checkpoint
from unclip.train.ema import EMA
from unclip.train.trainer import Trainer, cpu_compile_missing, learning_rate


def _losses(run_dir) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_loss_falls_on_a_tiny_problem(compose_cfg, tmp_path):
    cfg = compose_cfg([*FAST_CLIP, "trainer.max_steps=40", "trainer.log_every=5", "optim.lr=2e-3"])
    metrics = Trainer(cfg, tmp_path).fit()
    losses = _losses(tmp_path)
    assert losses[-1] < 0.8 * losses[0], losses
    for split in ("eval_seen", "eval_holdout"):
        expected = ["colour_acc", "shape_acc", "text_to_image_r@1", "image_to_text_r@5", "chance@5"]
        assert {f"{split}/{key}" for key in expected} <= set(metrics)
    assert metrics["eval_seen/text_to_image_r@5"] > metrics["eval_seen/chance@5"]
    assert (tmp_path / "export" / "model.safetensors").is_file()


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("source", ["shapes", "webdataset"])
def test_interrupted_then_resumed_run_matches_uninterrupted(compose_cfg, tmp_path, monkeypatch, source):
    # shapes: 128 examples / micro-batch 8 with 2 accumulation steps: 8 optimizer steps per epoch; stop
    # mid-epoch 2. webdataset: ~51 streamed training examples in 2 streams, 3 steps an epoch; stop mid-epoch 4
    overrides = [
        *FAST_CLIP,
        "trainer.max_steps=12",
        "trainer.checkpoint_every=5",
        "trainer.grad_accum=2",
        "trainer.eval_every=5",
    ]
    if source == "webdataset":
        overrides = streamed(overrides, tmp_path / "shards", per_shard=16)
    Trainer(compose_cfg(overrides), tmp_path / "straight").fit()

    original = checkpoint_module.save_checkpoint

    def save_then_die(*args, **kwargs):
        path = original(*args, **kwargs)
        if path.name.endswith("00000010"):
            raise Interrupt
        return path

    monkeypatch.setattr("unclip.train.trainer.save_checkpoint", save_then_die)
    with pytest.raises(Interrupt):
        Trainer(compose_cfg(overrides), tmp_path / "broken").fit()
    monkeypatch.setattr("unclip.train.trainer.save_checkpoint", original)
    Trainer(compose_cfg([*overrides, "resume=latest"]), tmp_path / "broken").fit()

    for name in ("model.safetensors", "ema.safetensors", "optimizer.safetensors"):
        a = load_tensors(tmp_path / "straight" / "checkpoints" / "step_00000012" / name)
        b = load_tensors(tmp_path / "broken" / "checkpoints" / "step_00000012" / name)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    if source == "webdataset":  # the streams ran out and restarted several times, resumed mid-epoch
        state = json.loads((tmp_path / "broken" / "checkpoints" / "step_00000012" / "state.json").read_text())
        assert state["epoch"] >= 3


def test_checkpoint_write_killed_midway_leaves_previous_loadable(compose_cfg, tmp_path, monkeypatch):
    overrides = [*FAST_CLIP, "trainer.max_steps=6", "trainer.checkpoint_every=2"]
    original = checkpoint_module.save_tensors

    def die_on_step_four(path, *args, **kwargs):
        if ".tmp-step_00000004" in str(path) and path.name == "ema.safetensors":
            raise Interrupt  # as if the process were killed while writing
        return original(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "save_tensors", die_on_step_four)
    with pytest.raises(Interrupt):
        Trainer(compose_cfg(overrides), tmp_path).fit()
    monkeypatch.setattr(checkpoint_module, "save_tensors", original)

    assert latest_checkpoint(tmp_path).name == "step_00000002"
    Trainer(compose_cfg([*overrides, "resume=latest"]), tmp_path).fit()
    assert latest_checkpoint(tmp_path).name == "step_00000006"
    assert not any(p.name.startswith(".tmp") for p in (tmp_path / "checkpoints").iterdir())


def test_resume_from_a_checkpoint_of_another_model_is_refused(compose_cfg, tmp_path):
    Trainer(compose_cfg([*FAST_CLIP, "trainer.max_steps=2"]), tmp_path / "a").fit()
    wider = [
        *FAST_CLIP,
        "stage.model.arch.conv_tower.channels=[8,16,32]",
        "trainer.max_steps=2",
        f"resume={tmp_path / 'a'}",
    ]
    from unclip.errors import CheckpointError

    with pytest.raises(CheckpointError, match="model.safetensors"):
        Trainer(compose_cfg(wider), tmp_path / "b").fit()


def test_compiled_training_matches_eager(compose_cfg, tmp_path):
    """trainer.compile=true trains the same weights through torch.compile, saved under the same keys."""
    if missing := cpu_compile_missing():
        pytest.skip(f"torch.compile on the CPU needs {missing}")
    runs = {}
    torch._dynamo.reset()
    for flag in ("false", "true"):
        cfg = compose_cfg([*FAST_CLIP, "trainer.max_steps=2", f"trainer.compile={flag}"])
        Trainer(cfg, tmp_path / flag).fit()
        runs[flag] = load_tensors(tmp_path / flag / "checkpoints" / "step_00000002" / "model.safetensors")
        compiled = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        assert (compiled > 0) == (flag == "true"), compiled
    assert runs["true"].keys() == runs["false"].keys()
    for key, eager in runs["false"].items():
        torch.testing.assert_close(runs["true"][key], eager, atol=1e-4, rtol=1e-4)


def test_compile_without_its_cpu_toolchain_is_refused_before_work(compose_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", "no-such-c++-compiler")
    cfg = compose_cfg([*FAST_CLIP, "trainer.compile=true", "trainer.cpu=true"])
    with pytest.raises(ConfigError, match="no-such-c\\+\\+-compiler"):
        Trainer(cfg, tmp_path)
    if shutil.which("g++") is not None:  # a compiler, but no Python headers
        monkeypatch.setenv("CXX", "g++")
        monkeypatch.setattr("sysconfig.get_path", lambda name, *args, **kwargs: str(tmp_path / "no-include"))
        with pytest.raises(ConfigError, match="Python's headers.*no-include"):
            Trainer(cfg, tmp_path)
    assert not tmp_path.joinpath("checkpoints").exists()


def test_ema_follows_its_recurrence():
    module = torch.nn.Linear(3, 2)
    ema = EMA(module, decay=0.9, warmup=False)
    start = module.weight.detach().clone()
    with torch.no_grad():
        module.weight.add_(1.0)
    ema.update(module)
    expected = 0.9 * start + 0.1 * module.weight
    assert torch.allclose(ema.shadow["weight"], expected)
    target = torch.nn.Linear(3, 2)
    ema.copy_to(target)
    assert torch.allclose(target.weight, expected)
    warm = EMA(module, decay=0.999, warmup=True)
    assert warm.current_decay() == pytest.approx(0.1)
    for _ in range(10_000):
        warm.num_updates += 1
    assert warm.current_decay() == 0.999


def test_learning_rate_warms_up_then_decays(compose_cfg):
    cfg = compose_cfg(
        ["trainer.max_steps=100", "optim.warmup_steps=10", "optim.lr=1.0", "optim.min_lr_ratio=0.1"]
    )
    assert learning_rate(cfg, 0) == pytest.approx(0.1)
    assert learning_rate(cfg, 9) == pytest.approx(1.0)
    assert learning_rate(cfg, 100) == pytest.approx(0.1)
    assert learning_rate(cfg, 50) < learning_rate(cfg, 20)


@pytest.mark.slow
def write_shards(folder: Path, shards: int, per_shard: int, size: int = 32) -> str:
    """WebDataset tar shards of rendered ``shapes`` images (``<key>.png`` + ``<key>.txt``); their brace
    pattern."""
    folder.mkdir(parents=True, exist_ok=True)
    for shard in range(shards):
        with tarfile.open(folder / f"shard-{shard:02d}.tar", "w") as tar:
            for i in range(per_shard):
                index = shard * per_shard + i
                record = shapes.make_record(0, "train", index, ())
                image = io.BytesIO()
                shapes.render(shapes.sample_spec(0, "train", index, ()), size).save(image, format="PNG")
                for suffix, payload in (("png", image.getvalue()), ("txt", record["caption"].encode())):
                    info = tarfile.TarInfo(f"{index:06d}.{suffix}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return str(folder / f"shard-{{00..{shards - 1:02d}}}.tar")


def streamed(overrides: list[str], folder: Path, per_shard: int, extra: tuple[str, ...] = ()) -> list[str]:
    """``overrides`` with the shapes data replaced by 4 WebDataset shards of ``per_shard`` renders each,
    streamed as 2 streams (a fifth of the samples held out for evaluation)."""
    pattern = write_shards(folder, shards=4, per_shard=per_shard)
    kept = [o for o in overrides if not o.startswith("data.")]
    data = ["data=webdataset", f"data.urls=['{pattern}']", "data.eval_fraction=0.2", *extra]
    return [*kept, *data, "trainer.streams=2"]


def _train_cli(args: list[str], run_dir: Path, cwd: Path, processes: int = 1) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    if processes == 1:
        command = [sys.executable, "-m", "unclip.cli.train"]
    else:
        torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
        command = [
            torchrun,
            "--nproc_per_node",
            str(processes),
            "--master_port",
            "29517",
            "-m",
            "unclip.cli.train",
        ]
    result = subprocess.run(
        [*command, *args, f"hydra.run.dir={run_dir}"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("source", ["shapes", "webdataset"])
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path, source):
    if shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None:
        pytest.skip("torchrun is not installed beside this python")
    # the ViT tower: the conv tower's BatchNorm statistics are per process, so only GPUs (SyncBatchNorm) match
    vit = [
        "clip_model@stage.model=tiny_vit",
        "stage.model.arch.vision_cfg.image_size=32",
        "stage.model.arch.vision_cfg.width=32",
        "stage.model.arch.vision_cfg.layers=1",
    ]
    args = [
        *(a for a in FAST_CLIP if "conv_tower" not in a),
        *vit,
        "trainer.max_steps=4",
        "trainer.cpu=true",
        "trainer.checkpoint_every=4",
    ]
    if source == "webdataset":  # streamed: 4 shards of 20, read as 2 streams whichever the process count
        args = streamed(args, tmp_path / "shards", per_shard=20, extra=("data.shuffle_buffer=8",))
    _train_cli(args, tmp_path / "one", tmp_path)
    _train_cli(args, tmp_path / "two", tmp_path, processes=2)
    a = load_tensors(tmp_path / "one" / "checkpoints" / "step_00000004" / "model.safetensors")
    b = load_tensors(tmp_path / "two" / "checkpoints" / "step_00000004" / "model.safetensors")
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-5, worst


def test_wandb_tracker_runs_offline_without_an_account(compose_cfg, tmp_path):
    overrides = [o for o in FAST_CLIP if not o.startswith("logger.")]
    Trainer(compose_cfg([*overrides, "trainer.max_steps=2", "logger.kind=wandb"]), tmp_path).fit()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))
