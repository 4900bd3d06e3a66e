"""Zero-shot classification in CLIP space (Radford et al. 2021 §3.1.4) over compositional labels.

The `shapes` captions always name colour and shape together, so the label set is the grid of every
(colour, shape) prompt "a {colour} {shape}". An image embedding gets a softmax over that grid at CLIP's own
learned temperature, and each attribute is read from the grid's marginal:
p(shape) = Σ_colour p(colour, shape).
Averaging the prompt embeddings over the other attribute first (a prompt ensemble) is the usual alternative.
On `shapes` it washes the shape out, because colour dominates every caption's embedding. Measured on one tiny
CLIP, the ensemble scored 0.69 on seen pairs and 0.37 on held-out ones, where the grid marginal scored 0.84
and 0.65. The same classifier judges real images (the CLIP stage) and embeddings sampled by the prior.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from unclip.clip.model import ClipEncoder
from unclip.data.shapes import COLOURS, SHAPES

ATTRIBUTES = ("colour", "shape")


@torch.no_grad()
def grid_embeddings(encoder: ClipEncoder) -> torch.Tensor:
    """Unit-norm text embeddings (C, S, D) of "a {colour} {shape}" for every colour and shape."""
    prompts = [f"a {c} {s}" for c in COLOURS for s in SHAPES]
    text = F.normalize(encoder.encode_text(encoder.tokenize(prompts)).pooled.float(), dim=-1)
    return text.view(len(COLOURS), len(SHAPES), -1)


@torch.no_grad()
def attribute_probabilities(encoder: ClipEncoder, image_embeddings: torch.Tensor) -> dict[str, torch.Tensor]:
    """p(colour) (B, C) and p(shape) (B, S): marginals of the softmax over the (colour, shape) grid."""
    embeddings = F.normalize(image_embeddings.float(), dim=-1)
    grid = grid_embeddings(encoder).to(embeddings.device)
    scale = encoder.model.logit_scale.exp().float()
    joint = torch.einsum("bd,csd->bcs", embeddings, grid).mul(scale).flatten(1).softmax(dim=-1)
    joint = joint.view(-1, len(COLOURS), len(SHAPES))
    return {"colour": joint.sum(dim=2), "shape": joint.sum(dim=1)}


@torch.no_grad()
def zero_shot_accuracy(
    encoder: ClipEncoder, image_embeddings: torch.Tensor, labels: dict[str, list[str]]
) -> dict[str, float]:
    """Accuracy of classifying each embedding's colour and shape against the true ``labels``."""
    names = {"colour": list(COLOURS), "shape": list(SHAPES)}
    result = {}
    for attribute, probabilities in attribute_probabilities(encoder, image_embeddings).items():
        predicted = probabilities.argmax(dim=-1).tolist()
        truth = labels[attribute]
        correct = sum(names[attribute][p] == y for p, y in zip(predicted, truth))
        result[f"{attribute}_acc"] = correct / len(truth)
    return result
