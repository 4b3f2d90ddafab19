"""The FARE study: paired batches, losses, the validation stages choosing from numbers, and a tiny end-to-end
run (results JSON with per-item probes, report with verdicts, figures, attention-diagnostic columns in
metrics.csv, resume from finished cells, settings-hashed cells)."""

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
from clusterformers.experiments.fare import FareConfig, build_loss, make_batch_fn, make_config, run, trained_cell
from clusterformers.experiments.fare_report import claims, flip_step
from clusterformers.experiments.grid import Cell, load_cells
from clusterformers.report import write_report

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(**kw) -> FareConfig:
    base = dict(arms=("info_nce", "fare"), seeds=(0, 1), tune_seeds=(7,), epochs=1, warmup_epochs=1, batch_size=256,
                probe_steps=5, dataset="digits", val_size=300, regimes={"mild": (1e-3, 0.5)}, rhos=(0.25,),
                cost_batches=(32, 64), cost_losses=("fare", "sparse_fare"), cost_attributes=("gaussian", "colormnist"),
                cost_reps=1, cost_threads=1, workers=1, device="cpu")
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


def test_every_loss_sees_the_same_init_and_batches_for_a_seed(monkeypatch, tmp_path) -> None:
    """run_cell wiring: for one seed, InfoNCE and FARE get bitwise the same initial encoder and batches."""
    seen: dict[tuple[str, int], tuple] = {}
    real_train = fare.train

    def recording_train(model, loss_fn, batch_fn, cfg, **kw):
        cell = kw["extra_config"]["cell"]
        seen[(cell["arm"], cell["seed"])] = ({k: v.clone() for k, v in model.state_dict().items()},
                                             [batch_fn(s, 0, 1) for s in (0, 1, 4)])
        return real_train(model, loss_fn, batch_fn, cfg, **kw)

    monkeypatch.setattr(fare, "train", recording_train)
    cfg = tiny_config(probe_steps=1)
    for arm in ("info_nce", "fare"):
        for seed in (0, 1):
            cell = trained_cell(cfg, arm, seed, "val", "mild", 0.25 if arm == "fare" else None)
            fare.run_cell(cell, cell.path(tmp_path))
    for seed in (0, 1):
        (w_a, b_a), (w_b, b_b) = seen[("info_nce", seed)], seen[("fare", seed)]
        assert all(torch.equal(w_a[k], w_b[k]) for k in w_a)
        for x, y in zip(b_a, b_b):
            assert all(torch.equal(u, v) for u, v in zip(x[:3], y[:3]))
    assert not torch.equal(seen[("info_nce", 0)][0]["encoder.conv1.weight"],
                           seen[("info_nce", 1)][0]["encoder.conv1.weight"])
    assert not torch.equal(seen[("fare", 0)][1][0][0], seen[("fare", 1)][1][0][0])


def test_validation_split_is_cut_from_train_and_never_touches_test() -> None:
    train_all, test = fare.load_data("digits", None, "test", 300)
    train_val, val = fare.load_data("digits", None, "val", 300)
    assert len(val) == 300 and len(train_val) + len(val) == len(train_all)
    # a partition of the training images (as multisets of rows), not touching the test images
    rows = torch.cat([train_val.images, val.images]).flatten(1)
    assert torch.equal(rows.sort(0).values, train_all.images.flatten(1).sort(0).values)
    # stratified: every digit keeps its share in the validation images (the training images are digit-sorted)
    share = torch.bincount(val.labels, minlength=10).double() / 300
    assert torch.allclose(share, torch.bincount(train_all.labels, minlength=10).double() / len(train_all), atol=0.01)
    with pytest.raises(ValueError, match="split"):
        fare.load_data("digits", None, "train", 300)
    with pytest.raises(ValueError, match="val_size"):
        fare.load_data("digits", None, "val", len(train_all))
    assert test.images.shape[0] != val.images.shape[0]


# ----------------------------------------------------------------------------- losses and config


