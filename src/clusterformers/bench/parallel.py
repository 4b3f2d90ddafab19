"""Expert parallelism: time, tokens/s and peak memory per rank of one expert-parallel MoE layer (forward +
backward) at 1 and 2 processes on the same global batch, and the all_to_all volume per step.

Each world size runs in its own ``torch.distributed.run`` launch (gloo on CPU, NCCL on CUDA), one torch
thread per process; the row's ``ratio`` is the step time at 2 processes ÷ at 1 (no target: on one CPU
machine the processes share its cores and memory bandwidth, so this measures the exchange's overhead, not
a speed-up). ``clusterformers bench --only parallel`` runs it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from clusterformers.bench.common import record

E, K, D, D_FF, TOKENS = 16, 2, 256, 512, 8192
SHAPE = f"E={E} k={K} d={D} d_ff={D_FF} global T={TOKENS} dropless AC"
THREADED = False  # one thread per process, whatever --threads says


def _launch(world: int, device: torch.device, reps: int, out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world), "--standalone", "-m",
           "clusterformers.bench.parallel", str(out), str(reps), device.type]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"the {world}-process benchmark failed:\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def run(quick: bool, device: torch.device, threads: int) -> list[dict]:
    """One row: 2 processes vs 1 (``threads`` is ignored: each process uses one thread)."""
    reps = 3 if quick else 10
    with tempfile.TemporaryDirectory() as tmp:
        one, two = (_launch(w, device, reps, Path(tmp) / f"world{w}.json") for w in (1, 2))
    return [record("expert_parallel/world=2", two["step_s"], one["step_s"], "the same layer in 1 process", SHAPE,
                   threads=1, device=str(device), reps=reps, tokens_per_s=TOKENS / two["step_s"],
                   baseline_tokens_per_s=TOKENS / one["step_s"], peak_bytes_per_rank=two["peak_bytes"],
                   baseline_peak_bytes=one["peak_bytes"], all_to_all_bytes_per_step=two["all_to_all_bytes"])]


def _worker(out: Path, reps: int, device_type: str) -> None:
    """One rank: time ``reps`` forward + backward steps of its share of the global batch."""
    import statistics
    import time

    import torch.distributed as dist

    from clusterformers.bench.cost import LiveTensorTracker
    from clusterformers.moe import MoE, RoutingState, expert_parallel

    torch.set_num_threads(1)
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    dev = torch.device("cpu")
    if device_type == "cuda":
        dev = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    torch.manual_seed(0)
    layer = MoE(D, E, K, D_FF, router="ac").to(dev)
    if world > 1:
        expert_parallel(layer)
    T = TOKENS // world
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(T, D, generator=g).to(dev).requires_grad_(True)
    c = torch.randint(0, E, (T,), generator=g).to(dev)
    prev = RoutingState(torch.stack([c, (c + 1) % E], 1), torch.full((T, 2), 0.5, device=dev), T, E)
    grad = torch.randn(T, D, generator=g).to(dev)
    sent = [0]
    plain = dist.all_to_all_single

    def counting(output, input, *args, **kwargs):
        sent[0] += input.numel() * input.element_size()
        return plain(output, input, *args, **kwargs)

    def step() -> None:
        layer(x, prev=prev).backward(grad)
        if dev.type == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up
    dist.all_to_all_single = counting
    step()
    dist.all_to_all_single = plain
    times = []
    for _ in range(reps):
        dist.barrier()
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        step()
        peak = torch.cuda.max_memory_allocated(dev)
    else:
        with LiveTensorTracker() as tracker:
            step()
        peak = tracker.peak
    stats = torch.tensor([statistics.median(times), float(peak), float(sent[0])], dtype=torch.float64)
    dist.all_reduce(stats, op=dist.ReduceOp.MAX)  # the slowest rank, the largest peak and volume
    if rank == 0:
        out.write_text(json.dumps({"step_s": stats[0].item(), "peak_bytes": int(stats[1]),
                                   "all_to_all_bytes": int(stats[2])}))
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
