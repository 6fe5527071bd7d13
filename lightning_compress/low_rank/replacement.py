"""LowRankReplacement: replace Linear and Conv2d layers by low-rank factorizations before fine-tuning."""

from __future__ import annotations

import contextlib
import functools
import math
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_compress._events import record_event, watch_loss
from lightning_compress._inputs import call_module, to_device
from lightning_compress._lightning import (
    add_checkpoint_hint,
    detach_input,
    drop_checkpoint_hints,
    first_input,
    forget_original,
    log_step,
    original_name,
    per_layer_name,
    remember_original,
    replace_parameters,
    set_up_in_order,
    training_steps,
)
from lightning_compress.low_rank.factorize import (
    CONV_DECOMPOSITIONS,
    FACTORIZED,
    METHODS,
    Decomposition,
    InputStatistics,
    LowRankConv2d,
    LowRankLinear,
    Rank,
    TuckerConv2d,
    allocate_budget,
    decompose,
    layer_features,
    layer_kind,
    skip_reason,
)
from lightning_compress.schedules import Point, resolve_point, validate_point
from lightning_compress.selection import ModuleSelection, Selector
from lightning_compress.stats import _eval_mode, count_macs

BUDGET_ON = ("params", "macs")
ALLOCATIONS = ("energy", "uniform")
# An extra entry of the checkpoints' `state_dict` that a strict `load_state_dict` of the plain model reports as an
# unexpected key, so that its error says how to load the factorized layers. The callback's load hook and
# `restore_low_rank` remove it again.
CHECKPOINT_HINT = (
    "lightning_compress: this checkpoint holds factorized layers (LowRankReplacement); call "
    "lightning_compress.low_rank.restore_low_rank(model, checkpoint['state_dict']) before load_state_dict, "
    "or load it through a Trainer that lists LowRankReplacement"
)


