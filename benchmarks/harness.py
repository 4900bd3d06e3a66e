"""Timing, FLOP counting and profiling of one workload's implementations, side by side.

Every implementation of a workload is a :class:`Candidate`: a closure doing one unit of work (one training
step, one sampling run) on ``items`` images or embeddings. :func:`measure` runs them interleaved -- repeat 1
of every candidate, then repeat 2, ... -- so that a burst of load from another process hits all of them
alike rather than one; it reports the median throughput and its spread (min and max over repeats).

FLOPs are counted once per candidate with ``torch.utils.flop_counter.FlopCounterMode`` (matmuls,
convolutions and attention, forward and backward; elementwise work is not counted), and model FLOPs
utilisation is counted FLOPs per second over the machine's measured matmul peak (PaLM App. B's MFU).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.machine import BusyMeter
from unclip.precision import synchronize


class Unavailable(Exception):
    """A peer that cannot run here (not installed, or no comparable path); the message says why."""


@dataclass
class Candidate:
    """One implementation of a workload: ``run()`` does one unit of work on ``items`` images / samples."""

    name: str
    params: int
    run: Callable[[], object]
    items: int
    note: str = ""


@dataclass
class Result:
    name: str
    params: int | None = None
    rates: list[float] = field(default_factory=list)  # items/s per repeat
    flops: float | None = None  # per run
    peak_memory_mib: float | None = None
    note: str = ""
    error: str | None = None
    items: int = 1  # images / samples per run

    @property
    def median(self) -> float | None:
        return statistics.median(self.rates) if self.rates else None

    def as_dict(self, peak_gflops: float | None) -> dict[str, object]:
        out: dict[str, object] = {"name": self.name, "params": self.params, "note": self.note}
        if self.error:
            out["error"] = self.error
            return out
        med = self.median
        out.update(
            rate_median=med,
            rate_min=min(self.rates),
            rate_max=max(self.rates),
            rates=self.rates,
            gflops_per_run=None if self.flops is None else self.flops / 1e9,
            peak_memory_mib=self.peak_memory_mib,
        )
        out["mfu"] = self.mfu(peak_gflops)
        return out

    def mfu(self, peak_gflops: float | None) -> float | None:
        """Counted FLOPs per second over the measured matmul peak."""
        if not (self.flops and peak_gflops and self.rates):
            return None
        return self.flops * (self.median / self.items) / (peak_gflops * 1e9)


def count_flops(fn: Callable[[], object]) -> tuple[float, object]:
    """(FLOPs counted by FlopCounterMode in one call of ``fn``, its return value)."""
    counter = FlopCounterMode(display=False)
    with counter:
        out = fn()
    return float(counter.get_total_flops()), out


def measure(
    candidates: list[Candidate | Result],
    device: torch.device,
    repeats: int,
    min_seconds: float = 0.0,
    count: bool = True,
) -> tuple[list[Result], dict[str, object]]:
    """Warm up each candidate once (counting its FLOPs and, on CUDA, its peak memory), then time ``repeats``
    interleaved rounds. A round runs a candidate ``k`` times, ``k`` chosen from the warm-up's time so that a
    round lasts at least ``min_seconds``. Returns the results and the busy reading of the timed rounds."""
    results: list[Result] = []
    runnable: list[tuple[Candidate, Result, int]] = []
    for cand in candidates:
        if isinstance(cand, Result):  # already an error
            results.append(cand)
            continue
        res = Result(cand.name, cand.params, note=cand.note, items=cand.items)
        results.append(res)
        try:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            if count:  # the warm-up run (lazy init, caches, compilation) also counts the FLOPs
                res.flops, _ = count_flops(cand.run)
            else:
                cand.run()
            synchronize(device)
            once = time.perf_counter() - start
            if device.type == "cuda":
                res.peak_memory_mib = torch.cuda.max_memory_allocated(device) / 2**20
        except Exception as err:  # noqa: BLE001 -- a peer failing must not stop the others
            res.error = f"{type(err).__name__}: {err}"[:300]
            continue
        runnable.append((cand, res, max(1, int(min_seconds / max(once, 1e-6)) + 1) if min_seconds else 1))
    with BusyMeter() as meter:
        for _ in range(repeats):
            for cand, res, k in runnable:
                synchronize(device)
                start = time.perf_counter()
                for _ in range(k):
                    cand.run()
                synchronize(device)
                res.rates.append(k * cand.items / (time.perf_counter() - start))
    reading = meter.reading
    busy = {
        "other_processes_share": None if reading is None else reading.other_share,
        "own_share": None if reading is None else reading.own_share,
        "loadavg_1min": None if reading is None else reading.loadavg,
        "timed_seconds": None if reading is None else reading.wall_s,
    }
    return results, busy


def profile_summary(fn: Callable[[], object], device: torch.device, rows: int = 12) -> str:
    """Top operators of one call of ``fn`` by self CPU time (and self CUDA time on a GPU), as text."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    sort = "self_cpu_time_total"
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        sort = "self_cuda_time_total"
    with torch.profiler.profile(activities=activities) as prof:
        fn()
        synchronize(device)
    return prof.key_averages().table(sort_by=sort, row_limit=rows, max_name_column_width=48)


@contextlib.contextmanager
def autocast(device: torch.device, precision: str):
    """bf16 autocast for ``precision == "bf16"``, nothing for fp32."""
    if precision == "bf16":
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            yield
    else:
        yield
