"""Benchmarks: speed and memory ratios against baselines run in the same process.

Each module (``attention``, ``moe``, ``contrastive``, ``integrations``, ``parallel``) has
``run(quick, device, threads)`` returning rows of :func:`~clusterformers.bench.common.record`: ``ratio`` =
ours / baseline (lower is better), and where the row has a bound, ``target`` and ``met``. :func:`run` runs
the chosen modules at each thread count; ``clusterformers bench`` prints the rows (``--json``: one object
per line) and with ``--check`` exits non-zero when a row misses its target. With ``--processes N``
(:func:`run_processes`) it runs them in N fresh processes and reports the median over processes.

Each module at each thread count starts from empty ``torch.compile`` caches, as a fresh process would: a
new thread count compiles every fused function again, and after ``torch._dynamo.config.recompile_limit``
graphs of one function dynamo runs it eagerly, so a long run would otherwise time its later rows on the
eager code.
"""

from __future__ import annotations

import importlib
import json
import logging
import subprocess
import sys

import torch

from clusterformers.bench.common import combine_processes, device_of, torch_threads

__all__ = ["BENCHES", "missed", "run", "run_processes"]

log = logging.getLogger(__name__)

BENCHES = ("attention", "moe", "contrastive", "integrations", "parallel")


def _check_arguments(names: list[str] | tuple[str, ...], threads: list[int] | tuple[int, ...]) -> None:
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        raise ValueError(f"names: unknown benchmarks {unknown}; choose from {', '.join(BENCHES)}")
    if not threads or any(t < 1 for t in threads):
        raise ValueError(f"threads: expected positive thread counts, got {list(threads)}")


def run(names: list[str] | tuple[str, ...] = BENCHES, *, quick: bool = False, device: str = "auto",
        threads: list[int] | tuple[int, ...] = (1, 2)) -> list[dict]:
    """The rows of the benchmarks ``names``, each run once per entry of ``threads`` (torch intra-op threads;
    on CUDA, and for modules with ``THREADED = False`` that fix their own, only the first entry is used)."""
    _check_arguments(names, threads)
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


def run_processes(names: list[str] | tuple[str, ...] = BENCHES, *, processes: int, quick: bool = False,
                  device: str = "auto", threads: list[int] | tuple[int, ...] = (1, 2)) -> list[dict]:
    """:func:`run` in ``processes`` fresh interpreters, one after the other (``python -m clusterformers bench
    --json``), combined by :func:`~clusterformers.bench.common.combine_processes`. Interrupted (Ctrl-C) after
    at least one process has finished, it combines the finished ones instead of losing them."""
    if processes < 1:
        raise ValueError(f"processes: expected a positive count, got {processes}")
    _check_arguments(names, threads)
    command = [sys.executable, "-m", "clusterformers", "bench", "--json", "--only", ",".join(names),
               "--device", device, "--threads", ",".join(map(str, threads)), *(["--quick"] if quick else [])]
    runs = []
    for i in range(processes):
        log.info("benchmark process %d of %d", i + 1, processes)
        try:
            done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
        except KeyboardInterrupt:
            if not runs:
                raise
            log.warning("interrupted in process %d of %d: combining the %d finished", i + 1, processes, len(runs))
            break
        runs.append([json.loads(line) for line in done.stdout.splitlines() if line.strip()])
    return combine_processes(runs)


def missed(rows: list[dict]) -> list[dict]:
    """The rows that carry a target and miss it."""
    return [r for r in rows if r.get("met") is False]
