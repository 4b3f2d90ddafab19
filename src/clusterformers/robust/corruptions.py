"""Input corruptions for images in ``[0, 1]`` pixel space; outputs are clipped back to ``[0, 1]``.

Randomness comes from an optional ``torch.Generator``; it may live on another device than the images
(e.g. a CPU generator for CUDA images, which makes results device-independent), and the draw is moved to
the images' device.
"""

from __future__ import annotations

import torch
from torch import Tensor

DISTRIBUTIONS = ("normal", "uniform", "rademacher")


def sample_like(x: Tensor, dist: str, generator: torch.Generator | None = None) -> Tensor:
    """A random tensor shaped like ``x``, on ``x``'s device and in its dtype.

    Args:
        x: reference tensor.
        dist: ``normal`` (N(0, 1)), ``uniform`` (U[0, 1)) or ``rademacher`` (±1 with probability 1/2).
        generator: optional generator; drawn on the generator's device, then moved.
    """
    device = generator.device if generator is not None else x.device
    if dist == "normal":
        out = torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype)
    elif dist == "uniform":
        out = torch.rand(x.shape, generator=generator, device=device, dtype=x.dtype)
    elif dist == "rademacher":
        out = torch.randint(0, 2, x.shape, generator=generator, device=device).to(x.dtype) * 2 - 1
    else:
        raise ValueError(f"dist must be one of {DISTRIBUTIONS}, got {dist!r}")
    return out.to(x.device)


def _check_images(x: Tensor) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, Tensor) else type(x).__name__
        raise TypeError(f"x must be a floating-point image tensor with pixels in [0, 1], got {got}")


def gaussian_noise(x: Tensor, sigma: float, generator: torch.Generator | None = None) -> Tensor:
    """``clip(x + sigma · N(0, 1), 0, 1)``, elementwise.

    Args:
        x: images of any shape, pixels in ``[0, 1]``.
        sigma: noise standard deviation in pixel units (``>= 0``).
        generator: optional generator for reproducible noise.
    """
    _check_images(x)
    if not sigma >= 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    return (x + sigma * sample_like(x, "normal", generator)).clamp(0.0, 1.0)


def salt_and_pepper(x: Tensor, amount: float, generator: torch.Generator | None = None) -> Tensor:
    """Set a fraction ``amount`` of the elements of ``x`` to 0 or 1 (each with probability 1/2).

    Each element is hit independently with probability ``amount``; values stay in ``[0, 1]``.
    """
    _check_images(x)
    if not 0.0 <= amount <= 1.0:
        raise ValueError(f"amount must lie in [0, 1], got {amount}")
    u = sample_like(x, "uniform", generator)
    out = torch.where(u < amount / 2, torch.zeros_like(x), x)
    return torch.where((u >= amount / 2) & (u < amount), torch.ones_like(x), out)
