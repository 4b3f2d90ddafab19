"""Routing diagnostics in clusterformers.metrics against brute force and scikit-learn."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from sklearn.metrics import normalized_mutual_info_score

from clusterformers.metrics import dispersion_ratio, expert_load_std, flip_rate, nmi, purity, routing_stability


def labels(seed, n=60, k=5):
    return torch.randint(0, k, (n,), generator=torch.Generator().manual_seed(seed))


def test_routing_stability_equals_pair_count():
    a, b = labels(0), labels(1)
    b[:30] = a[:30]
    flips = sum((a[i] == a[j]) != (b[i] == b[j]) for i, j in itertools.product(range(60), repeat=2))
    assert routing_stability(a, b, 5) == pytest.approx(int(flips) / 60**2, abs=1e-12)
    assert routing_stability(a, a, 5) == 0.0
    assert routing_stability(a, (a + 1) % 5, 5) == 0.0  # a relabelling keeps every pair's status


def test_purity_and_nmi():
    a, z = labels(2), labels(3, k=4)
    a[:40] = z[:40]
    n = np.zeros((5, 4))
    for i, j in zip(a.tolist(), z.tolist(), strict=True):
        n[i, j] += 1
    assert purity(a, z) == pytest.approx(n.max(1).sum() / 60)
    for x, y in [(a, z), (z, a), (a, a), (labels(4), labels(5)), (torch.zeros(9, dtype=torch.long), labels(6, n=9))]:
        assert nmi(x, y) == pytest.approx(normalized_mutual_info_score(y.numpy(), x.numpy()), abs=1e-12)
    assert nmi(torch.zeros(5, dtype=torch.long), torch.ones(5, dtype=torch.long)) == 1.0
    assert purity(z, z) == 1.0


def test_expert_load_std():
    idx = torch.tensor([[0, 1], [0, 2], [0, 1], [3, 1]])
    pct = np.array([3, 3, 1, 1]) / 8 * 100
    assert expert_load_std(idx, 5) == pytest.approx(np.append(pct, 0).std())
    balanced = torch.tensor([[0, 1], [2, 3]])
    assert expert_load_std(balanced, 4) == 0.0
    assert expert_load_std([idx, balanced], 4) == pytest.approx(pct.std() / 2)


def test_dispersion_ratio():
    g = torch.Generator().manual_seed(7)
    z = labels(8, n=30, k=3)
    u = torch.randn(30, 4, generator=g, dtype=torch.float64)
    means = torch.stack([u[z == k].mean(0) for k in range(3)])
    within = sum(((u[i] - means[z[i]]) ** 2).sum() for i in range(30))
    between = sum((z == k).sum() * ((means[k] - u.mean(0)) ** 2).sum() for k in range(3))
    assert dispersion_ratio(u, z) == pytest.approx(float(within / between))
    assert dispersion_ratio(u + 10 * torch.eye(3, 4, dtype=torch.float64)[z], z) < dispersion_ratio(u, z)


def test_flip_rate():
    clean = torch.tensor([[0, 1], [2, 3], [1, 0], [3, 2]])
    corrupt = torch.tensor([[0, 2], [3, 2], [1, 0], [2, 3]])
    assert flip_rate(clean, corrupt) == (0.5, 0.25)
    assert flip_rate(clean[:, 0], corrupt[:, 0]) == (0.5, 0.5)


def test_bad_inputs():
    with pytest.raises(ValueError, match="top1"):
        routing_stability(labels(0), labels(1, n=5), 5)
    with pytest.raises(ValueError, match="labels"):
        purity(labels(0), labels(1, n=5))
    with pytest.raises(ValueError, match="assign"):
        nmi(torch.randn(4), labels(1, n=4))
    with pytest.raises(ValueError, match="top_corrupt"):
        flip_rate(torch.zeros(3, 2), torch.zeros(3, 1))
    with pytest.raises(ValueError, match="u"):
        dispersion_ratio(torch.randn(5), labels(0, n=5))
