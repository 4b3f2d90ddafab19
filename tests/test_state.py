"""The layer-state protocol: causality and batch-independence of AC routing (each with a negative control),
cached == uncached generation, activation checkpointing, deepcopy/pickle, compile and export."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from clusterformers import EllipticalAttention, KVCache, MoE, SoftMoE, share_state
from clusterformers.attention import set_metric_grad
from clusterformers.models.transformer import TransformerLM, TransformerLMConfig

VOCAB, CONTEXT = 29, 32
# No leak means a change at rounding level only: when other tokens change, the experts' groups change size,
# and a GEMM over a group of another size may round a row differently (seen: 2.8e-17 in float64 on one CPU).
# A real leak moves the logits by more than 1e-6 (the negative controls).
NO_LEAK = 1e-12


pytestmark = pytest.mark.usefixtures("one_thread")


def lm(attention: str = "softmax", ffn: str = "dense", seed: int = 0, **ffn_kwargs) -> TransformerLM:
    torch.manual_seed(seed)
    cfg = TransformerLMConfig(vocab_size=VOCAB, context=CONTEXT, dim=16, depth=3, num_heads=2, dropout=0.0,
                              attention=attention, ffn=ffn, ffn_kwargs=ffn_kwargs)
    return TransformerLM(cfg)


def ac_lm(stats: str | None = None) -> TransformerLM:
    ac = {"preset": "lm"} if stats is None else {"preset": "lm", "stats": stats}
    return lm("elliptical", "moe", num_experts=4, top_k=2, router="ac", ac=ac).double()


def warm(model: TransformerLM, steps: int = 3) -> None:
    """A few training forwards, so running statistics exist (AC routing is then non-trivial)."""
    model.train()
    for s in range(steps):
        model(torch.randint(0, VOCAB, (4, CONTEXT), generator=torch.Generator().manual_seed(100 + s)))


def twice(model: TransformerLM, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of ``a`` and ``b`` from two copies of ``model`` in one state (a training forward updates
    running statistics, so the second call of one model would see other statistics)."""
    return copy.deepcopy(model)(a), copy.deepcopy(model)(b)


def future_leak(model: TransformerLM) -> float:
    """Max change of the logits at positions 0..15 when tokens 16..31 change."""
    g = torch.Generator().manual_seed(1)
    a = torch.randint(0, VOCAB, (4, CONTEXT), generator=g)
    b = a.clone()
    b[:, 16:] = torch.randint(0, VOCAB, (4, 16), generator=g)
    ya, yb = twice(model, a, b)
    return (ya[:, :16] - yb[:, :16]).abs().max().item()


def batchmate_leak(model: TransformerLM) -> float:
    """Max change of sequence 0's logits when the other sequences of its batch change."""
    g = torch.Generator().manual_seed(2)
    a = torch.randint(0, VOCAB, (4, CONTEXT), generator=g)
    b = a.clone()
    b[1:] = torch.randint(0, VOCAB, (3, CONTEXT), generator=g)
    ya, yb = twice(model, a, b)
    return (ya[0] - yb[0]).abs().max().item()


def test_ac_lm_is_causal_and_batch_independent_by_default() -> None:
    model = ac_lm()
    assert model.blocks[1].mlp.router.ac.stats == "running"
    warm(model)
    assert model.blocks[2].mlp.router.metric.running_seen.any()
    for mode in ("train", "eval"):
        getattr(model, mode)()
        assert future_leak(model) < NO_LEAK, mode
        assert batchmate_leak(model) < NO_LEAK, mode
    # negative control: the papers' batch statistics leak in both directions
    batch = ac_lm("batch")
    warm(batch)
    for mode in ("train", "eval"):
        getattr(batch, mode)()
        assert future_leak(batch) > 1e-6 and batchmate_leak(batch) > 1e-6, mode


def test_ema_statistics_are_batch_independent_in_eval_only() -> None:
    model = ac_lm("ema")
    warm(model)
    model.eval()
    assert future_leak(model) < NO_LEAK and batchmate_leak(model) < NO_LEAK
    model.train()
    assert future_leak(model) > 1e-6


