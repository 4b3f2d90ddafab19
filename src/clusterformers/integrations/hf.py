"""HuggingFace transformers: Elliptical Attention as an attention implementation, the AC router in MoE models.

```python
import clusterformers.integrations.hf as cfhf

cfhf.register()                                     # once per process
model = LlamaForCausalLM(config)                    # or Mistral, Qwen2, ... (any model using the registry)
model.set_attn_implementation("elliptical")         # or from_pretrained(..., attn_implementation="elliptical")

cfhf.use_ac_router(mixtral)                         # Mixtral, Qwen2-MoE, ...: AC routing, in place
mixtral.save_pretrained(path)
again = cfhf.from_pretrained(MixtralForCausalLM, path)   # AC routers and their running statistics restored
```

**Elliptical attention** runs on HF's own query/key/value (after RoPE and the cache update), so grouped-query
attention, padding and the KV cache are HF's. Each layer keeps its value tensor for the next layer, which
estimates the metric ``m`` from ``|v_l − v_{l−1}|`` (a prefix mean in causal models, padding excluded;
one metric per key/value head, shared by the queries of its group; with RoPE shared by the two
coordinates of each rotary pair, so scores stay relative-position ones) and attends with ``q ⊙ m``
through HF's SDPA path. With a cache, the values are the cached ones, so cached decoding computes the same metric
as a full forward (the earlier keys' sum is recomputed from the cached values, one O(T·d) reduction per
layer and step like attention itself: HF does not hand the cache object to attention functions, so running
sums would have no safe home). Layer 0 is plain attention.

**The AC router** replaces each top-k router in place (its class becomes a subclass of the original, so
parameter names, ``output_router_logits`` and HF's load-balancing loss are unchanged): the router scores
``m(i) ⊙ h_i`` with ``m`` from the tokens' clusters at the previous MoE layer. By default the statistics
are running ones from earlier steps (``stats="running"``), so routing is causal and batch-independent
and cached generation equals uncached; ``stats="batch"`` is the papers' setting. HF does not pass the
attention mask to routers, so padded tokens enter the running statistics (they never affect the routing
of other tokens in the same step).

transformers is imported lazily, inside the functions.
"""

from __future__ import annotations

import dataclasses
import json
import weakref
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from clusterformers.attention import PrefixSums, elliptical_metric
from clusterformers.moe.adaptive import ACConfig, AdaptiveMetric
from clusterformers.moe.layer import RoutingLayer
from clusterformers.moe.routers import RoutingState, check_state
from clusterformers.state import share_state

__all__ = ["NAME", "elliptical_attention_forward", "from_pretrained", "register", "use_ac_router"]

NAME = "elliptical"
CONFIG_KEY = "clusterformers_ac"

# values of each model's attention layers, keyed by id(config): all layers of one model share its config
_VALUES: dict[int, dict[int, Tensor]] = {}


def _values_of(module: nn.Module) -> dict[int, Tensor]:
    config = module.config
    key = id(config)
    if key not in _VALUES:
        _VALUES[key] = {}
        weakref.finalize(config, _VALUES.pop, key, None)
    return _VALUES[key]


def _key_keep_mask(attention_mask: Tensor | None, batch: int, kv_len: int) -> Tensor | None:
    """HF's 4-D attention mask ``[B|1, 1|H, q, T]`` (bool True = attend, or additive float) -> keep-mask
    ``[B, T]`` of the real (non-padding) keys.

    A key is real if the last query attends to it, or if its own query row attends to it without being a
    row that attends to everything (HF un-masks the rows of left padding so that SDPA gives no NaN; such
    rows say nothing). The second rule keeps the real keys outside a sliding window of the last query.
    """
    if attention_mask is None:
        return None
    if attention_mask.dim() != 4 or attention_mask.shape[-1] != kv_len:
        raise ValueError(
            f"attention_mask: expected HF's 4-D mask [B, 1, q, {kv_len}], got shape {tuple(attention_mask.shape)}; "
            "pass a 2-D padding mask [B, T] to the model and let it build the 4-D one"
        )
    if attention_mask.dtype == torch.bool:
        allowed = attention_mask.any(dim=1)
    else:
        allowed = (attention_mask > torch.finfo(attention_mask.dtype).min / 2).any(dim=1)  # [B, q, T]
    q = allowed.shape[1]
    keep = allowed[:, -1].clone()
    rows = torch.arange(q, device=allowed.device)
    own = allowed[:, rows, kv_len - q + rows] & ~allowed.all(dim=-1)
    keep[:, kv_len - q :] |= own
    return keep.expand(batch, kv_len)


