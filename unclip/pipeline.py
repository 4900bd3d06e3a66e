"""The pipeline folder users move around, and the cascade that runs it (DESIGN §3, unCLIP §2).

A pipeline folder holds ``pipeline.yaml`` (format version, stage list, CLIP fingerprint) and one subfolder per
stage, each the ``export/`` folder its training run wrote (``config.yaml`` + ``model.safetensors``). The
stages, in cascade order: ``clip`` (always), ``prior`` (text -> CLIP image embedding), ``decoder``
(embedding -> 64 px image), ``sr256`` and ``sr1024`` (the upsamplers). The prior and the decoder record the
fingerprint of the CLIP they were trained against, and a folder whose stages disagree is refused when it is
assembled and again when it is loaded; the upsamplers see only pixels, so any pair fits.

Assemble one from training runs with (any stage after ``clip`` may be left out)::

    python -m unclip.pipeline OUT clip=runs/clip/export prior=runs/prior/export
        decoder=runs/decoder/export sr256=runs/sr256/export sr1024=runs/sr1024/export
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from unclip.clip.model import ClipEncoder
from unclip.decoder_sampling import DiffusionDecoder, sample_decoder
from unclip.errors import CheckpointError, ConfigError, UnclipError
from unclip.io import read_yaml, replace_dir, write_yaml
from unclip.prior_sampling import DiffusionPrior, sample_prior
from unclip.upsampler_sampling import DiffusionUpsampler, upsample
from unclip.variation import image_variations, interpolate_images, text_diff

FORMAT_VERSION = 1
# stage -> the kind its component folder declares
STAGE_KINDS = {
    "clip": "clip",
    "prior": "prior",
    "decoder": "decoder",
    "sr256": "upsampler",
    "sr1024": "upsampler",
}
STAGE_ORDER = tuple(STAGE_KINDS)
UPSAMPLER_STAGES = ("sr256", "sr1024")
# a stage is only useful on top of the one before it in the image chain
_NEEDS = {"sr256": "decoder", "sr1024": "sr256"}
UPSAMPLE_CHUNK = 4  # images upsampled at once: a 1024 px sample holds ~0.9 GB of activations on CPU


def _check_components(components: dict[str, Path]) -> str:
    """Every component exists, is the kind its stage needs, and (prior, decoder) was trained against the
    pipeline's CLIP; return that CLIP's fingerprint."""
    if "clip" not in components:
        raise CheckpointError("a pipeline needs a clip stage")
    unknown = sorted(set(components) - set(STAGE_ORDER))
    if unknown:
        raise CheckpointError(f"unknown pipeline stage(s) {unknown}; known: {list(STAGE_ORDER)}")
    for stage, needed in _NEEDS.items():
        if stage in components and needed not in components:
            raise CheckpointError(f"a pipeline with a {stage} stage needs a {needed} stage to feed it")
    fingerprint = read_yaml(components["clip"] / "config.yaml").get("fingerprint")
    for stage, folder in components.items():
        config = read_yaml(folder / "config.yaml")
        if config.get("kind") != STAGE_KINDS[stage]:
            raise CheckpointError(
                f"{folder / 'config.yaml'} holds a {config.get('kind')!r}, not a {STAGE_KINDS[stage]!r} "
                f"(the {stage} stage)"
            )
        if stage in ("prior", "decoder") and config.get("clip_fingerprint") != fingerprint:
            raise CheckpointError(
                f"{folder / 'config.yaml'} was trained against CLIP {config.get('clip_fingerprint')!r}, "
                f"but the pipeline's CLIP is {fingerprint!r}"
            )
    return str(fingerprint)


def assemble(out: str | Path, components: dict[str, str | Path]) -> Path:
    """Copy trained components into a new pipeline folder ``out`` (replaced atomically if it exists)."""
    out = Path(out)
    components = {k: Path(v) for k, v in components.items()}
    fingerprint = _check_components(components)
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    for stage, folder in components.items():
        (tmp / stage).mkdir(parents=True)
        for name in ("config.yaml", "model.safetensors"):
            shutil.copy2(folder / name, tmp / stage / name)
    stages = [s for s in STAGE_ORDER if s in components]
    write_yaml(
        tmp / "pipeline.yaml",
        {"format_version": FORMAT_VERSION, "stages": stages, "clip_fingerprint": fingerprint},
    )
    replace_dir(tmp, out)
    return out


class UnCLIPPipeline:
    """The loaded cascade (unCLIP §2): CLIP, the prior (text -> CLIP image embedding), the decoder (CLIP image
    embedding [+ caption] -> 64 px image) and the upsamplers (64 -> 256 -> 1024), each when present.

    Every image-making method takes ``size``, the side to stop at (one of :attr:`sizes`; None: the largest),
    and ``upsampler_options``, a dict from upsampler stage (``sr256``, ``sr1024``) to overrides of its
    sampling settings. Each stage draws its noise from its own generator seeded with ``seed``, so changing one
    stage's settings leaves the other stages' noise as it was.
    """

    def __init__(
        self,
        folder: Path,
        clip: ClipEncoder,
        prior: DiffusionPrior | None = None,
        decoder: DiffusionDecoder | None = None,
        sr256: DiffusionUpsampler | None = None,
        sr1024: DiffusionUpsampler | None = None,
    ) -> None:
        self.folder = folder
        self.clip = clip
        self.prior = prior
        self.decoder = decoder
        self.upsamplers = {name: up for name, up in (("sr256", sr256), ("sr1024", sr1024)) if up is not None}

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device = "cpu") -> UnCLIPPipeline:
        """Load a pipeline folder strictly; a missing stage or a CLIP mismatch is an error naming the file."""
        folder = Path(folder)
        if not folder.is_dir():
            raise CheckpointError(f"pipeline folder {folder} does not exist")
        meta = read_yaml(folder / "pipeline.yaml")
        if meta.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(
                f"{folder / 'pipeline.yaml'}: format_version {meta.get('format_version')!r} "
                f"is not {FORMAT_VERSION}"
            )
        stages = list(meta.get("stages", []))
        for stage in stages:
            if not (folder / stage).is_dir():
                raise CheckpointError(
                    f"{folder / 'pipeline.yaml'} lists stage {stage!r} but {folder / stage} is missing"
                )
        fingerprint = _check_components({s: folder / s for s in stages})
        clip = ClipEncoder.load(folder / "clip").to(device).eval()
        if clip.fingerprint() != fingerprint:
            raise CheckpointError(f"{folder / 'clip'} does not match the CLIP fingerprint in pipeline.yaml")
        loaders = {
            "prior": lambda path: DiffusionPrior.load(path, fingerprint),
            "decoder": lambda path: DiffusionDecoder.load(path, fingerprint),
            "sr256": DiffusionUpsampler.load,
            "sr1024": DiffusionUpsampler.load,
        }
        parts = {s: loaders[s](folder / s).to(device) for s in stages if s != "clip"}
        return cls(folder, clip, **parts)

    def save(self, folder: str | Path) -> Path:
        """Write this pipeline as a pipeline folder (replaced atomically if it exists), every component in
        the format its ``load`` reads; returns the folder."""
        with tempfile.TemporaryDirectory() as scratch:
            components = {"clip": Path(scratch) / "clip"}
            fingerprint = self.clip.save(components["clip"])
            parts = {"prior": self.prior, "decoder": self.decoder, **self.upsamplers}
            for stage, part in parts.items():
                if part is None:
                    continue
                components[stage] = Path(scratch) / stage
                if STAGE_KINDS[stage] == "upsampler":
                    part.save(components[stage])
                else:
                    part.save(components[stage], fingerprint)
            return assemble(folder, components)

    @property
    def sizes(self) -> list[int]:
        """The image sides this pipeline can stop at: the decoder's, then each upsampler's output."""
        if self.decoder is None:
            return []
        sizes = [self.decoder.image_size]
        for upsampler in self.upsamplers.values():
            sizes.append(sizes[-1] * upsampler.scale)
        return sizes

    def _generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.clip.mean.device).manual_seed(seed)

    def _need_decoder(self) -> DiffusionDecoder:
        if self.decoder is None:
            raise CheckpointError(f"{self.folder} has no decoder stage: it cannot make images")
        return self.decoder

    def upsampler_stages(self, size: int | None) -> list[str]:
        """The upsampler stages that run to reach ``size`` (None: all of them); a size the pipeline does not
        make is an error listing the ones it does."""
        sizes = self.sizes
        if size is None:
            return list(self.upsamplers)
        if size not in sizes:
            raise ConfigError(f"size={size} is not one this pipeline makes; choose one of {sizes}")
        return list(self.upsamplers)[: sizes.index(size)]

    @torch.no_grad()
    def upscale(
        self,
        images: torch.Tensor,
        size: int | None = None,
        seed: int = 0,
        progress: bool = False,
        upsampler_options: dict[str, dict[str, object]] | None = None,
    ) -> torch.Tensor:
        """Run decoder-size (N, 3, s, s) images in [0, 1] through the upsamplers up to ``size``, in chunks of
        :data:`UPSAMPLE_CHUNK` images."""
        options = dict(upsampler_options or {})
        unknown = sorted(set(options) - set(UPSAMPLER_STAGES))
        if unknown:
            raise ConfigError(
                f"upsampler options for unknown stage(s) {unknown}; known: {list(UPSAMPLER_STAGES)}"
            )
        stages = self.upsampler_stages(size)
        for stage, settings in options.items():
            if settings and stage not in self.upsamplers:
                raise ConfigError(f"{self.folder} has no {stage} stage, so {stage} settings do not apply")
            if settings and stage not in stages:
                raise ConfigError(f"{stage} settings do not apply: the cascade stops before it, at {size} px")
        for stage in stages:
            generator = self._generator(seed)
            images = torch.cat(
                [
                    upsample(
                        self.upsamplers[stage],
                        chunk,
                        generator=generator,
                        progress=progress,
                        **options.get(stage, {}),
                    )
                    for chunk in images.split(UPSAMPLE_CHUNK)
                ]
            )
        return images

    def _decode_and_upscale(
        self,
        decode: Callable[[torch.Generator], torch.Tensor],
        size: int | None,
        seed: int,
        progress: bool,
        upsampler_options: dict[str, dict[str, object]] | None,
    ) -> torch.Tensor:
        """Check ``size`` before any sampling, run ``decode(generator)`` (decoder-size images, its generator
        seeded with ``seed``), then the upsamplers up to ``size``."""
        self.upsampler_stages(size)
        images = decode(self._generator(seed))
        return self.upscale(images, size, seed, progress, upsampler_options)

    def _check_prompts(self, prompts: list[str]) -> None:
        if not prompts:
            raise ConfigError("no prompt given")
        for prompt in prompts:
            self.clip.check_prompt(prompt)

    def _negative_tokens(self, negative_prompt: str | None, count: int) -> torch.Tensor | None:
        if negative_prompt is None:
            return None
        self.clip.check_prompt(negative_prompt)
        return self.clip.tokenize([negative_prompt]).expand(count, -1)

    @torch.no_grad()
    def text_to_image_embedding(
        self,
        prompts: list[str],
        num_images: int = 1,
        seed: int = 0,
        progress: bool = False,
        negative_prompt: str | None = None,
        **prior_options: object,
    ) -> torch.Tensor:
        """CLIP image embeddings (len(prompts) * num_images, D) sampled by the prior, prompt-major; guidance
        steers away from ``negative_prompt`` when given."""
        if self.prior is None:
            raise CheckpointError(f"{self.folder} has no prior stage: it cannot turn text into embeddings")
        if num_images < 1:
            raise ConfigError(f"num_images={num_images} must be at least 1")
        self._check_prompts(prompts)
        prompts = [p for p in prompts for _ in range(num_images)]
        text = self.clip.encode_text(self.clip.tokenize(prompts))
        negative_tokens = self._negative_tokens(negative_prompt, len(prompts))
        negative = None if negative_tokens is None else self.clip.encode_text(negative_tokens)
        return sample_prior(
            self.prior,
            text,
            negative=negative,
            generator=self._generator(seed),
            progress=progress,
            **prior_options,
        )

    @torch.no_grad()
    def text_to_image(
        self,
        prompts: list[str],
        num_images: int = 1,
        seed: int = 0,
        progress: bool = False,
        prior_options: dict[str, object] | None = None,
        decoder_options: dict[str, object] | None = None,
        *,
        negative_prompt: str | None = None,
        size: int | None = None,
        upsampler_options: dict[str, dict[str, object]] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """unCLIP's text -> image (§2): the prior samples z_i, the decoder decodes it with the caption, the
        upsamplers take it to ``size``. Returns (embeddings (N, D), images (N, 3, size, size) in [0, 1]),
        N = len(prompts) * num_images, prompt-major. ``negative_prompt`` is guided away from in both the prior
        and the decoder."""
        decoder = self._need_decoder()
        self.upsampler_stages(size)  # a wrong size fails before any sampling
        embeddings = self.text_to_image_embedding(
            prompts, num_images, seed, progress, negative_prompt, **(prior_options or {})
        )
        tokens = self.clip.tokenize([p for p in prompts for _ in range(num_images)])
        images = sample_decoder(
            decoder,
            embeddings,
            tokens,
            negative_tokens=self._negative_tokens(negative_prompt, len(tokens)),
            generator=self._generator(seed),
            progress=progress,
            **(decoder_options or {}),
        )
        return embeddings, self.upscale(images, size, seed, progress, upsampler_options)

    @torch.no_grad()
    def image_variations(
        self,
        image: torch.Tensor,
        num_images: int = 1,
        caption: str | None = None,
        invert: bool = False,
        seed: int = 0,
        progress: bool = False,
        *,
        size: int | None = None,
        upsampler_options: dict[str, dict[str, object]] | None = None,
        **decoder_options: object,
    ) -> torch.Tensor:
        """Variations (N, 3, size, size) in [0, 1] of a (3, H, W) image in [0, 1] (§3.1; see
        :func:`unclip.variation.image_variations`)."""
        decoder = self._need_decoder()
        return self._decode_and_upscale(
            lambda generator: image_variations(
                self.clip,
                decoder,
                image,
                num_images,
                caption=caption,
                invert=invert,
                generator=generator,
                progress=progress,
                **decoder_options,
            ),
            size,
            seed,
            progress,
            upsampler_options,
        )

    @torch.no_grad()
    def interpolate(
        self,
        image_a: torch.Tensor,
        image_b: torch.Tensor,
        num_images: int,
        seed: int = 0,
        progress: bool = False,
        *,
        size: int | None = None,
        upsampler_options: dict[str, dict[str, object]] | None = None,
        **decoder_options: object,
    ) -> torch.Tensor:
        """``num_images`` images (N, 3, size, size) from image_a to image_b (§3.2, Figure 4; see
        :func:`unclip.variation.interpolate_images`)."""
        decoder = self._need_decoder()
        return self._decode_and_upscale(
            lambda generator: interpolate_images(
                self.clip,
                decoder,
                image_a,
                image_b,
                num_images,
                generator=generator,
                progress=progress,
                **decoder_options,
            ),
            size,
            seed,
            progress,
            upsampler_options,
        )

    @torch.no_grad()
    def text_diff(
        self,
        image: torch.Tensor,
        caption: str,
        target: str,
        num_images: int,
        seed: int = 0,
        progress: bool = False,
        *,
        max_fraction: float = 0.5,
        size: int | None = None,
        upsampler_options: dict[str, dict[str, object]] | None = None,
        **decoder_options: object,
    ) -> torch.Tensor:
        """``num_images`` images (N, 3, size, size): ``image`` (described by ``caption``) moved toward
        ``target`` (§3.3, Figure 5; see :func:`unclip.variation.text_diff`)."""
        decoder = self._need_decoder()
        return self._decode_and_upscale(
            lambda generator: text_diff(
                self.clip,
                decoder,
                image,
                caption,
                target,
                num_images,
                max_fraction=max_fraction,
                generator=generator,
                progress=progress,
                **decoder_options,
            ),
            size,
            seed,
            progress,
            upsampler_options,
        )


def main(argv: list[str] | None = None) -> None:
    """``python -m unclip.pipeline OUT stage=folder ...``: assemble a pipeline folder."""
    args = sys.argv[1:] if argv is None else argv
    if not args or any("=" not in a for a in args[1:]):
        print(__doc__)
        sys.exit(2)
    try:
        out = assemble(args[0], dict(a.split("=", 1) for a in args[1:]))
    except UnclipError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    print(f"pipeline: {out}")


if __name__ == "__main__":
    main()
