"""GLIDE's caption transformer (Nichol et al. 2021 §2.3 and App. A), trained with the decoder.

Token embedding + learned positional embedding, a stack of pre-LayerNorm transformer blocks
(Radford et al. 2019 GPT-2 layout: ``x + attn(ln(x))``, ``x + mlp(ln(x))``, 4x GELU MLP), and a final
LayerNorm. The input is CLIP BPE token ids (vocabulary 49408, ``<start>`` = 49406, ``<end>`` = 49407,
zero padding after ``<end>``), so captions are tokenised once by the CLIP tokenizer for every stage.

Attention is *full* (bidirectional), as in GLIDE: the encoder never generates text, so nothing requires
causality and every caption token may use the whole caption. Padding positions are masked out as keys.
The pooled feature is the ``<end>`` token's output, found as the position of the largest id in each row
(CLIP's convention); with full attention it summarises the whole caption just as in a causal model.

The padding mask is "position <= position of ``<end>``" rather than "id != 0": CLIP's BPE also uses id 0
for the real token ``!``, which must not be hidden, and an all-padding row still keeps position 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unclip.errors import ConfigError


@dataclass
class TextEncoderConfig:
    """Size of the caption transformer. GLIDE's: width 2048, 24 layers, 32 heads (~1.2B parameters)."""

    vocab_size: int = 49408
    context_length: int = 77
    width: int = 512
    layers: int = 12
    heads: int = 8

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_length", "width", "layers", "heads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"text_encoder.{name} must be >= 1, got {getattr(self, name)}")
        if self.width % self.heads:
            raise ConfigError(f"text_encoder.width={self.width} not divisible by heads={self.heads}")


@dataclass
class TextEncoding:
    """Output of :class:`TextEncoder`: per-token features (B, L, width) after the final LayerNorm, the
    pooled ``<end>`` feature (B, width), and ``mask`` (B, L), True for real tokens."""

    tokens: Tensor
    pooled: Tensor
    mask: Tensor


class TransformerBlock(nn.Module):
    """Pre-LN transformer block with multi-head self-attention under a key padding mask."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: Tensor, key_mask: Tensor) -> Tensor:
        q, k, v = self.qkv(self.ln_1(x)).chunk(3, dim=-1)
        q, k, v = (z.unflatten(-1, (self.heads, -1)).transpose(1, 2) for z in (q, k, v))
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :])
        x = x + self.proj(attn.transpose(1, 2).flatten(2))
        return x + self.mlp(self.ln_2(x))


class TextEncoder(nn.Module):
    """Caption transformer: ``forward(tokens)`` with int64 CLIP BPE ids (B, L), L <= context_length."""

    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        self.positional_embedding = nn.Parameter(torch.empty(config.context_length, config.width))
        self.blocks = nn.ModuleList(
            TransformerBlock(config.width, config.heads) for _ in range(config.layers)
        )
        self.final_ln = nn.LayerNorm(config.width)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)

    def forward(self, tokens: Tensor) -> TextEncoding:
        if tokens.ndim != 2 or tokens.shape[1] > self.config.context_length:
            raise ValueError(
                f"caption tokens must be (batch, length <= {self.config.context_length}), "
                f"got {tuple(tokens.shape)}"
            )
        length = tokens.shape[1]
        end = tokens.argmax(dim=-1)
        mask = torch.arange(length, device=tokens.device)[None] <= end[:, None]
        x = self.token_embedding(tokens) + self.positional_embedding[:length]
        for block in self.blocks:
            x = block(x, mask)
        x = self.final_ln(x)
        pooled = x[torch.arange(x.shape[0], device=x.device), end]
        return TextEncoding(tokens=x, pooled=pooled, mask=mask)
