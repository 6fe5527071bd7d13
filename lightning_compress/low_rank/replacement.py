"""LowRankReplacement: replace Linear and Conv2d layers by low-rank factorizations before fine-tuning.

The whole-model work is :mod:`lightning_compress.low_rank.core`; this callback decides when, feeds it the training
batches, logs, and keeps the structure in checkpoints.
"""

from __future__ import annotations

import copy
import dataclasses
import weakref
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lightning_compress import _checks
from lightning_compress._events import record_event
from lightning_compress._lightning import (
    add_checkpoint_hint,
    per_layer_name,
    replace_parameters,
    training_steps,
)
from lightning_compress.callback import (
    REPLACE_LAYERS,
    CompressionCallback,
    compression_callbacks,
    preserved_rng,
    training_loader,
)
from lightning_compress.low_rank import core
from lightning_compress.low_rank.core import Collective, LowRankConfig, LowRankResult, LowRankTargets
from lightning_compress.low_rank.factorize import FACTORIZED
from lightning_compress.low_rank.restore import (
    CHECKPOINT_HINT,
    check_recorded_ranks,
    load_hook,
    restore_low_rank,
)
from lightning_compress.schedules import Point, resolve_point, validate_point
from lightning_compress.selection import Selector

__all__ = ["CHECKPOINT_HINT", "LowRankReplacement", "restore_low_rank"]

_NAME = "LowRankReplacement"
_STATE = ("layers", "records", "skipped", "totals", "method")  # the keys of the callback's state_dict


