"""How good are a prior's sampled CLIP image embeddings? (unCLIP §2.2; the prior comparison of §5.)

For each held-out caption the prior samples one image embedding (with its sampling settings: guidance,
best-of-n), which is compared with the CLIP embedding of the caption's own image:

- ``cosine``: mean cosine similarity between sampled and true image embeddings;
- ``cosine_text_baseline``: the same for the caption's CLIP text embedding, i.e. no prior at all (the
  "just use z_t" alternative §2 argues against: text and image embeddings of one pair are far apart);
- ``cosine_random_baseline``: the same for the image embedding of a random training example, i.e. a prior
  that ignores the caption;
- ``colour_acc`` / ``shape_acc`` (``shapes`` data only, where the truth is known): zero-shot classification
  (:mod:`unclip.eval.zero_shot`) of the sampled embeddings against the caption's true colour and shape.

On a user's own data only the cosines are reported: the gap between ``cosine`` and its two baselines is what
the prior learnt.
"""

from __future__ import annotations

from typing import Any

import datasets
import torch
import torch.nn.functional as F

from unclip.clip.model import ClipEncoder, TextEncoding
from unclip.eval.zero_shot import zero_shot_accuracy
from unclip.prior_sampling import DiffusionPrior, sample_prior

_TEXT_COLUMNS = ["image_embedding", "text_embedding", "text_tokens", "token_mask"]


def _mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.float(), b.float(), dim=-1).mean())


@torch.no_grad()
def evaluate_prior(
    prior: DiffusionPrior,
    encoder: ClipEncoder,
    rows: datasets.Dataset,
    reference: datasets.Dataset,
    *,
    generator: torch.Generator,
    batch_size: int = 256,
    **sampling: Any,
) -> dict[str, float]:
    """Metrics of the prior on embedded caption ``rows`` (an ``embed_split`` result; with ``colour`` and
    ``shape`` columns the zero-shot accuracies are added); ``reference`` holds training image embeddings,
    which the random baseline draws from. ``sampling`` overrides the prior's sampling settings."""
    data = rows.with_format("torch", columns=_TEXT_COLUMNS)
    sampled, true, text = [], [], []
    for start in range(0, len(rows), batch_size):
        chunk = data[start : start + batch_size]
        encoding = TextEncoding(
            tokens=chunk["text_tokens"], mask=chunk["token_mask"], pooled=chunk["text_embedding"]
        )
        sampled.append(sample_prior(prior, encoding, generator=generator, **sampling).cpu())
        true.append(chunk["image_embedding"])
        text.append(chunk["text_embedding"])
    sampled_all, true_all = torch.cat(sampled), torch.cat(true)
    picks = torch.randint(len(reference), (len(rows),), generator=generator).tolist()
    random_images = reference.with_format("torch", columns=["image_embedding"])[picks]["image_embedding"]
    metrics = {
        "cosine": _mean_cosine(sampled_all, true_all),
        "cosine_text_baseline": _mean_cosine(torch.cat(text), true_all),
        "cosine_random_baseline": _mean_cosine(random_images, true_all),
    }
    if {"colour", "shape"} <= set(rows.column_names):  # shapes data: judge the named attributes too
        labels = {"colour": rows["colour"], "shape": rows["shape"]}
        metrics.update(zero_shot_accuracy(encoder, sampled_all, labels))
    return metrics
