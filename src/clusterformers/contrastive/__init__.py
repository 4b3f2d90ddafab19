"""Fair contrastive losses on one code path: InfoNCE, Fair-InfoNCE, CCLK, FARE and SparseFARE.

Every loss is :func:`weighted_nce` with different weights on the negatives (the method: ``docs/fare.md``).
Imports only torch.
"""

from clusterformers.contrastive.discretize import GridDiscretizer, KMeansDiscretizer
from clusterformers.contrastive.functional import cclk, cclk_weights, fair_info_nce, fare, info_nce, sparse_fare
from clusterformers.contrastive.kernels import KERNELS, sensitive_kernel
from clusterformers.contrastive.losses import (
    CCLKLoss,
    ContrastiveLoss,
    FairInfoNCELoss,
    FARELoss,
    InfoNCELoss,
    SparseFARELoss,
)
from clusterformers.contrastive.lsh import LSHConfig, build_block_plan, draw_rotations, hash_buckets, support_mask
from clusterformers.contrastive.nce import LogWeightBlocks, weighted_nce, weighted_nce_rows

__all__ = [
    "KERNELS",
    "CCLKLoss",
    "ContrastiveLoss",
    "FARELoss",
    "FairInfoNCELoss",
    "GridDiscretizer",
    "InfoNCELoss",
    "KMeansDiscretizer",
    "LSHConfig",
    "LogWeightBlocks",
    "SparseFARELoss",
    "build_block_plan",
    "cclk",
    "cclk_weights",
    "draw_rotations",
    "fair_info_nce",
    "fare",
    "hash_buckets",
    "info_nce",
    "sensitive_kernel",
    "sparse_fare",
    "support_mask",
    "weighted_nce",
    "weighted_nce_rows",
]
