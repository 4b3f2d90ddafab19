"""Property tests over bad and odd inputs: every call ends in an error that names an argument, or in a
finite result of the right shape; never a silent NaN, an unclear torch-internal crash or a wrong shape.
On valid inputs the contrastive losses must also equal slow references written out here, and the loaders of
users' own files (``.npz``, MNIST CSV, text, XML dumps) are fed random, damaged and out-of-range files.

``CLUSTERFORMERS_FUZZ_EXAMPLES`` sets the number of examples per test (default 150, kept small for
``make test``; e.g. 2000 for a long run).
"""

from __future__ import annotations

import bz2
import gzip
import math
import os
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from references import (
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
)
from clusterformers.contrastive import KMeansDiscretizer
from clusterformers.data import build_corpus, load_mnist5k, load_npz, load_text_file
from clusterformers.data.text import load_documents

pytestmark = pytest.mark.usefixtures("one_thread")

EXAMPLES = int(os.environ.get("CLUSTERFORMERS_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
ERRORS = (ValueError, TypeError, NotImplementedError)

SPECIALS = st.sampled_from(["normal", "nan", "inf", "huge", "tiny", "zeros"])
DTYPES = st.sampled_from([torch.float32, torch.float64, torch.float16, torch.int64, torch.bool, torch.complex64])


def tensor(shape: tuple[int, ...], dtype: torch.dtype, special: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    if special == "nan" and x.numel():
        x.view(-1)[seed % x.numel()] = float("nan")
    elif special == "inf" and x.numel():
        x.view(-1)[seed % x.numel()] = float("inf")
    elif special == "huge":
        x = x * 1e20
    elif special == "tiny":
        x = x * 1e-30
    elif special == "zeros":
        x = torch.zeros(shape, dtype=torch.float64)
    if dtype == torch.bool:
        return x > 0
    if dtype == torch.complex64:
        return x.to(torch.complex64)
    if not dtype.is_floating_point:
        return x.clamp(-1e6, 1e6).nan_to_num().to(dtype)
    return x.to(dtype)


def mask_for(kind: str, b: int, n: int, seed: int) -> torch.Tensor | None:
    g = torch.Generator().manual_seed(seed)
    if kind == "none":
        return None
    if kind == "float":
        return torch.zeros(b, n)
    if kind == "wrong_shape":
        return torch.ones(b, n + 1, dtype=torch.bool)
    keep = torch.rand(b, n, generator=g) > 0.3
    if n:
        keep[:, 0] = True
    if kind == "empty_row" and b:
        keep[0] = False
    return keep


def assert_named_error_or_finite(call, shape: tuple[int, ...], names: tuple[str, ...]) -> None:
    try:
        out = call()
    except ERRORS as err:
        message = str(err)
        assert any(name in message for name in names), f"unclear error: {message!r}"
        return
    assert tuple(out.shape) == shape, (tuple(out.shape), shape)
    assert torch.isfinite(out).all(), "a silent NaN/inf result"


@FUZZ
@given(b=st.integers(0, 3), n=st.integers(0, 6), dim=st.sampled_from([8, 7]), dtype=DTYPES, special=SPECIALS,
       mask=st.sampled_from(["none", "keep", "empty_row", "float", "wrong_shape"]), causal=st.booleans(),
       with_prev=st.booleans(), seed=st.integers(0, 10**6))
def test_elliptical_attention_inputs(b, n, dim, dtype, special, mask, causal, with_prev, seed) -> None:
    layer = EllipticalAttention(8, 2, causal=causal)
    x = tensor((b, n, dim), dtype, special, seed)
    keep = mask_for(mask, b, n, seed)
    if causal and keep is not None and keep.dtype == torch.bool and keep.shape == (b, n):
        keep = keep.sort(dim=1, descending=True, stable=True).values  # right padding, as causal needs
    v_prev = tensor((b, 2, n, 4), torch.float32, special, seed + 1) if with_prev else None
    if x.is_floating_point() and x.dtype != torch.float32:
        layer = layer.to(x.dtype)
    names = ("x", "key_padding_mask", "v_prev", "v ", "attention output", "dtype", "expected")

    def call():
        return layer(x, key_padding_mask=keep, v_prev=v_prev)

    try:
        out = call()
    except ERRORS as err:
        assert any(name in str(err) for name in names), f"unclear error: {err!r}"
        return
    except RuntimeError as err:  # torch's own dtype mismatch (e.g. float16 weights on CPU) must not pass silently
        pytest.fail(f"torch-internal error reached the user: {err!r}")
    assert tuple(out.shape) == (b, n, 8) and torch.isfinite(out).all()


@FUZZ
@given(t=st.integers(0, 12), dim=st.sampled_from([6, 5]), dtype=DTYPES, special=SPECIALS,
       mask=st.sampled_from(["none", "keep", "float", "wrong_shape"]), capacity=st.sampled_from([None, 1.5]),
       soft=st.booleans(), seed=st.integers(0, 10**6))
def test_moe_inputs(t, dim, dtype, special, mask, capacity, soft, seed) -> None:
    layer = SoftMoE(6, 4, 1, 8) if soft else MoE(6, 4, 2, 8, router="ac", capacity_factor=capacity)
    x = tensor((2, t, dim), dtype, special, seed)
    keep = mask_for(mask, 2, t, seed)
    if x.is_floating_point() and x.dtype != torch.float32:
        layer = layer.to(x.dtype)
    names = ("x", "key_padding_mask", "h:", "expected")
    try:
        out = layer(x, key_padding_mask=keep)
    except ERRORS as err:
        assert any(name in str(err) for name in names), f"unclear error: {err!r}"
        return
    except RuntimeError as err:
        pytest.fail(f"torch-internal error reached the user: {err!r}")
    assert tuple(out.shape) == (2, t, 6) and torch.isfinite(out).all()


@FUZZ
@given(t=st.integers(0, 10), e=st.integers(1, 5), top_k=st.integers(-1, 6), special=SPECIALS,
       seed=st.integers(0, 10**6))
def test_load_balancing_loss_inputs(t, e, top_k, special, seed) -> None:
    logits = tensor((t, 4), torch.float32, special, seed)
    names = ("logits", "top_k", "key_padding_mask")

    def call():
        return load_balancing_loss(logits, e, top_k)

    if t == 0:
        with pytest.raises(ValueError, match="logits"):
            call()
    elif special in ("nan", "inf"):  # non-finite logits propagate (a pure function: no host read)
        try:
            assert call().shape == ()
        except ERRORS as err:
            assert any(name in str(err) for name in names), f"unclear error: {err!r}"
    else:
        assert_named_error_or_finite(call, (), names)


@FUZZ
@given(b=st.integers(0, 6), d=st.integers(1, 5), dtype=DTYPES, special=SPECIALS, fare=st.booleans(),
       sens=st.sampled_from(["float", "int", "wrong_b", "nan"]), seed=st.integers(0, 10**6))
def test_contrastive_loss_inputs(b, d, dtype, special, fare, sens, seed) -> None:
    z1, z2 = tensor((b, d), dtype, special, seed), tensor((b, d), dtype, special, seed + 1)
    g = torch.Generator().manual_seed(seed)
    sensitive = {
        "float": torch.rand(b, 3, generator=g),
        "int": torch.randint(0, 3, (b,), generator=g),
        "wrong_b": torch.rand(b + 1, 3, generator=g),
        "nan": torch.full((b, 3), float("nan")),
    }[sens]
    loss_fn = FARELoss(3) if fare else InfoNCELoss()
    names = ("z1", "z2", "sensitive", "embeddings", "batch", "b ")
    assert_named_error_or_finite(lambda: loss_fn(z1, z2, sensitive), (), names)


# ----------------------------------------------------------------------------- the other contrastive losses
# On a valid input (finite float32/float64 embeddings, b >= 2, a well-formed attribute) each loss must equal a
# slow reference written out below, term by term, from the formulas of the docstrings of contrastive/nce.py and
# contrastive/functional.py, in Python floats (float64).

GOOD = ("error", "correct", "finite")
KMEANS = KMeansDiscretizer(3, seed=0).fit(torch.rand(60, 3, generator=torch.Generator().manual_seed(0)))


def loss_outcome(call, names: tuple[str, ...], reference=None, tol: float = 1e-9) -> tuple[str, str]:
    """``("error" | "correct" | "finite", "")`` or a failure ``(kind, detail)``.

    ``reference`` (a function, given only for valid inputs) is the value the loss must have; a valid input
    must not be refused. Otherwise a named error or a finite scalar is fine.
    """
    try:
        out = call()
    except ERRORS as err:
        if not any(name in str(err) for name in names):
            return "unclear", f"unclear error: {err!r}"
        if reference is not None:
            return "refused", f"a valid input was refused: {err!r}"
        return "error", ""
    except Exception as err:  # a torch-internal error reaching the user: what this test looks for
        return "unclear", f"unclear crash: {err!r}"
    if tuple(out.shape) != () or not bool(torch.isfinite(out)):
        return "nan", f"not a finite scalar: {out!r}"
    if reference is None:
        return "finite", ""
    want, got = reference(), float(out.detach())
    if abs(got - want) > tol * max(1.0, abs(want)):
        return "wrong", f"loss {got!r}, reference {want!r}"
    return "correct", ""


def clean_input(clean: bool, b: int, dtype: torch.dtype, special: str, sens: str, valid: tuple[str, ...],
                seed: int) -> tuple[int, torch.dtype, str, str]:
    """With ``clean``, each bad choice of the draw replaced by a good one (so about half the inputs are valid)."""
    if not clean:
        return b, dtype, special, sens
    if dtype not in (torch.float32, torch.float64):
        dtype = (torch.float32, torch.float64)[seed % 2]
    return max(b, 2), dtype, "normal" if special in ("nan", "inf") else special, sens if sens in valid \
        else valid[seed % len(valid)]


def tol_for(dtype: torch.dtype) -> float:
    return 1e-9 if dtype == torch.float64 else 1e-5


def valid_embeddings(b: int, dtype: torch.dtype, special: str) -> bool:
    return b >= 2 and dtype in (torch.float32, torch.float64) and special not in ("nan", "inf")


FAIR_SENSITIVE = st.sampled_from(["groups", "bool", "big_ids", "float", "float16", "no_discretizer", "unfitted",
                                  "wrong_columns", "negative", "wrong_b", "nan", "int_2d", "complex", "list"])


@FUZZ
@given(b=st.integers(0, 6), d=st.integers(1, 5), dtype=DTYPES, special=SPECIALS, sens=FAIR_SENSITIVE,
       negatives=st.sampled_from(["both", "cross"]), symmetric=st.booleans(), clean=st.booleans(),
       seed=st.integers(0, 10**6))
def test_fair_info_nce_inputs(b, d, dtype, special, sens, negatives, symmetric, clean, seed) -> None:
    valid = ("groups", "bool", "big_ids", "float", "float16")
    b, dtype, special, sens = clean_input(clean, b, dtype, special, sens, valid, seed)
    z1, z2 = tensor((b, d), dtype, special, seed), tensor((b, d), dtype, special, seed + 1)
    g = torch.Generator().manual_seed(seed)
    groups, attribute = torch.randint(0, 3, (b,), generator=g), torch.rand(b, 3, generator=g, dtype=torch.float64)
    negative = groups.clone()
    negative[:1] = -1
    sensitive, discretizer = {
        "groups": (groups, None), "bool": (groups > 0, None), "big_ids": (groups * 10**12, None),
        "float": (attribute, KMEANS), "float16": (attribute.half(), KMEANS), "no_discretizer": (attribute, None),
        "unfitted": (attribute, KMeansDiscretizer(3)), "wrong_columns": (attribute[:, :2], KMEANS),
        "negative": (negative, None), "wrong_b": (torch.randint(0, 3, (b + 1,), generator=g), None),
        "nan": (torch.full((b, 3), float("nan")), KMEANS), "int_2d": (groups[:, None].repeat(1, 2), None),
        "complex": (attribute.to(torch.complex64), KMEANS), "list": (groups.tolist(), None),
    }[sens]
    loss_fn = FairInfoNCELoss(discretizer=discretizer, negatives=negatives, symmetric=symmetric)
    reference = None
    if valid_embeddings(b, dtype, special) and sens in valid:

        def reference() -> float:
            if sensitive.is_floating_point():  # the nearest fitted centre, by explicit squared distances
                centres = KMEANS.centers.tolist()
                labels = [min(range(len(centres)), key=lambda c: sum((x - y) ** 2 for x, y in zip(row, centres[c])))
                          for row in sensitive.double().tolist()]
            else:
                labels = [int(x) for x in sensitive.tolist()]
            w = [[1.0 if j != i and labels[i] == labels[j] else 0.0 for j in range(b)] for i in range(b)]
            return ref_weighted_nce(z1, z2, w, negatives=negatives, symmetric=symmetric)

    kind, detail = loss_outcome(lambda: loss_fn(z1, z2, sensitive), ("z1", "z2", "sensitive", "discretizer"),
                                reference, tol_for(dtype))
    assert kind in GOOD, detail


def ref_cclk_weights(rows: list[list[float]], kernel: str, bandwidth: float | None, lam: float = 0.01,
                     clip: float = 1e-6) -> list[list[float]]:
    """functional.cclk: ``W_ij = (b−1) M_ji``, ``M = (K_Z + λI)⁻¹ K_Z``, ``M_ii = 0``, ``M_ij < clip → 0``;
    kernels.py: ``K_Z`` with diagonal 1, the bandwidth the median over pairs (torch's lower median) or 1."""
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
    m = np.linalg.solve(k + lam * np.eye(b), k)
    return [[(b - 1) * m[j, i] if j != i and m[j, i] >= clip else 0.0 for j in range(b)] for i in range(b)]


CCLK_SENSITIVE = st.sampled_from(["float", "float_1d", "float16", "groups", "bool", "nan", "inf", "wrong_b",
                                  "int_2d", "negative", "complex", "float_3d", "list"])


@FUZZ
@given(b=st.integers(0, 6), d=st.integers(1, 5), dtype=DTYPES, special=SPECIALS, sens=CCLK_SENSITIVE,
       sens_special=st.sampled_from(["normal", "huge", "tiny", "zeros"]),
       kernel=st.sampled_from(["cosine", "rbf", "laplacian", "linear", "polynomial"]),
       bandwidth=st.sampled_from([None, 0.5]), clean=st.booleans(), seed=st.integers(0, 10**6))
def test_cclk_inputs(b, d, dtype, special, sens, sens_special, kernel, bandwidth, clean, seed) -> None:
    valid = ("float", "float_1d", "float16", "groups", "bool")
    b, dtype, special, sens = clean_input(clean, b, dtype, special, sens, valid, seed)
    z1, z2 = tensor((b, d), dtype, special, seed), tensor((b, d), dtype, special, seed + 1)
    g = torch.Generator().manual_seed(seed)
    groups, attribute = torch.randint(0, 3, (b,), generator=g), tensor((b, 3), torch.float64, sens_special, seed + 2)
    negative = groups.clone()
    negative[:1] = -1
    sensitive = {
        "float": attribute, "float_1d": attribute[:, 0], "float16": attribute.half(), "groups": groups,
        "bool": groups > 0, "nan": tensor((b, 3), torch.float64, "nan", seed), "inf": attribute / 0.0,
        "wrong_b": torch.rand(b + 1, 3, generator=g), "int_2d": groups[:, None].repeat(1, 2), "negative": negative,
        "complex": attribute.to(torch.complex64), "float_3d": attribute[:, :, None], "list": groups.tolist(),
    }[sens]
    loss_fn = CCLKLoss(kernel=kernel, bandwidth=bandwidth)
    reference = None
    if valid_embeddings(b, dtype, special) and sens in valid and bool(torch.isfinite(sensitive.double()).all()):

        def reference() -> float:
            if sensitive.is_floating_point():
                rows = sensitive.double().reshape(b, -1).tolist()
            else:
                rows = ref_one_hot([int(x) for x in sensitive.tolist()])
            return ref_weighted_nce(z1, z2, ref_cclk_weights(rows, kernel, bandwidth))

    kind, detail = loss_outcome(lambda: loss_fn(z1, z2, sensitive), ("z1", "z2", "sensitive", "K_Z"),
                                reference, tol_for(dtype))
    assert kind in GOOD, detail


SPARSE_SENSITIVE = st.sampled_from(["float", "groups", "bool", "buckets", "big_buckets", "group_too_big",
                                    "float_columns", "float_1d", "nan", "wrong_b", "negative", "complex",
                                    "float_buckets", "complex_buckets", "list_buckets", "short_buckets"])


@FUZZ
@given(b=st.integers(0, 7), d=st.integers(1, 4), dtype=DTYPES, special=SPECIALS, sens=SPARSE_SENSITIVE,
       sens_special=st.sampled_from(["normal", "huge", "tiny", "zeros"]), impl=st.sampled_from(["sorted", "dense"]),
       n_buckets=st.sampled_from([1, 2, 4]), bucket_size=st.sampled_from([None, None, 2]),
       neighbours=st.integers(0, 1), n_hashes=st.integers(1, 2), hash_on=st.sampled_from(["z", "keys"]),
       score=st.sampled_from(["dot", "neg_sqdist"]), train=st.booleans(), clean=st.booleans(),
       seed=st.integers(0, 10**6))
def test_sparse_fare_inputs(b, d, dtype, special, sens, sens_special, impl, n_buckets, bucket_size, neighbours,
                            n_hashes, hash_on, score, train, clean, seed) -> None:
    valid = ("float", "groups", "bool", "buckets", "big_buckets")
    b, dtype, special, sens = clean_input(clean, b, dtype, special, sens, valid, seed)
    z1, z2 = tensor((b, d), dtype, special, seed), tensor((b, d), dtype, special, seed + 1)
    wide = torch.float64 if dtype == torch.float64 else torch.float32  # the module's dtype
    g = torch.Generator().manual_seed(seed)
    w_q, w_k = torch.randn(4, 3, generator=g, dtype=wide), torch.randn(4, 3, generator=g, dtype=wide)
    groups, attribute = torch.randint(0, 3, (b,), generator=g), tensor((b, 3), wide, sens_special, seed + 2)
    negative = groups.clone()
    negative[:1] = -1
    sensitive, buckets = {
        "float": (attribute, None), "groups": (groups, None), "bool": (groups > 0, None),
        "buckets": (attribute, torch.randint(0, 3, (b,), generator=g)), "big_buckets": (attribute, groups * 10**9),
        "group_too_big": (groups + 1, None), "float_columns": (torch.rand(b, 4, generator=g), None),
        "float_1d": (attribute[:, 0], None), "nan": (attribute / 0.0, None),
        "wrong_b": (torch.rand(b + 1, 3, generator=g), None), "negative": (negative, None),
        "complex": (attribute.to(torch.complex64), None), "float_buckets": (attribute, groups.double()),
        "complex_buckets": (attribute, groups.to(torch.complex64)), "list_buckets": (attribute, groups.tolist()),
        "short_buckets": (attribute, groups[1:]),
    }[sens]
    if sens == "group_too_big" and b:
        sensitive[0] = 3

    given_buckets = buckets if buckets is not None else None if sens in ("float", "float_1d") else sensitive
    # the number of hashed buckets (given buckets: 1, as neighbours must then be 0 too)
    n_b = 1 if given_buckets is not None else n_buckets if bucket_size is None else max(2, 2 * math.ceil(b / 4))
    if clean:
        n_hashes = 1 if impl == "sorted" else n_hashes
        neighbours = 0 if n_b == 1 else neighbours
    valid_config = not (impl == "sorted" and n_hashes > 1) and neighbours < n_b

    def make() -> SparseFARELoss:
        loss_fn = SparseFARELoss(3, d_k=4, score=score, n_buckets=n_buckets, bucket_size=bucket_size,
                                 neighbours=neighbours, n_hashes=n_hashes, hash_on=hash_on, impl=impl,
                                 generator=torch.Generator().manual_seed(seed)).to(wide)
        with torch.no_grad():
            loss_fn.w_q.copy_(w_q)
            loss_fn.w_k.copy_(w_k)
        return loss_fn.train(train)

    names = ("z1", "z2", "sensitive", "buckets", "neighbours", "n_hashes")
    reference = None
    if valid_embeddings(b, dtype, special) and valid_config and sens in valid:

        def reference() -> float:
            if sensitive.is_floating_point():
                rows = ref_standardise(sensitive.double().tolist())
            else:
                rows = ref_standardise(ref_one_hot([int(x) for x in sensitive.tolist()], 3))
            if given_buckets is not None:
                ids = [int(x) for x in given_buckets.tolist()]
                support = [[j for j in range(b) if j != i and ids[j] == ids[i]] for i in range(b)]
            else:
                hashed = rows if hash_on == "z" else ref_projections(rows, w_k.tolist())
                support = ref_lsh_support(hashed, seed if train else 0, n_b, n_hashes, neighbours)
            support = [s or [j for j in range(b) if j != i] for i, s in enumerate(support)]  # empty: dense row
            return ref_weighted_nce(z1, z2, ref_fare_weights(rows, w_q.tolist(), w_k.tolist(), support, score))

    call = (lambda: make()(z1, z2, sensitive)) if buckets is None else (lambda: make()(z1, z2, sensitive,
                                                                                      buckets=buckets))
    kind, detail = loss_outcome(call, names, reference, tol_for(dtype))
    assert kind in GOOD, detail
    if reference is not None and n_b == 1 and given_buckets is None:  # n_buckets=1 is FARE exactly (docstring)
        dense = FARELoss(3, d_k=4, score=score).to(wide)
        with torch.no_grad():
            dense.w_q.copy_(w_q)
            dense.w_k.copy_(w_k)
        torch.testing.assert_close(call(), dense(z1, z2, sensitive), rtol=tol_for(dtype), atol=tol_for(dtype))


# ----------------------------------------------------------------------------- the loaders of users' own files
# Each example writes a small random file into a fresh temporary directory. A bad file must end in a ValueError
# (KeyError for a missing array) whose message holds the file's path; a good one must give what the loader's
# docstring promises, computed here from the data that was written.

REJECT, EITHER = "reject", "either"  # the file must be refused / may be refused (a corruption that can be harmless)


def pick(clean: bool, value, good: tuple, seed: int):
    """``value``, or with ``clean`` a good choice in its place (so about half the files are good)."""
    return value if not clean or value in good else good[seed % len(good)]


def file_outcome(call, path: Path, expected) -> tuple[str, str]:
    """Like :func:`loss_outcome` for a loader: ``expected`` is :data:`REJECT`, or a check of the result (raising
    AssertionError when it is wrong), or ``(EITHER, check)``."""
    may_refuse = expected == REJECT or isinstance(expected, tuple)
    try:
        out = call()
    except (ValueError, KeyError) as err:
        if str(path) not in str(err):
            return "unclear", f"error without the path: {err!r}"
        return ("error", "") if may_refuse else ("refused", f"a good file was refused: {err!r}")
    except Exception as err:  # a raw parser error reaching the user: what this test looks for
        return "unclear", f"unclear crash: {type(err).__name__}: {err}"
    if expected == REJECT:
        return "wrong", f"a bad file was accepted: {out!r}"[:400]
    try:
        (expected[1] if isinstance(expected, tuple) else expected)(out)
    except AssertionError as err:
        return "wrong", f"wrong result: {err}"
    return "correct", ""


NPZ_IMAGES = st.sampled_from(["uint8", "int16", "float01", "float255", "float_frac", "out_of_range", "nan", "bool",
                              "complex", "timedelta", "str"])
NPZ_LABELS = st.sampled_from(["int64", "int32", "uint64", "float_int", "float_frac", "negative", "nan", "inf", "huge",
                              "uint64_huge", "bool", "str", "timedelta", "too_long", "2d"])
NPZ_FILES = st.sampled_from(["npz", "npz", "compressed", "truncated", "flipped", "garbage", "empty", "npy",
                             "other_names"])


@FUZZ
@given(n=st.integers(0, 4), shape=st.sampled_from([(3, 3), (2, 3, 1), (2, 2, 3), (3, 2, 2), (4,), (2, 3, 2, 1)]),
       images=NPZ_IMAGES, labels=NPZ_LABELS, file=NPZ_FILES, clean=st.booleans(), seed=st.integers(0, 10**6))
def test_load_npz_files(n, shape, images, labels, file, clean, seed) -> None:
    shape = pick(clean, shape, ((3, 3), (2, 3, 1), (2, 2, 3)), seed)
    images = pick(clean, images, ("uint8", "int16", "float01", "float255"), seed)
    labels = pick(clean, labels, ("int64", "int32", "uint64", "float_int"), seed)
    file = pick(clean, file, ("npz", "compressed", "flipped"), seed)
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (n, *shape))
    x = {
        "uint8": pixels.astype(np.uint8), "int16": pixels.astype(np.int16), "float01": rng.random((n, *shape)),
        "float255": pixels.astype(np.float32), "float_frac": pixels + 0.5, "out_of_range": pixels + 200,
        "nan": np.full((n, *shape), np.nan), "bool": pixels > 127, "complex": pixels + 1j,
        "timedelta": pixels.astype("timedelta64[s]"), "str": pixels.astype(str),
    }[images]
    classes = rng.integers(0, 10, n)
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
        assert np.array_equal(got_x, contract[0]) and np.array_equal(got_y, contract[1]), (got_x, got_y, contract)

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mine.npz"
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
            path.write_bytes(rng.bytes(1 + seed % 200))
        elif file == "empty":
            path.write_bytes(b"")
        elif file == "npy":  # a .npy under a .npz name: np.load gives an array, not an archive
            with path.open("wb") as handle:
                np.save(handle, pixels)
        bad = contract is None or file in ("truncated", "garbage", "empty", "npy", "other_names")
        expected = (EITHER, check) if file == "flipped" and not bad else REJECT if bad else check
        kind, detail = file_outcome(lambda: load_npz(path), path, expected)
    assert kind in GOOD, detail


MNIST_PIXELS = st.sampled_from(["ok", "ok", "ok", "256", "-1", "0.5", "nan", "1e3"])
MNIST_LABELS = st.sampled_from(["ok", "ok", "ok", "-1", "1.5", "nan", "inf", "1e30", "2**40"])
MNIST_FORMATS = st.sampled_from(["plain", "plain", "gz", "crlf", "blank_lines", "spaces", "header", "trailing_comma",
                                 "not_utf8", "corrupt_gz", "not_gz", "truncated_gz"])


@FUZZ
@given(n=st.integers(0, 3), columns=st.sampled_from([785, 785, 785, 784, 786]), pixel=MNIST_PIXELS,
       label=MNIST_LABELS, fmt=MNIST_FORMATS, clean=st.booleans(), seed=st.integers(0, 10**6))
def test_load_mnist_csv_files(n, columns, pixel, label, fmt, clean, seed) -> None:
    n, columns, pixel = max(n, int(clean)), pick(clean, columns, (785,), seed), pick(clean, pixel, ("ok",), seed)
    label = pick(clean, label, ("ok", "2**40"), seed)
    fmt = pick(clean, fmt, ("plain", "gz", "crlf", "blank_lines", "spaces"), seed)
    rng = np.random.default_rng(seed)
    table = [[str(v) for v in rng.integers(0, 256, columns - 1)] + [str(rng.integers(0, 10))] for _ in range(n)]
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
    compressed = {"gz": gzip.compress(data), "corrupt_gz": b"\x1f\x8b\x08\x00" + rng.bytes(20), "not_gz": data,
                  "truncated_gz": gzip.compress(data)[:-12]}
    good = (n > 0 and columns == 785 and pixel == "ok" and label in ("ok", "2**40")
            and fmt in ("plain", "gz", "crlf", "blank_lines", "spaces"))

    def check(out) -> None:
        images, labels = out
        want = np.array([[float(v) for v in row] for row in table])
        assert images.dtype == np.uint8 and images.shape == (n, 28, 28), (images.dtype, images.shape)
        assert np.array_equal(images.reshape(n, -1), want[:, :-1]), "pixels differ"
        assert labels.dtype == np.int64 and labels.tolist() == [int(v) for v in want[:, -1]], labels

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / ("mine.csv.gz" if fmt in compressed else "mine.csv")
        path.write_bytes(compressed.get(fmt, data))
        kind, detail = file_outcome(lambda: load_mnist5k(path), path, check if good else REJECT)
    assert kind in GOOD, detail


TEXT_WORDS = st.sampled_from(["alpha", "Beta", "γάμμα", "日本語", "😀", "x", "42", "it's", "—", "a\u00a0b", "\x00"])
TEXT_FILES = st.sampled_from(["utf-8", "utf-8", "gz", "bz2", "not_utf8", "utf-16", "corrupt_gz", "truncated_bz2",
                              "whitespace"])


@FUZZ
@given(docs=st.lists(st.lists(TEXT_WORDS, min_size=1, max_size=6), max_size=7), inner=st.sampled_from([" ", "\n"]),
       sep=st.sampled_from(["\n\n", "\n \t\n", "\n\n\n", "\n"]), crlf=st.booleans(), file=TEXT_FILES,
       level=st.sampled_from(["word", "byte"]), split=st.sampled_from(["article", "contiguous"]),
       seed=st.integers(0, 10**6))
def test_text_files(docs, inner, sep, crlf, file, level, split, seed) -> None:
    documents = [inner.join(words) for words in docs]
    text = sep.join(documents)
    if sep == "\n":  # no blank line: the whole text is one document
        documents = [text] if text else []
    data = (text.replace("\n", "\r\n") if crlf else text).encode()
    data = {"gz": gzip.compress(data), "bz2": bz2.compress(data), "not_utf8": data + b" caf\xe9",
            "utf-16": text.encode("utf-16"), "corrupt_gz": b"\x1f\x8b\x08\x00" + bytes([seed % 256]) * 9,
            "truncated_bz2": bz2.compress(data)[: 10 + seed % 20], "whitespace": b" \n\t\n \r\n"}.get(file, data)
    bad = not documents or file in ("not_utf8", "utf-16", "corrupt_gz", "truncated_bz2", "whitespace")
    fractions = (0.5, 0.25, 0.25)
    n = len(documents)
    n_train, n_valid = round(0.5 * n), round(0.25 * n)
    sure = split == "article" and n >= 3  # whole documents: whether a split is empty is known in advance
    empty_split = sure and (n_train == 0 or min(n_valid, n - n_train) == 0 or n - n_train - n_valid <= 0)

    def check_documents(out) -> None:
        assert out == documents, (out, documents)

    def check_corpus(corpus) -> None:
        splits = (corpus.train, corpus.valid, corpus.test)
        assert all(t.dim() == 1 and t.numel() for t in splits), [t.shape for t in splits]
        if level == "byte":
            pieces = [bytes(t.tolist()).decode("utf-8") for t in splits]
            visible = Counter(c for p in pieces for c in p if not c.isspace())
            assert visible == Counter(c for d in documents for c in d if not c.isspace()), "characters differ"
            if sure:
                assert sum(map(len, pieces)) == sum(len(d) + 1 for d in documents), pieces
        else:
            assert corpus.vocab.itos[:2] == ["<unk>", "<eos>"] and len(corpus.vocab) == corpus.vocab_size
            assert all(int(t.min()) >= 0 and int(t.max()) < corpus.vocab_size for t in splits)
            if sure:
                assert sum(int((t == corpus.vocab.eos_id).sum()) for t in splits) == n, "one <eos> per document"

    suffix = {"gz": ".txt.gz", "corrupt_gz": ".txt.gz", "bz2": ".txt.bz2", "truncated_bz2": ".txt.bz2"}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / ("mine" + suffix.get(file, ".txt"))
        path.write_bytes(data)
        kind, detail = file_outcome(lambda: load_text_file(path), path, REJECT if bad else check_documents)
        assert kind in GOOD, detail
        if not bad:  # the corpus of the documents read
            expected = REJECT if empty_split else check_corpus if sure else (EITHER, check_corpus)
            kind, detail = file_outcome(lambda: build_corpus(level, path=path, split=split, fractions=fractions),
                                        path, expected)
            assert kind in GOOD, detail


XML_WORDS = st.sampled_from(["alpha", "beta", "γάμμα", "日本語", "42", "x"])
XML_FILES = st.sampled_from(["xml", "xml", "bz2", "gz", "truncated", "garbage", "empty", "not_bz2", "not_xml"])


@FUZZ
@given(pages=st.lists(st.tuples(st.sampled_from(["Alpha", "Beta", "Talk:Gamma"]), st.lists(XML_WORDS, max_size=5),
                                st.booleans()), max_size=4),
       file=XML_FILES, clean=st.booleans(), seed=st.integers(0, 10**6))
def test_wikipedia_dump_files(pages, file, clean, seed) -> None:
    file = pick(clean, file, ("xml", "bz2", "gz"), seed)
    redirect_tag = '<redirect title="X" />'
    body = "".join(
        f"<page><title>{title}</title>{redirect_tag if redirect else ''}<revision>"
        f'<text xml:space="preserve">{" ".join(words)}</text></revision></page>'
        for title, words, redirect in pages
    )
    data = f'<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">{body}</mediawiki>'.encode()
    articles = [" ".join(words) for title, words, redirect in pages if words and not redirect and ":" not in title]
    data = {"bz2": bz2.compress(data), "gz": gzip.compress(data), "truncated": data[: len(data) // 2],
            "garbage": np.random.default_rng(seed).bytes(1 + seed % 50), "empty": b"",
            "not_xml": b"just some text\n"}.get(file, data)
    suffix = {"bz2": ".xml.bz2", "gz": ".xml.gz", "not_bz2": ".xml.bz2"}.get(file, ".xml")
    bad = not articles or file in ("truncated", "garbage", "empty", "not_bz2", "not_xml")

    def check(out) -> None:
        assert out == articles, (out, articles)

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / ("dump" + suffix)
        path.write_bytes(data)
        kind, detail = file_outcome(lambda: load_documents(path), path, REJECT if bad else check)
    assert kind in GOOD, detail
