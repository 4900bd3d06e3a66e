"""The decoder stage: config, guidance dropout, one-forward guidance, train/export/load, text -> image."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hydra.errors import ConfigCompositionException

from tests.conftest import FAST_RUN, compose_train, run_sample_cli
from unclip.clip.model import ClipEncoder
from unclip.config.schema import validate
from unclip.data import shapes
from unclip.decoder_sampling import DiffusionDecoder, decoder_config, sample_decoder
from unclip.errors import CheckpointError, ConfigError, DataError
from unclip.eval.decoder_eval import attribute_sources, denoising_profile
from unclip.images import load_image, model_range
from unclip.io import read_yaml
from unclip.models.prior import PriorConfig
from unclip.pipeline import UnCLIPPipeline, assemble
from unclip.prior_sampling import DiffusionPrior, EmbeddingNormalizer
from unclip.train.trainer import Trainer

# a 2 x 2 stem keeps 16 px inputs workable for the model-level tests
SMALL_UNET = {"model_channels": 16, "num_head_channels": 16, "stem_factor": 2, "attention_downsample": [4, 8]}
SMALL_TEXT = {"width": 16, "layers": 1}
FAST_DECODER = [
    "stage=decoder",
    "stage.image_size=32",
    "stage.model.unet.model_channels=16",
    "stage.model.unet.num_head_channels=16",
    "stage.model.text.width=16",
    "stage.model.text.layers=1",
    "stage.sampling.steps=4",
    "stage.eval_images=8",
    *FAST_RUN,
]
DIFFUSION = {
    "schedule": "cosine",
    "schedule_shift": 1.0,
    "num_timesteps": 100,
    "prediction": "eps",
    "variance": "learned",
    "loss_weighting": "none",
}
SAMPLING = {"sampler": "ddim", "steps": "6", "eta": 0.0, "guidance_scale": 3.0}


def small_decoder(size: int = 16, seed: int = 0, **diffusion) -> DiffusionDecoder:
    torch.manual_seed(seed)
    options = {**DIFFUSION, **diffusion}
    config = decoder_config(
        "tiny",
        clip_embed_dim=32,
        context_length=24,
        learn_sigma=options["variance"] == "learned",
        unet=SMALL_UNET,
        text=SMALL_TEXT,
    )
    return DiffusionDecoder(config, size, options, SAMPLING)


@pytest.fixture(scope="module")
def trained_run(clip_dirs, tmp_path_factory):
    """A decoder trained a few steps through the one trainer; (run folder, final metrics)."""
    cfg = compose_train([*FAST_DECODER, f"stage.clip={clip_dirs[0]}", "trainer.max_steps=3"])
    run = tmp_path_factory.mktemp("decoder_run")
    return run, Trainer(cfg, run).fit()


def test_decoder_config_composes_and_bad_values_are_named(compose_cfg, clip_dirs):
    cfg = compose_cfg(["stage=decoder", f"stage.clip={clip_dirs[0]}"])
    validate(cfg)
    stage = cfg.stage
    assert stage.image_size == 64 and stage.model.preset == "tiny" and stage.variance == "learned"
    assert stage.image_embedding_drop == pytest.approx(0.1) and stage.caption_drop == pytest.approx(0.5)
    assert set(stage.sampling) == {"sampler", "steps", "eta", "guidance_scale"}
    assert stage.edge_loss_weight == 0.0
    recipe = compose_cfg(["experiment=shapes_decoder", f"stage.clip={clip_dirs[0]}"])
    validate(recipe)
    assert recipe.stage.variance == "fixed_small"
    with pytest.raises(ConfigError, match="stage.clip"):
        Trainer(compose_cfg(["stage=decoder"]), "unused")
    for override, key in [
        ("stage.caption_drop=1.5", "stage.caption_drop"),
        ("stage.image_embedding_drop=-0.1", "stage.image_embedding_drop"),
        ("stage.edge_loss_weight=-1", "stage.edge_loss_weight"),
        ("stage.prediction=score", "stage.prediction"),
        ("stage.variance=huge", "stage.variance"),
        ("stage.image_size=60", "stage.image_size"),
        ("stage.sampling.sampler=euler", "sampling.sampler"),
        ("stage.sampling.eta=0.5", "sampling.eta"),  # the default sampler is ddim, so this one is fine ...
        ("stage.model.preset=huge", "huge"),
        ("stage.model.unet.model_channels=15", "model_channels"),
        ("stage.model.text.heads=5", "heads=5"),
    ]:
        overrides = ["stage=decoder", f"stage.clip={clip_dirs[0]}", override]
        if key == "sampling.eta":  # ... but not with dpmpp_2m
            overrides.append("stage.sampling.sampler=dpmpp_2m")
        with pytest.raises(ConfigError, match=key):
            Trainer(compose_cfg(overrides), "unused")
    with pytest.raises(ConfigCompositionException) as err:
        compose_cfg(["stage=decoder", "stage.model.unet.channels=3"])
    assert "channels" in str(err.value) + str(err.value.__cause__)


def test_loss_shapes_and_dropout_of_each_condition():
    decoder = small_decoder()
    g = torch.Generator().manual_seed(0)
    images = torch.rand(6, 3, 16, 16, generator=g) * 2 - 1
    z, other_z = torch.randn(6, 32, generator=g), torch.randn(6, 32, generator=g)
    tokens = torch.tensor([[49406, 320, 1615, 49407, 0]] * 6)
    other_tokens = torch.tensor([[49406, 1746, 3240, 530, 49407]] * 6)
    terms = decoder(images, z, tokens, 0.1, 0.5)
    assert set(terms) == {"loss", "mse", "vb"} and terms["loss"].shape == (6,)
    terms["loss"].mean().backward()
    assert decoder.net.image_to_tokens.weight.grad is not None

    def loss(z_, tokens_, image_drop, caption_drop):
        torch.manual_seed(3)  # same timesteps, noise and drop decisions
        return decoder(images, z_, tokens_, image_drop, caption_drop)["loss"]

    # zero-initialised output layers make every input look alike: give them weights first
    with torch.no_grad():
        for p in decoder.parameters():
            if not p.any():
                p.normal_(0, 0.05, generator=g)
    assert torch.allclose(loss(z, tokens, 0.999999, 0.0), loss(other_z, tokens, 0.999999, 0.0))
    assert not torch.allclose(loss(z, tokens, 0.0, 0.0), loss(other_z, tokens, 0.0, 0.0))
    assert torch.allclose(loss(z, tokens, 0.0, 0.999999), loss(z, other_tokens, 0.0, 0.999999))
    assert not torch.allclose(loss(z, tokens, 0.0, 0.0), loss(z, other_tokens, 0.0, 0.0))


def test_edge_loss_weight_reweights_the_loss_only():
    decoder = small_decoder()
    images = -torch.ones(2, 3, 16, 16)
    images[:, :, 4:10, 6:12] = 1.0
    z = torch.randn(2, 32, generator=torch.Generator().manual_seed(0))
    tokens = torch.tensor([[49406, 49407]] * 2)

    def terms(edge):
        torch.manual_seed(3)  # same timesteps and noise
        return decoder(images, z, tokens, edge_loss_weight=edge)

    plain, edged = terms(0.0), terms(10.0)
    torch.testing.assert_close(edged["mse"], plain["mse"])
    assert not torch.allclose(edged["loss"], plain["loss"])


def test_drop_rates_are_those_configured(monkeypatch):
    decoder, seen = small_decoder(), {}

    class Seen(Exception):
        pass

    def spy(image_embedding, caption_tokens, drop_image_embedding, drop_caption):
        seen.update(image=drop_image_embedding.float().mean(), caption=drop_caption.float().mean())
        raise Seen

    monkeypatch.setattr(decoder.net, "encode_condition", spy)
    with pytest.raises(Seen):
        decoder(torch.zeros(20000, 3, 16, 16), torch.zeros(20000, 32), None, 0.1, 0.5)
    assert 0.09 < seen["image"] < 0.11 and 0.48 < seen["caption"] < 0.52


def test_guidance_encodes_the_condition_once_and_runs_one_batched_forward_per_step(monkeypatch):
    decoder = small_decoder().eval()
    encodes, forwards = [], []
    encode, forward = decoder.net.encode_condition, decoder.net.forward
    monkeypatch.setattr(decoder.net, "encode_condition", lambda *a, **k: encodes.append(1) or encode(*a, **k))
    monkeypatch.setattr(decoder.net, "forward", lambda x, t, c: forwards.append(len(x)) or forward(x, t, c))
    z, tokens = torch.randn(3, 32), torch.tensor([[49406, 320, 49407]] * 3)
    images = sample_decoder(decoder, z, tokens, generator=torch.Generator().manual_seed(0), steps="5")
    assert images.shape == (3, 3, 16, 16) and images.min() >= 0 and images.max() <= 1
    assert len(encodes) == 2 and forwards == [6] * 5  # cond + null once; [cond; null] every step
    encodes.clear(), forwards.clear()
    sample_decoder(decoder, z, None, guidance_scale=1.0, steps="5")
    assert len(encodes) == 1 and forwards == [3] * 5  # scale 1: no unconditional half


def test_stage_trains_through_the_trainer_and_exports(trained_run, clip_dirs, data_cache):
    run, metrics = trained_run
    for split in ("eval_seen", "eval_holdout"):
        for mode in ("", "no_caption/"):
            for key in ("colour_acc", "shape_acc", "position_acc", "clip_cosine", "clip_cosine_shuffled"):
                assert f"{split}/{mode}{key}" in metrics
        assert {f"{split}/x0_mse@t={t}" for t in (0, 50, 150, 300, 599)} <= set(metrics)
        sources = {f"{split}/shape_from_{s}@t={t}" for s in ("image", "condition") for t in (300, 500, 699)}
        assert sources <= set(metrics) and all(0 <= metrics[key] <= 1 for key in sources)
    assert -1 <= metrics["eval_seen/clip_cosine"] <= 1
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in r and "vb" in r for r in rows)
    config = read_yaml(run / "export" / "config.yaml")
    fingerprint = ClipEncoder.load(clip_dirs[0]).fingerprint()
    assert config["kind"] == "decoder" and config["clip_fingerprint"] == fingerprint
    assert config["model"]["clip_embed_dim"] == 32 and config["model"]["text"]["context_length"] == 24
    assert config["image_size"] == 32 and config["sampling"]["steps"] == "4"
    assert (data_cache / "embeddings" / fingerprint).is_dir()  # the splits were embedded once, cached


def test_denoising_profile_scores_the_x0_estimate_against_the_noisy_input(monkeypatch):
    """An oracle network (its output is the true x_0) scores 0 at every noise level; a blind one (outputs 0)
    scores the mean square of the images; the noisy input scores 1 / SNR(t)."""
    decoder = small_decoder(prediction="x0").eval()
    true_x0 = torch.rand(64, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    embeddings, tokens = torch.randn(64, 32), torch.randint(1, 100, (64, 24))

    def profile():
        return denoising_profile(
            decoder,
            true_x0,
            embeddings,
            tokens,
            generator=torch.Generator().manual_seed(0),
            fractions=(0, 0.5),
        )

    monkeypatch.setattr(decoder.net, "forward", lambda x_t, t, cond: torch.cat([true_x0, true_x0], dim=1))
    oracle = profile()
    assert set(oracle) == {"x0_mse@t=0", "input_mse@t=0", "x0_mse@t=50", "input_mse@t=50"}
    assert oracle["x0_mse@t=0"] < 1e-12 and oracle["x0_mse@t=50"] < 1e-12
    snr = decoder.diffusion.schedule.snr
    for t in (0, 50):
        assert oracle[f"input_mse@t={t}"] == pytest.approx(1 / snr[t], rel=0.05)
    monkeypatch.setattr(decoder.net, "forward", lambda x_t, t, cond: torch.zeros_like(x_t).repeat(1, 2, 1, 1))
    blind = profile()
    assert blind["x0_mse@t=50"] == pytest.approx(float(true_x0.square().mean()), rel=1e-5)


def test_attribute_sources_tell_a_conditioned_renderer_from_a_denoiser(monkeypatch):
    """A network that draws the image its conditioning names takes every attribute from the conditioning; one
    that draws the render nearest to x_t takes every attribute from the image; both are read exactly."""
    records = [shapes.make_record(0, "train", i) for i in range(12)]
    renders = torch.stack(
        [
            model_range(torch.from_numpy(np.array(shapes.render(shapes.sample_spec(0, "train", i), 64))))
            for i in range(12)
        ]
    ).permute(0, 3, 1, 2)
    decoder = small_decoder(prediction="x0").eval()
    ab = torch.tensor(decoder.diffusion.schedule.alphas_cumprod, dtype=torch.float32)
    index_embedding = torch.arange(12.0)[:, None].expand(12, 32)  # the fake condition is the image's index
    monkeypatch.setattr(decoder.net, "encode_condition", lambda embedding, tokens: embedding[:, 0].long())

    def sources():
        found = attribute_sources(
            decoder, renders, index_embedding, None, records, generator=torch.Generator().manual_seed(0)
        )
        assert set(found) == {
            f"{a}_from_{source}@t={t}"
            for a in ("colour", "shape")
            for source in ("image", "condition")
            for t in (30, 50, 69)
        }
        return found

    monkeypatch.setattr(decoder.net, "forward", lambda x_t, t, cond: renders[cond].repeat(1, 2, 1, 1))
    assert all(v == (1.0 if "condition" in k else 0.0) for k, v in sources().items())

    def nearest_render(x_t, t, cond):
        distance = (
            (x_t[:, None] - ab[t].sqrt().view(-1, 1, 1, 1, 1) * renders[None]).square().flatten(2).sum(-1)
        )
        return renders[distance.argmin(1)].repeat(1, 2, 1, 1)

    monkeypatch.setattr(decoder.net, "forward", nearest_render)
    assert all(v == (1.0 if "image" in k else 0.0) for k, v in sources().items())


def test_export_load_round_trip_and_refusals(trained_run, clip_dirs, tmp_path):
    run, _ = trained_run
    fingerprint = ClipEncoder.load(clip_dirs[0]).fingerprint()
    a, b = (
        DiffusionDecoder.load(run / "export", fingerprint),
        DiffusionDecoder.load(run / "export", fingerprint),
    )
    z, tokens = torch.randn(2, 32), ClipEncoder.load(clip_dirs[0]).tokenize(["a red star", "a blue circle"])
    first = sample_decoder(a, z, tokens, generator=torch.Generator().manual_seed(0))
    assert first.shape == (2, 3, 32, 32)
    assert torch.equal(first, sample_decoder(b, z, tokens, generator=torch.Generator().manual_seed(0)))
    with pytest.raises(CheckpointError, match="trained against CLIP"):
        DiffusionDecoder.load(run / "export", ClipEncoder.load(clip_dirs[1]).fingerprint())
    with pytest.raises(CheckpointError, match="not a decoder"):
        DiffusionDecoder.load(clip_dirs[0], fingerprint)
    # the run's config with the weights of another architecture (no learned variance: 3 output channels)
    small_decoder(size=32, variance="fixed_small").save(tmp_path / "broken", fingerprint)
    (tmp_path / "broken" / "config.yaml").write_text((run / "export" / "config.yaml").read_text())
    with pytest.raises(CheckpointError, match="does not fit this model"):
        DiffusionDecoder.load(tmp_path / "broken", fingerprint)


def test_pipeline_and_cli_turn_text_into_pngs(trained_run, clip_dirs, tmp_path):
    run, _ = trained_run
    clip = ClipEncoder.load(clip_dirs[0])
    config = PriorConfig.preset(
        "tiny", clip_embed_dim=32, text_token_dim=32, max_text_tokens=24, num_timesteps=100
    )
    prior_sampling = {"sampler": "ddim", "steps": "4", "eta": 0.0, "guidance_scale": 2.0, "candidates": 1}
    DiffusionPrior(config, EmbeddingNormalizer("unit_scale", 32), "cosine", prior_sampling).save(
        tmp_path / "prior", clip.fingerprint()
    )
    folder = assemble(
        tmp_path / "pipe", {"clip": clip_dirs[0], "prior": tmp_path / "prior", "decoder": run / "export"}
    )
    assert read_yaml(folder / "pipeline.yaml")["stages"] == ["clip", "prior", "decoder"]
    pipe = UnCLIPPipeline.load(folder)
    embeddings, images = pipe.text_to_image(["a red star", "a blue circle"], num_images=2, seed=1)
    assert embeddings.shape == (4, 32) and images.shape == (4, 3, 32, 32)
    again = pipe.text_to_image(["a red star", "a blue circle"], num_images=2, seed=1)[1]
    assert torch.equal(images, again)

    args = [f"pipeline={folder}", "prompt=a small red star", "num_images=2", "seed=3", "progress=false"]
    result = run_sample_cli([*args, "decoder.steps=3", f"out={tmp_path / 'out'}"], tmp_path)
    assert result.returncode == 0, result.stderr
    sidecar = json.loads((tmp_path / "out" / "samples.json").read_text())
    assert sidecar["settings"]["decoder"]["steps"] == "3" and [r["file"] for r in sidecar["rows"]] == [
        "0000.png",
        "0001.png",
    ]
    assert load_image(tmp_path / "out" / "0001.png").shape == (3, 32, 32)


def test_sample_cli_refuses_settings_that_do_not_apply(compose_cfg, tmp_path):
    from unclip.cli.sample import _generate

    cfg = compose_cfg(["pipeline=unused", "prompt=a red star", "invert=true"], config_name="sample")
    with pytest.raises(ConfigError, match="give image="):
        _generate(cfg, tmp_path)
    cfg = compose_cfg(["pipeline=unused", "image=photo.png", "prompts_file=p.txt"], config_name="sample")
    with pytest.raises(ConfigError, match="at most one caption"):
        _generate(cfg, tmp_path)
    cfg = compose_cfg(["pipeline=unused", f"image={tmp_path / 'none.png'}"], config_name="sample")
    with pytest.raises(DataError, match="none.png"):
        _generate(cfg, tmp_path)
