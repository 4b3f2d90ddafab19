"""The five losses as functions; each only builds ``log W`` and calls :func:`~.nce.weighted_nce`.

| loss          | ``W_ij`` (j ≠ i)                                   |
|---------------|----------------------------------------------------|
| info_nce      | 1                                                  |
| fair_info_nce | ``1[g_i = g_j]``                                   |
| cclk          | ``(b−1) M_ji``, ``M = clip((K_Z + λI)⁻¹ K_Z)``      |
| fare          | ``(b−1) p_ij``, softmax over ``j ≠ i``              |
| sparse_fare   | ``(b−1) p_ij``, softmax over the LSH support ``S_i`` |

Every function returns the scalar loss, or ``(loss, stats)`` with ``return_stats=True``; ``stats`` holds
``loss``, ``support`` (mean number of weighted negatives per anchor), ``empty_rows`` (anchors without
negatives) / ``fallback_rows`` (SparseFARE anchors with an empty bucket support, given the dense FARE row)
and, when ``diagnostics`` is set, the attention diagnostics of :mod:`.diagnostics`.

Compilation: with ``check_inputs=False`` and ``return_stats=False`` no function reads a tensor on the host
(the stats are Python floats, so ``return_stats=True`` does). The exception is :func:`sparse_fare` with
``impl="sorted"``, whose tile layout has data-dependent shapes (see there).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from clusterformers.contrastive.diagnostics import weighting_diagnostics
from clusterformers.contrastive.inputs import (
    check_embeddings,
    check_sensitive,
    compute_dtype,
    group_indicator,
    one_hot_groups,
)
from clusterformers.contrastive.kernels import sensitive_kernel
from clusterformers.contrastive.lsh import (
    block_pairs,
    buckets_for_batch,
    build_block_plan,
    draw_rotations,
    hash_buckets,
    support_sizes,
    tile_size,
)
from clusterformers.contrastive.lsh import support_mask as lsh_support_mask
from clusterformers.contrastive.nce import (
    CHUNK_AUTO_ROWS,
    LogWeightBlocks,
    blockwise_nce,
    chunk_rows,
    segment_logsumexp,
    weighted_nce,
)
from clusterformers.fused import fused

DIAG_ROWS = 512
SCORES = ("dot", "neg_sqdist")
Z_NORMS = ("batch", "none")
NEG_SCALES = ("b-1", "none")
IMPLS = ("sorted", "dense")
HASH_ON = ("z", "keys")
_NEG_INF = float("-inf")
WALK_MIN_BUCKET = 512  # sorted SparseFARE walks blocks of anchors when the mean bucket holds this many


def _finish(
    z1: Tensor, z2: Tensor, log_w: Tensor | LogWeightBlocks, nce: dict, return_stats: bool, stats: dict
) -> Tensor | tuple[Tensor, dict[str, float]]:
    loss = weighted_nce(z1, z2, log_w, **nce)
    if not return_stats:
        return loss
    return loss, {"loss": float(loss.detach()), **stats}


def _dense_stats(log_w: Tensor, dist_z: Tensor | None, diagnostics: bool) -> dict[str, float]:
    """Row counts of a dense ``log W`` and, optionally, the diagnostics on its first :data:`DIAG_ROWS` rows."""
    with torch.no_grad():
        finite = torch.isfinite(log_w)
        finite.fill_diagonal_(False)
        stats = {"support": float(finite.sum(1).double().mean()), "empty_rows": float((~finite.any(1)).sum())}
        if diagnostics and dist_z is not None:
            r = min(log_w.shape[0], DIAG_ROWS)
            not_self = ~torch.eye(log_w.shape[0], dtype=torch.bool, device=log_w.device)[:r]
            dist = torch.cdist(dist_z[:r].double(), dist_z.double())
            stats.update(weighting_diagnostics(log_w[:r].exp(), dist, not_self))
    return stats


def info_nce(
    z1: Tensor,
    z2: Tensor,
    *,
    temperature: float = 0.1,
    negatives: str = "both",
    symmetric: bool = True,
    check_inputs: bool = True,
    return_stats: bool = False,
    chunk_size: int | str | None = "auto",
) -> Tensor | tuple[Tensor, dict[str, float]]:
    """InfoNCE / NT-Xent: ``W_ij = 1`` (``2b − 2`` negatives per anchor with ``negatives="both"``).

    Args:
        z1, z2: ``[b, d]`` unnormalised embeddings of the two views.
        temperature, negatives, symmetric: see :func:`~.nce.weighted_nce`.
        check_inputs: raise on NaN/Inf.
        return_stats: also return the stats dict.
        chunk_size: anchors per block (memory ``O(chunk_size²)`` for the logits, see :func:`~.nce.blockwise_nce`);
            ``"auto"``: dense up to ``b = 1024``, blocks of 512 above; ``None``: always dense.
    """
    z1, z2 = check_embeddings(z1, z2, check_inputs)
    b = z1.shape[0]
    nce = {"temperature": temperature, "negatives": negatives, "symmetric": symmetric}
    stats = {"support": float(b - 1), "empty_rows": 0.0}

    def block(rows: slice, cols: slice) -> Tensor:
        log_w = torch.zeros(rows.stop - rows.start, cols.stop - cols.start, dtype=z1.dtype, device=z1.device)
        return _mask_self(log_w, rows, cols)

    chunk = chunk_rows(chunk_size, b)
    if chunk < b:
        loss = blockwise_nce(z1, z2, block, (), chunk, **nce)
        return (loss, {"loss": float(loss.detach()), **stats}) if return_stats else loss
    return _finish(z1, z2, block(slice(0, b), slice(0, b)), nce, return_stats, stats)


def _mask_self(log_w: Tensor, rows: slice, cols: slice) -> Tensor:
    """``log_w[i, j] = -inf`` in place where anchor ``rows.start + i`` is ``cols.start + j``: the self pairs
    of the block ``log W[rows, cols]``."""
    offset = rows.start - cols.start
    if -log_w.shape[0] < offset < log_w.shape[1]:
        log_w.diagonal(offset=offset).fill_(_NEG_INF)
    return log_w


def fair_info_nce(
    z1: Tensor,
    z2: Tensor,
    sensitive: Tensor,
    *,
    discretizer: object | None = None,
    temperature: float = 0.1,
    negatives: str = "both",
    symmetric: bool = True,
    check_inputs: bool = True,
    return_stats: bool = False,
    diagnostics: bool = True,
    chunk_size: int | str | None = "auto",
) -> Tensor | tuple[Tensor, dict[str, float]]:
    """Fair-InfoNCE: negatives only from the anchor's group, ``W_ij = 1[g_i = g_j]``.

    Args:
        z1, z2: ``[b, d]`` embeddings.
        sensitive: int ``[b]`` groups, or float ``[b]`` / ``[b, s]`` together with ``discretizer``.
        discretizer: a fitted, batch-independent callable float ``[b, s]`` → long ``[b]``
            (:class:`~.discretize.KMeansDiscretizer`, :class:`~.discretize.GridDiscretizer`); required for
            a float attribute.
        chunk_size: anchors per block, as :func:`info_nce`.

    An anchor alone in its group has no negatives: ``ℓ = 0``, zero gradient (``stats["empty_rows"]``).
    """
    z1, z2 = check_embeddings(z1, z2, check_inputs)
    b = z1.shape[0]
    sens = check_sensitive(sensitive, b, z1.device, check_inputs)
    if sens.is_floating_point():
        if discretizer is None:
            raise TypeError(
                f"fair_info_nce got a float sensitive of shape {list(sens.shape)} and no discretizer; pass "
                "integer groups or discretizer=KMeansDiscretizer(k).fit(train_attributes) (no batch-dependent rule)"
            )
        try:
            groups = discretizer(sens)
        except (ValueError, TypeError) as err:
            raise type(err)(
                f"sensitive (float, shape {list(sens.shape)}) was refused by the discretizer "
                f"{type(discretizer).__name__}: {err}"
            ) from err
        if not isinstance(groups, Tensor) or groups.shape != (b,) or groups.is_floating_point() or groups.is_complex():
            got = f"{groups.dtype} {list(groups.shape)}" if isinstance(groups, Tensor) else type(groups).__name__
            raise TypeError(f"the discretizer must map sensitive to integer groups [b] = [{b}], got {got}")
    else:
        groups = sens
    nce = {"temperature": temperature, "negatives": negatives, "symmetric": symmetric}

    def block(groups: Tensor, rows: slice, cols: slice) -> Tensor:
        log_w = torch.zeros(rows.stop - rows.start, cols.stop - cols.start, dtype=z1.dtype, device=z1.device)
        return _mask_self(log_w.masked_fill(groups[rows, None] != groups[None, cols], _NEG_INF), rows, cols)

    chunk = chunk_rows(chunk_size, b)
    dist_z = (sens if sens.is_floating_point() else group_indicator(groups, z1.dtype)) if return_stats else None
    if chunk == b:
        log_w = block(groups, slice(0, b), slice(0, b))
        return _finish(z1, z2, log_w, nce, return_stats, _dense_stats(log_w, dist_z, diagnostics) if return_stats
                       else {})
    loss = blockwise_nce(z1, z2, block, (groups,), chunk, **nce)
    if not return_stats:
        return loss
    with torch.no_grad():
        _, inverse, counts = torch.unique(groups, return_inverse=True, return_counts=True)
        support = counts.index_select(0, inverse) - 1
        stats = {"support": float(support.double().mean()), "empty_rows": float((support == 0).sum())}
        if diagnostics:
            r = min(b, DIAG_ROWS)
            not_self = ~torch.eye(b, dtype=torch.bool, device=z1.device)[:r]
            dist = torch.cdist(dist_z[:r].double(), dist_z.double())
            stats.update(weighting_diagnostics(block(groups, slice(0, r), slice(0, b)).exp(), dist, not_self))
    return loss, {"loss": float(loss.detach()), **stats}


@torch.no_grad()
def cclk_weights(
    sensitive: Tensor, *, kernel: str = "cosine", lam: float = 0.01, bandwidth: float | None = None,
    clip: float | None = 1e-6, check_errors: bool = True,
) -> Tensor:
    """CCLK's negative weights ``W = (b−1) Mᵀ``, ``M = (K_Z + λI)⁻¹ K_Z`` (fp64 ``linalg.solve``, no gradient).

    Args:
        sensitive: float ``[b, s]`` raw attribute.
        kernel, bandwidth: see :func:`~.kernels.sensitive_kernel`.
        lam: ``λ > 0``.
        clip: ``M_ij < clip → 0``; ``None`` drops only ``M_ij <= 0``. ``M_ii = 0``.
        check_errors: raise if ``K_Z + λI`` is singular (``linalg.solve``, a device sync on CUDA); False uses
            ``linalg.solve_ex`` without the check (a singular system gives non-finite weights).

    Returns:
        float64 ``[b, b]``, ``W[i, j]`` the weight of negative ``j`` for anchor ``i``.
    """
    if not lam > 0:
        raise ValueError(f"lam must be > 0, got {lam}")
    b = sensitive.shape[0]
    k_z = sensitive_kernel(sensitive.double(), kernel, bandwidth)
    system = k_z + lam * torch.eye(b, dtype=torch.float64, device=k_z.device)
    m = torch.linalg.solve(system, k_z) if check_errors else torch.linalg.solve_ex(system, k_z)[0]
    m.fill_diagonal_(0.0)
    keep = m >= clip if clip is not None else m > 0
    return torch.where(keep, m, torch.zeros_like(m)).T * (b - 1)


def cclk(
    z1: Tensor,
    z2: Tensor,
    sensitive: Tensor,
    *,
    kernel: str = "cosine",
    lam: float = 0.01,
    bandwidth: float | None = None,
    clip: float | None = 1e-6,
    temperature: float = 0.1,
    negatives: str = "both",
    symmetric: bool = True,
    check_inputs: bool = True,
    return_stats: bool = False,
    diagnostics: bool = True,
) -> Tensor | tuple[Tensor, dict[str, float]]:
    """CCLK (``weac-infonce``): ``W_ij = (b−1) M_ji`` with ``M = (K_Z + λI)⁻¹ K_Z`` (no gradient, fp64 solve).

    Args:
        sensitive: float ``[b]`` / ``[b, s]`` raw attribute (int groups are one-hot encoded).
        kernel: see :mod:`~.kernels`.
        lam: ``λ > 0``.
        bandwidth: kernel bandwidth ``t``; ``None`` = per-batch median (rbf, laplacian), else 1.
        clip: ``M_ij < clip → 0`` (CCLK's ``weight_clip_threshold``); ``None`` drops only ``M_ij <= 0``
            (weights must be non-negative). ``M_ii = 0`` always.
        check_inputs: raise on NaN/Inf, negative groups and a singular ``K_Z + λI``.
    """
    z1, z2 = check_embeddings(z1, z2, check_inputs)
    sens = check_sensitive(sensitive, z1.shape[0], z1.device, check_inputs)
    if not sens.is_floating_point():
        sens = group_indicator(sens, z1.dtype)  # one-hot: the kernels depend only on equal / different groups
    weights = cclk_weights(sens, kernel=kernel, lam=lam, bandwidth=bandwidth, clip=clip, check_errors=check_inputs)
    log_w = torch.log(weights).to(z1.dtype)
    nce = {"temperature": temperature, "negatives": negatives, "symmetric": symmetric}
    stats = _dense_stats(log_w, sens, diagnostics) if return_stats else {}
    return _finish(z1, z2, log_w, nce, return_stats, stats)


def standardize(z: Tensor, z_norm: str) -> Tensor:
    """``"batch"``: per-dimension ``(z − mean) / (std + 1e-6)`` with batch statistics; ``"none"``: ``z``."""
    if z_norm not in Z_NORMS:
        raise ValueError(f"z_norm must be one of {Z_NORMS} here (the modules add 'running'), got {z_norm!r}")
    if z_norm == "none":
        return z
    return (z - z.mean(0)) / (z.std(0, unbiased=False) + 1e-6)


def _attribute(
    sensitive: Tensor, w_q: Tensor, b: int, device: torch.device, check: bool, z_norm: str
) -> tuple[Tensor, Tensor | None]:
    """``ẑ`` ``[b, s]`` (int groups one-hot encoded, then standardised) and the groups (or ``None``)."""
    sens = check_sensitive(sensitive, b, device, check)
    s = w_q.shape[1]
    groups = None
    if not sens.is_floating_point():
        groups = sens
        sens = one_hot_groups(sens, s, compute_dtype(w_q.dtype), check)
    elif sens.shape[1] != s:
        raise ValueError(f"sensitive has s = {sens.shape[1]} columns but sensitive_dim (w_q.shape[1]) is {s}")
    return standardize(sens, z_norm), groups


def _scores(q: Tensor, k: Tensor, rho: float, score: str) -> Tensor:
    """``q·k/ρ`` (``"dot"``) or ``−‖q − k‖²/2ρ`` (``"neg_sqdist"``) for ``q [..., T, d_k]``, ``k [..., T', d_k]``."""
    dots = (q / rho) @ k.transpose(-1, -2)
    if score == "dot":
        return dots
    return dots - ((q * q).sum(-1)[..., :, None] + (k * k).sum(-1)[..., None, :]) / (2 * rho)


def _projections(
    zhat: Tensor, w_q: Tensor, w_k: Tensor, rho: float | None, score: str, dtype: torch.dtype
) -> tuple[Tensor, Tensor, float]:
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    if w_q.dim() != 2 or w_q.shape != w_k.shape:
        raise ValueError(f"w_q and w_k must both be [d_k, s], got {list(w_q.shape)} and {list(w_k.shape)}")
    rho = math.sqrt(w_q.shape[0]) if rho is None else float(rho)
    if not rho > 0:
        raise ValueError(f"rho must be > 0, got {rho}")
    zhat = zhat.to(dtype)
    return zhat @ w_q.to(dtype).T, zhat @ w_k.to(dtype).T, rho


def _log_scale(b: int, neg_scale: str) -> float:
    if neg_scale not in NEG_SCALES:
        raise ValueError(f"neg_scale must be one of {NEG_SCALES}, got {neg_scale!r}")
    return math.log(b - 1) if neg_scale == "b-1" else 0.0


def fare(
    z1: Tensor,
    z2: Tensor,
    sensitive: Tensor,
    w_q: Tensor,
    w_k: Tensor,
    *,
    rho: float | None = 1.0,
    score: str = "dot",
    z_norm: str = "batch",
    neg_scale: str = "b-1",
    mask_self: bool = True,
    temperature: float = 0.1,
    negatives: str = "both",
    symmetric: bool = True,
    check_inputs: bool = True,
    return_stats: bool = False,
    diagnostics: bool = True,
    chunk_size: int | str | None = "auto",
) -> Tensor | tuple[Tensor, dict[str, float]]:
    """FARE: ``W_ij = (b−1) p_ij``, ``p_i = softmax_{j≠i}(score(W_Q ẑ_i, W_K ẑ_j))`` (Eqs. 8–11).

    Args:
        sensitive: float ``[b]`` / ``[b, s]`` or int groups ``[b]`` (one-hot to ``s`` columns).
        w_q, w_k: ``[d_k, s]`` projections (gradients flow to them); ``w_q = 0`` gives InfoNCE exactly.
        rho: softmax temperature ``ρ`` (1, chosen on ColorMNIST validation data; see ``docs/fare.md``);
            ``None`` = ``√d_k``, the former default, which leaves the attention almost uniform.
        score: ``"dot"`` (``q·k/ρ``) or ``"neg_sqdist"`` (``−‖q−k‖²/2ρ``).
        z_norm: ``"batch"`` (standardise the attribute with batch statistics) or ``"none"``.
        neg_scale: ``"b-1"`` (uniform attention = InfoNCE) or ``"none"`` (``W = p``).
        mask_self: exclude ``j = i`` from the softmax; False also weights ``e^{S_ii}`` by ``W_ii``.
        check_inputs: raise on NaN/Inf and on integer groups outside ``0..s-1``.
        chunk_size: anchors per block. Tiles of blocks are recomputed in the backward pass, so memory is
            ``O(chunk_size · b)`` instead of ``O(b²)``; the loss and gradients equal the dense ones (up to
            rounding). ``"auto"``: dense up to ``b = 1024``, blocks of 512 above; ``None``: always dense.
    """
    z1, z2 = check_embeddings(z1, z2, check_inputs)
    b = z1.shape[0]
    dtype = compute_dtype(z1.dtype, w_q.dtype)
    zhat, _ = _attribute(sensitive, w_q, b, z1.device, check_inputs, z_norm)
    q, k, rho = _projections(zhat, w_q, w_k, rho, score, dtype)
    nce = {"temperature": temperature, "negatives": negatives, "symmetric": symmetric}
    chunk = chunk_rows(chunk_size, b)
    if chunk < b:
        return _fare_chunked(z1, z2, zhat, q, k, rho, score, neg_scale, mask_self, nce, chunk, return_stats,
                             diagnostics)
    log_w = _fare_log_weights(q, k, rho, score, neg_scale, mask_self, 0, b)
    stats = {}
    if return_stats:
        stats = _dense_stats(log_w.detach(), zhat, diagnostics)
        stats["fallback_rows"] = 0.0
    return _finish(z1, z2, log_w, nce, return_stats, stats)


def _fare_log_weights(q: Tensor, k: Tensor, rho: float, score: str, neg_scale: str, mask_self: bool, start: int,
                      stop: int) -> Tensor:
    """``log W`` of the anchors ``start:stop`` against all ``b`` negatives, ``[stop − start, b]``."""
    att = _fare_attention(q, k, rho, score, mask_self, slice(start, stop), slice(0, k.shape[0]))
    return _fused_shifted_log_softmax(att, _log_scale(k.shape[0], neg_scale))


def _fare_attention(q: Tensor, k: Tensor, rho: float, score: str, mask_self: bool, rows: slice, cols: slice
                    ) -> Tensor:
    """FARE's attention scores of anchors ``rows`` against negatives ``cols``, self pairs at ``-inf`` when
    ``mask_self``."""
    att = _scores(q[rows], k[cols], rho, score)
    if mask_self:
        with torch.no_grad():  # the softmax and logsumexp give the -inf entries exactly zero gradient
            _mask_self(att, rows, cols)
    return att


def _shifted_log_softmax(att: Tensor, shift: float) -> Tensor:
    """``shift + log_softmax(att)`` over rows (``[r, b]``)."""
    return shift + torch.log_softmax(att, dim=1)


_fused_shifted_log_softmax = fused(_shifted_log_softmax, dynamic=False)  # static: see clusterformers.fused


def _row_logsumexp(att: Tensor) -> Tensor:
    """``logsumexp(att)`` over rows (``[r, b]`` -> ``[r]``)."""
    return torch.logsumexp(att, dim=1)


_fused_row_logsumexp = fused(_row_logsumexp, dynamic=False)  # compiled forward and backward


def _fare_chunked(z1: Tensor, z2: Tensor, zhat: Tensor, q: Tensor, k: Tensor, rho: float, score: str,
                  neg_scale: str, mask_self: bool, nce: dict, chunk: int, return_stats: bool, diagnostics: bool
                  ) -> Tensor | tuple[Tensor, dict[str, float]]:
    """FARE through :func:`~.nce.blockwise_nce`: memory grows as ``chunk · b`` instead of ``b²`` (the
    attention normalisers go one row block at a time, the loss one tile of blocks at a time)."""
    b = z1.shape[0]
    shift = _log_scale(b, neg_scale)

    def row_logsumexp(q: Tensor, k: Tensor, start: int, stop: int) -> Tensor:
        return _fused_row_logsumexp(_fare_attention(q, k, rho, score, mask_self, slice(start, stop), slice(0, b)))

    # each anchor's softmax normaliser, one row block at a time (recomputed in the backward pass)
    lse = torch.cat([checkpoint(row_logsumexp, q, k, start, min(b, start + chunk), use_reentrant=False)
                     for start in range(0, b, chunk)])

    def block(q: Tensor, k: Tensor, lse: Tensor, rows: slice, cols: slice) -> Tensor:
        return _fare_attention(q, k, rho, score, mask_self, rows, cols) + (shift - lse[rows])[:, None]

    loss = blockwise_nce(z1, z2, block, (q, k, lse), chunk, **nce)
    if not return_stats:
        return loss
    with torch.no_grad():
        first = _fare_log_weights(q, k, rho, score, neg_scale, mask_self, 0, min(b, DIAG_ROWS))
        stats = {"support": float(torch.isfinite(first).sum(1).double().mean()) - (0.0 if mask_self else 1.0),
                 "empty_rows": 0.0, "fallback_rows": 0.0}
        if diagnostics:
            not_self = ~torch.eye(b, dtype=torch.bool, device=first.device)[: first.shape[0]]
            dist = torch.cdist(zhat[: first.shape[0]].double(), zhat.double())
            stats.update(weighting_diagnostics(first.exp(), dist, not_self))
    return loss, {"loss": float(loss.detach()), **stats}


def sparse_fare(
    z1: Tensor,
    z2: Tensor,
    sensitive: Tensor,
    w_q: Tensor,
    w_k: Tensor,
    *,
    n_buckets: int = 4,
    bucket_size: int | None = None,
    n_hashes: int = 1,
    neighbours: int = 0,
    hash_on: str = "z",
    impl: str = "sorted",
    generator: torch.Generator | None = None,
    rotations: Tensor | None = None,
    buckets: Tensor | None = None,
    unit_rotations: bool = True,
    rho: float | None = 1.0,
    score: str = "dot",
    z_norm: str = "batch",
    neg_scale: str = "b-1",
    mask_self: bool = True,
    temperature: float = 0.1,
    negatives: str = "both",
    symmetric: bool = True,
    check_inputs: bool = True,
    return_stats: bool = False,
    diagnostics: bool = True,
) -> Tensor | tuple[Tensor, dict[str, float]]:
    """SparseFARE: FARE's softmax restricted to the angular-LSH support ``S_i`` (:mod:`~.lsh`).

    ``W_ij = (b−1) p_ij`` with ``p_i`` a softmax over ``S_i``; an anchor with ``S_i = ∅`` falls back to
    the dense FARE row (its loss stays defined; ``stats["fallback_rows"]``). FARE arguments as in :func:`fare`.

    Shapes and host reads: ``impl="dense"`` has fixed shapes (``[b, b]`` masks) and, with
    ``check_inputs=False``, reads nothing on the host. ``impl="sorted"`` sorts the anchors by bucket and
    has two forms, with the same loss and gradients. For small buckets (a mean under 512 anchors) it tiles
    each bucket, so the number of tiles depends on the bucket sizes: it copies ``2 n_b + 1`` counts to the
    host once per call (also when compiled: ``torch.compile`` traces it into one graph with data-dependent
    sizes, without recompiling as the sizes change). For large buckets (as the default ``n_b = 4`` at
    ``b >= 2048``) it walks blocks of 512 sorted anchors as :func:`fare` does, visiting only the pairs of
    blocks that meet in the support, each pair once for both directions, in memory linear in b; it copies
    which pairs meet (a ``[⌈b/512⌉]²`` bool matrix) to the host once per call. Compiled code always takes
    the first form. With given ``buckets`` it also reads their number of distinct ids.

    Args:
        n_buckets: ``n_b`` (1 = no hashing, else even).
        bucket_size: target bucket size ``c``: ``n_b = 2⌈b/2c⌉`` (overrides ``n_buckets``; sub-quadratic).
        n_hashes: hash rounds (``impl="dense"`` only for > 1).
        neighbours: extra buckets probed per round (multi-probe).
        hash_on: ``"z"`` (hash ``ẑ``, Definition 2) or ``"keys"`` (hash ``W_K ẑ``, ablation).
        impl: ``"sorted"`` (sort by bucket, tiles per bucket, never ``b×b``) or ``"dense"`` (reference).
        generator: CPU generator for the random projections (``None``: global RNG). A ``torch.Generator``
            cannot be traced by ``torch.compile``; compile with ``generator=None`` or pass ``rotations``.
        rotations: float ``[n_hashes, s', n_b/2]`` projections to use instead of drawing them (``s'`` the
            hashed width: ``s`` for ``hash_on="z"``, ``d_k`` for ``"keys"``; ``n_b`` as above).
        buckets: long ``[b]`` given buckets (no hashing); int ``sensitive`` groups are the buckets.
        unit_rotations: unit-length projection directions (see :mod:`~.lsh`).
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if hash_on not in HASH_ON:
        raise ValueError(f"hash_on must be one of {HASH_ON}, got {hash_on!r}")
    if n_hashes < 1 or (impl == "sorted" and n_hashes != 1):
        raise ValueError(f"n_hashes must be >= 1, and 1 with impl='sorted' (use impl='dense'), got {n_hashes}")
    z1, z2 = check_embeddings(z1, z2, check_inputs)
    b = z1.shape[0]
    dtype = compute_dtype(z1.dtype, w_q.dtype)
    zhat, groups = _attribute(sensitive, w_q, b, z1.device, check_inputs, z_norm)
    q, k, rho = _projections(zhat, w_q, w_k, rho, score, dtype)
    given = buckets if buckets is not None else groups
    n_b: int | None = None
    if given is not None:
        if not isinstance(given, Tensor):
            raise TypeError(f"buckets must be a torch.Tensor of integers [b] = [{b}], got {type(given).__name__}")
        if given.is_floating_point() or given.is_complex():
            raise ValueError(f"buckets must be non-negative integers [b] = [{b}], got dtype {given.dtype}")
        if given.shape != (b,) or (check_inputs and bool((given < 0).any())):
            raise ValueError(f"buckets must be non-negative integers [b] = [{b}], got shape {list(given.shape)}")
        if neighbours:
            raise ValueError(f"neighbours must be 0 with given buckets or integer groups, got {neighbours}")
        bucket_r, probe_r = given.to(z1.device).long()[None], given.to(z1.device).long()[None, :, None]
    else:
        n_b = buckets_for_batch(b, n_buckets, bucket_size)
        hashed = zhat if hash_on == "z" else k.detach()
        if rotations is None:
            rotations = draw_rotations(
                hashed.shape[1], n_b, n_hashes, generator=generator, dtype=torch.float64, unit=unit_rotations
            )
        expected = (n_hashes, hashed.shape[1], n_b // 2)
        if tuple(rotations.shape) != expected:
            raise ValueError(f"rotations must be [n_hashes, s', n_b/2] = {list(expected)}, got {list(rotations.shape)}")
        bucket_r, probe_r = hash_buckets(hashed, rotations.to(z1.device), neighbours)
    log_scale = _log_scale(b, neg_scale)
    nce = {"temperature": temperature, "negatives": negatives, "symmetric": symmetric}
    if impl == "dense":
        mask, fallback = lsh_support_mask(bucket_r, probe_r)
        support = mask.sum(1)
        if not mask_self:
            mask = mask | torch.eye(b, dtype=torch.bool, device=mask.device)
        log_w = log_scale + torch.log_softmax(_scores(q, k, rho, score).masked_fill(~mask, _NEG_INF), dim=1)
        loss = weighted_nce(z1, z2, log_w, **nce)
    else:
        # the tile side and the choice of path must be Python: with given buckets they follow the configured
        # bucket count (only a performance choice), since their real number n_b is known only on the device.
        # The walk loops over a data-dependent list of blocks, which torch.compile cannot trace: compiled code
        # takes the tile plan (one graph with data-dependent sizes).
        configured = buckets_for_batch(b, n_buckets, bucket_size)
        tile = tile_size(b, configured)
        walk = b >= WALK_MIN_BUCKET * configured and not torch.compiler.is_compiling()
        if n_b is None:
            # relabel given ids to 0..n_b-1 in order (the same buckets and plan): the plan's buffers then
            # follow the number of buckets, not the largest id (ids near 1e9 would size them otherwise)
            ids, dense_ids = torch.unique(bucket_r[0], sorted=True, return_inverse=True)
            n_b, bucket_r, probe_r = ids.numel(), dense_ids[None], dense_ids[None, :, None]
        if walk:
            loss, fallback, support = _sparse_fare_walk(z1, z2, q, k, bucket_r[0], probe_r[0], n_b, rho, score,
                                                        log_scale, mask_self, nce)
        else:
            plan = build_block_plan(bucket_r[0], probe_r[0], n_b, allow_self=not mask_self, tile=tile)
            n_tiles, tile = plan.query_idx.shape
            q_tiles = q.index_select(0, plan.query_idx.reshape(-1)).view(n_tiles, tile, -1)
            k_tiles = k.index_select(0, plan.key_idx.reshape(-1)).view(n_tiles, tile, -1)
            att = _scores(q_tiles, k_tiles, rho, score).masked_fill(plan.invalid, _NEG_INF)
            lse = segment_logsumexp(att, plan.query_idx, b).index_select(0, plan.query_idx.reshape(-1))
            log_w = LogWeightBlocks(plan.query_idx, plan.key_idx, att - (lse.view(n_tiles, tile, 1) - log_scale))
            loss = weighted_nce(z1, z2, log_w, **nce)
            fallback, support = plan.fallback, plan.support
    if not return_stats:
        return loss
    stats = {
        "loss": float(loss.detach()),
        "support": float(support.double().mean()),
        "fallback_rows": float(fallback.sum()),
        "n_buckets": float(n_b if n_b is not None else torch.unique(bucket_r[0]).numel()),
    }
    if diagnostics:
        stats.update(_sparse_diagnostics(q, k, rho, score, zhat, bucket_r, probe_r))
    return loss, stats


def _sparse_attention(q: Tensor, k: Tensor, bucket: Tensor, probe: Tensor, fallback: Tensor, rho: float,
                      score: str, mask_self: bool, rows: slice, cols: slice, outside: float = _NEG_INF) -> Tensor:
    """SparseFARE's attention scores of anchors ``rows`` against negatives ``cols``, ``outside`` (``-inf``)
    outside the support (a fallback anchor's support is every ``j``; ``j = i`` at ``-inf`` when
    ``mask_self``)."""
    att = _fare_attention(q, k, rho, score, mask_self, rows, cols)
    with torch.no_grad():  # the softmax and logsumexp give the masked entries exactly zero gradient
        hit = (probe[rows, :, None] == bucket[cols][None, None]).any(dim=1) | fallback[rows, None]
        att.masked_fill_(~hit, outside)
    return att


def _sparse_fare_walk(z1: Tensor, z2: Tensor, q: Tensor, k: Tensor, bucket: Tensor, probe: Tensor, n_b: int,
                      rho: float, score: str, shift: float, mask_self: bool, nce: dict
                      ) -> tuple[Tensor, Tensor, Tensor]:
    """SparseFARE through :func:`~.nce.blockwise_nce` for large buckets: the anchors are sorted by bucket, so
    the support is nearly block-diagonal, and only the pairs of blocks that meet in it are visited; each
    visited tile serves both of its blocks, and memory stays linear in b.

    Returns:
        the loss, the fallback flags ``[b]`` and the support sizes ``[b]`` (both in the sorted order).
    """
    order = torch.argsort(bucket, stable=True)
    z1, z2, q, k = (x.index_select(0, order) for x in (z1, z2, q, k))
    bucket, probe = bucket[order], probe[order]
    _, fallback, support = support_sizes(bucket, probe, n_b)
    chunk = CHUNK_AUTO_ROWS
    pairs = block_pairs(bucket, probe, fallback, n_b, chunk)

    # A row of a tile may lie wholly outside the support. Filled with the lowest finite value instead of -inf,
    # its logsumexp is finite (about -3e38 in float32), drops out of the sum over tiles, and its gradient is
    # exactly zero instead of NaN; every row has some tile inside its support.
    lowest = torch.finfo(q.dtype).min

    def tile_logsumexp(q: Tensor, k: Tensor, rows: slice, cols: slice) -> Tensor:
        return _fused_row_logsumexp(_sparse_attention(q, k, bucket, probe, fallback, rho, score, mask_self, rows,
                                                      cols, lowest))

    # each anchor's softmax normaliser over the blocks its block meets (each tile recomputed in the backward)
    parts: dict[int, list[Tensor]] = {}
    for rows, cols in pairs:
        for r, c in ((rows, cols), (cols, rows)) if rows != cols else ((rows, cols),):
            parts.setdefault(r.start, []).append(checkpoint(tile_logsumexp, q, k, r, c, use_reentrant=False))
    lse = torch.cat([torch.logsumexp(torch.stack(parts[start]), dim=0) for start in sorted(parts)])

    def block(q: Tensor, k: Tensor, lse: Tensor, rows: slice, cols: slice) -> Tensor:
        att = _sparse_attention(q, k, bucket, probe, fallback, rho, score, mask_self, rows, cols)
        return att + (shift - lse[rows])[:, None]

    loss = blockwise_nce(z1, z2, block, (q, k, lse), chunk, pairs=pairs, **nce)
    return loss, fallback, support


@torch.no_grad()
def _sparse_diagnostics(
    q: Tensor, k: Tensor, rho: float, score: str, zhat: Tensor, bucket_r: Tensor, probe_r: Tensor
) -> dict[str, float]:
    """The attention diagnostics on the first :data:`DIAG_ROWS` anchors, from their dense support rows."""
    rows = torch.arange(min(q.shape[0], DIAG_ROWS), device=q.device)
    mask, _ = lsh_support_mask(bucket_r, probe_r, rows)
    p = torch.softmax(_scores(q[rows], k, rho, score).masked_fill(~mask, _NEG_INF), dim=1)
    return weighting_diagnostics(p, torch.cdist(zhat[rows].double(), zhat.double()), mask)