@pytest.mark.parametrize(
    ("attention", "ffn", "kwargs"),
    [
        ("softmax", "dense", {}),
        ("elliptical", "dense", {}),
        ("elliptical", "moe", {"num_experts": 4, "top_k": 2, "router": "ac"}),
        ("softmax", "moe", {"num_experts": 4, "top_k": 1, "router": "smoe"}),
    ],
)
def test_cached_generation_equals_uncached(attention: str, ffn: str, kwargs: dict) -> None:
    model = lm(attention, ffn, **kwargs).double()
    warm(model)
    model.eval()
    prompt = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(3))
    cached = model.generate(prompt, 12, temperature=0)
    uncached = model.generate(prompt, 12, temperature=0, use_cache=False)
    assert torch.equal(cached, uncached) and cached.shape == (2, 17)
    # the logits too: prefill + one step each equals the full forward
    cache = KVCache()
    steps = [model(cached[:, :5], kv_cache=cache)]
    steps += [model(cached[:, t : t + 1], kv_cache=cache) for t in range(5, 16)]
    torch.testing.assert_close(torch.cat(steps, dim=1), model(cached[:, :16]), rtol=0, atol=1e-10)
    # sampling with a seeded generator is reproducible, and past the context the window slides
    a = model.generate(prompt, CONTEXT, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(0))
    b = model.generate(prompt, CONTEXT, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(0),
                       use_cache=False)
    assert torch.equal(a, b) and a.shape == (2, 5 + CONTEXT)


def test_batch_statistics_break_cached_decoding() -> None:
    """Negative control of the test above: with the papers' batch statistics the cache changes the result."""
    model = ac_lm("batch")
    warm(model)
    model.eval()
    seq = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(4))
    cache = KVCache()
    steps = [model(seq[:, :4], kv_cache=cache)] + [model(seq[:, t : t + 1], kv_cache=cache) for t in range(4, 12)]
    assert (torch.cat(steps, dim=1) - model(seq)).abs().max() > 1e-6


def test_kv_cache_errors() -> None:
    model, other = lm(), lm()
    cache = KVCache()
    model(torch.zeros(2, 3, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match="another model"):
        other(torch.zeros(2, 1, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match="batch of 2 sequences"):
        model(torch.zeros(3, 1, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match="cached 3 \\+ new 30"):
        model(torch.zeros(2, 30, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match="only causal attention"):
        EllipticalAttention(8, 2)(torch.randn(1, 3, 8), kv_cache=KVCache())
    with pytest.raises(ValueError, match="temperature"):
        model.generate(torch.zeros(1, 2, dtype=torch.long), 3, temperature=-1.0)


class Checkpointed(nn.Module):
    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x, key_padding_mask=None, kv_cache=None):
        return checkpoint(self.block, x, key_padding_mask, kv_cache, use_reentrant=False)


@pytest.mark.parametrize("metric_grad", [False, True])
def test_activation_checkpointing_gives_the_same_gradients(metric_grad: bool) -> None:
    """Non-reentrant checkpointing of every block of an elliptical AC-MoE LM: a recomputed layer reads
    the same state as the first pass (values, routing and running statistics)."""
    plain, ckpt = ac_lm(), ac_lm()
    set_metric_grad(plain, metric_grad)
    set_metric_grad(ckpt, metric_grad)
    for i, block in enumerate(ckpt.blocks):
        ckpt.blocks[i] = Checkpointed(block)
    idx = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(5))
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 7:] = False
    for _ in range(3):  # later steps route with running statistics
        for model in (plain, ckpt):
            model.zero_grad()
            model(idx, key_padding_mask=mask).square().sum().backward()
        grads = {n: p.grad for n, p in plain.named_parameters()}
        for name, p in ckpt.named_parameters():
            torch.testing.assert_close(p.grad, grads[name.replace(".block.", ".")], msg=name)
    for name, b in ckpt.named_buffers():
        torch.testing.assert_close(b, dict(plain.named_buffers())[name.replace(".block.", ".")], msg=name)


def test_deepcopy_and_pickle_keep_positions_and_drop_written_state() -> None:
    model = ac_lm()
    warm(model, 2)  # the state now holds tensors with autograd graphs
    twin = copy.deepcopy(model)
    assert twin.layer_state is not model.layer_state
    assert all(b.attn.layer_state is twin.layer_state for b in twin.blocks)
    assert [b.mlp.state_position for b in twin.blocks] == [0, 1, 2]
    idx = torch.randint(0, VOCAB, (2, 8))
    model.eval()
    twin.eval()
    torch.testing.assert_close(twin(idx), model(idx), rtol=0, atol=0)
    loaded = pickle.loads(pickle.dumps(model))
    torch.testing.assert_close(loaded(idx), model(idx), rtol=0, atol=0)
    # the copy has its own state: running the copy leaves the original's written values alone
    before = model.layer_state.read("values", 1)
    twin(idx[:1])
    assert model.layer_state.read("values", 1) is before


def test_share_state_on_a_plain_sequential_and_explicit_overrides() -> None:
    torch.manual_seed(6)
    layers = nn.Sequential(EllipticalAttention(8, 2), EllipticalAttention(8, 2), EllipticalAttention(8, 2))
    x = torch.randn(2, 5, 8)
    by_hand = x
    v = None
    for layer in layers:
        by_hand, v = layer(by_hand, v_prev=v, return_values=True)
    share_state(layers)
    torch.testing.assert_close(layers(x), by_hand)
    share_state(layers)  # again: replaces the state and its hook
    assert len(layers._forward_pre_hooks) == 1
    with pytest.raises(TypeError, match="stateful"):
        share_state(layers, layers=[nn.Linear(2, 2)])


def test_compile_fullgraph_attention_moe_softmoe() -> None:
    import torch._inductor.config

    torch._dynamo.reset()
    # scalar C++ kernels, as in the contrastive compile tests: half the g++ time on 2 cores, and one setting
    # for the whole session (inductor's precompiled header follows the first setting it sees)
    with torch._inductor.config.patch({"cpp.vec_isa_ok": False}):
        _compile_fullgraph_attention_moe_softmoe()


def _compile_fullgraph_attention_moe_softmoe() -> None:
    torch.manual_seed(7)
    attn = EllipticalAttention(16, 2, causal=True, check_inputs=False)
    x, v_prev = torch.randn(2, 6, 16), torch.randn(2, 2, 6, 8)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    compiled = torch.compile(attn, fullgraph=True)
    torch.testing.assert_close(compiled(x, mask, v_prev), attn(x, mask, v_prev), rtol=1e-5, atol=1e-5)
    moe = MoE(16, 4, 2, 24, router="ac", capacity_factor=1.5, check_inputs=False)
    from clusterformers.moe import RoutingState

    prev = RoutingState(torch.randint(0, 4, (12, 2)), torch.full((12, 2), 0.5), 12, 4)
    y = torch.compile(moe, fullgraph=True)(x, prev)
    torch.testing.assert_close(y, moe(x, prev), rtol=1e-5, atol=1e-5)
    soft = SoftMoE(16, 4, 1, 24, ac="softmoe", check_inputs=False)
    prev8 = RoutingState(torch.randint(0, 4, (12, 8)), torch.full((12, 8), 1 / 8), 12, 4)
    torch.testing.assert_close(torch.compile(soft, fullgraph=True)(x, prev8), soft(x, prev8), rtol=1e-5, atol=1e-5)


def test_export_attention_with_a_mask() -> None:
    torch.manual_seed(8)
    attn = EllipticalAttention(16, 2, check_inputs=False).eval()
    x, v_prev = torch.randn(2, 6, 16), torch.randn(2, 2, 6, 8)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, 5:] = False
    program = torch.export.export(attn, (x, mask, v_prev))
    torch.testing.assert_close(program.module()(x, mask, v_prev), attn(x, mask, v_prev))


