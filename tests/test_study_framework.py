"""The study framework: settings-hashed cells, the resumable grid runner (in-process and in worker
processes), and the statistics behind every verdict (crossed bootstrap, t intervals, Holm, the verdict words)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from clusterformers.experiments.claims import (
    MIN_SEEDS,
    Claim,
    bootstrap,
    decide,
    holm,
    metric_matrix,
    paired_effect,
    verdict_table,
)
from clusterformers.experiments.grid import Cell, load_result, run_grid


def square(cell: Cell, cell_dir: Path) -> dict:
    """A cell function importable by worker processes; records its process id."""
    if cell.settings.get("fail") == cell.seed:
        raise ValueError(f"seed {cell.seed} is broken")
    (cell_dir / "ran").write_text(str(os.getpid()))
    return {"value": cell.seed**2 * cell.settings["scale"], "pid": os.getpid()}


# ----------------------------------------------------------------------------- cells


def test_cell_directories_hash_the_settings_not_the_seed(tmp_path: Path) -> None:
    a0, a1 = Cell("s", "arm", 0, {"x": 1, "y": [1, 2]}), Cell("s", "arm", 1, {"y": [1, 2], "x": 1})
    assert a0.path(tmp_path).parent == a1.path(tmp_path).parent  # key order does not matter
    assert a0.path(tmp_path).name == "seed0" and a0.path(tmp_path).parent.name.startswith("arm-")
    changed = [Cell("s", "arm", 0, {"x": 2, "y": [1, 2]}), Cell("s", "other", 0, {"x": 1, "y": [1, 2]}),
               Cell("t", "arm", 0, {"x": 1, "y": [1, 2]}), Cell("s", "arm", 0, {"x": 1, "y": [2, 1]})]
    assert len({c.path(tmp_path).parent for c in [a0, *changed]}) == 5
    assert a0 == Cell("s", "arm", 0, {"y": [1, 2], "x": 1}) and a0 != changed[0]
    assert len({a0, Cell("s", "arm", 0, {"y": [1, 2], "x": 1})}) == 1


def test_grid_runs_missing_cells_only_and_in_worker_processes(tmp_path: Path) -> None:
    cells = [Cell("s", "arm", seed, {"scale": 3}) for seed in range(4)]
    first = run_grid(cells[:1], square, tmp_path, workers=1)
    assert first[cells[0]]["value"] == 0 and first[cells[0]]["pid"] == os.getpid()
    done = run_grid(cells + cells[:2], square, tmp_path, workers=2)  # duplicates run once
    assert [done[c]["value"] for c in cells] == [0, 3, 12, 27]
    assert done[cells[0]]["pid"] == os.getpid()  # reused, not rerun
    assert {done[c]["pid"] for c in cells[1:]} - {os.getpid()}, "the other cells ran in worker processes"
    saved = json.loads((cells[2].path(tmp_path) / "cell.json").read_text())
    assert saved == {"study": "s", "arm": "arm", "seed": 2, "settings": {"scale": 3}}
    assert load_result(cells[3], tmp_path)["value"] == 27 and done[cells[3]]["cell_wall_s"] >= 0
    again = run_grid(cells, square, tmp_path, workers=2)
    assert again == done


def test_a_failing_cell_names_itself_and_keeps_the_finished_ones(tmp_path: Path) -> None:
    cells = [Cell("s", "arm", seed, {"scale": 1, "fail": 2}) for seed in range(3)]
    for workers in (1, 2):
        with pytest.raises((RuntimeError, ValueError), match="seed 2"):
            run_grid(cells, square, tmp_path / str(workers), workers=workers)
        assert load_result(cells[2], tmp_path / str(workers)) is None
    assert load_result(cells[0], tmp_path / "1")["value"] == 0 and load_result(cells[1], tmp_path / "1")
    broken = cells[0].path(tmp_path / "1") / "result.json"
    broken.write_text("{")
    with pytest.raises(ValueError, match="delete it to rerun"):
        load_result(cells[0], tmp_path / "1")


# ----------------------------------------------------------------------------- statistics


def test_bootstrap_standard_error_matches_the_crossed_variance() -> None:
    """d[s, i] = seed effect + item effect + noise: the bootstrap SE must cover all three terms."""
    rng = np.random.default_rng(0)
    s, n = 8, 400
    d = 0.5 + rng.normal(0, 1.0, (s, 1)) + rng.normal(0, 2.0, (1, n)) + rng.normal(0, 1.0, (s, n))
    se = bootstrap(d, n_boot=4000).std(ddof=1)
    # the analytic two-way estimate from the same data: the seed term (with the small-sample correction the
    # bootstrap applies) plus the item term
    analytic = np.sqrt(d.mean(1).var(ddof=1) / s + d.mean(0).var(ddof=0) / n)
    assert se == pytest.approx(analytic, rel=0.1)
    # items alone (one seed's worth of variance is not the whole story): dropping the item term shrinks it
    seeds_only = bootstrap(d.mean(1, keepdims=True), n_boot=4000).std(ddof=1)
    assert seeds_only < se
    with pytest.raises(ValueError, match="seeds >= 2"):
        bootstrap(d[:1])
    with pytest.raises(ValueError, match="NaN"):
        bootstrap(np.full((3, 2), np.nan))


def test_intervals_cover_a_null_effect_at_about_the_nominal_rate() -> None:
    rng = np.random.default_rng(1)
    covered, rejected = 0, 0
    trials = 200
    for _ in range(trials):
        a = rng.normal(0, 1, (6, 1)) + rng.normal(0, 1, (1, 50)) + rng.normal(0, 1, (6, 50))
        b = a + rng.normal(0, 0.5, (6, 1)) + rng.normal(0, 0.5, (6, 50))
        e = paired_effect(a, b, n_boot=500)
        covered += e.lo <= 0 <= e.hi
        rejected += e.p < 0.05
    assert covered / trials >= 0.9 and rejected / trials <= 0.1
    # and a real effect is found (negative control of the test above)
    a = rng.normal(0, 1, (6, 50))
    e = paired_effect(a + 1.0, a + rng.normal(0, 0.5, (6, 50)), n_boot=500)
    assert e.lo > 0 and e.p < 1e-3 and e.mean == pytest.approx(1.0, abs=0.2)


def test_holm_matches_a_hand_computed_example() -> None:
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5]) == [0.5] and holm([]) == []
    assert holm([0.9, 0.8]) == pytest.approx([1.0, 1.0])


def _arms(effect: float, seeds: int = 6, items: int = 40, spread: float = 0.2) -> dict:
    rng = np.random.default_rng(2)
    base = rng.normal(0, 1, (seeds, items))
    other = base + effect + rng.normal(0, spread, (seeds, items))
    return {"b": {s: {"items": {"m": base[s].tolist()}, "scalar": float(base[s].mean())} for s in range(seeds)},
            "a": {s: {"items": {"m": other[s].tolist()}, "scalar": float(other[s].mean())} for s in range(seeds)}}


def test_verdict_words_follow_the_numbers() -> None:
    up = Claim("up", "a beats b", "a", "b", "m", 1)
    down = Claim("down", "a is below b", "a", "b", "m", -1)
    tie = Claim("tie", "a matches b", "a", "b", "m", 0, margin=0.5)
    words = {v.claim.name: v.verdict for v in decide([up, down, tie], _arms(1.0))}
    assert words == {"up": "reproduced", "down": "contradicted", "tie": "contradicted"}
    words = {v.claim.name: v.verdict for v in decide([up, down, tie], _arms(0.0))}
    assert words == {"up": "not resolved", "down": "not resolved", "tie": "reproduced"}
    few = decide([up], _arms(1.0, seeds=MIN_SEEDS - 1))
    assert few[0].verdict == "not resolved" and "decide nothing" in verdict_table(few)
    # a per-cell metric (one value per seed) works the same way
    (scalar,) = decide([Claim("s", "scalar", "a", "b", "scalar", 1)], _arms(1.0))
    assert scalar.verdict == "reproduced" and scalar.effect.items == 1


def test_holm_runs_over_confirmatory_claims_only() -> None:
    arms = _arms(0.08, spread=0.3)
    confirm = [Claim(f"c{i}", "x", "a", "b", "m", 1) for i in range(4)]
    explore = [Claim("e", "x", "a", "b", "m", 1, confirmatory=False)]
    verdicts = decide(confirm + explore, arms)
    raw = verdicts[0].effect.p
    assert all(v.p_adjusted == pytest.approx(min(1.0, 4 * raw)) for v in verdicts[:4])
    assert verdicts[4].p_adjusted == pytest.approx(raw)
    assert "exploratory" in verdict_table(verdicts) and "confirmatory" in verdict_table(verdicts)
    with pytest.raises(KeyError, match="arms"):
        decide([Claim("x", "x", "a", "missing", "m", 1)], arms)
    with pytest.raises(KeyError, match="missing"):
        metric_matrix(arms["a"], "missing")
    with pytest.raises(ValueError, match="margin"):
        Claim("bad", "x", "a", "b", "m", 0)


def test_compact_items_and_results_without_them(tmp_path: Path) -> None:
    import torch

    from clusterformers.experiments.claims import compact, without_items
    from clusterformers.experiments.grid import load_cells

    assert compact(torch.tensor([True, False])) == [1, 0] and compact([0.0, 1.0, 1.0]) == [0, 1, 1]
    assert compact(torch.tensor([0.123456789, 2.0])) == [0.12346, 2.0]
    arms = {"a": {0: {"x": 1.0, "items": {"m": [1, 0]}}}}
    assert without_items(arms) == {"a": {0: {"x": 1.0}}} and "items" in arms["a"][0]
    cells = [Cell("s", "arm", seed, {"scale": 2}) for seed in range(2)]
    run_grid(cells, square, tmp_path, workers=1)
    loaded = load_cells(tmp_path, "s")
    assert set(loaded) == {"arm"} and loaded["arm"][1]["value"] == 2 and set(loaded["arm"]) == {0, 1}


def test_elliptical_quick_cells_are_never_reused_as_full_ones(tmp_path: Path) -> None:
    """The bug this framework fixed: the elliptical study cached cells at ``vit/<variant>/seed<s>`` without the
    settings, so ``make demo`` followed by a full run reported the quick 6-epoch cells as full results. Quick
    and full cells of the same arm and seed now live in different directories, and a quick run's finished
    cell is not found by the full run."""
    from clusterformers.experiments import elliptical
    from clusterformers.experiments.grid import load_result

    quick, full = elliptical.make_config(quick=True), elliptical.make_config(quick=False)
    q = {(c.arm, c.seed): c for c in quick.cells()}
    f = {(c.arm, c.seed): c for c in full.cells()}
    shared = q.keys() & f.keys()
    assert ("vit-softmax", 0) in shared and ("lm-elliptical", 1) in shared
    for key in shared:
        assert q[key].path(tmp_path) != f[key].path(tmp_path), key
    cell = q[("vit-softmax", 0)]
    cell.path(tmp_path).mkdir(parents=True)
    (cell.path(tmp_path) / "result.json").write_text('{"clean": 0.5}')
    assert load_result(cell, tmp_path) is not None  # the negative control: the quick cell itself is found
    assert load_result(f[("vit-softmax", 0)], tmp_path) is None
