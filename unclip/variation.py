"""Image variations (Ramesh et al. 2022 §3.1, Figure 3): an image -> its CLIP embedding -> new images.

The decoder inverts CLIP, so decoding an image's own CLIP embedding gives images that keep what CLIP sees
(here: colour, shape, size, position) and vary what it ignores. Two starting points:

- fresh noise (``invert=False``): every variation is an independent sample of p(x | z_i[, y]);
- the image's own DDIM-inverted noise x_T (``invert=True``), §3.1's bipartite latent (z_i, x_T): DDIM with
  eta = 0 reconstructs the image (up to the inversion's approximation), and larger eta adds fresh noise at
  every step, so the variations stray further from it the larger eta is (Song et al. 2021, eq. 16).

An optional caption conditions the decoder's caption transformer as well; without one, guidance contrasts
the CLIP embedding with the null embedding alone.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from unclip.clip.model import ClipEncoder
from unclip.decoder_sampling import DiffusionDecoder, invert_decoder, sample_decoder
from unclip.errors import ConfigError
from unclip.images import fit_square


@torch.no_grad()
def image_variations(
    clip: ClipEncoder,
    decoder: DiffusionDecoder,
    image: Tensor,
    num_images: int,
    *,
    caption: str | None = None,
    invert: bool = False,
    generator: torch.Generator | None = None,
    progress: bool = False,
    **overrides: Any,
) -> Tensor:
    """``num_images`` variations (N, 3, S, S) in [0, 1] of one (3, H, W) image in [0, 1] of any size.

    The image's central square is what CLIP embeds and what the decoder inverts. ``overrides`` replace the
    decoder's sampling settings (steps, eta, guidance_scale, sampler); the inverted path always runs DDIM,
    the only sampler that is the inversion's reverse, over
    :func:`unclip.decoder_sampling.inversion_timesteps`.
    """
    if num_images < 1:
        raise ConfigError(f"num_images={num_images} must be at least 1")
    if image.ndim != 3 or image.shape[0] != 3:
        raise ConfigError(f"the image must be a (3, H, W) tensor, got {tuple(image.shape)}")
    device = clip.mean.device
    z = clip.encode_image(fit_square(image, clip.image_size)[None].to(device)).float()
    tokens = None
    if caption is not None:
        clip.check_prompt(caption)
        tokens = clip.tokenize([caption])
    if not invert:
        return sample_decoder(
            decoder,
            z.expand(num_images, -1),
            None if tokens is None else tokens.expand(num_images, -1),
            generator=generator,
            progress=progress,
            **overrides,
        )
    source = fit_square(image, decoder.image_size)[None]
    noise = invert_decoder(decoder, source, z, tokens, progress=progress, **overrides)
    return sample_decoder(
        decoder,
        z.expand(num_images, -1),
        None if tokens is None else tokens.expand(num_images, -1),
        inverted_noise=noise.expand(num_images, -1, -1, -1),
        generator=generator,
        progress=progress,
        **overrides,
    )
