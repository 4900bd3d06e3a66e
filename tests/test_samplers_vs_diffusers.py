"""Our samplers against diffusers' schedulers: same betas, same deterministic fake network, same noise.

The fake network records every x_t it is called with, so the whole trajectory is compared, not only the
result. diffusers keeps alphas_cumprod in float32; its tables are replaced here by our float64 ones and
both sides run in float64, so the comparison checks the update rules rather than float32 rounding.
"""

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip(
    "diffusers", reason="diffusers is the reference implementation (pip install .[test])"
)

from unclip.diffusion import (  # noqa: E402
    GaussianDiffusion,
    ddim_invert,
    dynamic_threshold,
    make_schedule,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    space_timesteps,
)
from unclip.diffusion.schedule import NoiseSchedule  # noqa: E402

T = 1000
SHAPE = (2, 3, 4, 4)
PREDICTION_TYPES = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
VARIANCE_TYPES = {"fixed_small": "fixed_small", "fixed_large": "fixed_large", "learned": "learned_range"}
ATOL = 1e-5


class FakeDenoiser:
    """A smooth, bounded stand-in for a trained network: the posterior-mean denoiser of Gaussian data plus a
    nonlinear wobble, written in the diffusion's parameterisation; with learned variance it adds
    time-dependent variance channels in [-1, 1]."""

    def __init__(self, diffusion: GaussianDiffusion, strip_variance: bool = False) -> None:
        self.diffusion = diffusion
        self.strip_variance = strip_variance
        self.inputs: list[torch.Tensor] = []

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.clone())
        d = self.diffusion
        ab = torch.tensor(d.schedule.alphas_cumprod, dtype=x.dtype)[t].view(-1, 1, 1, 1)
        a, s = ab.sqrt(), (1 - ab).sqrt()
        tt = t.view(-1, 1, 1, 1).to(x.dtype)
        mu = torch.linspace(-0.8, 0.8, x[0].numel(), dtype=x.dtype).view(x.shape[1:])
        x0 = mu + a * 0.25 / (0.25 * a**2 + s**2) * (x - a * mu) + 0.05 * torch.sin(3 * x + tt / 100)
        eps = (x - a * x0) / s
        out = {"eps": eps, "x0": x0, "v": a * eps - s * x0}[d.prediction]
        if d.learned_variance and not self.strip_variance:
            out = torch.cat([out, torch.tanh(x) * torch.cos(5 * tt / T + mu)], dim=1)
        return out


def _float64_tables(scheduler, schedule: NoiseSchedule) -> None:
    scheduler.betas = torch.tensor(schedule.betas)
    scheduler.alphas = 1.0 - scheduler.betas
    scheduler.alphas_cumprod = torch.tensor(schedule.alphas_cumprod)


def _noise(seed: int = 0) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _run_diffusers(scheduler, model: FakeDenoiser, x: torch.Tensor, **step_kwargs) -> torch.Tensor:
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t.expand(len(x))), t, x, **step_kwargs).prev_sample
    return x


def _assert_same(ours: torch.Tensor, ref: torch.Tensor, model_ours: FakeDenoiser, model_ref: FakeDenoiser):
    assert len(model_ours.inputs) == len(model_ref.inputs)
    torch.testing.assert_close(
        torch.stack(model_ours.inputs), torch.stack(model_ref.inputs), atol=ATOL, rtol=0
    )
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)


def test_cosine_betas_match_diffusers_squaredcos_cap_v2():
    ref = diffusers.DDPMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2").betas
    np.testing.assert_allclose(make_schedule("cosine", T).betas, ref.double().numpy(), atol=1e-6)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("prediction", list(PREDICTION_TYPES))
@pytest.mark.parametrize("variance", list(VARIANCE_TYPES))
def test_ddpm_respaced_matches_diffusers(kind, prediction, variance):
    schedule = make_schedule(kind, T)
    diffusion = GaussianDiffusion(schedule, prediction, variance)
    timesteps = space_timesteps(T, 40)
    ours_model, ref_model = FakeDenoiser(diffusion), FakeDenoiser(diffusion)
    ours = sample_ddpm(
        diffusion, ours_model, _noise(), timesteps=timesteps, generator=torch.Generator().manual_seed(1)
    )

    scheduler = diffusers.DDPMScheduler(
        num_train_timesteps=T,
        prediction_type=PREDICTION_TYPES[prediction],
        variance_type=VARIANCE_TYPES[variance],
        clip_sample=False,
    )
    _float64_tables(scheduler, schedule)
    scheduler.set_timesteps(timesteps=timesteps[::-1])
    ref = _run_diffusers(scheduler, ref_model, _noise(), generator=torch.Generator().manual_seed(1))
    _assert_same(ours, ref, ours_model, ref_model)


def test_ddpm_full_chain_matches_diffusers():
    schedule = make_schedule("linear", 100)
    diffusion = GaussianDiffusion(schedule, "eps", "learned")
    ours_model, ref_model = FakeDenoiser(diffusion), FakeDenoiser(diffusion)
    ours = sample_ddpm(diffusion, ours_model, _noise(), generator=torch.Generator().manual_seed(1))

    scheduler = diffusers.DDPMScheduler(
        num_train_timesteps=100, variance_type="learned_range", clip_sample=False
    )
    _float64_tables(scheduler, schedule)
    scheduler.set_timesteps(100)
    ref = _run_diffusers(scheduler, ref_model, _noise(), generator=torch.Generator().manual_seed(1))
    _assert_same(ours, ref, ours_model, ref_model)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("prediction", list(PREDICTION_TYPES))
