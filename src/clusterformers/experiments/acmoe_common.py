"""What the three AC-MoE studies share: the router arms, paired initialisation, routing capture and curves.

Every arm is the same model with another router (``ffn_kwargs`` of ``models.ffn.build_ffn``). AC arms train
with ``stats="ema"`` in the non-causal studies: training uses the batch statistics exactly as the papers'
``stats="batch"`` does, and evaluation (eval mode) uses the running dispersions, so no test item affects
another. The language models use ``stats="running"`` (causal) throughout.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from clusterformers.moe import MoE, SoftMoE
from clusterformers.train import TrainConfig, TrainResult, train

# arm name -> MoE options (JSON-able ffn_kwargs fragment). "ac" is the LM preset, the default AC arm.
ARMS: dict[str, dict[str, Any]] = {
    "smoe": {"router": "smoe"},
    "xmoe": {"router": "xmoe"},
    "stablemoe": {"router": "stablemoe"},
    "ac": {"router": "ac", "ac": {"preset": "lm", "stats": "ema"}},
    "ac-swin": {"router": "ac", "ac": {"preset": "swin", "stats": "ema"}},
    "ac-var": {"router": "ac", "ac": {"preset": "lm", "dispersion": "var", "stats": "ema"}},
    "ac-global": {"router": "ac", "ac": {"preset": "lm", "norm": "global", "stats": "ema"}},
    "ac-moe-input": {"router": "ac", "ac": {"preset": "lm", "apply_to": "moe_input", "stats": "ema"}},
    "ac-unmasked": {"router": "ac", "ac": {"preset": "lm", "mask_invalid": False, "stats": "ema"}},
}

ARM_NOTES = {
    "smoe": "linear gate with bias (W h + b)",
    "xmoe": "cosine router, 8-d projection, learnable temperature",
    "stablemoe": "h·ê_k, i.e. the AC router with M = I (like-for-like baseline)",
    "ac": "AC, `lm` preset: MAD, ε=1e-4, τ=10, feature normalisation, M on the router input",
    "ac-swin": "AC, `swin` preset: bias-free linear score, softmax over all E, global normalisation τ=1.5, "
               "M on the whole MoE input",
    "ac-var": "AC `lm` with variance instead of MAD",
    "ac-global": "AC `lm` with global (pre-clamp) instead of per-feature normalisation",
    "ac-moe-input": "AC `lm` with M applied to the experts' input too",
    "ac-unmasked": "AC `lm` without masking empty/singleton clusters (the reference formula)",
}

PRESET_ARMS = ("ac", "ac-swin")  # the AC routers the claims are about; the other ac-* arms are ablations


def check_arms(arms: Sequence[str]) -> None:
    """Every arm must be known, and ``stablemoe`` (M = I) must be present (the like-for-like baseline)."""
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise ValueError(f"arms: unknown {unknown}, expected names from {sorted(ARMS)}")
    if "stablemoe" not in arms:
        raise ValueError(f"arms: 'stablemoe' (AC with M = I) must be in every table, got {list(arms)}")


def arm_options(arm: str, stats: str | None = None) -> dict[str, Any]:
    """The MoE options of ``arm``; ``stats`` replaces the AC statistics mode of an AC arm (e.g. ``"running"``
    for a causal model)."""
    options = copy.deepcopy(ARMS[arm])
    if stats is not None and "ac" in options:
        options["ac"]["stats"] = stats
    return options


def ac_arms(arms: Sequence[str]) -> list[str]:
    return [a for a in arms if a.startswith("ac")]


def moe_layers(model: nn.Module) -> list[MoE | SoftMoE]:
    """The model's MoE layers in execution (construction) order."""
    return [m for m in model.modules() if isinstance(m, (MoE, SoftMoE))]


def shared_init(model: nn.Module, build: Callable[[], nn.Module], seed: int) -> nn.Module:
    """Pair the initialisation across arms: copy every parameter and buffer that a ``stablemoe`` build under
    the same seed has with the same name and shape (everything but a differing router)."""
    torch.manual_seed(seed)
    reference = build().state_dict()
    own = model.state_dict()
    shared = {k: v for k, v in reference.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(shared, strict=False)
    return model


def routing_of(model: nn.Module) -> list[Tensor]:
    """The sorted expert indices ``[T, k]`` of every MoE layer's last forward (on the CPU)."""
    return [layer.last_state.indices[:, : getattr(layer, "top_k", 1)].cpu() for layer in moe_layers(model)]


def train_cell(model: nn.Module, loss_fn: Callable, batch_fn: Callable, tcfg: TrainConfig, cell_dir: Path,
               config: dict, eval_fn: Callable | None = None) -> TrainResult:
    """Train one (arm, seed) cell in ``cell_dir``, resuming from its checkpoint if a killed run left one."""
    return train(model, loss_fn, batch_fn, tcfg, out_dir=cell_dir, eval_fn=eval_fn,
                 resume=(cell_dir / "state.json").exists(), extra_config=config)


def eval_curve(history: Sequence[dict], key: str) -> tuple[list[int], list[float]]:
    """``(steps, values)`` of the rows of a training history that hold ``eval_<key>``."""
    rows = [r for r in history if f"eval_{key}" in r]
    return [int(r["step"]) for r in rows], [float(r[f"eval_{key}"]) for r in rows]


def steps_to_reach(steps: Sequence[int], values: Sequence[float], threshold: float) -> int | None:
    """The first evaluated step whose value is ``<= threshold``; None if the curve never gets there."""
    return next((s for s, v in zip(steps, values, strict=True) if v <= threshold), None)


def fmt_steps(values: Sequence[int | None], total: int) -> str:
    """Median steps over the seeds that reached the target, and how many did (``–`` if none)."""
    reached = sorted(v for v in values if v is not None)
    if not reached:
        return f"not reached in {total} steps (0/{len(values)})"
    mid = len(reached) // 2
    median = reached[mid] if len(reached) % 2 else (reached[mid - 1] + reached[mid]) / 2
    return f"{median:g} ({len(reached)}/{len(values)} seeds)"
