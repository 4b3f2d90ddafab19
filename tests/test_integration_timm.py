"""clusterformers layers inside a real timm ViT (skipped where timm is not installed; `make test-timm`)."""

import copy
import functools
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import clusterformers
from clusterformers.attention import elliptical_metric
from clusterformers.integrations.timm import EllipticalAttention, MoE

timm = pytest.importorskip("timm")

ARGS = dict(pretrained=False, img_size=32, patch_size=8, num_classes=10)  # 16 patches + cls = 17 tokens
N = 17


pytestmark = pytest.mark.usefixtures("one_thread")


def vit(**kwargs):
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", **ARGS, **kwargs)


def elliptical_vit(share=True, extra=None, **options):
    model = vit(attn_layer=EllipticalAttention.with_options(**options), **(extra or {}))
    if share:
        clusterformers.share_state(model)
    return model


def images(batch=4, seed=1):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def labels(batch=4, seed=2):
    return torch.randint(0, 10, (batch,), generator=torch.Generator().manual_seed(seed))


def test_forward_shape_and_state_registration():
    model = elliptical_vit()
    out = model(images())
    assert out.shape == (4, 10) and torch.isfinite(out).all()
    attns = [block.attn for block in model.blocks]
    assert all(isinstance(a, clusterformers.EllipticalAttention) for a in attns)
    assert model.layer_state.layers("values") == attns


@pytest.mark.parametrize("extra", [{}, {"qk_norm": True, "scale_attn_norm": True}], ids=["plain", "qk_scale_norm"])
@pytest.mark.parametrize(
    "estimator, share, equal",
    [("identity", True, True), ("mean", False, True), ("mean", True, False)],
    ids=["identity-shared", "mean-unshared", "mean-shared(control)"],
)
def test_stock_weights_load_strict_and_match_stock(extra, estimator, share, equal):
    stock = vit(**extra).eval()
    ours = elliptical_vit(share=share, extra=extra, estimator=estimator).eval()
    for p in ours.parameters():  # the stock weights must fully replace ours
        nn.init.zeros_(p)
    result = ours.load_state_dict(stock.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    x = images()
    with torch.no_grad():
        gap = (ours(x) - stock(x)).abs().max().item()
    if equal:
        assert gap <= 1e-5
    else:
        assert gap > 1e-3  # the metric changes the function once the state is shared


def test_training_steps_lower_the_loss():
    model = elliptical_vit().train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = images(8), labels(8)
    losses = []
    for _ in range(4):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        losses.append(loss.item())
        opt.step()
    assert all(b.attn.qkv.weight.grad.abs().sum() > 0 for b in model.blocks)
    assert losses[-1] < losses[0] - 1e-3, losses


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("moe", [False, True], ids=["mlp", "moe"])
def test_grad_checkpointing_gives_the_same_gradients(reentrant, moe):
    from timm.layers import set_reentrant_ckpt, use_reentrant_ckpt

    # reentrant checkpointing runs the first pass without grad, so a module's .aux_loss has no graph there
    aux_coef = 0.0 if reentrant else 0.01
    extra = {"mlp_layer": MoE.with_options(num_experts=4, aux_coef=aux_coef)} if moe else {}
    plain = elliptical_vit(extra=extra)
    ckpt = elliptical_vit(extra=extra)
    ckpt.load_state_dict(plain.state_dict())
    ckpt.set_grad_checkpointing(True)
    calls = []
    ckpt.blocks[3].attn.register_forward_hook(lambda *args: calls.append(1))
    x, y = images(8), labels(8)
    before = use_reentrant_ckpt()
    set_reentrant_ckpt(reentrant)
    try:
        for model in (plain, ckpt):
            loss = F.cross_entropy(model(x), y) + clusterformers.total_aux_loss(model)
            loss.backward()
    finally:
        set_reentrant_ckpt(before)
    assert len(calls) == 2  # the block ran again in backward: the recomputation read the shared state
    grads = dict(plain.named_parameters())
    for name, p in ckpt.named_parameters():
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=0, atol=1e-5, msg=name)


