"""Input checks shared by every loss: shapes, dtypes, devices, values, half-precision upcast.

Shape, dtype and device checks read only tensor metadata and always run. Value checks (NaN/Inf, negative or
out-of-range groups) read a tensor on the host, a device sync, so they run only when asked (the losses'
``check_inputs``); without them the checks never touch tensor data and a loss traces into one graph under
``torch.compile``.
"""

from __future__ import annotations

import torch
from torch import Tensor

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype a loss computes in: fp16/bf16 are upcast to fp32 (their exponentials overflow); fp64 stays."""
    out = torch.float32
    for dtype in dtypes:
        out = torch.promote_types(out, dtype)
    return out


def check_embeddings(z1: Tensor, z2: Tensor, check_finite: bool = True) -> tuple[Tensor, Tensor]:
    """Validate the two views' embeddings and upcast fp16/bf16 to fp32.

    Args:
        z1, z2: ``[b, d]`` floating-point tensors on one device, ``b >= 2``.
        check_finite: raise on NaN/Inf (a device sync; skipped when False).

    Returns:
        ``(z1, z2)`` in the compute dtype (at least fp32).
    """
    for name, z in (("z1", z1), ("z2", z2)):
        if not isinstance(z, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor [b, d], got {type(z).__name__}")
        if not z.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor [b, d], got dtype {z.dtype}")
        if z.dim() != 2:
            raise ValueError(f"{name} must be 2-D [b, d], got shape {list(z.shape)}")
    if z1.shape != z2.shape:
        raise ValueError(f"z1 and z2 must have the same shape [b, d], got {list(z1.shape)} and {list(z2.shape)}")
    if z1.shape[0] < 2:
        raise ValueError(f"the batch must hold b >= 2 samples, got z1 of shape {list(z1.shape)}")
    if z1.device != z2.device:
        raise ValueError(f"z1 and z2 must be on one device, got {z1.device} and {z2.device}")
    if check_finite:
        for name, z in (("z1", z1), ("z2", z2)):
            if not bool(torch.isfinite(z).all()):
                raise ValueError(f"{name} contains NaN or Inf values (shape {list(z.shape)})")
    dtype = compute_dtype(z1.dtype, z2.dtype)
    return z1.to(dtype), z2.to(dtype)


def check_sensitive(sensitive: Tensor, b: int, device: torch.device, check_values: bool = True) -> Tensor:
    """Validate the protected attribute.

    Args:
        sensitive: int/bool ``[b]`` (groups) or float ``[b]`` / ``[b, s]``, on ``device``.
        b: batch size of the embeddings.
        device: the embeddings' device.
        check_values: raise on negative groups or on NaN/Inf in a float attribute (a device sync; skipped
            when False).

    Returns:
        long ``[b]`` groups or float ``[b, s]`` (fp16/bf16 upcast to fp32).
    """
    if not isinstance(sensitive, Tensor):
        raise TypeError(f"sensitive must be a torch.Tensor ([b] int or [b, s] float), got {type(sensitive).__name__}")
    if sensitive.device != device:
        raise ValueError(f"sensitive must be on the embeddings' device {device}, got {sensitive.device}")
    if sensitive.dim() == 0 or sensitive.shape[0] != b:
        raise ValueError(f"sensitive must have batch size b = {b} in dim 0, got shape {list(sensitive.shape)}")
    if not sensitive.is_floating_point():
        if sensitive.is_complex():
            raise TypeError(f"sensitive must be an int or float tensor, got dtype {sensitive.dtype}")
        if sensitive.dim() != 1:
            raise ValueError(f"an integer (group) sensitive must be 1-D [b], got shape {list(sensitive.shape)}")
        if check_values and bool((sensitive < 0).any()):
            raise ValueError(f"integer groups in sensitive must be >= 0, got min {int(sensitive.min())}")
        return sensitive.long()
    if sensitive.dim() not in (1, 2):
        raise ValueError(f"a float sensitive must be [b] or [b, s], got shape {list(sensitive.shape)}")
    if check_values and not bool(torch.isfinite(sensitive).all()):
        raise ValueError(f"sensitive contains NaN or Inf values (shape {list(sensitive.shape)})")
    if sensitive.dim() == 1:
        sensitive = sensitive[:, None]
    return sensitive.to(compute_dtype(sensitive.dtype))


def one_hot_groups(groups: Tensor, num_groups: int, dtype: torch.dtype, check: bool = True) -> Tensor:
    """Integer groups ``[b]`` → one-hot ``[b, num_groups]``.

    With ``check`` a group ``>= num_groups`` raises (a device sync); without, its row is all zeros.
    """
    if check:
        top = int(groups.max())
        if top >= num_groups:
            raise ValueError(
                f"integer sensitive has group {top}, but sensitive_dim = {num_groups} one-hot columns were "
                f"configured; expected groups in 0..{num_groups - 1}"
            )
    return (groups[:, None] == torch.arange(num_groups, device=groups.device)).to(dtype)


def group_indicator(groups: Tensor, dtype: torch.dtype) -> Tensor:
    """Integer groups ``[b]`` → ``[b, b]`` one-hot of each sample's first group member.

    Row ``i`` has its 1 in the column of the first ``j`` with ``g_j = g_i``: a one-hot encoding with one
    column per possible group whatever the group ids are, so its shape is fixed (no ``unique`` or ``max``,
    no device sync). Dot products and distances between rows equal those of any one-hot encoding.
    """
    b = groups.shape[0]
    index = torch.arange(b, device=groups.device)
    first = torch.where(groups[:, None] == groups[None, :], index, b).amin(dim=1)
    return (first[:, None] == index).to(dtype)
