"""Gaussian diffusion: forward noising, posterior, parameterisations and the training loss.

One :class:`GaussianDiffusion` serves every stage: the prior works on vectors (B, D), the decoder and
upsamplers on images (B, C, H, W). ``t`` may be a LongTensor of shape (B,) (training) or a Python int
(sampling, where the coefficient becomes a plain float and no device table is touched).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from unclip.diffusion.schedule import NoiseSchedule, make_schedule
from unclip.errors import ConfigError
from unclip.images import detail_map

PREDICTIONS = ("eps", "x0", "v")
VARIANCES = ("fixed_small", "fixed_large", "learned")
LOSS_WEIGHTINGS = ("none", "min_snr")
# lambda of the hybrid objective L_simple + lambda * L_vlb (Nichol & Dhariwal 2021, §3.1).
HYBRID_VB_WEIGHT = 1e-3

# What a component exports about its diffusion (see :func:`diffusion_from_options`).
DIFFUSION_KEYS = ("schedule", "schedule_shift", "num_timesteps", "prediction", "variance", "loss_weighting")

ModelFn = Callable[[Tensor, Tensor], Tensor]
Timestep = Tensor | int


def mean_flat(x: Tensor) -> Tensor:
    """Mean over every dimension but the batch one."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def edge_emphasis(x0: Tensor, strength: float, threshold: float = 0.1) -> Tensor:
    """(B, 1, H, W) per-pixel loss weights for clean images x0 in [-1, 1]: 1 + ``strength`` on pixels within
    one of an edge (:func:`~unclip.images.detail_map`, a 3 x 3 spread above ``threshold``, about 13 grey
    levels), divided by each image's mean weight so that its total weight stays one.

    On flat-colour images most pixels are background that the model gets right early, so the plain mean
    squared error spends little gradient on the outline that makes a star a star; this moves weight onto it,
    as focal or boundary-weighted losses do in segmentation. The minimiser moves from E[x0 | x_t] to
    E[w x0 | x_t] / E[w | x_t], which differs where x_t leaves the outline uncertain: at high noise that is
    everywhere, and on ``shapes`` a decoder so trained drew extra objects from the prior's embeddings
    (measured in recipes/shapes/DECODER.md)."""
    weight = 1.0 + strength * detail_map(x0, threshold).unsqueeze(1).float()
    return weight / weight.mean(dim=(1, 2, 3), keepdim=True)


