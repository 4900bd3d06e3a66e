"""``unclip-eval``: re-running a stage's evaluation from its run folder, with or without new settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import FAST_CLIP, REPO, run_cli_in_process
from tests.test_prior_stage import FAST_PRIOR
from unclip.cli.evaluate import main as evaluate_main


def _run(module: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def _train(cwd: Path, name: str, overrides: list[str]) -> Path:
    run = cwd / name
    done = _run("unclip.cli.train", [*overrides, f"hydra.run.dir={run}"], cwd)
    assert done.returncode == 0, done.stderr[-2000:]
    return run


def _evaluate(cwd: Path, args: list[str]) -> subprocess.CompletedProcess:
    return _run("unclip.cli.evaluate", args, cwd)


def _final_eval(run: Path) -> dict[str, float]:
    return json.loads(sorted((run / "eval").glob("step_*.json"))[-1].read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny CLIP run and a tiny prior run trained on its export, both through ``unclip-train``."""
    cwd = tmp_path_factory.mktemp("eval-cli")
    clip = _train(cwd, "clip", ["stage=clip", *FAST_CLIP, "trainer.max_steps=3"])
    prior = _train(cwd, "prior", [*FAST_PRIOR, f"stage.clip={clip / 'export'}", "trainer.max_steps=3"])
    return clip, prior


@pytest.mark.parametrize("stage", ["clip", "prior"])
def test_eval_reproduces_the_trainers_final_evaluation(runs, stage):
    run = runs[0] if stage == "clip" else runs[1]
    done = _evaluate(run.parent, [str(run)])
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["eval"] == _final_eval(run)


def test_eval_of_the_last_checkpoint_is_the_final_evaluation(runs):
    prior = runs[1]
    done = _evaluate(prior.parent, [str(prior), "--checkpoint", str(prior / "checkpoints" / "step_00000003")])
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["eval"] == _final_eval(prior)


@pytest.mark.parametrize(
    "options_first", [False, True], ids=["overrides-then-options", "options-then-overrides"]
)
def test_eval_applies_new_settings_and_writes_out(runs, tmp_path, options_first):
    prior = runs[1]
    out = tmp_path / "metrics.json"
    overrides, options = ["stage.sampling.guidance_scale=0.0", "stage.eval_captions=8"], ["--out", str(out)]
    args = [str(prior), *(options + overrides if options_first else overrides + options)]
    done = _evaluate(prior.parent, args)
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.loads(out.read_text())["eval"]
    assert metrics == json.loads(done.stdout)["eval"]
    assert metrics != _final_eval(prior)  # 8 captions unguided, not the run's 32 guided ones
    assert set(metrics) == set(_final_eval(prior))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nowhere"], "not an unclip-train run folder"),
        (["{prior}", "stage.bogus=1"], "bogus"),
        (["{prior}", "stage.eval_captions=many"], "eval_captions"),
        (["{prior}", "--export", "{prior}/missing"], "missing"),
        (["{prior}", "stage.sampling.steps=0"], "steps"),
        (["{prior}", "--checkpoint", "{prior}"], "not a complete checkpoint"),
        (["{prior}", "--checkpoint", "{clip}/checkpoints/step_00000003"], "does not fit this model"),
    ],
)
def test_eval_refuses_bad_input_in_one_line(runs, args, message, monkeypatch, capsys):
    clip, prior = runs
    argv = [a.format(prior=prior, clip=clip) for a in args]
    code, stderr = run_cli_in_process(
        lambda: evaluate_main(argv), ["unclip-eval"], prior.parent, monkeypatch, capsys
    )
    assert code == 1
    assert stderr.startswith("error:") and message in stderr


def test_eval_console_script_exits_1_with_one_line(runs):
    done = _evaluate(runs[1].parent, ["nowhere"])
    assert done.returncode == 1
    assert done.stderr.startswith("error:") and "not an unclip-train run folder" in done.stderr
