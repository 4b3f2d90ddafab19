"""Block, stack threading, TransformerLM and ViT: shapes, errors, state-dict swaps, causality, padding."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import clusterformers.attention as attention_module
from clusterformers.attention import EllipticalAttention, MultiheadAttention, set_metric_grad
from clusterformers.models.ffn import Mlp, build_ffn
from clusterformers.models.transformer import (
    Block,
    BlockStack,
    TransformerLM,
    TransformerLMConfig,
    resolve_elliptical_layers,
)
from clusterformers.models.vit import ViT, ViTConfig

VOCAB, CONTEXT = 23, 12


pytestmark = pytest.mark.usefixtures("one_thread")


def lm(attention: str = "softmax", estimator: str = "mean", **kw) -> TransformerLM:
    cfg = TransformerLMConfig(
        vocab_size=VOCAB,
        context=CONTEXT,
        dim=16,
        depth=3,
        num_heads=2,
        dropout=0.0,
        attention=attention,
        estimator=estimator,
        **kw,
    )
    return TransformerLM(cfg).eval()


def vit(attention: str = "softmax", estimator: str = "mean", **kw) -> ViT:
    cfg = ViTConfig(
        image_size=8, patch_size=4, dim=16, depth=3, num_heads=2, attention=attention, estimator=estimator, **kw
    )
    return ViT(cfg).eval()


# ----------------------------------------------------------------------------- Block


def slow_block(block: Block, x: torch.Tensor, causal: bool) -> torch.Tensor:
    """Pre-LN block written out: explicit per-head softmax attention and an explicit GELU MLP."""
    b, n, dim = x.shape
    heads = block.attn.num_heads
    hd = dim // heads
    h = F.layer_norm(x, (dim,), block.norm1.weight, block.norm1.bias)
    qkv = h @ block.attn.qkv.weight.T + block.attn.qkv.bias
    q, k, v = qkv.split(dim, dim=-1)
    out = torch.zeros_like(x)
    for head in range(heads):
        sl = slice(head * hd, (head + 1) * hd)
        scores = q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(hd)
        if causal:
            scores = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
        out[..., sl] = scores.softmax(-1) @ v[..., sl]
    x = x + out @ block.attn.proj.weight.T + block.attn.proj.bias
    h = F.layer_norm(x, (dim,), block.norm2.weight, block.norm2.bias)
    hidden = h @ block.mlp.fc1.weight.T + block.mlp.fc1.bias
    hidden = 0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2)))
    return x + hidden @ block.mlp.fc2.weight.T + block.mlp.fc2.bias


@pytest.mark.parametrize("causal", [False, True])
def test_block_matches_slow_reference(causal: bool) -> None:
    torch.manual_seed(0)
    block = Block(8, 2, mlp_ratio=2.0, causal=causal).double().eval()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    out = block(x)
    assert out.shape == (2, 5, 8)
    torch.testing.assert_close(out, slow_block(block, x, causal), rtol=0, atol=1e-12)


def test_block_attention_kinds_and_custom_mlp() -> None:
    assert isinstance(Block(8, 2).attn, MultiheadAttention)
    ell = Block(8, 2, attention="elliptical", estimator="median", metric_grad=True)
    assert isinstance(ell.attn, EllipticalAttention)
    assert ell.attn.estimator == "median" and ell.attn.metric_grad
    assert isinstance(Block(8, 2, mlp_ratio=3.0).mlp, Mlp) and Block(8, 2, mlp_ratio=3.0).mlp.fc1.out_features == 24

    class Doubler(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * x

    torch.manual_seed(0)
    block = Block(8, 2, mlp=Doubler()).eval()
    x = torch.randn(2, 4, 8)
    out = block(x)
    after_attn = x + block.attn(block.norm1(x))
    torch.testing.assert_close(out, after_attn + 2 * block.norm2(after_attn))
    with pytest.raises(ValueError, match="attention must be one of"):
        Block(8, 2, attention="linear")
    with pytest.raises(NotImplementedError, match="median"):
        lm("elliptical", "median")


# ----------------------------------------------------------------------------- stack


def test_resolve_elliptical_layers() -> None:
    assert resolve_elliptical_layers(4) == (1, 2, 3)
    assert resolve_elliptical_layers(1) == ()
    assert resolve_elliptical_layers(4, [3, 1, 3]) == (1, 3)
    assert resolve_elliptical_layers(4, range(2, 4)) == (2, 3)
    with pytest.raises(ValueError, match="layer 0"):
        resolve_elliptical_layers(4, [0, 1])
    with pytest.raises(ValueError, match=r"1\.\.3"):
        resolve_elliptical_layers(4, [4])
    with pytest.raises(ValueError, match="ints"):
        resolve_elliptical_layers(4, [1.0])
    with pytest.raises(ValueError, match="layer 0"):
        lm("elliptical", elliptical_layers=[0, 1])


def stack(**kw) -> BlockStack:
    return BlockStack(TransformerLMConfig(vocab_size=5, context=8, dim=8, depth=4, num_heads=2, **kw), causal=False)


def test_block_stack_assigns_attention_per_layer() -> None:
    blocks = stack(attention="elliptical")
    assert blocks.elliptical_layers == (1, 2, 3)
    assert [type(b.attn) for b in blocks] == [MultiheadAttention] + [EllipticalAttention] * 3
    blocks = stack(attention="elliptical", elliptical_layers=[2])
    assert blocks.elliptical_layers == (2,)
    assert [isinstance(b.attn, EllipticalAttention) for b in blocks] == [False, False, True, False]
    blocks = stack(attention="softmax")
    assert blocks.elliptical_layers == () and all(type(b.attn) is MultiheadAttention for b in blocks)


@pytest.mark.parametrize("elliptical_layers", [None, [2]])
def test_shared_state_hands_each_elliptical_layer_the_previous_values(elliptical_layers) -> None:
    """Block i's metric uses block i-1's values: spy on the metric's arguments, and a negative control
    (the same model without shared state computes plain attention everywhere)."""
    torch.manual_seed(0)
    model = lm("elliptical", elliptical_layers=elliptical_layers).double()
    seen = {}

    original = attention_module.elliptical_metric

    def spy(v, v_prev, **kw):
        seen[len(seen)] = v_prev
        return original(v, v_prev, **kw)

    attention_module.elliptical_metric = spy
    try:
        idx = torch.randint(0, VOCAB, (2, 6))
        out = model(idx)
    finally:
        attention_module.elliptical_metric = original
    layers = model.elliptical_layers
    assert len(seen) == len(layers)
    state = model.layer_state
    for n, i in enumerate(layers):
        assert seen[n] is state.read("values", i)  # the values block i-1 wrote
    alone = lm("elliptical", elliptical_layers=elliptical_layers).double()
    alone.load_state_dict(model.state_dict())
    for block in alone.blocks:
        block.attn.layer_state = None
    softmax = lm("softmax").double()
    softmax.load_state_dict(model.state_dict())
    torch.testing.assert_close(alone(idx), softmax(idx), rtol=0, atol=1e-12)
    assert (out - softmax(idx)).abs().max() > 1e-7


def test_build_ffn() -> None:
    mlp = build_ffn("dense", 8, 12, 0, bias=False)
    assert isinstance(mlp, Mlp) and mlp.fc1.bias is None and mlp.fc1.out_features == 12
    with pytest.raises(ValueError, match="ffn must be one of"):
        build_ffn("mixture", 8, 12, 3)
    with pytest.raises(ValueError, match="unknown keys"):
        build_ffn("dense", 8, 12, 0, experts=4)
    with pytest.raises(ValueError, match="ffn must be one of"):
        lm(ffn="nonsense")


# ----------------------------------------------------------------------------- TransformerLM


def test_lm_shapes_tying_and_accessors() -> None:
    model = lm("elliptical")
    idx = torch.randint(0, VOCAB, (2, 7))
    assert model(idx).shape == (2, 7, VOCAB)
    assert model.head.weight is model.tok_emb.weight
    assert model.elliptical_layers == (1, 2)
    assert [type(m) for m in model.attention_modules()] == [
        MultiheadAttention,
        EllipticalAttention,
        EllipticalAttention,
    ]
    assert all(b.attn is m for b, m in zip(model.blocks, model.attention_modules(), strict=True))
    untied = lm(tie_weights=False)
    assert untied.head.weight is not untied.tok_emb.weight
    set_metric_grad(model, True)
    assert [m.metric_grad for m in model.attention_modules()] == [False, True, True]  # layer 0 stays plain


def test_lm_errors() -> None:
    model = lm()
    with pytest.raises(TypeError, match="torch.long"):
        model(torch.zeros(1, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="exceeds the model's context 12"):
        model(torch.zeros(1, CONTEXT + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="token ids must lie in 0..22"):
        model(torch.tensor([[1, VOCAB]]))
    with pytest.raises(ValueError, match="token ids"):
        model(torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match=r"\[B, N\]"):
        model(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="multiple of num_heads"):
        TransformerLMConfig(vocab_size=5, context=4, dim=10, num_heads=4)
    with pytest.raises(ValueError, match="vocab_size"):
        TransformerLMConfig(vocab_size=0, context=4)


def test_softmax_state_dict_loads_into_identity_elliptical_lm() -> None:
    torch.manual_seed(0)
    soft = lm("softmax")
    for p in soft.parameters():  # larger than GPT-2 init, so attention is far from uniform
        nn.init.normal_(p, std=0.5)
    idx = torch.randint(0, VOCAB, (3, 10))
    ident = lm("elliptical", "identity")
    ident.load_state_dict(soft.state_dict(), strict=True)
    torch.testing.assert_close(ident(idx), soft(idx), rtol=0, atol=1e-6)
    mean = lm("elliptical", "mean")
    mean.load_state_dict(soft.state_dict(), strict=True)
    assert (mean(idx) - soft(idx)).abs().max() > 1e-2  # the metric does change the function


@pytest.mark.parametrize("estimator", ["mean", "isotropic"])
def test_lm_is_causal_with_prefix_metric(estimator: str) -> None:
    torch.manual_seed(0)
    model = lm("elliptical", estimator)
    idx = torch.randint(0, VOCAB, (2, CONTEXT))
    base = model(idx)
    for t in (0, 3, 8):
        changed = idx.clone()
        changed[:, t + 1 :] = torch.randint(0, VOCAB, (2, CONTEXT - t - 1))
        out = model(changed)
        torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], rtol=0, atol=1e-6)
        assert (out[:, t + 1 :] - base[:, t + 1 :]).abs().max() > 1e-4


def test_lm_right_padding_matches_unpadded_runs() -> None:
    torch.manual_seed(0)
    model = lm("elliptical")
    lengths = [10, 6]
    idx = torch.randint(0, VOCAB, (2, 10))
    mask = torch.arange(10)[None] < torch.tensor(lengths)[:, None]
    padded = model(idx, key_padding_mask=mask)
    for b, n in enumerate(lengths):
        torch.testing.assert_close(padded[b, :n], model(idx[b : b + 1, :n])[0], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="right padding"):
        model(idx, key_padding_mask=mask.flip(1))


# ----------------------------------------------------------------------------- ViT


def test_vit_shapes_and_errors() -> None:
    model = vit("elliptical")
    x = torch.rand(3, 1, 8, 8)
    assert model(x).shape == (3, 10)
    assert model.forward_features(x).shape == (3, 1 + 4, 16)
    assert model.elliptical_layers == (1, 2) and len(model.attention_modules()) == 3
    assert "pixel_mean" not in model.state_dict()
    with pytest.raises(ValueError, match=r"\[B, 1, 8, 8\]"):
        model(torch.rand(3, 1, 9, 9))
    with pytest.raises(ValueError, match=r"\[B, 1, 8, 8\]"):
        model(torch.rand(3, 3, 8, 8))
    with pytest.raises(TypeError, match="floating-point"):
        model(torch.zeros(3, 1, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="multiple of patch_size"):
        ViTConfig(image_size=28, patch_size=5)
    with pytest.raises(ValueError, match="in_chans=3"):
        ViTConfig(in_chans=3, mean=(0.1, 0.2))
    rgb = ViT(
        ViTConfig(image_size=8, patch_size=4, in_chans=3, dim=16, depth=1, num_heads=2, mean=(0.4, 0.5, 0.6), std=0.2)
    )
    assert rgb(torch.rand(2, 3, 8, 8)).shape == (2, 10)


def test_vit_normalises_pixels_inside() -> None:
    torch.manual_seed(0)
    plain = vit(mean=0.0, std=1.0)
    normed = vit(mean=0.3, std=0.5)
    normed.load_state_dict(plain.state_dict())
    x = torch.rand(2, 1, 8, 8)
    torch.testing.assert_close(normed(x), plain((x - 0.3) / 0.5), rtol=0, atol=1e-6)


def test_softmax_state_dict_loads_into_identity_elliptical_vit() -> None:
    torch.manual_seed(0)
    soft = vit("softmax")
    ident = vit("elliptical", "identity")
    ident.load_state_dict(soft.state_dict(), strict=True)
    x = torch.rand(4, 1, 8, 8)
    torch.testing.assert_close(ident(x), soft(x), rtol=0, atol=1e-6)
