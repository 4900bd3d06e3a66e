"""Our side of every workload, built from the stage defaults in ``conf/stage/*.yaml`` (the tiny presets).

Each builder returns a :class:`~benchmarks.harness.Candidate` whose ``run()`` is what our trainer or our
sampler does for one step / one sampling run. Only ``unclip.models``, ``unclip.diffusion`` and the
``*_sampling`` modules are imported here (no Hydra, open_clip or datasets), so the runner works on a machine
that has torch alone; W6 (the cascade) needs CLIP and imports it lazily.

Parameters are counted without the caption transformer's token table (49408 x width): a lookup costs no
FLOPs, and the peers take precomputed text encodings instead of token ids.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from omegaconf import OmegaConf
from torch import nn

from benchmarks.harness import Candidate, autocast
from unclip.decoder_sampling import DiffusionDecoder, sample_decoder
from unclip.models.decoder import decoder_tiny
from unclip.models.prior import PriorConfig
from unclip.prior_sampling import DiffusionPrior, EmbeddingNormalizer, sample_prior
from unclip.upsampler_sampling import DiffusionUpsampler, upsample, upsampler_config

# conf/stage/decoder.yaml, prior.yaml, sr256.yaml, sr1024.yaml
DECODER_DIFFUSION = dict(
    schedule="cosine",
    schedule_shift=4.0,
    num_timesteps=1000,
    prediction="x0",
    variance="learned",
    loss_weighting="none",
)
DECODER_SAMPLING = dict(sampler="ddim", steps="15", eta=0.0, guidance_scale=3.0)
PRIOR_SAMPLING = dict(sampler="ddim", steps="64", eta=0.0, guidance_scale=2.0, candidates=2)
UPSAMPLER_DIFFUSION = {  # Table 3: cosine for 64 -> 256, linear for 256 -> 1024
    name: dict(
        schedule=schedule,
        schedule_shift=1.0,
        num_timesteps=1000,
        prediction="x0",
        variance="fixed_small",
        loss_weighting="none",
    )
    for name, schedule in (("sr256", "cosine"), ("sr1024", "linear"))
}
UPSAMPLER_SAMPLING = {
    "sr256": dict(sampler="ddim", steps="27", eta=0.0, aug_level=0.0, tile_size=0, tile_overlap=32),
    "sr1024": dict(sampler="ddim", steps="15", eta=0.0, aug_level=0.0, tile_size=0, tile_overlap=32),
}
CAPTION_TOKENS = 77
CLIP_IMAGE_DIM = 512  # the tiny decoder preset's CLIP embedding width


def count_params(module: nn.Module, exclude: tuple[nn.Parameter, ...] = ()) -> int:
    skip = {id(p) for p in exclude}
    return sum(p.numel() for p in module.parameters() if id(p) not in skip)


def caption_ids(batch: int, length: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """CLIP-BPE-like ids with no padding: <start>, random words, <end> in the last position, so every
    implementation attends over exactly ``length`` caption tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 49406, (batch, length), generator=g)
    ids[:, 0], ids[:, -1] = 49406, 49407
    return ids.to(device)


def make_optimizer(params, kind: str) -> torch.optim.Optimizer:
    """AdamW with torch's choice of implementation (``default``), or forced ``foreach`` / ``fused`` (what
    our trainer builds); every implementation of a workload gets the same one."""
    extra = {} if kind == "default" else {kind: True}
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, **extra)


def train_step(model_loss, optimizer: torch.optim.Optimizer, device: torch.device, precision: str):
    """One forward (autocast to ``precision``), backward and optimizer step of ``model_loss()``."""

    def step() -> None:
        with autocast(device, precision):
            loss = model_loss()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _decoder(device: torch.device, config=None, image_size: int = 64) -> DiffusionDecoder:
    torch.manual_seed(0)
    return DiffusionDecoder(config or decoder_tiny(), image_size, DECODER_DIFFUSION, DECODER_SAMPLING).to(
        device
    )


def decoder_params(decoder: DiffusionDecoder) -> int:
    return count_params(decoder, (decoder.net.text_encoder.token_embedding.weight,))


