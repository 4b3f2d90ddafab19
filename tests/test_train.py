"""Tests of clusterformers.train: schedule, optimizer groups, logs, checkpoints, exact resume, DDP."""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from clusterformers.checkpoint import sha256_of
from clusterformers.train import (
    CheckpointError,
    TrainConfig,
    load_checkpoint,
    lr_at,
    move_to_device,
    resolve_device,
    save_checkpoint,
    seed_everything,
    train,
)

ROOT = Path(__file__).resolve().parents[1]
W_TRUE = torch.tensor([1.5, -2.0, 0.5])


class MLP(nn.Module):
    def __init__(self, hidden: int = 16, dropout: float = 0.1) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


def make_run(seed: int = 0, dropout: float = 0.1, hidden: int = 16):
    """A model, an extra parameter outside it, and a loss using both."""
    torch.manual_seed(seed)
    model = MLP(hidden, dropout)
    shift = nn.Parameter(torch.zeros(()) + seed)

    def loss_fn(m: nn.Module, batch):
        x, y = batch
        pred = m(x) + shift
        # python and numpy draws too, so an exact resume needs every RNG restored
        weight = 1.0 + 1e-3 * random.random() + 1e-3 * float(np.random.rand())
        return F.mse_loss(pred, y) * weight, {"mae": (pred - y).abs().mean()}

    return model, shift, loss_fn


def batch_fn(step: int, rank: int, world: int):
    g = torch.Generator().manual_seed(10_000 * rank + step)
    x = torch.randn(32, 3, generator=g)
    return x, x @ W_TRUE + 0.3


