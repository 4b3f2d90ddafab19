"""The Adaptive Clustering (AC) transform: a per-cluster diagonal metric for MoE routing.

Tokens are grouped by their top-1 expert at the previous MoE layer (the *clusters*). For each cluster
and feature, the dispersion of the current router input is measured; features on which a cluster is
tight are up-weighted. The result is one diagonal metric ``m[k]`` per cluster, with no parameters and
no gradient (Nielsen et al., *Tight Clusters Make Specialized Experts*, ICLR 2025).

Everything here works on fixed ``[E, d]`` buffers, so it never synchronises with the host and keeps
static shapes (``torch.compile`` traces it whole). The per-cluster sums are one-hot GEMMs
(``onehot[T,E]^T @ h``) rather than ``index_add_``: as fast (measured on CPU and an H200) and
deterministic, where CUDA's ``index_add_`` accumulates with atomics in arbitrary order. Statistics are
computed in at least float32 (float64 inputs stay float64), also under autocast; the GEMMs follow
``torch.backends.cuda.matmul``'s TF32 setting (off by default). The module's transform runs through
``torch.compile`` (:mod:`clusterformers.fused`; eager with ``sync_stats``), the eager code as the reference.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from clusterformers.fused import fused

__all__ = [
    "ACConfig",
    "ACStats",
    "AdaptiveMetric",
    "adaptive_metric",
    "cluster_dispersion",
    "metric_from_dispersion",
    "resolve_ac",
    "token_metric",
]

_PRESETS: dict[str, dict[str, object]] = {
    # language-modeling/custom_gates.py, compute_W_var
    "lm": dict(eps=1e-4, tau=10.0, norm="feature", global_ref="pre_clamp", apply_to="router"),
    # image-classification/models/swin_transformer_cosa.py, compute_cosa
    "swin": dict(eps=1e-4, tau=1.5, norm="global", global_ref="pre_clamp", apply_to="moe_input"),
    # SoftMoE/softmoe.py, compute_acmoe (tokens are L2-normalised, hence the mild eps)
    "softmoe": dict(eps=0.35, tau=5.0, norm="global", global_ref="post_clamp", apply_to="moe_input", mix=8),
}


STATS = ("batch", "ema", "running")


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {choices}, got {value!r}")


@dataclass(frozen=True)
class ACConfig:
    """Settings of the AC transform (the paper's method with the choices in ``docs/acmoe.md``).

    Attributes:
        dispersion: ``"mad"`` (mean absolute deviation) or ``"var"`` (mean squared deviation).
        eps: added to the dispersion before inverting, ``w = 1 / (s + eps)``.
        tau: clamp ``w <= tau * w_bar`` with ``w_bar`` the pre-clamp mean over valid clusters.
        norm: ``"feature"`` (divide by the per-feature mean over valid clusters) or ``"global"``.
        global_ref: for ``norm="global"``: divide by the pre-clamp mean (``"pre_clamp"``, max m = tau)
            or by the post-clamp mean (``"post_clamp"``).
        min_count: clusters with fewer tokens are invalid and get ``m = 1``.
        mask_invalid: False reproduces the reference, where empty and singleton clusters enter every
            mean (for oracles only).
        mix: None for hard assignment (``m(i) = m[c_i]``), or k' to mix the metrics of the previous
            layer's first k' experts with their gate weights renormalised over those k'.
        apply_to: ``"router"`` (M scales the router input only) or ``"moe_input"`` (router and experts).
        stats: where the per-cluster dispersion comes from:

            - ``"batch"``: the current batch, in training and eval (the papers' code). A token's routing
              then depends on every other token of the batch, later positions of its own sequence included.
            - ``"ema"`` (default): BatchNorm-like: the batch in training, the running dispersion in eval,
              so eval is batch-independent.
            - ``"running"``: the running dispersion of *earlier* steps, in training and eval; each training
              step then folds its batch into the running value. A token's routing depends on no other token
              of its batch, so causal models stay causal and cached decoding equals uncached. The default
              of our causal language model.
        momentum: momentum of the running dispersion (``"ema"``, ``"running"``).
        sync_stats: all-reduce the statistics over the default process group (all ranks route, and
            update running values, with the global batch's statistics).
    """

    dispersion: str = "mad"
    eps: float = 1e-4
    tau: float = 10.0
    norm: str = "feature"
    global_ref: str = "pre_clamp"
    min_count: int = 2
    mask_invalid: bool = True
    mix: int | None = None
    apply_to: str = "router"
    stats: str = "ema"
    momentum: float = 0.1
    sync_stats: bool = False

    def __post_init__(self) -> None:
        _check_choice("dispersion", self.dispersion, ("mad", "var"))
        _check_choice("norm", self.norm, ("feature", "global"))
        _check_choice("global_ref", self.global_ref, ("pre_clamp", "post_clamp"))
        _check_choice("apply_to", self.apply_to, ("router", "moe_input"))
        _check_choice("stats", self.stats, STATS)
        if not self.eps > 0:
            raise ValueError(f"eps: expected > 0, got {self.eps}")
        if not self.tau > 0:
            raise ValueError(f"tau: expected > 0, got {self.tau}")
        if self.min_count < 1:
            raise ValueError(f"min_count: expected >= 1, got {self.min_count}")
        if self.mix is not None and self.mix < 1:
            raise ValueError(f"mix: expected None or an int >= 1, got {self.mix}")
        if not 0 < self.momentum <= 1:
            raise ValueError(f"momentum: expected in (0, 1], got {self.momentum}")

    @classmethod
    def preset(cls, name: str, **overrides: object) -> ACConfig:
        """The settings of one reference sub-project: ``"lm"``, ``"swin"`` or ``"softmoe"``."""
        if name not in _PRESETS:
            raise ValueError(f"preset: expected one of {tuple(_PRESETS)}, got {name!r}")
        return dataclasses.replace(cls(**_PRESETS[name]), **overrides)  # type: ignore[arg-type]


def resolve_ac(ac: ACConfig | str | None) -> ACConfig | None:
    """``None`` -> None, a preset name -> its ``ACConfig``, an ``ACConfig`` -> itself."""
    if ac is None or isinstance(ac, ACConfig):
        return ac
    if isinstance(ac, str):
        return ACConfig.preset(ac)
    raise TypeError(f"ac: expected None, a preset name or an ACConfig, got {type(ac).__name__}")


class ACStats(NamedTuple):
    """What one AC transform saw. ``metric[E,d]``; ``valid[E]`` bool; ``counts[E]`` of the batch's clusters
    (None in eval with running statistics, where no batch statistic is computed)."""

    metric: Tensor
    valid: Tensor
    counts: Tensor | None


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _all_reduce(t: Tensor, sync: bool, group: object | None = None) -> Tensor:
    if sync and dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, group=group)
    return t


def _segment_sums(
    h: Tensor,
    clusters: Tensor,
    num_experts: int,
    dispersion: str,
    key_padding_mask: Tensor | None,
    sync_stats: bool,
    expert_ids: Tensor | None = None,
    group: object | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dev_sums[E, d], denom[E, 1] = max(count, 1), counts[E])`` in the statistics dtype.

    Segment sums are one-hot GEMMs: fixed shapes, no host sync, no atomics, deterministic, and few
    kernels (the transform is launch-bound at typical sizes)."""
    d = h.shape[1]
    dtype = _stat_dtype(h.dtype)
    x = h.detach().to(dtype)
    c = clusters.reshape(-1)
    ids = expert_ids if expert_ids is not None else torch.arange(num_experts, device=c.device)
    onehot = c.unsqueeze(1) == ids  # [T, E]
    if key_padding_mask is not None:
        onehot = onehot & key_padding_mask.reshape(-1, 1).bool()  # masked tokens: zero rows
    onehot_t = onehot.to(dtype).t()
    with torch.autocast(device_type=x.device.type, enabled=False):
        sums, counts = onehot_t @ x, onehot_t.sum(1)
        if sync_stats:
            both = _all_reduce(torch.cat([sums, counts.unsqueeze(1)], dim=1), sync_stats, group)
            sums, counts = both[:, :d], both[:, d]
        denom = counts.clamp_min(1).unsqueeze(1)
        dev = x - (sums / denom).index_select(0, c)
        dev = dev.abs_() if dispersion == "mad" else dev.square_()
        dev_sums = _all_reduce(onehot_t @ dev, sync_stats, group)
    return dev_sums, denom, counts


@torch.no_grad()
def cluster_dispersion(
    h: Tensor,
    clusters: Tensor,
    num_experts: int,
    *,
    dispersion: str = "mad",
    key_padding_mask: Tensor | None = None,
    sync_stats: bool = False,
) -> tuple[Tensor, Tensor]:
    """Per-cluster, per-feature dispersion of ``h``.

    Args:
        h: ``[T, d]`` router input (detached here).
        clusters: ``[T]`` int cluster of each token, in ``[0, num_experts)``.
        num_experts: E, the number of rows of the result.
        dispersion: ``"mad"``: mean_i |h_iq - mu_kq|; ``"var"``: mean_i (h_iq - mu_kq)^2.
        key_padding_mask: optional bool ``[T]``, True = keep; dropped tokens enter no statistic.
        sync_stats: all-reduce counts and sums, then deviation sums, over the default process group.

    Returns:
        ``(s[E, d], counts[E])``, both in the statistics dtype; empty clusters have ``s = 0``. Tokens with
        a cluster outside ``[0, E)`` must not occur (routing states are checked for E upstream).
    """
    dev_sums, denom, counts = _segment_sums(h, clusters, num_experts, dispersion, key_padding_mask, sync_stats)
    return dev_sums / denom, counts


def _normalise(w: Tensor, valid: Tensor, tau: float, norm: str, global_ref: str) -> Tensor:
    """Clamp ``w[E, d] = 1 / (s + eps)`` at tau times its pre-clamp mean over valid rows, normalise, and
    set invalid rows to 1."""
    v = valid.to(w.dtype)  # [E]
    n_valid = v.sum().clamp_min(1)
    with torch.autocast(device_type=w.device.type, enabled=False):
        w_bar = (v @ w).mean() / n_valid
        w = torch.minimum(w, w_bar * tau)
        if norm == "feature":
            m = w / ((v @ w) / n_valid)
        elif global_ref == "pre_clamp":
            m = w / w_bar
        else:
            m = w / ((v @ w).mean() / n_valid)
    return torch.where(valid.unsqueeze(1), m, 1.0)


@torch.no_grad()
def metric_from_dispersion(
    s: Tensor,
    valid: Tensor,
    *,
    eps: float = 1e-4,
    tau: float = 10.0,
    norm: str = "feature",
    global_ref: str = "pre_clamp",
) -> Tensor:
    """Invert, clamp and normalise a dispersion into the per-cluster metric.

    Args:
        s: ``[E, d]`` dispersion.
        valid: ``[E]`` bool; invalid rows get ``m = 1`` and enter no mean, clamp or normaliser.

    Returns:
        ``m[E, d]`` in ``s``'s dtype.
    """
    return _normalise((s + eps).reciprocal_(), valid, tau, norm, global_ref)


def adaptive_metric(
    h: Tensor,
    clusters: Tensor,
    num_experts: int,
    *,
    eps: float = 1e-4,
    tau: float = 10.0,
    norm: str = "feature",
    min_count: int = 2,
    dispersion: str = "mad",
    global_ref: str = "pre_clamp",
    mask_invalid: bool = True,
    key_padding_mask: Tensor | None = None,
    sync_stats: bool = False,
) -> Tensor:
    """The AC metric of a batch: one diagonal per cluster.

    Args:
        h: ``[T, d]`` router input; only its detached value is used.
        clusters: ``[T]`` top-1 expert of each token at the previous MoE layer.
        num_experts: E.
        key_padding_mask: optional bool ``[T]``, True = keep (padding is left out of the statistics).
        sync_stats: use the statistics of the batch concatenated over the default process group.

    Returns:
        ``m[E, d]``, detached, in at least float32. Rows of clusters with fewer than ``min_count``
        tokens are 1 (unless ``mask_invalid=False``, which reproduces the reference formula).
    """
    with torch.no_grad():
        dev_sums, denom, counts = _segment_sums(h, clusters, num_experts, dispersion, key_padding_mask, sync_stats)
        valid = counts >= min_count if mask_invalid else torch.ones_like(counts, dtype=torch.bool)
        return _normalise((dev_sums / denom + eps).reciprocal_(), valid, tau, norm, global_ref)


@torch.no_grad()
def token_metric(metric: Tensor, indices: Tensor, weights: Tensor, mix: int | None) -> Tensor:
    """Each token's multiplier m(i).

    Args:
        metric: ``[E, d]`` per-cluster metric.
        indices: ``[T, k']`` previous layer's sorted expert indices.
        weights: ``[T, k']`` previous layer's gate weights.
        mix: None for hard (``metric[indices[:, 0]]``), else k': ``sum_j pi_ij metric[indices_ij]``
            with ``pi`` the first k' weights renormalised to sum to 1.

    Returns:
        ``[T, d]``.
    """
    if mix is None:
        return metric.index_select(0, indices[:, 0])
    pi = weights[:, :mix].to(metric.dtype)
    pi = pi / pi.sum(1, keepdim=True)
    rows = metric.index_select(0, indices[:, :mix].reshape(-1)).view(indices.shape[0], mix, -1)
    return torch.einsum("tj,tjd->td", pi, rows)


def _batch_valid(counts: Tensor, cfg: ACConfig) -> Tensor:
    """Clusters of ``counts[E]`` with enough tokens (all, with ``mask_invalid=False``)."""
    return counts >= cfg.min_count if cfg.mask_invalid else torch.ones_like(counts, dtype=torch.bool)


def _transform(
    h: Tensor,
    indices: Tensor,
    weights: Tensor,
    key_padding_mask: Tensor | None,
    expert_ids: Tensor,
    running: Tensor | None,
    seen: Tensor | None,
    cfg: ACConfig,
    use_batch: bool,
    group: object | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    """The whole AC transform of one forward: ``(m_tok[T,d], m[E,d], valid[E], counts[E], s[E,d])``.

    ``use_batch``: compute the batch statistics (``counts``, dispersion ``s``; else both None). The metric
    comes from the running ``(running[E,d], seen[E])`` when given, else from the batch. The eager reference
    of :func:`_fused_transform`.
    """
    counts = s = None
    if use_batch:
        dev_sums, denom, counts = _segment_sums(
            h, indices[:, 0], expert_ids.shape[0], cfg.dispersion, key_padding_mask, cfg.sync_stats, expert_ids,
            group,
        )
        s = dev_sums / denom
        valid = _batch_valid(counts, cfg)
    if running is not None:
        valid, disp = seen, running.to(_stat_dtype(h.dtype))
    else:
        disp = s
    m = _normalise((disp + cfg.eps).reciprocal_(), valid, cfg.tau, cfg.norm, cfg.global_ref)
    return token_metric(m, indices, weights, cfg.mix), m, valid, counts, s


_fused_transform = fused(_transform)


class AdaptiveMetric(nn.Module):
    """The AC transform as a module, holding the running statistics for ``stats="ema"|"running"``.

    Buffers (``"ema"``/``"running"``): ``running_dispersion[E,d]`` and ``running_seen[E]`` (bool), and the
    batch statistics of the last training forward, ``pending_dispersion[E,d]`` / ``pending_valid[E]``,
    not yet folded in. Folding happens in :meth:`commit`: at the start of the next forward of this module
    or, inside a model prepared with ``share_state`` (``deferred_commit``), when the model's next forward
    begins, so activation-checkpoint recomputation routes with the same running values as the first pass.
    A resumed run folds in what the interrupted one had pending. A cluster's first valid batch sets its
    running value; clusters never seen valid get ``m = 1``.
    """

    def __init__(self, num_experts: int, dim: int, config: ACConfig) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.dim = dim
        self.config = config
        self.deferred_commit = False
        self.sync_group: object | None = None  # the process group of sync_stats (None: the default group)
        self.register_buffer("expert_ids", torch.arange(num_experts), persistent=False)
        if config.stats != "batch":
            self.register_buffer("running_dispersion", torch.zeros(num_experts, dim))
            self.register_buffer("running_seen", torch.zeros(num_experts, dtype=torch.bool))
            self.register_buffer("pending_dispersion", torch.zeros(num_experts, dim))
            self.register_buffer("pending_valid", torch.zeros(num_experts, dtype=torch.bool))

    @torch.no_grad()
    def forward(
        self, h: Tensor, indices: Tensor, weights: Tensor, key_padding_mask: Tensor | None = None
    ) -> tuple[Tensor, ACStats]:
        """``h[T,d]``, previous ``indices/weights[T,k']``, ``key_padding_mask[T]`` (True = keep) ->
        ``(m_tok[T,d], ACStats)``; ``m_tok`` is detached, in at least float32."""
        cfg = self.config
        if not self.deferred_commit:
            self.commit()
        use_batch = self.training or cfg.stats == "batch"
        use_running = cfg.stats == "running" or (cfg.stats == "ema" and not self.training)
        running = (self.running_dispersion, self.running_seen) if use_running else (None, None)
        if use_batch and cfg.sync_stats:  # a collective in the middle: eager
            m_tok, m, valid, counts, s = _transform(
                h, indices, weights, key_padding_mask, self.expert_ids, *running, cfg, use_batch, self.sync_group
            )
        else:
            m_tok, m, valid, counts, s = _fused_transform(
                h, indices, weights, key_padding_mask, self.expert_ids, *running, cfg, use_batch
            )
        if use_batch and cfg.stats != "batch" and self.training:
            self.pending_dispersion.copy_(s)
            self.pending_valid.copy_(_batch_valid(counts, cfg))
        return m_tok, ACStats(m, valid, counts)

    @torch.no_grad()
    def commit(self) -> None:
        """Fold the pending batch statistics into the running ones (no-op without pending ones)."""
        if self.config.stats == "batch":
            return
        run, valid = self.running_dispersion, self.pending_valid
        s = self.pending_dispersion.to(run.dtype)
        blended = torch.where(self.running_seen.unsqueeze(1), torch.lerp(run, s, self.config.momentum), s)
        run.copy_(torch.where(valid.unsqueeze(1), blended, run))
        self.running_seen.logical_or_(valid)
        valid.zero_()

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, dim={self.dim}, config={self.config}"
