"""Batch-independent discretisers turning a float protected attribute into groups (for Fair-InfoNCE).

Fit once on the training attributes; the groups of a sample never depend on its batch. ColorMNIST uses
``KMeansDiscretizer(k=10).fit(c / 255)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def _as_2d(x: Tensor, name: str) -> Tensor:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, Tensor) else type(x).__name__
        raise TypeError(f"{name} must be a float tensor [N] or [N, s], got {got}")
    if x.dim() == 1:
        x = x[:, None]
    if x.dim() != 2:
        raise ValueError(f"{name} must be [N] or [N, s], got shape {list(x.shape)}")
    return x


class KMeansDiscretizer:
    """k-means (k-means++ initialisation, Lloyd iterations) on the training attributes.

    Args:
        k: number of groups.
        seed: fixes the k-means++ draws.
        n_iter: maximum Lloyd iterations.
        tol: stop when no centre moves by more than ``tol``.

    Attributes:
        centers: ``[k, s]`` float64 centres once fitted, else ``None``.
    """

    def __init__(self, k: int = 10, seed: int = 0, n_iter: int = 100, tol: float = 1e-8) -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k, self.seed, self.n_iter, self.tol = k, seed, n_iter, tol
        self.centers: Tensor | None = None

    @property
    def fitted(self) -> bool:
        return self.centers is not None

    def fit(self, x: Tensor) -> KMeansDiscretizer:
        """Fit on ``x`` ``[N, s]`` (or ``[N]``), ``N >= k``; computed in float64 on the CPU."""
        data = _as_2d(x, "x").detach().to("cpu", torch.float64)
        if data.shape[0] < self.k:
            raise ValueError(f"KMeansDiscretizer needs N >= k = {self.k} samples to fit, got {data.shape[0]}")
        gen = torch.Generator().manual_seed(self.seed)
        centers = data[torch.randint(data.shape[0], (1,), generator=gen)]
        for _ in range(1, self.k):
            dist = torch.cdist(data, centers).min(dim=1).values ** 2
            probs = dist / dist.sum() if dist.sum() > 0 else torch.full_like(dist, 1.0 / len(dist))
            centers = torch.cat([centers, data[torch.multinomial(probs, 1, generator=gen)]])
        for _ in range(self.n_iter):
            assign = torch.cdist(data, centers).argmin(dim=1)
            sums = torch.zeros_like(centers).index_add(0, assign, data)
            counts = torch.bincount(assign, minlength=self.k).to(data.dtype)[:, None]
            new = torch.where(counts > 0, sums / counts.clamp_min(1), centers)
            moved = float((new - centers).abs().max())
            centers = new
            if moved <= self.tol:
                break
        self.centers = centers
        return self

    def __call__(self, x: Tensor) -> Tensor:
        """Groups ``[N]`` (long) of ``x`` ``[N, s]``: index of the nearest centre."""
        if self.centers is None:
            raise ValueError("KMeansDiscretizer is not fitted: call .fit(train_attributes) first")
        data = _as_2d(x, "x")
        if data.shape[1] != self.centers.shape[1]:
            raise ValueError(f"x must have s = {self.centers.shape[1]} columns as fitted, got {data.shape[1]}")
        centers = self.centers.to(device=data.device, dtype=torch.promote_types(data.dtype, torch.float32))
        return torch.cdist(data.to(centers.dtype), centers).argmin(dim=1)


class GridDiscretizer:
    """Fixed grid: per-dimension inner edges; the group is the mixed-radix index of the cell.

    Args:
        edges: one increasing sequence of inner edges per attribute dimension (``len(edges) == s``); a
            value ``x`` falls in bin ``#{e : e <= x}`` of its dimension.
    """

    def __init__(self, edges: Sequence[Sequence[float]]) -> None:
        if len(edges) == 0:
            raise ValueError("edges must hold one sequence of inner edges per dimension, got none")
        self.edges = [torch.as_tensor(e, dtype=torch.float64).flatten() for e in edges]
        for d, e in enumerate(self.edges):
            if e.numel() and bool((e[1:] <= e[:-1]).any()):
                raise ValueError(f"edges[{d}] must be strictly increasing, got {e.tolist()}")

    @property
    def fitted(self) -> bool:
        return True

    @property
    def n_groups(self) -> int:
        n = 1
        for e in self.edges:
            n *= e.numel() + 1
        return n

    def __call__(self, x: Tensor) -> Tensor:
        """Groups ``[N]`` (long) of ``x`` ``[N, s]`` with ``s == len(edges)``."""
        data = _as_2d(x, "x")
        if data.shape[1] != len(self.edges):
            raise ValueError(f"x must have s = {len(self.edges)} columns (one per edges entry), got {data.shape[1]}")
        group = torch.zeros(data.shape[0], dtype=torch.long, device=data.device)
        for d, e in enumerate(self.edges):
            e = e.to(device=data.device, dtype=data.dtype)
            group = group * (e.numel() + 1) + torch.bucketize(data[:, d].contiguous(), e, right=True)
        return group
