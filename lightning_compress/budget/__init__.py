"""Budget-driven compression: per-layer sensitivity, per-layer costs, and the allocation that meets a target.

- :func:`measure_sensitivity`: the loss with each selected layer alone compressed at each level
  (``prune_structured``: each channel group, see :mod:`~lightning_compress.budget.groups`);
- :func:`layer_costs`: each layer's parameters, MACs, stored size or measured latency at each level;
- :func:`allocate`: per-layer levels that meet a global target with the least predicted loss (:func:`uniform`:
  one level for all, the baseline);
- :func:`plan_budget`: the three in one call; :func:`apply_allocation`: one-shot compression at those levels;
- :func:`accuracy_aware_search` / :func:`accuracy_aware_budget`: the most compression within an accepted drop
  of a metric, fine-tuning between probes;
- :class:`CompressionBudget`: the callback that plans in ``setup`` and hands the levels to the callback that
  applies the scheme (``GradualPruning``, ``LowRankReplacement``, ``QuantizationAwareTraining``).
"""

from lightning_compress.budget.sensitivity import (  # noqa: I001  (costs and allocation import sensitivity)
    DEFAULT_LEVELS,
    SCHEMES,
    Sensitivity,
    SensitivityConfig,
    compress_layer,
    compressed_weight,
    measure_sensitivity,
)
from lightning_compress.budget.costs import METRICS, CostTable, layer_costs
from lightning_compress.budget.allocation import Allocation, allocate, uniform
from lightning_compress.budget.search import SearchConfig, SearchResult, accuracy_aware_search
from lightning_compress.budget.core import (
    BudgetConfig,
    BudgetPlan,
    accuracy_aware_budget,
    apply_allocation,
    plan_budget,
)
from lightning_compress.budget.callback import CompressionBudget

__all__ = [
    "DEFAULT_LEVELS",
    "METRICS",
    "SCHEMES",
    "Allocation",
    "BudgetConfig",
    "BudgetPlan",
    "CompressionBudget",
    "CostTable",
    "SearchConfig",
    "SearchResult",
    "Sensitivity",
    "SensitivityConfig",
    "accuracy_aware_budget",
    "accuracy_aware_search",
    "allocate",
    "apply_allocation",
    "compress_layer",
    "compressed_weight",
    "layer_costs",
    "measure_sensitivity",
    "plan_budget",
    "uniform",
]
