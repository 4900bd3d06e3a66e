"""One exception family for every user-facing failure.

The console scripts catch :class:`UnclipError`, print its one-line message and exit non-zero;
``HYDRA_FULL_ERROR=1`` (or ``debug=true``) shows the traceback instead.
"""


class UnclipError(Exception):
    """A problem the user can fix: bad config, missing file, corrupt image, mismatched checkpoint."""


class ConfigError(UnclipError):
    """A configuration value that is missing, of the wrong type, or inconsistent with another."""


class DataError(UnclipError):
    """A dataset, image or caption that cannot be read or does not match what a stage needs."""


class CheckpointError(UnclipError):
    """A weights file or run folder that is missing, corrupt, or belongs to another model."""
