"""The compiled (fused) paths equal their eager reference and the loop oracles.

``clusterformers.fused`` compiles the elliptical mean metric (mean and causal prefix mean), the AC
transform and the contrastive losses' tiled logsumexp and its gradient. Here fusion is on (the rest of
the suite runs the eager code, see ``conftest.py``); each test compares the compiled function with the eager
one on the same inputs, and checks that the compiled one really ran (a counter on ``torch.compile``) or,
when compiling fails, that the eager code answers.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch._dynamo
import torch._inductor.config
from test_attention import ref_metric  # the loop oracle (the tests folder is on sys.path)

import clusterformers.attention as attention_mod
import clusterformers.contrastive.nce as nce
import clusterformers.moe.adaptive as adaptive
import clusterformers.moe.layer as layer_mod
from clusterformers import fused as fused_mod
from clusterformers.attention import EllipticalAttention, KVCache, _fused_mean_metric, elliptical_metric
from clusterformers.moe import MoE
from clusterformers.moe.adaptive import ACConfig, AdaptiveMetric


@pytest.fixture(autouse=True)
def fusion_on():
    """Fusion on, scalar C++ kernels (half the g++ time on 2 cores; the setting the other compile tests use)."""
    fused_mod.set_fused(True)
    with torch._inductor.config.patch({"cpp.vec_isa_ok": False}):
        yield
    fused_mod.set_fused(False)


@pytest.fixture
def compiles(monkeypatch):
    """The name of the function behind every call that runs through ``torch.compile`` from now on (wrappers made
    by :func:`clusterformers.fused.fused` after this fixture; earlier ones hold their compiled function)."""
    calls = []
    real = torch.compile

    def counting(fn, **kwargs):
        compiled = real(fn, **kwargs)

        def run(*args, **kw):
            calls.append(fn.__name__)
            return compiled(*args, **kw)

        return run

    monkeypatch.setattr(torch, "compile", counting)
    return calls


def _values(seed: int, dtype: torch.dtype = torch.float32, shape=(2, 3, 9, 8)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype), torch.randn(*shape, generator=g, dtype=dtype)


def _mask(n: int = 9) -> torch.Tensor:
    mask = torch.ones(2, n, dtype=torch.bool)
    mask[1, 6:] = False
    return mask


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_metric_compiled_equals_eager_and_the_loops(causal: bool, padded: bool, compiles) -> None:
    wrapper = fused_mod.fused(_fused_mean_metric.eager)
    v, v_prev = _values(0)
    keep = _mask() if padded else None
    keep4 = None if keep is None else keep[:, None, :, None]
    m, finite = wrapper(v, v_prev, keep4, causal, 1e-6, False, True)
    eager, eager_finite = _fused_mean_metric.eager(v, v_prev, keep4, causal, 1e-6, False, True)
    assert compiles == ["_mean_metric"]
    assert bool(finite) and bool(eager_finite)
    torch.testing.assert_close(m, eager, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(m.double(), ref_metric(v, v_prev, keep, causal=causal), rtol=1e-5, atol=1e-6)
    v[0, 1, 2, 3] = float("nan")
    assert not bool(wrapper(v, v_prev, keep4, causal, 1e-6, False, True)[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_causal_metric_compiled_equals_the_eager_reference(dtype: torch.dtype, compiles, monkeypatch) -> None:
    """The CPU causal metric (a compiled region, the blocked prefix sum, a compiled region) against
    ``_mean_metric`` run eagerly with ``torch.cumsum``."""
    for name in ("_fused_abs_diff_and_finite", "_fused_prefix_normalise_"):
        monkeypatch.setattr(attention_mod, name, fused_mod.fused(getattr(attention_mod, name).eager))
    v, v_prev = _values(3, dtype, shape=(2, 3, 70, 8))
    for keep in (None, _mask(70)):
        keep4 = None if keep is None else keep[:, None, :, None]
        for estimator in ("mean", "isotropic"):
            got = elliptical_metric(v, v_prev, causal=True, key_padding_mask=keep, estimator=estimator)
            want, _ = _fused_mean_metric.eager(v, v_prev, keep4, True, 1e-6, estimator == "isotropic", True)
            assert got.dtype == dtype
            torch.testing.assert_close(got, want, **({"rtol": 1e-6, "atol": 1e-6} if dtype == torch.float32 else {}))
    assert set(compiles) == {"_abs_diff_and_finite", "_prefix_normalise_"}
    v[0, 1, 50, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf at kept positions"):
        elliptical_metric(v, v_prev, causal=True, check_inputs=True)


def test_metric_float64_isotropic_and_gradient_through_the_metric() -> None:
    v, v_prev = _values(1, torch.float64)
    keep = _mask()
    for causal in (False, True):
        fused_mod.set_fused(True)
        m = elliptical_metric(v, v_prev, causal=causal, key_padding_mask=keep)
        iso = elliptical_metric(v, v_prev, causal=causal, key_padding_mask=keep, estimator="isotropic")
        fused_mod.set_fused(False)
        torch.testing.assert_close(m, ref_metric(v, v_prev, keep, causal=causal), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(
            iso,
            elliptical_metric(v, v_prev, causal=causal, key_padding_mask=keep, estimator="isotropic"),
            rtol=1e-12,
            atol=1e-12,
        )
    grads = []
    for on in (True, False):
        fused_mod.set_fused(on)
        x = v.clone().requires_grad_(True)
        weight = torch.linspace(-1, 1, 8, dtype=torch.float64)
        (elliptical_metric(x, v_prev, causal=True, key_padding_mask=keep, detach=False) * weight).sum().backward()
        grads.append(x.grad)
    assert grads[1].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_detached_metric_compiles_once_for_training_and_evaluation(causal: bool) -> None:
    """A detached metric runs without grad mode, so ``torch.no_grad()`` evaluation reuses the training graphs
    (each grad mode would otherwise compile graphs of its own, and dynamo runs eagerly after 8)."""
    from torch._dynamo.utils import counters

    v, v_prev = _values(5)
    for detach, new_graphs in ((True, 0), (False, 1)):  # control: a metric with a graph needs one per grad mode
        torch._dynamo.reset()
        counters.clear()
        want = elliptical_metric(v, v_prev, causal=causal, detach=detach)
        training = counters["stats"]["unique_graphs"]
        with torch.no_grad():
            got = elliptical_metric(v, v_prev, causal=causal, detach=detach)
        assert training >= 1
        assert counters["stats"]["unique_graphs"] - training == new_graphs
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_metric_check_still_raises_on_nan_at_kept_tokens_only() -> None:
    v, v_prev = _values(2)
    keep = _mask()
    v[1, 0, 7] = float("nan")  # a padded token: ignored
    m = elliptical_metric(v, v_prev, key_padding_mask=keep, check_inputs=True)
    assert torch.isfinite(m).all()
    v[0, 0, 7] = float("nan")  # a kept one
    with pytest.raises(ValueError, match="NaN or inf at kept positions"):
        elliptical_metric(v, v_prev, key_padding_mask=keep, check_inputs=True)


def test_attention_module_and_cached_decoding_with_fusion() -> None:
    torch.manual_seed(3)
    layer = EllipticalAttention(24, 3, causal=True)
    x = torch.randn(2, 9, 24, requires_grad=True)
    v_prev = torch.randn(2, 3, 9, 8)
    out = {}
    for on in (True, False):
        fused_mod.set_fused(on)
        x.grad = None
        layer.zero_grad()
        y = layer(x, _mask(), v_prev)
        y.square().sum().backward()
        out[on] = (y.detach(), x.grad.clone(), layer.qkv.weight.grad.clone())
    for got, want in zip(out[True], out[False]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # cached decoding (eager prefix sums) equals the fused full pass
    fused_mod.set_fused(True)
    with torch.no_grad():
        full = layer(x, v_prev=v_prev)
        cache = KVCache()
        steps = [layer(x[:, :4], v_prev=v_prev[:, :, :4], kv_cache=cache)]
        for t in range(4, 9):
            steps.append(layer(x[:, t : t + 1], v_prev=v_prev[:, :, : t + 1], kv_cache=cache))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-6)


def test_attention_inside_an_outer_compile_is_traced_not_nested() -> None:
    torch._dynamo.reset()
    torch.manual_seed(4)
    layer = EllipticalAttention(16, 2, check_inputs=False)
    x, v_prev = torch.randn(2, 6, 16), torch.randn(2, 2, 6, 8)
    compiled = torch.compile(layer, fullgraph=True)
    got = compiled(x, _mask(6), v_prev)
    fused_mod.set_fused(False)
    torch.testing.assert_close(got, layer(x, _mask(6), v_prev), rtol=1e-5, atol=1e-6)


def test_attention_exports_with_fusion_on() -> None:
    torch.manual_seed(8)
    attn = EllipticalAttention(16, 2, check_inputs=False).eval()
    x, v_prev = torch.randn(2, 6, 16), torch.randn(2, 2, 6, 8)
    program = torch.export.export(attn, (x, _mask(6), v_prev))
    fused_mod.set_fused(False)
    torch.testing.assert_close(program.module()(x, _mask(6), v_prev), attn(x, _mask(6), v_prev), rtol=1e-5, atol=1e-6)


def _routing(seed: int, tokens: int = 60, experts: int = 4, dim: int = 8):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, dim, generator=g)
    indices = torch.stack([torch.randperm(experts, generator=g)[:2] for _ in range(tokens)])
    weights = torch.softmax(torch.randn(tokens, 2, generator=g), dim=1)
    keep = torch.rand(tokens, generator=g) > 0.2
    return h, indices, weights, keep


@pytest.mark.parametrize("stats", ["batch", "ema", "running"])
def test_ac_transform_compiled_equals_eager(stats: str, compiles, monkeypatch) -> None:
    monkeypatch.setattr(adaptive, "_fused_transform", fused_mod.fused(adaptive._transform))
    cfg = ACConfig(stats=stats, mix=2 if stats == "running" else None)
    fused_layer = AdaptiveMetric(4, 8, cfg)
    eager_layer = copy.deepcopy(fused_layer)
    for step, training in enumerate((True, True, False)):
        h, indices, weights, keep = _routing(step)
        fused_layer.train(training)
        eager_layer.train(training)
        m_tok, st = fused_layer(h, indices, weights, keep)
        fused_mod.set_fused(False)
        want, want_st = eager_layer(h, indices, weights, keep)
        fused_mod.set_fused(True)
        torch.testing.assert_close(m_tok, want, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(st.metric, want_st.metric, rtol=1e-6, atol=1e-6)
        assert torch.equal(st.valid, want_st.valid)
        assert (st.counts is None) == (want_st.counts is None)
    assert (m_tok - 1).abs().max() > 0.1  # a metric that is not the identity
    for name, buf in fused_layer.named_buffers():
        torch.testing.assert_close(buf, dict(eager_layer.named_buffers())[name], rtol=1e-6, atol=1e-6)
    assert compiles and set(compiles) == {"_transform"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_blockwise_fare_and_fair_infonce_compiled_equal_the_dense_loss(dtype, compiles, monkeypatch) -> None:
    from clusterformers.contrastive import fare_attention as fa
    from clusterformers.contrastive import functional as fn

    tile_kernels = ("_tile_logsumexp", "_tile_pair_logsumexp", "_tile_softmax_", "_tile_pair_softmax_",
                    "_block_logsumexp", "_normaliser_grad")
    for name in tile_kernels:
        monkeypatch.setattr(nce, f"_fused{name}", fused_mod.fused(getattr(nce, name), dynamic=False))
    monkeypatch.setattr(fn, "fused_shifted_log_softmax", fused_mod.fused(fa._shifted_log_softmax, dynamic=False))
    g = torch.Generator().manual_seed(3)
    b, d = 90, 8
    z1, z2 = (torch.randn(b, d, generator=g, dtype=dtype, requires_grad=True) for _ in range(2))
    sens = torch.rand(b, 3, generator=g, dtype=dtype)
    w_q, w_k = (torch.randn(16, 3, generator=g, dtype=dtype, requires_grad=True) for _ in range(2))
    tol = {"rtol": 0, "atol": 1e-12 if dtype == torch.float64 else 2e-6}
    for options in ({}, {"negatives": "cross", "mask_self": False}):
        fused_mod.set_fused(False)
        dense = fn.fare(z1, z2, sens, w_q, w_k, chunk_size=None, **options)
        grads = torch.autograd.grad(dense, (z1, z2, w_q, w_k))
        fused_mod.set_fused(True)
        for chunk in (None, 40):  # dense (compiled log-softmax), and tiles of blocks of 40, 40 and 10 anchors
            loss = fn.fare(z1, z2, sens, w_q, w_k, chunk_size=chunk, **options)
            torch.testing.assert_close(loss, dense, **tol)
            for a, c in zip(torch.autograd.grad(loss, (z1, z2, w_q, w_k)), grads):
                torch.testing.assert_close(a, c, **tol)
    groups = torch.randint(0, 3, (b,), generator=g)
    groups[7] = 5  # alone in its group: every tile row of this anchor is -inf
    fused_mod.set_fused(False)
    dense = fn.fair_info_nce(z1, z2, groups, chunk_size=None)
    grads = torch.autograd.grad(dense, (z1, z2))
    fused_mod.set_fused(True)
    loss = fn.fair_info_nce(z1, z2, groups, chunk_size=40)
    torch.testing.assert_close(loss, dense, **tol)
    for a, c in zip(torch.autograd.grad(loss, (z1, z2)), grads):
        torch.testing.assert_close(a, c, **tol)
    assert set(compiles) == {*tile_kernels, "_shifted_log_softmax"}


def test_gated_experts_compiled_equal_eager(compiles, monkeypatch) -> None:
    """SwiGLU experts on the grouped path (float32) and the loop (float64): the compiled activation, forward and
    backward, against the eager one."""
    monkeypatch.setattr(layer_mod, "_fused_swiglu", fused_mod.fused(layer_mod._swiglu))
    for dtype in (torch.float32, torch.float64):
        torch.manual_seed(0)
        moe = MoE(16, 4, 2, 32, gated=True).to(dtype)
        x = torch.randn(3, 10, 16, dtype=dtype, requires_grad=True)
        grads = {}
        for on in (True, False):
            fused_mod.set_fused(on)
            out = moe(x)
            grads[on] = (out, *torch.autograd.grad(out.square().sum(), (x, moe.experts.w_in, moe.experts.w_out)))
        fused_mod.set_fused(True)
        for a, c in zip(grads[True], grads[False], strict=True):
            torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)
        assert grads[True][2].abs().max() > 0
    assert compiles and set(compiles) == {"_swiglu"}


def test_a_failed_compile_falls_back_to_eager_once(monkeypatch, caplog) -> None:
    def broken(fn, **kwargs):
        def run(*args, **kw):
            raise torch._dynamo.exc.TorchDynamoException("no C++ compiler")

        return run

    monkeypatch.setattr(torch, "compile", broken)
    calls = []

    def double(x: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return 2 * x

    wrapper = fused_mod.fused(double)
    with caplog.at_level(logging.WARNING, logger="clusterformers.fused"):
        assert torch.equal(wrapper(torch.ones(3)), torch.full((3,), 2.0))
        assert torch.equal(wrapper(torch.ones(2)), torch.full((2,), 2.0))
    assert len(calls) == 2
    assert sum("runs eagerly" in r.message for r in caplog.records) == 1
    fused_mod.set_fused(False)  # off: the eager code without asking torch.compile
    assert torch.equal(fused_mod.fused(double)(torch.ones(1)), torch.full((1,), 2.0))
