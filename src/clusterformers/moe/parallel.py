"""Expert parallelism on ``torch.distributed``: each rank of a process group holds ``E / world`` experts.

:func:`expert_parallel` shards the experts of an :class:`~clusterformers.moe.MoE` (or of every MoE in a
model) over a process group. The router stays replicated; tokens travel to the rank that holds their expert
and back with ``all_to_all`` (:mod:`clusterformers.collectives`, so autograd flows through both ways):

- dropless: each rank sends its assignments, sorted by expert, to the experts' owners (split sizes from one
  host sync, the one the single-process loop also needs), the owner runs its experts, the outputs return;
- capacity: every rank queues the routing of the whole group (an all-gather of the ``[T, k]`` routing), so
  capacities and drops are those of the concatenated batch; each rank fills its assignments into the
  ``[E, C, d]`` buffer, an ``all_to_all`` hands each owner its experts' rows from every rank (summed: the
  positions are disjoint), and a second one returns the outputs.

AC statistics and the auxiliary losses are reduced over the group, so the layer's outputs equal those of the
single-process layer on the batch concatenated over the ranks in rank order. The experts are cut from the
group's first rank's weights (broadcast), so the ranks need not share a seed.

Checkpoints (:func:`clusterformers.train.train`, :func:`clusterformers.checkpoint.save_checkpoint`) hold
one gathered file with all E experts, the layout of the unsharded model: every rank takes part in the
gather, rank 0 writes, and loading slices each rank's experts out again, so a checkpoint moves between
expert-parallel and single-process runs. Gradients: a rank's inputs get
the gradient of its own loss; an expert's weight gradient sums the losses of every rank and is then divided
by the group size, so that with DDP averaging the other parameters' gradients (DDP must skip the expert
weights, see :func:`expert_parameter_names`) a step equals single-process training on the global batch with
the mean loss.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch import Tensor, nn

from clusterformers.collectives import all_reduce_sum, all_to_all

from .layer import Experts, MoE

__all__ = ["ShardedExperts", "expert_parallel", "expert_parameter_names"]


def _world(group: object | None) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("expert_parallel needs an initialised torch.distributed process group "
                           "(torch.distributed.init_process_group, e.g. under torchrun)")
    return dist.get_rank(group), dist.get_world_size(group)


class ShardedExperts(Experts):
    """The slice ``[rank · E_local, (rank + 1) · E_local)`` of an :class:`Experts` stack, with the exchange
    that lets an :class:`MoE` use it as if it held all ``E`` experts.

    ``w_in[E_local, d, h]``, ``w_out[E_local, h, d]`` are this rank's experts; ``num_experts`` stays the
    global E (the router's). ``grouped`` and ``padded`` take and return the rows of all E experts, as
    :class:`Experts` does; ``gather_routing`` lets the capacity queue see the whole group's routing.
    """

    def __init__(self, experts: Experts, group: object | None = None) -> None:
        rank, world = _world(group)
        E = experts.num_experts
        if E % world:
            raise ValueError(f"expert_parallel: num_experts={E} is not divisible by the group size {world}; "
                             "choose E as a multiple of the number of ranks")
        nn.Module.__init__(self)
        self.num_experts, self.dim, self.hidden, self.gated = E, experts.dim, experts.hidden, experts.gated
        self.group, self.rank, self.world = group, rank, world
        self.local_experts = E // world
        lo, hi = rank * self.local_experts, (rank + 1) * self.local_experts
        full = [experts.w_in.detach().clone(), experts.w_out.detach().clone()]
        src = 0 if group is None else dist.get_global_rank(group, 0)
        for t in full:  # every rank cuts its slice from the group's first rank's experts
            dist.broadcast(t, src=src, group=group)
        self.w_in = nn.Parameter(full[0][lo:hi].clone())
        self.w_out = nn.Parameter(full[1][lo:hi].clone())
        for p in (self.w_in, self.w_out):
            p.register_hook(self._average)

    def _average(self, grad: Tensor) -> Tensor:
        return grad / self.world

    def gather_param(self, t: Tensor) -> Tensor:
        """A tensor shaped like this rank's ``w_in`` or ``w_out`` (a weight, or its optimizer state) ->
        the group's ``[E, ...]`` concatenation in rank order. Every rank of the group must call it."""
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t.detach().contiguous(), group=self.group)
        return torch.cat(parts)

    def shard_param(self, t: Tensor) -> Tensor:
        """The inverse of :meth:`gather_param`: this rank's slice of an ``[E, ...]`` tensor."""
        if t.shape[0] != self.num_experts:
            raise ValueError(f"expected a tensor of all {self.num_experts} experts, got shape {tuple(t.shape)}")
        return t[self.rank * self.local_experts : (self.rank + 1) * self.local_experts]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, local_experts={self.local_experts}, world={self.world}"  # rank-free

    def reset_parameters(self) -> None:
        """Initialised from the experts it was cut from (see :class:`Experts` for fresh ones)."""

    def _local(self) -> Experts:
        """This rank's experts as a plain stack sharing the parameters (runs the grouped/padded kernels)."""
        local = Experts.__new__(Experts)
        nn.Module.__init__(local)
        local.num_experts, local.dim, local.hidden, local.gated = self.local_experts, self.dim, self.hidden, self.gated
        local.w_in, local.w_out = self.w_in, self.w_out
        return local

    def fused_grouped(self, x: Tensor) -> bool:
        """Never: the exchange needs the split sizes on the host."""
        return False

    def grouped(self, x: Tensor, counts: Tensor, sizes: list[int] | None = None) -> Tensor:
        """``x[N, d]`` sorted by (global) expert with ``counts[E]`` rows each -> ``[N, d]``: the rows go to
        their experts' ranks and back (one host sync for the split sizes)."""
        W, El = self.world, self.local_experts
        self._check_shapes(x.shape[1], device=x.device)
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts.contiguous(), group=self.group)  # [W * El]: source-major
        send = counts.view(W, El).sum(1)
        host = torch.cat([send, recv_counts.view(W, El).sum(1), recv_counts]).tolist()
        send_sizes, recv_sizes, per_expert = host[:W], host[W : 2 * W], host[2 * W :]
        received = all_to_all(x, recv_sizes, send_sizes, self.group)
        expert = torch.arange(El, device=x.device).repeat(W)
        expert = torch.repeat_interleave(expert, recv_counts, output_size=received.shape[0])
        order = torch.sort(expert, stable=True).indices  # (local expert, source rank, row)
        local_counts = recv_counts.view(W, El).sum(0)
        local_sizes = [sum(per_expert[s * El + e] for s in range(W)) for e in range(El)]
        out_sorted = self._local().grouped(received.index_select(0, order), local_counts, local_sizes)
        out = torch.empty_like(out_sorted).index_copy(0, order, out_sorted)
        return all_to_all(out, send_sizes, recv_sizes, self.group)

    def padded(self, x: Tensor) -> Tensor:
        """``x[E, C, d]`` (this rank's rows at their group-wide queue positions, zeros elsewhere) -> the
        outputs ``[E, C, d]`` of every expert's full buffer, on every rank."""
        W, El = self.world, self.local_experts
        C, d = x.shape[1], x.shape[2]
        self._check_shapes(C, d, device=x.device)
        mine = all_to_all(x.reshape(W * El * C, d), group=self.group)
        y = self._local().padded(mine.view(W, El, C, d).sum(0))  # [El, C, d]
        out = all_to_all(y.reshape(1, El * C, d).expand(W, -1, -1).reshape(-1, d), group=self.group)
        return out.view(W * El, C, d)

    def gather_routing(self, weights: Tensor, indices: Tensor, mask: Tensor | None
                       ) -> tuple[Tensor, Tensor, Tensor | None, int]:
        """The group's routing concatenated in rank order, and this rank's offset in it (no gradient)."""
        T = indices.shape[0]
        sizes = [torch.zeros(1, dtype=torch.long, device=indices.device) for _ in range(self.world)]
        dist.all_gather(sizes, torch.tensor([T], device=indices.device), group=self.group)
        sizes = [int(n) for n in sizes]
        if len(set(sizes)) > 1:
            raise ValueError(f"expert_parallel capacity mode needs the same number of tokens on every rank, got "
                             f"{sizes} (by rank); pad the batches to one shape")

        def gather(t: Tensor) -> Tensor:
            parts = [torch.empty_like(t) for _ in range(self.world)]
            dist.all_gather(parts, t.contiguous(), group=self.group)
            return torch.cat(parts)

        keep = gather(mask.reshape(-1).to(torch.uint8)).bool() if mask is not None else None
        return gather(weights.detach()), gather(indices), keep, self.rank * T

    def group_aux(self, layer: MoE, logits: Tensor, mask: Tensor | None) -> Tensor:
        """The layer's auxiliary losses over the group's concatenated batch (see :func:`group_aux`)."""
        return group_aux(layer, logits, mask)

    def _check_shapes(self, *extra: int, device: torch.device) -> None:
        """All-gather ``(d, E, *extra)`` and raise ``ValueError`` on every rank where the ranks disagree."""
        mine = torch.tensor([self.dim, self.num_experts, *extra], device=device)
        parts = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(parts, mine, group=self.group)
        if any(not torch.equal(p, mine) for p in parts):
            raise ValueError(f"expert_parallel: the ranks' layers disagree on (dim, num_experts, ...): "
                             f"{[p.tolist() for p in parts]} by rank; every rank must run the same layer")

    def expert(self, e: int, x: Tensor) -> Tensor:
        lo = self.rank * self.local_experts
        if not lo <= e < lo + self.local_experts:
            raise IndexError(f"expert {e} lives on another rank: rank {self.rank} holds experts {lo} to "
                             f"{lo + self.local_experts - 1}")
        return self._act(x @ self.w_in[e - lo]) @ self.w_out[e - lo]


