"""Closed forms, losses, samplers' contracts and seeded determinism of unclip.diffusion."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from unclip.diffusion import (
    GaussianDiffusion,
    classifier_free_guidance,
    ddim_invert,
    dynamic_threshold,
    make_schedule,
    sample,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    space_timesteps,
    static_clip,
)
from unclip.diffusion.gaussian import discretized_gaussian_log_likelihood, edge_emphasis, normal_kl
from unclip.errors import ConfigError


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def gaussian_denoiser(diffusion: GaussianDiffusion, mean: float = 0.3, var: float = 0.2):
    """The exact posterior-mean network for data ~ N(mean, var I), in the diffusion's parameterisation."""
    ab = torch.tensor(diffusion.schedule.alphas_cumprod)

    def model_fn(x, t):
        a = ab[t].sqrt().to(x.dtype).view(-1, *[1] * (x.ndim - 1))
        s = (1 - ab[t]).sqrt().to(x.dtype).view_as(a)
        x0 = mean + a * var / (a * a * var + s * s) * (x - a * mean)
        eps = (x - a * x0) / s
        out = {"eps": eps, "x0": x0, "v": a * eps - s * x0}[diffusion.prediction]
        return torch.cat([out, torch.tanh(x)], 1) if diffusion.learned_variance else out

    return model_fn


# Schedules.


def test_linear_schedule_scales_with_steps():
    for steps in (1000, 250):
        betas = make_schedule("linear", steps).betas
        assert betas[0] == pytest.approx(1e-4 * 1000 / steps) and betas[-1] == pytest.approx(
            0.02 * 1000 / steps
        )
        assert np.all(np.diff(betas) > 0)


def test_cosine_alpha_bar_follows_eq_17():
    steps = 1000
    schedule = make_schedule("cosine", steps)

    def f(u):
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    expected = np.array([f((t + 1) / steps) / f(0.0) for t in range(steps - 1)])
    np.testing.assert_allclose(schedule.alphas_cumprod[:-1], expected, rtol=1e-10)
    assert schedule.betas.max() == pytest.approx(0.999)  # the clip bites only at the end
    assert np.argmax(schedule.betas) == steps - 1


def test_logsnr_shift_lowers_log_snr_by_2_log_shift():
    base = make_schedule("cosine", 200)
    np.testing.assert_array_equal(make_schedule("cosine", 200, shift=1.0).betas, base.betas)
    shifted = make_schedule("cosine", 200, shift=2.0)
    np.testing.assert_allclose(np.log(shifted.snr), np.log(base.snr) - 2 * math.log(2.0), atol=1e-9)


def test_schedule_arrays_are_float64_and_tables_float32():
    schedule = make_schedule("linear", 100)
    assert schedule.alphas_cumprod.dtype == np.float64
    table = schedule.table("alphas_cumprod", torch.device("cpu"))
    assert table.dtype == torch.float32 and table is schedule.table("alphas_cumprod", torch.device("cpu"))


def test_bad_schedule_settings_raise_config_error():
    with pytest.raises(ConfigError, match="'quadratic'"):
        make_schedule("quadratic", 100)
    with pytest.raises(ConfigError, match="beta"):
        make_schedule("linear", 10)  # betas would exceed 1
    with pytest.raises(ConfigError, match="shift"):
        make_schedule("cosine", 100, shift=0.0)
    with pytest.raises(ConfigError, match="'sigma'"):
        GaussianDiffusion(make_schedule("cosine", 100), prediction="sigma")


def test_space_timesteps():
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    evenly = space_timesteps(1000, 25)
    assert len(evenly) == 25 and evenly[0] == 0 and evenly[-1] == 999 and evenly == sorted(evenly)
    assert space_timesteps(1000, "25") == evenly
    fast27 = space_timesteps(1000, "10,10,3,2,2")
    assert len(set(fast27)) == 27 and fast27[-1] == 999
    with pytest.raises(ConfigError, match="ddim45"):
        space_timesteps(100, "ddim45")
    with pytest.raises(ConfigError, match="2000"):
        space_timesteps(1000, 2000)
    with pytest.raises(ConfigError, match="fast"):
        space_timesteps(1000, "fast")


# Forward process, posterior, parameterisations.


