"""``unclip-sample``: sample from a pipeline folder, configured by Hydra.

    unclip-sample pipeline=runs/shapes/pipeline prompt="a small red star" num_images=4 out=samples/
    unclip-sample pipeline=... prompts_file=prompts.txt prior.steps=32 decoder.guidance_scale=3.0
    unclip-sample pipeline=... image=photo.jpg num_images=4                  # image variations
    unclip-sample pipeline=... image=photo.jpg prompt="a red star" invert=true decoder.eta=0.5

Text -> image writes ``embeddings.safetensors`` (the sampled CLIP image embeddings, prompt-major) and, when
the pipeline has a decoder, one PNG per sample (``0000.png``, ...). Image variation (``image=``) writes the
PNGs. Both write ``samples.json``, a sidecar with every prompt, setting and seed, so any sample can be
regenerated.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from unclip.cli.common import CONFIG_PATH, friendly_errors
from unclip.config.schema import register_configs
from unclip.errors import ConfigError, DataError

register_configs()


def read_prompts(cfg: DictConfig) -> list[str]:
    """The prompts of ``prompt=`` or ``prompts_file=`` (one a line); empty prompts are refused."""
    if (cfg.prompt is None) == (cfg.prompts_file is None):
        raise ConfigError("give exactly one of prompt=... or prompts_file=...")
    if cfg.prompt is not None:
        prompts = [str(cfg.prompt)]
        if not prompts[0].strip():
            raise ConfigError("the prompt is empty")
    else:
        path = Path(str(cfg.prompts_file))
        if not path.is_file():
            raise DataError(f"prompts_file {path} does not exist")
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not prompts:
            raise DataError(f"prompts_file {path} holds no prompt")
    return prompts


def _options(node: DictConfig) -> dict[str, Any]:
    return {k: v for k, v in OmegaConf.to_container(node).items() if v is not None}


def _write_images(images: Any, out: Path) -> list[str]:
    from unclip.images import save_png

    names = [f"{i:04d}.png" for i in range(len(images))]
    for image, name in zip(images, names):
        save_png(image, out / name)
    return names


def _variations(cfg: DictConfig, out: Path) -> dict[str, Any]:
    """``image=``: variations of one image file, optionally captioned by ``prompt=``."""
    from unclip.images import load_image

    if cfg.prompts_file is not None:
        raise ConfigError("image variation takes at most one caption: use prompt=..., not prompts_file=...")
    image = load_image(str(cfg.image))  # a bad file fails before any model is imported or loaded

    from unclip.pipeline import UnCLIPPipeline

    pipeline = UnCLIPPipeline.load(cfg.pipeline, device=cfg.device)
    options = _options(cfg.decoder)
    images = pipeline.image_variations(
        image, cfg.num_images, cfg.prompt, cfg.invert, cfg.seed, cfg.progress, **options
    )
    files = _write_images(images, out)
    caption = "" if cfg.prompt is None else f' prompt="{cfg.prompt}"'
    return {
        "image": str(Path(str(cfg.image)).resolve()),
        "caption": cfg.prompt,
        "invert": cfg.invert,
        "decoder": {**pipeline.decoder.sampling, **options, **({"sampler": "ddim"} if cfg.invert else {})},
        "rows": [{"row": i, "file": f} for i, f in enumerate(files)],
        "regenerate": f"unclip-sample pipeline={cfg.pipeline} image={cfg.image}{caption} "
        f"invert={cfg.invert} num_images={cfg.num_images} seed={cfg.seed}",
    }


def _text_to_image(cfg: DictConfig, out: Path) -> dict[str, Any]:
    """``prompt=`` / ``prompts_file=``: the prior's embeddings and, with a decoder, the images."""
    from unclip.io import save_tensors
    from unclip.pipeline import UnCLIPPipeline

    if cfg.invert:
        raise ConfigError("invert=true inverts an image: give image=<file>")
    prompts = read_prompts(cfg)
    pipeline = UnCLIPPipeline.load(cfg.pipeline, device=cfg.device)
    for p in prompts:
        pipeline.clip.check_prompt(p)
    prior_options, decoder_options = _options(cfg.prior), _options(cfg.decoder)
    files: list[str | None] = [None] * (len(prompts) * cfg.num_images)
    sidecar: dict[str, Any] = {}
    if pipeline.decoder is None:
        if decoder_options:
            raise ConfigError(f"{cfg.pipeline} has no decoder stage, so decoder.* settings do not apply")
        embeddings = pipeline.text_to_image_embedding(
            prompts, cfg.num_images, cfg.seed, cfg.progress, **prior_options
        )
    else:
        embeddings, images = pipeline.text_to_image(
            prompts, cfg.num_images, cfg.seed, cfg.progress, prior_options, decoder_options
        )
        files = list(_write_images(images, out))
        sidecar["decoder"] = {**pipeline.decoder.sampling, **decoder_options}
    save_tensors(out / "embeddings.safetensors", {"image_embeddings": embeddings})
    return {
        "prompts": prompts,
        "num_images": cfg.num_images,
        "prior": {**pipeline.prior.sampling, **prior_options},
        **sidecar,
        "rows": [
            {"row": i * cfg.num_images + j, "prompt": p, "image": j, "file": files[i * cfg.num_images + j]}
            for i, p in enumerate(prompts)
            for j in range(cfg.num_images)
        ],
        "regenerate": f"unclip-sample pipeline={cfg.pipeline} prompts_file=<these prompts> "
        f"num_images={cfg.num_images} seed={cfg.seed}",
    }


@hydra.main(config_path=CONFIG_PATH, config_name="sample", version_base="1.3")
@friendly_errors
def main(cfg: DictConfig) -> None:
    """Sample images (or, without a decoder, CLIP image embeddings) and write them with a sidecar."""
    from unclip.io import write_text

    if cfg.num_images < 1:
        raise ConfigError(f"num_images={cfg.num_images} must be at least 1")
    out = Path(str(cfg.out))
    body = _variations(cfg, out) if cfg.image is not None else _text_to_image(cfg, out)
    sidecar = {"pipeline": str(Path(str(cfg.pipeline)).resolve()), "seed": cfg.seed, **body}
    write_text(out / "samples.json", json.dumps(sidecar, indent=2))
    made = sum(row.get("file") is not None for row in body["rows"])
    print(f"wrote {len(body['rows'])} samples ({made} images) to {out}")


if __name__ == "__main__":
    main()
