"""Batched image augmentation on tensors (no torchvision)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def random_translate(images: Tensor, shift: int, generator: torch.Generator | None = None) -> Tensor:
    """Translate each image by its own random offset of up to ``shift`` pixels per axis, filling with zeros.

    Args:
        images: float ``[B, C, H, W]`` (any device).
        shift: the largest offset in pixels (``0`` returns ``images`` unchanged).
        generator: CPU generator for the offsets (``None``: the global RNG).

    Returns:
        ``[B, C, H, W]``, the same dtype and device.
    """
    if images.dim() != 4:
        raise ValueError(f"images must be [B, C, H, W], got shape {list(images.shape)}")
    if shift < 0:
        raise ValueError(f"shift must be >= 0, got {shift}")
    if shift == 0:
        return images
    b, _, h, w = images.shape
    padded = F.pad(images, (shift, shift, shift, shift))
    dy = torch.randint(0, 2 * shift + 1, (b,), generator=generator).to(images.device)
    dx = torch.randint(0, 2 * shift + 1, (b,), generator=generator).to(images.device)
    rows = (dy[:, None] + torch.arange(h, device=images.device))[:, None, :, None]  # [B, 1, H, 1]
    cols = (dx[:, None] + torch.arange(w, device=images.device))[:, None, None, :]  # [B, 1, 1, W]
    batch = torch.arange(b, device=images.device)[:, None, None, None]
    chans = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
    return padded[batch, chans, rows, cols]
