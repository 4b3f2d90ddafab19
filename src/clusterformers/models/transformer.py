"""A pre-LN transformer block, the block stack shared by our models, and a causal LM that generates.

Softmax and Elliptical models share every parameter name; the only difference is the attention module of
the layers in ``elliptical_layers``, which estimate their metric from the previous layer's values (handed
over by the model's shared state, see ``clusterformers.state``). So a softmax checkpoint loads into an
elliptical model, and with ``estimator="identity"`` the two compute the same function.

Masks: ``key_padding_mask`` is bool ``[B, N]`` with **True = keep** (a real token), False = padding, the
convention of ``F.scaled_dot_product_attention`` (the opposite of ``torch.nn.MultiheadAttention``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clusterformers.attention import EllipticalAttention, KVCache, MultiheadAttention
from clusterformers.models.ffn import FFN_KINDS, Mlp, build_ffn, resolve_moe_layers
from clusterformers.moe import MoE, SoftMoE
from clusterformers.state import share_state

ATTENTION_KINDS = ("softmax", "elliptical")

__all__ = [
    "ATTENTION_KINDS",
    "Block",
    "BlockStack",
    "Mlp",
    "TransformerLM",
    "TransformerLMConfig",
    "ac_defaults",
    "init_block_weights",
    "resolve_elliptical_layers",
]


class Block(nn.Module):
    """Pre-LN transformer block: ``x + drop(attn(LN(x)))``, then ``x + drop(mlp(LN(x)))``.

    Args:
        dim: model width.
        num_heads: attention heads (must divide ``dim``).
        mlp_ratio: hidden width of the default dense MLP is ``int(dim · mlp_ratio)``.
        dropout: attention-weight dropout and residual dropout on both branches (training only).
        causal: causal self-attention.
        attention: ``"softmax"`` (:class:`MultiheadAttention`) or ``"elliptical"``
            (:class:`EllipticalAttention`).
        estimator: metric estimator of an elliptical block (see ``clusterformers.attention``).
        metric_grad: backpropagate through the elliptical metric (see ``set_metric_grad``).
        mlp: the FFN, any module mapping ``[B, N, dim] -> Tensor [B, N, dim]`` (e.g. an MoE layer);
            default a dense GELU :class:`Mlp`. An ``MoE``/``SoftMoE`` also gets ``key_padding_mask``, so
            padding stays out of its routing statistics and aux losses.

    ``forward(x [B, N, dim], key_padding_mask=None (bool [B, T], True = keep), kv_cache=None) -> [B, N, dim]``;
    with a :class:`KVCache`, ``x`` holds the new tokens and the mask covers the cached ones too.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        causal: bool = False,
        attention: str = "softmax",
        estimator: str = "mean",
        metric_grad: bool = False,
        mlp: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {attention!r}")
        if attention == "elliptical" and causal and estimator == "median":
            raise NotImplementedError("estimator='median' is not implemented for causal attention (prefix median)")
        if mlp is None and not mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be > 0, got {mlp_ratio}")
        self.norm1 = nn.LayerNorm(dim)
        self.attn: MultiheadAttention | EllipticalAttention
        if attention == "elliptical":
            self.attn = EllipticalAttention(
                dim, num_heads, causal=causal, dropout=dropout, estimator=estimator, metric_grad=metric_grad
            )
        else:
            self.attn = MultiheadAttention(dim, num_heads, causal=causal, dropout=dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = mlp if mlp is not None else Mlp(dim, int(dim * mlp_ratio))
        self.drop = nn.Dropout(dropout)

    def forward(
        self, x: Tensor, key_padding_mask: Tensor | None = None, kv_cache: KVCache | None = None
    ) -> Tensor:
        x = x + self.drop(self.attn(self.norm1(x), key_padding_mask=key_padding_mask, kv_cache=kv_cache))
        h = self.norm2(x)
        if key_padding_mask is not None and isinstance(self.mlp, (MoE, SoftMoE)):
            y = self.mlp(h, key_padding_mask=key_padding_mask[:, -x.shape[1] :])
        else:
            y = self.mlp(h)
        return x + self.drop(y)


def resolve_elliptical_layers(depth: int, elliptical_layers: Iterable[int] | None = None) -> tuple[int, ...]:
    """Validate the elliptical layers; default ``1..depth-1`` (every layer but the first).

    Layer 0 has no previous layer, so listing it raises ``ValueError``. Duplicates are merged; the result
    is sorted.
    """
    if depth <= 0:
        raise ValueError(f"depth must be > 0, got {depth}")
    if elliptical_layers is None:
        return tuple(range(1, depth))
    layers = list(elliptical_layers)
    bad = [i for i in layers if isinstance(i, bool) or not isinstance(i, int)]
    if bad:
        raise ValueError(f"elliptical_layers must hold ints, got {bad}")
    if 0 in layers:
        raise ValueError(
            f"elliptical_layers={layers} lists layer 0, which has no previous layer to estimate the metric "
            f"from; use layers in 1..{depth - 1}"
        )
    out_of_range = [i for i in layers if not 0 < i < depth]
    if out_of_range:
        raise ValueError(f"elliptical_layers must lie in 1..{depth - 1} (depth {depth}), got {out_of_range}")
    return tuple(sorted(set(layers)))


def ac_defaults(ffn_kwargs: Mapping[str, Any], stats: str) -> dict[str, Any]:
    """``ffn_kwargs`` with the AC statistics defaulting to ``stats`` where the user did not choose them.

    Applies to AC routers (``router="ac"``, or any router with ``ac`` set) and AC SoftMoE layers; an
    explicit ``ACConfig`` or an ``ac`` dict with ``"stats"`` is kept as given.
    """
    out = dict(ffn_kwargs)
    ac = out.get("ac")
    if ac is None and out.get("router") != "ac":
        return out
    if ac is None or isinstance(ac, str):
        out["ac"] = {"preset": ac or "lm", "stats": stats}
    elif isinstance(ac, Mapping) and "stats" not in ac:
        out["ac"] = {**ac, "stats": stats}
    return out


def init_block_weights(blocks: Iterable[nn.Module], depth: int, std: float = 0.02) -> None:
    """GPT-2 initialisation of the attention and dense-MLP weights (normal(0, std), zero bias).

    The output projections of both residual branches get ``std / √(2·depth)``. FFNs other than
    :class:`Mlp` (e.g. MoE layers) keep their own initialisation.
    """
    residual_std = std / math.sqrt(2 * depth)
    for block in blocks:
        linears = [(block.attn.qkv, std), (block.attn.proj, residual_std)]
        if isinstance(block.mlp, Mlp):
            linears += [(block.mlp.fc1, std), (block.mlp.fc2, residual_std)]
        for linear, s in linears:
            nn.init.normal_(linear.weight, mean=0.0, std=s)
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)


