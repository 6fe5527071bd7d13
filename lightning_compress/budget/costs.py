"""Per-layer cost tables: what each selected layer costs at each compression level, and what the rest costs.

A :class:`CostTable` holds, for one metric (parameters, MACs, stored bytes or measured latency), the cost of each
layer at each level of a scheme (see :mod:`~lightning_compress.budget.sensitivity` for the schemes and levels)
and the ``fixed`` cost of everything the selected layers do not account for, so that ``fixed`` plus the layers'
uncompressed costs is the whole model's cost. :func:`~lightning_compress.budget.allocation.allocate` reads it to
meet a budget.

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
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_compress import _checks
from lightning_compress._inputs import call_module
from lightning_compress.budget.sensitivity import (
    UNCOMPRESSED,
    check_layer,
    kept_rank,
    level_label,
    normalize_levels,
    pruned_count,
    removed_channels,
)
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

    Example::

        >>> table = CostTable("size", (32.0, 8.0), {"fc": [400.0, 116.0]}, fixed=40.0, scheme="quantize")
        >>> table.full(), table.total({"fc": 8})
        (440.0, 156.0)
    """

    metric: str
    levels: tuple[float, ...]
    cost: dict[str, list[float]]
    fixed: float
    scheme: str | None = None

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
        return self.fixed + sum(
            costs[self.level_index(levels_by_layer[name])] if name in levels_by_layer else costs[0]
            for name, costs in self.cost.items()
        )

    def full(self) -> float:
        """The whole model's cost uncompressed."""
        return self.fixed + sum(costs[0] for costs in self.cost.values())

    def cheapest(self) -> float:
        """The whole model's cost with every layer at its cheapest level."""
        return self.fixed + sum(min(costs) for costs in self.cost.values())

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable contents (:meth:`from_dict` reads them back)."""
        return {
            "metric": self.metric,
            "scheme": self.scheme,
            "levels": list(self.levels),
            "cost": {name: list(values) for name, values in self.cost.items()},
            "fixed": self.fixed,
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
        )

    def format_table(self) -> str:
        """The costs as a fixed-width text table, one line per layer, the fixed part and the total below."""
        labels = [level_label(self.scheme, lv) if self.scheme else f"{lv:g}" for lv in self.levels]
        width = max([5, *(len(name) for name in self.cost)])
        cells = {name: [f"{value:.4g}" for value in values] for name, values in self.cost.items()}
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
    if scheme == "prune_structured":
        kept = out - removed_channels(out, level)
        return float(kept * row + (kept if bias else 0))
    rank = kept_rank(min(out, row), level)
    return float(rank * (out + row) + bias)


def _macs(module: nn.Module, scheme: str, level: float, dense: float) -> float:
    out, row, numel, _ = _shape(module)
    if level == UNCOMPRESSED[scheme] or scheme == "quantize":
        return dense
    if scheme == "prune":
        return dense * (numel - pruned_count(numel, level)) / numel
    if scheme == "prune_structured":
        return dense * (out - removed_channels(out, level)) / out
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
    if scheme == "prune_structured":
        kept = out - removed_channels(out, level)
        return float(kept * row * value + (kept * module.bias.element_size() if bias else 0))
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
    """The layer as it runs at ``level``: fewer output channels, or two factors."""
    out, row, _, _ = _shape(module)
    has_bias = getattr(module, "bias", None) is not None
    linear = isinstance(module, nn.Linear)
    if level == UNCOMPRESSED[scheme]:
        if linear:
            return nn.Linear(module.in_features, out, bias=has_bias)
        return _conv_like(module, module.in_channels, out, has_bias)
    if scheme == "prune_structured":
        kept = out - removed_channels(out, level)
        if linear:
            return nn.Linear(module.in_features, kept, bias=has_bias)
        if module.groups != 1:  # depthwise: the channels it reads go with the ones it writes
            return _conv_like(module, kept, kept, has_bias, groups=kept)
        return _conv_like(module, module.in_channels, kept, has_bias)
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
        if scheme == "prune_structured" and getattr(module, "groups", 1) != 1:
            # Depthwise: it reads as many channels as it writes, so each level gets an input of its own.
            timed = {
                key: compare_latency(
                    {key: layer},
                    x[:, : layer.in_channels],
                    repeats=per_round,
                    warmup=_WARMUP,
                    threads=threads,
                    rounds=_ROUNDS,
                )[key].median_ms
                for key, layer in built.items()
            }
        else:  # the levels take turns, so that the machine's noise affects them alike
            results = compare_latency(
                built, x, repeats=per_round, warmup=_WARMUP, threads=threads, rounds=_ROUNDS
            )
            timed = {key: result.median_ms for key, result in results.items()}
        cost[name] = [timed[str(index)] for index in range(len(levels))]
    return cost, max(0.0, whole - sum(values[0] for values in cost.values()))


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
      ``prune_structured``: the kept rows of this layer (the next layer's inputs are not counted here);
      ``low_rank``: ``r * (out + in*k*k)``; ``quantize``: unchanged.
    - ``"macs"``: multiply-accumulates per sample (counted on the first sample of ``example_input``):
      ``prune`` scales them by the density, which is what a sparse kernel would do (dense kernels do all of
      them); ``prune_structured`` by the fraction of rows kept; ``low_rank``: ``r * (out + in*k*k)`` per output
      position; ``quantize``: unchanged.
    - ``"size"``: stored bytes: dense weights at their dtype (4 bytes for float32); ``prune``: the kept values
      plus a 1-bit mask over all entries (or dense, when that is smaller); ``prune_structured``: the kept rows
      dense; ``low_rank``: the two factors dense; ``quantize``: ``bits / 8`` per weight plus one float32 scale
      per output channel. The rest of the model is its ``state_dict`` stored dense.
    - ``"latency"``: measured here, in milliseconds: each layer is rebuilt as it will run at each level (fewer
      output channels; or a k x k convolution with ``r`` outputs followed by a 1x1 one, ``Linear(in, r)``
      followed by ``Linear(r, out)``), and timed under ``torch.inference_mode`` on the input shape it gets
      from ``example_input`` (the median of ``repeats`` calls after a warm-up, interleaved across its levels,
      with ``threads`` threads). ``fixed`` is the whole model's measured latency minus the layers' uncompressed
      ones, at least 0. Needs ``prune_structured`` or ``low_rank``.

    Args:
        model: the model.
        example_input: one batch of the model's input (tensor, tuple of positional or dict of keyword
            arguments); needed for ``"macs"`` and ``"latency"``.
        scheme: the scheme of ``levels``.
        levels: the levels (``None``: the scheme's defaults); the uncompressed one is added.
        metric: one of :data:`METRICS`.
        layers: the names of the layers (e.g. ``list(sensitivity.loss)``).
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
        devices = (
            [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
        )
        with torch.random.fork_rng(devices=devices):  # building the timed layers draws their initial weights
            cost, fixed = _latency(model, example_input, scheme, levels, selected, repeats, threads)
    return CostTable(metric=metric, levels=levels, cost=cost, fixed=float(fixed), scheme=scheme)
