"""Expert parallelism with two gloo processes: the sharded layer equals the single-process layer on the
concatenated batch (outputs, auxiliary loss, input, expert and router gradients) for each router, dropless
and capacity (slot and weight priority, padding); bad setups are clear errors on every rank."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clusterformers.moe import MoE, expert_parallel


def test_expert_parallel_equals_the_single_process_layer_on_two_gloo_ranks(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(root / "src"), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
           str(root / "tests" / "ep_worker.py"), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
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
