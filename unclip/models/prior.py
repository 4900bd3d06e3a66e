"""The diffusion prior's network: a causal transformer that maps a noised CLIP image embedding to a clean one.

unCLIP (Ramesh et al. 2022, arXiv 2204.06125) §2.2: "we train a decoder-only Transformer with a causal
attention mask on a sequence consisting of, in order: the encoded text, the CLIP text embedding, an embedding
for the diffusion timestep, the noised CLIP image embedding, and a final embedding whose output from the
Transformer is used to predict the unnoised CLIP image embedding." The network predicts x0 directly (§2.2:
"we find it better to train our model to predict the unnoised z_i directly"); the diffusion maths, loss and
samplers live in :mod:`unclip.diffusion`.

Choices the paper leaves open, and why:

- Timestep embedding: sinusoidal features followed by a two-layer SiLU MLP, as in ADM (Dhariwal & Nichol
  2021) and kakaobrain/karlo. Unlike a learned table, neighbouring steps share structure, so a small prior
  trained for minutes sees every region of the schedule. ``t`` is rescaled to [0, 1000) so that ADM's
  frequency range (max period 10,000) covers the schedule whatever ``num_timesteps`` is.
- Classifier-free guidance (§2.2: the text conditioning is dropped 10 % of the time in training): for a
  dropped sample the caption tokens are *masked out* of attention and the pooled text embedding is replaced
  by a *learned null embedding*. Masking removes the tokens' information exactly, whatever values the caller
  left in them, and costs no parameters per position; the pooled slot keeps a learned vector so that the
  network is told explicitly that it is unconditional. The noised input x_t is never dropped.
- Padding: a caption position that is masked attends only to itself and is attended by no other position,
  so padded (or dropped) tokens cannot change any other output. The four non-caption tokens have fixed
  positional slots after ``max_text_tokens`` caption slots, so the output does not depend on how far a
  caption was padded: conditions of different lengths can be concatenated into one batch.

The causal mask makes the network cheaper than its sequence length suggests. The caption tokens and the
pooled text embedding come first, so they attend only to one another: their hidden states, and so their keys
and values in every layer, do not depend on x_t or t (the *prefix*). A sampler therefore takes the prefix
through the layers once (:meth:`PriorTransformer.cache_prefix`), keeping each layer's keys and values, and
each of its steps runs only the three timestep-dependent tokens (timestep, x_t, query) over them -- the
key/value caching of autoregressive decoders (e.g. Pope et al. 2022, "Efficiently Scaling Transformer
Inference", §2). Training, which sees each caption once, runs the whole sequence; in its last layer only the
query's output is read, so only that is computed, over keys and values folded into the query
(:meth:`SelfAttention.attend_last`). Both give the outputs of the whole sequence through every layer. For the
same reason trailing padding is cut from a batch's captions (:meth:`PriorTransformer.encode_condition`): CLIP
pads every caption to its context (77 tokens), real captions are much shorter (``shapes``' are about 10
tokens), and the padding's work would change nothing; and a training batch's dropped captions run as the null
condition, whose prefix is one token (:meth:`unclip.prior_sampling.DiffusionPrior.forward`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unclip.errors import ConfigError

# The text embedding, timestep, noised image embedding and final query occupy the last four positions.
_NUM_EXTRA_TOKENS = 4


@dataclass
class PriorConfig:
    """Hyperparameters of :class:`PriorTransformer`.

    ``clip_embed_dim`` (D) is the CLIP joint embedding size (pooled text and image embeddings);
    ``text_token_dim`` (d_text) is the width of CLIP's per-token text encodings; ``num_timesteps`` is the
    training schedule's T (respaced samplers must pass indices into that schedule).
    """

    clip_embed_dim: int = 64
    text_token_dim: int = 64
    width: int = 128
    layers: int = 4
    heads: int = 4
    max_text_tokens: int = 77
    num_timesteps: int = 1000
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for name in ("clip_embed_dim", "text_token_dim", "width", "layers", "heads", "max_text_tokens"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"prior {name}={getattr(self, name)} must be positive")
        if self.num_timesteps <= 0:
            raise ConfigError(f"prior num_timesteps={self.num_timesteps} must be positive")
        if self.width % self.heads != 0:
            raise ConfigError(f"prior width={self.width} must be divisible by heads={self.heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"prior dropout={self.dropout} must be in [0, 1)")

    @classmethod
    def preset(cls, name: str, **overrides: int | float) -> PriorConfig:
        """A named configuration, optionally with some fields overridden.

        - ``tiny``: a CPU prior (about 1 M parameters) that trains in minutes on the shapes dataset;
          override ``clip_embed_dim`` / ``text_token_dim`` to match the CLIP in use.
        - ``paper``: the 1B-parameter diffusion prior of unCLIP Table 3 (model size 1B, width 2048, 32
          heads, no dropout, T = 1000). Table 3 lists depth 24, but 24 standard pre-LN blocks of width 2048
          hold about 1.21 B parameters; kakaobrain/karlo's released 1B prior (configs/prior_1B_vit_l.yaml)
          uses 20 layers, which gives 1.02 B, so the depth is karlo's. CLIP ViT-L/14 embeddings (D = 768,
          text width 768) and 77 text tokens are karlo's too; Table 3's text context of 256 belongs to the
          paper's own text encoder, not to CLIP's 77-token tokenizer.
        """
        presets = {
            "tiny": {},
            "paper": dict(
                clip_embed_dim=768, text_token_dim=768, width=2048, layers=20, heads=32, max_text_tokens=77
            ),
        }
        if name not in presets:
            raise ConfigError(f"unknown prior preset {name!r}; choose one of {sorted(presets)}")
        return cls(**{**presets[name], **overrides})


@dataclass(frozen=True)
class PriorCondition:
    """The timestep-independent half of the prior's input: computed once per sample, reused at every step.

    ``tokens`` (B, L, width): projected caption tokens with their positional embeddings.
    ``token_mask`` (B, L) bool: True for a real caption token; False for padding and for dropped captions.
    ``text`` (B, width): projected pooled text embedding (or the null one) with its positional embedding.
    ``attn_mask`` (B, 1, L + 4, L + 4) float: 0 where a query may attend to a key (causal and padding),
    -inf where it may not.
    ``prefix``: per layer, the keys and values (each (B, heads, L + 1, width / heads)) of the caption tokens
    and the text embedding, once :meth:`PriorTransformer.cache_prefix` has computed them; None until then.
    """

    tokens: Tensor
    token_mask: Tensor
    text: Tensor
    attn_mask: Tensor
    prefix: tuple[tuple[Tensor, Tensor], ...] | None = None

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]


def _attention_mask(token_mask: Tensor) -> Tensor:
    """Causal mask combined with the caption key-padding mask; every position may attend to itself."""
    batch, num_tokens = token_mask.shape
    seq = num_tokens + _NUM_EXTRA_TOKENS
    key_ok = F.pad(token_mask, (0, _NUM_EXTRA_TOKENS), value=True)  # (B, S)
    causal = torch.ones(seq, seq, dtype=torch.bool, device=token_mask.device).tril()
    # The diagonal keeps fully masked rows (padded queries) finite: an all-masked row would make softmax NaN.
    eye = torch.eye(seq, dtype=torch.bool, device=token_mask.device)
    allowed = causal & (key_ok[:, None, :] | eye)
    # Additive rather than boolean: SDPA's CPU kernels would convert a boolean mask at every call.
    return torch.zeros(allowed.shape, device=allowed.device).masked_fill_(~allowed, -math.inf)[:, None]


def concat_conditions(*conds: PriorCondition) -> PriorCondition:
    """Stack conditions along the batch, padding shorter captions with masked tokens.

    Classifier-free guidance then runs as one forward: ``prior(cat([x, x]), cat([t, t]),
    concat_conditions(cond, prior.null_condition(B)))`` gives the same outputs as two separate forwards.
    """
    if not conds:
        raise ValueError("concat_conditions needs at least one condition")
    num_tokens = max(c.tokens.shape[1] for c in conds)
    tokens, masks = [], []
    for c in conds:
        pad = num_tokens - c.tokens.shape[1]
        tokens.append(F.pad(c.tokens, (0, 0, 0, pad)))
        masks.append(F.pad(c.token_mask, (0, pad), value=False))
    token_mask = torch.cat(masks)
    return PriorCondition(
        tokens=torch.cat(tokens),
        token_mask=token_mask,
        text=torch.cat([c.text for c in conds]),
        attn_mask=_attention_mask(token_mask),
    )


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal features of (possibly fractional) timesteps, (B,) -> (B, dim) (Vaswani et al. 2017; ADM)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


class SelfAttention(nn.Module):
    """Multi-head self-attention through ``F.scaled_dot_product_attention`` with a boolean mask, in two
    halves so that a cached prefix's keys and values can be prepended (see the module docstring)."""

    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Queries, keys and values (B, heads, S, width / heads) of the (normalised) x (B, S, width)."""
        batch, seq, width = x.shape
        q, k, v = self.qkv(x).view(batch, seq, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        return q, k, v

    def attend(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor) -> Tensor:
        """The projected attention output (B, S_q, width) of queries q over keys k and values v."""
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask.to(q.dtype), dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(out.transpose(1, 2).flatten(2))

    def attend_last(self, x: Tensor, attn_mask: Tensor) -> Tensor:
        """The projected attention output (B, 1, width) of x's last position alone over all of the
        (normalised) x (B, S, width); ``attn_mask`` (B, 1, S_q, S) holds that position's row last.

        With one query, keys and values need not be projected (the weight absorption of DeepSeek-V2's
        multi-head latent attention, arXiv 2405.04434, §2.1.2). Per head, q . (W_k x_j + b_k) =
        (W_k^T q) . x_j + q . b_k, whose last term is the same for every j and cancels in the softmax; and
        sum_j p_j (W_v x_j + b_v) = W_v (sum_j p_j x_j) + b_v, as the p_j sum to 1. The S positions then cost
        O(S * width) per head instead of the O(S * width^2) of projecting their keys and values.
        """
        width = x.shape[-1]
        dh = width // self.heads
        weight_q, weight_k, weight_v = self.qkv.weight.view(3, self.heads, dh, width).unbind(0)
        bias_q, _, bias_v = self.qkv.bias.view(3, self.heads, dh).unbind(0)
        q = torch.einsum("bw,hdw->bhd", x[:, -1], weight_q) + bias_q
        u = torch.einsum("bhd,hdw->bhw", q, weight_k) * dh**-0.5
        scores = torch.einsum("bhw,bsw->bhs", u, x) + attn_mask[:, :, -1].to(x.dtype)
        probs = F.dropout(scores.softmax(-1), self.dropout, self.training)
        z = torch.einsum("bhs,bsw->bhw", probs, x)
        out = torch.einsum("bhw,hdw->bhd", z, weight_v) + bias_v
        return self.proj(out.flatten(1))[:, None]

    def forward(self, x: Tensor, attn_mask: Tensor) -> Tensor:
        return self.attend(*self.project(x), attn_mask)


class Block(nn.Module):
    """Pre-LN transformer block (GPT-2 / CLIP's text transformer): x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.ln_attn = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads, dropout)
        self.ln_mlp = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, attn_mask: Tensor, past: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """``past``: keys and values of earlier positions (the cached prefix) that x's queries also see;
        ``attn_mask`` then spans them followed by x's own positions."""
        return self.forward_with_keys_values(x, attn_mask, past)[0]

    def forward_with_keys_values(
        self, x: Tensor, attn_mask: Tensor, past: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """:meth:`forward`'s output and the keys and values of x's own positions (what a cache keeps)."""
        q, k, v = self.attn.project(self.ln_attn(x))
        own = (k, v)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        x = x + self.drop(self.attn.attend(q, k, v, attn_mask))
        return x + self.drop(self.mlp(self.ln_mlp(x))), own

    def forward_last(self, x: Tensor, attn_mask: Tensor) -> Tensor:
        """The block's output (B, 1, width) at x's last position alone, every position of x still serving
        as key and value (:meth:`SelfAttention.attend_last`)."""
        x = x[:, -1:] + self.drop(self.attn.attend_last(self.ln_attn(x), attn_mask))
        return x + self.drop(self.mlp(self.ln_mlp(x)))


class PriorTransformer(nn.Module):
    """unCLIP's diffusion prior network (§2.2): predicts the clean CLIP image embedding x0.

    Sequence, in order: caption tokens (L), pooled text embedding, timestep embedding, noised image
    embedding, learned final query; each is projected to ``width`` and given a learned positional embedding.
    The output at the final query, after a final LayerNorm, is projected to D.
    """

    def __init__(self, config: PriorConfig) -> None:
        super().__init__()
        self.config = config
        w, d = config.width, config.clip_embed_dim
        self.token_proj = nn.Linear(config.text_token_dim, w)
        self.text_proj = nn.Linear(d, w)
        self.image_proj = nn.Linear(d, w)
        self.time_mlp = nn.Sequential(nn.Linear(w, w), nn.SiLU(), nn.Linear(w, w))
        self.null_text = nn.Parameter(torch.empty(w))
        self.query = nn.Parameter(torch.empty(w))
        # max_text_tokens caption slots, then fixed slots for text embedding, timestep, x_t and query.
        self.pos = nn.Parameter(torch.empty(config.max_text_tokens + _NUM_EXTRA_TOKENS, w))
        self.blocks = nn.ModuleList(Block(w, config.heads, config.dropout) for _ in range(config.layers))
        self.ln_out = nn.LayerNorm(w)
        self.out_proj = nn.Linear(w, d)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 initialisation (Radford et al. 2019): N(0, 0.02), residual outputs scaled by 1/sqrt(2L)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        for block in self.blocks:
            for proj in (block.attn.proj, block.mlp[2]):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * self.config.layers))
        for param in (self.null_text, self.query, self.pos):
            nn.init.normal_(param, std=0.01)

    def encode_condition(
        self,
        text_tokens: Tensor,
        token_mask: Tensor,
        text_embedding: Tensor,
        drop_caption: Tensor | None = None,
    ) -> PriorCondition:
        """Project the caption once: ``text_tokens`` (B, L, d_text), ``token_mask`` (B, L) bool (True = real
        token), ``text_embedding`` (B, D); ``drop_caption`` (B,) bool replaces a sample's caption by the null
        condition (classifier-free guidance, §2.2)."""
        cfg = self.config
        batch, num_tokens, token_dim = text_tokens.shape
        if token_dim != cfg.text_token_dim:
            raise ConfigError(f"text tokens have width {token_dim}, the prior expects {cfg.text_token_dim}")
        if num_tokens > cfg.max_text_tokens:
            raise ConfigError(
                f"caption has {num_tokens} tokens, the prior holds at most {cfg.max_text_tokens}"
            )
        if text_embedding.shape[-1] != cfg.clip_embed_dim:
            raise ConfigError(
                f"text embedding has dim {text_embedding.shape[-1]}, the prior expects {cfg.clip_embed_dim}"
            )
        if token_mask.shape != (batch, num_tokens):
            raise ValueError(
                f"token_mask has shape {tuple(token_mask.shape)}, expected {(batch, num_tokens)}"
            )
        token_mask = token_mask.bool()
        text = self.text_proj(text_embedding)
        if drop_caption is not None:
            drop = drop_caption.bool().to(text.device)
            token_mask = token_mask & ~drop[:, None]
            text = torch.where(drop[:, None], self.null_text.to(text.dtype), text)
        # Trailing positions that are padding in every row are cut: nothing attends to them (module
        # docstring), so the outputs are unchanged and short captions cost their length, not the context's.
        positions = torch.arange(1, num_tokens + 1, device=token_mask.device)
        num_tokens = int((token_mask * positions).amax()) if token_mask.numel() else 0
        text_tokens, token_mask = text_tokens[:, :num_tokens], token_mask[:, :num_tokens]
        return PriorCondition(
            tokens=self.token_proj(text_tokens) + self.pos[:num_tokens],
            token_mask=token_mask,
            text=text + self.pos[cfg.max_text_tokens],
            attn_mask=_attention_mask(token_mask),
        )

    def null_condition(self, batch_size: int) -> PriorCondition:
        """The unconditional condition: no caption tokens and the learned null text embedding."""
        ref = self.null_text
        token_mask = torch.zeros(batch_size, 0, dtype=torch.bool, device=ref.device)
        text = ref + self.pos[self.config.max_text_tokens]
        return PriorCondition(
            tokens=ref.new_zeros(batch_size, 0, self.config.width),
            token_mask=token_mask,
            text=text.expand(batch_size, -1),
            attn_mask=_attention_mask(token_mask),
        )

    def cache_prefix(self, cond: PriorCondition) -> PriorCondition:
        """``cond`` with, per layer, the keys and values of its prefix (caption tokens, then the text
        embedding), which the causal mask makes independent of x_t and t: a sampler computes them once and
        reuses them at every step. The last layer's prefix outputs are never read, so only its keys and
        values are computed."""
        if cond.prefix is not None:
            return cond
        h = torch.cat([cond.tokens, cond.text[:, None]], dim=1)
        size = h.shape[1]
        mask = cond.attn_mask[..., :size, :size]
        cache = []
        for block in self.blocks[:-1]:
            h, keys_values = block.forward_with_keys_values(h, mask)
            cache.append(keys_values)
        last = self.blocks[-1]
        cache.append(last.attn.project(last.ln_attn(h))[1:])
        return dataclasses.replace(cond, prefix=tuple(cache))

    def forward(self, x_t: Tensor, t: Tensor, cond: PriorCondition) -> Tensor:
        """Predict x0 (B, D) from ``x_t`` (B, D) at timesteps ``t`` (B,), given ``cond``. With the prefix
        cached in ``cond`` (a sampler), the timestep, x_t and query tokens attend to its keys and values;
        without (training), the whole sequence runs through the layers at once, the last layer computing
        only the query's output, the only one read."""
        cfg = self.config
        if cond.batch_size != x_t.shape[0]:
            raise ValueError(f"cond has batch {cond.batch_size} but x_t has batch {x_t.shape[0]}")
        extra_pos = self.pos[cfg.max_text_tokens + 1 :]
        t_feat = timestep_embedding(t * (1000.0 / cfg.num_timesteps), cfg.width).to(x_t.dtype)
        time = self.time_mlp(t_feat) + extra_pos[0]
        image = self.image_proj(x_t) + extra_pos[1]
        query = (self.query + extra_pos[2]).expand(x_t.shape[0], -1)
        if cond.prefix is None:
            h = torch.cat([cond.tokens, torch.stack([cond.text, time, image, query], dim=1)], dim=1)
            for block in self.blocks[:-1]:
                h = block(h, cond.attn_mask)
            h = self.blocks[-1].forward_last(h, cond.attn_mask)
        else:
            h = torch.stack([time, image, query], dim=1)
            mask = cond.attn_mask[..., -(_NUM_EXTRA_TOKENS - 1) :, :]
            for block, past in zip(self.blocks, cond.prefix):
                h = block(h, mask, past)
        return self.out_proj(self.ln_out(h[:, -1]))
