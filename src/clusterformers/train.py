"""One training loop for every experiment: progress bar, CSV/TensorBoard logs, checkpoints, exact resume, DDP.

A run is ``train(model, loss_fn, batch_fn, cfg, out_dir)``. The caller owns the model (and its
initialisation), the data (``batch_fn(step, rank, world)``, deterministic in its arguments) and the loss
(``loss_fn(model, batch) -> (loss, metrics)``); this module owns everything else.

Run directory (``out_dir``), written by rank 0 only:

- ``config.json``: ``{"train": dataclasses.asdict(cfg), "extra": extra_config}``. Experiments pass their
  own config as ``extra_config`` instead of writing ``config.json`` themselves.
- ``metrics.csv``: one row per logged step: ``step, lr, loss, <train metrics>, grad_norm, eval_<metric>``.
  Train values are means over the steps since the previous row (and over ranks). A row is written every
  ``log_every`` steps, at every eval and at the step where the call stops. A new column rewrites the file
  with the wider header (atomically); on resume rows after the checkpoint's step are dropped, so a step
  never appears twice.
- TensorBoard events (tags ``train/<k>``, ``eval/<k>``) only when ``tensorboard`` is importable.
- ``checkpoint.safetensors``, ``optimizer.safetensors`` and ``state.json``: model and ``extra_params``,
  optimizer state, step, the RNG states of every rank and the config, written atomically and never
  unpickled (format in :mod:`clusterformers.checkpoint`).

Exact resume: the learning rate is a function of the step, batches are a function of the step, and the
checkpoint restores parameters, optimizer state and every RNG bitwise, so a run interrupted at any step
and resumed ends with bitwise the same parameters as an uninterrupted one (same device and world size).
``eval_fn`` runs with forked RNG states, so evaluating (or not, or how often) never changes training.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm import tqdm

from clusterformers.checkpoint import (
    MODEL_FILE,
    STATE_FILE,
    CheckpointError,
    RunLock,
    atomic_write,
    gather_sharded,
    load_checkpoint,
    remove_stale_temporaries,
    restore_checkpoint,
    rng_capture,
    rng_restore,
    rng_to_json,
    save_checkpoint,
    sharded_parameters,
    write_checkpoint,
    write_json,
)
from clusterformers.distributed import (
    all_gather_json,
    mean_over_ranks,
    setup_distributed,
    sync_extra_grads,
    unwrap_model,
)

logger = logging.getLogger(__name__)

__all__ = [
    "CheckpointError",
    "TrainConfig",
    "TrainResult",
    "load_checkpoint",
    "lr_at",
    "move_to_device",
    "resolve_device",
    "save_checkpoint",
    "seed_everything",
    "train",
    "unwrap_model",
]

METRICS_FILE = "metrics.csv"
CONFIG_FILE = "config.json"
_RESERVED = ("step", "lr", "loss", "grad_norm")
# Config fields that may differ between a run and its resumption without a warning.
_RUN_ONLY_FIELDS = ("progress", "stop_at", "max_time", "name", "device", "log_every", "eval_every",
                    "ckpt_every")


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run (CLI flags map to these fields).

    steps: total optimizer steps of the run; the schedule is defined over them.
    lr, warmup_steps, schedule, min_lr_ratio: see :func:`lr_at`.
    weight_decay: applied to parameters with ``ndim >= 2`` only (weight matrices, conv kernels and, as
        in nanoGPT, embedding tables); never to biases, norm gains, other 1-D/0-D tensors or
        ``extra_params``. With ``optimizer="adam"`` it is L2 (coupled), with ``"adamw"`` decoupled.
    grad_clip: max global L2 norm over all trained parameters; ``<= 0`` disables clipping.
    optimizer, betas, eps: ``"adamw"`` or ``"adam"`` (torch.optim) and their constants.
    log_every: a metrics row every this many steps (>= 1). eval_every / ckpt_every: every this many
        steps, ``0`` = only at the end (the end always gets an eval, if ``eval_fn`` is given, and a
        checkpoint, if ``out_dir`` is given).
    seed: training randomness (dropout, anything drawn in ``loss_fn``) is seeded with ``seed + rank`` at
        the start of a fresh run. Model initialisation is the caller's.
    device: ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"``.
    progress: show a tqdm bar (rank 0 only).
    find_unused_parameters: passed to DistributedDataParallel.
    stop_at: stop (with a checkpoint and an eval) once this many steps are done, keeping the schedule of
        ``steps``; resume later to finish. ``None`` = run to ``steps``.
    max_time: stop the same way after this many seconds of wall time in this call (all ranks agree).
    name: label for the progress bar and logs.
    """

    steps: int
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "cosine"
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    optimizer: str = "adamw"
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    log_every: int = 50
    eval_every: int = 0
    ckpt_every: int = 0
    seed: int = 0
    device: str = "auto"
    progress: bool = True
    find_unused_parameters: bool = False
    stop_at: int | None = None
    max_time: float | None = None
    name: str = ""

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # a JSON round trip gives a list
        checks = [
            ("steps", self.steps, isinstance(self.steps, int) and self.steps >= 1, "an int >= 1"),
            ("lr", self.lr, self.lr > 0, "> 0"),
            ("weight_decay", self.weight_decay, self.weight_decay >= 0, ">= 0"),
            ("warmup_steps", self.warmup_steps, 0 <= self.warmup_steps <= self.steps, "in [0, steps]"),
            ("schedule", self.schedule, self.schedule in ("cosine", "constant"), "'cosine' or 'constant'"),
            ("min_lr_ratio", self.min_lr_ratio, 0 <= self.min_lr_ratio <= 1, "in [0, 1]"),
            ("optimizer", self.optimizer, self.optimizer in ("adamw", "adam"), "'adamw' or 'adam'"),
            ("betas", self.betas, len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
             "two floats in [0, 1)"),
            ("eps", self.eps, self.eps > 0, "> 0"),
            ("log_every", self.log_every, self.log_every >= 1, ">= 1"),
            ("eval_every", self.eval_every, self.eval_every >= 0, ">= 0"),
            ("ckpt_every", self.ckpt_every, self.ckpt_every >= 0, ">= 0"),
            ("stop_at", self.stop_at, self.stop_at is None or self.stop_at >= 1, "None or >= 1"),
            ("max_time", self.max_time, self.max_time is None or self.max_time > 0, "None or > 0"),
        ]
        for name, value, ok, expected in checks:
            if not ok:
                raise ValueError(f"TrainConfig.{name}: got {value!r}, expected {expected}")


