"""HuggingFace transformers integration: the "elliptical" attention implementation (against a dense float64
reference, GQA, padding, KV cache) and the AC router in Mixtral / Qwen2-MoE (causality with a negative
control, aux loss, cached generation, save/load round trips). Models come from small random configs."""

from __future__ import annotations

import copy
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

import clusterformers.integrations.hf as cfhf  # noqa: E402
from clusterformers.moe import load_balancing_loss  # noqa: E402

VOCAB = 61


@pytest.fixture(autouse=True, scope="module")
def registered(one_thread):
    cfhf.register()


def llama(layers: int = 3, attn: str = "elliptical", seed: int = 0, kind: str = "llama"):
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    if kind == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    model.set_attn_implementation(attn)
    return model.double().eval()


def mixtral(seed: int = 0, kind: str = "mixtral"):
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    if kind == "qwen2_moe":
        cfg = transformers.Qwen2MoeConfig(**common, intermediate_size=48, moe_intermediate_size=24,
                                          shared_expert_intermediate_size=24, num_experts=4, num_experts_per_tok=2)
        return transformers.Qwen2MoeForCausalLM(cfg)
    cfg = transformers.MixtralConfig(**common, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2)
    return transformers.MixtralForCausalLM(cfg)  # float32: HF's grouped expert GEMM has no float64 kernel


def tokens(b: int = 3, n: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (b, n), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- elliptical attention


def dense_reference(model, idx: torch.Tensor) -> list[torch.Tensor]:
    """Each layer's attention output recomputed densely in float64 from HF's own q, k, v (spied), with the
    metric written out: m = prefix mean of |v_l - v_{l-1}| over keys <= t, divided by its max over d, then
    averaged over each rotary pair (d, d + D/2)."""
    seen = []
    original = cfhf.elliptical_attention_forward

    def spy(module, query, key, value, attention_mask, **kw):
        seen.append((query.detach(), key.detach(), value.detach(), module.scaling))
        return original(module, query, key, value, attention_mask, **kw)

    transformers.AttentionInterface.register("elliptical", spy)
    try:
        model(idx)
    finally:
        cfhf.register()
    outs = []
    for layer, (q, k, v, scale) in enumerate(seen):
        groups = q.shape[1] // k.shape[1]
        k, vr = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        n = q.shape[2]
        if layer > 0:
            a = (v - seen[layer - 1][2]).abs()
            s = a.cumsum(2) / torch.arange(1, n + 1, dtype=a.dtype)[None, None, :, None]
            m = s / s.amax(-1, keepdim=True)
            half = m.shape[-1] // 2
            m = ((m[..., :half] + m[..., half:]) / 2).repeat(1, 1, 1, 2)  # one value per rotary pair
            q = q * m.repeat_interleave(groups, 1)
        scores = (q @ k.transpose(-1, -2)) * scale
        scores = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), -math.inf)
        outs.append(scores.softmax(-1) @ vr)
    return outs, seen


def test_elliptical_llama_matches_a_dense_reference_and_differs_from_sdpa() -> None:
    model = llama()
    idx = tokens()
    refs, _ = dense_reference(model, idx)
    got = []
    hooks = [layer.self_attn.register_forward_hook(
        lambda m, a, kw, out: got.append(out[0]), with_kwargs=True) for layer in model.model.layers]
    for layer in model.model.layers:
        layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a: got.append(a[0]))
    model(idx)
    for h in hooks:
        h.remove()
    inputs = got[0::2]  # o_proj inputs, [B, N, H*D]
    for layer, (ref, out) in enumerate(zip(refs, inputs, strict=True)):
        torch.testing.assert_close(out, ref.transpose(1, 2).reshape(out.shape), rtol=0, atol=1e-10, msg=str(layer))
    sdpa = llama(attn="sdpa")
    sdpa.load_state_dict(model.state_dict())
    assert (model(idx).logits - sdpa(idx).logits).abs().max() > 1e-6  # the metric acts...
    one, one_sdpa = llama(1), llama(1, attn="sdpa")
    one_sdpa.load_state_dict(one.state_dict())
    torch.testing.assert_close(one(idx).logits, one_sdpa(idx).logits, rtol=0, atol=1e-12)  # ...from layer 1 on


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_is_excluded_from_the_metric(side: str, monkeypatch) -> None:
    model = llama()
    idx = tokens(2, 10)
    short = idx[1:, :7]
    mask = torch.ones(2, 10, dtype=torch.long)
    if side == "left":
        padded = idx.clone()
        padded[1] = torch.cat([torch.zeros(3, dtype=torch.long), short[0]])
        mask[1, :3] = 0
        real = slice(3, 10)
    else:
        padded = idx.clone()
        padded[1, 7:] = 0
        mask[1, 7:] = 0
        real = slice(0, 7)
    alone = model(short).logits[0]
    together = model(padded, attention_mask=mask).logits[1, real]
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-8)  # RoPE's roundoff under shifted positions
    if side == "left":  # right padding comes after every real token, outside their causal prefix means
        # negative control: with the padding left in the metric the real tokens' outputs change
        monkeypatch.setattr(cfhf, "_key_keep_mask", lambda *a: None)
        assert (model(padded, attention_mask=mask).logits[1, real] - alone).abs().max() > 1e-7


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_cached_greedy_generation_equals_uncached(kind: str) -> None:
    model = llama(kind=kind)
    idx = tokens(2, 6)
    mask = torch.ones_like(idx)
    mask[0, :2] = 0  # left padding, as generate expects
    kw = dict(max_new_tokens=10, do_sample=False, attention_mask=mask, pad_token_id=0)
    cached = model.generate(idx, use_cache=True, **kw)
    assert torch.equal(cached, model.generate(idx, use_cache=False, **kw))
    # and the logits: one cached step equals the full forward's last position
    out = model(cached[:, :-1], attention_mask=torch.cat([mask, torch.ones(2, 9, dtype=torch.long)], 1),
                use_cache=True)
    full = model(cached, attention_mask=torch.cat([mask, torch.ones(2, 10, dtype=torch.long)], 1)).logits[:, -1]
    step = model(cached[:, -1:], attention_mask=torch.cat([mask, torch.ones(2, 10, dtype=torch.long)], 1),
                 past_key_values=out.past_key_values).logits[:, -1]
    torch.testing.assert_close(step, full, rtol=0, atol=1e-10)


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    plain, ckpt = llama(), llama()
    ckpt.gradient_checkpointing_enable({"use_reentrant": False})
    idx = tokens()
    for model in (plain, ckpt):
        model.train()
        model(idx, labels=idx).loss.backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_bad_attention_mask_names_the_fix() -> None:
    model = llama()
    attn = model.model.layers[1].self_attn
    q = torch.randn(1, 4, 5, 8, dtype=torch.float64)
    kv = torch.randn(1, 2, 5, 8, dtype=torch.float64)
    model(tokens(1, 5))
    with pytest.raises(ValueError, match="4-D mask"):
        cfhf.elliptical_attention_forward(attn, q, kv, kv, torch.ones(1, 5, dtype=torch.bool), scaling=0.3)


