"""SparseFARE's sorted implementation against its dense reference, LSH bucketing and memory."""

from __future__ import annotations

import pytest
import torch

from clusterformers.bench.cost import LiveTensorTracker, loss_step, make_loss, peak_bytes
from clusterformers.contrastive import (
    LogWeightBlocks,
    LSHConfig,
    SparseFARELoss,
    build_block_plan,
    draw_rotations,
    fare,
    hash_buckets,
    sparse,
    sparse_fare,
    support_mask,
    weighted_nce,
)
from clusterformers.contrastive.diagnostics import average_ranks, weighting_diagnostics
from clusterformers.contrastive.lsh import block_pairs, buckets_for_batch
from clusterformers.contrastive.nce import blockwise_nce

D64 = torch.float64


def _inputs(b, seed=0, s=3, d=6, d_k=4):
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(b, d, generator=g, dtype=D64).requires_grad_(True)
    z2 = torch.randn(b, d, generator=g, dtype=D64).requires_grad_(True)
    c = torch.rand(b, s, generator=g, dtype=D64)
    w_q = torch.randn(d_k, s, generator=g, dtype=D64).requires_grad_(True)
    w_k = torch.randn(d_k, s, generator=g, dtype=D64).requires_grad_(True)
    return z1, z2, c, w_q, w_k


# ---- oracle 5: sorted = dense -------------------------------------------------------------------------------


@pytest.fixture(params=["plan", "walk"])
def sorted_path(request, monkeypatch):
    """Both sorted implementations at test sizes: the tile plan (small buckets) and the walk over blocks of
    anchors sorted by bucket (large buckets), here in blocks of 8 anchors."""
    monkeypatch.setattr(sparse, "WALK_MIN_BUCKET", 1 if request.param == "walk" else 10**9)
    monkeypatch.setattr(sparse, "CHUNK_AUTO_ROWS", 8)
    return request.param


@pytest.mark.parametrize(
    "options",
    [
        {"lsh": LSHConfig(n_buckets=4)},
        {"lsh": LSHConfig(n_buckets=8, neighbours=1)},
        {"lsh": LSHConfig(n_buckets=6, neighbours=2), "score": "neg_sqdist"},
        {"lsh": LSHConfig(bucket_size=5, neighbours=1), "mask_self": False},
        {"lsh": LSHConfig(n_buckets=4, hash_on="keys"), "negatives": "cross", "symmetric": False},
        {"lsh": LSHConfig(n_buckets=16), "neg_scale": "none"},  # many singleton buckets: fallback rows
    ],
)
def test_sorted_equals_dense_values_and_gradients(options, sorted_path):
    z1, z2, c, w_q, w_k = _inputs(37)
    out = {}
    for impl in ("sorted", "dense"):
        loss, stats = sparse_fare(
            z1, z2, c, w_q, w_k, impl=impl, generator=torch.Generator().manual_seed(3), return_stats=True, **options
        )
        out[impl] = (loss, torch.autograd.grad(loss, [z1, z2, w_q, w_k]), stats)
    assert out["sorted"][0].item() == pytest.approx(out["dense"][0].item(), rel=1e-12)
    for gs, gd in zip(out["sorted"][1], out["dense"][1], strict=True):
        assert torch.allclose(gs, gd, rtol=1e-9, atol=1e-12)
    for key in ("support", "fallback_rows", "spearman", "dist_ratio"):
        assert out["sorted"][2][key] == pytest.approx(out["dense"][2][key], rel=1e-12, nan_ok=True)


def test_sorted_equals_dense_random_sweep_with_empty_probes_and_fallbacks(sorted_path):
    z1, z2, c, w_q, w_k = _inputs(11, seed=5)
    fallbacks = 0
    for seed in range(24):
        lsh = LSHConfig(n_buckets=(4, 8, 16)[seed % 3], neighbours=seed % 3)
        options = {"lsh": lsh, "mask_self": seed % 2 == 0}
        values = []
        for impl in ("sorted", "dense"):
            gen = torch.Generator().manual_seed(seed)
            loss, stats = sparse_fare(z1, z2, c, w_q, w_k, impl=impl, generator=gen, return_stats=True, **options)
            values.append((loss.item(), torch.autograd.grad(loss, w_q)[0]))
        fallbacks += stats["fallback_rows"]
        assert values[0][0] == pytest.approx(values[1][0], rel=1e-12), (seed, options)
        assert torch.allclose(values[0][1], values[1][1], rtol=1e-9, atol=1e-12)
    assert fallbacks > 0


