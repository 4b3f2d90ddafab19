"""TransformerLM and ViT with MoE / SoftMoE FFNs: construction, routing state threaded through the blocks,
chain reset, gradients, aux losses, and the model-level identity AC(M = I) == StableMoE."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from clusterformers.models.ffn import FFN_KINDS, Mlp, build_ffn, resolve_ac_option
from clusterformers.models.transformer import TransformerLM, TransformerLMConfig
from clusterformers.models.vit import ViT, ViTConfig
from clusterformers.moe import ACConfig, MoE, SoftMoE, total_aux_loss
from clusterformers.moe.adaptive import ACStats

VOCAB, CONTEXT, DIM, E = 23, 8, 16, 4


pytestmark = pytest.mark.usefixtures("one_thread")


def lm(ffn: str = "moe", depth: int = 3, **ffn_kwargs) -> TransformerLM:
    kwargs = {"num_experts": E, **ffn_kwargs}
    if ffn == "moe":
        kwargs.setdefault("top_k", 2)
    cfg = TransformerLMConfig(vocab_size=VOCAB, context=CONTEXT, dim=DIM, depth=depth, num_heads=2, dropout=0.0,
                              ffn=ffn, ffn_kwargs=kwargs)
    return TransformerLM(cfg)


def vit(ffn: str = "moe", **ffn_kwargs) -> ViT:
    kwargs = {"num_experts": E, **ffn_kwargs}
    cfg = ViTConfig(image_size=8, patch_size=4, dim=DIM, depth=4, num_heads=2, ffn=ffn, ffn_kwargs=kwargs)
    return ViT(cfg)


def moe_layers(model) -> list:
    return [b.mlp for b in model.blocks if isinstance(b.mlp, (MoE, SoftMoE))]


def tokens(b: int = 3, n: int = CONTEXT, seed: int = 0) -> torch.Tensor:
    return torch.randint(VOCAB, (b, n), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- build_ffn


def test_build_ffn_kinds_and_options() -> None:
    assert FFN_KINDS == ("dense", "moe", "softmoe")
    moe = build_ffn("moe", 8, 12, 0, num_experts=4, top_k=1, router="smoe", aux_coef=0.1)
    assert isinstance(moe, MoE) and moe.num_experts == 4 and moe.top_k == 1 and moe.hidden == 12
    assert moe.aux_coef == 0.1
    assert build_ffn("moe", 8, 12, 1, hidden=5).hidden == 5
    assert build_ffn("moe", 8, 12, 1, router="ac").router.ac == ACConfig.preset("lm")
    swin = build_ffn("moe", 8, 12, 1, router="ac", ac="swin").router
    assert swin.ac == ACConfig.preset("swin") and swin.score == "linear_nobias" and swin.gate == "softmax_all"
    var = build_ffn("moe", 8, 12, 1, router="ac", ac={"preset": "lm", "dispersion": "var"}).router
    assert var.ac == ACConfig.preset("lm", dispersion="var")
    # dense outside moe_layers
    dense = build_ffn("moe", 8, 12, 2, moe_layers=[0, 1])
    assert isinstance(dense, Mlp) and dense.fc1.out_features == 12
    soft = build_ffn("softmoe", 8, 12, 0, num_experts=3, slots_per_expert=2, ac="softmoe")
    assert isinstance(soft, SoftMoE) and soft.slots_per_expert == 2 and soft.ac == ACConfig.preset("softmoe")
    assert isinstance(build_ffn("softmoe", 8, 12, 0, moe_layers=[1]), Mlp)
    with pytest.raises(ValueError, match="unknown keys.*slots_per_expert"):
        build_ffn("moe", 8, 12, 0, slots_per_expert=2)
    with pytest.raises(ValueError, match="unknown keys.*router"):
        build_ffn("softmoe", 8, 12, 0, router="smoe")
    with pytest.raises(ValueError, match="moe_layers.*non-negative"):
        build_ffn("moe", 8, 12, 0, moe_layers=[-1])
    with pytest.raises(ValueError, match="unknown ACConfig field"):
        resolve_ac_option({"preset": "lm", "tightness": 3})
    with pytest.raises(ValueError, match=r"blocks \[3\] do not exist.*depth 3"):
        lm(moe_layers=[1, 3])
    with pytest.raises(ValueError, match="ffn must be one of"):
        build_ffn("mixture", 8, 12, 0)


def test_config_is_json_serialisable() -> None:
    model = lm(router="ac", ac={"preset": "lm", "stats": "ema"}, moe_layers=[0, 2])
    cfg = json.loads(json.dumps(model.cfg.__dict__))
    again = TransformerLM(TransformerLMConfig(**cfg))
    assert again.state_dict().keys() == model.state_dict().keys()
    assert [type(b.mlp) for b in again.blocks] == [MoE, Mlp, MoE]


# ----------------------------------------------------------------------------- forward / backward


@pytest.mark.parametrize("router", ["smoe", "xmoe", "stablemoe", "ac"])
def test_lm_moe_forward_backward_every_parameter_gets_a_gradient(router: str) -> None:
    torch.manual_seed(0)
    model = lm(router=router, aux_coef=0.01, z_coef=0.001)
    x = tokens()
    logits = model(x)
    assert logits.shape == (3, CONTEXT, VOCAB) and torch.isfinite(logits).all()
    aux = total_aux_loss(model)
    expected = sum(m.aux_loss for m in moe_layers(model))
    assert aux.item() > 0 and torch.equal(aux, expected)
    (F.cross_entropy(logits.flatten(0, 1), x.flatten()) + aux).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert missing == []


def test_vit_moe_and_softmoe_forward_backward() -> None:
    torch.manual_seed(1)
    images = torch.rand(5, 1, 8, 8)
    labels = torch.arange(5) % 10
    softmoe = vit("softmoe", ac={"preset": "softmoe", "mix": 4}, moe_layers=[2, 3])
    for model in (vit(router="ac", ac="swin", moe_layers=[1, 2, 3]), softmoe):
        logits = model(images)
        assert logits.shape == (5, 10)
        F.cross_entropy(logits, labels).backward()
        missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
        assert missing == []
        # tokens per state: B * (1 + num_patches)
        assert all(m.last_state.num_tokens == 5 * 5 for m in moe_layers(model))
    assert total_aux_loss(model).item() == 0.0  # SoftMoE has no aux loss


# ----------------------------------------------------------------------------- routing state


def spy_prev(model) -> list:
    """Record the ``prev`` routing state each MoE layer's router is called with."""
    seen = []
    for layer in moe_layers(model):
        router = layer.router
        original = router.token_metric

        def spy(h, prev, mask=None, _orig=original, _name=layer.state_position):
            seen.append((_name, prev))
            return _orig(h, prev, mask)

        router.token_metric = spy
    return seen


