"""``unclip-eval pipeline=...``: the whole cascade judged on the ``shapes`` eval captions, and its metrics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from PIL import Image

from tests.conftest import TINY_ARCH
from tests.test_decoder_stage import small_decoder
from tests.test_eval_cli import _evaluate  # unclip-eval as a console script runs it, from this checkout
from unclip.cli.evaluate import main
from unclip.clip.model import ClipEncoder
from unclip.config.schema import ShapesDataConfig
from unclip.data import shapes
from unclip.data.sources import load_split
from unclip.errors import DataError
from unclip.eval.pipeline_eval import frechet_distance
from unclip.eval.shapes_reader import ATTRIBUTES, attribute_accuracy
from unclip.models.prior import PriorConfig
from unclip.pipeline import UnCLIPPipeline, assemble
from unclip.prior_sampling import DiffusionPrior, EmbeddingNormalizer
from unclip.stages.clip import image_to_tensor

PRIOR_SAMPLING = {"sampler": "ddim", "steps": "8", "eta": 0.0, "guidance_scale": 2.0, "candidates": 1}
SIZE = 16
FAST = ["captions=4", "data.eval_size=8", "prior.steps=4", "decoder.steps=4", "progress=false"]


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny random (clip, prior, decoder) pipeline folder, and one without the decoder. The decoder draws
    16 px images (a shapes pipeline's draws 64 px): the evaluation follows its size, and stays fast."""
    root = tmp_path_factory.mktemp("pipeline-eval")
    torch.manual_seed(0)
    fingerprint = ClipEncoder("tiny-test", None, TINY_ARCH).save(root / "clip")
    config = PriorConfig.preset(
        "tiny", clip_embed_dim=32, text_token_dim=32, max_text_tokens=24, num_timesteps=100
    )
    prior = DiffusionPrior(config, EmbeddingNormalizer("unit_scale", 32), "cosine", PRIOR_SAMPLING)
    prior.save(root / "prior", fingerprint)
    small_decoder(size=SIZE).save(root / "decoder", fingerprint)
    full = assemble(root / "pipe", {s: root / s for s in ("clip", "prior", "decoder")})
    return full, assemble(root / "no-decoder", {s: root / s for s in ("clip", "prior")})


def _scipy_frechet(a: np.ndarray, b: np.ndarray) -> float:
    linalg = pytest.importorskip("scipy.linalg")
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    cross = np.real(linalg.sqrtm(s1 @ s2))
    return float(np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(cross))


def test_frechet_distance_matches_an_independent_reference():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(60, 5, generator=g) @ torch.randn(5, 5, generator=g)
    b = 0.5 * torch.randn(50, 5, generator=g) + 0.3
    assert frechet_distance(a, b) == pytest.approx(_scipy_frechet(a.numpy(), b.numpy()), rel=1e-6)
    # one dimension: (mu_a - mu_b)^2 + (sigma_a - sigma_b)^2
    x, y = torch.randn(40, 1, generator=g), 3 * torch.randn(30, 1, generator=g) + 2
    expected = (x.mean() - y.mean()) ** 2 + (x.std() - y.std()) ** 2
    assert frechet_distance(x, y) == pytest.approx(float(expected), rel=1e-6)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-6)


@pytest.mark.parametrize("rows", [40, 6])  # 6 rows of 32 dimensions: a singular covariance
def test_frechet_distance_of_identical_sets_is_zero(rows):
    z = F.normalize(torch.randn(rows, 32, generator=torch.Generator().manual_seed(rows)), dim=-1)
    assert frechet_distance(z, z.clone()) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(z, z + 0.1) == pytest.approx(32 * 0.01, rel=1e-5)  # a shift: the mean term


def test_frechet_distance_refuses_sets_it_cannot_compare():
    with pytest.raises(DataError, match="two"):
        frechet_distance(torch.zeros(1, 4), torch.zeros(5, 4))
    with pytest.raises(DataError, match="two"):
        frechet_distance(torch.zeros(5, 4), torch.zeros(5, 3))