def test_q_sample_statistics():
    diffusion = GaussianDiffusion(make_schedule("cosine", 1000))
    n = 40_000
    x0 = torch.full((n, 1), 0.7)
    for t in (0, 300, 999):
        xt = diffusion.q_sample(x0, torch.full((n,), t), torch.randn(n, 1, generator=_gen(t)))
        ab = diffusion.schedule.alphas_cumprod[t]
        assert xt.mean().item() == pytest.approx(math.sqrt(ab) * 0.7, abs=4 / math.sqrt(n))
        assert xt.var().item() == pytest.approx(1 - ab, rel=0.03, abs=1e-5)


def test_posterior_matches_bayes_rule_in_float64():
    schedule = make_schedule("linear", 200)
    diffusion = GaussianDiffusion(schedule)
    x0 = torch.randn(3, 5, generator=_gen(0), dtype=torch.float64)
    xt = torch.randn(3, 5, generator=_gen(1), dtype=torch.float64)
    for t in (1, 57, 199):
        # Bayes' rule: q(x_{t-1} | x_0) = N(sqrt(ab_{t-1}) x_0, 1 - ab_{t-1})
        # times q(x_t | x_{t-1}) = N(sqrt(a_t) x_{t-1}, b_t), normalised over x_{t-1}.
        b = schedule.betas[t]
        ab_prev = float(np.prod(1 - schedule.betas[:t]))
        precision = 1 / (1 - ab_prev) + (1 - b) / b
        var = 1 / precision
        mean = var * (math.sqrt(ab_prev) * x0 / (1 - ab_prev) + math.sqrt(1 - b) * xt / b)
        got_mean, got_var, got_log_var = diffusion.q_posterior(x0, xt, t)
        torch.testing.assert_close(got_mean, mean, rtol=1e-10, atol=1e-12)
        assert got_var == pytest.approx(var, rel=1e-10) and got_log_var == pytest.approx(
            math.log(var), rel=1e-10
        )
        # The batched float32 path agrees.
        batched_mean, _, _ = diffusion.q_posterior(x0.float(), xt.float(), torch.full((3,), t))
        torch.testing.assert_close(batched_mean, mean.float(), rtol=1e-5, atol=1e-5)
    assert diffusion.q_posterior(x0, xt, 0)[2] == pytest.approx(schedule.posterior_log_variance_clipped[1])


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_parameterisations_round_trip(prediction):
    diffusion = GaussianDiffusion(make_schedule("cosine", 1000), prediction=prediction)
    x0 = torch.randn(4, 3, 2, 2, generator=_gen(0))
    eps = torch.randn(4, 3, 2, 2, generator=_gen(1))
    t = torch.tensor([0, 10, 500, 999])
    xt = diffusion.q_sample(x0, t, eps)
    ab = torch.tensor(diffusion.schedule.alphas_cumprod[t.numpy()], dtype=torch.float32).view(-1, 1, 1, 1)
    v = ab.sqrt() * eps - (1 - ab).sqrt() * x0  # Salimans & Ho 2022, §4
    torch.testing.assert_close(diffusion.velocity(x0, eps, t), v)
    target = diffusion.target(x0, eps, t)
    torch.testing.assert_close(target, {"eps": eps, "x0": x0, "v": v}[prediction])
    got_x0, got_eps = diffusion.predict(xt, t, target)
    # Recovering x_0 from eps divides by sqrt(alpha_bar) ~ 5e-5 at t = 999: compare where that is benign.
    ok = slice(0, 3) if prediction == "eps" else slice(None)
    torch.testing.assert_close(got_x0[ok], x0[ok], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got_eps[1:], eps[1:], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_min_snr_weight_is_min_snr_gamma_on_the_x0_error(prediction):
    gamma = 5.0
    diffusion = GaussianDiffusion(make_schedule("cosine", 1000), prediction, loss_weighting="min_snr")
    t = torch.tensor([0, 100, 400, 700, 999])
    x0, eps = torch.randn(5, 8, generator=_gen(0)), torch.randn(5, 8, generator=_gen(1))
    xt = diffusion.q_sample(x0, t, eps)
    output = diffusion.target(x0, eps, t) + 0.1 * torch.randn(5, 8, generator=_gen(2))
    param_mse = ((output - diffusion.target(x0, eps, t)) ** 2).mean(1)
    x0_mse = ((diffusion.predict(xt, t, output)[0] - x0) ** 2).mean(1)
    snr = torch.tensor(diffusion.schedule.snr[t.numpy()], dtype=torch.float32)
    weighted = diffusion.loss_weight(t) * param_mse
    torch.testing.assert_close(
        weighted, torch.minimum(snr, torch.tensor(gamma)) * x0_mse, rtol=2e-3, atol=1e-6
    )


# Losses.


def test_training_losses_plain_mse_and_timesteps():
    diffusion = GaussianDiffusion(make_schedule("linear", 100), "v")
    t = diffusion.sample_timesteps(64, _gen(0))
    assert t.dtype == torch.long and t.min() >= 0 and t.max() < 100
    torch.testing.assert_close(t, diffusion.sample_timesteps(64, _gen(0)))
    x0, noise = torch.randn(64, 6, generator=_gen(1)), torch.randn(64, 6, generator=_gen(2))
    terms = diffusion.training_losses(lambda x, tt: 0.5 * x, x0, t, noise)
    expected = ((0.5 * diffusion.q_sample(x0, t, noise) - diffusion.velocity(x0, noise, t)) ** 2).mean(1)
    torch.testing.assert_close(terms["mse"], expected)
    torch.testing.assert_close(terms["loss"], expected)
    assert "vb" not in terms
    with pytest.raises(ConfigError, match="channels"):
        GaussianDiffusion(make_schedule("linear", 100), variance="learned").training_losses(
            lambda x, tt: x, torch.zeros(2, 3, 4, 4), torch.zeros(2, dtype=torch.long)
        )


def test_edge_emphasis_moves_weight_onto_the_outline_and_keeps_each_image_total():
    images = -torch.ones(2, 3, 16, 16)
    images[0, :, 4:12, 4:12] = 1.0  # a square: its outline is the detail
    weight = edge_emphasis(images, strength=9.0)
    assert weight.shape == (2, 1, 16, 16)
    torch.testing.assert_close(weight.mean(dim=(1, 2, 3)), torch.ones(2))
    torch.testing.assert_close(weight[1], torch.ones(1, 16, 16))  # flat image: plain mean
    outline, inside, outside = weight[0, 0, 4, 8], weight[0, 0, 8, 8], weight[0, 0, 0, 0]
    torch.testing.assert_close(outline / outside, torch.tensor(10.0))
    torch.testing.assert_close(inside, outside)


def test_pixel_weight_changes_the_loss_but_not_the_reported_mse():
    diffusion = GaussianDiffusion(make_schedule("linear", 100), "x0")
    x0 = torch.randn(4, 3, 8, 8, generator=_gen(1))
    t, noise = torch.full((4,), 50), torch.randn(4, 3, 8, 8, generator=_gen(2))
    plain = diffusion.training_losses(lambda x, tt: torch.zeros_like(x), x0, t, noise)
    ones = diffusion.training_losses(lambda x, tt: torch.zeros_like(x), x0, t, noise, torch.ones(4, 1, 8, 8))
    torch.testing.assert_close(ones["loss"], plain["loss"])
    weight = torch.zeros(4, 1, 8, 8)
    weight[..., 0, 0] = 64.0  # all the weight on one pixel
    weighted = diffusion.training_losses(lambda x, tt: torch.zeros_like(x), x0, t, noise, weight)
    torch.testing.assert_close(weighted["mse"], plain["mse"])
    torch.testing.assert_close(weighted["loss"], (x0[:, :, 0, 0] ** 2).mean(1))


class TinyLearnedVarianceNet(nn.Module):
    """Mean and variance from separate parameters, to check where gradients flow."""

    def __init__(self, channels: int = 3) -> None:
        super().__init__()
        self.mean = nn.Conv2d(channels, channels, 3, padding=1)
        self.var = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, t):
        return torch.cat([self.mean(x), torch.tanh(self.var(x)) * 3], dim=1)  # push past [-1, 1] too