def interpolate_log_variance(var_values: Tensor, min_log: Tensor | float, max_log: Tensor | float) -> Tensor:
    """log Sigma = v log beta_t + (1 - v) log beta~_t, v = (out + 1) / 2 (Nichol & Dhariwal 2021, eq. 15)."""
    frac = (var_values + 1) / 2
    return frac * max_log + (1 - frac) * min_log


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) per element, in nats."""
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_var: Tensor) -> Tensor:
    """log p(x) per element for 8-bit data scaled to [-1, 1]: the Gaussian mass of x's bin of width 2/255, the
    edge bins reaching to +-infinity (Ho et al. 2020, eq. 13)."""
    inv_std = torch.exp(-0.5 * log_var)
    upper = inv_std * (x - mean + 1.0 / 255)
    lower = inv_std * (x - mean - 1.0 / 255)
    log_cdf_upper = torch.special.log_ndtr(upper)
    log_sf_lower = torch.special.log_ndtr(-lower)
    log_mass = torch.log((torch.special.ndtr(upper) - torch.special.ndtr(lower)).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_sf_lower, log_mass))


class GaussianDiffusion:
    """A noise schedule plus what the network predicts and how it is trained.

    - ``prediction``: ``"eps"`` (Ho et al. 2020), ``"x0"``, or ``"v"`` = sqrt(alpha_bar) eps
      - sqrt(1 - alpha_bar) x_0 (Salimans & Ho 2022, §4 and App. D).
    - ``variance``: ``"fixed_small"`` (beta~_t), ``"fixed_large"`` (beta_t), or ``"learned"``: the network
      outputs twice the channels along dim 1, the second half interpolating between the two in log space.
    - ``loss_weighting``: ``"none"`` or ``"min_snr"`` (Hang et al. 2023) with ``min_snr_gamma``.
    """

    def __init__(
        self,
        schedule: NoiseSchedule,
        prediction: str = "eps",
        variance: str = "fixed_small",
        loss_weighting: str = "none",
        min_snr_gamma: float = 5.0,
    ) -> None:
        for name, value, options in (
            ("prediction", prediction, PREDICTIONS),
            ("variance", variance, VARIANCES),
            ("loss_weighting", loss_weighting, LOSS_WEIGHTINGS),
        ):
            if value not in options:
                raise ConfigError(f"unknown diffusion {name} {value!r}; choose one of {', '.join(options)}")
        if not min_snr_gamma > 0:
            raise ConfigError(f"min_snr_gamma must be positive, got {min_snr_gamma!r}")
        self.schedule = schedule
        self.prediction = prediction
        self.variance = variance
        self.loss_weighting = loss_weighting
        self.min_snr_gamma = float(min_snr_gamma)

    def __repr__(self) -> str:
        return (
            f"GaussianDiffusion({self.schedule!r}, prediction={self.prediction!r}, "
            f"variance={self.variance!r}, loss_weighting={self.loss_weighting!r})"
        )

    @property
    def num_timesteps(self) -> int:
        return self.schedule.num_timesteps

    @property
    def learned_variance(self) -> bool:
        """True when the network must output 2x channels along dim 1 (mean part, then variance part)."""
        return self.variance == "learned"

    def _coef(self, name: str, t: Timestep, x: Tensor) -> Tensor | float:
        if not isinstance(t, Tensor):
            return float(getattr(self.schedule, name)[int(t)])
        return self.schedule.table(name, t.device)[t].view(-1, *([1] * (x.ndim - 1)))

    # Forward process and posterior (Ho et al. 2020, eq. 4, 6, 7).

    def q_sample(self, x0: Tensor, t: Timestep, noise: Tensor) -> Tensor:
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps."""
        return (
            self._coef("sqrt_alphas_cumprod", t, x0) * x0
            + self._coef("sqrt_one_minus_alphas_cumprod", t, x0) * noise
        )

    def q_posterior(
        self, x0: Tensor, x_t: Tensor, t: Timestep
    ) -> tuple[Tensor, Tensor | float, Tensor | float]:
        """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0)."""
        mean = (
            self._coef("posterior_mean_coef1", t, x_t) * x0 + self._coef("posterior_mean_coef2", t, x_t) * x_t
        )
        return (
            mean,
            self._coef("posterior_variance", t, x_t),
            self._coef("posterior_log_variance_clipped", t, x_t),
        )

    # Parameterisations: x_t = a x_0 + s eps, v = a eps - s x_0; a = sqrt(alpha_bar), s = sqrt(1 - alpha_bar).

    def x0_from_eps(self, x_t: Tensor, t: Timestep, eps: Tensor) -> Tensor:
        return (x_t - self._coef("sqrt_one_minus_alphas_cumprod", t, x_t) * eps) / self._coef(
            "sqrt_alphas_cumprod", t, x_t
        )

    def eps_from_x0(self, x_t: Tensor, t: Timestep, x0: Tensor) -> Tensor:
        return (x_t - self._coef("sqrt_alphas_cumprod", t, x_t) * x0) / self._coef(
            "sqrt_one_minus_alphas_cumprod", t, x_t
        )

    def velocity(self, x0: Tensor, eps: Tensor, t: Timestep) -> Tensor:
        """v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0 (Salimans & Ho 2022, §4)."""
        return (
            self._coef("sqrt_alphas_cumprod", t, x0) * eps
            - self._coef("sqrt_one_minus_alphas_cumprod", t, x0) * x0
        )

    def x0_from_v(self, x_t: Tensor, t: Timestep, v: Tensor) -> Tensor:
        return (
            self._coef("sqrt_alphas_cumprod", t, x_t) * x_t
            - self._coef("sqrt_one_minus_alphas_cumprod", t, x_t) * v
        )

    def eps_from_v(self, x_t: Tensor, t: Timestep, v: Tensor) -> Tensor:
        return (
            self._coef("sqrt_one_minus_alphas_cumprod", t, x_t) * x_t
            + self._coef("sqrt_alphas_cumprod", t, x_t) * v
        )

    def split_output(self, out: Tensor) -> tuple[Tensor, Tensor | None]:
        """(mean part, variance part or None) of a raw network output."""
        if not self.learned_variance:
            return out, None
        if out.shape[1] % 2:
            raise ConfigError(
                f"a learned-variance model must output an even number of channels, got {out.shape}"
            )
        mean, var_values = out.chunk(2, dim=1)
        return mean, var_values

    def predict(self, x_t: Tensor, t: Timestep, mean_out: Tensor) -> tuple[Tensor, Tensor]:
        """(x_0, eps) implied by the mean part of the network output."""
        if self.prediction == "eps":
            return self.x0_from_eps(x_t, t, mean_out), mean_out
        if self.prediction == "x0":
            return mean_out, self.eps_from_x0(x_t, t, mean_out)
        return self.x0_from_v(x_t, t, mean_out), self.eps_from_v(x_t, t, mean_out)

    def target(self, x0: Tensor, noise: Tensor, t: Timestep) -> Tensor:
        """What the mean part of the network output regresses to."""
        if self.prediction == "eps":
            return noise
        if self.prediction == "x0":
            return x0
        return self.velocity(x0, noise, t)

    # Training.

    def loss_weight(self, t: Tensor) -> Tensor:
        """Per-sample weight on the MSE of this parameterisation.

        Min-SNR-gamma (Hang et al. 2023, eq. 10) weights the x_0 error by min(SNR, gamma). An eps error is
        SNR times an x_0 error and a v error (SNR + 1) times one, so the same weighting is
        min(SNR, gamma) / SNR for eps and min(SNR, gamma) / (SNR + 1) for v.
        """
        if self.loss_weighting == "none":
            return torch.ones(t.shape, device=t.device)
        snr = self.schedule.table("snr", t.device)[t]
        clipped = snr.clamp(max=self.min_snr_gamma)
        if self.prediction == "eps":
            return clipped / snr
        if self.prediction == "x0":
            return clipped
        return clipped / (snr + 1)

    def sample_timesteps(
        self, batch: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
    ) -> Tensor:
        """Training timesteps, uniform on 0..T-1, drawn with ``generator`` on its device, then moved."""
        draw_on = generator.device if generator is not None else device
        t = torch.randint(0, self.num_timesteps, (batch,), generator=generator, device=draw_on)
        return t.to(device)

    def training_losses(
        self,
        model_fn: ModelFn,
        x0: Tensor,
        t: Tensor,
        noise: Tensor | None = None,
        pixel_weight: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Per-sample losses for a batch: ``loss`` (what to minimise), ``mse`` (unweighted), and for learned
        variance ``vb``, the variational bound term L_t in bits per dimension.

        ``loss`` is w(t) * mse, plus, for learned variance, the hybrid term lambda * T * L_t (Nichol &
        Dhariwal 2021, §3.1: lambda * L_vlb with L_vlb = T E_t[L_t]). The VB term sees the predicted mean
        through a stop-gradient, so it trains only the variance. ``pixel_weight`` (broadcastable to x0, e.g.
        :func:`edge_emphasis`) weights each pixel's squared error in ``loss``, not in ``mse``. Everything
        after the network runs in float32 with autocast off, so bf16/fp16 outputs cannot overflow the
        exponentials.
        """
        if noise is None:
            noise = torch.randn_like(x0)
        x_t = self.q_sample(x0, t, noise)
        out = model_fn(x_t, t)
        with torch.autocast(device_type=x0.device.type, enabled=False):
            x0, x_t, noise = x0.float(), x_t.float(), noise.float()
            mean_out, var_values = self.split_output(out.float())
            if mean_out.shape != x0.shape:
                raise ConfigError(
                    f"model output {tuple(out.shape)} does not fit data {tuple(x0.shape)} "
                    f"(variance={self.variance!r} needs {'2x' if self.learned_variance else '1x'} channels)"
                )
            error = (self.target(x0, noise, t) - mean_out) ** 2
            mse = mean_flat(error)
            weighted = mse if pixel_weight is None else mean_flat(error * pixel_weight.float())
            terms = {"mse": mse, "loss": self.loss_weight(t) * weighted}
            if var_values is not None:
                terms["vb"] = self._vb_term(x0, x_t, t, mean_out.detach(), var_values)
                terms["loss"] = terms["loss"] + HYBRID_VB_WEIGHT * self.num_timesteps * terms["vb"]
        return terms

    def _vb_term(self, x0: Tensor, x_t: Tensor, t: Tensor, mean_out: Tensor, var_values: Tensor) -> Tensor:
        """L_t in bits/dim: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t > 0, and the discretized decoder
        NLL -log p(x_0|x_1) at t = 0 (Ho et al. 2020, eq. 5 and 13), which assumes 8-bit images in [-1, 1]."""
        true_mean, _, true_log_var = self.q_posterior(x0, x_t, t)
        model_mean, _, _ = self.q_posterior(self.predict(x_t, t, mean_out)[0], x_t, t)
        model_log_var = interpolate_log_variance(
            var_values, self._coef("posterior_log_variance_clipped", t, x_t), self._coef("log_betas", t, x_t)
        )
        kl = mean_flat(normal_kl(true_mean, true_log_var, model_mean, model_log_var)) / math.log(2.0)
        nll = -mean_flat(discretized_gaussian_log_likelihood(x0, model_mean, model_log_var)) / math.log(2.0)
        return torch.where(t == 0, nll, kl)


def diffusion_from_options(
    options: Mapping[str, Any], owner: str
) -> tuple[dict[str, Any], GaussianDiffusion]:
    """Check an image component's exported diffusion settings (exactly :data:`DIFFUSION_KEYS`) and build its
    :class:`GaussianDiffusion`; returns the settings as a plain dict too. Errors name ``owner``."""
    options = dict(options)
    unknown = sorted(set(options) ^ set(DIFFUSION_KEYS))
    if unknown:
        raise ConfigError(
            f"{owner} diffusion keys {unknown} are missing or unknown; expected {DIFFUSION_KEYS}"
        )
    options["schedule_shift"] = float(options["schedule_shift"])
    schedule = make_schedule(options["schedule"], int(options["num_timesteps"]), options["schedule_shift"])
    diffusion = GaussianDiffusion(
        schedule, options["prediction"], options["variance"], options["loss_weighting"]
    )
    return options, diffusion
