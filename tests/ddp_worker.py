"""Worker of ``tests/test_train.py::test_ddp_two_processes``; run under torchrun with 2 CPU processes.

usage: python -m torch.distributed.run --nproc-per-node 2 --standalone tests/ddp_worker.py OUT_DIR

Trains the tiny model below twice: ``full`` runs 6 steps in one call, ``split`` stops at step 3 and
resumes (each call of ``train`` creates and destroys the process group). Every rank starts from its own
initialisation, so equal results prove the replicas are synchronised. Each rank writes its final
parameters to ``OUT_DIR/<run>_rank<r>.safetensors``. The test imports ``make_model``, ``make_scale``,
``make_loss``, ``eval_fn``, ``full_batch_fn`` and ``CFG`` to train the single-process reference.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from clusterformers.train import TrainConfig, train

CFG = TrainConfig(steps=6, lr=0.05, warmup_steps=2, grad_clip=0.5, weight_decay=0.1, log_every=2,
                  eval_every=3, ckpt_every=3, device="cpu", progress=False)


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))


def make_scale(seed: int) -> nn.Parameter:
    """An extra parameter outside the model (as a loss module's would be), initialised per rank."""
    return nn.Parameter(torch.full((2,), 1.0 + 0.1 * seed))


def shard(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(4, 4, generator=g)
    return x, torch.stack([x[:, 0].sin(), x[:, 1] * x[:, 2]], dim=1)


def batch_fn(step: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    assert world == 2, world
    return shard(step, rank)


def full_batch_fn(step: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The union of both ranks' shards: what one process sees for the same global batch."""
    xs, ys = zip(shard(step, 0), shard(step, 1), strict=True)
    return torch.cat(xs), torch.cat(ys)


def make_loss(scale: nn.Parameter):
    def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]):
        x, y = batch
        err = model(x) * scale - y
        return (err**2).mean(), {"mae": err.abs().mean()}

    return loss_fn


def eval_fn(model: nn.Module) -> dict[str, float]:
    x, y = shard(999, 0)
    return {"mse": float(((model(x) - y) ** 2).mean())}


def main(out: Path) -> None:
    rank = int(os.environ["RANK"])
    for run, stops in (("full", [None]), ("split", [3, None])):
        model, scale = make_model(rank), make_scale(rank)
        for i, stop in enumerate(stops):
            cfg = dataclasses.replace(CFG, stop_at=stop)
            result = train(model, make_loss(scale), batch_fn, cfg, out / run, eval_fn, resume=i > 0,
                           extra_params=[scale])
        tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        tensors["scale"] = scale.detach().clone()
        save_file(tensors, str(out / f"{run}_rank{rank}.safetensors"),
                  metadata={"step": str(result.step), "eval_mse": repr(result.eval["mse"])})


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    main(Path(sys.argv[1]))
