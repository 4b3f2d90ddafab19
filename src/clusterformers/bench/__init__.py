"""Benchmarks: speed and memory ratios against baselines run in the same process.

Each module (``attention``, ``moe``, ``contrastive``, ``integrations``, ``parallel``) has
``run(quick, device, threads)`` returning rows of :func:`~clusterformers.bench.common.record`: ``ratio`` =
ours / baseline (lower is better), and where the row has a bound, ``target`` and ``met``. :func:`run` runs
the chosen modules at each thread count; ``clusterformers bench`` prints the rows (``--json``: one object
per line) and with ``--check`` exits non-zero when a row misses its target.

Each module at each thread count starts from empty ``torch.compile`` caches, as a fresh process would: a
new thread count compiles every fused function again, and after ``torch._dynamo.config.recompile_limit``
graphs of one function dynamo runs it eagerly, so a long run would otherwise time its later rows on the
eager code.
"""

from __future__ import annotations

import importlib
import logging

import torch

from clusterformers.bench.common import device_of, torch_threads

__all__ = ["BENCHES", "missed", "run"]

log = logging.getLogger(__name__)

BENCHES = ("attention", "moe", "contrastive", "integrations", "parallel")


def run(names: list[str] | tuple[str, ...] = BENCHES, *, quick: bool = False, device: str = "auto",
        threads: list[int] | tuple[int, ...] = (1, 2)) -> list[dict]:
    """The rows of the benchmarks ``names``, each run once per entry of ``threads`` (torch intra-op threads;
    on CUDA, and for modules with ``THREADED = False`` that fix their own, only the first entry is used)."""
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        raise ValueError(f"names: unknown benchmarks {unknown}; choose from {', '.join(BENCHES)}")
    if not threads or any(t < 1 for t in threads):
        raise ValueError(f"threads: expected positive thread counts, got {list(threads)}")
    dev = device_of(device)
    counts = list(threads[:1]) if dev.type == "cuda" else list(threads)
    rows = []
    for name in names:
        module = importlib.import_module(f"clusterformers.bench.{name}")
        for n in counts if getattr(module, "THREADED", True) else counts[:1]:
            log.info("benchmark %s on %s, %d thread(s)", name, dev, n)
            with torch_threads(n):
                torch.compiler.reset()
                rows += module.run(quick, dev, n)
    return rows


def missed(rows: list[dict]) -> list[dict]:
    """The rows that carry a target and miss it."""
    return [r for r in rows if r.get("met") is False]
