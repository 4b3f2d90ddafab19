"""The AC transform against brute-force loops and the reference formula:
statistics, gradients, invalid clusters, EMA, equivariance, sync."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from clusterformers.moe import ACConfig, AdaptiveMetric, adaptive_metric
from clusterformers.moe.adaptive import cluster_dispersion, metric_from_dispersion, token_metric


@pytest.fixture(autouse=True)
def float64_default():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def brute_force(h, c, E, *, eps, tau, norm, global_ref, dispersion, min_count=2, mask_invalid=True, keep=None):
    """The AC transform written as plain Python loops over clusters, features and tokens."""
    T, d = h.shape
    rows = {}
    counts = []
    for k in range(E):
        members = [i for i in range(T) if int(c[i]) == k and (keep is None or bool(keep[i]))]
        counts.append(len(members))
        s_row = []
        for q in range(d):
            vals = [float(h[i, q]) for i in members]
            mu = sum(vals) / len(vals) if vals else 0.0
            if dispersion == "mad":
                s = sum(abs(v - mu) for v in vals) / len(vals) if vals else 0.0
            else:
                s = sum((v - mu) ** 2 for v in vals) / len(vals) if vals else 0.0
            s_row.append(s)
        rows[k] = s_row
    valid = [counts[k] >= min_count or not mask_invalid for k in range(E)]
    V = [k for k in range(E) if valid[k]]
    w = {k: [1.0 / (rows[k][q] + eps) for q in range(d)] for k in range(E)}
    w_bar = sum(w[k][q] for k in V for q in range(d)) / (len(V) * d)
    wc = {k: [min(w[k][q], tau * w_bar) for q in range(d)] for k in range(E)}
    m = torch.ones(E, d)
    for k in V:
        for q in range(d):
            if norm == "feature":
                m[k, q] = wc[k][q] / (sum(wc[j][q] for j in V) / len(V))
            elif global_ref == "pre_clamp":
                m[k, q] = wc[k][q] / w_bar
            else:
                m[k, q] = wc[k][q] / (sum(wc[j][p] for j in V for p in range(d)) / (len(V) * d))
    return torch.tensor([[rows[k][q] for q in range(d)] for k in range(E)]), torch.tensor(counts), m


def make_data(T=40, d=5, E=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = torch.arange(T) % E
    scale = 0.05 + torch.rand(E, d, generator=g, dtype=torch.float64)
    h = torch.randn(T, d, generator=g, dtype=torch.float64) * scale[c]
    return h + 3 * torch.randn(E, d, generator=g, dtype=torch.float64)[c], c


@pytest.mark.parametrize("dispersion", ["mad", "var"])
@pytest.mark.parametrize(
    "norm,global_ref,tau", [("feature", "pre_clamp", 1.3), ("global", "pre_clamp", 1.4), ("global", "post_clamp", 1.2)]
)
def test_metric_equals_brute_force(dispersion, norm, global_ref, tau):
    h, c = make_data()
    kw = dict(eps=1e-2, tau=tau, norm=norm, global_ref=global_ref, dispersion=dispersion)
    s_ref, n_ref, m_ref = brute_force(h, c, 4, **kw)
    s, counts = cluster_dispersion(h, c, 4, dispersion=dispersion)
    torch.testing.assert_close(s, s_ref)
    torch.testing.assert_close(counts, n_ref.double())
    m = adaptive_metric(h, c, 4, **kw)
    torch.testing.assert_close(m, m_ref)
    assert not torch.equal(m, torch.ones_like(m))
    # the clamp is active in these settings, so the clamp and reference mean are really exercised
    w = 1 / (s + 1e-2)
    assert (w > tau * w.mean()).any()


def test_weights_before_normalisation():
    """With no clamp and global pre-clamp normalisation, m = w / mean(w): w itself is checked."""
    h, c = make_data(seed=3)
    s, _ = cluster_dispersion(h, c, 4)
    m = metric_from_dispersion(s, torch.ones(4, dtype=torch.bool), eps=0.1, tau=1e9, norm="global")
    w = 1 / (s + 0.1)
    torch.testing.assert_close(m, w / w.mean())


def test_metric_is_detached_and_gradients_hold_it_constant():
    from clusterformers.moe import ACRouter

    h, c = make_data(T=24, d=6, E=4, seed=1)
    h = h.clone().requires_grad_(True)
    m = adaptive_metric(h, c, 4)
    assert not m.requires_grad
    router = ACRouter(6, 4, 2, "lm").double()
    from clusterformers.moe import RoutingState

    prev = RoutingState(torch.stack([c, (c + 1) % 4], 1), torch.full((24, 2), 0.5), 24, 4)
    out = router(h, prev)
    assert not router.metric(h, prev.indices, prev.weights)[0].requires_grad
    loss = (out.weights * torch.arange(2.0)).sum() + out.logits.square().sum()
    gh, ge = torch.autograd.grad(loss, [h, router.embeddings])
    # the same computation with m as a constant
    h2 = h.detach().clone().requires_grad_(True)
    e = router.embeddings
    logits = (h2 * m[c]) @ torch.nn.functional.normalize(e, dim=1, eps=1e-4).t()
    top = logits.sort(1, descending=True).values[:, :2]
    loss2 = (torch.softmax(top, 1) * torch.arange(2.0)).sum() + logits.square().sum()
    gh2, ge2 = torch.autograd.grad(loss2, [h2, e])
    torch.testing.assert_close(gh, gh2)
    torch.testing.assert_close(ge, ge2)


def test_invalid_clusters_get_ones_and_leave_other_rows_unchanged():
    g = torch.Generator().manual_seed(2)
    c = torch.tensor([0] * 10 + [1] * 8 + [2] + [4] * 7)[torch.randperm(26, generator=g)]  # 2 singleton, 3 empty
    h = torch.randn(26, 3, generator=g) * torch.rand(5, 3, generator=g)[c] + torch.randn(5, 3, generator=g)[c]
    for norm, ref in [("feature", "pre_clamp"), ("global", "pre_clamp"), ("global", "post_clamp")]:
        m = adaptive_metric(h, c, 5, norm=norm, global_ref=ref, tau=1.5)
        assert torch.equal(m[2], torch.ones(3)) and torch.equal(m[3], torch.ones(3))
        keep = c != 2
        relabel = torch.tensor([0, 1, -1, -1, 2])[c[keep]]
        m_valid_only = adaptive_metric(h[keep], relabel, 3, norm=norm, global_ref=ref, tau=1.5)
        torch.testing.assert_close(m[[0, 1, 4]], m_valid_only)
        _, _, m_ref = brute_force(h, c, 5, eps=1e-4, tau=1.5, norm=norm, global_ref=ref, dispersion="mad")
        torch.testing.assert_close(m, m_ref)


def reference_compute_w_var(tokens, top_cluster, eps=1e-4, tau=10.0):
    """language-modeling/custom_gates.py ``compute_W_var`` (mad branch), rows sized by max(label) + 1."""
    n, d = tokens.shape
    k = int(top_cluster.max()) + 1
    mean = torch.zeros((k, d)).index_reduce(0, top_cluster, tokens, "mean", include_self=False)
    centered = torch.abs(tokens - mean[top_cluster, :])
    w_mad = torch.zeros((k, d)).index_reduce(0, top_cluster, centered, "mean", include_self=False)
    W = 1 / (w_mad + eps)
    W = torch.clamp(W, max=tau * W.mean())
    return W / W.mean(dim=0)


@pytest.mark.filterwarnings("ignore:index_reduce")
def test_mask_invalid_false_reproduces_reference_formula():
    g = torch.Generator().manual_seed(4)
    c = torch.tensor([0] * 9 + [1] * 6 + [3] + [4] * 5)  # 2 empty, 3 singleton; max label = E - 1
    h = torch.randn(21, 4, generator=g) * torch.rand(5, 4, generator=g)[c]
    m = adaptive_metric(h, c, 5, mask_invalid=False)
    torch.testing.assert_close(m, reference_compute_w_var(h, c))
    # masking changes the valid rows: the reference's empty/singleton rows inflate the normaliser
    assert not torch.allclose(adaptive_metric(h, c, 5)[0], m[0])


def test_key_padding_mask_equals_dropping_the_tokens():
    h, c = make_data(T=30, seed=5)
    keep = torch.rand(30, generator=torch.Generator().manual_seed(0)) > 0.3
    torch.testing.assert_close(adaptive_metric(h, c, 4, key_padding_mask=keep), adaptive_metric(h[keep], c[keep], 4))


def test_mixing():
    g = torch.Generator().manual_seed(6)
    metric = torch.rand(5, 3, generator=g) + 0.5
    idx = torch.stack([torch.randperm(5, generator=g)[:3] for _ in range(7)])
    w = torch.softmax(torch.randn(7, 3, generator=g), 1).sort(1, descending=True).values
    assert torch.equal(token_metric(metric, idx, w, 1), token_metric(metric, idx, w, None))
    assert torch.equal(token_metric(metric, idx, w, None), metric[idx[:, 0]])
    uniform = torch.full((7, 3), 1 / 3)
    torch.testing.assert_close(token_metric(metric, idx, uniform, 3), metric[idx].mean(1))
    # k' = 2 of a k = 3 state: the first two weights, renormalised
    pi = w[:, :2] / w[:, :2].sum(1, keepdim=True)
    torch.testing.assert_close(
        token_metric(metric, idx, w, 2), pi[:, :1] * metric[idx[:, 0]] + pi[:, 1:] * metric[idx[:, 1]]
    )


def test_batch_and_ema_statistics():
    h1, c1 = make_data(seed=7)
    h2, c2 = make_data(seed=8)
    h3, c3 = make_data(seed=9)
    w = torch.ones(40, 1)
    batch = AdaptiveMetric(4, 5, ACConfig()).double()
    ema = AdaptiveMetric(4, 5, ACConfig(stats="ema", momentum=1.0)).double()
    # training: both use the batch statistics
    for h, c in [(h1, c1), (h2, c2)]:
        mb, sb = batch(h, c[:, None], w)
        me, se = ema(h, c[:, None], w)
        assert torch.equal(mb, me)
    ema.eval()
    m_eval, stats_eval = ema(h3, c3[:, None], w)
    assert torch.equal(stats_eval.metric, se.metric)  # momentum 1: the last batch's M
    assert torch.equal(m_eval, se.metric[c3])
    # momentum 0.1: a cluster's first valid batch sets the running value, later ones blend
    slow = AdaptiveMetric(4, 5, ACConfig(stats="ema")).double()
    slow(h1, c1[:, None], w)
    slow(h2, c2[:, None], w)
    slow.commit()  # a forward folds in the previous forward's batch; commit() the last one
    s1, _ = cluster_dispersion(h1, c1, 4)
    s2, _ = cluster_dispersion(h2, c2, 4)
    torch.testing.assert_close(slow.running_dispersion, 0.9 * s1 + 0.1 * s2)


def test_ema_never_valid_clusters_get_ones_in_eval():
    h, c = make_data(seed=10)
    c = torch.where(c == 3, 0, c)  # expert 3 never seen
    ema = AdaptiveMetric(4, 5, ACConfig(stats="ema")).double()
    ema(h, c[:, None], torch.ones(40, 1))
    ema.eval()
    _, stats = ema(h, c[:, None], torch.ones(40, 1))
    assert stats.valid.tolist() == [True, True, True, False]
    assert torch.equal(stats.metric[3], torch.ones(5))


def test_eval_output_depends_on_other_tokens_only_in_batch_mode():
    from clusterformers.moe import ACRouter, RoutingState

    h, c = make_data(seed=11)
    prev = RoutingState(c[:, None], torch.ones(40, 1), 40, 4)
    half = RoutingState(c[:20, None], torch.ones(20, 1), 20, 4)
    for stats, independent in [("ema", True), ("batch", False)]:
        router = ACRouter(5, 4, 2, ACConfig.preset("lm", stats=stats)).double()
        router(h, prev)  # one training step fills the EMA
        router.eval()
        full, part = router(h, prev), router(h[:20], half)
        assert torch.allclose(full.logits[:20], part.logits) == independent


def test_permutation_equivariance():
    from clusterformers.moe import ACRouter, RoutingState

    h, c = make_data(seed=12)
    w = torch.softmax(torch.randn(40, 2), 1).sort(1, descending=True).values
    idx = torch.stack([c, (c + 1) % 4], 1)
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(1))
    for ac in ["lm", "swin", ACConfig.preset("lm", mix=2)]:
        router = ACRouter(5, 4, 2, ac).double()
        out = router(h, RoutingState(idx, w, 40, 4))
        out_p = router(h[perm], RoutingState(idx[perm], w[perm], 40, 4))
        torch.testing.assert_close(out_p.logits, out.logits[perm])
        torch.testing.assert_close(out_p.weights, out.weights[perm])
        assert torch.equal(out_p.indices, out.indices[perm])


def test_presets_and_config_validation():
    lm, swin, soft = ACConfig.preset("lm"), ACConfig.preset("swin"), ACConfig.preset("softmoe")
    assert (lm.eps, lm.tau, lm.norm, lm.apply_to, lm.mix) == (1e-4, 10.0, "feature", "router", None)
    assert (swin.eps, swin.tau, swin.norm, swin.global_ref, swin.apply_to) == (
        1e-4,
        1.5,
        "global",
        "pre_clamp",
        "moe_input",
    )
    assert (soft.eps, soft.tau, soft.norm, soft.global_ref, soft.mix) == (0.35, 5.0, "global", "post_clamp", 8)
    assert all(p.dispersion == "mad" and p.min_count == 2 and p.stats == "ema" for p in (lm, swin, soft))
    assert ACConfig.preset("lm", stats="ema").stats == "ema"
    with pytest.raises(ValueError, match="preset"):
        ACConfig.preset("vit")
    for field, value in [("dispersion", "std"), ("norm", "row"), ("eps", 0.0), ("mix", 0), ("momentum", 0.0)]:
        with pytest.raises(ValueError, match=field):
            dataclasses.replace(lm, **{field: value})


def _sync_worker(rank: int, world: int, init: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        h, c = make_data(T=40, d=5, E=4, seed=13)
        keep = torch.arange(40) % 7 != 0
        part = slice(rank * 20, rank * 20 + 20)
        m = adaptive_metric(h[part], c[part], 4, key_padding_mask=keep[part], sync_stats=True, tau=1.5, norm="global")
        torch.save(m, f"{out_dir}/m{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_sync_stats_on_two_gloo_ranks_gives_the_concatenated_batch(tmp_path):
    mp.spawn(_sync_worker, args=(2, f"file://{tmp_path}/init", str(tmp_path)), nprocs=2, join=True)
    h, c = make_data(T=40, d=5, E=4, seed=13)
    keep = torch.arange(40) % 7 != 0
    full = adaptive_metric(h, c, 4, key_padding_mask=keep, tau=1.5, norm="global")
    local = adaptive_metric(h[:20], c[:20], 4, key_padding_mask=keep[:20], tau=1.5, norm="global")
    for rank in range(2):
        m = torch.load(tmp_path / f"m{rank}.pt")
        torch.testing.assert_close(m, full)
    assert not torch.allclose(local, full)
