#!/usr/bin/env bash
# The main job: train the whole cascade on the embedded `shapes` data on CPU, sample from it and evaluate it.
#   clip -> prior -> decoder (64 px) -> sr256 -> sr1024, then a pipeline folder, samples and `unclip-eval`.
# Extra arguments are Hydra overrides passed to every training stage, e.g. `bash recipes/shapes/run.sh
# trainer.cpu=true`. Sized for 2 CPU cores and about 30 minutes; the per-stage recipes in conf/experiment/
# train each stage longer (see README.md).
set -euo pipefail
OUT="${OUT:-runs/shapes}"
START=$SECONDS
TIMES=()

stage() {  # stage NAME COMMAND...: run one step, print and remember its wall time
  local name=$1 begin=$SECONDS
  shift
  echo "== $name"
  "$@"
  TIMES+=("$(printf '%-34s %3d min %02d s' "$name" $(((SECONDS - begin) / 60)) $(((SECONDS - begin) % 60)))")
}

stage "1/8 CLIP -> $OUT/clip" \
  unclip-train experiment=shapes_clip hydra.run.dir="$OUT/clip" "$@"
stage "2/8 prior -> $OUT/prior" \
  unclip-train experiment=shapes_prior stage.clip="$OUT/clip/export" hydra.run.dir="$OUT/prior" "$@"
# the decoder recipe is 1300 steps (10.5-21 min by host); 800 fit the demo's budget
stage "3/8 decoder (64 px) -> $OUT/decoder" \
  unclip-train experiment=shapes_decoder stage.clip="$OUT/clip/export" hydra.run.dir="$OUT/decoder" \
  trainer.max_steps=800 trainer.checkpoint_every=400 stage.eval_images=50 stage.eval_without_caption=false "$@"
stage "4/8 upsampler 64 -> 256 -> $OUT/sr256" \
  unclip-train experiment=shapes_sr256 hydra.run.dir="$OUT/sr256" "$@"
# the 1024 px recipe's 500 steps take ~4 min (README); 150 steps on 300 renders keep the demo in its budget
stage "5/8 upsampler 256 -> 1024 -> $OUT/sr1024" \
  unclip-train experiment=shapes_sr1024 hydra.run.dir="$OUT/sr1024" \
  data.train_size=300 data.eval_size=8 trainer.max_steps=150 trainer.checkpoint_every=150 "$@"

stage "6/8 pipeline -> $OUT/pipeline" \
  python -m unclip.pipeline "$OUT/pipeline" clip="$OUT/clip/export" prior="$OUT/prior/export" \
  decoder="$OUT/decoder/export" sr256="$OUT/sr256/export" sr1024="$OUT/sr1024/export"

make_samples() {  # text -> image at 1024 and 64 px; a variation and an interpolation of two samples at 256 px
  local S=(unclip-sample pipeline="$OUT/pipeline" seed=0 progress=false)
  "${S[@]}" prompt="a large blue star in the centre" num_images=2 size=1024 out="$OUT/samples/text_1024"
  mkdir -p "$OUT/samples"
  printf 'a red circle\na green triangle on a white background\na small yellow square in the top left\n' \
    >"$OUT/samples/prompts.txt"
  "${S[@]}" prompts_file="$OUT/samples/prompts.txt" num_images=4 size=64 out="$OUT/samples/text_64"
  "${S[@]}" image="$OUT/samples/text_64/0000.png" num_images=4 size=256 out="$OUT/samples/variations_256"
  "${S[@]}" interpolate="[$OUT/samples/text_64/0000.png,$OUT/samples/text_64/0004.png]" num_images=5 \
    size=256 out="$OUT/samples/interpolation_256"
}
stage "7/8 samples -> $OUT/samples" make_samples
stage "8/8 unclip-eval (64 px) -> $OUT/eval" \
  unclip-eval pipeline="$OUT/pipeline" captions=100 out="$OUT/eval" progress=false

echo
echo "== wall time per step"
printf '%s\n' "${TIMES[@]}"
printf '%-34s %3d min %02d s\n' "all" $(((SECONDS - START) / 60)) $(((SECONDS - START) % 60))
echo "report: $OUT/eval/report.md, samples: $OUT/samples/"
