"""Stage plug-ins run by the one trainer; ``build_stage`` maps ``stage.name`` to its class."""

from __future__ import annotations

from importlib import import_module

from omegaconf import DictConfig

from unclip.errors import ConfigError
from unclip.stages.base import Stage

_STAGES = {
    "clip": "unclip.stages.clip:ClipStage",
    "prior": "unclip.stages.prior:PriorStage",
    "decoder": "unclip.stages.decoder:DecoderStage",
    "sr256": "unclip.stages.upsampler:UpsamplerStage",
    "sr1024": "unclip.stages.upsampler:UpsamplerStage",
}


def build_stage(cfg: DictConfig) -> Stage:
    """Instantiate the stage named by ``cfg.stage.name``."""
    target = _STAGES.get(str(cfg.stage.name))
    if target is None:
        raise ConfigError(f"stage.name={cfg.stage.name!r} is not one of {sorted(_STAGES)}")
    module, cls = target.split(":")
    return getattr(import_module(module), cls)(cfg)


__all__ = ["Stage", "build_stage"]
