"""Image manipulations through CLIP's image embedding (Ramesh et al. 2022 §3): variations (§3.1, Figure 3),
interpolations between two images (§3.2, Figure 4) and text diffs (§3.3, Figure 5).

The decoder inverts CLIP, so decoding an image's own CLIP embedding gives images that keep what CLIP sees
(here: colour, shape, size, position) and vary what it ignores. Two starting points:

- fresh noise (``invert=False``): every variation is an independent sample of p(x | z_i[, y]);
- the image's own DDIM-inverted noise x_T (``invert=True``), §3.1's bipartite latent (z_i, x_T): DDIM with
  eta = 0 reconstructs the image (up to the inversion's approximation), and larger eta adds fresh noise at
  every step, so the variations stray further from it the larger eta is (Song et al. 2021, eq. 16).

An optional caption conditions the decoder's caption transformer as well; without one, guidance contrasts
the CLIP embedding with the null embedding alone.

Interpolations and text diffs move along great circles of embedding directions with :func:`slerp`. CLIP
compares embeddings by direction only, but the decoder was trained on unnormalised ones, so the norm is
interpolated linearly beside the direction (and a text diff keeps the image's own norm).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from unclip.clip.model import ClipEncoder
from unclip.decoder_sampling import DiffusionDecoder, invert_decoder, sample_decoder
from unclip.errors import ConfigError
from unclip.images import fit_square


def slerp(a: Tensor, b: Tensor, fractions: Tensor) -> Tensor:
    """Points (N, D) between two (D,) vectors at ``fractions`` (N,) of the way from ``a`` to ``b``: the
    direction moves along the great circle (Shoemake 1985; unCLIP §3.2's z_i_theta), the norm linearly."""
    norm_a, norm_b = a.norm(), b.norm()
    unit_a, unit_b = a / norm_a, b / norm_b
    theta = fractions.to(a.dtype)[:, None]
    omega = torch.arccos((unit_a * unit_b).sum().clamp(-1.0, 1.0))
    if float(omega) < 1e-4:  # (nearly) the same direction: the chord is the arc
        direction = F.normalize(torch.lerp(unit_a, unit_b, theta), dim=-1)
    else:
        direction = (torch.sin((1 - theta) * omega) * unit_a + torch.sin(theta * omega) * unit_b) / torch.sin(
            omega
        )
    return direction * torch.lerp(norm_a, norm_b, theta)


def _embed(clip: ClipEncoder, image: Tensor) -> Tensor:
    """The (D,) CLIP image embedding of a (3, H, W) image in [0, 1] (its central square)."""
    if image.ndim != 3 or image.shape[0] != 3:
        raise ConfigError(f"the image must be a (3, H, W) tensor, got {tuple(image.shape)}")
    return clip.encode_image(fit_square(image, clip.image_size)[None].to(clip.mean.device)).float()[0]


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
    z = _embed(clip, image)[None]
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


@torch.no_grad()
def interpolate_images(
    clip: ClipEncoder,
    decoder: DiffusionDecoder,
    image_a: Tensor,
    image_b: Tensor,
    num_images: int,
    *,
    generator: torch.Generator | None = None,
    progress: bool = False,
    **overrides: Any,
) -> Tensor:
    """``num_images`` (>= 2) images (N, 3, S, S) along the path from one (3, H, W) image to another: their
    CLIP embeddings are slerped at evenly spaced fractions 0 ... 1 and all are decoded from one shared x_T,
    so that what changes along the row is what the embedding moved (unCLIP §3.2, Figure 4)."""
    if num_images < 2:
        raise ConfigError(f"an interpolation needs num_images >= 2 (its two ends), got {num_images}")
    path = slerp(_embed(clip, image_a), _embed(clip, image_b), torch.linspace(0, 1, num_images))
    size = decoder.image_size
    device = clip.mean.device
    noise = torch.randn((1, 3, size, size), generator=generator, device=device).expand(num_images, -1, -1, -1)
    return sample_decoder(
        decoder, path, None, noise=noise, generator=generator, progress=progress, **overrides
    )


@torch.no_grad()
def text_diff(
    clip: ClipEncoder,
    decoder: DiffusionDecoder,
    image: Tensor,
    caption: str,
    target: str,
    num_images: int,
    *,
    max_fraction: float = 0.5,
    generator: torch.Generator | None = None,
    progress: bool = False,
    **overrides: Any,
) -> Tensor:
    """Edit an image toward a new caption (unCLIP §3.3, Figure 5): ``num_images`` (>= 2) images (N, 3, S, S).

    The text diff z_d = normalise(z_t(target) - z_t(caption)) (scaled to the image embedding's norm) is
    where the image's embedding z_i heads; the images decode slerp(z_i, z_d, theta) for theta evenly spaced
    in [0, ``max_fraction``] (the paper's range is [0, 0.5]) from the image's own DDIM-inverted x_T, so the
    first one reconstructs the image and the rest change only what the caption change moves.
    """
    if num_images < 2:
        raise ConfigError(f"a text diff needs num_images >= 2 (the start and the edits), got {num_images}")
    if not 0.0 < max_fraction <= 1.0:
        raise ConfigError(f"the text diff's largest fraction must be in (0, 1], got {max_fraction}")
    for prompt in (caption, target):
        clip.check_prompt(prompt)
    z = _embed(clip, image)
    texts = clip.encode_text(clip.tokenize([caption, target])).pooled.float()
    if float((texts[1] - texts[0]).norm()) <= 1e-6 * float(texts[0].norm()):
        raise ConfigError(f"the captions {caption!r} and {target!r} have the same CLIP embedding: no diff")
    diff = F.normalize(texts[1] - texts[0], dim=-1) * z.norm()
    path = slerp(z, diff, torch.linspace(0, max_fraction, num_images))
    source = fit_square(image, decoder.image_size)[None]
    noise = invert_decoder(decoder, source, z[None], None, progress=progress, **overrides)
    return sample_decoder(
        decoder,
        path,
        None,
        inverted_noise=noise.expand(num_images, -1, -1, -1),
        generator=generator,
        progress=progress,
        **overrides,
    )
