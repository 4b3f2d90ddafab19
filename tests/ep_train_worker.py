"""Worker of ``tests/test_moe_parallel.py::test_expert_parallel_training_resumes_exactly``; run under torchrun
with 2 CPU processes.

usage: python -m torch.distributed.run --nproc-per-node 2 --standalone tests/ep_train_worker.py OUT_DIR RUN
STOP|none fresh|resume

Trains the tiny expert-parallel model below (AC routing, dropless dispatch, aux loss, grad clipping) under
DDP in ``OUT_DIR/RUN`` up to step STOP (none: to the end), fresh or resuming from the gathered checkpoint.
The test launches ``full`` once and ``split`` twice (stop at 3, then a new launch resumes), as after a kill.
Each rank starts from its own initialisation (the experts are cut from rank 0's, DDP broadcasts the rest)
and writes its final parameters (its expert shard) to ``OUT_DIR/<RUN>_rank<r>.safetensors``.
The test imports ``make_model``, ``make_loss``, ``full_batch_fn`` and ``CFG`` for the single-process reference.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from clusterformers.moe import MoE, expert_parallel, total_aux_loss
from clusterformers.state import share_state
from clusterformers.train import TrainConfig, train

CFG = TrainConfig(steps=6, lr=0.02, warmup_steps=2, grad_clip=0.5, log_every=2, ckpt_every=3, device="cpu",
                  progress=False)


class Net(nn.Module):
    """Linear -> MoE (stablemoe) -> MoE (AC, routed by the first one's state) -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.moe1 = MoE(8, 4, 2, 6, aux_coef=0.05)
        self.moe2 = MoE(8, 4, 2, 6, router="ac", aux_coef=0.05)
        self.out = nn.Linear(8, 2)
        share_state(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        h = h + self.moe1(h)
        return self.out(h + self.moe2(h))


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return Net()


def shard(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(6, 4, generator=g)
    return x, torch.stack([x[:, 0].sin(), x[:, 1] * x[:, 2]], dim=1)


def batch_fn(step: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    return shard(step, rank)


def full_batch_fn(step: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(shard(step, 0), shard(step, 1), strict=True)
    return torch.cat(xs), torch.cat(ys)


def make_loss():
    """Task loss plus the aux losses (group-wide values on every rank; DDP's averaging keeps them whole)."""
    def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]):
        x, y = batch
        mse = ((model(x) - y) ** 2).mean()
        return mse + total_aux_loss(model), {"mse": mse.detach()}

    return loss_fn


def main(out: Path, run: str, stop: int | None, resume: bool) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")  # before the model is sharded; train() then uses this group
    rank = dist.get_rank()
    model = expert_parallel(make_model(rank))
    result = train(model, make_loss(), batch_fn, dataclasses.replace(CFG, stop_at=stop), out / run, resume=resume)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(out / f"{run}_rank{rank}.safetensors"), metadata={"step": str(result.step)})
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    main(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]) if sys.argv[3] != "none" else None, sys.argv[4] == "resume")
