"""Soft MoE (Puigcerver et al., 2024) and its Adaptive Clustering variant."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clusterformers.checks import check_inputs_default

from .adaptive import ACConfig, AdaptiveMetric, resolve_ac
from .layer import Experts, KeepsLastForward, LastForward, RoutingLayer
from .routers import RoutingState, check_finite, check_state, flatten_tokens

__all__ = ["SoftMoE"]


class SoftMoE(RoutingLayer, KeepsLastForward, nn.Module):
    """Soft MoE: every slot is a convex combination of the tokens of one sequence; every token a
    convex combination of the slots' outputs. No dropping, no aux loss.

    Args:
        dim: token dimension d.
        num_experts: E.
        slots_per_expert: p.
        hidden: expert hidden size.
        ac: None, an AC preset name (``"softmoe"``) or an ``ACConfig``: the L2-normalised tokens are
            rescaled by m(i) (statistics over all B*m tokens) before logits and slots.
        gated: SwiGLU experts.
        state_k: k' of the routing state handed on: the top-k' of the E*p logits per token, expert =
            slot // p, weights = softmax of those k' logits (clamped to E*p).
        check_inputs: raise on NaN/inf input (a host sync); ``None`` checks CPU inputs only.

    ``forward(x[B, m, d], prev=None, key_padding_mask=None, return_aux=False)``: ``key_padding_mask`` bool
    ``[B, m]`` with True = keep; masked tokens feed no slot and no statistic. Keeps ``.aux_loss`` (0),
    ``.last_router_logits[B*m, E*p]``, ``.last_state`` and ``.last_stats`` like ``MoE``, and threads
    routing state through the model's shared state like ``MoE``.
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        slots_per_expert: int,
        hidden: int,
        ac: ACConfig | str | None = None,
        *,
        gated: bool = False,
        state_k: int = 8,
        check_inputs: bool | None = None,
    ) -> None:
        super().__init__()
        if num_experts < 1 or slots_per_expert < 1:
            raise ValueError(f"num_experts, slots_per_expert: expected >= 1, got {num_experts}, {slots_per_expert}")
        if state_k < 1:
            raise ValueError(f"state_k: expected >= 1, got {state_k}")
        self.dim, self.num_experts, self.slots_per_expert, self.hidden = dim, num_experts, slots_per_expert, hidden
        self.state_k = min(state_k, num_experts * slots_per_expert)
        self.phi = nn.Parameter(torch.randn(dim, num_experts * slots_per_expert) / math.sqrt(dim))
        self.scale = nn.Parameter(torch.ones(()))
        self.experts = Experts(num_experts, dim, hidden, gated)
        self.ac: ACConfig | None = resolve_ac(ac)
        self.metric = AdaptiveMetric(num_experts, dim, self.ac) if self.ac is not None else None
        self.check_inputs = check_inputs
        self.last_forward = LastForward()

    def extra_repr(self) -> str:
        return f"state_k={self.state_k}, ac={self.ac}, state_position={self.state_position}"

    def forward(
        self,
        x: Tensor,
        prev: RoutingState | None = None,
        key_padding_mask: Tensor | None = None,
        return_aux: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        if x.dim() != 3 or x.shape[-1] != self.dim or x.shape[0] * x.shape[1] == 0:
            raise ValueError(f"x: expected a non-empty [B, m, {self.dim}] tensor, got shape {tuple(x.shape)}")
        _, mask = flatten_tokens(x, self.dim, key_padding_mask, name="x")
        check_finite(x, "x", self.check_inputs)
        check = check_inputs_default(self.check_inputs, x)
        if mask is not None and check and not bool(key_padding_mask.any(dim=1).all()):
            empty = (~key_padding_mask.any(dim=1)).nonzero().flatten().tolist()
            raise ValueError(
                f"key_padding_mask keeps no token in sample(s) {empty}: their slots would be filled with padding; "
                "drop those samples"
            )
        B, n, d = x.shape
        E, p = self.num_experts, self.slots_per_expert
        prev = self.previous_state(prev)
        # in at least float32: in float16 the default eps underflows and zero tokens would become NaN; a token
        # with entries above 1 is first divided by its largest magnitude, so tokens near 1e20 (whose squares
        # overflow) stay unit vectors
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        xf = xf / xf.detach().abs().amax(dim=-1, keepdim=True).clamp_min(1.0)
        xh = F.normalize(xf, dim=-1).to(x.dtype)
        stats = None
        if self.metric is not None and prev is not None:
            check_state(prev, E, B * n, self.ac.mix)
            m_tok, stats = self.metric(xh.reshape(B * n, d), prev.indices, prev.weights, mask)
            xh = xh * m_tok.view(B, n, d).to(xh.dtype)
        dtype = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(device_type=x.device.type, enabled=False):
            phi = self.scale.to(dtype) * F.normalize(self.phi.to(dtype), dim=0)
            logits = xh.to(dtype) @ phi  # [B, n, E*p]
        d_logits = logits
        if key_padding_mask is not None:
            d_logits = logits.masked_fill(~key_padding_mask.unsqueeze(-1), torch.finfo(dtype).min)
        dispatch = torch.softmax(d_logits, dim=1)
        combine = torch.softmax(logits, dim=2)
        slots = torch.einsum("bnd,bns->bsd", xh, dispatch.to(xh.dtype))  # [B, E*p, d]
        slots = slots.reshape(B, E, p, d).transpose(0, 1).reshape(E, B * p, d)
        ys = self.experts.padded(slots).reshape(E, B, p, d).transpose(0, 1).reshape(B, E * p, d)
        y = torch.einsum("bsd,bns->bnd", ys, combine.to(ys.dtype))

        flat = logits.reshape(B * n, E * p)
        top, slot = torch.sort(flat.detach(), dim=1, descending=True, stable=True)
        top, slot = top[:, : self.state_k], slot[:, : self.state_k]
        state = RoutingState(slot // p, torch.softmax(top, dim=1), B * n, E)
        record = self.last_forward
        record.aux_loss, record.router_logits, record.state, record.stats = logits.new_zeros(()), flat, state, stats
        self.write_state(state)
        return (y, record.aux_loss) if return_aux else y
