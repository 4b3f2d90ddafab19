"""Kernels on the sensitive attribute for CCLK (CCLK-release ``ConditionalSampling.py``).

Every kernel returns ``K_Z`` ``[b, b]`` with its diagonal set to 1, as CCLK does. ``t`` is the bandwidth:
cosine ``z_i·z_j/(‖z_i‖‖z_j‖)`` (no ``t``), rbf ``exp(−‖Δz‖²/t)``, laplacian ``exp(−‖Δz‖/t)``, linear
``z_i·z_j/t`` and polynomial ``(z_i·z_j)³/t``. CCLK's ``t = 1`` on raw 0–255 colours makes rbf/laplacian
``K_Z ≈ I``; ``bandwidth=None`` therefore takes the per-batch median of ``‖Δz‖²`` (rbf) or ``‖Δz‖``
(laplacian) and 1 for the others.
"""

from __future__ import annotations

import torch
from torch import Tensor

from clusterformers.contrastive.nce import unit_rows

KERNELS = ("cosine", "rbf", "laplacian", "linear", "polynomial")


def _pair_sqdist(z: Tensor) -> Tensor:
    """``‖z_i − z_j‖²`` ``[b, b]``, exact zeros on the diagonal."""
    diff = z[:, None, :] - z[None, :, :]
    return (diff * diff).sum(-1)


def _median_bandwidth(z: Tensor, kernel: str) -> Tensor | float:
    """:func:`median_bandwidth` as a 0-d tensor (no device sync), or the float 1.0 for the other kernels."""
    if kernel not in ("rbf", "laplacian"):
        return 1.0
    b = z.shape[0]
    if b < 2:
        return 1.0
    iu = torch.triu_indices(b, b, offset=1, device=z.device)
    sq = _pair_sqdist(z)[iu[0], iu[1]]
    med = (sq if kernel == "rbf" else sq.sqrt()).median()
    return torch.where(med > 0, med, torch.ones_like(med))


def median_bandwidth(z: Tensor, kernel: str) -> float:
    """Median over pairs ``i < j`` of ``‖Δz‖²`` (rbf) or ``‖Δz‖`` (laplacian), 1.0 otherwise or if it is 0."""
    return float(_median_bandwidth(z, kernel))


def sensitive_kernel(z: Tensor, kernel: str = "cosine", bandwidth: float | None = None) -> Tensor:
    """Kernel matrix ``K_Z`` of the sensitive attribute, diagonal set to 1.

    Args:
        z: ``[b, s]`` raw sensitive attribute (CCLK uses it unscaled).
        kernel: one of :data:`KERNELS`.
        bandwidth: ``t > 0``; ``None`` = :func:`median_bandwidth` (kept on the device: no sync).

    Returns:
        ``[b, b]`` in ``z``'s dtype.
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if bandwidth is not None and not bandwidth > 0:
        raise ValueError(f"bandwidth must be > 0 or None (median heuristic), got {bandwidth}")
    t = _median_bandwidth(z, kernel) if bandwidth is None else float(bandwidth)
    if kernel == "cosine":
        zn = unit_rows(z, eps=1e-8)
        k = zn @ zn.T
    elif kernel == "rbf":
        k = torch.exp(-_pair_sqdist(z) / t)
    elif kernel == "laplacian":
        k = torch.exp(-_pair_sqdist(z).sqrt() / t)
    elif kernel == "linear":
        k = (z @ z.T) / t
    else:
        k = (z @ z.T) ** 3 / t
    return k.fill_diagonal_(1.0)
