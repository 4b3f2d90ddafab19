"""Evaluation metrics.

Token cosine (representation collapse, see ``docs/elliptical.md``) comes first, then the MoE routing
diagnostics (``docs/acmoe.md``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from clusterformers.attention import EllipticalAttention, MultiheadAttention, check_key_padding_mask


def token_cosine(out: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
    """Mean pairwise cosine similarity between the tokens of each sample.

    Tokens are L2-normalised, the strictly lower triangle of the ``N × N`` cosine matrix is summed and
    divided by ``n(n−1)/2``, with ``n`` the number of valid tokens of the sample. Computed in O(N·C) as
    ``(‖Σ_i u_i‖² − Σ_i ‖u_i‖²) / 2`` over valid unit tokens ``u_i``; an all-zero token counts as a zero
    vector (cosine 0 with everything).

    Args:
        out: ``[B, N, C]`` token representations.
        key_padding_mask: bool ``[B, N]``, **True = keep** (valid token), False = padding (excluded).

    Returns:
        ``[B]`` in ``out``'s dtype (reduced in at least float32).
    """
    if not isinstance(out, Tensor) or out.dim() != 3 or not out.is_floating_point():
        raise ValueError(f"out must be a floating-point [B, N, C] tensor, got {list(getattr(out, 'shape', []))}")
    batch, n, _ = out.shape
    check_key_padding_mask(key_padding_mask, batch, n)
    rdtype = torch.float64 if out.dtype == torch.float64 else torch.float32
    u = nn.functional.normalize(out.to(rdtype), dim=-1)
    if key_padding_mask is None:
        count = torch.full((batch,), float(n), dtype=rdtype, device=out.device)
    else:
        u = torch.where(key_padding_mask[:, :, None], u, torch.zeros((), dtype=rdtype, device=out.device))
        count = key_padding_mask.sum(dim=1).to(rdtype)
    if bool((count < 2).any()):
        raise ValueError(f"token_cosine needs >= 2 valid tokens per sample, got counts {count.tolist()}")
    lower = (u.sum(dim=1).pow(2).sum(dim=-1) - u.pow(2).sum(dim=(1, 2))) / 2
    return (lower / (count * (count - 1) / 2)).to(out.dtype)


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    if hasattr(model, "attention_modules"):
        return list(model.attention_modules())
    return [m for m in model.modules() if isinstance(m, (MultiheadAttention, EllipticalAttention))]


def _to_device(value: Any, device: torch.device | str) -> Any:
    return value.to(device) if isinstance(value, Tensor) else value


def _model_inputs(batch: Any, device: torch.device | str) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A batch is a Tensor (the input), a tuple/list (input first, e.g. labels after) or a dict of kwargs."""
    if isinstance(batch, Tensor):
        return (batch.to(device),), {}
    if isinstance(batch, Mapping):
        return (), {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)) and batch:
        return (_to_device(batch[0], device),), {}
    raise TypeError(f"a batch must be a Tensor, a non-empty tuple/list or a dict, got {type(batch).__name__}")


