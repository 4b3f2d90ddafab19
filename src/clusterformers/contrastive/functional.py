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
``impl="sorted"``, whose tile layout has data-dependent shapes (see there). :func:`sparse_fare` is defined in
:mod:`.sparse` and shared here; FARE's attention pieces live in :mod:`.fare_attention`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from clusterformers.contrastive.diagnostics import DIAG_ROWS, weighting_diagnostics
from clusterformers.contrastive.fare_attention import (
    NEG_INF,
    attribute,
    check_options,
    fare_attention,
    fill_self_pairs,
    fused_shifted_log_softmax,
    log_scale,
    projections,
)
from clusterformers.contrastive.inputs import check_embeddings, check_sensitive, compute_dtype, group_indicator
from clusterformers.contrastive.kernels import sensitive_kernel
from clusterformers.contrastive.nce import LogWeightBlocks, blockwise_nce, chunk_rows, weighted_nce
from clusterformers.contrastive.sparse import sparse_fare

__all__ = ["cclk", "cclk_weights", "fair_info_nce", "fare", "info_nce", "sparse_fare"]


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
        return fill_self_pairs(log_w, rows, cols)

    chunk = chunk_rows(chunk_size, b)
    if chunk < b:
        loss = blockwise_nce(z1, z2, block, (), chunk, **nce)
        return (loss, {"loss": float(loss.detach()), **stats}) if return_stats else loss
    return _finish(z1, z2, block(slice(0, b), slice(0, b)), nce, return_stats, stats)


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
        return fill_self_pairs(log_w.masked_fill(groups[rows, None] != groups[None, cols], NEG_INF), rows, cols)

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
    check_options(rho, score, neg_scale, z_norm)
    z1, z2 = check_embeddings(z1, z2, check_inputs)
    b = z1.shape[0]
    dtype = compute_dtype(z1.dtype, w_q.dtype)
    zhat, _ = attribute(sensitive, w_q, b, z1.device, check_inputs, z_norm)
    q, k, rho = projections(zhat, w_q, w_k, rho, score, dtype)
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
    att = fare_attention(q, k, rho, score, mask_self, slice(start, stop), slice(0, k.shape[0]))
    return fused_shifted_log_softmax(att, log_scale(k.shape[0], neg_scale))


def _fare_chunked(z1: Tensor, z2: Tensor, zhat: Tensor, q: Tensor, k: Tensor, rho: float, score: str,
                  neg_scale: str, mask_self: bool, nce: dict, chunk: int, return_stats: bool, diagnostics: bool
                  ) -> Tensor | tuple[Tensor, dict[str, float]]:
    """FARE through :func:`~.nce.blockwise_nce`: memory grows as ``chunk · b`` instead of ``b²``; each anchor's
    attention softmax is normalised in the same walk over tiles as the loss."""
    b = z1.shape[0]

    def block(q: Tensor, k: Tensor, rows: slice, cols: slice) -> Tensor:
        return fare_attention(q, k, rho, score, mask_self, rows, cols)

    loss = blockwise_nce(z1, z2, block, (q, k), chunk, softmax_shift=log_scale(b, neg_scale), **nce)
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
