"""A pre-LN transformer block, a stack that threads values between layers, and a causal LM.

Softmax and Elliptical models share every parameter name; the only difference is the attention module of
the layers in ``elliptical_layers``, which receive the previous layer's values ``v_prev`` and estimate the
metric from them (``shared/specs/elliptical.md`` §3). So a softmax checkpoint loads into an elliptical
model, and with ``estimator="identity"`` the two compute the same function.

Masks: ``key_padding_mask`` is bool ``[B, N]`` with **True = keep** (a real token), False = padding, the
convention of ``F.scaled_dot_product_attention`` (the opposite of ``torch.nn.MultiheadAttention``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from clusterformers.attention import EllipticalAttention, MultiheadAttention
from clusterformers.models.ffn import FFN_KINDS, Mlp, build_ffn, resolve_moe_layers
from clusterformers.moe import MoE, RoutingChain, SoftMoE

ATTENTION_KINDS = ("softmax", "elliptical")

__all__ = [
    "ATTENTION_KINDS",
    "Block",
    "Mlp",
    "TransformerLM",
    "TransformerLMConfig",
    "build_blocks",
    "forward_blocks",
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
            default a dense GELU :class:`Mlp`. An ``MoE``/``SoftMoE`` also gets ``key_padding_mask`` as its
            ``token_mask``, so padding stays out of its routing statistics and aux losses.

    ``forward(x [B, N, dim], key_padding_mask=None (bool [B, N], True = keep), v_prev=None [B, H, N, D])``
    returns ``(x [B, N, dim], v [B, H, N, D])``, ``v`` being this block's attention values.
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
        self, x: Tensor, key_padding_mask: Tensor | None = None, v_prev: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        out, v = self.attn(self.norm1(x), key_padding_mask=key_padding_mask, v_prev=v_prev)
        x = x + self.drop(out)
        h = self.norm2(x)
        if key_padding_mask is not None and isinstance(self.mlp, (MoE, SoftMoE)):
            y = self.mlp(h, token_mask=key_padding_mask)
        else:
            y = self.mlp(h)
        x = x + self.drop(y)
        return x, v


def resolve_elliptical_layers(depth: int, elliptical_layers: Iterable[int] | None = None) -> tuple[int, ...]:
    """Validate the layers that receive ``v_prev``; default ``1..depth-1`` (every layer but the first).

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


def build_blocks(
    depth: int,
    dim: int,
    num_heads: int,
    *,
    mlp_ratio: float = 4.0,
    dropout: float = 0.0,
    causal: bool = False,
    attention: str = "softmax",
    estimator: str = "mean",
    elliptical_layers: Iterable[int] | None = None,
    ffn: str = "dense",
    ffn_kwargs: dict[str, Any] | None = None,
    chain: RoutingChain | None = None,
) -> tuple[nn.ModuleList, tuple[int, ...]]:
    """The stack factory: ``depth`` :class:`Block` s and the layers that receive ``v_prev``.

    With ``attention="elliptical"`` the blocks listed in ``elliptical_layers`` (default ``1..depth-1``) get
    an :class:`EllipticalAttention`, the others a :class:`MultiheadAttention` (same parameter names). With
    ``attention="softmax"`` every block is plain and the returned layer tuple is empty. Each FFN comes from
    ``build_ffn(ffn, dim, int(dim · mlp_ratio), i, chain=chain, **ffn_kwargs)``, in block order, so the
    MoE layers register on ``chain`` in execution order (the model resets the chain in its forward).

    Returns:
        ``(blocks, elliptical_layers)``; run them with :func:`forward_blocks`.
    """
    if attention not in ATTENTION_KINDS:
        raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {attention!r}")
    if not mlp_ratio > 0:
        raise ValueError(f"mlp_ratio must be > 0, got {mlp_ratio}")
    layers = resolve_elliptical_layers(depth, elliptical_layers)
    if ffn in FFN_KINDS and ffn != "dense":
        resolve_moe_layers((ffn_kwargs or {}).get("moe_layers"), depth)
    if attention == "softmax":
        layers = ()
    hidden = int(dim * mlp_ratio)
    blocks = nn.ModuleList(
        Block(
            dim,
            num_heads,
            mlp_ratio=mlp_ratio,
            dropout=dropout,
            causal=causal,
            attention="elliptical" if i in layers else "softmax",
            estimator=estimator,
            mlp=build_ffn(ffn, dim, hidden, i, chain=chain, **(ffn_kwargs or {})),
        )
        for i in range(depth)
    )
    return blocks, layers


