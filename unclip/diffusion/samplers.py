"""Samplers: ancestral DDPM, DDIM, DPM-Solver++(2M), DDIM inversion, and x_0 post-processing.

Every sampler calls ``model_fn(x_t, t)`` with ``t`` a LongTensor (B,) of original training timesteps and reads
the raw output through the :class:`GaussianDiffusion` it is given. Per-step coefficients are Python floats
computed in float64 from the schedule, so the loop never reads a value back from the device. A sampler visits
``timesteps`` (any ascending subset of 0..T-1, see :func:`space_timesteps`; all of them by default) from the
last to the first, and its final step lands on clean data (alpha_bar = 1).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from unclip.diffusion.gaussian import GaussianDiffusion, ModelFn, interpolate_log_variance
from unclip.diffusion.schedule import NoiseSchedule, space_timesteps
from unclip.errors import ConfigError

SAMPLERS = ("ddpm", "ddim", "dpmpp_2m")
SAMPLER_KEYS = ("sampler", "steps", "eta", "guidance_scale")


def check_sampler_settings(
    options: dict, owner: str, num_timesteps: int, extra_keys: Sequence[str] = (), guided: bool = True
) -> dict:
    """Validate the sampler settings every stage shares (sampler, steps, eta and, when ``guided``,
    guidance_scale), allowing an ``owner``'s ``extra_keys`` (the caller checks their values). Returns a plain
    dict: ``steps`` as a spec string, ``eta`` and ``guidance_scale`` as floats. Errors name the key."""
    options = dict(options)
    shared = SAMPLER_KEYS if guided else tuple(k for k in SAMPLER_KEYS if k != "guidance_scale")
    expected = (*shared, *extra_keys)
    unknown = sorted(set(options) ^ set(expected))
    if unknown:
        raise ConfigError(f"{owner} sampling keys {unknown} are missing or unknown; expected {expected}")
    if options["sampler"] not in SAMPLERS:
        raise ConfigError(f"sampling.sampler={options['sampler']!r} must be one of {SAMPLERS}")
    if options["eta"] < 0 or (options["eta"] != 0.0 and options["sampler"] != "ddim"):
        raise ConfigError(f"sampling.eta={options['eta']} must be >= 0 and only applies to the ddim sampler")
    if guided:
        if options["guidance_scale"] < 0:
            raise ConfigError(f"sampling.guidance_scale={options['guidance_scale']} must be >= 0")
        options["guidance_scale"] = float(options["guidance_scale"])
    options["steps"] = str(options["steps"])
    space_timesteps(num_timesteps, options["steps"])  # raises ConfigError naming a bad spec
    options["eta"] = float(options["eta"])
    return options


X0Fn = Callable[[Tensor], Tensor]
Noise = Tensor | Sequence[int]


def static_clip(limit: float = 1.0) -> X0Fn:
    """Clamp the predicted x_0 to [-limit, limit] (Ho et al. 2020, §3.3)."""
    if not limit > 0:
        raise ConfigError(f"the static clip limit must be positive, got {limit!r}")
    return lambda x0: x0.clamp(-limit, limit)


def dynamic_threshold(percentile: float = 0.995) -> X0Fn:
    """Imagen's dynamic thresholding (Saharia et al. 2022, §2.3): per sample, s = max(1, the ``percentile``
    quantile of |x_0|); clamp x_0 to [-s, s] and divide by s."""
    if not 0 < percentile <= 1:
        raise ConfigError(f"the dynamic-threshold percentile must lie in (0, 1], got {percentile!r}")

    def threshold(x0: Tensor) -> Tensor:
        # quantile needs float32 or float64
        flat = x0.reshape(len(x0), -1).abs().to(torch.promote_types(x0.dtype, torch.float32))
        s = torch.quantile(flat, percentile, dim=1).clamp(min=1.0).to(x0.dtype)
        s = s.view(-1, *([1] * (x0.ndim - 1)))
        return x0.clamp(-s, s) / s

    return threshold


def _initial(noise: Noise, generator: torch.Generator | None, device: torch.device | str | None) -> Tensor:
    if isinstance(noise, Tensor):
        return noise
    draw_on = generator.device if generator is not None else device
    return torch.randn(tuple(noise), generator=generator, device=draw_on).to(device)


def _randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    draw_on = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=draw_on, dtype=x.dtype).to(x.device)


def _descending(diffusion: GaussianDiffusion, timesteps: Sequence[int] | None) -> list[int]:
    if timesteps is None:
        return list(range(diffusion.num_timesteps - 1, -1, -1))
    steps = sorted({int(t) for t in timesteps}, reverse=True)
    if not steps or steps[-1] < 0 or steps[0] >= diffusion.num_timesteps:
        raise ConfigError(f"sampler timesteps must be a non-empty subset of 0..{diffusion.num_timesteps - 1}")
    return steps


def _x0_eps(
    diffusion: GaussianDiffusion, model_fn: ModelFn, x: Tensor, t: int, x0_fn: X0Fn | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Run the network at timestep t; return (x_0, eps, variance output). After ``x0_fn``, eps is re-derived
    from the processed x_0 so the step stays consistent with it."""
    out = model_fn(x, torch.full((len(x),), t, device=x.device, dtype=torch.long))
    mean_out, var_values = diffusion.split_output(out.to(x.dtype))  # the step runs in x's precision
    x0, eps = diffusion.predict(x, t, mean_out)
    if x0_fn is not None:
        x0 = x0_fn(x0)
        eps = diffusion.eps_from_x0(x, t, x0)
    return x0, eps, var_values


