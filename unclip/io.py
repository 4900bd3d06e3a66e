"""Files on disk: atomic writes, safetensors weights loaded strictly, YAML component configs.

Every writer here goes through a temporary file in the destination folder, fsync, then ``os.replace``, so a
process killed at any instant leaves either the old file or the new one, never a torn one (DESIGN §3).
Nothing is ever pickled.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from unclip.errors import CheckpointError


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_path)`` then move the finished file onto ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> None:
    """Atomically write a text file."""
    atomic_write(path, lambda tmp: tmp.write_text(text))


def plain_lists(value: Any) -> Any:
    """Tuples to lists, recursively, so that YAML written from dataclasses stays plain."""
    if isinstance(value, dict):
        return {k: plain_lists(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_lists(v) for v in value]
    return value


def write_yaml(path: str | Path, data: Mapping[str, Any]) -> None:
    """Atomically write a plain (JSON-like) mapping as YAML."""
    write_text(path, yaml.safe_dump(dict(data), sort_keys=False))


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, or raise :class:`CheckpointError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing file {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise CheckpointError(f"{path} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} does not hold a mapping")
    return data


def read_component_config(
    folder: str | Path, kind: str, label: str, clip_fingerprint: str | None = None
) -> tuple[Path, dict[str, Any]]:
    """Read a pipeline component's ``config.yaml``; refuse a component of another ``kind`` or, when
    ``clip_fingerprint`` is given, one trained against another CLIP (its embeddings live in another space)."""
    path = Path(folder) / "config.yaml"
    config = read_yaml(path)
    if config.get("kind") != kind:
        article = "an" if label[:1] in "aeiou" else "a"
        raise CheckpointError(f"{path} describes a {config.get('kind')!r}, not {article} {label}")
    if clip_fingerprint is not None and config.get("clip_fingerprint") != clip_fingerprint:
        raise CheckpointError(
            f"{path} was trained against CLIP {config.get('clip_fingerprint')!r}, but the CLIP in use is "
            f"{clip_fingerprint!r}: its image embeddings live in another space"
        )
    return path, config


def save_tensors(
    path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> None:
    """Atomically write tensors as safetensors (contiguous CPU copies; shared storage is cloned)."""
    plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(plain, str(tmp), metadata=dict(metadata or {})))


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file, or raise :class:`CheckpointError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing weights file {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors file: {err}") from err


def load_state_strict(module: torch.nn.Module, path: str | Path) -> None:
    """Load ``path`` into ``module``; a missing, unexpected or mis-shaped key is an error naming the file."""
    state = load_tensors(path)
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if mismatched:
            k = mismatched[0]
            parts.append(
                f"shape mismatch at {k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
            )
        raise CheckpointError(
            f"{path} does not fit this model ({'; '.join(parts)}): is it from another model?"
        )
    module.load_state_dict(state, strict=True)


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished temporary folder onto ``final`` (replacing an older one) and fsync the parent."""
    if final.exists():
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(final.parent)
