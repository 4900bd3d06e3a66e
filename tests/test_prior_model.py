"""The diffusion prior's network: masking, conditioning, guidance batching, size, learning."""

import math

import pytest
import torch

from unclip.errors import ConfigError
from unclip.models.prior import PriorConfig, PriorTransformer, concat_conditions, timestep_embedding

D, D_TEXT, L = 16, 12, 7


def _prior() -> PriorTransformer:
    torch.manual_seed(0)
    cfg = PriorConfig.preset(
        "tiny", clip_embed_dim=D, text_token_dim=D_TEXT, width=32, layers=2, heads=4, max_text_tokens=10
    )
    return PriorTransformer(cfg).eval()


def _inputs(batch: int = 3, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([L, 4, 2, 5, 1, 6][:batch])
    return dict(
        text_tokens=torch.randn(batch, L, D_TEXT, generator=g),
        token_mask=torch.arange(L)[None] < lengths[:, None],
        text_embedding=torch.randn(batch, D, generator=g),
        x_t=torch.randn(batch, D, generator=g),
        t=torch.randint(0, 1000, (batch,), generator=g),
    )


def _run(prior: PriorTransformer, inp: dict, drop_caption: torch.Tensor | None = None) -> torch.Tensor:
    cond = prior.encode_condition(inp["text_tokens"], inp["token_mask"], inp["text_embedding"], drop_caption)
    return prior(inp["x_t"], inp["t"], cond)


def test_output_shape_and_finite():
    prior, inp = _prior(), _inputs()
    out = _run(prior, inp)
    assert out.shape == (3, D)
    assert torch.isfinite(out).all()


def test_later_positions_never_change_earlier_outputs():
    prior, inp = _prior(), _inputs()
    cond = prior.encode_condition(inp["text_tokens"], inp["token_mask"], inp["text_embedding"])
    outputs = []
    hook = prior.blocks[0].register_forward_hook(lambda mod, args, out: outputs.append(out))
    prior(inp["x_t"], inp["t"], cond)
    prior(inp["x_t"] + 1.0, inp["t"], cond)  # x_t is the second-to-last position
    hook.remove()
    before, after = outputs
    assert torch.allclose(before[:, :-2], after[:, :-2], atol=1e-6)
    assert not torch.allclose(before[:, -2:], after[:, -2:], atol=1e-3)


def test_prediction_depends_on_caption_x_t_and_t():
    prior, inp = _prior(), _inputs()
    base = _run(prior, inp)
    changes = {
        "text_tokens": inp["text_tokens"] + torch.randn_like(inp["text_tokens"]),
        "text_embedding": inp["text_embedding"] + 1.0,
        "x_t": inp["x_t"] + 1.0,
        "t": (inp["t"] + 300) % 1000,
    }
    for name, value in changes.items():
        out = _run(prior, {**inp, name: value})
        assert (out - base).abs().amax(dim=-1).min() > 1e-4, name


def test_padded_caption_tokens_do_not_change_output():
    prior, inp = _prior(), _inputs()
    base = _run(prior, inp)
    garbage = torch.where(
        inp["token_mask"][..., None], inp["text_tokens"], 100 * torch.randn_like(inp["text_tokens"])
    )
    assert torch.allclose(_run(prior, {**inp, "text_tokens": garbage}), base, atol=1e-5)
    # padding further (more masked tokens at the end) changes nothing either
    padded = {
        **inp,
        "text_tokens": torch.cat([inp["text_tokens"], torch.randn(3, 3, D_TEXT)], dim=1),
        "token_mask": torch.cat([inp["token_mask"], torch.zeros(3, 3, dtype=torch.bool)], dim=1),
    }
    assert torch.allclose(_run(prior, padded), base, atol=1e-5)


def test_trailing_padding_is_cut_and_changes_nothing():
    """A short caption batched with a full-length one (nothing cut) gives what it gives alone (cut)."""
    prior, inp = _prior(), _inputs()
    mask = inp["token_mask"].clone()
    mask[0, 2:], mask[1] = False, True
    inp = {**inp, "token_mask": mask}
    cond = prior.encode_condition(inp["text_tokens"], mask, inp["text_embedding"])
    alone = {k: v[:1] for k, v in inp.items()}
    cut = prior.encode_condition(alone["text_tokens"], alone["token_mask"], alone["text_embedding"])
    assert cond.tokens.shape[1] == inp["text_tokens"].shape[1] and cut.tokens.shape[1] == 2
    torch.testing.assert_close(_run(prior, alone), _run(prior, inp)[:1], atol=1e-5, rtol=0)
    dropped = prior.encode_condition(**_caption(inp), drop_caption=torch.ones(3, dtype=torch.bool))
    assert dropped.tokens.shape[1] == 0


def test_drop_caption_makes_output_independent_of_caption():
    prior, inp = _prior(), _inputs()
    other = _inputs(seed=2)
    drop = torch.tensor([True, False, True])
    a = _run(prior, inp, drop)
    b = _run(prior, {**other, "x_t": inp["x_t"], "t": inp["t"]}, drop)
    assert torch.allclose(a[drop], b[drop], atol=1e-5)
    assert not torch.allclose(a[~drop], b[~drop], atol=1e-3)
    # dropping equals the null condition, and changes the kept rows of the batch not at all
    null = prior(inp["x_t"], inp["t"], prior.null_condition(3))
    assert torch.allclose(a[drop], null[drop], atol=1e-5)
    assert torch.allclose(a[~drop], _run(prior, inp)[~drop], atol=1e-5)


def test_encode_condition_once_equals_building_per_step():
    """The cached condition reused across steps gives what a fresh encode at every step gives."""
    prior, inp = _prior(), _inputs()
    cond = prior.encode_condition(inp["text_tokens"], inp["token_mask"], inp["text_embedding"])
    for step in (999, 500, 0):
        t = torch.full((3,), step)
        assert torch.equal(prior(inp["x_t"], t, cond), _run(prior, {**inp, "t": t}))


def _whole_sequence(prior: PriorTransformer, x_t: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
    """The §2.2 network read literally: the whole sequence through every layer, the query's output read."""
    cfg, pos = prior.config, prior.pos[prior.config.max_text_tokens + 1 :]
    time = prior.time_mlp(timestep_embedding(t * (1000.0 / cfg.num_timesteps), cfg.width)) + pos[0]
    query = (prior.query + pos[2]).expand(len(x_t), -1)
    extra = torch.stack([cond.text, time, prior.image_proj(x_t) + pos[1], query], dim=1)
    h = torch.cat([cond.tokens, extra], dim=1)
    for block in prior.blocks:
        h = block(h, cond.attn_mask)
    return prior.out_proj(prior.ln_out(h[:, -1]))


def test_cached_prefix_and_folded_last_layer_give_the_whole_sequence_output():
    """Attending to the caption prefix's keys and values cached once for every step, and the training
    forward (whole sequence, the last layer's keys and values folded into its one query), are the network
    run over the whole sequence, padded captions and dropped ones included."""
    prior, inp = _prior(), _inputs()
    drop = torch.tensor([False, True, False])
    cond = prior.encode_condition(**_caption(inp), drop_caption=drop)
    cached = prior.cache_prefix(cond)
    assert len(cached.prefix) == prior.config.layers
    for step in (999, 500, 0):
        t = torch.full((3,), step)
        reference = _whole_sequence(prior, inp["x_t"], t, cond)
        assert torch.allclose(prior(inp["x_t"], t, cond), reference, atol=1e-5)
        assert torch.allclose(prior(inp["x_t"], t, cached), reference, atol=1e-5)
    both = prior.cache_prefix(concat_conditions(cond, prior.null_condition(3)))
    x2, t2 = torch.cat([inp["x_t"]] * 2), torch.cat([inp["t"]] * 2)
    assert torch.allclose(
        prior(x2, t2, both), _whole_sequence(prior, x2, t2, concat_conditions(cond, prior.null_condition(3)))
    )


def test_training_gradients_match_the_whole_sequence():
    """Training through the forward with the folded last layer gives the whole-sequence gradients."""
    prior, inp = _prior(), _inputs()
    prior.train()
    grads = []
    for forward in (prior, lambda x, t, c: _whole_sequence(prior, x, t, c)):
        prior.zero_grad()
        cond = prior.encode_condition(**_caption(inp))
        forward(inp["x_t"], inp["t"], cond).square().sum().backward()
        grads.append([torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in prior.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-5)


def test_batched_guidance_matches_separate_forwards():
    prior, inp = _prior(), _inputs()
    cond = prior.encode_condition(inp["text_tokens"], inp["token_mask"], inp["text_embedding"])
    for uncond in (
        prior.null_condition(3),
        prior.encode_condition(**_caption(inp), drop_caption=torch.ones(3, dtype=torch.bool)),
    ):
        both = concat_conditions(cond, uncond)
        x2, t2 = torch.cat([inp["x_t"]] * 2), torch.cat([inp["t"]] * 2)
        cond_out, uncond_out = prior(x2, t2, both).chunk(2)
        assert torch.allclose(cond_out, prior(inp["x_t"], inp["t"], cond), atol=1e-5)
        assert torch.allclose(uncond_out, prior(inp["x_t"], inp["t"], uncond), atol=1e-5)


def test_bf16_autocast_runs_both_paths_close_to_fp32():
    """Under bf16 autocast the boolean-free mask and the folded last layer take the network's dtypes."""
    prior, inp = _prior(), _inputs()
    cond = prior.encode_condition(**_caption(inp))
    reference = prior(inp["x_t"], inp["t"], cond)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        whole = prior(inp["x_t"], inp["t"], cond)
        cached = prior(inp["x_t"], inp["t"], prior.cache_prefix(cond))
    for out in (whole, cached):
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), reference, atol=0.05, rtol=0.05)


def _caption(inp: dict) -> dict:
    return {k: inp[k] for k in ("text_tokens", "token_mask", "text_embedding")}


def test_paper_preset_has_one_billion_parameters():
    """unCLIP Table 3: the diffusion prior has 1B parameters."""
    with torch.device("meta"):
        prior = PriorTransformer(PriorConfig.preset("paper"))
    count = sum(p.numel() for p in prior.parameters())
    assert abs(count - 1e9) / 1e9 < 0.10, count
    assert prior.config.width == 2048 and prior.config.heads == 32 and prior.config.clip_embed_dim == 768


def test_bad_config_and_inputs_name_the_value():
    with pytest.raises(ConfigError, match="heads=5"):
        PriorConfig(width=32, heads=5)
    with pytest.raises(ConfigError, match="preset 'huge'"):
        PriorConfig.preset("huge")
    prior, inp = _prior(), _inputs()
    with pytest.raises(ConfigError, match="width 13"):
        prior.encode_condition(torch.randn(3, L, 13), inp["token_mask"], inp["text_embedding"])
    with pytest.raises(ConfigError, match="11 tokens"):
        prior.encode_condition(
            torch.randn(3, 11, D_TEXT), torch.ones(3, 11, dtype=torch.bool), inp["text_embedding"]
        )


def test_tiny_prior_overfits_a_small_batch():
    """x0-prediction loss (§2.2) on 8 fixed (caption, embedding) pairs falls by 100x within 100 steps."""
    torch.manual_seed(0)
    cfg = PriorConfig.preset("tiny", clip_embed_dim=D, text_token_dim=D_TEXT)
    prior = PriorTransformer(cfg)
    batch, T = 8, cfg.num_timesteps
    g = torch.Generator().manual_seed(0)
    tokens, mask = torch.randn(batch, L, D_TEXT, generator=g), torch.rand(batch, L, generator=g) < 0.8
    mask[:, 0] = True
    text, x0 = torch.randn(batch, D, generator=g), torch.randn(batch, D, generator=g)

    def loss_at(t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        alpha_bar = (
            torch.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2
        )  # cosine schedule (Nichol & Dhariwal)
        x_t = alpha_bar.sqrt()[:, None] * x0 + (1 - alpha_bar).sqrt()[:, None] * noise
        return (prior(x_t, t, prior.encode_condition(tokens, mask, text)) - x0).pow(2).mean()

    eval_t = torch.randint(0, T, (4, batch), generator=g)
    eval_noise = torch.randn(4, batch, D, generator=g)

    def eval_loss() -> float:
        prior.eval()
        with torch.no_grad():
            return sum(loss_at(t, n).item() for t, n in zip(eval_t, eval_noise)) / len(eval_t)

    before = eval_loss()
    opt = torch.optim.AdamW(prior.parameters(), lr=2e-3)
    prior.train()
    for _ in range(100):
        loss = loss_at(torch.randint(0, T, (batch,)), torch.randn(batch, D))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    assert after < before / 100, (before, after)