@torch.no_grad()
def collect_token_cosine(model: nn.Module, batches: Iterable[Any], device: torch.device | str) -> list[float]:
    """Token cosine per layer on each attention module's output, averaged over all samples.

    Forward hooks read each attention module's ``out`` (after its output projection, before the residual
    add) and the ``key_padding_mask`` it was called with, so padding is excluded. The model runs in eval
    mode (its modes are restored afterwards) and the hooks are always removed.

    Args:
        model: a model with ``attention_modules()`` (``TransformerLM``, ``ViT``), or any model whose
            attention is :class:`MultiheadAttention`/:class:`EllipticalAttention` (found in module order).
        batches: iterable of batches: a Tensor input, a tuple/list whose first item is the input (labels
            ignored), or a dict of forward kwargs (e.g. ``{"idx": ..., "key_padding_mask": ...}``).
        device: where the batches are moved.

    Returns:
        One float per attention layer: mean over every sample of the eval set.
    """
    modules = _attention_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} has no attention modules to hook")
    sums = [0.0] * len(modules)
    counts = [0] * len(modules)

    def make_hook(i: int):
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            mask = kwargs.get("key_padding_mask", args[1] if len(args) > 1 else None)
            values = token_cosine(output, mask)
            sums[i] += float(values.sum())
            counts[i] += values.numel()

        return hook

    modes = {m: m.training for m in model.modules()}
    handles = [m.register_forward_hook(make_hook(i), with_kwargs=True) for i, m in enumerate(modules)]
    try:
        model.eval()
        for batch in batches:
            args, kwargs = _model_inputs(batch, device)
            model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
        for m, training in modes.items():
            m.training = training
    if not all(counts):
        raise ValueError("collect_token_cosine got no batches (or a layer never ran)")
    return [s / c for s, c in zip(sums, counts, strict=True)]


# --- MoE routing diagnostics ------------------------------------------------------------------------------


def _labels(x: Any, name: str) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.dim() != 1 or t.numel() == 0 or t.is_floating_point():
        raise ValueError(f"{name}: expected a non-empty 1-D integer tensor, got shape {tuple(t.shape)}, {t.dtype}")
    return t.long()


def _contingency(a: Any, b: Any) -> torch.Tensor:
    """Float64 contingency table ``n[i, j] = #{t: a_t = i-th value of a, b_t = j-th value of b}``."""
    a = _labels(a, "assign")
    b = _labels(b, "labels").to(a.device)
    if a.shape != b.shape:
        raise ValueError(f"labels: expected {a.numel()} entries like assign, got {b.numel()}")
    ua, ia = torch.unique(a, return_inverse=True)
    ub, ib = torch.unique(b, return_inverse=True)
    n = torch.zeros(ua.numel() * ub.numel(), dtype=torch.float64, device=a.device)
    n.index_add_(0, ia * ub.numel() + ib, torch.ones(a.numel(), dtype=torch.float64, device=a.device))
    return n.view(ua.numel(), ub.numel())


def routing_stability(prev_top1: Any, top1: Any, num_experts: int) -> float:
    """Share of ordered token pairs (i = j included) whose "same top-1 expert" status flips between two
    consecutive MoE layers; lower is more stable.

    Computed in O(T + E²) as ``(Σ_a r_a² + Σ_b c_b² − 2 Σ_ab n_ab²) / T²`` with ``n`` the ``[E, E]``
    contingency table of ``(prev_top1, top1)`` and ``r``, ``c`` its margins.

    Args:
        prev_top1: ``[T]`` top-1 expert of each token at the previous MoE layer, in ``[0, num_experts)``.
        top1: ``[T]`` top-1 expert at this layer.
        num_experts: E.
    """
    a = _labels(prev_top1, "prev_top1")
    b = _labels(top1, "top1").to(a.device)
    if a.shape != b.shape:
        raise ValueError(f"top1: expected {a.numel()} entries like prev_top1, got {b.numel()}")
    n = torch.zeros(num_experts * num_experts, dtype=torch.float64, device=a.device)
    n.index_add_(0, a * num_experts + b, torch.ones(a.numel(), dtype=torch.float64, device=a.device))
    n = n.view(num_experts, num_experts)
    flips = n.sum(1).square().sum() + n.sum(0).square().sum() - 2 * n.square().sum()
    return float(flips / a.numel() ** 2)


def purity(assign: Any, labels: Any) -> float:
    """Cluster purity ``(1/T) Σ_e max_z n_ez`` of expert assignments ``assign[T]`` against latent ``labels[T]``."""
    n = _contingency(assign, labels)
    return float(n.max(1).values.sum() / n.sum())


