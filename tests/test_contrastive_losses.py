"""The five fair contrastive losses against slow references (CPU, fp64).

The reference ``slow_loss`` is a literal double loop over anchors and negatives in Python floats.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F

from clusterformers.contrastive import (
    CCLKLoss,
    FairInfoNCELoss,
    FARELoss,
    GridDiscretizer,
    InfoNCELoss,
    KMeansDiscretizer,
    LSHConfig,
    SparseFARELoss,
    cclk,
    cclk_weights,
    fair_info_nce,
    fare,
    info_nce,
    sensitive_kernel,
    sparse_fare,
    weighted_nce,
)
from clusterformers.contrastive.kernels import median_bandwidth
from clusterformers.contrastive.nce import blockwise_nce, segment_logsumexp

D64 = torch.float64


def slow_loss(z1, z2, w, tau=0.1, beta=1.0, symmetric=True):
    """Spec §2 literally: ℓ¹_i, ℓ²_i with weights w[i][j] (w[i][i] weights the extra e^{S_ii} term)."""
    u = F.normalize(z1, dim=1).tolist()
    v = F.normalize(z2, dim=1).tolist()
    b = len(u)

    def dot(a, c):
        return sum(x * y for x, y in zip(a, c, strict=True)) / tau

    total, count = 0.0, 0
    for i in range(b):
        for anchor, other in ((u, v), (v, u)):
            pos = dot(anchor[i], other[i])
            s = math.exp(pos)
            for j in range(b):
                s += float(w[i][j]) * math.exp(dot(anchor[i], other[j]))
                if j != i:
                    s += beta * float(w[i][j]) * math.exp(dot(anchor[i], anchor[j]))
            total += -pos + math.log(s)
            count += 1
            if not symmetric:
                break
    return total / count


def off_diag(b, value=1.0):
    return [[0.0 if i == j else value for j in range(b)] for i in range(b)]


def embeddings(b=6, d=5, seed=0, dtype=D64):
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(b, d, generator=g, dtype=dtype).requires_grad_(True)
    z2 = torch.randn(b, d, generator=g, dtype=dtype).requires_grad_(True)
    return z1, z2


def colours(b=6, s=3, seed=1):
    return torch.rand(b, s, generator=torch.Generator().manual_seed(seed), dtype=D64)


def projections(d_k=4, s=3, seed=2):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(d_k, s, generator=g, dtype=D64).requires_grad_(True),
            torch.randn(d_k, s, generator=g, dtype=D64).requires_grad_(True))


# ---- oracle 1: InfoNCE ---------------------------------------------------------------------------------


@pytest.mark.parametrize("negatives,symmetric", [("both", True), ("cross", True), ("both", False), ("cross", False)])
def test_info_nce_matches_loop(negatives, symmetric):
    z1, z2 = embeddings()
    got = info_nce(z1, z2, negatives=negatives, symmetric=symmetric)
    ref = slow_loss(z1, z2, off_diag(6), beta=1.0 if negatives == "both" else 0.0, symmetric=symmetric)
    assert got.item() == pytest.approx(ref, rel=1e-12)


def test_info_nce_matches_cross_entropy_on_masked_matrix():
    z1, z2 = embeddings(b=7)
    x = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = (x @ x.T / 0.1).fill_diagonal_(float("-inf"))
    targets = torch.cat([torch.arange(7, 14), torch.arange(7)])
    assert InfoNCELoss()(z1, z2).item() == pytest.approx(F.cross_entropy(logits, targets).item(), rel=1e-12)


def test_weighted_nce_general_weights_and_gradients_match_loop():
    z1, z2 = embeddings(b=5)
    w = torch.rand(5, 5, generator=torch.Generator().manual_seed(3), dtype=D64)
    w[0, 3] = 0.0
    log_w = torch.log(w)  # finite diagonal: the extra e^{S_ii} term
    got = weighted_nce(z1, z2, log_w, temperature=0.3)
    assert got.item() == pytest.approx(slow_loss(z1, z2, w.tolist(), tau=0.3), rel=1e-12)
    log_w.requires_grad_(True)
    for negatives in ("both", "cross"):
        loss = functools.partial(weighted_nce, temperature=0.3, negatives=negatives)
        assert torch.autograd.gradcheck(loss, (z1, z2, log_w))


def test_segment_logsumexp_matches_logsumexp_and_is_nan_free():
    x = torch.randn(3, 4, dtype=D64, requires_grad=True)
    masked = x.masked_fill(torch.tensor([[False] * 4, [True] * 4, [False, True, False, True]]), float("-inf"))
    index = torch.tensor([0, 1, 0])
    extra = torch.tensor([0.5, -1.0], dtype=D64, requires_grad=True)
    out = segment_logsumexp(masked, index, 2, extra)
    ref0 = torch.logsumexp(torch.cat([masked[0], masked[2, [0, 2]], extra[:1]]), 0)
    assert out[0].item() == pytest.approx(ref0.item(), rel=1e-12)
    assert out[1].item() == pytest.approx(-1.0, rel=1e-12)
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and (x.grad[1] == 0).all()
    empty = segment_logsumexp(torch.full((1, 3), float("-inf"), dtype=D64), torch.tensor([0]), 2)
    assert torch.isneginf(empty).all()


def test_blockwise_row_softmax_weights_equal_the_dense_log_softmax():
    """``softmax_shift``: the blocks are scores, each anchor's normaliser is summed in the tile walk. Loss and
    gradients (embeddings and scores) equal ``weighted_nce`` on ``shift + log_softmax(scores)``, also for an
    anchor whose scores are all ``-inf`` (no negatives: zero loss, zero gradient) and a finite diagonal."""
    z1, z2 = embeddings(b=11, seed=4)
    scores = torch.randn(11, 11, generator=torch.Generator().manual_seed(5), dtype=D64)
    scores[:, 2] = float("-inf")  # nobody's negative
    scores[4] = float("-inf")  # no negatives at all
    scores.requires_grad_(True)
    shift = math.log(10)
    empty = torch.isneginf(scores.detach()).all(dim=1, keepdim=True)  # log_softmax there is NaN; its W is 0

    def block(s, rows, cols):
        return s[rows, cols]

    for negatives in ("both", "cross"):
        log_w = (shift + torch.log_softmax(scores, dim=1)).masked_fill(empty, float("-inf"))
        dense = weighted_nce(z1, z2, log_w, temperature=0.3, negatives=negatives)
        want = torch.autograd.grad(dense, (z1, z2, scores))
        for chunk in (4, 11):  # blocks of 4, 4, 3 anchors; one block
            got = blockwise_nce(z1, z2, block, (scores,), chunk, temperature=0.3, negatives=negatives,
                                softmax_shift=shift)
            assert got.item() == pytest.approx(dense.item(), rel=1e-12)
            *grads, grad_scores = torch.autograd.grad(got, (z1, z2, scores))
            for a, c in zip(grads, want):
                torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-12)
            # the dense log_softmax's gradient is NaN on the empty row; ours is zero there
            torch.testing.assert_close(grad_scores[~empty[:, 0]], want[2][~empty[:, 0]], rtol=1e-10, atol=1e-12)
            assert (grad_scores[4] == 0).all()
    # the normaliser is taken: unnormalised scores as log W give another loss
    plain = blockwise_nce(z1, z2, block, (scores.detach() + shift,), 4, temperature=0.3)
    assert plain.item() != pytest.approx(dense.item(), rel=1e-3)


# ---- oracles 2, 3, 6: FARE and Fair-InfoNCE reduce to InfoNCE; literal Eq. 13 ------------------------------


@pytest.mark.parametrize("negatives", ["both", "cross"])
def test_fare_with_zero_query_is_info_nce(negatives):
    z1, z2 = embeddings()
    w_q, w_k = projections()
    got = fare(z1, z2, colours(), torch.zeros_like(w_q), w_k, negatives=negatives)
    assert got.item() == pytest.approx(info_nce(z1, z2, negatives=negatives).item(), rel=1e-12)
    loss_fn = FARELoss(3, negatives=negatives).double()
    with torch.no_grad():
        loss_fn.w_q.zero_()
    assert loss_fn(z1, z2, colours()).item() == pytest.approx(info_nce(z1, z2, negatives=negatives).item(), rel=1e-12)


def test_fair_info_nce_one_group_is_info_nce_and_groups_match_loop():
    z1, z2 = embeddings()
    one = torch.zeros(6, dtype=torch.long)
    assert fair_info_nce(z1, z2, one).item() == pytest.approx(info_nce(z1, z2).item(), rel=1e-12)
    groups = torch.tensor([0, 1, 0, 2, 1, 0])
    w = [[1.0 if i != j and groups[i] == groups[j] else 0.0 for j in range(6)] for i in range(6)]
    assert FairInfoNCELoss()(z1, z2, groups).item() == pytest.approx(slow_loss(z1, z2, w), rel=1e-12)


def test_fair_info_nce_float_attribute_uses_fitted_discretizer():
    z1, z2 = embeddings()
    c = torch.tensor([[0.1], [0.9], [0.2], [0.8], [0.15], [0.85]], dtype=D64)
    grid = GridDiscretizer([[0.5]])
    assert grid(c).tolist() == [0, 1, 0, 1, 0, 1]
    km = KMeansDiscretizer(k=2, seed=0).fit(c)
    expected = fair_info_nce(z1, z2, torch.tensor([0, 1, 0, 1, 0, 1])).item()
    assert fair_info_nce(z1, z2, c, discretizer=grid).item() == pytest.approx(expected, rel=1e-12)
    assert FairInfoNCELoss(discretizer=km)(z1, z2, c[:, 0]).item() == pytest.approx(expected, rel=1e-12)


def test_literal_eq13_matches_loop():
    z1, z2 = embeddings()
    c, (w_q, w_k) = colours(), projections()
    rho = 1.7
    got = fare(z1, z2, c, w_q, w_k, rho=rho, mask_self=False, neg_scale="none", negatives="cross", symmetric=False)
    zh = ((c - c.mean(0)) / (c.std(0, unbiased=False) + 1e-6)).tolist()
    wq, wk = w_q.tolist(), w_k.tolist()

    def proj(w, z):
        return [sum(w[a][s] * z[s] for s in range(3)) for a in range(len(w))]

    q = [proj(wq, z) for z in zh]
    k = [proj(wk, z) for z in zh]
    p = []
    for i in range(6):
        sc = [math.exp(sum(x * y for x, y in zip(q[i], k[j], strict=True)) / rho) for j in range(6)]
        p.append([x / sum(sc) for x in sc])
    assert got.item() == pytest.approx(slow_loss(z1, z2, p, beta=0.0, symmetric=False), rel=1e-11)


def test_fare_default_matches_loop_and_trains_projections():
    z1, z2 = embeddings()
    c, (w_q, w_k) = colours(), projections()
    got = fare(z1, z2, c, w_q, w_k, score="neg_sqdist")  # the default rho = 1
    zh = (c - c.mean(0)) / (c.std(0, unbiased=False) + 1e-6)
    q, k = zh @ w_q.T, zh @ w_k.T
    att = -torch.cdist(q, k) ** 2 / (2 * 1.0)
    # rho=None is the former default sqrt(d_k) (d_k = 4 here)
    assert fare(z1, z2, c, w_q, w_k, rho=None).item() == pytest.approx(fare(z1, z2, c, w_q, w_k, rho=2.0).item())
    assert fare(z1, z2, c, w_q, w_k).item() != pytest.approx(fare(z1, z2, c, w_q, w_k, rho=None).item())
    p = [[0.0] * 6 for _ in range(6)]
    for i in range(6):
        den = sum(math.exp(att[i, j].item()) for j in range(6) if j != i)
        for j in range(6):
            p[i][j] = 0.0 if j == i else 5 * math.exp(att[i, j].item()) / den
    assert got.item() == pytest.approx(slow_loss(z1, z2, p), rel=1e-11)
    got.backward()
    assert w_q.grad.abs().sum() > 0 and w_k.grad.abs().sum() > 0


def test_fare_fixed_projections_and_int_groups():
    loss_fn = FARELoss(3, learn_projections=False, rho=0.25).double()
    assert list(loss_fn.parameters()) == [] and torch.equal(loss_fn.w_q, torch.eye(3, dtype=D64))
    z1, z2 = embeddings()
    groups = torch.tensor([0, 1, 2, 0, 1, 2])
    onehot = F.one_hot(groups, 3).double()
    assert loss_fn(z1, z2, groups).item() == pytest.approx(loss_fn(z1, z2, onehot).item(), rel=1e-12)


# ---- oracle 4: CCLK --------------------------------------------------------------------------------------


def test_cclk_identical_attributes_cosine():
    b, lam = 6, 0.01
    z1, z2 = embeddings(b)
    c = torch.tensor([[0.3, 0.5, 0.2]], dtype=D64).repeat(b, 1)
    w = cclk_weights(c, kernel="cosine", lam=lam)
    assert torch.allclose(w, torch.tensor(off_diag(b, (b - 1) / (b + lam)), dtype=D64), rtol=1e-10)
    ref = slow_loss(z1, z2, off_diag(b, (b - 1) / (b + lam)))
    assert cclk(z1, z2, c, lam=lam).item() == pytest.approx(ref, rel=1e-10)


def test_cclk_large_lambda_tends_to_kernel_weights():
    b = 6
    z1, z2 = embeddings(b)
    c = colours(b)
    k = sensitive_kernel(c, "rbf", 0.5)
    for lam in (1e3, 1e5):
        w = cclk_weights(c, kernel="rbf", lam=lam, bandwidth=0.5, clip=None) * lam / (b - 1)
        err = (w - k.T.fill_diagonal_(0)).abs().max().item()
        assert err < 2 * b * k.abs().max().item() ** 2 / lam
    scaled = torch.log(cclk_weights(c, kernel="rbf", lam=1e6, bandwidth=0.5, clip=None) * 1e6 / (b - 1))
    kernel_weighted = weighted_nce(z1, z2, torch.log(k.clone().fill_diagonal_(0)))
    assert weighted_nce(z1, z2, scaled).item() == pytest.approx(kernel_weighted.item(), rel=1e-4)
    assert abs(kernel_weighted.item() - info_nce(z1, z2).item()) > 1e-2  # rbf K_Z is not constant


def _cclk_release(z1, z2, cond, tau, kernel, lam, temp_z=1.0, clip=1e-6):
    """CCLK-release LinearCritic raw scores + ConditionalSamplingLoss('weac-infonce'), transcribed."""
    n = z1.shape[0]
    cos = torch.nn.CosineSimilarity(dim=-1)
    sim11 = cos(z1.unsqueeze(-2), z1.unsqueeze(-3)) / tau
    sim22 = cos(z2.unsqueeze(-2), z2.unsqueeze(-3)) / tau
    sim12 = cos(z1.unsqueeze(-2), z2.unsqueeze(-3)) / tau
    sim11[..., range(n), range(n)] = float("-inf")
    sim22[..., range(n), range(n)] = float("-inf")
    raw = torch.cat([torch.cat([sim12, sim11], -1), torch.cat([sim22, sim12.transpose(-1, -2)], -1)], -2)
    kxy, kxx = torch.exp(raw[:n, :n]), torch.exp(raw[:n, n:])
    kyy, kyx = torch.exp(raw[n:, :n]), torch.exp(raw[n:, n:])
    if kernel == "cosine":
        dist = cos(cond.unsqueeze(-2), cond.unsqueeze(-3))
    elif kernel == "rbf":
        sq = torch.sum(cond**2, axis=-1)
        dist = torch.exp(-1 / temp_z * (sq[:, None] + sq[None, :] - 2 * cond @ cond.T))
    elif kernel == "linear":
        dist = cond @ cond.T / temp_z
    elif kernel == "polynomial":
        dist = (cond @ cond.T) ** 3 / temp_z
    else:
        dist = torch.exp(-1 / temp_z * torch.sqrt(((cond[:, None] - cond[None, :]) ** 2).sum(-1)))
    dist[range(n), range(n)] = 1.0
    weight = torch.inverse(dist + lam * torch.eye(n, dtype=D64)) @ dist
    weight[range(n), range(n)] = 0.0
    weight[weight < clip] = 0.0
    mxy, mxx, myx, myy = kxy @ weight, kxx @ weight, kyx @ weight, kyy @ weight
    pos = torch.diagonal(raw[:n, :n])
    deno = torch.clamp(torch.exp(pos) + (n - 1) * (torch.diagonal(mxy) + torch.diagonal(mxx)), 1e-7, 1e20)
    loss_x = -(pos - torch.log(deno)).mean()
    pos = torch.diagonal(raw[n:, n:])
    deno = torch.clamp(torch.exp(pos) + (n - 1) * (torch.diagonal(myx) + torch.diagonal(myy)), 1e-7, 1e20)
    loss_y = -(pos - torch.log(deno)).mean()
    return (loss_x + loss_y) / 2


@pytest.mark.parametrize("kernel", ["cosine", "rbf", "laplacian", "linear", "polynomial"])
def test_cclk_matches_cclk_release_transcription(kernel):
    z1, z2 = embeddings(b=8, d=6)
    c = colours(8)
    got = CCLKLoss(kernel=kernel, lam=0.01, bandwidth=1.0, temperature=0.5)(z1, z2, c)
    ref = _cclk_release(z1, z2, c, 0.5, kernel, 0.01)
    assert got.item() == pytest.approx(ref.item(), rel=1e-9)
    g_ours = torch.autograd.grad(got, z1)[0]
    g_ref = torch.autograd.grad(_cclk_release(z1, z2, c, 0.5, kernel, 0.01), z1)[0]
    assert torch.allclose(g_ours, g_ref, rtol=1e-8, atol=1e-12)


def test_cclk_median_bandwidth():
    c = colours(7) * 255
    iu = torch.triu_indices(7, 7, 1)
    sq = ((c[:, None] - c[None]) ** 2).sum(-1)[iu[0], iu[1]]
    assert median_bandwidth(c, "rbf") == pytest.approx(sq.median().item())
    assert median_bandwidth(c, "laplacian") == pytest.approx(sq.sqrt().median().item())
    assert median_bandwidth(c, "cosine") == 1.0
    k = sensitive_kernel(c, "rbf")
    assert 0.05 < k[iu[0], iu[1]].median().item() < 0.9  # not the degenerate K_Z ≈ I of t = 1 on 0-255


# ---- oracle 5 (values): SparseFARE reductions ------------------------------------------------------------


def test_sparse_fare_one_bucket_is_fare():
    z1, z2 = embeddings(b=9)
    c, (w_q, w_k) = colours(9), projections()
    ref = fare(z1, z2, c, w_q, w_k).item()
    for impl in ("sorted", "dense"):
        got = sparse_fare(z1, z2, c, w_q, w_k, lsh=LSHConfig(n_buckets=1), impl=impl)
        assert got.item() == pytest.approx(ref, rel=1e-12)


def test_sparse_fare_uniform_on_given_buckets_is_scaled_fair_info_nce():
    b = 8
    z1, z2 = embeddings(b)
    w_q, w_k = projections()
    groups = torch.tensor([0, 1, 0, 2, 1, 0, 2, 2])
    sizes = torch.bincount(groups)[groups] - 1
    w = [[(b - 1) / sizes[i].item() if i != j and groups[i] == groups[j] else 0.0 for j in range(b)]
         for i in range(b)]
    for impl in ("sorted", "dense"):
        got = sparse_fare(z1, z2, colours(b), torch.zeros_like(w_q), w_k, buckets=groups, impl=impl)
        assert got.item() == pytest.approx(slow_loss(z1, z2, w), rel=1e-12)


# ---- oracle 7: finite gradients --------------------------------------------------------------------------


def _all_losses():
    return [
        ("info_nce", lambda: InfoNCELoss(temperature=0.01)),
        ("fair", lambda: FairInfoNCELoss(temperature=0.01, discretizer=GridDiscretizer([[0.5]] * 3))),
        ("cclk", lambda: CCLKLoss(temperature=0.01)),
        ("cclk_rbf", lambda: CCLKLoss(kernel="rbf", temperature=0.01)),
        ("fare", lambda: FARELoss(3, temperature=0.01)),
        ("sparse", lambda: SparseFARELoss(3, temperature=0.01, neighbours=1, generator=torch.Generator())),
        ("sparse_dense", lambda: SparseFARELoss(3, temperature=0.01, impl="dense", n_hashes=2)),
    ]


def _check_finite(loss_fn, z1, z2, c):
    loss = loss_fn(z1, z2, c)
    grads = torch.autograd.grad(loss, [z1, z2, *loss_fn.parameters()], allow_unused=True)
    assert torch.isfinite(loss)
    assert all(g is None or bool(torch.isfinite(g).all()) for g in grads)
    return loss


@pytest.mark.parametrize("name,make", _all_losses())
def test_finite_gradients_degenerate_batches(name, make):
    loss_fn = make()
    same = torch.ones(6, 5, dtype=D64).requires_grad_(True)
    _check_finite(loss_fn.double(), same, same, colours())  # identical embeddings, τ = 0.01
    z1, z2 = embeddings()
    _check_finite(loss_fn, z1, z2, torch.full((6, 3), 0.3, dtype=D64))  # constant sensitive
    _check_finite(loss_fn, z1[:2], z2[:2], colours(2))  # b = 2
    for dtype in (torch.float16, torch.bfloat16):
        h1, h2 = z1.detach().to(dtype).requires_grad_(True), z2.detach().to(dtype).requires_grad_(True)
        loss = _check_finite(loss_fn.float(), h1, h2, colours().to(dtype))
        assert loss.dtype == torch.float32


def test_singleton_groups_and_clipped_rows_give_zero_loss_and_gradient():
    z1, z2 = embeddings()
    loss, stats = fair_info_nce(z1, z2, torch.arange(6), return_stats=True)
    loss.backward()
    assert loss.item() == 0.0 and stats["empty_rows"] == 6.0
    assert (z1.grad == 0).all() and (z2.grad == 0).all()
    groups = torch.tensor([0, 1, 1, 2, 2, 2])  # anchor 0 alone: ℓ = 0 for it, mean still over 2b
    w = [[1.0 if i != j and groups[i] == groups[j] else 0.0 for j in range(6)] for i in range(6)]
    assert fair_info_nce(z1, z2, groups).item() == pytest.approx(slow_loss(z1, z2, w), rel=1e-12)
    corners = [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 0, 1], [0, 1, 1]]
    c = torch.tensor(corners, dtype=D64) * 255  # rbf, t = 1, far-apart colours: K_Z = I, all rows clipped
    loss, stats = cclk(z1, z2, c, kernel="rbf", bandwidth=1.0, return_stats=True)
    assert loss.item() == 0.0 and stats["empty_rows"] == 6.0


def test_forced_fallback_rows_use_dense_fare_row():
    b = 7
    z1, z2 = embeddings(b)
    c, (w_q, w_k) = colours(b), projections()
    buckets = torch.tensor([0, 0, 0, 1, 1, 2, 3])  # anchors 5, 6 are alone
    fare_rows = fare(z1, z2, c, w_q, w_k, return_stats=False)
    zh = (c - c.mean(0)) / (c.std(0, unbiased=False) + 1e-6)
    att = (zh @ w_q.T) @ (zh @ w_k.T).T / 1.0  # the default rho = 1
    w = [[0.0] * b for _ in range(b)]
    for i in range(b):
        support = [j for j in range(b) if j != i and (buckets[j] == buckets[i] or buckets[i] >= 2)]
        den = sum(math.exp(att[i, j].item()) for j in support)
        for j in support:
            w[i][j] = (b - 1) * math.exp(att[i, j].item()) / den
    ref = slow_loss(z1, z2, w)
    for impl in ("sorted", "dense"):
        loss, stats = sparse_fare(z1, z2, c, w_q, w_k, buckets=buckets, impl=impl, return_stats=True)
        assert loss.item() == pytest.approx(ref, rel=1e-12) and stats["fallback_rows"] == 2.0
        assert torch.isfinite(torch.autograd.grad(loss, w_q)[0]).all()
    assert fare_rows.item() != pytest.approx(ref)


# ---- oracle 8: permutation invariance --------------------------------------------------------------------


@pytest.mark.parametrize("name,make", _all_losses())
def test_joint_permutation_leaves_loss_unchanged(name, make):
    b = 10
    z1, z2 = embeddings(b)
    c = colours(b)
    perm = torch.randperm(b, generator=torch.Generator().manual_seed(5))
    loss_fn = make().double()
    if isinstance(loss_fn, SparseFARELoss):
        loss_fn.generator = torch.Generator().manual_seed(7)
        first = loss_fn(z1, z2, c)
        loss_fn.generator.manual_seed(7)
    else:
        first = loss_fn(z1, z2, c)
    assert loss_fn(z1[perm], z2[perm], c[perm]).item() == pytest.approx(first.item(), rel=1e-12)


# ---- modules: stats, diagnostics schedule, eval determinism, running statistics ---------------------------


def test_stats_and_diagnostics_schedule():
    z1, z2 = embeddings(b=12)
    loss_fn = SparseFARELoss(3, log_every=2).double()
    keys = []
    for _ in range(3):
        loss, stats = loss_fn(z1, z2, colours(12), return_stats=True)
        assert stats["loss"] == pytest.approx(loss.item())
        keys.append("spearman" in stats)
    assert keys == [True, False, True]
    assert {"support", "fallback_rows", "n_buckets", "dist_ratio", "entropy", "eff_support"} <= set(stats)


def test_fixed_sharp_attention_prefers_similar_attributes():
    z1, z2 = embeddings(b=64)
    c = torch.rand(64, 3, generator=torch.Generator().manual_seed(4), dtype=D64)
    _, stats = FARELoss(3, learn_projections=False, rho=0.25).double()(z1, z2, c, return_stats=True)
    assert stats["spearman"] < -0.5 and stats["dist_ratio"] < 0.8
    _, uniform = info_nce(z1, z2, return_stats=True)
    _, cclk_stats = cclk(z1, z2, c, kernel="rbf", return_stats=True)
    assert cclk_stats["dist_ratio"] < 1.0 and uniform["support"] == 63.0


def test_dist_ratio_warning_after_three_calls(caplog):
    z1, z2 = embeddings(b=32)
    c = torch.rand(32, 3, generator=torch.Generator().manual_seed(4), dtype=D64)
    loss_fn = FARELoss(3, learn_projections=False, rho=0.25, log_every=1).double()
    loss_fn.w_q.neg_()  # attention on the most different attributes
    with caplog.at_level("WARNING"):
        for _ in range(3):
            _, stats = loss_fn(z1, z2, c, return_stats=True)
    assert stats["dist_ratio"] > 1 and "dist_ratio > 1" in caplog.text


def test_sparse_fare_eval_is_deterministic_and_training_redraws():
    z1, z2 = embeddings(b=40)
    c = colours(40)
    loss_fn = SparseFARELoss(3, n_buckets=8, generator=torch.Generator().manual_seed(0)).double()
    train_losses = {loss_fn(z1, z2, c).item() for _ in range(4)}
    loss_fn.eval()
    assert len(train_losses) > 1 and loss_fn(z1, z2, c).item() == loss_fn(z1, z2, c).item()


def test_running_z_norm_updates_and_is_used_in_eval():
    loss_fn = FARELoss(3, z_norm="running", momentum=0.5).double()
    z1, z2 = embeddings()
    c = colours()
    loss_fn(z1, z2, c)
    assert torch.allclose(loss_fn.running_mean, 0.5 * c.mean(0))
    loss_fn.eval()
    zh = (c - loss_fn.running_mean) / (loss_fn.running_var.sqrt() + 1e-6)
    ref = fare(z1, z2, zh, loss_fn.w_q, loss_fn.w_k, z_norm="none")
    assert loss_fn(z1, z2, c).item() == pytest.approx(ref.item(), rel=1e-12)


# ---- oracle 11: errors ------------------------------------------------------------------------------------


def test_errors_name_the_argument():
    z1, z2 = embeddings()
    c = colours()
    w_q, w_k = projections()
    cases = [
        (ValueError, "z1", lambda: info_nce(z1[0], z2)),
        (ValueError, "same shape", lambda: info_nce(z1, z2[:5])),
        (ValueError, "b >= 2", lambda: info_nce(z1[:1], z2[:1])),
        (ValueError, "sensitive", lambda: fare(z1, z2, c[:5], w_q, w_k)),
        (ValueError, "sensitive", lambda: fair_info_nce(z1, z2, torch.zeros(6, 2, dtype=torch.long))),
        (ValueError, "sensitive", lambda: cclk(z1, z2, torch.zeros(6, 2, 2, dtype=D64))),
        (ValueError, "z1", lambda: info_nce(z1.detach().clone().fill_(float("nan")), z2)),
        (ValueError, "sensitive", lambda: cclk(z1, z2, c.clone().fill_(float("inf")))),
        (ValueError, "sensitive_dim", lambda: fare(z1, z2, colours(s=2), w_q, w_k)),
        (ValueError, "sensitive_dim", lambda: FARELoss(2).double()(z1, z2, torch.tensor([0, 1, 2, 0, 1, 2]))),
        (ValueError, "device", lambda: fare(z1, z2, c.to("meta"), w_q, w_k)),
        (ValueError, "n_buckets", lambda: SparseFARELoss(3, n_buckets=3)),
        (ValueError, "n_buckets", lambda: LSHConfig(n_buckets=5)),
        (ValueError, "lam", lambda: CCLKLoss(lam=0.0)),
        (ValueError, "lam", lambda: cclk(z1, z2, c, lam=-1.0)),
        (ValueError, "n_hashes", lambda: SparseFARELoss(3, n_hashes=2)),
        (ValueError, "kernel", lambda: CCLKLoss(kernel="gauss")),
        (ValueError, "temperature", lambda: InfoNCELoss(temperature=0.0)),
        (ValueError, "negatives", lambda: info_nce(z1, z2, negatives="same")),
        (ValueError, "neighbours", lambda: sparse_fare(z1, z2, c, w_q, w_k, lsh=LSHConfig(n_buckets=4, neighbours=4))),
        (ValueError, "n_hashes", lambda: sparse_fare(z1, z2, c, w_q, w_k, lsh=LSHConfig(n_hashes=2))),
        (TypeError, "lsh", lambda: sparse_fare(z1, z2, c, w_q, w_k, lsh={"n_buckets": 4})),
        (ValueError, "rho", lambda: fare(z1, z2, c, w_q, w_k, rho=0.0)),
        (ValueError, "rho", lambda: FARELoss(3, rho=-1.0)),
        (ValueError, "score", lambda: sparse_fare(z1, z2, c, w_q, w_k, score="cos")),
        (ValueError, "neg_scale", lambda: fare(z1, z2, c, w_q, w_k, neg_scale="b")),
        (ValueError, "z_norm", lambda: fare(z1, z2, c, w_q, w_k, z_norm="running")),
        (ValueError, "z_norm", lambda: SparseFARELoss(3, z_norm="layer")),
        (TypeError, "z1", lambda: info_nce(torch.ones(6, 5, dtype=torch.long), z2)),
        (TypeError, "discretizer", lambda: fair_info_nce(z1, z2, c)),
        (ValueError, "not fitted", lambda: fair_info_nce(z1, z2, c, discretizer=KMeansDiscretizer())),
    ]
    for exc, text, call in cases:
        with pytest.raises(exc, match=text):
            call()
    nan = z1.detach().clone().fill_(float("nan"))
    assert torch.isnan(info_nce(nan, z2, check_inputs=False))  # the NaN check is skippable


@pytest.mark.parametrize("options", [{}, {"mask_self": False}, {"score": "neg_sqdist", "negatives": "cross"},
                                     {"symmetric": False, "neg_scale": "none"}])
def test_fare_row_blocks_equal_the_dense_loss_and_gradients(options) -> None:
    from clusterformers.contrastive import functional as fn

    g = torch.Generator().manual_seed(0)
    b, d = 150, 8
    z1, z2 = (torch.randn(b, d, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    sens = torch.rand(b, 3, generator=g, dtype=torch.float64)
    w_q, w_k = (torch.randn(16, 3, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    dense = fn.fare(z1, z2, sens, w_q, w_k, chunk_size=None, **options)
    grads = torch.autograd.grad(dense, (z1, z2, w_q, w_k))
    for chunk in (13, 149, 150, 1000):  # many blocks, a one- or two-row last block, one block, larger than b
        blocked = fn.fare(z1, z2, sens, w_q, w_k, chunk_size=chunk, **options)
        torch.testing.assert_close(blocked, dense, rtol=0, atol=1e-12)
        for a, c in zip(torch.autograd.grad(blocked, (z1, z2, w_q, w_k)), grads):
            torch.testing.assert_close(a, c, rtol=0, atol=1e-12)
    _, stats = fn.fare(z1, z2, sens, w_q, w_k, chunk_size=37, return_stats=True, **options)
    _, dense_stats = fn.fare(z1, z2, sens, w_q, w_k, chunk_size=None, return_stats=True, **options)
    assert stats.keys() == dense_stats.keys()
    for key in stats:
        assert stats[key] == pytest.approx(dense_stats[key], rel=1e-9), key
    for bad in (0, -3, 2.5, "big", True):
        with pytest.raises(ValueError, match="chunk_size"):
            fn.fare(z1, z2, sens, w_q, w_k, chunk_size=bad)


@pytest.mark.parametrize("loss", ["info_nce", "fair_info_nce"])
@pytest.mark.parametrize("options", [{}, {"negatives": "cross", "symmetric": False}])
def test_info_nce_row_blocks_equal_the_dense_loss_gradients_and_stats(loss, options) -> None:
    from clusterformers.contrastive import functional as fn

    g = torch.Generator().manual_seed(1)
    b, d = 150, 8
    z1, z2 = (torch.randn(b, d, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    groups = torch.randint(0, 4, (b,), generator=g)
    groups[5] = 7  # alone in its group: no negatives
    args = (z1, z2) if loss == "info_nce" else (z1, z2, groups)
    f = getattr(fn, loss)
    dense, dense_stats = f(*args, chunk_size=None, return_stats=True, **options)
    grads = torch.autograd.grad(dense, (z1, z2))
    assert loss == "info_nce" or dense_stats["empty_rows"] == 1.0
    for chunk in (13, 149, 150, 1000):  # many blocks, a one- or two-row last block, one block, larger than b
        blocked, stats = f(*args, chunk_size=chunk, return_stats=True, **options)
        torch.testing.assert_close(blocked, dense, rtol=0, atol=1e-12)
        for a, c in zip(torch.autograd.grad(blocked, (z1, z2)), grads):
            torch.testing.assert_close(a, c, rtol=0, atol=1e-12)
        assert stats.keys() == dense_stats.keys()
        for key in stats:
            assert stats[key] == pytest.approx(dense_stats[key], rel=1e-9), (chunk, key)
    with pytest.raises(ValueError, match="chunk_size"):
        f(*args, chunk_size=0)


@pytest.mark.parametrize("loss", ["info_nce", "fair_info_nce", "fare"])
def test_dense_nce_memory_is_linear_in_the_batch_above_1024(loss) -> None:
    from clusterformers.bench.cost import LiveTensorTracker
    from clusterformers.contrastive import functional as fn

    g = torch.Generator().manual_seed(0)
    peaks = {}
    for chunk in (None, "auto"):
        z1, z2 = (torch.randn(2048, 32, generator=g, requires_grad=True) for _ in range(2))
        w = torch.eye(16, 3)
        extra = {"info_nce": (), "fair_info_nce": (torch.randint(0, 3, (2048,), generator=g),),
                 "fare": (torch.rand(2048, 3, generator=g), w, w)}[loss]
        with LiveTensorTracker() as tracker:
            getattr(fn, loss)(z1, z2, *extra, chunk_size=chunk).backward()
        peaks[chunk] = tracker.peak
    # dense holds [2b, 2b] float32 matrices (64 MiB each); blocks of 512 rows a quarter of one each
    assert peaks[None] > 100 * 2**20 and peaks["auto"] < peaks[None] / 3, peaks


def test_gather_distributed_equals_the_global_batch(tmp_path) -> None:
    """Two gloo processes, each with half the batch: every loss with gather_distributed=True equals the
    single-process loss of the whole batch, each rank's embedding gradient is world_size times the global one
    (DDP averages it back), FARE's running statistics follow the global batch, and different batch sizes
    across ranks are a clear error on every rank."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(root / "src"), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
           str(root / "tests" / "dist_loss_worker.py"), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    for rank in (0, 1):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert "same batch size on every rank" in report.pop("mismatch")
        assert len(report) == 7
        for name, diffs in report.items():
            assert all(v < 1e-10 for v in diffs.values()), (rank, name, diffs)
