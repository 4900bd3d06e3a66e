"""CLIP through open_clip: any architecture by name or explicit config, pretrained by tag, local file or none.

unCLIP needs three things from CLIP (Ramesh et al. 2022 §2): the image embedding z_i (what the prior predicts
and the decoder inverts), the pooled text embedding z_t, and the per-token text encodings (both condition the
prior). :class:`ClipEncoder` returns all three and knows how to save itself as a pipeline component: a folder
with ``config.yaml`` and ``model.safetensors``, plus a fingerprint of the weights that later stages record so
embeddings and checkpoints made with one CLIP are never mixed with another's.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from unclip.clip.conv_tower import ConvTower
from unclip.errors import CheckpointError, ConfigError
from unclip.io import load_state_strict, read_component_config, save_tensors, write_yaml

COMPONENT_KIND = "clip"


@dataclass
class TextEncoding:
    """CLIP's view of a batch of captions."""

    tokens: torch.Tensor  # (B, L, W) per-token encodings after the final layer norm
    mask: torch.Tensor  # (B, L) True for real tokens (start, words, end), False for padding
    pooled: torch.Tensor  # (B, D) the projected text embedding z_t (not normalised)


def _plain(cfg: Any) -> Any:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg


def _add_conv_tower(model: torch.nn.Module, name: str, tower: dict[str, Any], embed_dim: int) -> None:
    try:
        model.visual = ConvTower(
            image_size=int(tower["image_size"]),
            channels=[int(c) for c in tower["channels"]],
            strides=[int(s) for s in tower["strides"]],
            output_dim=embed_dim,
        )
    except KeyError as err:
        raise ConfigError(f"clip model arch for {name!r}: conv_tower needs the key {err}") from err


def _build(name: str, pretrained: str | None, arch: dict[str, Any] | None) -> torch.nn.Module:
    if arch is not None:
        arch = dict(arch)
        custom_text = bool(arch.pop("custom_text", False))
        conv_tower = arch.pop("conv_tower", None)
        if conv_tower is not None:
            if "vision_cfg" in arch:
                raise ConfigError(
                    f"clip model arch for {name!r}: give a vision_cfg or a conv_tower, not both"
                )
            # open_clip builds its own image tower first: a one-token ViT, replaced below
            size = int(conv_tower.get("image_size", 64))
            arch["vision_cfg"] = dict(image_size=size, patch_size=size, width=32, head_width=32, layers=1)
        model_cls = open_clip.CustomTextCLIP if custom_text else open_clip.CLIP
        try:
            model = model_cls(**arch)
        except TypeError as err:
            raise ConfigError(f"clip model arch for {name!r} is not a valid open_clip config: {err}") from err
        if conv_tower is not None:
            _add_conv_tower(model, name, conv_tower, int(arch["embed_dim"]))
        if pretrained is not None:
            if not Path(pretrained).is_file():
                raise ConfigError(
                    f"pretrained={pretrained!r} for the custom architecture {name!r} must be a local file"
                )
            open_clip.load_checkpoint(model, pretrained, strict=True, weights_only=True)
        return model
    if name not in open_clip.list_models():
        raise ConfigError(
            f"clip model name={name!r} is not an open_clip architecture (e.g. ViT-B-32, ViT-L-14, RN50); "
            "give an `arch` for a custom one"
        )
    if pretrained is not None and not Path(pretrained).is_file():
        tags = open_clip.list_pretrained_tags_by_model(name)
        if pretrained not in tags:
            raise ConfigError(
                f"pretrained={pretrained!r} is neither a file nor a pretrained tag of {name} (tags: {tags})"
            )
    try:
        return open_clip.create_model(name, pretrained=pretrained, weights_only=True)
    except (RuntimeError, OSError, ValueError) as err:
        raise CheckpointError(f"could not load {name} weights {pretrained!r}: {err}") from err


