"""Numeric precision of training and sampling: ``no`` (fp32), ``bf16``, ``fp16``, or ``auto``.

Lower precision is not always faster. On GPUs with bf16 tensor cores (Ampere and later) bf16 autocast is
several times faster than fp32. On a CPU it depends on the host: with AVX-512 BF16 or AMX a bf16 matmul runs
at several times the fp32 rate, and without them PyTorch emulates bf16 and runs it slower than fp32. This was
measured on two hosts: 327 GFLOP/s against 128, and 0.7 GFLOP/s against 71.

``auto`` therefore decides per device:

- **CUDA**: ``bf16`` where the GPU supports it, else ``fp16`` on GPUs with tensor cores (compute capability
  7.x, trained with Accelerate's loss scaling), else ``no``.
- **CPU**: times a square matmul in fp32 and in bf16 (about 0.1 s) and picks ``bf16`` only if it runs at
  least :data:`CPU_BF16_MARGIN` times the fp32 rate, and, on x86, only if the CPU has AVX-512 BF16 or AMX
  (without them the rate measured on a busy machine could mislead). The margin covers the casts that
  autocast adds around every matmul and convolution. On the hosts measured the two rates differ by 2.5x or
  more, so the choice does not flip between runs or processes.
- anything else (MPS, XPU): ``no``.

Every choice comes with a one-line reason that names the numbers it was made from. The trainer logs it and
the samplers record it beside their outputs. The diffusion maths stays in fp32 whatever is chosen: samplers
keep x_t in fp32, and only the networks' matmuls and convolutions run under autocast.
"""

from __future__ import annotations

import contextlib
import functools
import platform
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from unclip.errors import ConfigError

# autocast dtype of each explicit choice; ``no`` runs fp32
AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}
PRECISION_CHOICES = ("auto", *AUTOCAST_DTYPES)
CPU_BF16_MARGIN = 1.25


@dataclass(frozen=True)
class PrecisionChoice:
    """A resolved precision (``no`` | ``bf16`` | ``fp16``) and why it was chosen."""

    precision: str
    reason: str


def check_precision(precision: str, key: str = "precision") -> None:
    """Refuse anything but ``auto``, ``no``, ``bf16`` and ``fp16``, naming the config ``key``."""
    if precision not in PRECISION_CHOICES:
        raise ConfigError(f"{key}={precision!r} must be one of {list(PRECISION_CHOICES)}")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_gflops(device: torch.device, dtype: torch.dtype, n: int, seconds: float) -> float:
    """Best GFLOP/s of ``n`` x ``n`` matmuls (2 n^3 FLOPs each) in ``dtype`` on ``device`` over ``seconds``
    of repeats, after one warm-up; at least one timed repeat runs however short ``seconds`` is."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    torch.matmul(a, b)
    synchronize(device)
    repeats = 4 if device.type == "cuda" else 1
    best, deadline = 0.0, time.perf_counter() + seconds
    while True:
        start = time.perf_counter()
        for _ in range(repeats):
            torch.matmul(a, b)
        synchronize(device)
        best = max(best, repeats * 2 * n**3 / (time.perf_counter() - start) / 1e9)
        if time.perf_counter() >= deadline:
            return best


def cpu_info() -> tuple[str, set[str]]:
    """This CPU's model name and feature flags, from ``/proc/cpuinfo`` (empty flags where it is missing)."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return platform.processor() or "unknown", set()
    name, flags = "unknown", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and name == "unknown":
            name = value.strip()
        elif key.strip() in ("flags", "Features") and not flags:
            flags = set(value.split())
    return name, flags


def choose_cpu_precision(fp32_gflops: float, bf16_gflops: float, flags: set[str]) -> PrecisionChoice:
    """bf16 only where this CPU's measured bf16 matmul rate beats fp32 by :data:`CPU_BF16_MARGIN` and, on
    x86 (``flags`` holding ``sse2``), the CPU has AVX-512 BF16 or AMX."""
    ratio = bf16_gflops / fp32_gflops
    rates = f"bf16 matmul {bf16_gflops:.1f} GFLOP/s against fp32 {fp32_gflops:.1f} GFLOP/s ({ratio:.2f}x)"
    if "sse2" in flags and not flags & {"avx512_bf16", "amx_bf16"}:
        return PrecisionChoice("no", f"fp32: this CPU has neither AVX-512 BF16 nor AMX ({rates})")
    if ratio >= CPU_BF16_MARGIN:
        return PrecisionChoice("bf16", f"this CPU runs {rates}")
    return PrecisionChoice("no", f"fp32: this CPU runs {rates}, so bf16 would not be faster")


@functools.cache
def _auto(device_type: str, index: int | None) -> PrecisionChoice:
    if device_type == "cuda":
        major, minor = torch.cuda.get_device_capability(index)
        gpu = f"{torch.cuda.get_device_name(index)} (compute capability {major}.{minor})"
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return PrecisionChoice("bf16", f"{gpu} has bf16 tensor cores")
        if major >= 7:
            return PrecisionChoice("fp16", f"{gpu} has fp16 tensor cores only")
        return PrecisionChoice("no", f"fp32: {gpu} has no tensor cores")
    if device_type == "cpu":
        cpu = torch.device("cpu")
        n, seconds = 256, 0.05
        return choose_cpu_precision(
            matmul_gflops(cpu, torch.float32, n, seconds),
            matmul_gflops(cpu, torch.bfloat16, n, seconds),
            cpu_info()[1],
        )
    return PrecisionChoice("no", f"fp32: no automatic choice for {device_type} devices")


def resolve_precision(precision: str, device: str | torch.device, key: str = "precision") -> PrecisionChoice:
    """The precision to run on ``device``: an explicit choice as given, ``auto`` decided as the module
    docstring says (measured once per process and device)."""
    check_precision(precision, key)
    if precision != "auto":
        return PrecisionChoice(precision, f"{key}={precision} as configured")
    device = torch.device(device)
    index = device.index if device.type != "cuda" or device.index is not None else torch.cuda.current_device()
    choice = _auto(device.type, index)
    return PrecisionChoice(choice.precision, f"{key}=auto chose {choice.precision}: {choice.reason}")


@contextlib.contextmanager
def sampling_precision(
    device: str | torch.device, precision: str, key: str = "precision"
) -> Iterator[PrecisionChoice]:
    """Autocast to ``precision`` (resolved by :func:`resolve_precision`) on ``device`` and yield the choice;
    ``no`` runs fp32. Samplers keep x_t in fp32, so only the networks run in the lower precision."""
    choice = resolve_precision(precision, device, key)
    dtype = AUTOCAST_DTYPES[choice.precision]
    if dtype is None:
        yield choice
        return
    with torch.autocast(device_type=torch.device(device).type, dtype=dtype):
        yield choice
