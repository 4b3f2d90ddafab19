"""What the drop-in integrations cost: time per training step and per decoding step against the plain model.

Each row is ours ÷ the same model without our layer, in the same process, the variants alternating run by
run (``common.interleaved``):

- ``hf_llama_elliptical_train`` / ``_decode``: a small Llama with ``attn_implementation="elliptical"`` vs
  ``"sdpa"`` (same weights); one forward + backward on a batch, and one decoding step with a 127-token
  cache.
- ``hf_mixtral_ac_train``: a small Mixtral after ``use_ac_router`` (running statistics) vs the plain model.
- ``lm_elliptical_train``: a training step of our elliptical ``TransformerLM`` vs the softmax one (target
  <= 1/0.98: at least 98% of the tokens/s).
- ``lm_moe_ac_train``: our MoE ``TransformerLM`` with causal AC routing (running statistics) vs the same
  model with ``stablemoe`` (M = I) (target <= 1/0.99).
- ``lm_ac_running_train``: AC routing on running statistics (the causal default) vs the papers' batch
  statistics: the time cost of the causal choice.
- ``lm_elliptical_decode``: one cached decoding step of our elliptical ``TransformerLM`` (running metric
  sums in the cache) vs the softmax one, at a 127-token cache.

The Hugging Face rows are skipped, with a row saying why, when transformers is absent. The timm adapter is
measured by its tests' environment (``make test-timm``). ``clusterformers bench --only integrations`` runs it.
"""

from __future__ import annotations

import copy
import statistics
from collections.abc import Callable

import torch

from clusterformers.attention import KVCache
from clusterformers.bench.common import interleaved, record
from clusterformers.models.transformer import TransformerLM, TransformerLMConfig

VOCAB, BATCH, SEQ, HIDDEN, LAYERS = 1000, 8, 128, 256, 4


def _train_step(model: torch.nn.Module, idx: torch.Tensor, hf: bool) -> Callable[[], None]:
    def step() -> None:
        model.zero_grad(set_to_none=True)
        out = model(idx, labels=idx).loss if hf else model(idx).float().logsumexp(-1).mean()
        out.backward()

    return step


def _decode_step(model: torch.nn.Module, idx: torch.Tensor) -> Callable[[], None]:
    with torch.no_grad():
        cache = model(idx[:, :-1], use_cache=True).past_key_values

    def step() -> None:
        with torch.no_grad():
            model(idx[:, -1:], cache=cache)
        cache.crop(-1)  # back to the prefix for the next repetition

    return step


def hf_rows(dev: torch.device, warmup: int, reps: int, extra: dict) -> list[dict]:
    try:
        import transformers

        import clusterformers.integrations.hf as cfhf
    except ImportError as err:
        return [{"name": "hf_integrations", "skipped": f"transformers is not importable ({err})", **extra}]
    cfhf.register()
    torch.manual_seed(0)
    llama_cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
                                         num_hidden_layers=LAYERS, num_attention_heads=8, num_key_value_heads=4,
                                         max_position_embeddings=2 * SEQ)
    # one config object each: set_attn_implementation writes to the model's config
    plain = transformers.LlamaForCausalLM(copy.deepcopy(llama_cfg)).to(dev)
    ours = transformers.LlamaForCausalLM(copy.deepcopy(llama_cfg)).to(dev)
    ours.load_state_dict(plain.state_dict())
    plain.set_attn_implementation("sdpa")
    ours.set_attn_implementation("elliptical")
    idx = torch.randint(0, VOCAB, (BATCH, SEQ), device=dev)
    with torch.no_grad():
        differs = (plain(idx[:1]).logits - ours(idx[:1]).logits).abs().max().item()
    if not differs > 0:
        raise RuntimeError("the elliptical Llama computes the sdpa one's logits: the benchmark would compare equals")
    shape = f"Llama d={HIDDEN} L={LAYERS} heads 8/4 B={BATCH} N={SEQ}"
    rows = []
    t = interleaved({"ours": _train_step(ours, idx, True), "plain": _train_step(plain, idx, True)}, warmup, reps, dev)
    rows.append(record("hf_llama_elliptical_train", t["ours"], t["plain"], "sdpa attention", shape, **extra))
    for model in (ours, plain):
        model.eval()
    t = interleaved({"ours": _decode_step(ours, idx), "plain": _decode_step(plain, idx)}, warmup, reps, dev)
    rows.append(record("hf_llama_elliptical_decode", t["ours"], t["plain"], "sdpa attention", shape + " cache 127",
                       **extra))
    mixtral_cfg = transformers.MixtralConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
                                             num_hidden_layers=LAYERS, num_attention_heads=8, num_key_value_heads=4,
                                             num_local_experts=8, num_experts_per_tok=2)
    plain = transformers.MixtralForCausalLM(copy.deepcopy(mixtral_cfg)).to(dev)
    ours = transformers.MixtralForCausalLM(copy.deepcopy(mixtral_cfg)).to(dev)
    ours.load_state_dict(plain.state_dict())
    cfhf.use_ac_router(ours)
    t = interleaved({"ours": _train_step(ours, idx, True), "plain": _train_step(plain, idx, True)}, warmup, reps, dev)
    rows.append(record("hf_mixtral_ac_train", t["ours"], t["plain"], "Mixtral top-k router",
                       f"Mixtral d={HIDDEN} L={LAYERS} E=8 k=2 B={BATCH} N={SEQ}", **extra))
    return rows


