"""Elliptical attention and MoE layers for timm's Vision Transformer (and any model built from its Block).

timm builds every block from two constructor arguments, ``attn_layer`` and ``mlp_layer``; the classes
here follow those protocols, and their parameter names are timm's, so stock timm weights load with
``strict=True``. This module imports only torch and clusterformers: timm is needed to build a timm model,
not to import it.

```python
import timm, clusterformers
from clusterformers.integrations.timm import EllipticalAttention, MoE

model = timm.create_model(
    "vit_tiny_patch16_224",
    attn_layer=EllipticalAttention.with_options(estimator="mean"),
    mlp_layer=MoE.with_options(num_experts=8, top_k=2, router="ac"),
)
clusterformers.share_state(model)  # once: hands values and routing from block to block
```

Bind options with ``with_options`` (a subclass with new defaults): timm's ``vision_transformer`` calls
``issubclass(attn_layer, ...)``, so a ``functools.partial`` is refused there as ``attn_layer``
(``mlp_layer`` accepts either). Without ``share_state`` every layer works alone: the attention is then
plain attention, and the AC router routes with the plain score.

``model.set_grad_checkpointing(True)`` gives the same gradients: a recomputed block reads the same
earlier values and routing. With timm's reentrant checkpointing (``timm.layers.set_reentrant_ckpt(True)``)
the first pass runs without grad, so the MoE layers' ``.aux_loss`` carries no graph; train with aux
losses under the default, non-reentrant checkpointing.
"""

from __future__ import annotations

import copyreg
import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clusterformers import attention as _attention
from clusterformers.checks import check_inputs_default
from clusterformers.moe import layer as _moe_layer

__all__ = ["EllipticalAttention", "MoE"]

#: A float ``attn_mask`` entry at or below this masks its key (its softmax weight underflows to 0).
MASKED = -1e4


class _Bound(type):
    """Metaclass of the classes ``with_options`` makes: they have no importable name, so they pickle as
    ``(base, options)`` (timm keeps ``attn_layer`` / ``mlp_layer`` in ``model._model_args``)."""


def _rebuild(base: type, options: dict[str, Any]) -> type:
    return base.with_options(**options)


copyreg.pickle(_Bound, lambda cls: (_rebuild, (cls._unbound, dict(cls._options))))


class _WithOptions:
    """``with_options(**options)``: a subclass whose constructor has those defaults (``partial`` as a class)."""

    _options: dict[str, Any] = {}
    _unbound: type | None = None

    @classmethod
    def with_options(cls, **options: Any) -> type:
        """A subclass of this class whose constructor defaults to ``options``; call-time arguments win.

        Unknown names raise TypeError here, values are checked when timm builds the layer. The class, its
        instances and models holding them copy (``copy.deepcopy``) and pickle (``torch.save(model)``).
        """
        base = cls._unbound or cls
        try:
            inspect.signature(base.__init__).bind_partial(None, **options)
        except TypeError as error:
            raise TypeError(f"{base.__name__}.with_options: {error}") from None
        merged = {**cls._options, **options}

        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            base.__init__(self, *args, **{**merged, **kwargs})

        shown = ", ".join(f"{k}={v!r}" for k, v in merged.items())
        namespace = {
            "__init__": __init__,
            "__module__": base.__module__,
            "__qualname__": base.__qualname__,
            "__doc__": f"{base.__name__} with defaults {shown}.\n\n{base.__doc__ or ''}",
            "_options": merged,
            "_unbound": base,
        }
        return _Bound(base.__name__, (base,), namespace)


def _to(module: nn.Module, device: Any, dtype: Any) -> None:
    if device is not None or dtype is not None:
        module.to(device=device, dtype=dtype)