CFG = TrainConfig(steps=20, lr=3e-2, warmup_steps=3, weight_decay=0.1, log_every=5, ckpt_every=5,
                  device="cpu", progress=False)


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def assert_same_params(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# ---------------------------------------------------------------------------------------------- basics
def test_loss_decreases_on_toy_regression():
    model, shift, loss_fn = make_run(dropout=0.0)
    cfg = TrainConfig(steps=80, lr=3e-2, warmup_steps=10, log_every=10, device="cpu", progress=False)
    res = train(model, loss_fn, batch_fn, cfg, extra_params=[shift])
    losses = [row["loss"] for row in res.history]
    assert [row["step"] for row in res.history] == list(range(10, 81, 10))
    assert losses[-1] < 0.05 * losses[0]  # 5.6 -> 0.09
    assert res.step == 80 and res.finished and res.eval == {}


def test_schedule_values():
    cfg = TrainConfig(steps=10, lr=0.1, warmup_steps=4)
    assert [lr_at(s, cfg) for s in range(4)] == pytest.approx([0.025, 0.05, 0.075, 0.1], abs=1e-15)
    assert lr_at(3, cfg) == 0.1 and lr_at(4, cfg) == 0.1  # warm-up ends at lr, cosine starts at lr
    assert lr_at(7, cfg) == pytest.approx(0.05, abs=1e-15)  # half-way through the cosine
    assert lr_at(10, cfg) == 0.0  # the floor, exactly, just after the last step
    assert lr_at(9, cfg) == pytest.approx(0.05 * (1 + np.cos(np.pi * 5 / 6)), abs=1e-15) and lr_at(9, cfg) > 0
    floor = TrainConfig(steps=10, lr=0.1, warmup_steps=4, min_lr_ratio=0.1)
    assert lr_at(10, floor) == 0.1 * 0.1
    assert lr_at(7, floor) == pytest.approx(0.01 + 0.045, abs=1e-15)
    const = TrainConfig(steps=10, lr=0.1, warmup_steps=2, schedule="constant")
    assert [lr_at(s, const) for s in range(10)] == [0.05] + [0.1] * 9
    # the loop uses exactly these values
    model, shift, loss_fn = make_run()
    res = train(model, loss_fn, batch_fn, dataclasses.replace(CFG, steps=10, warmup_steps=4, lr=0.1,
                                                              log_every=1, ckpt_every=0))
    assert [row["lr"] for row in res.history] == [lr_at(s, cfg) for s in range(10)]


def test_weight_decay_only_on_matrices():
    """Zero gradients: AdamW moves nothing but decays ndim >= 2 parameters by exactly (1 - lr * wd)."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"emb": nn.Embedding(5, 4), "lin": nn.Linear(4, 2), "norm": nn.LayerNorm(4)})
    extra = nn.Parameter(torch.ones(3))
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def zero_loss(m, batch):
        return sum(p.sum() for p in m.parameters()) * 0.0 + extra.sum() * 0.0, {}

    cfg = TrainConfig(steps=1, lr=0.5, weight_decay=0.1, device="cpu", progress=False, log_every=1)
    train(model, zero_loss, batch_fn, cfg, extra_params=[extra])
    after = model.state_dict()
    for k in ("emb.weight", "lin.weight"):
        assert torch.equal(after[k], before[k] * (1 - 0.5 * 0.1)), k
    for k in ("lin.bias", "norm.weight", "norm.bias"):
        assert torch.equal(after[k], before[k]), k
    assert torch.equal(extra.detach(), torch.ones(3))


def test_logs_config_and_eval_mode(tmp_path):
    model, shift, loss_fn = make_run()
    seen = []

    def checked_loss(m, batch):
        seen.append(("train", m.training, torch.is_grad_enabled()))
        return loss_fn(m, batch)

    def eval_fn(m):
        seen.append(("eval", m.training, torch.is_grad_enabled()))
        x, y = batch_fn(999, 0, 1)
        return {"mse": float(F.mse_loss(m(x), y))}

    @dataclasses.dataclass
    class Exp:
        name: str = "toy"
        width: int = 16

    cfg = dataclasses.replace(CFG, steps=7, log_every=3, eval_every=5, ckpt_every=0, name="toy")
    res = train(model, checked_loss, batch_fn, cfg, tmp_path, eval_fn, extra_params=[shift],
                extra_config={"experiment": Exp(), "path": tmp_path})
    columns, rows = read_csv(tmp_path / "metrics.csv")
    assert columns == ["step", "lr", "loss", "mae", "grad_norm", "eval_mse"]
    assert [int(r["step"]) for r in rows] == [3, 5, 6, 7]
    assert [r["eval_mse"] != "" for r in rows] == [False, True, False, True]
    assert rows[1]["loss"] == ""  # an eval-only row
    parsed = [{k: int(v) if k == "step" else float(v) for k, v in r.items() if v} for r in rows]
    assert parsed == res.history  # floats round-trip exactly through the CSV
    assert res.eval == {"mse": pytest.approx(float(rows[-1]["eval_mse"]), rel=0, abs=0)}
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["train"] == {**dataclasses.asdict(cfg), "betas": [0.9, 0.999]}
    assert config["extra"] == {"experiment": {"name": "toy", "width": 16}, "path": str(tmp_path)}
    files = {p.name for p in tmp_path.iterdir()}
    assert {"checkpoint.safetensors", "optimizer.safetensors", "state.json"} <= files
    has_tb = importlib.util.find_spec("tensorboard") is not None
    assert any(p.name.startswith("events.out.tfevents") for p in tmp_path.iterdir()) == has_tb
    assert {s for s in seen if s[0] == "train"} == {("train", True, True)}
    assert {s for s in seen if s[0] == "eval"} == {("eval", False, False)}
    assert len([s for s in seen if s[0] == "eval"]) == 2
    assert model.training


def test_eval_does_not_change_training():
    def noisy_eval(m):  # draws from every RNG; must not shift the training streams
        return {"r": float(torch.rand(())) + random.random() + float(np.random.rand())}

    runs = []
    for eval_fn in (None, noisy_eval):
        model, shift, loss_fn = make_run()
        train(model, loss_fn, batch_fn, dataclasses.replace(CFG, steps=8, eval_every=2), eval_fn=eval_fn,
              extra_params=[shift])
        runs.append((model, shift))
    assert_same_params(runs[0][0], runs[1][0])
    assert torch.equal(runs[0][1], runs[1][1])


# ---------------------------------------------------------------------------------------------- resume
class Crash(Exception):
    pass


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 20-step run (with dropout and python/numpy draws in the loss)."""
    out = tmp_path_factory.mktemp("ref")
    model, shift, loss_fn = make_run()
    res = train(model, loss_fn, batch_fn, CFG, out, extra_params=[shift])
    return model, shift, res, out


@pytest.mark.parametrize(("kill", "saved_step"), [("exception", 10), ("keyboard", 12), ("stop_at", 12)])
def test_exact_resume(tmp_path, reference, kill, saved_step):
    ref_model, ref_shift, ref_res, ref_out = reference
    model, shift, loss_fn = make_run()
    calls = []

    def crashing_batch(step, rank, world):
        if kill == "exception" and step == 12:
            raise Crash
        return batch_fn(step, rank, world)

    def interrupted_loss(m, batch):
        calls.append(1)
        out = loss_fn(m, batch)  # the forward has drawn dropout masks when the interrupt lands
        if kill == "keyboard" and len(calls) == 13:
            raise KeyboardInterrupt
        return out

    cfg = dataclasses.replace(CFG, stop_at=12) if kill == "stop_at" else CFG
    if kill == "stop_at":
        first = train(model, interrupted_loss, crashing_batch, cfg, tmp_path, extra_params=[shift])
        assert first.step == 12 and not first.finished
    else:
        with pytest.raises(Crash if kill == "exception" else KeyboardInterrupt):
            train(model, interrupted_loss, crashing_batch, cfg, tmp_path, extra_params=[shift])
    assert json.loads((tmp_path / "state.json").read_text())["step"] == saved_step

    model2, shift2, loss_fn2 = make_run(seed=7)  # other values: everything must come from the checkpoint
    res = train(model2, loss_fn2, batch_fn, CFG, tmp_path, resume=True, extra_params=[shift2])
    assert res.step == 20 and res.finished
    assert_same_params(model2, ref_model)
    assert torch.equal(shift2, ref_shift)
    steps = [int(r["step"]) for r in read_csv(tmp_path / "metrics.csv")[1]]
    assert steps == sorted(set(steps)) and steps[-1] == 20
    assert [r["step"] for r in res.history] == steps
    if kill == "exception":  # the logging windows line up with the reference: rows are bitwise equal
        assert res.history == ref_res.history
        assert read_csv(tmp_path / "metrics.csv") == read_csv(ref_out / "metrics.csv")


def test_resume_without_checkpoint_starts_fresh(tmp_path, reference):
    model, shift, loss_fn = make_run()
    train(model, loss_fn, batch_fn, CFG, tmp_path, resume=True, extra_params=[shift])
    assert_same_params(model, reference[0])
    again = train(model, loss_fn, batch_fn, CFG, tmp_path, resume=True, extra_params=[shift])
    assert again.step == 20 and again.history == reference[2].history  # nothing left to do, no new rows


# ---------------------------------------------------------------------------------------------- checkpoints
def _break(tmp_path: Path, src: Path, name: str) -> Path:
    out = tmp_path / name
    shutil.copytree(src, out)
    return out


def _rewrite_safetensors(path: Path, edit) -> None:  # edit(tensors) changes the dict in place
    """Rewrite a tensor file and record its new SHA-256 in state.json: a consistent but wrong file, which
    only the key-level checks can catch."""
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata=meta)
    state_path = path.parent / "state.json"
    state = json.loads(state_path.read_text())
    state["sha256"][path.name] = sha256_of(path)
    state_path.write_text(json.dumps(state))