# ----------------------------------------------------------------------------- AC router


def warm(model, steps: int = 3) -> None:
    model.train()
    for s in range(steps):
        model(tokens(4, 16, seed=50 + s))


def leaks(model) -> tuple[float, float]:
    """(future leak, batch-mate leak) of the logits, from two copies in one state."""
    a = tokens(3, 16, seed=7)
    b = a.clone()
    b[:, 8:] = tokens(3, 8, seed=8)
    c = a.clone()
    c[1:] = tokens(2, 16, seed=9)
    ya, yb, yc = (copy.deepcopy(model)(x).logits for x in (a, b, c))
    return (ya[:, :8] - yb[:, :8]).abs().max().item(), (ya[0] - yc[0]).abs().max().item()


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_ac_router_in_place_is_causal_and_keeps_hf_features(kind: str) -> None:
    model = mixtral(kind=kind)
    names = {n for n, _ in model.named_parameters()}
    cfhf.use_ac_router(model)
    assert {n for n, _ in model.named_parameters()} == names  # parameter names unchanged
    routers = [m for m in model.modules() if isinstance(m, cfhf._ACTopKRouter)]
    assert len(routers) == 3 and all(r.metric.config.stats == "running" for r in routers)
    warm(model)
    assert routers[1].metric.running_seen.any()
    for mode in ("train", "eval"):
        getattr(model, mode)()
        future, mates = leaks(model)
        assert future == 0.0 and mates == 0.0, mode
    # HF's own load-balancing loss sees our routers' logits
    out = model(tokens(), labels=tokens(), output_router_logits=True)
    assert len(out.router_logits) == 3 and torch.isfinite(out.aux_loss)
    if kind == "mixtral":
        expected = load_balancing_loss(tuple(out.router_logits), 4, 2)
        torch.testing.assert_close(out.aux_loss, expected)
    # negative control: the papers' batch statistics leak
    batch = mixtral(kind=kind)
    cfhf.use_ac_router(batch, stats="batch")
    warm(batch)
    for mode in ("train", "eval"):
        getattr(batch, mode)()
        future, mates = leaks(batch)
        assert future > 1e-9 and mates > 1e-9, mode


def test_ac_mixtral_cached_generation_and_save_load_round_trip(tmp_path) -> None:
    model = mixtral()
    cfhf.use_ac_router(model)
    warm(model)
    model.eval()
    idx = tokens(2, 6)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    cached = model.generate(idx, use_cache=True, **kw)
    assert torch.equal(cached, model.generate(idx, use_cache=False, **kw))
    model.save_pretrained(tmp_path)
    again = cfhf.from_pretrained(transformers.MixtralForCausalLM, tmp_path).eval()
    torch.testing.assert_close(again(cached).logits, model(cached).logits, rtol=0, atol=0)
    # negative control: a plain reload converted again lacks the running statistics
    plain = transformers.MixtralForCausalLM.from_pretrained(tmp_path).eval()
    cfhf.use_ac_router(plain)
    assert (plain(cached).logits - model(cached).logits).abs().max() > 1e-9


def test_use_ac_router_errors() -> None:
    with pytest.raises(ValueError, match="no top-k router"):
        cfhf.use_ac_router(llama(1))
    model = cfhf.use_ac_router(mixtral())
    with pytest.raises(ValueError, match="already"):
        cfhf.use_ac_router(model)
    with pytest.raises(ValueError, match="apply_to"):
        cfhf.use_ac_router(mixtral(), {"preset": "swin"})
    with pytest.raises(TypeError, match="ac: expected"):
        cfhf.use_ac_router(mixtral(), 3)
