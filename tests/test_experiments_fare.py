"""The FARE study: paired batches, variants, report verdicts computed from numbers, and a tiny end-to-end
run (results JSON, report markdown, figures, attention-diagnostic columns in metrics.csv, resume from
finished cells)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from clusterformers.contrastive import FairInfoNCELoss, FARELoss, SparseFARELoss
from clusterformers.data.colormnist import color_digits
from clusterformers.experiments import fare
from clusterformers.experiments.fare import FareConfig, build_loss, make_batch_fn, make_config, run, sweep_points
from clusterformers.experiments.fare_report import _direction, comparisons, e1_tables, flip_step
from clusterformers.report import write_report

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(**kw) -> FareConfig:
    base = dict(losses=("info_nce", "fare"), seeds=(0, 1), epochs=1, warmup_epochs=1, batch_size=64, probe_steps=5,
                dataset="digits", train_subset=256, ckpt_every_epochs=0, cost_batches=(32, 64),
                cost_losses=("fare", "sparse_fare"), cost_attributes=("gaussian", "colormnist"), cost_reps=1,
                cost_threads=1, device="cpu")
    return FareConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def digits():
    return color_digits()


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("fare")
    sections = run(tiny_config(), out)
    write_report(out, sections, header="# test\n")
    return out, sections


# ----------------------------------------------------------------------------- data pairing


def test_batches_are_deterministic_and_paired_by_seed(digits) -> None:
    train_set = digits[0]
    fn_a, spe = make_batch_fn(train_set, 64, seed=3)
    fn_b, _ = make_batch_fn(train_set, 64, seed=3)
    assert spe == len(train_set) // 64
    for step in (0, 1, spe + 2):
        a, b = fn_a(step, 0, 1), fn_b(step, 0, 1)
        assert a[3] == b[3] == step
        for x, y in zip(a[:3], b[:3]):
            assert torch.equal(x, y)
        v1, v2, sens, _ = a
        assert v1.shape == (64, 3, 32, 32) and sens.shape == (64, 3)
        assert not torch.equal(v1, v2)  # two different augmentations of the same images
        assert float(v1.min()) >= 0.0 and float(v1.max()) <= 1.0
        assert torch.equal(sens, train_set.sensitive[sens_rows(train_set, sens)])
    other, _ = make_batch_fn(train_set, 64, seed=4)
    assert not torch.equal(other(0, 0, 1)[2], fn_a(0, 0, 1)[2])
    # ranks split the global batch
    full = fn_a(5, 0, 1)
    shares = [fn_a(5, r, 2) for r in range(2)]
    assert torch.equal(full[0][0::2], shares[0][0]) and torch.equal(full[1][1::2], shares[1][1])


def sens_rows(train_set, sens):
    """Rows of the training set whose attribute equals each row of ``sens`` (the batch comes from them)."""
    return (train_set.sensitive[None] == sens[:, None]).all(-1).float().argmax(1)


def test_every_loss_sees_the_same_init_and_batches_for_a_seed(monkeypatch, tmp_path, digits) -> None:
    """run_cell wiring: for one seed, InfoNCE and FARE get bitwise the same initial encoder and batches."""
    seen: dict[tuple[str, int], tuple] = {}
    real_train = fare.train

    def recording_train(model, loss_fn, batch_fn, cfg, **kw):
        key = (kw["extra_config"]["variant"], kw["extra_config"]["seed"])
        seen[key] = ({k: v.clone() for k, v in model.state_dict().items()},
                     [batch_fn(s, 0, 1) for s in (0, 1, 4)])
        return real_train(model, loss_fn, batch_fn, cfg, **kw)

    monkeypatch.setattr(fare, "train", recording_train)
    cfg = tiny_config(probe_steps=1)
    data = (digits[0].subset(torch.arange(128)), digits[1])
    for key in ("info_nce", "fare"):
        for seed in (0, 1):
            fare.run_cell(cfg, key, seed, tmp_path / key / str(seed), torch.device("cpu"), data)
    for seed in (0, 1):
        (w_a, b_a), (w_b, b_b) = seen[("info_nce", seed)], seen[("fare", seed)]
        assert all(torch.equal(w_a[k], w_b[k]) for k in w_a)
        for x, y in zip(b_a, b_b):
            assert all(torch.equal(u, v) for u, v in zip(x[:3], y[:3]))
    assert not torch.equal(seen[("info_nce", 0)][0]["encoder.conv1.weight"],
                           seen[("info_nce", 1)][0]["encoder.conv1.weight"])
    assert not torch.equal(seen[("fare", 0)][1][0][0], seen[("fare", 1)][1][0][0])


# ----------------------------------------------------------------------------- variants and config


def test_variants_losses_and_configs(digits) -> None:
    cfg = tiny_config()
    fair = build_loss("fair_info_nce", {"k": 5}, cfg, digits[0])
    assert isinstance(fair, FairInfoNCELoss) and fair.discretizer.centers.shape == (5, 3)
    fare_loss = build_loss("fare", {"rho": 0.25}, cfg, digits[0])
    assert isinstance(fare_loss, FARELoss) and fare_loss.rho == 0.25 and len(list(fare_loss.parameters())) == 2
    sparse = build_loss("sparse_fare", {"neighbours": 1}, cfg, digits[0])
    assert isinstance(sparse, SparseFARELoss) and sparse.neighbours == 1 and sparse.n_buckets == 4
    with pytest.raises(ValueError, match="kind"):
        build_loss("simclr", {}, cfg, digits[0])
    with pytest.raises(ValueError, match="losses"):
        FareConfig(losses=("info_nce", "nope"))
    points = sweep_points()
    # the E1 defaults are the E1 cells themselves
    assert points["fare"] == ("fare", {"rho": 4.0}) and points["fair_info_nce"] == ("fair_info_nce", {"k": 10})
    assert points["cclk_lam0.001"] == ("cclk", {"lam": 1e-3}) and "sparse_fare_n_buckets16" in points
    quick, full = make_config(quick=True), make_config(quick=False, seeds=6)
    assert quick.seeds == (0, 1) and len(quick.losses) == 5 and not quick.sweeps
    assert full.seeds == tuple(range(6)) and "sparse_fare_nb1" in full.losses and full.sweeps
    assert full.cost_batches[-1] == 8192 and full.batch_size == 256
    assert quick.train_settings() != full.train_settings()


# ----------------------------------------------------------------------------- verdicts from numbers


def _cells(values: dict[str, list[tuple[float, float]]]) -> dict[str, list[dict]]:
    return {k: [{"accuracy": a, "mse": m, "r2": 1 - m / 5400, "color_var": 5400.0} for a, m in v]
            for k, v in values.items()}


def test_gates_and_orderings_are_computed_from_the_numbers() -> None:
    assert _direction(0.5, 2.0, ">").startswith("**reproduced")
    assert _direction(-2.0, -0.5, ">").startswith("**reversed")
    assert _direction(-1.0, 2.0, ">").startswith("not resolved")
    assert _direction(-1.0, 2.0, "=").startswith("**consistent") and _direction(1, 2, "=").startswith("**not")
    keys = ["info_nce", "fair_info_nce", "cclk", "fare", "sparse_fare"]
    pairs = comparisons(keys)
    assert ("fare", "info_nce", ">") in pairs and ("sparse_fare", "cclk", ">") in pairs
    assert ("fare", "cclk", "=") in pairs and len(pairs) == 7
    base = [(0.80, 40.0), (0.82, 45.0), (0.81, 42.0)]
    good = _cells({"info_nce": base,
                   **{k: [(a - 0.005, m + 10 + i) for i, (a, m) in enumerate(base)] for k in keys[1:]}})
    md, verdicts = e1_tables(good)
    assert verdicts["gate1_infonce_lowest_mse"] and verdicts["gate2_accuracy_cost"]
    assert "Gate 1" in md and "**passes**" in md
    fare_vs = next(c for c in verdicts["comparisons"] if c["a"] == "fare" and c["b"] == "info_nce")
    assert fare_vs["mse"][0] == pytest.approx(11.0) and fare_vs["accuracy"][0] == pytest.approx(-0.5)
    # CCLK keeps as much colour as InfoNCE and costs 3 points: both gates fail
    bad = dict(good)
    bad["cclk"] = [{**r, "mse": r["mse"] + (0.5 if i % 2 else -0.5), "accuracy": r["accuracy"] - 0.03}
                   for i, r in enumerate(good["info_nce"])]
    _, verdicts = e1_tables(bad)
    assert not verdicts["gate1_infonce_lowest_mse"] and not verdicts["gate2_accuracy_cost"]
    # the attention-diagnostic warning: dist_ratio > 1 on three logged rows running
    curve = {"step": [15, 30, 45, 60, 75, 90], "dist_ratio": [0.9, 1.1, 1.2, 0.95, 1.01, 1.3]}
    assert flip_step(curve) is None
    assert flip_step({**curve, "dist_ratio": [0.9, 1.1, 1.2, 1.05, 0.8, 0.8]}) == 60


# ----------------------------------------------------------------------------- end to end


def test_tiny_study_writes_results_report_and_figures(study) -> None:
    out, sections = study
    assert [s.title for s in sections] == ["FARE — five contrastive losses on ColorMNIST",
                                           "FARE — fairness/accuracy trade-off", "FARE — loss cost against batch size"]
    report = (out / "report.md").read_text()
    assert "Paired differences" in report and "paper" in report and "Gate 1" in report
    assert "Attention diagnostics" in report
    for sec in sections:
        for fig in sec.figures:
            assert (out / fig).stat().st_size > 1000
    results = json.loads((out / "results.json").read_text())
    cells = results["FARE — five contrastive losses on ColorMNIST"]["cells"]
    assert set(cells) == {"info_nce", "fare"} and all(len(v) == 2 for v in cells.values())
    for rs in cells.values():
        for r in rs:
            assert 0.0 <= r["accuracy"] <= 1.0 and r["accuracy"] > 0.15  # 10 classes; features carry digits
            assert r["mse"] > 0 and r["r2"] <= 1.0
            assert r["r2"] == pytest.approx(1 - r["mse"] / r["color_var"])
            assert r["steps"] == 4 and math.isfinite(r["final_loss"])
    for r in cells["fare"]:
        assert -1.0 <= r["d12"]["spearman"] <= 1.0 and r["d12"]["dist_ratio"] > 0
        assert r["curve"]["step"] == [4] and len(r["curve"]["dist_ratio"]) == 1
    assert "spearman" not in cells["info_nce"][0]["d12"]
    untrained = results["FARE — five contrastive losses on ColorMNIST"]["untrained"]
    assert len(untrained) == 2 and all(0 < r["accuracy"] <= 1 and r["mse"] > 0 for r in untrained)
    assert "untrained encoder" in report and "Digit accuracy change" in report
    # attention-diagnostic columns reach metrics.csv for FARE
    (metrics,) = list(out.glob("fare/e1-*/fare/seed0/metrics.csv"))
    with open(metrics) as f:
        rows = list(csv.DictReader(f))
    assert {"spearman", "dist_ratio", "entropy", "eff_support"} <= set(rows[0])
    assert float(rows[-1]["dist_ratio"]) == pytest.approx(cells["fare"][0]["d12"]["dist_ratio"])
    # E4 rows: every (attribute, loss, batch), positive times and memory, slopes reported
    cost = results["FARE — loss cost against batch size"]
    assert len(cost["rows"]) == 2 * 2 * 2
    assert all(r["time_s"] > 0 and r["peak_bytes"] > 0 and r["threads"] == 1 for r in cost["rows"])
    assert set(cost["slopes"]) == {"fare/gaussian", "fare/colormnist", "sparse_fare/gaussian",
                                   "sparse_fare/colormnist"}


def test_resume_reuses_finished_cells_and_finishes_a_checkpointed_one(study, monkeypatch) -> None:
    out, sections = study
    cells = sections[0].results["cells"]
    calls: list[tuple[str, int]] = []
    real = fare.run_cell

    def counting(cfg, key, seed, *args, **kw):
        calls.append((key, seed))
        return real(cfg, key, seed, *args, **kw)

    monkeypatch.setattr(fare, "run_cell", counting)
    monkeypatch.setattr(fare, "run_cost", lambda *a, **k: pytest.fail("the cost curve should be reused"))
    monkeypatch.setattr(fare, "run_init_cell", lambda *a, **k: pytest.fail("the untrained probes should be reused"))
    again = run(tiny_config(), out)
    assert calls == [] and again[0].results["cells"] == cells
    # a cell whose result was lost but whose finished checkpoint remains is re-probed, not retrained
    (result,) = list(out.glob("fare/e1-*/fare/seed1/result.json"))
    result.unlink()
    monkeypatch.setattr(fare, "train", _no_steps(fare.train))
    third = run(tiny_config(), out)
    assert calls == [("fare", 1)]
    redone = third[0].results["cells"]["fare"][1]
    for k in ("accuracy", "mse", "r2", "steps"):
        assert redone[k] == pytest.approx(cells["fare"][1][k])


def _no_steps(real_train):
    def wrapped(model, loss_fn, batch_fn, cfg, **kw):
        assert kw["resume"], "the finished cell must resume from its checkpoint"

        def no_batches(step, rank, world):
            raise AssertionError(f"step {step} retrained after resume")

        result = real_train(model, loss_fn, no_batches, cfg, **kw)
        assert result.finished
        return result

    return wrapped


def test_quick_config_changes_cell_directories(tmp_path: Path) -> None:
    quick = make_config(quick=True)
    other = make_config(quick=True)
    other.epochs += 1
    assert fare._hashed(tmp_path, "e1", quick.train_settings()) != fare._hashed(tmp_path, "e1",
                                                                              other.train_settings())


def test_full_mode_paths_sweeps_and_neighbours(tmp_path: Path) -> None:
    """The sweep grid (one seed) and SparseFARE neighbours=1 run end to end; sweep defaults reuse E1 cells."""
    cfg = tiny_config(losses=("info_nce", "sparse_fare_nb1", "fare"), seeds=(0,), sweeps=True, sweep_seeds=1,
                      train_subset=128, probe_steps=1, cost_batches=(32,), cost_losses=("fare",),
                      cost_attributes=("gaussian",))
    sections = run(cfg, tmp_path)
    sweeps = sections[1].results["sweeps"]
    assert set(sweeps) == set(sweep_points()) and all(len(v) == 1 for v in sweeps.values())
    assert sweeps["fare"] == sections[0].results["cells"]["fare"]  # rho = 4 is the E1 FARE cell
    assert {r[0]["steps"] for r in sweeps.values()} == {2}
    # untrained probe + info_nce + sparse_fare_nb1 + the sweep points (FARE among them, trained once)
    assert len(list(tmp_path.glob("fare/e1-*/*/seed0/result.json"))) == 3 + len(sweep_points())
    for sec in sections:
        assert all((tmp_path / f).exists() for f in sec.figures)
    assert "Knob sweeps" in sections[1].markdown and "SparseFARE-nb1 − FARE" in sections[0].markdown
