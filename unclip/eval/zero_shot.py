"""Zero-shot classification in CLIP space (Radford et al. 2021 §3.1.4), with prompt ensembles.

A class's text embedding is the normalised mean of the normalised embeddings of every prompt that names it:
the colour "red" is the average of "a red circle", "a red square", ...; the shape "star" the average of
"a red star", "a green star", ... The `shapes` captions always name colour and shape together, so these are
the prompts a CLIP trained on them has seen the words in. The same classifier judges real images (the CLIP
stage) and embeddings sampled by the prior.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from unclip.clip.model import ClipEncoder
from unclip.data.shapes import COLOURS, SHAPES

ATTRIBUTES = ("colour", "shape")


@torch.no_grad()
def class_embeddings(encoder: ClipEncoder, attribute: str) -> tuple[list[str], torch.Tensor]:
    """Class names and their unit-norm ensemble text embeddings (C, D) for ``colour`` or ``shape``."""
    colours, shapes = list(COLOURS), list(SHAPES)
    prompts = [f"a {c} {s}" for c in colours for s in shapes]
    text = F.normalize(encoder.encode_text(encoder.tokenize(prompts)).pooled.float(), dim=-1)
    grid = text.view(len(colours), len(shapes), -1)
    if attribute == "colour":
        names, means = colours, grid.mean(dim=1)
    elif attribute == "shape":
        names, means = shapes, grid.mean(dim=0)
    else:
        raise ValueError(f"attribute must be one of {ATTRIBUTES}, not {attribute!r}")
    return names, F.normalize(means, dim=-1)


@torch.no_grad()
def zero_shot_accuracy(
    encoder: ClipEncoder, image_embeddings: torch.Tensor, labels: dict[str, list[str]]
) -> dict[str, float]:
    """Accuracy of classifying each embedding's colour and shape against the true ``labels``."""
    embeddings = F.normalize(image_embeddings.float(), dim=-1)
    result = {}
    for attribute in ATTRIBUTES:
        names, classes = class_embeddings(encoder, attribute)
        predicted = (embeddings @ classes.to(embeddings.device).T).argmax(dim=-1).tolist()
        truth = labels[attribute]
        result[f"{attribute}_acc"] = sum(names[p] == y for p, y in zip(predicted, truth)) / len(truth)
    return result
