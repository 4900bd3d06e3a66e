"""Training throughput of the paper-scale presets on one GPU: samples/s, peak memory, FLOPs utilisation.

    python benchmarks/paper_scale.py [--stages prior,decoder,sr256,sr1024] [--steps 6] [--compile] [--json F]

Run one stage per process when measuring the big ones: memory a stage left behind is not always returned.

For each stage's ``paper`` preset (unCLIP Table 3 sizes: prior 1B, decoder 3.5B at 64 px, 64->256 700M on
64 px crops, 256->1024 300M on 256 px crops) at the per-GPU micro-batch of ``conf/experiment/laion_*.yaml``:
build the model in fp32 with bf16 autocast (what ``trainer.precision=bf16`` runs), take AdamW steps on random
inputs shaped like real batches (ViT-L/14 CLIP: 768-d embeddings, 77 tokens), and report the median step time
after warm-up as samples/s, the peak allocated memory, and MFU: the FLOPs of one training step (counted by
``torch.utils.flop_counter`` on the real step) per second, over this GPU's measured dense bf16 matmul rate.
The upsamplers train on crops (as in the paper), so their samples/s are crops/s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

CLIP_DIM, TOKENS, TOKEN_DIM = 768, 77, 768
MICRO_BATCH = {"prior": 512, "decoder": 32, "sr256": 64, "sr1024": 32}  # per GPU, as the laion recipes run
SAMPLING = {"sampler": "ddim", "steps": "15", "eta": 0.0, "guidance_scale": 3.0}
DIFFUSION = {
    "schedule": "cosine",
    "schedule_shift": 1.0,
    "num_timesteps": 1000,
    "prediction": "eps",
    "variance": "learned",
    "loss_weighting": "none",
}


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 8192, repeats: int = 20) -> float:
    """Measured dense matmul rate (FLOP/s) of an n x n x n product."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def build(stage: str, device: torch.device):
    """(model, make_batch, loss_fn) for one stage's paper preset."""
    if stage == "prior":
        from unclip.models.prior import PriorConfig
        from unclip.prior_sampling import DiffusionPrior, EmbeddingNormalizer

        config = PriorConfig.preset(
            "paper", clip_embed_dim=CLIP_DIM, text_token_dim=TOKEN_DIM, max_text_tokens=TOKENS
        )
        sampling = {**SAMPLING, "candidates": 2}
        model = DiffusionPrior(config, EmbeddingNormalizer("zscore", CLIP_DIM), "cosine", sampling)

        def batch(b: int):
            return (
                torch.randn(b, CLIP_DIM, device=device),
                torch.randn(b, TOKENS, TOKEN_DIM, device=device),
                torch.ones(b, TOKENS, dtype=torch.bool, device=device),
                torch.randn(b, CLIP_DIM, device=device),
            )

        return model, batch, lambda m, x: m(*x, caption_drop=0.1)["loss"].mean()
    if stage == "decoder":
        from unclip.decoder_sampling import DiffusionDecoder, decoder_config

        config = decoder_config(
            "paper",
            clip_embed_dim=CLIP_DIM,
            context_length=TOKENS,
            learn_sigma=True,
            unet={"use_checkpoint": True},
        )
        model = DiffusionDecoder(config, 64, DIFFUSION, SAMPLING)

        def batch(b: int):
            return (
                torch.randn(b, 3, 64, 64, device=device),
                torch.randn(b, CLIP_DIM, device=device),
                torch.randint(1, 49000, (b, TOKENS), device=device),
            )

        def loss(m, x):
            return m(*x, image_embedding_drop=0.1, caption_drop=0.5)["loss"].mean()

        return model, batch, loss
    from unclip.upsampler_sampling import DiffusionUpsampler, upsampler_config

    scale, crop = 4, 64 if stage == "sr256" else 256
    config = upsampler_config(f"{stage}_paper", noise_aug=False, residual=True, unet={"use_checkpoint": True})
    model = DiffusionUpsampler(
        config,
        scale,
        {**DIFFUSION, "variance": "fixed_small", "prediction": "x0"},
        {"sampler": "ddim", "steps": "15", "eta": 0.0, "aug_level": 0.0, "tile_size": 0, "tile_overlap": 32},
    )

    def batch(b: int):
        return torch.randn(b, 3, crop, crop, device=device), torch.randn(
            b, 3, crop // scale, crop // scale, device=device
        )

    return model, batch, lambda m, x: m(*x)["loss"].mean()


def measure(
    stage: str, steps: int, compile_model: bool, device: torch.device, peak: float, micro_batch: int = 0
) -> dict:
    torch.manual_seed(0)
    model, make_batch, loss_fn = build(stage, device)
    model.to(device).train()
    params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    forward = torch.compile(model) if compile_model else model
    b = micro_batch or MICRO_BATCH[stage]
    data = make_batch(b)

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(forward, data)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up (and compilation)
    step()
    torch.cuda.synchronize()
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    flops = counter.get_total_flops()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    result = {
        "stage": stage,
        "params_M": round(params / 1e6, 1),
        "micro_batch": b,
        "samples_per_s": round(b / median, 1),
        "step_ms": round(median * 1e3, 1),
        "step_ms_spread": [round(min(times) * 1e3, 1), round(max(times) * 1e3, 1)],
        "tflop_per_step": round(flops / 1e12, 2),
        "mfu": round(flops / median / peak, 3),
        "peak_memory_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 1),
        "compiled": compile_model,
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", default="prior,decoder,sr256,sr1024")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--json", default=None)
    parser.add_argument("--micro-batch", type=int, default=0, help="per-GPU batch (0: the recipe's)")
    args = parser.parse_args()
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    peak = matmul_peak(device, torch.bfloat16)
    header = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "bf16_matmul_TFLOPs": peak / 1e12,
    }
    print(json.dumps(header))
    rows = []
    for stage in args.stages.split(","):
        try:
            rows.append(measure(stage, args.steps, args.compile, device, peak, args.micro_batch))
            torch.cuda.empty_cache()
        except torch.OutOfMemoryError as err:
            rows.append({"stage": stage, "error": f"out of memory: {str(err)[:120]}"})
            torch.cuda.empty_cache()
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**header, "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
