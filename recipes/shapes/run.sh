#!/usr/bin/env bash
# The main job: train the cascade on the embedded `shapes` data on CPU and print each stage's evaluation.
# Extra arguments are Hydra overrides passed to every stage, e.g. `bash recipes/shapes/run.sh trainer.cpu=true`.
set -euo pipefail
OUT="${OUT:-runs/shapes}"

echo "== 1/3 CLIP (contrastive, tiny conv net, 64 px) -> $OUT/clip"
unclip-train experiment=shapes_clip hydra.run.dir="$OUT/clip" "$@"

echo "== 2/3 diffusion prior (caption -> CLIP image embedding) -> $OUT/prior"
unclip-train experiment=shapes_prior stage.clip="$OUT/clip/export" hydra.run.dir="$OUT/prior" "$@"

echo "== 3/3 pipeline folder -> $OUT/pipeline, and sampled embeddings -> $OUT/samples"
python -m unclip.pipeline "$OUT/pipeline" clip="$OUT/clip/export" prior="$OUT/prior/export"
unclip-sample pipeline="$OUT/pipeline" prompt="a small red circle in the top left" num_images=4 out="$OUT/samples"
