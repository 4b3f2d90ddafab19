"""When the library's value checks run: one rule for every module.

Value checks (NaN/inf inputs, the contents of a padding mask) read a tensor on the host. On an accelerator
that stalls every layer until the device catches up, and ``torch.compile(fullgraph=True)`` /
``torch.export`` cannot trace it. Shape and dtype checks read no tensor and always run.
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["check_inputs_default"]


def check_inputs_default(check_inputs: bool | None, x: Tensor) -> bool:
    """Whether to run the value checks (NaN/inf, mask contents) that read a tensor on the host.

    ``None`` (the default of every module) checks CPU inputs only, where a check costs no device stall;
    ``True`` checks on every device; ``False`` never (for ``torch.compile(fullgraph=True)``/``torch.export``).
    Shape and dtype checks read no tensor and always run.
    """
    return x.device.type == "cpu" if check_inputs is None else check_inputs
