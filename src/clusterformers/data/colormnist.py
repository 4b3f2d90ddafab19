"""ColorMNIST as CCLK-release builds it (``data/colormnist/dataset.py``, ``'back'`` mode, random colours).

Each image gets a palette colour ``k`` (uniform, independent of the digit) plus integer Gaussian noise,
``c = clip(palette[k] + trunc(40·N(0, I₃)), 0, 255)``, painted on the background with black ink:
``pixel = floor((255 − I)/255 · c)``. Colours are drawn once per data set (``data_seed``); the protected
attribute is ``sensitive = c/255``, the raw ``c`` is the colour-probe target and ``k`` is kept for oracle
ablations only. The transforms are pure torch and never change colours, since the colour is the protected
attribute (no colour jitter, greyscale or per-image normalisation, and no constant padding, whose border
would look like ink): training = RandomResizedCrop(32, scale 0.08–1, bicubic, clamped) + horizontal flip,
evaluation = resize to 32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from clusterformers.data.images import load_digits8, load_mnist5k, stratified_split

PALETTE = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
)
NOISE_STD = 40.0


@dataclass(frozen=True)
class ColorMNIST:
    """A coloured digit set.

    Attributes:
        images: uint8 ``[N, 3, H, W]``.
        labels: int64 ``[N]`` digits.
        colors: float32 ``[N, 3]`` raw background colour ``c`` in 0–255 (integers).
        palette_idx: int64 ``[N]`` palette entry ``k``.
        noise: int64 ``[N, 3]`` the pre-clip offsets ``trunc(40·N(0, 1))``.
    """

    images: Tensor
    labels: Tensor
    colors: Tensor
    palette_idx: Tensor
    noise: Tensor

    @property
    def sensitive(self) -> Tensor:
        """The protected attribute ``c/255`` float32 ``[N, 3]``."""
        return self.colors / 255.0

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, index: Tensor | np.ndarray) -> ColorMNIST:
        """The samples at ``index`` (long indices or a bool mask)."""
        idx = torch.as_tensor(index)
        return ColorMNIST(self.images[idx], self.labels[idx], self.colors[idx], self.palette_idx[idx], self.noise[idx])


def make_color_mnist(
    images: np.ndarray | Tensor, labels: np.ndarray | Tensor, data_seed: int = 0, noise_std: float = NOISE_STD
) -> ColorMNIST:
    """Colour grey digits as CCLK does.

    Args:
        images: uint8 ``[N, H, W]`` grey digits (ink = high values).
        labels: ``[N]`` digit labels.
        data_seed: seed of the colour draws (``numpy.random.default_rng``).
        noise_std: standard deviation of the colour noise per channel (40).

    Returns:
        :class:`ColorMNIST` with images uint8 ``[N, 3, H, W]``.
    """
    grey = np.asarray(images)
    if grey.ndim != 3 or grey.dtype != np.uint8:
        raise ValueError(f"images must be uint8 [N, H, W], got dtype {grey.dtype}, shape {grey.shape}")
    lab = np.asarray(labels).astype(np.int64)
    if lab.shape != (grey.shape[0],):
        raise ValueError(f"labels must have shape [N] = [{grey.shape[0]}], got {lab.shape}")
    rng = np.random.default_rng(data_seed)
    k = rng.integers(0, len(PALETTE), size=len(lab))
    noise = np.trunc(noise_std * rng.standard_normal((len(lab), 3))).astype(np.int64)
    colors = np.clip(np.asarray(PALETTE, dtype=np.int64)[k] + noise, 0, 255)
    background = (255.0 - grey.astype(np.float64)) / 255.0
    painted = np.floor(background[:, None, :, :] * colors[:, :, None, None]).astype(np.uint8)
    return ColorMNIST(
        images=torch.from_numpy(painted),
        labels=torch.from_numpy(lab),
        colors=torch.from_numpy(colors.astype(np.float32)),
        palette_idx=torch.from_numpy(k.astype(np.int64)),
        noise=torch.from_numpy(noise),
    )


def color_mnist5k(
    path: str | Path | None = None, data_seed: int = 0, split_seed: int = 0
) -> tuple[ColorMNIST, ColorMNIST]:
    """ColorMNIST-5k: MNIST-5k coloured once, then split 4,000/1,000 stratified as ``mnist5k_split``.

    Returns:
        ``(train, test)``.
    """
    images, labels = load_mnist5k(path)
    data = make_color_mnist(images, labels, data_seed)
    train_idx, test_idx = stratified_split(labels, 0.2, seed=split_seed)
    return data.subset(train_idx), data.subset(test_idx)


def color_digits(data_seed: int = 0, split_seed: int = 0) -> tuple[ColorMNIST, ColorMNIST]:
    """Fixture: sklearn's 8×8 digits (``round(255 v/16)``) coloured the same way, stratified 70/30.

    Returns:
        ``(train, test)`` with 8×8 images.
    """
    images, labels = load_digits8()
    data = make_color_mnist(images, labels, data_seed)
    train_idx, test_idx = stratified_split(labels, 0.3, seed=split_seed)
    return data.subset(train_idx), data.subset(test_idx)


def _as_float(images: Tensor) -> Tensor:
    if images.dim() != 4:
        raise ValueError(f"images must be [B, C, H, W], got shape {list(images.shape)}")
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    if not images.is_floating_point():
        raise TypeError(f"images must be uint8 (0..255) or float (0..1), got dtype {images.dtype}")
    return images


def eval_transform(images: Tensor, size: int = 32) -> Tensor:
    """Resize to ``size × size`` (bicubic, clamped): uint8 / float ``[B, C, H, W]`` → float ``[B, C, size, size]``
    in ``[0, 1]``."""
    x = _as_float(images)
    return F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False).clamp_(0.0, 1.0)


def random_crop_boxes(
    n: int,
    height: int,
    width: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
) -> Tensor:
    """torchvision's RandomResizedCrop parameters for ``n`` images: long ``[n, 4]`` rows ``(top, left, h, w)``.

    Ten tries per image of an area fraction in ``scale`` and a log-uniform aspect ratio in ``ratio``; an
    image with no valid try gets the central crop with the ratio clamped.
    """
    tries = 10
    area = height * width
    target = area * torch.empty(n, tries, dtype=torch.float64).uniform_(scale[0], scale[1], generator=generator)
    log_r = torch.empty(n, tries, dtype=torch.float64)
    aspect = torch.exp(log_r.uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator))
    w = torch.round(torch.sqrt(target * aspect)).long()
    h = torch.round(torch.sqrt(target / aspect)).long()
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = torch.where(ok.any(1), ok.long().argmax(1), torch.zeros(n, dtype=torch.long))
    rows = torch.arange(n)
    h, w, found = h[rows, first], w[rows, first], ok.any(1)
    in_ratio = width / height
    if in_ratio < ratio[0]:
        cw, ch = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        ch, cw = height, int(round(height * ratio[1]))
    else:
        cw, ch = width, height
    h = torch.where(found, h, torch.full_like(h, ch))
    w = torch.where(found, w, torch.full_like(w, cw))
    u_top = torch.rand(n, generator=generator, dtype=torch.float64)
    u_left = torch.rand(n, generator=generator, dtype=torch.float64)
    top = torch.where(found, (u_top * (height - h + 1)).long(), (height - h) // 2)
    left = torch.where(found, (u_left * (width - w + 1)).long(), (width - w) // 2)
    return torch.stack([top, left, h, w], dim=1)


def resized_crop(images: Tensor, boxes: Tensor, size: int = 32, flip: Tensor | None = None) -> Tensor:
    """Crop each image to its box, resize to ``size`` (bicubic, border-clamped taps), clamp to ``[0, 1]``.

    Args:
        images: uint8 / float ``[B, C, H, W]``.
        boxes: ``[B, 4]`` rows ``(top, left, h, w)`` in pixels.
        size: output side.
        flip: bool ``[B]``, mirror horizontally.

    Returns:
        float ``[B, C, size, size]``.
    """
    x = _as_float(images)
    n, _, height, width = x.shape
    top, left, h, w = (boxes.to(torch.float64)[:, i] for i in range(4))
    theta = torch.zeros(n, 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = w / width
    theta[:, 0, 2] = (2 * left + w) / width - 1
    theta[:, 1, 1] = h / height
    theta[:, 1, 2] = (2 * top + h) / height - 1
    if flip is not None:
        theta[:, 0, 0] = torch.where(flip.cpu(), -theta[:, 0, 0], theta[:, 0, 0])
    grid = F.affine_grid(theta.to(x.device, x.dtype), [n, x.shape[1], size, size], align_corners=False)
    out = F.grid_sample(x, grid, mode="bicubic", padding_mode="border", align_corners=False)
    return out.clamp_(0.0, 1.0)


def train_transform(
    images: Tensor,
    size: int = 32,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip_p: float = 0.5,
    generator: torch.Generator | None = None,
) -> Tensor:
    """RandomResizedCrop(``size``, ``scale``, bicubic, clamped) + horizontal flip, batched; no colour change.

    Args:
        images: uint8 / float ``[B, C, H, W]`` (any device).
        generator: CPU generator for the crop and flip draws (``None``: global RNG).

    Returns:
        float ``[B, C, size, size]`` in ``[0, 1]``.
    """
    n, _, height, width = images.shape
    boxes = random_crop_boxes(n, height, width, scale, ratio, generator)
    flip = torch.rand(n, generator=generator) < flip_p
    return resized_crop(images, boxes, size, flip)