def nmi(assign: Any, labels: Any) -> float:
    """Normalised mutual information with arithmetic normalisation, ``MI / ((H(assign) + H(labels)) / 2)``;
    equals ``sklearn.metrics.normalized_mutual_info_score(labels, assign)`` (1 when both are constant)."""
    n = _contingency(assign, labels)
    if n.shape[0] == n.shape[1] == 1:
        return 1.0
    p = n / n.sum()
    pa, pb = p.sum(1), p.sum(0)
    nz = p > 0
    mi = (p[nz] * (p[nz].log() - (pa.unsqueeze(1) * pb.unsqueeze(0))[nz].log())).sum().clamp_min(0)
    if float(mi) == 0.0:
        return 0.0
    h_a = -(pa * pa.log()).sum()
    h_b = -(pb * pb.log()).sum()
    return float(mi / ((h_a + h_b) / 2))


def expert_load_std(indices: Any, num_experts: int) -> float:
    """Std across experts (population, ``correction=0``) of the percentage of top-k assignments each
    expert receives; ``indices`` is ``[T, k]`` (or ``[T]``), or a list of them (one per layer, averaged)."""
    layers = list(indices) if isinstance(indices, (list, tuple)) else [indices]
    if not layers:
        raise ValueError("indices: expected a tensor or a non-empty list of tensors, got an empty list")
    stds = []
    for layer in layers:
        flat = torch.as_tensor(layer).reshape(-1).long()
        counts = torch.zeros(num_experts, dtype=torch.float64, device=flat.device)
        counts.index_add_(0, flat, torch.ones(flat.numel(), dtype=torch.float64, device=flat.device))
        stds.append(float((100 * counts / flat.numel()).std(correction=0)))
    return sum(stds) / len(stds)


def dispersion_ratio(u: Any, labels: Any) -> float:
    """Within- over between-cluster scatter ``Σ_i ‖u_i − ū_{z_i}‖² / Σ_z n_z ‖ū_z − ū‖²`` of ``u[T, d]``
    (e.g. ``m(i) ⊙ h_i``) under latent ``labels[T]``; lower means tighter, better separated clusters."""
    x = torch.as_tensor(u).to(torch.float64)
    if x.dim() != 2:
        raise ValueError(f"u: expected [T, d], got shape {tuple(x.shape)}")
    z = _labels(labels, "labels").to(x.device)
    if z.numel() != x.shape[0]:
        raise ValueError(f"labels: expected {x.shape[0]} entries, got {z.numel()}")
    _, inv = torch.unique(z, return_inverse=True)
    k = int(inv.max()) + 1
    counts = torch.zeros(k, dtype=torch.float64, device=x.device).index_add_(0, inv, torch.ones_like(x[:, 0]))
    means = torch.zeros(k, x.shape[1], dtype=torch.float64, device=x.device).index_add_(0, inv, x)
    means = means / counts.unsqueeze(1)
    within = (x - means[inv]).square().sum()
    between = (counts.unsqueeze(1) * (means - x.mean(0)).square()).sum()
    return float(within / between)


def flip_rate(top_clean: Any, top_corrupt: Any) -> tuple[float, float]:
    """Share of tokens whose routing changes under input corruption: ``(top-1 flips, top-k set flips)``.

    Args:
        top_clean: ``[T, k]`` sorted expert indices on clean input (or ``[T]`` top-1 only).
        top_corrupt: the same on corrupted input.
    """
    a = torch.as_tensor(top_clean)
    b = torch.as_tensor(top_corrupt).to(a.device)
    if a.shape != b.shape or a.numel() == 0:
        raise ValueError(
            f"top_corrupt: expected a non-empty shape {tuple(a.shape)} like top_clean, got {tuple(b.shape)}"
        )
    a, b = (a.unsqueeze(1), b.unsqueeze(1)) if a.dim() == 1 else (a, b)
    top1 = (a[:, 0] != b[:, 0]).double().mean()
    topk = (a.sort(1).values != b.sort(1).values).any(1).double().mean()
    return float(top1), float(topk)
