"""The MoE layer: a router, stacked experts, dropless or capacity dispatch.

``MoE`` is a drop-in for a dense FFN: ``x[..., d] -> y[..., d]``. The routing state the next AC
layer needs flows through the model's shared :class:`~clusterformers.state.LayerState` (see
:func:`clusterformers.share_state`) or is passed by hand (``prev=``), so a model's blocks keep their
call signature.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clusterformers.fused import fused
from clusterformers.state import LayerState, StatefulLayer

from .adaptive import ACConfig, ACStats
from .losses import load_balancing_loss, router_z_loss
from .routers import Router, RoutingState, build_router, check_finite, flatten_tokens

__all__ = ["Experts", "KeepsLastForward", "LastForward", "MoE", "RoutingLayer", "expert_capacity"]


class LastForward:
    """What an MoE layer keeps from its last forward: ``aux_loss``, ``router_logits``, ``state``, ``stats``.

    Copies and pickles of a layer start with an empty record: ``aux_loss`` may carry an autograd graph,
    which ``copy.deepcopy`` refuses (so an EMA copy of a model would fail otherwise).
    """

    __slots__ = ("aux_loss", "router_logits", "state", "stats")

    def __init__(self) -> None:
        self.aux_loss: Tensor | None = None
        self.router_logits: Tensor | None = None
        self.state: RoutingState | None = None
        self.stats: ACStats | None = None

    def __deepcopy__(self, memo: dict) -> LastForward:
        return LastForward()

    def __reduce__(self) -> tuple:
        return (LastForward, ())


class RoutingLayer(StatefulLayer):
    """Mixin of the layers that route: a stateful layer of kind ``"routing"`` with an optional AC
    ``metric`` (an :class:`AdaptiveMetric`).

    Reads the routing state of the nearest earlier MoE layer from the shared state (or ``prev=``) and
    writes its own; when a model forward begins it folds its pending AC statistics (``begin_forward``).
    """

    state_kind = "routing"
    metric: nn.Module | None

    def attach_state(self, state: LayerState, position: int) -> None:
        super().attach_state(state, position)
        if self.metric is not None:
            self.metric.deferred_commit = True  # the model's forward pre-hook commits

    def begin_forward(self) -> None:
        if self.metric is not None:
            self.metric.commit()

    def previous_state(self, prev: RoutingState | None) -> RoutingState | None:
        """``prev`` if given, else the routing the shared state holds from an earlier MoE layer."""
        return prev if prev is not None else self.read_state()


class KeepsLastForward:
    """Mixin for layers with a ``LastForward`` record in ``self.last_forward``."""

    last_forward: LastForward

    @property
    def aux_loss(self) -> Tensor | None:
        """The auxiliary loss of the last forward (a zero scalar when its coefficients are 0)."""
        return self.last_forward.aux_loss

    @property
    def last_router_logits(self) -> Tensor | None:
        """``[T, E]`` router logits of the last forward (``[T, E*p]`` for SoftMoE)."""
        return self.last_forward.router_logits

    @property
    def last_state(self) -> RoutingState | None:
        """The ``RoutingState`` this layer handed on in its last forward."""
        return self.last_forward.state

    @property
    def last_stats(self) -> ACStats | None:
        """The ``ACStats`` of the last forward, or None when it routed without AC."""
        return self.last_forward.stats


def expert_capacity(capacity_factor: float, k: int, num_tokens: int, num_experts: int) -> int:
    """Slots per expert, ``C = ceil(cf * k * T / E)`` (at least 1)."""
    return max(1, math.ceil(capacity_factor * k * num_tokens / num_experts))


def sort_by_expert(indices: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """The ``T·k`` assignments of ``indices`` ``[T, k]`` grouped by expert with a stable sort (within an
    expert by slot, then token): ``order`` ``[T·k]`` (positions ``slot · T + token``), the ``token`` of each
    and ``counts`` ``[num_experts]``, the rows of each expert."""
    flat = indices.t().reshape(-1)
    order = torch.sort(flat, stable=True).indices
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
    return order, order % indices.shape[0], counts


def _swiglu(a: Tensor) -> Tensor:
    """``silu(gate) * up`` for ``a = [gate, up]`` ``[..., 2h]`` -> ``[..., h]``."""
    gate, up = a.chunk(2, dim=-1)
    return F.silu(gate) * up


# compiled: one pass forward and one backward, which writes the gradient of ``a`` whole (eager: four passes and
# a concatenation of the two halves' gradients)
_fused_swiglu = fused(_swiglu)


class Experts(nn.Module):
    """E two-layer MLPs as stacked weights, without biases (as Mixtral and megablocks).

    ``w_in[E, d, h]`` (``[E, d, 2h]`` if gated: gate then up) and ``w_out[E, h, d]``. Ungated experts
    use GELU, gated ones SwiGLU (``silu(x W_gate) * (x W_up)``).
    """

    def __init__(self, num_experts: int, dim: int, hidden: int, gated: bool = False) -> None:
        super().__init__()
        self.num_experts, self.dim, self.hidden, self.gated = num_experts, dim, hidden, gated
        width = 2 * hidden if gated else hidden
        self.w_in = nn.Parameter(torch.empty(num_experts, dim, width))
        self.w_out = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's default init, per expert."""
        nn.init.uniform_(self.w_in, -1 / math.sqrt(self.dim), 1 / math.sqrt(self.dim))
        nn.init.uniform_(self.w_out, -1 / math.sqrt(self.hidden), 1 / math.sqrt(self.hidden))

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, dim={self.dim}, hidden={self.hidden}, gated={self.gated}"

    def _act(self, a: Tensor) -> Tensor:
        if self.gated:
            return _fused_swiglu(a)
        return F.gelu(a)

    def fused_grouped(self, x: Tensor) -> bool:
        """Whether :meth:`grouped` runs as two ``torch.nn.functional.grouped_mm`` calls for ``x``: float32,
        bfloat16 or float16 on the CPU, bfloat16 on CUDA devices of compute capability 8.0 or newer, with rows
        of 16-byte multiples (``d`` and the hidden width divisible by 16 / element size). Otherwise it loops
        over the experts (float64, odd widths)."""
        if not hasattr(F, "grouped_mm") or x.dtype != self.w_in.dtype:
            return False
        if x.device.type == "cpu":
            ok = x.dtype in (torch.float32, torch.bfloat16, torch.float16)
        elif x.device.type == "cuda":
            ok = x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (8, 0)
        else:
            ok = False
        step = 16 // x.element_size()
        return ok and self.dim % step == 0 and self.hidden % step == 0

    def grouped(self, x: Tensor, counts: Tensor, sizes: list[int] | None = None) -> Tensor:
        """``x[N, d]`` sorted by expert with ``counts[e]`` (a ``[E]`` tensor) rows for expert e -> ``[N, d]``.

        The fused path (see :meth:`fused_grouped`) takes the offsets from ``counts`` on the device: no host
        sync, and its cost does not grow with E at a fixed number of rows beyond the weights it reads. The
        loop path needs the sizes on the host: ``sizes`` (``counts.tolist()``) or one sync to get them.
        """
        if self.fused_grouped(x):
            offs = counts.cumsum(0).to(torch.int32)
            return F.grouped_mm(self._act(F.grouped_mm(x, self.w_in, offs=offs)), self.w_out, offs=offs)
        sizes = counts.tolist() if sizes is None else sizes
        w_in, w_out = self.w_in.unbind(0), self.w_out.unbind(0)  # unbind: one stacked grad
        outs = [self._act(xe @ w_in[e]) @ w_out[e] for e, xe in enumerate(x.split(sizes)) if sizes[e] > 0]
        return torch.cat(outs) if outs else x.new_zeros(0, self.dim)

    def padded(self, x: Tensor) -> Tensor:
        """``x[E, C, d]`` -> ``[E, C, d]`` (one bmm per layer, no host sync)."""
        return torch.bmm(self._act(torch.bmm(x, self.w_in)), self.w_out)

    def expert(self, e: int, x: Tensor) -> Tensor:
        """Expert ``e`` on ``x[..., d]`` (for references and diagnostics)."""
        return self._act(x @ self.w_in[e]) @ self.w_out[e]


