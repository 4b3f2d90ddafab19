"""Expert parallelism with two gloo processes: the sharded layer equals the single-process layer on the
concatenated batch (outputs, auxiliary loss, input, expert and router gradients) for each router, dropless
and capacity (slot and weight priority, padding); bad setups are clear errors on every rank."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from clusterformers.moe import MoE, expert_parallel
from clusterformers.train import train

ROOT = Path(__file__).resolve().parents[1]


def _torchrun(worker: str, out: Path, *args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
           str(ROOT / "tests" / worker), str(out), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def test_expert_parallel_equals_the_single_process_layer_on_two_gloo_ranks(tmp_path: Path) -> None:
    _torchrun("ep_worker.py", tmp_path)
    for rank in (0, 1):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        bad = report.pop("bad")
        assert "num_experts=3 is not divisible by the group size 2" in bad["indivisible"]
        assert "disagree on (dim, num_experts" in bad["mismatch"]
        assert len(report) == 9
        for name, diffs in report.items():
            dropped = diffs.pop("dropped")
            assert all(v <= 1e-10 for v in diffs.values()), (rank, name, diffs)
            assert dropped or not name.startswith("capacity"), name  # the capacity cases do drop


def test_expert_parallel_needs_a_process_group() -> None:
    with pytest.raises(RuntimeError, match="init_process_group"):
        expert_parallel(MoE(8, 4, 2, 6))
    with pytest.raises(ValueError, match="holds no MoE layer"):
        expert_parallel(torch.nn.Linear(3, 3))


def test_expert_parallel_training_resumes_exactly_and_equals_one_process(tmp_path: Path) -> None:
    """2 gloo processes under DDP with sharded experts: a run stopped at step 3 and resumed from its gathered
    checkpoint ends where the uninterrupted one does, bit for bit; both equal one process trained on the union
    of the ranks' batches (experts reassembled from the shards)."""
    _torchrun("ep_train_worker.py", tmp_path, "full", "none", "fresh")
    _torchrun("ep_train_worker.py", tmp_path, "split", "3", "fresh")
    _torchrun("ep_train_worker.py", tmp_path, "split", "none", "resume")
    runs = {run: [load_file(str(tmp_path / f"{run}_rank{r}.safetensors")) for r in (0, 1)]
            for run in ("full", "split")}
    for r in (0, 1):
        full, split = runs["full"][r], runs["split"][r]
        assert full.keys() == split.keys() and all(torch.equal(full[k], split[k]) for k in full), r
    a, b = runs["full"]
    experts = {k for k in a if k.endswith(("experts.w_in", "experts.w_out"))}
    assert experts and all(not torch.equal(a[k], b[k]) for k in experts)  # each rank holds other experts
    assert all(torch.equal(a[k], b[k]) for k in a.keys() - experts)  # the rest is replicated
    spec = importlib.util.spec_from_file_location("ep_train_worker", ROOT / "tests" / "ep_train_worker.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    model = mod.make_model(0)
    train(model, mod.make_loss(), mod.full_batch_fn, mod.CFG)
    for k, v in model.state_dict().items():
        got = torch.cat([a[k], b[k]]) if k in experts else a[k]
        torch.testing.assert_close(got, v, rtol=0, atol=1e-6, msg=k)


def _kill_all(marker: str) -> None:
    """SIGKILL every process whose command line holds ``marker``: the launcher and its workers (torchrun
    starts them in their own process groups)."""
    import signal

    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if marker in cmdline:
                try:
                    os.kill(int(proc.name), signal.SIGKILL)
                except ProcessLookupError:
                    pass


def _train_lm(out: Path, text: Path, extra: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone", "-m",
           "clusterformers", "train", "lm", "--moe", "ac", "--expert-parallel", "--level", "byte", "--data",
           str(text), "--steps", "8", "--batch-size", "4", "--out", str(out), "--no-progress", "--device", "cpu",
           *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="finds the processes to kill in /proc")
def test_train_lm_expert_parallel_resumes_exactly_after_a_kill(tmp_path: Path) -> None:
    """`clusterformers train lm --expert-parallel` on 2 processes, killed (SIGKILL to the whole launch) once a
    checkpoint past step 2 is committed, then relaunched with --resume: its final checkpoint equals an
    uninterrupted run's, tensor for tensor; the gathered file loads into a single-process model."""
    import time

    from clusterformers.experiments.single import load_lm

    text = tmp_path / "corpus.txt"
    words = "the cat sat on the mat and the dog ran to the park with a red ball".split()
    rng = __import__("numpy").random.default_rng(0)
    text.write_text("\n\n".join(" ".join(rng.choice(words, 400)) for _ in range(12)))
    straight = _train_lm(tmp_path / "straight", text, [])
    assert straight.wait(timeout=300) == 0, straight.stdout.read()[-3000:]

    killed = _train_lm(tmp_path / "killed", text, [])
    state = tmp_path / "killed" / "state.json"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and killed.poll() is None:
        if state.exists() and json.loads(state.read_text() or "{}").get("step", 0) >= 2:
            break
        time.sleep(0.2)
    assert killed.poll() is None, "the run ended before it could be killed: " + killed.stdout.read()[-3000:]
    _kill_all(str(tmp_path / "killed"))
    killed.wait(timeout=60)
    stopped_at = json.loads(state.read_text())["step"]
    assert 2 <= stopped_at < 8
    resumed = _train_lm(tmp_path / "killed", text, ["--resume"])
    assert resumed.wait(timeout=300) == 0, resumed.stdout.read()[-3000:]
    log = resumed.stdout.read()
    assert f"at step {stopped_at}" in log and "steps 0 ->" not in log, log[-3000:]  # it resumed, not restarted

    a = load_file(str(tmp_path / "straight" / "checkpoint.safetensors"))
    b = load_file(str(tmp_path / "killed" / "checkpoint.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), stopped_at
    assert any(k.endswith("experts.w_in") and v.shape[0] == 8 for k, v in a.items())  # all experts, gathered
    model, level, _ = load_lm(tmp_path / "straight", device="cpu")  # a single-process model loads it
    assert level == "byte" and sum(p.numel() for p in model.parameters()) > 0
