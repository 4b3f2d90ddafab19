"""MoE layer: fast dispatch against slow per-token loops and a slow queue simulation, the shared routing
state (with activation checkpointing), aux losses and bad inputs."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from clusterformers.moe import (
    ACConfig,
    MoE,
    RoutingState,
    TopKRouter,
    adaptive_metric,
    load_balancing_loss,
    router_z_loss,
    total_aux_loss,
)
from clusterformers.state import share_state

D, E, K, H = 6, 4, 2, 5


def expert_ref(moe, e, x):
    """One expert on one token, written out."""
    a = x @ moe.experts.w_in[e]
    if moe.experts.gated:
        a = F.silu(a[..., :H]) * a[..., H:]
    else:
        a = 0.5 * a * (1 + torch.erf(a / math.sqrt(2)))
    return a @ moe.experts.w_out[e]


def route_ref(moe, x2, prev, mask=None):
    """Router output and expert input (m(i) * x_i when AC scales the whole MoE input)."""
    if moe.router.ac is not None and prev is not None and moe.router.ac.apply_to == "moe_input":
        m_tok, _ = moe.router.token_metric(x2, prev, mask)
        return moe.router.select(x2 * m_tok), x2 * m_tok
    return moe.router(x2, prev, mask), x2


def slow_dropless(moe, x2, prev=None):
    out, u = route_ref(moe, x2, prev)
    rows = []
    for i in range(x2.shape[0]):
        acc = torch.zeros(D, dtype=x2.dtype)
        for j in range(moe.top_k):
            acc = acc + out.weights[i, j] * expert_ref(moe, int(out.indices[i, j]), u[i])
        rows.append(acc)
    return torch.stack(rows)


def slow_capacity(moe, x2, prev=None, mask=None):
    out, u = route_ref(moe, x2, prev, mask)
    weights = out.weights.detach()
    T = x2.shape[0]
    C = math.ceil(moe.capacity_factor * moe.top_k * T / moe.num_experts)
    if moe.priority == "slot":
        order = list(range(T))
    else:
        order = sorted(range(T), key=lambda i: (-weights[i, 0].item(), i))
    fill = [0] * moe.num_experts
    rows = [torch.zeros(D, dtype=x2.dtype) for _ in range(T)]
    dropped = 0
    for j in range(moe.top_k):
        for i in order:
            if mask is not None and not bool(mask[i]):
                continue
            e = int(out.indices[i, j])
            if fill[e] < C:
                fill[e] += 1
                rows[i] = rows[i] + out.weights[i, j] * expert_ref(moe, e, u[i])
            else:
                dropped += 1
    return torch.stack(rows), dropped


def prev_state(T, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = torch.randint(0, E, (T,), generator=g)
    idx = torch.stack([c, (c + 1) % E], 1)
    return RoutingState(
        idx, torch.softmax(torch.randn(T, 2, generator=g, dtype=torch.float64), 1).sort(1, descending=True).values, T, E
    )


def grads(moe, x, y):
    (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
    g = {n: p.grad.clone() for n, p in moe.named_parameters() if p.requires_grad}
    g["x"] = x.grad.clone()
    moe.zero_grad()
    x.grad = None
    return g


@pytest.mark.parametrize(
    "router,ac,gated",
    [
        ("smoe", None, False),
        ("stablemoe", None, True),
        ("ac", "lm", False),
        ("ac", "swin", True),
        ("xmoe", ACConfig.preset("lm", mix=2), False),
    ],
)
def test_dropless_equals_slow_per_token_loop_with_gradients(router, ac, gated):
    torch.manual_seed(0)
    moe = MoE(D, E, K, H, router=router, ac=ac, gated=gated).double()
    x = torch.randn(2, 9, D, dtype=torch.float64, requires_grad=True)
    prev = prev_state(18) if ac is not None else None
    y = moe(x, prev)
    assert y.shape == x.shape
    g_fast = grads(moe, x, y)
    y_slow = slow_dropless(moe, x.reshape(-1, D), prev).view_as(x)
    torch.testing.assert_close(y, y_slow)
    g_slow = grads(moe, x, y_slow)
    assert g_fast.keys() == g_slow.keys()
    for name in g_fast:
        torch.testing.assert_close(g_fast[name], g_slow[name], msg=name)
        assert g_fast[name].abs().sum() > 0, name  # every parameter gets a gradient


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("router", ["stablemoe", "ac"])
def test_grouped_gemm_dropless_equals_the_expert_loop_and_the_slow_loop(router, gated):
    """float32 with 16-byte rows takes the grouped GEMM; float64 the per-expert loop: same outputs and grads
    (to float32 precision), and both equal the per-token reference. One expert gets no token."""
    d, h, e, t = 8, 12, 5, 30
    torch.manual_seed(3)
    fused = MoE(d, e, K, h, router=router, gated=gated)
    x = torch.randn(t, d).abs().requires_grad_()
    prev = None
    if router == "ac":
        c = torch.randint(0, e, (t,))
        prev = RoutingState(torch.stack([c, (c + 1) % e], 1), torch.full((t, 2), 0.5), t, e)
    with torch.no_grad():
        emb = fused.router.embeddings
        emb.abs_()
        emb[0] = -1.0  # x > 0: expert 0 scores lowest for every token, so it gets none
    loop = copy.deepcopy(fused).double()
    x64 = x.detach().double().requires_grad_()
    assert fused.experts.fused_grouped(x) and not loop.experts.fused_grouped(x64)
    y, y64 = fused(x, prev), loop(x64, prev)
    assert int((fused.last_state.indices == 0).sum()) == 0
    torch.testing.assert_close(y.double(), y64, atol=1e-5, rtol=1e-4)
    g, g64 = grads(fused, x, y), grads(loop, x64, y64)
    for name in g:
        torch.testing.assert_close(g[name].double(), g64[name], atol=1e-5, rtol=1e-4, msg=name)
    assert g["experts.w_in"][0].abs().sum() == 0 and g["experts.w_in"][1:].abs().sum() > 0
    loop_ref = slow_dropless_sized(loop, x64.detach(), prev, d, h)
    torch.testing.assert_close(y64.detach(), loop_ref)


def slow_dropless_sized(moe, x2, prev, d, h):
    """``slow_dropless`` for other widths than the module constants."""
    out = moe.router(x2, prev)
    rows = []
    for i in range(x2.shape[0]):
        acc = torch.zeros(d, dtype=x2.dtype)
        for j in range(moe.top_k):
            e = int(out.indices[i, j])
            a = x2[i] @ moe.experts.w_in[e]
            a = F.silu(a[:h]) * a[h:] if moe.experts.gated else 0.5 * a * (1 + torch.erf(a / math.sqrt(2)))
            acc = acc + out.weights[i, j] * (a @ moe.experts.w_out[e])
        rows.append(acc)
    return torch.stack(rows)


@pytest.mark.parametrize("priority", ["slot", "weight"])
@pytest.mark.parametrize("masked", [False, True])
def test_capacity_equals_slow_queue_simulation(priority, masked):
    torch.manual_seed(1)
    moe = MoE(D, E, K, H, router="ac", capacity_factor=0.75, priority=priority).double()
    T = 13
    x = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
    prev = prev_state(T, seed=2)
    mask = torch.arange(T) % 5 != 1 if masked else None
    y = moe(x, prev, key_padding_mask=mask)
    g_fast = grads(moe, x, y)
    y_slow, dropped = slow_capacity(moe, x, prev, mask)
    assert dropped > 0
    torch.testing.assert_close(y, y_slow)
    g_slow = grads(moe, x, y_slow)
    for name in g_fast:
        torch.testing.assert_close(g_fast[name], g_slow[name], msg=name)


def test_large_capacity_equals_dropless():
    torch.manual_seed(2)
    dropless = MoE(D, E, K, H, router="smoe").double()
    cap = MoE(D, E, K, H, router="smoe", capacity_factor=E / K).double()
    cap.load_state_dict(dropless.state_dict())
    x = torch.randn(3, 7, D, dtype=torch.float64)
    torch.testing.assert_close(cap(x), dropless(x))


class Net(nn.Module):
    """A model whose MoE layers share one LayerState (a dense layer sits between MoEs)."""

    def __init__(self, use_checkpoint=False, stats="ema"):
        super().__init__()
        self.moe1 = MoE(D, E, K, H, router="stablemoe")
        self.dense = nn.Linear(D, D)
        self.moe2 = MoE(D, E, K, H, router="ac", ac=ACConfig.preset("lm", stats=stats))
        self.moe3 = MoE(D, E, K, H, router="ac", ac=ACConfig.preset("swin", stats=stats))
        self.use_checkpoint = use_checkpoint
        share_state(self)

    def forward(self, x):
        x = x + self.moe1(x)
        x = x + self.dense(x)
        for layer in (self.moe2, self.moe3):
            x = x + (checkpoint(layer, x, use_reentrant=False) if self.use_checkpoint else layer(x))
        return x


def test_shared_state_threads_the_nearest_earlier_routing():
    torch.manual_seed(3)
    net = Net().double()
    assert [net.moe1.state_position, net.moe2.state_position, net.moe3.state_position] == [0, 1, 2]
    x = torch.randn(2, 8, D, dtype=torch.float64)
    y = net(x)
    # the same computation with explicit prev=
    h = x + net.moe1(x)
    s1 = net.moe1.last_state
    h = h + net.dense(h)
    h = h + net.moe2(h, prev=s1)
    h = h + net.moe3(h, prev=net.moe2.last_state)
    torch.testing.assert_close(y, h)
    assert net.moe2.last_stats is not None and net.moe1.last_stats is None
    # negative control: without the shared state every layer routes plainly, and the output differs
    alone = Net().double()
    alone.load_state_dict(net.state_dict())
    for layer in (alone.moe1, alone.moe2, alone.moe3):
        layer.layer_state = None
    assert alone.moe2.last_stats is None and (alone(x) - y).abs().max() > 1e-6
    # a layer that did not run is skipped: moe3 then reads moe1's state
    state = net.layer_state
    state.reset()
    net.moe1(x)
    assert state.read("routing", 2) is net.moe1.last_state and state.read("routing", 0) is None
    with pytest.raises(ValueError, match="position"):
        state.write("routing", 3, s1)


@pytest.mark.parametrize("stats", ["batch", "ema", "running"])
def test_shared_state_under_activation_checkpointing(stats):
    """Gradients and running statistics are those of the plain net, also when the running statistics
    route (recomputation must see the values of the first pass, not ones it has just updated)."""
    torch.manual_seed(4)
    plain, ckpt = Net(stats=stats).double(), Net(use_checkpoint=True, stats=stats).double()
    ckpt.load_state_dict(plain.state_dict())
    for step in range(3):
        x = torch.randn(2, 8, D, dtype=torch.float64, generator=torch.Generator().manual_seed(step))
        for net in (plain, ckpt):
            net.zero_grad()
            net(x).square().sum().backward()
        for (name, p), q in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, msg=name)
    for (name, b), c in zip(plain.named_buffers(), ckpt.buffers(), strict=True):
        torch.testing.assert_close(b, c, msg=name)
    if stats != "batch":
        assert plain.moe2.router.metric.running_seen.any()


def test_token_count_change_raises_and_key_padding_mask_keeps_padding_out_of_statistics():
    torch.manual_seed(5)
    first, second = MoE(D, E, K, H), MoE(D, E, K, H, router="ac")
    share_state(nn.Sequential(first, second))
    first(torch.randn(10, D))
    with pytest.raises(ValueError, match="prev: .*num_tokens=10"):
        second(torch.randn(6, D))
    x = torch.randn(2, 5, D)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    first(x)
    second(x, key_padding_mask=mask)
    expected = adaptive_metric(x.reshape(-1, D), first.last_state.indices[:, 0], E, key_padding_mask=mask.reshape(-1))
    torch.testing.assert_close(second.last_stats.metric, expected)
    with pytest.raises(TypeError, match="key_padding_mask: expected a bool tensor"):
        second(x, key_padding_mask=mask.float())


def test_aux_losses_and_total():
    torch.manual_seed(6)
    model = nn.Sequential(
        MoE(D, E, K, H, router="smoe", aux_coef=0.01, z_coef=0.001), MoE(D, E, K, H, router="xmoe", aux_coef=0.1)
    ).double()
    x = torch.randn(12, D, dtype=torch.float64)
    y, aux = model[0](x, return_aux=True)
    logits = model[0].last_router_logits
    torch.testing.assert_close(aux, 0.01 * load_balancing_loss(logits, E, K) + 0.001 * router_z_loss(logits))
    assert model[0].aux_loss is aux and aux.requires_grad
    model(x)
    torch.testing.assert_close(total_aux_loss(model), model[0].aux_loss + model[1].aux_loss)
    mask = torch.arange(12) < 7
    _, aux_masked = model[0](x, key_padding_mask=mask, return_aux=True)
    logits = model[0].last_router_logits
    torch.testing.assert_close(
        aux_masked, 0.01 * load_balancing_loss(logits[:7], E, K) + 0.001 * router_z_loss(logits[:7])
    )
    plain = MoE(D, E, K, H)
    plain(torch.randn(3, D))
    assert float(plain.aux_loss) == 0.0 and float(total_aux_loss(plain)) == 0.0


def test_bad_inputs():
    moe = MoE(D, E, K, H)
    with pytest.raises(ValueError, match=r"x: expected shape \[\.\.\., 6\]"):
        moe(torch.randn(3, D + 1))
    with pytest.raises(ValueError, match="x: expected at least one token"):
        moe(torch.randn(0, 4, D))
    bad = torch.randn(3, D)
    bad[1, 2] = float("inf")
    for layer in (moe, MoE(D, E, K, H, capacity_factor=1.0)):
        with pytest.raises(ValueError, match="x: expected finite"):
            layer(bad)
    with pytest.raises(ValueError, match="router"):
        MoE(D, E, K, H, router=TopKRouter(D, E + 1, K))
    with pytest.raises(ValueError, match="router"):
        MoE(D, E, K, H, router="switch")
    with pytest.raises(ValueError, match="ac"):
        MoE(D, E, K, H, router=TopKRouter(D, E, K), ac="lm")
    with pytest.raises(ValueError, match="capacity_factor"):
        MoE(D, E, K, H, capacity_factor=0.0)
    with pytest.raises(ValueError, match="priority"):
        MoE(D, E, K, H, capacity_factor=1.0, priority="random")
    with pytest.raises(ValueError, match="k: expected"):
        MoE(D, E, E + 1, H)


def test_autocast_keeps_router_logits_fp32():
    torch.manual_seed(7)
    moe = MoE(D, E, K, H, router="ac")
    x = torch.randn(10, D)
    moe(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = moe(x, prev=moe.last_state)
    assert moe.last_router_logits.dtype == torch.float32 and moe.last_stats.metric.dtype == torch.float32
    assert y.shape == x.shape


def test_layers_can_be_deep_copied_and_saved_after_a_forward(tmp_path):
    import copy

    from clusterformers.moe import SoftMoE

    for layer in (MoE(D, E, K, H, router="ac", aux_coef=0.1, z_coef=0.1), SoftMoE(D, E, 2, H)):
        x = torch.randn(2, 5, D, requires_grad=True)
        layer(x, return_aux=True)
        assert layer.aux_loss is not None and layer.last_state is not None
        clone = copy.deepcopy(layer)
        assert clone.aux_loss is None and clone.last_router_logits is None and clone.last_state is None
        torch.testing.assert_close(clone(x.detach()), layer(x.detach()))
        torch.save(layer, tmp_path / "layer.pt")
        loaded = torch.load(tmp_path / "layer.pt", weights_only=False)
        torch.testing.assert_close(loaded(x.detach()), layer(x.detach()))
