"""Process groups and the collectives of the training loop: DDP under torchrun, gloo on CPU, nccl on CUDA.

Every collective here must be called by every rank, in the same order.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["all_gather_json", "mean_over_ranks", "setup_distributed", "sync_extra_grads", "unwrap_model"]

_GROUPS_CREATED = 0  # process groups this process has created; a store prefix per group


def setup_distributed(device: torch.device) -> tuple[int, int, torch.device, bool]:
    """``(rank, world, device, created_group)``; inits the process group under torchrun if needed.

    device: the resolved device of the run; under DDP a ``cuda`` device without an index becomes
    ``cuda:LOCAL_RANK`` (modulo the device count) and is made current.

    A group is created on an ``env://`` store wrapped in a fresh ``PrefixStore`` per creation: re-using
    the same keys after ``destroy_process_group`` hangs (pytorch/pytorch#55967, #114585), and an
    experiment under torchrun may call :func:`clusterformers.train.train` several times. Every rank makes
    the same calls, so the prefixes agree.
    """
    global _GROUPS_CREATED
    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    if not dist.is_available() or (env_world <= 1 and not dist.is_initialized()):
        return 0, 1, device, False
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    created = not dist.is_initialized()
    if created:
        store, rank, world = next(dist.rendezvous("env://"))
        _GROUPS_CREATED += 1
        store = dist.PrefixStore(f"clusterformers/{_GROUPS_CREATED}", store)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", rank=rank,
                                world_size=world, store=store)
    return dist.get_rank(), dist.get_world_size(), device, created


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel/DataParallel wrapper (``model`` itself otherwise).

    Under DDP, ``loss_fn`` receives the wrapped model (its forward syncs gradients); use this to reach
    attributes of your own module.
    """
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    return model.module if isinstance(model, wrappers) else model


def all_gather_json(obj: Any, world: int, device: torch.device) -> list[Any]:
    """all_gather of a JSON-able object as UTF-8 bytes in a tensor (no pickling, unlike all_gather_object)."""
    comm = device if device.type == "cuda" else torch.device("cpu")
    data = torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8).to(comm)
    size = torch.tensor([data.numel()], dtype=torch.long, device=comm)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    padded = torch.zeros(int(max(sizes).item()), dtype=torch.uint8, device=comm)
    padded[: data.numel()] = data
    bufs = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(bufs, padded)
    return [json.loads(bytes(buf[: int(n.item())].cpu().numpy()).decode())
            for buf, n in zip(bufs, sizes, strict=True)]


def mean_over_ranks(values: dict[str, Any], world: int, device: torch.device) -> dict[str, float]:
    """Floats of ``values`` averaged over ranks (one all_reduce; every rank must give the same keys)."""
    if not values:
        return {}
    keys = list(values)
    dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
    packed = torch.stack([torch.as_tensor(values[k], dtype=dtype, device=device).reshape(()) for k in keys])
    if world > 1:
        dist.all_reduce(packed)
        packed /= world
    return dict(zip(keys, packed.tolist(), strict=True))


def sync_extra_grads(extra: list[Tensor], world: int) -> None:
    """Average the gradients of parameters outside the DDP module over ranks (as DDP does for its own)."""
    flags = torch.tensor([p.grad is not None for p in extra], dtype=torch.float32, device=extra[0].device)
    dist.all_reduce(flags)
    for p, flag in zip(extra, flags.tolist(), strict=True):
        if flag:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
            p.grad /= world
