"""unclip: hierarchical text-conditional image generation with CLIP latents (Ramesh et al., 2022)."""

from unclip.errors import CheckpointError, ConfigError, DataError, UnclipError

__version__ = "0.1.0"
__all__ = ["UnclipError", "ConfigError", "DataError", "CheckpointError", "__version__"]
