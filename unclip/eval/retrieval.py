"""Image-text retrieval in CLIP space (Radford et al. 2021 §3.2, the Flickr30k/MSCOCO protocol), for any data.

Zero-shot attribute accuracy needs the truth behind every image, which only ``shapes`` has. Retrieval needs
only the pairs themselves: among the N held-out images, is a caption's own image the nearest (recall@1) or in
the nearest k, and the same from images to captions. A CLIP that learnt nothing scores about k / N.
Captions that occur more than once (``shapes`` has many) count a hit on any image with the same caption.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def retrieval_recall(
    image_embeddings: torch.Tensor,
    text_embeddings: torch.Tensor,
    captions: list[str],
    ks: tuple[int, ...] = (1, 5),
) -> dict[str, float]:
    """Recall@k of text -> image and image -> text retrieval among N pairs (row i of each is pair i);
    ``chance@k`` is k / N, the recall of a CLIP that learnt nothing (for comparison)."""
    images = F.normalize(image_embeddings.float(), dim=-1)
    texts = F.normalize(text_embeddings.float(), dim=-1)
    similarity = texts @ images.T  # (N captions, N images)
    ids = {caption: i for i, caption in enumerate(dict.fromkeys(captions))}
    label = torch.tensor([ids[c] for c in captions])
    same = label[:, None] == label[None, :]  # caption i describes image j
    metrics: dict[str, float] = {}
    n = len(captions)
    for k in ks:
        k_eff = min(k, n)
        text_to_image = same.gather(1, similarity.topk(k_eff, dim=1).indices).any(dim=1)
        image_to_text = same.T.gather(1, similarity.T.topk(k_eff, dim=1).indices).any(dim=1)
        metrics[f"text_to_image_r@{k}"] = float(text_to_image.float().mean())
        metrics[f"image_to_text_r@{k}"] = float(image_to_text.float().mean())
        metrics[f"chance@{k}"] = k_eff / n
    return metrics
