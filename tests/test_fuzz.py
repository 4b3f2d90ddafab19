"""Property tests over bad and odd inputs: every call ends in an error that names an argument, or in a
finite result of the right shape; never a silent NaN, an unclear torch-internal crash or a wrong shape.

``CLUSTERFORMERS_FUZZ_EXAMPLES`` sets the number of examples per test (default 150, kept small for
``make test``; e.g. 2000 for a long run).
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clusterformers import EllipticalAttention, FARELoss, InfoNCELoss, MoE, SoftMoE, load_balancing_loss

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
