"""SparseFARE: FARE's softmax restricted to the angular-LSH support of each anchor (:mod:`~.lsh`).

Two implementations with the same loss and gradients. ``impl="dense"`` is the reference: ``[b, b]`` masks,
fixed shapes, any number of hash rounds. ``impl="sorted"`` sorts the anchors by bucket and never forms a
``[b, b]`` tensor; it tiles each bucket when the buckets are small, and walks blocks of sorted anchors when
they are large (:func:`sparse_fare`).
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
    log_scale,
    projections,
    scores,
)
from clusterformers.contrastive.inputs import check_embeddings, compute_dtype
from clusterformers.contrastive.lsh import (
    LSHConfig,
    block_pairs,
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
    segment_logsumexp,
    weighted_nce,
)

IMPLS = ("sorted", "dense")
WALK_MIN_BUCKET = 512  # sorted SparseFARE walks blocks of anchors when the mean bucket holds this many


def check_impl(impl: str, lsh: LSHConfig) -> None:
    """Raise unless ``impl`` is one of :data:`IMPLS` and can hash as ``lsh`` asks."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "sorted" and lsh.n_hashes != 1:
        raise ValueError(f"n_hashes must be 1 with impl='sorted' (use impl='dense'), got {lsh.n_hashes}")


def sparse_fare(
    z1: Tensor,
    z2: Tensor,
    sensitive: Tensor,
    w_q: Tensor,
    w_k: Tensor,
    *,
    lsh: LSHConfig | None = None,
    impl: str = "sorted",
    generator: torch.Generator | None = None,
    rotations: Tensor | None = None,
    buckets: Tensor | None = None,
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
    """SparseFARE: ``W_ij = (b−1) p_ij`` with ``p_i`` FARE's softmax over the LSH support ``S_i``.

    An anchor with ``S_i = ∅`` falls back to the dense FARE row (its loss stays defined;
    ``stats["fallback_rows"]``). ``rho`` … ``diagnostics`` as in :func:`~.functional.fare`.

    Shapes and host reads: ``impl="dense"`` has fixed shapes (``[b, b]`` masks) and, with
    ``check_inputs=False``, reads nothing on the host. ``impl="sorted"`` sorts the anchors by bucket and
    has two forms, with the same loss and gradients. For small buckets (a mean under 512 anchors) it tiles
    each bucket, so the number of tiles depends on the bucket sizes: it copies ``2 n_b + 1`` counts to the
    host once per call (also when compiled: ``torch.compile`` traces it into one graph with data-dependent
    sizes, without recompiling as the sizes change). For large buckets (as the default ``n_b = 4`` at
    ``b >= 2048``) it walks blocks of 512 sorted anchors as :func:`~.functional.fare` does, visiting only the
    pairs of blocks that meet in the support, each pair once for both directions, in memory linear in b; it
    copies which pairs meet (a ``[⌈b/512⌉]²`` bool matrix) to the host once per call. Compiled code always
    takes the first form. With given ``buckets`` it also reads their number of distinct ids.

    Args:
        z1, z2: ``[b, d]`` embeddings of the two views.
        sensitive: float ``[b]`` / ``[b, s]`` or int groups ``[b]`` (one-hot to ``s`` columns).
        w_q, w_k: ``[d_k, s]`` projections.
        lsh: how the batch is hashed (:class:`~.lsh.LSHConfig`; ``None``: its defaults, 4 buckets).
        impl: ``"sorted"`` (sort by bucket, never ``b×b``) or ``"dense"`` (the reference; any ``n_hashes``).
        generator: CPU generator for the random projections (``None``: global RNG). A ``torch.Generator``
            cannot be traced by ``torch.compile``; compile with ``generator=None`` or pass ``rotations``.
        rotations: float ``[n_hashes, s', n_b/2]`` projections to use instead of drawing them (``s'`` the
            hashed width: ``s`` for ``hash_on="z"``, ``d_k`` for ``"keys"``).
        buckets: long ``[b]`` given buckets (no hashing); int ``sensitive`` groups are the buckets.
    """
    lsh = LSHConfig() if lsh is None else lsh
    if not isinstance(lsh, LSHConfig):
        raise TypeError(f"lsh must be an LSHConfig, got {type(lsh).__name__}")
    check_impl(impl, lsh)
    check_options(rho, score, neg_scale, z_norm)
    z1, z2 = check_embeddings(z1, z2, check_inputs)
    b = z1.shape[0]
    dtype = compute_dtype(z1.dtype, w_q.dtype)
    zhat, groups = attribute(sensitive, w_q, b, z1.device, check_inputs, z_norm)
    q, k, rho = projections(zhat, w_q, w_k, rho, score, dtype)
    given = buckets if buckets is not None else groups
    n_b: int | None = None
    if given is not None:
        if not isinstance(given, Tensor):
            raise TypeError(f"buckets must be a torch.Tensor of integers [b] = [{b}], got {type(given).__name__}")
        if given.is_floating_point() or given.is_complex():
            raise ValueError(f"buckets must be non-negative integers [b] = [{b}], got dtype {given.dtype}")
        if given.shape != (b,) or (check_inputs and bool((given < 0).any())):
            raise ValueError(f"buckets must be non-negative integers [b] = [{b}], got shape {list(given.shape)}")
        if lsh.neighbours:
            raise ValueError(f"neighbours must be 0 with given buckets or integer groups, got {lsh.neighbours}")
        bucket_r, probe_r = given.to(z1.device).long()[None], given.to(z1.device).long()[None, :, None]
    else:
        n_b = lsh.buckets_for(b)
        hashed = zhat if lsh.hash_on == "z" else k.detach()
        if rotations is None:
            rotations = draw_rotations(hashed.shape[1], n_b, lsh.n_hashes, generator=generator,
                                       dtype=torch.float64, unit=lsh.unit_rotations)
        expected = (lsh.n_hashes, hashed.shape[1], n_b // 2)
        if tuple(rotations.shape) != expected:
            raise ValueError(f"rotations must be [n_hashes, s', n_b/2] = {list(expected)}, got {list(rotations.shape)}")
        bucket_r, probe_r = hash_buckets(hashed, rotations.to(z1.device), lsh.neighbours)
    shift = log_scale(b, neg_scale)
    nce = {"temperature": temperature, "negatives": negatives, "symmetric": symmetric}
    if impl == "dense":
        mask, fallback = lsh_support_mask(bucket_r, probe_r)
        support = mask.sum(1)
        if not mask_self:
            mask = mask | torch.eye(b, dtype=torch.bool, device=mask.device)
        log_w = shift + torch.log_softmax(scores(q, k, rho, score).masked_fill(~mask, NEG_INF), dim=1)
        loss = weighted_nce(z1, z2, log_w, **nce)
    else:
        # the tile side and the choice of path must be Python: with given buckets they follow the configured
        # bucket count (only a performance choice), since their real number n_b is known only on the device.
        # The walk loops over a data-dependent list of blocks, which torch.compile cannot trace: compiled code
        # takes the tile plan (one graph with data-dependent sizes).
        configured = lsh.buckets_for(b)
        walk = b >= WALK_MIN_BUCKET * configured and not torch.compiler.is_compiling()
        if n_b is None:
            # relabel given ids to 0..n_b-1 in order (the same buckets and plan): the plan's buffers then
            # follow the number of buckets, not the largest id (ids near 1e9 would size them otherwise)
            ids, dense_ids = torch.unique(bucket_r[0], sorted=True, return_inverse=True)
            n_b, bucket_r, probe_r = ids.numel(), dense_ids[None], dense_ids[None, :, None]
        if walk:
            loss, fallback, support = _sparse_fare_walk(z1, z2, q, k, bucket_r[0], probe_r[0], n_b, rho, score,
                                                        shift, mask_self, nce)
        else:
            loss, fallback, support = _sparse_fare_tiles(z1, z2, q, k, bucket_r[0], probe_r[0], n_b, rho, score,
                                                         shift, mask_self, nce, tile_size(b, configured))
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


def _sparse_fare_tiles(z1: Tensor, z2: Tensor, q: Tensor, k: Tensor, bucket: Tensor, probe: Tensor, n_b: int,
                       rho: float, score: str, shift: float, mask_self: bool, nce: dict, tile: int
                       ) -> tuple[Tensor, Tensor, Tensor]:
    """SparseFARE on the tile plan of :func:`~.lsh.build_block_plan` (small buckets): every tile of every
    bucket in one batched matmul.

    Returns:
        the loss, the fallback flags ``[b]`` and the support sizes ``[b]``.
    """
    plan = build_block_plan(bucket, probe, n_b, allow_self=not mask_self, tile=tile)
    n_tiles, tile = plan.query_idx.shape
    q_tiles = q.index_select(0, plan.query_idx.reshape(-1)).view(n_tiles, tile, -1)
    k_tiles = k.index_select(0, plan.key_idx.reshape(-1)).view(n_tiles, tile, -1)
    att = scores(q_tiles, k_tiles, rho, score).masked_fill(plan.invalid, NEG_INF)
    lse = segment_logsumexp(att, plan.query_idx, q.shape[0]).index_select(0, plan.query_idx.reshape(-1))
    log_w = LogWeightBlocks(plan.query_idx, plan.key_idx, att - (lse.view(n_tiles, tile, 1) - shift))
    return weighted_nce(z1, z2, log_w, **nce), plan.fallback, plan.support


def _sparse_attention(q: Tensor, k: Tensor, bucket: Tensor, probe: Tensor, fallback: Tensor, rho: float,
                      score: str, mask_self: bool, rows: slice, cols: slice) -> Tensor:
    """SparseFARE's attention scores of anchors ``rows`` against negatives ``cols``, ``-inf`` outside the
    support (a fallback anchor's support is every ``j``; ``j = i`` at ``-inf`` when
    ``mask_self``)."""
    att = fare_attention(q, k, rho, score, mask_self, rows, cols)
    with torch.no_grad():  # the softmax and logsumexp give the masked entries exactly zero gradient
        hit = (probe[rows, :, None] == bucket[cols][None, None]).any(dim=1) | fallback[rows, None]
        att.masked_fill_(~hit, NEG_INF)
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
    pairs, inside = block_pairs(bucket, probe, fallback, n_b, chunk)

    def block(q: Tensor, k: Tensor, rows: slice, cols: slice) -> Tensor:
        if (rows.start, cols.start) in inside:  # the whole tile is in the support: no mask to build
            return fare_attention(q, k, rho, score, mask_self, rows, cols)
        return _sparse_attention(q, k, bucket, probe, fallback, rho, score, mask_self, rows, cols)

    # each anchor's softmax is over the visited blocks, which hold its whole support
    loss = blockwise_nce(z1, z2, block, (q, k), chunk, pairs=pairs, softmax_shift=shift, **nce)
    return loss, fallback, support


@torch.no_grad()
def _sparse_diagnostics(
    q: Tensor, k: Tensor, rho: float, score: str, zhat: Tensor, bucket_r: Tensor, probe_r: Tensor
) -> dict[str, float]:
    """The attention diagnostics on the first :data:`DIAG_ROWS` anchors, from their dense support rows."""
    rows = torch.arange(min(q.shape[0], DIAG_ROWS), device=q.device)
    mask, _ = lsh_support_mask(bucket_r, probe_r, rows)
    p = torch.softmax(scores(q[rows], k, rho, score).masked_fill(~mask, NEG_INF), dim=1)
    return weighting_diagnostics(p, torch.cdist(zhat[rows].double(), zhat.double()), mask)