def test_attributes_count_only_the_captions_that_name_them():
    records = [shapes.make_record(3, "eval_seen", i) for i in range(16)]
    images = [shapes.render(shapes.sample_spec(3, "eval_seen", i), 64) for i in range(16)]
    truth = attribute_accuracy(images, records, ATTRIBUTES)
    for a in ATTRIBUTES:
        named = sum(r.get(f"names_{a}", True) for r in records)
        assert truth[a] == 1.0 and truth[f"{a}_count"] == named
    assert 0 < truth["size_count"] < 16  # the draw names size in some captions, not all
    # a wrong truth for an attribute the caption leaves out does not count; for one it names, it does
    unnamed = next(i for i, r in enumerate(records) if not r["names_size"])
    named = next(i for i, r in enumerate(records) if r["names_size"])
    flip = {"small": "large", "large": "small"}
    records[unnamed]["size"] = flip[records[unnamed]["size"]]
    assert attribute_accuracy(images, records, ["size"])["size"] == 1.0
    records[named]["size"] = flip[records[named]["size"]]
    assert attribute_accuracy(images, records, ["size"])["size"] == 1.0 - 1 / truth["size_count"]


def test_cli_writes_the_report(pipelines, tmp_path):
    out = tmp_path / "report"
    args = [f"pipeline={pipelines[0]}", *FAST, "batch_size=3", "grid_images=3", f"out={out}"]
    done = _evaluate(tmp_path, args)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "eval.json").read_text())
    assert json.loads(done.stdout.split("\n", 1)[1]) == report
    assert report["pipeline"] == str(pipelines[0].resolve()) and report["captions"] == 4
    assert report["image_size"] == SIZE
    assert report["precision"] == "no" and report["precision_reason"] == "precision=no as configured"
    assert report["decoder"]["steps"] == "4" and report["decoder"]["guidance_scale"] == 3.0  # exported
    assert report["prior"]["steps"] == "4" and report["prior"]["guidance_scale"] == 2.0
    data = OmegaConf.structured(ShapesDataConfig(eval_size=8))
    clip = UnCLIPPipeline.load(pipelines[0]).clip
    assert set(report["splits"]) == {"eval_seen", "eval_holdout"}
    for split, m in report["splits"].items():
        rows = load_split(data, split, SIZE).select(range(4))
        assert m["seeds"] == [0, 1]  # 4 captions in batches of 3
        assert m["sampling_seconds"] > 0
        assert m["counts"] == {a: sum(rows[f"names_{a}"]) if a in ATTRIBUTES[2:] else 4 for a in ATTRIBUTES}
        assert set(m["accuracy"]) == set(ATTRIBUTES)
        assert m["frechet_distance"] > 0 and m["frechet_distance_floor"] > 0 and m["floor_rows"] == 4
        assert m["grid_captions"] == rows["caption"][:3]
        with torch.no_grad():  # the true renders' CLIP score, computed here independently
            real = torch.stack([image_to_tensor(p) for p in rows["image"]]).float() / 255
            text = clip.encode_text(clip.tokenize(rows["caption"])).pooled
            expected = F.cosine_similarity(clip.encode_image(real), text, dim=-1).mean()
        assert m["clip_score_real"] == pytest.approx(float(expected), abs=1e-5)
        assert -1 <= m["clip_score"] <= 1 and m["clip_score"] != m["clip_score_real"]
    with Image.open(out / "grid.png") as grid:
        assert grid.size == (3 * SIZE + 4 * 2, 2 * SIZE + 3 * 2)  # 3 images a split, one row each
    markdown = (out / "report.md").read_text()
    assert "## eval_holdout" in markdown and "| size |" in markdown and "[grid.png](grid.png)" in markdown
    assert report["splits"]["eval_seen"]["grid_captions"][0] in markdown


