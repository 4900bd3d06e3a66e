"""The pipeline folder users move around, and the cascade that runs it (DESIGN §3, unCLIP §2).

A pipeline folder holds ``pipeline.yaml`` (format version, stage list, CLIP fingerprint) and one subfolder per
stage, each the ``export/`` folder its training run wrote (``config.yaml`` + ``model.safetensors``). Every
stage after CLIP records the fingerprint of the CLIP it was trained against; a folder whose stages disagree is
refused when it is assembled and again when it is loaded.

Assemble one from training runs with::

    python -m unclip.pipeline OUT clip=runs/clip/export prior=runs/prior/export decoder=runs/decoder/export
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch

from unclip.clip.model import ClipEncoder
from unclip.decoder_sampling import DiffusionDecoder, sample_decoder
from unclip.errors import CheckpointError, UnclipError
from unclip.io import read_yaml, replace_dir, write_yaml
from unclip.prior_sampling import DiffusionPrior, sample_prior
from unclip.variation import image_variations

FORMAT_VERSION = 1
STAGE_ORDER = ("clip", "prior", "decoder")


def _check_components(components: dict[str, Path]) -> str:
    """Every component exists and was trained against the same CLIP; return that CLIP's fingerprint."""
    if "clip" not in components:
        raise CheckpointError("a pipeline needs a clip stage")
    unknown = sorted(set(components) - set(STAGE_ORDER))
    if unknown:
        raise CheckpointError(f"unknown pipeline stage(s) {unknown}; known: {list(STAGE_ORDER)}")
    fingerprint = read_yaml(components["clip"] / "config.yaml").get("fingerprint")
    for stage, folder in components.items():
        config = read_yaml(folder / "config.yaml")
        if config.get("kind") != stage:
            raise CheckpointError(
                f"{folder / 'config.yaml'} holds a {config.get('kind')!r}, not a {stage!r} stage"
            )
        if stage != "clip" and config.get("clip_fingerprint") != fingerprint:
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
    """The loaded cascade: CLIP, the prior (text -> CLIP image embedding) and the decoder (CLIP image
    embedding [+ caption] -> 64 px image), each when present."""

    def __init__(
        self,
        folder: Path,
        clip: ClipEncoder,
        prior: DiffusionPrior | None,
        decoder: DiffusionDecoder | None = None,
    ) -> None:
        self.folder = folder
        self.clip = clip
        self.prior = prior
        self.decoder = decoder

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
        prior = DiffusionPrior.load(folder / "prior", fingerprint).to(device) if "prior" in stages else None
        decoder = None
        if "decoder" in stages:
            decoder = DiffusionDecoder.load(folder / "decoder", fingerprint).to(device)
        return cls(folder, clip, prior, decoder)

    def _generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.clip.mean.device).manual_seed(seed)

    def _need_decoder(self) -> DiffusionDecoder:
        if self.decoder is None:
            raise CheckpointError(f"{self.folder} has no decoder stage: it cannot make images")
        return self.decoder

    @torch.no_grad()
    def text_to_image_embedding(
        self,
        prompts: list[str],
        num_images: int = 1,
        seed: int = 0,
        progress: bool = False,
        **prior_options: object,
    ) -> torch.Tensor:
        """CLIP image embeddings (len(prompts) * num_images, D) sampled by the prior, prompt-major."""
        if self.prior is None:
            raise CheckpointError(f"{self.folder} has no prior stage: it cannot turn text into embeddings")
        prompts = [p for p in prompts for _ in range(num_images)]
        text = self.clip.encode_text(self.clip.tokenize(prompts))
        generator = self._generator(seed)
        return sample_prior(self.prior, text, generator=generator, progress=progress, **prior_options)

    @torch.no_grad()
    def text_to_image(
        self,
        prompts: list[str],
        num_images: int = 1,
        seed: int = 0,
        progress: bool = False,
        prior_options: dict[str, object] | None = None,
        decoder_options: dict[str, object] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """unCLIP's text -> image (§2): the prior samples z_i, the decoder decodes it with the caption.
        Returns (embeddings (N, D), images (N, 3, S, S) in [0, 1]), N = len(prompts) * num_images,
        prompt-major."""
        decoder = self._need_decoder()
        embeddings = self.text_to_image_embedding(
            prompts, num_images, seed, progress, **(prior_options or {})
        )
        tokens = self.clip.tokenize([p for p in prompts for _ in range(num_images)])
        images = sample_decoder(
            decoder,
            embeddings,
            tokens,
            generator=self._generator(seed),
            progress=progress,
            **(decoder_options or {}),
        )
        return embeddings, images

    @torch.no_grad()
    def image_variations(
        self,
        image: torch.Tensor,
        num_images: int = 1,
        caption: str | None = None,
        invert: bool = False,
        seed: int = 0,
        progress: bool = False,
        **decoder_options: object,
    ) -> torch.Tensor:
        """Variations (N, 3, S, S) in [0, 1] of a (3, H, W) image in [0, 1] (§3.1; see
        :func:`unclip.variation.image_variations`)."""
        return image_variations(
            self.clip,
            self._need_decoder(),
            image,
            num_images,
            caption=caption,
            invert=invert,
            generator=self._generator(seed),
            progress=progress,
            **decoder_options,
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
