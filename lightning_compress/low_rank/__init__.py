"""Low-rank factorization: Linear and Conv2d layers as products of thinner ones, the whole-model verb
:func:`low_rank_`, and the LowRankReplacement and CompactConvReplacement callbacks."""

from lightning_compress.low_rank.compact import CompactConvReplacement
from lightning_compress.low_rank.core import (
    Collective,
    LowRankConfig,
    LowRankResult,
    LowRankTargets,
    find_targets,
    low_rank_,
    replace_targets,
)
from lightning_compress.low_rank.factorize import (
    Decomposition,
    DepthwiseSeparableConv2d,
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
from lightning_compress.low_rank.replacement import LowRankReplacement
from lightning_compress.low_rank.restore import restore_low_rank

__all__ = [
    "Collective",
    "CompactConvReplacement",
    "Decomposition",
    "DepthwiseSeparableConv2d",
    "InputStatistics",
    "LowRankConfig",
    "LowRankConv2d",
    "LowRankLinear",
    "LowRankReplacement",
    "LowRankResult",
    "LowRankTargets",
    "TuckerConv2d",
    "allocate_budget",
    "decompose",
    "factorize",
    "find_targets",
    "layer_features",
    "low_rank_",
    "rank_for_energy",
    "replace_targets",
    "restore_low_rank",
    "skip_reason",
]
