"""Summaries of the report against hand-computed values."""

from clusterformers.report import fmt, mean_std


def test_mean_std_and_fmt() -> None:
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_std([5.0]) == (5.0, 0.0)
    assert fmt([0.5, 0.7], 1, 100) == "60.0 ± 14.1"


def test_smoke_run_is_set_beside_the_committed_results(tmp_path) -> None:
    import json

    from clusterformers.report import Section, beside_committed

    def verdict(claim: str, mean: float, seeds: int, word: str) -> dict:
        return {"claim": claim, "text": f"text of {claim}", "confirmatory": claim == "a", "mean": mean,
                "lo": mean - 1, "hi": mean + 1, "seeds": seeds, "verdict": word}

    smoke = [Section("s", "", [], {"verdicts": [verdict("a", 0.5, 2, "not resolved"),
                                                verdict("new", 1.0, 2, "not resolved")]})]
    assert beside_committed("fare", smoke, tmp_path) is None  # nothing committed
    (tmp_path / "fare").mkdir()
    (tmp_path / "fare" / "results.json").write_text(json.dumps(
        {"FARE": {"verdicts": [verdict("a", 3.0, 8, "reproduced")]}, "cost": {"rows": []}}))
    sec = beside_committed("fare", smoke, tmp_path)
    assert "decides no claim" in sec.markdown and "results/fare/report.md" in sec.markdown
    rows = [line for line in sec.markdown.splitlines() if line.startswith("| text of")]
    assert rows[0] == ("| text of a | confirmatory | +0.5 (2 seeds) | +3 [+2, +4] (8 seeds) | **reproduced** |")
    assert rows[1].endswith("| – | not in the committed run |")
