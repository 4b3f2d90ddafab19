"""Routers: one code path, exact M = I equivalence, fallbacks, scores, gates and bad inputs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from clusterformers.moe import (
    ROUTERS,
    ACConfig,
    ACRouter,
    RandomRouter,
    Router,
    RoutingState,
    StableMoERouter,
    TopKRouter,
    XMoERouter,
    adaptive_metric,
)
from clusterformers.moe.routers import top_k_lower_index

D, E, K, T = 6, 5, 2, 23


def data(seed=0, T=T, d=D, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(T, d, generator=g, dtype=dtype)
    c = torch.randint(0, E, (T,), generator=g)
    idx = torch.stack([c, (c + 1 + torch.randint(0, E - 1, (T,), generator=g)) % E], 1)
    w = torch.softmax(torch.randn(T, 2, generator=g, dtype=dtype), 1).sort(1, descending=True).values
    return h, RoutingState(idx, w, T, E)


def load_router_weights(plain, ac_router) -> None:
    """Load an AC router's parameters into a plain one: the AC router also holds running statistics."""
    missing, unexpected = plain.load_state_dict(ac_router.state_dict(), strict=False)
    assert not missing and unexpected and all(k.startswith("metric.") for k in unexpected)


def paired(ac="lm"):
    torch.manual_seed(0)
    ac_router = ACRouter(D, E, K, ac).double()
    stable = StableMoERouter(D, E, K).double()
    load_router_weights(stable, ac_router)
    return ac_router, stable


def assert_same(a, b):
    assert torch.equal(a.logits, b.logits)
    assert torch.equal(a.weights, b.weights)
    assert torch.equal(a.indices, b.indices)


def test_metric_of_ones_gives_stablemoe_exactly():
    ac_router, stable = paired()
    h, prev = data()
    # every cluster invalid (all tokens masked out of the statistics): m = 1
    out = ac_router(h, prev, key_padding_mask=torch.zeros(T, dtype=torch.bool))
    assert torch.equal(
        adaptive_metric(h, prev.indices[:, 0], E, key_padding_mask=torch.zeros(T, dtype=torch.bool)), torch.ones(E, D)
    )
    assert_same(out, stable(h))
    # all singletons (T <= E): m = 1 too
    h5, _ = data(T=E)
    singletons = RoutingState(torch.arange(E)[:, None], torch.ones(E, 1), E, E)
    assert_same(ac_router(h5, singletons), stable(h5))
    # and the AC router is a different router once clusters are valid
    assert not torch.equal(ac_router(h, prev).logits, stable(h).logits)


def test_prev_none_falls_back_to_the_plain_score():
    ac_router, stable = paired()
    h, _ = data(1)
    assert_same(ac_router(h), stable(h))
    smoe_ac = TopKRouter(D, E, K, ac="lm").double()
    smoe = TopKRouter(D, E, K).double()
    load_router_weights(smoe, smoe_ac)
    assert_same(smoe_ac(h), smoe(h))


def test_ac_logits_equal_the_formula():
    ac_router, _ = paired()
    h, prev = data(2)
    m = adaptive_metric(h, prev.indices[:, 0], E)
    e_hat = ac_router.embeddings / ac_router.embeddings.norm(dim=1, keepdim=True)
    torch.testing.assert_close(ac_router(h, prev).logits, (m[prev.indices[:, 0]] * h) @ e_hat.t())
    # M^(1/2) h . M^(1/2) e_hat: one M per token (its previous cluster) serves all E scores
    root = m[prev.indices[:, 0]].sqrt()
    sandwich = torch.einsum("tq,tkq->tk", root * h, root[:, None, :] * e_hat[None])
    torch.testing.assert_close(ac_router(h, prev).logits, sandwich)


def test_mix_one_equals_hard():
    h, prev = data(3)
    torch.manual_seed(0)
    hard = ACRouter(D, E, K, "lm").double()
    mix1 = ACRouter(D, E, K, ACConfig.preset("lm", mix=1)).double()
    mix1.load_state_dict(hard.state_dict())
    assert_same(mix1(h, prev), hard(h, prev))
    mix2 = ACRouter(D, E, K, ACConfig.preset("lm", mix=2)).double()
    mix2.load_state_dict(hard.state_dict())
    assert not torch.equal(mix2(h, prev).logits, hard(h, prev).logits)


def test_scores_equal_their_formulas():
    h, _ = data(4)
    torch.manual_seed(1)
    smoe = TopKRouter(D, E, K).double()
    torch.testing.assert_close(smoe(h).logits, h @ smoe.linear.weight.t() + smoe.linear.bias)
    xmoe = XMoERouter(D, E, K).double()
    assert xmoe.proj.weight.shape == (8, D) and xmoe.proj.bias is None and xmoe.temperature.item() == 0.5
    cos = F.cosine_similarity((h @ xmoe.proj.weight.t())[:, None, :], xmoe.embeddings[None], dim=-1)
    torch.testing.assert_close(xmoe(h).logits, cos / 0.5)
    with torch.no_grad():
        xmoe.temperature.fill_(1e-5)
    torch.testing.assert_close(xmoe(h).logits, cos / 0.01)  # the temperature floor
    swin = ACRouter(D, E, K, "swin").double()
    assert swin.score == "linear_nobias" and swin.gate == "softmax_all" and swin.linear.bias is None
    stable = StableMoERouter(D, E, K)
    torch.testing.assert_close(stable.embeddings @ stable.embeddings.t(), 0.32**2 * torch.eye(E))  # orthogonal init


