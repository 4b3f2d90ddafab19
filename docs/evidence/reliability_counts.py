"""Reliability counts: how the public modules, losses and file loaders answer one fixed list of bad, odd and
valid inputs, counted per outcome, so that two commits can be compared on the same inputs.

usage::

    PYTHONPATH=/path/to/checkout/src python docs/evidence/reliability_counts.py --out FILE.json
        [--seed 0] [--scale 1.0] [--only TARGET ...] [--label COMMIT]

``PYTHONPATH`` picks the version of ``clusterformers`` that is measured (it wins over an editable install); run
the script once per commit (a ``git worktree`` of the commit, or a ``git archive`` copy with ``--label``). It
writes ``FILE.json`` (the commit and whether the measured tree differs from it, the run time, per-target counts
and a record of every outcome that is neither ``correct`` nor ``clear error``) and prints a markdown table. ``--scale``
multiplies the number of inputs per target (for quick trials), ``--only`` restricts the targets.

Inputs. Every input is drawn from ``random.Random(f"{seed}:{target}")`` and ``torch.Generator``s seeded from
it (never from hypothesis), so both commits see the same list. The input spaces mirror the property tests of
``tests/test_fuzz.py``: empty batches, dtypes float32/float64/float16/int64/bool/complex64, values that are
normal, NaN, inf, ~1e20, ~1e-30 or zero, bool/float/additive (0/-inf)/wrong-shape masks, NaN in ``v_prev`` at
kept or padded positions, top_k outside 1..E, damaged and out-of-range files. About half the draws are
"cleaned" into valid inputs, so that the slow references (the loop references of ``tests/test_fuzz.py``, and
float64 re-computations of attention, MoE and SoftMoE from the formulas of their docstrings) are exercised.
Module weights are set from the seed, not from the library's initialisation, so they too are the same on
both commits. Given SparseFARE bucket ids up to 1e9 run in a forked child whose address space is capped at
1 GiB above the parent's (``MEMORY_CAP``); what cannot be allocated there is counted as an unclear crash
with the message prefix ``crash (memory)``.

Each input has an expectation: ``reject`` (no valid reading: some argument is bad; the arguments that make it
bad are the ones an error must name), ``accept`` (valid: it must give the reference) or ``either`` (a clear
error or the reference are both fine: float16 modules, float32 values near 1e20 whose products overflow,
non-finite router logits, an ill-conditioned CCLK system, a file with one flipped byte, ...). Judgement calls:
float16 embeddings are valid for the losses (their upcast to float32 is documented); a keep-mask with no kept
token given to load_balancing_loss or router_z_loss is ``reject`` (0/0, like the zero-token input that the
library refuses); a float mask is ``reject`` everywhere (0/1 and 0/-inf readings disagree).

Outcomes, exactly one per call:

``clear error``
    a ValueError, TypeError, NotImplementedError, KeyError or FileNotFoundError (subclasses included) for an
    input expected ``reject`` or ``either``, whose message names one of the offending arguments (as a whole
    word: ``x``, ``key_padding_mask``, ``v_prev``, ``logits``, ``top_k``, ``z1``, ``sensitive``, ``buckets``,
    ...; the names are listed per input) or, for a loader, contains the file's path.
``correct``
    a returned result of the right shape, finite, and equal to the reference within a tolerance relative to
    ``max(1, |reference|)`` (1e-9 in float64; otherwise 1e-5 for the losses, 1e-4 for float32 modules and
    3e-2 for float16 modules) where the input is valid and a reference exists; for a loader, the result its
    docstring promises for the data written (for ``build_corpus`` on a file rewritten between two calls: the
    corpus a fresh build of the new text gives). NaN/inf logits given to load_balancing_loss or router_z_loss
    propagate to a NaN/inf loss by design (pure functions that read nothing on the host), which counts as
    ``correct``. A reference that is ambiguous (router scores within 1e-5 of a tie, relative to the largest,
    so that rounding decides the experts) is skipped: the result then only needs the right shape and finite values.
``silent wrong``
    a finite result that is wrong: it differs from the reference, has the wrong shape, comes from an input
    expected ``reject`` (an input with no valid reading was accepted: e.g. an additive 0/-inf float mask read
    as bool, NaN in ``v_prev`` at a kept position swallowed, a damaged file read), or a finite loss from NaN
    logits. Embeddings near 1e20 that give the constant ``log(2b-1)`` differ from the reference; a FARELoss
    whose running statistics a rejected call changed gives a different value on the next, valid call.
``NaN/inf``
    a returned result holding NaN or inf, except the documented propagation above. The record says whether
    the input itself held NaN/inf (then the library returned NaN instead of refusing it).
``unclear crash``
    any other exception: a RuntimeError, IndexError, AttributeError, ... from torch or numpy, an error of the
    types above whose message names none of the offending arguments (nor the path), any error on an input
    expected ``accept`` (a valid input refused), a memory failure in the capped child, or the child's death.

A case made of two calls (FARELoss with ``z_norm="running"``: an invalid call, then a valid one) must first
end in a clear error; the outcome is then that of the second call, compared with a fresh module's value.
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import json
import logging
import math
import os
import random
import re
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import clusterformers
from clusterformers import (
    CCLKLoss,
    EllipticalAttention,
    FairInfoNCELoss,
    FARELoss,
    InfoNCELoss,
    MoE,
    SoftMoE,
    SparseFARELoss,
    load_balancing_loss,
    router_z_loss,
)
from clusterformers.contrastive import KMeansDiscretizer
from clusterformers.data import build_corpus, load_mnist5k, load_npz, load_text_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from references import (  # noqa: E402  (the loop references the property tests use)
    npz_contract,
    ref_dot,
    ref_fare_weights,
    ref_lsh_support,
    ref_one_hot,
    ref_projections,
    ref_standardise,
    ref_unit,
    ref_weighted_nce,
)

CLEAR, CORRECT, WRONG, NAN, CRASH = "clear error", "correct", "silent wrong", "NaN/inf", "unclear crash"
CATEGORIES = (CLEAR, CORRECT, WRONG, NAN, CRASH)
CLEAR_TYPES = (ValueError, TypeError, NotImplementedError, KeyError, FileNotFoundError)
REJECT, EITHER, ACCEPT = "reject", "either", "accept"
MEMORY_CAP = 1 << 30
F16, F32, F64 = torch.float16, torch.float32, torch.float64
DTYPES = (F32, F64, F16, torch.int64, torch.bool, torch.complex64)
FLOATS = (F32, F64, F16)
SPECIALS = ("normal", "nan", "inf", "huge", "tiny", "zeros")
EMB = ("z1", "z2", "batch", "embeddings")  # an error about the embeddings may name any of these
MODULE_TOL = {F64: 1e-9, F32: 1e-4, F16: 3e-2}


# ----------------------------------------------------------------------------- cases and their outcomes


class Verdict(Exception):
    """Raised inside a multi-step call to end the case with this outcome."""

    def __init__(self, category: str, message: str) -> None:
        super().__init__(message)
        self.category, self.message = category, message


@dataclass
class Case:
    """One input: ``call`` runs it, ``judge`` classifies a returned result."""

    desc: str
    call: Callable[[], object]
    expect: str  # REJECT, EITHER or ACCEPT
    names: tuple[str, ...]  # what a clear error must name: the offending arguments, or a loader's path
    judge: Callable[[object], tuple[str, str]]
    isolate: bool = False  # run in a forked child with MEMORY_CAP more address space


def mentions(message: str, names: tuple[str, ...]) -> bool:
    """Whether ``message`` names one of ``names`` (a path as a substring, an argument as a whole word)."""
    for name in names:
        if "/" in name:
            if name in message:
                return True
        elif re.search(rf"(?<!\w){re.escape(name)}(?!\w)", message):
            return True
    return False


def crash_message(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}"
    if isinstance(err, MemoryError) or "can't allocate memory" in str(err):
        return f"crash (memory): {text}"
    return text


def error_outcome(err: BaseException, expect: str, names: tuple[str, ...]) -> tuple[str, str]:
    text = f"{type(err).__name__}: {err}"
    if expect == ACCEPT:
        return CRASH, f"a valid input was refused: {text}"
    if mentions(str(err), names):
        return CLEAR, ""
    return CRASH, f"the error names none of {list(names)}: {text}"


def classify(case: Case) -> tuple[str, str]:
    try:
        out = case.call()
    except Verdict as verdict:
        return verdict.category, verdict.message
    except CLEAR_TYPES as err:
        return error_outcome(err, case.expect, case.names)
    except Exception as err:  # torch- or numpy-internal errors reaching the user
        return CRASH, crash_message(err)
    return case.judge(out)


def vm_size() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    return 0


def classify_isolated(case: Case) -> tuple[str, str]:
    """:func:`classify` in a forked child whose address space may grow by :data:`MEMORY_CAP` only."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        os.close(read)
        try:
            limit = vm_size() + MEMORY_CAP
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
            result = classify(case)
        except BaseException as err:  # the child must always report
            result = (CRASH, crash_message(err))
        os.write(write, json.dumps([result[0], result[1][:1000]]).encode())
        os._exit(0)
    os.close(write)
    chunks = []
    while chunk := os.read(read, 65536):
        chunks.append(chunk)
    os.close(read)
    _, status = os.waitpid(pid, 0)
    if chunks:
        category, message = json.loads(b"".join(chunks))
        return category, message
    return CRASH, f"process-level failure: the child running the call ended with wait status {status}"


