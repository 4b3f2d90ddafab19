"""Mixture-of-experts layers and routers, with the Adaptive Clustering (AC) router.

Imports only torch. See ``routers`` (top-k routers and ``RoutingState``), ``adaptive`` (the AC
transform), ``layer`` (``MoE``), ``soft`` (``SoftMoE``), ``losses`` and ``parallel`` (expert parallelism
on ``torch.distributed``).
"""

from .adaptive import ACConfig, ACStats, AdaptiveMetric, adaptive_metric
from .layer import Experts, MoE, expert_capacity
from .losses import load_balancing_loss, router_z_loss, total_aux_loss
from .parallel import ShardedExperts, expert_parallel, expert_parameter_names
from .routers import (
    ROUTERS,
    ACRouter,
    RandomRouter,
    Router,
    RouterOutput,
    RoutingState,
    StableMoERouter,
    TopKRouter,
    XMoERouter,
    build_router,
)
from .soft import SoftMoE

__all__ = [
    "ACConfig",
    "ACRouter",
    "ACStats",
    "AdaptiveMetric",
    "Experts",
    "MoE",
    "ROUTERS",
    "RandomRouter",
    "Router",
    "RouterOutput",
    "RoutingState",
    "ShardedExperts",
    "SoftMoE",
    "StableMoERouter",
    "TopKRouter",
    "XMoERouter",
    "adaptive_metric",
    "build_router",
    "expert_capacity",
    "expert_parallel",
    "expert_parameter_names",
    "load_balancing_loss",
    "router_z_loss",
    "total_aux_loss",
]
