"""Feed-forward layers of a transformer block, built by name.

:func:`build_ffn` is the one place where a config's ``ffn`` string becomes a module, so dense and
mixture-of-experts models share the same :class:`~clusterformers.models.transformer.Block`. Every FFN maps
``[B, N, dim] -> [B, N, dim]`` and returns a Tensor.

Kinds:

- ``"dense"``: a GELU :class:`Mlp`.
- ``"moe"``: a top-k :class:`~clusterformers.moe.MoE` with any router (``smoe``, ``xmoe``, ``stablemoe``,
  ``random``, ``ac``) in the blocks listed in ``moe_layers`` (default: all), a dense :class:`Mlp` elsewhere.
- ``"softmoe"``: a :class:`~clusterformers.moe.SoftMoE` (optionally with AC) in ``moe_layers``, dense elsewhere.

The routing state flows through a model's MoE layers by its shared state (``clusterformers.share_state``):
each MoE layer reads the routing of the nearest earlier MoE layer, across interleaved dense blocks (as
GLaM interleaves them), so an AC router is adaptive from the second MoE layer on and plain in the first.

``ffn_kwargs`` stay JSON-serialisable: ``ac`` is ``None``, a preset name (``"lm"``, ``"swin"``,
``"softmoe"``) or a dict of :class:`~clusterformers.moe.ACConfig` fields, optionally with ``"preset"``
(e.g. ``{"preset": "lm", "dispersion": "var"}``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from torch import Tensor, nn

from clusterformers.moe import ACConfig, MoE, SoftMoE

FFN_KINDS = ("dense", "moe", "softmoe")

_DENSE_KEYS = frozenset({"bias"})
_MOE_KEYS = frozenset(
    {"num_experts", "top_k", "hidden", "router", "ac", "gated", "capacity_factor", "priority", "aux_coef", "z_coef",
     "moe_layers"}
)
_SOFTMOE_KEYS = frozenset({"num_experts", "slots_per_expert", "hidden", "ac", "gated", "state_k", "moe_layers"})


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


def resolve_ac_option(ac: ACConfig | str | Mapping[str, Any] | None) -> ACConfig | str | None:
    """``ffn_kwargs["ac"]`` as the MoE layers take it: None, a preset name or an :class:`ACConfig`.

    A dict holds ``ACConfig`` fields and optionally ``"preset"`` (the fields then override the preset)."""
    if ac is None or isinstance(ac, (str, ACConfig)):
        return ac
    if isinstance(ac, Mapping):
        fields = dict(ac)
        preset = fields.pop("preset", None)
        try:
            return ACConfig.preset(preset, **fields) if preset is not None else ACConfig(**fields)
        except TypeError as err:
            raise ValueError(f"ffn_kwargs['ac']: unknown ACConfig field in {dict(ac)} ({err})") from err
    raise TypeError(f"ffn_kwargs['ac']: expected None, a preset name, a dict or an ACConfig, got {type(ac).__name__}")


def resolve_moe_layers(moe_layers: Iterable[int] | None, depth: int | None = None) -> tuple[int, ...] | None:
    """Validate ``ffn_kwargs["moe_layers"]`` (0-based block indices); None means every block.

    With ``depth`` the indices must lie in ``0..depth-1``. Duplicates are merged; the result is sorted."""
    if moe_layers is None:
        return None
    if isinstance(moe_layers, (str, bytes)) or not isinstance(moe_layers, Iterable):
        raise ValueError(f"ffn_kwargs['moe_layers']: expected None or a list of block indices, got {moe_layers!r}")
    layers = list(moe_layers)
    bad = [i for i in layers if isinstance(i, bool) or not isinstance(i, int) or i < 0]
    if bad:
        raise ValueError(f"ffn_kwargs['moe_layers']: expected non-negative ints (0-based blocks), got {bad}")
    if depth is not None and (out := [i for i in layers if i >= depth]):
        raise ValueError(f"ffn_kwargs['moe_layers']: blocks {out} do not exist, the model has depth {depth}")
    return tuple(sorted(set(layers)))


def _check_keys(kind: str, kwargs: Mapping[str, Any], allowed: frozenset[str]) -> None:
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise ValueError(f"ffn_kwargs for ffn={kind!r} accept only {sorted(allowed)}, got unknown keys {unknown}")


def build_ffn(kind: str, dim: int, hidden: int, layer_index: int, /, **kwargs: Any) -> nn.Module:
    """Build the FFN of block ``layer_index`` (the first four arguments are positional-only).

    Args:
        kind: ``"dense"``, ``"moe"`` or ``"softmoe"`` (``FFN_KINDS``).
        dim: model width.
        hidden: hidden width of a dense FFN (``dim · mlp_ratio``), also the default expert hidden size.
        layer_index: position of the block in the stack (0-based); ``moe_layers`` picks the MoE blocks.
        **kwargs: options of the kind, from the model config's ``ffn_kwargs``:

            - ``dense``: ``bias``.
            - ``moe``: ``num_experts`` (8), ``top_k`` (2), ``hidden``, ``router`` (``"stablemoe"``; or
              ``"smoe"``, ``"xmoe"``, ``"random"``, ``"ac"``), ``ac`` (None, preset name or dict),
              ``gated``, ``capacity_factor`` (None = dropless), ``priority``, ``aux_coef``, ``z_coef``,
              ``moe_layers``.
            - ``softmoe``: ``num_experts`` (8), ``slots_per_expert`` (1), ``hidden``, ``ac``, ``gated``,
              ``state_k``, ``moe_layers``.

    Returns:
        A module mapping ``[B, N, dim] -> Tensor [B, N, dim]``: an :class:`Mlp`, ``MoE`` or ``SoftMoE``.
    """
    if kind not in FFN_KINDS:
        raise ValueError(f"ffn must be one of {FFN_KINDS}, got {kind!r} (layer {layer_index})")
    if kind == "dense":
        _check_keys(kind, kwargs, _DENSE_KEYS)
        return Mlp(dim, hidden, **kwargs)
    _check_keys(kind, kwargs, _MOE_KEYS if kind == "moe" else _SOFTMOE_KEYS)
    opts = dict(kwargs)
    layers = resolve_moe_layers(opts.pop("moe_layers", None))
    if layers is not None and layer_index not in layers:
        return Mlp(dim, hidden)
    expert_hidden = opts.pop("hidden", None) or hidden
    num_experts = opts.pop("num_experts", 8)
    ac = resolve_ac_option(opts.pop("ac", None))
    if kind == "moe":
        return MoE(dim, num_experts, opts.pop("top_k", 2), expert_hidden, router=opts.pop("router", "stablemoe"),
                   ac=ac, **opts)
    return SoftMoE(dim, num_experts, opts.pop("slots_per_expert", 1), expert_hidden, ac=ac, **opts)
