"""Fault tests of ``reproduce``: a study killed at random points and rerun ends with the report of an
uninterrupted run."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path


def _without_timing(obj):
    """``results.json`` minus wall-clock fields (the only thing a rerun may change)."""
    if isinstance(obj, dict):
        return {k: _without_timing(v) for k, v in obj.items() if not k.endswith("wall_s")}
    if isinstance(obj, list):
        return [_without_timing(v) for v in obj]
    return obj


def test_reproduce_killed_at_random_points_gives_the_same_report(tmp_path: Path) -> None:
    """SIGKILL the study (and with it its worker processes) at random points, rerun until it finishes: the
    report and the results equal an uninterrupted run's, and no temporary or lock file is left behind."""
    worker = Path(__file__).parent / "reproduce_worker.py"
    # Eager paths: this test is about kill and resume, and compiling the fused metric in every restarted worker
    # would triple its time; the fused paths are compared with the eager ones in their own tests.
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"), "CLUSTERFORMERS_FUSED": "0"}
    log = tmp_path / "worker.log"

    def start(out: Path) -> subprocess.Popen:
        with open(log, "w") as handle:
            return subprocess.Popen([sys.executable, str(worker), str(out)], env=env, start_new_session=True,
                                    stdout=subprocess.DEVNULL, stderr=handle)

    def finished(proc: subprocess.Popen, timeout: float) -> bool:
        """True once the run ended within ``timeout``, successfully (else fail with its log); a run still going
        raises ``subprocess.TimeoutExpired``."""
        rc = proc.wait(timeout=timeout)
        assert rc == 0, f"the study failed (rc {rc}):\n{log.read_text()[-3000:]}"
        return True

    clean = tmp_path / "clean"
    began = time.time()
    assert finished(start(clean), 300)
    total = time.time() - began
    killed = tmp_path / "killed"
    rng = random.Random(0)
    kills = 0
    for _ in range(3):  # three kills at random points, then a run to the end
        proc = start(killed)
        try:
            finished(proc, rng.uniform(0.2, 0.5) * total)  # short enough to kill on a busy machine
            break
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            kills += 1
    else:
        assert finished(start(killed), 300)
    assert kills >= 2, "the study finished before it could be killed twice; the test checks nothing"
    assert (killed / "report.md").read_text() == (clean / "report.md").read_text()
    assert _without_timing(json.loads((killed / "results.json").read_text())) == _without_timing(
        json.loads((clean / "results.json").read_text()))
    leftovers = [p for p in killed.rglob("*") if p.name.endswith(".tmp") or p.name == ".lock"]
    assert leftovers == []
