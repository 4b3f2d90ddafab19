"""Elliptical Attention against slow references (identity = SDPA, a dense float64 layer, causality, padding,
gradients, ranges, errors, estimator ranking).

The references below use explicit loops, a dense ``diag_embed`` metric and an unfused softmax, in float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import clusterformers.attention as attention_mod
from clusterformers.attention import (
    ESTIMATORS,
    EllipticalAttention,
    MultiheadAttention,
    elliptical_metric,
    padding_mask_from_lengths,
    set_metric_grad,
)

DIM, HEADS, N = 8, 2, 7  # head_dim D = 4
EPS = 1e-6


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# ----------------------------------------------------------------------------------------------------------
# slow references
# ----------------------------------------------------------------------------------------------------------


def ref_metric(
    v: Tensor,
    v_prev: Tensor,
    keep: Tensor | None = None,
    *,
    causal: bool = False,
    estimator: str = "mean",
    delta: float = 1.0,
    eps: float = EPS,
) -> Tensor:
    """Loops over (b, h[, t]): ``|Δv|/δ``, mean or lower median over kept tokens ≤ t, max-normalised."""
    v, v_prev = v.double(), v_prev.double()
    batch, heads, n, dim = v.shape
    a = (v - v_prev).abs() / delta
    keep = torch.ones(batch, n, dtype=torch.bool) if keep is None else keep
    rows = n if causal else 1
    m = torch.empty(batch, heads, rows, dim, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            for t in range(rows):
                last = t if causal else n - 1
                idx = [i for i in range(last + 1) if keep[b, i]]
                vals = a[b, h, idx]  # [K, D]
                if estimator == "mean":
                    s = vals.sum(0) / max(1, len(idx))
                else:
                    s = vals.sort(0).values[(len(idx) - 1) // 2]
                z = s.max()
                row = s / z if z > eps else torch.ones(dim, dtype=torch.float64)
                m[b, h, t] = row.clamp_min(eps)
    return m


def ref_attention(
    q: Tensor, k: Tensor, v: Tensor, m: Tensor, keep: Tensor | None, causal: bool, scale: float | None = None
) -> Tensor:
    """Dense ``(q diag(m)) kᵀ · scale``, mask, explicit softmax, ``@ v``; ``m``: ``[B,H,1|N,D]``."""
    batch, _, n, dim = q.shape
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    big_m = torch.diag_embed(m)  # [B, H, 1|N, D, D]
    if m.shape[2] == 1:
        qm = q @ big_m[:, :, 0]
    else:
        qm = (q.unsqueeze(-2) @ big_m).squeeze(-2)  # per-query metric
    scores = qm @ k.transpose(-1, -2) * scale
    allowed = torch.ones(batch, 1, n, n, dtype=torch.bool)
    if keep is not None:
        allowed = allowed & keep[:, None, None, :]
    if causal:
        allowed = allowed & torch.ones(n, n, dtype=torch.bool).tril()
    scores = scores.masked_fill(~allowed, float("-inf"))
    e = (scores - scores.amax(-1, keepdim=True)).exp()
    return (e / e.sum(-1, keepdim=True)) @ v


def ref_layer(
    layer: nn.Module,
    x: Tensor,
    keep: Tensor | None = None,
    v_prev: Tensor | None = None,
    *,
    leaky: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """A layer from its weights, in float64. ``leaky``: segment mean even if causal (the reference's bug).

    Returns ``(out [B,N,C], v [B,H,N,D], m)``.
    """
    x = x.double()
    batch, n, c = x.shape
    heads = layer.num_heads
    d = c // heads
    w, b = layer.qkv.weight.double(), layer.qkv.bias.double()
    qkv = x @ w.T + b
    q, k, v = (qkv[..., i * c : (i + 1) * c].reshape(batch, n, heads, d).transpose(1, 2) for i in range(3))
    estimator = getattr(layer, "estimator", None)
    if v_prev is None or estimator is None or estimator == "identity":
        m = torch.ones(batch, heads, 1, d, dtype=torch.float64)
    else:
        m = ref_metric(v, v_prev, keep, causal=layer.causal and not leaky, estimator=estimator)
    o = ref_attention(q, k, v, m, keep, layer.causal, layer.scale)
    out = o.transpose(1, 2).reshape(batch, n, c) @ layer.proj.weight.double().T + layer.proj.bias.double()
    return out, v, m


def thread(layer_fn: Callable, layers: list[nn.Module], x: Tensor, keep: Tensor | None = None) -> Tensor:
    """Values threaded by hand, residual stream ``x + out``; layer 0 always gets ``v_prev=None``."""
    v_prev = None
    for i, layer in enumerate(layers):
        out, v = layer_fn(layer, x, keep, v_prev if i > 0 else None)[:2]
        x = x + out
        v_prev = v
    return x


def run_module(
    layer: nn.Module, x: Tensor, keep: Tensor | None, v_prev: Tensor | None
) -> tuple[Tensor, Tensor]:
    return layer(x, key_padding_mask=keep, v_prev=v_prev, return_values=True)


def make_stack(kind: str, depth: int = 3, dtype: torch.dtype = torch.float32, **kwargs) -> nn.ModuleList:
    cls = MultiheadAttention if kind == "softmax" else EllipticalAttention
    return nn.ModuleList(cls(DIM, HEADS, **kwargs) for _ in range(depth)).to(dtype).eval()


def keep_mask(kind: str, n: int = N) -> Tensor | None:
    """Three samples: non-causal left / right / interior padding, or causal right padding."""
    if kind == "none":
        return None
    if kind == "right":
        return padding_mask_from_lengths(torch.tensor([n, n - 2, 3]), n)
    keep = torch.ones(3, n, dtype=torch.bool)
    keep[0, :3] = False  # left
    keep[1, -2:] = False  # right
    keep[2, [1, 4]] = False  # interior
    return keep


def heads_of(x: Tensor) -> Tensor:
    """Random ``[B, H, N, D]`` of x's batch and length."""
    return torch.randn(x.shape[0], HEADS, x.shape[1], DIM // HEADS, dtype=x.dtype)


# ----------------------------------------------------------------------------------------------------------
# 1. identity ≡ SDPA; layer 0 is plain
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_identity_equals_sdpa(causal: bool, padded: bool) -> None:
    layer = EllipticalAttention(DIM, HEADS, causal=causal, estimator="identity").eval()
    x = torch.randn(3, N, DIM)
    keep = keep_mask("right" if causal else "mixed") if padded else None
    out, v = layer(x, key_padding_mask=keep, v_prev=heads_of(x), return_values=True)
    q, k, v_ref = layer.qkv(x).view(3, N, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)
    mask = None
    if keep is not None:
        mask = keep[:, None, None, :]
        if causal:
            mask = mask & torch.ones(N, N, dtype=torch.bool).tril()
    o = F.scaled_dot_product_attention(q, k, v_ref, attn_mask=mask, is_causal=causal and mask is None)
    expected = layer.proj(o.transpose(1, 2).reshape(3, N, DIM))
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(v, v_ref, atol=0, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_identity_stack_loads_softmax_state_dict(causal: bool) -> None:
    softmax = make_stack("softmax", causal=causal)
    elliptical = make_stack("elliptical", causal=causal, estimator="identity")
    elliptical.load_state_dict(softmax.state_dict())
    x = torch.randn(3, N, DIM)
    keep = keep_mask("right" if causal else "mixed")
    for kpm in (None, keep):
        expected = thread(run_module, list(softmax), x, kpm)
        torch.testing.assert_close(thread(run_module, list(elliptical), x, kpm), expected, atol=1e-6, rtol=0)
    # the same weights with the mean estimator do differ: the comparison above is not vacuous
    mean = make_stack("elliptical", causal=causal, estimator="mean")
    mean.load_state_dict(softmax.state_dict())
    assert (thread(run_module, list(mean), x) - thread(run_module, list(softmax), x)).abs().max() > 1e-3


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("causal", [False, True])
def test_layer0_is_plain_for_every_estimator(estimator: str, causal: bool) -> None:
    plain = MultiheadAttention(DIM, HEADS, causal=causal).eval()
    layer = EllipticalAttention(DIM, HEADS, causal=causal, estimator=estimator, store_metric=True).eval()
    layer.load_state_dict(plain.state_dict())
    x = torch.randn(3, N, DIM)
    out, v = layer(x, return_values=True)
    out_ref, v_ref = plain(x, v_prev=heads_of(x), return_values=True)  # MultiheadAttention ignores v_prev
    assert torch.equal(out, out_ref) and torch.equal(v, v_ref)
    assert layer.last_metric is None
    assert set(plain.state_dict()) == {"qkv.weight", "qkv.bias", "proj.weight", "proj.bias"}


# ----------------------------------------------------------------------------------------------------------
# 2. slow reference oracle (dense diag_embed metric, unfused softmax)
# ----------------------------------------------------------------------------------------------------------

ORACLE_CASES = [
    (causal, padded, est)
    for causal in (False, True)
    for padded in (False, True)
    for est in ("mean", "median")
    if not (causal and est == "median")
]


@pytest.mark.parametrize(("causal", "padded", "estimator"), ORACLE_CASES)
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_fused_matches_dense_reference(
    causal: bool, padded: bool, estimator: str, dtype: torch.dtype, tol: float
) -> None:
    layer = EllipticalAttention(DIM, HEADS, causal=causal, estimator=estimator, store_metric=True)
    layer = layer.to(dtype).eval()
    x = torch.randn(3, N, DIM, dtype=dtype)
    v_prev = heads_of(x)
    keep = keep_mask("right" if causal else "mixed") if padded else None
    out, v = layer(x, key_padding_mask=keep, v_prev=v_prev, return_values=True)
    out_ref, v_ref, m_ref = ref_layer(layer, x, keep, v_prev)
    torch.testing.assert_close(out.double(), out_ref, atol=tol, rtol=0)
    torch.testing.assert_close(v.double(), v_ref, atol=tol, rtol=0)
    m = layer.last_metric
    assert m.dtype == dtype and m.shape == (3, HEADS, N if causal else 1, DIM // HEADS)
    torch.testing.assert_close(m.double(), m_ref, atol=tol, rtol=0)
    # δ cancels: the reference with δ = 5 gives the same metric as δ = 1 and as the fused estimator
    m_delta5 = ref_metric(v.double(), v_prev.double(), keep, causal=causal, estimator=estimator, delta=5.0)
    m_delta1 = ref_metric(v.double(), v_prev.double(), keep, causal=causal, estimator=estimator, delta=1.0)
    torch.testing.assert_close(m_delta5, m_delta1, atol=0, rtol=1e-7)
    fused = elliptical_metric(v.detach(), v_prev, causal=causal, key_padding_mask=keep, estimator=estimator)
    torch.testing.assert_close(fused.double(), m_delta5, atol=0, rtol=max(1e-7, tol))


def test_dense_reference_without_standard_scale() -> None:
    layer = EllipticalAttention(DIM, HEADS, scale=1.0).double().eval()
    x = torch.randn(2, N, DIM, dtype=torch.float64)
    v_prev = heads_of(x)
    out = layer(x, v_prev=v_prev)
    torch.testing.assert_close(out, ref_layer(layer, x, None, v_prev)[0], atol=1e-10, rtol=0)


def test_stack_matches_reference_stack() -> None:
    for causal, kind in ((False, "mixed"), (True, "right")):
        stack = make_stack("elliptical", dtype=torch.float64, causal=causal)
        x = torch.randn(3, N, DIM, dtype=torch.float64)
        keep = keep_mask(kind)
        expected = thread(ref_layer, list(stack), x, keep)
        torch.testing.assert_close(thread(run_module, list(stack), x, keep), expected, atol=1e-10, rtol=0)


# ----------------------------------------------------------------------------------------------------------
# 3. causality (prefix mean) and the leaky whole-segment mean as a negative control
# ----------------------------------------------------------------------------------------------------------


def causality_violation(
    stack_fn: Callable[[Tensor], tuple[Tensor, list[Tensor]]], x: Tensor, t: int
) -> float:
    """Max change of outputs and metrics at positions ≤ t when the inputs after t are replaced."""
    x2 = x.clone()
    x2[:, t + 1 :] = torch.randn_like(x2[:, t + 1 :]) * 3
    out1, ms1 = stack_fn(x)
    out2, ms2 = stack_fn(x2)
    diff = (out1[:, : t + 1] - out2[:, : t + 1]).abs().max().item()
    for m1, m2 in zip(ms1, ms2, strict=True):
        rows = slice(0, t + 1) if m1.shape[2] > 1 else slice(None)
        diff = max(diff, (m1[:, :, rows] - m2[:, :, rows]).abs().max().item())
    return diff


def test_causal_stack_is_causal_and_segment_mean_is_not() -> None:
    stack = make_stack("elliptical", causal=True, store_metric=True)
    x = torch.randn(2, 10, DIM)

    def ours(inp: Tensor) -> tuple[Tensor, list[Tensor]]:
        out = thread(run_module, list(stack), inp)
        return out, [stack[1].last_metric.clone(), stack[2].last_metric.clone()]

    def leaky(inp: Tensor) -> tuple[Tensor, list[Tensor]]:
        metrics: list[Tensor] = []

        def layer_fn(layer: nn.Module, h: Tensor, keep: Tensor | None, v_prev: Tensor | None) -> tuple:
            out, v, m = ref_layer(layer, h, keep, v_prev, leaky=True)
            if v_prev is not None:
                metrics.append(m)
            return out, v

        return thread(layer_fn, list(stack), inp), metrics

    for t in (0, 3, 6, 8):
        assert causality_violation(ours, x, t) <= 1e-6
    assert max(causality_violation(leaky, x, t) for t in (0, 3, 6, 8)) > 1e-3
    # the causal metric is per query; the leaky one is one row per head
    assert stack[1].last_metric.shape == (2, HEADS, 10, DIM // HEADS)


# ----------------------------------------------------------------------------------------------------------
# 4. padding invariance through three layers
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("causal", "kind", "estimator"),
    [
        (False, "mixed", "mean"),
        (False, "mixed", "median"),
        (False, "mixed", "isotropic"),
        (True, "right", "mean"),
    ],
)
def test_padding_invariance(causal: bool, kind: str, estimator: str) -> None:
    stack = make_stack("elliptical", causal=causal, estimator=estimator)
    keep = keep_mask(kind, n=8)
    x = torch.randn(3, 8, DIM)
    base = thread(run_module, list(stack), x, keep)
    pad = ~keep[..., None]
    for fill in (torch.randn_like(x) * 5, torch.full_like(x, 1e4), torch.full_like(x, -1e4)):
        out = thread(run_module, list(stack), torch.where(pad, fill, x), keep)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out[keep], base[keep], atol=1e-6, rtol=0)
    for b in range(3):
        alone = thread(run_module, list(stack), x[b, keep[b]][None])
        torch.testing.assert_close(base[b, keep[b]], alone[0], atol=1e-5, rtol=0)


def test_metric_ignores_nan_and_inf_at_pads() -> None:
    v, v_prev = torch.randn(2, 2, 6, 3, dtype=torch.float64), torch.randn(2, 2, 6, 3, dtype=torch.float64)
    keep = padding_mask_from_lengths(torch.tensor([6, 4]), 6)
    for causal in (False, True):
        expected = elliptical_metric(v, v_prev, causal=causal, key_padding_mask=keep)
        bad = v.clone()
        bad[1, :, 4] = float("nan")
        bad[1, :, 5] = float("inf")
        got = elliptical_metric(bad, v_prev, causal=causal, key_padding_mask=keep)
        rows = slice(None) if not causal else slice(0, 4)
        torch.testing.assert_close(got[:, :, rows], expected[:, :, rows], atol=0, rtol=0)


# ----------------------------------------------------------------------------------------------------------
# 5. gradient through the metric
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
def test_metric_grad_switch(causal: bool) -> None:
    layer = EllipticalAttention(DIM, HEADS, causal=causal, store_metric=True).double()
    x = torch.randn(2, N, DIM, dtype=torch.float64, requires_grad=True)
    v_prev_data = heads_of(x.detach())
    outs = {}
    for flag in (False, True):
        set_metric_grad(layer, flag)
        assert layer.metric_grad is flag
        v_prev = v_prev_data.clone().requires_grad_(True)
        out = layer(x, v_prev=v_prev)
        out.pow(2).sum().backward()
        outs[flag] = out.detach()
        if flag:
            assert v_prev.grad is not None and v_prev.grad.abs().max() > 1e-8
        else:
            assert v_prev.grad is None or not v_prev.grad.any()
    assert torch.equal(outs[False], outs[True])
    v, vp = torch.randn(2, 2, 5, 3, requires_grad=True), torch.randn(2, 2, 5, 3, requires_grad=True)
    assert not elliptical_metric(v, vp).requires_grad
    assert elliptical_metric(v, vp, detach=False).requires_grad


@pytest.mark.parametrize(
    ("causal", "estimator", "padded"),
    [(False, "mean", False), (False, "mean", True), (True, "mean", True), (False, "median", True)],
)
def test_metric_gradcheck(causal: bool, estimator: str, padded: bool) -> None:
    v = torch.randn(2, 2, 5, 3, dtype=torch.float64, requires_grad=True)
    v_prev = torch.randn(2, 2, 5, 3, dtype=torch.float64, requires_grad=True)
    keep = padding_mask_from_lengths(torch.tensor([5, 3]), 5) if padded else None

    def fn(a: Tensor, b: Tensor) -> Tensor:
        return elliptical_metric(
            a, b, causal=causal, key_padding_mask=keep, estimator=estimator, detach=False
        )

    assert torch.autograd.gradcheck(fn, (v, v_prev))


# ----------------------------------------------------------------------------------------------------------
# 6. range and normalisation
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("estimator", "causal"), [("mean", False), ("mean", True), ("median", False), ("random", False)]
)
def test_metric_range(estimator: str, causal: bool) -> None:
    v, v_prev = torch.randn(3, 2, 6, 5), torch.randn(3, 2, 6, 5)
    keep = keep_mask("right" if causal else "mixed", n=6)
    m = elliptical_metric(v, v_prev, causal=causal, key_padding_mask=keep, estimator=estimator)
    assert m.shape == (3, 2, 6 if causal and estimator != "random" else 1, 5) and m.dtype == torch.float32
    assert (m >= EPS).all() and (m <= 1).all()
    assert torch.equal(m.amax(-1), torch.ones_like(m[..., 0]))
    if estimator != "random":
        same = elliptical_metric(v, v.clone(), causal=causal, estimator=estimator)
        assert torch.equal(same, torch.ones(3, 2, 6 if causal else 1, 5))


def test_metric_floor_and_isotropic() -> None:
    v = torch.randn(2, 2, 6, 4, dtype=torch.float64)
    v_prev = v.clone()
    v_prev[..., 0] += 0.5  # only coordinate 0 changes
    m = elliptical_metric(v, v_prev)
    expected = torch.full_like(m, EPS)
    expected[..., 0] = 1.0
    torch.testing.assert_close(m, expected, atol=1e-12, rtol=0)
    v_prev = torch.randn_like(v)
    for causal in (False, True):
        mean = elliptical_metric(v, v_prev, causal=causal)
        iso = elliptical_metric(v, v_prev, causal=causal, estimator="isotropic")
        assert iso.shape == mean.shape
        torch.testing.assert_close(iso, mean.mean(-1, keepdim=True).expand_as(mean), atol=1e-15, rtol=0)
        assert torch.equal(iso, iso[..., :1].expand_as(iso)) and (iso >= EPS).all() and (iso <= 1).all()
    assert torch.equal(
        elliptical_metric(v, v.clone(), estimator="isotropic"), torch.ones(2, 2, 1, 4).double()
    )


@pytest.mark.parametrize("n", [1, 7, 31, 32, 33, 64, 70, 130])
def test_blocked_prefix_sum_equals_cumsum(n: int) -> None:
    a = torch.rand(2, 3, n, 5, dtype=torch.float64)
    got = attention_mod._blocked_prefix_sum_(a.clone())
    torch.testing.assert_close(got, a.cumsum(dim=2), rtol=1e-12, atol=1e-12)


def test_cpu_causal_metric_runs_the_blocked_scan_and_matches_the_loops(monkeypatch) -> None:
    scans = []
    real = attention_mod._blocked_prefix_sum_
    monkeypatch.setattr(attention_mod, "_blocked_prefix_sum_", lambda a: scans.append(a.shape[2]) or real(a))
    n = 70  # two blocks of 32 and six tokens past them
    v, v_prev = torch.randn(3, 2, n, 4, dtype=torch.float64), torch.randn(3, 2, n, 4, dtype=torch.float64)
    keep = padding_mask_from_lengths(torch.tensor([n, 40, 3]), n)
    for mask in (None, keep):
        m = elliptical_metric(v, v_prev, causal=True, key_padding_mask=mask)
        torch.testing.assert_close(m, ref_metric(v, v_prev, mask, causal=True), rtol=1e-12, atol=1e-12)
        iso = elliptical_metric(v, v_prev, causal=True, key_padding_mask=mask, estimator="isotropic")
        torch.testing.assert_close(iso, m.mean(-1, keepdim=True).expand_as(m), rtol=1e-12, atol=1e-12)
    low = elliptical_metric(v.bfloat16(), v_prev.bfloat16(), causal=True)
    assert low.dtype == torch.bfloat16
    want = ref_metric(v.bfloat16().double(), v_prev.bfloat16().double(), causal=True)
    torch.testing.assert_close(low.double(), want, rtol=1e-2, atol=1e-2)
    assert scans == [n] * 5
    # the other paths keep torch.cumsum: a metric with a graph, and the whole-sequence mean (no scan at all)
    elliptical_metric(v, v_prev, causal=True, detach=False)
    elliptical_metric(v, v_prev)
    assert len(scans) == 5


def test_random_metric_reproducible() -> None:
    v = torch.randn(2, 2, 6, 4)
    draw = [
        elliptical_metric(v, None, estimator="random", generator=torch.Generator().manual_seed(s))
        for s in (1, 1, 2)
    ]
    assert torch.equal(draw[0], draw[1]) and not torch.equal(draw[0], draw[2])
    fresh = [elliptical_metric(v, None, estimator="random") for _ in range(2)]
    assert not torch.equal(fresh[0], fresh[1])
    low = elliptical_metric(v, None, estimator="random", random_low=0.5)
    assert (low >= 0.5).all() and torch.equal(low.amax(-1), torch.ones(2, 2, 1))
    # in the module, through its generator attribute
    layer = EllipticalAttention(DIM, HEADS, estimator="random", store_metric=True).eval()
    x = torch.randn(2, N, DIM)
    outs = []
    for _ in range(2):
        layer.generator = torch.Generator().manual_seed(7)
        outs.append(layer(x, v_prev=heads_of(x)))
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(layer.last_metric.amax(-1), torch.ones(2, HEADS, 1))
    assert torch.equal(elliptical_metric(v, None, estimator="identity"), torch.ones(2, 2, 1, 4))


# ----------------------------------------------------------------------------------------------------------
# 7. errors
# ----------------------------------------------------------------------------------------------------------


def test_metric_errors() -> None:
    v, v_prev = torch.randn(2, 2, 5, 4), torch.randn(2, 2, 5, 4)
    with pytest.raises(ValueError, match=r"estimator must be one of .*'cosine'"):
        elliptical_metric(v, v_prev, estimator="cosine")
    for est in ("mean", "identity"):
        with pytest.raises(ValueError, match=r"v \[2, 2, 5, 4\], v_prev \[2, 2, 6, 4\]"):
            elliptical_metric(v, torch.randn(2, 2, 6, 4), estimator=est)
    with pytest.raises(TypeError, match="bool tensor.*True = keep.*got torch.float32"):
        elliptical_metric(v, v_prev, key_padding_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match=r"shape \[B, N\] = \[2, 5\], got \[2, 4\]"):
        elliptical_metric(v, v_prev, key_padding_mask=torch.ones(2, 4, dtype=torch.bool))
    empty = torch.ones(2, 5, dtype=torch.bool)
    empty[1] = False
    with pytest.raises(ValueError, match=r"keeps no token in sample\(s\) \[1\]"):
        elliptical_metric(v, v_prev, key_padding_mask=empty)
    left = torch.ones(2, 5, dtype=torch.bool)
    left[0, 0] = False
    with pytest.raises(ValueError, match="right padding"):
        elliptical_metric(v, v_prev, causal=True, key_padding_mask=left)
    with pytest.raises(NotImplementedError, match="median.*causal"):
        elliptical_metric(v, v_prev, causal=True, estimator="median")
    with pytest.raises(ValueError, match="v_prev is required by estimator 'mean'"):
        elliptical_metric(v, None)
    with pytest.raises(ValueError, match="empty"):
        elliptical_metric(v[:0], v_prev[:0])
    with pytest.raises(ValueError, match=r"v must be a \[B, H, N, D\] tensor"):
        elliptical_metric(v[0], v_prev[0])
    with pytest.raises(ValueError, match="lengths must lie in 1..5"):
        padding_mask_from_lengths(torch.tensor([0, 5]), 5)


def test_module_errors() -> None:
    with pytest.raises(ValueError, match="dim=10, num_heads=4"):
        EllipticalAttention(10, 4)
    with pytest.raises(ValueError, match="estimator must be one of"):
        EllipticalAttention(DIM, HEADS, estimator="cosine")
    layer = EllipticalAttention(DIM, HEADS)
    causal = EllipticalAttention(DIM, HEADS, causal=True)
    x = torch.randn(2, 5, DIM)
    with pytest.raises(ValueError, match=r"x must be \[B, N, dim=8\], got shape \[5, 8\]"):
        layer(x[0])
    with pytest.raises(ValueError, match=r"x must be \[B, N, dim=8\], got shape \[2, 5, 4\]"):
        layer(x[..., :4])
    with pytest.raises(ValueError, match="empty"):
        layer(x[:0])
    bad = x.clone()
    bad[1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        layer(bad)
    with pytest.raises(TypeError, match="bool tensor"):
        layer(x, key_padding_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match=r"got \[2, 6\]"):
        layer(x, key_padding_mask=torch.ones(2, 6, dtype=torch.bool))
    left = torch.ones(2, 5, dtype=torch.bool)
    left[1, :2] = False
    layer(x, key_padding_mask=left)  # fine without causality
    with pytest.raises(ValueError, match="right padding"):
        causal(x, key_padding_mask=left)
    with pytest.raises(ValueError, match=r"v \[2, 2, 5, 4\], v_prev \[2, 2, 4, 4\]"):
        layer(x, v_prev=torch.randn(2, 2, 4, 4))
    with pytest.raises(NotImplementedError, match="median"):
        EllipticalAttention(DIM, HEADS, causal=True, estimator="median")(x, v_prev=torch.randn(2, 2, 5, 4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("metric_grad", [False, True])
def test_cuda_matches_cpu(causal: bool, metric_grad: bool) -> None:
    layer = EllipticalAttention(DIM, HEADS, causal=causal, metric_grad=metric_grad).double()
    x = torch.randn(3, 9, DIM, dtype=torch.float64, requires_grad=True)
    v_prev = torch.randn(3, HEADS, 9, DIM // HEADS, dtype=torch.float64, requires_grad=True)
    keep = padding_mask_from_lengths(torch.tensor([9, 5, 2]), 9)
    results = []
    for device in ("cpu", "cuda"):
        inputs = [t.detach().to(device).requires_grad_(True) for t in (x, v_prev)]
        out = layer.to(device)(inputs[0], key_padding_mask=keep.to(device), v_prev=inputs[1])[0]
        grads = torch.autograd.grad(out.square().sum(), inputs)
        results.append([t.cpu() for t in (out, *grads)])
    for cpu, gpu in zip(*results, strict=True):
        torch.testing.assert_close(gpu, cpu, atol=1e-10, rtol=0)


def test_padding_mask_from_lengths() -> None:
    expected = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(padding_mask_from_lengths(torch.tensor([3, 1, 4]), 4), expected)


# ----------------------------------------------------------------------------------------------------------
# 8. estimator ranking on synthetic kernel regression
# ----------------------------------------------------------------------------------------------------------

RELEVANT = (0, 1)


def synthetic(
    seeds: int, n: int = 256, *, noise: float = 0.05, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    """``x ~ U[-1,1]^{n×8}``; ``v_prev = f(x) + noise``, ``v = f(x + 0.1) + noise``, one sample per seed."""
    g = torch.Generator().manual_seed(seed)

    def f(z: Tensor) -> Tensor:
        out = 0.05 * z
        out[..., list(RELEVANT)] = torch.sin(math.pi * z[..., list(RELEVANT)])
        return out

    x = torch.rand(seeds, n, 8, generator=g, dtype=torch.float64) * 2 - 1
    v_prev = f(x) + noise * torch.randn(seeds, n, 8, generator=g, dtype=torch.float64)
    v = f(x + 0.1) + noise * torch.randn(seeds, n, 8, generator=g, dtype=torch.float64)
    return x, v[:, None], v_prev[:, None]  # heads axis: [seeds, 1, n, 8]


def top2_is_relevant(m: Tensor) -> Tensor:
    """``m [S, 1, 1, 8]`` → bool ``[S]``: the two largest coordinates are exactly S."""
    top = m[:, 0, 0].topk(2, dim=-1).indices.sort(-1).values
    return (top == torch.tensor(RELEVANT)).all(-1)


def test_ranking_recovers_relevant_coordinates() -> None:
    _, v, v_prev = synthetic(32)
    for est in ("mean", "median"):
        assert top2_is_relevant(elliptical_metric(v, v_prev, estimator=est)).float().mean() >= 0.95
    draws = elliptical_metric(
        torch.zeros(2000, 1, 1, 8), None, estimator="random", generator=torch.Generator().manual_seed(0)
    )
    assert 0.01 <= top2_is_relevant(draws).float().mean() <= 0.07  # chance: 1 / C(8, 2) ≈ 0.036


def test_median_robust_to_outlier_tokens() -> None:
    _, v, v_prev = synthetic(32, seed=1)
    g = torch.Generator().manual_seed(1)
    outliers = torch.rand(32, 256, generator=g).argsort(-1)[:, :13]  # 5% of the tokens
    v = v.clone()
    v[torch.arange(32)[:, None], 0, outliers, 5] += 100.0  # a huge |Δv| on irrelevant coordinate 5
    assert top2_is_relevant(elliptical_metric(v, v_prev, estimator="median")).float().mean() >= 0.95
    mean = elliptical_metric(v, v_prev, estimator="mean")
    assert top2_is_relevant(mean).float().mean() <= 0.05
    assert (mean[:, 0, 0].argmax(-1) == 5).all()  # the mean is dragged to the contaminated coordinate


def nw_predict(x_train: Tensor, y_train: Tensor, x_query: Tensor, m: Tensor, h: Tensor) -> Tensor:
    """Nadaraya–Watson with ``exp(−Σ_d m_d (x_d − x'_d)² / 2h²)``, vectorised over seeds and bandwidths.

    ``x_train [S,n,8]``, ``y_train [S,n]``, ``x_query [S,q,8]``, ``m [S,8]``, ``h [G]`` → ``[S,G,q]``.
    """
    d2 = ((x_query[:, :, None, :] - x_train[:, None, :, :]) ** 2 * m[:, None, None, :]).sum(-1)  # [S,q,n]
    w = torch.softmax(-d2[:, None] / (2 * h[None, :, None, None] ** 2), dim=-1)  # [S,G,q,n]
    return (w * y_train[:, None, None, :]).sum(-1)


def test_nw_regression_ranking() -> None:
    seeds = 10
    x, v, v_prev = synthetic(seeds, seed=2)
    g = torch.Generator().manual_seed(2)
    x_val = torch.rand(seeds, 128, 8, generator=g, dtype=torch.float64) * 2 - 1
    x_test = torch.rand(seeds, 256, 8, generator=g, dtype=torch.float64) * 2 - 1

    def target(z: Tensor) -> Tensor:
        return torch.sin(math.pi * z[..., list(RELEVANT)]).sum(-1)

    y = target(x) + 0.1 * torch.randn(seeds, 256, generator=g, dtype=torch.float64)
    oracle = torch.full((seeds, 8), EPS, dtype=torch.float64)
    oracle[:, list(RELEVANT)] = 1.0
    metrics = {
        "oracle": oracle,
        "mean": elliptical_metric(v, v_prev)[:, 0, 0],
        "identity": torch.ones(seeds, 8, dtype=torch.float64),
        "random": elliptical_metric(v, None, estimator="random", generator=torch.Generator().manual_seed(3))[
            :, 0, 0
        ],
    }
    bandwidths = torch.logspace(-1.7, 0.5, 16, dtype=torch.float64)
    mse = {}
    for name, m in metrics.items():
        val_mse = ((nw_predict(x, y, x_val, m, bandwidths) - target(x_val)[:, None]) ** 2).mean(-1)  # [S,G]
        best = bandwidths[val_mse.argmin(-1)]  # tuned per seed on validation, never on test
        pred = torch.stack(
            [nw_predict(*(t[s, None] for t in (x, y, x_test, m, best)))[0, 0] for s in range(seeds)]
        )
        mse[name] = ((pred - target(x_test)) ** 2).mean().item()
    assert mse["oracle"] <= mse["mean"] < mse["identity"], mse
    assert mse["mean"] < mse["random"], mse
