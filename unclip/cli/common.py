"""What every console script shares: config registration, one-line errors, the Hydra search path."""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from functools import wraps
from typing import Any

from unclip.errors import UnclipError

CONFIG_PATH = "pkg://unclip.conf"


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