class LowRankReplacement(CompressionCallback):
    """Replace ``nn.Linear`` / ``nn.Conv2d`` layers by low-rank factorizations at the start of fine-tuning.

    In ``setup()`` (before the optimizers exist and the strategy wraps the model) every selected layer is
    factorized from its current weights and swapped for a product of thinner layers; training then fine-tunes the
    factors. A layer is only replaced when that makes it smaller in parameters *and* MACs; the others are in
    :attr:`skipped` with the reason. Data-aware methods calibrate on the first ``calibration_batches`` training
    batches (split across processes under DDP, the statistics all-reduced, rank zero's ranks broadcast).
    Checkpoints keep the factors: a load hook rebuilds them from the checkpoint's keys, and the checkpoint's
    ``state_dict`` carries :data:`CHECKPOINT_HINT` for a plain ``load_from_checkpoint`` (see
    :func:`restore_low_rank`). Forms, rank rules, methods and checkpoints: ``docs/low_rank.md``.

    Args:
        rank, energy, budget, budget_on, allocation, method, conv, modules, exclude, min_params,
            calibration_batches, damping, activation_exponent, layer_ranks: see
            :class:`~lightning_compress.low_rank.LowRankConfig` (give at most one of ``rank``, ``energy``,
            ``budget``; none when ``layer_ranks`` names every layer, or a ``CompressionBudget`` gives them).
        calibration_input: maps a training batch to the model's input (a tensor, a tuple of positional arguments or
            a dict of keyword arguments); default: the batch's first element.
        calibration_mask: a function from that input to a ``(batch, positions)`` mask of the positions the
            statistics count (not the padding, e.g. ``lambda x: x["attention_mask"]``), see ``LowRankConfig``.
        example_input: input of one sample, to count MACs per layer; default ``example_input_array``, else the
            first training batch.
        per_layer: log rank, errors and ratios of every replaced layer (else only totals).
        verbose: print a table of the replacement on rank zero.
        start: ``None`` (default) replaces in ``setup``. A point of training (fraction, ``"step:N"``, ``"epoch:N"``)
            replaces at that step instead, from the weights trained so far; the factors take the old layers'
            places in the optimizers' parameter groups. Single process only, and not together with callbacks that
            select layers.
        alpha: deprecated name of ``activation_exponent``.
        log_per_layer: deprecated name of ``per_layer``.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> lowrank = LowRankReplacement(budget=0.5, modules=nn.Linear)
        >>> trainer = Trainer(callbacks=[lowrank], max_epochs=1, logger=False)
        >>> LowRankReplacement(rank=0)
        Traceback (most recent call last):
        ...
        ValueError: `rank=0` must be a positive int (a fixed rank) or a float in (0, 1] (a fraction of the full rank).
    """

    prefix = "low_rank/"
    effect_order = REPLACE_LAYERS
    selects_layers = True
    changes_structure = True
    budget_scheme = "low_rank"

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
        activation_exponent: float = 0.5,
        per_layer: bool = True,
        verbose: bool = True,
        start: Point | None = None,
        alpha: float | None = None,
        log_per_layer: bool | None = None,
        layer_ranks: dict[str, int | float] | None = None,
        calibration_mask: Callable[[Any], Any] | None = None,
    ) -> None:
        old_a, old_p = _checks.check_low_rank_deprecated(alpha, log_per_layer)
        exponent = _checks.renamed(_NAME, "alpha", old_a, "activation_exponent", activation_exponent, 0.5)
        per_layer = _checks.renamed(_NAME, "log_per_layer", old_p, "per_layer", per_layer, True)
        self.config = LowRankConfig(
            rank, energy, budget, budget_on, allocation, method, conv, modules, exclude, min_params,
            calibration_batches, damping, exponent, layer_ranks, calibration_mask=calibration_mask,
        )  # fmt: skip
        self._given_ranks = self.config.layer_ranks  # the checkpoint key holds the user's, not a budget's
        self.given_levels = {"rank": rank, "energy": energy, "budget": budget, "layer_ranks": layer_ranks}
        self.calibration_input = _checks.check_calibration_input(calibration_input)
        self.per_layer = _checks.check_bool(per_layer, "per_layer")
        self.verbose = _checks.check_bool(verbose, "verbose")
        self.start = None if start is None else validate_point(start, "start")
        self._example_input = example_input
        # Decisions, kept in checkpoints: `layers`, `records`, `skipped`, `totals`, `method_used`.
        self.load_state_dict({"layers": {}, "records": [], "skipped": {}, "totals": {}, "method": None})
        self.release()

    def __getattr__(self, name: str) -> Any:  # the config's fields read as the callback's (`lowrank.rank`)
        config = self.__dict__.get("config")
        if config is not None and name in LowRankConfig.__dataclass_fields__:
            return getattr(config, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def state_key_fields(self) -> dict[str, Any]:
        # Several LowRankReplacement callbacks (e.g. other layers at other ranks) keep separate states.
        c, ranks = self.config, self._given_ranks
        return dict(rank=c.rank, energy=c.energy, budget=c.budget, budget_on=c.budget_on, conv=c.conv,
                    selection=str(c.selection)) | ({} if ranks is None else {"layer_ranks": ranks})  # fmt: skip

    def accept_allocation(self, arguments: dict[str, Any]) -> None:
        """Take ``{"layer_ranks": {layer: rank}}`` (from a budget, before setup) as if given as the argument."""
        ranks = _checks.check_allocation(arguments, "layer_ranks", _NAME)
        self.config = dataclasses.replace(self.config, layer_ranks=ranks)

    # -- lifecycle -----------------------------------------------------------------------------------

    def prepare_evaluation(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        running = weakref.ref(trainer)  # names the checkpoint in errors
        hook = load_hook(lambda: getattr(running(), "ckpt_path", None))
        self.track_hook(pl_module.register_load_state_dict_pre_hook(hook))

    def prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.prepare_evaluation(trainer, pl_module, "fit")
        _checks.check_low_rank_rule_given(self.config.rule, self.config.layer_ranks, [], budget=True)
        _checks.check_low_rank_first(self, compression_callbacks(trainer))
        if self.start is not None:
            _checks.check_low_rank_later(self, compression_callbacks(trainer), trainer.world_size)
            total, per_epoch = training_steps(trainer)
            self._start_step = resolve_point(self.start, total, per_epoch)  # type: ignore[arg-type]
            _checks.check_low_rank_start_step(self.start, self._start_step, total)
            if not self.layers:  # what the replacement needs is checked now, not after training was spent
                self._targets = self._targets_of(trainer, pl_module, check_calibration=True)
            return
        modules = dict(pl_module.named_modules())
        if not self.layers or not all(isinstance(modules.get(name), FACTORIZED) for name in self.layers):
            self._replace(trainer, pl_module, self._targets_of(trainer, pl_module))
        # else this module was factorized by an earlier fit with this callback

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._targets is not None and not self.layers:
            held = [p for o in trainer.optimizers for g in o.param_groups for p in g["params"]]
            _checks.check_low_rank_optimized(self.start, core.layers_outside(pl_module, self.config, held))
        # A resumed run rebuilds the structure from the checkpoint's keys; it must be the one recorded here. Read
        # from the weights' names and shapes, which stay the same when a later callback wraps the layers.
        check_recorded_ranks(
            self.layers,
            {k: tuple(v.shape) for k, v in pl_module.state_dict().items()},
        )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.layers:
            self.log_to_loggers(trainer, self._values())

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._start_step is None or self.layers or trainer.global_step < self._start_step:
            return
        self._start_step = None  # one attempt: when no layer would get smaller, the next steps do not retry
        assert self._targets is not None
        result = self._replace(trainer, pl_module, self._targets)
        if result.replaced:  # the factors take the old layers' places in the optimizers' parameter groups
            replace_parameters(trainer, result.parameter_map())
            record_event(trainer, self, f"{len(result.replaced)} layers factorized")
            self.log_to_loggers(trainer, self._values())

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self.layers:
            add_checkpoint_hint(checkpoint, CHECKPOINT_HINT)

    def unfinished(self, trainer: pl.Trainer) -> tuple[str, int, str] | None:
        if self._start_step is not None and not self.layers:
            return "start", self._start_step, "no layer was factorized"
        return None

    def release(self) -> None:
        self._targets: LowRankTargets | None = None
        self._result: LowRankResult | None = None
        self._start_step: int | None = None

    # -- the replacement -----------------------------------------------------------------------------

    def _targets_of(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, check_calibration: bool = False
    ) -> LowRankTargets:
        loader = training_loader(trainer)
        with preserved_rng(loader):
            example = self.example_input(trainer, pl_module, self._example_input, 1, self._model_input)
            _checks.check_low_rank_data(self.config, loader is not None, example is not None)
            source = self.example_source(self._example_input, pl_module, "(see `calibration_input`)")
            return core.find_targets(
                pl_module, self.config, example, loader, calibration_input=self.calibration_input,
                collective=_collective(trainer), example_source=source, check_calibration=check_calibration,
            )  # fmt: skip

    def _replace(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, targets: LowRankTargets
    ) -> LowRankResult:
        loader = training_loader(trainer)
        with preserved_rng(loader):
            result = core.replace_targets(
                pl_module, self.config, targets, loader,
                calibration_input=self.calibration_input, collective=_collective(trainer),
            )  # fmt: skip
        # Whole-model totals compare with the model before the first LowRankReplacement of this fit.
        earlier = [c._result for c in trainer.callbacks if isinstance(c, LowRankReplacement) and c._result]  # type: ignore[attr-defined]
        self._result, self._targets = result, None
        self.layers, self.records, self.skipped = result.layers, result.records, result.skipped
        self.method_used, self.totals = result.method, result.totals(earlier[0] if earlier else None)
        if self.verbose:
            rank_zero_info(self.summary())
        return result

    def _model_input(self, batch: Any) -> Any:
        return core.model_input(batch, self.calibration_input)

    # -- reporting -----------------------------------------------------------------------------------

    def _values(self) -> dict[str, float]:
        return {name.removeprefix(self.prefix): value for name, value in self.metrics().items()}

    def metrics(self) -> dict[str, float]:
        """What is logged when the layers are replaced: ``low_rank/params_ratio``, ``low_rank/macs_ratio`` (whole
        model, original / factorized), ``low_rank/replaced_layers``, ``low_rank/skipped_layers``, and with
        ``per_layer`` ``low_rank/per_layer/<stat>/<layer>`` for the stats of
        :func:`~lightning_compress.low_rank.core.layer_metrics`."""
        metrics = {self.prefix + key: float(value) for key, value in self.totals.items()}
        for record in self.records if self.per_layer else []:
            for stat, value in core.layer_metrics(record).items():
                metrics[per_layer_name(self.prefix, stat, record["name"])] = value
        return metrics

    def summary(self) -> str:
        """A table of the replaced and the skipped layers."""
        return core.summary_table(self.records, self.skipped, self.method_used, self.totals)

    # -- checkpoints ---------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        values = (self.layers, self.records, self.skipped, self.totals, self.method_used)
        return copy.deepcopy(dict(zip(_STATE, values, strict=True)))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = copy.deepcopy(state_dict)
        self.layers, self.records, self.skipped = state["layers"], state["records"], state["skipped"]
        self.totals, self.method_used = state["totals"], state["method"]


def _collective(trainer: pl.Trainer) -> Collective:
    return Collective.of(trainer.strategy, trainer.global_rank, trainer.world_size)