def test_sorted_with_fallback_and_small_tiles_matches_fare_rows(sorted_path):
    z1, z2, c, w_q, w_k = _inputs(12)
    buckets = torch.tensor([0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3])
    dense = sparse_fare(z1, z2, c, w_q, w_k, buckets=buckets, impl="dense")
    sorted_ = sparse_fare(z1, z2, c, w_q, w_k, buckets=buckets)
    assert sorted_.item() == pytest.approx(dense.item(), rel=1e-12)
    plan = build_block_plan(buckets, buckets[:, None], 4, tile=2)  # tiles smaller than the bucket
    assert plan.fallback.tolist() == [False] * 9 + [True] * 3 and plan.support.tolist() == [8] * 9 + [11] * 3
    pairs = {(int(q), int(k)) for t in range(plan.invalid.shape[0])
             for q, row in zip(plan.query_idx[t], plan.invalid[t], strict=True)
             for k, bad in zip(plan.key_idx[t], row, strict=True) if not bad}
    mask, _ = support_mask(buckets[None], buckets[None, :, None])
    assert pairs == {(i, j) for i in range(12) for j in range(12) if mask[i, j]}


def test_walk_is_the_default_for_large_buckets_and_equals_dense(monkeypatch):
    """b = 2,048 with the default 4 buckets: the walk (blocks of 512 anchors), against the dense reference."""
    z1, z2, c, w_q, w_k = _inputs(2048, seed=1)
    walks, walk = [], sparse._sparse_fare_walk
    monkeypatch.setattr(sparse, "_sparse_fare_walk", lambda *args: walks.append(len(args)) or walk(*args))
    out = {}
    for impl in ("sorted", "dense"):
        gen = torch.Generator().manual_seed(0)
        loss, stats = sparse_fare(z1, z2, c, w_q, w_k, impl=impl, generator=gen, return_stats=True,
                                  diagnostics=False)
        out[impl] = (loss, torch.autograd.grad(loss, [z1, w_q]), stats)
    assert out["sorted"][0].item() == pytest.approx(out["dense"][0].item(), rel=1e-12)
    for gs, gd in zip(out["sorted"][1], out["dense"][1], strict=True):
        assert torch.allclose(gs, gd, rtol=1e-9, atol=1e-14)
    assert out["sorted"][2]["support"] == out["dense"][2]["support"] > 400
    assert len(walks) == 1  # the sorted call walked (the dense one does not)


def test_block_pairs_are_the_blocks_that_meet_in_the_support():
    """Brute force over the dense support; and a walk that skips one of the pairs gives a different loss."""
    g = torch.Generator().manual_seed(0)
    for neighbours, n_b in ((0, 4), (1, 6), (0, 16)):
        z = torch.randn(40, 3, generator=g, dtype=D64)
        bucket, probe = hash_buckets(z, draw_rotations(3, n_b, generator=g, dtype=D64), neighbours)
        order = torch.argsort(bucket[0], stable=True)
        bucket, probe = bucket[:, order], probe[:, order]
        mask, fallback = support_mask(bucket, probe)
        mask = mask | mask.T | torch.eye(40, dtype=torch.bool)  # a block always meets itself (its own bucket)
        pairs, inside = block_pairs(bucket[0], probe[0], fallback, n_b, 6)
        blocks = range(0, 40, 6)
        want = [(i, j) for i in blocks for j in blocks if i <= j and mask[i : i + 6, j : j + 6].any()]
        assert [(r.start, c.start) for r, c in pairs] == want
        assert (n_b == 16) == bool(fallback.any()) and len(want) < 28
        # the tiles inside the support: every anchor of the rows probes every column's bucket, or falls back
        hit = (probe[0][:, :, None] == bucket[0][None, None, :]).any(dim=1) | fallback[:, None]
        visited = {*want, *((j, i) for i, j in want)}
        assert inside == {(i, j) for i, j in visited if hit[i : i + 6, j : j + 6].all()}
        assert 0 < len(inside) < len(visited) or n_b == 16
    z1, z2, _, _, _ = _inputs(12)
    lw = torch.randn(12, 12, generator=g, dtype=D64).masked_fill(~torch.eye(12, dtype=torch.bool).roll(1, 1),
                                                                  float("-inf"))  # W[i, i+1] only

    def block(lw, rows, cols):
        return lw[rows, cols]

    dense = weighted_nce(z1, z2, lw).item()
    halves = [slice(0, 6), slice(6, 12)]
    every = [(halves[0], halves[0]), (halves[0], halves[1]), (halves[1], halves[1])]
    assert blockwise_nce(z1, z2, block, (lw,), 6, pairs=every).item() == pytest.approx(dense, rel=1e-12)
    assert blockwise_nce(z1, z2, block, (lw,), 6, pairs=every[::2]).item() != pytest.approx(dense, rel=1e-3)


