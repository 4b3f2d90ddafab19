"""clusterformers: three of a transformer's similarity computations as clustering with an adaptive metric.

``from clusterformers import EllipticalAttention, MoE, ACRouter, FARELoss`` gives the drop-in modules; the
subpackages ``attention``, ``moe`` and ``contrastive`` hold the rest.
"""

from clusterformers.attention import (
    EllipticalAttention,
    KVCache,
    MultiheadAttention,
    elliptical_metric,
    padding_mask_from_lengths,
    set_metric_grad,
)
from clusterformers.contrastive import (
    CCLKLoss,
    FairInfoNCELoss,
    FARELoss,
    InfoNCELoss,
    SparseFARELoss,
)
from clusterformers.moe import (
    ACConfig,
    ACRouter,
    MoE,
    Router,
    SoftMoE,
    StableMoERouter,
    TopKRouter,
    XMoERouter,
    load_balancing_loss,
    router_z_loss,
    total_aux_loss,
)
from clusterformers.state import LayerState, share_state

__all__ = [
    "ACConfig",
    "ACRouter",
    "CCLKLoss",
    "EllipticalAttention",
    "FARELoss",
    "FairInfoNCELoss",
    "InfoNCELoss",
    "KVCache",
    "LayerState",
    "MoE",
    "MultiheadAttention",
    "Router",
    "SoftMoE",
    "SparseFARELoss",
    "StableMoERouter",
    "TopKRouter",
    "XMoERouter",
    "elliptical_metric",
    "load_balancing_loss",
    "padding_mask_from_lengths",
    "router_z_loss",
    "set_metric_grad",
    "share_state",
    "total_aux_loss",
]
__version__ = "0.1.0"