class LowRankReplacement(Callback):
    """Replace ``nn.Linear`` / ``nn.Conv2d`` layers by low-rank factorizations at the start of fine-tuning.

    In ``setup()`` — before the optimizers exist and before the strategy wraps the model — every selected layer
    is factorized from its current (pretrained) weights and swapped for a product of thinner layers
    (:class:`~lightning_compress.low_rank.LowRankLinear`, :class:`~lightning_compress.low_rank.TuckerConv2d` or
    :class:`~lightning_compress.low_rank.LowRankConv2d`); training then fine-tunes the factors. A layer is only
    replaced when the replacement has fewer parameters *and* fewer MACs; otherwise it is left as is and the
    reason is reported in :attr:`skipped` (with a warning when no layer at all is replaced). Factors of a frozen
    weight (``requires_grad=False``) stay frozen. A layer whose weight is tied to another module is left as is,
    with a warning naming both.

    Ranks — give exactly one of:

    - ``rank``: an ``int`` (the same rank for every layer; per mode for Tucker, capped at each mode's size) or a
      ``float`` in ``(0, 1]`` (that fraction of each layer's full rank);
    - ``energy``: in ``(0, 1]``, per layer the smallest rank whose singular values hold that fraction of ``Σσ²``;
    - ``budget``: in ``(0, 1)``, the fraction of the selected layers' parameters (``budget_on="params"``) or MACs
      (``"macs"``) to keep; with ``allocation="energy"`` the ranks are chosen jointly, greedily by the relative
      energy each rank adds per unit of cost, with ``"uniform"`` every layer keeps that fraction of its own cost.

    Data-aware factorization (``method="whitened"``, SVD-LLM style, or the cheaper ``"asvd"`` scaling) minimizes the
    error of each layer's outputs on calibration inputs instead of the error of its weights: the first
    ``calibration_batches`` batches of the training loader are run through the model (in eval mode, without
    gradients, without touching the random generators) to collect input statistics. ``method="auto"`` is
    ``"whitened"`` when a training loader exists, else ``"svd"``. Under DDP the batches are split across processes
    and the statistics all-reduced; rank zero's decisions are broadcast, so every process builds the same layers.

    Checkpoints keep the factorized weights; the callback registers a state-dict pre-hook on the LightningModule
    that rebuilds the factorized structure from the checkpoint's own keys before the weights are copied in, so
    resuming a fit and ``Trainer.test(model, ckpt_path=...)`` on a freshly constructed LightningModule both work
    (list this callback in that Trainer too, or call :func:`restore_low_rank` yourself). The ranks are also in the
    callback's ``state_dict``. The checkpoint's ``state_dict`` carries one extra entry, :data:`CHECKPOINT_HINT`,
    whose key says how to load it, so that a strict ``load_state_dict`` of the plain class reports it; the load
    hook and :func:`restore_low_rank` remove it. Resuming from a checkpoint written without this callback is
    refused with the checkpoint named and the way to factorize its weights instead.

    List this callback before callbacks that select layers (e.g. ``GradualPruning``): they then act on the factors.

    Args:
        rank: fixed rank (``int``) or fraction of the full rank (``float`` in ``(0, 1]``).
        energy: energy threshold in ``(0, 1]``.
        budget: fraction in ``(0, 1)`` of the selected layers' cost to keep.
        budget_on: ``"params"`` or ``"macs"``: what ``budget`` counts.
        allocation: how ``budget`` is shared: ``"energy"`` (jointly: the greedy of
            :func:`~lightning_compress.low_rank.allocate_budget` on the energy each rank adds per unit of cost) or
            ``"uniform"`` (every layer keeps at most ``budget`` of its own cost, at least rank 1).
        method: ``"auto"``, ``"svd"``, ``"whitened"`` or ``"asvd"``.
        conv: ``"tucker"`` (Tucker-2: 1x1 → k×k core → 1x1) or ``"channel"`` (k×k with r filters → 1x1) for
            k×k convolutions; 1x1 convolutions are factorized like linear layers.
        modules: layers to factorize (types and/or name patterns).
        exclude: layers to leave alone.
        min_params: leave out layers with fewer parameters.
        calibration_batches: training batches for the input statistics (data-aware methods).
        calibration_input: maps a training batch to the model's input (a tensor, a tuple of positional arguments or
            a dict of keyword arguments); default: the batch's first element.
        example_input: input of one sample, to count MACs per layer; default ``example_input_array``, else the
            first calibration batch.
        damping: whitening: added to the Gram matrix's diagonal relative to its mean; asvd: floor of the scales.
        alpha: asvd: exponent of the mean absolute input.
        log_per_layer: log rank, errors and ratios of every replaced layer (else only totals).
        verbose: print a table of the replacement on rank zero.
        start: ``None`` (default) replaces in ``setup``, before the optimizers exist. A point of training
            (fraction, ``"step:N"``, ``"epoch:N"``) replaces at that step instead, from the weights trained so
            far: the optimizers are pointed at the factors (which take the old layers' places in their parameter
            groups and start without optimizer state). Single process only, and not together with callbacks
            that select layers; every selected layer's trainable parameters must be in an optimizer (checked
            when the fit starts).

    Example::

        >>> from lightning.pytorch import Trainer
        >>> lowrank = LowRankReplacement(budget=0.5, modules=nn.Linear)
        >>> trainer = Trainer(callbacks=[lowrank], max_epochs=1, logger=False)
        >>> LowRankReplacement(rank=0)
        Traceback (most recent call last):
        ...
        ValueError: `rank=0` must be a positive int (a fixed rank) or a float in (0, 1] (a fraction of the full rank).
    """

    def __init__(
        self,
        rank: int | float | None = None,
        energy: float | None = None,
        budget: float | None = None,
        budget_on: str = "params",
        allocation: str = "energy",
        method: str = "auto",
        conv: str = "tucker",
        modules: Selector = (nn.Linear, nn.Conv2d),
        exclude: Selector = None,
        min_params: int = 0,
        calibration_batches: int = 8,
        calibration_input: Callable[[Any], Any] | None = None,
        example_input: Any = None,
        damping: float = 0.01,
        alpha: float = 0.5,
        log_per_layer: bool = True,
        verbose: bool = True,
        start: Point | None = None,
    ) -> None:
        given = [
            name
            for name, value in (("rank", rank), ("energy", energy), ("budget", budget))
            if value is not None
        ]
        if len(given) != 1:
            raise ValueError(
                "Give exactly one of `rank` (e.g. 32 or 0.25), `energy` (e.g. 0.9) or `budget` (e.g. 0.5); "
                f"got {', '.join(f'`{n}`' for n in given) or 'none'}."
            )
        if rank is not None:
            if isinstance(rank, bool) or not isinstance(rank, int | float):
                raise TypeError(f"`rank={rank!r}` must be an int (a fixed rank) or a float in (0, 1].")
            if (isinstance(rank, int) and rank < 1) or (isinstance(rank, float) and not 0.0 < rank <= 1.0):
                raise ValueError(
                    f"`rank={rank!r}` must be a positive int (a fixed rank) or a float in (0, 1] "
                    "(a fraction of the full rank)."
                )
        if energy is not None and not _number_in(energy, 0.0, 1.0, closed_right=True):
            raise ValueError(
                f"`energy={energy!r}` must be in (0, 1]: the fraction of each layer's Σσ² the kept rank holds."
            )
        if budget is not None and not _number_in(budget, 0.0, 1.0, closed_right=False):
            raise ValueError(
                f"`budget={budget!r}` must be in (0, 1): the fraction of the selected layers' {budget_on} to keep."
            )
        if budget_on not in BUDGET_ON:
            raise ValueError(f"Unknown `budget_on={budget_on!r}`. Use 'params' or 'macs'.")
        if allocation not in ALLOCATIONS:
            raise ValueError(
                f"Unknown `allocation={allocation!r}`. Use 'energy' (joint) or 'uniform' (per layer)."
            )
        for name, value, default in (
            ("budget_on", budget_on, "params"),
            ("allocation", allocation, "energy"),
        ):
            if budget is None and value != default:
                raise ValueError(
                    f"`{name}={value!r}` only applies with `budget`, which is not given: pass `budget=...` "
                    f"instead of `{given[0]}`, or leave `{name}` out."
                )
        if method not in ("auto", *METHODS):
            raise ValueError(
                f"Unknown `method={method!r}`. Use one of 'auto', {', '.join(map(repr, METHODS))}."
            )
        if conv not in CONV_DECOMPOSITIONS:
            raise ValueError(
                f"Unknown `conv={conv!r}`. Use 'tucker' (1x1 → k×k → 1x1) or 'channel' (k×k → 1x1)."
            )
        if (
            isinstance(calibration_batches, bool)
            or not isinstance(calibration_batches, int)
            or calibration_batches < 1
        ):
            raise ValueError(f"`calibration_batches={calibration_batches!r}` must be a positive integer.")
        if calibration_input is not None and not callable(calibration_input):
            raise TypeError(
                f"`calibration_input={calibration_input!r}` must be a function from a training batch to the "
                "model's input, e.g. `calibration_input=lambda batch: batch[0]`."
            )
        for name, value in (("damping", damping), ("alpha", alpha)):
            if not _number_in(value, 0.0, math.inf, closed_left=True):
                raise ValueError(f"`{name}={value!r}` must be a non-negative number.")
        for name, value in (("log_per_layer", log_per_layer), ("verbose", verbose)):
            if not isinstance(value, bool):
                raise TypeError(f"`{name}={value!r}` must be True or False.")
        self.rank = rank
        self.energy = energy
        self.budget = budget
        self.budget_on = budget_on
        self.allocation = allocation
        self.method = method
        self.conv = conv
        self.selection = ModuleSelection(modules, exclude, min_params)
        self.calibration_batches = calibration_batches
        self.calibration_input = calibration_input
        self.example_input = example_input
        self.damping = float(damping)
        self.alpha = float(alpha)
        self.log_per_layer = log_per_layer
        self.verbose = verbose
        self.start = None if start is None else validate_point(start, "start")
        self._start_step: int | None = None

        # Decisions, kept in checkpoints.
        self.layers: dict[str, dict[str, Any]] = {}
        self.records: list[dict[str, Any]] = []
        self.skipped: dict[str, str] = {}
        self.totals: dict[str, float] = {}
        self.method_used: str | None = None
        self._hooks: dict[int, Any] = {}

    # -- lifecycle -----------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if set_up_in_order(self, trainer, pl_module, stage):
            return
        if id(pl_module) not in self._hooks:
            self._hooks[id(pl_module)] = pl_module.register_load_state_dict_pre_hook(
                functools.partial(_rebuild_before_loading, weakref.ref(trainer))
            )
        if stage != "fit":
            return
        self._check_order(trainer)
        if self.start is not None:
            self._setup_later_replacement(trainer, pl_module)
            return
        if self.layers and all(
            _has(pl_module, name) and isinstance(_get(pl_module, name), FACTORIZED) for name in self.layers
        ):
            return  # this module was factorized by an earlier fit with this callback
        original = remember_original(trainer, pl_module)
        self._replace(trainer, pl_module, original)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._start_step is not None and not self.layers:
            self._check_optimized(trainer, pl_module)
        # A resumed run rebuilds the structure from the checkpoint's keys; it must be the one recorded here.
        # Read from the weights' names and shapes, which stay the same when a later callback wraps the layers
        # (e.g. QuantizationAwareTraining's exported graph).
        shapes = {
            original_name(pl_module, key): tuple(value.shape) for key, value in pl_module.state_dict().items()
        }
        for name, layer in self.layers.items():
            rank = _rank_in_state(shapes, name)
            if rank != _as_rank(layer["rank"]):
                found = "no factorized layer there" if rank is None else f"rank {rank}"
                raise RuntimeError(
                    f"LowRankReplacement recorded layer {name!r} at rank {layer['rank']}, but the model has {found}. "
                    "The checkpoint and the callback's state disagree."
                )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.layers:
            self._log(trainer)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self.layers:
            add_checkpoint_hint(checkpoint, CHECKPOINT_HINT)

    def _log(self, trainer: pl.Trainer) -> None:
        metrics = self.metrics()
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=log_step(trainer))

    def _setup_later_replacement(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.world_size > 1:
            raise ValueError(
                f"`start={self.start!r}` replaces layers during training, which needs a single process; with "
                f"{trainer.world_size} processes leave `start=None` (replace in `setup`)."
            )
        later = [
            type(c).__name__
            for c in trainer.callbacks  # type: ignore[attr-defined]
            if c is not self and _selects_layers(c)
        ]
        if later:
            raise ValueError(
                f"LowRankReplacement(start={self.start!r}) replaces layers during training, but {', '.join(later)} "
                "set up on the layers as they were and would keep using the old ones. Leave `start=None` to "
                "combine them."
            )
        total, per_epoch = training_steps(trainer)
        start_step = resolve_point(self.start, total, per_epoch)  # type: ignore[arg-type]
        if start_step >= total:
            raise ValueError(
                f"`start={self.start!r}` is step {start_step}, but this fit ends after {total} steps: the layers "
                "would never be replaced. Give an earlier `start`, or leave it out to replace in `setup`."
            )
        self._start_step = start_step
        if not self.layers:
            # What the replacement will need is checked now, not at `start`, after training was spent.
            with _preserved_rng():
                self._prepare(trainer, pl_module, check_calibration=True)
        remember_original(trainer, pl_module)
        watch_loss(trainer)

    def _check_optimized(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Every trainable parameter of a layer replaced later must be in an optimizer: its factors take its place."""
        optimized = {
            id(p) for opt in trainer.optimizers for group in opt.param_groups for p in group["params"]
        }
        candidates, _ = self._candidates(pl_module)
        outside = [
            name
            for name, module in candidates.items()
            if any(p.requires_grad and id(p) not in optimized for p in module.parameters())
        ]
        if outside:
            raise ValueError(
                f"LowRankReplacement(start={self.start!r}) hands the factors of each replaced layer to the "
                f"optimizer that trains the layer, but no optimizer holds the trainable parameters of "
                f"{', '.join(map(repr, outside))}. Add them to the optimizer in `configure_optimizers`, freeze them "
                "(`requires_grad_(False)`: their factors then stay frozen), or leave them out with `exclude=`."
            )

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._start_step is None or self.layers or trainer.global_step < self._start_step:
            return
        self._start_step = None  # one attempt: when no layer would get smaller, the next steps do not retry
        swapped = self._replace(trainer, pl_module, remember_original(trainer, pl_module))
        if not swapped:
            return
        replaced: dict[nn.Parameter, list[nn.Parameter]] = {}
        for old, new in swapped.values():
            # Weights to the factors' weights, bias to bias: each keeps the optimizer (and group) it had.
            weights = [p for name, p in new.named_parameters() if not name.endswith("bias")]
            biases = [p for name, p in new.named_parameters() if name.endswith("bias")]
            for name, param in old.named_parameters():
                replaced[param] = biases if name == "bias" else weights
        replace_parameters(trainer, replaced)
        record_event(trainer, self, f"{len(swapped)} layers factorized")
        self._log(trainer)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            forget_original(trainer)  # the next fit takes a fresh copy of its own model
        handle = self._hooks.pop(id(pl_module), None)
        if handle is not None:
            handle.remove()

    # -- the replacement -----------------------------------------------------------------------------

    def _check_order(self, trainer: pl.Trainer) -> None:
        for callback in trainer.callbacks:  # type: ignore[attr-defined]
            if callback is self:
                return
            # An earlier LowRankReplacement is fine: the layers it factorized are not selected again.
            if _selects_layers(callback) and not isinstance(callback, LowRankReplacement):
                raise ValueError(
                    f"List LowRankReplacement before {type(callback).__name__} in `Trainer(callbacks=...)`: it "
                    f"replaces layers that {type(callback).__name__} selects, so it must set up first."
                )

    def _replace(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, original: nn.Module
    ) -> dict[str, tuple[nn.Module, nn.Module]]:
        """Factorize the selected layers in place; returns ``{name: (old layer, new layer)}``."""
        candidates, skipped, loader, example, positions, method = self._prepare(
            trainer, pl_module, warn=self.start is None
        )
        device = next(pl_module.parameters()).device
        kinds = {name: layer_kind(module, self.conv) for name, module in candidates.items()}
        stats = (
            self._calibrate(trainer, pl_module, loader, candidates, kinds, method, device)
            if method != "svd"
            else {}
        )
        decompositions = {
            name: decompose(
                module,
                conv=self.conv,
                stats=stats.get(name),
                method=method,
                damping=self.damping,
                alpha=self.alpha,
            )
            for name, module in candidates.items()
        }
        plan = trainer.strategy.broadcast(self._plan(decompositions, positions), src=0)

        self.layers, self.records = {}, []
        swapped: dict[str, tuple[nn.Module, nn.Module]] = {}
        for name, decision in plan.items():
            if isinstance(decision, str):
                skipped[name] = decision
                continue
            decomposition = decompositions[name]
            replacement = decomposition.build(decision)
            _keep_trainability(_get(pl_module, name), replacement)
            weight_error, output_error = decomposition.errors(replacement)
            swapped[name] = (_get(pl_module, name), replacement)
            _set(pl_module, name, replacement)
            rank = list(decision) if isinstance(decision, tuple) else decision
            self.layers[name] = {"kind": decomposition.kind, "rank": rank}
            self.records.append(
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
        self.skipped = skipped
        self.method_used = method
        self.totals = self._totals(original, pl_module, to_device(example, device))
        if self.verbose:
            rank_zero_info(self.summary())
        if not swapped:
            setting = next(
                f"`{n}={v!r}`"
                for n, v in (("rank", self.rank), ("energy", self.energy), ("budget", self.budget))
                if v is not None
            )
            reasons = "; ".join(f"{name}: {plan[name]}" for name in plan)
            rank_zero_warn(
                f"LowRankReplacement replaced no layer: at {setting} none of the {len(plan)} selected layers would "
                f"get smaller ({reasons}). Ask for less (a smaller `rank`/`energy`/`budget`), or select larger "
                "layers with `modules`."
            )
        return swapped

    def _prepare(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        warn: bool = True,
        check_calibration: bool = False,
    ) -> tuple[dict[str, nn.Module], dict[str, str], Iterable | None, Any, dict[str, tuple[int, int]], str]:
        """The layers to factorize, the training loader, the example input, the layers' positions and the method.

        Raises what can be known before any factorization: an empty selection, no usable layer, an input the model
        cannot be called on (with ``check_calibration``, also the first calibration batch's).
        """
        candidates, skipped = self._candidates(pl_module)
        tied = {name: reason for name, reason in skipped.items() if "tied weights" in reason}
        if tied and warn:
            rank_zero_warn(
                "LowRankReplacement leaves layers with tied weights as they are: "
                + "; ".join(f"{name!r}: {reason}" for name, reason in tied.items())
                + ". Factorizing one of them would untie the weights. Leave them out with `exclude=` to silence "
                "this warning."
            )
        loader = _training_loader(trainer)
        example = self._example(pl_module, loader)
        device = next(pl_module.parameters()).device
        positions = _positions(
            pl_module, to_device(example, device), candidates, self._example_source(pl_module)
        )
        for name in list(candidates):
            if name not in positions:
                skipped[name] = "not called in the forward pass"
                del candidates[name]
        if not candidates:
            raise ValueError(
                f"None of the layers selected by {self.selection} can be factorized: "
                + "; ".join(f"{n}: {r}" for n, r in skipped.items())
                + ". Select Linear or Conv2d layers with `modules`."
            )
        method = self.method
        if method == "auto":
            method = "whitened" if loader is not None else "svd"
        if method != "svd" and loader is None:
            raise ValueError(
                f"`method={method!r}` needs calibration batches from the training loader, and this Trainer has none. "
                "Pass training data to `fit`, or use `method='svd'`."
            )
        if check_calibration and method != "svd":
            assert loader is not None
            with torch.no_grad(), _eval_mode([pl_module]):
                self._call_on_batch(pl_module, next(iter(loader)), device)
        return candidates, skipped, loader, example, positions, method

    def _candidates(self, pl_module: nn.Module) -> tuple[dict[str, nn.Module], dict[str, str]]:
        selected = self.selection.select(pl_module)
        users: dict[int, list[str]] = {}
        for module_name, module in pl_module.named_modules():
            for param in module.parameters(recurse=False):
                users.setdefault(id(param), []).append(module_name)
        factorized = [name for name, module in pl_module.named_modules() if isinstance(module, FACTORIZED)]
        candidates: dict[str, nn.Module] = {}
        skipped: dict[str, str] = {}
        for name, module in selected:
            if isinstance(module, FACTORIZED) or any(name.startswith(f"{f}.") for f in factorized):
                continue
            reason = skip_reason(module)
            shared = [other for other in users.get(id(module.weight), []) if other != name]
            if reason is None and shared:
                reason = f"its weight is shared with {', '.join(map(repr, shared))} (tied weights)"
            if reason is None:
                candidates[name] = module
            else:
                skipped[name] = reason
        return candidates, skipped

    def _model_input(self, batch: Any) -> Any:
        try:
            return self.calibration_input(batch) if self.calibration_input is not None else first_input(batch)
        except Exception as err:
            raise _calibration_error(err, self.calibration_input is not None) from err

    def _call_on_batch(self, pl_module: nn.Module, batch: Any, device: torch.device) -> None:
        inputs = to_device(self._model_input(batch), device)
        try:
            call_module(pl_module, inputs)
        except (TypeError, ValueError, RuntimeError, IndexError, KeyError) as err:
            raise _calibration_error(err, self.calibration_input is not None) from err

    def _example_source(self, pl_module: pl.LightningModule) -> str:
        if self.example_input is not None:
            return "`example_input`"
        if pl_module.example_input_array is not None:
            return "the LightningModule's `example_input_array`"
        return "the first training batch's model input (see `calibration_input`)"

    def _example(self, pl_module: pl.LightningModule, loader: Iterable | None) -> Any:
        example = self.example_input if self.example_input is not None else pl_module.example_input_array
        if example is None and loader is not None:
            with _preserved_rng():
                example = self._model_input(next(iter(loader)))
        if example is None:
            raise ValueError(
                "LowRankReplacement counts the MACs of each layer on an example input: set `example_input_array` "
                "on the LightningModule, pass `example_input`, or give the Trainer training data."
            )
        return detach_input(example, max_batch=1)

    def _calibrate(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        loader: Iterable,
        candidates: dict[str, nn.Module],
        kinds: dict[str, str],
        method: str,
        device: torch.device,
    ) -> dict[str, InputStatistics]:
        stats: dict[str, InputStatistics] = {}
        for name, module in candidates.items():
            features = module.weight.shape[1] if kinds[name] == "tucker" else module.weight[0].numel()
            zeros = {"dtype": torch.float64, "device": device}
            stats[name] = InputStatistics(
                gram=torch.zeros(features, features, **zeros) if method == "whitened" else None,
                abs_sum=torch.zeros(features, **zeros),
            )

        def hook(name: str) -> Callable[..., None]:
            def record(module: nn.Module, args: tuple) -> None:
                stats[name].update(layer_features(module, args[0], kinds[name]), gram=method == "whitened")

            return record

        handles = [module.register_forward_pre_hook(hook(name)) for name, module in candidates.items()]
        world, me = trainer.world_size, trainer.global_rank
        try:
            with _preserved_rng(), torch.no_grad(), _eval_mode([pl_module]):
                for index, batch in enumerate(loader):
                    if index >= self.calibration_batches:
                        break
                    # Each process takes its share of the batches; the sums are all-reduced below.
                    if index % world == me:
                        self._call_on_batch(pl_module, batch, device)
        finally:
            for handle in handles:
                handle.remove()
        count = torch.tensor([stats[name].count for name in candidates], dtype=torch.float64, device=device)
        count = trainer.strategy.reduce(count, reduce_op="sum")
        for index, name in enumerate(candidates):
            s = stats[name]
            s.count = int(count[index])
            s.abs_sum = trainer.strategy.reduce(s.abs_sum, reduce_op="sum")
            if s.gram is not None:
                s.gram = trainer.strategy.reduce(s.gram, reduce_op="sum")
        return stats

    def _plan(
        self, decompositions: dict[str, Decomposition], positions: dict[str, tuple[int, int]]
    ) -> dict[str, Rank | str]:
        plan: dict[str, Rank | str] = {}

        def saves(decomposition: Decomposition, rank: Rank, where: tuple[int, int]) -> bool:
            return decomposition.params(rank) < decomposition.params() and decomposition.macs(
                where, rank
            ) < decomposition.macs(where)

        if self.budget is not None:
            options: dict[str, list[tuple[float, float]]] = {}
            dense: dict[str, float] = {}
            chains: dict[str, list[Rank]] = {}

            def cost(decomposition: Decomposition, rank: Rank | None, where: tuple[int, int]) -> float:
                if self.budget_on == "params":
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
            if options and self.allocation == "uniform":
                for name, opts in options.items():
                    fitting = [i for i, (c, _) in enumerate(opts) if c <= self.budget * dense[name]]
                    plan[name] = chains[name][fitting[-1] if fitting else 0]
            elif options:
                for name, index in allocate_budget(options, dense, self.budget).items():
                    plan[name] = "the budget leaves it dense" if index is None else chains[name][index]
            return {name: plan[name] for name in decompositions}

        for name, decomposition in decompositions.items():
            if isinstance(self.rank, int):
                try:
                    rank = decomposition.clamp_rank(self.rank)
                except ValueError as err:
                    raise ValueError(
                        f"`rank={self.rank}` is too large for layer {name!r}: {err} Use a smaller rank, a fraction "
                        "such as 0.5, or exclude the layer."
                    ) from None
            elif isinstance(self.rank, float):
                rank = decomposition.rank_for_fraction(self.rank)
            else:
                assert self.energy is not None
                rank = decomposition.rank_for_energy(self.energy)
            where = positions[name]
            if saves(decomposition, rank, where):
                plan[name] = rank
            else:
                plan[name] = (
                    f"rank {rank} would keep {decomposition.params(rank):,} parameters and "
                    f"{decomposition.macs(where, rank):,} MACs, not fewer than the "
                    f"{decomposition.params():,} and {decomposition.macs(where):,} of the layer"
                )
        return plan

    def _totals(self, original: nn.Module, pl_module: nn.Module, example: Any) -> dict[str, float]:
        params_before = sum(p.numel() for p in original.parameters())
        params_after = sum(p.numel() for p in pl_module.parameters())
        macs_before = count_macs(original.to(next(pl_module.parameters()).device), example)
        macs_after = count_macs(pl_module, example)
        return {
            "params_ratio": params_before / params_after,
            "macs_ratio": macs_before / macs_after if macs_after else math.nan,
            "replaced_layers": float(len(self.layers)),
            "skipped_layers": float(len(self.skipped)),
        }

    # -- reporting -----------------------------------------------------------------------------------

    def metrics(self) -> dict[str, float]:
        """What is logged at the start of training: totals (whole model) and, per replaced layer, rank and ratios.

        Names: ``low_rank/params_ratio``, ``low_rank/macs_ratio`` (original / factorized, whole model),
        ``low_rank/replaced_layers``, ``low_rank/skipped_layers``; per layer ``low_rank/per_layer/<stat>/<layer>``
        for the stats ``rank`` (Tucker: ``rank_in`` and ``rank_out``), ``weight_error``, ``output_error``
        (data-aware methods), ``params_ratio`` and ``macs_ratio``.
        """
        metrics = {f"low_rank/{key}": float(value) for key, value in self.totals.items()}
        if not self.log_per_layer:
            return metrics
        for record in self.records:
            layer: dict[str, float] = {}
            if isinstance(record["rank"], list):
                layer["rank_in"], layer["rank_out"] = map(float, record["rank"])
            else:
                layer["rank"] = float(record["rank"])
            layer["weight_error"] = record["weight_error"]
            if record["output_error"] is not None:
                layer["output_error"] = record["output_error"]
            layer["params_ratio"] = record["params_before"] / record["params_after"]
            layer["macs_ratio"] = record["macs_before"] / max(record["macs_after"], 1)
            metrics.update({per_layer_name("low_rank/", k, record["name"]): v for k, v in layer.items()})
        return metrics

    def summary(self) -> str:
        """A table of the replaced and the skipped layers."""
        rows = [("layer", "form", "rank", "params", "MACs", "weight err", "output err")]
        for r in self.records:
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
            f"LowRankReplacement ({self.method_used}): whole model {self.totals.get('params_ratio', 1.0):.2f}x fewer "
            f"parameters, {self.totals.get('macs_ratio', 1.0):.2f}x fewer MACs"
        ]
        lines += [
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows
        ]
        lines += [f"left as is: {name}: {reason}" for name, reason in self.skipped.items()]
        return "\n".join(lines)

    # -- checkpoints ---------------------------------------------------------------------------------

    @functools.cached_property
    def state_key(self) -> str:  # Lightning reads it at every hook call: computed once
        # Several LowRankReplacement callbacks (e.g. other layers at other ranks) keep separate states.
        return self._generate_state_key(
            rank=self.rank,
            energy=self.energy,
            budget=self.budget,
            budget_on=self.budget_on,
            conv=self.conv,
            selection=str(self.selection),
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "layers": {name: dict(layer) for name, layer in self.layers.items()},
            "records": [dict(record) for record in self.records],
            "skipped": dict(self.skipped),
            "totals": dict(self.totals),
            "method": self.method_used,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.layers = {name: dict(layer) for name, layer in state_dict["layers"].items()}
        self.records = [dict(record) for record in state_dict["records"]]
        self.skipped = dict(state_dict["skipped"])
        self.totals = dict(state_dict["totals"])
        self.method_used = state_dict["method"]


# -- rebuilding from a state dict ---------------------------------------------------------------------


def restore_low_rank(model: nn.Module, state_dict: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Give ``model`` the factorized layers a state dict holds, so that ``model.load_state_dict`` fits it.

    A layer is rebuilt where the state dict has ``<name>.first.weight`` but the model has a plain layer (or a
    factorization of another rank) there; the shapes in the state dict give the ranks. Weights are left at zero for
    ``load_state_dict`` to fill, and no random numbers are drawn; factors of a frozen layer are frozen. The entry
    :data:`CHECKPOINT_HINT` that checkpoints of :class:`LowRankReplacement` carry is removed from ``state_dict``
    (when it is mutable), so that a strict ``load_state_dict`` follows.

    Args:
        model: the model, e.g. a freshly constructed LightningModule.
        state_dict: the saved state (e.g. ``torch.load(ckpt)["state_dict"]``).
        prefix: prefix of ``model``'s keys in ``state_dict``.

    Returns:
        The names of the rebuilt layers.

    Example::

        >>> from lightning_compress.low_rank import factorize
        >>> trained = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> trained[0] = factorize(trained[0], rank=3)
        >>> fresh = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> restore_low_rank(fresh, trained.state_dict())
        ['0']
        >>> fresh.load_state_dict(trained.state_dict())
        <All keys matched successfully>
    """
    if isinstance(state_dict, MutableMapping):
        drop_checkpoint_hints(state_dict, prefix)
    rebuilt = []
    for name, module in list(model.named_modules()):
        key = f"{prefix}{name}." if name else prefix
        first = state_dict.get(key + "first.weight")
        if first is None:
            continue
        tucker = key + "core.weight" in state_dict
        if isinstance(module, FACTORIZED):
            if _rank_of(module) == _saved_rank(state_dict, key, tucker):
                continue
        elif type(module) not in (nn.Linear, nn.Conv2d) or key + "weight" in state_dict:
            continue
        replacement = _empty_like(module, state_dict, key, tucker)
        _keep_trainability(module, replacement)
        _set(model, name, replacement)
        rebuilt.append(name)
    return rebuilt


def _rebuild_before_loading(
    trainer: Callable[[], pl.Trainer | None],
    module: nn.Module,
    state_dict: MutableMapping[str, Any],
    prefix: str,
    *args: Any,
) -> None:
    dense = [
        name
        for name, layer in module.named_modules()
        if isinstance(layer, FACTORIZED)
        and f"{prefix}{name}.weight" in state_dict
        and f"{prefix}{name}.first.weight" not in state_dict
    ]
    if dense:
        running = trainer()
        path = getattr(running, "ckpt_path", None)
        source = f"The checkpoint {str(path)!r}" if path else "The state dict being loaded"
        raise ValueError(
            f"{source} holds the dense layer(s) {', '.join(map(repr, dense))} where the model has "
            "LowRankReplacement's factors: it was written without LowRankReplacement (or before its `start`), so "
            "it has no factors to load. To factorize "
            "the trained weights, load them into the model (`model.load_state_dict(torch.load(path)"
            "['state_dict'])`) and call `trainer.fit(model)` without `ckpt_path`; or keep `ckpt_path` and give "
            "`LowRankReplacement(start='step:0', ...)`, which factorizes the loaded weights at the first step."
        )
    restore_low_rank(module, state_dict, prefix)


def _keep_trainability(old: nn.Module, new: nn.Module) -> None:
    """Factors of a frozen weight (bias) stay frozen: factorizing must not start training what was frozen."""
    weight = any(p.requires_grad for n, p in old.named_parameters() if not n.endswith("bias"))
    bias = any(p.requires_grad for n, p in old.named_parameters() if n.endswith("bias"))
    for name, param in new.named_parameters():
        param.requires_grad_(bias if name.endswith("bias") else weight)


def _calibration_error(err: Exception, given: bool) -> Exception:
    """An error that names `calibration_input` for a failure to call the model on a training batch."""
    fix = (
        "Check that `calibration_input` returns what the model's forward takes"
        if given
        else "By default the model input is the batch's first element; pass `calibration_input`"
    )
    error = TypeError if isinstance(err, TypeError) else ValueError
    return error(
        f"LowRankReplacement runs the model on training batches to calibrate, and calling it on one failed with "
        f"{type(err).__name__}: {err}. {fix}, a function from a training batch to the model's input: a tensor, a "
        "tuple of positional arguments or a dict of keyword arguments, e.g. "
        "`calibration_input=lambda batch: (batch[0], batch[1])` or "
        "`calibration_input=lambda batch: {'x': batch['x'], 'mask': batch['mask']}`."
    )


def _saved_rank(state_dict: Mapping[str, Any], key: str, tucker: bool) -> Rank:
    first = state_dict[key + "first.weight"]
    if tucker:
        return (int(first.shape[0]), int(state_dict[key + "core.weight"].shape[0]))
    return int(first.shape[0])


def _empty_like(module: nn.Module, state_dict: Mapping[str, Any], key: str, tucker: bool) -> nn.Module:
    rank = _saved_rank(state_dict, key, tucker)
    param = next(module.parameters())
    like = {"device": param.device, "dtype": param.dtype}
    bias = key + ("last.bias" if tucker else "second.bias") in state_dict
    if isinstance(module, nn.Linear | LowRankLinear):
        in_features = module.in_features if isinstance(module, nn.Linear) else module.first.in_features
        out_features = module.out_features if isinstance(module, nn.Linear) else module.second.out_features
        return LowRankLinear(in_features, out_features, rank, bias=bias, **like)  # type: ignore[arg-type]
    # The k×k convolution carries the layer's geometry: the layer itself, the Tucker core, or the first factor.
    spatial = (
        module
        if isinstance(module, nn.Conv2d)
        else module.core
        if isinstance(module, TuckerConv2d)
        else module.first
    )
    in_channels = module.in_channels if isinstance(module, nn.Conv2d) else module.first.in_channels
    out_channels = module.out_channels if isinstance(module, nn.Conv2d) else module[-1].out_channels
    geometry = {
        "stride": spatial.stride,
        "padding": spatial.padding,
        "dilation": spatial.dilation,
        "bias": bias,
        "padding_mode": spatial.padding_mode,
        **like,
    }
    if tucker:
        return TuckerConv2d(in_channels, out_channels, spatial.kernel_size, rank, **geometry)  # type: ignore[arg-type]
    return LowRankConv2d(in_channels, out_channels, spatial.kernel_size, rank, **geometry)  # type: ignore[arg-type]


# -- helpers ------------------------------------------------------------------------------------------


def _rank_of(module: nn.Module) -> Rank | None:
    if isinstance(module, TuckerConv2d):
        return module.ranks
    if isinstance(module, LowRankLinear | LowRankConv2d):
        return module.rank
    return None


def _selects_layers(callback: Callback) -> bool:
    """Whether a callback acts on layers it selected at setup (pruning, quantization, weight sharing, ...)."""
    return isinstance(getattr(callback, "selection", None), ModuleSelection)


def _rank_in_state(shapes: dict[str, tuple[int, ...]], name: str) -> Rank | None:
    """The rank of the factorized layer ``name`` from state-dict shapes (``None``: not factorized)."""
    first = shapes.get(f"{name}.first.weight")
    if first is None:
        return None
    core = shapes.get(f"{name}.core.weight")
    return (first[0], core[0]) if core is not None else first[0]


def _as_rank(value: Any) -> Rank:
    return tuple(value) if isinstance(value, list | tuple) else int(value)  # type: ignore[return-value]


def _has(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def _get(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _number_in(
    value: Any, low: float, high: float, closed_left: bool = False, closed_right: bool = False
) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        return False
    above = value >= low if closed_left else value > low
    below = value <= high if closed_right else value < high
    return above and below


@contextlib.contextmanager
def _preserved_rng() -> Iterator[None]:
    # Drawing calibration batches (a shuffling sampler seeds itself from the global generator) must not shift the
    # random stream of training: a resumed run, which does not calibrate at the same point, would diverge.
    devices = (
        [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    )
    with torch.random.fork_rng(devices=devices):
        yield


def _training_loader(trainer: pl.Trainer) -> Iterable | None:
    """The training loader as the user gave it (before the strategy adds its distributed sampler)."""
    source = getattr(trainer.fit_loop, "_data_source", None)
    loader: Any = None
    if source is not None and source.instance is not None and source.is_defined():
        loader = source.dataloader()
    elif trainer.datamodule is not None:
        loader = trainer.datamodule.train_dataloader()
    if isinstance(loader, Mapping):
        loader = next(iter(loader.values()), None)
    elif isinstance(loader, list | tuple):
        loader = loader[0] if loader else None
    return loader


def _positions(
    model: nn.Module, example: Any, layers: dict[str, nn.Module], source: str = "the example input"
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
        with _preserved_rng(), torch.no_grad(), _eval_mode([model]):
            call_module(model, example)
    except (TypeError, ValueError, RuntimeError, IndexError, KeyError) as err:
        error = TypeError if isinstance(err, TypeError) else ValueError
        raise error(
            f"LowRankReplacement counts each layer's MACs on one sample, but the model cannot be called on {source}: "
            f"{type(err).__name__}: {err}. Give one sample as the model takes it: a tensor, a tuple of positional "
            "arguments or a dict of keyword arguments."
        ) from err
    finally:
        for handle in handles:
            handle.remove()
    return positions