def _images(n: int = 6) -> torch.Tensor:
    return (torch.randint(0, 256, (n, 3, 8, 8), generator=_gen(0)).float() / 127.5 - 1).clamp(-1, 1)


def test_hybrid_loss_stops_gradient_to_the_mean_through_vb():
    torch.manual_seed(0)
    diffusion = GaussianDiffusion(make_schedule("cosine", 1000), "eps", "learned")
    net = TinyLearnedVarianceNet()
    t = torch.tensor([0, 1, 10, 500, 998, 999])
    terms = diffusion.training_losses(net, _images(), t, torch.randn(6, 3, 8, 8, generator=_gen(1)))
    torch.testing.assert_close(terms["loss"], terms["mse"] + 1e-3 * 1000 * terms["vb"])
    terms["vb"].sum().backward()
    assert net.mean.weight.grad is None or torch.all(net.mean.weight.grad == 0)
    assert net.var.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_hybrid_loss_is_finite_under_bf16_autocast(prediction):
    torch.manual_seed(0)
    diffusion = GaussianDiffusion(
        make_schedule("cosine", 1000), prediction, "learned", loss_weighting="min_snr"
    )
    net = TinyLearnedVarianceNet()
    t = torch.tensor([0, 1, 10, 500, 998, 999])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = diffusion.training_losses(net, _images(), t)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in terms.values())
    terms["loss"].mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())


