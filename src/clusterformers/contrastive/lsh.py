"""Angular LSH for SparseFARE: buckets, multi-probe supports and the tiles of the sorted implementations.

One hash round ``r`` maps ``x ∈ R^s`` to ``h_r(x) = argmax [x R_r ; −x R_r]`` with ``R_r ∈ R^{s × n_b/2}``
(Andoni et al. 2015; Reformer). The columns of ``R_r`` are Gaussian directions normalised to unit length:
in the few dimensions of a protected attribute (s = 3), raw N(0, 1) columns give cells whose sizes follow
the column norms (at n_b = 128, ``n_b Σ_k p_k² ≈ 11`` instead of ``≈ 1.3``), which would make the
"sub-quadratic" sorted path nearly quadratic; unit columns split the sphere evenly (n_b = 4: exact quarters).
``unit=False`` keeps the raw Gaussian columns.

Multi-probe: anchor ``i`` probes ``P_r(i)``, the top ``1 + neighbours`` entries of ``[x_i R_r ; −x_i R_r]``
(its own bucket first), and attends to ``S_i = {j ≠ i : h_r(x_j) ∈ P_r(i) for some r}``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

HASH_ON = ("z", "keys")


@dataclass(frozen=True)
class LSHConfig:
    """How SparseFARE hashes a batch into buckets; checked when built.

    Attributes:
        n_buckets: ``n_b``: 1 (no hashing, one bucket) or even.
        bucket_size: target bucket size ``c``: ``n_b = 2⌈b/2c⌉`` follows the batch, so the cost stays
            sub-quadratic (overrides ``n_buckets``); ``None``: ``n_buckets``.
        n_hashes: hash rounds (the support is the union over rounds); more than one needs ``impl="dense"``.
        neighbours: extra buckets probed per round (multi-probe), below ``n_b``.
        hash_on: ``"z"`` (hash the standardised attribute ``ẑ``) or ``"keys"`` (hash ``W_K ẑ``, an ablation).
        unit_rotations: unit-length projection directions (see the module docstring).
    """

    n_buckets: int = 4
    bucket_size: int | None = None
    n_hashes: int = 1
    neighbours: int = 0
    hash_on: str = "z"
    unit_rotations: bool = True

    def __post_init__(self) -> None:
        if self.n_buckets != 1 and (self.n_buckets < 2 or self.n_buckets % 2):
            raise ValueError(f"n_buckets must be 1 (no hashing) or even >= 2, got {self.n_buckets}")
        if self.bucket_size is not None and self.bucket_size < 1:
            raise ValueError(f"bucket_size must be >= 1 or None, got {self.bucket_size}")
        if self.n_hashes < 1:
            raise ValueError(f"n_hashes must be >= 1, got {self.n_hashes}")
        if self.neighbours < 0:
            raise ValueError(f"neighbours must be >= 0, got {self.neighbours}")
        if self.hash_on not in HASH_ON:
            raise ValueError(f"hash_on must be one of {HASH_ON}, got {self.hash_on!r}")

    def buckets_for(self, batch: int) -> int:
        """``n_b`` for a batch of ``batch`` anchors (:func:`buckets_for_batch`)."""
        return buckets_for_batch(batch, self.n_buckets, self.bucket_size)


def buckets_for_batch(batch: int, n_buckets: int, bucket_size: int | None) -> int:
    """Number of buckets: ``n_buckets``, or ``2⌈b / 2c⌉`` (≥ 2) when a target ``bucket_size = c`` is set."""
    if bucket_size is None:
        return n_buckets
    return max(2, 2 * math.ceil(batch / (2 * bucket_size)))


def draw_rotations(
    dim: int,
    n_buckets: int,
    n_hashes: int = 1,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    unit: bool = True,
) -> Tensor:
    """Random projections ``R`` ``[n_hashes, dim, n_buckets // 2]`` (``[n_hashes, dim, 0]`` if ``n_buckets == 1``).

    Drawn on the CPU (with ``generator`` if given, else the global CPU RNG) and then moved, so a seed gives
    the same buckets on every device.
    """
    if n_buckets != 1 and (n_buckets < 2 or n_buckets % 2):
        raise ValueError(f"n_buckets must be 1 (no hashing) or an even number >= 2, got {n_buckets}")
    rot = torch.randn(n_hashes, dim, n_buckets // 2, generator=generator, dtype=torch.float64)
    if unit and rot.numel():
        rot = rot / rot.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return rot.to(device=device, dtype=dtype)


@torch.no_grad()
def hash_buckets(x: Tensor, rotations: Tensor, neighbours: int = 0) -> tuple[Tensor, Tensor]:
    """Bucket and multi-probe set of every sample, for every hash round.

    Args:
        x: ``[b, s]`` hashed vectors.
        rotations: ``[n_hashes, s, n_b/2]`` from :func:`draw_rotations`.
        neighbours: extra buckets probed per round, ``0 <= neighbours < n_b``.

    Returns:
        ``buckets`` long ``[n_hashes, b]`` and ``probes`` long ``[n_hashes, b, 1 + neighbours]``, with
        ``probes[..., 0] == buckets``.
    """
    n_hashes, half = rotations.shape[0], rotations.shape[2]
    n_buckets = max(1, 2 * half)
    if not 0 <= neighbours < n_buckets:
        raise ValueError(f"neighbours must lie in 0..n_buckets-1 = 0..{n_buckets - 1}, got {neighbours}")
    b = x.shape[0]
    if half == 0:
        zeros = torch.zeros(n_hashes, b, 1, dtype=torch.long, device=x.device)
        return zeros[..., 0], zeros
    proj = torch.einsum("bs,rsk->rbk", x.to(rotations.dtype), rotations)
    probes = torch.cat([proj, -proj], dim=-1).topk(1 + neighbours, dim=-1).indices
    return probes[..., 0], probes


def support_mask(buckets: Tensor, probes: Tensor, rows: Tensor | None = None) -> Tensor:
    """Dense reference support with the empty-support fallback, for anchors ``rows`` (default: all).

    ``mask[k, j]`` is True when ``j ≠ i = rows[k]`` and ``h_r(j) ∈ P_r(i)`` for some round ``r``; an anchor
    with no such ``j`` attends to every ``j ≠ i``.

    Args:
        buckets: long ``[n_hashes, b]``.
        probes: long ``[n_hashes, b, 1 + m]``.
        rows: long ``[r]`` anchor indices or ``None``.

    Returns:
        bool ``[r, b]`` and the fallback flags bool ``[r]``.
    """
    b = buckets.shape[1]
    rows = torch.arange(b, device=buckets.device) if rows is None else rows
    hit = (buckets[:, None, None, :] == probes[:, rows, :, None]).any(dim=2).any(dim=0)
    not_self = torch.arange(b, device=buckets.device)[None, :] != rows[:, None]
    hit = hit & not_self
    fallback = ~hit.any(dim=1)
    return hit | (fallback[:, None] & not_self), fallback


@dataclass(frozen=True)
class BlockPlan:
    """Tiles of the sorted SparseFARE implementation.

    Attributes:
        query_idx: long ``[P, T]`` anchors of each tile (padding → 0).
        key_idx: long ``[P, T]`` candidate negatives of each tile (padding → 0).
        invalid: bool ``[P, T, T]``, True for pairs outside the support (padding, and self pairs unless
            allowed).
        fallback: bool ``[b]``, anchors whose support was empty and that attend to every ``j ≠ i``.
        support: long ``[b]``, ``|S_i|`` (j ≠ i) after the fallback.
    """

    query_idx: Tensor
    key_idx: Tensor
    invalid: Tensor
    fallback: Tensor
    support: Tensor


def tile_size(batch: int, n_buckets: int) -> int:
    """Tile side: the power of two nearest half the mean bucket size, clamped to 8..256."""
    half_mean = max(1.0, batch / max(1, n_buckets) / 2)
    return int(min(256, max(8, 2 ** round(math.log2(half_mean)))))


def _tiles(starts: Tensor, counts: Tensor, tile: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per segment, ``ceil(count / tile)`` tiles of positions ``start .. start + count - 1`` (CPU tensors).

    Returns:
        ``segment`` ``[n]`` of each tile, its positions ``[n, tile]`` (padding → 0) and its mask.
    """
    n_tiles = (counts + tile - 1) // tile
    segment = torch.repeat_interleave(torch.arange(len(counts)), n_tiles)
    first = torch.cumsum(n_tiles, 0) - n_tiles
    local = torch.arange(len(segment)) - first[segment]
    offset = local[:, None] * tile + torch.arange(tile)[None, :]
    mask = offset < counts[segment][:, None]
    return segment, torch.where(mask, starts[segment][:, None] + offset, torch.zeros_like(offset)), mask


def build_block_plan(
    bucket: Tensor, probe: Tensor, n_buckets: int, *, allow_self: bool = False, tile: int | None = None
) -> BlockPlan:
    """Sort by bucket and tile each probed bucket (one hash round).

    Query rows ``(i, r)`` (anchor ``i``, probe ``r``) are sorted by their probed bucket and keys by their own
    bucket (``O(b log b)`` on the device); each bucket's query tiles meet each of its key tiles, so the cost
    is ``Σ_k nq_k n_k ≈ b·c`` for buckets of size ``c``. Anchors with an empty support get one extra
    segment against all ``b`` keys. The tile layout depends only on the bucket sizes: it is laid out on the
    CPU from one small device-to-host copy (``2 n_b + 1`` counts) and sent back as one array. The number of
    tiles is data-dependent; every other shape is fixed, and no Python branch reads a tensor, so
    ``torch.compile`` traces the plan into one graph with unbacked (data-dependent) sizes.

    Args:
        bucket: long ``[b]`` own bucket of each sample.
        probe: long ``[b, 1 + m]`` probed buckets (``probe[:, 0] == bucket``, distinct per row).
        n_buckets: number of buckets.
        allow_self: keep the pair ``(i, i)`` (``mask_self=False``).
        tile: tile side; ``None`` = :func:`tile_size`.
    """
    b, n_probe = probe.shape
    dev = bucket.device
    tile = tile_size(b, n_buckets) if tile is None else tile
    target = probe.reshape(-1)
    key_counts, fallback, support = support_sizes(bucket, probe, n_buckets)
    query_counts = torch.zeros(n_buckets, dtype=torch.long, device=dev).index_add_(0, target, torch.ones_like(target))
    query_order = torch.div(torch.argsort(target, stable=True), n_probe, rounding_mode="floor")
    counts = torch.cat([query_counts, key_counts, fallback.sum()[None]]).cpu()
    q_counts = torch.cat([counts[:n_buckets], counts[-1:]])
    k_counts = torch.cat([counts[n_buckets:-1], torch.where(counts[-1:] > 0, b, 0)])
    q_starts, k_starts = torch.cumsum(q_counts, 0) - q_counts, torch.cumsum(k_counts, 0) - k_counts
    active = (q_counts > 0) & (k_counts > 0)
    q_seg, q_pos, q_mask = _tiles(q_starts, q_counts * active, tile)
    _, k_pos, k_mask = _tiles(k_starts, k_counts * active, tile)
    # every query tile of a segment meets every key tile of it
    k_tiles = (k_counts * active + tile - 1) // tile
    reps = k_tiles[q_seg]
    pair_q = torch.repeat_interleave(torch.arange(len(q_seg)), reps)
    pair_k = (torch.cumsum(k_tiles, 0) - k_tiles)[q_seg][pair_q] + torch.arange(len(pair_q)) - (
        torch.cumsum(reps, 0) - reps
    )[pair_q]
    fb_pair = (q_seg[pair_q] == n_buckets).long()[:, None]
    layout = torch.cat([q_pos[pair_q], k_pos[pair_k], q_mask[pair_q], k_mask[pair_k], fb_pair], dim=1).to(dev)
    q_pos, k_pos, q_mask, k_mask, fb_pair = layout.split([tile, tile, tile, tile, 1], dim=1)
    # the fallback anchors come first in argsort(~fallback), after the sorted query rows
    query_idx = torch.cat([query_order, torch.argsort(~fallback, stable=True)])[q_pos]
    key_idx = torch.cat([torch.argsort(bucket, stable=True), torch.arange(b, device=dev)])[k_pos]
    is_self = query_idx[:, :, None] == key_idx[:, None, :]
    if allow_self:
        is_self &= fb_pair.bool()[:, :, None]
    invalid = ~(q_mask.bool()[:, :, None] & k_mask.bool()[:, None, :]) | is_self
    return BlockPlan(query_idx, key_idx, invalid, fallback, support)


def support_sizes(bucket: Tensor, probe: Tensor, n_buckets: int) -> tuple[Tensor, Tensor, Tensor]:
    """Bucket sizes and supports of one hash round (``probe`` distinct per row, ``probe[:, 0] == bucket``).

    Returns:
        long ``[n_buckets]`` samples per bucket, bool ``[b]`` the anchors whose support is empty (they fall
        back to every ``j ≠ i``), and long ``[b]`` ``|S_i|`` (``j ≠ i``) after the fallback.
    """
    ones = torch.ones_like(bucket)
    key_counts = torch.zeros(n_buckets, dtype=torch.long, device=bucket.device).index_add_(0, bucket, ones)
    support = key_counts[probe].sum(dim=1) - 1
    fallback = support == 0
    return key_counts, fallback, torch.where(fallback, torch.full_like(support, bucket.shape[0] - 1), support)


@torch.no_grad()
def block_pairs(bucket: Tensor, probe: Tensor, fallback: Tensor, n_buckets: int, chunk: int
                ) -> tuple[list[tuple[slice, slice]], set[tuple[int, int]]]:
    """The pairs of blocks ``(I, J)``, ``I <= J``, of ``chunk`` anchors in which some anchor of one block has
    a negative of the other in its support (one hash round; anchors in any order, normally sorted by bucket
    so that the pairs are few), and the tiles that lie wholly inside the support. A fallback anchor's block
    meets every block.

    Args:
        bucket: long ``[b]`` own bucket of each anchor.
        probe: long ``[b, 1 + m]`` probed buckets.
        fallback: bool ``[b]``, anchors whose support was empty.
        n_buckets: number of buckets.
        chunk: anchors per block.

    Returns:
        ``(rows, cols)`` slices for :func:`~.nce.blockwise_nce`, and the ``(rows.start, cols.start)`` of the
        tiles, in either direction, in which every anchor of ``rows`` probes the bucket of every anchor of
        ``cols`` or falls back (such a tile needs no support mask); both read from one device-to-host copy
        of two ``[⌈b / chunk⌉]²`` bool matrices.
    """
    b, dev = bucket.shape[0], bucket.device
    n_blocks = -(-b // chunk)
    block = torch.arange(b, device=dev) // chunk
    ones = torch.ones(b, device=dev)
    own = torch.zeros(n_blocks * n_buckets, device=dev).index_add_(0, block * n_buckets + bucket, ones)
    own = own.view(n_blocks, n_buckets)
    # the probes of the anchors that do not fall back (a fallback anchor's block meets every block anyway)
    kept = (~fallback).to(own.dtype)[:, None].expand_as(probe).reshape(-1)
    probed = torch.zeros(n_blocks * n_buckets, device=dev).index_add_(
        0, (block[:, None] * n_buckets + probe).reshape(-1), kept).view(n_blocks, n_buckets)
    n_fallback = torch.zeros(n_blocks, device=dev).index_add_(0, block, fallback.to(own.dtype))
    meets = (probed @ own.T > 0) | (n_fallback > 0)[:, None]
    # block I covers bucket k when each of its anchors probes k or falls back; the tile (I, J) lies inside
    # the support when I covers every bucket present in J
    rows = torch.zeros(n_blocks, device=dev).index_add_(0, block, ones)
    uncovered = (probed + n_fallback[:, None] < rows[:, None]).to(own.dtype)
    full = (own > 0).to(own.dtype) @ uncovered.T == 0  # [J, I]
    both = torch.stack([(meets | meets.T).triu(), full.T]).cpu()
    blocks = [slice(start, min(b, start + chunk)) for start in range(0, b, chunk)]
    pairs = [(blocks[i], blocks[j]) for i, j in both[0].nonzero().tolist()]
    inside = both[1] & (both[0] | both[0].T)
    return pairs, {(blocks[i].start, blocks[j].start) for i, j in inside.nonzero().tolist()}