def _progress(steps: list[int], progress: bool, name: str):
    return tqdm(steps, desc=name, disable=not progress, leave=False)


def sample_ddpm(
    diffusion: GaussianDiffusion,
    model_fn: ModelFn,
    noise: Noise,
    *,
    timesteps: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    x0_fn: X0Fn | None = None,
    progress: bool = False,
    device: torch.device | str | None = None,
) -> Tensor:
    """Ancestral sampling x_{t-1} ~ N(mu~(x_t, x_0_hat), Sigma_t) (Ho et al. 2020, Alg. 2; eq. 7 for mu~).

    Sigma_t follows ``diffusion.variance``: beta~_t, beta_t, or the learned interpolation (Nichol & Dhariwal
    2021, eq. 15). On a subset of timesteps the chain is the respaced one of Nichol & Dhariwal §4, whose betas
    are 1 - alpha_bar_t / alpha_bar_prev. No noise is added on the last step.
    """
    ascending = _descending(diffusion, timesteps)[::-1]
    if len(ascending) < 2:
        raise ConfigError(f"ancestral DDPM needs at least 2 timesteps, got {ascending}")
    sched = diffusion.schedule.respace(ascending)
    x = _initial(noise, generator, device)
    for i in _progress(list(range(len(ascending) - 1, -1, -1)), progress, "ddpm"):
        x0, _, var_values = _x0_eps(diffusion, model_fn, x, ascending[i], x0_fn)
        x = float(sched.posterior_mean_coef1[i]) * x0 + float(sched.posterior_mean_coef2[i]) * x
        if i > 0:
            x = x + _ddpm_std(diffusion.variance, sched, i, var_values) * _randn_like(x, generator)
    return x


def _ddpm_std(variance: str, sched: NoiseSchedule, i: int, var_values: Tensor | None) -> Tensor | float:
    if variance == "learned":
        min_log, max_log = float(sched.posterior_log_variance_clipped[i]), float(sched.log_betas[i])
        return torch.exp(0.5 * interpolate_log_variance(var_values, min_log, max_log))
    return math.sqrt(sched.betas[i] if variance == "fixed_large" else sched.posterior_variance[i])


def sample_ddim(
    diffusion: GaussianDiffusion,
    model_fn: ModelFn,
    noise: Noise,
    *,
    timesteps: Sequence[int] | None = None,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    x0_fn: X0Fn | None = None,
    progress: bool = False,
    device: torch.device | str | None = None,
) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12) with sigma_t = eta * sqrt((1 - a_s) / (1 - a_t)) sqrt(1 - a_t / a_s)
    (eq. 16): eta = 0 is deterministic, eta = 1 is ancestral DDPM on the same timesteps. A learned-variance
    output is ignored."""
    if eta < 0:
        raise ConfigError(f"DDIM eta must be >= 0, got {eta!r}")
    steps = _descending(diffusion, timesteps)
    ab = diffusion.schedule.alphas_cumprod
    x = _initial(noise, generator, device)
    for i, t in enumerate(_progress(steps, progress, "ddim")):
        x0, eps, _ = _x0_eps(diffusion, model_fn, x, t, x0_fn)
        a_t, a_s = ab[t], (ab[steps[i + 1]] if i + 1 < len(steps) else 1.0)
        sigma = eta * math.sqrt((1 - a_s) / (1 - a_t) * (1 - a_t / a_s))
        x = math.sqrt(a_s) * x0 + math.sqrt(max(1 - a_s - sigma**2, 0.0)) * eps
        if sigma > 0:
            x = x + sigma * _randn_like(x, generator)
    return x


def sample_dpmpp_2m(
    diffusion: GaussianDiffusion,
    model_fn: ModelFn,
    noise: Noise,
    *,
    timesteps: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    x0_fn: X0Fn | None = None,
    progress: bool = False,
    device: torch.device | str | None = None,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2): a multistep second-order solver of the diffusion ODE in the
    data-prediction form, with lambda_t = log(alpha_t / sigma_t). The first step is first order (no history)
    and so is the last ("lower_order_final"), which lands on sigma = 0 and returns the predicted x_0.
    ``generator`` only draws the initial noise when ``noise`` is a shape."""
    steps = _descending(diffusion, timesteps)
    ab = diffusion.schedule.alphas_cumprod
    x = _initial(noise, generator, device)
    x0_prev, h_prev = None, 0.0
    for i, t in enumerate(_progress(steps, progress, "dpmpp_2m")):
        x0, _, _ = _x0_eps(diffusion, model_fn, x, t, x0_fn)
        if i + 1 == len(steps):
            x = x0
            break
        s = steps[i + 1]
        h = 0.5 * (math.log(ab[s] / (1 - ab[s])) - math.log(ab[t] / (1 - ab[t])))
        d = x0
        if x0_prev is not None:
            r = h_prev / h
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
        x = math.sqrt((1 - ab[s]) / (1 - ab[t])) * x - math.sqrt(ab[s]) * math.expm1(-h) * d
        x0_prev, h_prev = x0, h
    return x


