"""MoE cost: the AC router against StableMoE, expert compute against E and against a dense GEMM, and our
dispatch against HuggingFace's Mixtral block.

Float32, forward + backward unless named ``_fwd``, dropless, ``reps`` rounds after warm-up with the variants
alternating run by run (``common.interleaved``; the ratio is the median of the round ratios, with its interval):

- ``ac_overhead``: ``MoE(router="ac")`` with a previous routing state vs ``MoE(router="stablemoe")`` (the
  same layer with M = I) at E=16, k=2, d=256, d_ff=512, 8,192 tokens. Target <= 1.02 (<= 1.05 on CUDA).
- ``experts/E=<E>``: the StableMoE layer at E experts vs the same layer at E = 8, at fixed k, tokens and
  widths: the work is the same, so the cost should not grow with E. Target <= 1.10.
- ``moe_router/E=<E>``, ``moe_experts/E=<E>``: the router alone and the grouped expert MLP alone at E vs at
  E = 8 (no targets): where the growth with E comes from.
- ``experts_vs_dense/E=<E>``: the layer vs one dense two-layer MLP on the ``k·T`` rows it routes (the same
  active FLOPs, no routing). Target <= 1.10.
- ``dispatch_fwd`` / ``dispatch_fwd_bwd``: ``MoE`` with gated (SwiGLU) experts and Mixtral's router
  (bias-free linear, softmax over the selected) vs ``transformers``' ``MixtralSparseMoeBlock`` holding the
  same weights; tokens/s in the row. Skipped, with a row saying why, when transformers is absent.

``clusterformers bench --only moe`` runs it.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F

from clusterformers.bench.common import interleaved, record
from clusterformers.moe import MoE, Router
from clusterformers.moe.layer import sort_by_expert

E, K, D, D_FF, T = 16, 2, 256, 512, 8192
SHAPE = f"E={E} k={K} d={D} d_ff={D_FF} T={T}"
TARGET_EXPERTS = 1.10  # E sweep and MoE / dense GEMM


def _fwd_bwd(layer: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor, **kwargs) -> Callable[[], None]:
    def step() -> None:
        layer(x, **kwargs).backward(grad)

    return step


def ac_overhead(dev: torch.device, warmup: int, reps: int, extra: dict) -> dict:
    """AC router (``lm`` preset, batch statistics, with a previous state) vs StableMoE, forward + backward."""
    torch.manual_seed(0)
    stable = MoE(D, E, K, D_FF, router="stablemoe").to(dev)
    ac = MoE(D, E, K, D_FF, router="ac").to(dev)
    ac.load_state_dict(stable.state_dict(), strict=False)  # AC adds only its running-statistic buffers
    x = torch.randn(T, D, device=dev, requires_grad=True)
    grad = torch.randn(T, D, device=dev)
    with torch.no_grad():
        prev = MoE(D, E, K, D_FF).to(dev).router(x).state  # a previous layer's routing
    times = interleaved(
        {"ac": _fwd_bwd(ac, x, grad, prev=prev), "stable": _fwd_bwd(stable, x, grad)}, warmup, reps, dev
    )
    target = 1.05 if dev.type == "cuda" else 1.02
    return record("ac_overhead", times["ac"], times["stable"], "stablemoe", SHAPE, target, **extra)


def _router_and_experts(layer: MoE, x: torch.Tensor) -> tuple[Callable[[], None], Callable[[], None]]:
    """Forward + backward of ``layer``'s router alone (into its gate weights) and of its grouped expert MLP
    alone, on the rows sorted by expert as this ``x`` routes them."""
    def router() -> None:
        layer.router.select(x).weights.sum().backward()

    with torch.no_grad():
        _, token, counts = sort_by_expert(layer.router.select(x).indices, layer.num_experts)
        rows = x[token]
    rows.requires_grad_(True)
    rows_grad = torch.randn_like(rows)

    def experts() -> None:
        layer.experts.grouped(rows, counts).backward(rows_grad)

    return router, experts


def expert_sweep(dev: torch.device, warmup: int, reps: int, extra: dict, tokens: int,
                 experts: tuple[int, ...]) -> list[dict]:
    """StableMoE layers at each E in ``experts`` (first = the reference E) and the dense MLP on ``k·tokens``
    rows, forward + backward on the same input."""
    torch.manual_seed(0)
    x = torch.randn(tokens, D, device=dev, requires_grad=True)
    grad = torch.randn(tokens, D, device=dev)
    layers = {e: MoE(D, e, K, D_FF, router="stablemoe").to(dev) for e in experts}
    w_in = torch.randn(D, D_FF, device=dev, requires_grad=True)
    w_out = torch.randn(D_FF, D, device=dev, requires_grad=True)
    rows_in = torch.randn(K * tokens, D, device=dev, requires_grad=True)
    rows_grad = torch.randn(K * tokens, D, device=dev)

    def dense() -> None:
        (F.gelu(rows_in @ w_in) @ w_out).backward(rows_grad)

    steps = {f"E={e}": _fwd_bwd(layer, x, grad) for e, layer in layers.items()}
    pieces = {}
    for e, layer in layers.items():
        pieces[f"router E={e}"], pieces[f"experts E={e}"] = _router_and_experts(layer, x)
    times = interleaved({**steps, **pieces, "dense": dense}, warmup, reps, dev)
    shape = f"k={K} d={D} d_ff={D_FF} T={tokens}"
    first = f"E={experts[0]}"
    rows = [record(f"experts/{name}", times[name], times[first], f"the same layer at {first}", shape,
                   TARGET_EXPERTS, **extra) for name in steps if name != first]
    for piece in ("router", "experts"):  # where the growth comes from: no targets
        rows += [record(f"moe_{piece}/{name}", times[f"{piece} {name}"], times[f"{piece} {first}"],
                        f"the same {piece} at {first}", shape, **extra) for name in steps if name != first]
    rows += [record(f"experts_vs_dense/{name}", times[name], times["dense"], f"dense MLP on k·T={K * tokens} rows",
                    shape, TARGET_EXPERTS, **extra) for name in steps if name in ("E=64", "E=128")]
    return rows


def _mixtral_pair(dev: torch.device):
    """Our MoE and HF's MixtralSparseMoeBlock with the same weights (gated experts, Mixtral's router)."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    config = MixtralConfig(
        hidden_size=D, intermediate_size=D_FF, num_local_experts=E, num_experts_per_tok=K, hidden_act="silu"
    )
    config._experts_implementation = "eager"  # HF's default per-expert loop (and no warning about it)
    hf = MixtralSparseMoeBlock(config)
    torch.manual_seed(1)
    ours = MoE(D, E, K, D_FF, router=Router(D, E, K, "linear_nobias", "softmax_selected"), gated=True)
    with torch.no_grad():
        hf.gate.weight.copy_(ours.router.linear.weight)
        hf.experts.gate_up_proj.copy_(ours.experts.w_in.transpose(1, 2))
        hf.experts.down_proj.copy_(ours.experts.w_out.transpose(1, 2))
    return ours.to(dev), hf.to(dev)