def test_discretized_likelihood_sums_to_one_over_the_256_bins():
    bins = torch.arange(256, dtype=torch.float64) / 127.5 - 1
    for mean, log_var in ((0.0, -2.0), (0.9, -8.0), (-1.2, 0.5)):
        logp = discretized_gaussian_log_likelihood(bins, torch.tensor(mean), torch.tensor(log_var))
        assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-6)


def test_normal_kl_closed_form():
    m1, lv1, m2, lv2 = (torch.tensor(v) for v in (0.3, -1.0, -0.2, 0.5))
    s1, s2 = math.exp(-0.5), math.exp(0.25)
    expected = math.log(s2 / s1) + (s1**2 + 0.5**2) / (2 * s2**2) - 0.5
    assert normal_kl(m1, lv1, m2, lv2).item() == pytest.approx(expected, rel=1e-6)
    assert normal_kl(m1, lv1, m1, lv1).item() == pytest.approx(0.0, abs=1e-7)


# Samplers.

SAMPLE_SHAPE = (3, 2, 4, 4)


@pytest.mark.parametrize("sampler,eta", [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 1.0), ("dpmpp_2m", 0.0)])
def test_samplers_are_seeded_and_keep_dtype(sampler, eta):
    diffusion = GaussianDiffusion(make_schedule("cosine", 200), "v")
    model = gaussian_denoiser(diffusion)

    def run(seed):
        return sample(
            diffusion, model, SAMPLE_SHAPE, sampler=sampler, steps=20, eta=eta, generator=_gen(seed)
        )

    a, b, c = run(0), run(0), run(1)
    assert a.shape == SAMPLE_SHAPE and a.dtype == torch.float32
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (a - c).abs().max() > 1e-3


@pytest.mark.parametrize("sampler,steps", [("ddpm", None), ("ddim", 200), ("dpmpp_2m", 200)])
def test_samplers_reach_the_data_distribution(sampler, steps):
    diffusion = GaussianDiffusion(make_schedule("linear", 1000), "eps")
    model = gaussian_denoiser(diffusion)
    out = sample(diffusion, model, (512, 8), sampler=sampler, steps=steps, generator=_gen(0))
    # For data ~ N(0.3, 0.2) the exact denoiser must bring the samples back to those moments.
    assert out.mean().item() == pytest.approx(0.3, abs=0.02)
    assert out.var().item() == pytest.approx(0.2, rel=0.06)


def test_ddim_with_eta_1_is_ancestral_ddpm():
    diffusion = GaussianDiffusion(make_schedule("cosine", 1000), "x0")
    model, noise, steps = (
        gaussian_denoiser(diffusion),
        torch.randn(SAMPLE_SHAPE, generator=_gen(5)),
        space_timesteps(1000, 30),
    )
    ddim = sample_ddim(diffusion, model, noise, timesteps=steps, eta=1.0, generator=_gen(6))
    ddpm = sample_ddpm(diffusion, model, noise, timesteps=steps, generator=_gen(6))
    torch.testing.assert_close(ddim, ddpm, atol=1e-5, rtol=1e-5)


