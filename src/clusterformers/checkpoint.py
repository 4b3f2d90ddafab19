"""Checkpoints of a training run in safetensors and JSON; nothing is ever unpickled.

A checkpoint is three files in a run directory:

- ``checkpoint.safetensors``: model state + ``extra_params.<i>``. Tied weights are stored once and re-tied
  on load through the aliases in the file's metadata.
- ``optimizer.safetensors``: optimizer tensors, keys ``state.<param index>.<name>``.
- ``state.json``: step, optimizer structure and scalars, the RNG states of python/numpy/torch/cuda of every
  rank, the config.

Each file is written to a temporary name, fsynced and moved into place with ``os.replace``; all three
carry one random ``checkpoint_id``, so a file copied from another run is detected on load instead of being
mixed. ``state.json`` is written last (the commit point); while a save replaces the tensor files, the
committed ones wait as ``<name>.prev``, so a save killed between its renames resumes from the committed
checkpoint instead of failing. ``state.json`` also records the
SHA-256 of both tensor files (a flipped byte is refused) and a signature of the model's structure (module
classes and settings: a softmax checkpoint does not resume into an elliptical model, although their
parameter names agree). A missing, corrupt or mismatched file raises :class:`CheckpointError` naming the
file and the key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from clusterformers.distributed import unwrap_model

logger = logging.getLogger(__name__)

__all__ = [
    "MODEL_FILE",
    "OPTIMIZER_FILE",
    "STATE_FILE",
    "CheckpointError",
    "RunLock",
    "atomic_write",
    "load_checkpoint",
    "model_signature",
    "remove_stale_temporaries",
    "restore_checkpoint",
    "rng_capture",
    "rng_restore",
    "rng_to_json",
    "save_checkpoint",
    "write_checkpoint",
    "write_json",
]

MODEL_FILE = "checkpoint.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
EXTRA_PREFIX = "extra_params."
FORMAT_VERSION = 1
_META_STEP = "clusterformers.step"
_META_ID = "clusterformers.checkpoint_id"
PREVIOUS = ".prev"  # the committed tensor files while a save is replacing them
_META_ALIASES = "clusterformers.aliases"


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt or does not match the model; the message names file and key."""


# --------------------------------------------------------------------------------------------- RNG states
def rng_capture() -> dict[str, Any]:
    """The RNG states of python, numpy, torch and (if already initialised) every CUDA device."""
    cuda_live = torch.cuda.is_available() and torch.cuda.is_initialized()  # never initialise CUDA for this
    cuda = torch.cuda.get_rng_state_all() if cuda_live else None
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": cuda}


def rng_to_json(state: dict[str, Any]) -> dict[str, Any]:
    """JSON form (lists and numbers) of a :func:`rng_capture` result; :func:`rng_restore` reads it back."""
    version, internal, gauss = state["python"]
    name, keys, pos, has_gauss, cached = state["numpy"]
    return {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": state["torch"].tolist(),
        "cuda": None if state["cuda"] is None else [s.tolist() for s in state["cuda"]],
    }


def rng_restore(entry: Any, path: Path, where: str) -> None:
    """Restore RNG states from their JSON form; CheckpointError names ``path`` and the key on failure."""
    for key in ("python", "numpy", "torch", "cuda"):
        if not isinstance(entry, dict) or key not in entry:
            raise CheckpointError(f"{path}: key '{where}.{key}' is missing")
        try:
            if key == "python":
                version, internal, gauss = entry[key]
                random.setstate((version, tuple(internal), gauss))
            elif key == "numpy":
                name, keys, pos, has_gauss, cached = entry[key]
                np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
            elif key == "torch":
                torch.set_rng_state(torch.tensor(entry[key], dtype=torch.uint8))
            elif entry[key] is not None and torch.cuda.is_available():
                states = [torch.tensor(s, dtype=torch.uint8) for s in entry[key]]
                if len(states) == torch.cuda.device_count():
                    torch.cuda.set_rng_state_all(states)
                else:
                    logger.warning("%s: %d saved CUDA RNG states for %d devices; CUDA RNG not restored",
                                   path, len(states), torch.cuda.device_count())
        except (TypeError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"{path}: key '{where}.{key}' is not a valid RNG state ({err})") from err