def ddim_invert(
    diffusion: GaussianDiffusion,
    model_fn: ModelFn,
    x0: Tensor,
    *,
    timesteps: Sequence[int] | None = None,
    progress: bool = False,
) -> Tensor:
    """Run deterministic DDIM (eta = 0) backwards, from clean data to x_T at the last timestep.

    Each step from level s to the next timestep t reuses the network's eps at t evaluated on x_s, the usual
    approximation eps(x_t, t) ~ eps(x_s, t) (Song et al. 2021, §4.3; as in diffusers' DDIMInverseScheduler).
    Sampling the result with :func:`sample_ddim` (eta = 0, same timesteps) approximately returns ``x0``.
    """
    steps = _descending(diffusion, timesteps)[::-1]
    ab = diffusion.schedule.alphas_cumprod
    x, a_s = x0, 1.0
    for t in _progress(steps, progress, "ddim inversion"):
        _, eps, _ = _x0_eps(diffusion, model_fn, x, t, None)
        x0_hat = (x - math.sqrt(1 - a_s) * eps) / math.sqrt(a_s)
        x = math.sqrt(ab[t]) * x0_hat + math.sqrt(1 - ab[t]) * eps
        a_s = ab[t]
    return x


def sample_images(
    diffusion: GaussianDiffusion,
    model_fn: ModelFn,
    noise: Noise,
    options: dict,
    *,
    generator: torch.Generator | None = None,
    progress: bool = False,
    device: torch.device | str | None = None,
    x0_fn: X0Fn | None = None,
) -> Tensor:
    """Sample images in [-1, 1] with checked sampler settings (``sampler``, ``steps``, ``eta``), every
    predicted x_0 clipped to [-1, 1] (Ho et al. 2020 §3.3) and then passed through ``x0_fn`` if given, from
    ``noise`` (x_T or its shape, as in :func:`sample`); returns them in [0, 1]."""
    clip = static_clip(1.0)
    x = sample(
        diffusion,
        model_fn,
        noise,
        sampler=options["sampler"],
        steps=options["steps"],
        eta=options["eta"],
        generator=generator,
        x0_fn=clip if x0_fn is None else lambda x0: x0_fn(clip(x0)),
        progress=progress,
        device=device,
    )
    return ((x + 1) / 2).clamp(0, 1)


def sample(
    diffusion: GaussianDiffusion,
    model_fn: ModelFn,
    noise: Noise,
    *,
    sampler: str = "ddpm",
    steps: int | str | None = None,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    x0_fn: X0Fn | None = None,
    progress: bool = False,
    device: torch.device | str | None = None,
) -> Tensor:
    """Draw samples with the sampler named by a config string, over ``steps`` (a :func:`space_timesteps`
    spec; None visits all T timesteps). ``noise`` is the initial x_T or its shape (then drawn with
    ``generator`` and moved to ``device``). ``eta`` applies to ``"ddim"`` only."""
    if sampler not in SAMPLERS:
        raise ConfigError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    timesteps = None if steps is None else space_timesteps(diffusion.num_timesteps, steps)
    common = dict(timesteps=timesteps, generator=generator, x0_fn=x0_fn, progress=progress, device=device)
    if sampler == "ddim":
        return sample_ddim(diffusion, model_fn, noise, eta=eta, **common)
    if eta != 0.0:
        raise ConfigError(f"eta={eta!r} only applies to the 'ddim' sampler, not {sampler!r}")
    if sampler == "ddpm":
        return sample_ddpm(diffusion, model_fn, noise, **common)
    return sample_dpmpp_2m(diffusion, model_fn, noise, **common)
