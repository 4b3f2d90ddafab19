"""No data-dependent host reads in the forward and backward of the attention and MoE layers once the value
checks are off (what ``check_inputs=None`` does on an accelerator); with them on, the same paths do read (the
negative control). The dropless per-expert loop (float64, odd widths) needs its split sizes on the host: the
one documented exception, held here too so that it cannot spread unnoticed. The contrastive losses have the
same test in ``test_contrastive_compile.py``."""

from __future__ import annotations

import pytest
import torch
from host_reads import HostReads  # tests/host_reads.py: the tests folder is on sys.path

from clusterformers import EllipticalAttention, MultiheadAttention
from clusterformers.moe import MoE, SoftMoE

D, E, K, H, T = 16, 8, 2, 32, 40



def _moe(check: bool, **kwargs):
    first = MoE(D, E, K, H, check_inputs=check)
    layer = MoE(D, E, K, H, check_inputs=check, **kwargs)

    def run(x):
        with torch.no_grad():
            first(x)
        return layer(x, prev=first.last_state if layer.metric is not None else None)

    return run


def _soft(check: bool):
    first, layer = SoftMoE(D, E, 2, H, check_inputs=check), SoftMoE(D, E, 2, H, ac="lm", check_inputs=check)

    def run(x):
        with torch.no_grad():
            first(x.view(2, T // 2, D))
        return layer(x.view(2, T // 2, D), prev=first.last_state)

    return run


def _attention(check: bool, causal: bool, estimator: str | None):
    if estimator is None:
        layer = MultiheadAttention(D, 4, causal=causal, check_inputs=check)
        return lambda x: layer(x.view(2, T // 2, D))
    layer = EllipticalAttention(D, 4, causal=causal, estimator=estimator, check_inputs=check)
    v_prev = torch.randn(2, 4, T // 2, D // 4)
    mask = torch.arange(T // 2) < T // 2 - 3
    return lambda x: layer(x.view(2, T // 2, D), key_padding_mask=mask.expand(2, -1), v_prev=v_prev)


CASES = {
    "moe_dropless_stablemoe": lambda check: _moe(check),
    "moe_dropless_ac": lambda check: _moe(check, router="ac"),
    "moe_dropless_ac_gated": lambda check: _moe(check, router="ac", gated=True),
    "moe_capacity_ac": lambda check: _moe(check, router="ac", capacity_factor=1.0),
    "moe_capacity_weight_priority": lambda check: _moe(check, router="smoe", capacity_factor=1.0, priority="weight"),
    "soft_moe_ac": _soft,
    "attention": lambda check: _attention(check, False, None),
    "attention_causal": lambda check: _attention(check, True, None),
    "elliptical": lambda check: _attention(check, False, "mean"),
    "elliptical_causal": lambda check: _attention(check, True, "mean"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_no_host_reads_without_value_checks(name):
    torch.manual_seed(0)
    for check in (False, True):
        run = CASES[name](check)
        x = torch.randn(T, D, requires_grad=True)
        with HostReads() as reads:
            run(x).square().sum().backward()
        assert (reads.count > 0) == check, (check, reads.count)
        assert x.grad.abs().sum() > 0


def test_the_dropless_expert_loop_reads_its_split_sizes():
    torch.manual_seed(0)
    layer = MoE(D, E, K, H, check_inputs=False).double()
    x = torch.randn(T, D, dtype=torch.float64)
    assert not layer.experts.fused_grouped(x)
    with HostReads() as reads:
        layer(x)
    assert reads.count == 1
