"""Stochastic depth and block removal for residual networks: the plain-torch core and the StochasticDepth
callback."""

from lightning_compress.depth.callback import StochasticDepth
from lightning_compress.depth.core import (
    DepthConfig,
    DepthDrop,
    RemovalPlan,
    check_neighbours,
    check_removal,
    checkpoint_hint,
    draw_keep,
    find_blocks,
    measure_importance,
    plan_removal,
    put_back,
    remove_blocks_,
    removed_in,
    replace_by_identity,
    restore_depth,
    stochastic_depth_,
    survival_probabilities,
)

__all__ = [
    "DepthConfig",
    "DepthDrop",
    "RemovalPlan",
    "StochasticDepth",
    "check_neighbours",
    "check_removal",
    "checkpoint_hint",
    "draw_keep",
    "find_blocks",
    "measure_importance",
    "plan_removal",
    "put_back",
    "remove_blocks_",
    "removed_in",
    "replace_by_identity",
    "restore_depth",
    "stochastic_depth_",
    "survival_probabilities",
]