def brief(t: torch.Tensor) -> str:
    t = t.detach()
    if t.numel() == 1:
        return f"{t.item():.8g}" if not t.is_complex() else str(t.item())
    return f"shape {list(t.shape)}, max |y| {float(t.abs().max()) if t.numel() else 0.0:.4g}"


def tensor_judge(
    shape: tuple[int, ...],
    expect: str,
    reference: Callable[[], object] | None = None,
    tol: float = 0.0,
    finite_in: bool = True,
    propagates: bool = False,
    context: str = "",
) -> Callable[[object], tuple[str, str]]:
    """The judge of a tensor result (see the module docstring for the rules)."""

    def judge(out: object) -> tuple[str, str]:
        if isinstance(out, tuple):
            out = out[0]
        if not isinstance(out, torch.Tensor):
            return WRONG, f"{context}returned a {type(out).__name__}, not a tensor"
        out = out.detach()
        if not bool(torch.isfinite(out).all()):
            if propagates and not finite_in:
                return CORRECT, ""
            note = "" if finite_in else " (the input held NaN/inf)"
            return NAN, f"{context}a result holding NaN/inf{note}: {brief(out)}"
        if tuple(out.shape) != tuple(shape):
            return WRONG, f"{context}result of shape {list(out.shape)}, expected {list(shape)}"
        if propagates and not finite_in:
            return WRONG, f"{context}a finite result although the logits held NaN/inf: {brief(out)}"
        if expect == REJECT:
            return WRONG, f"{context}an input with no valid reading was accepted: {brief(out)}"
        if reference is None:
            return CORRECT, ""
        want = reference()
        if want is None:
            return CORRECT, ""
        want = torch.as_tensor(want, dtype=F64)
        if not bool(torch.isfinite(want).all()):
            return CORRECT, ""
        got = out.real if out.is_complex() else out
        diff = float((got.to(F64) - want).abs().max()) if want.numel() else 0.0
        if diff > tol * max(1.0, float(want.abs().max()) if want.numel() else 1.0):
            return WRONG, f"{context}differs from the reference: got {brief(got)}, reference {brief(want)} " \
                          f"(max |diff| {diff:.3g})"
        return CORRECT, ""

    return judge


def tensor(shape: tuple[int, ...], dtype: torch.dtype, special: str, seed: int) -> torch.Tensor:
    """As in tests/test_fuzz.py: normal values, or one NaN/inf, or scaled by 1e20 / 1e-30, or zeros."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=F64)
    if special == "nan" and x.numel():
        x.view(-1)[seed % x.numel()] = float("nan")
    elif special == "inf" and x.numel():
        x.view(-1)[seed % x.numel()] = float("inf")
    elif special == "huge":
        x = x * 1e20
    elif special == "tiny":
        x = x * 1e-30
    elif special == "zeros":
        x = torch.zeros(shape, dtype=F64)
    if dtype == torch.bool:
        return x > 0
    if dtype == torch.complex64:
        return x.to(torch.complex64)
    if not dtype.is_floating_point:
        return x.clamp(-1e6, 1e6).nan_to_num().to(dtype)
    return x.to(dtype)


def finite(*tensors: object) -> bool:
    """No NaN/inf in any floating or complex tensor among ``tensors``."""
    for t in tensors:
        if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex()) and t.numel():
            if not bool(torch.isfinite(t).all()):
                return False
    return True


def dname(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def set_params(module: torch.nn.Module, seed: int, scale: float = 0.5) -> None:
    """Every parameter from ``seed`` (by sorted name), so the weights do not depend on the library's init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(module.named_parameters()):
            p.copy_((torch.randn(p.shape, generator=g, dtype=F64) * scale).to(p.dtype))


def keep_mask(kind: str, b: int, n: int, seed: int, causal: bool = False) -> torch.Tensor | None:
    """``none``, ``keep`` (bool, the first token kept), ``empty_row`` (sample 0 all padding), ``left_pad``,
    ``float`` (zeros: "keep all" as an additive mask, "pad all" as bool), ``additive`` (0 / -inf of a bool
    keep-mask), ``wrong_shape``; ``causal`` right-pads the bool masks."""
    if kind == "none":
        return None
    if kind == "float":
        return torch.zeros(b, n)
    if kind == "wrong_shape":
        return torch.ones(b, n + 1, dtype=torch.bool)
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(b, n, generator=g) > 0.3
    if n:
        keep[:, 0] = True
    if kind == "empty_row" and b:
        keep[0] = False
    if kind == "left_pad":
        keep = keep.sort(dim=1, stable=True).values  # padding first
        if n > 1:
            keep[:, 0] = False
        return keep
    if causal:
        keep = keep.sort(dim=1, descending=True, stable=True).values
    if kind == "additive":
        return torch.zeros(b, n).masked_fill(~keep, float("-inf"))
    return keep


# ----------------------------------------------------------------------------- EllipticalAttention


def ref_attention(layer, x, keep, v_prev, causal: bool) -> torch.Tensor:
    """``softmax(q diag(m) kᵀ/√D + mask) v`` in float64 from the layer's weights; ``m`` the (prefix) mean of
    ``|v − v_prev|`` over kept tokens, divided by its largest entry (1 if that is ≤ eps), at least eps."""
    b, n, c = x.shape
    h = layer.num_heads
    dh = c // h
    w, bias = layer.qkv.weight.detach().double(), layer.qkv.bias.detach().double()
    q, k, v = (x.double() @ w.T + bias).view(b, n, 3, h, dh).permute(2, 0, 3, 1, 4)
    kept = torch.ones(b, n, dtype=torch.bool) if keep is None else keep
    if v_prev is not None:
        a = torch.where(kept[:, None, :, None], (v - v_prev.double()).abs(), torch.zeros((), dtype=F64))
        m = torch.empty_like(q)
        eps = layer.eps
        for i in range(b):
            for t in range(n):
                upto = [u for u in range(t + 1 if causal else n) if kept[i, u]]
                s = a[i][:, upto].sum(dim=1) / max(1, len(upto))  # [H, D]
                top = s.amax(dim=1, keepdim=True)
                m[i, :, t] = torch.where(top <= eps, torch.ones_like(s), s / top.clamp_min(1e-300)).clamp_min(eps)
        q = q * m
    scores = q @ k.transpose(-1, -2) / math.sqrt(dh)
    allowed = kept[:, None, None, :].expand(b, 1, n, n)
    if causal:
        allowed = allowed & torch.ones(n, n, dtype=torch.bool).tril()
    out = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1) @ v
    out = out.transpose(1, 2).reshape(b, n, c)
    return out @ layer.proj.weight.detach().double().T + layer.proj.bias.detach().double()


def attention_case(rng: random.Random, ctx: dict) -> Case:
    seed, clean = rng.randrange(10**6), rng.random() < 0.5
    b, n, dim = rng.randint(0, 3), rng.randint(0, 6), rng.choice((8, 7))
    dtype, special = rng.choice(DTYPES), rng.choice(SPECIALS)
    prev_special = special if rng.random() < 0.5 else rng.choice(SPECIALS)
    mask = rng.choice(("none", "keep", "empty_row", "float", "additive", "wrong_shape", "left_pad"))
    causal, with_prev = rng.random() < 0.5, rng.random() < 0.6
    if clean:
        b, n, dim = max(b, 1), max(n, 1), 8
        dtype = dtype if dtype in FLOATS else (F32, F64)[seed % 2]
        special = "normal" if special in ("nan", "inf") else special
        mask = mask if mask in ("none", "keep") or (mask == "left_pad" and not causal) else "keep"
    x = tensor((b, n, dim), dtype, special, seed)
    keep = keep_mask(mask, b, n, seed, causal)
    v_prev = tensor((b, 2, n, 4), F32, prev_special, seed + 1) if with_prev else None
    layer = EllipticalAttention(8, 2, causal=causal)
    set_params(layer, seed + 2)
    if x.is_floating_point() and x.dtype != F32:
        layer = layer.to(x.dtype)

    names: set[str] = set()
    if b == 0 or n == 0 or dim != 8:
        names.add("x")
    if not dtype.is_floating_point:
        names.update(("x", "dtype"))
    elif not finite(x):
        names.add("x")
    bool_mask = mask in ("none", "keep", "empty_row", "left_pad")
    if not bool_mask or (mask == "empty_row" and b and n) or (mask == "left_pad" and causal and n > 1):
        names.add("key_padding_mask")
    if v_prev is not None:
        at_kept = v_prev if keep is None or not bool_mask else v_prev[keep[:, None, :, None].expand_as(v_prev)]
        if not finite(at_kept):
            names.add("v_prev")
    if names:
        expect, names_t = REJECT, tuple(sorted(names))
    elif dtype == F16 or (dtype == F32 and special == "huge"):
        expect, names_t = EITHER, ("x", "dtype", "attention output")
    else:
        expect, names_t = ACCEPT, ()
    reference = None
    if expect != REJECT:

        def reference():
            return ref_attention(layer, x, keep, v_prev, causal)

    desc = (f"b={b} n={n} dim={dim} {dname(dtype)} x={special} mask={mask} "
            f"{'causal' if causal else 'bidirectional'} v_prev={prev_special if with_prev else 'none'} seed={seed}")
    return Case(desc, lambda: layer(x, key_padding_mask=keep, v_prev=v_prev), expect, names_t,
                tensor_judge((b, n, 8), expect, reference, MODULE_TOL.get(dtype, 0.0), finite(x, v_prev)))


