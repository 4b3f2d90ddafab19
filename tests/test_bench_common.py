"""The benchmarks' ratio rows: paired round ratios and the order-statistic interval of their median; the
alternating order of the rounds."""

from __future__ import annotations

import math
import random

import pytest
import torch

from clusterformers.bench.common import combine_processes, interleaved, median_interval, record


def _coverage(n: int, k: int) -> float:
    """P(X_(k) <= median <= X_(n+1-k)) for n draws of a continuous variable, by counting sign patterns."""
    return sum(math.comb(n, i) for i in range(k, n - k + 1)) / 2**n


def test_median_interval_takes_the_narrowest_order_statistics_that_reach_the_coverage() -> None:
    values = random.Random(0).sample(range(1000), 15)
    xs = sorted(values)
    low, high, cover = median_interval(values)
    assert (low, high) == (xs[3], xs[11])  # k = 4: 1 − 2·576/32768
    assert cover == pytest.approx(_coverage(15, 4)) and cover == pytest.approx(1 - 2 * 576 / 32768)
    assert _coverage(15, 5) < 0.95  # the next pair inwards falls short
    assert median_interval(values, coverage=0.8)[:2] == (xs[4], xs[10])  # control: a lower coverage narrows it


@pytest.mark.parametrize("n", [1, 2, 5])
def test_median_interval_of_few_rounds_is_the_range_with_its_coverage(n: int) -> None:
    values = [3.0, 1.0, 2.0, 5.0, 4.0][:n]
    low, high, cover = median_interval(values)
    assert (low, high) == (min(values), max(values))
    assert cover == pytest.approx(1 - 2.0 ** (1 - n)) and cover < 0.95
    with pytest.raises(ValueError, match="values is empty"):
        median_interval([])


def test_a_row_of_rounds_is_the_median_of_the_paired_ratios_not_the_ratio_of_medians() -> None:
    # round 2 ran while the machine was slow for both sides: pairing cancels it
    ours, base = [1.0, 3.0, 1.1, 1.05, 0.95], [1.0, 3.3, 1.0, 1.0, 1.0]
    row = record("x", ours, base, "base", "shape", target=1.04)
    rounds = sorted(o / b for o, b in zip(ours, base))
    assert row["ratio"] == pytest.approx(rounds[2]) == pytest.approx(1.0)
    assert row["ours_s"] == 1.05 and row["baseline_s"] == 1.0  # the medians, whose ratio (1.05) differs
    assert row["ratio_interval"] == [pytest.approx(rounds[0]), pytest.approx(rounds[-1])]
    assert row["interval_coverage"] == 0.9375 and row["met"] is True and row["within_noise"] is False
    missed = record("x", ours, base, "base", "shape", target=0.95)  # ratio 1.0, interval [0.909, 1.1]
    assert missed["met"] is False and missed["within_noise"] is True
    assert record("x", ours, base, "base", "shape", target=0.9)["within_noise"] is False  # below the interval
    assert record("x", 2.0, 1.0, "base", "shape", 1.5) == {
        "name": "x", "ratio": 2.0, "ours_s": 2.0, "baseline_s": 1.0, "baseline": "base", "shape": "shape",
        "target": "<=1.5", "bound": 1.5, "met": False}
    with pytest.raises(ValueError, match="equally long lists"):
        record("x", [1.0, 2.0], [1.0], "base", "shape")


def test_combined_processes_take_the_median_of_the_process_ratios_and_decide_again() -> None:
    def row(ratio: float, threads: int) -> dict:
        return {"name": "x", "threads": threads, "shape": "s", "ratio": ratio, "ours_s": 2 * ratio, "baseline_s": 2.0,
                "target": "<=1.02", "bound": 1.02, "met": ratio <= 1.02, "ratio_interval": [ratio, ratio],
                "within_noise": False}

    skip = {"name": "hf", "skipped": "transformers is absent"}
    per_process = [(1.00, 1.05, 1.05), (1.08, 1.01, 1.03), (0.99, 1.04, 1.04)]
    runs = [[row(a, 1), row(b, 2), row(c, 4), skip] for a, b, c in per_process]
    one, two, four, skipped = combine_processes(runs)
    assert one["ratio"] == 1.00 and one["process_ratios"] == [1.00, 1.08, 0.99] and one["processes"] == 3
    assert one["ratio_interval"] == [0.99, 1.08] and one["interval_coverage"] == 0.75
    assert one["ours_s"] == 2.0 and one["met"] is True and one["within_noise"] is False
    assert two["ratio"] == 1.04 and two["met"] is False and two["within_noise"] is True  # one process met it
    assert four["ratio"] == 1.04 and four["met"] is False and four["within_noise"] is False  # none did
    assert skipped == skip


def test_interleaved_rounds_alternate_the_order_so_that_no_step_always_runs_first() -> None:
    calls: list[str] = []
    steps = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    times = interleaved(steps, warmup=2, reps=4, device=torch.device("cpu"))
    assert "".join(calls[:9]) == "aaabbbccc"  # warm-up: two runs and one timed run of each in turn
    assert "".join(calls[9:]) == "abc" + "cba" + "abc" + "cba"
    assert {name: len(ts) for name, ts in times.items()} == {"a": 4, "b": 4, "c": 4}
