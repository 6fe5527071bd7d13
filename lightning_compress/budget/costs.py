"""Per-layer cost tables: what each selected layer costs at each compression level, and what the rest costs.

A :class:`CostTable` holds, for one metric (parameters, MACs, stored bytes or measured latency), the cost of each
layer at each level of a scheme (see :mod:`~lightning_compress.budget.sensitivity` for the schemes and levels)
and the ``fixed`` cost of everything the selected layers do not account for, so that ``fixed`` plus the layers'
uncompressed costs is the whole model's cost. :func:`~lightning_compress.budget.allocation.allocate` reads it to
meet a budget.

For ``prune_structured`` the units are channel groups (:mod:`~lightning_compress.budget.groups`), and a layer's
cost can depend on two of them: its own output channels and the channels of its input. Such costs are
``cross`` terms of the table, a weight times a factor of each group's level; everything else stays per unit.

Example::

    >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    >>> table = layer_costs(model, torch.zeros(1, 8), "prune", [0.5], "params", ["0", "2"])
    >>> table.cost, table.fixed, table.full()
    ({'0': [144.0, 80.0], '2': [68.0, 36.0]}, 0.0, 212.0)
    >>> table.total({"0": 0.5})
    148.0
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_compress import _checks
from lightning_compress._inputs import call_module
from lightning_compress.budget.groups import ChannelUnit, channel_units, cost_terms
from lightning_compress.budget.sensitivity import (
    LAYER_TYPES,
    UNCOMPRESSED,
    check_layer,
    kept_rank,
    level_label,
    normalize_levels,
    pruned_count,
)
from lightning_compress.pruning.structured import StructuredPruner
from lightning_compress.selection import find_submodule
from lightning_compress.stats import (
    _eval_mode,
    compare_latency,
    count_macs_by_module,
    count_parameters,
    measure_latency,
    raw_size_bytes,
    repeat_sample,
)

__all__ = ["METRICS", "UNITS", "CostTable", "layer_costs"]

METRICS = ("params", "macs", "size", "latency")
UNITS = {"params": "parameters", "macs": "MACs per sample", "size": "bytes", "latency": "ms"}
_WARMUP = 3
_ROUNDS = 3


@dataclass
class CostTable:
    """The cost of each layer at each level of a scheme, and the cost of the rest of the model.

    Args:
        metric: one of :data:`METRICS` (units: :data:`UNITS`).
        levels: the levels, from the uncompressed one to the most compressed.
        cost: layer name -> cost at each level.
        fixed: the cost that no selected layer accounts for.
        scheme: the scheme the levels belong to (checked against a sensitivity table when allocating).
        cross: costs that depend on the levels of several layers: ``(weight, {layer: factor at each level})``
            costs ``weight`` times the product of the layers' factors at their levels (``prune_structured``: a
            layer whose outputs and inputs belong to two channel groups keeps the product of their fractions).

    Example::

        >>> table = CostTable("size", (32.0, 8.0), {"fc": [400.0, 116.0]}, fixed=40.0, scheme="quantize")
        >>> table.full(), table.total({"fc": 8})
        (440.0, 156.0)
        >>> groups = CostTable("params", (0.0, 0.5), {"a": [10.0, 5.0], "b": [6.0, 3.0]}, 0.0, "prune_structured",
        ...                    cross=[(20.0, {"a": [1.0, 0.5], "b": [1.0, 0.5]})])
        >>> groups.full(), groups.total({"a": 0.5}), groups.total({"a": 0.5, "b": 0.5})
        (36.0, 21.0, 13.0)
    """

    metric: str
    levels: tuple[float, ...]
    cost: dict[str, list[float]]
    fixed: float
    scheme: str | None = None
    cross: list[tuple[float, dict[str, list[float]]]] = field(default_factory=list)

    def level_index(self, level: float) -> int:
        """The position of ``level`` in :attr:`levels` (a ``ValueError`` listing them when it is not one)."""
        for index, known in enumerate(self.levels):
            if math.isclose(float(level), known, rel_tol=1e-9, abs_tol=1e-12):
                return index
        labels = ", ".join(f"{level:g}" for level in self.levels)
        raise ValueError(f"Level {level!r} is not one of this table's levels ({labels}).")

    def total(self, levels_by_layer: Mapping[str, float]) -> float:
        """The whole model's cost with each layer at the level given (layers left out: uncompressed)."""
        unknown = [name for name in levels_by_layer if name not in self.cost]
        if unknown:
            raise ValueError(f"No layers {unknown} in this cost table; it has {list(self.cost)}.")
        return self.total_at(self._indices(levels_by_layer))

    def _indices(self, levels_by_layer: Mapping[str, float]) -> dict[str, int]:
        return {
            name: self.level_index(levels_by_layer[name]) if name in levels_by_layer else 0
            for name in self.cost
        }

    def total_at(self, indices: Mapping[str, int]) -> float:
        """The whole model's cost with each layer at the level of its index in :attr:`levels` (layers left out:
        uncompressed)."""
        own = sum(costs[indices.get(name, 0)] for name, costs in self.cost.items())
        return self.fixed + own + sum(self._cross_term(t, indices) for t in self.cross)

    @staticmethod
    def _cross_term(term: tuple[float, Mapping[str, Sequence[float]]], indices: Mapping[str, int]) -> float:
        weight, factors = term
        return weight * math.prod(values[indices.get(name, 0)] for name, values in factors.items())

    def layer_cost(self, name: str, levels_by_layer: Mapping[str, float]) -> float:
        """What layer ``name`` accounts for with each layer at the level given: its own cost, plus an even share
        of each :attr:`cross` term it takes part in (the shares of all layers and ``fixed`` add up to
        :meth:`total`)."""
        indices = self._indices(levels_by_layer)
        shared = sum(self._cross_term(t, indices) / len(t[1]) for t in self.cross if name in t[1])
        return self.cost[name][indices[name]] + shared

    def full(self) -> float:
        """The whole model's cost uncompressed."""
        return self.total_at({})

    def cheapest(self) -> float:
        """The whole model's cost with every layer at its cheapest level (with :attr:`cross` terms: at the level
        of its own cheapest cost, the most compressed one among equals)."""
        indices = {
            name: min(range(len(costs)), key=lambda i, c=costs: (c[i], -i))
            for name, costs in self.cost.items()
        }
        return self.total_at(indices)

    def linearized(self, anchor: Mapping[str, int]) -> CostTable:
        """This table without :attr:`cross` terms, exact where at most one layer of each cross term is away from
        its ``anchor`` level index: each term is split into one per-layer cost for each of its layers (the others
        held at their anchor levels), its constant part moved to ``fixed``.

        Example::

            >>> table = CostTable("macs", (0.0, 0.5), {"a": [4.0, 2.0], "b": [4.0, 2.0]}, 0.0,
            ...                   cross=[(8.0, {"a": [1.0, 0.5], "b": [1.0, 0.5]})])
            >>> flat = table.linearized({"a": 0, "b": 0})
            >>> flat.cost, flat.fixed, flat.total({"a": 0.5}) == table.total({"a": 0.5})
            ({'a': [12.0, 6.0], 'b': [12.0, 6.0]}, -8.0, True)
        """
        cost = {name: list(values) for name, values in self.cost.items()}
        fixed = self.fixed
        for weight, factors in self.cross:
            at_anchor = {name: values[anchor.get(name, 0)] for name, values in factors.items()}
            for name, values in factors.items():
                rest = weight * math.prod(v for other, v in at_anchor.items() if other != name)
                cost[name] = [c + rest * f for c, f in zip(cost[name], values, strict=True)]
            fixed += weight * (1 - len(factors)) * math.prod(at_anchor.values())
        return CostTable(self.metric, self.levels, cost, fixed, self.scheme)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable contents (:meth:`from_dict` reads them back)."""
        return {
            "metric": self.metric,
            "scheme": self.scheme,
            "levels": list(self.levels),
            "cost": {name: list(values) for name, values in self.cost.items()},
            "fixed": self.fixed,
            "cross": [
                {"weight": weight, "factors": {name: list(v) for name, v in factors.items()}}
                for weight, factors in self.cross
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CostTable:
        """The table written by :meth:`to_dict`.

        Example::

            >>> table = CostTable("params", (0.0, 0.5), {"fc": [10.0, 5.0]}, 2.0, "prune")
            >>> CostTable.from_dict(table.to_dict()) == table
            True
        """
        return cls(
            metric=data["metric"],
            levels=tuple(float(level) for level in data["levels"]),
            cost={name: [float(v) for v in values] for name, values in data["cost"].items()},
            fixed=float(data["fixed"]),
            scheme=data.get("scheme"),
            cross=[
                (
                    float(term["weight"]),
                    {name: [float(v) for v in values] for name, values in term["factors"].items()},
                )
                for term in data.get("cross", [])
            ],
        )

    def format_table(self) -> str:
        """The costs as a fixed-width text table, one line per layer, the fixed part and the total below."""
        labels = [level_label(self.scheme, lv) if self.scheme else f"{lv:g}" for lv in self.levels]
        width = max([5, *(len(name) for name in self.cost)])
        # With shared terms, a row is the whole cost of compressing that layer alone (its share of them included).
        rows = self.linearized({}).cost if self.cross else self.cost
        cells = {name: [f"{value:.4g}" for value in values] for name, values in rows.items()}
        widths = [
            max([8, len(label), *(len(c[i]) for c in cells.values())]) for i, label in enumerate(labels)
        ]
        lines = [
            f"{self.metric} ({UNITS.get(self.metric, '')}) by level ({self.scheme or 'levels'})",
            f"{'layer':<{width}} " + " ".join(f"{lb:>{w}}" for lb, w in zip(labels, widths, strict=True)),
        ]
        for name, row in cells.items():
            lines.append(
                f"{name:<{width}} " + " ".join(f"{c:>{w}}" for c, w in zip(row, widths, strict=True))
            )
        if self.cross:
            lines.append(
                f"(each row: the layer alone compressed; {len(self.cross)} terms shared by two layers, "
                f"{sum(weight for weight, _ in self.cross):.4g} uncompressed, count once in totals)"
            )
        lines.append(f"fixed {self.fixed:.4g}, whole model uncompressed {self.full():.4g}")
        return "\n".join(lines)


def _layers(model: nn.Module, names: Iterable[str], scheme: str) -> list[tuple[str, nn.Module]]:
    if isinstance(names, str):
        raise TypeError(f"`layers={names!r}` must be a list of layer names, e.g. `layers=[{names!r}]`.")
    layers = [(name, find_submodule(model, name, "layers")) for name in names]
    if not layers:
        raise ValueError(
            "`layers` is empty: pass the names of the layers to cost (e.g. `list(sensitivity.loss)`)."
        )
    owners: dict[int, str] = {}
    for name, module in layers:
        check_layer(name, module, scheme)
        other = owners.setdefault(id(module.weight), name)
        if other != name:
            raise ValueError(
                f"Layers {other!r} and {name!r} share one weight, which would be counted twice. Keep one of them "
                "in `layers`."
            )
    return layers


def _shape(module: nn.Module) -> tuple[int, int, int, int]:
    """Output channels, entries per output row, weight entries, bias entries."""
    weight = module.weight
    out = weight.shape[0]
    bias = getattr(module, "bias", None)
    return out, weight.numel() // out, weight.numel(), bias.numel() if isinstance(bias, Tensor) else 0


def _params(module: nn.Module, scheme: str, level: float) -> float:
    out, row, numel, bias = _shape(module)
    if level == UNCOMPRESSED[scheme] or scheme == "quantize":
        return float(numel + bias)
    if scheme == "prune":
        return float(numel - pruned_count(numel, level) + bias)
    rank = kept_rank(min(out, row), level)
    return float(rank * (out + row) + bias)


def _macs(module: nn.Module, scheme: str, level: float, dense: float) -> float:
    out, row, numel, _ = _shape(module)
    if level == UNCOMPRESSED[scheme] or scheme == "quantize":
        return dense
    if scheme == "prune":
        return dense * (numel - pruned_count(numel, level)) / numel
    # Every weight entry takes part in one MAC per output position; the two factors have r*(out + row) entries.
    return dense * kept_rank(min(out, row), level) * (out + row) / numel


def _size(module: nn.Module, scheme: str, level: float) -> float:
    out, row, numel, bias = _shape(module)
    value = module.weight.element_size()
    bias_bytes = bias * module.bias.element_size() if bias else 0
    if level == UNCOMPRESSED[scheme]:
        return float(numel * value + bias_bytes)
    if scheme == "prune":
        kept = numel - pruned_count(numel, level)
        return float(min(numel * value, kept * value + math.ceil(numel / 8)) + bias_bytes)
    if scheme == "low_rank":
        return float(kept_rank(min(out, row), level) * (out + row) * value + bias_bytes)
    return float(math.ceil(numel * int(level) / 8) + 4 * out + bias_bytes)


def _conv_like(
    module: nn.Module, in_channels: int, out_channels: int, bias: bool, **changes: Any
) -> nn.Module:
    """A convolution of the same class and settings as ``module`` with other channels (``changes``: others)."""
    settings = dict(
        kernel_size=module.kernel_size,
        stride=module.stride,
        padding=module.padding,
        dilation=module.dilation,
        groups=module.groups,
        padding_mode=module.padding_mode,
    )
    settings.update(changes)
    return type(module)(in_channels, out_channels, bias=bias, **settings)


def _built(module: nn.Module, scheme: str, level: float) -> nn.Module:
    """The layer as it runs at ``level`` of ``low_rank``: two factors."""
    out, row, _, _ = _shape(module)
    has_bias = getattr(module, "bias", None) is not None
    linear = isinstance(module, nn.Linear)
    if level == UNCOMPRESSED[scheme]:
        if linear:
            return nn.Linear(module.in_features, out, bias=has_bias)
        return _conv_like(module, module.in_channels, out, has_bias)
    rank = kept_rank(min(out, row), level)
    if linear:
        return nn.Sequential(
            nn.Linear(module.in_features, rank, bias=False), nn.Linear(rank, out, bias=has_bias)
        )
    pointwise = _conv_like(
        module,
        rank,
        out,
        has_bias,
        kernel_size=1,
        stride=1,
        padding=0,
        dilation=1,
        groups=1,
        padding_mode="zeros",
    )
    return nn.Sequential(_conv_like(module, module.in_channels, rank, False), pointwise)


def _input_shapes(
    model: nn.Module, layers: list[tuple[str, nn.Module]], example_input: Any
) -> dict[str, Any]:
    seen: dict[str, tuple[torch.Size, torch.dtype]] = {}

    def record(name: str) -> Any:
        def hook(module: nn.Module, args: tuple) -> None:
            if name not in seen and args and isinstance(args[0], Tensor):
                seen[name] = (args[0].shape, args[0].dtype)

        return hook

    handles = [module.register_forward_pre_hook(record(name)) for name, module in layers]
    try:
        with _eval_mode([model]), torch.no_grad():
            call_module(model, example_input)
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name, _ in layers if name not in seen]
    if missing:
        raise ValueError(
            f"Layers {missing} did not run on `example_input`, so their latency cannot be measured. Leave them "
            "out of `layers`, or pass an input on which the model calls them."
        )
    return seen


def _latency(
    model: nn.Module,
    example_input: Any,
    scheme: str,
    levels: tuple[float, ...],
    layers: list[tuple[str, nn.Module]],
    repeats: int,
    threads: int | None,
) -> tuple[dict[str, list[float]], float]:
    shapes = _input_shapes(model, layers, example_input)
    per_round = max(1, math.ceil(repeats / _ROUNDS))
    whole = measure_latency(model, example_input, repeats=repeats, warmup=_WARMUP, threads=threads).median_ms
    generator = torch.Generator().manual_seed(0)
    cost: dict[str, list[float]] = {}
    for name, module in layers:
        shape, dtype = shapes[name]
        device = module.weight.device
        built = {
            str(index): _built(module, scheme, level).to(device=device, dtype=module.weight.dtype)
            for index, level in enumerate(levels)
        }
        x = torch.randn(shape, generator=generator).to(device=device, dtype=dtype)
        # The levels take turns, so that the machine's noise affects them alike.
        results = compare_latency(
            built, x, repeats=per_round, warmup=_WARMUP, threads=threads, rounds=_ROUNDS
        )
        timed = {key: result.median_ms for key, result in results.items()}
        cost[name] = [timed[str(index)] for index in range(len(levels))]
    return cost, max(0.0, whole - sum(values[0] for values in cost.values()))


def _units(
    model: nn.Module, example_input: Any, names: Iterable[str]
) -> tuple[StructuredPruner, list[ChannelUnit]]:
    """The channel groups named by ``names`` (one name per group), in that order."""
    if isinstance(names, str):
        raise TypeError(f"`layers={names!r}` must be a list of layer names, e.g. `layers=[{names!r}]`.")
    names = list(names)
    if not names:
        raise ValueError(
            "`layers` is empty: pass the names of the layers to cost (e.g. `list(sensitivity.loss)`)."
        )
    for name in names:
        check_layer(name, find_submodule(model, name, "layers"), "prune_structured")
    pruner, units = channel_units(model, example_input, names)
    by_name = {unit.name: unit for unit in units}
    for unit in units:
        twice = [layer for layer in unit.layers if layer != unit.name]
        if twice:
            raise ValueError(
                f"Layers {[unit.name, *twice]} share one channel group (their channels are removed together, e.g. "
                f"across a residual add): name it once, as {unit.name!r}, in `layers`."
            )
    missing = [name for name in names if name not in by_name]
    if missing:
        why = "; ".join(f"{root!r}: {reason}" for root, reason in pruner.skipped.items())
        raise ValueError(
            f"Layers {missing} have no channel group structured pruning can remove ({why or 'not traced'}). "
            "Leave them out of `layers`."
        )
    return pruner, [by_name[name] for name in names]


def _structured_counts(
    model: nn.Module, units: list[ChannelUnit], levels: tuple[float, ...], metric: str, example_input: Any
) -> CostTable:
    macs = count_macs_by_module(model, repeat_sample(example_input, 1)) if metric == "macs" else None
    terms, fixed = cost_terms(model, units, metric, macs)
    kept = {unit.name: [unit.kept(level) for level in levels] for unit in units}
    cost = {unit.name: [0.0] * len(levels) for unit in units}
    cross: list[tuple[float, dict[str, list[float]]]] = []
    for weight, powers in terms:
        factors = {name: [k**power for k in kept[name]] for name, power in powers.items()}
        if len(factors) == 1:
            ((name, values),) = factors.items()
            cost[name] = [c + weight * f for c, f in zip(cost[name], values, strict=True)]
        else:
            cross.append((weight, factors))
    return CostTable(metric, levels, cost, float(fixed), "prune_structured", cross)


def _slimmed(module: nn.Module, inputs: int, outputs: int, depthwise: bool) -> nn.Module:
    has_bias = getattr(module, "bias", None) is not None
    if isinstance(module, nn.Linear):
        return nn.Linear(inputs, outputs, bias=has_bias)
    if depthwise:
        return _conv_like(module, outputs, outputs, has_bias, groups=outputs)
    return _conv_like(module, inputs, outputs, has_bias)


def _structured_latency(
    model: nn.Module,
    example_input: Any,
    units: list[ChannelUnit],
    levels: tuple[float, ...],
    repeats: int,
    threads: int | None,
) -> CostTable:
    """Each Conv/Linear layer a group touches, timed with its outputs and (apart) its inputs at each level of
    their groups; a layer whose outputs and inputs follow two groups costs its dense time times both ratios."""
    named = dict(model.named_modules())
    roles: dict[str, dict[str, ChannelUnit]] = {}
    for unit in units:
        for piece in unit.group.slices:
            layer, _, param = piece.param.rpartition(".")
            module = named.get(layer)
            if param != "weight" or not isinstance(module, LAYER_TYPES):
                continue
            roles.setdefault(layer, {})["out" if piece.dim == 0 else "in"] = unit
    layers = [(name, named[name]) for name in roles]
    shapes = _input_shapes(model, layers, example_input)
    per_round = max(1, math.ceil(repeats / _ROUNDS))
    whole = measure_latency(model, example_input, repeats=repeats, warmup=_WARMUP, threads=threads).median_ms
    generator = torch.Generator().manual_seed(0)
    cost = {unit.name: [0.0] * len(levels) for unit in units}
    cross: list[tuple[float, dict[str, list[float]]]] = []
    dense_total = 0.0

    for name, module in layers:
        shape, dtype = shapes[name]
        x = torch.randn(shape, generator=generator).to(device=module.weight.device, dtype=dtype)
        dense, ratios = _layer_ratios(
            module, x, roles[name].get("out"), roles[name].get("in"), levels, per_round, threads
        )
        dense_total += dense
        if len(ratios) == 1:
            ((unit_name, values),) = ratios.items()
            cost[unit_name] = [c + dense * r for c, r in zip(cost[unit_name], values, strict=True)]
        else:
            cross.append((dense, ratios))
    return CostTable("latency", levels, cost, max(0.0, whole - dense_total), "prune_structured", cross)


def _layer_ratios(
    module: nn.Module,
    x: Tensor,
    out_unit: ChannelUnit | None,
    in_unit: ChannelUnit | None,
    levels: tuple[float, ...],
    repeats: int,
    threads: int | None,
) -> tuple[float, dict[str, list[float]]]:
    """The dense time of ``module`` on ``x``, and its time at each level of the group of its outputs and of its
    inputs (each with the other side whole) as ratios to the dense time."""
    depthwise = getattr(module, "groups", 1) != 1
    dim = -1 if isinstance(module, nn.Linear) else 1
    width, outputs = x.shape[dim], module.weight.shape[0]

    def time(variants: dict[str, tuple[int, int]]) -> dict[str, float]:
        # The levels take turns, so that the machine's noise affects them alike; an input of each width.
        found = {}
        for key, (inputs, outs) in variants.items():
            layer = _slimmed(module, inputs, outs, depthwise).to(device=x.device, dtype=module.weight.dtype)
            narrow = x.narrow(dim, 0, inputs)
            found[key] = compare_latency(
                {key: layer}, narrow, repeats=repeats, warmup=_WARMUP, threads=threads, rounds=_ROUNDS
            )[key].median_ms
        return found

    indices = [str(i) for i in range(len(levels))]
    ratios: dict[str, list[float]] = {}
    if out_unit is not None and (depthwise or in_unit is out_unit):
        # One group on both sides (depthwise, or a layer inside a residual stream): they shrink together.
        kept = [out_unit.kept(level) for level in levels]
        times = time({i: (round(width * k), round(outputs * k)) for i, k in zip(indices, kept, strict=True)})
        return times["0"], {out_unit.name: [times[i] / times["0"] for i in indices]}
    dense = None
    if out_unit is not None:
        built = {
            i: _slimmed(module, width, round(outputs * out_unit.kept(lv)), depthwise).to(
                device=x.device, dtype=module.weight.dtype
            )
            for i, lv in zip(indices, levels, strict=True)
        }
        results = compare_latency(built, x, repeats=repeats, warmup=_WARMUP, threads=threads, rounds=_ROUNDS)
        dense = results["0"].median_ms
        ratios[out_unit.name] = [results[i].median_ms / dense for i in indices]
    if in_unit is not None:
        times = time(
            {i: (round(width * in_unit.kept(lv)), outputs) for i, lv in zip(indices, levels, strict=True)}
        )
        dense = times["0"] if dense is None else dense
        ratios[in_unit.name] = [times[i] / times["0"] for i in indices]
    assert dense is not None
    return dense, ratios


def layer_costs(
    model: nn.Module,
    example_input: Any,
    scheme: str,
    levels: Sequence[float] | None,
    metric: str,
    layers: Iterable[str],
    repeats: int = 20,
    threads: int | None = None,
) -> CostTable:
    """The cost of each layer in ``layers`` at each level of ``scheme``, and of the rest of the model.

    What each metric counts (``fixed`` is the whole model's count minus the selected layers' uncompressed ones):

    - ``"params"``: the weight entries left after compression, plus the bias: ``prune``: ``(1 - amount) * n``;
      ``low_rank``: ``r * (out + in*k*k)``; ``quantize``: unchanged.
    - ``"macs"``: multiply-accumulates per sample (counted on the first sample of ``example_input``):
      ``prune`` scales them by the density, which is what a sparse kernel would do (dense kernels do all of
      them); ``low_rank``: ``r * (out + in*k*k)`` per output position; ``quantize``: unchanged.
    - ``"size"``: stored bytes: dense weights at their dtype (4 bytes for float32); ``prune``: the kept values
      plus a 1-bit mask over all entries (or dense, when that is smaller); ``low_rank``: the two factors
      dense; ``quantize``: ``bits / 8`` per weight plus one float32 scale per output channel. The rest of the
      model is its ``state_dict`` stored dense.
    - ``"latency"``: measured here, in milliseconds: each layer is rebuilt as it will run at each level (a
      k x k convolution with ``r`` outputs followed by a 1x1 one, ``Linear(in, r)`` followed by
      ``Linear(r, out)``), and timed under ``torch.inference_mode`` on the input shape it gets from
      ``example_input`` (the median of ``repeats`` calls after a warm-up, interleaved across its levels, with
      ``threads`` threads). ``fixed`` is the whole model's measured latency minus the layers' uncompressed
      ones, at least 0. Needs ``prune_structured`` or ``low_rank``.

    ``prune_structured`` (``example_input`` needed: the model is traced) prices channel groups, named as
    :func:`~lightning_compress.budget.sensitivity.measure_sensitivity` names them (one name per group): a
    group's level removes its producers' output rows, the BatchNorm entries and running statistics, and its
    consumers' input columns. ``params``, ``size`` and ``macs`` are exact (what the model costs once the
    channels are removed with ``round_to=1``): a layer between two groups costs its dense count times both
    kept fractions, a :attr:`CostTable.cross` term. ``latency``: every Conv/Linear layer a group reaches is
    timed with its outputs at each level of its own group and, apart, with its inputs at each level of its
    input group; a layer between two groups costs its dense time times both ratios (element-wise work, e.g.
    BatchNorm and activations, stays in ``fixed``, so the model measures somewhat faster than predicted).

    Args:
        model: the model.
        example_input: one batch of the model's input (tensor, tuple of positional or dict of keyword
            arguments); needed for ``"macs"`` and ``"latency"``.
        scheme: the scheme of ``levels``.
        levels: the levels (``None``: the scheme's defaults); the uncompressed one is added.
        metric: one of :data:`METRICS`.
        layers: the names of the layers (``prune_structured``: of the channel groups), e.g.
            ``list(sensitivity.loss)``.
        repeats: timed calls per layer and level (``"latency"``).
        threads: intra-op threads while timing (``None``: the current setting).

    Example::

        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
        >>> table = layer_costs(model, torch.zeros(2, 3, 8, 8), "low_rank", [0.5], "macs", ["0", "3"])
        >>> table.cost["0"], table.fixed  # 6x6 positions x 8 x 27 dense; rank 4 of 8: 6x6 x 4 x (8 + 27)
        ([7776.0, 5040.0], 0.0)
    """
    scheme = _checks.check_choice(scheme, "scheme", tuple(UNCOMPRESSED))
    metric = _checks.check_choice(metric, "metric", METRICS)
    levels = normalize_levels(scheme, levels)
    if metric == "latency" and scheme in ("prune", "quantize"):
        raise ValueError(
            f"`metric='latency'` with scheme={scheme!r}: dense CPU kernels do not get faster from "
            f"{'zeros' if scheme == 'prune' else 'fake-quantized weights'}, so every level would cost the same. "
            "Use scheme='prune_structured' or 'low_rank' for a latency budget (or budget 'macs', 'size')."
        )
    if metric in ("macs", "latency") and example_input is None:
        raise ValueError(
            f"`metric={metric!r}` runs the model: pass `example_input` (one batch of its input)."
        )
    if scheme == "prune_structured":
        _, units = _units(model, example_input, layers)
        if metric != "latency":
            return _structured_counts(model, units, levels, metric, example_input)
        _checks.check_int(repeats, "repeats", 1, hint="timed calls per layer and level, e.g. 20.")
        with torch.random.fork_rng(
            devices=_devices()
        ):  # building the timed layers draws their initial weights
            return _structured_latency(model, example_input, units, levels, repeats, threads)
    selected = _layers(model, layers, scheme)
    if metric == "params":
        cost = {name: [_params(module, scheme, lv) for lv in levels] for name, module in selected}
        fixed = count_parameters(model) - sum(values[0] for values in cost.values())
    elif metric == "size":
        cost = {name: [_size(module, scheme, lv) for lv in levels] for name, module in selected}
        fixed = raw_size_bytes(model) - sum(values[0] for values in cost.values())
    elif metric == "macs":
        macs = count_macs_by_module(model, repeat_sample(example_input, 1))
        cost = {
            name: [_macs(module, scheme, lv, float(macs.get(name, 0))) for lv in levels]
            for name, module in selected
        }
        fixed = macs[""] - sum(values[0] for values in cost.values())
    else:
        _checks.check_int(repeats, "repeats", 1, hint="timed calls per layer and level, e.g. 20.")
        with torch.random.fork_rng(
            devices=_devices()
        ):  # building the timed layers draws their initial weights
            cost, fixed = _latency(model, example_input, scheme, levels, selected, repeats, threads)
    return CostTable(metric=metric, levels=levels, cost=cost, fixed=float(fixed), scheme=scheme)


def _devices() -> list[int]:
    return [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
