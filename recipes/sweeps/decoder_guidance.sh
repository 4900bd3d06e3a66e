#!/usr/bin/env bash
# Decoder guidance scale x sampling steps x sampler, each job judged by `unclip-eval pipeline=...` on the
# `shapes` eval captions; prints one table of all jobs at the end. Extra arguments are Hydra overrides for
# every job.
#   bash recipes/sweeps/decoder_guidance.sh                                     # runs/shapes/pipeline, here
#   GUIDANCE=1,3 STEPS=25,50 CAPTIONS=100 bash recipes/sweeps/decoder_guidance.sh prior.guidance_scale=4
#   SAMPLER=ddim,dpmpp_2m GUIDANCE=3 STEPS=10,15,25,50 CAPTIONS=200 bash recipes/sweeps/decoder_guidance.sh
#   LAUNCHER=slurm bash recipes/sweeps/decoder_guidance.sh hydra.launcher.partition=gpu device=cuda
set -euo pipefail
PIPELINE="${PIPELINE:-runs/shapes/pipeline}"
GUIDANCE="${GUIDANCE:-1,2,3,5}"
STEPS="${STEPS:-10,25}"
SAMPLER="${SAMPLER:-}"  # ddim, dpmpp_2m, ddpm, or a comma list of them; empty: the pipeline's own
CAPTIONS="${CAPTIONS:-50}"
LAUNCHER="${LAUNCHER:-basic}"  # basic: one job after another in this process; slurm: one SLURM job each
OUT="${OUT:-runs/sweeps/decoder_guidance/$(date +%Y-%m-%d_%H-%M-%S)}"

# One job per (guidance scale, steps, sampler), each writing eval.json, report.md and grid.png into $OUT/<job>/.
# The slurm launcher returns when every job has finished, so the table below sees them all.
SAMPLERS=()
if [ -n "$SAMPLER" ]; then SAMPLERS=(decoder.sampler="$SAMPLER"); fi
unclip-eval -m hydra/launcher="$LAUNCHER" pipeline="$PIPELINE" captions="$CAPTIONS" out="$OUT" \
    decoder.guidance_scale="$GUIDANCE" decoder.steps="$STEPS" "${SAMPLERS[@]}" "$@"

python3 - "$OUT" <<'PY'
import json
import sys
from pathlib import Path


def fmt(value):
    return "n/a" if value is None else f"{value:.3f}"


print(f"\n{'job':>3} {'sampler':>8} {'guidance':>8} {'steps':>5} {'split':<12} {'colour':>6} {'shape':>6} "
      f"{'clip':>6} {'real':>6} {'FD':>7} {'floor':>7} {'seconds':>7}")
for path in sorted(Path(sys.argv[1]).glob("*/eval.json"), key=lambda p: int(p.parent.name)):
    report = json.loads(path.read_text())
    decoder = report["decoder"]
    for split, m in report["splits"].items():
        acc = m["accuracy"]
        print(f"{path.parent.name:>3} {decoder['sampler']:>8} {decoder['guidance_scale']:>8} "
              f"{decoder['steps']:>5} {split:<12} {fmt(acc['colour']):>6} {fmt(acc['shape']):>6} "
              f"{fmt(m['clip_score']):>6} {fmt(m['clip_score_real']):>6} {fmt(m['frechet_distance']):>7} "
              f"{fmt(m['frechet_distance_floor']):>7} {m.get('sampling_seconds', float('nan')):>7.1f}")
print(f"\nreports: {sys.argv[1]}/<job>/report.md (the job's overrides: <job>/.hydra/overrides.yaml)")
PY