def test_losses_and_configs(digits) -> None:
    fair = build_loss("fair_info_nce", {"k": 5}, 0.1, digits[0])
    assert isinstance(fair, FairInfoNCELoss) and fair.discretizer.centers.shape == (5, 3)
    fare_loss = build_loss("fare", {"rho": 0.25}, 0.1, digits[0])
    assert isinstance(fare_loss, FARELoss) and fare_loss.rho == 0.25 and len(list(fare_loss.parameters())) == 2
    sparse = build_loss("sparse_fare", {"neighbours": 1, "n_buckets": 4}, 0.1, digits[0])
    assert isinstance(sparse, SparseFARELoss) and sparse.lsh.neighbours == 1 and sparse.lsh.n_buckets == 4
    with pytest.raises(ValueError, match="kind"):
        build_loss("simclr", {}, 0.1, digits[0])
    with pytest.raises(ValueError, match="arms"):
        FareConfig(arms=("info_nce", "nope"))
    with pytest.raises(ValueError, match="info_nce"):
        FareConfig(arms=("fare",))
    quick, full = make_config(quick=True), make_config(quick=False, seeds=6)
    assert quick.seeds == (0, 1) and len(quick.arms) == 5 and len(quick.regimes) == 1 and quick.rhos == (0.25,)
    assert full.seeds == tuple(range(6)) and "sparse_fare_nb1" in full.arms and len(full.regimes) == 3
    assert full.cost_batches[-1] == 8192 and full.batch_size == 256 and 4.0 in full.rhos
    assert not set(full.tune_seeds) & set(full.seeds)  # settings are chosen on seeds the study does not use


def test_quick_and_full_cells_never_share_a_directory(tmp_path: Path) -> None:
    quick, other = make_config(quick=True), make_config(quick=True)
    other.epochs += 1
    a = trained_cell(quick, "fare", 0, "test", "mild-crops", 0.25)
    b = trained_cell(other, "fare", 0, "test", "mild-crops", 0.25)
    c = trained_cell(quick, "fare", 0, "test", "mild-crops", 1.0)
    assert len({a.path(tmp_path), b.path(tmp_path), c.path(tmp_path)}) == 3
    assert a.path(tmp_path).parent == trained_cell(quick, "fare", 1, "test", "mild-crops", 0.25).path(tmp_path).parent


# ----------------------------------------------------------------------------- choosing settings from numbers


def _fake_grid(values: dict[str, tuple[float, float]]):
    """A ``run_grid`` stand-in: every cell of arm ``a`` gets ``(accuracy, mse) = values[a]``."""
    def grid(cells, run_cell, root, **kw):
        return {c: {"accuracy": values[c.arm][0], "mse": values[c.arm][1]} for c in cells}
    return grid


def test_regime_and_rho_are_chosen_from_validation_numbers(monkeypatch, tmp_path) -> None:
    cfg = tiny_config(arms=("info_nce", "fare", "sparse_fare"), regimes={"a": (1e-3, 0.08), "b": (1e-4, 0.5)},
                      rhos=(0.25, 1.0, 4.0), tune_seeds=(7, 8))
    monkeypatch.setattr(fare, "run_grid", _fake_grid({"val-regime-a": (0.80, 40.0), "val-regime-b": (0.85, 45.0)}))
    regime, table = fare.choose_regime(cfg, tmp_path)
    assert regime == "b" and table["a"]["accuracy"] == pytest.approx(0.80) and table["b"]["seeds"] == 2
    values = {"val-regime-b": (0.85, 45.0),
              "val-fare-rho0.25": (0.80, 70.0),  # most colour removed, but 5 points less accurate: not eligible
              "val-fare-rho1": (0.84, 60.0), "val-fare-rho4": (0.86, 46.0),
              "val-sparse_fare-rho0.25": (0.70, 80.0), "val-sparse_fare-rho1": (0.78, 50.0),
              "val-sparse_fare-rho4": (0.79, 48.0)}
    monkeypatch.setattr(fare, "run_grid", _fake_grid(values))
    rho, table = fare.choose_rho(cfg, "b", tmp_path)
    assert rho["fare"] == 1.0  # within 2 points of InfoNCE, highest MSE
    assert rho["sparse_fare"] == 4.0  # none within 2 points: the most accurate
    assert table["info_nce"]["accuracy"] == pytest.approx(0.85)
    # one candidate: no validation cells at all
    monkeypatch.setattr(fare, "run_grid", lambda *a, **k: pytest.fail("no stage with one candidate"))
    assert fare.choose_regime(tiny_config(), tmp_path) == ("mild", {})
    assert fare.choose_rho(tiny_config(), "mild", tmp_path) == ({"fare": 0.25}, {})