# --------------------------------------------------------------------------------------------- files
def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)``, fsync, ``os.replace(tmp, path)``: ``path`` is either the old or the new file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_signature(model: nn.Module) -> str:
    """Hex digest of the model's structure: each submodule's path, class and ``extra_repr`` (settings).

    Two models whose parameters have the same names and shapes but whose layers differ (softmax vs
    elliptical attention, another AC preset) get different signatures."""
    parts = [f"{name}:{type(m).__module__}.{type(m).__qualname__}({m.extra_repr()})"
             for name, m in unwrap_model(model).named_modules()]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def sharded_parameters(model: nn.Module) -> dict[str, nn.Module]:
    """State-dict key -> owning module, for the parameters that each rank holds a slice of (modules with
    ``gather_param`` / ``shard_param``, such as expert-parallel experts)."""
    return {f"{prefix}.{name}" if prefix else name: module
            for prefix, module in unwrap_model(model).named_modules() if hasattr(module, "shard_param")
            for name, _ in module.named_parameters(recurse=False)}


def gather_sharded(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Tensor]:
    """The whole-group values of the sharded parameters and of their optimizer state, keyed as the files
    store them (``<param key>`` and ``state.<i>.<name>``). A collective: every rank must call it."""
    owners = sharded_parameters(model)
    params = dict(unwrap_model(model).named_parameters())
    out = {key: owner.gather_param(params[key]) for key, owner in owners.items()}
    if optimizer is not None:
        by_id = {id(params[key]): owner for key, owner in owners.items()}
        flat = [q for g in optimizer.param_groups for q in g["params"]]
        for idx, q in enumerate(flat):
            owner = by_id.get(id(q))
            for name, v in (optimizer.state.get(q) or {}).items() if owner is not None else ():
                if isinstance(v, Tensor) and v.shape == q.shape:
                    out[f"state.{idx}.{name}"] = owner.gather_param(v)
    return out


LOCK_FILE = ".lock"