def group_aux(layer: MoE, logits: Tensor, mask: Tensor | None) -> Tensor:
    """The load-balancing and z losses of the group's concatenated batch (autograd through the sums)."""
    group = layer.experts.group
    aux = logits.new_zeros(())
    s = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    keep = torch.ones(s.shape[0], dtype=s.dtype, device=s.device) if mask is None else mask.reshape(-1).to(s.dtype)
    if layer.aux_coef:
        probs = torch.softmax(s, dim=1)
        top = torch.topk(probs, layer.top_k, dim=1).indices
        counts = torch.zeros(layer.num_experts + 1, dtype=s.dtype, device=s.device)
        counts[: layer.num_experts].index_add_(0, top.reshape(-1), keep.repeat_interleave(layer.top_k))
        counts[-1] = keep.sum()
        dist.all_reduce(counts, group=group)
        n = counts[-1].clamp_min(1)
        p = all_reduce_sum((probs * keep.unsqueeze(1)).sum(0), group=group) / n
        aux = aux + layer.aux_coef * layer.num_experts * (counts[:-1] / n * p).sum()
    if layer.z_coef:
        z = torch.where(keep > 0, torch.logsumexp(s, dim=1).square(), 0.0).sum()
        total = all_reduce_sum(torch.stack([z, keep.sum()]), group=group)
        aux = aux + layer.z_coef * total[0] / total[1].clamp_min(1)
    return aux


