"""Attention diagnostics: does the negative weighting condition on the protected attribute?

For anchor rows with weights ``p_ij`` (normalised over the support ``S_i``) and attribute distances
``d_ij = ‖ẑ_i − ẑ_j‖``: (a) the mean per-row Spearman correlation of ``p`` and ``d`` over ``S_i`` (want < 0:
similar attributes weigh more); (b) ``Σ_j p_ij d_ij / mean_{S_i} d_ij`` (want < 1); (c) the normalised
entropy ``H(p_i)/log|S_i|`` and the effective support ``1/Σ_j p_ij²``. Computed without gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

DIAG_ROWS = 512  # the diagnostics of a loss read its first this many anchor rows


def average_ranks(x: Tensor, mask: Tensor) -> Tensor:
    """Ranks ``0..n_i-1`` of ``x`` ``[r, n]`` within each row's ``mask``, ties averaged (masked entries: 0)."""
    r, n = x.shape
    big = torch.finfo(x.dtype).max
    vals, order = torch.sort(torch.where(mask, x, torch.full_like(x, big)), dim=1, stable=True)
    new_run = torch.ones_like(vals, dtype=torch.bool)
    new_run[:, 1:] = vals[:, 1:] != vals[:, :-1]
    run = torch.cumsum(new_run.long(), dim=1) - 1 + torch.arange(r, device=x.device)[:, None] * n
    pos = torch.arange(n, device=x.device, dtype=x.dtype).expand(r, n).reshape(-1)
    flat = run.reshape(-1)
    first = torch.full((r * n,), float(n), dtype=x.dtype, device=x.device).scatter_reduce(0, flat, pos, "amin")
    last = torch.zeros(r * n, dtype=x.dtype, device=x.device).scatter_reduce(0, flat, pos, "amax")
    sorted_rank = ((first + last) / 2)[flat].reshape(r, n)
    ranks = torch.empty_like(sorted_rank).scatter_(1, order, sorted_rank)
    return torch.where(mask, ranks, torch.zeros_like(ranks))


def _masked_pearson(a: Tensor, b: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row Pearson correlation over ``mask``; also whether it is defined (≥ 3 entries, both vary)."""
    m = mask.to(a.dtype)
    n = m.sum(dim=1).clamp_min(1)
    ac = (a - (a * m).sum(1, keepdim=True) / n[:, None]) * m
    bc = (b - (b * m).sum(1, keepdim=True) / n[:, None]) * m
    va, vb = (ac * ac).sum(1), (bc * bc).sum(1)
    scale = torch.finfo(a.dtype).eps * 16
    ok = (mask.sum(1) >= 3) & (va > scale * (a * a * m).sum(1)) & (vb > scale * (b * b * m).sum(1))
    corr = (ac * bc).sum(1) / (va * vb).clamp_min(torch.finfo(a.dtype).tiny).sqrt()
    return corr, ok


@torch.no_grad()
def weighting_diagnostics(weights: Tensor, dist: Tensor, support: Tensor) -> dict[str, float]:
    """Measures (a)–(c) of the module docstring for rows of negative weights.

    Args:
        weights: ``[r, n]`` non-negative weights of each anchor row (any scale; normalised here).
        dist: ``[r, n]`` attribute distances ``d_ij``.
        support: bool ``[r, n]``, the row's candidate set ``S_i`` (for the mean distance and ``log|S_i|``).

    Returns:
        ``spearman``, ``dist_ratio``, ``entropy``, ``eff_support`` (means over rows where defined; NaN if
        no row qualifies) and ``diag_rows``.
    """
    w = torch.where(support, weights.double(), torch.zeros_like(weights, dtype=torch.float64))
    d = dist.double()
    total = w.sum(1)
    rows = total > 0
    p = w / total.clamp_min(torch.finfo(torch.float64).tiny)[:, None]
    size = support.sum(1)
    rank_corr, ok = _masked_pearson(average_ranks(p, support), average_ranks(d, support), support)
    mean_d = (d * support).sum(1) / size.clamp_min(1)
    ratio_ok = rows & (mean_d > 0)
    ratio = (p * d).sum(1) / mean_d.clamp_min(torch.finfo(torch.float64).tiny)
    plogp = torch.where(p > 0, p * torch.log(p.clamp_min(torch.finfo(torch.float64).tiny)), torch.zeros_like(p))
    ent_ok = rows & (size >= 2)
    entropy = -plogp.sum(1) / torch.log(size.clamp_min(2).double())
    eff = 1.0 / (p * p).sum(1).clamp_min(torch.finfo(torch.float64).tiny)

    def mean(x: Tensor, sel: Tensor) -> float:
        return float(x[sel].mean()) if bool(sel.any()) else float("nan")

    return {
        "spearman": mean(rank_corr, ok & rows),
        "dist_ratio": mean(ratio, ratio_ok),
        "entropy": mean(entropy, ent_ok),
        "eff_support": mean(eff, rows),
        "diag_rows": float(rows.sum()),
    }
