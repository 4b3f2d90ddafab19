"""Fair contrastive losses: forward + backward time and peak memory against the dense baselines.

d = 128 embeddings, s = 3 Gaussian sensitive attributes, float32, the same inputs for every loss:

- ``fare_vs_cclk`` (b = 4,096): FARE vs CCLK (fp64 kernel solve, O(b³)); target ratio <= 0.2 (FARE >= 5× faster).
- ``sparse_fare_vs_fare`` (b = 8,192): sorted SparseFARE with ``bucket_size=64`` (n_b ∝ b, sub-quadratic) vs
  dense FARE; target ratio <= 0.5 (>= 2× faster) with a lower peak memory.
- ``sparse_fare_nb4_vs_fare`` (b = 8,192): the same with the default n_b = 4 (still quadratic, 4× fewer pairs).

Peak memory: ``torch.cuda.max_memory_allocated`` on CUDA, else the live-tensor tracker of
``clusterformers.contrastive.cost`` (one extra call each). The FARE study's cost-against-batch-size curve is
``clusterformers.contrastive.cost.cost_curve``.

Run ``python bench/contrastive.py [--quick] [--device cpu|cuda|auto] [--threads T] [--json]``.
"""

from __future__ import annotations

import argparse
import json

import torch
from common import device_of, record, time_fn  # bench/common.py: the script's folder is on sys.path

from clusterformers.contrastive.cost import loss_step, make_loss, peak_bytes

DIM, SENSITIVE_DIM = 128, 3
COMPARISONS = (
    # name, ours, baseline, batch, target ratio
    ("fare_vs_cclk", "fare", "cclk", 4096, 0.2),
    ("sparse_fare_vs_fare", "sparse_fare", "fare", 8192, 0.5),
    ("sparse_fare_nb4_vs_fare", "sparse_fare_nb4", "fare", 8192, 0.5),
)
_NAMES = {"fare": "FARELoss", "cclk": "CCLKLoss", "sparse_fare": "SparseFARELoss(bucket_size=64)",
          "sparse_fare_nb4": "SparseFARELoss(n_buckets=4)"}


def run(quick: bool = False, device: str = "auto") -> list[dict]:
    """One record per comparison (``bench/common.py`` ``record``) with peak memory of both sides."""
    dev = device_of(device)
    if dev.type == "cuda":
        warmup, reps = (2, 5) if quick else (5, 20)
    else:
        warmup, reps = (1, 2) if quick else (1, 5)
    records = []
    for name, ours, base, batch, target in COMPARISONS:
        steps = {}
        for loss in (ours, base):
            torch.manual_seed(0)
            steps[loss] = loss_step(make_loss(loss, SENSITIVE_DIM), batch, dim=DIM, sensitive_dim=SENSITIVE_DIM,
                                    device=dev)
        times = {loss: time_fn(steps[loss], warmup=warmup, reps=reps, device=dev) for loss in (ours, base)}
        peaks = {loss: peak_bytes(steps[loss], dev) for loss in (ours, base)}
        rec = record(
            name, times[ours], times[base], _NAMES[base], f"b={batch} d={DIM} s={SENSITIVE_DIM} fp32",
            ours_name=_NAMES[ours], target=f"<={target}", met=times[ours] / times[base] <= target,
            ours_peak_bytes=peaks[ours], baseline_peak_bytes=peaks[base], memory_ratio=peaks[ours] / peaks[base],
            device=str(dev), reps=reps,
        )
        records.append(rec)
        del steps
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for rec in run(quick=args.quick, device=args.device):
        if args.json:
            print(json.dumps(rec))
        else:
            print(
                f"{rec['name']:<26} ratio {rec['ratio']:.3f} (target {rec['target']}) "
                f"{rec['ours_s'] * 1e3:9.2f} ms vs {rec['baseline_s'] * 1e3:9.2f} ms {rec['baseline']:<20} "
                f"peak {rec['ours_peak_bytes'] / 2**20:8.1f} vs {rec['baseline_peak_bytes'] / 2**20:8.1f} MiB "
                f"{rec['shape']} {rec['device']}"
            )


if __name__ == "__main__":
    main()
