"""Worker of the expert-parallel tests (``test_moe_parallel.py``): one torchrun process of a gloo group.

Every rank builds the same MoE (same seed), computes the single-process reference on the whole batch, then
shards a copy with ``expert_parallel`` and runs its own slice of the batch. It writes, per case, the largest
differences of the outputs, the input gradients, the expert-weight gradients (its shard, times the group
size: they are averaged for DDP) and the summed router gradients, or the error a bad case raised.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from clusterformers.moe import MoE, RoutingState, expert_parallel

D, E, K, H, T = 8, 4, 2, 6, 24
CASES = {
    "smoe": {"router": "smoe"},
    "xmoe": {"router": "xmoe"},
    "random": {"router": "random"},
    "stablemoe_gated": {"router": "stablemoe", "gated": True},
    "ac": {"router": "ac"},
    "ac_aux": {"router": "ac", "aux_coef": 0.1, "z_coef": 0.01},
    "capacity_slot_ac": {"router": "ac", "capacity_factor": 0.75, "aux_coef": 0.1},
    "capacity_weight_smoe": {"router": "smoe", "capacity_factor": 0.75, "priority": "weight"},
    "capacity_masked": {"router": "stablemoe", "capacity_factor": 0.6, "masked": True},
}


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def run_case(name: str, options: dict, rank: int, world: int) -> dict:
    options = dict(options)
    masked = options.pop("masked", False)
    torch.manual_seed(0)
    ref = MoE(D, E, K, H, **options).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T * world, D, generator=g, dtype=torch.float64)
    coef = torch.randn(T * world, D, generator=g, dtype=torch.float64)
    c = torch.randint(0, E, (T * world,), generator=g)
    prev = RoutingState(torch.stack([c, (c + 1) % E], 1), torch.full((T * world, 2), 0.5, dtype=torch.float64),
                        T * world, E)
    mask = (torch.arange(T * world) % 5 != 2) if masked else None
    ep = expert_parallel(copy.deepcopy(ref))
    lo, hi = rank * T, (rank + 1) * T

    x_ref = x.clone().requires_grad_(True)
    y_ref, aux_ref = ref(x_ref, prev=prev, key_padding_mask=mask, return_aux=True)
    ((y_ref * coef).sum() + aux_ref).backward()

    x_ep = x[lo:hi].clone().requires_grad_(True)
    prev_ep = RoutingState(prev.indices[lo:hi], prev.weights[lo:hi], T, E)
    y_ep, aux_ep = ep(x_ep, prev=prev_ep, key_padding_mask=None if mask is None else mask[lo:hi], return_aux=True)
    ((y_ep * coef[lo:hi]).sum() + aux_ep / world).backward()  # summed over the ranks: the reference loss

    El = E // world
    router = {n: p.grad.clone() for n, p in ep.router.named_parameters() if p.requires_grad}
    for grad in router.values():
        dist.all_reduce(grad)
    return {
        "y": _diff(y_ep, y_ref[lo:hi]),
        "aux": _diff(aux_ep, aux_ref),
        "x_grad": _diff(x_ep.grad, x_ref.grad[lo:hi]),
        "w_in": _diff(world * ep.experts.w_in.grad, ref.experts.w_in.grad[rank * El : (rank + 1) * El]),
        "w_out": _diff(world * ep.experts.w_out.grad, ref.experts.w_out.grad[rank * El : (rank + 1) * El]),
        "router": max([_diff(router[n], p.grad) for n, p in ref.router.named_parameters() if p.requires_grad]
                      or [0.0]),
        "dropped": _dropped(ref, mask),
    }


def _dropped(layer: MoE, mask: torch.Tensor | None) -> int:
    """Assignments of kept tokens that overflowed their expert in the layer's last (single-process) forward."""
    if layer.capacity_factor is None:
        return 0
    state = layer.last_state
    dest, capacity = layer._queue(state.weights.detach(), state.indices, mask)
    sink = dest == layer.num_experts * capacity
    return int((sink if mask is None else sink & mask).sum())


def bad_cases(rank: int, world: int) -> dict:
    out = {}
    try:
        expert_parallel(MoE(D, 3, K, H))
    except ValueError as err:
        out["indivisible"] = str(err)
    layer = expert_parallel(MoE(D if rank == 0 else 2 * D, E, K, H))
    try:
        layer(torch.randn(T, layer.dim))
    except ValueError as err:
        out["mismatch"] = str(err)
    return out


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")  # torchrun's environment
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        result = {name: run_case(name, options, rank, world) for name, options in CASES.items()}
        result["bad"] = bad_cases(rank, world)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