def test_block_weights_gradcheck_against_dense_weights():
    z1, z2, _, _, _ = _inputs(9)
    buckets = torch.tensor([0, 1, 0, 1, 2, 0, 1, 2, 0])
    plan = build_block_plan(buckets, buckets[:, None], 3, tile=2, allow_self=True)
    tile_w = torch.randn(plan.invalid.shape, generator=torch.Generator().manual_seed(0), dtype=D64)
    tile_w = tile_w.masked_fill(plan.invalid, float("-inf")).requires_grad_(True)

    def blocks(a, c, lw):
        return weighted_nce(a, c, LogWeightBlocks(plan.query_idx, plan.key_idx, lw), 0.5)

    assert torch.autograd.gradcheck(blocks, (z1, z2, tile_w))
    dense = torch.full((9, 9), float("-inf"), dtype=D64)
    ok = ~plan.invalid
    rows = plan.query_idx[:, :, None].expand_as(ok)[ok]
    cols = plan.key_idx[:, None, :].expand_as(ok)[ok]
    dense[rows, cols] = tile_w.detach()[ok]
    assert blocks(z1, z2, tile_w).item() == pytest.approx(weighted_nce(z1, z2, dense, 0.5).item(), rel=1e-12)


def test_n_hashes_dense_union_of_rounds():
    z1, z2, c, w_q, w_k = _inputs(20)
    gen = torch.Generator().manual_seed(1)
    loss = sparse_fare(z1, z2, c, w_q, w_k, impl="dense", lsh=LSHConfig(n_buckets=8, n_hashes=3), generator=gen)
    zh = (c - c.mean(0)) / (c.std(0, unbiased=False) + 1e-6)
    rot = draw_rotations(3, 8, 3, generator=torch.Generator().manual_seed(1), dtype=D64)
    buckets, probes = hash_buckets(zh, rot)
    rounds = [buckets[r][:, None] == buckets[r][None, :] for r in range(3)]
    union = (rounds[0] | rounds[1] | rounds[2]).fill_diagonal_(False)
    att = ((zh @ w_q.T) @ (zh @ w_k.T).T / 1.0).masked_fill(~union, float("-inf"))
    log_w = torch.log(torch.tensor(19.0, dtype=D64)) + torch.log_softmax(att, 1)
    assert loss.item() == pytest.approx(weighted_nce(z1, z2, log_w).item(), rel=1e-12)


def test_sparse_fare_loss_module_int_groups_are_buckets():
    z1, z2, c, _, _ = _inputs(10)
    groups = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    loss_fn = SparseFARELoss(3).double()
    onehot = torch.nn.functional.one_hot(groups, 3).double()
    direct = sparse_fare(z1, z2, onehot, loss_fn.w_q, loss_fn.w_k, buckets=groups)
    assert loss_fn(z1, z2, groups).item() == pytest.approx(direct.item(), rel=1e-12)
    with pytest.raises(ValueError, match="neighbours"):
        SparseFARELoss(3, neighbours=1).double()(z1, z2, groups)


# ---- oracle 9: LSH ------------------------------------------------------------------------------------------


def test_lsh_seeded_and_scale_invariant():
    z = torch.randn(200, 3, generator=torch.Generator().manual_seed(0), dtype=D64)
    zc = z - z.mean(0)
    rot = draw_rotations(3, 8, 2, generator=torch.Generator().manual_seed(4))
    again = draw_rotations(3, 8, 2, generator=torch.Generator().manual_seed(4))
    assert torch.equal(rot, again)
    b1, p1 = hash_buckets(zc, rot, neighbours=2)
    for scale in (1e-3, 0.5, 7.0, 1e4):
        b2, p2 = hash_buckets(zc * scale, again, neighbours=2)
        assert torch.equal(b1, b2) and torch.equal(p1, p2)
    assert torch.equal(p1[..., 0], b1) and b1.min() >= 0 and b1.max() < 8
    assert (p1.sort(-1).values.diff(dim=-1) > 0).all()  # distinct probes
    # probes are the top entries of [zR; -zR]
    proj = torch.cat([zc.float() @ rot[0], -(zc.float() @ rot[0])], 1)
    assert torch.equal(b1[0], proj.argmax(1))


