"""Budget-driven compression on a plain ``nn.Module``: measure, allocate, and (optionally) search under accuracy.

One config and one verb, as for the other schemes: :func:`plan_budget` measures each layer's sensitivity on a
few batches, the cost of each layer at each level (parameters, MACs, stored size or measured latency), and
chooses per-layer levels that meet the target with the least predicted loss. The :class:`BudgetPlan` it returns
holds the arguments of the callback that applies the scheme (``plan.allocation.callback_arguments()``);
:func:`apply_allocation` applies the levels at once, without a callback (one-shot compression).
:func:`accuracy_aware_budget` searches for the smallest target whose fine-tuned model stays within an accepted
drop of a metric.

Example::

    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
    >>> batches = [(torch.randn(16, 8), torch.randint(0, 3, (16,))) for _ in range(2)]
    >>> plan = plan_budget(model, batches, BudgetConfig("prune", target=0.5, metric="params"))
    >>> plan.allocation.fraction <= 0.5, sorted(plan.allocation.callback_arguments())
    (True, ['layer_amounts'])
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_compress import _checks
from lightning_compress._inputs import call_module, first_input
from lightning_compress.budget.allocation import Allocation, allocate, uniform
from lightning_compress.budget.costs import METRICS, CostTable, layer_costs
from lightning_compress.budget.groups import channel_units, unit_masks
from lightning_compress.budget.search import SearchConfig, SearchResult, accuracy_aware_search
from lightning_compress.budget.sensitivity import (
    Sensitivity,
    SensitivityConfig,
    compressed_weight,
    measure_sensitivity,
)
from lightning_compress.selection import Selector, selector_items
from lightning_compress.stats import _eval_mode, compare_latency

__all__ = [
    "BudgetConfig",
    "BudgetPlan",
    "accuracy_aware_budget",
    "apply_allocation",
    "output_layers",
    "plan_budget",
]


@dataclass(frozen=True)
class BudgetConfig:
    """What to compress, and to which target: checked when built.

    Args:
        scheme: ``"prune"`` (unstructured), ``"prune_structured"``, ``"low_rank"`` or ``"quantize"``.
        target: the cost kept, as a fraction of the whole model's uncompressed cost, in ``(0, 1]``: ``0.5`` is
            half the MACs (or parameters, stored size, latency).
        metric: what the target counts: ``"params"``, ``"macs"``, ``"size"`` or ``"latency"`` (measured on this
            machine; ``prune_structured`` and ``low_rank`` only).
        levels: the levels measured and chosen from (``None``: the scheme's defaults).
        modules, exclude, min_params: the layers to allocate (as in the other callbacks).
        batches: how many batches each sensitivity probe evaluates.
        latency_repeats: timed calls per layer and level for ``metric="latency"``.

    Example::

        >>> BudgetConfig("low_rank", target=1.5)
        Traceback (most recent call last):
        ...
        ValueError: `target=1.5` must be a number > 0 and <= 1: the cost kept, as a fraction of the uncompressed model's (0.5: half).
    """

    scheme: str = "prune"
    target: float = 0.5
    metric: str = "macs"
    levels: Sequence[float] | None = None
    modules: Selector = (nn.Conv2d, nn.Linear)
    exclude: Selector = None
    min_params: int = 0
    batches: int = 4
    latency_repeats: int = 20
    sensitivity: SensitivityConfig = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        hint = "the cost kept, as a fraction of the uncompressed model's (0.5: half)."
        _checks.check_number(self.target, "target", 0.0, 1.0, low_open=True, hint=hint)
        _checks.check_choice(self.metric, "metric", METRICS)
        _checks.check_int(self.latency_repeats, "latency_repeats", 1)
        config = SensitivityConfig(
            self.scheme, self.levels, self.modules, self.exclude, self.min_params, self.batches
        )
        object.__setattr__(self, "sensitivity", config)
        object.__setattr__(self, "levels", config.levels)
        if self.metric == "latency" and self.scheme in ("prune", "quantize"):
            raise ValueError(
                f"`metric='latency'` with `scheme={self.scheme!r}`: dense CPU kernels do not get faster from "
                f"{'zeros' if self.scheme == 'prune' else 'fake-quantized weights'}. Use scheme='prune_structured' "
                "or 'low_rank' for a latency target, or target 'macs' / 'size'."
            )


@dataclass
class BudgetPlan:
    """What :func:`plan_budget` measured and chose.

    ``allocation`` meets the target with the least predicted loss; ``uniform`` is the same level everywhere that
    meets it (``None`` when no single measured level does), for comparison; ``example_input`` is the input the
    costs were counted on (``prune_structured``: the channel groups traced).
    """

    sensitivity: Sensitivity
    costs: CostTable
    allocation: Allocation
    uniform: Allocation | None
    example_input: Any = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "sensitivity": self.sensitivity.to_dict(),
            "costs": self.costs.to_dict(),
            "allocation": self.allocation.to_dict(),
            "uniform": None if self.uniform is None else self.uniform.to_dict(),
        }


def plan_budget(
    model: nn.Module,
    batches: Iterable[Any],
    config: BudgetConfig,
    example_input: Any = None,
    loss_fn: Callable[[nn.Module, Any], Tensor] | None = None,
    progress: Callable[[str], Any] | None = None,
    cache: Any = None,
    target: float | None = None,
) -> BudgetPlan:
    """Measure the sensitivity and the costs of ``model``'s selected layers, and allocate ``config.target``.

    Args:
        model: the model (left as it was: weights bit-exact, training mode restored).
        batches: the batches to evaluate on (the first ``config.batches`` are used).
        config: the scheme, target and selection.
        example_input: one batch of the model's input for MACs and latency (``None``: the first input of
            ``batches``).
        loss_fn: ``loss_fn(model, batch) -> scalar``; default: cross entropy of ``model(x)`` against ``y``.
        progress: called with a line per measured layer.
        cache: a JSON file that keeps the sensitivity between runs (see ``measure_sensitivity``).
        target: overrides ``config.target``.
    """
    batches = list(batches)[: config.batches]
    if example_input is None and batches:
        example_input = first_input(batches[0])
    if config.scheme == "prune_structured" and example_input is not None:
        # A layer whose outputs are the model's (the classifier) keeps its channels: structured pruning leaves it.
        kept = output_layers(model, example_input)
        if kept:
            config = dataclasses.replace(config, exclude=[*selector_items(config.exclude), *kept])
    sensitivity = measure_sensitivity(
        model, batches, config.sensitivity, loss_fn, progress, cache, example_input=example_input
    )
    costs = layer_costs(
        model,
        example_input,
        config.scheme,
        config.levels,
        config.metric,
        list(sensitivity.loss),
        repeats=config.latency_repeats,
    )
    budget = config.target if target is None else target
    try:
        baseline = uniform(sensitivity, costs, budget)
    except ValueError:
        baseline = None
    if config.scheme == "prune_structured" and config.metric == "latency":
        allocation = _measured_latency(model, example_input, config, sensitivity, costs, budget)
    else:
        allocation = allocate(sensitivity, costs, budget)
    return BudgetPlan(sensitivity, costs, allocation, baseline, example_input)


def _measured_latency(
    model: nn.Module,
    example_input: Any,
    config: BudgetConfig,
    sensitivity: Sensitivity,
    costs: CostTable,
    budget: float,
) -> Allocation:
    """A structured latency allocation whose pruned model *measures* within ``budget`` of the dense latency.

    Convolution kernels are not separable in their input and output widths (they run in blocks of channels),
    so the latency table is a guide to which groups to shrink rather than an exact price: the budget the table
    is allocated at is bisected until a copy of the model with the channels removed, timed side by side with
    the model, meets ``budget``. The allocation keeps the table's cost and holds the measured fraction.
    """
    from lightning_compress.pruning.core import PruningConfig, prune_

    def measure(allocation: Allocation) -> float:
        pruned = copy.deepcopy(model)
        selection = {"modules": config.modules, "exclude": config.exclude, "min_params": config.min_params}
        levels = dict(allocation.levels)
        pruning = PruningConfig(0.0, "structured", round_to=1, layer_amounts=levels, **selection)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prune_(pruned, pruning, example_input=example_input)
        timed = compare_latency(
            {"model": model, "pruned": pruned}, example_input, repeats=config.latency_repeats, rounds=3
        )
        return timed["pruned"].median_ms / timed["model"].median_ms

    low, high = 0.0, 1.0
    best: Allocation | None = None
    cheapest: Allocation | None = None
    timed = 0
    for _ in range(4 * _LATENCY_PROBES):
        if timed == _LATENCY_PROBES:
            break
        middle = (low + high) / 2
        try:
            allocation = allocate(sensitivity, costs, middle)
        except ValueError:  # below what the levels reach in the table: nothing to time
            low = middle
            continue
        timed += 1
        allocation.measured_fraction = measure(allocation)
        if allocation.measured_fraction <= budget:
            low = middle
            if best is None or allocation.measured_fraction > best.measured_fraction:  # type: ignore[operator]
                best = allocation
        else:
            high = middle
            cheapest = allocation
    found = best or cheapest
    if found is None:
        raise ValueError(
            f"`target={budget:g}` with metric='latency': the measured latency table does not let any level "
            "allocation run faster than the model itself (it is timed mostly in call overhead). Use a larger "
            "`example_input` batch, more aggressive `levels`, or metric='macs'."
        )
    found.budget = budget
    return found


@torch.no_grad()
def apply_allocation(
    model: nn.Module, levels: Mapping[str, float], scheme: str, example_input: Any = None
) -> nn.Module:
    """Compress each named layer of ``model`` at its level, in place and at once (no fine-tuning).

    The weights take the values the sensitivity measured: zeros for pruning, the truncated SVD product for
    ``low_rank``, fake-quantized values for ``quantize``; ``prune_structured`` zeroes the channels of each named
    channel group in every layer they reach (traced on ``example_input``, default ``model.example_input_array``).
    The structure is unchanged (the callbacks make it smaller).

    Example::

        >>> net = nn.Sequential(nn.Linear(4, 4))
        >>> _ = apply_allocation(net, {"0": 0.5}, "prune")
        >>> int((net[0].weight == 0).sum())
        8
    """
    if scheme == "prune_structured":
        example = example_input if example_input is not None else getattr(model, "example_input_array", None)
        pruner, units = channel_units(model, example, list(levels))
        unknown = sorted(set(levels) - {unit.name for unit in units})
        if unknown:
            raise ValueError(
                f"`levels` names {unknown}, which name no channel group here (a group is named by its root "
                f"layer, or its first selected producer): use the names of `plan.allocation.levels`."
            )
        scores = pruner.importance_scores(model)
        masks: dict[str, Tensor] = {}
        for unit in units:
            for param, mask in unit_masks(pruner, model, unit, levels[unit.name], scores).items():
                masks[param] = masks[param] & mask if param in masks else mask
        params = dict(model.named_parameters())
        for param, mask in masks.items():
            params[param].mul_(mask.to(params[param].dtype))
        return model
    for name, level in levels.items():
        module = model.get_submodule(name)
        weight, bias = compressed_weight(module, scheme, level)
        module.weight.copy_(weight)
        if bias is not None and module.bias is not None:
            module.bias.copy_(bias)
    return model


def accuracy_aware_budget(
    model: nn.Module,
    plan: BudgetPlan,
    evaluate: Callable[[nn.Module], float],
    max_drop: float,
    fine_tune: Callable[[nn.Module, float], Any] | None = None,
    probes: int = 5,
    mode: str = "max",
    relative: bool = False,
    low: float | None = None,
    progress: Callable[[dict[str, Any]], Any] | None = None,
) -> tuple[SearchResult, Allocation | None]:
    """The smallest target (fraction of the cost kept) whose compressed, fine-tuned model stays within
    ``max_drop`` of the uncompressed model's metric.

    Each probe allocates a target with the measured sensitivity and costs of ``plan`` (no new measurement),
    applies it to a copy of ``model`` (:func:`apply_allocation`), fine-tunes it with ``fine_tune(copy, target)``
    when given, and evaluates it. The search bisects the target between ``low`` (default: the cheapest
    allocation the levels allow) and 1.

    Returns:
        The search result, and the allocation at the accepted target (``None`` when no probe was accepted).
    """
    lowest = _cheapest(plan)
    low = lowest if low is None else max(low, lowest)
    scheme = plan.sensitivity.scheme

    def compress(copy_: nn.Module, target: float) -> None:
        levels = allocate(plan.sensitivity, plan.costs, target).levels
        apply_allocation(copy_, levels, scheme, plan.example_input)

    config = SearchConfig(
        max_drop=max_drop, low=low, high=1.0, mode=mode, relative=relative, more="low", probes=probes
    )
    result = accuracy_aware_search(model, compress, evaluate, config, fine_tune, progress)
    accepted = None if result.level is None else allocate(plan.sensitivity, plan.costs, result.level)
    return result, accepted


def output_layers(model: nn.Module, example_input: Any) -> list[str]:
    """The ``nn.Linear``/``nn.Conv*`` layers whose output tensor is (part of) the model's output.

    Example::

        >>> output_layers(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), torch.zeros(1, 4))
        ['2']
    """
    outputs: dict[int, str] = {}
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d)]
    hooks = [
        m.register_forward_hook(lambda _m, _i, out, name=n: outputs.__setitem__(id(out), name))
        for n, m in layers
    ]
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]), _eval_mode([model]):  # no running stats move
            result = call_module(model, example_input)
    finally:
        for hook in hooks:
            hook.remove()
    found = [t for t in (result if isinstance(result, tuple | list) else [result]) if isinstance(t, Tensor)]
    return sorted({outputs[id(t)] for t in found if id(t) in outputs})


def _cheapest(plan: BudgetPlan) -> float:
    """The smallest fraction of the cost the levels reach (every layer at its cheapest level), rounded up."""
    return _cheapest_fraction(plan.costs)


def _cheapest_fraction(costs: CostTable) -> float:
    return min(1.0, costs.cheapest() / costs.full() * 1.001) if costs.full() else 1.0


# Allocations timed by a structured latency budget, the budget bisected between them.
_LATENCY_PROBES = 7
