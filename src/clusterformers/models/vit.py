"""A small Vision Transformer classifier built from the same :class:`Block` as the language model.

Pixels enter in ``[0, 1]`` and are normalised inside the model, so attacks and corruptions work in pixel
space (the reference code attacked normalised inputs, so its epsilons were in normalised units).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from clusterformers.models.transformer import BlockStack
from clusterformers.state import share_state

__all__ = ["ViT", "ViTConfig"]


@dataclass
class ViTConfig:
    """ViT classifier. ``mean``/``std``: pixel normalisation (a float, or one value per channel).

    ``ffn``/``ffn_kwargs`` select the FFN (``models.ffn.build_ffn``): e.g. ``ffn="moe"``,
    ``ffn_kwargs={"router": "ac", "moe_layers": [1, 2, 3]}`` puts MoE layers in blocks 2-4 (1-based), whose
    AC router is adaptive in blocks 3-4 (the first MoE layer has no previous routing state).
    """

    image_size: int = 28
    patch_size: int = 7
    in_chans: int = 1
    num_classes: int = 10
    dim: int = 64
    depth: int = 6
    num_heads: int = 4
    mlp_ratio: float = 2.0
    dropout: float = 0.0
    attention: str = "softmax"
    estimator: str = "mean"
    elliptical_layers: Sequence[int] | None = None
    ffn: str = "dense"
    ffn_kwargs: dict[str, Any] = field(default_factory=dict)
    mean: float | Sequence[float] = 0.1307
    std: float | Sequence[float] = 0.3081

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size", "in_chans", "num_classes", "dim", "depth", "num_heads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"ViTConfig.{name} must be a positive int, got {value!r}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})")
        if self.dim % self.num_heads:
            raise ValueError(f"dim ({self.dim}) must be a multiple of num_heads ({self.num_heads})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}")
        for name in ("mean", "std"):
            value = getattr(self, name)
            values = [value] if isinstance(value, (int, float)) else list(value)
            if len(values) not in (1, self.in_chans):
                raise ValueError(f"{name} needs 1 or in_chans={self.in_chans} values, got {value!r}")
        std = [self.std] if isinstance(self.std, (int, float)) else list(self.std)
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be > 0, got {self.std!r}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def _channel_buffer(value: float | Sequence[float], channels: int) -> Tensor:
    values = [float(value)] if isinstance(value, (int, float)) else [float(v) for v in value]
    return torch.tensor(values * (channels // len(values))).view(1, channels, 1, 1)


class ViT(nn.Module):
    """ViT: conv patch embedding, CLS token, learned positions, pre-LN blocks, final LN, head on CLS.

    ``forward(x [B, C, H, W] with pixels in [0, 1]) -> logits [B, num_classes]``. The model subtracts
    ``mean`` and divides by ``std`` itself. Blocks are non-causal; with ``attention="elliptical"`` the
    blocks in ``elliptical_layers`` (default all but the first) estimate their metric from the previous
    block's values. MoE FFNs thread their routing state (over all ``B · (1 + num_patches)`` tokens) through
    ``self.layer_state``, reset before every forward; AC routers use batch statistics in training and
    running ones in eval (``stats="ema"``), so eval is batch-independent.
    """

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.register_buffer("pixel_mean", _channel_buffer(cfg.mean, cfg.in_chans), persistent=False)
        self.register_buffer("pixel_std", _channel_buffer(cfg.std, cfg.in_chans), persistent=False)
        self.patch_embed = nn.Conv2d(cfg.in_chans, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_emb = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, cfg.dim))
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = BlockStack(cfg, causal=False)
        self.elliptical_layers = self.blocks.elliptical_layers
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.num_classes)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_emb, std=0.02)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        share_state(self)

    def attention_modules(self) -> list[nn.Module]:
        """The attention module of each block, in layer order."""
        return [block.attn for block in self.blocks]

    def forward_features(self, x: Tensor) -> Tensor:
        """Token features after the final LayerNorm: ``[B, C, H, W] -> [B, 1 + num_patches, dim]`` (CLS first)."""
        cfg = self.cfg
        expected = [cfg.in_chans, cfg.image_size, cfg.image_size]
        if not isinstance(x, Tensor) or x.dim() != 4 or list(x.shape[1:]) != expected:
            raise ValueError(f"x must be [B, {', '.join(map(str, expected))}], got {list(getattr(x, 'shape', []))}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point image tensor with pixels in [0, 1], got {x.dtype}")
        x = (x - self.pixel_mean) / self.pixel_std
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)  # [B, P, dim]
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        tokens = self.drop(tokens + self.pos_emb)
        return self.norm(self.blocks(tokens))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.forward_features(x)[:, 0])