def test_unit_rotations_balance_buckets():
    z = torch.randn(20000, 3, generator=torch.Generator().manual_seed(0))
    for n_b in (4, 64):
        rot = draw_rotations(3, n_b, generator=torch.Generator().manual_seed(1))
        counts = torch.bincount(hash_buckets(z, rot)[0][0], minlength=n_b).double() / 20000
        assert n_b * (counts**2).sum() < 1.6  # balanced cells: n_b Σ p² ≈ 1 (raw N(0,1) columns: ≫ 1)
    assert buckets_for_batch(1024, 4, 64) == 16 and buckets_for_batch(100, 4, 64) == 2
    assert buckets_for_batch(100, 4, None) == 4


def test_sparse_fare_eval_seed_and_permutation_with_neighbours():
    z1, z2, c, _, _ = _inputs(30)
    loss_fn = SparseFARELoss(3, n_buckets=6, neighbours=1, eval_seed=3).double().eval()
    perm = torch.randperm(30, generator=torch.Generator().manual_seed(2))
    assert loss_fn(z1[perm], z2[perm], c[perm]).item() == pytest.approx(loss_fn(z1, z2, c).item(), rel=1e-12)


def test_n_buckets_one_module_equals_fare():
    z1, z2, c, _, _ = _inputs(15)
    loss_fn = SparseFARELoss(3, n_buckets=1).double()
    ref = fare(z1, z2, c, loss_fn.w_q, loss_fn.w_k)
    assert loss_fn(z1, z2, c).item() == pytest.approx(ref.item(), rel=1e-12)


# ---- D12 helpers --------------------------------------------------------------------------------------------


def test_average_ranks_and_spearman_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    x = torch.tensor([[3.0, 1.0, 3.0, 2.0, 5.0], [0.5, 0.5, 0.5, 0.1, 9.0]], dtype=D64)
    mask = torch.tensor([[True] * 5, [True, True, False, True, True]])
    ranks = average_ranks(x, mask)
    assert ranks[0].tolist() == (stats.rankdata(x[0]) - 1).tolist()
    assert ranks[1][mask[1]].tolist() == (stats.rankdata(x[1][mask[1]]) - 1).tolist()
    g = torch.Generator().manual_seed(0)
    w, d = torch.rand(4, 9, generator=g, dtype=D64), torch.rand(4, 9, generator=g, dtype=D64)
    support = torch.rand(4, 9, generator=g) > 0.2
    got = weighting_diagnostics(w, d, support)
    ref = sum(stats.spearmanr(w[i][support[i]], d[i][support[i]])[0] for i in range(4)) / 4
    assert got["spearman"] == pytest.approx(ref, rel=1e-10)
    p = w * support / (w * support).sum(1, keepdim=True)
    ratio = ((p * d).sum(1) / ((d * support).sum(1) / support.sum(1))).mean()
    assert got["dist_ratio"] == pytest.approx(ratio.item(), rel=1e-12)


# ---- oracle 10: memory ---------------------------------------------------------------------------------------


def test_live_tensor_tracker_counts_storages():
    keep = torch.ones(10)
    with LiveTensorTracker() as tracker:
        a = torch.empty(1000, dtype=D64)  # 8,000 bytes
        b = a * 2  # 16,000
        view = b.view(10, 100)  # same storage
        del a
        c = torch.empty(500, dtype=D64)  # 8,000 + 4,000
        keep.add_(1)  # in-place on an outside tensor: not counted
        del b
    assert tracker.peak == 16000 and tracker.current == 12000
    del view, c
    assert tracker.current == 0
    x = torch.randn(64, 8, requires_grad=True)
    with LiveTensorTracker() as tracker:
        y = (x * 3).exp().sum()  # x * 3 dies at once; exp's output lives on, saved by autograd for backward
        held = tracker.current
    assert held == 64 * 8 * 4 + 4  # the saved exp output and the scalar y
    del y
    assert tracker.current == 0


def test_sparse_memory_grows_linearly_fare_quadratically_up_to_1024_then_linearly():
    def peak(name, b, dtype=D64):
        torch.manual_seed(0)
        return peak_bytes(loss_step(make_loss(name), b, dtype=dtype), "cpu")

    sparse_growth = peak("sparse_fare", 4096) / peak("sparse_fare", 1024)  # bucket_size=64, Gaussian z
    dense = peak("fare", 1024, torch.float32) / peak("fare", 256, torch.float32)  # FARE is dense up to b = 1024
    blocked = peak("fare", 4096, torch.float32) / peak("fare", 2048, torch.float32)  # then row blocks of 512
    assert sparse_growth <= 6.0
    assert dense >= 12.0
    assert blocked <= 2.5
