"""Helpers every experiment shares: epoch batching and evaluation batching."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

log = logging.getLogger(__name__)


def epoch_batch_fn(
    tensors: tuple[Tensor, ...], batch_size: int, seed: int
) -> tuple[Callable[[int, int, int], tuple[Tensor, ...]], int]:
    """A deterministic ``batch_fn(step, rank, world)`` over shuffled epochs, and the steps per epoch.

    Epoch ``e`` uses the permutation drawn from ``seed`` and ``e``, so the data order depends only on the
    seed (paired across variants) and a resumed run sees the same batches. Each of ``world`` ranks takes an
    equal share of every global batch of ``batch_size`` samples (drop-last).
    """
    n = tensors[0].shape[0]
    if n < batch_size:
        raise ValueError(f"batch_size {batch_size} exceeds the {n} training samples")
    steps_per_epoch = n // batch_size

    def batch_fn(step: int, rank: int = 0, world: int = 1) -> tuple[Tensor, ...]:
        epoch, i = divmod(step, steps_per_epoch)
        gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
        perm = torch.randperm(n, generator=gen)
        idx = perm[i * batch_size : (i + 1) * batch_size]
        idx = idx[rank::world]
        return tuple(t[idx] for t in tensors)

    return batch_fn, steps_per_epoch


def batches(tensors: tuple[Tensor, ...], batch_size: int) -> Iterator[tuple[Tensor, ...]]:
    """Consecutive evaluation batches (no shuffling, last batch may be short)."""
    n = tensors[0].shape[0]
    for i in range(0, n, batch_size):
        yield tuple(t[i : i + batch_size] for t in tensors)