def test_corrupt_or_mismatched_checkpoint_names_file_and_key(tmp_path, reference):
    src = reference[3]

    def resume(out: Path, **kw):
        model, shift, loss_fn = make_run(**kw)
        return train(model, loss_fn, batch_fn, CFG, out, resume=True, extra_params=[shift])

    ckpt = r"checkpoint\.safetensors: key "
    with pytest.raises(CheckpointError, match=ckpt + r"'net\.0\.weight' has shape \(16, 3\)"):
        load_checkpoint(MLP(hidden=8), src)
    with pytest.raises(CheckpointError, match=ckpt + r"'extra_params\.0' is not in the model"):
        load_checkpoint(MLP(), src)
    model, shift = MLP(), nn.Parameter(torch.zeros(()))
    assert load_checkpoint(model, src / "checkpoint.safetensors", extra_params=[shift]) == 20
    assert_same_params(model, reference[0])

    out = _break(tmp_path, src, "no_step")
    state = json.loads((out / "state.json").read_text())
    del state["step"]
    (out / "state.json").write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match=rf"{out / 'state.json'}: key 'step' is missing"):
        resume(out)

    out = _break(tmp_path, src, "bad_json")
    (out / "state.json").write_text('{"step": 3')
    with pytest.raises(CheckpointError, match=r"state\.json: key '<document>': not valid JSON"):
        resume(out)

    out = _break(tmp_path, src, "bad_rng")
    state = json.loads((out / "state.json").read_text())
    state["rng"][0]["torch"] = [1, 2, 3]
    (out / "state.json").write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match=r"state\.json: key 'rng\[0\]\.torch' is not a valid RNG state"):
        resume(out)

    out = _break(tmp_path, src, "truncated")
    data = (out / "checkpoint.safetensors").read_bytes()
    (out / "checkpoint.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"{out / 'checkpoint.safetensors'}: key '<header>'"):
        resume(out)

    out = _break(tmp_path, src, "optimizer_key")
    _rewrite_safetensors(out / "optimizer.safetensors", lambda t: t.pop("state.0.exp_avg"))
    with pytest.raises(CheckpointError, match=r"optimizer\.safetensors: key 'state\.0\.exp_avg' is missing"):
        resume(out)

    out = _break(tmp_path, src, "optimizer_shape")
    wrong_shape = {"state.1.exp_avg": torch.ones(3)}
    _rewrite_safetensors(out / "optimizer.safetensors", lambda t: t.update(wrong_shape))
    with pytest.raises(CheckpointError, match=r"optimizer\.safetensors: key 'state\.1\.exp_avg' has shape"):
        resume(out)

    out = _break(tmp_path, src, "torn")  # model file from another save than state.json
    save_checkpoint(tmp_path / "other", reference[0], step=20, extra_params=[reference[1]])
    shutil.copy(tmp_path / "other" / "checkpoint.safetensors", out / "checkpoint.safetensors")
    with pytest.raises(CheckpointError, match=ckpt + r"'metadata\.clusterformers\.checkpoint_id'"):
        resume(out)

    out = _break(tmp_path, src, "no_state")
    (out / "state.json").unlink()
    with pytest.raises(CheckpointError, match=r"state\.json: file not found"):
        resume(out)


class TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.head = nn.Linear(4, 7, bias=False)
        self.head.weight = self.emb.weight
        self.register_buffer("first_rows", self.emb.weight.data[:2])  # a partial view of shared storage

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(idx))


