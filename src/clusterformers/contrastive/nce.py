"""The one code path of every loss here: InfoNCE whose negatives carry weights ``W_ij >= 0``.

For ``b`` anchors with two views, ``u_i, v_i`` the L2-normalised embeddings and ``τ`` the temperature,
``S_ij = u_i·v_j/τ``, ``A_ij = u_i·u_j/τ``, ``B_ij = v_i·v_j/τ`` and::

    ℓ¹_i = −S_ii + log( e^{S_ii} + Σ_j W_ij e^{S_ij} + β Σ_{j≠i} W_ij e^{A_ij} )
    ℓ²_i = −S_ii + log( e^{S_ii} + Σ_j W_ij e^{S_ji} + β Σ_{j≠i} W_ij e^{B_ij} )
    L = mean_i (ℓ¹_i + ℓ²_i) / 2            (symmetric=True; else L = mean_i ℓ¹_i)

with ``β = 1`` for ``negatives="both"`` and ``β = 0`` for ``negatives="cross"``. The weights arrive as
``log_w = log W`` (``-inf`` = weight 0). ``W_ii`` is normally 0; a finite ``log_w[i, i]`` weights the extra
cross-view term ``e^{S_ii}`` (the paper's unmasked sum, ``mask_self=False``); the same-view self-similarity
is never a negative.

Each ``ℓ`` is **one** logsumexp over the positive and the weighted negatives, so an anchor whose weights are
all zero gets ``ℓ = 0`` with exactly zero gradient (never NaN). Dense weights put the positive into the
``2b × 2b`` logits (the cross-view self pair, weight ``1 + W_ii``): ``ℓ = log(1 + W_ii) − log_softmax`` at
the positive, i.e. ``F.cross_entropy`` on the masked matrix when ``W_ii = 0``. The sorted SparseFARE path
with small buckets passes :class:`LogWeightBlocks`, never forms a ``b × b`` matrix, and takes each anchor's
logsumexp over all its tiles and the positive at once (:func:`segment_logsumexp`). :func:`blockwise_nce`
runs a dense ``log W`` one square tile of anchors at a time, each tile serving both of its blocks, and
recomputes the tiles in the backward pass, so memory stays linear in b; given the pairs of blocks where
``W`` is not zero (SparseFARE with large buckets), it visits only those.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from clusterformers.fused import fused

NEGATIVES = ("both", "cross")
NEG_INF = float("-inf")


@dataclass(frozen=True)
class LogWeightBlocks:
    """Block-sparse log-weights: tile ``p`` pairs anchors ``query_idx[p]`` with negatives ``key_idx[p]``.

    Attributes:
        query_idx: long ``[P, T]`` anchor indices (padding: any valid index, with ``log_w = -inf``).
        key_idx: long ``[P, T']`` negative indices (padding likewise).
        log_w: float ``[P, T, T']``, ``log W`` of each (anchor, negative) pair, ``-inf`` = weight 0.

    Every (anchor, negative) pair may appear in at most one tile entry with a finite weight.
    """

    query_idx: Tensor
    key_idx: Tensor
    log_w: Tensor


class _SegmentLogSumExp(torch.autograd.Function):
    """``out_i = log(e^{extra_i} + Σ_{rows r: index[r] = i} Σ_j e^{x[r, j]})`` with a NaN-free gradient.

    The forward uses the fused ``torch.logsumexp`` per row; the backward is ``e^{x − out}`` (and
    ``e^{extra − out}``), so entries at ``-inf`` and empty sums get exactly zero gradient.
    """

    @staticmethod
    def forward(ctx, x: Tensor, index: Tensor, size: int, extra: Tensor | None) -> Tensor:
        flat = index.reshape(-1)
        row = torch.logsumexp(x, dim=-1).reshape(-1)
        if extra is None:
            shift = torch.full((size,), float("-inf"), dtype=x.dtype, device=x.device)
            shift = torch.nan_to_num(shift.scatter_reduce(0, flat, row, "amax"), neginf=0.0)
        else:
            shift = extra.scatter_reduce(0, flat, row, "amax")  # finite: extra is
        total = torch.zeros_like(shift).index_add_(0, flat, torch.exp(row - shift.index_select(0, flat)))
        if extra is not None:
            total += torch.exp(extra - shift)
        out = shift + torch.log(total)
        ctx.save_for_backward(x, index, out, extra)
        ctx.has_extra = extra is not None
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, None, None, Tensor | None]:
        x, index, out, extra = ctx.saved_tensors
        safe = out if ctx.has_extra else torch.nan_to_num(out, neginf=0.0)
        flat = index.reshape(-1)
        rows = (*index.shape, 1)
        grad_x = torch.exp(x - safe.index_select(0, flat).view(rows)).mul_(grad.index_select(0, flat).view(rows))
        grad_extra = grad * torch.exp(extra - safe) if ctx.has_extra else None
        return grad_x, None, None, grad_extra


def segment_logsumexp(x: Tensor, index: Tensor, size: int, extra: Tensor | None = None) -> Tensor:
    """``log(e^{extra_i} + Σ_{rows r: index[r] = i} Σ_j e^{x[r, j]})`` for ``i < size``: one logsumexp per
    output over all its rows (and ``extra``).

    Args:
        x: ``[*R, n]`` logits (``-inf`` = absent), rows ``R``.
        index: long ``[*R]`` row → output index.
        size: number of outputs.
        extra: optional ``[size]`` finite term included in every sum (the positive logit).

    Returns:
        ``[size]``; ``-inf`` where nothing contributes. Gradients are exact; entries at ``-inf`` and empty
        sums get zero gradient, never NaN.
    """
    return _SegmentLogSumExp.apply(x, index, size, extra)


def weighted_nce_rows(
    z1: Tensor,
    z2: Tensor,
    log_w: Tensor | LogWeightBlocks,
    temperature: float = 0.1,
    negatives: str = "both",
    symmetric: bool = True,
) -> Tensor:
    """Per-anchor losses of :func:`weighted_nce`: ``[ℓ¹_0..ℓ¹_{b-1}, ℓ²_0..ℓ²_{b-1}]`` (``[2b]``) or ``[b]``.

    Each tile computes all four similarity blocks with one matmul of the stacked views: logits
    ``[P, T, 2, 2, T']`` indexed (tile, anchor, anchor view, negative view, negative); equal views are the
    same-view negatives (``A``, ``B``), different views the cross-view ones (``S``).

    Args:
        z1, z2: ``[b, d]`` embeddings of the two views (normalised here).
        log_w: dense ``[b, b]`` log-weights or :class:`LogWeightBlocks`.
        temperature: ``τ > 0``.
        negatives: ``"both"`` (cross- and same-view, β = 1) or ``"cross"`` (β = 0).
        symmetric: also the second view's anchors (ℓ²).
    """
    if negatives not in NEGATIVES:
        raise ValueError(f"negatives must be one of {NEGATIVES}, got {negatives!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    u, v = unit_rows(z1), unit_rows(z2)
    b, d = u.shape
    uv = torch.cat([u, v])  # [2b, d]: row i is u_i, row b + i is v_i
    blocks = isinstance(log_w, LogWeightBlocks)
    if blocks:
        query, key, lw = log_w.query_idx, log_w.key_idx, log_w.log_w.to(u.dtype)
        n_tiles, t_q, t_k = lw.shape
        # Anchors in (anchor, view) order, negatives in (view, negative) order, each one gather from the 2-D
        # [u; v]: with a data-dependent tile count, inductor (PyTorch 2.13) miscompiles a bmm on a gather of
        # 3-D rows merged by a view, and on a transposed reshape.
        query_rows = torch.stack([query, query + b], dim=2).reshape(-1)
        xq = (uv / temperature).index_select(0, query_rows).view(n_tiles, 2 * t_q, d)
        xk = uv.index_select(0, torch.cat([key, key + b], dim=1).reshape(-1)).view(n_tiles, 2 * t_k, d)
    else:
        if tuple(log_w.shape) != (b, b):
            raise ValueError(f"log_w must be [b, b] = {[b, b]} to match z1, got {list(log_w.shape)}")
        # the positive joins the matrix: the cross-view self pair gets weight 1 + W_ii
        diag = torch.logaddexp(torch.zeros((), dtype=u.dtype, device=u.device), log_w.diagonal().to(u.dtype))
        lw = torch.diagonal_scatter(log_w.to(u.dtype), diag)[None]
        n_tiles, t_q, t_k = 1, b, b
        xq, xk = (torch.stack([u, v], dim=1) / temperature).view(1, 2 * b, d), uv[None]
    sims = torch.bmm(xq, xk.transpose(1, 2)).view(n_tiles, t_q, 2, 2, t_k)
    logits = sims + lw[:, :, None, None, :]
    # Entries that are not negatives are set to -inf without autograd: the logsumexp below gives such entries
    # exactly zero gradient, so the gradient of the unmasked sum is the true one (and no mask is saved).
    with torch.no_grad():
        if negatives == "cross":
            logits.diagonal(dim1=2, dim2=3).fill_(float("-inf"))
        elif blocks:
            self_pair = (query[:, :, None] == key[:, None, :])[..., None]  # [P, T, T', 1]
            logits.diagonal(dim1=2, dim2=3).masked_fill_(self_pair, float("-inf"))
        else:
            logits.diagonal(dim1=1, dim2=4).diagonal(dim1=1, dim2=2).fill_(float("-inf"))
    if blocks:
        pos = (u * v).sum(dim=1) / temperature
        index = torch.stack([query, query + b], dim=2)
        pos2 = torch.cat([pos, pos])
        rows = segment_logsumexp(logits.view(n_tiles, t_q, 2, 2 * t_k), index, 2 * b, extra=pos2) - pos2
    else:
        log_p = torch.log_softmax(logits.view(b, 2, 2 * b), dim=-1)
        idx = torch.arange(b, device=u.device)
        target = torch.stack([idx + b, idx], dim=1)
        rows = (diag[:, None] - log_p.gather(2, target[:, :, None])[..., 0]).T.reshape(-1)
    return rows if symmetric else rows[:b]


def unit_rows(z: Tensor, eps: float = 1e-12) -> Tensor:
    """``z [n, d]`` with each row scaled to unit L2 norm, like ``F.normalize`` but scale-safe: rows are first
    divided by their largest magnitude, so entries near 1e20 (whose squares overflow float32) still give a
    unit vector instead of zeros. Zero rows stay zero."""
    scale = z.detach().abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(z.dtype).tiny)
    return F.normalize(z / scale, dim=1, eps=eps)


def weighted_nce(
    z1: Tensor,
    z2: Tensor,
    log_w: Tensor | LogWeightBlocks,
    temperature: float = 0.1,
    negatives: str = "both",
    symmetric: bool = True,
) -> Tensor:
    """Weighted InfoNCE (module docstring): the loss every class here computes; only ``log_w`` differs.

    Args:
        z1, z2: ``[b, d]`` unnormalised embeddings of the two views (row i of each is a positive pair).
        log_w: ``log W``, dense ``[b, b]`` (``-inf`` = weight 0, row = anchor, column = negative) or
            :class:`LogWeightBlocks`.
        temperature: ``τ``.
        negatives: ``"both"`` or ``"cross"`` (only the other view's samples are negatives).
        symmetric: average the losses of both views' anchors (else only view 1's).

    Returns:
        scalar loss, the mean over ``2b`` (or ``b``) anchors, in the embeddings' dtype.
    """
    return weighted_nce_rows(z1, z2, log_w, temperature, negatives, symmetric).mean()


CHUNK_AUTO_DENSE = 1024  # chunk_size="auto": dense up to this batch size,
CHUNK_AUTO_ROWS = 512  # and blocks of this many anchors above it


def chunk_rows(chunk_size: int | str | None, b: int) -> int:
    """Anchors per block for ``chunk_size``: ``None`` = ``b`` (dense), ``"auto"`` = dense up to
    ``b = 1024`` and 512 above, or a positive int."""
    if chunk_size is None:
        return b
    if chunk_size == "auto":
        return b if b <= CHUNK_AUTO_DENSE else CHUNK_AUTO_ROWS
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, 'auto' or None (dense), got {chunk_size!r}")
    return min(chunk_size, b)


def _logsumexp(x: Tensor, dims: tuple[int, int]) -> Tensor:
    """``torch.logsumexp`` over ``dims`` written out (so that inductor fuses it); all ``-inf`` gives ``-inf``."""
    m = x.amax(dim=dims, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    return (m + torch.log(torch.exp(x - m).sum(dim=dims, keepdim=True))).squeeze(dims)


def _tile_logsumexp(t: Tensor, lw: Tensor) -> Tensor:
    """Logsumexp of each row ``(i, a)`` of a diagonal tile over its negatives ``(c, j)``: ``[r, 2]``.

    ``t`` is ``[r, 2, 2, r]`` (anchor, view, negative view, negative) with the non-negatives at ``-inf``;
    ``lw`` the ``[r, r]`` log-weights of the block.
    """
    return _logsumexp(t + lw[:, None, None, :], (2, 3))


def _tile_pair_logsumexp(t: Tensor, lw: Tensor, lw_t: Tensor) -> tuple[Tensor, Tensor]:
    """Both directions of an off-diagonal tile ``t`` ``[r, 2, 2, c]`` (anchors I against anchors J): the
    logsumexp of each row ``(i, a)`` over ``(c', j)`` with ``lw = log W[I, J]`` ``[r, c]``, ``[r, 2]``, and
    of each column ``(c', j)`` over ``(i, a)`` with ``lw_t = log W[J, I]ᵀ`` ``[r, c]``, ``[2, c]``."""
    return _tile_logsumexp(t, lw), _logsumexp(t + lw_t[:, None, None, :], (0, 1))


def _tile_softmax_(t: Tensor, lw: Tensor, lse: Tensor, grad: Tensor) -> Tensor:
    """``grad · e^{t + lw − lse}``, the gradient of :func:`_tile_logsumexp`'s rows with respect to ``t``,
    written into ``t`` in place."""
    return t.add_(lw[:, None, None, :]).sub_(lse[:, :, None, None]).exp_().mul_(grad[:, :, None, None])


def _tile_pair_softmax_(t: Tensor, lw: Tensor, lw_t: Tensor, lse: Tensor, lse_t: Tensor, grad: Tensor,
                        grad_t: Tensor) -> tuple[Tensor, Tensor]:
    """The gradient of both directions of :func:`_tile_pair_logsumexp` with respect to ``t`` (the tile is
    shared by rows I and columns J; ``lse_t``, ``grad_t`` are ``[2, c]``), written into ``t`` in place;
    returns the gradients with respect to ``lw`` and ``lw_t``, both ``[r, c]``."""
    p = torch.exp(t + lw[:, None, None, :] - lse[:, :, None, None]) * grad[:, :, None, None]
    p_t = torch.exp(t + lw_t[:, None, None, :] - lse_t[None, None]) * grad_t[None, None]
    t.copy_(p + p_t)
    return p.sum(dim=(1, 2)), p_t.sum(dim=(1, 2))


def _block_logsumexp(lw: Tensor, dim: int) -> Tensor:
    """Logsumexp of a ``[r, c]`` block of scores along ``dim`` (rows: 1, columns: 0)."""
    return _logsumexp(lw, (dim,))


def _normaliser_grad(grad_lw: Tensor, lw: Tensor, norm: Tensor, grad_norm: Tensor) -> Tensor:
    """``grad_lw + grad_norm · e^{lw − norm}``: a block's score gradient plus the part that reaches it through
    its anchors' softmax normalisers (``norm``, ``grad_norm`` broadcast over the block)."""
    return grad_lw + grad_norm * torch.exp(lw - norm)


# Static shapes: with a symbolic row length, inductor's CPU code for these reductions is slower than eager's.
_fused_tile_logsumexp = fused(_tile_logsumexp, dynamic=False)
_fused_tile_pair_logsumexp = fused(_tile_pair_logsumexp, dynamic=False)
_fused_tile_softmax_ = fused(_tile_softmax_, dynamic=False)
_fused_tile_pair_softmax_ = fused(_tile_pair_softmax_, dynamic=False)
_fused_block_logsumexp = fused(_block_logsumexp, dynamic=False)
_fused_normaliser_grad = fused(_normaliser_grad, dynamic=False)


def _tile_pairs(b: int, chunk: int) -> list[tuple[slice, slice]]:
    """The blocks ``(I, J)``, ``I <= J``, of anchors ``0..b-1`` cut into runs of ``chunk``."""
    blocks = [slice(start, min(b, start + chunk)) for start in range(0, b, chunk)]
    return [(rows, cols) for n, rows in enumerate(blocks) for cols in blocks[n:]]


def _tile(a: Tensor, keys: Tensor, rows: slice, cols: slice, cross_only: bool, buf: Tensor) -> Tensor:
    """The logits of anchors ``rows`` against anchors ``cols``, ``[r, 2, 2, c]`` (anchor, view, negative
    view, negative), written into ``buf``. ``a`` ``[2b, d]`` holds ``z / τ`` in (anchor, view) order, ``keys``
    ``[2c, d]`` the views of ``cols`` in (view, negative) order (``zv[:, cols]``). The same-view self pairs
    (or, for ``cross_only``, all same-view pairs) are ``-inf``."""
    r, c = rows.stop - rows.start, cols.stop - cols.start
    out = buf[: 4 * r * c].view(2 * r, 2 * c)
    t = torch.mm(a[2 * rows.start : 2 * rows.stop], keys.T, out=out).view(r, 2, 2, c)
    for view in (0, 1):
        if cross_only:
            t[:, view, view].fill_(float("-inf"))
        elif rows == cols:
            t[:, view, view].diagonal().fill_(float("-inf"))
    return t


class _BlockwiseLogSumExp(torch.autograd.Function):
    """Each anchor's and view's logsumexp of :func:`blockwise_nce`, ``[b, 2]``, over square tiles of anchors.

    The logits ``z_i · z_j / τ`` are symmetric, so each pair of blocks ``I < J`` is computed once and serves
    the rows of I (with ``log W[I, J]``) and those of J (with ``log W[J, I]``): half the matmuls of a row
    sweep. Nothing of size ``b²`` is kept: the forward keeps the ``[b, 2]`` result, and the backward
    recomputes each tile and its log-weights (as attention kernels do), so memory is ``O(chunk²)``.

    With ``shift`` (row-softmax weights, see :func:`blockwise_nce`) the blocks are scores ``s`` and
    ``log W[i, j] = shift + s_ij − n_i``. The normaliser ``n_i = logsumexp_j s_ij`` only offsets anchor i's
    sum over its negatives, ``log Σ_j e^{t_ij + log W_ij} = shift − n_i + log Σ_j e^{t_ij + s_ij}``, so both
    sums are taken in the same walk. Its gradient has a closed form: the result ``lse_i`` (positive included)
    has ``∂lse_i/∂n_i = −(1 − e^{pos_i − lse_i})``, which reaches ``s_ij`` times ``e^{s_ij − n_i}``.
    """

    @staticmethod
    def forward(ctx, a: Tensor, zv: Tensor, pos: Tensor, chunk: int, pairs: list[tuple[slice, slice]],
                cross_only: bool, log_w_block: Callable[..., Tensor], shift: float | None, *inputs: Tensor
                ) -> Tensor:
        buf = a.new_empty(4 * min(chunk, pos.shape[0]) ** 2)
        softmax = shift is not None
        lse = pos.new_full(pos.shape, NEG_INF) if softmax else pos.clone(memory_format=torch.contiguous_format)
        norm = pos.new_full(pos.shape[:1], NEG_INF) if softmax else pos.new_empty(0)
        for rows, cols in pairs:
            t = _tile(a, zv[:, cols].reshape(-1, zv.shape[2]), rows, cols, cross_only, buf)
            lw = log_w_block(*inputs, rows, cols).to(t.dtype)
            if softmax:
                norm[rows] = torch.logaddexp(norm[rows], _fused_block_logsumexp(lw, 1))
            if rows == cols:
                lse[rows] = torch.logaddexp(lse[rows], _fused_tile_logsumexp(t, lw))
                continue
            lw_t = log_w_block(*inputs, cols, rows).to(t.dtype).T.contiguous()
            lse_rows, lse_cols = _fused_tile_pair_logsumexp(t, lw, lw_t)
            lse[rows] = torch.logaddexp(lse[rows], lse_rows)
            lse[cols] = torch.logaddexp(lse[cols], lse_cols.T)
            if softmax:
                norm[cols] = torch.logaddexp(norm[cols], _fused_block_logsumexp(lw_t, 0))
        if softmax:  # an anchor with no finite score has no negatives (and n_i = 0 keeps the backward finite)
            finite = torch.isfinite(norm)
            norm = torch.where(finite, norm, torch.zeros_like(norm))
            lse = torch.logaddexp(pos, torch.where(finite[:, None], lse + (shift - norm)[:, None], NEG_INF))
        ctx.save_for_backward(a, zv, pos, lse, norm, *inputs)
        ctx.options = (chunk, pairs, cross_only, log_w_block, shift)
        return lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        a, zv, pos, lse, norm, *inputs = ctx.saved_tensors
        chunk, pairs, cross_only, log_w_block, shift = ctx.options
        softmax = shift is not None
        buf = a.new_empty(4 * min(chunk, pos.shape[0]) ** 2)
        grad_a, grad_zv = torch.zeros_like(a), torch.zeros_like(zv)
        leaves = [t.detach().requires_grad_(t.requires_grad) for t in inputs]
        wanted = [leaf for leaf in leaves if leaf.requires_grad]
        grad_wanted = [torch.zeros_like(leaf) for leaf in wanted]
        # the tiles' softmax is e^{t + log W − lse}; with row-softmax weights, log W = shift + s − n
        offset = lse + (norm - shift)[:, None] if softmax else lse
        grad_norm = (grad * torch.expm1(pos - lse)).sum(dim=1) if softmax else None
        for rows, cols in pairs:
            with torch.enable_grad():
                lws = [log_w_block(*leaves, rows, cols)]
                if rows != cols:
                    lws.append(log_w_block(*leaves, cols, rows))
            keys = zv[:, cols].reshape(-1, zv.shape[2])
            t = _tile(a, keys, rows, cols, cross_only, buf)
            lw = lws[0].detach().to(t.dtype)
            if rows == cols:
                grad_lws = [_fused_tile_softmax_(t, lw, offset[rows], grad[rows]).sum(dim=(1, 2))]
            else:
                lw_t = lws[1].detach().to(t.dtype).T.contiguous()
                grad_lw, grad_lw_t = _fused_tile_pair_softmax_(
                    t, lw, lw_t, offset[rows], offset[cols].T.contiguous(), grad[rows], grad[cols].T.contiguous()
                )
                if softmax:
                    grad_lw_t = _fused_normaliser_grad(grad_lw_t, lw_t, norm[None, cols], grad_norm[None, cols])
                grad_lws = [grad_lw, grad_lw_t.T]
            if softmax:
                grad_lws[0] = _fused_normaliser_grad(grad_lws[0], lw, norm[rows, None], grad_norm[rows, None])
            r, c = rows.stop - rows.start, cols.stop - cols.start
            a_rows = a[2 * rows.start : 2 * rows.stop]
            p = t.view(2 * r, 2, c)
            grad_a[2 * rows.start : 2 * rows.stop].addmm_(p.view(2 * r, 2 * c), keys)
            for view in (0, 1):
                grad_zv[view, cols].addmm_(p[:, view].T, a_rows)
            if wanted and lws[0].requires_grad:
                found = torch.autograd.grad(lws, wanted, [g.to(w.dtype) for g, w in zip(grad_lws, lws)],
                                            allow_unused=True)
                for acc, g in zip(grad_wanted, found):
                    if g is not None:
                        acc += g
        grad_pos = grad * torch.exp(pos - lse)
        found = iter(grad_wanted)
        grad_inputs = [next(found) if leaf.requires_grad else None for leaf in leaves]
        return grad_a, grad_zv, grad_pos, None, None, None, None, None, *grad_inputs


def blockwise_nce(
    z1: Tensor,
    z2: Tensor,
    log_w_block: Callable[..., Tensor],
    inputs: tuple[Tensor, ...],
    chunk: int,
    temperature: float = 0.1,
    negatives: str = "both",
    symmetric: bool = True,
    pairs: list[tuple[slice, slice]] | None = None,
    softmax_shift: float | None = None,
) -> Tensor:
    """:func:`weighted_nce` with a dense ``log W`` that is never held whole: anchors go in blocks of ``chunk``,
    each pair of blocks is one tile of logits serving both (the logits are symmetric), and the backward pass
    recomputes each tile and its ``log W`` blocks instead of keeping them, so memory is ``O(chunk²)`` instead
    of ``O(b²)``. Loss and gradients equal the dense computation's up to rounding. The logsumexp and its
    gradient over each tile are compiled kernels (:mod:`clusterformers.fused`, one graph per tile shape); the
    matmuls are the library's.

    Args:
        z1, z2: ``[b, d]`` embeddings of the two views.
        log_w_block: ``log_w_block(*inputs, rows, cols)`` -> ``[len(rows), len(cols)]``, the block
            ``log W[rows, cols]`` for slices of anchors (gradients flow to ``inputs``); ``log W[i, i]`` weights
            the extra cross-view term ``e^{S_ii}`` as in :func:`weighted_nce`.
        inputs: the tensors ``log_w_block`` reads (saved once, not per block).
        chunk: anchors per block (>= 1).
        temperature, negatives, symmetric: as :func:`weighted_nce`.
        pairs: the pairs of blocks ``(rows, cols)`` to visit, slices of ``chunk`` anchors with ``rows`` at or
            before ``cols``; ``None`` = all. ``log W`` must be ``-inf`` on both ``[rows, cols]`` and
            ``[cols, rows]`` of every pair left out (block-sparse weights, as SparseFARE's sorted buckets).
        softmax_shift: ``None``: the blocks are ``log W``. A number ``c``: the weights are each anchor's
            softmax over its negatives, scaled by ``e^c`` (FARE's attention): the blocks are scores ``s``,
            ``log W[i, j] = c + s_ij − logsumexp_j s_ij`` with the logsumexp over the visited blocks. The
            normalisers are summed in the same walk as the loss, so no pass of their own is needed; an anchor
            whose scores are all ``-inf`` has no negatives.
    """
    if negatives not in NEGATIVES:
        raise ValueError(f"negatives must be one of {NEGATIVES}, got {negatives!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    u, v = unit_rows(z1), unit_rows(z2)
    pos = ((u * v).sum(dim=1) / temperature)[:, None].expand(-1, 2)  # [b, 2]: the positive of both views
    a = torch.stack([u, v], dim=1).view(-1, u.shape[1]) / temperature  # [2b, d]: anchors in (anchor, view) order
    zv = torch.stack([u, v])  # [2, b, d]: negatives in (view, negative) order
    pairs = _tile_pairs(u.shape[0], chunk) if pairs is None else pairs
    lse = _BlockwiseLogSumExp.apply(a, zv, pos, chunk, pairs, negatives == "cross", log_w_block, softmax_shift,
                                    *inputs)
    rows = (lse - pos).T.reshape(-1)  # [ℓ¹_0..ℓ¹_{b-1}, ℓ²_0..ℓ²_{b-1}]
    return (rows if symmetric else rows[: z1.shape[0]]).mean()
