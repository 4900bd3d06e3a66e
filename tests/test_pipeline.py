"""Pipeline folders (assemble, strict load, CLIP agreement) and the `unclip-sample` console script."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import TINY_ARCH, run_cli_in_process, run_sample_cli
from unclip.cli.sample import main as sample_main
from unclip.clip.model import ClipEncoder
from unclip.errors import CheckpointError
from unclip.io import load_tensors, write_yaml
from unclip.models.prior import PriorConfig
from unclip.pipeline import UnCLIPPipeline, assemble
from unclip.prior_sampling import DiffusionPrior, EmbeddingNormalizer

SAMPLING = {"sampler": "ddim", "steps": "8", "eta": 0.0, "guidance_scale": 2.0, "candidates": 2}


@pytest.fixture(scope="module")
def components(tmp_path_factory):
    root = tmp_path_factory.mktemp("components")
    torch.manual_seed(0)
    clip = ClipEncoder("tiny-test", None, TINY_ARCH)
    fingerprint = clip.save(root / "clip")
    config = PriorConfig.preset(
        "tiny", clip_embed_dim=32, text_token_dim=32, max_text_tokens=24, num_timesteps=100
    )
    prior = DiffusionPrior(config, EmbeddingNormalizer("unit_scale", 32), "cosine", SAMPLING)
    prior.save(root / "prior", fingerprint)
    other = ClipEncoder("tiny-test", None, TINY_ARCH)  # another random init: another fingerprint
    prior.save(root / "prior_other_clip", other.fingerprint())
    return root


def test_assemble_load_and_sample(components, tmp_path):
    folder = assemble(tmp_path / "pipe", {"clip": components / "clip", "prior": components / "prior"})
    pipe = UnCLIPPipeline.load(folder)
    a = pipe.text_to_image_embedding(["a red star", "a blue circle"], num_images=2, seed=3)
    b = pipe.text_to_image_embedding(["a red star", "a blue circle"], num_images=2, seed=3)
    assert a.shape == (4, 32) and torch.equal(a, b)
    assert not torch.equal(a, pipe.text_to_image_embedding(["a red star", "a blue circle"], 2, seed=4))


def test_stages_trained_against_another_clip_are_refused(components, tmp_path):
    with pytest.raises(CheckpointError, match="trained against CLIP"):
        assemble(tmp_path / "pipe", {"clip": components / "clip", "prior": components / "prior_other_clip"})


def test_missing_stage_and_unknown_folder_are_named(components, tmp_path):
    folder = assemble(tmp_path / "pipe", {"clip": components / "clip", "prior": components / "prior"})
    write_yaml(folder / "pipeline.yaml", {"format_version": 1, "stages": ["clip", "prior", "decoder"]})
    with pytest.raises(CheckpointError, match="decoder"):
        UnCLIPPipeline.load(folder)
    with pytest.raises(CheckpointError, match="does not exist"):
        UnCLIPPipeline.load(tmp_path / "nowhere")


def test_sample_cli_writes_embeddings_and_a_sidecar_that_regenerates_them(components, tmp_path):
    folder = assemble(tmp_path / "pipe", {"clip": components / "clip", "prior": components / "prior"})
    args = [f"pipeline={folder}", "prompt=a small red star", "num_images=3", "seed=7", "progress=false"]
    first = run_sample_cli([*args, f"out={tmp_path / 'a'}"], tmp_path)
    assert first.returncode == 0, first.stderr
    sidecar = json.loads((tmp_path / "a" / "samples.json").read_text())
    assert sidecar["prompts"] == ["a small red star"] and sidecar["seed"] == 7
    assert sidecar["settings"]["prior"]["guidance_scale"] == 2.0 and len(sidecar["rows"]) == 3
    again = run_sample_cli(
        [
            f"pipeline={folder}",
            f"prompt={sidecar['prompts'][0]}",
            f"num_images={sidecar['num_images']}",
            f"seed={sidecar['seed']}",
            "progress=false",
            f"out={tmp_path / 'b'}",
        ],
        tmp_path,
    )
    assert again.returncode == 0, again.stderr
    a = load_tensors(tmp_path / "a" / "embeddings.safetensors")["image_embeddings"]
    b = load_tensors(tmp_path / "b" / "embeddings.safetensors")["image_embeddings"]
    assert a.shape == (3, 32) and torch.equal(a, b)


@pytest.mark.parametrize(
    "args, message",
    [
        (["prompt= "], "the prompt is empty"),
        (["prompt=" + " ".join(["word"] * 40)], "longer than the CLIP context"),
        (["pipeline=/no/such/folder", "prompt=a red star"], "does not exist"),
    ],
)
def test_sample_cli_bad_input_is_one_line(components, tmp_path, args, message, monkeypatch, capsys):
    folder = assemble(tmp_path / "pipe", {"clip": components / "clip", "prior": components / "prior"})
    argv = ["unclip-sample", f"pipeline={folder}", *args, f"out={tmp_path / 'o'}"]
    code, stderr = run_cli_in_process(sample_main, argv, tmp_path, monkeypatch, capsys)
    assert code == 1
    assert message in stderr and "Traceback" not in stderr
