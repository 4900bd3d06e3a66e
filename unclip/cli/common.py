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
