"""Fair contrastive losses: forward + backward time and peak memory against the dense baselines.

d = 128 embeddings, s = 3 Gaussian sensitive attributes, float32, the same inputs for every loss; the two
sides of a row alternate run by run (``common.interleaved``; the ratio is the median of the round ratios):

- ``fare_vs_cclk`` (b = 4,096): FARE vs CCLK (fp64 kernel solve, O(b³)). Target <= 0.15.
- ``sparse_fare_vs_fare`` (b = 8,192): sorted SparseFARE with ``bucket_size=64`` (n_b ∝ b, sub-quadratic) vs
  dense FARE. Target <= 0.05.
- ``sparse_fare_nb4_vs_fare`` (b = 8,192): the same with the default n_b = 4 (still quadratic, 4× fewer
  pairs). Target <= 0.5.
- ``fare_peak_memory`` (b = 8,192): FARE's peak memory against the 0.5 GiB target (``ratio`` = peak ÷
  target, so <= 1 meets it); FARE runs blockwise above b = 1,024, so its memory is linear in b.

Peak memory: ``torch.cuda.max_memory_allocated`` on CUDA, else the live-tensor tracker of
:mod:`clusterformers.bench.cost` (one extra call each). The FARE study's cost-against-batch-size curve is
``clusterformers.bench.cost.cost_curve``. ``clusterformers bench --only contrastive`` runs it.
"""

from __future__ import annotations

import torch

from clusterformers.bench.common import interleaved, record
from clusterformers.bench.cost import loss_step, make_loss, peak_bytes

DIM, SENSITIVE_DIM = 128, 3
MEMORY_TARGET = 0.5 * 2**30  # FARE at b = 8,192, bytes
COMPARISONS = (
    # name, ours, baseline, batch, target ratio
    ("fare_vs_cclk", "fare", "cclk", 4096, 0.15),
    ("sparse_fare_vs_fare", "sparse_fare", "fare", 8192, 0.05),
    ("sparse_fare_nb4_vs_fare", "sparse_fare_nb4", "fare", 8192, 0.5),
)
_NAMES = {"fare": "FARELoss", "cclk": "CCLKLoss", "sparse_fare": "SparseFARELoss(bucket_size=64)",
          "sparse_fare_nb4": "SparseFARELoss(n_buckets=4)"}


def run(quick: bool, device: torch.device, threads: int) -> list[dict]:
    """One record per comparison (``common.record``) with the peak memory of both sides, and FARE's peak
    memory at b = 8,192 against its target."""
    if device.type == "cuda":
        warmup, reps = (2, 5) if quick else (5, 20)
    else:
        warmup, reps = (1, 2) if quick else (2, 5)  # the first steps compile the kernels and grow the heap
    extra = {"threads": threads, "device": str(device), "reps": reps}
    records = []
    for name, ours, base, batch, target in COMPARISONS:
        steps = {}
        for loss in (ours, base):
            torch.manual_seed(0)
            steps[loss] = loss_step(make_loss(loss, SENSITIVE_DIM), batch, dim=DIM, sensitive_dim=SENSITIVE_DIM,
                                    device=device)
        times = interleaved(steps, warmup, reps, device)
        peaks = {loss: peak_bytes(steps[loss], device) for loss in (ours, base)}
        shape = f"b={batch} d={DIM} s={SENSITIVE_DIM} fp32"
        records.append(record(
            name, times[ours], times[base], _NAMES[base], shape, target, ours_name=_NAMES[ours],
            ours_peak_bytes=peaks[ours], baseline_peak_bytes=peaks[base], memory_ratio=peaks[ours] / peaks[base],
            **extra,
        ))
        if batch == 8192 and "fare" in peaks and not any(r["name"] == "fare_peak_memory" for r in records):
            records.append({"name": "fare_peak_memory", "ratio": peaks["fare"] / MEMORY_TARGET,
                            "peak_bytes": peaks["fare"], "baseline": "0.5 GiB", "shape": shape, "target": "<=1",
                            "met": peaks["fare"] <= MEMORY_TARGET, **extra})
        del steps
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return records
