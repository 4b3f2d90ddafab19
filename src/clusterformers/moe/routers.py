"""Top-k routers on one code path: SMoE, X-MoE, StableMoE, random, and the Adaptive Clustering router.

Every router flattens its input to ``[T, d]``, optionally rescales it with the AC metric of the
previous MoE layer's clusters, scores the E experts in (at least) float32, selects a *sorted* top-k
(ties go to the lower expert index) and gates. The routers differ only in the score; the AC router is
any of them with ``ac`` set, so ablations change one thing.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clusterformers.checks import check_inputs_default

from .adaptive import ACConfig, ACStats, AdaptiveMetric, resolve_ac

__all__ = [
    "ACRouter",
    "GATES",
    "ROUTERS",
    "RandomRouter",
    "Router",
    "RouterOutput",
    "RoutingState",
    "SCORES",
    "StableMoERouter",
    "TopKRouter",
    "XMoERouter",
    "build_router",
    "check_finite",
    "check_state",
    "flatten_tokens",
]

SCORES = ("normed_dot", "linear", "linear_nobias", "cosine")
GATES = ("softmax_selected", "softmax_all")


class RoutingState(NamedTuple):
    """What an MoE layer hands to the next one.

    ``indices[T, k']`` (long, sorted by score, column 0 = top-1 expert), ``weights[T, k']`` (gate
    weights, detached), ``num_tokens`` = T and ``num_experts`` = E of the layer that made it.
    """

    indices: Tensor
    weights: Tensor
    num_tokens: int
    num_experts: int


class RouterOutput(NamedTuple):
    """HuggingFace order: ``logits[T, E]`` (float32 or wider), ``weights[T, k]``, ``indices[T, k]``
    (sorted, column 0 = argmax, ties to the lower index), then the ``state`` for the next layer."""

    logits: Tensor
    weights: Tensor
    indices: Tensor
    state: RoutingState


def flatten_tokens(
    x: Tensor, dim: int, key_padding_mask: Tensor | None, name: str = "h"
) -> tuple[Tensor, Tensor | None]:
    """``x[..., dim]`` -> ``[T, dim]`` and ``key_padding_mask[...]`` (True = keep) -> ``[T]``; checks shapes."""
    if x.dim() < 1 or x.shape[-1] != dim:
        raise ValueError(f"{name}: expected shape [..., {dim}], got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {x.dtype}")
    x2 = x.reshape(-1, dim)
    if x2.shape[0] == 0:
        raise ValueError(f"{name}: expected at least one token, got shape {tuple(x.shape)}")
    if key_padding_mask is None:
        return x2, None
    if not isinstance(key_padding_mask, Tensor) or key_padding_mask.dtype != torch.bool:
        got = key_padding_mask.dtype if isinstance(key_padding_mask, Tensor) else type(key_padding_mask).__name__
        raise TypeError(
            f"key_padding_mask: expected a bool tensor (True = keep), got {got}; convert an additive float "
            "mask with `mask == 0`, a 0/1 mask with `mask > 0`"
        )
    if key_padding_mask.shape != x.shape[:-1]:
        raise ValueError(
            f"key_padding_mask: expected shape {tuple(x.shape[:-1])} (True = keep), got {tuple(key_padding_mask.shape)}"
        )
    return x2, key_padding_mask.reshape(-1)


def check_finite(x: Tensor, name: str = "h", check_inputs: bool | None = True) -> None:
    """Raise ValueError if ``x`` holds NaN or inf (one host sync); ``check_inputs=None`` checks CPU
    tensors only, ``False`` never."""
    if check_inputs_default(check_inputs, x) and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name}: expected finite values, got NaN or inf")


def check_state(prev: RoutingState, num_experts: int, num_tokens: int, mix: int | None = None) -> None:
    """Raise ValueError (naming ``prev``) unless ``prev`` comes from a layer with ``num_experts``
    experts and ``num_tokens`` tokens, and has at least ``mix`` experts per token."""
    if not isinstance(prev, RoutingState):
        raise TypeError(f"prev: expected a RoutingState or None, got {type(prev).__name__}")
    if prev.num_experts != num_experts:
        raise ValueError(
            f"prev: routing state from a layer with num_experts={prev.num_experts}, expected {num_experts}"
        )
    if prev.num_tokens != num_tokens or prev.indices.shape[0] != num_tokens:
        raise ValueError(
            f"prev: routing state for num_tokens={prev.num_tokens}, but the input has T={num_tokens} "
            "tokens (reset the routing state where the token count changes)"
        )
    if prev.indices.dim() != 2 or prev.weights.shape != prev.indices.shape:
        raise ValueError(
            f"prev: expected indices and weights of one shape [T, k'], got {tuple(prev.indices.shape)} "
            f"and {tuple(prev.weights.shape)}"
        )
    if mix is not None and mix > prev.indices.shape[1]:
        raise ValueError(f"prev: mix={mix} needs k' >= {mix} experts per token, got {prev.indices.shape[1]}")


def _fp32_context(device: torch.device) -> torch.autocast:
    return torch.autocast(device_type=device.type, enabled=False)


SORT_ABOVE_K = 4  # top_k_lower_index: k rounds of argmax up to this k, a full stable sort above


def top_k_lower_index(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` largest logits per row, descending, ties to the lower index: the first ``k`` columns of a
    stable descending sort, ``(values[T, k], indices[T, k])``.

    For small ``k`` it takes ``k`` rounds of ``argmax`` (which returns the first maximum) instead of sorting
    all E columns: at E = 128 the sort cost more than the rest of the router.
    """
    if k > SORT_ABOVE_K:
        top, indices = torch.sort(logits, dim=1, descending=True, stable=True)
        return top[:, :k], indices[:, :k]
    taken = torch.zeros_like(logits, dtype=torch.bool)
    picks = []
    for _ in range(k):
        pick = torch.where(taken, float("-inf"), logits).argmax(dim=1, keepdim=True)
        # a row whose remaining logits are all -inf: argmax may return a taken column; take the first free one
        first_free = (~taken).to(torch.uint8).argmax(dim=1, keepdim=True)
        pick = torch.where(taken.gather(1, pick), first_free, pick)
        taken = taken.scatter(1, pick, True)
        picks.append(pick)
    indices = torch.cat(picks, dim=1)
    return logits.gather(1, indices), indices