def test_elliptical_layers_read_the_previous_blocks_values():
    model = elliptical_vit(store_metric=True).eval()
    inputs, outputs = [], []
    for block in model.blocks:
        block.attn.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
        block.attn.register_forward_hook(lambda module, args, out: outputs.append(out))
    with torch.no_grad():
        model(images())
        values = []
        for block, x in zip(model.blocks, inputs):
            a = block.attn
            values.append(a.qkv(x).reshape(x.shape[0], N, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)[2])
        assert model.blocks[0].attn.last_metric is None  # the first layer is plain attention
        for i in range(1, len(model.blocks)):
            a = model.blocks[i].attn
            torch.testing.assert_close(a.last_metric, elliptical_metric(values[i], values[i - 1]))
            torch.testing.assert_close(a(inputs[i], v_prev=values[i - 1]), outputs[i])
        # control: the metric of another layer's values is a different metric
        assert not torch.allclose(model.blocks[2].attn.last_metric, elliptical_metric(values[2], values[0]))


def _keep():
    keep = torch.ones(4, N, dtype=torch.bool)
    keep[0, 13:] = False  # the last patch row (image rows 24..31) of sample 0 is padding
    keep[2, 9:] = False  # the last two patch rows of sample 2
    return keep


def _mask(kind):
    keep = _keep()
    pair = keep[:, None, None, :] & keep[:, None, :, None]  # [B, 1, N, N], NaFlex's symmetric mask
    additive = torch.zeros(pair.shape).masked_fill(~pair, torch.finfo(torch.float32).min)
    return {
        "bool_keep": keep,
        "bool_pair": pair,
        "float_pair": additive,
        "float_keys": torch.zeros(4, 1, 1, N).masked_fill(~keep[:, None, None, :], float("-inf")),
    }[kind]


@pytest.mark.parametrize("kind", ["bool_keep", "bool_pair", "float_pair", "float_keys"])
def test_padding_masks_keep_padding_out_of_attention_and_metric(kind):
    keep, mask = _keep(), _mask(kind)
    stock = vit().eval()
    identity = elliptical_vit(estimator="identity").eval()
    identity.load_state_dict(stock.state_dict())
    ours = elliptical_vit().eval()
    x = images()
    x2 = x.clone()
    x2[0, :, 24:] = 5 * torch.randn(3, 8, 32)  # new content in sample 0's padded patches only
    x2[2, :, 16:] = -x2[2, :, 16:]
    with torch.no_grad():
        if kind != "bool_keep":  # timm's own attention takes timm's masks: ours with m = 1 matches it
            gap = (identity.forward_features(x, attn_mask=mask) - stock.forward_features(x, attn_mask=mask))
            assert gap.abs().max() <= 1e-5
        out, out2 = ours.forward_features(x, attn_mask=mask), ours.forward_features(x2, attn_mask=mask)
        reference = ours.forward_features(x, attn_mask=_mask("float_pair"))
        unmasked = ours.forward_features(x), ours.forward_features(x2)
    kept = keep[:, :, None].expand_as(out)
    assert (out - out2)[kept].abs().max() <= 1e-5  # padding reaches neither the attention nor the metric
    assert (out - reference)[kept].abs().max() <= 1e-5  # every mask form means the same padding
    assert (unmasked[0] - unmasked[1])[kept].abs().max() > 1e-3  # control: without the mask it does


def test_is_causal_matches_stock_and_keeps_the_future_out():
    stock = vit().eval()
    identity = elliptical_vit(estimator="identity").eval()
    identity.load_state_dict(stock.state_dict())
    ours = elliptical_vit().eval()
    x = images()
    x2 = x.clone()
    x2[:, :, 24:, 24:] = 3.0  # the last patch: the last token
    with torch.no_grad():
        gap = identity.forward_features(x, is_causal=True) - stock.forward_features(x, is_causal=True)
        assert gap.abs().max() <= 1e-5
        past = (ours.forward_features(x, is_causal=True) - ours.forward_features(x2, is_causal=True))[:, :-1]
        control = (ours.forward_features(x) - ours.forward_features(x2))[:, :-1]
    assert past.abs().max() <= 1e-5  # the causal metric is a prefix mean
    assert control.abs().max() > 1e-3


def test_moe_as_mlp_layer_trains_and_hands_routing_on():
    model = vit(mlp_layer=functools.partial(MoE, num_experts=4, top_k=2, router="ac", aux_coef=0.01))
    moes = [block.mlp for block in model.blocks]
    assert all(isinstance(m, clusterformers.MoE) for m in moes)
    x, y = images(8), labels(8)
    model(x)
    assert moes[1].last_stats is None  # control: without a shared state no routing flows
    clusterformers.share_state(model)
    assert model.layer_state.layers("routing") == moes
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(2):
        opt.zero_grad()
        logits = model(x)
        assert logits.shape == (8, 10)
        assert moes[0].last_stats is None and moes[1].last_stats is not None
        aux = clusterformers.total_aux_loss(model)
        assert aux > 0
        loss = F.cross_entropy(logits, y) + aux
        loss.backward()
        losses.append(loss.item())
        opt.step()
    assert moes[1].experts.w_in.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in moes[1].router.parameters())
    assert losses[1] < losses[0], losses


