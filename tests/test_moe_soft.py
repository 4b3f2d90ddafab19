"""SoftMoE and its AC variant against a slow loop over batches, slots and tokens."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clusterformers.moe import ACConfig, RoutingState, SoftMoE, adaptive_metric
from clusterformers.state import share_state

D, E, P, H = 6, 3, 2, 5


def slow_soft(moe, x, prev=None, mask=None):
    """Algorithm 1 of Puigcerver et al. with L2-normalised tokens and phi, as loops."""
    B, n, d = x.shape
    xh = x / x.norm(dim=-1, keepdim=True)
    if prev is not None:
        cfg = moe.ac
        m = adaptive_metric(
            xh.reshape(-1, d),
            prev.indices[:, 0],
            E,
            eps=cfg.eps,
            tau=cfg.tau,
            norm=cfg.norm,
            global_ref=cfg.global_ref,
            key_padding_mask=None if mask is None else mask.reshape(-1),
        )
        kk = cfg.mix or 1
        rows = []
        for i in range(B * n):
            pi = prev.weights[i, :kk] / prev.weights[i, :kk].sum()
            rows.append(sum(pi[j] * m[prev.indices[i, j]] for j in range(kk)))
        xh = xh * torch.stack(rows).view(B, n, d)
    phi = moe.scale * moe.phi / moe.phi.norm(dim=0, keepdim=True)
    y = torch.zeros_like(x)
    for b in range(B):
        logits = xh[b] @ phi  # [n, E*P]
        keep = torch.ones(n, dtype=torch.bool) if mask is None else mask[b]
        dispatch = torch.softmax(logits.masked_fill(~keep[:, None], -1e300), dim=0)
        combine = torch.softmax(logits, dim=1)
        outs = []
        for s in range(E * P):
            slot = sum(dispatch[i, s] * xh[b, i] for i in range(n))
            e = s // P
            a = slot @ moe.experts.w_in[e]
            outs.append(F.gelu(a) @ moe.experts.w_out[e])
        for i in range(n):
            y[b, i] = sum(combine[i, s] * outs[s] for s in range(E * P))
    return y


def test_soft_moe_equals_slow_loop_with_gradients():
    torch.manual_seed(0)
    moe = SoftMoE(D, E, P, H).double()
    x = torch.randn(2, 5, D, dtype=torch.float64, requires_grad=True)
    y = moe(x)
    y_slow = slow_soft(moe, x)
    torch.testing.assert_close(y, y_slow)
    gx, *gp = torch.autograd.grad(y.sin().sum(), [x, *moe.parameters()])
    gx_slow, *gp_slow = torch.autograd.grad(y_slow.sin().sum(), [x, *moe.parameters()])
    torch.testing.assert_close(gx, gx_slow)
    for a, b in zip(gp, gp_slow, strict=True):
        torch.testing.assert_close(a, b)
        assert a.abs().sum() > 0
    assert float(moe.aux_loss) == 0.0 and moe.last_router_logits.shape == (10, E * P)


def test_state_is_topk_slots_mapped_to_experts():
    torch.manual_seed(1)
    moe = SoftMoE(D, E, P, H, state_k=4).double()
    x = torch.randn(2, 5, D, dtype=torch.float64)
    moe(x)
    logits = moe.last_router_logits
    top = logits.topk(4, dim=1)
    state = moe.last_state
    assert torch.equal(state.indices, top.indices // P)
    torch.testing.assert_close(state.weights, torch.softmax(top.values, 1))
    assert (state.num_tokens, state.num_experts) == (10, E)
    assert SoftMoE(D, E, P, H).state_k == E * P  # default 8, clamped to E * P


@pytest.mark.parametrize("mix", [None, 1, 3])
def test_ac_soft_moe_equals_slow_loop(mix):
    torch.manual_seed(2)
    first = SoftMoE(D, E, P, H, state_k=4).double()
    second = SoftMoE(D, E, P, H, ac=ACConfig.preset("softmoe", mix=mix, eps=0.05)).double()
    model = nn.Sequential(first, second)
    share_state(model)
    x = torch.randn(2, 6, D, dtype=torch.float64)
    y = model(x)
    assert second.last_stats is not None
    torch.testing.assert_close(y, slow_soft(second, first(x), prev=first.last_state))
    # the metric changes the output
    assert not torch.allclose(y, slow_soft(second, first(x)))


def test_key_padding_mask_keeps_padding_out_of_slots_and_statistics():
    torch.manual_seed(3)
    first = SoftMoE(D, E, P, H, state_k=3).double()
    moe = SoftMoE(D, E, P, H, ac=ACConfig.preset("softmoe", mix=3)).double()
    x = torch.randn(2, 5, D, dtype=torch.float64)
    mask = torch.tensor([[True, True, True, False, False], [True] * 5])
    first(x)
    prev = first.last_state
    y = moe(x, prev, key_padding_mask=mask)
    torch.testing.assert_close(y, slow_soft(moe, x, prev, mask))
    x2 = x.clone()
    x2[0, 3:] = torch.randn(2, D, dtype=torch.float64)
    y2 = moe(x2, prev, key_padding_mask=mask)
    torch.testing.assert_close(y2[mask], y[mask])


def test_bad_inputs():
    moe = SoftMoE(D, E, P, H, ac="softmoe")
    with pytest.raises(ValueError, match="x: expected"):
        moe(torch.randn(5, D))
    with pytest.raises(ValueError, match="x: expected"):
        moe(torch.randn(2, 0, D))
    with pytest.raises(ValueError, match="key_padding_mask"):
        moe(torch.randn(2, 4, D), key_padding_mask=torch.ones(2, 5, dtype=torch.bool))
    bad = torch.randn(2, 4, D)
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="x: expected finite"):
        moe(bad)
    idx = torch.zeros(8, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="prev: .*num_tokens=8"):
        moe(torch.randn(2, 3, D), prev=RoutingState(idx, torch.ones(8, 8) / 8, 8, E))
    with pytest.raises(ValueError, match="prev: mix=8"):
        moe(torch.randn(2, 4, D), prev=RoutingState(idx[:, :2], torch.ones(8, 2) / 2, 8, E))
    with pytest.raises(ValueError, match="state_k"):
        SoftMoE(D, E, P, H, state_k=0)