class RunLock:
    """Exclusive use of a run directory by one writing process: ``out_dir/.lock`` holds the owner's pid.

    A second process refuses with a clear error while the owner lives; a lock left by a dead process (a
    kill) is taken over. Use as a context manager; the lock is removed on exit.
    """

    def __init__(self, out_dir: Path) -> None:
        self.path = out_dir / LOCK_FILE

    def __enter__(self) -> RunLock:
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                owner = self._owner()
                if owner is not None and owner != os.getpid() and _alive(owner):
                    raise ValueError(
                        f"run directory {self.path.parent} is in use by process {owner} (its {LOCK_FILE}); wait "
                        "for it to finish or choose another output directory"
                    ) from None
                self.path.unlink(missing_ok=True)  # left by a process that is gone
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            return self
        raise ValueError(f"could not take {self.path}: another process keeps creating it")

    def __exit__(self, *exc: object) -> None:
        if self._owner() == os.getpid():
            self.path.unlink(missing_ok=True)

    def _owner(self) -> int | None:
        try:
            return int(self.path.read_text().strip() or "0") or None
        except (OSError, ValueError):
            return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(out_dir: Path) -> list[Path]:
    """Delete the temporaries (``.<name>.<pid>.tmp``) that a killed writer left in ``out_dir``; returns them."""
    stale = [p for p in out_dir.glob(".*.tmp") if p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def write_json(path: Path, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON; dataclasses become dicts, anything else unknown a string."""
    def default(o: Any) -> Any:
        if dataclasses.is_dataclass(o) and not isinstance(o, type):
            return dataclasses.asdict(o)
        return str(o)

    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=1, default=default)))


def _read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise CheckpointError(f"{path}: key '<header>': not a readable safetensors file ({err})") from err


def _read_state(path: Path) -> dict[str, Any]:
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise CheckpointError(f"{path}: file not found (a checkpoint needs {STATE_FILE})") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: key '<document>': not valid JSON ({err})") from err
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: key '<document>': expected a JSON object, got {type(state).__name__}")
    for key, kind in (("format_version", int), ("checkpoint_id", str), ("step", int), ("rng", list)):
        if not isinstance(state.get(key), kind):
            raise CheckpointError(f"{path}: key {key!r} is missing or not a {kind.__name__} "
                                  f"(got {state.get(key)!r:.60})")
    if not state["rng"]:
        raise CheckpointError(f"{path}: key 'rng' is empty (expected one RNG state per rank)")
    if state["format_version"] != FORMAT_VERSION:
        raise CheckpointError(f"{path}: key 'format_version' is {state['format_version']}, "
                              f"expected {FORMAT_VERSION}")
    return state


# --------------------------------------------------------------------------------------------- checkpoints
def _model_tensors(model: nn.Module, extra: list[Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """State to save, with tied weights deduplicated: ``(tensors, aliases)``.

    Keys that view exactly the same memory (tied weights) are stored once; ``aliases`` maps each
    dropped key to the stored one. Other tensors that share storage (partial views) are cloned, since
    safetensors refuses shared storage.
    """
    tensors: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for key, t in model.state_dict().items():
        if not isinstance(t, Tensor):
            raise TypeError(f"model.state_dict()[{key!r}] is a {type(t).__name__}; only tensors can be saved")
        if key.startswith(EXTRA_PREFIX):
            raise ValueError(f"model.state_dict() key {key!r} clashes with the reserved prefix "
                             f"{EXTRA_PREFIX!r}")
        t = t.detach()
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), t.shape, t.stride(), t.dtype)
        if t.numel() and ident in seen:
            aliases[key] = seen[ident]
            continue
        seen[ident] = key
        tensors[key] = t
    for i, p in enumerate(extra):
        tensors[f"{EXTRA_PREFIX}{i}"] = p.detach()
    by_storage: dict[int, list[str]] = defaultdict(list)
    for key, t in tensors.items():
        by_storage[t.untyped_storage().data_ptr()].append(key)
    for keys in by_storage.values():
        for key in keys[1:]:
            tensors[key] = tensors[key].clone()
    return {k: t.contiguous().cpu() for k, t in tensors.items()}, aliases


def _optimizer_parts(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors (``state.<i>.<name>``) and a JSON-able structure."""
    sd = optimizer.state_dict()
    tensors: dict[str, Tensor] = {}
    state: dict[str, Any] = {}
    for idx, entry in sd["state"].items():
        names, values = [], {}
        for name, v in entry.items():
            if isinstance(v, Tensor):
                tensors[f"state.{idx}.{name}"] = v.detach().contiguous().cpu()
                names.append(name)
            else:
                values[name] = v
        state[str(idx)] = {"tensors": names, "values": values}
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"class": type(optimizer).__name__, "param_groups": groups, "state": state}


def write_checkpoint(out_dir: Path, model: nn.Module, step: int, optimizer: torch.optim.Optimizer | None,
                     extra: list[Tensor], rng: list[dict[str, Any]], config: dict[str, Any] | None,
                     gathered: dict[str, Tensor] | None = None) -> Path:
    """Write the three checkpoint files into ``out_dir`` (``state.json`` last); returns the model file's path.

    rng: the JSON RNG states (:func:`rng_to_json`) of every rank. config: stored as ``state.json["config"]``.
    gathered: :func:`gather_sharded`'s whole-group tensors, written in place of this rank's slices.
    """
    gathered = gathered or {}
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_id = uuid.uuid4().hex
    meta = {"format": "pt", _META_STEP: str(step), _META_ID: ckpt_id}
    tensors, aliases = _model_tensors(model, extra)
    tensors.update({k: t.cpu() for k, t in gathered.items() if k in tensors})
    meta[_META_ALIASES] = json.dumps(aliases)
    state: dict[str, Any] = {"format_version": FORMAT_VERSION, "checkpoint_id": ckpt_id, "step": step,
                             "world_size": len(rng), "config": config, "model_signature": model_signature(model),
                             "rng": rng, "optimizer": None, "sha256": {}}
    _keep_committed(out_dir)
    atomic_write(out_dir / MODEL_FILE, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    state["sha256"][MODEL_FILE] = sha256_of(out_dir / MODEL_FILE)
    if optimizer is not None:
        opt_tensors, state["optimizer"] = _optimizer_parts(optimizer)
        opt_tensors.update({k: t.cpu() for k, t in gathered.items() if k in opt_tensors})
        atomic_write(out_dir / OPTIMIZER_FILE, lambda tmp: save_file(opt_tensors, str(tmp), metadata=meta))
        state["sha256"][OPTIMIZER_FILE] = sha256_of(out_dir / OPTIMIZER_FILE)
    write_json(out_dir / STATE_FILE, state)  # last: the commit point
    for name in (MODEL_FILE, OPTIMIZER_FILE):
        (out_dir / (name + PREVIOUS)).unlink(missing_ok=True)
    logger.debug("saved checkpoint at step %d to %s", step, out_dir)
    return out_dir / MODEL_FILE


def _file_id(path: Path) -> str | None:
    """The ``checkpoint_id`` in a safetensors file's metadata (``None`` if absent or unreadable)."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return (f.metadata() or {}).get(_META_ID)
    except (SafetensorError, OSError, RuntimeError, ValueError):
        return None


def _keep_committed(out_dir: Path) -> None:
    """Before a save replaces the tensor files, move the committed ones (those of the current ``state.json``)
    aside as ``<name>.prev``, so a save killed between its renames still leaves a loadable checkpoint."""
    state_path = out_dir / STATE_FILE
    if not state_path.is_file():
        return
    try:
        committed = json.loads(state_path.read_text()).get("checkpoint_id")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return
    for name in (MODEL_FILE, OPTIMIZER_FILE):
        current = out_dir / name
        if committed is not None and current.is_file() and _file_id(current) == committed:
            os.replace(current, out_dir / (name + PREVIOUS))
        # otherwise ``current`` is a torn save's: the committed file, if any, is already ``<name>.prev``


def committed_file(out_dir: Path, name: str, checkpoint_id: str) -> Path:
    """``out_dir/name``, or its ``.prev`` copy when a save was killed between its renames and only the copy
    belongs to the committed ``state.json`` (``checkpoint_id``)."""
    current, previous = out_dir / name, out_dir / (name + PREVIOUS)
    if previous.is_file() and _file_id(current) != checkpoint_id and _file_id(previous) == checkpoint_id:
        logger.warning("%s is from an interrupted save; resuming from %s, the committed one", current, previous)
        return previous
    return current


def save_checkpoint(out_dir: str | Path, model: nn.Module, *, step: int = 0,
                    optimizer: torch.optim.Optimizer | None = None,
                    extra_params: Iterable[Tensor] = ()) -> Path:
    """Write ``checkpoint.safetensors`` (+ ``optimizer.safetensors``) and ``state.json`` into ``out_dir``.

    Tied weights are stored once and re-tied on load; the current process's RNG states are recorded.
    Pass the unwrapped model (see :func:`unwrap_model`). Returns the path of ``checkpoint.safetensors``.
    A model with expert-parallel layers is saved whole: every rank of the group must call this, and rank 0
    writes the file.
    """
    gathered = gather_sharded(model, optimizer) if sharded_parameters(model) else {}
    path = Path(out_dir) / MODEL_FILE
    if gathered and dist.get_rank() != 0:
        return path
    return write_checkpoint(Path(out_dir), unwrap_model(model), step, optimizer, list(extra_params),
                            [rng_to_json(rng_capture())], None, gathered)


def _verify_sha256(path: Path, state: dict[str, Any], state_path: Path) -> None:
    """Compare ``path``'s SHA-256 with the one ``state.json`` recorded (checkpoints from before it had none)."""
    expected = (state.get("sha256") or {}).get(path.name.removesuffix(PREVIOUS))
    if expected is not None and path.is_file() and sha256_of(path) != expected:
        raise CheckpointError(f"{path}: key '<file>': its SHA-256 differs from the one in {state_path} "
                              "(the file was corrupted or replaced after it was written)")


def _owners_by_id(model: nn.Module) -> dict[int, nn.Module]:
    params = dict(model.named_parameters())
    return {id(params[key]): owner for key, owner in sharded_parameters(model).items()}


def _load_optimizer(optimizer: torch.optim.Optimizer, saved: Any, path: Path, state_path: Path,
                    checkpoint_id: str, checksums: dict[str, str], owners: dict[int, nn.Module]) -> None:
    if not isinstance(saved, dict) or not {"class", "param_groups", "state"} <= saved.keys():
        raise CheckpointError(f"{state_path}: key 'optimizer' is missing or incomplete")
    if saved["class"] != type(optimizer).__name__:
        raise CheckpointError(f"{state_path}: key 'optimizer.class' is {saved['class']!r}, "
                              f"expected {type(optimizer).__name__!r}")
    current = optimizer.state_dict()
    groups = saved["param_groups"]
    if [g.get("params") for g in groups] != [g["params"] for g in current["param_groups"]]:
        raise CheckpointError(f"{state_path}: key 'optimizer.param_groups' has parameter layout "
                              f"{[len(g.get('params', [])) for g in groups]}, the optimizer has "
                              f"{[len(g['params']) for g in current['param_groups']]}")
    for old, new in zip(groups, current["param_groups"], strict=True):
        changed = {k for k in new if k not in ("params", "lr") and k in old
                   and old[k] != (list(new[k]) if isinstance(new[k], tuple) else new[k])}
        if changed:
            logger.warning("resuming with changed optimizer settings %s (the new values are used)",
                           sorted(changed))
    tensors, meta = _read_safetensors(path)
    saved_id = meta.get(_META_ID)
    if saved_id is not None and saved_id != checkpoint_id:
        raise CheckpointError(f"{path}: key 'metadata.{_META_ID}' is {saved_id} but {state_path} has "
                              f"{checkpoint_id}: the optimizer file comes from another save or another run")
    _verify_sha256(path, {"sha256": checksums}, state_path)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state: dict[int, dict[str, Any]] = {}
    used: set[str] = set()
    for idx_str, entry in saved["state"].items():
        idx = int(idx_str)
        if not 0 <= idx < len(params):
            raise CheckpointError(f"{state_path}: key 'optimizer.state.{idx_str}' is not a parameter index")
        st = dict(entry["values"])
        for name in entry["tensors"]:
            key = f"state.{idx}.{name}"
            if key not in tensors:
                raise CheckpointError(f"{path}: key {key!r} is missing")
            t = tensors[key]
            owner = owners.get(id(params[idx]))
            if owner is not None and t.dim() > 0 and t.shape[0] == owner.num_experts != params[idx].shape[0]:
                t = owner.shard_param(t)  # this rank's experts of a whole-group file
            if t.dim() > 0 and t.shape != params[idx].shape:
                raise CheckpointError(f"{path}: key {key!r} has shape {tuple(t.shape)}, the parameter has "
                                      f"{tuple(params[idx].shape)}")
            st[name] = t
            used.add(key)
        state[idx] = st
    if unexpected := sorted(set(tensors) - used):
        raise CheckpointError(f"{path}: key {unexpected[0]!r} is not referenced by {state_path.name}")
    optimizer.load_state_dict({"state": state, "param_groups": current["param_groups"]})


def restore_checkpoint(model: nn.Module, path: str | Path, extra: list[Tensor],
                       optimizer: torch.optim.Optimizer | None,
                       strict: bool, check_signature: bool = False) -> tuple[int, dict[str, Any] | None]:
    """Load model (+ extra, + optimizer) state; returns ``(step, state.json or None)``.

    ``check_signature``: refuse a checkpoint whose recorded model structure (:func:`model_signature`)
    differs from ``model``'s, before anything is loaded."""
    path = Path(path)
    model_path = path / MODEL_FILE if path.is_dir() else path
    state_path = model_path.parent / STATE_FILE
    state = _read_state(state_path) if optimizer is not None or state_path.is_file() else None
    if state is not None and path.is_dir():
        model_path = committed_file(path, MODEL_FILE, state["checkpoint_id"])
    tensors, meta = _read_safetensors(model_path)
    if state is not None:
        if _META_ID in meta and meta[_META_ID] != state["checkpoint_id"]:
            raise CheckpointError(f"{model_path}: key 'metadata.{_META_ID}' is {meta[_META_ID]} but "
                                  f"{state_path} has {state['checkpoint_id']}: the files come from different "
                                  "saves (a save was interrupted between its renames, or a file was copied)")
        _verify_sha256(model_path, state, state_path)
        saved_signature = state.get("model_signature")
        if check_signature and saved_signature is not None and saved_signature != model_signature(model):
            raise CheckpointError(
                f"{state_path}: key 'model_signature' is {saved_signature}, the model's is "
                f"{model_signature(model)}: the checkpoint was written by a model with other layers or settings "
                "(e.g. softmax vs elliptical attention); resume with the model that wrote it, or start fresh"
            )
    try:
        aliases = json.loads(meta.get(_META_ALIASES, "{}"))
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{model_path}: key 'metadata.{_META_ALIASES}' is not valid JSON") from err
    model = unwrap_model(model)
    for key, owner in sharded_parameters(model).items():  # each rank keeps its slice of a whole-group file
        if key in tensors and tensors[key].shape[0] == owner.num_experts:
            tensors[key] = owner.shard_param(tensors[key])
    full: dict[str, Tensor] = {}
    for key, ref in model.state_dict().items():
        src = aliases.get(key, key)
        if src not in tensors:
            if strict:
                raise CheckpointError(f"{model_path}: key {key!r} is missing (the model expects shape "
                                      f"{tuple(ref.shape)})")
            continue
        if tensors[src].shape != ref.shape:
            raise CheckpointError(f"{model_path}: key {key!r} has shape {tuple(tensors[src].shape)}, "
                                  f"the model expects {tuple(ref.shape)}")
        full[key] = tensors[src]
    extra_keys = [f"{EXTRA_PREFIX}{i}" for i in range(len(extra))]
    for key, p in zip(extra_keys, extra, strict=True):
        if key not in tensors:
            raise CheckpointError(f"{model_path}: key {key!r} is missing (extra_params has {len(extra)} "
                                  "tensors)")
        if tensors[key].shape != p.shape:
            raise CheckpointError(f"{model_path}: key {key!r} has shape {tuple(tensors[key].shape)}, "
                                  f"extra_params expects {tuple(p.shape)}")
    if strict and (unexpected := sorted(set(tensors) - set(full) - set(extra_keys) - set(aliases.values()))):
        raise CheckpointError(f"{model_path}: key {unexpected[0]!r} is not in the model "
                              f"({len(unexpected)} unexpected keys)")
    model.load_state_dict(full, strict=strict)  # copies in place: tied parameters stay tied
    with torch.no_grad():
        for key, p in zip(extra_keys, extra, strict=True):
            p.copy_(tensors[key])
    if optimizer is not None:
        assert state is not None
        _load_optimizer(optimizer, state.get("optimizer"),
                        committed_file(model_path.parent, OPTIMIZER_FILE, state["checkpoint_id"]), state_path,
                        state["checkpoint_id"], state.get("sha256") or {}, _owners_by_id(model))
    try:
        step = int(meta.get(_META_STEP, state["step"] if state else 0))
    except ValueError as err:
        raise CheckpointError(f"{model_path}: key 'metadata.{_META_STEP}' is not an int") from err
    return step, state


def load_checkpoint(model: nn.Module, path: str | Path, *, extra_params: Iterable[Tensor] = (),
                    optimizer: torch.optim.Optimizer | None = None, strict: bool = True) -> int:
    """Load a checkpoint written by :func:`save_checkpoint` or :func:`clusterformers.train.train` into
    ``model`` in place.

    path: a run directory or a ``checkpoint.safetensors`` file. Tied weights are restored through the
    aliases in the file's metadata and stay tied (values are copied into the existing parameters).
    ``strict=False`` skips missing and unexpected model keys (shapes must still match). With
    ``optimizer`` its state is loaded too; its hyper-parameters stay the current ones. Does not touch
    RNG states. Returns the checkpoint's step. Raises CheckpointError naming the file and key.
    """
    return restore_checkpoint(model, path, list(extra_params), optimizer, strict)[0]
