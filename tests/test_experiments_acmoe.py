"""The AC-MoE study: synthetic generator structure, helpers, and a tiny end-to-end run of every study
(results JSON, report markdown, figures, and resume from finished cells)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from clusterformers.experiments import acmoe, acmoe_lm, acmoe_synthetic, acmoe_vit
from clusterformers.experiments.acmoe import AcmoeConfig, make_config, run
from clusterformers.experiments.acmoe_common import arm_options, check_arms, fmt_steps, steps_to_reach
from clusterformers.experiments.acmoe_lm import LmStudy
from clusterformers.experiments.acmoe_synthetic import SyntheticStudy, make_task
from clusterformers.experiments.acmoe_vit import VitStudy, picture_index
from clusterformers.experiments.grid import load_cells
from clusterformers.report import write_report

ARMS = ("stablemoe", "ac")


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- synthetic data


def test_subspace_clusters_have_tight_own_features_and_cluster_maps() -> None:
    study = SyntheticStudy(sigma_loose=2.0)
    task = make_task(study, seed=3)
    K, t = study.num_clusters, study.tight_features
    assert task.own.shape == (K, t) and task.own.unique().numel() == K * t  # disjoint own features
    x, y, z = task.sample(40_000, torch.Generator().manual_seed(0))
    assert x.shape == (40_000, study.id_features + study.content_dim) and y.shape == (40_000, study.out_dim)
    ident, c = x[:, : study.id_features], x[:, study.id_features :]
    for k in range(K):
        rows = ident[z == k]
        own = task.own[k]
        others = torch.ones(study.id_features, dtype=torch.bool)
        others[own] = False
        # tight on its own features: sigma 0.2 around +-2
        torch.testing.assert_close(rows[:, own].mean(0).abs(), torch.full((t,), 2.0), atol=0.02, rtol=0)
        torch.testing.assert_close(rows[:, own].std(0), torch.full((t,), 0.2), atol=0.01, rtol=0)
        # loose everywhere else: sigma 2 around 0
        assert rows[:, others].mean(0).abs().max() < 0.2
        assert (rows[:, others].std(0) - 2.0).abs().max() < 0.12
        # y = A_z c exactly
        torch.testing.assert_close(y[z == k], c[z == k] @ task.maps[k].T)
    assert (torch.bincount(z, minlength=K) > 4000).all()
    noisy = task.corrupt(x, 0.5, torch.Generator().manual_seed(1))
    assert torch.equal(noisy[:, study.id_features :], c)  # content untouched
    assert abs(float((noisy - x)[:, : study.id_features].std()) - 0.5) < 0.01
    own = torch.zeros(x.shape[1], dtype=torch.bool)
    own[task.own.flatten()] = True
    tight = task.corrupt(x, 0.5, torch.Generator().manual_seed(1), "tight")
    loose = task.corrupt(x, 0.5, torch.Generator().manual_seed(1), "loose")
    assert torch.equal(tight[:, ~own], x[:, ~own]) and (tight[:, own] != x[:, own]).all()
    assert torch.equal(loose[:, own], x[:, own]) and torch.equal(loose[:, study.id_features :], c)
    torch.testing.assert_close(tight + loose - x, noisy)  # the same draw, split between the two feature sets
    with pytest.raises(ValueError, match="where"):
        task.corrupt(x, 0.5, torch.Generator(), "some")
    # the same seed gives the same task; another seed another one
    assert torch.equal(make_task(study, 3).maps, task.maps) and not torch.equal(make_task(study, 4).maps, task.maps)


# ----------------------------------------------------------------------------- helpers


def test_steps_arm_options_and_checks() -> None:
    assert steps_to_reach([10, 20, 30], [3.0, 2.0, 1.0], 2.0) == 20
    assert steps_to_reach([10, 20], [3.0, 2.5], 2.0) is None
    assert fmt_steps([20, None, 30], 40) == "25 (2/3 seeds)"
    assert fmt_steps([None, None], 40) == "not reached in 40 steps (0/2)"
    assert arm_options("ac", "running")["ac"]["stats"] == "running" and arm_options("ac")["ac"]["stats"] == "ema"
    assert arm_options("stablemoe", "running") == {"router": "stablemoe"}
    assert arm_options("ac")["ac"]["stats"] == "ema"  # the shared table was not modified
    assert acmoe.router("lm-byte-ac") == "ac" and acmoe.router("synthetic-ac-var") == "ac-var"
    assert acmoe.router("vit-stablemoe") == "stablemoe"
    with pytest.raises(ValueError, match="stablemoe"):
        check_arms(("smoe", "ac"))
    with pytest.raises(ValueError, match="unknown"):
        check_arms(("stablemoe", "bogus"))
    quick, full = make_config(quick=True), make_config(quick=False, seeds=6)
    assert quick.seeds == (0, 1) and full.seeds == tuple(range(6)) and full.vit_seeds == 6 and full.lm_seeds == 5
    assert full.lm.ac_stats == "running" and all(c.settings["moe"].get("ac", {}).get("stats", "running") ==
                                                 "running" for c in full.cells() if c.arm.startswith("lm-"))


def test_shared_initialisation_pairs_the_arms() -> None:
    """Every arm starts from the stablemoe weights except where its router differs."""
    study = SyntheticStudy(n_train=64, n_test=64)
    ref = acmoe_synthetic.build_model(study, "stablemoe", 0).state_dict()
    for arm in ("ac", "smoe"):
        own = acmoe_synthetic.build_model(study, arm, 0).state_dict()
        same = [k for k in own if k in ref and torch.equal(own[k], ref[k])]
        differ = sorted(set(own) - set(same))
        expected = {"ac": [k for k in own if "running" in k or "pending" in k],
                    "smoe": [k for k in own if ".router." in k]}[arm]
        assert differ == sorted(expected) and len(same) > 10


def test_routing_oracle_routes_noisy_inputs_with_the_clean_metric() -> None:
    study = SyntheticStudy(n_train=64, n_test=64)
    model = acmoe_synthetic.build_model(study, "ac", 0)
    task = make_task(study, 0)
    x, y, _ = task.sample(64, torch.Generator().manual_seed(0))
    model.train()
    model(task.sample(64, torch.Generator().manual_seed(1))[0])  # running dispersions from a training batch
    noisy = task.corrupt(x, 1.0, torch.Generator().manual_seed(2))
    plain = acmoe_synthetic.evaluate(model, noisy, y, 32, torch.device("cpu"), diagnostics=False)
    oracle = acmoe_synthetic.evaluate(model, noisy, y, 32, torch.device("cpu"), diagnostics=False, oracle_x=x)
    same = acmoe_synthetic.evaluate(model, x, y, 32, torch.device("cpu"), diagnostics=False, oracle_x=x)
    clean = acmoe_synthetic.evaluate(model, x, y, 32, torch.device("cpu"), diagnostics=False)
    assert torch.allclose(same.sq_error, clean.sq_error)  # clean routing for clean inputs: no change
    assert not torch.allclose(plain.sq_error, oracle.sq_error)  # the noisy routing did change the metric
    assert torch.equal(plain.sq_error, acmoe_synthetic.evaluate(model, noisy, y, 32, torch.device("cpu"),
                                                                diagnostics=False).sq_error)  # hooks removed
    with pytest.raises(ValueError, match="oracle"):
        acmoe_synthetic.evaluate(model, noisy, y, 32, torch.device("cpu"), oracle_x=x)


def test_picture_index_picks_one_image_per_digit() -> None:
    y = torch.tensor([3, 0, 0, 1, 3, 2])
    assert picture_index(y, 4, 6) == [1, 3, 5, 0]
    assert picture_index(y, 4, 3) == [1, 0]


# ----------------------------------------------------------------------------- end to end


def tiny_config() -> AcmoeConfig:
    return AcmoeConfig(
        SyntheticStudy(arms=(*ARMS, "ac-var"), n_train=256, n_test=128, steps=6, eval_every=3, batch_size=64,
                       eval_batch=64, noise_draws=2, noise_sigmas=(0.5, 1.0), warmup_steps=2),
        LmStudy(arms=ARMS, depth=2, dim=16, num_heads=2, num_experts=4, expert_hidden=16, byte_context=16,
                word_context=8, batch_size=4, steps=4, eval_points=2, curve_tokens=128, eval_tokens=256,
                eval_batch=8, max_vocab=200, max_chars=40_000),
        VitStudy(arms=ARMS, dim=16, num_heads=2, num_experts=4, epochs=1, batch_size=1000, eval_images=60,
                 eval_batch=30, noise_sigmas=(0.1, 0.3), attack_eps=(4,), pgd_steps=2, pgd_step_frac=0.5,
                 picture_digits=3),
        seeds=(0, 1), vit_seeds=2, lm_seeds=2, workers=1, device="cpu")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("acmoe")
    cfg = tiny_config()
    sections = run(cfg, out)
    write_report(out, sections, header="# test\n")
    return cfg, out, sections


def test_end_to_end_writes_results_report_and_figures(tiny_run) -> None:
    cfg, out, sections = tiny_run
    titles = [s.title for s in sections]
    assert titles == ["AC-MoE — claims", "AC-MoE — synthetic subspace clusters", "AC-MoE — ViT-MoE on MNIST-5k",
                      "AC-MoE — byte-level MoE LM on the Wikipedia sample",
                      "AC-MoE — word-level MoE LM on the Wikipedia sample"]
    report = (out / "report.md").read_text()
    for s in sections:
        for fig in s.figures:
            assert (out / fig).stat().st_size > 1000 and fig in report
    assert "acmoe_vit_experts.png" in report and "stablemoe" in report and "not the raw XML" in report
    assert "2 seeds decide nothing" in report and "confirmatory" in report
    results = json.loads((out / "results.json").read_text())
    # every cell: a result.json next to its checkpoint and config
    for cell in cfg.cells():
        where = cell.path(out)
        assert (where / "result.json").exists() and (where / "checkpoint.safetensors").exists()
        assert json.loads((where / "config.json").read_text())["extra"]["arm"] == acmoe.router(cell.arm)
    assert "items" not in results["AC-MoE — claims"]["cells"]["synthetic-ac"]["0"]
    cells = load_cells(out, "acmoe")
    summary = results["AC-MoE — claims"]["cells"]
    assert all(summary[f"synthetic-{arm}"][s]["steps_to_threshold"] in (3, 6, 9) for arm in ARMS for s in ("0", "1"))
    for arm in ARMS:
        for r in cells[f"synthetic-{arm}"].values():
            assert 0 < r["clean"] < 5 and 0 < r["noisy_all_0.5"] < 5 and r["test_mse"] == r["clean"]
            assert len(r["items"]["noisy_tight_1"]) == 128 and r["curve_steps"] == [3, 6]
            assert len(r["purity"]) == 3 and all(1 / 8 <= p <= 1 for p in r["purity"])
            assert r["purity_last"] == r["purity"][-1] and all(0 <= f <= 1 for f in r["flip_top1"])
    assert "oracle_all_0.5" in cells["synthetic-ac"][0] and "oracle_all_0.5" not in cells["synthetic-stablemoe"][0]
    ac_r, st_r = cells["synthetic-ac"][0], cells["synthetic-stablemoe"][0]
    assert ac_r["dispersion_mh"] != ac_r["dispersion_h"] and st_r["dispersion_mh"] == st_r["dispersion_h"]
    assert "variance instead of MAD" in report and "Degradation under noise" in report
    for arm in ARMS:
        for r in cells[f"lm-byte-{arm}"].values():  # barely trained: near the uniform 8 bits per byte
            assert 4 < r["test_loss"] / math.log(2) < 8.5 and len(r["curve"]) == 2
            assert r["test_loss"] == pytest.approx(sum(r["items"]["nll"]) / len(r["items"]["nll"]), rel=1e-4)
        for r in cells[f"lm-word-{arm}"].values():
            assert math.log(50) < r["test_loss"] < math.log(400) and r["swap_loss"] > 0
        for r in cells[f"vit-{arm}"].values():
            assert 0 <= r["clean"] <= 1 and {"noise0.1", "noise0.3", "pgd_e4", "pgd_mean"} <= set(r["items"])
            assert len(r["picture"]["experts"]) == len(r["picture"]["index"]) == 3
            assert all(len(row) == 16 and all(0 <= e < 4 for e in row) for row in r["picture"]["experts"])
    verdicts = {v["claim"]: v for v in results["AC-MoE — claims"]["verdicts"]}
    assert [k for k, v in verdicts.items() if v["confirmatory"]] == ["converge", "robust", "specialise", "vit-pgd",
                                                                     "lm-byte"]
    assert {"oracle", "var", "lm-word", "robust-tight1"} <= set(verdicts)
    oracle = verdicts["oracle"]
    expected = [cells["synthetic-ac"][s]["oracle_all_0.5"] - cells["synthetic-ac"][s]["noisy_all_0.5"]
                for s in (0, 1)]
    assert oracle["mean"] == pytest.approx(sum(expected) / 2, abs=1e-5)  # items: 5 significant digits


def test_resume_reuses_finished_cells(tiny_run, monkeypatch) -> None:
    cfg, out, sections = tiny_run

    def refuse(*args, **kwargs):
        raise AssertionError("a finished cell was recomputed")

    for module in (acmoe_synthetic, acmoe_lm, acmoe_vit):
        monkeypatch.setattr(module, "run_cell", refuse)
    again = run(cfg, out)
    assert again[0].results == sections[0].results
    # a new seed is the only thing computed
    computed = []
    first = load_cells(out, "acmoe")

    def fake(study, arm, seed, d, dev):
        computed.append((arm, seed))
        return {**first[f"synthetic-{arm}"][0]}

    monkeypatch.setattr(acmoe_synthetic, "run_cell", fake)
    cfg.studies = ("synthetic",)
    cfg.seeds = (0, 1, 2)
    run(cfg, out)
    assert computed == [(arm, 2) for arm in (*ARMS, "ac-var")]
    # other settings: other directories, nothing reused
    computed.clear()
    cfg.synthetic.steps += 1
    run(cfg, out)
    assert len(computed) == 3 * 3 and len(list((out / "acmoe").glob("synthetic-ac-var-*"))) == 2
