"""How well does the decoder invert CLIP? (unCLIP §2.1; the reconstructions of §3.1, judged by pixels.)

For each held-out image the decoder decodes the image's own CLIP embedding (with its caption, or with none,
as image variation does), and the output is compared with the source:

- ``colour_acc`` ... ``background_acc`` (``shapes`` data only): the pixel reader
  (:mod:`unclip.eval.shapes_reader`) on the output against the source's true attributes. A CLIP image
  embedding describes the whole image, so every attribute counts, whether or not the caption names it;
- ``clip_cosine``: mean cosine similarity between the CLIP embedding of the output and the source's;
- ``clip_cosine_shuffled``: the same against another, randomly paired source: the similarity any output of
  this data reaches, so the gap to ``clip_cosine`` is what the decoder kept of its particular source.

:func:`denoising_profile` says where along the noise levels a decoder loses its images: the error of its
one-step x_0 estimate from the true image noised to a few timesteps, beside the error of the noisy image
itself. A decoder that cannot beat its own input at low noise cannot draw detail, however well it places
colour and layout at high noise.

:func:`attribute_sources` (``shapes`` data) says where each attribute of an estimate comes from: decoding an
image noised to t with another image's conditioning, does the estimate take that attribute from the noisy
image or from the conditioning? An attribute that never follows the conditioning is drawn from the noise,
right in a sample only by luck.
"""

from __future__ import annotations

from collections.abc import Iterator

import datasets
import torch
import torch.nn.functional as F

from unclip.clip.model import ClipEncoder
from unclip.decoder_sampling import DiffusionDecoder, sample_decoder
from unclip.diffusion.gaussian import mean_flat
from unclip.eval.shapes_reader import ATTRIBUTES, attribute_accuracy, read_shape
from unclip.images import to_uint8


def derangement(n: int, generator: torch.Generator) -> torch.Tensor:
    """A random permutation of range(n) with no fixed point (n >= 2): each index sent to the next one in a
    random cycle."""
    order = torch.randperm(n, generator=generator)
    partner = torch.empty(n, dtype=torch.long)
    partner[order] = order.roll(-1)
    return partner


@torch.no_grad()
def evaluate_decoder(
    decoder: DiffusionDecoder,
    encoder: ClipEncoder,
    rows: datasets.Dataset,
    *,
    generator: torch.Generator,
    with_caption: bool = True,
    batch_size: int = 64,
    **sampling: object,
) -> dict[str, float]:
    """Metrics of the decoder on embedded ``rows`` (an ``embed_split`` result, at least two rows; the
    pixel reader's accuracies are added for ``shapes`` splits). ``sampling`` overrides the decoder's
    sampling settings."""
    data = rows.with_format("torch", columns=["image_embedding", "token_ids"])
    device = next(encoder.parameters()).device
    outputs, generated = [], []
    for start in range(0, len(rows), batch_size):
        chunk = data[start : start + batch_size]
        tokens = chunk["token_ids"].long() if with_caption else None
        images = sample_decoder(decoder, chunk["image_embedding"], tokens, generator=generator, **sampling)
        outputs.append(encoder.encode_image(images.to(device)).float().cpu())
        generated.extend(to_uint8(images))
    embedded, truth = torch.cat(outputs), data[:]["image_embedding"].float()
    metrics = {}
    if set(ATTRIBUTES) <= set(rows.column_names):  # shapes data: the truth behind every image is known
        records = [{a: row[a] for a in ATTRIBUTES} for row in rows.select_columns(list(ATTRIBUTES))]
        accuracy = attribute_accuracy(generated, records, ATTRIBUTES)
        metrics.update({f"{a}_acc": accuracy[a] for a in ATTRIBUTES})
    metrics["clip_cosine"] = float(F.cosine_similarity(embedded, truth, dim=-1).mean())
    shuffled = truth[derangement(len(truth), generator)]
    metrics["clip_cosine_shuffled"] = float(F.cosine_similarity(embedded, shuffled, dim=-1).mean())
    return metrics


# Timesteps of the denoising profile, as fractions of the schedule (0: the clean image itself).
PROFILE_FRACTIONS = (0.0, 0.05, 0.15, 0.3, 0.6)