@dataclass
class TrainResult:
    """What :func:`train` returns.

    step: optimizer steps done (including those before a resume). finished: ``step == cfg.steps``.
    history: every metrics row of the run (earlier rows read back from ``metrics.csv`` on resume), as
        ``{"step": int, "lr": float, "loss": float, ...}``. eval: the last ``eval_fn`` metrics (raw keys).
    wall_time: seconds spent in this call.
    """

    step: int
    history: list[dict[str, float]]
    eval: dict[str, float]
    wall_time: float
    finished: bool


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of the optimizer step with 0-based index ``step``; a pure function, so resume is exact.

    Warm-up: ``lr * (step + 1) / warmup_steps`` for ``step < warmup_steps`` (never 0; reaches ``lr`` at
    ``step = warmup_steps - 1``). Then ``"constant"`` keeps ``lr``; ``"cosine"`` is
    ``min_lr + (lr - min_lr) * (1 + cos(pi * t)) / 2`` with ``t = (step - warmup) / (steps - warmup)``
    and ``min_lr = lr * min_lr_ratio``: it starts at ``lr`` and would reach ``min_lr`` exactly at
    ``step = steps``, just after the last step, so no step is spent at the floor.
    """
    if step < 0:
        raise ValueError(f"lr_at: step must be >= 0, got {step}")
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    min_lr = cfg.lr * cfg.min_lr_ratio
    span = cfg.steps - cfg.warmup_steps
    t = min(1.0, (step - cfg.warmup_steps) / span) if span > 0 else 1.0
    return min_lr + 0.5 * (cfg.lr - min_lr) * (1.0 + math.cos(math.pi * t))


_DEVICES = "'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"`` -> CUDA if available else CPU; otherwise parse and check ``device`` is usable.

    Accepts ``cpu``, ``cuda``, ``cuda:N``, ``mps``. Raises ValueError naming ``device`` for an unknown
    string or an unavailable device (fail at start, not at the first ``.to``).
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device: got {device!r}, expected {_DEVICES}") from err
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device: got {device!r} but CUDA is not available; use 'auto' or 'cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device: got {device!r} but only {torch.cuda.device_count()} CUDA devices "
                             "exist")
        return dev
    if dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"device: got {device!r} but MPS is not available; use 'auto' or 'cpu'")
        return dev
    raise ValueError(f"device: got {device!r}, expected {_DEVICES}")


def seed_everything(seed: int) -> None:
    """Seed python's ``random``, numpy's global RNG and torch (CPU and every CUDA device).

    Does not switch on deterministic kernels (``torch.use_deterministic_algorithms``); that is the
    caller's choice, as it costs speed.
    """
    if not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ValueError(f"seed: got {seed!r}, expected an int in [0, 2**32)")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def move_to_device(batch: Any, device: torch.device) -> Any:
    """Move tensors in ``batch`` (a tensor or nested tuple/namedtuple/list/dict) to ``device``.

    Containers keep their type; anything else is returned unchanged.
    """
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=device.type == "cuda")
    if isinstance(batch, Mapping):
        moved = {k: move_to_device(v, device) for k, v in batch.items()}
        try:
            return type(batch)(moved)
        except TypeError:
            return moved
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(move_to_device(v, device) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(move_to_device(v, device) for v in batch)
    return batch


# --------------------------------------------------------------------------------------------- logging
class _MetricsLog:
    """``metrics.csv`` writer: appends rows, rewrites the file (atomically) when a column appears."""

    def __init__(self, path: Path, resume_step: int | None, write: bool) -> None:
        self.path, self.write = path, write
        self.columns: list[str] = []
        self.rows: list[dict[str, Any]] = []
        if resume_step is not None and path.is_file():
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                self.columns = list(reader.fieldnames or [])
                try:
                    self.rows = [_parse_row(r) for r in reader]
                except ValueError as err:
                    raise ValueError(f"{path}: line {reader.line_num} is not a metrics row ({err})") from err
            self.rows = [r for r in self.rows if r.get("step", 0) <= resume_step]
            if write:
                self._rewrite()
        elif write:
            path.unlink(missing_ok=True)

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if not self.write:
            return
        new = [k for k in row if k not in self.columns]
        if new or not self.path.is_file():
            self.columns += new
            self._rewrite()
            return
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.columns).writerow(row)

    def _rewrite(self) -> None:
        def write(tmp: Path) -> None:
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, self.columns)
                writer.writeheader()
                writer.writerows(self.rows)

        atomic_write(self.path, write)


def _parse_row(row: dict[str, str]) -> dict[str, float]:
    return {k: int(v) if k == "step" else float(v) for k, v in row.items() if v not in ("", None)}


def _tensorboard(out_dir: Path, purge_step: int | None) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        logger.debug("tensorboard is not installed; no TensorBoard events are written")
        return None
    return SummaryWriter(log_dir=str(out_dir), purge_step=purge_step)


class _Running:
    """Sums of loss/metrics since the last row, kept as tensors so logging syncs the device once."""

    def __init__(self) -> None:
        self.sums: dict[str, Any] = {}
        self.count = 0

    def add(self, values: dict[str, Any]) -> None:
        for k, v in values.items():
            v = v.detach().float() if isinstance(v, Tensor) else float(v)
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.count += 1

    def pop(self, world: int, device: torch.device) -> dict[str, float]:
        out = mean_over_ranks({k: v / self.count for k, v in self.sums.items()}, world, device)
        self.sums, self.count = {}, 0
        return out


# --------------------------------------------------------------------------------------------- training
def _optimizer(model: nn.Module, extra: list[Tensor], cfg: TrainConfig) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
              {"params": extra, "weight_decay": 0.0, "name": "extra"}]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("model: has no trainable parameters and extra_params is empty")
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


def _check_extra(extra_params: Iterable[Tensor], model: nn.Module, device: torch.device) -> list[Tensor]:
    """Dedupe, validate and move ``extra_params`` to ``device`` in place (``p.data``, so owners see it)."""
    in_model = {id(p) for p in model.parameters()}
    out: list[Tensor] = []
    for i, p in enumerate(extra_params):
        if not isinstance(p, Tensor) or not p.requires_grad or not p.is_leaf:
            desc = f"a tensor with requires_grad={p.requires_grad}, is_leaf={p.is_leaf}" if isinstance(
                p, Tensor) else type(p).__name__
            raise ValueError(f"extra_params[{i}]: expected a leaf tensor with requires_grad=True, got {desc}")
        if id(p) in in_model:
            raise ValueError(f"extra_params[{i}] (shape {tuple(p.shape)}) is already a parameter of model")
        if all(p is not q for q in out):
            if p.device != device:
                p.data = p.data.to(device)
            out.append(p)
    return out


def _run_eval(eval_fn: Callable[[nn.Module], dict[str, float]], model: nn.Module, device: torch.device,
              world: int) -> dict[str, float]:
    """``eval_fn(model)`` in eval mode under no_grad with forked RNGs, averaged over ranks; back to train."""
    py_state, np_state = random.getstate(), np.random.get_state()
    model.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
            metrics = eval_fn(model)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        model.train()
    if not isinstance(metrics, Mapping):
        raise TypeError(f"eval_fn must return a dict of floats, got {type(metrics).__name__}")
    return mean_over_ranks(dict(metrics), world, device)


def _call_loss(loss_fn: Callable, net: nn.Module, batch: Any) -> tuple[Tensor, dict[str, Any]]:
    out = loss_fn(net, batch)
    if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], Tensor) and out[0].ndim == 0):
        raise TypeError(f"loss_fn(model, batch) must return (scalar loss Tensor, dict of metrics), got "
                        f"{type(out).__name__}")
    metrics = dict(out[1] or {})
    if bad := [k for k in metrics if k in _RESERVED or k.startswith("eval_")]:
        raise ValueError(f"loss_fn metrics: key {bad[0]!r} is reserved ({_RESERVED} and 'eval_*')")
    return out[0], metrics


def train(model: nn.Module, loss_fn: Callable[[nn.Module, Any], tuple[Tensor, dict[str, float]]],
          batch_fn: Callable[[int, int, int], Any], cfg: TrainConfig, out_dir: str | Path | None = None,
          eval_fn: Callable[[nn.Module], dict[str, float]] | None = None, resume: bool = False,
          extra_params: Iterable[Tensor] = (), *, extra_config: Any = None) -> TrainResult:
    """Train ``model`` for ``cfg.steps`` optimizer steps (see the module docstring for the files written).

    model: moved to the device in place; trained in train mode.
    loss_fn(model, batch) -> (scalar loss, {name: float or 0-d tensor}): under DDP ``model`` is the DDP
        wrapper (see :func:`unwrap_model`). Metric names must not be ``step/lr/loss/grad_norm`` or start
        with ``eval_``, and must be the same on every rank.
    batch_fn(step, rank, world) -> batch: deterministic in its arguments (this is what makes resume
        exact); moved to the device (tensors, nested tuples/lists/dicts).
    eval_fn(model) -> {name: float}: every ``cfg.eval_every`` steps and when the call stops, on the
        unwrapped model in eval mode under ``torch.no_grad()`` with forked RNGs, on every rank (results
        are averaged over ranks).
    out_dir: run directory (created); ``None`` = no files, no checkpoints.
    resume: continue from the checkpoint in ``out_dir`` (start fresh, with a log line, if there is none).
    extra_params: trainable tensors outside the model (e.g. a loss module's projections): optimised with
        the model, no weight decay, saved in the checkpoint, gradients averaged and values broadcast
        from rank 0 under DDP. Moved to the device in place.
    extra_config: JSON-able (dataclasses allowed) experiment config stored as ``config.json["extra"]``.

    DDP: under torchrun (``WORLD_SIZE > 1``) or an initialised process group, the model is wrapped in
    DistributedDataParallel (gloo on CPU, nccl on CUDA; a group created here is destroyed at the end).
    Only rank 0 writes files and shows progress; every rank reads the checkpoint on resume, so
    ``out_dir`` must be visible to all ranks. Each rank's RNG states are gathered into the checkpoint.
    After an exception the group is left initialised (destroying it while another rank waits in a
    collective can deadlock); the process is expected to exit.

    Interrupts: a KeyboardInterrupt saves a checkpoint at the last completed step (rank 0 only, with its
    own RNG state; if the interrupt lands inside ``optimizer.step()`` that update may be partial) and
    re-raises. Other exceptions propagate without saving, so they cannot overwrite the last good
    checkpoint with the state that failed. A non-finite mean loss at a logged step raises FloatingPointError.
    """
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"cfg: expected a TrainConfig, got {type(cfg).__name__}")
    if resume and out_dir is None:
        raise ValueError("resume=True needs out_dir (the run directory holding the checkpoint)")
    t0 = time.perf_counter()
    rank, world, device, created = setup_distributed(resolve_device(cfg.device))
    out = None if out_dir is None else Path(out_dir)
    if out is not None and out.exists() and not out.is_dir():
        raise ValueError(f"out_dir {str(out)!r} is a file, not a directory; pass a directory for the run")
    writer = out is not None and rank == 0  # only rank 0 writes files
    if writer:
        out.mkdir(parents=True, exist_ok=True)
    with RunLock(out) if writer else contextlib.nullcontext():
        if writer:
            for path in remove_stale_temporaries(out):
                logger.info("removed %s, left by an interrupted write", path)
        result = _train(model, loss_fn, batch_fn, cfg, out, eval_fn, resume, extra_params, extra_config, rank,
                        world, device, t0)
    if created:  # not after an exception: other ranks may be inside a collective (torchtitan#1342)
        dist.barrier()
        dist.destroy_process_group()
    return result


def _train(model: nn.Module, loss_fn: Callable, batch_fn: Callable, cfg: TrainConfig, out: Path | None,
           eval_fn: Callable | None, resume: bool, extra_params: Iterable[Tensor], extra_config: Any,
           rank: int, world: int, device: torch.device, t0: float) -> TrainResult:
    model.to(device)
    extra = _check_extra(extra_params, model, device)
    optimizer = _optimizer(model, extra, cfg)
    writing = rank == 0 and out is not None
    sharded = sharded_parameters(model)  # expert-parallel weights: a slice per rank
    config = json.loads(json.dumps(dataclasses.asdict(cfg)))  # as stored, for comparisons on resume
    if writing:  # train() has created the directory
        write_json(out / CONFIG_FILE, {"train": config, "extra": extra_config})
    start = 0
    resumed = resume and ((out / STATE_FILE).exists() or (out / MODEL_FILE).exists())
    if resumed:
        start, state = restore_checkpoint(model, out, extra, optimizer, strict=True, check_signature=True)
        assert state is not None
        if len(state["rng"]) != world:
            logger.warning("checkpoint has RNG states of %d ranks, the run has %d: resume is not exact",
                           len(state["rng"]), world)
        idx = rank % len(state["rng"])
        rng_restore(state["rng"][idx], out / STATE_FILE, f"rng[{idx}]")
        old = state.get("config") or {}
        changed = sorted(k for k in config if k not in _RUN_ONLY_FIELDS and k in old and old[k] != config[k])
        if changed:
            logger.warning("resuming with changed TrainConfig fields %s", changed)
        logger.info("resumed from %s at step %d", out, start)
    else:
        if resume:
            logger.info("no checkpoint in %s; starting a fresh run", out)
        elif writing and (out / STATE_FILE).exists():
            logger.warning("%s holds a checkpoint; starting fresh and overwriting it (resume=True continues)",
                           out)
        seed_everything(cfg.seed + rank)
    net: nn.Module = model
    if world > 1:
        for p in extra:
            dist.broadcast(p.data, src=0)
        ids = [device.index] if device.type == "cuda" else None
        if sharded:  # each rank holds other experts: DDP neither broadcasts nor averages them
            nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, list(sharded))
        net = nn.parallel.DistributedDataParallel(model, device_ids=ids,
                                                  find_unused_parameters=cfg.find_unused_parameters)
    log = _MetricsLog(out / METRICS_FILE, start if resumed else None, writing) if out is not None else None
    history = list(log.rows) if log is not None else []
    tb = _tensorboard(out, start + 1 if resumed else None) if writing else None
    params = [p for g in optimizer.param_groups for p in g["params"]]
    end = cfg.steps if cfg.stop_at is None else min(cfg.steps, cfg.stop_at)
    n_params = sum(p.numel() for p in params)
    logger.info("training %s: %d parameters on %s (world %d), steps %d -> %d of %d",
                cfg.name or "model", n_params, device, world, start, end, cfg.steps)
    step, eval_metrics, running = start, {}, _Running()
    pending_rng: dict[str, Any] | None = None
    bar = tqdm(total=cfg.steps, initial=start, desc=cfg.name or "train", dynamic_ncols=True,
               disable=not (cfg.progress and rank == 0))
    net.train()
    try:
        while step < end:
            pending_rng = rng_capture()  # the state to save if interrupted before this step completes
            batch = move_to_device(batch_fn(step, rank, world), device)
            loss, metrics = _call_loss(loss_fn, net, batch)
            loss.backward()
            if world > 1 and extra:
                sync_extra_grads(extra, world)
            if cfg.grad_clip > 0:
                metrics["grad_norm"] = _clip_grad_norm(params, cfg.grad_clip, sharded, model)
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
            step += 1
            pending_rng = None
            optimizer.zero_grad(set_to_none=True)
            running.add({"loss": loss, **metrics})
            bar.update(1)
            stopping = step == end or _time_up(cfg, t0, world, device)
            row: dict[str, Any] = {}
            if step % cfg.log_every == 0 or stopping:
                row = {"step": step, "lr": lr, **running.pop(world, device)}
                if not math.isfinite(row["loss"]):
                    raise FloatingPointError(f"loss is {row['loss']} at step {step} (mean since the last "
                                             "row)")
                bar.set_postfix(loss=f"{row['loss']:.4g}")
            if eval_fn is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or stopping):
                eval_metrics = _run_eval(eval_fn, model, device, world)
                row = {"step": step, "lr": lr, **row, **{f"eval_{k}": v for k, v in eval_metrics.items()}}
            if row:
                history.append(row)
                if log is not None:
                    log.append(row)
                _tensorboard_row(tb, row)
            if out is not None and ((cfg.ckpt_every and step % cfg.ckpt_every == 0) or stopping):
                rng = rng_to_json(rng_capture())
                rngs = all_gather_json(rng, world, device) if world > 1 else [rng]
                gathered = gather_sharded(model, optimizer) if sharded else None
                if writing:
                    write_checkpoint(out, model, step, optimizer, extra, rngs, config, gathered)
            if stopping:
                break
        if start >= end and eval_fn is not None:
            eval_metrics = _run_eval(eval_fn, model, device, world)
    except KeyboardInterrupt:
        if writing and sharded:
            logger.warning("interrupted: no checkpoint saved (expert-parallel weights need every rank to save); "
                           "resume continues from the last periodic checkpoint in %s", out)
        elif writing:
            rng = rng_to_json(pending_rng if pending_rng is not None else rng_capture())
            write_checkpoint(out, model, step, optimizer, extra, [rng], config)
            logger.warning("interrupted: saved a checkpoint at step %d in %s", step, out)
        raise
    finally:
        bar.close()
        if tb is not None:
            tb.close()
    wall = time.perf_counter() - t0
    logger.info("stopped at step %d of %d after %.1f s", step, cfg.steps, wall)
    return TrainResult(step=step, history=history, eval=eval_metrics, wall_time=wall,
                       finished=step >= cfg.steps)


def _clip_grad_norm(params: list[Tensor], max_norm: float, sharded: dict[str, nn.Module], model: nn.Module
                    ) -> Tensor:
    """``clip_grad_norm_`` over the whole model: with expert-parallel weights, their squared norms are
    summed over the group (each rank holds other experts), so every rank clips by the same factor."""
    if not sharded:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    named = dict(model.named_parameters())
    local = {id(named[k]) for k in sharded}
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    square = {True: grads[0].new_zeros(()), False: grads[0].new_zeros(())}
    for p in params:
        if p.grad is not None:
            square[id(p) in local] += p.grad.detach().float().square().sum()
    groups = {m.group for m in sharded.values()}
    if len(groups) != 1:
        raise ValueError("expert-parallel layers over different process groups: use one group per model")
    dist.all_reduce(square[True], group=groups.pop())
    norm = (square[True] + square[False]).sqrt()
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(scale.to(g.dtype))
    return norm


def _time_up(cfg: TrainConfig, t0: float, world: int, device: torch.device) -> bool:
    if cfg.max_time is None:
        return False
    late = time.perf_counter() - t0 > cfg.max_time
    if world == 1:
        return late
    flag = torch.tensor(float(late), device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # every rank stops at the same step
    return bool(flag.item())


def _tensorboard_row(tb: Any, row: dict[str, Any]) -> None:
    if tb is None:
        return
    for k, v in row.items():
        if k != "step":
            tb.add_scalar(f"eval/{k[5:]}" if k.startswith("eval_") else f"train/{k}", v, row["step"])