def test_moe_is_the_library_moe_with_timm_names():
    ours = MoE(192, 768, num_experts=4, top_k=2, router="ac").eval()
    library = clusterformers.MoE(192, 4, 2, 768, router="ac").eval()
    library.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, N, 192)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), library(x), rtol=0, atol=0)
    dropped = MoE(192, drop=0.5, num_experts=2).train()(x)
    assert 0.3 < (dropped == 0).float().mean() < 0.7  # drop: dropout on the output


def test_models_with_bound_layers_pickle_and_deepcopy():
    model = vit(attn_layer=EllipticalAttention.with_options(eps=1e-5), mlp_layer=MoE.with_options(num_experts=4))
    clusterformers.share_state(model)
    model.eval()
    x = images()
    with torch.no_grad():
        expected = model(x)
        for other in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
            assert other.blocks[1].attn.eps == 1e-5 and other.blocks[1].mlp.num_experts == 4
            torch.testing.assert_close(other(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    "build, name",
    [
        (lambda: EllipticalAttention(192, num_heads=5), "num_heads"),
        (lambda: EllipticalAttention(192, num_heads=3, attn_head_dim=32), "attn_head_dim"),
        (lambda: EllipticalAttention(192, num_heads=3, qk_norm=True), "norm_layer"),
        (lambda: EllipticalAttention(192, num_heads=3, estimator="nope"), "estimator"),
        (lambda: vit(attn_layer=EllipticalAttention.with_options(estimator="nope")), "estimator"),
        (lambda: MoE(192, out_features=96), "out_features"),
        (lambda: MoE(192, norm_layer=nn.LayerNorm), "norm_layer"),
        (lambda: vit(mlp_layer=MoE, scale_mlp_norm=True), "norm_layer"),
        (lambda: MoE(192, act_layer=nn.ReLU), "act_layer"),
        (lambda: MoE(192, act_layer=functools.partial(nn.GELU, approximate="tanh")), "act_layer"),
        (lambda: MoE(192, drop=(0.1, 0.0)), "drop"),
        (lambda: MoE(192, use_conv=True), "use_conv"),
    ],
)
def test_unsupported_arguments_raise_naming_them(build, name):
    with pytest.raises(ValueError, match=name):
        build()


def test_supported_activation_and_option_binding():
    from timm.layers.activations import GELU

    assert MoE(16, act_layer=GELU, num_experts=2).hidden == 16
    assert MoE(16, act_layer=nn.ReLU, gated=True, num_experts=2).experts.gated  # SwiGLU experts
    bound = MoE.with_options(num_experts=3).with_options(top_k=1)
    layer = bound(16, 32)
    assert (layer.num_experts, layer.top_k, layer.hidden) == (3, 1, 32) and isinstance(layer, MoE)
    with pytest.raises(TypeError, match="bogus"):
        EllipticalAttention.with_options(bogus=1)


@pytest.mark.parametrize(
    "mask, match",
    [
        (torch.full((2, 1, N, N), 0.5), "bias"),
        (torch.ones(2, N, N, dtype=torch.bool), "attn_mask"),
        (torch.ones(2, N), "attn_mask"),
        (torch.ones(2, 1, N, N - 1, dtype=torch.bool), "attn_mask"),
        (torch.zeros(2, 1, N, N, dtype=torch.bool), "sample"),
        (torch.ones(2, 1, N, N, dtype=torch.long), "attn_mask"),
    ],
    ids=["float-bias", "3d", "2d-float", "bad-shape", "all-masked", "int"],
)
def test_bad_masks_raise(mask, match):
    attn = EllipticalAttention(192, num_heads=3)
    with pytest.raises((ValueError, TypeError), match=match):
        attn(torch.randn(2, N, 192), attn_mask=mask)


def test_mask_with_is_causal_raises():
    attn = EllipticalAttention(192, num_heads=3)
    with pytest.raises(ValueError, match="is_causal"):
        attn(torch.randn(2, N, 192), attn_mask=torch.ones(2, N, dtype=torch.bool), is_causal=True)
