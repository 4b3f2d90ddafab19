"""A counter of host reads: the points where an accelerator would stall the host for a device value."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class HostReads(TorchDispatchMode):
    """Counts tensor reads on the host inside the ``with`` block: ``aten._local_scalar_dense`` (what
    ``.item()``, ``bool()``, ``int()`` and ``float()`` of a tensor dispatch to) and ``Tensor.tolist`` (which on
    the CPU dispatches nothing, so it is counted by wrapping the method)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self._tolist = None

    def __enter__(self) -> HostReads:
        self._tolist = torch.Tensor.tolist

        def tolist(tensor, *args, **kwargs):
            self.count += 1
            return self._tolist(tensor, *args, **kwargs)

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))