def dispatch_vs_mixtral(dev: torch.device, warmup: int, reps: int, extra: dict) -> list[dict]:
    """Forward and forward + backward time of our dropless dispatch vs HF's expert loop; tokens/s in extra."""
    try:
        ours, hf = _mixtral_pair(dev)
    except ImportError as err:
        reason = f"transformers is not importable ({err}); pip install 'clusterformers[bench]'"
        return [{"name": "dispatch_vs_mixtral", "skipped": reason, "shape": SHAPE, **extra}]
    x = torch.randn(8, T // 8, D, device=dev, requires_grad=True)
    grad = torch.randn_like(x)
    with torch.no_grad():
        diff = (ours(x) - hf(x)).abs().max().item()

    def fwd(layer: torch.nn.Module) -> Callable[[], None]:
        def step() -> None:
            with torch.no_grad():
                layer(x)

        return step

    rows = []
    for name, steps in [
        ("dispatch_fwd", {"ours": fwd(ours), "hf": fwd(hf)}),
        ("dispatch_fwd_bwd", {"ours": _fwd_bwd(ours, x, grad), "hf": _fwd_bwd(hf, x, grad)}),
    ]:
        times = interleaved(steps, warmup, reps, dev)
        rows.append(
            record(
                name,
                times["ours"],
                times["hf"],
                "transformers MixtralSparseMoeBlock",
                SHAPE + " gated",
                1.0,
                tokens_per_s=T / statistics.median(times["ours"]),
                baseline_tokens_per_s=T / statistics.median(times["hf"]),
                max_abs_diff=diff,
                **extra,
            )
        )
    return rows


def run(quick: bool, device: torch.device, threads: int) -> list[dict]:
    """AC overhead, the E sweep and dispatch throughput records (``common.record`` + ``device``, ``threads``,
    ``reps``); quick: fewer repetitions, 2,048 tokens in the sweep and E ∈ {8, 128} only."""
    if quick:
        warmup, reps = 2, 5
    else:
        warmup, reps = (10, 50) if device.type == "cuda" else (3, 15)
    extra = {"threads": threads, "device": str(device), "dtype": "float32", "reps": reps}
    sweep = expert_sweep(device, warmup, reps, extra, 2048 if quick else T, (8, 128) if quick else (8, 32, 64, 128))
    return [ac_overhead(device, warmup, reps, extra), *sweep, *dispatch_vs_mixtral(device, warmup, reps, extra)]
