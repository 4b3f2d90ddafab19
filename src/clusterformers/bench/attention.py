"""Elliptical Attention overhead: forward + backward time against plain SDPA and a dense reference-style path.

Three comparisons, float32, forward + backward, ``reps`` rounds after warm-up with the variants alternating
(``common.interleaved``; the ratio is the median of the round ratios, with its interval):

- ``core``: the elliptical core (metric from ``v, v_prev``, ``q ⊙ m``, SDPA) vs SDPA on the same ``q, k, v``.
- ``module``: :class:`EllipticalAttention` with ``v_prev`` vs :class:`MultiheadAttention` (dim 512).
- ``dense``: our core vs the reference code's way (``diag_embed`` ``[B,H,D,D]`` matmul for ``q M``, the
  masked score matrix materialised, an unfused softmax, ``@ v``; like the reference it uses the
  whole-segment mean, also when causal).

Targets on ``core``: at N = 512, <= 1.03 non-causal and <= 1.05 causal (<= 1.10 on CUDA); at N = 2048,
<= 1.02 and <= 1.03. ``clusterformers bench --only attention`` runs it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from clusterformers.attention import EllipticalAttention, MultiheadAttention, elliptical_metric
from clusterformers.bench.common import interleaved, record

B, H, D = 8, 8, 64
TARGET_DENSE = 1 / 3  # ours / dense reference-style path: fusing q ⊙ m into SDPA should be at least 3x faster
TARGET_MODULE = 1.05  # EllipticalAttention / MultiheadAttention


def core_target(n: int, causal: bool, device: torch.device) -> float:
    """The bound on elliptical core ÷ SDPA."""
    if device.type == "cuda":
        return 1.10
    if n >= 2048:
        return 1.03 if causal else 1.02
    return 1.05 if causal else 1.03


def dense_reference(q: Tensor, k: Tensor, v: Tensor, v_prev: Tensor, causal: bool) -> Tensor:
    """The reference implementation's arithmetic: dense ``M``, explicit scores, unfused softmax.

    ``q, k, v, v_prev``: ``[B, H, N, D]`` → ``[B, H, N, D]``. ``m`` is the detached whole-segment mean.
    """
    n, dim = q.shape[-2:]
    with torch.no_grad():
        s = (v - v_prev).abs().mean(dim=2)  # [B, H, D]
        m = s / s.amax(dim=-1, keepdim=True)
    qm = q @ torch.diag_embed(m)  # [B, H, N, D] @ [B, H, D, D]
    scores = qm @ k.transpose(-1, -2) / math.sqrt(dim)
    if causal:
        future = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def elliptical_core(q: Tensor, k: Tensor, v: Tensor, v_prev: Tensor, causal: bool) -> Tensor:
    """What :class:`EllipticalAttention` does between the projections."""
    m = elliptical_metric(v, v_prev, causal=causal)
    return F.scaled_dot_product_attention(q * m, k, v, is_causal=causal)


def plain_core(q: Tensor, k: Tensor, v: Tensor, v_prev: Tensor, causal: bool) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def _fwd_bwd(fn: Callable[[], Tensor], inputs: list[Tensor], grad: Tensor) -> Callable[[], None]:
    def step() -> None:
        torch.autograd.grad(fn(), inputs, grad)

    return step


def _core_records(n: int, causal: bool, device: torch.device, warmup: int, reps: int, extra: dict) -> list:
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v, v_prev = (torch.randn(B, H, n, D, device=device, generator=g) for _ in range(4))
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    grad = torch.randn(B, H, n, D, device=device, generator=g)
    steps = {
        name: _fwd_bwd(lambda f=f: f(q, k, v, v_prev, causal), [q, k, v], grad)
        for name, f in (("sdpa", plain_core), ("elliptical", elliptical_core), ("reference", dense_reference))
    }
    times = interleaved(steps, warmup, reps, device)
    shape = f"B={B} H={H} N={n} D={D}"
    tag = "causal" if causal else "noncausal"
    ours = times["elliptical"]
    return [
        record(f"core/{tag}", ours, times["sdpa"], "sdpa", shape, core_target(n, causal, device), **extra),
        record(f"dense/{tag}", ours, times["reference"], "reference", shape, TARGET_DENSE, **extra),
    ]


def _module_record(n: int, causal: bool, device: torch.device, warmup: int, reps: int, extra: dict) -> dict:
    dim = H * D
    plain = MultiheadAttention(dim, H, causal=causal).to(device)
    ours = EllipticalAttention(dim, H, causal=causal).to(device)
    ours.load_state_dict(plain.state_dict())
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(B, n, dim, device=device, generator=g, requires_grad=True)
    v_prev = torch.randn(B, H, n, D, device=device, generator=g)
    grad = torch.randn(B, n, dim, device=device, generator=g)

    steps = {
        name: _fwd_bwd(lambda layer=layer: layer(x, v_prev=v_prev), [x, *layer.parameters()], grad)
        for name, layer in (("plain", plain), ("ours", ours))
    }
    times = interleaved(steps, warmup, reps, device)
    t_plain, t_ours = times["plain"], times["ours"]
    name, shape = f"module/{'causal' if causal else 'noncausal'}", f"B={B} N={n} dim={dim} H={H}"
    return record(name, t_ours, t_plain, "MultiheadAttention", shape, TARGET_MODULE, **extra)


def run(quick: bool, device: torch.device, threads: int) -> list[dict]:
    """Forward + backward timings at ``B=8, H=8, D=64``, ``N ∈ {512, 2048}`` (quick: 512 only, fewer reps);
    records of :func:`~clusterformers.bench.common.record` with ``threads``, ``device`` and ``reps``."""
    rows = []
    for n in (512,) if quick else (512, 2048):
        # CPU at N=2048 costs seconds per step: fewer rounds there, but 9 rather than 5, since the same step
        # scatters by ±5% from round to round and the elliptical overhead there is 1-3%
        if quick:
            warmup, reps = 2, 5
        else:
            warmup, reps = (2, 9) if device.type == "cpu" and n > 512 else (5, 20)
        extra = {"threads": threads, "device": str(device), "dtype": "float32", "reps": reps}
        for causal in (False, True):
            rows += _core_records(n, causal, device, warmup, reps, extra)
            rows.append(_module_record(n, causal, device, warmup, reps, extra))
    return rows
