"""MoE overhead: the AC router against StableMoE, and our dispatch against HuggingFace's Mixtral block.

Two comparisons at E=16, k=2, d=256, d_ff=512, 8,192 tokens, float32 (the sizes of the AC-MoE overhead
study in ``docs/acmoe.md``), median of ``reps`` runs after warm-up (``bench/common.py`` ``time_fn``, the
variants alternating run by run so that load on a shared machine hits all):

- ``ac_overhead``: ``MoE(router="ac")`` with a previous routing state vs ``MoE(router="stablemoe")`` (the
  same layer with M = I), forward + backward, dropless. Target <= 1.05.
- ``dispatch_fwd`` / ``dispatch_fwd_bwd``: ``MoE`` with gated (SwiGLU) experts and Mixtral's router
  (bias-free linear, softmax over the selected) vs ``transformers``' ``MixtralSparseMoeBlock`` holding the
  same weights; tokens/s in ``extra``. Skipped, with a record saying why, when transformers is absent.

Run ``python bench/moe.py [--quick] [--device cpu|cuda|auto] [--threads T] [--json]``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import torch
from common import device_of, interleaved, parse_args, record  # bench/common.py: the script's folder is on sys.path

from clusterformers.moe import MoE, Router

E, K, D, D_FF, T = 16, 2, 256, 512, 8192
SHAPE = f"E={E} k={K} d={D} d_ff={D_FF} T={T}"
TARGET_AC = 1.05  # AC / StableMoE forward + backward


def _fwd_bwd(layer: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor, **kwargs) -> Callable[[], None]:
    def step() -> None:
        layer(x, **kwargs).backward(grad)

    return step


def ac_overhead(dev: torch.device, warmup: int, reps: int, extra: dict) -> dict:
    """AC router (``lm`` preset, batch statistics, with a previous state) vs StableMoE, forward + backward."""
    torch.manual_seed(0)
    stable = MoE(D, E, K, D_FF, router="stablemoe").to(dev)
    ac = MoE(D, E, K, D_FF, router="ac").to(dev)
    ac.load_state_dict(stable.state_dict())
    x = torch.randn(T, D, device=dev, requires_grad=True)
    grad = torch.randn(T, D, device=dev)
    with torch.no_grad():
        prev = MoE(D, E, K, D_FF).to(dev).router(x).state  # a previous layer's routing
    times = interleaved(
        {"ac": _fwd_bwd(ac, x, grad, prev=prev), "stable": _fwd_bwd(stable, x, grad)}, warmup, reps, dev
    )
    ratio = times["ac"] / times["stable"]
    return record(
        "ac_overhead",
        times["ac"],
        times["stable"],
        "stablemoe",
        SHAPE,
        target=f"<={TARGET_AC}",
        met=ratio <= TARGET_AC,
        **extra,
    )


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
                target="<=1.0",
                met=times["ours"] <= times["hf"],
                tokens_per_s=T / times["ours"],
                baseline_tokens_per_s=T / times["hf"],
                max_abs_diff=diff,
                **extra,
            )
        )
    return rows


def run(quick: bool = False, device: str = "auto", threads: int | None = None) -> list[dict]:
    """AC overhead and dispatch throughput records (``bench/common.record`` + ``target``, ``met``, ``device``,
    ``threads``, ``reps``); quick: fewer repetitions."""
    dev = device_of(device)
    threads = threads or min(8, os.cpu_count() or 1)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        if quick:
            warmup, reps = 2, 5
        else:
            warmup, reps = (10, 50) if dev.type == "cuda" else (3, 15)
        extra = {"threads": threads, "device": str(dev), "dtype": "float32", "reps": reps}
        return [ac_overhead(dev, warmup, reps, extra), *dispatch_vs_mixtral(dev, warmup, reps, extra)]
    finally:
        torch.set_num_threads(previous)


def _table(rows: list[dict]) -> str:
    head = f"{'name':<18}{'ours ms':>10}{'base ms':>10}{'ratio':>8}  {'baseline':<36}{'target':<8}met"
    lines = [head, "-" * len(head)]
    for r in rows:
        if "skipped" in r:
            lines.append(f"{r['name']:<18}skipped: {r['skipped']}")
            continue
        lines.append(
            f"{r['name']:<18}{1e3 * r['ours_s']:>10.2f}{1e3 * r['baseline_s']:>10.2f}{r['ratio']:>8.3f}  "
            f"{r['baseline']:<36}{r['target']:<8}{'yes' if r['met'] else 'NO'}"
        )
    if rows:
        lines.append(f"{SHAPE}, device {rows[0]['device']}, threads {rows[0]['threads']}, float32")
    return "\n".join(lines)


def main() -> None:
    args = parse_args(__doc__)
    rows = run(quick=args.quick, device=args.device, threads=args.threads)
    print("\n".join(json.dumps(r) for r in rows) if args.json else _table(rows))


if __name__ == "__main__":
    main()
