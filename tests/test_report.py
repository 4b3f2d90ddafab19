"""Summaries of the report against hand-computed values."""

from clusterformers.report import fmt, mean_std


def test_mean_std_and_fmt() -> None:
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_std([5.0]) == (5.0, 0.0)
    assert fmt([0.5, 0.7], 1, 100) == "60.0 ± 14.1"