def test_tied_weights_round_trip(tmp_path):
    torch.manual_seed(0)
    model = TiedLM()
    path = save_checkpoint(tmp_path / "a", model, step=3)
    with safe_open(str(path), "pt") as f:
        assert set(f.keys()) == {"emb.weight", "first_rows"}
        assert json.loads(f.metadata()["clusterformers.aliases"]) == {"head.weight": "emb.weight"}
    torch.manual_seed(1)
    other = TiedLM()
    assert load_checkpoint(other, path) == 3
    assert_same_params(other, model)
    assert other.head.weight is other.emb.weight

    def lm_loss(m, idx):
        return F.cross_entropy(m(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten()), {}

    def lm_batch(step, rank, world):
        return torch.randint(0, 7, (4, 6), generator=torch.Generator().manual_seed(step))

    cfg = TrainConfig(steps=6, lr=0.1, ckpt_every=3, log_every=3, device="cpu", progress=False)
    torch.manual_seed(0)
    full = TiedLM()
    train(full, lm_loss, lm_batch, cfg, tmp_path / "full")
    torch.manual_seed(0)
    part = TiedLM()
    train(part, lm_loss, lm_batch, dataclasses.replace(cfg, stop_at=3), tmp_path / "part")
    torch.manual_seed(5)
    resumed = TiedLM()
    train(resumed, lm_loss, lm_batch, cfg, tmp_path / "part", resume=True)
    assert resumed.head.weight is resumed.emb.weight
    assert_same_params(resumed, full)


# ---------------------------------------------------------------------------------------------- helpers
def test_resolve_device():
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    for bad in ("banana", "xla", "cpu:x"):
        with pytest.raises(ValueError, match=rf"device: got '{bad}'"):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"device: got 'cuda:0' but CUDA is not available"):
            resolve_device("cuda:0")
    with pytest.raises(ValueError, match=r"device: got 'banana'"):
        train(MLP(), make_run()[2], batch_fn, TrainConfig(steps=1, device="banana"))


