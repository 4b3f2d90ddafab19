"""Worker of ``tests/test_state.py::test_ddp_matches_one_process_on_the_union``; run under torchrun, 2 CPU
processes.

usage: python -m torch.distributed.run --nproc-per-node 2 --standalone tests/ddp_state_worker.py OUT_DIR

Trains an elliptical AC-MoE language model (running statistics synchronised over the ranks) for a few
steps under DDP, each rank on its own shard, and writes rank 0's final state to ``OUT_DIR/ddp.safetensors``.
The test trains the same model in one process on the union of the shards (``make_model``, ``union``, ``CFG``).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from clusterformers.models.transformer import TransformerLM, TransformerLMConfig
from clusterformers.train import TrainConfig, train

CFG = TrainConfig(steps=4, lr=3e-3, warmup_steps=0, log_every=2, device="cpu", progress=False)
VOCAB, CONTEXT = 31, 12


def make_model() -> TransformerLM:
    torch.manual_seed(0)
    ac = {"preset": "lm", "stats": "running", "sync_stats": True}
    cfg = TransformerLMConfig(vocab_size=VOCAB, context=CONTEXT, dim=16, depth=3, num_heads=2, dropout=0.0,
                              attention="elliptical", ffn="moe",
                              ffn_kwargs={"num_experts": 4, "top_k": 2, "router": "ac", "ac": ac})
    return TransformerLM(cfg)


def shard(step: int, rank: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (3, CONTEXT + 1), generator=torch.Generator().manual_seed(100 * step + rank))


def per_rank(step: int, rank: int, world: int) -> torch.Tensor:
    return shard(step, rank)


def union(step: int, rank: int, world: int) -> torch.Tensor:
    return torch.cat([shard(step, 0), shard(step, 1)])


def loss_fn(model: torch.nn.Module, batch: torch.Tensor):
    return F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten()), {}


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    model = make_model()
    train(model, loss_fn, per_rank, CFG)
    if int(os.environ["RANK"]) == 0:
        save_file({k: v.detach().clone() for k, v in model.state_dict().items()},
                  str(Path(sys.argv[1]) / "ddp.safetensors"))
