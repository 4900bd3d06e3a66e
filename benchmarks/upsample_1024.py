"""Time one 64 px image through both upsamplers to 1024 px, and the process's peak memory.

    python benchmarks/upsample_1024.py RUNS/sr256/export RUNS/sr1024/export [--tile 256] [--images 3]

Renders the first ``--images`` held-out ``shapes`` specs at 64 px (and at 1024 px for the truth), upsamples
each 64 -> 256 -> 1024 with the exports' own sampling settings (``--tile``: the 1024 px stage in tiles of that
side), and prints per image the wall time of each stage, PSNR at 1024 px against the true render and against
bicubic upsampling of the 64 px input by 16, and at the end the peak resident memory of this process (run the
whole and the tiled mode in separate processes: the peak only grows).
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch

from unclip.data import shapes
from unclip.eval.upsampler_eval import bicubic, psnr
from unclip.upsampler_sampling import DiffusionUpsampler, upsample


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sr256")
    parser.add_argument("sr1024")
    parser.add_argument("--tile", type=int, default=0, help="tile side for the 1024 px stage (0: whole)")
    parser.add_argument("--overlap", type=int, default=32)
    parser.add_argument("--images", type=int, default=3)
    args = parser.parse_args()
    first, second = DiffusionUpsampler.load(args.sr256), DiffusionUpsampler.load(args.sr1024)
    tiling = {"tile_size": args.tile, "tile_overlap": args.overlap} if args.tile else {}
    print(
        f"threads {torch.get_num_threads()} | sr256 steps {first.sampling['steps']} "
        f"| sr1024 steps {second.sampling['steps']} | tile {args.tile or 'none'}"
    )
    for index in range(args.images):
        spec = shapes.sample_spec(0, "eval_seen", index, shapes.DEFAULT_HOLDOUT)
        low = np.array(shapes.render(spec, 64).convert("RGB"))
        truth = np.asarray(shapes.render(spec, 1024).convert("RGB"))
        x = torch.from_numpy(low).permute(2, 0, 1)[None].float() / 255
        generator = torch.Generator().manual_seed(index)
        start = time.perf_counter()
        mid = upsample(first, x, generator=generator)
        middle = time.perf_counter()
        out = upsample(second, mid, generator=generator, **tiling)
        end = time.perf_counter()
        image = (out[0] * 255).round().byte().permute(1, 2, 0).numpy()
        print(
            f"image {index}: 64->256 {middle - start:.1f} s, 256->1024 {end - middle:.1f} s, "
            f"total {end - start:.1f} s | PSNR@1024 {psnr(image, truth):.2f} dB, "
            f"bicubic x16 {psnr(bicubic(low, 16), truth):.2f} dB"
        )
    print(f"peak resident memory {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
