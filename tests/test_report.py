"""Paired statistics and verdicts of the report against hand-computed values."""

import math

import pytest

from clusterformers.report import fmt, mean_std, paired_diff, verdict


def test_mean_std_and_fmt() -> None:
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_std([5.0]) == (5.0, 0.0)
    assert fmt([0.5, 0.7], 1, 100) == "60.0 ± 14.1"


def test_paired_diff_matches_t_interval() -> None:
    a, b = [3.0, 4.0, 6.0], [1.0, 1.0, 2.0]  # differences 2, 3, 4: mean 3, sd 1
    m, lo, hi = paired_diff(a, b)
    half = 4.303 * 1.0 / math.sqrt(3)
    assert m == pytest.approx(3.0) and lo == pytest.approx(3 - half) and hi == pytest.approx(3 + half)
    assert paired_diff([1.0], [0.0])[1:] == (-math.inf, math.inf)
    with pytest.raises(ValueError, match="equal-length"):
        paired_diff([1.0], [1.0, 2.0])


def test_verdict_words() -> None:
    up, down = [2.0, 2.1, 2.2], [1.0, 1.0, 1.0]
    assert "**reproduces**" in verdict(up, down, higher_is_better=True, claim="x")
    assert "**contradicted**" in verdict(up, down, higher_is_better=False, claim="x")
    assert "not resolved" in verdict([1.0, 2.0, 0.0], [1.0, 1.0, 1.0], higher_is_better=True, claim="x")