def forward_blocks(
    blocks: Sequence[nn.Module],
    x: Tensor,
    elliptical_layers: Sequence[int],
    key_padding_mask: Tensor | None = None,
) -> Tensor:
    """Run the blocks, threading values: block i gets the previous block's ``v`` iff i is elliptical.

    Args:
        blocks: modules with ``forward(x, key_padding_mask=, v_prev=) -> (x, v)``.
        x: ``[B, N, dim]``.
        elliptical_layers: the layers that receive ``v_prev`` (from :func:`build_blocks`).
        key_padding_mask: bool ``[B, N]``, **True = keep**, False = padding.

    Returns:
        ``[B, N, dim]``.
    """
    v_prev = None
    for i, block in enumerate(blocks):
        x, v = block(x, key_padding_mask=key_padding_mask, v_prev=v_prev if i in elliptical_layers else None)
        v_prev = v
    return x


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

    ``forward(idx [B, N] long, key_padding_mask=None (bool [B, N], True = keep; right padding)) ->
    logits [B, N, vocab_size]``. With ``tie_weights`` the head shares the token embedding matrix
    (``head.weight is tok_emb.weight``). MoE FFNs thread their routing state through ``self.chain``
    (reset at the start of every forward), across interleaved dense blocks too.
    """

    def __init__(self, cfg: TransformerLMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.chain = RoutingChain()
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos_emb = nn.Embedding(cfg.context, cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks, self.elliptical_layers = build_blocks(
            cfg.depth,
            cfg.dim,
            cfg.num_heads,
            mlp_ratio=cfg.mlp_ratio,
            dropout=cfg.dropout,
            causal=True,
            attention=cfg.attention,
            estimator=cfg.estimator,
            elliptical_layers=cfg.elliptical_layers,
            ffn=cfg.ffn,
            ffn_kwargs=cfg.ffn_kwargs,
            chain=self.chain,
        )
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        nn.init.normal_(self.tok_emb.weight, mean=0.0, std=0.02)
        nn.init.normal_(self.pos_emb.weight, mean=0.0, std=0.02)
        init_block_weights(self.blocks, cfg.depth)
        if cfg.tie_weights:
            self.head.weight = self.tok_emb.weight
        else:
            nn.init.normal_(self.head.weight, mean=0.0, std=0.02)

    def attention_modules(self) -> list[nn.Module]:
        """The attention module of each block, in layer order."""
        return [block.attn for block in self.blocks]

    def forward(self, idx: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        if not isinstance(idx, Tensor) or idx.dtype != torch.long:
            got = idx.dtype if isinstance(idx, Tensor) else type(idx).__name__
            raise TypeError(f"idx must be a torch.long tensor of token ids [B, N], got {got}")
        if idx.dim() != 2 or idx.shape[0] == 0 or idx.shape[1] == 0:
            raise ValueError(f"idx must be a non-empty [B, N] tensor, got shape {list(idx.shape)}")
        n = idx.shape[1]
        if n > self.cfg.context:
            raise ValueError(f"sequence length {n} exceeds the model's context {self.cfg.context}")
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= self.cfg.vocab_size:
            raise ValueError(f"token ids must lie in 0..{self.cfg.vocab_size - 1}, got min {lo}, max {hi}")
        self.chain.reset()
        pos = torch.arange(n, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        x = forward_blocks(self.blocks, x, self.elliptical_layers, key_padding_mask)
        return self.head(self.norm(x))
