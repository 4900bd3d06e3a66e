"""Side-by-side speed of unclip against diffusers and dalle2-pytorch on identical work (issue 9).

    python -m benchmarks.run                      # every workload, CPU, fp32 (and bf16 for W1)
    python -m benchmarks.run --quick              # W1 and W3 in fp32, ~2-3 minutes on 2 cores
    python -m benchmarks.run --device cuda --compile --out $OUT
    python -m benchmarks.run --workloads W1,W3 --profile

Prints a table (throughput median [min-max] over interleaved repeats, ours / peer, counted GFLOPs per run,
model FLOPs utilisation against this machine's measured matmul peak, and how much of the machine other
processes used while each workload was timed) and writes the same as JSON to
``benchmarks/results/<host>-<date>.json`` (or ``--out``). benchmarks/README.md explains each workload.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

if __package__ in (None, ""):  # `python benchmarks/run.py` as well as `python -m benchmarks.run`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import ours, peers  # noqa: E402
from benchmarks.harness import Candidate, Result, Unavailable, measure, profile_summary  # noqa: E402
from benchmarks.machine import host_info, matmul_peak  # noqa: E402
from unclip.precision import resolve_precision  # noqa: E402


@dataclass
class Workload:
    key: str
    title: str
    unit: str
    precision: str
    build: object  # (args, device, precision) -> list[Candidate | Result]


def _attempt(name: str, make) -> Candidate | Result:
    try:
        return make()
    except Unavailable as err:
        return Result(name, error=str(err))
    except Exception as err:  # noqa: BLE001 -- one implementation failing must not stop the run
        detail = traceback.format_exception_only(type(err), err)[-1].strip()
        return Result(name, error=f"failed to build: {detail}"[:300])


def _with_peers(ours_cand: Candidate | Result, peer_makers: dict[str, object]) -> list[Candidate | Result]:
    if isinstance(ours_cand, Result):
        return [ours_cand]
    return [ours_cand] + [_attempt(name, make) for name, make in peer_makers.items()]


def w1(args, device, precision):
    o = _attempt("ours", lambda: ours.w1_decoder_train(device, precision, 8, args.optimizer, args.compile))
    target = getattr(o, "params", None)
    return _with_peers(
        o,
        {
            "diffusers": lambda: peers.diffusers_w1(
                device, precision, 8, args.optimizer, target, args.compile
            ),
            "dalle2-pytorch": lambda: peers.dalle2_w1(
                device, precision, 8, args.optimizer, target, args.compile
            ),
        },
    )


def _prior_shape(cand: Candidate) -> SimpleNamespace:
    c = ours.PriorConfig()
    return SimpleNamespace(
        width=c.width, heads=c.heads, layers=c.layers, clip_embed_dim=c.clip_embed_dim, params=cand.params
    )


def _w2(real_captions: bool):
    """W2 with all 77 caption tokens real, or (``real_captions``) with ``shapes`` captions' lengths and
    the rest of the 77 positions padding, masked for every implementation."""

    def build(args, device, precision):
        lengths = ours.shapes_caption_lengths(64) if real_captions else None
        o = _attempt(
            "ours", lambda: ours.w2_prior_train(device, precision, 64, args.optimizer, args.compile, lengths)
        )
        if isinstance(o, Result):
            return [o]
        shape = _prior_shape(o)
        common = (device, precision, 64, args.optimizer, shape, args.compile, lengths)
        return _with_peers(
            o,
            {
                "diffusers": lambda: peers.diffusers_w2(*common),
                "dalle2-pytorch": lambda: peers.dalle2_w2(*common),
            },
        )

    return build


def w3(args, device, precision):
    steps = args.decoder_steps
    o = _attempt("ours", lambda: ours.w3_decoder_sample(device, precision, 4, steps, args.compile))
    target = getattr(o, "params", None)
    return _with_peers(
        o,
        {
            "diffusers": lambda: peers.diffusers_w3(device, precision, 4, steps, target, args.compile),
            "dalle2-pytorch": lambda: peers.dalle2_w3(device, precision, 4, steps, target, args.compile),
        },
    )


def w4(args, device, precision):
    o = _attempt("ours", lambda: ours.w4_prior_sample(device, precision, 8, 64, args.compile))
    if isinstance(o, Result):
        return [o]
    shape = _prior_shape(o)
    return _with_peers(
        o,
        {
            "diffusers": lambda: peers.diffusers_w4(device, precision, 8, 64, shape, args.compile),
            "dalle2-pytorch": lambda: peers.dalle2_w4(device, precision, 8, 64, shape, args.compile),
        },
    )


def _w5(name: str, low: int, steps: int):
    def build(args, device, precision):
        o = _attempt("ours", lambda: ours.w5_upsample(device, precision, name, low, 1, args.compile))
        target = getattr(o, "params", None)
        return _with_peers(
            o,
            {
                "diffusers": lambda: peers.diffusers_w5(
                    device, precision, low, 1, steps, target, args.compile
                ),
                "dalle2-pytorch": lambda: peers.dalle2_w5(
                    device, precision, low, 1, steps, target, args.compile
                ),
            },
        )

    return build


def w6(args, device, precision):
    o = _attempt("ours", lambda: ours.w6_cascade(device, precision))
    none = "no comparable path (no text -> 1024 px cascade of small pixel-space stages)"
    return [o, Result("diffusers", error=none), Result("dalle2-pytorch", error=none)]


def workloads(args, device: torch.device) -> list[Workload]:
    p = args.precision
    every = [
        Workload("W1-fp32", "decoder U-Net training step, 64 px, batch 8", "img/s", "fp32", w1),
        Workload("W1-bf16", "decoder U-Net training step, 64 px, batch 8", "img/s", "bf16", w1),
        Workload("W2", "prior training step, batch 64, 77 tokens", "samples/s", p, _w2(False)),
        Workload(
            "W2-captions",
            "prior training step, batch 64, shapes captions (5-18 tokens) padded to 77",
            "samples/s",
            p,
            _w2(True),
        ),
        Workload(
            "W3", f"decoder sampling, CFG, 64 px, batch 4, {args.decoder_steps} DDIM steps", "img/s", p, w3
        ),
        Workload("W4", "prior sampling, CFG, 64 DDIM steps, best-of-2, 8 captions", "captions/s", p, w4),
        Workload("W5-256", "upsampler 64 -> 256, 27 DDIM steps, 1 image", "img/s", p, _w5("sr256", 64, 27)),
        Workload(
            "W5-1024", "upsampler 256 -> 1024, 15 DDIM steps, 1 image", "img/s", p, _w5("sr1024", 256, 15)
        ),
        Workload("W6", "cascade text -> 1024 px, 1 image", "img/s", p, w6),
    ]
    wanted = args.workloads.split(",")
    chosen = [w for w in every if w.key in wanted or w.key.split("-")[0] in wanted]
    if not chosen:
        raise SystemExit(f"no workload matches {args.workloads!r}; known: {[w.key for w in every]}")
    return chosen


def _cell(value: float | None, spec: str, suffix: str = "", scale: float = 1.0) -> str:
    return "" if value is None else f"{scale * value:{spec}}{suffix}"


def print_table(rows: list[dict], peak: dict[str, float]) -> None:
    header = (
        f"{'workload':9} {'impl':15} {'params':>9} {'median [min-max]':>24} {'unit':10} "
        f"{'ours/peer':>9} {'GFLOP/run':>10} {'MFU':>6} {'others':>6}  note"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        other = row["busy"]["other_processes_share"]
        for r in row["results"]:
            lead = f"{row['key']:9} {r['name']:15}"
            if "error" in r:
                print(f"{lead} {'-':>9} {'-':>24} {row['unit']:10}  {r['error']}"[:220])
                continue
            med = f"{r['rate_median']:.3g} [{r['rate_min']:.3g}-{r['rate_max']:.3g}]"
            memory = f" | peak {r['peak_memory_mib']:.0f} MiB" if r.get("peak_memory_mib") else ""
            print(
                f"{lead} {r['params'] or 0:>9,} {med:>24} {row['unit']:10} "
                f"{_cell(row['ratios'].get(r['name']), '.2f', 'x'):>9} "
                f"{_cell(r.get('gflops_per_run'), '.3g'):>10} {_cell(r.get('mfu'), '.1f', '%', 100):>6} "
                f"{_cell(other, '.0f', '%', 100):>6}  {r['note']}{memory}"
            )
    print(
        f"matmul peak: fp32 {peak['fp32']:.1f} GFLOP/s, bf16 {peak['bf16']:.1f} GFLOP/s; "
        "'others' = share of all cores used by other processes while the workload was timed"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workloads", default="W1,W2,W3,W4,W5,W6")
    parser.add_argument(
        "--quick", action="store_true", help="W1-fp32 and W3 (5 steps) only, 2 repeats, no FLOP count"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--min-seconds", type=float, default=0.0, help="least length of one timed round")
    parser.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16"),
        default="auto",
        help="W2-W6; auto: what precision=auto picks on this device (unclip.precision), bf16 only if faster",
    )
    parser.add_argument("--optimizer", choices=("default", "foreach", "fused"), default="default")
    parser.add_argument("--compile", action="store_true", help="torch.compile every implementation's network")
    parser.add_argument("--decoder-steps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--profile", action="store_true", help="also write top operators per implementation")
    parser.add_argument("--out", default=None, help="folder for the JSON (default benchmarks/results)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    auto = resolve_precision("auto", device)
    if args.precision == "auto":
        args.precision = "bf16" if auto.precision == "bf16" else "fp32"
    if args.quick:
        args.workloads, args.repeats, args.decoder_steps = "W1-fp32,W3", min(args.repeats, 2), 5
    count_flops = not args.quick

    info = host_info(device)
    peak = {"fp32": matmul_peak(device, torch.float32), "bf16": matmul_peak(device, torch.bfloat16)}
    print(
        f"{info['cpu']} | {info['cpu_cores']} cores, torch threads {info['torch_threads']} | "
        f"AVX-512 BF16 {info['avx512_bf16']}, AMX {info['amx_bf16']} | {info.get('gpu', 'no GPU')} | "
        f"torch {info['torch']} | load {os.getloadavg()[0]:.2f}"
    )
    print(auto.reason)
    out_dir = Path(args.out) if args.out else Path(__file__).resolve().parent / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = f"{platform.node()}-{stamp}{'-quick' if args.quick else ''}"
    rows, profiles = [], []
    for w in workloads(args, device):
        print(f"{w.key}: {w.title} ({w.precision}) ...", flush=True)
        cands = w.build(args, device, w.precision)
        results, busy = measure(cands, device, args.repeats, args.min_seconds, count=count_flops)
        ours_rate = next((r.median for r in results if r.name == "ours" and not r.error), None)
        ratios = {
            r.name: ours_rate / r.median for r in results if r.name != "ours" and not r.error and ours_rate
        }
        peak_w = peak["bf16" if w.precision == "bf16" else "fp32"]
        rows.append(
            {
                "key": w.key,
                "title": w.title,
                "unit": w.unit,
                "precision": w.precision,
                "results": [r.as_dict(peak_w) for r in results],
                "ratios": ratios,
                "best_peer_ratio": min(ratios.values()) if ratios else None,
                "busy": busy,
            }
        )
        if args.profile:
            for cand in cands:
                if isinstance(cand, Candidate):
                    profiles.append(
                        f"== {w.key} {cand.name} ({w.precision})\n{profile_summary(cand.run, device)}"
                    )
        del cands
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print()
    print_table(rows, peak)
    for row in rows:
        if row["best_peer_ratio"] is not None:
            print(f"{row['key']}: ours / best peer = {row['best_peer_ratio']:.2f}x")
    report = {
        "host": info,
        "matmul_peak_gflops": peak,
        "auto_precision": {"precision": auto.precision, "reason": auto.reason},
        "args": vars(args),
        "workloads": rows,
    }
    path = out_dir / f"{base}.json"
    path.write_text(json.dumps(report, indent=1))
    print(f"wrote {path}")
    if profiles:
        ppath = out_dir / f"{base}-profile.txt"
        ppath.write_text("\n\n".join(profiles))
        print(f"wrote {ppath}")


if __name__ == "__main__":
    main()