def test_claims_are_declared_for_the_arms_that_ran() -> None:
    every = claims(["init", *fare.ARMS])
    confirmatory = [c.name for c in every if c.confirmatory]
    assert confirmatory == ["fair_info_nce-mse", "cclk-mse", "fare-mse", "sparse_fare-mse", "fare-acc"]
    assert all(c.direction == 1 for c in every if c.metric == "sq_error")
    few = claims(["info_nce", "fare"])
    assert [c.name for c in few] == ["fare-mse", "fare-acc"]


def test_attention_flip_step() -> None:
    curve = {"step": [15, 30, 45, 60, 75, 90], "dist_ratio": [0.9, 1.1, 1.2, 0.95, 1.01, 1.3]}
    assert flip_step(curve) is None
    assert flip_step({**curve, "dist_ratio": [0.9, 1.1, 1.2, 1.05, 0.8, 0.8]}) == 60


# ----------------------------------------------------------------------------- end to end


def test_tiny_study_writes_results_report_and_figures(study) -> None:
    out, sections = study
    assert [s.title for s in sections] == ["FARE — fair contrastive losses on ColorMNIST",
                                           "FARE — fairness/accuracy trade-off", "FARE — loss cost against batch size"]
    report = (out / "report.md").read_text()
    assert "### Claims" in report and "confirmatory" in report and "paper" in report
    assert "2 seeds decide nothing" in report and "**reproduced**" not in report
    assert "Attention diagnostics" in report and "untrained encoder" in report
    for sec in sections:
        for fig in sec.figures:
            assert (out / fig).stat().st_size > 1000
    results = json.loads((out / "results.json").read_text())
    main = results["FARE — fair contrastive losses on ColorMNIST"]
    assert set(main["cells"]) == {"init", "info_nce", "fare"} and "items" not in main["cells"]["fare"]["0"]
    cells = {arm: cs for arm, cs in load_cells(out, "fare").items() if arm in main["cells"]}
    assert all(set(v) == {0, 1} for v in cells.values())
    n_test = len(color_digits()[1])
    for rs in cells.values():
        for r in rs.values():
            assert 0.0 <= r["accuracy"] <= 1.0 and r["accuracy"] > 0.15  # 10 classes; features carry digits
            assert r["mse"] > 0 and r["r2"] <= 1.0
            assert r["r2"] == pytest.approx(1 - r["mse"] / r["color_var"])
            items = r["items"]
            assert len(items["correct"]) == len(items["sq_error"]) == n_test
            assert sum(items["correct"]) / n_test == pytest.approx(r["accuracy"])
            assert sum(items["sq_error"]) / n_test == pytest.approx(r["mse"])
    for r in (cells["info_nce"][0], cells["fare"][1]):
        assert r["steps"] == (len(color_digits()[0]) // 256) and math.isfinite(r["final_loss"])
    for r in cells["fare"].values():
        assert -1.0 <= r["d12"]["spearman"] <= 1.0 and r["d12"]["dist_ratio"] > 0
    assert "spearman" not in cells["info_nce"][0]["d12"]
    verdicts = {v["claim"]: v for v in main["verdicts"]}
    assert set(verdicts) == {"fare-mse", "fare-acc", "info_nce-acc-vs-init", "fare-acc-vs-init"}
    assert all(v["verdict"] == "not resolved" for v in verdicts.values())
    fare_mse = [cells["fare"][s]["mse"] - cells["info_nce"][s]["mse"] for s in (0, 1)]
    assert verdicts["fare-mse"]["mean"] == pytest.approx(sum(fare_mse) / 2)
    # attention-diagnostic columns reach metrics.csv for FARE
    (metrics,) = list(out.glob("fare/fare-*/seed0/metrics.csv"))
    with open(metrics) as f:
        rows = list(csv.DictReader(f))
    assert {"spearman", "dist_ratio", "entropy", "eff_support"} <= set(rows[0])
    assert float(rows[-1]["dist_ratio"]) == pytest.approx(cells["fare"][0]["d12"]["dist_ratio"])
    # cost rows: every (attribute, loss, batch), positive times and memory, slopes reported
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

    def counting(cell: Cell, cell_dir: Path) -> dict:
        calls.append((cell.arm, cell.seed))
        return real(cell, cell_dir)

    monkeypatch.setattr(fare, "run_cell", counting)
    again = run(tiny_config(), out)
    assert calls == [] and again[0].results["cells"] == cells
    # a cell whose result was lost but whose finished checkpoint remains is re-probed, not retrained
    (result,) = list(out.glob("fare/fare-*/seed1/result.json"))
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
