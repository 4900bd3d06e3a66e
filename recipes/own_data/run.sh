#!/usr/bin/env bash
# Your own captioned photographs, end to end on CPU: the CLIP, prior and decoder stages on a folder of ~200
# images, changing only `data=folder data.path=...` from the shapes recipes. The folder is made from the
# sample photographs shipped with scikit-image (make_photo_folder.py); point PHOTOS at your own folder instead
# (images + metadata.jsonl with file_name and caption, or same-name .txt captions).
#   bash recipes/own_data/run.sh            # ~15 min on 2 cores
set -euo pipefail
OUT="${OUT:-runs/own_data}"
PHOTOS="${PHOTOS:-$OUT/photos}"
[ -e "$PHOTOS/metadata.jsonl" ] || [ -n "${KEEP_PHOTOS:-}" ] || python recipes/own_data/make_photo_folder.py "$PHOTOS"
DATA=(data=folder data.path="$PHOTOS" data.eval_fraction=0.1)
START=$SECONDS
echo "== CLIP -> $OUT/clip"
unclip-train experiment=shapes_clip "${DATA[@]}" trainer.max_steps=300 trainer.batch_size=32 \
  stage.eval_images=100 hydra.run.dir="$OUT/clip" "$@"
echo "== prior -> $OUT/prior"
unclip-train experiment=shapes_prior "${DATA[@]}" stage.clip="$OUT/clip/export" trainer.batch_size=32 \
  trainer.max_steps=300 hydra.run.dir="$OUT/prior" "$@"
echo "== decoder (64 px) -> $OUT/decoder"
unclip-train experiment=shapes_decoder "${DATA[@]}" stage.clip="$OUT/clip/export" trainer.max_steps=300 \
  trainer.checkpoint_every=150 stage.eval_images=20 stage.eval_without_caption=false \
  hydra.run.dir="$OUT/decoder" "$@"
printf '== all: %d min %02d s\n' $(((SECONDS - START) / 60)) $(((SECONDS - START) % 60))