class EllipticalAttention(_WithOptions, _attention.EllipticalAttention):
    """Elliptical Attention with timm's ``Attention`` constructor, parameter names and forward.

    A :class:`clusterformers.EllipticalAttention` (so ``set_metric_grad`` and the metrics find it) whose
    submodules are timm's: ``qkv`` ``Linear(dim, 3·dim)``, ``q_norm`` / ``k_norm`` (``norm_layer(head_dim)``
    with ``qk_norm``, else Identity), ``norm`` (``norm_layer(dim)`` with ``scale_norm``, else Identity),
    ``gate`` (``gated``, else None), ``proj`` ``Linear(dim, dim_out)``, ``attn_drop``, ``proj_drop``.
    With ``qk_norm`` the metric rescales the normalised queries, so ``m ≡ 1`` is timm's attention exactly.

    The first attention layer of a model, and any layer without a shared state
    (:func:`clusterformers.share_state`), computes plain attention; later ones rescale the queries by the
    metric ``m`` estimated from their values and the previous layer's.

    Args:
        dim, num_heads, qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer,
        dim_out, gated, device, dtype: as timm's ``Attention``. ``attn_head_dim`` is supported only as
            ``dim // num_heads`` (the default).
        estimator, metric_grad, eps, store_metric, random_low, check_inputs: as
            :class:`clusterformers.EllipticalAttention`.

    ``forward(x [B, N, dim], attn_mask=None, is_causal=False, *, v_prev=None) -> [B, N, dim_out]``:

    * ``attn_mask``: None; a bool keep-mask ``[B, N]`` (True = real token); or timm's masks, bool
      (True = attend) or float additive (0 = attend, ``-inf`` or ``<= -1e4`` = masked; other values are a
      bias and raise), of shape ``[B|1, H|1, N|1, N]`` (NaFlex's ``create_attention_mask``, symmetric or
      key-only). The attention uses the mask as given; the metric leaves out the keys no query may attend
      to (padding), so padding never shifts ``m``. The metric reads the mask as key padding only: for
      causal attention pass ``is_causal=True`` (then the metric is the prefix mean), not a triangle.
    * ``v_prev``: the previous layer's values ``[B, H, N, D]``, overriding the shared state.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        *,
        attn_head_dim: int | None = None,
        dim_out: int | None = None,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        scale_norm: bool = False,
        proj_bias: bool = True,
        gated: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: type[nn.Module] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        estimator: str = "mean",
        metric_grad: bool = False,
        eps: float = 1e-6,
        store_metric: bool = False,
        random_low: float = 0.0,
        check_inputs: bool | None = None,
    ) -> None:
        if num_heads <= 0 or dim % num_heads:
            raise ValueError(f"num_heads: must divide dim, got dim={dim}, num_heads={num_heads}")
        if attn_head_dim not in (None, dim // num_heads):
            raise ValueError(
                f"attn_head_dim: only dim // num_heads = {dim // num_heads} is supported, got {attn_head_dim}; "
                "pass attn_head_dim=None"
            )
        if (qk_norm or scale_norm) and norm_layer is None:
            raise ValueError("norm_layer: qk_norm=True and scale_norm=True need a norm_layer (e.g. nn.LayerNorm)")
        super().__init__(
            dim,
            num_heads,
            dropout=attn_drop,
            estimator=estimator,
            metric_grad=metric_grad,
            eps=eps,
            bias=qkv_bias,
            store_metric=store_metric,
            random_low=random_low,
            check_inputs=check_inputs,
        )
        self.attn_dim = dim
        dim_out = dim_out or dim
        self.q_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = norm_layer(dim) if scale_norm else nn.Identity()
        self.gate = nn.Linear(dim, dim, bias=qkv_bias) if gated else None
        if proj_bias != qkv_bias or dim_out != dim:
            self.proj = nn.Linear(dim, dim_out, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)
        _to(self, device, dtype)

    def forward(
        self,
        x: Tensor,
        attn_mask: Tensor | None = None,
        is_causal: bool = False,
        *,
        v_prev: Tensor | None = None,
    ) -> Tensor:
        """``x [B, N, dim] -> [B, N, dim_out]``; see the class docstring for ``attn_mask`` and ``v_prev``."""
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != self.dim or 0 in x.shape[:2]:
            raise ValueError(f"x: expected a [B, N, dim={self.dim}] tensor, got shape {list(getattr(x, 'shape', []))}")
        batch, n, _ = x.shape
        check = check_inputs_default(self.check_inputs, x)
        if check and not bool(torch.isfinite(x).all()):
            raise ValueError("x contains NaN or inf; check the inputs (or the previous layer) for overflow")
        keep = self.key_padding(attn_mask, batch, n, is_causal=is_causal, check=check)
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        q, k, v = self.qkv(x).reshape(batch, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if v_prev is None:
            v_prev = self.read_state()
        metric = None
        if v_prev is not None:
            metric = self.metric(v, v_prev, keep, causal=is_causal, check=check)
            q = q * metric
        if self.store_metric:
            self.last_metric = None if metric is None else metric.detach()
        self.write_state(v)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask if attn_mask is None or attn_mask.dim() == 4 else keep[:, None, None, :],
            dropout_p=self.attn_drop.p if self.training else 0.0,
            is_causal=is_causal,
        )
        out = self.norm(out.transpose(1, 2).reshape(batch, n, self.attn_dim))
        if gate is not None:
            out = out * gate
        return self.proj_drop(self.proj(out))

    def key_padding(
        self, attn_mask: Tensor | None, batch: int, n: int, *, is_causal: bool = False, check: bool = True
    ) -> Tensor | None:
        """The keep-mask ``[B, N]`` (True = a key some query may attend to) of ``attn_mask``, or None.

        ``check`` also validates the mask's values on the host: a float mask holds only 0 and masked
        entries (``<= -1e4``), every sample keeps a key.
        """
        if attn_mask is None:
            return None
        if is_causal:
            raise ValueError("is_causal: pass either attn_mask or is_causal=True, not both (as timm's Attention)")
        if not isinstance(attn_mask, Tensor):
            raise TypeError(f"attn_mask: expected a Tensor or None, got {type(attn_mask).__name__}")
        shape = list(attn_mask.shape)
        if attn_mask.dim() == 2:
            if attn_mask.dtype != torch.bool or shape != [batch, n]:
                raise ValueError(
                    f"attn_mask: a 2-D mask must be a bool keep-mask [B, N] = {[batch, n]} (True = real token), "
                    f"got {attn_mask.dtype} {shape}; pass query-key masks as [B|1, H|1, N, N]"
                )
            keep = attn_mask
        elif attn_mask.dim() == 4:
            heads = self.num_heads
            if not (shape[0] in (1, batch) and shape[1] in (1, heads) and shape[2] in (1, n) and shape[3] == n):
                raise ValueError(
                    f"attn_mask: expected shape [B|1, H|1, N|1, N] with B={batch}, H={heads}, N={n}, got {shape}"
                )
            if attn_mask.dtype == torch.bool:
                allowed = attn_mask
            elif attn_mask.is_floating_point():
                if check and not bool(((attn_mask == 0) | (attn_mask <= MASKED)).all()):
                    raise ValueError(
                        "attn_mask: a float mask must be additive padding (0 = attend, -inf or <= -1e4 = masked); "
                        "it holds other values (a bias), from which the key padding cannot be read; pass a bool mask"
                    )
                allowed = attn_mask > MASKED
            else:
                raise TypeError(f"attn_mask: expected a bool or floating-point mask, got {attn_mask.dtype}")
            keep = allowed.any(dim=2).any(dim=1).expand(batch, n)
        else:
            raise ValueError(f"attn_mask: expected a bool [B, N] or a [B|1, H|1, N|1, N] mask, got shape {shape}")
        if check and not bool(keep.any(dim=1).all()):
            empty = (~keep.any(dim=1)).nonzero().flatten().tolist()
            raise ValueError(f"attn_mask: no query may attend to any key in sample(s) {empty}")
        return keep


def _exact_gelu(act_layer: Any) -> bool:
    """Whether ``act_layer()`` computes the exact (erf) GELU of the experts."""
    try:
        act = act_layer()
        probe = torch.linspace(-4.0, 4.0, 33)
        return bool(torch.allclose(act(probe), F.gelu(probe), rtol=0.0, atol=1e-6))
    except Exception:  # any failure means "not the experts' activation"
        return False


class MoE(_WithOptions, _moe_layer.MoE):
    """A :class:`clusterformers.MoE` with timm's ``Mlp`` constructor: ``[..., d] -> [..., d]``.

    Experts are bias-free two-layer MLPs, ``hidden_features`` wide (``in_features`` when None), with
    exact GELU; ``gated=True`` makes them SwiGLU (then ``act_layer`` is not used). ``bias`` is accepted
    for timm's Block and unused (the experts have no biases); ``drop`` is dropout on the output (timm's
    ``Mlp`` also drops its hidden activations). Unsupported: ``out_features != in_features``,
    ``norm_layer`` (timm's ``scale_mlp_norm``), ``use_conv``, and activations other than GELU, each a
    ValueError naming the argument.

    Args:
        num_experts, top_k, router, ac, gated, capacity_factor, priority, aux_coef, z_coef, check_inputs:
            as :class:`clusterformers.MoE` (here ``router`` defaults to ``"ac"``, ``num_experts`` to 8,
            ``top_k`` to 2).

    ``forward(x [..., d], prev=None, key_padding_mask=None, return_aux=False)`` as
    :class:`clusterformers.MoE`; timm calls ``forward(x)``. After a forward, ``.aux_loss`` holds the
    auxiliary loss (``clusterformers.total_aux_loss(model)`` sums them).
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        act_layer: Any = nn.GELU,
        norm_layer: type[nn.Module] | None = None,
        bias: bool | tuple[bool, bool] = True,
        drop: float = 0.0,
        use_conv: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        num_experts: int = 8,
        top_k: int = 2,
        router: Any = "ac",
        ac: Any = None,
        gated: bool = False,
        capacity_factor: float | None = None,
        priority: str = "slot",
        aux_coef: float = 0.0,
        z_coef: float = 0.0,
        check_inputs: bool | None = None,
    ) -> None:
        if out_features not in (None, in_features):
            raise ValueError(
                f"out_features: an MoE maps d -> d, got in_features={in_features}, out_features={out_features}; "
                "pass out_features=None"
            )
        if norm_layer is not None:
            raise ValueError("norm_layer: the experts have no hidden norm; build the model with scale_mlp_norm=False")
        if use_conv:
            raise ValueError("use_conv: the experts act on [..., d] tokens; pass use_conv=False")
        if not gated and not _exact_gelu(act_layer):
            raise ValueError(
                f"act_layer: the experts use exact GELU (or SwiGLU with gated=True), got {act_layer!r}; "
                "pass act_layer=nn.GELU or gated=True"
            )
        drops = drop if isinstance(drop, (tuple, list)) else (0.0, drop)
        if len(drops) != 2 or drops[0]:
            raise ValueError(f"drop: only dropout on the output is supported, got {drop!r}; pass a float")
        super().__init__(
            in_features,
            num_experts,
            top_k,
            hidden_features or in_features,
            router=router,
            ac=ac,
            gated=gated,
            capacity_factor=capacity_factor,
            priority=priority,
            aux_coef=aux_coef,
            z_coef=z_coef,
            check_inputs=check_inputs,
        )
        self.drop = nn.Dropout(drops[1])
        _to(self, device, dtype)

    def forward(
        self,
        x: Tensor,
        prev: Any = None,
        key_padding_mask: Tensor | None = None,
        return_aux: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """``x [..., d] -> y [..., d]`` (``(y, aux_loss)`` with ``return_aux``); dropout on ``y``."""
        out = super().forward(x, prev, key_padding_mask, return_aux)
        if return_aux:
            return self.drop(out[0]), out[1]
        return self.drop(out)
