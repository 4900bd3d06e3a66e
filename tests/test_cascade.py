"""The whole cascade in a pipeline folder: upsampler stages, sizes, negative prompts, interpolation, text
diffs, precision, and `unclip-sample` in every mode with sidecars that regenerate the same images."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import TINY_ARCH, run_cli_in_process, run_sample_cli
from tests.test_decoder_stage import small_decoder
from tests.test_pipeline import SAMPLING
from tests.test_upsampler_stage import small_upsampler
from tests.test_variation import _randomised
from unclip.cli.sample import main as sample_main
from unclip.clip.model import ClipEncoder
from unclip.errors import CheckpointError, ConfigError
from unclip.images import load_image, save_png
from unclip.models.prior import PriorConfig
from unclip.pipeline import UnCLIPPipeline, assemble
from unclip.precision import sampling_precision
from unclip.prior_sampling import DiffusionPrior, EmbeddingNormalizer, sample_prior
from unclip.upsampler_sampling import upsample
from unclip.variation import slerp

# decoder 16 px -> "sr256" 64 px -> "sr1024" 256 px: the real cascade's shape at a sixteenth of the cost
SIZES = [16, 64, 256]


@pytest.fixture(scope="module")
def components(tmp_path_factory):
    root = tmp_path_factory.mktemp("cascade")
    torch.manual_seed(0)
    clip = ClipEncoder("tiny-test", None, TINY_ARCH).eval()
    fingerprint = clip.save(root / "clip")
    config = PriorConfig.preset(
        "tiny", clip_embed_dim=32, text_token_dim=32, max_text_tokens=24, num_timesteps=100
    )
    prior = DiffusionPrior(config, EmbeddingNormalizer("unit_scale", 32), "cosine", SAMPLING)
    with torch.no_grad():  # zero-initialised output layers would ignore the caption
        for p in prior.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    prior.save(root / "prior", fingerprint)
    _randomised(small_decoder()).save(root / "decoder", fingerprint)
    small_upsampler(seed=1, steps="2").save(root / "sr256")
    small_upsampler(seed=2, steps="2").save(root / "sr1024")
    return root


@pytest.fixture(scope="module")
def folder(components, tmp_path_factory):
    stages = ("clip", "prior", "decoder", "sr256", "sr1024")
    return assemble(tmp_path_factory.mktemp("pipe") / "pipe", {s: components / s for s in stages})


@pytest.fixture(scope="module")
def pipe(folder):
    return UnCLIPPipeline.load(folder)


def _image(seed: int, size: int = 24) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.rand(1, 3, 4, 4, generator=g), size=size, mode="nearest")[0]


def test_text_to_image_stops_at_any_size_and_is_seeded(pipe):
    assert pipe.sizes == SIZES
    prompts = ["a red star", "a blue circle"]
    small_emb, small = pipe.text_to_image(prompts, num_images=2, seed=3, size=16)
    assert small.shape == (4, 3, 16, 16) and small_emb.shape == (4, 32)
    emb, full = pipe.text_to_image(prompts, num_images=2, seed=3)
    assert full.shape == (4, 3, 256, 256) and torch.equal(emb, small_emb)
    assert float(full.min()) >= 0 and float(full.max()) <= 1
    # the 64 px stage upsamples the decoder's output with its own generator, seeded alike
    _, mid = pipe.text_to_image(prompts, num_images=2, seed=3, size=64)
    direct = upsample(pipe.upsamplers["sr256"], small, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(mid, direct)
    _, again = pipe.text_to_image(prompts, num_images=2, seed=3, size=64)
    assert torch.equal(mid, again)
    with pytest.raises(ConfigError, match=r"size=32 .*\[16, 64, 256\]"):
        pipe.text_to_image(prompts, size=32)
    with pytest.raises(ConfigError, match="sr1024 settings do not apply"):
        pipe.text_to_image(prompts, size=64, upsampler_options={"sr1024": {"steps": "3"}})


def test_upsampler_settings_reach_their_stage(pipe):
    _, images = pipe.text_to_image(["a red star"], seed=0, size=16)
    base = pipe.upscale(images, 64, seed=0)
    changed = pipe.upscale(images, 64, seed=0, upsampler_options={"sr256": {"steps": "3"}})
    assert base.shape == changed.shape == (1, 3, 64, 64) and not torch.equal(base, changed)
    with pytest.raises(ConfigError, match="unknown stage"):
        pipe.upscale(images, 64, upsampler_options={"sr512": {"steps": "2"}})


def test_a_loaded_pipeline_saves_a_folder_that_loads_the_same(pipe, tmp_path):
    saved = UnCLIPPipeline.load(pipe.save(tmp_path / "copy"))
    assert saved.sizes == pipe.sizes and list(saved.upsamplers) == ["sr256", "sr1024"]
    for name, part in [("prior", pipe.prior), ("decoder", pipe.decoder), *pipe.upsamplers.items()]:
        copy = saved.upsamplers[name] if name.startswith("sr") else getattr(saved, name)
        assert all(torch.equal(a, b) for a, b in zip(part.state_dict().values(), copy.state_dict().values()))
    assert saved.clip.fingerprint() == pipe.clip.fingerprint()


def test_stage_order_and_kinds_are_checked(components, tmp_path):
    with pytest.raises(CheckpointError, match="sr1024 stage needs a sr256 stage"):
        assemble(tmp_path / "p1", {s: components / s for s in ("clip", "decoder", "sr1024")})
    with pytest.raises(CheckpointError, match="sr256 stage needs a decoder"):
        assemble(tmp_path / "p2", {s: components / s for s in ("clip", "prior", "sr256")})
    with pytest.raises(CheckpointError, match="'upsampler'.*the decoder stage"):
        assemble(tmp_path / "p3", {"clip": components / "clip", "decoder": components / "sr256"})


def test_a_negative_prompt_equal_to_the_prompt_cancels_prior_guidance(pipe):
    """Guidance is uncond + s (cond - uncond); with the negative caption as uncond and equal to the caption,
    every scale gives the conditional model alone, i.e. the samples of scale 1."""
    text = pipe.clip.encode_text(pipe.clip.tokenize(["a red star", "a blue circle"]))
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    unguided = sample_prior(pipe.prior, text, generator=g(), guidance_scale=1.0)
    cancelled = sample_prior(pipe.prior, text, negative=text, generator=g(), guidance_scale=4.0)
    guided = sample_prior(pipe.prior, text, generator=g(), guidance_scale=4.0)
    torch.testing.assert_close(cancelled, unguided, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(guided, unguided, atol=1e-3)


def test_a_negative_prompt_moves_the_decoder_and_the_prior(pipe):
    args = dict(
        seed=2, size=16, prior_options={"guidance_scale": 3.0}, decoder_options={"guidance_scale": 3.0}
    )
    emb, images = pipe.text_to_image(["a red star"], **args)
    neg_emb, neg_images = pipe.text_to_image(["a red star"], negative_prompt="a blue star", **args)
    assert not torch.allclose(emb, neg_emb) and not torch.allclose(images, neg_images)
    decoder_only = pipe.text_to_image(
        ["a red star"], negative_prompt="a blue star", **{**args, "prior_options": {"guidance_scale": 1.0}}
    )
    plain = pipe.text_to_image(["a red star"], **{**args, "prior_options": {"guidance_scale": 1.0}})
    assert torch.equal(decoder_only[0], plain[0]) and not torch.allclose(decoder_only[1], plain[1])
    with pytest.raises(ConfigError, match="prompt is empty"):
        pipe.text_to_image(["a red star"], negative_prompt="  ")


def test_slerp_follows_the_great_circle_and_interpolates_the_norm():
    a, b = torch.tensor([2.0, 0.0, 0.0]), torch.tensor([0.0, 4.0, 0.0])
    points = slerp(a, b, torch.tensor([0.0, 0.5, 1.0]))
    torch.testing.assert_close(points[0], a)
    torch.testing.assert_close(points[2], b)
    # halfway between orthogonal directions: 45 degrees from each, norm halfway between 2 and 4
    torch.testing.assert_close(points[1], 3.0 * torch.tensor([1.0, 1.0, 0.0]) / math.sqrt(2))
    angle = torch.tensor([0.3])  # a third of the way along a 90 degree arc is at 27 degrees
    unit = F.normalize(slerp(a, b, angle)[0], dim=0)
    torch.testing.assert_close(
        unit, torch.tensor([math.cos(0.3 * math.pi / 2), math.sin(0.3 * math.pi / 2), 0.0])
    )
    torch.testing.assert_close(slerp(a, 3 * a, torch.tensor([0.5]))[0], 2 * a)  # same direction


def test_interpolation_shares_its_noise_and_runs_from_one_image_to_the_other(pipe):
    a, b = _image(0), _image(1)
    same = pipe.interpolate(a, a, 3, seed=4, size=16)
    assert same.shape == (3, 3, 16, 16)
    assert torch.allclose(same[0], same[1], atol=1e-5) and torch.allclose(same[0], same[2], atol=1e-5)
    row = pipe.interpolate(a, b, 4, seed=4, size=16)
    ends = pipe.interpolate(a, b, 2, seed=4, size=16)  # the same x_T: the ends do not depend on the count
    torch.testing.assert_close(row[[0, -1]], ends, atol=1e-5, rtol=0)
    assert not torch.allclose(row[0], row[-1], atol=1e-3)
    with pytest.raises(ConfigError, match="num_images >= 2"):
        pipe.interpolate(a, b, 1)


def test_a_text_diff_starts_from_the_images_reconstruction(pipe):
    image = _image(3)
    row = pipe.text_diff(image, "a red star", "a blue star", 3, seed=1, size=16)
    reconstruction = pipe.image_variations(image, 1, invert=True, seed=1, size=16)
    torch.testing.assert_close(row[:1], reconstruction, atol=1e-4, rtol=0)  # batch of 3 vs 1
    assert not torch.allclose(row[0], row[-1], atol=1e-3)
    with pytest.raises(ConfigError, match="same CLIP embedding"):
        pipe.text_diff(image, "a red star", "a red star", 3)


def test_bf16_autocast_samples_the_same_pictures_roughly(pipe):
    _, exact = pipe.text_to_image(["a red star"], seed=0, size=64)
    with sampling_precision("cpu", "bf16"):
        _, low = pipe.text_to_image(["a red star"], seed=0, size=64)
    assert low.dtype == torch.float32 and low.shape == exact.shape
    assert float((low - exact).abs().mean()) < 0.1
    with pytest.raises(ConfigError, match="precision='fp8'"), sampling_precision("cpu", "fp8"):
        pass


def test_sample_cli_text_to_image_with_sizes_grid_and_regeneration(folder, tmp_path):
    (tmp_path / "prompts.txt").write_text("a red star\n\na blue circle\n")
    args = [
        f"pipeline={folder}",
        f"prompts_file={tmp_path / 'prompts.txt'}",
        "num_images=2",
        "seed=9",
        "size=64",
        "negative_prompt=a green square",
        "decoder.steps=3",
        "sr256.steps=2",
        "progress=false",
    ]
    first = run_sample_cli([*args, f"out={tmp_path / 'a'}"], tmp_path)
    assert first.returncode == 0, first.stderr
    sidecar = json.loads((tmp_path / "a" / "samples.json").read_text())
    assert sidecar["prompts"] == ["a red star", "a blue circle"] and sidecar["size"] == 64
    assert sidecar["settings"]["decoder"]["steps"] == "3" and sidecar["settings"]["sr256"]["steps"] == "2"
    assert set(sidecar["settings"]) == {"prior", "decoder", "sr256"}
    # precision=auto (the default) records what it chose and why, and the overrides pin that choice
    assert sidecar["precision"] in ("no", "bf16")
    assert f"precision={sidecar['precision']}" in sidecar["overrides"]
    assert sidecar["precision_reason"].startswith(f"precision=auto chose {sidecar['precision']}: ")
    assert sidecar["precision_reason"] in first.stderr
    assert [r["file"] for r in sidecar["rows"]] == ["0000.png", "0001.png", "0002.png", "0003.png"]
    assert load_image(tmp_path / "a" / "0003.png").shape == (3, 64, 64)
    assert load_image(tmp_path / "a" / "grid.png").shape == (3, 2 * 66 + 2, 2 * 66 + 2)
    # the sidecar's overrides make the same images again, even after the prompts file is gone
    (tmp_path / "prompts.txt").unlink()
    again = run_sample_cli([*sidecar["overrides"], f"out={tmp_path / 'b'}"], tmp_path)
    assert again.returncode == 0, again.stderr
    for name in ("0000.png", "0003.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_sample_cli_interpolation_text_diff_and_variation(folder, tmp_path):
    for seed in (0, 1):
        save_png(_image(seed, 40), tmp_path / f"{seed}.png")
    common = [f"pipeline={folder}", "progress=false", "size=16", "decoder.steps=3"]
    runs = {
        "interp": [f"interpolate=[{tmp_path / '0.png'},{tmp_path / '1.png'}]", "num_images=3"],
        "diff": [f"image={tmp_path / '0.png'}", "prompt=a red star", "text_diff=a blue star", "num_images=2"],
        "var": [f"image={tmp_path / '1.png'}", "num_images=2", "size=64"],
    }
    for name, args in runs.items():
        result = run_sample_cli([*common, *args, f"out={tmp_path / name}"], tmp_path)
        assert result.returncode == 0, (name, result.stderr)
    interp = json.loads((tmp_path / "interp" / "samples.json").read_text())
    assert interp["mode"] == "interpolate" and len(interp["sources"]) == 2 and len(interp["rows"]) == 3
    diff = json.loads((tmp_path / "diff" / "samples.json").read_text())
    assert diff["target"] == "a blue star" and diff["settings"]["decoder"]["sampler"] == "ddim"
    assert load_image(tmp_path / "var" / "0001.png").shape == (3, 64, 64)


@pytest.mark.parametrize(
    "args, message",
    [
        (["interpolate=[a.png]"], "exactly two image files"),
        (["image=a.png", "text_diff=a blue star"], "needs image=<file> and prompt="),
        (["prompt=a red star", "size=32"], "size=32 is not one this pipeline makes"),
        (["prompt=a red star", "precision=fp8"], "precision='fp8'"),
        (["prompt=a red star", "sr1024.steps=3", "size=64"], "sr1024 settings do not apply"),
        (["prompt=a red star", "negative_prompt=" + " ".join(["word"] * 40)], "longer than the CLIP context"),
        (["interpolate=[nowhere.png,nowhere.png]"], "nowhere.png"),
        (["prompt=a red star", "sr256.stepz=3"], "stepz"),
    ],
)
def test_sample_cli_bad_input_is_one_line(folder, tmp_path, args, message, monkeypatch, capsys):
    argv = ["unclip-sample", f"pipeline={folder}", *args, "progress=false", f"out={tmp_path / 'o'}"]
    code, stderr = run_cli_in_process(sample_main, argv, tmp_path, monkeypatch, capsys)
    assert code != 0
    assert message in stderr and "Traceback" not in stderr


def test_sample_console_script_exits_1_with_one_line(folder, tmp_path):
    result = run_sample_cli([f"pipeline={folder}", "interpolate=[a.png]", f"out={tmp_path / 'o'}"], tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error:") and "Traceback" not in result.stderr