def _rotary_pairs(m: Tensor, config: Any) -> Tensor:
    """Share ``m [..., D]`` within each rotary pair ``(d, d + r/2)`` (their mean) for models with RoPE.

    HF hands over rotated queries; a metric that scales the two coordinates of a rotary pair alike commutes
    with the rotation, so the attention score stays a function of relative position (a per-coordinate
    metric would make it depend on absolute position, e.g. on the amount of left padding).
    """
    if getattr(config, "rope_parameters", None) is None and getattr(config, "rope_theta", None) is None:
        return m
    rotary = int(m.shape[-1] * (getattr(config, "partial_rotary_factor", None) or 1.0)) // 2 * 2
    half = rotary // 2
    pair = (m[..., :half] + m[..., half:rotary]) / 2
    return torch.cat([pair, pair, m[..., rotary:]], dim=-1)


def _query_metric(value: Tensor, v_prev: Tensor, keep: Tensor | None, q: int, causal: bool) -> Tensor:
    """The metric of the last ``q`` positions (the queries): ``[B, H_kv, q|1, D]``.

    Causal decoding (``q < T``) sums the earlier keys' ``|v − v_prev|`` in one reduction and continues
    the prefix mean over the queries only, instead of a prefix scan over the whole cache."""
    t = value.shape[2]
    if not causal or q == t:
        m = elliptical_metric(value, v_prev, causal=causal, key_padding_mask=keep, check_inputs=False)
        return m[:, :, t - q :] if m.shape[2] != 1 else m
    dtype = torch.promote_types(value.dtype, torch.float32)
    a = (value[:, :, : t - q].to(dtype) - v_prev[:, :, : t - q].to(dtype)).abs()
    prefix = PrefixSums()
    if keep is None:
        prefix.total, prefix.count = a.sum(dim=2, keepdim=True), a.new_full((1, 1, 1, 1), float(t - q))
    else:
        head = keep[:, None, : t - q, None]
        prefix.total = a.masked_fill(~head, 0.0).sum(dim=2, keepdim=True)
        prefix.count = head.to(dtype).sum(dim=2, keepdim=True)
    return elliptical_metric(value[:, :, t - q :], v_prev[:, :, t - q :], causal=True,
                             key_padding_mask=None if keep is None else keep[:, t - q :], check_inputs=False,
                             prefix=prefix)


def elliptical_attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """The attention function registered as ``"elliptical"``.

    Args:
        module: HF's attention module (``layer_idx``, ``config``, ``num_key_value_groups``).
        query: ``[B, H, q, D]``; key, value: ``[B, H_kv, T, D]`` (cache included, T >= q; the queries
            are the last q positions).
        attention_mask: HF's 4-D mask or None.

    Returns:
        ``(out [B, q, H, D], None)``, as HF's SDPA function.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    layer = getattr(module, "layer_idx", None)
    if layer is None:
        raise ValueError(f"{type(module).__name__} has no layer_idx; elliptical attention needs the layer order")
    values = _values_of(module)
    v_prev = values.get(layer - 1) if layer > 0 else None
    if layer < module.config.num_hidden_layers - 1:
        values[layer] = value
    if v_prev is not None:
        if v_prev.shape != value.shape:
            raise ValueError(
                f"layer {layer}: the previous layer's values have shape {tuple(v_prev.shape)}, this layer's "
                f"{tuple(value.shape)}; elliptical attention needs equal shapes in consecutive layers"
            )
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        keep = _key_keep_mask(attention_mask, value.shape[0], value.shape[2])
        m = _query_metric(value, v_prev, keep, query.shape[2], causal)
        m = _rotary_pairs(m, module.config)
        groups = query.shape[1] // value.shape[1]
        query = query * m.repeat_interleave(groups, dim=1)
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
    )


def register() -> None:
    """Add ``"elliptical"`` to transformers' attention and mask registries (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, elliptical_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)


