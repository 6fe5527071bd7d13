"""Pruning on a plain ``nn.Module``, without a Trainer: what to prune, the masks and channel plan of one model, one verb.

- :class:`PruningConfig` says *what*: the mode (unstructured, N:M, structured channels and attention heads),
  the criterion, the scope, the layers;
- :class:`PruningPlan` holds *where one model stands*: the selected weights (or channel groups), the masks
  that prune them and, for structured pruning, the removed channels and heads. It computes masks for an
  amount (masks only grow), applies them, keeps them exact through optimizer steps, measures the result and
  finally makes the pruning permanent (:meth:`PruningPlan.finalize`: drop the masks, or remove the channels);
- :func:`prune_` prunes a model in one shot (``criterion="wanda"``/``"sparsegpt"``: from the layers' inputs on
  ``calibration`` inputs, see :mod:`lightning_compress.pruning.calibration`).

``GradualPruning`` is a schedule and a Trainer lifecycle around a :class:`PruningPlan`.

Example::

    >>> import torch
    >>> from torch import nn
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    >>> plan = prune_(model, PruningConfig(amount=0.75))
    >>> float((model[0].weight == 0).float().mean()), float((model[2].weight == 0).float().mean())
    (0.75, 0.75)
    >>> plan = prune_(model, PruningConfig(amount=0.5, mode="structured", round_to=1), example_input=torch.randn(1, 16))
    >>> model[0].out_features, model[2].in_features, plan.max_abs_diff < 1e-6
    (16, 16, True)
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lightning_compress import _checks
from lightning_compress._checkpoints import HINT_PREFIX, configure_fresh_model, drop_checkpoint_hints  # noqa: F401  (HINT_PREFIX re-exported)
from lightning_compress._inputs import call_module, detach_input, to_device
from lightning_compress.pruning.calibration import (
    CALIBRATED_CRITERIA,
    LAYER_TYPES,
    ColumnStatistics,
    attention_inputs,
    calibration_inputs,
    collect_statistics,
    sparsegpt_prune,
    wanda_mask,
)
from lightning_compress.pruning.masks import (
    CRITERIA,
    apply_masks,
    computed_weight,
    nm_masks,
    pack_mask,
    unpack_mask,
    unstructured_masks,
    validate_nm,
)
from lightning_compress.schedules import Point, Schedule, ScheduleFn
from lightning_compress.selection import ModuleSelection, Selector
from lightning_compress.stats import count_macs, count_macs_by_module

MODES = ("unstructured", "structured", "N:M")
# Optimizer state that optimizers take the square root of (Adam, AdamW, AMSGrad, RMSprop, Adagrad). For pruned
# entries it is parked at 1.0 rather than 0.0: the update stays exactly zero (the first moment and the gradient
# are zero), but the CPU's vectorized sqrt is about 20x slower on zeros than on normal floats, and a value that
# decays toward zero turns denormal, slower still. Parking keeps the step of a 90% sparse model as fast as dense.
_SECOND_MOMENTS = frozenset({"exp_avg_sq", "max_exp_avg_sq", "square_avg", "sum"})
# Parked second moments decay by the optimizer's beta2 per step; refreshed this often (optimizer steps) they stay
# normal for beta2 >= 0.5 (see `PruningPlan.park_optimizer_state`).
PARK_EVERY = 100
# Samples of the last training batch on which removing the pruned channels is checked (besides the example input).
CHECK_SAMPLES = 4
# Saved in the `state_dict` of a checkpoint written after channels were removed. Loading such a checkpoint into a
# freshly built (unpruned) model fails on the shapes, and Lightning's `load_from_checkpoint` cannot be changed to
# rebuild them; strict loading lists unexpected keys first, so this key tells the user what to use instead.
PRUNED_CHECKPOINT_KEY = (
    "lightning_compress: channels were removed by GradualPruning(mode='structured'); load this checkpoint with "
    "`lightning_compress.pruning.gradual.load_pruned_checkpoint(YourModule(...), path)`, not load_from_checkpoint"
)


@dataclass(frozen=True)
class PruningConfig:
    """What to prune: checked when built, so a bad value fails before any model is touched.

    Args:
        amount: the fraction removed, in ``[0, 1)``: of the selected weights (unstructured), of the channels and
            attention heads of the selected layers (structured). ``mode="N:M"`` fixes it at ``1 - N/M``: leave it
            unset (``None``).
        mode: ``"unstructured"``, ``"structured"`` or N:M numbers such as ``"2:4"``.
        criterion: ``"l1"``, ``"l2"``, ``"random"``; unstructured and N:M also ``"wanda"`` (``|w| · ‖x‖``, ranked
            within each output row) and ``"sparsegpt"`` (prunes so that each layer's outputs change least, and
            updates the kept weights), which need calibration inputs (:meth:`PruningPlan.calibrate`); structured
            also ``"bn_scale"`` and ``"taylor"`` (needs gradients).
        scope: ``"layer"`` (every layer loses ``amount``) or ``"global"`` (one ranking across layers; not with
            ``"wanda"``/``"sparsegpt"``).
        max_layer_amount: unstructured ``scope="global"`` only: the most any one layer may lose, in
            ``[amount, 1]`` (``None``: no limit).
        modules: layers to prune (types and/or name patterns); structured: the layers whose output channels go.
        exclude: layers to leave alone.
        min_params: leave out layers with fewer parameters.
        round_to: structured: keep channel counts a multiple of this (1 disables rounding).
        seed: seed of the random criterion.
        layer_amounts: ``{layer name: amount}`` (names as in ``model.named_modules()``, of selected layers): the
            fraction each named layer loses, instead of ``amount`` (which the layers not named keep; ``amount``
            may be left unset when every selected layer is named). Unstructured ``scope="layer"``: of the layer's
            weight, ``round(amount * numel)`` entries; structured: of the layer's output channels,
            ``floor(amount * channels)``, then rounded by ``round_to`` (layers coupled by a residual add share
            their channels and lose the smallest of their amounts). Not with ``scope="global"`` nor N:M.
        calibration_batches: ``"wanda"``/``"sparsegpt"``: how many calibration inputs each decision runs the
            model on.
        calibration_input: ``"wanda"``/``"sparsegpt"``: a function from a calibration batch to the model's input (a
            tensor, a tuple of positional arguments or a dict of keyword arguments), e.g. ``lambda b:
            {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}``; default: :func:`prune_` runs
            the model on each item as it is, ``GradualPruning`` on a training batch's first element.
        calibration_mask: ``"wanda"``/``"sparsegpt"``: a function from the model input to a boolean ``(batch,
            positions)`` tensor, ``False`` (or 0) where a position is left out of the layers' input statistics,
            e.g. padding: ``lambda x: x["attention_mask"]``, applied to each layer input as it holds the positions
            (batch or positions first, or flattened; see
            :func:`~lightning_compress.pruning.calibration.collect_statistics`); default: every position counts.

    Example::

        >>> PruningConfig(mode="2:4").amount, PruningConfig(mode="2:4").kind, PruningConfig(mode="2:4").nm
        (0.5, 'N:M', (2, 4))
        >>> PruningConfig(layer_amounts={"0": 0.5, "2": 0.9}).layer_amounts
        {'0': 0.5, '2': 0.9}
        >>> PruningConfig(amount=0.5, mode="structured", criterion="taylor").changes_structure
        True
        >>> PruningConfig(amount=0.5, criterion="taylor")
        Traceback (most recent call last):
        ...
        ValueError: Unknown `criterion='taylor'`. Use one of 'l1', 'l2', 'random', 'wanda', 'sparsegpt'.
        >>> PruningConfig(mode="2:4", criterion="sparsegpt").calibrated
        True
    """

    amount: float | None = None
    mode: str = "unstructured"
    criterion: str = "l1"
    scope: str = "layer"
    max_layer_amount: float | None = None
    modules: Selector = (nn.Conv2d, nn.Linear)
    exclude: Selector = None
    min_params: int = 0
    round_to: int = 8
    seed: int = 0
    layer_amounts: Mapping[str, float] | None = None
    calibration_batches: int = 8
    calibration_input: Callable[[Any], Any] | None = None
    calibration_mask: Callable[[Any], Any] | None = None
    kind: str = field(init=False, repr=False, compare=False)
    nm: tuple[int, int] | None = field(init=False, repr=False, compare=False)
    selection: ModuleSelection = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        from lightning_compress.pruning.structured import IMPORTANCES

        kind, amount, nm = _checks.check_pruning_mode(self.mode, self.amount)
        criteria = IMPORTANCES if kind == "structured" else CRITERIA + CALIBRATED_CRITERIA
        _checks.check_pruning_method(self.mode, kind, self.criterion, self.scope, criteria)
        for name, value in (("kind", kind), ("amount", amount), ("nm", nm)):
            object.__setattr__(self, name, value)
        object.__setattr__(
            self,
            "max_layer_amount",
            _checks.check_max_layer_amount(self.max_layer_amount, amount, kind, self.scope),
        )
        _checks.check_round_to(self.round_to)
        _checks.check_int(self.seed, "seed", hint="the seed of the random criterion.")
        _checks.check_calibration_batches(self.calibration_batches)
        _checks.check_calibration_input(self.calibration_input)
        _checks.check_calibration_mask(self.calibration_mask)
        layer_amounts = _checks.check_layer_amounts(self.layer_amounts, kind, self.mode, self.scope)
        object.__setattr__(self, "layer_amounts", layer_amounts)
        object.__setattr__(self, "selection", ModuleSelection(self.modules, self.exclude, self.min_params))

    def with_layer_amounts(self, layer_amounts: Mapping[str, float] | None) -> PruningConfig:
        """This config with other ``layer_amounts`` (e.g. the ones a budget chose), checked.

        Example::

            >>> PruningConfig(mode="structured").with_layer_amounts({"0": 0.5}).layer_amounts
            {'0': 0.5}
        """
        amount = None if self.kind == "N:M" else self.amount  # N:M fixes it: it was not given
        return dataclasses.replace(self, amount=amount, layer_amounts=layer_amounts)

    @property
    def budget_scheme(self) -> str | None:
        """The budget scheme whose per-layer levels can be this config's ``layer_amounts``: ``"prune"``
        (unstructured, ``scope="layer"``), ``"prune_structured"``, or ``None`` (global scope, N:M)."""
        if self.kind == "structured":
            return "prune_structured"
        return "prune" if self.kind == "unstructured" and self.scope == "layer" else None

    @property
    def changes_structure(self) -> bool:
        """Whether finalizing removes modules' channels (structured) rather than leaving zeros in place."""
        return self.kind == "structured"

    @property
    def calibrated(self) -> bool:
        """Whether the criterion decides from the layers' inputs (``"wanda"``, ``"sparsegpt"``)."""
        return self.criterion in CALIBRATED_CRITERIA