class MoE(RoutingLayer, KeepsLastForward, nn.Module):
    """A top-k mixture-of-experts FFN.

    Args:
        dim: token dimension d.
        num_experts: E.
        top_k: experts per token.
        hidden: expert hidden size.
        router: ``"smoe"``, ``"xmoe"``, ``"stablemoe"``, ``"random"``, ``"ac"`` or a ``Router``.
        ac: AC preset name or ``ACConfig`` for a named router (``"ac"`` defaults to ``"lm"``).
            With ``apply_to="moe_input"`` the experts also see ``m(i) * x_i``.
        gated: SwiGLU experts.
        capacity_factor: None for dropless dispatch (sync-free with the grouped GEMM, otherwise one host
            sync for the split sizes); else
            ``C = ceil(cf * k * T / E)`` slots per expert, overflow assignments contribute 0 (no
            renormalisation), experts run as one padded ``[E, C, d]`` bmm with no host sync.
        priority: capacity queue order: ``"slot"`` (first choices first, then token order;
            GShard/Switch) or ``"weight"`` (per slot, tokens by descending top-1 gate weight;
            tutel's batch-prioritised routing).
        aux_coef: coefficient of ``load_balancing_loss``; z_coef: of ``router_z_loss``.
        check_inputs: raise on NaN/inf input. ``None`` (default): on CPU always; on an accelerator only
            where dispatch syncs anyway (the dropless per-expert loop, whose split sizes carry the flag), so
            capacity mode and grouped-GEMM dropless mode there are sync-free; ``False``: never
            (``torch.compile``).

    ``forward(x[..., d], prev=None, key_padding_mask=None, return_aux=False)`` returns ``y`` of x's shape,
    or ``(y, aux_loss)``. ``key_padding_mask`` is bool ``[...]`` with True = keep: masked tokens are left out
    of the AC statistics and aux losses (and take no capacity), their outputs are still computed in
    dropless mode. After each forward the module keeps ``.aux_loss``, ``.last_router_logits[T, E]``,
    ``.last_state`` (``RoutingState``) and ``.last_stats`` (``ACStats`` or None).

    Inside a model prepared with ``share_state``, ``prev`` defaults to the routing of the nearest
    earlier MoE layer (across dense blocks); the first MoE layer routes with the plain score.
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int,
        hidden: int,
        router: str | Router = "stablemoe",
        ac: ACConfig | str | None = None,
        gated: bool = False,
        capacity_factor: float | None = None,
        priority: str = "slot",
        aux_coef: float = 0.0,
        z_coef: float = 0.0,
        check_inputs: bool | None = None,
    ) -> None:
        super().__init__()
        if isinstance(router, Router):
            if ac is not None:
                raise ValueError("ac: give ac to the Router itself when passing a Router instance")
            if (router.dim, router.num_experts, router.top_k) != (dim, num_experts, top_k):
                raise ValueError(
                    f"router: expected dim={dim}, num_experts={num_experts}, top_k={top_k}, got "
                    f"dim={router.dim}, num_experts={router.num_experts}, top_k={router.top_k}"
                )
        else:
            router = build_router(router, dim, num_experts, top_k, ac)
        if capacity_factor is not None and not capacity_factor > 0:
            raise ValueError(f"capacity_factor: expected None or > 0, got {capacity_factor}")
        if priority not in ("slot", "weight"):
            raise ValueError(f"priority: expected 'slot' or 'weight', got {priority!r}")
        self.dim, self.num_experts, self.top_k, self.hidden = dim, num_experts, top_k, hidden
        self.router = router
        self.experts = Experts(num_experts, dim, hidden, gated)
        self.capacity_factor, self.priority = capacity_factor, priority
        self.aux_coef, self.z_coef = aux_coef, z_coef
        self.check_inputs = check_inputs
        self.last_forward = LastForward()

    @property
    def metric(self) -> nn.Module | None:
        return self.router.metric

    def extra_repr(self) -> str:
        return (
            f"capacity_factor={self.capacity_factor}, priority={self.priority!r}, aux_coef={self.aux_coef}, "
            f"z_coef={self.z_coef}, state_position={self.state_position}"
        )

    def forward(
        self,
        x: Tensor,
        prev: RoutingState | None = None,
        key_padding_mask: Tensor | None = None,
        return_aux: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        x2, mask = flatten_tokens(x, self.dim, key_padding_mask, name="x")
        prev = self.previous_state(prev)
        m_tok, stats = self.router.token_metric(x2, prev, mask)
        u = x2
        if m_tok is not None and self.router.ac.apply_to == "moe_input":
            u = x2 * m_tok.to(x2.dtype)
            routed = self.router.select(u)
        else:
            routed = self.router.select(x2, m_tok)
        if self.capacity_factor is None:
            y = self._dropless(u, routed.weights, routed.indices, x2)
        else:
            check_finite(x2, "x", self.check_inputs)
            y = self._capacity(u, routed.weights, routed.indices, mask)
        aux = self._aux(routed.logits, mask)
        record = self.last_forward
        record.aux_loss, record.router_logits, record.state, record.stats = aux, routed.logits, routed.state, stats
        self.write_state(routed.state)
        y = y.reshape(x.shape)
        return (y, aux) if return_aux else y

    def _dropless(self, u: Tensor, weights: Tensor, indices: Tensor, x2: Tensor) -> Tensor:
        """Group the T*k assignments by (expert, slot, token) with a stable sort, run the experts on their
        segments (one grouped GEMM per expert matrix where the dtype allows, see ``Experts.fused_grouped``),
        combine with index_add_. The grouped GEMM needs no host sync; the per-expert loop needs one for the
        split sizes, which also carries the finiteness flag unless ``check_inputs`` is False."""
        T = indices.shape[0]
        order, token, counts = sort_by_expert(indices, self.num_experts)
        xs = u.index_select(0, token)
        if self.experts.fused_grouped(xs):
            check_finite(x2, "x", self.check_inputs)
            ys = self.experts.grouped(xs, counts)
        else:
            host = counts.tolist() if self.check_inputs is False else self._sizes_and_check(counts, x2)
            ys = self.experts.grouped(xs, counts, host)
        ys = ys * weights.t().reshape(-1).index_select(0, order).to(ys.dtype).unsqueeze(1)
        return ys.new_zeros(T, self.dim).index_add_(0, token, ys)

    def _sizes_and_check(self, counts: Tensor, x2: Tensor) -> list[int]:
        """The split sizes on the host, with the finiteness check of ``x2`` riding on the same sync."""
        bad = (~torch.isfinite(x2).all()).long().view(1)
        host = torch.cat([counts, bad]).tolist()
        if host[-1]:
            raise ValueError("x: expected finite values, got NaN or inf")
        return host[:-1]

    def _capacity(self, u: Tensor, weights: Tensor, indices: Tensor, mask: Tensor | None) -> Tensor:
        """Queue positions from a cumsum in priority order; overflow (and masked) assignments drop."""
        T, k = indices.shape
        E, d = self.num_experts, self.dim
        dest, C = self._queue(weights.detach(), indices, mask)  # [k, T]
        kept = dest < E * C
        buf = u.new_zeros(E * C + 1, d).index_add_(0, dest.reshape(-1), u.repeat(k, 1))
        ybuf = self.experts.padded(buf[: E * C].view(E, C, d)).reshape(E * C, d)
        ybuf = torch.cat([ybuf, ybuf.new_zeros(1, d)])
        w_seq = (weights.t() * kept).reshape(-1)
        ys = ybuf.index_select(0, dest.reshape(-1)) * w_seq.to(ybuf.dtype).unsqueeze(1)
        return ys.view(k, T, d).sum(0)

    def _queue(self, weights: Tensor, indices: Tensor, mask: Tensor | None) -> tuple[Tensor, int]:
        """``(dest[k, T], C)``: the buffer row ``e * C + position`` of each (slot, token) assignment, or the
        sink row ``E * C`` where it overflows (or the token is masked). Sharded experts queue the routing of
        the whole group, so capacities and drops are those of the concatenated batch."""
        gather = getattr(self.experts, "gather_routing", None)
        local, offset = indices.shape[0], 0
        if gather is not None:
            weights, indices, mask, offset = gather(weights, indices, mask)
        T, k = indices.shape
        E = self.num_experts
        C = expert_capacity(self.capacity_factor, k, T, E)
        if self.priority == "slot":
            tok = torch.arange(T, device=indices.device)
        else:
            tok = torch.sort(weights[:, 0], descending=True, stable=True).indices
        experts = indices.index_select(0, tok).t().reshape(-1)  # [k*T], slot-major in priority order
        # scatter rather than F.one_hot, which reads the indices' range on the host
        onehot = torch.zeros(experts.numel(), E, dtype=torch.int32, device=indices.device)
        onehot.scatter_(1, experts.unsqueeze(1), 1)
        if mask is not None:
            onehot = onehot * mask.index_select(0, tok.repeat(k)).to(torch.int32).unsqueeze(1)
        pos = (onehot.cumsum(0) * onehot).sum(1) - 1  # -1 for masked assignments
        dest = torch.where((pos >= 0) & (pos < C), experts * C + pos, E * C).view(k, T)
        natural = torch.empty_like(dest).index_copy_(1, tok, dest)  # back to token order
        if gather is not None:
            natural = natural[:, offset : offset + local]
        return natural, C

    def _aux(self, logits: Tensor, mask: Tensor | None) -> Tensor:
        group_aux = getattr(self.experts, "group_aux", None)  # sharded experts: over the group's batch
        if group_aux is not None:
            return group_aux(self, logits, mask)
        aux = logits.new_zeros(())
        if self.aux_coef:
            aux = aux + self.aux_coef * load_balancing_loss(logits, self.num_experts, self.top_k, mask,
                                                             check_inputs=False)
        if self.z_coef:
            aux = aux + self.z_coef * router_z_loss(logits, mask, check_inputs=False)
        return aux
