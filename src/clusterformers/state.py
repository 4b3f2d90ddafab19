"""One protocol for what a model's layers hand to later layers within one forward.

Elliptical attention needs the values of the previous attention layer; the Adaptive Clustering router
needs the routing of the previous MoE layer. Both layers return plain Tensors (so they drop into any
block that hosts a dense attention or FFN), and what a later layer needs flows through one
:class:`LayerState` shared by the layers of a model:

```python
model = MyModel()                 # any nn.Module holding EllipticalAttention / MoE layers
clusterformers.share_state(model)  # once; resets automatically before every model forward
```

Each stateful layer owns a *position* per kind (``"values"`` for attention, ``"routing"`` for MoE) and,
in forward, reads the nearest earlier position of its kind written since the model's forward began,
then writes its own. Positions (not a "last written" slot) make the protocol safe under activation
checkpointing: a recomputed layer reads the same earlier state as in the first pass, and its write
replaces an equal value. ``copy.deepcopy`` and pickling give a state with the same positions and
nothing written (the written tensors may carry autograd graphs). Every stateful layer also takes an
explicit override (``v_prev=`` / ``prev=``) for users who thread state by hand.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

from torch import nn

__all__ = ["LayerState", "StatefulLayer", "share_state"]


class LayerState:
    """Positions and written values, per kind, of the stateful layers of one model.

    ``register(kind, layer)`` reserves the next position (in execution order); ``read(kind, p)`` returns
    the value of the nearest written position before ``p`` (or None); ``write(kind, p, value)`` stores
    one; ``reset()`` forgets every written value and tells each layer a new forward begins
    (:meth:`StatefulLayer.begin_forward`).
    """

    def __init__(self) -> None:
        self._layers: dict[str, list[StatefulLayer]] = {}
        self._written: dict[str, dict[int, Any]] = {}

    def register(self, kind: str, layer: StatefulLayer) -> int:
        layers = self._layers.setdefault(kind, [])
        layers.append(layer)
        return len(layers) - 1

    def read(self, kind: str, position: int) -> Any | None:
        written = self._written.get(kind)
        if not written:
            return None
        for p in range(position - 1, -1, -1):
            if p in written:
                return written[p]
        return None

    def write(self, kind: str, position: int, value: Any) -> None:
        size = len(self._layers.get(kind, ()))
        if not 0 <= position < size:
            raise ValueError(f"position: expected a registered {kind!r} position in [0, {size}), got {position}")
        self._written.setdefault(kind, {})[position] = value

    def reset(self) -> None:
        self._written = {}
        for layers in self._layers.values():
            for layer in layers:
                layer.begin_forward()

    def layers(self, kind: str) -> list[StatefulLayer]:
        """The layers registered for ``kind``, in position order."""
        return list(self._layers.get(kind, ()))

    def _before_forward(self, module: nn.Module, args: Any) -> None:
        self.reset()

    def __deepcopy__(self, memo: dict) -> LayerState:
        new = LayerState()
        memo[id(self)] = new
        new._layers = copy.deepcopy(self._layers, memo)
        return new

    def __getstate__(self) -> dict:
        return {"_layers": self._layers, "_written": {}}

    def __repr__(self) -> str:
        sizes = {kind: len(layers) for kind, layers in self._layers.items()}
        written = {kind: sorted(w) for kind, w in self._written.items()}
        return f"LayerState(layers={sizes}, written={written})"


class StatefulLayer:
    """Mixin of layers that read and write a :class:`LayerState` (set by :func:`share_state`).

    Subclasses set ``state_kind``; without a shared state, :meth:`read_state` gives None and
    :meth:`write_state` does nothing, so the layer works alone (and with explicit overrides).
    """

    state_kind: str = ""
    layer_state: LayerState | None = None
    state_position: int | None = None

    def read_state(self) -> Any | None:
        if self.layer_state is None or self.state_position is None:
            return None
        return self.layer_state.read(self.state_kind, self.state_position)

    def write_state(self, value: Any) -> None:
        if self.layer_state is not None and self.state_position is not None:
            self.layer_state.write(self.state_kind, self.state_position, value)

    def attach_state(self, state: LayerState, position: int) -> None:
        """Join ``state`` at ``position`` (called by :func:`share_state`)."""
        self.layer_state, self.state_position = state, position

    def begin_forward(self) -> None:
        """Called when the model's forward begins (before any layer runs); default: nothing."""


def share_state(model: nn.Module, layers: Iterable[nn.Module] | None = None) -> LayerState:
    """Give the stateful layers of ``model`` one :class:`LayerState`, reset before every ``model`` forward.

    Args:
        model: any module; a forward pre-hook on it resets the state, so nothing needs calling per step.
        layers: the stateful layers in execution order; default: those of ``model.modules()`` in
            registration order (the order of ``__init__``, which is the execution order of every
            sequential model: timm and HF blocks, ``nn.Sequential``, our models).

    Returns:
        The state (also ``model.layer_state``). Calling it again replaces the previous state and hook.
    """
    for key, hook in list(model._forward_pre_hooks.items()):
        if isinstance(getattr(hook, "__self__", None), LayerState):
            del model._forward_pre_hooks[key]
    state = LayerState()
    chosen = list(layers) if layers is not None else [m for m in model.modules() if isinstance(m, StatefulLayer)]
    for layer in chosen:
        if not isinstance(layer, StatefulLayer):
            raise TypeError(f"layers: expected stateful clusterformers layers, got {type(layer).__name__}")
        layer.attach_state(state, state.register(layer.state_kind, layer))
    model.register_forward_pre_hook(state._before_forward)
    model.layer_state = state
    return state