def test_gates_and_sorted_topk():
    h, _ = data(5, T=50)
    for gate in ["softmax_selected", "softmax_all"]:
        router = Router(D, E, 3, "linear", gate).double()
        out = router(h)
        assert torch.equal(out.indices[:, 0], out.logits.argmax(1))
        assert (out.logits.gather(1, out.indices).diff(dim=1) <= 0).all()
        probs = torch.softmax(out.logits, 1)
        if gate == "softmax_selected":  # = Mixtral: softmax over E, top-k, renormalise
            top = probs.gather(1, out.indices)
            torch.testing.assert_close(out.weights, top / top.sum(1, keepdim=True))
        else:
            torch.testing.assert_close(out.weights, probs.gather(1, out.indices))
        assert out.logits.dtype == torch.float64


def test_ties_go_to_the_lower_index():
    router = TopKRouter(3, 4, 2)
    with torch.no_grad():
        router.linear.weight.zero_()
        router.linear.bias.copy_(torch.tensor([1.0, 3.0, 3.0, 3.0]))
    out = router(torch.randn(7, 3))
    assert out.indices.tolist() == [[1, 2]] * 7
    with torch.no_grad():
        router.linear.bias.copy_(torch.tensor([2.0, 2.0, 2.0, 2.0]))
    assert router(torch.randn(2, 3)).indices.tolist() == [[0, 1]] * 2


def test_state_leading_shapes_and_fp32_logits_under_autocast():
    router = ACRouter(D, E, K, "lm")
    h = torch.randn(2, 3, D)
    out = router(h)
    assert out.logits.shape == (6, E) and out.weights.shape == (6, K) and out.indices.shape == (6, K)
    assert out.state.num_tokens == 6 and out.state.num_experts == E and not out.state.weights.requires_grad
    torch.testing.assert_close(router(h.reshape(6, D)).logits, out.logits)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        prev = RoutingState(out.indices, out.state.weights, 6, E)
        out_bf = router(h.bfloat16(), prev)
    assert out_bf.logits.dtype == torch.float32 and out_bf.weights.dtype == torch.float32


def test_noise_only_in_training():
    router = TopKRouter(D, E, K, noise=1.0).double()
    h, _ = data(6)
    router.eval()
    assert torch.equal(router(h).logits, router(h).logits)
    router.train()
    noisy = (router(h).logits - router.linear(h)).detach()
    assert 0.05 < noisy.std().item() < 0.5  # std = noise / E = 0.2


@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_every_trainable_parameter_gets_a_gradient(name):
    router = ACRouter(D, E, K) if name == "ac" else ROUTERS[name](D, E, K)
    h, prev = data(7, dtype=torch.float32)
    out = router(h, prev if router.ac is not None else None)
    params = [p for p in router.parameters() if p.requires_grad]
    if params:
        (out.logits.square().mean() + (out.weights * torch.arange(K)).sum()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    if name == "random":
        assert params == []
    else:
        assert params


def test_bad_inputs_raise_value_errors_naming_the_argument():
    with pytest.raises(ValueError, match="k: expected"):
        StableMoERouter(D, 4, 5)
    with pytest.raises(ValueError, match="k: expected"):
        TopKRouter(D, 4, 0)
    with pytest.raises(ValueError, match="score"):
        Router(D, E, K, score="dot")
    with pytest.raises(ValueError, match="gate"):
        Router(D, E, K, gate="sigmoid")
    with pytest.raises(ValueError, match="ac: "):
        ACRouter(D, E, K, None)
    router = ACRouter(D, E, K)
    with pytest.raises(ValueError, match=r"h: expected shape \[\.\.\., 6\]"):
        router(torch.randn(4, D + 1))
    with pytest.raises(ValueError, match="h: expected at least one token"):
        router(torch.randn(0, D))
    bad = torch.randn(4, D)
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match="h: expected finite"):
        router(bad)
    h = torch.randn(4, D)
    idx = torch.zeros(4, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="prev: .*num_experts=8"):
        router(h, RoutingState(idx, torch.ones(4, 2) / 2, 4, 8))
    with pytest.raises(ValueError, match="prev: .*num_tokens=3"):
        router(h, RoutingState(idx[:3], torch.ones(3, 2) / 2, 3, E))
    with pytest.raises(ValueError, match="key_padding_mask"):
        router(h, key_padding_mask=torch.ones(5, dtype=torch.bool))
    mixer = ACRouter(D, E, K, ACConfig.preset("lm", mix=3))
    with pytest.raises(ValueError, match="prev: mix=3"):
        mixer(h, RoutingState(idx, torch.ones(4, 2) / 2, 4, E))


def test_random_router_is_frozen_and_xmoe_temperature_is_learnable():
    assert not any(p.requires_grad for p in RandomRouter(D, E, K).parameters())
    assert XMoERouter(D, E, K).temperature.requires_grad
    assert math.isclose(XMoERouter(D, E, K).temperature.item(), 0.5)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 6])
def test_top_k_equals_the_stable_sort_with_ties_and_infinities(k):
    g = torch.Generator().manual_seed(k)
    logits = torch.randint(-2, 3, (200, 8), generator=g).double()  # many ties
    logits[torch.rand(200, 8, generator=g) < 0.2] = float("-inf")
    logits[:3] = float("-inf")  # rows with nothing but -inf
    top, indices = top_k_lower_index(logits, k)
    want_top, want_idx = torch.sort(logits, dim=1, descending=True, stable=True)
    assert torch.equal(indices, want_idx[:, :k])
    assert torch.equal(top, want_top[:, :k])
    assert (indices.sort(1).values.diff(1) > 0).all()  # k distinct experts per row
    # negative control: the rule "ties to the higher index" picks other experts on these ties
    higher = logits.shape[1] - 1 - top_k_lower_index(logits.flip(1), k)[1]
    assert not torch.equal(higher, want_idx[:, :k])