class BlockStack(nn.ModuleList):
    """The blocks of a model, built from its config (``TransformerLMConfig`` or ``ViTConfig``).

    With ``attention="elliptical"`` the blocks in ``cfg.elliptical_layers`` (default all but the first)
    get an :class:`EllipticalAttention`, the others a :class:`MultiheadAttention` (same parameter names).
    Each FFN comes from ``build_ffn(cfg.ffn, dim, int(dim · mlp_ratio), i, **ffn_kwargs)``; AC layers
    default (:func:`ac_defaults`) to running statistics in causal models, ``"ema"`` otherwise. Values and
    routing flow between the blocks through the model's shared state (``share_state``), so the stack is
    a plain loop. Parameter names are those of a ``ModuleList`` (``0.attn.qkv.weight``, ...).

    ``forward(x [B, N, dim], key_padding_mask=None (bool [B, T], True = keep), kv_cache=None) -> [B, N, dim]``.
    """

    def __init__(self, cfg: Any, *, causal: bool) -> None:
        if cfg.attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {cfg.attention!r}")
        if not cfg.mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be > 0, got {cfg.mlp_ratio}")
        layers = resolve_elliptical_layers(cfg.depth, cfg.elliptical_layers)
        if cfg.ffn in FFN_KINDS and cfg.ffn != "dense":
            resolve_moe_layers(cfg.ffn_kwargs.get("moe_layers"), cfg.depth)
        elliptical = layers if cfg.attention == "elliptical" else ()
        ffn_kwargs = ac_defaults(cfg.ffn_kwargs, "running" if causal else "ema")
        hidden = int(cfg.dim * cfg.mlp_ratio)
        super().__init__(
            Block(
                cfg.dim,
                cfg.num_heads,
                mlp_ratio=cfg.mlp_ratio,
                dropout=cfg.dropout,
                causal=causal,
                attention="elliptical" if i in elliptical else "softmax",
                estimator=cfg.estimator,
                mlp=build_ffn(cfg.ffn, cfg.dim, hidden, i, **ffn_kwargs),
            )
            for i in range(cfg.depth)
        )
        self.elliptical_layers = elliptical
        init_block_weights(self, cfg.depth)

    def forward(
        self, x: Tensor, key_padding_mask: Tensor | None = None, kv_cache: KVCache | None = None
    ) -> Tensor:
        for block in self:
            x = block(x, key_padding_mask, kv_cache)
        return x


