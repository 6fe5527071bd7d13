"""Pruning: masks (unstructured, N:M), activation-aware criteria (Wanda, SparseGPT), structured channel and head
groups, the plain-torch core (``PruningConfig``, ``PruningPlan``, ``prune_``) and the GradualPruning callback."""

from lightning_compress.pruning.calibration import (
    ColumnStatistics,
    collect_statistics,
    layer_columns,
    sparsegpt_prune,
    wanda_mask,
    wanda_scores,
)
from lightning_compress.pruning.core import (
    PRUNED_CHECKPOINT_KEY,
    PruningConfig,
    PruningPlan,
    load_pruned_checkpoint,
    prune_,
    pruning_schedule,
)
from lightning_compress.pruning.gradual import GradualPruning
from lightning_compress.pruning.heads import HeadPruner, PrunedMultiheadAttention
from lightning_compress.pruning.masks import (
    apply_masks,
    magnitude_scores,
    mask_sparsity,
    nm_keep,
    nm_mask,
    nm_masks,
    pack_mask,
    unpack_mask,
    unstructured_masks,
)
from lightning_compress.pruning.semi_structured import is_two_four_sparse, to_semi_structured
from lightning_compress.pruning.structured import ChannelGroup, NoChannelGroupError, StructuredPruner

__all__ = [
    "PRUNED_CHECKPOINT_KEY",
    "ChannelGroup",
    "ColumnStatistics",
    "GradualPruning",
    "HeadPruner",
    "NoChannelGroupError",
    "PrunedMultiheadAttention",
    "PruningConfig",
    "PruningPlan",
    "StructuredPruner",
    "apply_masks",
    "collect_statistics",
    "is_two_four_sparse",
    "layer_columns",
    "load_pruned_checkpoint",
    "magnitude_scores",
    "mask_sparsity",
    "nm_keep",
    "nm_mask",
    "nm_masks",
    "pack_mask",
    "prune_",
    "pruning_schedule",
    "sparsegpt_prune",
    "to_semi_structured",
    "unpack_mask",
    "unstructured_masks",
    "wanda_mask",
    "wanda_scores",
]
