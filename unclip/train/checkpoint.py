"""Training checkpoints: weights in safetensors, optimizer/RNG state in safetensors + JSON, never a pickle.

Layout of ``<run_dir>/checkpoints/step_00001000/``::

    model.safetensors       trainable weights
    ema.safetensors         EMA shadow weights
    optimizer.safetensors   optimizer tensors (exp_avg, ...), keyed ``<param index>/<name>``
    rng_<rank>.safetensors  each process's torch CPU (and CUDA) generator state
    state.json              step, EMA update count, optimizer scalars and param groups, grad-scaler state

The folder is assembled under a temporary name and renamed into place when complete, so a process killed
during a write leaves the previous checkpoint as the newest loadable one (DESIGN §3).
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from unclip.errors import CheckpointError
from unclip.io import load_state_strict, load_tensors, replace_dir, save_tensors, write_text

_STEP_DIR = re.compile(r"^step_(\d{8})$")


@dataclass
class TrainingState:
    """Scalars that travel with a checkpoint."""

    step: int
    ema_updates: int
    # streamed data: the epoch in progress and the step it began at (map-style data derives both from step)
    epoch: int = 0
    epoch_start: int = 0


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    """Where the checkpoint of ``step`` lives."""
    return Path(run_dir) / "checkpoints" / f"step_{step:08d}"


def latest_checkpoint(run_or_checkpoint: str | Path) -> Path | None:
    """The newest complete checkpoint of a run folder, or the folder itself if it is a checkpoint."""
    path = Path(run_or_checkpoint)
    if (path / "state.json").is_file():
        return path
    folder = path / "checkpoints"
    if not folder.is_dir():
        return None
    steps = [
        (int(m.group(1)), p)
        for p in folder.iterdir()
        if (m := _STEP_DIR.match(p.name)) and (p / "state.json").is_file()
    ]
    return max(steps)[1] if steps else None


def _optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{index}/{name}"] = value
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"scalars": scalars, "param_groups": state["param_groups"]}


def _optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        index, name = key.split("/", 1)
        state.setdefault(int(index), {})[name] = value
    for index, values in meta["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def _rng_state() -> dict[str, torch.Tensor]:
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            states[f"cuda{i}"] = s
    return states


def save_checkpoint(
    accelerator: Any,
    run_dir: Path,
    model: torch.nn.Module,
    ema: Any,
    optimizer: torch.optim.Optimizer,
    state: TrainingState,
    keep: int,
) -> Path:
    """Write a complete checkpoint for ``state.step`` (collective: every process must call it)."""
    final = checkpoint_dir(run_dir, state.step)
    tmp = final.with_name(f".tmp-{final.name}")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    save_tensors(tmp / f"rng_{accelerator.process_index}.safetensors", _rng_state())
    if accelerator.is_main_process:
        save_tensors(tmp / "model.safetensors", accelerator.unwrap_model(model).state_dict())
        save_tensors(tmp / "ema.safetensors", ema.state_dict())
        opt_tensors, opt_meta = _optimizer_to_files(
            optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer
        )
        save_tensors(tmp / "optimizer.safetensors", opt_tensors)
        scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
        meta = {
            "step": state.step,
            "ema_updates": state.ema_updates,
            "epoch": state.epoch,
            "epoch_start": state.epoch_start,
            "optimizer": opt_meta,
            "scaler": scaler,
            "num_processes": accelerator.num_processes,
        }
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_text(tmp / "state.json", json.dumps(meta))  # written last: its presence marks a complete folder
        replace_dir(tmp, final)
        _prune(final.parent, keep)
    accelerator.wait_for_everyone()
    return final


def _prune(folder: Path, keep: int) -> None:
    steps = sorted(p for p in folder.iterdir() if _STEP_DIR.match(p.name))
    for old in steps[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(
    accelerator: Any, path: Path, model: torch.nn.Module, ema: Any, optimizer: torch.optim.Optimizer
) -> TrainingState:
    """Restore everything :func:`save_checkpoint` wrote; a checkpoint of another model is refused."""
    try:
        meta = json.loads((path / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path / 'state.json'} is unreadable: {err}") from err
    if meta.get("num_processes") != accelerator.num_processes:
        accelerator.print(
            f"[unclip] resuming a {meta.get('num_processes')}-process run on "
            f"{accelerator.num_processes} process(es): the data order stays, RNG streams differ"
        )
    load_state_strict(accelerator.unwrap_model(model), path / "model.safetensors")
    try:
        ema.load_state_dict(load_tensors(path / "ema.safetensors"), meta["ema_updates"])
    except KeyError as err:
        raise CheckpointError(f"{path / 'ema.safetensors'} does not fit this model: {err}") from err
    inner = optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer
    try:
        inner.load_state_dict(
            _optimizer_from_files(load_tensors(path / "optimizer.safetensors"), meta["optimizer"])
        )
    except (ValueError, KeyError) as err:
        raise CheckpointError(f"{path / 'optimizer.safetensors'} does not fit this model: {err}") from err
    if accelerator.scaler is not None and meta.get("scaler"):
        accelerator.scaler.load_state_dict(meta["scaler"])
    rng_file = path / f"rng_{accelerator.process_index}.safetensors"
    if rng_file.is_file():
        rng = load_tensors(rng_file)
        torch.set_rng_state(rng["cpu"])
        cuda = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda"))]
        if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    return TrainingState(
        step=int(meta["step"]),
        ema_updates=int(meta["ema_updates"]),
        epoch=int(meta.get("epoch", 0)),
        epoch_start=int(meta.get("epoch_start", 0)),
    )


def load_ema_weights(path: Path, model: torch.nn.Module) -> torch.nn.Module:
    """Put a checkpoint's EMA weights into ``model`` (built for the same run), as the trainer evaluates and
    exports them: the checkpoint's weights, with the EMA shadow over every floating-point tensor."""
    from unclip.train.ema import EMA

    path = Path(path)
    if not (path / "state.json").is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint folder (no state.json)")
    load_state_strict(model, path / "model.safetensors")
    ema = EMA(model, decay=0.0)
    try:
        ema.load_state_dict(load_tensors(path / "ema.safetensors"), num_updates=0)
    except KeyError as err:
        raise CheckpointError(f"{path / 'ema.safetensors'} does not fit this model: {err}") from err
    ema.copy_to(model)
    return model
