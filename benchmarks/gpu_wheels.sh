#!/usr/bin/env bash
# Download into .whl/ the wheels the peers need on the lent GPU machine (Python 3.12, torch, torchvision,
# accelerate, einops, safetensors, numpy, tqdm, transformers, timm, pillow already there; no internet).
# The versions are those `make bench-setup` resolves here; only what diffusers and dalle2-pytorch import
# at import time is fetched (dalle2-pytorch's training extras -- open_clip, webdataset, torchmetrics,
# pydantic -- are not imported by `import dalle2_pytorch`). On the GPU machine they go to a separate
# folder put first on PYTHONPATH, so the machine's own packages stay as they are (benchmarks/README.md).
#
#   bash benchmarks/gpu_wheels.sh [DEST]        # DEST defaults to .whl
set -euo pipefail
dest="${1:-.whl}"
mkdir -p "$dest"
wheels=(
  # diffusers and what it imports that the GPU machine may lack or have too old (huggingface_hub >= 1.32)
  diffusers==0.42.1 importlib_metadata zipp huggingface_hub==2.4.0 httpx2==2.16.2 httpcore2==2.16.2
  h11==0.16.0 anyio==4.16.0 sniffio==1.3.1 hf-xet click fsspec truststore
  # dalle2-pytorch and its import-time dependencies
  dalle2-pytorch==1.15.6 CoCa-pytorch==0.1.0 ema-pytorch==0.8.3 kornia==0.9.0 kornia_rs==0.2.0
  x-clip==0.14.4 beartype==0.23.1 ftfy==6.3.1 wcwidth==0.9.4 resize-right==0.0.2
  rotary-embedding-torch==0.9.1 pytorch-warmup==0.2.0 vector-quantize-pytorch==1.32.0 einx==0.4.3
  frozendict==2.5.1 loguru==0.7.3 torch-einops-utils==0.2.0
)
for wheel in "${wheels[@]}"; do
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --platform any -d "$dest" "$wheel"
done
du -ch "$dest"/*.whl | tail -1 | sed 's/total/total size of the wheels/'
