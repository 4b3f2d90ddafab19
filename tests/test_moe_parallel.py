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
        assert len(report) == 8
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
