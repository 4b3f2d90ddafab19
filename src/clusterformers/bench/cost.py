"""Time and memory of the losses versus batch size (the cost study of ``docs/fare.md``), shared by
:mod:`clusterformers.bench.contrastive`.

Peak memory is the peak of live tensor bytes during one loss forward+backward: on CUDA from
``torch.cuda.max_memory_allocated``, elsewhere from :class:`LiveTensorTracker`, a ``TorchDispatchMode`` that
adds the storage bytes of every tensor an operator returns and subtracts them when the last such tensor is
garbage collected (weakref finalisers; PyTorch keeps a tensor's Python object alive while autograd holds
it); :func:`maxrss_increase` reads the resident-set peak of one step in a fresh process.
"""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
import time
import weakref
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from clusterformers.bench.common import synchronize, time_fn
from clusterformers.contrastive import (
    CCLKLoss,
    ContrastiveLoss,
    FairInfoNCELoss,
    FARELoss,
    InfoNCELoss,
    KMeansDiscretizer,
    SparseFARELoss,
)

logger = logging.getLogger(__name__)

LOSSES = ("info_nce", "fair_info_nce", "cclk", "fare", "sparse_fare", "sparse_fare_nb4")


class LiveTensorTracker(TorchDispatchMode):
    """Peak bytes of tensor storages created (and still referenced) inside the context.

    Storages are keyed by data pointer; views share their base's entry; outputs aliasing an input created
    outside the context are ignored. ``current`` and ``peak`` are in bytes.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, list[int]] = {}
        self.current = 0
        self.peak = 0

    def _release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[key]

    def _track(self, t: Tensor, outside: set[int]) -> None:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in self.live:
            self.live[key][1] += 1
        elif key in outside or storage.nbytes() == 0:
            return
        else:
            self.live[key] = [storage.nbytes(), 1]
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
        weakref.finalize(t, self._release, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, Tensor)]
        outside = {a.untyped_storage().data_ptr() for a in inputs if a.layout == torch.strided}
        outside -= self.live.keys()
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor) and t.layout == torch.strided and t.device.type != "meta":
                self._track(t, outside)
        return out


def make_loss(name: str, sensitive_dim: int = 3, **kwargs) -> ContrastiveLoss:
    """A loss by name (:data:`LOSSES`) with benchmark defaults: ``sparse_fare`` uses ``bucket_size=64``,
    ``sparse_fare_nb4`` the default ``n_buckets=4``, ``fair_info_nce`` a k=10 k-means fitted on
    Gaussian attributes; ``check_inputs=False``; ``kwargs`` override."""
    common = {"check_inputs": False, "log_every": 0}
    if name == "info_nce":
        return InfoNCELoss(**{**common, **kwargs})
    if name == "fair_info_nce":
        gen = torch.Generator().manual_seed(0)
        disc = KMeansDiscretizer(k=10).fit(torch.randn(4096, sensitive_dim, generator=gen))
        return FairInfoNCELoss(**{**common, "discretizer": disc, **kwargs})
    if name == "cclk":
        return CCLKLoss(**{**common, **kwargs})
    if name == "fare":
        return FARELoss(sensitive_dim, **{**common, **kwargs})
    if name == "sparse_fare":
        return SparseFARELoss(sensitive_dim, **{**common, "bucket_size": 64, **kwargs})
    if name == "sparse_fare_nb4":
        return SparseFARELoss(sensitive_dim, **{**common, "n_buckets": 4, **kwargs})
    raise ValueError(f"loss must be one of {LOSSES}, got {name!r}")


def loss_step(
    loss_fn: ContrastiveLoss,
    batch: int,
    *,
    dim: int = 128,
    sensitive: Tensor | None = None,
    sensitive_dim: int = 3,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> Callable[[], None]:
    """A closure running one loss forward+backward on fixed random embeddings ``[batch, dim]``.

    Args:
        sensitive: ``[batch, s]`` attributes; default Gaussian ``[batch, sensitive_dim]``.
    """
    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    z1 = torch.randn(batch, dim, generator=gen, dtype=dtype).to(device).requires_grad_(True)
    z2 = torch.randn(batch, dim, generator=gen, dtype=dtype).to(device).requires_grad_(True)
    sens = torch.randn(batch, sensitive_dim, generator=gen) if sensitive is None else sensitive
    sens = sens.to(device)
    loss_fn = loss_fn.to(device)
    params = [p for p in loss_fn.parameters() if p.requires_grad]

    def step() -> None:
        z1.grad = z2.grad = None
        for p in params:
            p.grad = None
        loss_fn(z1, z2, sens).backward()

    return step


def peak_bytes(step: Callable[[], None], device: torch.device | str) -> int:
    """Peak live tensor bytes of one ``step()`` above what was allocated before it."""
    device = torch.device(device)
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    with LiveTensorTracker() as tracker:
        step()
    return tracker.peak


_RSS_SCRIPT = """
import json, resource, sys, torch
from clusterformers.bench.cost import loss_step, make_loss