def test_x0_post_processing():
    x0 = torch.stack([torch.linspace(-3, 3, 1000), torch.linspace(-0.5, 0.5, 1000)])
    torch.testing.assert_close(static_clip(1.0)(x0), x0.clamp(-1, 1))
    out = dynamic_threshold(0.995)(x0)
    s = torch.quantile(x0[0].abs(), 0.995)
    torch.testing.assert_close(out[0], x0[0].clamp(-s, s) / s)  # Imagen: clip to the percentile, then rescale
    torch.testing.assert_close(out[1], x0[1])  # s < 1 leaves a sample alone
    with pytest.raises(ConfigError, match="1.5"):
        dynamic_threshold(1.5)

    seen = []
    diffusion = GaussianDiffusion(make_schedule("linear", 100))

    def custom(x0):
        seen.append(x0.abs().max().item())
        return x0.clamp(-0.25, 0.25)

    out = sample_dpmpp_2m(
        diffusion, gaussian_denoiser(diffusion), SAMPLE_SHAPE, timesteps=[0, 50, 99], x0_fn=custom
    )
    assert len(seen) == 3 and out.abs().max() <= 0.25 + 1e-6


def test_ddim_inversion_reconstructs_with_enough_steps():
    diffusion = GaussianDiffusion(make_schedule("cosine", 1000), "eps")
    model = gaussian_denoiser(diffusion)
    x0 = 0.3 + 0.2**0.5 * torch.randn(4, 16, generator=_gen(0))
    errors = []
    for steps in (25, 200):
        timesteps = space_timesteps(1000, steps)
        x_t = ddim_invert(diffusion, model, x0, timesteps=timesteps)
        assert x_t.std().item() == pytest.approx(1.0, abs=0.15)  # lands on (roughly) unit noise
        errors.append((sample_ddim(diffusion, model, x_t, timesteps=timesteps) - x0).abs().max().item())
    assert errors[1] < 0.03 and errors[1] < errors[0] / 4  # first-order in the step size


def test_sample_dispatcher_checks_its_arguments():
    diffusion = GaussianDiffusion(make_schedule("linear", 100))
    model = gaussian_denoiser(diffusion)
    with pytest.raises(ConfigError, match="'euler'"):
        sample(diffusion, model, SAMPLE_SHAPE, sampler="euler")
    with pytest.raises(ConfigError, match="eta"):
        sample(diffusion, model, SAMPLE_SHAPE, sampler="ddpm", eta=0.5)
    noise = torch.randn(SAMPLE_SHAPE, generator=_gen(0))
    direct = sample_ddim(diffusion, model, noise, timesteps=space_timesteps(100, "ddim10"))
    torch.testing.assert_close(
        sample(diffusion, model, noise, sampler="ddim", steps="ddim10", progress=True), direct
    )


# Guidance.


def test_classifier_free_guidance_is_one_batched_call():
    calls = []
    cond_shift = torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0, -1.0]).view(6, 1, 1, 1)  # [cond; uncond] rows

    def doubled(x, t):
        calls.append(len(x))
        assert torch.equal(x[:3], x[3:]) and torch.equal(t[:3], t[3:])
        return torch.cat(
            [x + cond_shift, 0.1 * x + cond_shift], dim=1
        )  # mean channels, then variance channels

    x, t = torch.randn(3, 2, 4, 4, generator=_gen(0)), torch.tensor([5, 5, 5])
    for scale in (0.0, 1.0, 4.0):
        out = classifier_free_guidance(doubled, scale, learned_variance=True)(x, t)
        torch.testing.assert_close(out[:, :2], x - 1 + scale * 2)
        torch.testing.assert_close(out[:, 2:], 0.1 * x + 1)  # conditional variance channels kept
    assert calls == [6, 6, 6]
    plain = classifier_free_guidance(lambda x, t: x + cond_shift, 3.0)(x, t)
    torch.testing.assert_close(plain, x - 1 + 3.0 * 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host-sync detection needs a CUDA device")
def test_samplers_never_sync_with_the_host():
    diffusion = GaussianDiffusion(make_schedule("cosine", 100), "eps", "learned")
    gen = torch.Generator("cuda").manual_seed(0)

    def model(x, t):
        return torch.cat([torch.tanh(x), torch.zeros_like(x)], 1)

    noise = torch.randn(SAMPLE_SHAPE, device="cuda", generator=gen)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for name, eta in (("ddpm", 0.0), ("ddim", 0.5), ("dpmpp_2m", 0.0)):
            sample(
                diffusion,
                model,
                noise,
                sampler=name,
                eta=eta,
                steps=10,
                generator=gen,
                x0_fn=dynamic_threshold(),
            )
    finally:
        torch.cuda.set_sync_debug_mode("default")
