"""The benchmarks' ratio rows: paired round ratios and the order-statistic interval of their median."""

from __future__ import annotations

import math
import random

import pytest

from clusterformers.bench.common import median_interval, record


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
        "target": "<=1.5", "met": False}
    with pytest.raises(ValueError, match="equally long lists"):
        record("x", [1.0, 2.0], [1.0], "base", "shape")
