"""Multi-head attention and Elliptical Attention on one code path.

Elliptical Attention (Nielsen et al., NeurIPS 2024) replaces the dot-product kernel ``q·k/√D`` by a
Mahalanobis one, ``q diag(m) kᵀ/√D``, with ``m`` estimated, without parameters, from how the values of a
head change between consecutive layers (``docs/elliptical.md``). A diagonal ``m``
only rescales the queries, so both modules call the fused ``F.scaled_dot_product_attention`` on ``q ⊙ m``.

Both modules return a Tensor, like any attention layer. The values a later elliptical layer needs flow
through the model's shared :class:`~clusterformers.state.LayerState` (see
:func:`clusterformers.share_state`), or by hand with ``return_values=True`` and ``v_prev=``.

The mean and causal prefix-mean metric run through ``torch.compile`` (:mod:`clusterformers.fused`), with
the eager code as the reference and the fallback. On the CPU the detached causal metric puts a blocked
prefix sum of its own between two compiled regions, because ``torch.cumsum`` there is a scalar scan.

Masks follow ``F.scaled_dot_product_attention``: ``key_padding_mask`` is bool ``[B, N]`` with
**True = keep** (a real token) and False = padding, the opposite of ``torch.nn.MultiheadAttention``.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clusterformers.checks import check_inputs_default
from clusterformers.fused import fused
from clusterformers.state import StatefulLayer

ESTIMATORS = ("mean", "median", "identity", "random", "isotropic")


def padding_mask_from_lengths(lengths: Tensor, n: int) -> Tensor:
    """Keep-mask from sequence lengths.

    Args:
        lengths: ``[B]`` integer lengths, each in ``1..n``.
        n: sequence length N.

    Returns:
        bool ``[B, n]``, True = keep (``position < length``).
    """
    if lengths.dim() != 1 or lengths.is_floating_point() or lengths.dtype == torch.bool:
        raise ValueError(
            f"lengths must be a 1-D integer tensor, got dtype {lengths.dtype}, shape {tuple(lengths.shape)}"
        )
    if lengths.numel() and (lengths.min() < 1 or lengths.max() > n):
        raise ValueError(f"lengths must lie in 1..{n}, got min {int(lengths.min())}, max {int(lengths.max())}")
    return torch.arange(n, device=lengths.device)[None, :] < lengths[:, None]


def check_key_padding_mask(
    mask: Tensor | None,
    batch: int,
    n: int,
    *,
    causal: bool = False,
    check_values: bool = True,
    device: torch.device | None = None,
) -> None:
    """Validate a keep-mask: bool ``[B, N]``, True = keep, at least one kept token per sample.

    Causal attention also needs right padding (kept tokens first): a left-padded row would leave query
    positions with no key to attend to. The two content checks read the mask on the host; they are
    skipped with ``check_values=False`` (dtype and shape are always checked).
    """
    if mask is None:
        return
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
        raise TypeError(
            f"key_padding_mask must be a bool tensor [B, N] with True = keep (real token), got {got}; "
            "float masks are not accepted (convert with `mask > 0` or pass lengths to padding_mask_from_lengths)"
        )
    if tuple(mask.shape) != (batch, n):
        raise ValueError(f"key_padding_mask must have shape [B, N] = {[batch, n]}, got {list(mask.shape)}")
    if device is not None and mask.device != device:
        raise ValueError(f"key_padding_mask is on {mask.device}, the input on {device}; move it with .to({device!s})")
    if not check_values:
        return
    if not bool(mask.any(dim=1).all()):
        empty = (~mask.any(dim=1)).nonzero().flatten().tolist()
        raise ValueError(f"key_padding_mask keeps no token in sample(s) {empty}; every sample needs >= 1 real token")
    if causal and bool((mask[:, 1:] & ~mask[:, :-1]).any()):
        raise ValueError(
            "causal attention needs right padding (key_padding_mask True for the first tokens, then False); "
            "got a mask with padding before a real token"
        )


def _reduce_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _normalise(s: Tensor, eps: float) -> Tensor:
    """``m = s / max_d s`` (1 where the max is ≤ eps), clamped to ``[eps, 1]``. ``s`` is a temporary.

    Works in place where autograd allows: the metric is O(BHND) memory traffic, and on CPU a fresh
    ``[B, H, N, D]`` buffer (page faults) costs more than the arithmetic on it.
    """
    z = s.amax(dim=-1, keepdim=True)
    flat = z <= eps
    z = z.masked_fill(flat, 1.0)
    m = s / z if s.requires_grad else s.div_(z)  # amax's backward needs the original s
    return m.masked_fill_(flat, 1.0).clamp_min_(eps)


def _median_over_tokens(a: Tensor, keep: Tensor | None) -> Tensor:
    """Lower median of ``a [B,H,N,D]`` over N, padded tokens ignored. Returns ``[B,H,1,D]``."""
    if keep is None:
        return a.median(dim=2, keepdim=True).values
    a = torch.where(keep, a, torch.full_like(a, float("inf")))
    ordered = a.sort(dim=2).values
    count = keep.sum(dim=2, keepdim=True)  # [B,1,1,1]
    index = ((count - 1) // 2).expand(a.shape[0], a.shape[1], 1, a.shape[3])
    return ordered.gather(2, index)


def elliptical_metric(
    v: Tensor,
    v_prev: Tensor | None,
    *,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    estimator: str = "mean",
    eps: float = 1e-6,
    detach: bool = True,
    generator: torch.Generator | None = None,
    random_low: float = 0.0,
    check_inputs: bool | None = None,
    prefix: PrefixSums | None = None,
) -> Tensor:
    """The diagonal Mahalanobis metric ``m`` of Elliptical Attention.

    ``s_d`` is the mean over (kept) tokens of ``|v − v_prev|`` along coordinate d; causal attention uses the
    prefix mean (query t sees tokens ≤ t only). Then ``m = s / max_d s`` (``m ≡ 1`` when the head did not
    change, ``max_d s ≤ eps``), clamped to ``[eps, 1]``. The finite-difference step δ of the paper cancels
    in this normalisation, so it is not a parameter.

    Args:
        v: values of this layer, ``[B, H, N, D]``.
        v_prev: values of the previous layer, same shape; may be None only for ``identity``/``random``.
        causal: prefix mean per query position instead of the mean over the sequence.
        key_padding_mask: bool ``[B, N]``, **True = keep** (real token), False = padding (SDPA's
            convention, the opposite of ``torch.nn.MultiheadAttention``). Padded tokens are excluded with
            selection (``masked_fill``, not a multiply), so NaN or inf there cannot leak.
        estimator: ``mean`` (default), ``median`` (lower median over kept tokens; non-causal only),
            ``identity`` (``m ≡ 1``: standard attention), ``random`` (U[``random_low``, 1) per (b, h, d),
            fresh each call, same normalisation) or ``isotropic`` (the mean estimate averaged over d and
            broadcast: a temperature-matched control).
        eps: stabiliser and floor of ``m``.
        detach: compute ``m`` without a graph (the reference setting). ``False`` backpropagates through it.
        generator: random generator for ``random``.
        random_low: lower end of the uniform draw for ``random``.
        check_inputs: check the mask's contents on the host (``None``: on CPU only; see
            :func:`check_inputs_default`).
        prefix: for incremental causal decoding: the sums of the tokens before ``v`` (which then holds
            the new tokens only, and the mask covers those), updated in place to include them.

    Returns:
        ``m`` in ``v``'s dtype (reduced in at least float32): ``[B, H, 1, D]``, or ``[B, H, N, D]`` for the
        causal ``mean``/``isotropic`` estimators, so ``q * m`` broadcasts. ``identity`` and ``random`` are
        constant over positions and always return ``[B, H, 1, D]``.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if not isinstance(v, Tensor) or v.dim() != 4:
        raise ValueError(f"v must be a [B, H, N, D] tensor, got shape {getattr(v, 'shape', type(v).__name__)}")
    if not v.is_floating_point():
        raise TypeError(f"v must be a floating-point tensor, got {v.dtype}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    batch, heads, n, dim = v.shape
    if batch == 0 or n == 0:
        raise ValueError(f"v is empty (shape {list(v.shape)}): need at least one sample and one token")
    check = check_inputs_default(check_inputs, v)
    check_key_padding_mask(key_padding_mask, batch, n, causal=causal, check_values=check, device=v.device)
    if v_prev is not None and (not isinstance(v_prev, Tensor) or v_prev.shape != v.shape):
        raise ValueError(
            f"v and v_prev must have equal shape (B, H, N, D); got v {list(v.shape)}, "
            f"v_prev {list(getattr(v_prev, 'shape', []))}"
        )
    if v_prev is not None and v_prev.device != v.device:
        raise ValueError(f"v_prev is on {v_prev.device}, v on {v.device}; move it with .to({v.device!s})")
    if estimator == "identity":
        return torch.ones(batch, heads, 1, dim, device=v.device, dtype=v.dtype)
    if estimator == "random":
        if not 0.0 <= random_low < 1.0:
            raise ValueError(f"random_low must lie in [0, 1), got {random_low}")
        u = torch.rand(batch, heads, 1, dim, generator=generator, device=v.device, dtype=_reduce_dtype(v))
        return _normalise(random_low + (1.0 - random_low) * u, eps).to(v.dtype)
    if v_prev is None:
        raise ValueError(f"v_prev is required by estimator {estimator!r} (only identity/random accept None)")
    if prefix is not None and not (causal and estimator in ("mean", "isotropic")):
        raise ValueError(f"prefix: only the causal mean and isotropic estimators have prefix sums, got {estimator!r}")
    if estimator == "median" and causal:
        raise NotImplementedError("the median estimator is not implemented for causal attention (prefix median)")
    if detach:
        v, v_prev = v.detach(), v_prev.detach()
    keep = None if key_padding_mask is None else key_padding_mask[:, None, :, None]
    if estimator == "median":
        a = _abs_diff(v, v_prev, keep)
        if check and not bool(torch.isfinite(a).all()):
            raise ValueError(_NOT_FINITE)
        return _normalise(_median_over_tokens(a, keep), eps).to(v.dtype)
    isotropic = estimator == "isotropic"
    # a detached metric needs no graph: without grad mode, training and evaluation share one compiled graph
    with torch.no_grad() if detach else contextlib.nullcontext():
        if causal and detach and prefix is None and v.device.type == "cpu" and not torch.compiler.is_compiling():
            m, finite = _cpu_prefix_mean_metric(v, v_prev, keep, eps, isotropic, check)
        else:
            core = _mean_metric if prefix is not None else _fused_mean_metric
            m, finite = core(v, v_prev, keep, causal, eps, isotropic, check, prefix)
    if check and not bool(finite):
        raise ValueError(_NOT_FINITE)
    return m


_NOT_FINITE = (
    "v or v_prev holds NaN or inf at kept positions (padding may hold anything); check the previous "
    "layer's values, or mark those tokens as padding in key_padding_mask"
)


def _abs_diff(v: Tensor, v_prev: Tensor, keep: Tensor | None) -> Tensor:
    """``|v − v_prev|`` in the reduction dtype, 0 at padded tokens (``keep [B,1,N,1]``): a fresh buffer."""
    rdtype = _reduce_dtype(v)
    a = (v.to(rdtype) - v_prev.to(rdtype)).abs_()
    if keep is not None:
        a = a.masked_fill_(~keep, 0.0)  # select, not multiply: NaN/inf at pads cannot leak
    return a


def _abs_diff_and_finite(v: Tensor, v_prev: Tensor, keep: Tensor | None, check: bool) -> tuple[Tensor, Tensor | None]:
    """:func:`_abs_diff` and, with ``check``, whether it is finite (a bool scalar tensor; None without)."""
    a = _abs_diff(v, v_prev, keep)
    return a, torch.isfinite(a).all() if check else None


def _prefix_count(keep: Tensor | None, a: Tensor) -> Tensor:
    """Kept tokens up to each position of ``a [B,H,N,D]``: ``[1,1,N,1]``, or ``[B,1,N,1]`` from ``keep``."""
    if keep is None:
        return torch.arange(1, a.shape[2] + 1, device=a.device, dtype=a.dtype)[None, None, :, None]
    return keep.to(a.dtype).cumsum(dim=2)


def _mean_metric(
    v: Tensor,
    v_prev: Tensor,
    keep: Tensor | None,
    causal: bool,
    eps: float,
    isotropic: bool,
    check: bool,
    prefix: PrefixSums | None = None,
) -> tuple[Tensor, Tensor | None]:
    """The mean (or prefix-mean) metric and, with ``check``, whether ``|v − v_prev|`` is finite at kept tokens.

    ``v, v_prev [B,H,N,D]``, ``keep`` bool ``[B,1,N,1]`` or None. Returns ``m`` in ``v``'s dtype,
    ``[B,H,1,D]`` (``[B,H,N,D]`` causal), and a bool scalar tensor (None without ``check``). The eager
    reference of :func:`_fused_mean_metric`.
    """
    a, finite = _abs_diff_and_finite(v, v_prev, keep, check)
    rdtype, n = a.dtype, a.shape[2]
    if causal:
        count = _prefix_count(keep, a)
        if a.is_cuda:  # CUDA scans an outer dim sequentially over N, the last dim in parallel
            s = a.transpose(2, 3).cumsum(dim=3).transpose(2, 3).contiguous()
        else:
            s = a.cumsum_(dim=2)
        if prefix is not None:
            s, count = prefix.extend(s, count)
        s = s.div_(count.clamp_min(1.0))
    else:
        # a Python divisor: a tensor made from n on the GPU would cost a host-to-device copy and a sync
        count = n if keep is None else keep.to(rdtype).sum(dim=2, keepdim=True)
        s = a.sum(dim=2, keepdim=True) / count
    m = _normalise(s, eps)
    if isotropic:
        m = m.mean(dim=-1, keepdim=True).expand_as(m)
    return m.to(v.dtype), finite


_fused_mean_metric = fused(_mean_metric)


_SCAN_BLOCK = 32


def _blocked_prefix_sum_(a: Tensor) -> Tensor:
    """``a [B,H,N,D]`` replaced, in place, by its inclusive prefix sum over N; returns ``a``.

    ``torch.cumsum`` on the CPU scans each ``(b, h, d)`` line by itself, one scalar add after the other, so
    its time follows the latency of an add rather than memory bandwidth. Here the N positions form blocks
    of 32: one vectorised add per position inside a block runs over every block at once (31 ops), then each
    block is offset by the sum of the blocks before it (a cumsum over the N/32 block totals). The tokens
    past the last whole block are added one position at a time. Sums are float32 in blocks, where
    ``torch.cumsum`` accumulates in float64: they differ by float32 rounding.
    """
    n = a.shape[2]
    size = min(_SCAN_BLOCK, n)
    blocks = n // size
    body = a[:, :, : blocks * size].unflatten(2, (blocks, size))  # [B, H, blocks, size, D], a view of a
    for i in range(1, size):
        body[:, :, :, i].add_(body[:, :, :, i - 1])
    if blocks > 1:
        totals = body[:, :, :-1, -1]  # [B, H, blocks - 1, D]
        body[:, :, 1:].add_(totals.cumsum(dim=2)[:, :, :, None])
    for t in range(blocks * size, n):
        a[:, :, t].add_(a[:, :, t - 1])
    return a


def _prefix_normalise_(s: Tensor, keep: Tensor | None, eps: float, isotropic: bool, dtype: torch.dtype) -> Tensor:
    """The causal metric from the prefix sums ``s [B,H,N,D]`` (overwritten), in ``dtype``."""
    m = _normalise(s.div_(_prefix_count(keep, s).clamp_min(1.0)), eps)
    if isotropic:
        m = m.copy_(m.mean(dim=-1, keepdim=True).expand_as(m))
    return m.to(dtype)


_fused_abs_diff_and_finite = fused(_abs_diff_and_finite)
_fused_prefix_normalise_ = fused(_prefix_normalise_)


def _cpu_prefix_mean_metric(
    v: Tensor, v_prev: Tensor, keep: Tensor | None, eps: float, isotropic: bool, check: bool
) -> tuple[Tensor, Tensor | None]:
    """:func:`_mean_metric` with ``causal=True`` for detached CPU tensors, with the prefix sum of
    :func:`_blocked_prefix_sum_` between two compiled regions (inductor has no CPU scan of its own and calls
    ``torch.cumsum``). Allocates one ``[B,H,N,D]`` buffer, which becomes ``m`` (in the reduction dtype)."""
    a, finite = _fused_abs_diff_and_finite(v, v_prev, keep, check)
    return _fused_prefix_normalise_(_blocked_prefix_sum_(a), keep, eps, isotropic, v.dtype), finite


class PrefixSums:
    """Running ``Σ_t |v_t − v_prev,t|`` (``total [B, H, 1, D]``) and kept-token count (``count [B|1, 1, 1, 1]``)
    of the tokens decoded so far: the causal metric of new tokens continues them instead of rescanning the
    cache."""

    def __init__(self) -> None:
        self.total: Tensor | None = None
        self.count: Tensor | None = None

    def extend(self, cumsum: Tensor, count: Tensor) -> tuple[Tensor, Tensor]:
        """Offset the new tokens' prefix sums ``cumsum [B,H,q,D]`` and counts ``[.., q, 1]`` by the earlier
        tokens' and remember the totals at the last new token."""
        if self.total is not None:
            cumsum, count = cumsum + self.total, count + self.count
        self.total, self.count = cumsum[:, :, -1:].clone(), count[:, :, -1:].clone()
        return cumsum, count


class KVCache:
    """Keys and values of the tokens seen so far, per attention layer, for incremental decoding.

    ``layers`` maps each attention module to its ``(k, v)``, both ``[B, H, T, D]``, and ``prefix`` each
    elliptical module to the :class:`PrefixSums` of its causal metric. A cache belongs to one model
    (``owner``, set by the model that fills it) and one batch; :meth:`length` is T.
    """

    def __init__(self, owner: nn.Module | None = None) -> None:
        self.owner = owner
        self.layers: dict[nn.Module, tuple[Tensor, Tensor]] = {}
        self.prefix: dict[nn.Module, PrefixSums] = {}

    def length(self) -> int:
        """Cached tokens T (0 when empty)."""
        return next(iter(self.layers.values()))[0].shape[2] if self.layers else 0

    def append(self, layer: nn.Module, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append the new ``k, v [B, H, q, D]`` of ``layer``; returns all ``[B, H, T + q, D]``."""
        if layer in self.layers:
            past_k, past_v = self.layers[layer]
            if past_k.shape[0] != k.shape[0]:
                raise ValueError(
                    f"kv_cache holds a batch of {past_k.shape[0]} sequences, the input has {k.shape[0]}; "
                    "start a new KVCache for a new batch"
                )
            k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
        self.layers[layer] = (k, v)
        return k, v


class _Attention(StatefulLayer, nn.Module):
    """Shared code path: ``Linear(dim, 3·dim)`` → heads → (``q ⊙ m``) → SDPA → ``Linear(dim, dim)``.

    A stateful layer of kind ``"values"``: inside a model prepared with :func:`clusterformers.share_state`
    it writes its values for the next layer and, when elliptical, reads the previous layer's.
    """

    state_kind = "values"

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        causal: bool,
        dropout: float,
        bias: bool,
        estimator: str | None,
        metric_grad: bool = False,
        eps: float = 1e-6,
        scale: float | None = None,
        store_metric: bool = False,
        random_low: float = 0.0,
        check_inputs: bool | None = None,
    ) -> None:
        super().__init__()
        if dim <= 0 or num_heads <= 0 or dim % num_heads:
            raise ValueError(f"dim must be a positive multiple of num_heads, got dim={dim}, num_heads={num_heads}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        if estimator is not None and estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.causal, self.dropout, self.scale = causal, dropout, scale
        self.estimator, self.metric_grad, self.eps = estimator, metric_grad, eps
        self.store_metric, self.random_low = store_metric, random_low
        self.generator: torch.Generator | None = None
        self.check_inputs = check_inputs
        self.last_metric: Tensor | None = None
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)

    def metric(
        self,
        v: Tensor,
        v_prev: Tensor,
        key_padding_mask: Tensor | None,
        *,
        causal: bool,
        check: bool,
        prefix: PrefixSums | None = None,
    ) -> Tensor:
        """:func:`elliptical_metric` with this layer's estimator, ``eps``, gradient flag and generator."""
        return elliptical_metric(
            v,
            v_prev,
            causal=causal,
            key_padding_mask=key_padding_mask,
            estimator=self.estimator,
            eps=self.eps,
            detach=not self.metric_grad,
            generator=self.generator,
            random_low=self.random_low,
            check_inputs=check,
            prefix=prefix,
        )

    def _attn_mask(
        self, key_padding_mask: Tensor | None, q_len: int, kv_len: int, device: torch.device
    ) -> Tensor | None:
        """One boolean mask ``[B|1, 1, q, T]`` (True = attend) of keys and the causal triangle, or None
        where SDPA's own ``is_causal`` (queries = keys) or no mask applies."""
        mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
        if self.causal and (mask is not None or q_len != kv_len):
            offset = kv_len - q_len  # the queries are the last q_len positions
            tri = torch.arange(kv_len, device=device)[None, :] <= torch.arange(q_len, device=device)[:, None] + offset
            mask = tri if mask is None else mask & tri
        return mask

    def _check_scores(self, q: Tensor, k: Tensor, x: Tensor) -> None:
        """Refuse inputs whose query-key scores can overflow: ``max|q| · max|k| · D · scale`` bounds every score.

        Some CPU SDPA kernels return zeros, not NaN, for overflowing scores, so a check of the output alone
        would miss them. Reads two scalars on the host (value checks only)."""
        scale = self.scale if self.scale is not None else self.head_dim**-0.5
        bound = float(q.detach().abs().amax()) * float(k.detach().abs().amax()) * self.head_dim * abs(scale)
        acc = torch.promote_types(q.dtype, torch.float32)  # SDPA accumulates half-precision scores in float32
        if not bound < torch.finfo(acc).max:
            raise ValueError(
                f"the query-key scores can overflow {acc} (max |q| · max |k| · D · scale = {bound:.3g}, max |x| "
                f"= {x.abs().max().item():.3g}); normalise the inputs (e.g. a LayerNorm before attention)"
            )

    def forward(
        self,
        x: Tensor,
        key_padding_mask: Tensor | None = None,
        v_prev: Tensor | None = None,
        *,
        kv_cache: KVCache | None = None,
        return_values: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Attend.

        Args:
            x: ``[B, N, dim]``.
            key_padding_mask: bool ``[B, T]``, **True = keep** (real token), False = padding; T = N, or
                the cached plus new tokens with ``kv_cache``.
            v_prev: the previous layer's values ``[B, H, T, D]``, overriding the shared state; None
                (and no state) makes this call plain attention for every estimator. Ignored by
                :class:`MultiheadAttention`.
            kv_cache: a :class:`KVCache` (causal layers only): ``x`` holds the new tokens, the cache the
                earlier ones; the causal metric is the prefix mean over all of them, continued from the
                cache's running sums (no rescan of the cache).
            return_values: also return this layer's values, for threading by hand.

        Returns:
            ``out [B, N, dim]``, or ``(out, v [B, H, T, D])`` with ``return_values``; ``v`` is not
            detached, so a later layer's metric can carry gradient when ``metric_grad`` is on.
        """
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be [B, N, dim={self.dim}], got shape {list(getattr(x, 'shape', []))}")
        batch, n, _ = x.shape
        if batch == 0 or n == 0:
            raise ValueError(f"x is empty (shape {list(x.shape)}): need at least one sample and one token")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
        if kv_cache is not None and not self.causal:
            raise ValueError("kv_cache: only causal attention decodes incrementally; pass kv_cache=None")
        check = check_inputs_default(self.check_inputs, x)
        if check and not bool(torch.isfinite(x).all()):
            raise ValueError("x contains NaN or inf; check the inputs (or the previous layer) for overflow")
        q, k, v_new = self.qkv(x).view(batch, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k, v = kv_cache.append(self, k, v_new) if kv_cache is not None else (k, v_new)
        kv_len = k.shape[2]
        check_key_padding_mask(key_padding_mask, batch, kv_len, causal=self.causal, check_values=check, device=x.device)
        if v_prev is None and self.estimator is not None:
            v_prev = self.read_state()
        if self.estimator is not None and v_prev is not None:
            prefix, keep, v_m, v_prev_m = None, key_padding_mask, v, v_prev
            if kv_cache is not None and self.estimator in ("mean", "isotropic"):  # continue the running sums
                prefix = kv_cache.prefix.setdefault(self, PrefixSums())
                keep = None if keep is None else keep[:, -n:]
                v_m, v_prev_m = v_new, v_prev[:, :, -n:] if v_prev.shape == v.shape else v_prev
            m = self.metric(v_m, v_prev_m, keep, causal=self.causal, check=check, prefix=prefix)
            if m.shape[2] != 1:
                m = m[:, :, m.shape[2] - n :]
            if self.store_metric:
                self.last_metric = m.detach()
            q = q * m
        self.write_state(v)
        if check:
            self._check_scores(q, k, x)
        mask = self._attn_mask(key_padding_mask, n, kv_len, x.device)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=self.causal and mask is None,
            scale=self.scale,
        )
        if check and not bool(torch.isfinite(out).all()):
            raise ValueError(
                f"attention output is not finite although x is (max |x| = {x.abs().max().item():.3g}): the "
                f"query-key scores overflow {x.dtype}; normalise the inputs (e.g. a LayerNorm before attention)"
            )
        out = self.proj(out.transpose(1, 2).reshape(batch, n, self.dim))
        return (out, v) if return_values else out


class MultiheadAttention(_Attention):
    """Batch-first multi-head self-attention that returns its values for the next layer.

    The same class and code path as :class:`EllipticalAttention` with the metric off, and the same
    parameter names (``qkv``, ``proj``), so ``state_dict``s swap between the two. Not a drop-in for
    ``torch.nn.MultiheadAttention``: batch-first, keep-masks (True = keep), returns values, not weights.

    ``forward(x [B,N,dim], key_padding_mask=None, v_prev=None, *, kv_cache=None, return_values=False)
    -> out [B,N,dim]``; ``v_prev`` is ignored. Inside a model prepared with ``share_state`` it hands its
    values to the next elliptical layer.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        causal: bool = False,
        dropout: float = 0.0,
        bias: bool = True,
        scale: float | None = None,
        check_inputs: bool | None = None,
    ):
        super().__init__(
            dim, num_heads, causal=causal, dropout=dropout, bias=bias, estimator=None, scale=scale,
            check_inputs=check_inputs,
        )


class EllipticalAttention(_Attention):
    """Elliptical Attention: ``softmax(q diag(m) kᵀ · scale + mask) v`` with ``m`` from :func:`elliptical_metric`.

    Zero extra parameters or buffers. Without ``v_prev`` (the first layer of a model) it is plain
    attention for every estimator. ``scale=None`` is the standard ``1/√D`` for softmax and elliptical
    layers alike; the reference LM code dropped it in elliptical layers only (pass ``scale=1.0`` to
    reproduce that).

    Args:
        dim: model width; ``num_heads`` must divide it.
        causal: causal self-attention; the metric is then a prefix mean per query position.
        dropout: attention dropout (training only).
        estimator: see :func:`elliptical_metric` (``mean``, ``median``, ``identity``, ``random``, ``isotropic``).
        metric_grad: backpropagate through ``m`` (white-box attacks without gradient masking). The forward
            output is bitwise the same either way. See :func:`set_metric_grad`.
        eps: stabiliser of the metric.
        store_metric: keep a detached copy of the last ``m`` in ``self.last_metric``.
        check_inputs: value checks that read tensors on the host (NaN/inf in ``x``, mask contents);
            ``None`` checks CPU inputs only, so accelerators never stall; ``False`` for
            ``torch.compile(fullgraph=True)`` and ``torch.export``.

    ``forward(x [B,N,dim], key_padding_mask=None (bool [B,N], True = keep), v_prev=None [B,H,N,D], *,
    kv_cache=None, return_values=False)`` returns ``out [B,N,dim]`` (``(out, v)`` with ``return_values``).
    ``v_prev`` defaults to the previous attention layer's values from the model's shared state. The
    attribute ``generator`` seeds the ``random`` estimator.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        causal: bool = False,
        dropout: float = 0.0,
        estimator: str = "mean",
        metric_grad: bool = False,
        eps: float = 1e-6,
        bias: bool = True,
        scale: float | None = None,
        store_metric: bool = False,
        random_low: float = 0.0,
        check_inputs: bool | None = None,
    ) -> None:
        super().__init__(
            dim,
            num_heads,
            causal=causal,
            dropout=dropout,
            bias=bias,
            estimator=estimator,
            metric_grad=metric_grad,
            eps=eps,
            scale=scale,
            store_metric=store_metric,
            random_low=random_low,
            check_inputs=check_inputs,
        )


def set_metric_grad(model: nn.Module, flag: bool) -> None:
    """Switch gradient flow through ``m`` on or off in every :class:`EllipticalAttention` of ``model``."""
    for module in model.modules():
        if isinstance(module, EllipticalAttention):
            module.metric_grad = flag
