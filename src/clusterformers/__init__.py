"""clusterformers: three of a transformer's similarity computations as clustering with an adaptive metric."""

from clusterformers.attention import (
    EllipticalAttention,
    MultiheadAttention,
    elliptical_metric,
    padding_mask_from_lengths,
    set_metric_grad,
)

__all__ = [
    "EllipticalAttention",
    "MultiheadAttention",
    "elliptical_metric",
    "padding_mask_from_lengths",
    "set_metric_grad",
]
__version__ = "0.1.0"
