"""Low-rank factorization: Linear and Conv2d layers as products of thinner ones, and the LowRankReplacement callback."""

from lightning_compress.low_rank.factorize import (
    Decomposition,
    InputStatistics,
    LowRankConv2d,
    LowRankLinear,
    TuckerConv2d,
    allocate_budget,
    decompose,
    factorize,
    layer_features,
    rank_for_energy,
    skip_reason,
)
from lightning_compress.low_rank.replacement import LowRankReplacement, restore_low_rank

__all__ = [
    "Decomposition",
    "InputStatistics",
    "LowRankConv2d",
    "LowRankLinear",
    "LowRankReplacement",
    "TuckerConv2d",
    "allocate_budget",
    "decompose",
    "factorize",
    "layer_features",
    "rank_for_energy",
    "restore_low_rank",
    "skip_reason",
]
