"""The AC-MoE study: synthetic generator structure, helpers, and a tiny end-to-end run of every study
(results JSON, report markdown, figures, and resume from finished cells)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from clusterformers.experiments import acmoe, acmoe_lm, acmoe_synthetic, acmoe_vit
from clusterformers.experiments.acmoe import AcmoeConfig, make_config, run
from clusterformers.experiments.acmoe_common import ac_stats, check_arms, fmt_steps, steps_to_reach, verdict
from clusterformers.experiments.acmoe_lm import LmStudy
from clusterformers.experiments.acmoe_synthetic import SyntheticStudy, make_task
from clusterformers.experiments.acmoe_vit import VitStudy, picture_index
from clusterformers.moe import AdaptiveMetric
from clusterformers.report import write_report

ARMS = ("smoe", "stablemoe", "ac")


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- synthetic data


def test_subspace_clusters_have_tight_own_features_and_cluster_maps() -> None:
    study = SyntheticStudy()
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
    # the same seed gives the same task; another seed another one
    assert torch.equal(make_task(study, 3).maps, task.maps) and not torch.equal(make_task(study, 4).maps, task.maps)


# ----------------------------------------------------------------------------- helpers


def test_steps_verdicts_and_arm_checks() -> None:
    assert steps_to_reach([10, 20, 30], [3.0, 2.0, 1.0], 2.0) == 20
    assert steps_to_reach([10, 20], [3.0, 2.5], 2.0) is None
    assert fmt_steps([20, None, 30], 40) == "25 (2/3 seeds)"
    assert fmt_steps([None, None], 40) == "not reached in 40 steps (0/2)"
    assert verdict([1.0, 1.1, 1.2], [2.0, 2.1, 2.25], lower_is_better=True) == "**holds**"
    assert verdict([1.0, 1.1, 1.2], [2.0, 2.1, 2.25], lower_is_better=False).startswith("**does not hold**")
    assert verdict([1.0, 2.0], [1.5, 1.4], lower_is_better=True).startswith("not significant")
    assert acmoe._convergence_words(2, 0, 0).startswith("**holds**")
    assert acmoe._convergence_words(0, 1, 1).startswith("mixed")
    cells = [{"curve_steps": [1, 2, 3], "curve": v} for v in ([3, 1, 1], [3, 3, 1])]
    base = [{"curve_steps": [1, 2, 3], "curve": v} for v in ([3, 2, 1.5], [3, 3, 1])]
    assert acmoe._race(cells, base, lambda b: b["curve"][-1]) == (1, 0, 1)
    with pytest.raises(ValueError, match="stablemoe"):
        check_arms(("smoe", "ac"))
    with pytest.raises(ValueError, match="unknown"):
        check_arms(("stablemoe", "bogus"))
    quick, full = make_config(quick=True), make_config(quick=False, seeds=6)
    assert quick.seeds == (0, 1) and full.seeds == tuple(range(6))
    assert all(s.arms == ARMS for s in (quick.synthetic, quick.lm, quick.vit))
    assert full.synthetic.steps == 1000 and full.lm.steps == 3000 and full.vit.epochs == 30
    assert {"xmoe", "ac-var", "ac-global"} <= set(full.synthetic.arms) and "ac-swin" in full.vit.arms


def test_ac_stats_switches_between_batch_and_running_statistics() -> None:
    study = SyntheticStudy(n_train=64, n_test=64)
    model = acmoe_synthetic.build_model(study, "ac", 0)
    x, _, _ = make_task(study, 0).sample(64, torch.Generator().manual_seed(0))
    other, _, _ = make_task(study, 0).sample(64, torch.Generator().manual_seed(1))
    model.train()
    model(other)  # a training forward on another batch fills the running dispersions
    model.eval()
    metrics = [m for m in model.modules() if isinstance(m, AdaptiveMetric)]
    with torch.no_grad():
        ema = model(x)
        with ac_stats(model, "batch"):
            assert all(m.config.stats == "batch" for m in metrics)
            batch = model(x)
            assert torch.equal(batch, model(x))
    assert all(m.config.stats == "ema" for m in metrics)  # restored
    assert not torch.allclose(ema, batch)
    batch_arm = {"router": "ac", "ac": {"preset": "lm", "stats": "batch"}}
    batch_only = acmoe_synthetic.ResidualMoENet(104, 4, 16, 2, 4, 2, 8, batch_arm)
    with pytest.raises(ValueError, match="stats='ema'"), ac_stats(batch_only, "ema"):
        pass
    stable = acmoe_synthetic.build_model(study, "stablemoe", 0)
    with ac_stats(stable, "ema"):  # no AC layers: nothing to switch
        pass
    # shared initialisation: every arm starts from the stablemoe weights except where its router differs
    ref = stable.state_dict()
    for arm in ("ac", "smoe"):
        own = acmoe_synthetic.build_model(study, arm, 0).state_dict()
        same = [k for k in own if k in ref and torch.equal(own[k], ref[k])]
        differ = sorted(set(own) - set(same))
        expected = {"ac": [k for k in own if "running" in k or "pending" in k],
                    "smoe": [k for k in own if ".router." in k]}[arm]
        assert differ == sorted(expected) and len(same) > 10


def test_picture_index_picks_one_image_per_digit() -> None:
    y = torch.tensor([3, 0, 0, 1, 3, 2])
    assert picture_index(y, 4, 6) == [1, 3, 5, 0]
    assert picture_index(y, 4, 3) == [1, 0]


# ----------------------------------------------------------------------------- end to end


def tiny_config() -> AcmoeConfig:
    return AcmoeConfig(
        SyntheticStudy(arms=(*ARMS, "ac-var"), n_train=256, n_test=128, steps=6, eval_every=3, batch_size=64,
                       eval_batch=64),
        LmStudy(arms=ARMS, depth=2, dim=16, num_heads=2, num_experts=4, expert_hidden=16, byte_context=16,
                word_context=8, batch_size=4, steps=4, eval_points=2, curve_tokens=128, eval_tokens=256,
                eval_batch=8, max_vocab=200, max_chars=40_000),
        VitStudy(arms=ARMS, dim=16, num_heads=2, num_experts=4, epochs=1, batch_size=1000, eval_images=60,
                 eval_batch=30, noise_sigmas=(0.1, 0.3), attack_eps=(4,), pgd_steps=2, pgd_step_frac=0.5,
                 picture_digits=3),
        seeds=(0, 1), device="cpu")


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
    assert titles == ["AC-MoE — synthetic subspace clusters", "AC-MoE — byte-level MoE LM on the Wikipedia sample",
                      "AC-MoE — word-level MoE LM on the Wikipedia sample", "AC-MoE — ViT-MoE on MNIST-5k",
                      "AC-MoE — where the claims hold at this scale"]
    report = (out / "report.md").read_text()
    for s in sections:
        for fig in s.figures:
            assert (out / fig).stat().st_size > 1000 and fig in report
    assert "acmoe_vit_experts.png" in report and "stablemoe" in report and "not the raw XML" in report
    results = json.loads((out / "results.json").read_text())
    # every cell: a result.json next to its checkpoint and config (with the arm's MoE options)
    for study, arms in (("synthetic", (*ARMS, "ac-var")), ("lm-byte", ARMS), ("lm-word", ARMS), ("vit", ARMS)):
        for arm in arms:
            for seed in cfg.seeds:
                (where,) = (out / "acmoe").glob(f"{study}-*")
                cell = where / arm / f"seed{seed}"
                assert (cell / "result.json").exists() and (cell / "checkpoint.safetensors").exists()
                assert json.loads((cell / "config.json").read_text())["extra"]["arm"] == arm

    syn = results["AC-MoE — synthetic subspace clusters"]["cells"]
    for arm in ARMS:
        for r in syn[arm]:
            assert 0 < r["test_mse"] < 5 and 0 < r["noisy_mse"] < 5
            assert len(r["purity"]) == 3 and all(1 / 8 <= p <= 1 for p in r["purity"])
            assert all(0 <= f <= 1 for f in r["flip_top1"]) and r["curve_steps"] == [3, 6]
    assert all("test_mse_ema" in r for r in syn["ac"]) and "test_mse_ema" not in syn["stablemoe"][0]
    ac_r, smoe_r = syn["ac"][0], syn["smoe"][0]
    assert ac_r["dispersion_mh"] != ac_r["dispersion_h"] and smoe_r["dispersion_mh"] == smoe_r["dispersion_h"]
    assert "Ablations against `ac`" in report and "variance instead of MAD" in report

    byte = results["AC-MoE — byte-level MoE LM on the Wikipedia sample"]["cells"]
    word = results["AC-MoE — word-level MoE LM on the Wikipedia sample"]["cells"]
    for arm in ARMS:
        for r in byte[arm]:  # barely trained: near the uniform 8 bits per byte
            assert 4 < r["test_loss"] / math.log(2) < 8.5 and len(r["curve"]) == 2
        for r in word[arm]:
            assert math.log(50) < r["test_loss"] < math.log(400) and r["swap_loss"] > 0
    vit = results["AC-MoE — ViT-MoE on MNIST-5k"]["cells"]
    for arm in ARMS:
        for r in vit[arm]:
            assert 0 <= r["clean"] <= 1 and set(r["noise"]) == {"0.1", "0.3"} and set(r["pgd"]) == {"4"}
            assert len(r["picture"]["experts"]) == len(r["picture"]["index"]) == 3
            assert all(len(row) == 16 and all(0 <= e < 4 for e in row) for row in r["picture"]["experts"])
    claims = results["AC-MoE — where the claims hold at this scale"]["rows"]
    assert {r["claim"] for r in claims} == {"faster convergence", "better overall", "robust to corruption",
                                           "specialised experts", "tight clusters"}
    assert all(r["arms"].startswith("ac") for r in claims)


def test_resume_reuses_finished_cells(tiny_run, monkeypatch) -> None:
    cfg, out, sections = tiny_run

    def refuse(*args, **kwargs):
        raise AssertionError("a finished cell was recomputed")

    for module in (acmoe_synthetic, acmoe_lm, acmoe_vit):
        monkeypatch.setattr(module, "run_cell", refuse)
    again = run(cfg, out)
    assert [s.results for s in again[:-1]] == [s.results for s in sections[:-1]]
    # a new seed is the only thing computed
    computed = []
    monkeypatch.setattr(acmoe_synthetic, "run_cell", lambda study, arm, seed, d, dev: computed.append((arm, seed))
                        or {**sections[0].results["cells"][arm][0]})
    cfg.studies = ("synthetic",)
    cfg.seeds = (0, 1, 2)
    run(cfg, out)
    assert computed == [(arm, 2) for arm in (*ARMS, "ac-var")]
    # other settings: another directory, nothing reused
    computed.clear()
    cfg.synthetic.steps += 1
    run(cfg, out)
    assert len(computed) == 3 * 4 and len(list((out / "acmoe").glob("synthetic-*"))) == 2