@dataclass
class TransformerLMConfig:
    """Causal language model. ``ffn``/``ffn_kwargs`` select the FFN through ``models.ffn.build_ffn``
    (``"dense"``, ``"moe"`` with any router, ``"softmoe"``; ``ffn_kwargs["moe_layers"]`` picks the blocks)."""

    vocab_size: int
    context: int
    dim: int = 128
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.1
    attention: str = "softmax"
    estimator: str = "mean"
    elliptical_layers: Sequence[int] | None = None
    tie_weights: bool = True
    ffn: str = "dense"
    ffn_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context", "dim", "depth", "num_heads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"TransformerLMConfig.{name} must be a positive int, got {value!r}")
        if self.dim % self.num_heads:
            raise ValueError(f"dim ({self.dim}) must be a multiple of num_heads ({self.num_heads})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}")


class TransformerLM(nn.Module):
    """GPT-style causal LM: token + learned position embeddings, causal pre-LN blocks, final LN, head.

    ``forward(idx [B, N] long, key_padding_mask=None (bool [B, T], True = keep; right padding),
    kv_cache=None) -> logits [B, N, vocab_size]``. With ``tie_weights`` the head shares the token
    embedding matrix (``head.weight is tok_emb.weight``). Attention values and MoE routing flow between
    the blocks through ``self.layer_state`` (reset before every forward). AC routers default to running
    statistics, so a token's output depends on no later token and on no other sequence of the batch.
    """

    def __init__(self, cfg: TransformerLMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos_emb = nn.Embedding(cfg.context, cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = BlockStack(cfg, causal=True)
        self.elliptical_layers = self.blocks.elliptical_layers
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        nn.init.normal_(self.tok_emb.weight, mean=0.0, std=0.02)
        nn.init.normal_(self.pos_emb.weight, mean=0.0, std=0.02)
        if cfg.tie_weights:
            self.head.weight = self.tok_emb.weight
        else:
            nn.init.normal_(self.head.weight, mean=0.0, std=0.02)
        share_state(self)

    def attention_modules(self) -> list[nn.Module]:
        """The attention module of each block, in layer order."""
        return [block.attn for block in self.blocks]

    def forward(
        self, idx: Tensor, key_padding_mask: Tensor | None = None, kv_cache: KVCache | None = None
    ) -> Tensor:
        if not isinstance(idx, Tensor) or idx.dtype != torch.long:
            got = idx.dtype if isinstance(idx, Tensor) else type(idx).__name__
            raise TypeError(f"idx must be a torch.long tensor of token ids [B, N], got {got}")
        if idx.dim() != 2 or idx.shape[0] == 0 or idx.shape[1] == 0:
            raise ValueError(f"idx must be a non-empty [B, N] tensor, got shape {list(idx.shape)}")
        start = 0
        if kv_cache is not None:
            if kv_cache.owner is None:
                kv_cache.owner = self
            elif kv_cache.owner is not self:
                raise ValueError("kv_cache was filled by another model; start a new KVCache() for this one")
            start = kv_cache.length()
        n = idx.shape[1]
        if start + n > self.cfg.context:
            raise ValueError(
                f"sequence length {start + n} (cached {start} + new {n}) exceeds the model's context "
                f"{self.cfg.context}"
            )
        if idx.device.type == "cpu":
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0 or hi >= self.cfg.vocab_size:
                raise ValueError(f"token ids must lie in 0..{self.cfg.vocab_size - 1}, got min {lo}, max {hi}")
        pos = torch.arange(start, start + n, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        x = self.blocks(x, key_padding_mask, kv_cache)
        return self.head(self.norm(x))

    @torch.no_grad()
    def generate(
        self,
        idx: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        *,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Sample ``max_new_tokens`` tokens after the prompts ``idx [B, N]`` (no padding); returns
        ``[B, N + max_new_tokens]``.

        Args:
            temperature: divides the logits; ``0`` picks the most likely token (greedy).
            top_k: sample among the ``top_k`` most likely tokens only (None, or more than the vocabulary: all).
            use_cache: decode incrementally with a :class:`KVCache` (the same tokens as without it, for
                every attention and FFN kind with batch-independent routing). Past the context the
                window slides, and with learned positions every step then recomputes the window.
            generator: random generator of the sampling.

        Call it in eval mode for dropout-free sampling (it does not switch modes itself).
        """
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
        context = self.cfg.context
        cache: KVCache | None = None
        for _ in range(max_new_tokens):
            if not use_cache or idx.shape[1] > context:
                logits = self(idx[:, -context:])
            elif cache is None:
                cache = KVCache()
                logits = self(idx, kv_cache=cache)
            else:
                logits = self(idx[:, -1:], kv_cache=cache)
            logits = logits[:, -1].float()
            if temperature == 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
            idx = torch.cat([idx, nxt], dim=1)
        return idx