class Router(nn.Module):
    """A top-k router.

    Args:
        dim: token dimension d.
        num_experts: E.
        top_k: experts per token (``1 <= top_k <= E``).
        score: ``"normed_dot"`` (h . e_k/|e_k|, StableMoE / AC-LM), ``"linear"`` (W h + b, SMoE),
            ``"linear_nobias"`` (W h, Swin), ``"cosine"`` (cos(P h, e_k) / t, X-MoE).
        gate: ``"softmax_selected"`` (softmax over the k selected scores = Mixtral's renormalised
            top-k) or ``"softmax_all"`` (softmax over all E, not renormalised; tutel / Switch).
        noise: in training, Gaussian noise of std ``noise / E`` is added to the logits (tutel's
            ``gate_noise``); the returned logits include it.
        ac: None, an AC preset name or an ``ACConfig``: score on ``m(i) * h_i``, with m from the
            previous layer's clusters (``prev``). Without ``prev`` (the first MoE layer) the plain
            score is used, with the same parameters.
        proj_dim: X-MoE projection size (``score="cosine"``).
        frozen: freeze the score parameters (the random router).
        check_inputs: raise on NaN/inf input (a host sync); ``None`` checks CPU inputs only.

    ``forward(h[..., d], prev=None, key_padding_mask=None) -> RouterOutput`` with T = h[..., 0].numel().
    ``key_padding_mask`` (bool ``[...]``, True = keep) keeps padding out of the AC statistics. Routers without
    ``ac`` ignore ``prev``.
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int,
        score: str = "normed_dot",
        gate: str = "softmax_selected",
        noise: float = 0.0,
        ac: ACConfig | str | None = None,
        *,
        proj_dim: int = 8,
        frozen: bool = False,
        check_inputs: bool | None = None,
    ) -> None:
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts: expected >= 1, got {num_experts}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k: expected 1 <= top_k <= num_experts={num_experts}, got {top_k}")
        if score not in SCORES:
            raise ValueError(f"score: expected one of {SCORES}, got {score!r}")
        if gate not in GATES:
            raise ValueError(f"gate: expected one of {GATES}, got {gate!r}")
        if noise < 0:
            raise ValueError(f"noise: expected >= 0, got {noise}")
        self.dim, self.num_experts, self.top_k = dim, num_experts, top_k
        self.check_inputs = check_inputs
        self.score, self.gate, self.noise = score, gate, noise
        self.ac: ACConfig | None = resolve_ac(ac)
        self.metric = AdaptiveMetric(num_experts, dim, self.ac) if self.ac is not None else None

        if score in ("normed_dot", "cosine"):
            emb_dim = dim if score == "normed_dot" else proj_dim
            self.embeddings = nn.Parameter(nn.init.orthogonal_(torch.empty(num_experts, emb_dim), gain=0.32))
        if score == "cosine":
            self.proj = nn.Linear(dim, proj_dim, bias=False)
            self.temperature = nn.Parameter(torch.tensor(0.5))
        if score in ("linear", "linear_nobias"):
            self.linear = nn.Linear(dim, num_experts, bias=score == "linear")
        if frozen:
            self.requires_grad_(False)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_experts={self.num_experts}, top_k={self.top_k}, score={self.score!r}, "
            f"gate={self.gate!r}, noise={self.noise}, ac={self.ac}"
        )

    def check_state(self, prev: RoutingState, num_tokens: int) -> None:
        """Raise ValueError unless ``prev`` comes from a layer with this E and ``num_tokens`` tokens."""
        check_state(prev, self.num_experts, num_tokens, self.ac.mix if self.ac is not None else None)

    def token_metric(
        self, h: Tensor, prev: RoutingState | None, key_padding_mask: Tensor | None = None
    ) -> tuple[Tensor | None, ACStats | None]:
        """The AC multiplier of each token: ``h[T,d]`` -> ``(m_tok[T,d] | None, ACStats | None)``.

        None when the router has no ``ac`` or ``prev`` is None (plain score)."""
        if self.metric is None or prev is None:
            return None, None
        self.check_state(prev, h.shape[0])
        return self.metric(h, prev.indices, prev.weights, key_padding_mask)

    def logits(self, u: Tensor) -> Tensor:
        """Scores ``[T, E]`` of ``u[T, d]`` in at least float32, also under autocast."""
        dtype = torch.promote_types(u.dtype, torch.float32)
        u = u.to(dtype)
        with _fp32_context(u.device):
            if self.score == "normed_dot":
                return u @ F.normalize(self.embeddings.to(dtype), dim=1, eps=1e-4).t()
            if self.score == "cosine":
                p = F.normalize(F.linear(u, self.proj.weight.to(dtype)), dim=1, eps=1e-4)
                e = F.normalize(self.embeddings.to(dtype), dim=1, eps=1e-4)
                return (p @ e.t()) / self.temperature.to(dtype).clamp_min(0.01)
            bias = None if self.linear.bias is None else self.linear.bias.to(dtype)
            return F.linear(u, self.linear.weight.to(dtype), bias)

    def select(self, u: Tensor, m_tok: Tensor | None = None) -> RouterOutput:
        """Score, select and gate ``m_tok * u`` (``u[T, d]``, ``m_tok[T, d]`` or None)."""
        if m_tok is not None:
            u = u.to(m_tok.dtype) * m_tok
        logits = self.logits(u)
        if self.training and self.noise > 0:
            logits = logits + torch.randn_like(logits) * (self.noise / self.num_experts)
        top, indices = top_k_lower_index(logits, self.top_k)
        if self.gate == "softmax_selected":
            weights = torch.softmax(top, dim=1)
        else:
            weights = torch.softmax(logits, dim=1).gather(1, indices)
        state = RoutingState(indices, weights.detach(), logits.shape[0], self.num_experts)
        return RouterOutput(logits, weights, indices, state)

    def forward(
        self, h: Tensor, prev: RoutingState | None = None, key_padding_mask: Tensor | None = None
    ) -> RouterOutput:
        """Route ``h[..., d]``; ``prev`` is the previous MoE layer's state; ``key_padding_mask`` bool ``[...]``
        with True = keep. Raises ValueError on a bad shape, an empty or non-finite input, or a
        ``prev`` from a layer with another E or T."""
        h2, mask = flatten_tokens(h, self.dim, key_padding_mask)
        check_finite(h2, "h", self.check_inputs)
        m_tok, _ = self.token_metric(h2, prev, mask)
        return self.select(h2, m_tok)


class TopKRouter(Router):
    """SMoE: a linear gate with bias, ``W h + b`` (the reference LM baseline)."""

    def __init__(
        self, dim: int, num_experts: int, top_k: int, *, noise: float = 0.0, ac: ACConfig | str | None = None
    ):
        super().__init__(dim, num_experts, top_k, "linear", "softmax_selected", noise, ac)


class XMoERouter(Router):
    """X-MoE: ``cos(P h, e_k) / t`` with P: d -> ``proj_dim`` bias-free and a learnable t (init 0.5,
    floor 0.01)."""

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int,
        *,
        noise: float = 0.0,
        ac: ACConfig | str | None = None,
        proj_dim: int = 8,
    ):
        super().__init__(dim, num_experts, top_k, "cosine", "softmax_selected", noise, ac, proj_dim=proj_dim)


class StableMoERouter(Router):
    """StableMoE: ``h . e_k / |e_k|``; the ``lm`` AC router with M = I (no distill/freeze stage)."""

    def __init__(
        self, dim: int, num_experts: int, top_k: int, *, noise: float = 0.0, ac: ACConfig | str | None = None
    ):
        super().__init__(dim, num_experts, top_k, "normed_dot", "softmax_selected", noise, ac)


class RandomRouter(Router):
    """SMoE-dropout style: a frozen, randomly initialised linear gate ``W h + b``."""

    def __init__(
        self, dim: int, num_experts: int, top_k: int, *, noise: float = 0.0, ac: ACConfig | str | None = None
    ):
        super().__init__(dim, num_experts, top_k, "linear", "softmax_selected", noise, ac, frozen=True)


_PRESET_SCORE_GATE = {
    "lm": ("normed_dot", "softmax_selected"),
    "swin": ("linear_nobias", "softmax_all"),
    "softmoe": ("normed_dot", "softmax_selected"),
}


class ACRouter(Router):
    """The Adaptive Clustering router. With a preset name, score and gate follow the preset
    (``lm``: normed_dot / softmax_selected; ``swin``: bias-free linear / softmax_all); with an
    ``ACConfig``, ``normed_dot`` / ``softmax_selected`` unless given."""

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int,
        ac: ACConfig | str = "lm",
        *,
        score: str | None = None,
        gate: str | None = None,
        noise: float = 0.0,
    ):
        if ac is None:
            raise ValueError("ac: ACRouter needs a preset name or an ACConfig, got None")
        preset = ac if isinstance(ac, str) else "lm"
        default_score, default_gate = _PRESET_SCORE_GATE.get(preset, _PRESET_SCORE_GATE["lm"])
        super().__init__(dim, num_experts, top_k, score or default_score, gate or default_gate, noise, ac)


ROUTERS: dict[str, type[Router]] = {
    "smoe": TopKRouter,
    "xmoe": XMoERouter,
    "stablemoe": StableMoERouter,
    "random": RandomRouter,
    "ac": ACRouter,
}


def build_router(
    name: str, dim: int, num_experts: int, top_k: int, ac: ACConfig | str | None = None, noise: float = 0.0
) -> Router:
    """A router by name (``ROUTERS``); ``"ac"`` with ``ac=None`` uses the ``lm`` preset."""
    if name not in ROUTERS:
        raise ValueError(f"router: expected one of {tuple(ROUTERS)} or a Router, got {name!r}")
    if name == "ac":
        return ACRouter(dim, num_experts, top_k, ac if ac is not None else "lm", noise=noise)
    return ROUTERS[name](dim, num_experts, top_k, noise=noise, ac=ac)