def w1_decoder_train(
    device: torch.device, precision: str, batch: int, optimizer: str, compile: bool, config=None
) -> Candidate:
    """One decoder training step as our trainer runs it: encode the caption (GLIDE transformer) and the
    CLIP embedding with their dropout for guidance, noise, U-Net, hybrid loss, backward, AdamW."""
    decoder = _decoder(device, config).train()
    if compile:
        decoder.net.unet.compile()
    opt = make_optimizer(decoder.parameters(), optimizer)
    g = torch.Generator().manual_seed(1)
    images = (torch.rand(batch, 3, 64, 64, generator=g) * 2 - 1).to(device)
    emb_dim = decoder.config.clip_embed_dim
    embedding = torch.randn(batch, emb_dim, generator=g).to(device)
    length = min(CAPTION_TOKENS, decoder.config.text.context_length)
    tokens = caption_ids(batch, length, device)
    step = train_step(
        lambda: decoder(images, embedding, tokens, 0.1, 0.5)["loss"].mean(), opt, device, precision
    )
    return Candidate("ours", decoder_params(decoder), step, batch)


def w3_decoder_sample(
    device: torch.device, precision: str, batch: int, steps: int, compile: bool
) -> Candidate:
    """Guided DDIM decoding (scale 3): conditioning encoded once, cond + uncond as one batch per step."""
    decoder = _decoder(device).eval()
    if compile:
        decoder.net.unet.compile()
    g = torch.Generator().manual_seed(2)
    embedding = torch.randn(batch, CLIP_IMAGE_DIM, generator=g).to(device)
    tokens = caption_ids(batch, CAPTION_TOKENS, device)

    def run() -> torch.Tensor:
        with autocast(device, precision):
            return sample_decoder(
                decoder,
                embedding,
                tokens,
                generator=torch.Generator(device).manual_seed(0),
                sampler="ddim",
                steps=str(steps),
                guidance_scale=3.0,
            )

    return Candidate("ours", decoder_params(decoder), run, batch)


def _prior(device: torch.device) -> DiffusionPrior:
    torch.manual_seed(0)
    config = PriorConfig()
    normalizer = EmbeddingNormalizer("zscore", config.clip_embed_dim)
    return DiffusionPrior(config, normalizer, "cosine", PRIOR_SAMPLING).to(device)


def shapes_caption_lengths(batch: int) -> torch.Tensor:
    """Token counts, start and end tokens included, of the first ``batch`` ``shapes`` training captions under
    CLIP's tokenizer (mean 11.5, longest 18 of 77 for batch 64): how long real captions are."""
    import open_clip

    from unclip.data.shapes import make_caption, sample_spec

    captions = [make_caption(sample_spec(0, "train", i), 0, "train", i)[0] for i in range(batch)]
    return (open_clip.get_tokenizer("ViT-B-32")(captions) != 0).sum(dim=1)


def caption_encodings(
    batch: int, dim: int, device: torch.device, lengths: torch.Tensor | None, seed: int = 3
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random per-token encodings (B, 77, dim) and their mask, as a CLIP text tower returns them: with
    ``lengths``, the positions past each caption's length are zeros and masked (what every implementation is
    given); without, all 77 tokens are real."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(batch, CAPTION_TOKENS, dim, generator=g)
    mask = torch.ones(batch, CAPTION_TOKENS, dtype=torch.bool)
    if lengths is not None:
        mask = torch.arange(CAPTION_TOKENS)[None] < lengths[:, None]
        tokens = tokens * mask[..., None]
    return tokens.to(device), mask.to(device)


def _text(
    batch: int, config: PriorConfig, device: torch.device, lengths: torch.Tensor | None = None
) -> SimpleNamespace:
    """CLIP text outputs as the prior takes them (``unclip.clip.model.TextEncoding``'s fields)."""
    tokens, mask = caption_encodings(batch, config.text_token_dim, device, lengths)
    pooled = torch.randn(batch, config.clip_embed_dim, generator=torch.Generator().manual_seed(5))
    return SimpleNamespace(tokens=tokens, pooled=pooled.to(device), mask=mask)


