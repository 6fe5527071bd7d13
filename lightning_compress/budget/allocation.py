"""Budget allocation: one level per layer that meets a global cost target with the least predicted loss.

The predicted loss of an allocation is the base loss plus the loss increase each layer showed when compressed
alone (a :class:`~lightning_compress.budget.sensitivity.Sensitivity` table); its cost comes from a
:class:`~lightning_compress.budget.costs.CostTable`. :func:`allocate` solves the choice exactly (a
multiple-choice knapsack, by dynamic programming over the cost cut into small steps); :func:`uniform` gives
every layer the same level, the baseline to compare against.

Example::

    >>> from lightning_compress.budget.costs import CostTable
    >>> from lightning_compress.budget.sensitivity import Sensitivity
    >>> levels = (0.0, 0.5, 0.9)
    >>> sens = Sensitivity("prune", levels, 1.0, {"a": [1.0, 1.01, 1.02], "b": [1.0, 1.3, 2.0]})
    >>> costs = CostTable("params", levels, {"a": [100.0, 50.0, 10.0], "b": [100.0, 50.0, 10.0]}, 0.0, "prune")
    >>> allocate(sens, costs, budget=0.3).levels
    {'a': 0.9, 'b': 0.5}
    >>> uniform(sens, costs, budget=0.3).levels
    {'a': 0.9, 'b': 0.9}
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from lightning_compress import _checks
from lightning_compress.budget.costs import UNITS, CostTable
from lightning_compress.budget.sensitivity import Sensitivity, level_label

__all__ = ["Allocation", "allocate", "uniform"]

# Relative slack when comparing a cost with the target: costs are sums of floats.
_TOLERANCE = 1e-9


# The argument of the applying callback that takes a scheme's per-layer levels.
ALLOCATED_ARGUMENT = {
    "prune": "layer_amounts",
    "prune_structured": "layer_amounts",
    "low_rank": "layer_ranks",
    "quantize": "layer_bits",
}


@dataclass
class Allocation:
    """The level chosen for each layer, and what it is predicted to cost and lose.

    Args:
        scheme: the scheme of the levels.
        metric: what ``cost`` counts (see :data:`~lightning_compress.budget.costs.METRICS`).
        levels: layer name -> chosen level.
        predicted_loss: the base loss plus the sum of the chosen levels' loss increases.
        cost: the whole model's cost with these levels.
        budget: the target, a fraction of ``full_cost``.
        full_cost: the whole model's cost uncompressed.
        deltas: layer name -> loss increase at its level.
        layer_costs: layer name -> cost at its level.
        method: ``"optimal"`` (:func:`allocate`) or ``"uniform"`` (:func:`uniform`).
        measured_fraction: the cost measured on the compressed model as a fraction of the uncompressed
            model's, where it was measured (a structured latency budget times the pruned model), else ``None``.

    Example::

        >>> a = Allocation("low_rank", "params", {"fc": 0.5}, 1.2, 60.0, 0.6, 100.0, {"fc": 0.2}, {"fc": 50.0})
        >>> a.fraction, a.callback_arguments()
        (0.6, {'layer_ranks': {'fc': 0.5}})
    """

    scheme: str
    metric: str
    levels: dict[str, float]
    predicted_loss: float
    cost: float
    budget: float
    full_cost: float
    deltas: dict[str, float] = field(default_factory=dict)
    layer_costs: dict[str, float] = field(default_factory=dict)
    method: str = "optimal"
    measured_fraction: float | None = None

    @property
    def fraction(self) -> float:
        """The cost as a fraction of the uncompressed model's."""
        return self.cost / self.full_cost if self.full_cost else math.nan

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable contents."""
        return {**asdict(self), "fraction": self.fraction}

    def callback_arguments(self) -> dict[str, Any]:
        """The per-layer argument of the callback that applies this scheme: ``{"layer_amounts": ...}`` for
        ``GradualPruning`` (``prune``: unstructured, ``prune_structured``: structured), ``{"layer_ranks": ...}``
        for ``LowRankReplacement``, ``{"layer_bits": ...}`` for a low-bit ``QuantizationAwareTraining`` (which
        leaves the layers at 32 bits in float)."""
        return {ALLOCATED_ARGUMENT[self.scheme]: dict(self.levels)}

    def format_table(self) -> str:
        """The chosen levels as a fixed-width text table, one line per layer, the totals below.

        Example::

            >>> a = Allocation("prune", "params", {"fc1": 0.9, "fc2": 0.0}, 1.05, 60.0, 0.6, 100.0,
            ...                {"fc1": 0.05, "fc2": 0.0}, {"fc1": 5.0, "fc2": 50.0})
            >>> print(a.format_table())
            layer    level   loss increase        cost
            fc1        0.9           +0.05           5
            fc2          0              +0          50
            optimal prune allocation: params 60 of 100 (0.6, budget 0.6), predicted loss 1.05
        """
        width = max([5, *(len(name) for name in self.levels)])
        lines = [f"{'layer':<{width}} {'level':>8} {'loss increase':>15} {'cost':>11}"]
        for name, level in self.levels.items():
            lines.append(
                f"{name:<{width}} {level_label(self.scheme, level):>8} {self.deltas.get(name, math.nan):>+15.4g} "
                f"{self.layer_costs.get(name, math.nan):>11.4g}"
            )
        measured = "" if self.measured_fraction is None else f", measured {self.measured_fraction:.3g}"
        lines.append(
            f"{self.method} {self.scheme} allocation: {self.metric} {self.cost:.4g} of {self.full_cost:.4g} "
            f"({self.fraction:.3g}{measured}, budget {self.budget:.3g}), predicted loss {self.predicted_loss:.4g}"
        )
        return "\n".join(lines)


def _check_inputs(sensitivity: Sensitivity, costs: CostTable, budget: Any) -> float:
    budget = _checks.check_number(
        budget,
        "budget",
        0.0,
        1.0,
        low_open=True,
        hint="the target as a fraction of the uncompressed model's cost, e.g. 0.5 for half",
    )
    if costs.scheme is not None and costs.scheme != sensitivity.scheme:
        raise ValueError(
            f"The sensitivity was measured for scheme={sensitivity.scheme!r} and the costs for "
            f"scheme={costs.scheme!r}: compute both for the same scheme."
        )
    if len(costs.levels) != len(sensitivity.levels) or not all(
        math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
        for a, b in zip(costs.levels, sensitivity.levels, strict=False)
    ):
        raise ValueError(
            f"The sensitivity levels {list(sensitivity.levels)} and the cost levels {list(costs.levels)} differ: "
            "compute the costs with the sensitivity's levels (`levels=sensitivity.levels`)."
        )
    if set(costs.cost) != set(sensitivity.loss):
        missing = [name for name in sensitivity.loss if name not in costs.cost]
        extra = [name for name in costs.cost if name not in sensitivity.loss]
        raise ValueError(
            f"The sensitivity and the cost table cover different layers (no cost for {missing}, no sensitivity "
            f"for {extra}): compute the costs for `layers=list(sensitivity.loss)`."
        )
    return budget


def _result(
    sensitivity: Sensitivity, costs: CostTable, budget: float, choice: Mapping[str, int], method: str
) -> Allocation:
    levels = {name: sensitivity.levels[index] for name, index in choice.items()}
    deltas = {name: sensitivity.delta(name)[index] for name, index in choice.items()}
    layer_costs = {name: costs.layer_cost(name, levels) for name in choice}
    return Allocation(
        scheme=sensitivity.scheme,
        metric=costs.metric,
        levels=levels,
        predicted_loss=sensitivity.base_loss + sum(deltas.values()),
        cost=costs.total_at(choice),
        budget=budget,
        full_cost=costs.full(),
        deltas=deltas,
        layer_costs=layer_costs,
        method=method,
    )


def allocate(
    sensitivity: Sensitivity, costs: CostTable, budget: float, *, resolution: int = 2000
) -> Allocation:
    """One level per layer minimizing the sum of loss increases with the model's cost within ``budget``.

    Subject to ``costs.total(levels) <= budget * costs.full()``: a multiple-choice knapsack, solved by dynamic
    programming with what each layer costs beyond its cheapest level rounded *up* to a step of ``1 / resolution``
    of what the budget leaves for that, so the result never exceeds the budget; the solution is exact for the
    rounded costs (an allocation within ``len(layers)`` steps of the budget can be missed). When the whole
    uncompressed model meets the budget, it is chosen unless some allocation is predicted better. A negative loss
    increase (a layer measured better compressed) is allowed and makes its level attractive; a level whose loss
    is not finite is never chosen.

    A table with ``cross`` terms (``prune_structured``: a layer's cost depends on its own group's level and on
    its input group's) is not a plain knapsack. It is solved on the table linearized at an anchor allocation
    (:meth:`CostTable.linearized`, exact where one group of each shared term moves), with the dynamic program's
    budget bisected so that the *exact* cost of its answer meets the target; the anchor then moves to the best
    answer and the search repeats until the answer stays the same. The result never exceeds the budget; it is
    the best answer found, not proven optimal.

    Args:
        sensitivity: the loss increase of each layer at each level.
        costs: the cost of each layer at the same levels (``layers=list(sensitivity.loss)``).
        budget: the target, a fraction in ``(0, 1]`` of the uncompressed model's cost.
        resolution: the number of cost steps of the dynamic program.

    Raises:
        ValueError: when even the cheapest levels of every layer exceed the budget.
    """
    budget = _check_inputs(sensitivity, costs, budget)
    _checks.check_int(resolution, "resolution", 1, hint="the number of cost steps, e.g. 2000.")
    names = list(sensitivity.loss)
    target = budget * costs.full()
    deltas = np.array([sensitivity.delta(name) for name in names], dtype=np.float64)
    if costs.cross:
        choice = _allocate_shared(names, deltas, costs, target, budget, sensitivity, resolution)
    else:
        table = np.array([costs.cost[name] for name in names], dtype=np.float64)
        picked = _knapsack(deltas, table, costs.fixed, target, resolution)
        if picked is None:
            _infeasible(sensitivity, costs, budget, costs.fixed + float(_cheapest(deltas, table).sum()))
        choice = dict(zip(names, picked[0], strict=True))
        if costs.full() <= target * (1 + _TOLERANCE) and picked[1] >= 0.0:
            choice = dict.fromkeys(names, 0)
    return _result(sensitivity, costs, budget, choice, "optimal")


def _cheapest(deltas: np.ndarray, table: np.ndarray) -> np.ndarray:
    return np.where(np.isfinite(deltas), table, np.inf).min(axis=1)


def _knapsack(
    deltas: np.ndarray, table: np.ndarray, fixed: float, target: float, resolution: int
) -> tuple[list[int], float] | None:
    """The level index of each row with the least summed ``deltas`` and ``fixed`` plus the chosen ``table``
    costs at most ``target`` (costs rounded up to steps), and that sum; ``None`` when nothing fits."""
    usable = np.isfinite(deltas)
    cheapest = _cheapest(deltas, table)
    lowest = fixed + float(cheapest.sum())
    if not lowest <= target * (1 + _TOLERANCE):
        return None
    room = target - lowest
    extra = table - cheapest[:, None]
    if room > 0:
        steps = np.ceil(extra / (room / resolution)).astype(np.int64)
    else:  # only the cheapest levels fit
        steps = np.where(extra <= 0, 0, resolution + 1)
    steps = np.where(usable & (steps <= resolution), np.maximum(steps, 0), resolution + 1)

    # best[b]: the least loss increase of the layers so far with at most b steps; the least compressed level
    # wins ties (levels are tried in order and only a strictly better one replaces it).
    best = np.zeros(resolution + 1)
    picks = []
    for layer in range(len(table)):
        new = np.full(resolution + 1, np.inf)
        pick = np.full(resolution + 1, -1, dtype=np.int64)
        for level in range(table.shape[1]):
            w = int(steps[layer, level])
            if w > resolution:
                continue
            candidate = np.full(resolution + 1, np.inf)
            candidate[w:] = best[: resolution + 1 - w] + deltas[layer, level]
            better = candidate < new
            new[better] = candidate[better]
            pick[better] = level
        best = new
        picks.append(pick)
    choice = [0] * len(table)
    room_left = resolution
    for layer in reversed(range(len(table))):
        level = int(picks[layer][room_left])
        choice[layer] = level
        room_left -= int(steps[layer, level])
    return choice, float(best[resolution])


# How often the anchor of a table with shared terms moves, and the bisection steps of the inner budget.
_ANCHORS = 8
_BISECTIONS = 24


def _allocate_shared(
    names: list[str],
    deltas: np.ndarray,
    costs: CostTable,
    target: float,
    budget: float,
    sensitivity: Sensitivity,
    resolution: int,
) -> dict[str, int]:
    usable = np.isfinite(deltas)
    own = np.array([costs.cost[name] for name in names], dtype=np.float64)
    # The most compressed usable level of each layer: the cheapest when costs fall with the level (measured
    # latencies need not).
    last = [max(i for i in range(own.shape[1]) if usable[k, i]) for k in range(len(names))]
    cheapest = dict(zip(names, last, strict=True))
    lowest = costs.total_at(cheapest)

    def loss(choice: Mapping[str, int]) -> float:
        return float(sum(deltas[k, choice[name]] for k, name in enumerate(names)))

    best: dict[str, int] | None = None
    if costs.full() <= target * (1 + _TOLERANCE):
        best = dict.fromkeys(names, 0)
    elif lowest <= target * (1 + _TOLERANCE):
        best = cheapest
    seen: set[tuple[int, ...]] = set()
    anchor: dict[str, int] = dict.fromkeys(names, 0)
    for _ in range(_ANCHORS):
        flat = costs.linearized(anchor)
        table = np.array([flat.cost[name] for name in names], dtype=np.float64)
        low = flat.fixed + float(_cheapest(deltas, table).sum())
        high = flat.fixed + float(np.where(usable, table, -np.inf).max(axis=1).sum())
        for _ in range(_BISECTIONS):
            middle = (low + high) / 2
            picked = _knapsack(deltas, table, flat.fixed, middle, resolution)
            if picked is None:
                low = middle
                continue
            choice = dict(zip(names, picked[0], strict=True))
            if costs.total_at(choice) <= target * (1 + _TOLERANCE):
                low = middle
                key = (loss(choice), -costs.total_at(choice))
                if best is None or key < (loss(best), -costs.total_at(best)):
                    best = choice
            else:
                high = middle
        if best is None:
            _infeasible(sensitivity, costs, budget, lowest)
        state = tuple(best[name] for name in names)
        if state in seen:
            break
        seen.add(state)
        anchor = dict(best)
    assert best is not None  # the first round found one, or raised
    return best


def _infeasible(sensitivity: Sensitivity, costs: CostTable, budget: float, lowest: float) -> None:
    full = costs.full()
    raise ValueError(
        f"`budget={budget:g}` is out of reach: with every layer at its cheapest level the model costs "
        f"{lowest / full:.4g} of its uncompressed {costs.metric} ({lowest:.4g} of {full:.4g} {UNITS[costs.metric]}; "
        f"{costs.fixed / full:.3g} of it is outside the {len(costs.cost)} selected layers). Raise the budget to at "
        f"least {math.ceil(lowest / full * 1000) / 1000:g}, add more aggressive levels than "
        f"{level_label(sensitivity.scheme, sensitivity.levels[-1])}, or select more layers."
    )


def uniform(sensitivity: Sensitivity, costs: CostTable, budget: float) -> Allocation:
    """The same level for every layer: the least compressed level whose total cost meets ``budget``.

    The baseline :func:`allocate` is compared against. Only the measured levels are tried (no interpolation).

    Raises:
        ValueError: when no single level meets the budget, with what each level reaches.
    """
    budget = _check_inputs(sensitivity, costs, budget)
    target = budget * costs.full()
    names = list(sensitivity.loss)
    reached = []
    for index, level in enumerate(sensitivity.levels):
        total = costs.total(dict.fromkeys(names, level))
        if total <= target * (1 + _TOLERANCE):
            return _result(sensitivity, costs, budget, dict.fromkeys(names, index), "uniform")
        reached.append(f"{level_label(sensitivity.scheme, level)}: {total / costs.full():.3g}")
    raise ValueError(
        f"No single level meets `budget={budget:g}` of the {costs.metric}; each level reaches "
        f"({', '.join(reached)}). Add a more aggressive level, or use `allocate` (per-layer levels)."
    )
