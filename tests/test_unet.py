"""The image models: ADM/GLIDE U-Net, caption transformer, unCLIP decoder and upsamplers."""

import copy

import pytest
import torch
import torch.nn.functional as F

from unclip.errors import ConfigError
from unclip.models.decoder import Decoder, cat_conditions, decoder_tiny
from unclip.models.text_encoder import TextEncoder, TextEncoderConfig
from unclip.models.unet import UNet, UNetConfig
from unclip.models.upsampler import Upsampler, UpsamplerConfig, sr256_tiny, sr1024_tiny

SOT, EOT = 49406, 49407


def small_config(**overrides) -> UNetConfig:
    base = dict(
        model_channels=16,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_downsample=(2,),
        num_head_channels=16,
        num_groups=4,
    )
    return UNetConfig(**{**base, **overrides})


def randomize_zero_params(model: torch.nn.Module) -> torch.nn.Module:
    """Give the zero-initialised layers random weights: a fresh model outputs exactly zero, which would
    make every equality test below pass trivially."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


def captions(*lengths: int, total: int = 10) -> torch.Tensor:
    """CLIP-style token rows: <start>, words, <end>, zero padding."""
    rows = torch.zeros(len(lengths), total, dtype=torch.long)
    for i, n in enumerate(lengths):
        rows[i, 0] = SOT
        rows[i, 1 : n + 1] = torch.arange(100, 100 + n)
        rows[i, n + 1] = EOT
    return rows


@pytest.mark.parametrize("stem", [1, 2])
@pytest.mark.parametrize("context_dim", [None, 8])
@pytest.mark.parametrize("learn_sigma", [False, True])
def test_unet_output_shape(stem: int, context_dim: int | None, learn_sigma: bool) -> None:
    cfg = small_config(
        stem_factor=stem, context_dim=context_dim, learn_sigma=learn_sigma, attention_downsample=(2 * stem,)
    )
    model = UNet(cfg)
    x = torch.randn(2, 3, 16, 24)
    context = torch.randn(2, 5, 8) if context_dim else None
    out = model(x, torch.tensor([3, 700]), context=context)
    assert out.shape == (2, 6 if learn_sigma else 3, 16, 24)


def test_zero_initialised_output() -> None:
    model = UNet(small_config(context_dim=8))
    out = model(torch.randn(2, 3, 8, 8), torch.tensor([1, 2]), context=torch.randn(2, 3, 8))
    assert torch.equal(out, torch.zeros_like(out))
    assert randomize_zero_params(model)(torch.randn(2, 3, 8, 8), torch.tensor([1, 2])).abs().sum() > 0


def test_output_norm_can_be_left_out() -> None:
    """``output_norm=False`` drops ADM's last GroupNorm (and its weights), so a checkpoint of one kind
    never loads strictly into the other; the output stays zero-initialised."""
    with_norm, without = UNet(small_config()), UNet(small_config(output_norm=False))
    assert "out_norm.weight" in with_norm.state_dict()
    assert not any(key.startswith("out_norm.") for key in without.state_dict())
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([1, 2])
    assert torch.equal(without(x, t), torch.zeros(2, 3, 8, 8))
    out = randomize_zero_params(without)(x, t)
    assert out.shape == (2, 3, 8, 8) and out.abs().sum() > 0
    with pytest.raises(RuntimeError, match="out_norm"):
        without.load_state_dict(with_norm.state_dict())


def test_padded_context_tokens_do_not_change_output() -> None:
    torch.manual_seed(0)
    model = randomize_zero_params(UNet(small_config(context_dim=8))).eval()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 500])
    context = torch.randn(2, 4, 8)
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    ref = model(x, t, context=context, context_mask=mask)
    garbage = torch.where(mask[..., None], context, 100 * torch.randn_like(context))
    padded = torch.cat([garbage, torch.randn(2, 3, 8)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(2, 3, dtype=torch.bool)], dim=1)
    torch.testing.assert_close(model(x, t, context=padded, context_mask=padded_mask), ref)
    # ...while the unmasked tokens do matter.
    assert not torch.allclose(model(x, t, context=context), ref, atol=1e-4)


def test_channels_last_matches() -> None:
    torch.manual_seed(0)
    model = randomize_zero_params(
        UNet(small_config(stem_factor=2, attention_downsample=(2, 4), context_dim=8))
    )
    x, t, context = torch.randn(2, 3, 16, 16), torch.tensor([5, 900]), torch.randn(2, 3, 8)
    ref = model(x, t, context=context)
    cl_model = copy.deepcopy(model).to(memory_format=torch.channels_last)
    out = cl_model(x.to(memory_format=torch.channels_last), t, context=context)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


def test_gradient_checkpointing_gives_same_gradients() -> None:
    torch.manual_seed(0)
    plain = randomize_zero_params(UNet(small_config(context_dim=8, dropout=0.2)))
    ckpt = UNet(small_config(context_dim=8, dropout=0.2, use_checkpoint=True))
    ckpt.load_state_dict(plain.state_dict())
    x, t, context = torch.randn(2, 3, 8, 8), torch.tensor([5, 900]), torch.randn(2, 3, 8)
    grads = []
    for model in (plain, ckpt):
        torch.manual_seed(1)  # same dropout masks; checkpointing must replay them in the recomputation
        model(x, t, context=context).square().mean().backward()
        grads.append([p.grad for p in model.parameters()])
    for g_plain, g_ckpt in zip(*grads):
        torch.testing.assert_close(g_ckpt, g_plain)


def test_tiny_unet_overfits_one_batch() -> None:
    torch.manual_seed(0)
    model = UNet(
        small_config(stem_factor=2, attention_downsample=(2,), channel_mult=(1, 2), model_channels=16)
    )
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 16), torch.linspace(-1, 1, 16), indexing="ij")
    x0 = torch.stack([torch.stack([xx, yy, xx * yy]), torch.stack([yy, -xx, (xx**2 + yy**2) - 1])])
    eps = torch.randn_like(x0)
    x_t, t = 0.8 * x0 + 0.6 * eps, torch.tensor([300, 300])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(50):
        loss = F.mse_loss(model(x_t, t), eps)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10, losses


def test_attention_factor_not_matching_a_level_is_rejected() -> None:
    with pytest.raises(ConfigError, match="attention_downsample contains 3"):
        small_config(attention_downsample=(3,))
    with pytest.raises(ConfigError, match="attention_downsample contains 1"):
        small_config(stem_factor=2, attention_downsample=(1,))  # with a stem the first level is at 2


def test_text_encoder_pools_end_token_and_ignores_padding() -> None:
    torch.manual_seed(0)
    enc = TextEncoder(TextEncoderConfig(width=16, layers=2, heads=2)).eval()
    tokens = captions(3, 1, total=8)
    tokens[1, 1] = 0  # CLIP's "!" has id 0: a real token, not padding
    out = enc(tokens)
    assert out.tokens.shape == (2, 8, 16) and out.pooled.shape == (2, 16)
    assert out.mask.tolist() == [[True] * 5 + [False] * 3, [True] * 3 + [False] * 5]
    torch.testing.assert_close(out.pooled, out.tokens[[0, 1], [4, 2]])
    longer = enc(torch.cat([tokens, torch.zeros(2, 6, dtype=torch.long)], dim=1))
    torch.testing.assert_close(longer.pooled, out.pooled)
    torch.testing.assert_close(longer.tokens[:, :8][out.mask], out.tokens[out.mask])


def test_upsampler_runs_at_two_sizes() -> None:
    model = randomize_zero_params(Upsampler(sr256_tiny()))
    for low, high in [(8, 32), (16, 48)]:
        out = model(
            torch.randn(2, 3, high, high), torch.tensor([1, 999]), torch.randn(2, 3, low, low), torch.rand(2)
        )
        assert out.shape == (2, 3, high, high)
    stem4 = Upsampler(sr1024_tiny())
    assert stem4(
        torch.randn(1, 3, 64, 96), torch.tensor([7]), torch.randn(1, 3, 16, 24), torch.rand(1)
    ).shape == (
        1,
        3,
        64,
        96,
    )
    with pytest.raises(ValueError, match="requires aug_level"):
        model(torch.randn(1, 3, 32, 32), torch.tensor([1]), torch.randn(1, 3, 8, 8))
    plain = Upsampler(UpsamplerConfig(noise_aug=False))
    assert plain(torch.randn(1, 3, 32, 32), torch.tensor([1]), torch.randn(1, 3, 8, 8)).shape == (
        1,
        3,
        32,
        32,
    )


def test_upsampler_depends_on_low_res_and_aug_level() -> None:
    torch.manual_seed(0)
    model = randomize_zero_params(Upsampler(sr256_tiny()))
    x, t, low, aug = (
        torch.randn(1, 3, 32, 32),
        torch.tensor([50]),
        torch.randn(1, 3, 8, 8),
        torch.tensor([0.1]),
    )
    ref = model(x, t, low, aug)
    assert not torch.allclose(model(x, t, -low, aug), ref)
    assert not torch.allclose(model(x, t, low, torch.tensor([0.6])), ref)


@pytest.fixture(scope="module")
def decoder() -> Decoder:
    torch.manual_seed(0)
    cfg = decoder_tiny()
    cfg.clip_embed_dim = 16
    return randomize_zero_params(Decoder(cfg)).eval()


def test_decoder_batched_guidance_equals_separate_forwards(decoder: Decoder) -> None:
    image_emb, tokens = torch.randn(2, 16), captions(4, 2)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([100, 800])
    cond = decoder.encode_condition(image_emb, tokens)
    uncond = decoder.encode_condition(image_emb, None, drop_image_embedding=torch.ones(2, dtype=torch.bool))
    both = decoder(torch.cat([x, x]), torch.cat([t, t]), cat_conditions(cond, uncond))
    torch.testing.assert_close(both[:2], decoder(x, t, cond), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(both[2:], decoder(x, t, uncond), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(both[:2], both[2:], atol=1e-3)


def test_decoder_per_sample_dropout(decoder: Decoder) -> None:
    image_emb, tokens = torch.randn(2, 16), captions(4, 2)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([100, 800])
    drop = torch.tensor([True, False])
    mixed = decoder(x, t, decoder.encode_condition(image_emb, tokens, drop, ~drop))
    no_image = decoder(x, t, decoder.encode_condition(image_emb, tokens, torch.ones(2, dtype=torch.bool)))
    no_caption = decoder(x, t, decoder.encode_condition(image_emb, None))
    torch.testing.assert_close(mixed[0], no_image[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(mixed[1], no_caption[1], atol=1e-5, rtol=1e-4)
    # A dropped caption is invisible: the caption's content cannot change the output.
    other = decoder(x, t, decoder.encode_condition(image_emb, captions(1, 6), drop, ~drop))
    torch.testing.assert_close(other[1], mixed[1], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(other[0], mixed[0], atol=1e-3)


def test_decoder_caption_padding_is_ignored(decoder: Decoder) -> None:
    image_emb, x, t = torch.randn(2, 16), torch.randn(2, 3, 32, 32), torch.tensor([100, 800])
    short = decoder(x, t, decoder.encode_condition(image_emb, captions(4, 2, total=7)))
    long = decoder(x, t, decoder.encode_condition(image_emb, captions(4, 2, total=12)))
    torch.testing.assert_close(long, short, atol=1e-5, rtol=1e-4)
