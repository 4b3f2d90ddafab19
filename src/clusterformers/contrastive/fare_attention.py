"""FARE's attention over the negatives, shared by :func:`~.functional.fare` and :func:`~.sparse.sparse_fare`.

The attribute is standardised (``ẑ``), projected to queries ``W_Q ẑ`` and keys ``W_K ẑ``, and scored; each
anchor's softmax over its negatives gives the weights ``W_ij = (b−1) p_ij`` of the weighted NCE. The
softmax pieces are compiled regions (:mod:`clusterformers.fused`) with static shapes.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from clusterformers.contrastive.inputs import check_sensitive, compute_dtype, one_hot_groups
from clusterformers.contrastive.nce import NEG_INF
from clusterformers.fused import fused

SCORES = ("dot", "neg_sqdist")
Z_NORMS = ("batch", "none")
NEG_SCALES = ("b-1", "none")


def check_options(rho: float | None, score: str, neg_scale: str, z_norm: str, z_norms: tuple[str, ...] = Z_NORMS
                  ) -> None:
    """Raise on a FARE option outside its choices (``rho`` a positive number or ``None``)."""
    if rho is not None and not rho > 0:
        raise ValueError(f"rho must be > 0 or None, got {rho}")
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    if neg_scale not in NEG_SCALES:
        raise ValueError(f"neg_scale must be one of {NEG_SCALES}, got {neg_scale!r}")
    if z_norm not in z_norms:
        raise ValueError(f"z_norm must be one of {z_norms}, got {z_norm!r}")


def standardize(z: Tensor, z_norm: str) -> Tensor:
    """``"batch"``: per-dimension ``(z − mean) / (std + 1e-6)`` with batch statistics; ``"none"``: ``z``
    (``z_norm`` as checked by :func:`check_options`)."""
    if z_norm == "none":
        return z
    return (z - z.mean(0)) / (z.std(0, unbiased=False) + 1e-6)


def attribute(
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


def scores(q: Tensor, k: Tensor, rho: float, score: str) -> Tensor:
    """``q·k/ρ`` (``"dot"``) or ``−‖q − k‖²/2ρ`` (``"neg_sqdist"``) for ``q [..., T, d_k]``, ``k [..., T', d_k]``."""
    dots = (q / rho) @ k.transpose(-1, -2)
    if score == "dot":
        return dots
    return dots - ((q * q).sum(-1)[..., :, None] + (k * k).sum(-1)[..., None, :]) / (2 * rho)


def projections(
    zhat: Tensor, w_q: Tensor, w_k: Tensor, rho: float | None, score: str, dtype: torch.dtype
) -> tuple[Tensor, Tensor, float]:
    """Queries and keys ``[b, d_k]`` in ``dtype``, and ``ρ`` (``None``: ``√d_k``)."""
    if w_q.dim() != 2 or w_q.shape != w_k.shape:
        raise ValueError(f"w_q and w_k must both be [d_k, s], got {list(w_q.shape)} and {list(w_k.shape)}")
    rho = math.sqrt(w_q.shape[0]) if rho is None else float(rho)
    zhat = zhat.to(dtype)
    return zhat @ w_q.to(dtype).T, zhat @ w_k.to(dtype).T, rho


def log_scale(b: int, neg_scale: str) -> float:
    """``log(b − 1)`` for ``"b-1"`` (uniform attention gives InfoNCE), ``0`` for ``"none"``."""
    return math.log(b - 1) if neg_scale == "b-1" else 0.0


def fill_self_pairs(log_w: Tensor, rows: slice, cols: slice) -> Tensor:
    """``log_w[i, j] = -inf`` in place where anchor ``rows.start + i`` is ``cols.start + j``: the self pairs
    of the block ``log W[rows, cols]``."""
    offset = rows.start - cols.start
    if -log_w.shape[0] < offset < log_w.shape[1]:
        log_w.diagonal(offset=offset).fill_(NEG_INF)
    return log_w


def fare_attention(q: Tensor, k: Tensor, rho: float, score: str, mask_self: bool, rows: slice, cols: slice
                   ) -> Tensor:
    """FARE's attention scores of anchors ``rows`` against negatives ``cols``, self pairs at ``-inf`` when
    ``mask_self``."""
    att = scores(q[rows], k[cols], rho, score)
    if mask_self:
        with torch.no_grad():  # the softmax and logsumexp give the -inf entries exactly zero gradient
            fill_self_pairs(att, rows, cols)
    return att


def _shifted_log_softmax(att: Tensor, shift: float) -> Tensor:
    """``shift + log_softmax(att)`` over rows (``[r, b]``)."""
    return shift + torch.log_softmax(att, dim=1)


# compiled forward and backward, static shapes (see clusterformers.fused)
fused_shifted_log_softmax = fused(_shifted_log_softmax, dynamic=False)
