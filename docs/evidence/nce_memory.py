"""Peak live-tensor memory of one InfoNCE / Fair-InfoNCE / FARE forward + backward at b = 8192, d = 128,
dense (``chunk_size=None``) and blockwise (``chunk_size="auto"``). Memory, not time: it reads the same on a
busy machine. Run ``PYTHONPATH=src python docs/evidence/nce_memory.py``."""

import torch

from clusterformers.bench.cost import LiveTensorTracker
from clusterformers.contrastive import functional as fn

torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
b = 8192
for loss in ("info_nce", "fair_info_nce", "fare"):
    for chunk in (None, "auto"):
        z1, z2 = (torch.randn(b, 128, generator=g, requires_grad=True) for _ in range(2))
        w = torch.eye(16, 3)
        extra = {"info_nce": (), "fair_info_nce": (torch.randint(0, 10, (b,), generator=g),),
                 "fare": (torch.rand(b, 3, generator=g), w, w)}[loss]
        with LiveTensorTracker() as tracker:
            getattr(fn, loss)(z1, z2, *extra, chunk_size=chunk).backward()
        print(f"{loss:<14} chunk_size={chunk!s:<5} peak {tracker.peak / 2**20:7.0f} MiB")
