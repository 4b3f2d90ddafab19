"""Timing helpers shared by the benchmarks: median wall time, interleaved variants, ratio records."""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator

import torch


def synchronize(device: torch.device | str | None) -> None:
    """Wait for the device's queued work (CUDA); nothing elsewhere."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(
    fn: Callable[[], object], *, warmup: int = 5, reps: int = 20, device: torch.device | str | None = None
) -> float:
    """Median wall time of ``fn()`` in seconds over ``reps`` runs after ``warmup`` runs.

    On CUDA the device is synchronised before and after every run, so the time covers the kernels.
    """
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(reps):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved(steps: dict[str, Callable[[], object]], warmup: int, reps: int, device: torch.device) -> dict:
    """Median seconds per step; the steps alternate run by run so that drift on a shared machine hits all."""
    for step in steps.values():
        time_fn(step, warmup=warmup, reps=1, device=device)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(reps):
        for name, step in steps.items():
            times[name].append(time_fn(step, warmup=0, reps=1, device=device))
    return {name: statistics.median(t) for name, t in times.items()}


def record(name: str, ours: float, baseline: float, baseline_name: str, shape: str, target: float | None = None,
           **extra: object) -> dict:
    """One benchmark row: ``ratio`` is ours / baseline (lower is better); with a ``target``, the row holds
    ``target`` (``"<=x"``) and ``met`` (``ratio <= target``)."""
    row = {"name": name, "ratio": ours / baseline, "ours_s": ours, "baseline_s": baseline,
           "baseline": baseline_name, "shape": shape}
    if target is not None:
        row.update(target=f"<={target:.4g}", met=ours / baseline <= target)
    return {**row, **extra}


def device_of(device: str) -> torch.device:
    """``"auto"`` picks CUDA when present."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """``torch.set_num_threads(threads)`` inside the block, restored after it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