def _one_step_estimates(
    decoder: DiffusionDecoder,
    images: torch.Tensor,
    image_embedding: torch.Tensor,
    caption_tokens: torch.Tensor | None,
    fractions: tuple[float, ...],
    generator: torch.Generator,
    batch_size: int,
    condition_of: torch.Tensor | None = None,
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """For each batch of ``batch_size`` images in [-1, 1] and each t = round(f * (T - 1)) for f in
    ``fractions``: (t, x_0, x_t, the decoder's one-step, unguided x_0 estimate from x_t). Image i is
    conditioned on the CLIP embedding and caption of image ``condition_of[i]`` (its own by default); the
    conditioning is encoded once per batch, for every timestep."""
    diffusion, last = decoder.diffusion, decoder.diffusion.num_timesteps - 1
    device = decoder.net.null_image_embedding.device
    timesteps = [round(fraction * last) for fraction in fractions]
    if condition_of is None:
        condition_of = torch.arange(len(images))
    for start in range(0, len(images), batch_size):
        x0 = images[start : start + batch_size].to(device, torch.float32)
        source = condition_of[start : start + len(x0)]
        tokens = None if caption_tokens is None else caption_tokens[source].to(device)
        cond = decoder.net.encode_condition(image_embedding[source].to(device, torch.float32), tokens)
        for t in timesteps:
            x_t = diffusion.q_sample(x0, t, torch.randn(x0.shape, generator=generator).to(device))
            out = decoder.net(x_t, torch.full((len(x0),), t, device=device), cond)
            yield t, x0, x_t, diffusion.predict(x_t, t, diffusion.split_output(out)[0])[0]


@torch.no_grad()
def denoising_profile(
    decoder: DiffusionDecoder,
    images: torch.Tensor,
    image_embedding: torch.Tensor,
    caption_tokens: torch.Tensor | None,
    *,
    generator: torch.Generator,
    fractions: tuple[float, ...] = PROFILE_FRACTIONS,
    batch_size: int = 64,
) -> dict[str, float]:
    """Per timestep t = round(f * (T - 1)) for f in ``fractions``: ``x0_mse@t=<t>``, the mean squared error
    of the decoder's x_0 estimate from x_t = sqrt(alpha_bar) x_0 + sqrt(1 - alpha_bar) eps of (B, 3, S, S)
    ``images`` in [-1, 1] (as the decoder trains on them), conditioned (unguided) on their CLIP embeddings
    and captions; and ``input_mse@t=<t>``, the error of x_t / sqrt(alpha_bar), the noisy image taken as its
    own estimate (1 / SNR(t) in expectation). Runs ``batch_size`` images at a time."""
    scale = decoder.diffusion.schedule.sqrt_alphas_cumprod
    totals: dict[str, float] = {}
    for t, x0, x_t, estimate in _one_step_estimates(
        decoder, images, image_embedding, caption_tokens, fractions, generator, batch_size
    ):
        as_is = x_t / float(scale[t])
        for key, error in (("x0_mse", estimate - x0), ("input_mse", as_is - x0)):
            totals[f"{key}@t={t}"] = totals.get(f"{key}@t={t}", 0.0) + float(mean_flat(error**2).sum())
    return {key: total / len(images) for key, total in totals.items()}


# Timesteps of the attribute-source test, as fractions of the schedule: noisy enough that the conditioning
# has to supply what x_t no longer shows.
SOURCE_FRACTIONS = (0.3, 0.5, 0.7)


@torch.no_grad()
def attribute_sources(
    decoder: DiffusionDecoder,
    images: torch.Tensor,
    image_embedding: torch.Tensor,
    caption_tokens: torch.Tensor | None,
    records: list[dict],
    *,
    generator: torch.Generator,
    attributes: tuple[str, ...] = ("colour", "shape"),
    fractions: tuple[float, ...] = SOURCE_FRACTIONS,
    batch_size: int = 64,
) -> dict[str, float]:
    """Which input does the decoder take each attribute from? Image i of the (B, 3, S, S) ``images`` in
    [-1, 1], noised to t = round(f * (T - 1)) for f in ``fractions``, is decoded in one step (unguided) with
    the CLIP embedding and caption of image ``partner[i]`` (a random derangement). Over the pairs whose true
    values of an attribute differ, the pixel reader's reading of the x_0 estimate is compared with image i's
    (``<attribute>_from_image@t=<t>``) and with its partner's (``<attribute>_from_condition@t=<t>``); the two
    add up to at most 1, the rest is read as neither. ``records`` hold each image's true attributes. A
    decoder that renders what its conditioning describes takes an attribute from it once x_t shows little
    of the object; one whose ``from_condition`` stays at chance there draws the attribute from the noise."""
    if len(records) != len(images) or len(images) < 2:
        raise ValueError(
            f"attribute_sources needs >= 2 images and one record each, got {len(images)} images "
            f"and {len(records)} records"
        )
    partner = derangement(len(images), generator)
    readings: dict[int, list[dict[str, str]]] = {}
    for t, _, _, estimate in _one_step_estimates(
        decoder, images, image_embedding, caption_tokens, fractions, generator, batch_size, partner
    ):
        images_read = to_uint8((estimate.clamp(-1, 1) + 1) / 2)
        readings.setdefault(t, []).extend(read_shape(image) for image in images_read)
    metrics = {}
    for attribute in attributes:
        own = [record[attribute] for record in records]
        given = [own[j] for j in partner.tolist()]
        differ = [i for i in range(len(own)) if own[i] != given[i]]
        for t, read_at_t in readings.items():
            read = [read_at_t[i].get(attribute) for i in differ]
            count = len(differ) or float("nan")
            metrics[f"{attribute}_from_image@t={t}"] = sum(r == own[i] for r, i in zip(read, differ)) / count
            metrics[f"{attribute}_from_condition@t={t}"] = (
                sum(r == given[i] for r, i in zip(read, differ)) / count
            )
    return metrics