class _ACTopKRouter(RoutingLayer):
    """Mixin turning an HF top-k router (``weight[E, d]``, ``top_k``, ``num_experts``,
    ``forward(h) -> (logits, scores, indices)``) into the AC router: it routes ``m(i) ⊙ h_i`` through the
    original forward and hands its routing to the next MoE layer."""

    metric: AdaptiveMetric

    def forward(self, hidden_states: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        h = hidden_states.reshape(-1, self.metric.dim)
        prev = self.previous_state(None)
        u = h
        if prev is not None:
            check_state(prev, self.num_experts, h.shape[0], self.metric.config.mix)
            m_tok, _ = self.metric(h, prev.indices, prev.weights)
            u = (h.to(m_tok.dtype) * m_tok).to(h.dtype)
        logits, scores, indices = super().forward(u)
        self.write_state(RoutingState(indices, scores.detach(), h.shape[0], self.num_experts))
        return logits, scores, indices


def _is_topk_router(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__.endswith("Router")
        and isinstance(weight, nn.Parameter)
        and weight.dim() == 2
        and isinstance(getattr(module, "top_k", None), int)
        and getattr(module, "num_experts", None) == weight.shape[0]
    )


def _resolve(ac: ACConfig | str | dict[str, Any], stats: str | None) -> ACConfig:
    if isinstance(ac, ACConfig):
        cfg = ac
    elif isinstance(ac, str):
        cfg = ACConfig.preset(ac)
    elif isinstance(ac, dict):
        fields = dict(ac)
        preset = fields.pop("preset", None)
        cfg = ACConfig.preset(preset, **fields) if preset else ACConfig(**fields)
    else:
        raise TypeError(f"ac: expected a preset name, a dict of ACConfig fields or an ACConfig, got {type(ac)}")
    return dataclasses.replace(cfg, stats=stats) if stats is not None else cfg


def use_ac_router(model: nn.Module, ac: ACConfig | str | dict[str, Any] = "lm", *, stats: str | None = "running"
                  ) -> nn.Module:
    """Turn every top-k router of an HF MoE model into the AC router, in place; returns ``model``.

    Args:
        model: a Mixtral, Qwen2-MoE, or any model whose routers hold ``weight[E, d]``, ``top_k`` and
            ``num_experts`` and return ``(logits, scores, indices)``.
        ac: the AC settings: a preset name, a dict of :class:`ACConfig` fields (``"preset"`` allowed)
            or an ``ACConfig``. ``apply_to`` must be ``"router"`` (HF's experts see the plain input).
        stats: overrides ``ac``'s statistics; ``"running"`` (default) keeps a causal model causal and
            batch-independent; ``"batch"`` is the papers' setting; None keeps ``ac``'s.

    Parameter names are unchanged; each router gains the buffers of its running statistics
    (``<router>.metric.*``). The settings are stored in ``model.config.clusterformers_ac`` so that
    :func:`from_pretrained` restores the routers after ``save_pretrained``. The first MoE layer routes
    with the plain score (it has no previous clusters).
    """
    cfg = _resolve(ac, stats)
    if cfg.apply_to != "router":
        raise ValueError(f"ac.apply_to: only 'router' is supported inside HF MoE blocks, got {cfg.apply_to!r}")
    routers = [m for m in model.modules() if _is_topk_router(m)]
    if any(isinstance(m, _ACTopKRouter) for m in routers):
        raise ValueError("use_ac_router: the model's routers are AC routers already")
    if not routers:
        raise ValueError(
            f"use_ac_router: {type(model).__name__} has no top-k router (a '...Router' module with weight[E, d], "
            "top_k and num_experts, as in Mixtral or Qwen2-MoE); nothing to convert"
        )
    for router in routers:
        cls = type(router)
        router.__class__ = type(f"AC{cls.__name__}", (_ACTopKRouter, cls), {})
        weight = router.weight
        router.metric = AdaptiveMetric(router.num_experts, weight.shape[1], cfg).to(weight.device)
    if getattr(model, "config", None) is not None:
        setattr(model.config, CONFIG_KEY, dataclasses.asdict(cfg))
    share_state(model)
    return model


def _signature(name: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(layer indices, last three parts)`` of a state-dict key: HF may rename module paths on save
    (e.g. Mixtral's ``mlp`` becomes ``block_sparse_moe``), never the indices or the router's own names."""
    parts = name.split(".")
    return tuple(p for p in parts if p.isdigit()), tuple(parts[-3:])


def _saved_buffers(path: Path, names: list[str]) -> dict[str, Tensor]:
    """The tensors saved for our buffer ``names`` under ``path`` (single or sharded safetensors)."""
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else [
        "model.safetensors"]
    wanted = {_signature(n): n for n in names}
    found: dict[str, Tensor] = {}
    for file in files:
        with safe_open(str(path / file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if ".metric." in key and _signature(key) in wanted:
                    found[wanted[_signature(key)]] = f.get_tensor(key)
    return found


def from_pretrained(model_class: Any, path: str | Path, **kwargs: Any) -> nn.Module:
    """``model_class.from_pretrained(path, **kwargs)``, then the AC routers and their running statistics
    as saved by a model converted with :func:`use_ac_router` (a plain model if it was not converted)."""
    model = model_class.from_pretrained(path, **kwargs)
    saved = getattr(model.config, CONFIG_KEY, None)
    if saved is None:
        return model
    use_ac_router(model, ACConfig(**saved), stats=None)
    state = model.state_dict()
    names = [name for name in state if ".metric." in name]
    buffers = _saved_buffers(Path(path), names)
    missing = sorted(set(names) - set(buffers))
    if missing:
        raise ValueError(f"{path}: the AC routers' statistics are missing from the checkpoint: {missing[:4]}")
    with torch.no_grad():
        for name, tensor in buffers.items():
            state[name].copy_(tensor)
    return model
