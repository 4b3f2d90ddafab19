"""Input checks shared by every loss (spec §4): shapes, dtypes, devices, finiteness, half-precision upcast."""

from __future__ import annotations

import torch
from torch import Tensor

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype a loss computes in: fp16/bf16 are upcast to fp32 (D10); fp64 stays fp64."""
    out = torch.float32
    for dtype in dtypes:
        out = torch.promote_types(out, dtype)
    return out


def check_embeddings(z1: Tensor, z2: Tensor, check_finite: bool = True) -> tuple[Tensor, Tensor]:
    """Validate the two views' embeddings and upcast fp16/bf16 to fp32.

    Args:
        z1, z2: ``[b, d]`` floating-point tensors on one device, ``b >= 2``.
        check_finite: raise on NaN/Inf (skipped when False; costs a device sync).

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


def check_sensitive(sensitive: Tensor, b: int, device: torch.device, check_finite: bool = True) -> Tensor:
    """Validate the protected attribute.

    Args:
        sensitive: int/bool ``[b]`` (groups) or float ``[b]`` / ``[b, s]``, on ``device``.
        b: batch size of the embeddings.
        device: the embeddings' device.
        check_finite: raise on NaN/Inf in a float attribute.

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
        if bool((sensitive < 0).any()):
            raise ValueError(f"integer groups in sensitive must be >= 0, got min {int(sensitive.min())}")
        return sensitive.long()
    if sensitive.dim() not in (1, 2):
        raise ValueError(f"a float sensitive must be [b] or [b, s], got shape {list(sensitive.shape)}")
    if check_finite and not bool(torch.isfinite(sensitive).all()):
        raise ValueError(f"sensitive contains NaN or Inf values (shape {list(sensitive.shape)})")
    if sensitive.dim() == 1:
        sensitive = sensitive[:, None]
    return sensitive.to(compute_dtype(sensitive.dtype))


def one_hot_groups(groups: Tensor, num_groups: int, dtype: torch.dtype) -> Tensor:
    """Integer groups ``[b]`` → one-hot ``[b, num_groups]`` (D9); groups must be ``< num_groups``."""
    top = int(groups.max())
    if top >= num_groups:
        raise ValueError(
            f"integer sensitive has group {top}, but sensitive_dim = {num_groups} one-hot columns were "
            f"configured; expected groups in 0..{num_groups - 1}"
        )
    return torch.nn.functional.one_hot(groups, num_groups).to(dtype)
