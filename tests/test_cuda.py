"""Checks that need a CUDA device (skipped without one; ``scripts/gpu_check.sh`` runs them with the
benchmarks): with the default ``check_inputs=None`` no forward or backward path synchronises the host
(``torch.cuda.set_sync_debug_mode("error")`` raises on any sync), except the dropless per-expert loop's split
sizes; the bfloat16 grouped-GEMM dispatch matches the float32 expert loop."""

from __future__ import annotations

import copy

import pytest
import torch

from clusterformers import EllipticalAttention, MultiheadAttention
from clusterformers.contrastive import FairInfoNCELoss, FARELoss, InfoNCELoss, SparseFARELoss
from clusterformers.moe import MoE, SoftMoE

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

D, E, K, H, B, N = 64, 8, 2, 128, 4, 32


def _moe_pair(dtype: torch.dtype, **kwargs):
    first = MoE(D, E, K, H).to("cuda", dtype)
    layer = MoE(D, E, K, H, router="ac", **kwargs).to("cuda", dtype)

    def run(x):
        with torch.no_grad():
            first(x)
        return layer(x, prev=first.last_state)

    return run


def _soft():
    first, layer = SoftMoE(D, E, 2, H).cuda(), SoftMoE(D, E, 2, H, ac="lm").cuda()

    def run(x):
        with torch.no_grad():
            first(x)
        return layer(x, prev=first.last_state)

    return run


def _elliptical(causal: bool):
    layer = EllipticalAttention(D, 4, causal=causal).cuda()
    v_prev = torch.randn(B, 4, N, D // 4, device="cuda")
    return lambda x: layer(x, v_prev=v_prev)


def _loss(loss, groups: bool = False):
    sens = torch.randint(0, 3, (B * N,), device="cuda") if groups else torch.rand(B * N, 3, device="cuda")
    z2 = torch.randn(B * N, D, device="cuda")
    return lambda x: loss.cuda()(x.reshape(B * N, D), z2, sens)


CASES = {
    "attention": lambda: (lambda layer: lambda x: layer(x))(MultiheadAttention(D, 4, causal=True).cuda()),
    "elliptical": lambda: _elliptical(False),
    "elliptical_causal": lambda: _elliptical(True),
    "moe_capacity": lambda: _moe_pair(torch.float32, capacity_factor=1.25),
    "moe_dropless_bf16_grouped": lambda: _moe_pair(torch.bfloat16),
    "soft_moe": _soft,
    "info_nce": lambda: _loss(InfoNCELoss()),
    "fare": lambda: _loss(FARELoss(3)),
    "sparse_fare_dense": lambda: _loss(SparseFARELoss(3, impl="dense")),
    "fair_info_nce_groups": lambda: _loss(FairInfoNCELoss(), groups=True),
}


@pytest.mark.parametrize("name", list(CASES))
def test_no_host_sync_by_default(name):
    torch.manual_seed(0)
    run = CASES[name]()
    dtype = torch.bfloat16 if "bf16" in name else torch.float32
    x = torch.randn(B, N, D, device="cuda", dtype=dtype, requires_grad=True)
    run(x)  # warm-up: lazy initialisation may sync once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run(x).float().square().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_the_dropless_expert_loop_syncs_once_for_its_split_sizes():
    layer = MoE(D, E, K, H).cuda()
    x = torch.randn(B * N, D, device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError, match="synchroniz"):
            layer(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_bf16_grouped_dispatch_matches_the_float32_expert_loop():
    torch.manual_seed(1)
    fused = MoE(D, E, K, H, router="stablemoe").cuda().bfloat16()
    loop = copy.deepcopy(fused).float()
    x = torch.randn(B * N, D, device="cuda")
    assert fused.experts.fused_grouped(x.bfloat16()) and not loop.experts.fused_grouped(x)
    torch.testing.assert_close(fused(x.bfloat16()).float(), loop(x), atol=5e-2, rtol=5e-2)
