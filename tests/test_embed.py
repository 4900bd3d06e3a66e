"""unclip-embed: sharded CLIP embeddings, resumable; the prior and decoder training on them."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from accelerate import Accelerator
from omegaconf import OmegaConf

import unclip.embed as embed_module
from tests.conftest import FAST_RUN, compose_train
from unclip.embed import embed_source
from unclip.errors import ConfigError, DataError
from unclip.train.trainer import Trainer

SHAPES = ["data.train_size=48", "data.eval_size=8"]


def _embed_cfg(clip: str, out: Path, *overrides: str):
    cfg = compose_train(
        [
            *SHAPES,
            f"clip={clip}",
            f"out={out}",
            "batch_size=16",
            "rows_per_part=20",
            "progress=false",
            *overrides,
        ],
        "embed",
    )
    return cfg


def _tables(out: Path) -> dict[str, list]:
    return {
        str(p.relative_to(out)): pq.read_table(p).to_pylist() for p in sorted(out.rglob("part-*.parquet"))
    }


@pytest.fixture(scope="module")
def embedded(clip_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("embedded") / "shapes"
    manifest = embed_source(_embed_cfg(clip_dirs[0], out, "image_size=32"), Accelerator(cpu=True))
    return out, manifest


def test_job_writes_every_split_in_parts_with_a_manifest(embedded, clip_dirs):
    out, manifest = embedded
    assert {name: split["rows"] for name, split in manifest["splits"].items()} == {
        "train": 48,
        "eval_seen": 8,
        "eval_holdout": 8,
    }
    assert [p["rows"] for p in manifest["splits"]["train"]["parts"]] == [20, 20, 8]
    row = pq.read_table(out / manifest["splits"]["train"]["parts"][0]["file"]).slice(0, 1).to_pylist()[0]
    assert len(row["image_embedding"]) == 32 and len(row["token_ids"]) == 24  # the tiny CLIP: 32-d, 24 tokens
    assert row["colour"] in row["caption"]  # the source's attributes travel with the embeddings
    assert json.loads((out / "manifest.json").read_text())["clip_fingerprint"] == manifest["clip_fingerprint"]


def test_a_killed_job_resumes_and_ends_with_the_same_parts(embedded, clip_dirs, tmp_path, monkeypatch):
    out = tmp_path / "resumed"
    cfg = _embed_cfg(clip_dirs[0], out, "image_size=32")
    real, calls = embed_module._embed_part, []

    def dies_on_third_part(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed midway
        return real(*args, **kwargs)

    monkeypatch.setattr(embed_module, "_embed_part", dies_on_third_part)
    with pytest.raises(KeyboardInterrupt):
        embed_source(cfg, Accelerator(cpu=True))
    assert not (out / "manifest.json").exists() and len(list(out.rglob("part-*.json"))) == 2
    monkeypatch.setattr(embed_module, "_embed_part", real)
    with pytest.raises(DataError, match="not finished"):
        embed_module.read_manifest(out, "anything")
    embed_source(cfg, Accelerator(cpu=True))
    assert _tables(out) == _tables(embedded[0])


def test_the_same_folder_with_another_clip_is_refused(embedded, clip_dirs):
    with pytest.raises(ConfigError, match="clip_fingerprint"):
        embed_source(_embed_cfg(clip_dirs[1], embedded[0], "image_size=32"), Accelerator(cpu=True))


def _stage_cfg(stage: str, clip: str, out: Path, *overrides: str):
    fast = {
        "prior": [
            "stage.model.width=32",
            "stage.model.layers=2",
            "stage.sampling.steps=4",
            "stage.eval_captions=8",
        ],
        "decoder": [
            "stage.model.preset=tiny",
            "stage.image_size=32",
            "stage.sampling.steps=4",
            "stage.eval_images=4",
            "stage.eval_without_caption=false",
        ],
    }[stage]
    return compose_train(
        [
            f"stage={stage}",
            f"stage.clip={clip}",
            f"stage.embeddings.path={out}",
            *fast,
            *FAST_RUN,
            *SHAPES,
            "trainer.max_steps=3",
            *overrides,
        ]
    )


@pytest.mark.parametrize(("stage", "stream"), [("prior", False), ("decoder", True)])
def test_prior_and_decoder_train_on_the_parts(embedded, clip_dirs, tmp_path, stage, stream):
    cfg = _stage_cfg(
        stage,
        clip_dirs[0],
        embedded[0],
        f"stage.embeddings.stream={stream}",
        "stage.embeddings.shuffle_buffer=16",
    )
    metrics = Trainer(cfg, tmp_path / "run").fit()
    assert "eval_seen/clip_cosine" in metrics or "eval_seen/cosine" in metrics
    assert (tmp_path / "run" / "export" / "model.safetensors").is_file()


def test_parts_of_another_clip_or_size_are_refused(embedded, clip_dirs, tmp_path):
    with pytest.raises(DataError, match="another CLIP"):
        Trainer(_stage_cfg("prior", clip_dirs[1], embedded[0]), tmp_path / "a").fit()
    with pytest.raises(ConfigError, match="image_size=64"):
        Trainer(_stage_cfg("decoder", clip_dirs[0], embedded[0], "stage.image_size=64"), tmp_path / "b").fit()


def test_embed_config_composes(clip_dirs, tmp_path):
    cfg = _embed_cfg(clip_dirs[0], tmp_path / "x")
    assert OmegaConf.to_container(cfg)["image_size"] == 64
    with pytest.raises(ConfigError, match="rows_per_part"):
        embed_source(_embed_cfg(clip_dirs[0], tmp_path / "y", "rows_per_part=0"), Accelerator(cpu=True))


def test_console_script_embeds_and_names_a_missing_folder(clip_dirs, tmp_path, monkeypatch, capsys):
    from tests.conftest import run_cli_in_process
    from unclip.cli.embed import main

    out = tmp_path / "emb"
    argv = [
        "unclip-embed",
        f"clip={clip_dirs[0]}",
        f"out={out}",
        *SHAPES,
        "rows_per_part=40",
        "progress=false",
    ]
    code, _ = run_cli_in_process(main, argv, tmp_path, monkeypatch, capsys)
    assert code == 0 and (out / "manifest.json").is_file()
    argv = [
        "unclip-embed",
        f"clip={clip_dirs[0]}",
        f"out={out}2",
        "data=folder",
        f"data.path={tmp_path}/nowhere",
    ]
    code, stderr = run_cli_in_process(main, argv, tmp_path, monkeypatch, capsys)
    assert code == 1 and "nowhere" in stderr and "Traceback" not in stderr