def test_seed_everything():
    draws = []
    for _ in range(2):
        seed_everything(123)
        draws.append((random.random(), float(np.random.rand()), float(torch.rand(()))))
    assert draws[0] == draws[1]
    with pytest.raises(ValueError, match="seed: got -1"):
        seed_everything(-1)


def test_move_to_device_keeps_structure():
    Pair = namedtuple("Pair", "x y")
    batch = {"a": Pair(torch.ones(2), [torch.zeros(1), 3]), "b": (torch.arange(3), "text")}
    moved = move_to_device(batch, torch.device("cpu"))
    assert type(moved["a"]) is Pair and isinstance(moved["a"].y, list) and isinstance(moved["b"], tuple)
    assert torch.equal(moved["a"].x, torch.ones(2)) and moved["a"].y[1] == 3 and moved["b"][1] == "text"


def test_config_and_argument_errors():
    with pytest.raises(ValueError, match=r"TrainConfig\.steps: got 0"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match=r"TrainConfig\.schedule: got 'linear'"):
        TrainConfig(steps=5, schedule="linear")
    with pytest.raises(ValueError, match=r"TrainConfig\.warmup_steps: got 6"):
        TrainConfig(steps=5, warmup_steps=6)
    model, shift, loss_fn = make_run()
    cfg = TrainConfig(steps=2, device="cpu", progress=False)
    with pytest.raises(ValueError, match=r"extra_params\[0\] \(shape \(16, 3\)\) is already a parameter"):
        train(model, loss_fn, batch_fn, cfg, extra_params=[model.net[0].weight])
    with pytest.raises(TypeError, match=r"loss_fn\(model, batch\) must return \(scalar loss Tensor"):
        train(model, lambda m, b: F.mse_loss(m(b[0]), b[1]), batch_fn, cfg)
    with pytest.raises(ValueError, match=r"loss_fn metrics: key 'loss' is reserved"):
        train(model, lambda m, b: (F.mse_loss(m(b[0]), b[1]), {"loss": 1.0}), batch_fn, cfg)
    with pytest.raises(FloatingPointError, match="loss is nan at step 1"):
        train(model, lambda m, b: (m(b[0]).sum() * float("nan"), {}), batch_fn,
              dataclasses.replace(cfg, log_every=1))
    with pytest.raises(ValueError, match="resume=True needs out_dir"):
        train(model, loss_fn, batch_fn, cfg, resume=True)


# ---------------------------------------------------------------------------------------------- DDP
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_ddp_two_processes(tmp_path):
    worker = ROOT / "tests" / "ddp_worker.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
           str(worker), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    ranks = {run: [load_file(str(tmp_path / f"{run}_rank{r}.safetensors")) for r in (0, 1)]
             for run in ("full", "split")}
    for run in ("full", "split"):
        a, b = ranks[run]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), run  # replicas in sync
    full, split = ranks["full"][0], ranks["split"][0]
    assert all(torch.equal(full[k], split[k]) for k in full)  # exact resume under DDP
    _, rows = read_csv(tmp_path / "full" / "metrics.csv")
    assert [int(r["step"]) for r in rows] == [2, 3, 4, 6]
    assert not any(p.name.endswith(".tmp") for p in (tmp_path / "full").iterdir())

    # reference: one process on the union of both ranks' batches, starting from rank 0's initialisation
    spec = importlib.util.spec_from_file_location("ddp_worker", worker)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    model, scale = mod.make_model(0), mod.make_scale(0)
    res = train(model, mod.make_loss(scale), mod.full_batch_fn, mod.CFG, eval_fn=mod.eval_fn,
                extra_params=[scale])
    for k, v in model.state_dict().items():
        torch.testing.assert_close(full[k], v, rtol=0, atol=1e-6)
    torch.testing.assert_close(full["scale"], scale.detach(), rtol=0, atol=1e-6)
    # logged values are means over ranks: equal to the single-process means over the union
    assert len(res.history) == len(rows)
    for mine, theirs in zip(res.history, rows, strict=True):
        assert mine == pytest.approx({k: float(v) for k, v in theirs.items() if v}, abs=1e-6)
