"""Differentiable collectives over ``torch.distributed`` (the ``torch.distributed.nn.functional`` ones are
deprecated): each is an autograd Function around the plain collective, whose backward is the collective's
transpose. Imports only torch."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, out_sizes: list[int] | None, in_sizes: list[int] | None, group: object | None
                ) -> Tensor:
        ctx.sizes, ctx.group = (out_sizes, in_sizes), group
        rows = sum(out_sizes) if out_sizes is not None else x.shape[0]
        out = x.new_empty(rows, *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), out_sizes, in_sizes, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:
        out_sizes, in_sizes = ctx.sizes
        return _AllToAll.apply(grad.contiguous(), in_sizes, out_sizes, ctx.group), None, None, None


class _AllReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group: object | None) -> Tensor:
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return _AllReduce.apply(grad.contiguous(), ctx.group), None


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group: object | None) -> Tensor:
        ctx.group, ctx.rank, ctx.rows = group, dist.get_rank(group), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        total = grad.contiguous().clone()
        dist.all_reduce(total, group=ctx.group)  # every rank's loss reads every rank's rows
        return total[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows], None


def all_to_all(x: Tensor, out_sizes: list[int] | None = None, in_sizes: list[int] | None = None,
               group: object | None = None) -> Tensor:
    """The rows of ``x`` split by ``in_sizes`` (equal parts if None) go to the ranks in order; ``out_sizes``
    rows arrive from each. The gradient of each received row returns to the rank that sent it."""
    return _AllToAll.apply(x, out_sizes, in_sizes, group)


def all_reduce_sum(x: Tensor, group: object | None = None) -> Tensor:
    """``Σ_ranks x`` on every rank (a new tensor); the gradient is the sum of every rank's gradient."""
    return _AllReduce.apply(x, group)


def all_gather_cat(x: Tensor, group: object | None = None) -> Tensor:
    """Every rank's ``x`` (same shape on each) concatenated in rank order along dim 0; each rank's rows get
    the sum over ranks of the gradients flowing into them."""
    return _AllGather.apply(x, group)