@pytest.mark.parametrize("layers", [None, [0, 2], [1, 3]])
def test_lm_threads_routing_state_across_dense_blocks(layers) -> None:
    torch.manual_seed(2)
    model = lm(depth=4, router="ac", moe_layers=layers).eval()
    expected_blocks = layers if layers is not None else [0, 1, 2, 3]
    assert [i for i, b in enumerate(model.blocks) if isinstance(b.mlp, MoE)] == expected_blocks
    moes = moe_layers(model)
    seen = spy_prev(model)
    model(tokens())
    assert [p for p, _ in seen] == list(range(len(moes)))
    assert seen[0][1] is None and moes[0].last_stats is None  # the first MoE layer routes plainly
    for (pos, prev), earlier in zip(seen[1:], moes[:-1], strict=True):
        assert prev is earlier.last_state, pos  # nearest earlier MoE layer, dense blocks skipped
        assert moes[pos].last_stats is not None
    assert prev.num_tokens == 3 * CONTEXT


def test_vit_threads_state_and_ac_runs_from_the_second_moe_layer() -> None:
    torch.manual_seed(3)
    model = vit(router="ac", ac="lm", moe_layers=[1, 2, 3]).eval()
    assert [isinstance(b.mlp, MoE) for b in model.blocks] == [False, True, True, True]
    seen = spy_prev(model)
    model(torch.rand(2, 1, 8, 8))
    moes = moe_layers(model)
    assert seen[0][1] is None and seen[1][1] is moes[0].last_state and seen[2][1] is moes[1].last_state
    assert [m.last_stats is not None for m in moes] == [False, True, True]


def test_state_is_reset_at_every_forward() -> None:
    torch.manual_seed(4)
    model = lm(router="ac").eval()
    first = moe_layers(model)[0]
    states_at_start = []
    first.register_forward_pre_hook(lambda m, a: states_at_start.append(first.read_state()))
    model(tokens(3))
    # a batch with another token count: a stale state would raise "reset the routing state"
    out = model(tokens(2, 5))
    assert out.shape == (2, 5, VOCAB)
    assert states_at_start == [None, None]
    last = len(model.layer_state.layers("routing"))
    assert model.layer_state.read("routing", last).num_tokens == 10


def test_padding_mask_reaches_the_moe_statistics() -> None:
    torch.manual_seed(5)
    model = lm(router="ac").train()  # training computes the batch's cluster counts
    x = tokens(2)
    mask = torch.ones(2, CONTEXT, dtype=torch.bool)
    mask[1, 5:] = False
    model(x, key_padding_mask=mask)
    second = moe_layers(model)[1]
    counts = second.last_stats.counts
    assert counts.sum().item() == mask.sum().item()  # padded tokens enter no cluster


# ----------------------------------------------------------------------------- identity


def force_unit_metric(model) -> None:
    """Make every AC transform return m = 1 (the metric forced to the identity)."""
    for layer in moe_layers(model):
        metric = layer.router.metric

        def ones(h, indices, weights, key_padding_mask=None, _e=metric.num_experts):
            m = torch.ones(h.shape, dtype=torch.promote_types(h.dtype, torch.float32))
            return m, ACStats(torch.ones(_e, h.shape[1]), torch.ones(_e, dtype=torch.bool), None)

        metric.forward = ones


def test_ac_model_with_unit_metric_equals_stablemoe_model() -> None:
    torch.manual_seed(6)
    ac = lm(router="ac", ac={"preset": "lm", "stats": "batch"}, moe_layers=[0, 2]).double()
    stable = lm(router="stablemoe", moe_layers=[0, 2]).double()
    stable.load_state_dict(ac.state_dict())  # same parameter names: the routers differ only in M
    x = tokens()
    assert not torch.equal(ac(x), stable(x))  # the metric is active...
    force_unit_metric(ac)
    ya, ys = ac(x), stable(x)
    assert torch.equal(ya, ys)  # ...and with M = I the models are the same function
    ya.sum().backward()
    ys.sum().backward()
    for (name, p), q in zip(ac.named_parameters(), stable.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), name


def test_moe_lm_loss_decreases_on_a_learnable_sequence() -> None:
    torch.manual_seed(7)
    model = lm(router="ac")
    x = (torch.arange(CONTEXT + 1).repeat(4, 1) * 3 + torch.arange(4)[:, None]) % VOCAB
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0] and losses[0] > math.log(VOCAB) - 1
