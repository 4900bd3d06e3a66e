"""``unclip-sample``: sample from a pipeline folder, configured by Hydra.

    unclip-sample pipeline=runs/shapes/pipeline prompt="a small red star" num_images=4 out=samples/
    unclip-sample pipeline=... prompts_file=prompts.txt size=256 decoder.guidance_scale=3 prior.steps=32
    unclip-sample pipeline=... prompt="a star" negative_prompt="a red star"       # guidance away from it
    unclip-sample pipeline=... image=photo.jpg num_images=4                      # image variations (§3.1)
    unclip-sample pipeline=... image=photo.jpg prompt="a red star" invert=true decoder.eta=0.5
    unclip-sample pipeline=... interpolate=[a.png,b.png] num_images=6            # interpolation (§3.2)
    unclip-sample pipeline=... image=a.png prompt="a red star" text_diff="a blue star" num_images=5  # (§3.3)

Every mode runs the cascade up to ``size`` (null: the pipeline's largest) and writes one PNG per image
(``0000.png``, ...), ``grid.png`` (one row per prompt, or the one row of a variation, interpolation or text
diff) and ``samples.json``, a sidecar with the prompts, every stage's resolved sampling settings, the seed and
the overrides that regenerate the same images (``regenerate``). Text -> image also writes
``embeddings.safetensors`` (the prior's CLIP image embeddings, prompt-major); a pipeline without a decoder
writes only those.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from unclip.cli.common import CONFIG_PATH, friendly_errors, sampling_overrides
from unclip.config.schema import register_configs
from unclip.errors import ConfigError, DataError

register_configs()

_UPSAMPLERS = ("sr256", "sr1024")


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


def _mode(cfg: DictConfig) -> str:
    """Which of the four modes the options ask for; contradictory options are refused by name."""
    if cfg.interpolate is not None:
        if cfg.image is not None or cfg.prompt is not None or cfg.prompts_file is not None:
            raise ConfigError("interpolate=[a,b] takes its two images alone: drop image= and prompt=")
        if len(cfg.interpolate) != 2:
            raise ConfigError(f"interpolate= needs exactly two image files, got {len(cfg.interpolate)}")
        mode = "interpolate"
    elif cfg.text_diff is not None:
        if cfg.image is None or cfg.prompt is None:
            raise ConfigError('text_diff="<new caption>" needs image=<file> and prompt="<its caption>"')
        mode = "text_diff"
    elif cfg.image is not None:
        if cfg.prompts_file is not None:
            raise ConfigError("image variation takes at most one caption: prompt=..., not prompts_file=...")
        mode = "variation"
    elif cfg.invert:
        raise ConfigError("invert=true inverts an image: give image=<file>")
    else:
        mode = "text"
    if cfg.negative_prompt is not None and mode != "text":
        raise ConfigError("negative_prompt= applies to text -> image (prompt= or prompts_file=) only")
    return mode


def _write_images(images: Any, out: Path, columns: int, grid: bool) -> list[str]:
    from unclip.images import save_grid, save_png

    names = [f"{i:04d}.png" for i in range(len(images))]
    for image, name in zip(images, names):
        save_png(image, out / name)
    if grid:
        save_grid(images, out / "grid.png", columns)
    return names


def _settings(pipeline: Any, cfg: DictConfig, stages: list[str]) -> dict[str, Any]:
    """Every stage's resolved sampling settings: the exported defaults with this run's overrides."""
    parts = {"prior": pipeline.prior, "decoder": pipeline.decoder, **pipeline.upsamplers}
    return {
        s: {**parts[s].sampling, **sampling_overrides(cfg[s])} for s in stages if parts.get(s) is not None
    }


def _generate(cfg: DictConfig, out: Path) -> dict[str, Any]:
    """Run the chosen mode; return the mode's part of the sidecar."""
    from unclip.images import load_image
    from unclip.io import save_tensors
    from unclip.pipeline import UnCLIPPipeline
    from unclip.precision import sampling_precision

    mode = _mode(cfg)
    # bad files and prompts fail before any model is loaded
    sources = {"text": [], "interpolate": list(cfg.interpolate or [])}.get(mode, [cfg.image])
    images = [load_image(str(path)) for path in sources]
    prompts = read_prompts(cfg) if mode == "text" else []
    pipeline = UnCLIPPipeline.load(cfg.pipeline, device=cfg.device)
    for prompt in [*prompts, *[p for p in (cfg.prompt, cfg.negative_prompt, cfg.text_diff) if p is not None]]:
        pipeline.clip.check_prompt(prompt)
    decoder = sampling_overrides(cfg.decoder)
    upsamplers = {s: sampling_overrides(cfg[s]) for s in _UPSAMPLERS}
    common = dict(seed=cfg.seed, progress=cfg.progress, size=cfg.size, upsampler_options=upsamplers)
    body: dict[str, Any] = {"mode": mode}
    with sampling_precision(cfg.device, cfg.precision) as precision:
        print(precision.reason, file=sys.stderr)
        body |= {"precision": precision.precision, "precision_reason": precision.reason}
        if mode == "text" and pipeline.decoder is None:
            if decoder or any(upsamplers.values()) or cfg.size is not None:
                raise ConfigError(
                    f"{cfg.pipeline} has no decoder stage: decoder, upsampler and size settings do not apply"
                )
            embeddings = pipeline.text_to_image_embedding(
                prompts,
                cfg.num_images,
                cfg.seed,
                cfg.progress,
                cfg.negative_prompt,
                **sampling_overrides(cfg.prior),
            )
            made, stages = None, ["prior"]
        elif mode == "text":
            embeddings, made = pipeline.text_to_image(
                prompts,
                cfg.num_images,
                prior_options=sampling_overrides(cfg.prior),
                decoder_options=decoder,
                negative_prompt=cfg.negative_prompt,
                **common,
            )
            stages = ["prior", "decoder", *pipeline.upsampler_stages(cfg.size)]
        else:
            if sampling_overrides(cfg.prior):
                raise ConfigError(f"prior.* settings do not apply to {mode}: it starts from an image")
            if mode == "variation":
                made = pipeline.image_variations(
                    images[0], cfg.num_images, cfg.prompt, cfg.invert, **common, **decoder
                )
            elif mode == "interpolate":
                made = pipeline.interpolate(images[0], images[1], cfg.num_images, **common, **decoder)
            else:
                made = pipeline.text_diff(
                    images[0],
                    cfg.prompt,
                    cfg.text_diff,
                    cfg.num_images,
                    max_fraction=cfg.text_diff_max,
                    **common,
                    **decoder,
                )
            stages = ["decoder", *pipeline.upsampler_stages(cfg.size)]
            body["sources"] = [str(Path(p).resolve()) for p in sources]
            if mode != "interpolate":
                body["caption"] = cfg.prompt
            if mode == "variation":
                body["invert"] = cfg.invert
            if mode == "text_diff":
                body |= {"target": cfg.text_diff, "text_diff_max": cfg.text_diff_max}
    if mode == "text":
        save_tensors(out / "embeddings.safetensors", {"image_embeddings": embeddings})
        body["prompts"] = prompts
    files: list[str | None] = [None] * (len(prompts) * cfg.num_images)
    if made is not None:
        files = list(_write_images(made, out, cfg.num_images, cfg.grid))
        body["size"] = int(made.shape[-1])
    body["settings"] = _settings(pipeline, cfg, stages)
    if mode == "text_diff" or cfg.invert:  # the inverted path only runs DDIM
        body["settings"]["decoder"]["sampler"] = "ddim"
    if mode == "text":
        body["rows"] = [
            {"row": i * cfg.num_images + j, "prompt": p, "image": j, "file": files[i * cfg.num_images + j]}
            for i, p in enumerate(prompts)
            for j in range(cfg.num_images)
        ]
    else:
        body["rows"] = [{"row": i, "file": f} for i, f in enumerate(files)]
    return body


