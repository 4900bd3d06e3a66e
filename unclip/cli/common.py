"""What every console script shares: config registration, one-line errors, the Hydra search path, and the
sampling overrides (``prior.*``, ``decoder.*``) of ``unclip-sample`` and ``unclip-eval pipeline=...``."""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from functools import wraps
from typing import Any

from omegaconf import OmegaConf

from unclip.errors import UnclipError

CONFIG_PATH = "pkg://unclip.conf"


def _if_null(value: Any, default: Any) -> Any:
    return default if value is None else value


# ``${unclip.if_null:${out},runs/eval/...}`` in a config: ``out`` unless it is null (``oc.select`` keeps a
# null). Registered on import of this module, which every console script's task function imports, so the
# resolver also exists where a launcher (submitit on SLURM) unpickles the task and resolves ``hydra.*``.
OmegaConf.register_new_resolver("unclip.if_null", _if_null, replace=True)


def slurm_distributed_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """torch.distributed's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) from SLURM's,
    for a process that SLURM started directly (one task per GPU, as ``hydra/launcher=slurm_multigpu`` does)
    rather than through ``accelerate launch`` or ``torchrun``, which set them already. Empty when not
    needed. The first host of the job's node list is the rendezvous address."""
    env = os.environ if environ is None else environ
    if "RANK" in env or int(env.get("SLURM_NTASKS", "1")) <= 1 or "SLURM_PROCID" not in env:
        return {}
    nodes = env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "localhost"))
    return {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": env["SLURM_NTASKS"],
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "MASTER_ADDR": first_host(nodes),
        "MASTER_PORT": env.get("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)),
    }


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``gpu[07-09,12],cpu1`` -> ``gpu07``."""
    head = (
        nodelist.split(",")[0] if "[" not in nodelist.split(",")[0] else nodelist[: nodelist.index("]") + 1]
    )
    if "[" not in head:
        return head
    prefix, ranges = head.split("[", 1)
    return prefix + ranges.rstrip("]").split(",")[0].split("-")[0]


def friendly_errors(run: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Print an :class:`UnclipError` as one line and exit 1 (``debug=true``: the traceback)."""

    @wraps(run)
    def wrapper(cfg: Any) -> Any:
        try:
            return run(cfg)
        except UnclipError as err:
            exit_with_error(err, debug=bool(cfg.get("debug", False)))

    return wrapper


def exit_with_error(err: UnclipError, debug: bool = False) -> None:
    """Print ``err`` as one ``error: ...`` line (with the traceback first when ``debug`` or
    ``HYDRA_FULL_ERROR=1``) and exit 1."""
    if debug or os.environ.get("HYDRA_FULL_ERROR") == "1":
        traceback.print_exc()
    print(f"error: {err}", file=sys.stderr)
    sys.exit(1)


def sampling_overrides(node: Any) -> dict[str, Any]:
    """The settings a ``prior.*`` / ``decoder.*`` overrides node changes: its non-null fields (null keeps the
    component's exported value)."""
    return {k: v for k, v in OmegaConf.to_container(node).items() if v is not None}