def expert_parallel(module: nn.Module, group: object | None = None) -> nn.Module:
    """Shard the experts of ``module`` (an :class:`MoE`, or a model: every :class:`MoE` in it) over the ranks
    of ``group`` (default: the world). Every rank calls it on the same model, built with the same seed: each
    keeps its slice of the stacked expert weights. AC statistics are synchronised over the group.

    Returns ``module``, changed in place. Raises ``ValueError`` (on every rank) when E is not divisible by
    the group size, ``TypeError`` for a SoftMoE (its slots mix every token; not supported), and
    ``RuntimeError`` without an initialised process group. Ranks whose layers disagree (width, E, capacity)
    get a ``ValueError`` on every rank from the shape check that precedes each exchange; a rank that stops
    calling the layer leaves the others waiting until the process group's ``timeout``
    (``init_process_group(timeout=...)``).
    """
    from .soft import SoftMoE

    layers = [module] if isinstance(module, MoE) else [m for m in module.modules() if isinstance(m, MoE)]
    if isinstance(module, SoftMoE) or any(isinstance(m, SoftMoE) for m in module.modules()):
        raise TypeError("expert_parallel: SoftMoE layers are not supported (every slot mixes all tokens)")
    if not layers:
        raise ValueError(f"expert_parallel: {type(module).__name__} holds no MoE layer")
    _world(group)
    for layer in layers:
        if isinstance(layer.experts, ShardedExperts):
            if layer.experts.group is not group:
                raise ValueError("expert_parallel: a layer is already sharded over another group; use one "
                                 "group for every layer of a model")
            continue
        layer.experts = ShardedExperts(layer.experts, group)
        metric = layer.router.metric
        if metric is not None:
            metric.config = dataclasses.replace(metric.config, sync_stats=True)
            metric.sync_group = group
    return module


def expert_parameter_names(model: nn.Module) -> list[str]:
    """The names of the sharded expert weights in ``model``: pass them to DDP as parameters to ignore
    (``DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)``), since each rank
    holds different experts."""
    return [f"{name}.{p}" for name, m in model.named_modules() if isinstance(m, ShardedExperts)
            for p in ("w_in", "w_out")]