def w2_prior_train(
    device: torch.device,
    precision: str,
    batch: int,
    optimizer: str,
    compile: bool,
    lengths: torch.Tensor | None = None,
) -> Candidate:
    """One prior training step: caption dropped 10 % of the time, x0-prediction MSE, backward, AdamW;
    ``lengths``: real caption lengths (see :func:`caption_encodings`)."""
    prior = _prior(device).train()
    if compile:
        prior.net.compile()
    opt = make_optimizer(prior.parameters(), optimizer)
    text = _text(batch, prior.config, device, lengths)
    image = torch.randn(batch, prior.config.clip_embed_dim, generator=torch.Generator().manual_seed(4))
    image = image.to(device)
    step = train_step(
        lambda: prior(image, text.tokens, text.mask, text.pooled, 0.1)["loss"].mean(), opt, device, precision
    )
    return Candidate("ours", count_params(prior), step, batch)


def w4_prior_sample(device: torch.device, precision: str, batch: int, steps: int, compile: bool) -> Candidate:
    """Guided DDIM prior sampling (scale 2) with best-of-2 (§2.2): ``batch`` captions, 2 candidates each."""
    prior = _prior(device).eval()
    if compile:
        prior.net.compile()
    text = _text(batch, prior.config, device)

    def run() -> torch.Tensor:
        with autocast(device, precision):
            return sample_prior(
                prior, text, generator=torch.Generator(device).manual_seed(0), steps=str(steps), candidates=2
            )

    return Candidate("ours", count_params(prior), run, batch)


def _upsampler(name: str, device: torch.device) -> DiffusionUpsampler:
    torch.manual_seed(0)
    config = upsampler_config(f"{name}_tiny", noise_aug=False, residual=True)
    return DiffusionUpsampler(config, 4, UPSAMPLER_DIFFUSION[name], UPSAMPLER_SAMPLING[name]).to(device)


def w5_upsample(
    device: torch.device, precision: str, name: str, low_size: int, batch: int, compile: bool
) -> Candidate:
    """Unguided DDIM upsampling by 4 with the stage's step count (27 for sr256, 15 for sr1024)."""
    upsampler = _upsampler(name, device).eval()
    if compile:
        upsampler.net.unet.compile()
    low = torch.rand(batch, 3, low_size, low_size, generator=torch.Generator().manual_seed(5)).to(device)

    def run() -> torch.Tensor:
        with autocast(device, precision):
            return upsample(upsampler, low, generator=torch.Generator(device).manual_seed(0))

    return Candidate("ours", count_params(upsampler), run, batch)


def w6_cascade(device: torch.device, precision: str) -> Candidate:
    """text -> 1024 px, one image, through the whole cascade with every stage's exported defaults (prior 64
    steps best-of-2, decoder 15 guided steps, sr256 27 steps, sr1024 15 steps), untrained weights, the
    shapes recipe's tiny CLIP (needs open_clip)."""
    from pathlib import Path

    from unclip.clip.model import ClipEncoder
    from unclip.decoder_sampling import decoder_config
    from unclip.pipeline import UnCLIPPipeline
    from unclip.precision import sampling_precision

    torch.manual_seed(0)
    tiny = OmegaConf.load(Path(__file__).parents[1] / "conf" / "clip_model" / "tiny_convnet.yaml")
    clip = ClipEncoder(str(tiny.name), None, OmegaConf.to_container(tiny.arch)).eval()
    config = PriorConfig(clip_embed_dim=128, text_token_dim=64, max_text_tokens=24)
    prior = DiffusionPrior(config, EmbeddingNormalizer("zscore", 128), "cosine", PRIOR_SAMPLING)
    dconf = decoder_config("tiny", clip_embed_dim=128, context_length=24, learn_sigma=True)
    decoder = DiffusionDecoder(dconf, 64, DECODER_DIFFUSION, DECODER_SAMPLING)
    parts = {"prior": prior, "decoder": decoder, **{n: _upsampler(n, device) for n in ("sr256", "sr1024")}}
    pipe = UnCLIPPipeline(Path("."), clip.to(device), **{k: v.to(device).eval() for k, v in parts.items()})
    params = count_params(clip) + sum(count_params(p) for p in parts.values())

    def run() -> torch.Tensor:
        with sampling_precision(device, "bf16" if precision == "bf16" else "no"):
            return pipe.text_to_image(["a large red star in the top left"], seed=0, size=1024)[1]

    return Candidate("ours", params, run, 1)