def _lm(dev: torch.device, **kwargs) -> TransformerLM:
    torch.manual_seed(0)
    cfg = TransformerLMConfig(vocab_size=VOCAB, context=SEQ, dim=HIDDEN, depth=LAYERS, num_heads=8, dropout=0.0,
                              **kwargs)
    return TransformerLM(cfg).to(dev)


def lm_rows(dev: torch.device, warmup: int, reps: int, extra: dict) -> list[dict]:
    def moe(router: str, stats: str = "running") -> TransformerLM:
        ac = {"ac": {"preset": "lm", "stats": stats}} if router == "ac" else {}
        return _lm(dev, ffn="moe", ffn_kwargs={"router": router, **ac})

    idx = torch.randint(0, VOCAB, (BATCH, SEQ), device=dev)
    dense_shape = f"TransformerLM d={HIDDEN} L={LAYERS} B={BATCH} N={SEQ}"
    moe_shape = f"TransformerLM d={HIDDEN} L={LAYERS} E=8 k=2 B={BATCH} N={SEQ}"
    rows = []
    for name, ours, plain, base_name, shape, target in (
        ("lm_elliptical_train", _lm(dev, attention="elliptical"), _lm(dev), "softmax attention", dense_shape,
         1 / 0.98),
        ("lm_moe_ac_train", moe("ac"), moe("stablemoe"), "stablemoe (M = I)", moe_shape, 1 / 0.99),
        ("lm_ac_running_train", moe("ac"), moe("ac", "batch"), "AC batch statistics", moe_shape, None),
    ):
        t = interleaved({"ours": _train_step(ours, idx, False), "plain": _train_step(plain, idx, False)}, warmup,
                        reps, dev)
        rows.append(record(name, t["ours"], t["plain"], base_name, shape, target,
                           tokens_per_s=BATCH * SEQ / statistics.median(t["ours"]),
                           baseline_tokens_per_s=BATCH * SEQ / statistics.median(t["plain"]),
                           **extra))
    t = interleaved({"ours": _lm_decode_step(_lm(dev, attention="elliptical").eval(), idx),
                     "plain": _lm_decode_step(_lm(dev).eval(), idx)}, warmup, reps, dev)
    rows.append(record("lm_elliptical_decode", t["ours"], t["plain"], "softmax attention",
                       f"TransformerLM d={HIDDEN} L={LAYERS} B={BATCH} cache {SEQ - 1}", **extra))
    return rows


def _lm_decode_step(model: TransformerLM, idx: torch.Tensor) -> Callable[[], None]:
    """One cached decoding step after ``idx[:, :-1]``; each repetition starts from the same cache."""
    prefix = KVCache()
    with torch.no_grad():
        model(idx[:, :-1], kv_cache=prefix)

    def step() -> None:
        cache = KVCache(prefix.owner)
        cache.layers = dict(prefix.layers)  # appending concatenates, so the prefix's tensors stay as they are
        cache.prefix = {layer: copy.copy(sums) for layer, sums in prefix.prefix.items()}
        with torch.no_grad():
            model(idx[:, -1:], kv_cache=cache)

    return step


def run(quick: bool, device: torch.device, threads: int) -> list[dict]:
    """Integration-cost records (``common.record`` + ``device``, ``threads``, ``reps``)."""
    warmup, reps = (1, 3) if quick else (3, 10)
    extra = {"threads": threads, "device": str(device), "reps": reps}
    return [*hf_rows(device, warmup, reps, extra), *lm_rows(device, warmup, reps, extra)]
