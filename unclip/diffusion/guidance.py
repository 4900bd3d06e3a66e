"""Classifier-free guidance (Ho & Salimans 2022) as one batched network call per step."""

from __future__ import annotations

import torch
from torch import Tensor

from unclip.diffusion.gaussian import ModelFn


def classifier_free_guidance(
    doubled_model_fn: ModelFn, scale: float, *, learned_variance: bool = False
) -> ModelFn:
    """Wrap a network that runs on a doubled batch into a guided ``model_fn(x_t, t)`` for the samplers.

    ``doubled_model_fn(x, t)`` receives x_t and t repeated twice along the batch, [cond; uncond], and must
    pair the first half with the real conditioning and the second with the null one; build that doubled
    conditioning once, before sampling, e.g. ``lambda x, t: unet(x, t, emb=torch.cat([emb, null_emb]))``.
    The wrapper returns uncond + scale * (cond - uncond) of the raw output (Ho & Salimans 2022, eq. 6);
    since x_0, eps and v are affine in the output for a fixed x_t, guiding any of them is the same. With
    ``learned_variance`` only the mean channels (first half of dim 1) are guided and the conditional
    variance channels are kept, as GLIDE does.
    """

    def guided(x: Tensor, t: Tensor) -> Tensor:
        cond, uncond = doubled_model_fn(torch.cat([x, x]), torch.cat([t, t])).chunk(2)
        if not learned_variance:
            return uncond + scale * (cond - uncond)
        cond_mean, cond_var = cond.chunk(2, dim=1)
        uncond_mean = uncond.chunk(2, dim=1)[0]
        return torch.cat([uncond_mean + scale * (cond_mean - uncond_mean), cond_var], dim=1)

    return guided
