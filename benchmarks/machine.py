"""What the benchmark ran on, and how busy that machine was while it ran.

- :func:`host_info`: CPU model, core count, threads used, whether the CPU has AVX-512 BF16 / AMX (without
  them bf16 matmuls on CPU are emulated and slow), the GPU name when there is one, torch version.
- :func:`matmul_peak`: the machine's measured dense matmul throughput (GFLOP/s) in fp32 and bf16 on the
  threads in use -- the denominator of model FLOPs utilisation (MFU, Chowdhery et al. 2022, PaLM App. B),
  measured rather than taken from a datasheet so that it holds for this host and thread count.
- :class:`BusyMeter`: the share of the machine's CPU time that *other* processes used during a measurement,
  from ``/proc/stat`` (all CPUs' busy jiffies) minus this process's own CPU time (``os.times``). A share
  above ~10 % means the numbers are noisy: other work competed for the cores.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass

import torch

from unclip.precision import cpu_info, matmul_gflops


def host_info(device: torch.device) -> dict[str, object]:
    """A dict describing the host, the device and the software the numbers belong to."""
    cpu, flags = cpu_info()
    info: dict[str, object] = {
        "host": platform.node(),
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "avx512f": "avx512f" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
    return info


def matmul_peak(device: torch.device, dtype: torch.dtype, seconds: float = 1.0) -> float:
    """Best measured GFLOP/s of square matmuls in ``dtype`` on ``device``: n = 1024 on CPU, 8192 on GPU.
    fp32 on GPU runs without TF32 (torch's default), so it is the true fp32 peak."""
    return matmul_gflops(device, dtype, 8192 if device.type == "cuda" else 1024, seconds)


def _machine_busy_jiffies() -> tuple[int, int] | None:
    """(busy, total) jiffies summed over all CPUs since boot, from the first line of /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    # guest time is already counted in user, so only the first 8 fields add up to the total
    total = sum(fields[:8])
    return total - idle, total


@dataclass
class BusyReading:
    """``other_share``: fraction of all cores' time used by other processes (None where /proc is missing);
    ``own_share``: fraction used by this process; ``loadavg``: 1-minute load average at the end."""

    other_share: float | None
    own_share: float
    loadavg: float | None
    wall_s: float


class BusyMeter:
    """Context manager measuring how much of the machine other processes used while it was open."""

    def __enter__(self) -> BusyMeter:
        self._start_machine = _machine_busy_jiffies()
        self._start_own = sum(os.times()[:2])
        self._start_wall = time.perf_counter()
        self.reading: BusyReading | None = None
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.perf_counter() - self._start_wall
        own = sum(os.times()[:2]) - self._start_own
        cores = os.cpu_count() or 1
        other = None
        end = _machine_busy_jiffies()
        if end is not None and self._start_machine is not None:
            busy = end[0] - self._start_machine[0]
            total = end[1] - self._start_machine[1]
            if total > 0 and wall > 0:
                # busy share of all cores, less our own CPU seconds as a share of the same core-seconds
                other = max(0.0, busy / total - own / (wall * cores))
        try:
            load = os.getloadavg()[0]
        except OSError:
            load = None
        self.reading = BusyReading(other, own / (wall * cores) if wall > 0 else 0.0, load, wall)
