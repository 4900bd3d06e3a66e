"""``unclip-sample``: sample from a pipeline folder, configured by Hydra.

    unclip-sample pipeline=runs/shapes/pipeline prompt="a small red star" num_images=4 out=samples/
    unclip-sample pipeline=... prompts_file=prompts.txt prior.steps=32 prior.guidance_scale=2.0

Writes ``embeddings.safetensors`` (the sampled CLIP image embeddings, prompt-major) and ``samples.json``, a
sidecar with every prompt, setting and seed, so any sample can be regenerated.
"""

from __future__ import annotations

import json
from pathlib import Path

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


@hydra.main(config_path=CONFIG_PATH, config_name="sample", version_base="1.3")
@friendly_errors
def main(cfg: DictConfig) -> None:
    """Sample CLIP image embeddings for the prompts and write them with a sidecar."""
    from unclip.io import save_tensors, write_text
    from unclip.pipeline import UnCLIPPipeline

    prompts = read_prompts(cfg)
    if cfg.num_images < 1:
        raise ConfigError(f"num_images={cfg.num_images} must be at least 1")
    pipeline = UnCLIPPipeline.load(cfg.pipeline, device=cfg.device)
    for p in prompts:
        pipeline.clip.check_prompt(p)
    prior_options = {k: v for k, v in OmegaConf.to_container(cfg.prior).items() if v is not None}
    embeddings = pipeline.text_to_image_embedding(
        prompts, cfg.num_images, cfg.seed, cfg.progress, **prior_options
    )
    out = Path(str(cfg.out))
    save_tensors(out / "embeddings.safetensors", {"image_embeddings": embeddings})
    sidecar = {
        "pipeline": str(Path(str(cfg.pipeline)).resolve()),
        "prompts": prompts,
        "num_images": cfg.num_images,
        "seed": cfg.seed,
        "prior": {**pipeline.prior.sampling, **prior_options},
        "rows": [
            {"row": i * cfg.num_images + j, "prompt": p, "image": j}
            for i, p in enumerate(prompts)
            for j in range(cfg.num_images)
        ],
        "regenerate": f"unclip-sample pipeline={cfg.pipeline} prompts_file=<these prompts> "
        f"num_images={cfg.num_images} seed={cfg.seed}",
    }
    write_text(out / "samples.json", json.dumps(sidecar, indent=2))
    print(f"wrote {len(embeddings)} embeddings to {out / 'embeddings.safetensors'}")


if __name__ == "__main__":
    main()