def peak_kib():
    # VmHWM belongs to this process's address space; ru_maxrss also counts the parent's peak at fork time.
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


name, batch, dim, s, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
if threads:
    torch.set_num_threads(threads)
torch.manual_seed(0)
step = loss_step(make_loss(name, s), batch, dim=dim, sensitive_dim=s)
before = peak_kib()
step()
sys.stdout.write(json.dumps(peak_kib() - before) + "\\n")
"""


def maxrss_increase(name: str, batch: int, *, dim: int = 128, sensitive_dim: int = 3, threads: int = 0) -> int:
    """Increase of the peak resident set (bytes) over one CPU loss forward+backward, run in a fresh Python
    process (inputs and loss built before the reading).

    Reads the process's own high-water mark (Linux ``VmHWM``), not ``ru_maxrss``: a child's ``ru_maxrss``
    starts at its parent's resident size at fork, so a large parent would hide the loss's memory.
    Elsewhere it falls back to ``ru_maxrss`` (KiB on Linux).
    """
    args = [sys.executable, "-c", _RSS_SCRIPT, name, str(batch), str(dim), str(sensitive_dim), str(threads)]
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"maxrss_increase({name!r}, {batch}) failed: {done.stderr.strip()[-500:]}")
    return int(json.loads(done.stdout.strip().splitlines()[-1])) * 1024


def cost_curve(
    batch_sizes: Sequence[int],
    losses: Sequence[str] = ("cclk", "fare", "sparse_fare"),
    device: torch.device | str = "cpu",
    reps: int | None = None,
    *,
    dim: int = 128,
    sensitive_dim: int = 3,
    sensitive: Callable[[int], Tensor] | None = None,
    timeout_s: float = 120.0,
    memory: bool = True,
    rss: bool = False,
    seed: int = 0,
) -> list[dict]:
    """Loss forward+backward time and peak memory per batch size (the cost study of ``docs/fare.md``).

    Args:
        batch_sizes: increasing batch sizes.
        losses: names from :data:`LOSSES`.
        device: where to run.
        reps: timed repetitions; ``None`` = 5, or 3 at ``b >= 4096``.
        sensitive: ``b → [b, s]`` attributes (e.g. ColorMNIST colours); default Gaussian.
        timeout_s: a loss whose warm-up call exceeds this is not run at larger batches.
        memory: also measure peak memory (one extra call).
        rss: also measure :func:`maxrss_increase` (CPU, Gaussian attributes; a fresh process per point).

    Returns:
        one dict per (loss, batch): ``loss``, ``batch``, ``time_s``, ``peak_bytes`` and ``rss_bytes`` (None
        if skipped or not measured), ``reps``, ``device``, ``skipped``.
    """
    device = torch.device(device)
    rows = []
    for name in losses:
        over = False
        for b in batch_sizes:
            row = {"loss": name, "batch": b, "time_s": None, "peak_bytes": None, "rss_bytes": None, "reps": 0,
                   "device": str(device)}
            if over:
                rows.append({**row, "skipped": True})
                continue
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                loss_fn = make_loss(name, sensitive_dim)
            sens = sensitive(b) if sensitive is not None else None
            step = loss_step(loss_fn, b, dim=dim, sensitive=sens, sensitive_dim=sensitive_dim, device=device, seed=seed)
            start = time.perf_counter()
            step()
            synchronize(device)
            first = time.perf_counter() - start
            n = reps if reps is not None else (3 if b >= 4096 else 5)
            if first > timeout_s:
                over = True
                logger.warning(
                    "%s at b=%d took %.0f s > timeout %.0f s: larger batches skipped", name, b, first, timeout_s
                )
                rows.append({**row, "time_s": first, "reps": 1, "skipped": False})
                continue
            row["time_s"] = time_fn(step, warmup=0, reps=n, device=device)
            row["reps"] = n
            if memory:
                row["peak_bytes"] = peak_bytes(step, device)
            if rss and device.type == "cpu" and sensitive is None:
                row["rss_bytes"] = maxrss_increase(name, b, dim=dim, sensitive_dim=sensitive_dim,
                                                   threads=torch.get_num_threads())
            rows.append({**row, "skipped": False})
            logger.info("%s b=%d: %.4f s, peak %s bytes", name, b, row["time_s"], row["peak_bytes"])
    return rows


def loglog_slope(rows: Sequence[dict], loss: str, key: str = "time_s", min_batch: int = 1024) -> float:
    """Least-squares slope of ``log(key)`` on ``log(batch)`` for one loss, batches ``>= min_batch``."""
    pts = [
        (math.log(r["batch"]), math.log(r[key]))
        for r in rows
        if r["loss"] == loss and r["batch"] >= min_batch and r.get(key) and not r.get("skipped")
    ]
    if len(pts) < 2:
        return float("nan")
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)
