"""Timing helpers shared by the benchmarks: median wall time, interleaved variants, ratio records.

A machine shared with other work drifts: the same step can take 15% longer a minute later. The variants of
a comparison therefore run in rounds, one run of each per round (:func:`interleaved`), and a row's ratio is
the median over rounds of ours ÷ baseline within the round, where both met the same load. The order within a
round alternates (forward, then reversed), so that neither variant always runs first: on the CPU the step
that follows another model's step runs on that step's freed memory, which alone moved one training-step
ratio by 2% when the order was fixed. Its interval is
the distribution-free one for a median: the order statistics ``k`` and ``n + 1 − k`` of the ``n`` round
ratios, with the largest ``k`` whose binomial coverage is at least 95% (with fewer than 6 rounds no pair
reaches 95%; then it is the range, with its coverage ``1 − 2^(1−n)``). A row that misses its target with
the target inside the interval has missed it by less than the machine's noise. The interval treats the
rounds as independent; load that drifts slowly over a run makes neighbouring rounds alike, so it can be
too narrow, and a second run is the better check.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Callable, Iterator, Sequence

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


def interleaved(steps: dict[str, Callable[[], object]], warmup: int, reps: int, device: torch.device
                ) -> dict[str, list[float]]:
    """Seconds of each step in each of ``reps`` rounds (one run of every step per round), after ``warmup``
    runs of each: the steps alternate so that drift on a shared machine hits all, in the given order in even
    rounds and the reverse in odd ones, so that no step always runs first."""
    for step in steps.values():
        time_fn(step, warmup=warmup, reps=1, device=device)
    times: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for round_ in range(reps):
        for name in names if round_ % 2 == 0 else reversed(names):
            times[name].append(time_fn(steps[name], warmup=0, reps=1, device=device))
    return times


def median_interval(values: Sequence[float], coverage: float = 0.95) -> tuple[float, float, float]:
    """``(low, high, achieved coverage)``: the order-statistic interval of the median of ``values`` (module
    docstring)."""
    xs, n = sorted(values), len(values)
    if n == 0:
        raise ValueError("values is empty: need at least one round")
    k, achieved = 1, 1.0 - 2.0 ** (1 - n)  # the range
    for j in range(2, n // 2 + 1):  # P(X_(j) <= median <= X_(n+1-j)) = 1 - 2 P(Bin(n, 1/2) <= j - 1)
        cover = 1.0 - 2.0 * sum(math.comb(n, i) for i in range(j)) / 2.0**n
        if cover < coverage:
            break
        k, achieved = j, cover
    return xs[k - 1], xs[n - k], achieved


def record(name: str, ours: float | Sequence[float], baseline: float | Sequence[float], baseline_name: str,
           shape: str, target: float | None = None, **extra: object) -> dict:
    """One benchmark row: ``ratio`` is ours / baseline (lower is better); with a ``target``, the row holds
    ``target`` (``"<=x"``) and ``met`` (``ratio <= target``).

    ``ours`` and ``baseline`` are seconds, or the per-round seconds of :func:`interleaved`: then ``ours_s``
    and ``baseline_s`` are their medians, ``ratio`` the median of the round ratios, and ``ratio_interval``
    / ``interval_coverage`` its interval (module docstring); with a target, ``within_noise`` says whether a
    miss has the target inside that interval.
    """
    row: dict[str, object] = {"name": name}
    if isinstance(ours, (int, float)) and isinstance(baseline, (int, float)):
        row.update(ratio=ours / baseline, ours_s=ours, baseline_s=baseline)
    else:
        if isinstance(ours, (int, float)) or isinstance(baseline, (int, float)) or len(ours) != len(baseline):
            raise ValueError("ours and baseline: pass two numbers or two equally long lists of round times")
        rounds = [o / b for o, b in zip(ours, baseline)]
        low, high, achieved = median_interval(rounds)
        row.update(ratio=statistics.median(rounds), ours_s=statistics.median(ours),
                   baseline_s=statistics.median(baseline), ratio_interval=[low, high],
                   interval_coverage=round(achieved, 4))
    row.update(baseline=baseline_name, shape=shape)
    if target is not None:
        row.update(target=f"<={target:.4g}", bound=target, **_verdict(row, target))
    return {**row, **extra}


def _verdict(row: dict, bound: float) -> dict[str, bool]:
    """``met`` (``ratio <= bound``) and, for a row with an interval, ``within_noise`` (a miss whose interval
    reaches down to the bound)."""
    verdict = {"met": row["ratio"] <= bound}
    if "ratio_interval" in row:
        verdict["within_noise"] = not verdict["met"] and row["ratio_interval"][0] <= bound
    return verdict


def combine_processes(runs: Sequence[Sequence[dict]]) -> list[dict]:
    """One row per ``(name, threads, shape)`` from the rows of the same benchmarks run in several processes.

    A process carries effects that its rounds share (where its buffers landed in memory, which of them got
    huge pages), so one process's interval can miss the scatter between processes. A combined row's
    ``ratio`` is the median of the processes' ratios, ``ratio_interval`` / ``interval_coverage`` its
    interval over processes (:func:`median_interval`), ``process_ratios`` the ratios themselves, and
    ``processes`` their number; ``ours_s`` / ``baseline_s`` are medians, and ``met`` / ``within_noise`` are
    decided again. Rows without a numeric ratio (skips, counts) are the first process's.
    """
    groups: dict[tuple, list[dict]] = {}
    for rows in runs:
        for row in rows:
            groups.setdefault((row["name"], row.get("threads"), row.get("shape")), []).append(row)
    combined = []
    for rows in groups.values():
        row = dict(rows[0])
        ratios = [r.get("ratio") for r in rows]
        if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in ratios):
            low, high, achieved = median_interval(ratios)
            row.update(ratio=statistics.median(ratios), ratio_interval=[low, high],
                       interval_coverage=round(achieved, 4), process_ratios=ratios, processes=len(rows))
            for key in ("ours_s", "baseline_s"):
                if all(key in r for r in rows):
                    row[key] = statistics.median(r[key] for r in rows)
            if "bound" in row:
                row.update(_verdict(row, row["bound"]))
        combined.append(row)
    return combined


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
