"""Slow, obviously-correct references and file contracts shared by the property tests (``test_fuzz.py``) and
the reliability counts (``docs/evidence/reliability_counts.py``): plain loops over Python floats."""

from __future__ import annotations

import math

import numpy as np
import torch


def ref_unit(row: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in row))
    return [x / norm for x in row] if norm > 0 else [0.0] * len(row)


def ref_dot(a: list[float], c: list[float]) -> float:
    return sum(x * y for x, y in zip(a, c))


def ref_weighted_nce(z1: torch.Tensor, z2: torch.Tensor, w: list[list[float]], temperature: float = 0.1,
                     negatives: str = "both", symmetric: bool = True) -> float:
    """nce.py: ``ℓ¹_i = −S_ii + log(e^{S_ii} + Σ_j W_ij e^{S_ij} + β Σ_{j≠i} W_ij e^{A_ij})``, ``ℓ²_i`` with
    ``S_ji`` and ``B_ij``; ``u, v`` the unit rows, ``S = u·v/τ``, ``A = u·u/τ``, ``B = v·v/τ``; mean over 2b."""
    u, v = [ref_unit(r) for r in z1.double().tolist()], [ref_unit(r) for r in z2.double().tolist()]
    b, losses = len(u), []
    for view in (1, 2) if symmetric else (1,):
        for i in range(b):
            s_ii = ref_dot(u[i], v[i]) / temperature
            terms = [s_ii]
            for j in range(b):
                if w[i][j] > 0:
                    cross = ref_dot(u[i], v[j]) if view == 1 else ref_dot(u[j], v[i])
                    terms.append(math.log(w[i][j]) + cross / temperature)
                    if negatives == "both" and j != i:
                        same = ref_dot(u[i], u[j]) if view == 1 else ref_dot(v[i], v[j])
                        terms.append(math.log(w[i][j]) + same / temperature)
            top = max(terms)
            losses.append(-s_ii + top + math.log(sum(math.exp(t - top) for t in terms)))
    return sum(losses) / len(losses)


def ref_one_hot(groups: list[int], width: int | None = None) -> list[list[float]]:
    ids = sorted(set(groups)) if width is None else list(range(width))
    return [[1.0 if g == c else 0.0 for c in ids] for g in groups]


def ref_fare_weights(rows: list[list[float]], w_q: list[list[float]], w_k: list[list[float]],
                     support: list[list[int]], score: str, rho: float = 1.0) -> list[list[float]]:
    """functional.fare / sparse_fare: ``ẑ`` the attribute standardised per column, ``(x − mean)/(std + 1e-6)``;
    ``q = W_Q ẑ``, ``k = W_K ẑ``, ``ρ`` (default 1); ``W_ij = (b−1) p_ij``, ``p_i`` the softmax over ``j ∈ S_i`` of
    ``q_i·k_j/ρ`` (``"dot"``) or ``−‖q_i − k_j‖²/2ρ`` (``"neg_sqdist"``)."""
    b = len(rows)
    q, k = ref_projections(rows, w_q), ref_projections(rows, w_k)
    w = [[0.0] * b for _ in range(b)]
    for i in range(b):
        scores = {j: ref_dot(q[i], k[j]) / rho for j in support[i]}
        if score == "neg_sqdist":
            scores = {j: -sum((x - y) ** 2 for x, y in zip(q[i], k[j])) / (2 * rho) for j in support[i]}
        top = max(scores.values())
        total = sum(math.exp(s - top) for s in scores.values())
        for j, s in scores.items():
            w[i][j] = (b - 1) * math.exp(s - top) / total
    return w


def ref_standardise(rows: list[list[float]]) -> list[list[float]]:
    b, s = len(rows), len(rows[0])
    out = [list(r) for r in rows]
    for c in range(s):
        mean = sum(r[c] for r in rows) / b
        std = math.sqrt(sum((r[c] - mean) ** 2 for r in rows) / b)
        for i in range(b):
            out[i][c] = (rows[i][c] - mean) / (std + 1e-6)
    return out


def ref_projections(rows: list[list[float]], w: list[list[float]]) -> list[list[float]]:
    return [[ref_dot(w_row, r) for w_row in w] for r in rows]


def ref_lsh_support(hashed: list[list[float]], seed: int, n_b: int, n_hashes: int, neighbours: int) -> list[list[int]]:
    """lsh.py: unit Gaussian directions ``R_r`` (drawn from ``seed``), ``h_r(x) = argmax [x R_r ; −x R_r]``, the
    probes the top ``1 + neighbours`` entries; ``S_i = {j ≠ i : h_r(x_j) ∈ P_r(i) for some r}``."""
    b = len(hashed)
    if n_b == 1:
        return [[j for j in range(b) if j != i] for i in range(b)]
    draw = torch.randn(n_hashes, len(hashed[0]), n_b // 2, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64).tolist()
    support: list[set[int]] = [set() for _ in range(b)]
    for rot in draw:
        columns = [[row[c] for row in rot] for c in range(n_b // 2)]
        columns = [[x / math.sqrt(sum(y * y for y in col)) for x in col] for col in columns]
        full = [[ref_dot(x, col) for col in columns] + [-ref_dot(x, col) for col in columns] for x in hashed]
        ranked = [sorted(range(n_b), key=lambda c, f=f: -f[c]) for f in full]
        own, probes = [r[0] for r in ranked], [set(r[: 1 + neighbours]) for r in ranked]
        for i in range(b):
            support[i] |= {j for j in range(b) if j != i and own[j] in probes[i]}
    return [sorted(s) for s in support]


def npz_contract(images: np.ndarray, labels: np.ndarray):
    """What load_npz's docstring promises for these arrays: ``(uint8 images, int64 labels)``, or None (refused)."""
    if images.ndim not in (3, 4) or images.dtype.kind not in "uif" or labels.dtype.kind not in "uif":
        return None
    if images.ndim == 4 and images.shape[1] in (1, 3) and images.shape[3] not in (1, 3):
        return None  # channels first
    if images.dtype.kind == "f" and not np.isfinite(images).all():
        return None
    if images.dtype == np.uint8:
        out = images
    elif images.dtype.kind == "f" and (images.size == 0 or (images.min() >= 0 and images.max() <= 1)):
        out = np.rint(images.astype(np.float64) * 255).astype(np.uint8)
    elif images.size == 0 or (images.min() >= 0 and images.max() <= 255 and (images == np.rint(images)).all()):
        out = images.astype(np.uint8)
    else:
        return None
    if labels.ndim != 1 or len(labels) != len(images):
        return None
    if labels.size and not (np.isfinite(labels).all() and labels.min() >= 0 and labels.max() < 2**63
                            and (labels == np.rint(labels)).all()):
        return None
    return out, labels.astype(np.int64)