def test_ddp_matches_one_process_on_the_union(tmp_path) -> None:
    """Two gloo processes, each on its shard, train the elliptical AC-MoE LM to the state that one process
    reaches on the union of the shards: the shared state works under DDP (routing is batch-independent
    and the running statistics are synchronised, so sharding the batch changes nothing)."""
    import importlib.util
    import os
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    from clusterformers.train import train

    root = Path(__file__).resolve().parents[1]
    worker = root / "tests" / "ddp_state_worker.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(root / "src"), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone", str(worker),
           str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    ddp = load_file(str(tmp_path / "ddp.safetensors"))
    spec = importlib.util.spec_from_file_location("ddp_state_worker", worker)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    model = mod.make_model()
    train(model, mod.loss_fn, mod.union, mod.CFG)
    state = model.state_dict()
    assert state.keys() == ddp.keys()
    for name, value in state.items():
        torch.testing.assert_close(ddp[name], value, rtol=0, atol=1e-5, msg=name)
    assert model.blocks[2].mlp.router.metric.running_seen.any()


@pytest.mark.parametrize("stats", [None, "batch"])
def test_vit_eval_is_batch_independent_by_default(stats: str | None) -> None:
    """ViT AC layers train on batch statistics and evaluate on running ones (the default), so an image's
    eval logits do not depend on the other images of its batch; the papers' batch statistics do."""
    from clusterformers.models.vit import ViT, ViTConfig

    torch.manual_seed(9)
    ac = {"preset": "lm"} if stats is None else {"preset": "lm", "stats": stats}
    model = ViT(ViTConfig(image_size=8, patch_size=4, dim=16, depth=3, num_heads=2, attention="elliptical",
                          ffn="moe", ffn_kwargs={"num_experts": 4, "top_k": 2, "router": "ac", "ac": ac}))
    model.train()
    for s in range(3):
        model(torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(s)))
    model.eval()
    a = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(10))
    b = a.clone()
    b[1:] = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        change = (model(a)[0] - model(b)[0]).abs().max().item()
    assert change == 0.0 if stats is None else change > 1e-6