class ClipEncoder(torch.nn.Module):
    """An open_clip model with the encoders unCLIP needs, its tokenizer and its image preprocessing."""

    def __init__(self, name: str, pretrained: str | None = None, arch: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.name = name
        self.arch = _plain(arch)
        self.model = _build(name, pretrained, self.arch)
        if self.arch is not None:
            context = int(self.arch.get("text_cfg", {}).get("context_length", 77))
            self.tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=context)
        else:
            self.tokenizer = open_clip.get_tokenizer(name)
        self.context_length = int(self.tokenizer.context_length)
        pre = open_clip.get_model_preprocess_cfg(self.model)
        size = pre.get("size", self.model.visual.image_size)
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.register_buffer(
            "mean",
            torch.tensor(pre.get("mean", open_clip.OPENAI_DATASET_MEAN)).view(1, 3, 1, 1),
            persistent=False,
        )
        self.register_buffer(
            "std",
            torch.tensor(pre.get("std", open_clip.OPENAI_DATASET_STD)).view(1, 3, 1, 1),
            persistent=False,
        )
        self._final_norm = getattr(self.model, "ln_final", None) or getattr(
            getattr(self.model, "text", None), "ln_final", None
        )
        if self._final_norm is None:
            raise ConfigError(
                f"{name}: its text tower exposes no final layer norm, so no per-token encodings"
            )

    @classmethod
    def from_config(cls, cfg: DictConfig | dict[str, Any]) -> ClipEncoder:
        """Build from a ``ClipModelConfig`` (name, pretrained, arch)."""
        cfg = _plain(cfg)
        return cls(cfg["name"], cfg.get("pretrained"), cfg.get("arch"))

    @property
    def embed_dim(self) -> int:
        """Dimension D of the image and pooled text embeddings."""
        return (
            int(self.model.text_projection.shape[-1])
            if hasattr(self.model, "text_projection")
            else int(self.model.visual.output_dim)
        )

    @property
    def token_dim(self) -> int:
        """Width W of the per-token text encodings."""
        return int(self._final_norm.normalized_shape[0])

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        """Captions to token ids (B, context_length); longer captions are truncated as open_clip does."""
        return self.tokenizer(list(captions)).to(self.mean.device)

    def check_prompt(self, prompt: str) -> None:
        """Refuse an empty prompt or one longer than the text context (instead of silently truncating it)."""
        if not prompt.strip():
            raise ConfigError("the prompt is empty")
        encode = getattr(self.tokenizer, "encode", None)
        length = len(encode(prompt)) + 2 if encode else int(self.tokenize([prompt]).argmax()) + 1
        if length > self.context_length:
            raise ConfigError(
                f"prompt {prompt[:40]!r}... has {length} tokens, longer than the CLIP context of "
                f"{self.context_length}"
            )

    def encode_text(self, token_ids: torch.Tensor) -> TextEncoding:
        """Per-token encodings, padding mask and pooled embedding z_t of tokenised captions."""
        captured: list[torch.Tensor] = []
        handle = self._final_norm.register_forward_hook(lambda _m, _i, out: captured.append(out))
        try:
            pooled = self.model.encode_text(token_ids)
        finally:
            handle.remove()
        # real tokens run from <start> to <end>, and <end> has the largest id (pad and "!" are both id 0)
        positions = torch.arange(token_ids.shape[1], device=token_ids.device)
        mask = positions[None, :] <= token_ids.argmax(dim=-1, keepdim=True)
        return TextEncoding(tokens=captured[-1], mask=mask, pooled=pooled)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1], (B, 3, H, W), to this model's input: resized to its size and normalised."""
        if images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            images = F.interpolate(
                images,
                size=(self.image_size, self.image_size),
                mode="bicubic",
                antialias=True,
                align_corners=False,
            ).clamp(0, 1)
        return (images - self.mean) / self.std

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Image embedding z_i (B, D), not normalised, of images in [0, 1]."""
        return self.model.encode_image(self.preprocess(images))

    def fingerprint(self) -> str:
        """A short hash of the architecture and every weight: equal fingerprints mean the same CLIP."""
        h = hashlib.sha256(json.dumps({"name": self.name, "arch": self.arch}, sort_keys=True).encode())
        for key, value in sorted(self.model.state_dict().items()):
            h.update(key.encode())
            h.update(value.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def save(self, folder: str | Path) -> str:
        """Write ``config.yaml`` + ``model.safetensors`` into ``folder``; return the fingerprint."""
        folder = Path(folder)
        fingerprint = self.fingerprint()
        save_tensors(folder / "model.safetensors", self.model.state_dict(), {"fingerprint": fingerprint})
        write_yaml(
            folder / "config.yaml",
            {"kind": COMPONENT_KIND, "name": self.name, "arch": self.arch, "fingerprint": fingerprint},
        )
        return fingerprint

    @classmethod
    def load(cls, folder: str | Path) -> ClipEncoder:
        """Load a folder written by :meth:`save`; refuse one of another kind or with altered weights."""
        folder = Path(folder)
        _, config = read_component_config(folder, COMPONENT_KIND, "CLIP model")
        encoder = cls(config["name"], None, config.get("arch"))
        load_state_strict(encoder.model, folder / "model.safetensors")
        if config.get("fingerprint") and encoder.fingerprint() != config["fingerprint"]:
            raise CheckpointError(
                f"{folder / 'model.safetensors'} does not match the fingerprint in its config.yaml"
            )
        return encoder
