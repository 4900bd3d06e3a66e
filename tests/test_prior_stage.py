"""The diffusion-prior stage: config, loss, guidance dropout, best-of-n, normalisation, train/export/load."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import FAST_RUN, compose_train
from unclip.clip.model import ClipEncoder, TextEncoding
from unclip.config.schema import validate
from unclip.errors import CheckpointError, ConfigError
from unclip.io import read_yaml
from unclip.models.prior import PriorConfig
from unclip.prior_sampling import DiffusionPrior, EmbeddingNormalizer, best_of_n, sample_prior
from unclip.train.trainer import Trainer

D, D_TEXT, L = 16, 12, 6
SAMPLING = {"sampler": "ddim", "steps": "8", "eta": 0.0, "guidance_scale": 2.0, "candidates": 2}
FAST_PRIOR = [
    "stage=prior",
    "stage.model.width=32",
    "stage.model.layers=2",
    "stage.sampling.steps=8",
    "stage.eval_captions=32",
    *FAST_RUN,
]


@pytest.fixture(scope="module")
def trained_run(clip_dirs, tmp_path_factory):
    """A prior trained a few steps through the one trainer; (run folder, final metrics)."""
    cfg = compose_train([*FAST_PRIOR, f"stage.clip={clip_dirs[0]}", "trainer.max_steps=4"])
    run = tmp_path_factory.mktemp("prior_run")
    return run, Trainer(cfg, run).fit()


def _prior(normalize: str = "zscore", seed: int = 0) -> DiffusionPrior:
    torch.manual_seed(seed)
    config = PriorConfig.preset(
        "tiny", clip_embed_dim=D, text_token_dim=D_TEXT, width=32, layers=2, max_text_tokens=8
    )
    normalizer = EmbeddingNormalizer.fit(normalize, [torch.randn(64, D) * 3 + 1])
    return DiffusionPrior(config, normalizer, "cosine", SAMPLING)


def _batch(n: int = 5, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "image_embedding": torch.randn(n, D, generator=g),
        "text_tokens": torch.randn(n, L, D_TEXT, generator=g).half(),
        "token_mask": torch.arange(L)[None] < torch.randint(2, L + 1, (n, 1), generator=g),
        "text_embedding": torch.randn(n, D, generator=g),
    }


def _text(batch: dict[str, torch.Tensor]) -> TextEncoding:
    return TextEncoding(batch["text_tokens"], batch["token_mask"], batch["text_embedding"])


def test_prior_config_composes_and_bad_values_are_named(compose_cfg, clip_dirs):
    cfg = compose_cfg(["stage=prior", f"stage.clip={clip_dirs[0]}"])
    validate(cfg)
    assert cfg.stage.name == "prior" and cfg.stage.normalize == "zscore"
    assert cfg.stage.sampling.steps == "64" and cfg.stage.sampling.candidates == 2
    assert cfg.stage.caption_drop == pytest.approx(0.1)
    with pytest.raises(ConfigError, match="stage.clip"):
        Trainer(compose_cfg(["stage=prior"]), "unused")
    for override, key in [
        ("stage.normalize=l2", "stage.normalize"),
        ("stage.sampling.sampler=euler", "sampling.sampler"),
        ("stage.caption_drop=1.5", "stage.caption_drop"),
        ("stage.model.preset=huge", "huge"),
        ("stage.model.heads=5", "heads=5"),
    ]:
        with pytest.raises(ConfigError, match=key):
            Trainer(compose_cfg(["stage=prior", f"stage.clip={clip_dirs[0]}", override]), "unused")


def test_loss_and_sampling_shapes():
    prior, batch = _prior(), _batch()
    terms = prior(**batch, caption_drop=0.1)
    assert terms["loss"].shape == (5,) and torch.isfinite(terms["loss"]).all()
    terms["loss"].mean().backward()
    assert prior.net.token_proj.weight.grad is not None
    for sampler in ("ddim", "dpmpp_2m", "ddpm"):
        z = sample_prior(
            prior.eval(), _text(batch), sampler=sampler, generator=torch.Generator().manual_seed(0)
        )
        assert z.shape == (5, D) and torch.isfinite(z).all()
    # guidance 1.0 skips the unconditional half; one candidate skips best-of-n
    z = sample_prior(prior, _text(batch), guidance_scale=1.0, candidates=1)
    assert z.shape == (5, D)


def test_caption_dropout_drops_only_the_caption():
    prior, batch = _prior(), _batch(n=8)
    other = _batch(n=8, seed=7)
    other_caption = {**batch, **{k: other[k] for k in ("text_tokens", "token_mask", "text_embedding")}}

    def loss(inputs, drop):
        torch.manual_seed(3)  # same timesteps, noise and drop decisions
        return prior(**inputs, caption_drop=drop)["loss"]

    assert torch.allclose(loss(batch, 1.0), loss(other_caption, 1.0))
    assert not torch.allclose(loss(batch, 0.0), loss(other_caption, 0.0))
    moved = {**batch, "image_embedding": batch["image_embedding"] + 1.0}
    assert not torch.allclose(loss(batch, 1.0), loss(moved, 1.0))  # x_t and the target are never dropped

    seen = []
    original = prior.net.null_condition
    prior.net.null_condition = lambda batch_size: seen.append(batch_size) or original(batch_size)
    prior(**_batch(n=4000), caption_drop=0.1)
    assert 0.08 < seen[0] / 4000 < 0.12


def test_dropped_captions_run_apart_and_give_the_masked_batch_losses():
    """The training forward runs dropped captions as their own null-condition group (their caption tokens
    are never computed); its losses equal those of the whole batch run with the dropped captions masked."""
    prior, batch = _prior(), _batch(n=16)
    torch.manual_seed(5)
    grouped = prior(**batch, caption_drop=0.4)["loss"]
    torch.manual_seed(5)  # the same draws, in the forward's order: timesteps, drops, then noise
    x0 = prior.normalizer(batch["image_embedding"])
    t = prior.diffusion.sample_timesteps(16, device=x0.device)
    drop = torch.rand(16) < 0.4
    assert 0 < drop.sum() < 16
    cond = prior.net.encode_condition(
        batch["text_tokens"].float(), batch["token_mask"], batch["text_embedding"], drop_caption=drop
    )
    masked = prior.diffusion.training_losses(lambda x_t, t_: prior.net(x_t, t_, cond), x0, t)["loss"]
    torch.testing.assert_close(grouped, masked, atol=1e-5, rtol=1e-5)
    for drop_all in (0.0, 1.0):  # one group empty: every parameter still gets a gradient (DDP needs it)
        prior.zero_grad()
        prior(**batch, caption_drop=drop_all)["loss"].mean().backward()
        assert all(p.grad is not None for p in prior.parameters() if p.requires_grad)


def test_best_of_n_keeps_the_candidate_closest_to_the_text():
    text = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    candidates = torch.tensor(
        [
            [[0.0, 1.0, 0.0], [0.9, 0.1, 0.0], [0.5, 0.5, 0.5]],
            [[0.0, 0.8, 0.6], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]],
        ]
    )
    chosen = best_of_n(candidates, text)
    assert torch.equal(chosen, torch.stack([candidates[0, 1], candidates[1, 0]]))


@pytest.mark.parametrize("mode", ["zscore", "unit_scale"])
def test_normalisation_round_trip(mode):
    z = torch.randn(256, D) * torch.linspace(0.5, 4, D) + 2.0
    normalizer = EmbeddingNormalizer.fit(mode, list(z.split(100)))
    x = normalizer(z)
    back = normalizer.inverse(x)
    if mode == "zscore":
        assert torch.allclose(x.mean(0), torch.zeros(D), atol=1e-4)
        assert torch.allclose(x.std(0), torch.ones(D), atol=1e-4)
        assert torch.allclose(back, z, atol=1e-4)
        assert torch.allclose(normalizer.clamp_x0(x), x, atol=1e-5)  # training data lies inside the range
        assert normalizer.clamp_x0(x + 100).max() <= normalizer.high.max()
    else:
        assert torch.allclose(x.norm(dim=-1), torch.full((256,), D**0.5))
        assert torch.allclose(torch.nn.functional.cosine_similarity(back, z), torch.ones(256), atol=1e-5)
        assert back.norm(dim=-1).mean() == pytest.approx(z.norm(dim=-1).mean().item(), rel=1e-4)
        assert torch.allclose(normalizer.clamp_x0(3 * x), x, atol=1e-5)


def test_stage_trains_through_the_trainer_and_exports(trained_run, clip_dirs, data_cache):
    run, metrics = trained_run
    for split in ("eval_seen", "eval_holdout"):
        for key in ("cosine", "cosine_text_baseline", "cosine_random_baseline", "colour_acc", "shape_acc"):
            assert f"{split}/{key}" in metrics
    losses = [json.loads(line).get("loss") for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(loss is not None for loss in losses)
    config = read_yaml(run / "export" / "config.yaml")
    fingerprint = ClipEncoder.load(clip_dirs[0]).fingerprint()
    assert config["kind"] == "prior" and config["clip_fingerprint"] == fingerprint
    assert config["model"]["clip_embed_dim"] == 32 and config["model"]["max_text_tokens"] == 24
    assert config["sampling"]["steps"] == "8"
    assert (data_cache / "embeddings" / fingerprint).is_dir()  # the splits were embedded once, cached


def test_export_load_round_trip(trained_run, clip_dirs):
    run, _ = trained_run
    encoder = ClipEncoder.load(clip_dirs[0])
    prior = DiffusionPrior.load(run / "export", encoder.fingerprint())
    again = DiffusionPrior.load(run / "export", encoder.fingerprint())
    assert prior.normalizer.mode == "zscore" and prior.sampling["steps"] == "8"
    text = encoder.encode_text(encoder.tokenize(["a red circle", "a big blue star on the left"]))
    a = sample_prior(prior, text, generator=torch.Generator().manual_seed(0))
    b = sample_prior(again, text, generator=torch.Generator().manual_seed(0))
    assert a.shape == (2, 32) and torch.equal(a, b)


def test_loading_against_another_clip_or_another_kind_is_refused(
    trained_run, clip_dirs, compose_cfg, tmp_path
):
    run, _ = trained_run
    other = ClipEncoder.load(clip_dirs[1]).fingerprint()
    with pytest.raises(CheckpointError, match="config.yaml"):
        DiffusionPrior.load(run / "export", other)
    with pytest.raises(CheckpointError, match="not a diffusion prior"):
        DiffusionPrior.load(clip_dirs[0], ClipEncoder.load(clip_dirs[0]).fingerprint())
    cfg = compose_cfg([*FAST_PRIOR, f"stage.clip={run / 'export'}", "trainer.max_steps=1"])
    with pytest.raises(CheckpointError, match="not a CLIP"):
        Trainer(cfg, tmp_path).fit()


def test_prior_beats_the_random_baseline_on_a_small_problem():
    # six captions, each with its own cluster of image embeddings: the prior must learn which goes with which
    g = torch.Generator().manual_seed(0)
    tokens, text = torch.randn(6, L, D_TEXT, generator=g), torch.randn(6, D, generator=g)
    centres = torch.randn(6, D, generator=g) + 1.0
    labels = torch.randint(6, (2048,), generator=g)
    images = centres[labels] + 0.3 * torch.randn(2048, D, generator=g)
    mask = torch.ones(6, L, dtype=torch.bool)
    torch.manual_seed(0)
    config = PriorConfig.preset("tiny", clip_embed_dim=D, text_token_dim=D_TEXT, width=32, layers=2)
    prior = DiffusionPrior(config, EmbeddingNormalizer.fit("zscore", [images]), "cosine", SAMPLING)
    optimizer = torch.optim.AdamW(prior.parameters(), lr=3e-3)
    for _ in range(300):
        pick = torch.randint(2048, (64,), generator=g)
        y = labels[pick]
        loss = prior(images[pick], tokens[y], mask[y], text[y], caption_drop=0.1)["loss"].mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    sampled = sample_prior(prior.eval(), TextEncoding(tokens, mask, text), generator=g)
    cosine = torch.nn.functional.cosine_similarity(sampled, centres).mean()
    random = torch.nn.functional.cosine_similarity(images[torch.randperm(2048, generator=g)[:6]], centres)
    assert cosine > random.mean() + 0.3, (cosine, random)
    nearest = (torch.nn.functional.normalize(sampled) @ torch.nn.functional.normalize(centres).T).argmax(1)
    assert torch.equal(nearest, torch.arange(6))
