"""Diffusion maths shared by every stage: schedules, Gaussian diffusion and its losses, samplers, guidance."""

from unclip.diffusion.gaussian import GaussianDiffusion
from unclip.diffusion.guidance import classifier_free_guidance
from unclip.diffusion.samplers import (
    SAMPLERS,
    check_sampler_settings,
    ddim_invert,
    dynamic_threshold,
    sample,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_images,
    static_clip,
)
from unclip.diffusion.schedule import NoiseSchedule, make_schedule, space_timesteps

__all__ = [
    "SAMPLERS",
    "GaussianDiffusion",
    "NoiseSchedule",
    "check_sampler_settings",
    "classifier_free_guidance",
    "ddim_invert",
    "dynamic_threshold",
    "make_schedule",
    "sample",
    "sample_ddim",
    "sample_ddpm",
    "sample_dpmpp_2m",
    "sample_images",
    "space_timesteps",
    "static_clip",
]
