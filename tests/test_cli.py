"""End-to-end checks of the command line: reproduce (tiny study, resume), train on user data, bench plumbing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from clusterformers import cli
from clusterformers.experiments import elliptical
from clusterformers.experiments.grid import load_cells


def tiny_elliptical(epochs: int = 1, **kwargs) -> elliptical.EllipticalConfig:
    vit = elliptical.VitStudy(arms=("softmax", "elliptical"), depth=2, dim=32, epochs=epochs, batch_size=256,
                              eval_images=64, noise_sigmas=(0.3,), attack_eps=(4, 8), pgd_steps=2, spsa_images=8,
                              spsa_eps=8, spsa_iters=2, spsa_samples=4)
    lm = elliptical.LmStudy(seeds=2, depth=2, dim=32, context=16, steps=4, batch_size=4, max_vocab=500,
                            max_chars=400_000, eval_tokens=2000)
    cfg = elliptical.EllipticalConfig(vit, lm, seeds=(0, 1), workers=kwargs.get("workers", 1))
    cfg.device = kwargs.get("device", "cpu")
    return cfg


def test_reproduce_writes_report_and_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.set_num_threads(1)
    monkeypatch.setattr(elliptical, "make_config", tiny_elliptical)
    assert cli.main(["reproduce", "--paper", "elliptical", "--out", str(tmp_path)]) == 0
    report = (tmp_path / "report.md").read_text()
    assert "ViT on MNIST-5k" in report and "Word-level LM" in report and "### Claims" in report
    assert "2 seeds decide nothing" in report and "SPSA strength" in report
    for fig in ("elliptical_pgd.png", "elliptical_token_cosine.png"):
        assert (tmp_path / "figures" / fig).stat().st_size > 1000
    results = json.loads((tmp_path / "results.json").read_text())
    section = results["Elliptical Attention — ViT on MNIST-5k and a word-level LM"]
    assert set(section["cells"]) == {"vit-softmax", "vit-elliptical", "lm-softmax", "lm-elliptical"}
    assert "items" not in section["cells"]["vit-softmax"]["0"]  # per-item values stay in the cells' files
    cells = load_cells(tmp_path, "elliptical")
    ell = cells["vit-elliptical"][0]
    assert 0.0 <= ell["clean"] <= 1.0 and len(ell["token_cosine"]) == 2 and len(ell["items"]["clean"]) == 64
    assert ell["pgd_grad_mean"] == pytest.approx((ell["pgd_grad_e4"] + ell["pgd_grad_e8"]) / 2)
    assert "pgd_detached_e8" in ell and "pgd_detached_e8" not in cells["vit-softmax"][0]
    assert len(ell["items"]["spsa"]) == 8
    lm = cells["lm-elliptical"][1]
    assert lm["test_ppl"] == pytest.approx(np.exp(np.mean(lm["items"]["nll"])), rel=1e-4)  # items: 5 digits
    assert {v["claim"] for v in section["verdicts"]} >= {"pgd", "clean", "collapse", "lm"}
    (cell,) = list(tmp_path.glob("elliptical/vit-softmax-*/seed0/result.json"))
    assert (cell.parent / "checkpoint.safetensors").exists() and (cell.parent / "metrics.csv").exists()
    before = cell.stat().st_mtime_ns
    assert cli.main(["reproduce", "--paper", "elliptical", "--out", str(tmp_path)]) == 0
    assert cell.stat().st_mtime_ns == before, "a finished cell must be reused, not recomputed"


def test_a_longer_run_never_reuses_shorter_cells(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression: the elliptical study once cached cells at vit/<variant>/seed<s>, so a smoke run followed by a
    full run reported the smoke cells as full results. Cells now live under a hash of their settings."""
    torch.set_num_threads(1)
    short, long = tiny_elliptical(epochs=1), tiny_elliptical(epochs=2)

    def paths(cfg, model):
        return {c.path(tmp_path) for c in cfg.cells() if c.arm.startswith(model)}

    assert paths(short, "vit").isdisjoint(paths(long, "vit"))
    assert paths(short, "lm") == paths(long, "lm")  # the LM's settings did not change: its cells are shared
    assert paths(short, "vit") == paths(tiny_elliptical(epochs=1), "vit")
    monkeypatch.setattr(elliptical, "make_config", lambda **kw: short)
    assert cli.main(["reproduce", "--paper", "elliptical", "--out", str(tmp_path)]) == 0
    first = json.loads((tmp_path / "results.json").read_text())
    monkeypatch.setattr(elliptical, "make_config", lambda **kw: long)
    assert cli.main(["reproduce", "--paper", "elliptical", "--out", str(tmp_path)]) == 0
    second = json.loads((tmp_path / "results.json").read_text())
    key = "Elliptical Attention — ViT on MNIST-5k and a word-level LM"
    steps = {json.loads(p.read_text())["step"] for p in tmp_path.glob("elliptical/vit-softmax-*/seed0/state.json")}
    assert len(steps) == 2 and max(steps) == 2 * min(steps)  # both cells exist, each trained for its own epochs
    assert first[key]["cells"]["vit-softmax"]["0"] != second[key]["cells"]["vit-softmax"]["0"]