@pytest.mark.parametrize("eta", [0.0, 0.7])
@pytest.mark.parametrize("percentile", [None, 0.9])
def test_ddim_matches_diffusers(kind, prediction, eta, percentile):
    schedule = make_schedule(kind, T)
    diffusion = GaussianDiffusion(schedule, prediction)
    ours_model, ref_model = FakeDenoiser(diffusion), FakeDenoiser(diffusion)
    x0_fn = None if percentile is None else dynamic_threshold(percentile)
    ours = sample_ddim(
        diffusion,
        ours_model,
        _noise(),
        timesteps=space_timesteps(T, "ddim50"),
        eta=eta,
        generator=torch.Generator().manual_seed(1),
        x0_fn=x0_fn,
    )

    scheduler = diffusers.DDIMScheduler(
        num_train_timesteps=T,
        prediction_type=PREDICTION_TYPES[prediction],
        clip_sample=False,
        set_alpha_to_one=True,
        timestep_spacing="leading",
        steps_offset=0,
        thresholding=percentile is not None,
        dynamic_thresholding_ratio=percentile or 0.995,
        sample_max_value=1e9,  # diffusers caps Imagen's s at this value; Imagen has no cap
    )
    _float64_tables(scheduler, schedule)
    scheduler.set_timesteps(50)
    ref = _run_diffusers(
        scheduler,
        ref_model,
        _noise(),
        eta=eta,
        generator=torch.Generator().manual_seed(1),
        use_clipped_model_output=True,
    )
    _assert_same(ours, ref, ours_model, ref_model)


def test_ddim_ignores_learned_variance_like_diffusers():
    schedule = make_schedule("cosine", T)
    diffusion = GaussianDiffusion(schedule, "eps", "learned")
    ours_model, ref_model = FakeDenoiser(diffusion), FakeDenoiser(diffusion, strip_variance=True)
    timesteps = space_timesteps(T, "ddim25")
    ours = sample_ddim(
        diffusion,
        ours_model,
        _noise(),
        timesteps=timesteps,
        eta=1.0,
        generator=torch.Generator().manual_seed(2),
    )

    scheduler = diffusers.DDIMScheduler(num_train_timesteps=T, clip_sample=False, set_alpha_to_one=True)
    _float64_tables(scheduler, schedule)
    scheduler.set_timesteps(25)
    ref = _run_diffusers(scheduler, ref_model, _noise(), eta=1.0, generator=torch.Generator().manual_seed(2))
    _assert_same(ours, ref, ours_model, ref_model)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("prediction", list(PREDICTION_TYPES))
@pytest.mark.parametrize("steps,percentile", [(10, None), (25, None), (15, 0.9)])
def test_dpmpp_2m_matches_diffusers(kind, prediction, steps, percentile):
    schedule = make_schedule(kind, T)
    diffusion = GaussianDiffusion(schedule, prediction)
    timesteps = space_timesteps(T, steps)
    ours_model, ref_model = FakeDenoiser(diffusion), FakeDenoiser(diffusion)
    x0_fn = None if percentile is None else dynamic_threshold(percentile)
    ours = sample_dpmpp_2m(diffusion, ours_model, _noise(), timesteps=timesteps, x0_fn=x0_fn)

    scheduler = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=T,
        prediction_type=PREDICTION_TYPES[prediction],
        algorithm_type="dpmsolver++",
        solver_order=2,
        solver_type="midpoint",
        lower_order_final=True,
        final_sigmas_type="zero",
        thresholding=percentile is not None,
        dynamic_thresholding_ratio=percentile or 0.995,
        sample_max_value=1e9,
    )
    _float64_tables(scheduler, schedule)
    scheduler.set_timesteps(timesteps=timesteps[::-1])
    ab = schedule.alphas_cumprod[timesteps[::-1]]
    scheduler.sigmas = torch.tensor(np.append(np.sqrt((1 - ab) / ab), 0.0))  # set_timesteps rounds to float32
    ref = _run_diffusers(scheduler, ref_model, _noise())
    # diffusers casts the sample to float32 inside each step, so it carries ~1e-6 of rounding.
    _assert_same(ours, ref, ours_model, ref_model)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_ddim_inversion_matches_diffusers(kind):
    schedule = make_schedule(kind, T)
    diffusion = GaussianDiffusion(schedule, "eps")
    x0 = torch.rand(SHAPE, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2 - 1
    ours_model, ref_model = FakeDenoiser(diffusion), FakeDenoiser(diffusion)
    ours = ddim_invert(diffusion, ours_model, x0, timesteps=space_timesteps(T, "ddim50"))

    scheduler = diffusers.DDIMInverseScheduler(
        num_train_timesteps=T, clip_sample=False, set_alpha_to_one=True
    )
    _float64_tables(scheduler, schedule)
    scheduler.set_timesteps(50)
    ref = _run_diffusers(scheduler, ref_model, x0.clone())
    _assert_same(ours, ref, ours_model, ref_model)
