"""Discrete noise schedules: betas, the quantities derived from them, and timestep respacing.

Every array is computed once, in float64, when a :class:`NoiseSchedule` is built; :meth:`NoiseSchedule.table`
hands out float32 copies on the device where the training step runs.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from unclip.errors import ConfigError

SCHEDULES = ("linear", "cosine")


class NoiseSchedule:
    """The forward process q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I) for t = 0 .. T-1.

    Attributes (all float64 numpy arrays of length T, indexed by timestep):
    ``betas``, ``log_betas``, ``alphas_cumprod`` (alpha_bar_t), ``alphas_cumprod_prev`` (alpha_bar_{t-1}, 1 at
    t = 0), ``sqrt_alphas_cumprod``, ``sqrt_one_minus_alphas_cumprod``, ``snr`` (alpha_bar / (1 - alpha_bar)),
    and the posterior q(x_{t-1} | x_t, x_0) of Ho et al. 2020 eq. 6-7: ``posterior_variance`` (beta tilde),
    ``posterior_log_variance_clipped`` (its log, the t = 0 entry, which is 0, replaced by the t = 1 entry),
    ``posterior_mean_coef1`` (multiplies x_0) and ``posterior_mean_coef2`` (multiplies x_t).
    """

    def __init__(self, betas: np.ndarray) -> None:
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or len(betas) < 2:
            raise ConfigError(
                f"a noise schedule needs a 1-D array of at least 2 betas, got shape {betas.shape}"
            )
        if not np.all((betas > 0) & (betas < 1)):
            bad = betas[~((betas > 0) & (betas < 1))][0]
            raise ConfigError(f"every beta must lie in (0, 1); got {bad} (too few steps for this schedule?)")
        ab = np.cumprod(1.0 - betas)
        ab_prev = np.append(1.0, ab[:-1])
        self.betas = betas
        self.log_betas = np.log(betas)
        self.alphas_cumprod = ab
        self.alphas_cumprod_prev = ab_prev
        self.sqrt_alphas_cumprod = np.sqrt(ab)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - ab)
        self.snr = ab / (1.0 - ab)
        self.posterior_variance = betas * (1.0 - ab_prev) / (1.0 - ab)
        self.posterior_log_variance_clipped = np.log(
            np.append(self.posterior_variance[1], self.posterior_variance[1:])
        )
        self.posterior_mean_coef1 = betas * np.sqrt(ab_prev) / (1.0 - ab)
        self.posterior_mean_coef2 = (1.0 - ab_prev) * np.sqrt(1.0 - betas) / (1.0 - ab)
        self._tables: dict[tuple[str, torch.device], torch.Tensor] = {}

    @property
    def num_timesteps(self) -> int:
        return len(self.betas)

    def __repr__(self) -> str:
        ab = self.alphas_cumprod
        return f"NoiseSchedule(T={self.num_timesteps}, alpha_bar=[{ab[0]:.6g} .. {ab[-1]:.6g}])"

    def table(self, name: str, device: torch.device) -> torch.Tensor:
        """The float32 copy of attribute ``name`` on ``device``, made once per device and reused."""
        key = (name, torch.device(device))
        if key not in self._tables:
            self._tables[key] = torch.tensor(getattr(self, name), dtype=torch.float32, device=device)
        return self._tables[key]

    def respace(self, timesteps: list[int]) -> NoiseSchedule:
        """The schedule that jumps straight between the given (ascending) timesteps.

        Keeps alpha_bar at each kept timestep and sets beta_i = 1 - alpha_bar_{t_i} / alpha_bar_{t_{i-1}}, so
        index i of the result is timestep ``timesteps[i]`` of this one (Nichol & Dhariwal 2021, §4).
        """
        ab = self.alphas_cumprod[np.asarray(timesteps)]
        return NoiseSchedule(1.0 - ab / np.append(1.0, ab[:-1]))


def _linear_betas(steps: int) -> np.ndarray:
    # Ho et al. 2020 use 1e-4 .. 0.02 over 1000 steps; scaling both ends by 1000/T keeps the total noise
    # the same for any T, as improved-diffusion does.
    scale = 1000.0 / steps
    return np.linspace(scale * 1e-4, scale * 0.02, steps, dtype=np.float64)


def cosine_alpha_bar(u: np.ndarray | float, offset: float = 0.008) -> np.ndarray:
    """f(u) = cos(((u + s) / (1 + s)) * pi / 2)^2 for u = t / T in [0, 1] (Nichol & Dhariwal 2021, eq. 17)."""
    return np.cos((np.asarray(u, dtype=np.float64) + offset) / (1.0 + offset) * math.pi / 2) ** 2


def _cosine_betas(steps: int) -> np.ndarray:
    u = np.arange(steps + 1, dtype=np.float64) / steps
    f = cosine_alpha_bar(u)
    # beta_t = 1 - alpha_bar_t / alpha_bar_{t-1}, clipped at 0.999 to avoid the singularity at t = T (§3.2).
    return np.minimum(1.0 - f[1:] / f[:-1], 0.999)


def _shift_betas(betas: np.ndarray, shift: float) -> np.ndarray:
    """Lower logSNR(t) by 2 log(shift) at every t (Hoogeboom et al. 2023, "simple diffusion", §3.1).

    shift > 1 divides the signal-to-noise ratio by shift^2, spending more of the chain at high noise; that is
    what flat, low-detail or high-resolution images need (the paper uses shift = resolution / 64).
    """
    ab = np.cumprod(1.0 - betas)
    log_snr = np.log(ab) - np.log1p(-ab) - 2.0 * math.log(shift)
    ab = 1.0 / (1.0 + np.exp(-log_snr))
    return 1.0 - ab / np.append(1.0, ab[:-1])


def make_schedule(kind: str, steps: int, shift: float = 1.0) -> NoiseSchedule:
    """A ``"linear"`` (Ho et al. 2020) or ``"cosine"`` (Nichol & Dhariwal 2021) schedule of ``steps`` steps.

    ``shift`` applies the logSNR shift of :func:`_shift_betas`; 1.0 leaves the schedule unchanged.
    """
    if kind not in SCHEDULES:
        raise ConfigError(f"unknown noise schedule {kind!r}; choose one of {', '.join(SCHEDULES)}")
    if not isinstance(steps, int) or steps < 2:
        raise ConfigError(f"a noise schedule needs an integer number of steps >= 2, got {steps!r}")
    if not shift > 0:
        raise ConfigError(f"the logSNR shift must be positive, got {shift!r}")
    betas = _linear_betas(steps) if kind == "linear" else _cosine_betas(steps)
    if shift != 1.0:
        betas = _shift_betas(betas, shift)
    return NoiseSchedule(betas)


def space_timesteps(num_timesteps: int, spec: int | str) -> list[int]:
    """Choose which of ``num_timesteps`` steps a sampler visits, ascending (improved-diffusion's respacing).

    - ``N`` or ``"N"``: N steps evenly spaced from 0 to T-1, both ends included;
    - ``"a,b,c"``: split 0..T-1 into equal sections and space a, b, c steps evenly within each one;
    - ``"ddimN"``: every k-th step from 0, with the integer stride k that yields exactly N steps (the DDIM
      paper's uniform spacing, Song et al. 2021 §4.2, and diffusers' "leading" spacing).
    """
    if isinstance(spec, str) and spec.startswith("ddim"):
        count = _parse_count(spec[4:], spec)
        for stride in range(1, num_timesteps + 1):
            if len(range(0, num_timesteps, stride)) == count:
                return list(range(0, num_timesteps, stride))
        raise ConfigError(f"no integer stride gives exactly {count} of {num_timesteps} steps for {spec!r}")
    counts = [spec] if isinstance(spec, int) else [_parse_count(p, spec) for p in spec.split(",")]
    size, extra = divmod(num_timesteps, len(counts))
    chosen, start = [], 0
    for i, count in enumerate(counts):
        section = size + (1 if i < extra else 0)
        if not 1 <= count <= section:
            raise ConfigError(f"cannot take {count} steps from a section of {section} (steps spec {spec!r})")
        stride = (section - 1) / (count - 1) if count > 1 else 1.0
        chosen += [start + round(j * stride) for j in range(count)]
        start += section
    return chosen


def _parse_count(text: str, spec: int | str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"cannot read a step count from {spec!r}; use N, 'a,b,c' or 'ddimN'") from None