def regenerate_command(cfg: DictConfig, out: Path, precision: str) -> list[str]:
    """The overrides that make these images again: this run's own, with ``out=`` dropped, a prompts file
    replaced by the copy written beside the images, and ``precision`` the one that ran (``auto`` could
    decide otherwise on another machine)."""
    from hydra.core.hydra_config import HydraConfig

    dropped = ("out=", "prompts_file=", "precision=")
    overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith(dropped)]
    if cfg.prompts_file is not None:
        overrides.append(f"prompts_file={out / 'prompts.txt'}")
    if precision != "no" or cfg.precision != "no":
        overrides.append(f"precision={precision}")
    return overrides


@hydra.main(config_path=CONFIG_PATH, config_name="sample", version_base="1.3")
@friendly_errors
def main(cfg: DictConfig) -> None:
    """Sample images (or, without a decoder, CLIP image embeddings) and write them with a sidecar."""
    from unclip.io import write_text
    from unclip.precision import check_precision

    if cfg.num_images < 1:
        raise ConfigError(f"num_images={cfg.num_images} must be at least 1")
    check_precision(cfg.precision)
    out = Path(str(cfg.out))
    body = _generate(cfg, out)
    if cfg.prompts_file is not None:
        write_text(out / "prompts.txt", "\n".join(body["prompts"]) + "\n")
    overrides = regenerate_command(cfg, out, body["precision"])
    sidecar = {
        "pipeline": str(Path(str(cfg.pipeline)).resolve()),
        "seed": cfg.seed,
        "num_images": cfg.num_images,
        **body,
        "overrides": overrides,
        "regenerate": " ".join(["unclip-sample", *map(shlex.quote, overrides), "out=<folder>"]),
    }
    write_text(out / "samples.json", json.dumps(sidecar, indent=2))
    made = sum(row.get("file") is not None for row in body["rows"])
    print(f"wrote {len(body['rows'])} samples ({made} images) to {out}")


if __name__ == "__main__":
    main()