def test_floor_falls_back_to_halves_of_a_small_split(pipelines, tmp_path, capsys):
    main([f"pipeline={pipelines[0]}", *FAST, "data.eval_size=6", "grid_images=0", f"out={tmp_path}"])
    report = json.loads((tmp_path / "eval.json").read_text())
    assert all(m["floor_rows"] == 3 for m in report["splits"].values())
    assert not (tmp_path / "grid.png").exists() and "grid.png" not in (tmp_path / "report.md").read_text()


def test_multirun_writes_one_report_per_job(pipelines, tmp_path):
    sweep = tmp_path / "sweep"
    args = [
        "-m",
        f"pipeline={pipelines[0]}",
        *FAST,
        "captions=2",
        "decoder.guidance_scale=1,2",
        f"out={sweep}",
    ]
    done = _evaluate(tmp_path, args)
    assert done.returncode == 0, done.stderr[-3000:]
    scales = [
        json.loads((sweep / str(job) / "eval.json").read_text())["decoder"]["guidance_scale"]
        for job in (0, 1)
    ]
    assert scales == [1.0, 2.0]
    assert (sweep / "1" / "grid.png").is_file() and (sweep / "1" / ".hydra" / "overrides.yaml").is_file()
    assert not (tmp_path / "runs").exists() and not (tmp_path / "multirun").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["captions=0"], "captions=0 must be at least 2"),
        (["captions=9"], "data.eval_size=8"),
        (["precision=fp8"], "precision='fp8'"),
        (["pipeline={missing}"], "does not exist"),
        (["pipeline={no_decoder}"], "no decoder stage"),
    ],
)
def test_bad_input_is_one_line(pipelines, tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    names = {"missing": tmp_path / "nowhere", "no_decoder": pipelines[1]}
    args = [a.format(**names) for a in args]
    if not any(a.startswith("pipeline=") for a in args):
        args.append(f"pipeline={pipelines[0]}")
    with pytest.raises(SystemExit) as exit_:
        main([*FAST, f"out={tmp_path / 'out'}", *args])
    stderr = capsys.readouterr().err
    assert exit_.value.code == 1 and "Traceback" not in stderr
    assert (
        stderr.strip().splitlines() == [stderr.strip()] and stderr.startswith("error:") and message in stderr
    )


def test_misspelt_key_is_refused_by_name(pipelines, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main([f"pipeline={pipelines[0]}", "captionz=3"])
    stderr = capsys.readouterr().err
    assert exit_.value.code == 1 and "captionz" in stderr and "Traceback" not in stderr
    assert not list(tmp_path.iterdir())  # refused before any folder is made


def test_retrieval_recall_against_a_brute_force_count():
    from unclip.eval.retrieval import retrieval_recall

    g = torch.Generator().manual_seed(0)
    images, texts = torch.randn(12, 8, generator=g), torch.randn(12, 8, generator=g)
    texts[:6] = images[:6] * 3  # the first six captions point straight at their images
    captions = [f"c{i}" for i in range(11)] + ["c0"]  # caption 11 repeats caption 0: image 0 counts for it
    found = retrieval_recall(images, texts, captions, ks=(1, 3))
    cos = torch.nn.functional.normalize(texts, dim=-1) @ torch.nn.functional.normalize(images, dim=-1).T
    for k in (1, 3):
        hits = sum(
            any(captions[j] == captions[i] for j in cos[i].argsort(descending=True)[:k].tolist())
            for i in range(12)
        )
        assert found[f"text_to_image_r@{k}"] == pytest.approx(hits / 12)
        back = sum(
            any(captions[i] == captions[j] for i in cos[:, j].argsort(descending=True)[:k].tolist())
            for j in range(12)
        )
        assert found[f"image_to_text_r@{k}"] == pytest.approx(back / 12)
        assert found[f"chance@{k}"] == k / 12
    assert found["text_to_image_r@1"] >= 6 / 12
