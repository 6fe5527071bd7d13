"""GradualPruning: prune on a schedule while fine-tuning (the pruning itself is :mod:`lightning_compress.pruning.core`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from lightning_compress import _checks, _lightning
from lightning_compress._events import record_event
from lightning_compress._inputs import first_input_or_none
from lightning_compress.callback import REMOVE_WEIGHTS, CompressionCallback, training_loader
from lightning_compress.pruning import calibration, core
from lightning_compress.pruning.core import PRUNED_CHECKPOINT_KEY, load_pruned_checkpoint
from lightning_compress.schedules import Point, Schedule, ScheduleFn
from lightning_compress.selection import Selector

__all__ = ["PRUNED_CHECKPOINT_KEY", "GradualPruning", "load_pruned_checkpoint"]


class GradualPruning(CompressionCallback):
    """Prune a model gradually while it trains, then make the result permanent.

    While training, pruned weights are exactly zero after every mask update and optimizer step; shapes and
    checkpoint keys do not change. At the end (``finalize=True``) structured pruning removes the pruned channels
    and attention heads for real. Modes, criteria, metrics and checkpoints: ``docs/pruning.md``.

    Args:
        amount: final fraction pruned, in ``[0, 1)`` (of weights; structured: of channels); see ``layer_amounts``.
        mode: ``"unstructured"``, ``"structured"`` or ``"N:M"`` (e.g. ``"2:4"``, which fixes ``amount``).
        criterion: ``"l1"``, ``"l2"``, ``"random"``; unstructured and N:M also ``"wanda"``, ``"sparsegpt"`` (from
            the layers' inputs); structured also ``"bn_scale"`` and ``"taylor"``.
        scope: ``"layer"`` (every layer reaches ``amount``) or ``"global"`` (one ranking across layers).
        max_layer_amount: unstructured ``scope="global"``: the most one layer may lose, in ``[amount, 1]``.
        schedule: schedule name or callable, see :mod:`lightning_compress.schedules`.
        start: when pruning starts (fraction of training, ``"step:N"`` or ``"epoch:N"``).
        end: when ``amount`` is reached (at the latest on the fit's last optimizer step, e.g. for ``end=1.0``).
        frequency: optimizer steps between mask updates (``None``: 20 updates over ``[start, end]``).
        initial_amount: amount at ``start``.
        modules: layers to prune (types and/or name patterns); structured: the layers whose channels go.
        exclude: layers to leave alone.
        min_params: leave out layers with fewer parameters.
        round_to: structured mode: keep channel counts a multiple of this (fast kernels).
        example_input: input to trace the model (structured) and count MACs; default ``example_input_array``,
            else (structured) the first training sample.
        finalize: make the pruning permanent at the end of training (``materialize`` is its deprecated name).
        per_layer: also log the sparsity of every pruned weight (``log_per_layer`` is its deprecated name).
        seed: seed of the random criterion.
        layer_amounts: ``{layer name: amount}``: each named layer's final fraction, see ``PruningConfig``.
        calibration_batches: ``"wanda"``/``"sparsegpt"``: training batches the model runs on before each update.
        calibration_input: a function from a training batch to the model's input, see ``PruningConfig``.
        calibration_mask: a function from that input to a ``(batch, positions)`` mask of the positions that count.

    Example::

        >>> pruning = GradualPruning(amount=0.9, mode="unstructured", schedule="agp", start=0.1, end=0.7)
        >>> GradualPruning(amount=0.5, mode="2:4")
        Traceback (most recent call last):
        ...
        ValueError: `mode='2:4'` fixes the sparsity at 1 - 2/4 = 0.5; leave `amount` unset (None).
    """

    prefix = "pruning/"
    effect_order = REMOVE_WEIGHTS
    selects_layers = True

    def __init__(
        self,
        amount: float | None = None,
        mode: str = "unstructured",
        criterion: str = "l1",
        scope: str = "layer",
        max_layer_amount: float | None = None,
        schedule: str | ScheduleFn = "agp",
        start: Point = 0.0,
        end: Point = 0.7,
        frequency: int | None = None,
        initial_amount: float = 0.0,
        modules: Selector = (nn.Conv2d, nn.Linear),
        exclude: Selector = None,
        min_params: int = 0,
        round_to: int = 8,
        example_input: Any = None,
        finalize: bool = True,
        per_layer: bool = False,
        seed: int = 0,
        materialize: bool | None = None,
        log_per_layer: bool | None = None,
        layer_amounts: dict[str, float] | None = None,
        calibration_batches: int = 8,
        calibration_input: Callable[[Any], Any] | None = None,
        calibration_mask: Callable[[Any], Any] | None = None,
    ) -> None:
        self.config = config = core.PruningConfig(
            amount, mode, criterion, scope, max_layer_amount, modules, exclude, min_params, round_to, seed,
            layer_amounts, calibration_batches, calibration_input, calibration_mask,
        )  # fmt: skip
        self.amount, self.mode, self.criterion, self.scope = config.amount, config.kind, criterion, scope
        self.selection, self.seed, self.layer_amounts = config.selection, seed, config.layer_amounts
        # The checkpoint key holds the user's arguments (a budget's `accept_allocation` does not change it).
        self._key = {"mode": self.mode, "amount": self.amount, "selection": str(self.selection)}
        self._key |= {} if layer_amounts is None else {"layer_amounts": self.layer_amounts}
        self.given_levels = {"amount": amount, "layer_amounts": layer_amounts}
        self.initial_amount = _checks.check_initial_amount(initial_amount, config.amount, config.kind, mode)
        ramp = _checks.check_pruning_ramp(schedule, start, end, frequency)
        self.schedule, self.start, self.end, self.frequency = ramp
        self._example_input = example_input
        # `finalize()` is the end-of-training step of every compression callback: the argument is `finalize_at_end`.
        flags = {"materialize": (materialize, "finalize", finalize, True)}
        flags["log_per_layer"] = (log_per_layer, "per_layer", per_layer, False)
        self.finalize_at_end, self.per_layer = _checks.renamed_flags("GradualPruning", flags)
        self._plan: core.PruningPlan | None = None
        self._reset()

    def _reset(self) -> None:
        # A checkpoint's state, given to the plan at `on_fit_start` (the weights are loaded by then).
        self._restored: dict[str, Any] | None = None
        self._metrics: tuple[dict[str, float], dict[str, dict[str, float]]] = ({}, {})
        self._last_input: Any = None
        self.materialized, self.materialize_max_abs_diff, self.last_update_step = False, None, None

    @property
    def changes_structure(self) -> bool:  # type: ignore[override]
        return self.mode == "structured"

    @property
    def budget_scheme(self) -> str | None:  # type: ignore[override]
        return self.config.budget_scheme

    def accept_allocation(self, arguments: dict[str, Any]) -> None:
        """Take ``{"layer_amounts": {layer: amount}}`` (from a budget, before setup) as if given as the argument."""
        amounts = _checks.check_allocation(arguments, "layer_amounts", "GradualPruning")
        self.config = self.config.with_layer_amounts(amounts)
        self.layer_amounts = self.config.layer_amounts

    @property
    def masks(self) -> dict[str, Tensor]:  # by parameter name, True = keep
        return self._plan.masks if self._plan is not None else {}

    @property
    def plan(self) -> dict[str, list[int]]:  # structured: {channel group root or attention module: removed}
        return self._plan.removed if self._plan is not None else {}

    @property
    def current_amount(self) -> float:
        return self._plan.amount if self._plan is not None else 0.0

    def state_key_fields(self) -> dict[str, Any]:
        return dict(self._key)

    def prepare_evaluation(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # `Trainer.test(ckpt_path=...)` loads a checkpoint that may carry the hint for `load_from_checkpoint` users.
        self.track_hook(core.accept_pruned_checkpoints(pl_module, evaluating=True))

    def prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Every fit prunes its own model from scratch (a resumed fit then loads its state from the checkpoint).
        self._plan = None
        self._reset()
        self.track_hook(core.accept_pruned_checkpoints(pl_module))
        _checks.check_pruning_amount_given(self.mode, self.config.amount, self.layer_amounts, budget=True)
        start = self.step_of(trainer, self.start, "start")
        end = start if self.mode == "N:M" else self.step_of(trainer, self.end, "end")
        _checks.check_taylor_setup(self.criterion, start, pl_module.automatic_optimization)
        _checks.check_pruning_precision(self.mode, str(getattr(trainer, "precision", "32-true")))
        structured = self.mode == "structured"  # traces the model: an example from the data if none is given
        example = self.example_input(trainer if structured else None, pl_module, self._example_input)
        quiet = not trainer.is_global_zero  # every rank takes the same decisions: one warns
        self._plan = core.PruningPlan(pl_module, self.config, example, caller="GradualPruning", quiet=quiet)
        ramp = (self.initial_amount, self.schedule, self.frequency, self.start, self._plan.final_amount)
        steps = trainer.estimated_stepping_batches  # inf for a fit of unknown length
        self._schedule: Schedule = core.pruning_schedule(self.config, start, end, steps, *ramp, self.end)
        self.ramp_end = self._schedule.end
        layers, loader = self._plan.calibrated_layers(), training_loader(trainer)
        calibration.check_calibration_input(pl_module, loader, self.config, layers)
        if reasons := self._plan.skipped_reasons():
            rank_zero_info(f"GradualPruning leaves these layers' channels alone: {reasons}.")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        plan = self._plan
        assert plan is not None
        callbacks = trainer.callbacks  # type: ignore[attr-defined]
        others = [type(c).__name__ for c in callbacks if c is not self and getattr(c, "selects_layers", 0)]
        # Looked up again by name: the strategy may have replaced them (FSDP).
        plan.bind(dict(pl_module.named_parameters()), wrapper=type(trainer.strategy).__name__, others=others)
        self.on_optimizer_step(trainer, plan.mask_weights, plan.params.values())
        if self._restored is not None:
            plan.load_state_dict(self._restored)
            self._restored = None
        if plan.masks:
            # Resumed: exact zeros from the first step on, and the restored state logged until the next update.
            plan.apply()
            plan.park_optimizer_state(trainer.optimizers)
            self._metrics = plan.metrics(pl_module, self.per_layer)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.mode == "structured":
            # Real data to check the removal on (by reference; a few samples of it go into checkpoints).
            self._last_input = first_input_or_none(batch)
        step, schedule = trainer.global_step, self._schedule
        if step > schedule.end or self.last_update_step == step or not schedule.is_update_step(step):
            return
        target = schedule.value(step)
        if target > self.current_amount or not self.masks:
            self._update_masks(trainer, pl_module, target)
            record_event(trainer, self, f"masks updated to amount {self.current_amount:.3g}")
        self.last_update_step = step

    def _update_masks(self, trainer: pl.Trainer, pl_module: pl.LightningModule, target: float) -> None:
        plan: core.PruningPlan = self._plan  # type: ignore[assignment]
        grads = _checks.check_taylor_gradients(plan.grads) if self.criterion == "taylor" else None
        grads = grads and _lightning.mean_over_processes(trainer, grads)
        # The float layers under the names recorded at setup, also when a graph runs them.
        with _lightning.float_view(pl_module):
            if self.config.calibrated:
                self._calibrate(trainer, plan)
            plan.compute_masks(target, grads)
        # Every rank must hold the same masks (and sparsegpt's weights): rank zero's.
        plan.share(lambda value: trainer.strategy.broadcast(value, src=0))
        plan.apply()
        plan.park_optimizer_state(trainer.optimizers)
        self._metrics = plan.metrics(pl_module, self.per_layer)

    def _calibrate(self, trainer: pl.Trainer, plan: core.PruningPlan) -> None:
        # Each rank runs its share of the first training batches, the sums added over the ranks.
        count, to_input = self.config.calibration_batches, self.config.calibration_input
        with _lightning.calibration_inputs(trainer, training_loader(trainer), count, to_input) as inputs:
            plan.calibrate(inputs, reduce=lambda tensor: trainer.strategy.reduce(tensor, reduce_op="sum"))

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self.criterion == "taylor":  # the scores |w * g| of the next decision sum the gradients until then
            self._plan.accumulate_gradients()  # type: ignore[union-attr]
        self._plan.mask_gradients()  # type: ignore[union-attr]

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.masks and trainer.global_step % core.PARK_EVERY == 0:
            self._plan.park_optimizer_state(trainer.optimizers)  # type: ignore[union-attr]
        # `log` costs tens of microseconds per call: only call it on the steps the loggers will write.
        connector = getattr(trainer, "_logger_connector", None)
        if trainer.loggers and (connector is None or connector.should_update_logs):
            self.log_values(pl_module, *self._metrics)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.mode == "structured" and self.plan:
            # The cost once the channels are removed, measured on a pruned copy once per epoch (per update: slow).
            with _lightning.float_view(pl_module):
                cost = self._plan.cost_after_removal(pl_module)  # type: ignore[union-attr]
            self.log_values(pl_module, cost, epoch=True)

    def finalize(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.finalize_at_end or self.materialized or self._plan is None:
            return
        inputs = [] if self._last_input is None else [core.check_samples(self._last_input, pl_module.device)]
        # Channels are removed from the float layers (a graph running the model follows the change).
        with _lightning.float_view(pl_module):
            diff = self._plan.finalize(pl_module, inputs)
        self._last_input = None
        if diff is not None:
            self.materialize_max_abs_diff = diff
            removed = sum(len(v) for v in self.plan.values())
            rank_zero_info(f"GradualPruning removed {removed} channels and heads (output change {diff:.2e}).")
        self.materialized = True

    def unfinished(self, trainer: pl.Trainer) -> tuple[str, int, str] | None:
        ramp, last, now = getattr(self, "_schedule", None), self.last_update_step, self.current_amount
        if ramp is not None and (last is None or last < ramp.end):
            return "end", ramp.end, f"the amount is {now:.3g} of {ramp.final:.3g}"
        return None

    def release(self) -> None:
        self._last_input = None

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self.mode == "structured" and self.materialized and any(self.plan.values()):
            _lightning.add_checkpoint_hint(checkpoint, PRUNED_CHECKPOINT_KEY)

    def state_dict(self) -> dict[str, Any]:
        state = self._plan.state_dict() if self._plan is not None else dict(self._restored or {})
        state.update(last_update_step=self.last_update_step, materialized=self.materialized, mode=self.mode)
        state["check_input"] = core.check_samples(self._last_input, "cpu")
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        _checks.check_pruning_checkpoint_mode(state_dict, self.mode)
        self._restored = dict(state_dict)
        self.last_update_step = state_dict["last_update_step"]
        self.materialized = state_dict["materialized"]
        self._last_input = state_dict.get("check_input")
