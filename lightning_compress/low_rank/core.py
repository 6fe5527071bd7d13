"""Low-rank replacement of a whole model in plain torch: :class:`LowRankConfig` says what, :func:`low_rank_` does it.

:func:`low_rank_` selects the layers, counts each one's MACs on an example input, collects input statistics on
calibration batches (data-aware methods), plans the ranks (fixed, by energy, or within a budget shared by the
layers), and replaces every layer that gets smaller by its factorization, in place. It works on any
``nn.Module``; :class:`~lightning_compress.low_rank.LowRankReplacement` calls it during a fit. The two halves are
:func:`find_targets` (what can be checked before anything is factorized) and :func:`replace_targets`.

Example::

    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    >>> batches = [torch.randn(16, 32) for _ in range(4)]
    >>> result = low_rank_(model, LowRankConfig(rank=0.25), calibration=batches)
    >>> result.method, {name: layer["rank"] for name, layer in result.layers.items()}
    ('whitened', {'0': 8, '2': 16, '4': 1})
    >>> type(model[2]).__name__, result.params_before, result.params_after
    ('LowRankLinear', 6532, 3016)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn

from lightning_compress import _checks
from lightning_compress._inputs import call_module, check_default_input, first_input, to_device
from lightning_compress._positions import CalibrationMaskError, PositionFilter
from lightning_compress.low_rank.factorize import (
    FACTORIZED,
    METHODS,
    Decomposition,
    InputStatistics,
    Rank,
    allocate_budget,
    decompose,
    layer_features,
    layer_kind,
    skip_reason,
)
from lightning_compress.low_rank.restore import keep_trainability, set_submodule
from lightning_compress.selection import ModuleSelection, Selector
from lightning_compress.stats import _eval_mode, count_macs, repeat_sample

# Errors of calling a model on an input it does not take.
_CALL_ERRORS = (TypeError, ValueError, RuntimeError, IndexError, KeyError)


@dataclass(frozen=True)
class LowRankConfig:
    """What :func:`low_rank_` factorizes and how; checked when constructed.

    Ranks — give exactly one of:

    - ``rank``: an ``int`` (the same rank for every layer; per mode for Tucker, capped at each mode's size) or a
      ``float`` in ``(0, 1]`` (that fraction of each layer's full rank);
    - ``energy``: in ``(0, 1]``, per layer the smallest rank whose singular values hold that fraction of ``Σσ²``;
    - ``budget``: in ``(0, 1)``, the fraction of the selected layers' parameters (``budget_on="params"``) or MACs
      (``"macs"``) to keep; with ``allocation="energy"`` the ranks are chosen jointly, greedily by the relative
      energy each rank adds per unit of cost, with ``"uniform"`` every layer keeps that fraction of its own cost.

    ``layer_ranks`` (``{layer name: rank}``, an ``int`` or a ``float`` fraction as for ``rank``) sets the rank of
    the layers it names; the rule applies to the others (``budget``: shared among them), and may be left out when
    ``layer_ranks`` names every layer to factorize.

    A layer is only replaced when its replacement has fewer parameters *and* fewer MACs.

    Args:
        rank: fixed rank (``int``) or fraction of the full rank (``float`` in ``(0, 1]``).
        energy: energy threshold in ``(0, 1]``.
        budget: fraction in ``(0, 1)`` of the selected layers' cost to keep.
        budget_on: ``"params"`` or ``"macs"``: what ``budget`` counts.
        allocation: how ``budget`` is shared: ``"energy"`` (jointly, see
            :func:`~lightning_compress.low_rank.allocate_budget`) or ``"uniform"`` (every layer keeps at most
            ``budget`` of its own cost, at least rank 1).
        method: ``"auto"`` (``"whitened"`` with calibration batches, else ``"svd"``), ``"svd"``, ``"whitened"`` or
            ``"asvd"``.
        conv: ``"tucker"`` (1x1 → k×k core → 1x1), ``"channel"`` (k×k with r filters → 1x1) or
            ``"depthwise"`` (depthwise k×k with r filters per input channel → 1x1; ``rank`` is the depth
            multiplier, its full value ``min(out, k·k)``) for k×k convolutions; 1x1 convolutions are factorized
            like linear layers (left as they are by ``"depthwise"``).
        modules: layers to factorize (types and/or name patterns).
        exclude: layers to leave alone.
        min_params: leave out layers with fewer parameters.
        calibration_batches: how many calibration batches the input statistics use (data-aware methods).
        damping: whitening: added to the Gram matrix's diagonal relative to its mean; asvd: floor of the scales.
        activation_exponent: asvd: exponent of the mean absolute input.
        layer_ranks: ``{layer name: rank}`` (names as in ``model.named_modules()``, of selected layers): a fixed
            ``int`` rank or a ``float`` fraction in ``(0, 1]`` of the layer's full rank, ``ceil(fraction * full)``
            (``1`` is rank 1, ``1.0`` the full rank). A rank that makes the layer no smaller leaves it as it is.
        refine: ``conv="depthwise"`` only: after the SVD, refit each depthwise layer's 1x1 weights by least squares
            so that its outputs on the calibration inputs match the original layer's (needs calibration batches).
        calibration_mask: a function from the model input to a boolean ``(batch, positions)`` tensor, ``False``
            (or 0) at the positions the ``nn.Linear`` layers' input statistics leave out, e.g. padding: ``lambda x:
            x["attention_mask"]`` (as ``PruningConfig``'s); default: every position counts.

    Example::

        >>> str(LowRankConfig(budget=0.5, budget_on="macs", modules=nn.Linear).selection)
        '(modules=[Linear], exclude=[], min_params=0)'
        >>> LowRankConfig(rank=0)
        Traceback (most recent call last):
        ...
        ValueError: `rank=0` must be a positive int (a fixed rank) or a float in (0, 1] (a fraction of the full rank).
    """

    rank: int | float | None = None
    energy: float | None = None
    budget: float | None = None
    budget_on: str = "params"
    allocation: str = "energy"
    method: str = "auto"
    conv: str = "tucker"
    modules: Selector = (nn.Linear, nn.Conv2d)
    exclude: Selector = None
    min_params: int = 0
    calibration_batches: int = 8
    damping: float = 0.01
    activation_exponent: float = 0.5
    layer_ranks: Mapping[str, int | float] | None = None
    refine: bool = False
    calibration_mask: Callable[[Any], Any] | None = None
    selection: ModuleSelection = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _checks.check_low_rank_rule(self.rank, self.energy, self.budget, self.budget_on, self.allocation)
        object.__setattr__(self, "layer_ranks", _checks.check_layer_ranks(self.layer_ranks))
        _checks.check_choice(self.method, "method", ("auto", *METHODS))
        _checks.check_low_rank_choice(self.conv, "conv", _checks.CONV_FORMS)
        _checks.check_low_rank_refine(self.refine, self.conv)
        _checks.check_low_rank_count(self.calibration_batches, "calibration_batches")
        _checks.check_calibration_mask(self.calibration_mask)
        for name in ("damping", "activation_exponent"):
            object.__setattr__(self, name, _checks.check_low_rank_non_negative(getattr(self, name), name))
        object.__setattr__(self, "selection", ModuleSelection(self.modules, self.exclude, self.min_params))

    @property
    def rule(self) -> str | None:
        """The name of the rank rule given (``"rank"``, ``"energy"`` or ``"budget"``), ``None`` for none."""
        rules = (("rank", self.rank), ("energy", self.energy), ("budget", self.budget))
        return next((name for name, value in rules if value is not None), None)

    @property
    def setting(self) -> str:
        """The rank rule as given, e.g. ``"`rank=0.5`"`` (``"`layer_ranks`"`` without one)."""
        rule = self.rule
        return "`layer_ranks`" if rule is None else f"`{rule}={getattr(self, rule)!r}`"


def _same(value: Any) -> Any:
    return value


@dataclass(frozen=True)
class Collective:
    """The processes of a distributed run, as :func:`low_rank_` uses them (the defaults: a single process).

    Each process calibrates on its share of the batches (every ``world_size``-th, from its ``rank``); the
    statistics are summed with ``all_reduce``; rank 0's plan is sent to all with ``broadcast``, so every process
    builds the same layers. Only rank 0 warns.
    """

    rank: int = 0
    world_size: int = 1
    all_reduce: Callable[[torch.Tensor], torch.Tensor] = _same
    broadcast: Callable[[Any], Any] = _same

    @classmethod
    def of(cls, strategy: Any, rank: int, world_size: int) -> Collective:
        """The processes of a Lightning strategy (``trainer.strategy``, ``.global_rank``, ``.world_size``): sums
        with its ``reduce``, rank 0's values with its ``broadcast``."""
        return cls(
            rank,
            world_size,
            all_reduce=lambda tensor: strategy.reduce(tensor, reduce_op="sum"),
            broadcast=lambda value: strategy.broadcast(value, src=0),
        )


@dataclass
class LowRankTargets:
    """The layers :func:`find_targets` found to factorize, and what :func:`replace_targets` needs about them.

    ``positions``: per layer, its input and output positions per sample (rows for Linear, H·W for Conv2d), summed
    over its calls on ``example_input`` (one sample, on the model's device); ``method``: ``config.method`` with
    ``"auto"`` resolved.
    """

    layers: dict[str, nn.Module]
    skipped: dict[str, str]
    positions: dict[str, tuple[int, int]]
    method: str
    example_input: Any


@dataclass
class LowRankResult:
    """What :func:`low_rank_` did.

    ``layers``: ``{name: {"kind", "rank"}}`` of the replaced layers (a Tucker rank as ``[rank_in, rank_out]``; the
    depthwise form also has ``"in_channels"``, and its rank is the depth multiplier);
    ``records``: per replaced layer its rank, parameters and MACs before and after, and its relative weight and
    output errors; ``skipped``: ``{name: reason}`` of the selected layers left as they are; ``params_*`` and
    ``macs_*``: the whole model before and after (MACs of one sample); ``replaced``: ``{name: (old, new)}``.
    """

    layers: dict[str, dict[str, Any]]
    records: list[dict[str, Any]]
    skipped: dict[str, str]
    method: str
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    replaced: dict[str, tuple[nn.Module, nn.Module]] = field(default_factory=dict, repr=False)

    def totals(self, since: LowRankResult | None = None) -> dict[str, float]:
        """Whole-model ratios (before / after) and layer counts; ``since``: an earlier replacement of the same
        model, whose "before" the ratios compare with."""
        params_before = (since or self).params_before
        macs_before = (since or self).macs_before
        return {
            "params_ratio": params_before / self.params_after,
            "macs_ratio": macs_before / self.macs_after if self.macs_after else math.nan,
            "replaced_layers": float(len(self.layers)),
            "skipped_layers": float(len(self.skipped)),
        }

    def summary(self) -> str:
        """A table of the replaced and the skipped layers (see :func:`summary_table`)."""
        return summary_table(self.records, self.skipped, self.method, self.totals())

    def parameter_map(self) -> dict[nn.Parameter, list[nn.Parameter]]:
        """Each parameter of a replaced layer mapped to those of its factors that take its place (the weight to
        the factors' weights, the bias to the bias), e.g. to point an optimizer at the factors."""
        mapping: dict[nn.Parameter, list[nn.Parameter]] = {}
        for old, new in self.replaced.values():
            weights = [p for name, p in new.named_parameters() if not name.endswith("bias")]
            biases = [p for name, p in new.named_parameters() if name.endswith("bias")]
            for name, param in old.named_parameters():
                mapping[param] = biases if name == "bias" else weights
        return mapping


def low_rank_(
    model: nn.Module,
    config: LowRankConfig,
    calibration: Iterable[Any] | None = None,
    example_input: Any = None,
    *,
    calibration_input: Callable[[Any], Any] | None = None,
    collective: Collective | None = None,
) -> LowRankResult:
    """Replace the selected ``nn.Linear``/``nn.Conv2d`` layers of ``model`` by low-rank factorizations, in place.

    Each layer is factorized from its current weights (:func:`~lightning_compress.low_rank.decompose`) and kept
    where no rank makes it smaller, with the reason in ``skipped``. Layers whose weight another module shares are
    left as they are (with a warning), as are layers the forward pass does not call. Factors of a frozen weight
    stay frozen.

    Args:
        model: the model, changed in place.
        config: what to factorize and how.
        calibration: batches for the input statistics of the data-aware methods (the first
            ``config.calibration_batches`` are used), iterable more than once (a list, a ``DataLoader``); ``None``:
            ``method="auto"`` falls back to ``"svd"``.
        example_input: one sample as the model takes it (a tensor, a tuple of positional arguments or a dict of
            keyword arguments; cut to its first sample), to count each layer's MACs; default: the model input of
            the first calibration batch.
        calibration_input: maps a batch to the model's input; default: the batch itself if a tensor, else its
            first element.
        collective: the processes of a distributed run (see :class:`Collective`).

    Returns:
        What was replaced, with each layer's rank, errors, parameters and MACs.

    Example::

        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Conv2d(8, 32, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 36, 10))
        >>> result = low_rank_(model, LowRankConfig(energy=0.8, method="svd"), example_input=torch.zeros(1, 8, 6, 6))
        >>> result.records[0]["kind"], result.records[0]["rank"], result.skipped
        ('tucker', [7, 17], {})
        >>> round(result.totals()["params_ratio"], 2), round(result.totals()["macs_ratio"], 2)
        (1.26, 1.36)
    """
    if example_input is None and calibration is not None:
        batch = next(iter(calibration), None)
        example_input = None if batch is None else model_input(batch, calibration_input)
    if example_input is None:
        raise ValueError(
            "low_rank_ counts the MACs of each layer on an example input: pass `example_input` (one sample as the "
            "model takes it) or `calibration` batches."
        )
    targets = find_targets(
        model, config, example_input, calibration, calibration_input=calibration_input, collective=collective
    )
    return replace_targets(
        model, config, targets, calibration, calibration_input=calibration_input, collective=collective
    )


def find_targets(
    model: nn.Module,
    config: LowRankConfig,
    example_input: Any,
    calibration: Iterable[Any] | None = None,
    *,
    calibration_input: Callable[[Any], Any] | None = None,
    collective: Collective | None = None,
    example_source: str = "`example_input`",
    check_calibration: bool = False,
) -> LowRankTargets:
    """The layers of ``model`` that :func:`low_rank_` factorizes, and a check of everything that can be known
    before anything is factorized.

    Raises on an empty selection, no layer that can be factorized, an ``example_input`` the model cannot be called
    on (``example_source`` names it in the error), a data-aware ``method`` without ``calibration``, and, with
    ``check_calibration``, a first calibration batch the model cannot be called on. Warns (on rank 0 of
    ``collective``) about layers left as they are because their weight is shared.
    """
    collective = collective or Collective()
    if config.layer_ranks is not None:
        selected = [name for name, _ in config.selection.select(model)]
        _checks.check_layer_names(config.layer_ranks, selected, "layer_ranks", config.selection)
    layers, skipped = candidate_layers(model, config.selection, config.conv)
    tied = {name: reason for name, reason in skipped.items() if "tied weights" in reason}
    if tied and collective.rank == 0:
        warnings.warn(
            "Low-rank replacement leaves layers with tied weights as they are: "
            + "; ".join(f"{name!r}: {reason}" for name, reason in tied.items())
            + ". Factorizing one of them would untie the weights. Leave them out with `exclude=` to silence "
            "this warning.",
            UserWarning,
            stacklevel=2,
        )
    device = _device(model)
    example = to_device(repeat_sample(example_input, 1), device)
    positions = _positions(model, example, layers, example_source)
    for name in list(layers):
        if name not in positions:
            skipped[name] = "not called in the forward pass"
            del layers[name]
    if not layers:
        before = sum(isinstance(module, FACTORIZED) for module in model.modules())
        reasons = "; ".join(f"{n}: {r}" for n, r in skipped.items())
        raise ValueError(
            f"None of the layers selected by {config.selection} can be factorized"
            + (f": {reasons}" if reasons else "")
            + (f"; {before} layers were factorized before (an earlier fit or call)" if before else "")
            + ". Select Linear or Conv2d layers with `modules`"
            + (", or start from the model before its factorization." if before else ".")
        )
    unnamed = [name for name in layers if name not in (config.layer_ranks or {})]
    _checks.check_low_rank_rule_given(config.rule, config.layer_ranks, unnamed, budget=False)
    method = config.method
    if method == "auto":
        method = "whitened" if calibration is not None else "svd"
    if method != "svd" and calibration is None:
        raise ValueError(
            f"`method={method!r}` needs calibration batches (`calibration`); give some, or use `method='svd'`."
        )
    if config.refine and calibration is None:
        raise ValueError(
            "`refine=True` fits the 1x1 weights to the layers' outputs on calibration batches (`calibration`); "
            "give some, or leave `refine` out."
        )
    if check_calibration and (method != "svd" or config.refine):
        assert calibration is not None
        first = next(iter(calibration))
        with torch.no_grad(), _eval_mode([model]):
            _call_on_batch(model, first, calibration_input, device)
        if config.calibration_mask is not None:  # a mask that fits no layer input fails here too
            kinds = {name: layer_kind(module, config.conv) for name, module in layers.items()}
            _calibrate(model, layers, kinds, "svd", [first], config, calibration_input, Collective())
    return LowRankTargets(layers, skipped, positions, method, example)


def replace_targets(
    model: nn.Module,
    config: LowRankConfig,
    targets: LowRankTargets,
    calibration: Iterable[Any] | None = None,
    *,
    calibration_input: Callable[[Any], Any] | None = None,
    collective: Collective | None = None,
) -> LowRankResult:
    """Factorize the layers :func:`find_targets` found (from their current weights), in place."""
    collective = collective or Collective()
    method, positions = targets.method, targets.positions
    example = to_device(targets.example_input, _device(model))  # the model may have moved since
    params_before, macs_before = sum(p.numel() for p in model.parameters()), count_macs(model, example)
    kinds = {name: layer_kind(module, config.conv) for name, module in targets.layers.items()}
    stats: dict[str, InputStatistics] = {}
    if method != "svd" or config.refine:
        assert calibration is not None
        stats = _calibrate(
            model, targets.layers, kinds, method, calibration, config, calibration_input, collective
        )
    decompositions = {
        name: decompose(
            module,
            conv=config.conv,
            stats=stats.get(name),
            method=method,
            damping=config.damping,
            activation_exponent=config.activation_exponent,
            refine=config.refine and kinds[name] == "depthwise",
        )
        for name, module in targets.layers.items()
    }
    plan = collective.broadcast(plan_ranks(config, decompositions, positions))
    skipped = dict(targets.skipped)
    layers: dict[str, dict[str, Any]] = {}
    records: list[dict[str, Any]] = []
    replaced: dict[str, tuple[nn.Module, nn.Module]] = {}
    for name, decision in plan.items():
        if isinstance(decision, str):
            skipped[name] = decision
            continue
        decomposition = decompositions[name]
        replacement = decomposition.build(decision)
        old = model.get_submodule(name)
        keep_trainability(old, replacement)
        weight_error, output_error = decomposition.errors(replacement)
        replaced[name] = (old, replacement)
        set_submodule(model, name, replacement)
        rank = list(decision) if isinstance(decision, tuple) else decision
        layers[name] = {"kind": decomposition.kind, "rank": rank}
        if decomposition.kind == "depthwise":  # the checkpoint's shapes hold in_channels · rank
            layers[name]["in_channels"] = old.in_channels
        records.append(
            {
                "name": name,
                "kind": decomposition.kind,
                "rank": rank,
                "params_before": decomposition.params(),
                "params_after": decomposition.params(decision),
                "macs_before": decomposition.macs(positions[name]),
                "macs_after": decomposition.macs(positions[name], decision),
                "weight_error": weight_error,
                "output_error": output_error,
            }
        )
    if not replaced and collective.rank == 0:
        reasons = "; ".join(f"{name}: {plan[name]}" for name in plan)
        before = sum(isinstance(module, FACTORIZED) for module in model.modules())
        earlier = (
            f" {before} layers were factorized before (an earlier fit or call) and stay as they are."
            * (before > 0)
        )
        warnings.warn(
            f"Low-rank replacement replaced no layer: at {config.setting} none of the {len(plan)} selected layers "
            f"would get smaller ({reasons}).{earlier} Ask for less (a smaller `rank`/`energy`/`budget`), or select "
            "larger layers with `modules`.",
            UserWarning,
            stacklevel=2,
        )
    return LowRankResult(
        layers=layers,
        records=records,
        skipped=skipped,
        method=method,
        params_before=params_before,
        params_after=sum(p.numel() for p in model.parameters()),
        macs_before=macs_before,
        macs_after=count_macs(model, example),
        replaced=replaced,
    )


def candidate_layers(
    model: nn.Module, selection: ModuleSelection, conv: str = "tucker"
) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """The selected layers that can be factorized (in the form ``conv`` for k×k convolutions), and
    ``{name: reason}`` of those that cannot.

    Layers already factorized (and the factors inside them) are not selected again; a layer whose weight another
    module holds is left out (tied weights).
    """
    selected = selection.select(model)
    users: dict[int, list[str]] = {}
    for module_name, module in model.named_modules():
        for param in module.parameters(recurse=False):
            users.setdefault(id(param), []).append(module_name)
    factorized = [name for name, module in model.named_modules() if isinstance(module, FACTORIZED)]
    layers: dict[str, nn.Module] = {}
    skipped: dict[str, str] = {}
    for name, module in selected:
        if isinstance(module, FACTORIZED) or any(name.startswith(f"{f}.") for f in factorized):
            continue
        reason = skip_reason(module, conv)
        shared = [other for other in users.get(id(module.weight), []) if other != name]
        if reason is None and shared:
            reason = f"its weight is shared with {', '.join(map(repr, shared))} (tied weights)"
        if reason is None:
            layers[name] = module
        else:
            skipped[name] = reason
    return layers, skipped


def layers_outside(model: nn.Module, config: LowRankConfig, params: Iterable[torch.Tensor]) -> list[str]:
    """The layers :func:`candidate_layers` selects for ``config`` that have a trainable parameter not among
    ``params``."""
    held = {id(p) for p in params}
    return [
        name
        for name, module in candidate_layers(model, config.selection, config.conv)[0].items()
        if any(p.requires_grad and id(p) not in held for p in module.parameters())
    ]


def layer_metrics(record: dict[str, Any]) -> dict[str, float]:
    """The logged values of one replaced layer's record: ``rank`` (Tucker: ``rank_in``, ``rank_out``; depthwise:
    ``depth_multiplier``), ``weight_error``, ``output_error`` (with calibration data), ``params_ratio`` and
    ``macs_ratio``."""
    values: dict[str, float] = {}
    if isinstance(record["rank"], list):
        values["rank_in"], values["rank_out"] = map(float, record["rank"])
    elif record["kind"] == "depthwise":
        values["depth_multiplier"] = float(record["rank"])
    else:
        values["rank"] = float(record["rank"])
    values["weight_error"] = record["weight_error"]
    if record["output_error"] is not None:
        values["output_error"] = record["output_error"]
    values["params_ratio"] = record["params_before"] / record["params_after"]
    values["macs_ratio"] = record["macs_before"] / max(record["macs_after"], 1)
    return values


def _fixed_rank(decomposition: Decomposition, rank: int | float, name: str, argument: str) -> Rank:
    """The rank an ``int`` (capped per mode for Tucker) or a ``float`` fraction gives layer ``name``; ``argument``
    names the value in errors. A depth multiplier above the full one is kept, for :func:`plan_ranks` to leave the
    layer as it is (a replacement that large is never smaller)."""
    if isinstance(rank, float):
        return decomposition.rank_for_fraction(rank)
    if decomposition.kind == "depthwise":
        return rank
    try:
        return decomposition.clamp_rank(rank)
    except ValueError as err:
        raise ValueError(
            f"`{argument}={rank}` is too large for layer {name!r}: {err} Use a smaller rank, a fraction such as "
            "0.5, or exclude the layer."
        ) from None


def plan_ranks(
    config: LowRankConfig, decompositions: dict[str, Decomposition], positions: dict[str, tuple[int, int]]
) -> dict[str, Rank | str]:
    """Per layer the rank ``config`` gives (``layer_ranks``, else its rule), or the reason it stays as it is."""
    plan: dict[str, Rank | str] = {}

    def saves(decomposition: Decomposition, rank: Rank, where: tuple[int, int]) -> bool:
        return decomposition.params(rank) < decomposition.params() and decomposition.macs(
            where, rank
        ) < decomposition.macs(where)

    def decide(name: str, rank: Rank) -> Rank | str:
        decomposition, where = decompositions[name], positions[name]
        if decomposition.kind == "depthwise" and rank > decomposition.full_rank:  # type: ignore[operator]
            return (
                f"depth multiplier {rank} is above {decomposition.full_rank} = min(out, k·k), the filters per "
                "input channel that reproduce the layer exactly with more parameters than it has"
            )
        if saves(decomposition, rank, where):
            return rank
        return (
            f"rank {rank} would keep {decomposition.params(rank):,} parameters and "
            f"{decomposition.macs(where, rank):,} MACs, not fewer than the "
            f"{decomposition.params():,} and {decomposition.macs(where):,} of the layer"
        )

    order, named = list(decompositions), config.layer_ranks or {}
    for name in [n for n in order if n in named]:
        plan[name] = decide(
            name, _fixed_rank(decompositions[name], named[name], name, f"layer_ranks[{name!r}]")
        )
    decompositions = {name: d for name, d in decompositions.items() if name not in named}
    if config.budget is not None:
        options: dict[str, list[tuple[float, float]]] = {}
        dense: dict[str, float] = {}
        chains: dict[str, list[Rank]] = {}

        def cost(decomposition: Decomposition, rank: Rank | None, where: tuple[int, int]) -> float:
            if config.budget_on == "params":
                return float(decomposition.params(rank))
            return float(decomposition.macs(where, rank))

        for name, decomposition in decompositions.items():
            where = positions[name]
            chain = [r for r in decomposition.chain() if saves(decomposition, r, where)]
            if not chain:
                plan[name] = "no rank has fewer parameters and MACs than the layer"
                continue
            chains[name] = chain
            options[name] = [
                (cost(decomposition, r, where), decomposition.relative_error_estimate(r)) for r in chain
            ]
            dense[name] = cost(decomposition, None, where)
        if options and config.allocation == "uniform":
            for name, opts in options.items():
                fitting = [i for i, (c, _) in enumerate(opts) if c <= config.budget * dense[name]]
                plan[name] = chains[name][fitting[-1] if fitting else 0]
        elif options:
            for name, index in allocate_budget(options, dense, config.budget).items():
                plan[name] = "the budget leaves it dense" if index is None else chains[name][index]
        return {name: plan[name] for name in order}

    _checks.check_low_rank_rule_given(config.rule, config.layer_ranks, list(decompositions), budget=False)
    for name, decomposition in decompositions.items():
        if config.rank is not None:
            rank = _fixed_rank(decomposition, config.rank, name, "rank")
        else:
            assert config.energy is not None
            rank = decomposition.rank_for_energy(config.energy)
        plan[name] = decide(name, rank)
    return {name: plan[name] for name in order}


def summary_table(
    records: list[dict[str, Any]], skipped: dict[str, str], method: str | None, totals: dict[str, float]
) -> str:
    """A table of the replaced layers (form, rank, parameter and MAC ratios, errors) and the skipped ones."""
    rows = [("layer", "form", "rank", "params", "MACs", "weight err", "output err")]
    for r in records:
        rows.append(
            (
                r["name"],
                r["kind"],
                "x".join(map(str, r["rank"])) if isinstance(r["rank"], list) else str(r["rank"]),
                f"{r['params_before'] / r['params_after']:.2f}x",
                f"{r['macs_before'] / max(r['macs_after'], 1):.2f}x",
                f"{r['weight_error']:.3f}",
                "-" if r["output_error"] is None else f"{r['output_error']:.3f}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        f"Low-rank replacement ({method}): whole model {totals.get('params_ratio', 1.0):.2f}x fewer "
        f"parameters, {totals.get('macs_ratio', 1.0):.2f}x fewer MACs"
    ]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines += [f"left as is: {name}: {reason}" for name, reason in skipped.items()]
    return "\n".join(lines)


def model_input(batch: Any, calibration_input: Callable[[Any], Any] | None = None) -> Any:
    """The model input of a batch: ``calibration_input(batch)``, or by default the batch itself if a tensor, else
    its first element (a dict: its ``"input"``/``"inputs"``/``"x"``/``"input_ids"``/``"pixel_values"`` entry).

    Example::

        >>> model_input((torch.ones(2), torch.zeros(2)))
        tensor([1., 1.])
    """
    try:
        return calibration_input(batch) if calibration_input is not None else first_input(batch)
    except Exception as err:
        raise calibration_error(err, calibration_input is not None) from err


def calibration_error(err: Exception, given: bool) -> Exception:
    """An error that names ``calibration_input`` for a failure to call the model on a calibration batch."""
    fix = (
        "Check that `calibration_input` returns what the model's forward takes"
        if given
        else "By default the model input is the batch's first element; pass `calibration_input`"
    )
    error = TypeError if isinstance(err, TypeError) else ValueError
    return error(
        "Low-rank replacement runs the model on the calibration (training) batches to calibrate, and calling it "
        f"on one failed with {type(err).__name__}: {err}. {fix}, a function from a training batch to the model's "
        "input: a tensor, a tuple of positional arguments or a dict of keyword arguments, e.g. "
        "`calibration_input=lambda batch: (batch[0], batch[1])` or "
        "`calibration_input=lambda batch: {'x': batch['x'], 'mask': batch['mask']}`."
    )


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _call_on_batch(
    model: nn.Module,
    batch: Any,
    calibration_input: Callable[[Any], Any] | None,
    device: torch.device,
    positions: PositionFilter | None = None,
) -> None:
    """Call ``model`` on the model input of ``batch``, through ``positions`` (its first call probes the layouts); a
    dict batch whose default input leaves out an argument of the forward is refused (:func:`check_default_input`)."""
    if calibration_input is None:
        check_default_input(model, batch)
    inputs = to_device(model_input(batch, calibration_input), device)
    try:
        (positions or PositionFilter(None)).run(partial(call_module, model), inputs)
    except CalibrationMaskError:
        raise
    except _CALL_ERRORS as err:
        raise calibration_error(err, calibration_input is not None) from err


def _calibrate(
    model: nn.Module,
    layers: dict[str, nn.Module],
    kinds: dict[str, str],
    method: str,
    calibration: Iterable[Any],
    config: LowRankConfig,
    calibration_input: Callable[[Any], Any] | None,
    collective: Collective,
) -> dict[str, InputStatistics]:
    """Input statistics of every layer over the calibration batches, summed over the processes."""
    device = _device(model)
    stats: dict[str, InputStatistics] = {}
    # The refit of the depthwise form needs the Gram matrix whatever the method.
    grams = {name: method == "whitened" or (config.refine and kinds[name] == "depthwise") for name in layers}
    for name, module in layers.items():
        features = module.weight.shape[1] if kinds[name] == "tucker" else module.weight[0].numel()
        zeros = {"dtype": torch.float64, "device": device}
        stats[name] = InputStatistics(
            gram=torch.zeros(features, features, **zeros) if grams[name] else None,
            abs_sum=torch.zeros(features, **zeros),
        )

    # Linear inputs count at the positions `config.calibration_mask` keeps (convolutions' inputs whole).
    positions = PositionFilter(config.calibration_mask)

    def hook(name: str) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple) -> None:
            x = positions.rows(name, args[0]) if kinds[name] == "linear" else positions.whole(args[0])
            if x is not None:
                stats[name].update(layer_features(module, x, kinds[name]), gram=grams[name])

        return record

    handles = [module.register_forward_pre_hook(hook(name)) for name, module in layers.items()]
    try:
        with torch.no_grad(), _eval_mode([model]):
            for index, batch in enumerate(calibration):
                if index >= config.calibration_batches:
                    break
                # Each process takes its share of the batches; the sums are all-reduced below.
                if index % collective.world_size == collective.rank:
                    _call_on_batch(model, batch, calibration_input, device, positions)
    finally:
        for handle in handles:
            handle.remove()
    count = torch.tensor([stats[name].count for name in layers], dtype=torch.float64, device=device)
    count = collective.all_reduce(count)
    for index, name in enumerate(layers):
        s = stats[name]
        s.count = int(count[index])
        s.abs_sum = collective.all_reduce(s.abs_sum)  # type: ignore[arg-type]
        if s.gram is not None:
            s.gram = collective.all_reduce(s.gram)
    return stats


def _positions(
    model: nn.Module, example: Any, layers: dict[str, nn.Module], source: str
) -> dict[str, tuple[int, int]]:
    """Input and output positions per sample of every layer (rows for Linear, H·W for Conv2d), summed over calls."""
    positions: dict[str, tuple[int, int]] = {}

    def hook(name: str) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            x = args[0]
            if isinstance(module, nn.Linear):
                rows = x.numel() // module.in_features
                seen = (rows, rows)
            else:
                seen = (x.shape[-2] * x.shape[-1], output.shape[-2] * output.shape[-1])
            before = positions.get(name, (0, 0))
            positions[name] = (before[0] + seen[0], before[1] + seen[1])

        return record

    handles = [module.register_forward_hook(hook(name)) for name, module in layers.items()]
    try:
        with torch.no_grad(), _eval_mode([model]):
            call_module(model, example)
    except _CALL_ERRORS as err:
        error = TypeError if isinstance(err, TypeError) else ValueError
        raise error(
            f"Low-rank replacement counts each layer's MACs on one sample, but the model cannot be called on "
            f"{source}: {type(err).__name__}: {err}. Give one sample as the model takes it: a tensor, a tuple of "
            "positional arguments or a dict of keyword arguments."
        ) from err
    finally:
        for handle in handles:
            handle.remove()
    return positions
