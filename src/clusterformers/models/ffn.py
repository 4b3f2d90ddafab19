"""Feed-forward layers of a transformer block, built by name.

:func:`build_ffn` is the one place where a config's ``ffn`` string becomes a module, so dense and
mixture-of-experts models share the same :class:`~clusterformers.models.transformer.Block`. Every FFN maps
``[B, N, dim] -> [B, N, dim]`` and returns a Tensor.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

FFN_KINDS = ("dense",)


class Mlp(nn.Module):
    """Dense GELU MLP: ``Linear(dim, hidden) -> GELU -> Linear(hidden, dim)``.

    Dropout on the output belongs to the block (residual dropout), so any FFN gets the same treatment.

    ``forward(x [B, N, dim]) -> [B, N, dim]``.
    """

    def __init__(self, dim: int, hidden: int, *, bias: bool = True) -> None:
        super().__init__()
        if dim <= 0 or hidden <= 0:
            raise ValueError(f"Mlp needs dim > 0 and hidden > 0, got dim={dim}, hidden={hidden}")
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def build_ffn(kind: str, dim: int, hidden: int, layer_index: int, **kwargs: Any) -> nn.Module:
    """Build the FFN of block ``layer_index``.

    Args:
        kind: ``"dense"`` (a :class:`Mlp`).
        dim: model width.
        hidden: hidden width of a dense FFN (``dim · mlp_ratio``).
        layer_index: position of the block in the stack (0-based); lets a kind differ per layer.
        **kwargs: options of the kind (``dense``: ``bias``), from the model config's ``ffn_kwargs``.

    Returns:
        A module mapping ``[B, N, dim] -> Tensor [B, N, dim]``.
    """
    if kind == "dense":
        unknown = sorted(set(kwargs) - {"bias"})
        if unknown:
            raise ValueError(f"ffn_kwargs for ffn='dense' accept only 'bias', got unknown keys {unknown}")
        return Mlp(dim, hidden, **kwargs)
    raise ValueError(f"ffn must be one of {FFN_KINDS}, got {kind!r} (layer {layer_index})")