# ----------------------------------------------------------------------------- MoE and SoftMoE


def ref_expert(experts, e: int, u: torch.Tensor) -> torch.Tensor:
    return F.gelu(u @ experts.w_in.detach()[e].double()) @ experts.w_out.detach()[e].double()


def ref_moe(layer, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor | None:
    """Top-k of ``x·e_k/|e_k|`` (stable order), softmax over the selected, ``Σ w expert(x)``; with a capacity
    factor, slot-major queues of ``C = ceil(cf·k·T/E)`` per expert that masked tokens do not enter (their
    output is 0). None when two scores at the selection boundary are within 1e-5 (relative to the largest
    score) of a tie, since rounding then decides the experts."""
    d = layer.dim
    x2 = x.double().reshape(-1, d)
    keep2 = torch.ones(x2.shape[0], dtype=torch.bool) if keep is None else keep.reshape(-1)
    emb = layer.router.embeddings.detach().double()
    logits = x2 @ (emb / emb.norm(dim=1, keepdim=True).clamp_min(1e-4)).T
    k, n_exp = layer.top_k, layer.num_experts
    rows = []
    scale = float(logits.abs().max()) if logits.numel() else 0.0
    for t in range(x2.shape[0]):
        order = sorted(range(n_exp), key=lambda e, t=t: -float(logits[t, e]))
        vals = [float(logits[t, e]) for e in order]
        for j in range(min(k + 1, n_exp) - 1):
            gap = vals[j] - vals[j + 1]
            if 0 < gap < 1e-5 * scale:
                return None
        rows.append(order[:k])
    y = torch.zeros_like(x2)
    capacity = None
    if layer.capacity_factor is not None:
        capacity = max(1, math.ceil(layer.capacity_factor * k * x2.shape[0] / n_exp))
    fill = [0] * n_exp
    for slot in range(k):
        for t in range(x2.shape[0]):
            sel = logits[t, rows[t]]
            w = torch.softmax(sel, dim=0)[slot]
            e = rows[t][slot]
            if capacity is not None:
                if not keep2[t] or fill[e] >= capacity:
                    continue
                fill[e] += 1
            y[t] += w * ref_expert(layer.experts, e, x2[t])
    return y.reshape(x.shape)


def ref_soft_moe(layer, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """Soft MoE in float64: unit tokens ``x/max(|x|, 1e-12)``, logits with ``scale·φ/|φ|``, dispatch = softmax
    over the kept tokens, combine = softmax over slots, slot s run by expert ``s // p``."""
    xh = x.double() / x.double().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    phi = layer.phi.detach().double()
    phi = layer.scale.detach().double() * phi / phi.norm(dim=0, keepdim=True).clamp_min(1e-12)
    logits = xh @ phi
    d_logits = logits if keep is None else logits.masked_fill(~keep[..., None], float("-inf"))
    dispatch, combine = torch.softmax(d_logits, dim=1), torch.softmax(logits, dim=2)
    slots = torch.einsum("bnd,bns->bsd", xh, dispatch)
    p = layer.slots_per_expert
    ys = torch.stack([torch.stack([ref_expert(layer.experts, s // p, slots[i, s]) for s in range(slots.shape[1])])
                      for i in range(slots.shape[0])])
    return torch.einsum("bsd,bns->bnd", ys, combine)


def moe_case(rng: random.Random, ctx: dict, soft: bool = False) -> Case:
    seed, clean = rng.randrange(10**6), rng.random() < 0.5
    t, dim = rng.randint(0, 12), rng.choice((6, 5))
    dtype, special = rng.choice(DTYPES), rng.choice(SPECIALS)
    kinds = ("none", "keep", "float", "additive", "wrong_shape") + (("empty_row",) if soft else ())
    mask, capacity = rng.choice(kinds), rng.choice((None, 1.5))
    if clean:
        t, dim = max(t, 1), 6
        dtype = dtype if dtype in FLOATS else (F32, F64)[seed % 2]
        special = "normal" if special in ("nan", "inf") else special
        mask = mask if mask in ("none", "keep") else "keep"
    x = tensor((2, t, dim), dtype, special, seed)
    keep = keep_mask(mask, 2, t, seed)
    layer = SoftMoE(6, 4, 1, 8) if soft else MoE(6, 4, 2, 8, router="ac", capacity_factor=capacity)
    set_params(layer, seed + 2)
    if soft:
        with torch.no_grad():
            layer.scale.fill_(1.5)
    if x.is_floating_point() and x.dtype != F32:
        layer = layer.to(x.dtype)
    names: set[str] = set()
    if t == 0 or dim != 6:
        names.add("x")
    if not dtype.is_floating_point:
        names.update(("x", "dtype"))
    elif not finite(x):
        names.add("x")
    if mask in ("float", "additive", "wrong_shape") or (mask == "empty_row" and t):
        names.add("key_padding_mask")
    if names:
        expect, names_t = REJECT, tuple(sorted(names))
    elif dtype == F16:
        expect, names_t = EITHER, ("x", "dtype")
    else:
        expect, names_t = ACCEPT, ()
    reference = None
    if expect != REJECT:

        def reference():
            return ref_soft_moe(layer, x, keep) if soft else ref_moe(layer, x, keep)

    desc = (f"B=2 t={t} dim={dim} {dname(dtype)} x={special} mask={mask}"
            f"{'' if soft else f' capacity={capacity}'} seed={seed}")
    return Case(desc, lambda: layer(x, key_padding_mask=keep), expect, names_t,
                tensor_judge((2, t, 6), expect, reference, MODULE_TOL.get(dtype, 0.0), finite(x)))


def soft_moe_case(rng: random.Random, ctx: dict) -> Case:
    return moe_case(rng, ctx, soft=True)


# ----------------------------------------------------------------------------- the router losses


def ref_balance(layers: list[torch.Tensor], keep: torch.Tensor | None, n_exp: int, top_k: int) -> float | None:
    """``E Σ_e f_e P_e`` over kept tokens (f: share of top-k assignments, P: mean probability), float64;
    None when a tie at the top-k boundary makes the value depend on the tie-break."""
    s = torch.cat([layer.double() for layer in layers])
    kept = torch.ones(layers[0].shape[0], dtype=torch.bool) if keep is None else keep.reshape(-1)
    kept = kept.repeat(len(layers))
    probs = torch.softmax(s, dim=1)
    n = max(1, int(kept.sum()))
    p_mean = (probs * kept[:, None]).sum(0) / n
    counts = [0.0] * n_exp
    for t in range(s.shape[0]):
        order = sorted(range(n_exp), key=lambda e, t=t: -float(probs[t, e]))
        if top_k < n_exp and abs(float(probs[t, order[top_k - 1]] - probs[t, order[top_k]])) < 1e-6:
            tied = [e for e in range(n_exp) if abs(float(probs[t, e] - probs[t, order[top_k - 1]])) < 1e-6]
            if float(p_mean[tied].max() - p_mean[tied].min()) > 1e-9:
                return None
        if kept[t]:
            for e in order[:top_k]:
                counts[e] += 1
    return n_exp * sum(counts[e] / n * float(p_mean[e]) for e in range(n_exp))


def ref_z(layers: list[torch.Tensor], keep: torch.Tensor | None) -> float:
    s = torch.cat([layer.double() for layer in layers])
    kept = torch.ones(layers[0].shape[0], dtype=torch.bool) if keep is None else keep.reshape(-1)
    kept = kept.repeat(len(layers))
    lse = [math.log(sum(math.exp(v - max(row)) for v in row)) + max(row) for row in s.tolist()]
    values = [z * z for z, k in zip(lse, kept.tolist()) if k]
    return sum(values) / max(1, len(values))


def aux_case(rng: random.Random, ctx: dict, z_loss: bool = False) -> Case:
    seed, clean = rng.randrange(10**6), rng.random() < 0.5
    t, e = rng.randint(0, 10), rng.randint(1, 5)
    top_k: object = rng.randint(-1, 6) if rng.random() < 0.9 else rng.choice((2.0, 1.5))
    dtype, special = rng.choice((F32, F32, F32, F64, F16)), rng.choice(SPECIALS)
    mask = rng.choice(("none", "none", "keep", "keep_2d", "float01", "additive", "wrong_numel", "all_false"))
    layers_kind = rng.choice(("one", "one", "one", "two", "mismatch"))
    if clean:
        t, e = max(t, 1), 4
        top_k = top_k if isinstance(top_k, int) and 1 <= top_k <= 4 else 1 + seed % 4
        special = "normal" if special in ("nan", "inf") else special
        mask = mask if mask in ("none", "keep", "keep_2d") else "keep"
        layers_kind = layers_kind if layers_kind != "mismatch" else "two"
    layers = [tensor((t, 4), dtype, special, seed)]
    if layers_kind != "one":
        layers.append(tensor((t + (layers_kind == "mismatch"), 4), dtype, special, seed + 3))
    g = torch.Generator().manual_seed(seed + 4)
    keep_1d = torch.rand(t, generator=g) > 0.3
    if t:
        keep_1d[0] = True
    keep = {
        "none": None, "keep": keep_1d, "keep_2d": keep_1d.view(1, t), "float01": keep_1d.float(),
        "additive": torch.zeros(t).masked_fill(~keep_1d, float("-inf")),
        "wrong_numel": torch.ones(t + 1, dtype=torch.bool), "all_false": torch.zeros(t, dtype=torch.bool),
    }[mask]
    names: set[str] = set()
    if t == 0 or layers_kind == "mismatch":
        names.add("logits")
    if not z_loss and e != 4:
        names.update(("logits", "num_experts"))
    if not z_loss and not (isinstance(top_k, int) and 1 <= top_k <= e):
        names.add("top_k")
    if mask in ("float01", "additive", "wrong_numel") or (mask == "all_false" and t):
        names.add("key_padding_mask")
    finite_in = finite(*layers)
    if z_loss and keep is not None and keep.dtype == torch.bool and keep.numel() == t and not names:
        # router_z_loss leaves padded tokens out entirely: only the kept tokens' logits must be finite
        finite_in = finite(*[layer[keep.reshape(-1)] for layer in layers])
    propagates = False
    if names:
        expect, names_t = REJECT, tuple(sorted(names))
    elif not finite_in:
        expect, names_t, propagates = EITHER, ("logits",), True
    elif z_loss and special == "huge" and dtype != F64:
        expect, names_t = EITHER, ("logits",)  # (1e20)² overflows float32
    else:
        expect, names_t = ACCEPT, ()
    arg = layers[0] if layers_kind == "one" else tuple(layers)
    reference = None
    if expect != REJECT and finite_in:

        def reference():
            return ref_z(layers, keep) if z_loss else ref_balance(layers, keep, e, top_k)

    if z_loss:

        def call():
            return router_z_loss(arg, key_padding_mask=keep)
    else:

        def call():
            return load_balancing_loss(arg, e, top_k, key_padding_mask=keep)

    desc = (f"T={t} layers={layers_kind} {dname(dtype)} logits={special} mask={mask}"
            f"{'' if z_loss else f' E={e} top_k={top_k!r}'} seed={seed}")
    tol = 1e-9 if dtype == F64 else 1e-5
    return Case(desc, call, expect, names_t, tensor_judge((), expect, reference, tol, finite_in, propagates))


def z_loss_case(rng: random.Random, ctx: dict) -> Case:
    return aux_case(rng, ctx, z_loss=True)


# ----------------------------------------------------------------------------- the contrastive losses
# The loop references below are those of tests/test_fuzz.py (from the formulas of contrastive/nce.py and
# contrastive/functional.py), in Python floats.


def ref_cclk_weights(rows: list[list[float]], kernel: str, bandwidth: float | None, lam: float = 0.01,
                     clip: float = 1e-6) -> tuple[list[list[float]], float]:
    """``W_ij = (b−1) M_ji``, ``M = (K_Z + λI)⁻¹ K_Z``, ``M_ii = 0``, ``M_ij < clip → 0``; ``K_Z`` with
    diagonal 1, the bandwidth the median over pairs (the lower median) or 1. Also the condition number."""
    b = len(rows)
    sq = [[sum((x - y) ** 2 for x, y in zip(rows[i], rows[j])) for j in range(b)] for i in range(b)]
    t = 1.0 if bandwidth is None else bandwidth
    if bandwidth is None and kernel in ("rbf", "laplacian"):
        pairs = sorted(sq[i][j] if kernel == "rbf" else math.sqrt(sq[i][j]) for i in range(b) for j in range(i + 1, b))
        t = pairs[(len(pairs) - 1) // 2] or 1.0
    units = [ref_unit(r) for r in rows]
    entry = {
        "cosine": lambda i, j: ref_dot(units[i], units[j]),
        "rbf": lambda i, j: math.exp(-sq[i][j] / t),
        "laplacian": lambda i, j: math.exp(-math.sqrt(sq[i][j]) / t),
        "linear": lambda i, j: ref_dot(rows[i], rows[j]) / t,
        "polynomial": lambda i, j: ref_dot(rows[i], rows[j]) ** 3 / t,
    }[kernel]
    k = np.array([[1.0 if i == j else entry(i, j) for j in range(b)] for i in range(b)])
    system = k + lam * np.eye(b)
    cond = float(np.linalg.cond(system)) if np.isfinite(system).all() else math.inf
    if not math.isfinite(cond) or cond > 1e10:
        return [], cond
    m = np.linalg.solve(system, k)
    return [[(b - 1) * m[j, i] if j != i and m[j, i] >= clip else 0.0 for j in range(b)] for i in range(b)], cond


def loss_tol(dtype: torch.dtype) -> float:
    return 1e-9 if dtype == F64 else 1e-5


def clean_input(clean: bool, b: int, dtype: torch.dtype, special: str, sens: str, valid: tuple[str, ...],
                seed: int) -> tuple[int, torch.dtype, str, str]:
    """With ``clean``, each bad choice replaced by a good one (so about half the inputs are valid)."""
    if not clean:
        return b, dtype, special, sens
    if dtype not in (F32, F64):
        dtype = (F32, F64)[seed % 2]
    special = "normal" if special in ("nan", "inf") else special
    return max(b, 2), dtype, special, sens if sens in valid else valid[seed % len(valid)]


def embeddings_ok(z1: torch.Tensor, z2: torch.Tensor) -> bool:
    """Valid embeddings: floating (float16 is upcast, as documented), finite, one shape [b, d], b >= 2."""
    return (z1.is_floating_point() and z2.is_floating_point() and z1.shape == z2.shape and z1.dim() == 2
            and z1.shape[0] >= 2 and finite(z1, z2))


def loss_case(desc: str, call: Callable[[], object], emb_ok: bool, other_bad: tuple[str, ...],
              reference: Callable[[], object] | None, dtype: torch.dtype, either: tuple[str, ...] = ()) -> Case:
    """A contrastive-loss case: ``other_bad`` names the offending non-embedding arguments."""
    names = (() if emb_ok else EMB) + other_bad
    expect = REJECT if names else EITHER if either else ACCEPT
    names = names or either
    return Case(desc, call, expect, names,
                tensor_judge((), expect, reference if expect != REJECT else None, loss_tol(dtype)))


def embeddings(rng: random.Random, clean: bool, valid: tuple[str, ...], sens_kinds: tuple[str, ...]):
    seed = rng.randrange(10**6)
    b, d, dtype, special = rng.randint(0, 6), rng.randint(1, 5), rng.choice(DTYPES), rng.choice(SPECIALS)
    sens = rng.choice(sens_kinds)
    b, dtype, special, sens = clean_input(clean, b, dtype, special, sens, valid, seed)
    z1, z2 = tensor((b, d), dtype, special, seed), tensor((b, d), dtype, special, seed + 1)
    return seed, b, d, dtype, special, sens, z1, z2


def info_nce_case(rng: random.Random, ctx: dict) -> Case:
    clean = rng.random() < 0.5
    seed, b, d, dtype, special, sens, z1, z2 = embeddings(rng, clean, ("float", "int"), ("float", "int", "wrong_b",
                                                                                        "nan", "none"))
    negatives, symmetric, temperature = rng.choice(("both", "cross")), rng.random() < 0.5, rng.choice((0.1, 0.5))
    views = "same" if clean else rng.choice(("same",) * 6 + ("b+1", "d+1"))
    if views != "same":
        z2 = tensor((b + (views == "b+1"), d + (views == "d+1")), dtype, special, seed + 1)
    g = torch.Generator().manual_seed(seed)
    sensitive = {"float": torch.rand(b, 3, generator=g), "int": torch.randint(0, 3, (b,), generator=g),
                 "wrong_b": torch.rand(b + 1, 3, generator=g), "nan": torch.full((b, 3), float("nan")),
                 "none": None}[sens]
    loss_fn = InfoNCELoss(temperature=temperature, negatives=negatives, symmetric=symmetric)

    def reference():
        w = [[0.0 if i == j else 1.0 for j in range(b)] for i in range(b)]
        return ref_weighted_nce(z1, z2, w, temperature, negatives, symmetric)

    desc = (f"b={b} d={d} {dname(dtype)} z={special} views={views} sensitive={sens} (ignored) "
            f"negatives={negatives} symmetric={symmetric} tau={temperature} seed={seed}")
    return loss_case(desc, lambda: loss_fn(z1, z2, sensitive), embeddings_ok(z1, z2), (), reference, dtype)


FARE_SENSITIVE = ("float", "int", "wrong_b", "nan", "group_too_big", "wrong_columns", "negative")


def fare_sensitive(kind: str, b: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    groups, attribute = torch.randint(0, 3, (b,), generator=g), torch.rand(b, 3, generator=g, dtype=F64).to(dtype)
    if kind == "group_too_big" and b:
        groups[0] = 3
    if kind == "negative" and b:
        groups[0] = -1
    return {"float": attribute, "int": groups, "wrong_b": torch.rand(b + 1, 3, generator=g),
            "nan": torch.full((b, 3), float("nan")), "group_too_big": groups, "wrong_columns": attribute[:, :2],
            "negative": groups}[kind]


def ref_fare(z1, z2, sensitive, w_q, w_k, score: str, z_norm: str) -> float:
    """FARE's loss: ẑ (batch-standardised, or with a fresh module's running statistics after one training
    update, momentum 0.1, or in eval mode), all ``j ≠ i`` in the softmax."""
    b = z1.shape[0]
    if sensitive.is_floating_point():
        rows = sensitive.double().reshape(b, -1).tolist()
    else:
        rows = ref_one_hot([int(x) for x in sensitive.tolist()], 3)
    if z_norm == "batch":
        zhat = ref_standardise(rows)
    elif z_norm == "running-train":
        zhat = [list(r) for r in rows]
        for c in range(len(rows[0])):
            mean = sum(r[c] for r in rows) / b
            var = sum((r[c] - mean) ** 2 for r in rows) / b
            run_mean, run_var = 0.1 * mean, 1.0 + 0.1 * (var - 1.0)
            for i in range(b):
                zhat[i][c] = (rows[i][c] - run_mean) / (math.sqrt(run_var) + 1e-6)
    else:  # running statistics of a fresh module in eval mode: mean 0, var 1
        zhat = [[x / (1.0 + 1e-6) for x in r] for r in rows]
    support = [[j for j in range(b) if j != i] for i in range(b)]
    return ref_weighted_nce(z1, z2, ref_fare_weights(zhat, w_q.tolist(), w_k.tolist(), support, score, rho=2.0))


def fare_case(rng: random.Random, ctx: dict) -> Case:
    mode = rng.choice(("batch", "batch", "running-train", "running-eval", "sequence", "sequence"))
    clean = rng.random() < 0.5 or mode == "sequence"
    seed, b, d, dtype, special, sens, z1, z2 = embeddings(rng, clean, ("float", "int"), FARE_SENSITIVE)
    score = rng.choice(("dot", "neg_sqdist"))
    first = rng.choice(("empty", "one", "nan_z", "mismatch", "nan_sens", "wrong_b_sens")) if mode == "sequence" else ""
    wide = F64 if dtype == F64 else F32
    sensitive = fare_sensitive(sens, b, seed, wide)
    g = torch.Generator().manual_seed(seed + 9)
    w_q, w_k = torch.randn(4, 3, generator=g, dtype=wide), torch.randn(4, 3, generator=g, dtype=wide)
    z_norm = "batch" if mode == "batch" else "running"
    loss_fn = FARELoss(3, d_k=4, rho=2.0, score=score, z_norm=z_norm).to(wide).train(mode != "running-eval")
    with torch.no_grad():
        loss_fn.w_q.copy_(w_q)
        loss_fn.w_k.copy_(w_k)
    emb_ok, sens_ok = embeddings_ok(z1, z2), sens in ("float", "int")
    ref_mode = {"batch": "batch", "running-eval": "running-eval"}.get(mode, "running-train")

    def reference():
        return ref_fare(z1, z2, sensitive, w_q, w_k, score, ref_mode)

    desc = f"{mode}{f' (first: {first})' if first else ''} b={b} d={d} {dname(dtype)} z={special} " \
           f"sensitive={sens} score={score} seed={seed}"
    if mode != "sequence":
        return loss_case(desc, lambda: loss_fn(z1, z2, sensitive), emb_ok, () if sens_ok else ("sensitive",),
                         reference, dtype)
    # an invalid call, then the valid one: the second must equal a fresh module's value
    bz = b + 1 if first == "mismatch" else {"empty": 0, "one": 1}.get(first, b)
    bad_z1 = tensor(({"empty": 0, "one": 1}.get(first, b), d), dtype, "nan" if first == "nan_z" else special, seed + 5)
    bad_z2 = tensor((bz, d), dtype, special, seed + 6)
    bad_sens = fare_sensitive({"nan_sens": "nan", "wrong_b_sens": "wrong_b"}.get(first, sens), bad_z1.shape[0],
                              seed + 7, wide)
    first_names = EMB if first in ("empty", "one", "nan_z", "mismatch") else ("sensitive",)

    def call():
        try:
            out = loss_fn(bad_z1, bad_z2, bad_sens)
        except CLEAR_TYPES as err:
            category, message = error_outcome(err, REJECT, first_names)
            if category != CLEAR:
                raise Verdict(category, f"first (invalid) call: {message}") from err
        except Exception as err:
            raise Verdict(CRASH, f"first (invalid) call: {crash_message(err)}") from err
        else:
            raise Verdict(WRONG if finite(out) else NAN, f"the invalid first call was accepted: {brief(out)}")
        return loss_fn(z1, z2, sensitive)

    return Case(desc, call, ACCEPT, (), tensor_judge((), ACCEPT, reference, loss_tol(dtype),
                                                   context="second call, after a rejected one: "))


_KMEANS: list = []


def kmeans() -> KMeansDiscretizer:
    if not _KMEANS:
        _KMEANS.append(KMeansDiscretizer(3, seed=0).fit(torch.rand(60, 3, generator=torch.Generator().manual_seed(0))))
    return _KMEANS[0]


FAIR_SENSITIVE = ("groups", "bool", "big_ids", "float", "float16", "no_discretizer", "unfitted", "wrong_columns",
                  "negative", "wrong_b", "nan", "int_2d", "complex", "list")


def fair_case(rng: random.Random, ctx: dict) -> Case:
    valid = ("groups", "bool", "big_ids", "float", "float16")
    clean = rng.random() < 0.5
    seed, b, d, dtype, special, sens, z1, z2 = embeddings(rng, clean, valid, FAIR_SENSITIVE)
    negatives, symmetric = rng.choice(("both", "cross")), rng.random() < 0.5
    g = torch.Generator().manual_seed(seed)
    groups, attribute = torch.randint(0, 3, (b,), generator=g), torch.rand(b, 3, generator=g, dtype=F64)
    negative = groups.clone()
    negative[:1] = -1
    km = kmeans()
    sensitive, discretizer = {
        "groups": (groups, None), "bool": (groups > 0, None), "big_ids": (groups * 10**12, None),
        "float": (attribute, km), "float16": (attribute.half(), km), "no_discretizer": (attribute, None),
        "unfitted": (attribute, KMeansDiscretizer(3)), "wrong_columns": (attribute[:, :2], km),
        "negative": (negative, None), "wrong_b": (torch.randint(0, 3, (b + 1,), generator=g), None),
        "nan": (torch.full((b, 3), float("nan")), km), "int_2d": (groups[:, None].repeat(1, 2), None),
        "complex": (attribute.to(torch.complex64), km), "list": (groups.tolist(), None),
    }[sens]
    loss_fn = FairInfoNCELoss(discretizer=discretizer, negatives=negatives, symmetric=symmetric)

    def reference():
        if sensitive.is_floating_point():  # the nearest fitted centre, by explicit squared distances
            centres = km.centers.tolist()
            labels = [min(range(len(centres)), key=lambda c: sum((x - y) ** 2 for x, y in zip(row, centres[c])))
                      for row in sensitive.double().tolist()]
        else:
            labels = [int(x) for x in sensitive.tolist()]
        w = [[1.0 if j != i and labels[i] == labels[j] else 0.0 for j in range(b)] for i in range(b)]
        return ref_weighted_nce(z1, z2, w, negatives=negatives, symmetric=symmetric)

    desc = f"b={b} d={d} {dname(dtype)} z={special} sensitive={sens} negatives={negatives} symmetric={symmetric} " \
           f"seed={seed}"
    return loss_case(desc, lambda: loss_fn(z1, z2, sensitive), embeddings_ok(z1, z2),
                     () if sens in valid else ("sensitive", "discretizer"), reference, dtype)


CCLK_SENSITIVE = ("float", "float_1d", "float16", "groups", "bool", "nan", "inf", "wrong_b", "int_2d", "negative",
                  "complex", "float_3d", "list")


def cclk_case(rng: random.Random, ctx: dict) -> Case:
    valid = ("float", "float_1d", "float16", "groups", "bool")
    clean = rng.random() < 0.5
    seed, b, d, dtype, special, sens, z1, z2 = embeddings(rng, clean, valid, CCLK_SENSITIVE)
    sens_special = rng.choice(("normal", "huge", "tiny", "zeros"))
    kernel, bandwidth = rng.choice(("cosine", "rbf", "laplacian", "linear", "polynomial")), rng.choice((None, 0.5))
    g = torch.Generator().manual_seed(seed)
    groups, attribute = torch.randint(0, 3, (b,), generator=g), tensor((b, 3), F64, sens_special, seed + 2)
    negative = groups.clone()
    negative[:1] = -1
    sensitive = {
        "float": attribute, "float_1d": attribute[:, 0], "float16": attribute.half(), "groups": groups,
        "bool": groups > 0, "nan": tensor((b, 3), F64, "nan", seed), "inf": attribute / 0.0,
        "wrong_b": torch.rand(b + 1, 3, generator=g), "int_2d": groups[:, None].repeat(1, 2), "negative": negative,
        "complex": attribute.to(torch.complex64), "float_3d": attribute[:, :, None], "list": groups.tolist(),
    }[sens]
    loss_fn = CCLKLoss(kernel=kernel, bandwidth=bandwidth)
    sens_ok = sens in valid and finite(sensitive)
    weights: list[list[float]] = []
    cond = 0.0
    if sens_ok and b >= 2:
        if sensitive.is_floating_point():
            rows = sensitive.double().reshape(b, -1).tolist()
        else:
            rows = ref_one_hot([int(x) for x in sensitive.tolist()])
        weights, cond = ref_cclk_weights(rows, kernel, bandwidth)

    def reference():
        if not weights:
            return None
        return ref_weighted_nce(z1, z2, weights)

    either = ("sensitive", "K_Z") if cond > 1e10 else ()
    desc = f"b={b} d={d} {dname(dtype)} z={special} sensitive={sens}/{sens_special} kernel={kernel} " \
           f"bandwidth={bandwidth} seed={seed}"
    return loss_case(desc, lambda: loss_fn(z1, z2, sensitive), embeddings_ok(z1, z2),
                     () if sens_ok else ("sensitive",), reference, dtype, either)


SPARSE_SENSITIVE = ("float", "groups", "bool", "buckets", "big_buckets", "group_too_big", "float_columns", "float_1d",
                    "nan", "wrong_b", "negative", "complex", "float_buckets", "complex_buckets", "list_buckets",
                    "short_buckets")


def sparse_case(rng: random.Random, ctx: dict) -> Case:
    valid = ("float", "groups", "bool", "buckets", "big_buckets")
    clean = rng.random() < 0.5
    seed = rng.randrange(10**6)
    b, d, dtype, special = rng.randint(0, 7), rng.randint(1, 4), rng.choice(DTYPES), rng.choice(SPECIALS)
    sens, sens_special = rng.choice(SPARSE_SENSITIVE), rng.choice(("normal", "huge", "tiny", "zeros"))
    impl, n_buckets, bucket_size = rng.choice(("sorted", "dense")), rng.choice((1, 2, 4)), rng.choice((None, None, 2))
    neighbours, n_hashes = rng.randint(0, 1), rng.randint(1, 2)
    hash_on, score, train = rng.choice(("z", "keys")), rng.choice(("dot", "neg_sqdist")), rng.random() < 0.5
    id_scale = rng.choice((10**3, 10**5, 10**6, 10**7, 10**9))
    b, dtype, special, sens = clean_input(clean, b, dtype, special, sens, valid, seed)
    z1, z2 = tensor((b, d), dtype, special, seed), tensor((b, d), dtype, special, seed + 1)
    wide = F64 if dtype == F64 else F32
    g = torch.Generator().manual_seed(seed)
    w_q, w_k = torch.randn(4, 3, generator=g, dtype=wide), torch.randn(4, 3, generator=g, dtype=wide)
    groups, attribute = torch.randint(0, 3, (b,), generator=g), tensor((b, 3), wide, sens_special, seed + 2)
    negative = groups.clone()
    negative[:1] = -1
    sensitive, buckets = {
        "float": (attribute, None), "groups": (groups, None), "bool": (groups > 0, None),
        "buckets": (attribute, torch.randint(0, 3, (b,), generator=g)), "big_buckets": (attribute, groups * id_scale),
        "group_too_big": (groups + 1, None), "float_columns": (torch.rand(b, 4, generator=g), None),
        "float_1d": (attribute[:, 0], None), "nan": (attribute / 0.0, None),
        "wrong_b": (torch.rand(b + 1, 3, generator=g), None), "negative": (negative, None),
        "complex": (attribute.to(torch.complex64), None), "float_buckets": (attribute, groups.double()),
        "complex_buckets": (attribute, groups.to(torch.complex64)), "list_buckets": (attribute, groups.tolist()),
        "short_buckets": (attribute, groups[1:]),
    }[sens]
    if sens == "group_too_big" and b:
        sensitive[0] = 3
    given = buckets if buckets is not None else None if sens in ("float", "float_1d") else sensitive
    n_b = 1 if given is not None else n_buckets if bucket_size is None else max(2, 2 * math.ceil(b / 4))
    if clean:
        n_hashes = 1 if impl == "sorted" else n_hashes
        neighbours = 0 if n_b == 1 else neighbours
    valid_config = not (impl == "sorted" and n_hashes > 1) and neighbours < n_b

    def make() -> SparseFARELoss:
        loss_fn = SparseFARELoss(3, d_k=4, rho=2.0, score=score, n_buckets=n_buckets, bucket_size=bucket_size,
                                 neighbours=neighbours, n_hashes=n_hashes, hash_on=hash_on, impl=impl,
                                 generator=torch.Generator().manual_seed(seed)).to(wide)
        with torch.no_grad():
            loss_fn.w_q.copy_(w_q)
            loss_fn.w_k.copy_(w_k)
        return loss_fn.train(train)

    def reference():
        if sensitive.is_floating_point():
            rows = ref_standardise(sensitive.double().tolist())
        else:
            rows = ref_standardise(ref_one_hot([int(x) for x in sensitive.tolist()], 3))
        if given is not None:
            ids = [int(x) for x in given.tolist()]
            support = [[j for j in range(b) if j != i and ids[j] == ids[i]] for i in range(b)]
        else:
            hashed = rows if hash_on == "z" else ref_projections(rows, w_k.tolist())
            support = ref_lsh_support(hashed, seed if train else 0, n_b, n_hashes, neighbours)
        support = [s or [j for j in range(b) if j != i] for i, s in enumerate(support)]  # empty: the dense row
        return ref_weighted_nce(z1, z2, ref_fare_weights(rows, w_q.tolist(), w_k.tolist(), support, score, rho=2.0))

    if buckets is None:

        def call():
            return make()(z1, z2, sensitive)
    else:

        def call():
            return make()(z1, z2, sensitive, buckets=buckets)

    other = ()
    if sens not in valid:
        other += ("sensitive", "buckets")
    if not valid_config:
        other += ("neighbours", "n_hashes")
    ids = f" ids x{id_scale:.0e}" if sens == "big_buckets" else ""
    desc = (f"b={b} d={d} {dname(dtype)} z={special} sensitive={sens}/{sens_special}{ids} impl={impl} "
            f"n_buckets={n_buckets} bucket_size={bucket_size} neighbours={neighbours} n_hashes={n_hashes} "
            f"hash_on={hash_on} score={score} train={train} seed={seed}")
    case = loss_case(desc, call, embeddings_ok(z1, z2), other, reference, dtype)
    case.isolate = sens == "big_buckets"
    return case


# ----------------------------------------------------------------------------- the loaders of users' own files


def file_case(desc: str, call: Callable[[], object], path: Path, expected) -> Case:
    """``expected``: REJECT, a check of the result (raising AssertionError), or ``(EITHER, check)``."""
    expect = REJECT if expected == REJECT else EITHER if isinstance(expected, tuple) else ACCEPT
    check = expected[1] if isinstance(expected, tuple) else expected

    def judge(out: object) -> tuple[str, str]:
        if expect == REJECT:
            return WRONG, f"a bad file was accepted: {out!r}"[:300]
        try:
            check(out)
        except AssertionError as err:
            return WRONG, f"wrong result: {err}"[:300]
        return CORRECT, ""

    return Case(desc, call, expect, (str(path),), judge)


def case_dir(ctx: dict, prefix: str) -> Path:
    ctx["n"] = ctx.get("n", 0) + 1
    path = Path(ctx["tmp"]) / f"{prefix}-{ctx['n']:05d}"
    path.mkdir()
    return path


def pick(rng_value, clean: bool, good: tuple, seed: int):
    return rng_value if not clean or rng_value in good else good[seed % len(good)]


NPZ_IMAGES = ("uint8", "int16", "float01", "float255", "float_frac", "out_of_range", "nan", "bool", "complex",
              "timedelta", "str")
NPZ_LABELS = ("int64", "int32", "uint64", "float_int", "float_frac", "negative", "nan", "inf", "huge", "uint64_huge",
              "bool", "str", "timedelta", "too_long", "2d")
NPZ_FILES = ("npz", "npz", "compressed", "truncated", "flipped", "garbage", "empty", "npy", "other_names", "missing")


def npz_case(rng: random.Random, ctx: dict) -> Case:
    seed, clean, n = rng.randrange(10**6), rng.random() < 0.5, rng.randint(0, 4)
    shape = pick(rng.choice([(3, 3), (2, 3, 1), (2, 2, 3), (3, 2, 2), (4,), (2, 3, 2, 1)]), clean,
                 ((3, 3), (2, 3, 1), (2, 2, 3)), seed)
    images = pick(rng.choice(NPZ_IMAGES), clean, ("uint8", "int16", "float01", "float255"), seed)
    labels = pick(rng.choice(NPZ_LABELS), clean, ("int64", "int32", "uint64", "float_int"), seed)
    file = pick(rng.choice(NPZ_FILES), clean, ("npz", "compressed", "flipped"), seed)
    gen = np.random.default_rng(seed)
    pixels = gen.integers(0, 256, (n, *shape))
    x = {
        "uint8": pixels.astype(np.uint8), "int16": pixels.astype(np.int16), "float01": gen.random((n, *shape)),
        "float255": pixels.astype(np.float32), "float_frac": pixels + 0.5, "out_of_range": pixels + 200,
        "nan": np.full((n, *shape), np.nan), "bool": pixels > 127, "complex": pixels + 1j,
        "timedelta": pixels.astype("timedelta64[s]"), "str": pixels.astype(str),
    }[images]
    classes = gen.integers(0, 10, n)
    y = {
        "int64": classes, "int32": classes.astype(np.int32), "uint64": classes.astype(np.uint64),
        "float_int": classes.astype(np.float64), "float_frac": classes + 0.25, "negative": classes - 10,
        "nan": np.where(classes > 4, np.nan, classes), "inf": np.where(classes > 4, np.inf, classes),
        "huge": classes * 1e30, "uint64_huge": classes.astype(np.uint64) * np.uint64(2**62),
        "bool": classes > 4, "str": classes.astype(str), "timedelta": classes.astype("timedelta64[s]"),
        "too_long": np.append(classes, 1), "2d": classes[:, None],
    }[labels]
    contract = npz_contract(x, y)

    def check(out) -> None:
        got_x, got_y = out
        assert got_x.dtype == np.uint8 and got_y.dtype == np.int64, (got_x.dtype, got_y.dtype)
        assert np.array_equal(got_x, contract[0]) and np.array_equal(got_y, contract[1]), "arrays differ"

    path = case_dir(ctx, "npz") / "mine.npz"
    if file != "missing":
        {"compressed": np.savez_compressed, "other_names": lambda p, **kw: np.savez(p, pixels=x, classes=y)}.get(
            file, np.savez)(path, images=x, labels=y)
        raw = path.read_bytes()
        if file == "truncated":
            path.write_bytes(raw[: len(raw) // 2])
        elif file == "flipped":
            flipped = bytearray(raw)
            flipped[seed % len(raw)] ^= 1 << (seed % 8)
            path.write_bytes(bytes(flipped))
        elif file == "garbage":
            path.write_bytes(gen.bytes(1 + seed % 200))
        elif file == "empty":
            path.write_bytes(b"")
        elif file == "npy":  # a .npy under a .npz name: np.load gives an array, not an archive
            with path.open("wb") as handle:
                np.save(handle, pixels)
    bad = contract is None or file in ("truncated", "garbage", "empty", "npy", "other_names", "missing")
    expected = (EITHER, check) if file == "flipped" and not bad else REJECT if bad else check
    desc = f"n={n} shape={shape} images={images} labels={labels} file={file} seed={seed}"
    return file_case(desc, lambda: load_npz(path), path, expected)


MNIST_PIXELS = ("ok", "ok", "ok", "256", "-1", "0.5", "nan", "1e3")
MNIST_LABELS = ("ok", "ok", "ok", "-1", "1.5", "nan", "inf", "1e30", "2**40")
MNIST_FORMATS = ("plain", "plain", "gz", "crlf", "blank_lines", "spaces", "header", "trailing_comma", "not_utf8",
                 "corrupt_gz", "not_gz", "truncated_gz", "missing")


def mnist_case(rng: random.Random, ctx: dict) -> Case:
    seed, clean = rng.randrange(10**6), rng.random() < 0.5
    n, columns = rng.randint(0, 3), rng.choice((785, 785, 785, 784, 786))
    pixel, label, fmt = rng.choice(MNIST_PIXELS), rng.choice(MNIST_LABELS), rng.choice(MNIST_FORMATS)
    n, columns, pixel = max(n, int(clean)), pick(columns, clean, (785,), seed), pick(pixel, clean, ("ok",), seed)
    label = pick(label, clean, ("ok", "2**40"), seed)
    fmt = pick(fmt, clean, ("plain", "gz", "crlf", "blank_lines", "spaces"), seed)
    gen = np.random.default_rng(seed)
    table = [[str(v) for v in gen.integers(0, 256, columns - 1)] + [str(gen.integers(0, 10))] for _ in range(n)]
    if n:
        table[0][seed % (columns - 1)] = pixel if pixel != "ok" else table[0][0]
        table[-1][-1] = label if label != "ok" else table[-1][-1]
        table[-1][-1] = str(2**40) if label == "2**40" else table[-1][-1]
    sep = ", " if fmt == "spaces" else ","
    lines = [sep.join(row) + ("," if fmt == "trailing_comma" else "") for row in table]
    if fmt == "header":
        lines.insert(0, ",".join(f"p{i}" for i in range(columns)))
    text = ("\r\n" if fmt == "crlf" else "\n\n" if fmt == "blank_lines" else "\n").join(lines) + "\n" * bool(lines)
    data = text.encode() + (b"\xe9\n" if fmt == "not_utf8" else b"")
    compressed = {"gz": gzip.compress(data), "corrupt_gz": b"\x1f\x8b\x08\x00" + gen.bytes(20), "not_gz": data,
                  "truncated_gz": gzip.compress(data)[:-12]}
    good = (n > 0 and columns == 785 and pixel == "ok" and label in ("ok", "2**40")
            and fmt in ("plain", "gz", "crlf", "blank_lines", "spaces"))

    def check(out) -> None:
        images, labels = out
        want = np.array([[float(v) for v in row] for row in table])
        assert images.dtype == np.uint8 and images.shape == (n, 28, 28), (images.dtype, images.shape)
        assert np.array_equal(images.reshape(n, -1), want[:, :-1]), "pixels differ"
        assert labels.dtype == np.int64 and labels.tolist() == [int(v) for v in want[:, -1]], labels

    path = case_dir(ctx, "mnist") / ("mine.csv.gz" if fmt in compressed else "mine.csv")
    if fmt != "missing":
        path.write_bytes(compressed.get(fmt, data))
    desc = f"n={n} columns={columns} pixel={pixel} label={label} format={fmt} seed={seed}"
    return file_case(desc, lambda: load_mnist5k(path), path, check if good else REJECT)


TEXT_WORDS = ("alpha", "Beta", "γάμμα", "日本語", "😀", "x", "42", "it's", "—", "a\u00a0b", "\x00")
TEXT_FILES = ("utf-8", "utf-8", "gz", "bz2", "not_utf8", "utf-16", "corrupt_gz", "truncated_bz2", "whitespace",
              "missing")


def text_input(rng: random.Random) -> dict:
    docs = [[rng.choice(TEXT_WORDS) for _ in range(rng.randint(1, 6))] for _ in range(rng.randint(0, 7))]
    return {"docs": docs, "inner": rng.choice((" ", "\n")), "sep": rng.choice(("\n\n", "\n \t\n", "\n\n\n", "\n")),
            "crlf": rng.random() < 0.5, "file": rng.choice(TEXT_FILES), "level": rng.choice(("word", "byte")),
            "split": rng.choice(("article", "contiguous")), "seed": rng.randrange(10**6)}


def write_text(ctx: dict, p: dict) -> tuple[Path, list[str], bool]:
    """The file of a text input, its documents and whether it is bad (as in tests/test_fuzz.py)."""
    documents = [p["inner"].join(words) for words in p["docs"]]
    text = p["sep"].join(documents)
    if p["sep"] == "\n":  # no blank line: the whole text is one document
        documents = [text] if text else []
    data = (text.replace("\n", "\r\n") if p["crlf"] else text).encode()
    seed, file = p["seed"], p["file"]
    data = {"gz": gzip.compress(data), "bz2": bz2.compress(data), "not_utf8": data + b" caf\xe9",
            "utf-16": text.encode("utf-16"), "corrupt_gz": b"\x1f\x8b\x08\x00" + bytes([seed % 256]) * 9,
            "truncated_bz2": bz2.compress(data)[: 10 + seed % 20], "whitespace": b" \n\t\n \r\n"}.get(file, data)
    bad = not documents or file in ("not_utf8", "utf-16", "corrupt_gz", "truncated_bz2", "whitespace", "missing")
    suffix = {"gz": ".txt.gz", "corrupt_gz": ".txt.gz", "bz2": ".txt.bz2", "truncated_bz2": ".txt.bz2"}
    path = case_dir(ctx, "text") / ("mine" + suffix.get(file, ".txt"))
    if file != "missing":
        path.write_bytes(data)
    return path, documents, bad


def text_desc(p: dict) -> str:
    return (f"docs={len(p['docs'])} words={sum(map(len, p['docs']))} inner={p['inner']!r} sep={p['sep']!r} "
            f"crlf={p['crlf']} file={p['file']} seed={p['seed']}")


def text_case(rng: random.Random, ctx: dict) -> Case:
    p = text_input(rng)
    path, documents, bad = write_text(ctx, p)

    def check(out) -> None:
        assert out == documents, (out, documents)

    return file_case(text_desc(p), lambda: load_text_file(path), path, REJECT if bad else check)


def corpus_check(documents: list[str], level: str, sure: bool):
    def check(corpus) -> None:
        splits = (corpus.train, corpus.valid, corpus.test)
        assert all(t.dim() == 1 and t.numel() for t in splits), [t.shape for t in splits]
        if level == "byte":
            pieces = [bytes(t.tolist()).decode("utf-8") for t in splits]
            visible = Counter(c for piece in pieces for c in piece if not c.isspace())
            assert visible == Counter(c for d in documents for c in d if not c.isspace()), "characters differ"
            if sure:
                assert sum(map(len, pieces)) == sum(len(d) + 1 for d in documents), pieces
        else:
            assert corpus.vocab.itos[:2] == ["<unk>", "<eos>"] and len(corpus.vocab) == corpus.vocab_size
            assert all(int(t.min()) >= 0 and int(t.max()) < corpus.vocab_size for t in splits)
            if sure:
                assert sum(int((t == corpus.vocab.eos_id).sum()) for t in splits) == len(documents), "eos count"

    return check


def corpus_case(rng: random.Random, ctx: dict) -> Case:
    """build_corpus on a text file; one in six cases rewrites the file between two calls (the second must
    read the new text: it must equal a fresh build of that text at another path)."""
    rewrite = rng.random() < 1 / 6
    p = text_input(rng)
    fractions = (0.5, 0.25, 0.25)
    if rewrite:
        p.update(file="utf-8", sep="\n\n", inner=" ", split="article")
        p["docs"] = [[rng.choice(TEXT_WORDS[:4]) for _ in range(rng.randint(1, 4))] for _ in range(rng.randint(4, 7))]
        later = {**p, "docs": [[rng.choice(TEXT_WORDS[4:8]) for _ in range(rng.randint(1, 4))]
                               for _ in range(rng.randint(4, 7))]}
        path, _, _ = write_text(ctx, p)
        fresh, _, _ = write_text(ctx, later)
        level = p["level"]

        def call():
            try:
                build_corpus(level, path=path, split="article", fractions=fractions)
            except Exception as err:
                raise Verdict(CRASH, f"the first build of a good file failed: {crash_message(err)}") from err
            path.write_bytes(fresh.read_bytes())
            stat = path.stat()
            os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
            return build_corpus(level, path=path, split="article", fractions=fractions)

        def check(corpus) -> None:
            want = build_corpus(level, path=fresh, split="article", fractions=fractions)
            for name in ("train", "valid", "test"):
                assert torch.equal(getattr(corpus, name), getattr(want, name)), f"{name} holds the old text"
            assert corpus.vocab_size == want.vocab_size, "the vocabulary of the old text"

        return file_case(f"rewritten file, {level}: {text_desc(p)}", call, path, check)
    path, documents, bad = write_text(ctx, p)
    n = len(documents)
    n_train, n_valid = round(0.5 * n), round(0.25 * n)
    sure = p["split"] == "article" and n >= 3
    empty_split = sure and (n_train == 0 or min(n_valid, n - n_train) == 0 or n - n_train - n_valid <= 0)
    check = corpus_check(documents, p["level"], sure)
    expected = REJECT if bad or empty_split else check if sure else (EITHER, check)
    level, split = p["level"], p["split"]
    return file_case(f"{level} {split}: {text_desc(p)}",
                     lambda: build_corpus(level, path=path, split=split, fractions=fractions), path, expected)


# ----------------------------------------------------------------------------- running the targets

TARGETS: dict[str, tuple[Callable[[random.Random, dict], Case], int]] = {
    "EllipticalAttention": (attention_case, 260),
    "MoE (ac router)": (moe_case, 220),
    "SoftMoE": (soft_moe_case, 160),
    "load_balancing_loss": (aux_case, 220),
    "router_z_loss": (z_loss_case, 160),
    "InfoNCELoss": (info_nce_case, 170),
    "FARELoss": (fare_case, 260),
    "FairInfoNCELoss": (fair_case, 200),
    "CCLKLoss": (cclk_case, 200),
    "SparseFARELoss": (sparse_case, 260),
    "load_npz": (npz_case, 200),
    "load_mnist5k (csv)": (mnist_case, 150),
    "load_text_file": (text_case, 180),
    "build_corpus": (corpus_case, 150),
}


def cases(target: str, seed: int, scale: float, ctx: dict) -> Iterator[Case]:
    make, count = TARGETS[target]
    rng = random.Random(f"{seed}:{target}")
    for _ in range(max(1, round(count * scale))):
        yield make(rng, ctx)


def commit_of(src: Path) -> tuple[str, bool | None]:
    """The short commit of the checkout holding ``src`` and whether ``src`` differs from it (read-only git
    calls: ``GIT_OPTIONAL_LOCKS=0`` keeps git from refreshing the index); ``("unknown", None)`` outside git."""
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}
    try:
        head = subprocess.run(["git", "-C", str(src), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=30, env=env).stdout.strip()
        if not head:
            return "unknown", None
        diff = subprocess.run(["git", "-C", str(src), "diff", "--quiet", "HEAD", "--", "."], capture_output=True,
                              timeout=30, env=env)
        return head, diff.returncode != 0
    except (OSError, subprocess.SubprocessError):
        return "unknown", None


def markdown(counts: dict[str, Counter]) -> str:
    head = "| target | tried | " + " | ".join(CATEGORIES) + " |"
    lines = [head, "|" + "---|" * (len(CATEGORIES) + 2)]
    total: Counter = Counter()
    for target, c in counts.items():
        total.update(c)
        lines.append(f"| {target} | {sum(c.values())} | " + " | ".join(str(c[k]) for k in CATEGORIES) + " |")
    lines.append(f"| **total** | **{sum(total.values())}** | " + " | ".join(f"**{total[k]}**" for k in CATEGORIES)
                 + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the JSON file to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies the number of inputs per target")
    parser.add_argument("--only", nargs="*", choices=list(TARGETS), help="run only these targets")
    parser.add_argument("--label", help="the commit to record when the library is not in a git checkout "
                        "(e.g. a `git archive` copy)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    logging.disable(logging.CRITICAL)
    src = Path(clusterformers.__file__).resolve().parents[1]
    started = time.time()
    counts: dict[str, Counter] = {}
    records, seconds = [], {}
    with tempfile.TemporaryDirectory(prefix="reliability-") as tmp:
        ctx = {"tmp": tmp}
        for target in args.only or TARGETS:
            t0 = time.time()
            counts[target] = Counter()
            for case in cases(target, args.seed, args.scale, ctx):
                category, message = classify_isolated(case) if case.isolate else classify(case)
                counts[target][category] += 1
                if category not in (CORRECT, CLEAR):
                    records.append({"target": target, "input": case.desc, "expect": case.expect,
                                    "outcome": category, "message": message[:600]})
            seconds[target] = round(time.time() - t0, 1)
            print(f"{target}: {dict(counts[target])} ({seconds[target]} s)", file=sys.stderr, flush=True)
    total: Counter = Counter()
    for c in counts.values():
        total.update(c)
    commit, dirty = commit_of(src)
    if commit == "unknown" and args.label:
        commit = args.label
    result = {
        "library": str(src), "commit": commit, "uncommitted_changes": dirty, "seed": args.seed, "scale": args.scale,
        "torch": torch.__version__, "numpy": np.__version__, "seconds": round(time.time() - started, 1),
        "seconds_per_target": seconds, "categories": list(CATEGORIES),
        "counts": {t: {"tried": sum(c.values()), **{k: c[k] for k in CATEGORIES}} for t, c in counts.items()},
        "total": {"tried": sum(total.values()), **{k: total[k] for k in CATEGORIES}},
        "records": records,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    dirty_note = " with uncommitted changes" if dirty else ""
    print(f"commit {commit}{dirty_note} ({src}), {result['seconds']} s\n")
    print(markdown(counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
