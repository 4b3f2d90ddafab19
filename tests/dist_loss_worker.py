"""Worker of ``tests/test_contrastive_losses.py::test_gather_distributed_equals_the_global_batch``; run under
torchrun with 2 CPU (gloo) processes.

usage: python -m torch.distributed.run --nproc-per-node 2 --standalone tests/dist_loss_worker.py OUT_DIR

Every rank builds the same global batch, keeps its contiguous share, and computes each loss with
``gather_distributed=True``; it also computes the single-process loss of the global batch. It writes
``OUT_DIR/rank<r>.json``: per loss, the largest difference of the losses and of the embedding gradients
(the rank's gradient against ``world_size`` times the global gradient of its rows), and the error raised when
the ranks pass different batch sizes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from clusterformers.contrastive import (
    CCLKLoss,
    FairInfoNCELoss,
    FARELoss,
    InfoNCELoss,
    KMeansDiscretizer,
    SparseFARELoss,
)

B, D = 24, 8


def losses(gather: bool) -> dict:
    torch.manual_seed(0)  # the same W_Q, W_K on every rank and in the reference
    colours = torch.rand(64, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    return {
        "info_nce": InfoNCELoss(gather_distributed=gather),
        "fair_info_nce": FairInfoNCELoss(discretizer=KMeansDiscretizer(k=3, seed=0).fit(colours),
                                         gather_distributed=gather),
        "cclk": CCLKLoss(gather_distributed=gather),
        "fare": FARELoss(3, gather_distributed=gather).double(),
        "fare_running": FARELoss(3, z_norm="running", gather_distributed=gather).double(),
        "sparse_fare": SparseFARELoss(3, n_buckets=4, generator=torch.Generator().manual_seed(3),
                                      gather_distributed=gather).double(),
        "sparse_fare_groups": SparseFARELoss(4, gather_distributed=gather).double(),
    }


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(B, D, generator=g, dtype=torch.float64), torch.randn(B, D, generator=g, dtype=torch.float64)
    sens = torch.rand(B, 3, generator=g, dtype=torch.float64)
    groups = torch.randint(0, 4, (B,), generator=g)
    share = slice(rank * B // world, (rank + 1) * B // world)
    report = {}
    ours, ref = losses(True), losses(False)
    for name in ours:
        attribute = groups if name == "sparse_fare_groups" else sens
        full = [z.clone().requires_grad_() for z in (z1, z2)]
        expected = ref[name](*full, attribute)
        grads = torch.autograd.grad(expected, full)
        local = [z[share].clone().requires_grad_() for z in (z1, z2)]
        got = ours[name](*local, attribute[share])
        mine = torch.autograd.grad(got, local)
        report[name] = {
            "loss": abs(float(got) - float(expected)),
            "grad": max(float((m - world * e[share]).abs().max()) for m, e in zip(mine, grads)),
        }
        if name == "fare_running":
            report[name]["running"] = float((ours[name].running_mean - ref[name].running_mean).abs().max())
    try:
        n = B // world - rank  # rank 1 passes one sample fewer
        ours["info_nce"](z1[:n], z2[:n])
        report["mismatch"] = "no error"
    except ValueError as err:
        report["mismatch"] = str(err)
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(Path(sys.argv[1]))