def test_train_vit_on_user_npz(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 40)
    images = (rng.random((120, 14, 14)) * 60).astype(np.uint8)
    images[:, : 4 * 1, :] += (labels[:, None, None] * 60).astype(np.uint8)  # a learnable class cue
    np.savez(tmp_path / "mine.npz", images=images, labels=labels)
    out = tmp_path / "run"
    argv = ["train", "vit", "--attention", "elliptical", "--data", str(tmp_path / "mine.npz"), "--epochs", "2",
            "--batch-size", "32", "--out", str(out), "--no-progress", "--device", "cpu"]
    assert cli.main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["steps"] == 2 * (96 // 32) and 0.0 <= result["test_acc"] <= 1.0
    assert (out / "config.json").exists() and (out / "checkpoint.safetensors").exists()


def test_train_missing_data_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "nope.npz"
    assert cli.main(["train", "vit", "--data", str(missing), "--out", str(tmp_path / "r")]) == 2
    assert str(missing) in capsys.readouterr().err


def test_bench_runs_the_installed_modules_at_each_thread_count_and_check_fails_on_a_miss(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """The benchmarks are imported from the installed package; ``--check`` turns a missed target into exit 1."""
    import clusterformers.bench.attention as attention

    seen = []

    def fake_run(quick, device, threads):
        seen.append((quick, device.type, threads, torch.get_num_threads()))
        met = threads == 1
        return [{"name": "fake", "ratio": 0.5 if met else 2.0, "baseline": "sdpa", "shape": "x", "threads": threads,
                 "target": "<=1", "met": met, "ratio_interval": [0.4, 0.6] if met else [0.9, 2.5],
                 "within_noise": not met}]

    monkeypatch.setattr(attention, "run", fake_run)
    resets = []
    monkeypatch.setattr(torch.compiler, "reset", lambda: resets.append(torch.get_num_threads()))
    argv = ["bench", "--json", "--quick", "--only", "attention", "--device", "cpu", "--threads", "1,2"]
    assert cli.main(argv) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["threads"] for r in rows] == [1, 2] and [r["met"] for r in rows] == [True, False]
    assert seen == [(True, "cpu", 1, 1), (True, "cpu", 2, 2)]  # torch's thread count is set for each run
    assert resets == [1, 2]  # and each run starts from empty compile caches
    assert cli.main([*argv, "--check"]) == 1
    assert ("1 of 2 rows miss their target: fake (2 thread(s)) 2.000 vs <=1 (within noise: interval [0.900, 2.500])"
            in capsys.readouterr().err)
    clear = {"name": "fake", "threads": 2, "ratio": 2.0, "target": "<=1", "ratio_interval": [1.5, 2.5],
             "within_noise": False}
    assert cli._miss(clear) == "fake (2 thread(s)) 2.000 vs <=1"  # the interval lies above the target
    assert cli.main([*argv[:-2], "--threads", "1", "--check"]) == 0
    assert cli.main(["bench", "--only", "nope"]) == 2
    assert "unknown benchmarks ['nope']" in capsys.readouterr().err
    assert cli.main(["bench", "--only", "attention", "--threads", "0"]) == 2


def test_bench_processes_runs_fresh_interpreters_and_combines_their_rows(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import clusterformers.bench as bench

    commands, ratios = [], iter([1.0, 1.3, 0.9])

    def fake_run(command, **kwargs):
        commands.append(command)
        line = json.dumps({"name": "fake", "threads": 1, "shape": "x", "ratio": next(ratios), "bound": 1.1,
                           "target": "<=1.1", "met": True})
        return subprocess.CompletedProcess(command, 0, stdout=line + "\n")

    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    assert cli.main(["bench", "--json", "--only", "moe", "--threads", "1", "--processes", "3", "--check"]) == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert row["ratio"] == 1.0 and row["process_ratios"] == [1.0, 1.3, 0.9] and row["met"] is True
    assert len(commands) == 3 and commands[0][:3] == [sys.executable, "-m", "clusterformers"]
    assert commands[0][3:] == ["bench", "--json", "--only", "moe", "--device", "auto", "--threads", "1"]
    assert cli.main(["bench", "--processes", "0"]) == 2
    assert "processes: expected a positive count, got 0" in capsys.readouterr().err

    ratios, before = iter([1.2, 1.0]), len(commands)

    def interrupted(command, **kwargs):  # Ctrl-C during the third process: the two finished ones are kept
        if len(commands) == before + 2:
            raise KeyboardInterrupt
        return fake_run(command, **kwargs)

    monkeypatch.setattr(bench.subprocess, "run", interrupted)
    assert cli.main(["bench", "--json", "--only", "moe", "--threads", "1", "--processes", "3"]) == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert row["process_ratios"] == [1.2, 1.0] and row["ratio"] == pytest.approx(1.1)

    def interrupted_at_once(command, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench.subprocess, "run", interrupted_at_once)
    with pytest.raises(KeyboardInterrupt):  # nothing finished: nothing to combine
        bench.run_processes(["moe"], processes=2, threads=[1])

    def failing(command, **kwargs):
        raise subprocess.CalledProcessError(1, command)

    monkeypatch.setattr(bench.subprocess, "run", failing)
    assert cli.main(["bench", "--only", "moe", "--processes", "2"]) == 2
    assert "returned non-zero exit status 1" in capsys.readouterr().err


@pytest.mark.parametrize("level", ["byte", "word"])
def test_train_lm_then_generate_from_its_run_directory(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                       level: str) -> None:
    torch.set_num_threads(1)
    text = tmp_path / "corpus.txt"
    words = "the cat sat on the mat and the dog ran to the park with a red ball".split()
    rng = np.random.default_rng(0)
    text.write_text("\n\n".join(" ".join(rng.choice(words, 400)) for _ in range(12)))
    out = tmp_path / "lm"
    argv = ["train", "lm", "--attention", "elliptical", "--moe", "ac", "--level", level, "--data", str(text),
            "--steps", "3", "--batch-size", "4", "--out", str(out), "--no-progress", "--device", "cpu"]
    assert cli.main(argv) == 0
    capsys.readouterr()
    gen = ["generate", "--checkpoint", str(out), "--prompt", "the cat", "--max-new-tokens", "6", "--device", "cpu"]
    assert cli.main(gen) == 0
    sample = capsys.readouterr().out.strip()
    assert sample.startswith("the cat") and len(sample) > len("the cat")
    assert cli.main(gen) == 0 and capsys.readouterr().out.strip() == sample  # seeded: the same sample
    if level == "word":
        assert len(sample.split()) == 2 + 6
    assert cli.main(["generate", "--checkpoint", str(tmp_path), "--prompt", "x"]) == 2
    assert "train lm" in capsys.readouterr().err