class PruningPlan:
    """What ``config`` prunes in ``model`` and how far it got: masks, and for structured pruning the plan.

    Built once per model: it selects the layers (and, for structured pruning, traces the model once on
    ``example_input`` with torch-pruning's dependency graph). Then :meth:`compute_masks` chooses what to prune
    at an amount (what was pruned stays pruned), :meth:`apply` zeroes it, and :meth:`finalize` makes it permanent.
    Masks are bool tensors (``True`` = keep) by parameter name; a weight shared by several layers (a tied
    embedding and decoder) has one mask, under the name ``named_parameters()`` gives it.

    Args:
        model: the model to prune (its weights are not changed here).
        config: what to prune.
        example_input: one input batch; needed by structured pruning (tracing), optional otherwise (it gives
            the MACs that skip zero weights, :meth:`statistics`). Default: ``model.example_input_array``.
        caller: the name that warnings start with.
        quiet: warn nothing (e.g. on every process but one, which all take the same decisions).

    Attributes:
        params: the parameters masks apply to, by name.
        masks: the current masks, by parameter name (empty before :meth:`compute_masks` and after
            :meth:`finalize`).
        removed: structured: ``{channel group root or attention module: removed indices}``.
        amount: the amount the current masks prune.
        final_amount: the amount a schedule ends at: ``config.amount``; with ``layer_amounts`` and no (or a zero)
            ``amount``, the mean of every pruned layer's final amount weighted by what ``amount`` counts (weights
            for unstructured, channels and heads for structured), so that it is the sparsity (the fraction of
            channels) the model reaches.
        final_amounts: with ``layer_amounts``: the final amount of every pruned weight (unstructured, by
            parameter name) or channel group and attention module (structured, by root). At an amount ``v`` each is
            at ``final * v / final_amount``: every layer ramps in proportion and reaches its own at
            ``final_amount``. Empty without ``layer_amounts``.
        grads: summed gradients (:meth:`accumulate_gradients`) for ``criterion="taylor"``.
        input_statistics: ``"wanda"``/``"sparsegpt"``: the input statistics of every pruned weight's layers, by
            parameter name, from :meth:`calibrate` until the next :meth:`compute_masks` uses them.
        new_weights: ``"sparsegpt"``: the weights the last :meth:`compute_masks` chose (the kept ones updated), by
            parameter name, until :meth:`apply` writes them.
        max_abs_diff: after a structured :meth:`finalize`, the largest output difference between the masked
            model and the one with the channels removed.

    Example::

        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> plan = PruningPlan(model, PruningConfig(amount=0.5, scope="global"))
        >>> masks = plan.compute_masks(0.25)
        >>> plan.apply()
        >>> round(plan.statistics()["weight_sparsity"], 3)
        0.25
        >>> _ = plan.compute_masks(0.5)
        >>> plan.apply()
        >>> int((model[0].weight == 0).sum() + (model[2].weight == 0).sum()), plan.finalize(), plan.masks
        (40, None, {})
    """

    def __init__(
        self,
        model: nn.Module,
        config: PruningConfig,
        example_input: Any = None,
        *,
        caller: str = "prune_",
        quiet: bool = False,
    ) -> None:
        self.model, self.config, self.caller, self.quiet = model, config, caller, quiet
        self.example = (
            example_input if example_input is not None else getattr(model, "example_input_array", None)
        )
        self.structure: _Structure | None = None
        self.params: dict[str, nn.Parameter] = {}
        self.masks: dict[str, Tensor] = {}
        self.removed: dict[str, list[int]] = {}
        self.amount = 0.0
        self.grads: dict[str, Tensor] = {}
        self.input_statistics: dict[str, ColumnStatistics] = {}
        self.new_weights: dict[str, Tensor] = {}
        self._layer_names: dict[str, list[str]] = {}
        self._implied: dict[str, str] = {}  # attention modules selected through their `out_proj`: its name
        self._idle: set[str] = set()
        self.generator = torch.Generator().manual_seed(config.seed)
        self.max_abs_diff: float | None = None
        self.dense_macs = 0
        self.layer_macs: dict[str, int] = {}
        self.final_amount: float = config.amount or 0.0
        self.final_amounts: dict[str, float] = {}
        self._keep: tuple[list[Tensor], list[Tensor]] = ([], [])
        self._emptied: set[str] = set()
        self._cost: tuple[tuple, dict[str, float]] | None = None
        _checks.check_pruning_amount_given(config.mode, config.amount, config.layer_amounts)
        selected = config.selection.select(model)
        if config.kind != "structured":
            selected = self._with_attention(model, _without_parametrized(selected, self.quiet))
        names = [name for name, _ in selected]
        _checks.check_layer_names(config.layer_amounts, names, "layer_amounts", config.selection)
        with self._warnings():
            if config.kind == "structured":
                self._plan_structure(model, selected)
            else:
                self._select_weights(model, selected)

    @contextlib.contextmanager
    def _warnings(self) -> Iterator[None]:
        with warnings.catch_warnings():
            if self.quiet:
                warnings.simplefilter("ignore")
            yield

    def _with_attention(
        self, model: nn.Module, selected: list[tuple[str, nn.Module]]
    ) -> list[tuple[str, nn.Module]]:
        """``selected`` with the attention modules whose weights unstructured and N:M pruning reach: an
        ``nn.MultiheadAttention`` whose ``out_proj`` is selected joins it (its input projection is pruned under the
        attention module's name, and without an amount of its own in ``layer_amounts`` it takes ``out_proj``'s),
        unless ``exclude`` names it; a selected one brings its ``out_proj`` along."""
        named = dict(model.named_modules())
        excluded = set(self.config.selection.excluded(model))
        result: dict[str, nn.Module] = {}
        chosen = {name for name, _ in selected}

        def add(name: str, module: nn.Module) -> None:
            if name not in excluded:
                result.setdefault(name, module)

        for name, module in selected:
            parent_name = name.rpartition(".")[0]
            parent = named.get(parent_name)
            if (
                isinstance(parent, nn.MultiheadAttention)
                and parent.out_proj is module
                and parent_name
                and parent_name not in excluded
            ):
                if parent_name not in chosen:
                    self._implied[parent_name] = name
                add(parent_name, parent)
            add(name, module)
            if isinstance(module, nn.MultiheadAttention):
                add(f"{name}.out_proj" if name else "out_proj", module.out_proj)
        return list(result.items())

    def _select_weights(self, model: nn.Module, selected: list[tuple[str, nn.Module]]) -> None:
        # A weight shared by several layers is pruned once, under the name `named_parameters()` gives it.
        canonical = {id(p): n for n, p in model.named_parameters()}
        users: dict[str, list[str]] = {}
        for name, module in selected:
            for attribute in _weight_names(module):
                weight = getattr(module, attribute)
                key = canonical.get(id(weight), f"{name}.{attribute}")
                self.params[key] = weight
                users.setdefault(key, []).append(name)
        if not self.params:
            raise ValueError(f"The selection {self.config.selection} has no `weight` parameter to prune.")
        if self.config.calibrated:
            layers = dict(selected)
            unpacked = [
                name
                for name, module in selected
                if isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is None
            ]
            if unpacked:
                raise ValueError(
                    f"`criterion={self.config.criterion!r}` collects the inputs of an nn.MultiheadAttention's packed "
                    f"input projection (`in_proj_weight`), and {unpacked} have separate q/k/v projections (their "
                    f"`kdim`/`vdim` differ from `embed_dim`): leave them out with `exclude={unpacked!r}`, or use "
                    "`criterion='l1'`."
                )
            wrong = [
                name
                for names in users.values()
                for name in names
                if not isinstance(layers[name], LAYER_TYPES)
            ]
            if wrong:
                raise ValueError(
                    f"`criterion={self.config.criterion!r}` collects the inputs of nn.Linear, nn.Conv2d and "
                    "nn.MultiheadAttention layers, and the selection also picks "
                    f"{', '.join(f'{n!r} ({type(layers[n]).__name__})' for n in wrong)}: "
                    f"leave them out with `exclude={wrong!r}`, or use `criterion='l1'`."
                )
            self._layer_names = users
        self._resolve_amounts({key: (names, self.params[key].numel()) for key, names in users.items()})
        if self.config.nm is not None:
            validate_nm(*self.config.nm, {k: p.shape for k, p in self.params.items()})
        if self.example is None:
            return
        # Each weight of a Linear/Conv layer takes part in the same number of multiply-accumulates, so a layer's
        # zeros remove that fraction of its MACs (for hardware or kernels that skip them).
        rows: dict[str, tuple[int, int, int]] = {}
        try:
            with _attention_rows(model, rows):
                macs = count_macs_by_module(model, self.example)
        except Exception as err:
            raise ValueError(
                f"The model could not run on its example input ({type(err).__name__}: {err}). Pass an "
                "`example_input` (or set `example_input_array`) that `model(example_input)` accepts: a tuple is "
                "unpacked into positional arguments, a dict into keyword arguments."
            ) from err
        self.dense_macs = macs[""]
        layers = dict(selected)
        self.layer_macs = {
            key: sum(_weight_macs(key, name, layers[name], macs, rows) for name in names)
            for key, names in users.items()
        }

    def _plan_structure(self, model: nn.Module, selected: list[tuple[str, nn.Module]]) -> None:
        from lightning_compress.pruning.structured import tied_weights_message

        if self.example is None:
            raise ValueError(
                "Structured pruning traces the model and needs an example input: set `example_input_array` on "
                "the LightningModule or pass `example_input`."
            )
        config = self.config
        structure = self.structure = _Structure(
            model,
            self.example,
            selected,
            ignored=config.selection.excluded(model),
            criterion=config.criterion,
            scope=config.scope,
            round_to=config.round_to,
        )
        inexact = [g.root for g in structure.channels.groups if not g.exact] if structure.channels else []
        if inexact:
            warnings.warn(
                f"{self.caller}: the channel groups of {inexact} pass through a LayerNorm, which normalizes across "
                "channels, so zeroing a channel is not the same as removing it: validation during training scores "
                "the masked model, and the model with the channels removed will differ. Leave these layers out "
                "(`exclude=`) for an exact match.",
                stacklevel=3,
            )
        if structure.tied:
            raise ValueError(tied_weights_message(structure.tied))
        chosen = set(dict(selected))
        units = {g.root: ([p for p in g.producers if p in chosen], g.size) for g in structure.channel_groups}
        units.update({g.module: ([g.module], g.num_heads) for g in structure.head_groups})
        self._resolve_amounts(units)
        targets = self.final_amounts or {name: config.amount or 0.0 for name in units}
        if any(targets.values()):
            removable = structure.removable(config.amount or 0.0, self.final_amounts or None)
            wanted = [name for name, count in removable.items() if targets[name] > 0]
            stuck = [name for name in wanted if removable[name] == 0]
            at = "at their `layer_amounts`" if self.final_amounts else f"at `amount={config.amount:g}`"
            why = (
                f"{at} with `round_to={config.round_to}` (the kept channel count is rounded to a multiple of "
                "`round_to`, and heads to whole heads, at least one kept)"
            )
            if stuck and len(stuck) == len(wanted):
                sizes = ", ".join(f"{name!r} ({structure.size(name)})" for name in stuck)
                raise ValueError(
                    f"Structured pruning would remove nothing from the selected layers: {sizes} {why}. Lower "
                    "`round_to` (e.g. `round_to=1`) or raise `amount`."
                )
            if stuck:
                warnings.warn(
                    f"{self.caller} removes nothing from {stuck} {why}. Lower `round_to` or leave them out with "
                    "`exclude=`.",
                    stacklevel=3,
                )
        params = dict(model.named_parameters())
        self.params = {name: params[name] for name in structure.params}

    def _resolve_amounts(self, units: Mapping[str, tuple[list[str], int]]) -> None:
        """Set :attr:`final_amounts` and :attr:`final_amount` from ``config.layer_amounts``; ``units``: every pruned
        weight or channel group, with the selected layers it belongs to and its size (weights, channels, heads)."""
        given, amount = self.config.layer_amounts, self.config.amount
        if given is None:
            return
        implied = {
            mha: given[proj] for mha, proj in self._implied.items() if mha not in given and proj in given
        }
        given = {**given, **implied}
        unnamed, shared = [], []
        for key, (layers, _) in units.items():
            named = {layer: given[layer] for layer in layers if layer in given}
            if not named and amount is None:
                unnamed.extend(layers or [key])
            self.final_amounts[key] = min(named.values()) if named else amount or 0.0
            if len(set(named.values())) > 1:
                shared.append(f"{key!r} {named}")
        kind = self.config.kind
        if unnamed:
            raise ValueError(
                f"`amount` is required for `mode={self.config.mode!r}` by the layers `layer_amounts` does not name "
                f"({', '.join(map(repr, unnamed))}): give `amount` (what the others lose), or name them in "
                "`layer_amounts`."
            )
        used = {layer for layers, _ in units.values() for layer in layers}
        idle = [name for name, value in given.items() if value > 0 and name not in used]
        if shared and not self.quiet:
            what = "weight" if kind == "unstructured" else "output channels (coupled, e.g. by a residual add)"
            warnings.warn(
                f"{self.caller}: layers that share their {what} got different `layer_amounts`; they lose the "
                f"smallest: {'; '.join(shared)}.",
                stacklevel=4,
            )
        if idle and not self.quiet:
            warnings.warn(
                f"{self.caller}: `layer_amounts` names {idle}, but pruning leaves them as they are (structured: "
                "their channels cannot be removed; the reasons are in the plan's `structure.skipped`).",
                stacklevel=4,
            )
        if not amount:
            total = sum(size for _, size in units.values())
            weighted = sum(self.final_amounts[key] * size for key, (_, size) in units.items())
            self.final_amount = weighted / total if total else 0.0

    def _scaled(self, amount: float) -> dict[str, float] | None:
        """The amount of every unit of :attr:`final_amounts` at ``amount`` (``None`` without ``layer_amounts``)."""
        if not self.final_amounts:
            return None
        scale = amount / self.final_amount if self.final_amount else 0.0
        return {key: final * scale for key, final in self.final_amounts.items()}

    # -- masks -----------------------------------------------------------------------------------------------

    def calibrated_layers(self) -> dict[str, list[nn.Module]]:
        """The layers whose input statistics :meth:`calibrate` collects, ``{name: modules}`` (modules sharing one
        weight under one name)."""
        named = dict(self.model.named_modules())
        return {key: [named[name] for name in names] for key, names in self._layer_names.items()}

    def calibrate(
        self, inputs: Iterable[Any], reduce: Callable[[Tensor], Tensor] | None = None
    ) -> dict[str, ColumnStatistics]:
        """``"wanda"``/``"sparsegpt"``: run the model on the first ``config.calibration_batches`` of ``inputs`` and
        hold its layers' input statistics (:attr:`input_statistics`) for the next :meth:`compute_masks`.

        Args:
            inputs: model inputs (a tensor, a tuple of positional arguments or a dict of keyword arguments).
            reduce: sums a tensor over processes, for processes that ran different inputs (see
                :func:`~lightning_compress.pruning.calibration.collect_statistics`).
        """
        config = self.config
        if not config.calibrated:
            raise ValueError(
                f"`criterion={config.criterion!r}` does not use calibration inputs; 'wanda' and 'sparsegpt' do."
            )
        self.input_statistics = collect_statistics(
            self.model,
            self.calibrated_layers(),
            inputs,
            gram=config.criterion == "sparsegpt",
            batches=config.calibration_batches,
            reduce=reduce,
            positions=config.calibration_mask,
        )
        idle = [
            name
            for name, stats in self.input_statistics.items()
            if stats.count == 0 and name not in self._idle
        ]
        self._idle.update(idle)
        if idle and not self.quiet:
            warnings.warn(
                f"{self.caller}: the layers of {idle} did not run (their `forward`) on the calibration inputs, so "
                f"`criterion={config.criterion!r}` prunes them by magnitude. Leave them out with `exclude=` if "
                "another module uses their weights directly.",
                stacklevel=2,
            )
        return self.input_statistics

    def _calibrated_masks(self, amount: float, weights: Mapping[str, Tensor]) -> dict[str, Tensor]:
        config = self.config
        if not self.input_statistics:
            raise ValueError(
                f"`criterion={config.criterion!r}` decides from the layers' inputs: call `calibrate(inputs)` before "
                "each `compute_masks`."
            )
        nm, amounts = config.nm, self._scaled(amount) or {}
        masks: dict[str, Tensor] = {}
        self.new_weights = {}
        for name, weight in weights.items():
            stats, previous = self.input_statistics[name], self.masks.get(name)
            target = None if nm is not None else amounts.get(name, amount)
            if config.criterion == "wanda":
                masks[name] = wanda_mask(weight, stats.norms, target, nm=nm, previous=previous)
            else:
                new, masks[name] = sparsegpt_prune(weight, stats.hessian, target, nm=nm, previous=previous)
                self.new_weights[name] = new
        self.input_statistics = {}  # one decision's worth: the Gram matrices are large
        return masks

    def compute_masks(self, amount: float, grads: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        """Choose what to prune at ``amount`` (what was pruned stays pruned) and hold it as the current masks.

        With ``layer_amounts`` every layer is at its final amount times ``amount / final_amount`` (see
        :attr:`final_amounts`).

        ``grads`` (by parameter name) are the gradients ``criterion="taylor"`` ranks by (default: the sums of
        :meth:`accumulate_gradients`, which this call then clears). ``"wanda"`` and ``"sparsegpt"`` use the
        statistics of the last :meth:`calibrate`. The weights are not changed: see :meth:`apply` (which also
        writes ``"sparsegpt"``'s :attr:`new_weights`).
        """
        config = self.config
        amount = _checks.validate_amount(amount, "amount")
        weights = {name: param.detach() for name, param in self.params.items()}
        removed = self.removed
        if config.calibrated:
            masks = self._calibrated_masks(amount, weights)
            if config.nm is None:
                with self._warnings():
                    self._warn_emptied(masks, amount)
        elif config.nm is not None:
            masks = nm_masks(weights, *config.nm)
        elif self.structure is None:
            masks = unstructured_masks(
                weights,
                amount,
                scope=config.scope,
                criterion=config.criterion,
                previous=self.masks or None,
                generator=self.generator,
                max_layer_amount=config.max_layer_amount,
                amounts=self._scaled(amount),
            )
            with self._warnings():
                self._warn_emptied(masks, amount)
        else:
            masks, removed = self.structure.compute_masks(
                self.model,
                amount,
                grads=grads if grads is not None else self.grads or None,
                previous=self.removed or None,
                generator=self.generator,
                amounts=self._scaled(amount),
            )
            self.grads = {}
        self.set_masks(masks, removed, amount)
        return self.masks

    def set_masks(
        self,
        masks: Mapping[str, Tensor],
        removed: Mapping[str, Sequence[int]] | None = None,
        amount: float = 0.0,
        new_weights: Mapping[str, Tensor] | None = None,
    ) -> None:
        """Hold ``masks`` (and the structured plan ``removed``) as the current ones, pruning ``amount``: e.g. masks
        taken by another process, or restored from a checkpoint; ``new_weights`` (``"sparsegpt"``'s, e.g. another
        process's) replace :attr:`new_weights`."""
        if new_weights is not None:
            self.new_weights = dict(new_weights)
        self.masks = {k: v.to(device=self.params[k].device, dtype=torch.bool) for k, v in masks.items()}
        self.removed = {k: list(v) for k, v in (removed or {}).items()}
        self.amount = float(amount)
        self._refresh()

    def share(self, broadcast: Callable[[Any], Any]) -> None:
        """Hold what ``broadcast`` returns for the current masks, structured plan and :attr:`new_weights` (sent on
        the CPU): e.g. one process's decision, sent to every process (``lambda v: strategy.broadcast(v, src=0)``)."""
        removed = broadcast(self.removed) if self.structure is not None else {}
        masks = broadcast({k: v.cpu() for k, v in self.masks.items()})
        new = {k: v.cpu() for k, v in self.new_weights.items()}
        self.set_masks(masks, removed, self.amount, broadcast(new) if new else None)

    def bind(
        self, params: Mapping[str, nn.Parameter], *, wrapper: str = "A wrapper", others: Sequence[str] = ()
    ) -> None:
        """Point the plan at ``params`` (by name), e.g. after ``wrapper`` (named in errors) replaced the parameter
        objects. Refused: parameters gone (flattened), sharded, or reparametrized (``torch.nn.utils.parametrize``,
        by one of ``others``, named in the error)."""
        missing = [name for name in self.params if name not in params]
        modules = dict(self.model.named_modules())
        rewritten = [
            n for n in missing if parametrize.is_parametrized(modules.get(n.rpartition(".")[0], nn.Module()))
        ]
        if rewritten:
            raise ValueError(
                f"{self.caller} and {' and '.join(others) or 'another callback'} cannot share a fit: the weights "
                f"{rewritten[:3]} are reparametrized (torch.nn.utils.parametrize), so the model computes them from "
                "other tensors and the weights pruning masks are not the ones it uses. Use one of them."
            )
        if missing:
            raise ValueError(
                f"After {wrapper} wrapped the model, parameters {missing[:3]} are gone (flattened). With FSDP pass "
                "`use_orig_params=True`."
            )
        resharded = [name for name, p in self.params.items() if params[name].shape != p.shape]
        if resharded:
            raise ValueError(
                f"{wrapper} shards parameters {resharded[:3]} across processes; pruning masks need whole "
                "parameters. Use DDP, or FSDP on a single device."
            )
        self.params = {name: params[name] for name in self.params}
        self.set_masks(self.masks, self.removed, self.amount)

    def _refresh(self) -> None:
        # What every step touches: (parameter, mask as 1.0/0.0 in its dtype). One fused multiply is about ten times
        # faster on the CPU than masked_fill with a bool mask; kept values are unchanged and pruned ones stay exactly
        # zero (a weight that was negative may read -0.0 until the next decision rewrites +0.0).
        self._keep = (
            [self.params[k] for k in self.masks],
            [mask.to(self.params[k].dtype) for k, mask in self.masks.items()],
        )

    def apply(self, model: nn.Module | None = None) -> None:
        """Zero the pruned weights (exact ``+0.0``) of ``model``'s parameters of the same names (default: the
        parameters the plan holds), after writing :attr:`new_weights` into them."""
        if model is not None:
            self.bind(dict(model.named_parameters()))
        with torch.no_grad():
            for name, value in self.new_weights.items():
                self.params[name].copy_(value)
        self.new_weights = {}
        apply_masks(self.params, self.masks)

    def mask_weights(self) -> None:
        """Zero the pruned weights again (after an optimizer step): one fused multiply."""
        if self._keep[0]:
            with torch.no_grad():
                torch._foreach_mul_(*self._keep)

    def mask_gradients(self) -> None:
        """Zero the gradients of pruned weights (before an optimizer step), so weight decay alone moves them."""
        pairs = [(p.grad, keep) for p, keep in zip(*self._keep, strict=True) if p.grad is not None]
        if pairs:
            torch._foreach_mul_([g for g, _ in pairs], [keep for _, keep in pairs])

    def park_optimizer_state(self, optimizers: Iterable[torch.optim.Optimizer]) -> None:
        """Set the optimizer state of pruned entries so that nothing revives them: first moments (momentum,
        Adam's ``exp_avg``) zero, second moments 1.0 (zero would make Adam's step many times slower)."""
        with torch.no_grad():
            for optimizer in optimizers:
                for param, mask in zip(self._keep[0], self.masks.values(), strict=True):
                    for key, value in optimizer.state.get(param, {}).items():
                        if isinstance(value, Tensor) and value.shape == param.shape:
                            value.masked_fill_(~mask, 1.0 if key in _SECOND_MOMENTS else 0.0)

    def accumulate_gradients(self) -> None:
        """Add the current ``.grad`` of every pruned parameter to :attr:`grads` (Taylor importance)."""
        with torch.no_grad():
            for name, param in self.params.items():
                if param.grad is not None:
                    grad = param.grad.detach()
                    self.grads[name] = self.grads[name] + grad if name in self.grads else grad.clone()

    def _warn_emptied(self, masks: Mapping[str, Tensor], amount: float) -> None:
        emptied = [name for name, mask in masks.items() if not bool(mask.any()) and name not in self._emptied]
        if not emptied:
            return
        self._emptied.update(emptied)
        config = self.config
        hint = (
            "cap what one layer may lose with `max_layer_amount` (in [amount, 1), e.g. "
            f"{round(config.amount + (1 - config.amount) / 2, 4):g})"
            if config.scope == "global"
            else "lower `amount`"
        )
        warnings.warn(
            f"{self.caller} pruned every weight of {emptied} at amount {amount:.4g} (scope={config.scope!r}): these "
            f"layers' outputs no longer depend on their inputs. To keep some of them, {hint}, or leave them out "
            "with `exclude=`.",
            stacklevel=3,
        )

    # -- measures ------------------------------------------------------------------------------------------

    def statistics(self, model: nn.Module | None = None) -> dict[str, float]:
        """What the current masks prune: ``weight_sparsity`` (zeros of the selected weights), the target
        (``target_weight_sparsity``, or structured ``target_removed_channel_fraction``), ``remaining_params``
        (nonzero parameters of ``model``), unstructured/N:M ``nonzero_macs`` (with an example input), structured
        ``removed_channels``/``removed_channel_fraction`` and ``removed_heads``/``removed_head_fraction``."""
        model = model if model is not None else self.model
        zeros = sum(int((p == 0).sum()) for p in self.params.values())
        total = sum(p.numel() for p in self.params.values())
        values = {
            "weight_sparsity": zeros / total,
            "remaining_params": float(sum(int((p != 0).sum()) for p in model.parameters())),
        }
        if self.structure is None:
            values["target_weight_sparsity"] = self.amount
            if self.layer_macs:
                skipped = sum(
                    macs * float((self.params[name] == 0).float().mean())
                    for name, macs in self.layer_macs.items()
                )
                values["nonzero_macs"] = self.dense_macs - skipped
            return values
        # `amount` counts channels here: the reached fraction is compared with it, not weight sparsity (a
        # channel's weights are a different share of the whole in every group).
        values["target_removed_channel_fraction"] = self.amount
        channels, heads = self.structure.split(self.removed)
        if self.structure.channels is not None:
            total_channels = sum(group.size for group in self.structure.channels.groups)
            values["removed_channels"] = float(sum(len(v) for v in channels.values()))
            values["removed_channel_fraction"] = values["removed_channels"] / max(total_channels, 1)
        if self.structure.heads is not None:
            total_heads = sum(group.num_heads for group in self.structure.heads.groups)
            values["removed_heads"] = float(sum(len(v) for v in heads.values()))
            values["removed_head_fraction"] = values["removed_heads"] / max(total_heads, 1)
        return values

    def metrics(self, model: nn.Module | None = None, per_layer: bool = False) -> tuple[dict, dict]:
        """What a callback logs: :meth:`statistics`, and with ``per_layer`` ``{"weight_sparsity":``
        :meth:`layer_sparsity` ``}``."""
        return self.statistics(model), {"weight_sparsity": self.layer_sparsity()} if per_layer else {}

    def skipped_reasons(self) -> str:
        """Structured: the selected layers whose channels stay, with the reason (``""``: none)."""
        skipped = self.structure.skipped if self.structure is not None else {}
        return "; ".join(f"{name!r}: {why}" for name, why in skipped.items())

    def layer_sparsity(self) -> dict[str, float]:
        """The fraction of zeros of every pruned weight matrix (or kernel), by parameter name."""
        return {
            name: float((param == 0).float().mean())
            for name, param in self.params.items()
            if name.endswith("weight") and param.dim() > 1
        }

    def cost_after_removal(self, model: nn.Module | None = None) -> dict[str, float]:
        """Structured: ``macs_after_removal`` and ``params_after_removal`` of ``model`` (default: the plan's)
        once the removed channels are gone, measured on a copy (and kept until the plan changes)."""
        if self.structure is None:
            return {}
        model = model if model is not None else self.model
        key = tuple((root, len(idxs)) for root, idxs in self.removed.items())
        if self._cost is None or self._cost[0] != key:
            pruned = self.structure.materialize(copy.deepcopy(model), self.removed)
            device = next(model.parameters()).device
            self._cost = (
                key,
                {
                    "macs_after_removal": float(count_macs(pruned, to_device(self.example, device))),
                    "params_after_removal": float(sum(p.numel() for p in pruned.parameters())),
                },
            )
        return dict(self._cost[1])

    # -- permanence ----------------------------------------------------------------------------------------

    def finalize(self, model: nn.Module | None = None, check_inputs: Iterable[Any] = ()) -> float | None:
        """Make the pruning permanent in ``model`` (default: the plan's) and drop the masks.

        Unstructured and N:M: the weights already hold the zeros, nothing else changes. Structured: the removed
        channels and heads go for real (torch-pruning), every module keeps its train/eval mode, and the largest output
        difference to the masked model on the example input and on ``check_inputs`` (inputs the model may
        reject are skipped) is returned, also as :attr:`max_abs_diff`; a difference above 1e-4 is warned about.
        """
        model = model if model is not None else self.model
        diff = None
        if self.structure is not None and self.removed:
            masked = copy.deepcopy(model).eval()
            self.structure.materialize(model, self.removed)
            modes = {module: module.training for module in model.modules()}
            model.eval()
            with torch.no_grad():
                diff = _max_abs_diff(masked, model, self.example)
                for inputs in check_inputs:
                    # A model that takes more than a batch's first element is checked on the example only.
                    with contextlib.suppress(TypeError, ValueError, RuntimeError):
                        diff = max(diff, _max_abs_diff(masked, model, inputs))
            for module, training in modes.items():  # compared in eval mode, given back in the mode it had
                module.training = training
            if diff > 1e-4 and not self.quiet:
                warnings.warn(
                    f"Removing the pruned channels changed the outputs by up to {diff:.3g}: the masked and the "
                    "materialized models differ. Please report the model architecture.",
                    stacklevel=2,
                )
        self.max_abs_diff = diff
        self.set_masks({}, self.removed, self.amount)  # what was removed stays known (checkpoints replay it)
        return diff

    # -- checkpoints ---------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Masks (bit-packed), the structured plan, the amount, Taylor sums and the random generator."""
        return {
            "masks": {name: pack_mask(mask) for name, mask in self.masks.items()},
            "plan": {k: list(v) for k, v in self.removed.items()},
            "current_amount": self.amount,
            "taylor": {k: v.detach().cpu() for k, v in self.grads.items()},
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved (the weights are not changed: see :meth:`apply`)."""
        masks = {name: unpack_mask(packed) for name, packed in state.get("masks", {}).items()}
        self.set_masks(masks, state.get("plan"), state.get("current_amount", 0.0))
        self.grads = {k: v.to(self.params[k].device) for k, v in state.get("taylor", {}).items()}
        if "generator" in state:
            self.generator.set_state(state["generator"])


def pruning_schedule(
    config: PruningConfig,
    start: int,
    end: int,
    steps: float | None = None,
    initial: float = 0.0,
    schedule: str | ScheduleFn = "agp",
    frequency: int | None = None,
    start_point: Point | None = None,
    final: float | None = None,
    end_point: Point | None = None,
) -> Schedule:
    """The amount over optimizer steps: from ``initial`` at step ``start`` to ``final`` (default ``config.amount``;
    with ``layer_amounts``, :attr:`PruningPlan.final_amount`) at ``end``.

    ``steps`` is the length of the fit (``None``, or not finite: unknown): a ``start`` past its last step is an
    error (named by ``start_point``, the value the user gave), and since masks are updated before a step runs, an
    ``end`` at or past it moves onto the last step, so that the amount is reached (an ``end_point`` given in steps
    or epochs beyond the fit's end warns). N:M applies its pattern whole
    at ``start``.
    ``frequency`` (steps between updates) defaults to 20 updates over the ramp.

    Example::

        >>> s = pruning_schedule(PruningConfig(amount=0.8), 0, 100, steps=50, schedule="linear")
        >>> s.end, s.frequency, s.value(49)
        (49, 2, 0.8)
    """
    nm = config.kind == "N:M"
    end = start if nm else end
    steps = int(steps) if steps is not None and math.isfinite(steps) and steps >= 0 else None
    if steps is not None:
        if start > steps - 1:
            raise ValueError(
                f"`start={start_point if start_point is not None else start!r}` is optimizer step {start}, but this "
                f"fit has {steps} steps (0 to {steps - 1}): pruning would never happen."
            )
        if isinstance(end_point, str) and not nm and end > steps:
            warnings.warn(
                f"`end={end_point!r}` is optimizer step {end}, past the end of this fit (step {steps - 1} is its "
                f"last): the amount is reached at step {steps - 1}, on a steeper ramp than asked. Lower `end`, or "
                "train longer.",
                UserWarning,
                stacklevel=2,
            )
        end = min(end, steps - 1)
    frequency = 1 if nm else frequency or max(1, (end - start) // 20)
    final = config.amount if final is None else final
    if final is None:
        raise ValueError(
            "The schedule needs a final amount: give `amount`, or `final` (a plan's `final_amount`)."
        )
    if config.amount is None:  # `final` is the mean of `layer_amounts`: `initial` is checked against it now
        mean = "the mean of `layer_amounts`, {:g}"
        _checks.check_initial_amount(initial, final, config.kind, config.mode, mean)
    initial, schedule = (final, "constant") if nm else (initial, schedule)
    return Schedule(initial, final, start, end, schedule, frequency)


def prune_(
    model: nn.Module,
    config: PruningConfig,
    amount: float | None = None,
    *,
    example_input: Any = None,
    grads: Mapping[str, Tensor] | None = None,
    calibration: Iterable[Any] | None = None,
    finalize: bool = True,
) -> PruningPlan:
    """Prune ``model`` in place in one shot, as ``config`` says, and return its :class:`PruningPlan`.

    Args:
        model: the model to prune.
        config: what to prune.
        amount: the fraction removed (default: ``config.amount``; with ``layer_amounts``, every layer its own).
        example_input: one input batch; needed by structured pruning (default: ``model.example_input_array``).
        grads: gradients by parameter name, for ``criterion="taylor"``.
        calibration: model inputs (tensors, tuples of positional arguments or dicts of keyword arguments), or
            batches that ``config.calibration_input`` maps to them, for ``criterion="wanda"``/``"sparsegpt"``:
            the first ``config.calibration_batches`` are run.
        finalize: make it permanent (structured: remove the channels); with ``False`` the plan keeps the masks.

    Example::

        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
        >>> plan = prune_(model, PruningConfig(mode="2:4", modules=nn.Linear), finalize=False)
        >>> [int((w.reshape(-1, 4) != 0).sum(1).max()) for w in (model[0].weight, model[2].weight)]
        [2, 2]
        >>> len(plan.masks)
        2
        >>> batches = [torch.randn(32, 8) for _ in range(4)]
        >>> plan = prune_(model, PruningConfig(amount=0.75, criterion="sparsegpt"), calibration=batches)
        >>> [float((layer.weight == 0).float().mean()) for layer in (model[0], model[2])]
        [0.75, 0.75]
    """
    plan = PruningPlan(model, config, example_input)
    if config.calibrated:
        if calibration is None:
            raise ValueError(
                f"`criterion={config.criterion!r}` decides from the layers' inputs: pass `calibration`, model inputs "
                "to run (e.g. `[x for x, _ in loader]`)."
            )
        plan.calibrate(calibration_inputs(calibration, config.calibration_input))
    plan.compute_masks(plan.final_amount if amount is None else amount, grads)
    plan.apply()
    if finalize:
        plan.finalize()
    return plan


def _without_parametrized(selected: list[tuple[str, nn.Module]], quiet: bool) -> list[tuple[str, nn.Module]]:
    """``selected`` without the layers whose weight a parametrization computes at each call (``weight_norm``,
    ``spectral_norm``): a mask on that weight would never reach the layer. Warned about."""
    left_out = [name for name, module in selected if computed_weight(module)]
    if left_out and not quiet:
        warnings.warn(
            f"GradualPruning leaves out {left_out}: their `weight` is computed from other tensors at each call (a "
            "parametrization such as weight_norm or spectral_norm), so a mask on it would not reach the layer. To "
            "prune them, remove the parametrization before the fit (`torch.nn.utils.parametrize."
            "remove_parametrizations(layer, 'weight')`); to silence this, leave them out with `exclude=`.",
            stacklevel=3,
        )
    return [(name, module) for name, module in selected if name not in left_out]


def _weight_names(module: nn.Module) -> list[str]:
    """The attributes of ``module`` that unstructured and N:M pruning mask: ``weight``; for an
    ``nn.MultiheadAttention`` its input projection (``in_proj_weight``, or ``q/k/v_proj_weight`` when ``kdim``/
    ``vdim`` differ from ``embed_dim``)."""
    if isinstance(module, nn.MultiheadAttention):
        if module.in_proj_weight is not None:
            return ["in_proj_weight"]
        return ["q_proj_weight", "k_proj_weight", "v_proj_weight"]
    return ["weight"] if isinstance(getattr(module, "weight", None), nn.Parameter) else []


@contextlib.contextmanager
def _attention_rows(model: nn.Module, rows: dict[str, tuple[int, int, int]]) -> Iterator[None]:
    """Record, by module name, the rows of ``query``, ``key`` and ``value`` each ``nn.MultiheadAttention`` of
    ``model`` is called on (the inputs of its projections, whose MACs the FLOP counter books on the module)."""

    def record(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            q, k, v = attention_inputs(args, kwargs)
            rows[name] = (q.numel() // q.shape[-1], k.numel() // k.shape[-1], v.numel() // v.shape[-1])

        return hook

    handles = [
        module.register_forward_pre_hook(record(name), with_kwargs=True)
        for name, module in model.named_modules()
        if isinstance(module, nn.MultiheadAttention)
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _weight_macs(
    key: str, name: str, layer: nn.Module, macs: Mapping[str, int], rows: Mapping[str, tuple[int, int, int]]
) -> int:
    """Multiply-accumulates of the weight ``key`` in layer ``name``: the layer's own, but an attention module's
    projections (whose products the counter books on the attention module) from the rows they multiply."""
    if isinstance(layer, nn.MultiheadAttention):
        q, k, v = rows.get(name, (0, 0, 0))
        weight = getattr(layer, key.rpartition(".")[2], None)
        if layer.in_proj_weight is not None:
            return layer.in_proj_weight.numel() // 3 * (q + k + v)
        per_row = {"q_proj_weight": q, "k_proj_weight": k, "v_proj_weight": v}
        return sum(
            getattr(layer, attr).numel() * count
            for attr, count in per_row.items()
            if getattr(layer, attr) is weight or weight is None
        )
    parent = name.rpartition(".")[0]
    if parent in rows and name.endswith("out_proj"):
        return layer.weight.numel() * rows[parent][0]
    return macs.get(name, 0)


def check_samples(batch: Any, device: Any) -> Any:
    """A detached copy of the first :data:`CHECK_SAMPLES` samples of ``batch`` on ``device``: inputs to check the
    removal of channels on (:meth:`PruningPlan.finalize`).

    Example::

        >>> check_samples((torch.ones(10, 2),), "cpu")[0].shape
        torch.Size([4, 2])
    """
    return to_device(detach_input(batch, CHECK_SAMPLES), device)


def _max_abs_diff(a: nn.Module, b: nn.Module, example: Any) -> float:
    example = to_device(example, next(b.parameters()).device)
    out_a, out_b = call_module(a, example), call_module(b, example)
    return float((out_a - out_b).abs().max()) if isinstance(out_a, Tensor) else 0.0


# -- checkpoints of a model whose channels were removed ------------------------------------------------------


def accept_pruned_checkpoints(module: nn.Module, evaluating: bool = False) -> Any:
    """Let ``module.load_state_dict`` take checkpoints that carry :data:`PRUNED_CHECKPOINT_KEY`: the key is
    dropped, and loading one into a module with the unpruned shapes explains how to rebuild it; when
    ``evaluating`` (``Trainer.test/validate/predict(ckpt_path=...)``), so does loading a checkpoint with larger
    weights (written while the channels were masked) into a module whose channels were removed. Returns the
    hook's handle (``handle.remove()`` removes it)."""
    return module.register_load_state_dict_pre_hook(partial(_drop_pruned_hint, evaluating=evaluating))


def _drop_pruned_hint(
    module: nn.Module,
    state_dict: dict[str, Any],
    prefix: str,
    local_metadata: Any,
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
    evaluating: bool = False,
) -> None:
    hinted = PRUNED_CHECKPOINT_KEY in drop_checkpoint_hints(state_dict, prefix)
    own = module.state_dict()
    found = ((v, own.get(k[len(prefix) :])) for k, v in state_dict.items())
    mismatched = [
        (saved, current) for saved, current in found if current is not None and saved.shape != current.shape
    ]
    if not mismatched:
        return
    if hinted:
        error_msgs.append(
            f"This checkpoint holds a model whose channels were removed by structured pruning, and "
            f"{type(module).__name__} has the unpruned shapes. Rebuild the pruned model with "
            "`model = load_pruned_checkpoint(YourModule(...), path)`, then fit, validate or test it without "
            "`ckpt_path`."
        )
    elif evaluating and all(
        saved.dim() == current.dim() and saved.numel() > current.numel() for saved, current in mismatched
    ):
        # e.g. `trainer.test(ckpt_path="best")` after the fit removed the channels of the model in memory
        error_msgs.append(
            f"This checkpoint has larger weights than {type(module).__name__}, whose channels structured pruning "
            "removed: it was written while the pruned channels were still masked (during the fit). Load it into a "
            "new model with `model = load_pruned_checkpoint(YourModule(...), path)`, which removes them after "
            "loading, and evaluate that model without `ckpt_path`."
        )


def load_pruned_checkpoint(
    model: nn.Module, checkpoint: str | os.PathLike | Mapping[str, Any], example_input: Any = None
) -> nn.Module:
    """Load a checkpoint written by a run with ``GradualPruning`` into a freshly built model.

    Works without the callback, for checkpoints written during pruning (full shapes, pruned weights zero) and
    after it (channels removed): the pruning history (``plan``) stored with the callback's state is replayed
    with torch-pruning, so the model gets the pruned structure and the trained weights. Unstructured and N:M
    checkpoints need nothing special (``LightningModule.load_from_checkpoint`` works as is); for them this
    function is a plain ``load_state_dict``.

    Args:
        model: a new instance of the model that was trained (e.g. ``MyModule(**hparams)``).
        checkpoint: a path to a Lightning checkpoint, or the loaded checkpoint dict.
        example_input: input to trace the model (default: ``model.example_input_array``).

    Returns:
        ``model``, pruned in place, with the checkpoint's weights.

    Example::

        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> ckpt = {"state_dict": net.state_dict(), "callbacks": {}}
        >>> load_pruned_checkpoint(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), ckpt)[0]
        Linear(in_features=4, out_features=8, bias=True)
    """
    from lightning_compress.depth.core import restore_depth
    from lightning_compress.low_rank.restore import restore_low_rank_of_checkpoint

    configure_fresh_model(model)
    if not isinstance(checkpoint, Mapping):
        checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=False)
    state_dict = dict(checkpoint["state_dict"])
    # Blocks a StochasticDepth removed before the pruning set up; every hint is dropped from `state_dict` then.
    restore_depth(model, {"state_dict": state_dict, "callbacks": checkpoint.get("callbacks")})
    # A LowRankReplacement before the pruning: its factors hold some of the plan's roots.
    restore_low_rank_of_checkpoint(model, checkpoint, state_dict)
    plan = pruning_plan(checkpoint)
    if not plan:
        model.load_state_dict(state_dict)
        return model
    structure = _replay_structure(model, plan, example_input)
    if _same_shapes(model, state_dict):
        # Written while pruning: load the weights first, then remove the channels and heads.
        model.load_state_dict(state_dict)
        return structure.materialize(model, plan)
    structure.materialize(model, plan)
    model.load_state_dict(state_dict)
    return model


def pruning_plan(checkpoint: Mapping[str, Any]) -> dict[str, list[int]]:
    """The channels and heads (``{root: indices}``) the structured ``GradualPruning`` callbacks of a checkpoint's
    fit removed or planned to remove (empty without one)."""
    plan: dict[str, list[int]] = {}
    for state in _structured_states(checkpoint):
        plan.update({root: list(idxs) for root, idxs in state["plan"].items() if idxs})
    return plan


def _structured_states(checkpoint: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [
        state
        for key, state in (checkpoint.get("callbacks") or {}).items()
        if str(key).startswith("GradualPruning") and state.get("mode") == "structured"
    ]


def rebuild_pruned_structure(
    model: nn.Module, checkpoint: Mapping[str, Any], example_input: Any = None
) -> nn.Module:
    """Remove from a freshly built ``model`` the channels and heads that the checkpoint's structured
    ``GradualPruning`` had removed when it was written (its state says so), tracing ``model`` on ``example_input``
    (default: ``model.example_input_array``); no weights are loaded, so the weights may be held under another
    scheme's names (a quantized graph's). A checkpoint written while pruning (full shapes) or without structured
    pruning leaves ``model`` as it is."""
    plan = pruning_plan(checkpoint)
    if not plan or not any(state.get("materialized") for state in _structured_states(checkpoint)):
        return model
    return _replay_structure(model, plan, example_input).materialize(model, plan)


def _same_shapes(model: nn.Module, state_dict: Mapping[str, Any]) -> bool:
    current = model.state_dict()
    return all(current[k].shape == v.shape for k, v in state_dict.items() if k in current)


def _replay_structure(model: nn.Module, plan: Mapping[str, Sequence[int]], example_input: Any) -> _Structure:
    example = example_input if example_input is not None else getattr(model, "example_input_array", None)
    if example is None:
        raise ValueError("Replaying structured pruning traces the model: pass `example_input`.")
    named = dict(model.named_modules())
    return _Structure(
        model,
        example,
        [(name, named[name]) for name in plan],
        ignored=[],
        criterion="l1",
        scope="layer",
        round_to=1,
    )


class _Structure:
    """Channel groups (torch-pruning's dependency graph) and attention heads, planned and removed together.

    Both kinds share one plan ``{module name: removed indices}``: channel roots and attention modules have
    different names, so each entry is routed to the pruner that owns it.
    """

    def __init__(
        self,
        model: nn.Module,
        example: Any,
        selected: list[tuple[str, nn.Module]],
        *,
        ignored: list[str],
        criterion: str,
        scope: str,
        round_to: int,
    ) -> None:
        from lightning_compress.pruning.heads import HEAD_CRITERIA, HeadPruner
        from lightning_compress.pruning.structured import NoChannelGroupError, StructuredPruner

        self.scope, self.criterion = scope, criterion
        attention = [n for n, m in selected if isinstance(m, nn.MultiheadAttention)]
        inside = tuple(f"{n}." for n in attention)
        others = [n for n, _ in selected if n not in attention and not n.startswith(inside)]
        self.heads = HeadPruner(model, modules=attention) if attention else None
        if self.heads is not None and criterion not in HEAD_CRITERIA:
            raise ValueError(
                f"`criterion={criterion!r}` cannot rank attention heads; use one of {HEAD_CRITERIA}."
            )
        self.channels: StructuredPruner | None = None
        self.skipped: dict[str, str] = {}
        self.tied: dict[str, str] = {}
        if others:
            try:
                self.channels = StructuredPruner(
                    model,
                    example,
                    modules=others,
                    ignored=ignored,
                    importance=criterion,
                    scope=scope,
                    round_to=round_to,
                    strict=False,
                )
                self.skipped = dict(self.channels.skipped)
                self.tied = dict(self.channels.tied)
            except NoChannelGroupError:
                # Attention heads alone are enough to prune; a model that cannot be traced is still an error.
                if self.heads is None:
                    raise
        params: set[str] = set()
        for groups in (
            self.channels.groups if self.channels else [],
            self.heads.groups if self.heads else [],
        ):
            params.update(p for group in groups for p in group.params)
        self.params = sorted(params)

    @property
    def channel_groups(self) -> list[Any]:
        return self.channels.groups if self.channels is not None else []

    @property
    def head_groups(self) -> list[Any]:
        return self.heads.groups if self.heads is not None else []

    def removable(self, amount: float, amounts: Mapping[str, float] | None = None) -> dict[str, int]:
        """The most channels (per channel group root) or heads (per attention module) ``amount`` (or the unit's own
        in ``amounts``) removes."""
        channels, heads = self.split(amounts)
        found = self.channels.removable(amount, channels or None) if self.channels is not None else {}
        if self.heads is not None:
            groups = self.heads.groups
            if self.scope == "layer":
                found.update(
                    {
                        g.module: min(
                            math.floor(heads.get(g.module, amount) * g.num_heads + 1e-9), g.num_heads - 1
                        )
                        for g in groups
                    }
                )
            else:
                total = math.floor(amount * sum(g.num_heads for g in groups) + 1e-9)
                found.update({g.module: min(total, g.num_heads - 1) for g in groups})
        return found

    def size(self, name: str) -> str:
        """What a group or attention module has to lose, in words (for messages)."""
        for group in self.channels.groups if self.channels is not None else []:
            if group.root == name:
                return f"{group.size} channels"
        for head_group in self.heads.groups if self.heads is not None else []:
            if head_group.module == name:
                return f"{head_group.num_heads} heads"
        return "?"

    def split(self, plan: Mapping[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
        """``plan`` divided into its channel groups and its attention modules."""
        plan = plan or {}
        heads = set(self.heads.modules) if self.heads else set()
        return {k: v for k, v in plan.items() if k not in heads}, {
            k: v for k, v in plan.items() if k in heads
        }

    def compute_masks(
        self,
        model: nn.Module,
        amount: float,
        *,
        grads: Any,
        previous: Mapping[str, Any] | None,
        generator: Any,
        amounts: Mapping[str, float] | None = None,
    ) -> tuple[dict[str, Tensor], dict[str, list[int]]]:
        channel_prev, head_prev = self.split(previous)
        channel_amounts, head_amounts = self.split(amounts)
        masks: dict[str, Tensor] = {}
        plan: dict[str, list[int]] = {}
        if self.channels is not None:
            m, p = self.channels.compute_masks(
                model,
                amount,
                grads=grads,
                previous=channel_prev or None,
                generator=generator,
                amounts=channel_amounts or None,
            )
            masks.update(m)
            plan.update(p)
        if self.heads is not None:
            # `scope="layer"` decides every module on its own: one call per amount, each module's plan kept.
            by_amount: dict[float, list[str]] = {}
            for g in self.heads.groups:
                by_amount.setdefault(head_amounts.get(g.module, amount), []).append(g.module)
            for value, modules in by_amount.items():
                _, p = self.heads.compute_masks(
                    model,
                    value,
                    scope=self.scope,
                    criterion=self.criterion,
                    grads=grads,
                    previous=head_prev or None,
                    generator=generator,
                )
                plan.update({module: p[module] for module in modules})
            masks.update(self.heads.masks_from_plan(model, {k: plan[k] for k in self.heads.modules}))
        return masks, plan

    def materialize(self, model: nn.Module, plan: Mapping[str, Sequence[int]]) -> nn.Module:
        channel_plan, head_plan = self.split(plan)
        # Channels first: the graph is traced with the attention modules as they were built.
        if self.channels is not None and channel_plan:
            self.channels.materialize(model, channel_plan)
        if self.heads is not None and head_plan:
            self.heads.materialize(model, head_plan)
        return model
