"""Compiled versions of the library's small-op hot spots, with the eager code kept as the reference.

The elliptical metric and the AC transform are a dozen elementwise ops and reductions over ``[B, H, N, D]``
or ``[T, d]`` tensors. Eager PyTorch runs each op as its own kernel, with its own pass over memory (and on
a GPU its own launch), so their cost follows the number of ops, not the bytes. :func:`fused` wraps such a
function in ``torch.compile``, which fuses the passes into one or two kernels; the wrapped function itself
is the eager reference that the tests compare the compiled one to.

A fused function runs its eager code instead when

- fusion is off: :func:`set_fused` ``(False)``, or the environment variable ``CLUSTERFORMERS_FUSED=0``;
- the call is already being traced by ``torch.compile`` (a compiled model fuses the code itself);
- ``torch.compile`` is unavailable here, or compiling failed once (no C++ compiler, no Triton): a warning is
  logged once and the eager code is used from then on.

The first call with a new dtype, device or option compiles (seconds); later calls reuse the graph, also
for new sizes (``dynamic=True``). A function fused with ``dynamic=False`` compiles once per shape instead:
inductor's CPU code for a reduction over a row of symbolic length can be several times slower than the
eager op, while the static one is several times faster (the contrastive losses' tiled logsumexp, whose
shapes are fixed by the batch size). A new ``torch.set_num_threads`` also compiles again; after
``torch._dynamo.config.recompile_limit`` graphs it runs eagerly.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch

__all__ = ["fused", "fused_enabled", "set_fused"]

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

_enabled = os.environ.get("CLUSTERFORMERS_FUSED", "1").strip().lower() not in ("0", "false", "no", "off")


def set_fused(enabled: bool) -> None:
    """Switch the compiled paths on (the default) or off for this process; off runs the eager reference."""
    global _enabled
    _enabled = bool(enabled)


def fused_enabled() -> bool:
    """Whether the compiled paths are on (see :func:`set_fused`)."""
    return _enabled


def _compile_supported() -> bool:
    try:
        return bool(torch._dynamo.is_dynamo_supported())
    except Exception:  # noqa: BLE001 - any failure to ask means no compile here
        return False


def fused(fn: F, *, dynamic: bool = True) -> F:
    """``fn`` compiled with ``torch.compile(dynamic=dynamic)`` on first use, or ``fn`` itself (module
    docstring)."""
    compiled: Callable[..., Any] | None = None
    broken = False

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        nonlocal compiled, broken
        if broken or not _enabled or torch.compiler.is_compiling():
            return fn(*args, **kwargs)
        if compiled is None:
            if not _compile_supported():
                broken = True
                log.warning("torch.compile is not supported here; %s runs eagerly", fn.__qualname__)
                return fn(*args, **kwargs)
            compiled = torch.compile(fn, dynamic=dynamic)
        try:
            return compiled(*args, **kwargs)
        except torch._dynamo.exc.TorchDynamoException as err:
            broken = True
            log.warning("compiling %s failed (%s); it runs eagerly from now on", fn.__qualname__, err)
            return fn(*args, **kwargs)

    call.eager = fn  # type: ignore[attr-defined]
    return call  # type: ignore[return-value]
