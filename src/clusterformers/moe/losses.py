"""Auxiliary router losses as pure functions, and ``total_aux_loss`` to collect them from a model."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from clusterformers.checks import check_inputs_default

__all__ = ["load_balancing_loss", "router_z_loss", "total_aux_loss"]


def _stack_layers(logits: Tensor | tuple[Tensor, ...] | list[Tensor], mask: Tensor | None,
                  check_inputs: bool | None) -> tuple[Tensor, Tensor]:
    """Concatenate per-layer ``[T, E]`` logits and repeat a keep-mask (True = keep) per layer."""
    layers = list(logits) if isinstance(logits, (tuple, list)) else [logits]
    if not layers:
        raise ValueError("logits: expected a Tensor [T, E] or a non-empty tuple of them, got an empty tuple")
    for i, layer in enumerate(layers):
        if layer.dim() != 2 or layer.shape != layers[0].shape:
            raise ValueError(f"logits[{i}]: expected shape [T, E] = {tuple(layers[0].shape)}, got {tuple(layer.shape)}")
    T = layers[0].shape[0]
    if T == 0:
        raise ValueError("logits: expected at least one token, got shape (0, E)")
    device = layers[0].device
    if mask is None:
        keep = torch.ones(T, device=device)
    else:
        if mask.dtype != torch.bool:
            raise TypeError(
                f"key_padding_mask: expected a bool tensor (True = keep), got {mask.dtype}; convert an additive "
                "float mask with `mask == 0`, a 0/1 mask with `mask > 0`"
            )
        if mask.numel() != T:
            raise ValueError(f"key_padding_mask: expected {T} entries (True = keep), got shape {tuple(mask.shape)}")
        if check_inputs_default(check_inputs, mask) and not bool(mask.any()):
            raise ValueError(f"key_padding_mask keeps none of the {T} tokens: the loss of no tokens is undefined")
        keep = mask.reshape(-1).to(device=device, dtype=torch.float32)
    dtype = torch.promote_types(layers[0].dtype, torch.float32)
    return torch.cat([layer.to(dtype) for layer in layers]), keep.repeat(len(layers)).to(dtype)


def load_balancing_loss(
    logits: Tensor | tuple[Tensor, ...],
    num_experts: int,
    top_k: int,
    key_padding_mask: Tensor | None = None,
    check_inputs: bool | None = None,
) -> Tensor:
    """Switch/Mixtral load-balancing loss ``E * sum_e f_e P_e`` (equals HF's ``load_balancing_loss_func``).

    Args:
        logits: router logits ``[T, E]``, or a tuple of them (one per layer, pooled).
        num_experts: E.
        top_k: experts per token; the top-k of ``softmax(logits)`` is recomputed here.
        key_padding_mask: optional bool ``[T]`` (any shape with T entries), True = keep.
        check_inputs: refuse a mask that keeps no token (reads the mask on the host); ``None``: on CPU only.

    Returns:
        A scalar: ``f_e`` = share of kept tokens' top-k assignments to e per token (sums to k),
        ``P_e`` = mean softmax probability of e; equals k at perfect balance.
    """
    s, keep = _stack_layers(logits, key_padding_mask, check_inputs)
    if s.shape[1] != num_experts:
        raise ValueError(f"logits: expected {num_experts} experts in the last dim, got {s.shape[1]}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k: expected an int in 1..num_experts={num_experts}, got {top_k!r}")
    probs = torch.softmax(s, dim=1)
    top = torch.topk(probs, top_k, dim=1).indices
    counts = torch.zeros(num_experts, dtype=s.dtype, device=s.device)
    counts.index_add_(0, top.reshape(-1), keep.repeat_interleave(top_k))
    n = keep.sum().clamp_min(1)
    f = counts / n
    p = (probs * keep.unsqueeze(1)).sum(0) / n
    return num_experts * (f * p).sum()


def router_z_loss(logits: Tensor | tuple[Tensor, ...], key_padding_mask: Tensor | None = None,
                  check_inputs: bool | None = None) -> Tensor:
    """ST-MoE router z-loss ``mean_i (logsumexp_e s_ie)^2`` over kept tokens (``key_padding_mask``: True = keep).

    Padded tokens are left out entirely (an overflowing padded logit cannot make the loss NaN); a mask that
    keeps no token is refused (``check_inputs``, as in :func:`load_balancing_loss`). Logits beyond about
    1e19 overflow the square in float32, as the value itself would.
    """
    s, keep = _stack_layers(logits, key_padding_mask, check_inputs)
    z = torch.where(keep > 0, torch.logsumexp(s, dim=1).square(), 0.0)
    return z.sum() / keep.sum().clamp_min(1)


def total_aux_loss(model: nn.Module) -> Tensor:
    """Sum of the ``.aux_loss`` tensors that the model's MoE layers kept from their last forward.

    Returns a zero scalar (on the model's device) when there are none."""
    losses = [m.aux_loss for m in model.modules() if isinstance(getattr(m, "aux_loss", None), Tensor)]
    if losses:
        return sum(losses[1:], losses[0])
    param = next(model.parameters(), None)
    return torch.zeros((), device=param.device if param is not None else None)
