"""GradualPruning: prune weights on a schedule while fine-tuning, as masks during training and for real at the end."""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import os
import re
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from lightning_compress._events import record_event, watch_loss
from lightning_compress._inputs import call_module, to_device
from lightning_compress._lightning import (
    add_checkpoint_hint,
    build_schedule,
    detach_input,
    drop_checkpoint_hints,
    first_input,
    float_view,
    forget_original,
    named_parameters_by_original_name,
    per_layer_name,
    remember_original,
    set_up_in_order,
)
from lightning_compress.pruning.masks import (
    CRITERIA,
    SCOPES,
    apply_masks,
    check_choice,
    nm_masks,
    pack_mask,
    unpack_mask,
    unstructured_masks,
    validate_nm,
)
from lightning_compress.schedules import (
    SCHEDULE_NAMES,
    Point,
    Schedule,
    ScheduleFn,
    resolve_schedule,
    validate_amount,
    validate_point,
)
from lightning_compress.selection import ModuleSelection, Selector
from lightning_compress.stats import count_macs, count_macs_by_module

MODES = ("unstructured", "structured", "N:M")
# Optimizer state that optimizers take the square root of (Adam, AdamW, AMSGrad, RMSprop, Adagrad). For pruned
# entries it is parked at 1.0 rather than 0.0: the update stays exactly zero (the first moment and the gradient
# are zero), but the CPU's vectorized sqrt is about 20x slower on zeros than on normal floats, and a value that
# decays toward zero turns denormal, slower still. Parking keeps the step of a 90% sparse model as fast as dense.
_SECOND_MOMENTS = frozenset({"exp_avg_sq", "max_exp_avg_sq", "square_avg", "sum"})
# Parked values decay by the optimizer's beta2 per step; refreshed this often they stay normal for beta2 >= 0.5.
_PARK_EVERY = 100
_NM = re.compile(r"^(\d+):(\d+)$")
# Samples of the last training batch on which removing the pruned channels is checked (besides the example input).
_CHECK_SAMPLES = 4
# Saved in the `state_dict` of a checkpoint written after channels were removed. Loading such a checkpoint into a
# freshly built (unpruned) model fails on the shapes, and Lightning's `load_from_checkpoint` cannot be changed to
# rebuild them; strict loading lists unexpected keys first, so this key tells the user what to use instead. Our
# own loading paths drop it.
PRUNED_CHECKPOINT_KEY = (
    "lightning_compress: channels were removed by GradualPruning(mode='structured'); load this checkpoint with "
    "`lightning_compress.pruning.gradual.load_pruned_checkpoint(YourModule(...), path)`, not load_from_checkpoint"
)
_HINT_HOOKS: weakref.WeakKeyDictionary[nn.Module, Any] = weakref.WeakKeyDictionary()


def _drop_hint(
    module: nn.Module,
    state_dict: dict[str, Any],
    prefix: str,
    local_metadata: Any,
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    if PRUNED_CHECKPOINT_KEY not in drop_checkpoint_hints(state_dict, prefix):
        return
    own = module.state_dict()
    if any(k[len(prefix) :] in own and own[k[len(prefix) :]].shape != v.shape for k, v in state_dict.items()):
        error_msgs.append(
            f"This checkpoint holds a model whose channels were removed by structured pruning, and "
            f"{type(module).__name__} has the unpruned shapes. Rebuild the pruned model with "
            "`model = load_pruned_checkpoint(YourModule(...), path)` and fit it without `ckpt_path`."
        )


class GradualPruning(Callback):
    """Prune a model gradually while it trains, then make the result permanent.

    During training pruning is a set of masks held by the callback: pruned weights are set to exactly zero at
    every mask update and after every optimizer step (their gradients and first moments are zeroed too, so
    momentum and weight decay cannot revive them; second moments are parked at 1.0, which keeps Adam's step on
    the CPU as fast as for the dense model). Parameter shapes, optimizers, DDP and checkpoint keys are
    untouched, and validation runs the pruned model. At the end of training (``materialize=True``) unstructured
    and N:M masks are simply dropped (the weights already hold the zeros; no reparametrization is ever added)
    and structured pruning removes the pruned channels for real, with torch-pruning's dependency graph, so
    the model has fewer parameters and MACs and runs faster.

    Modes:

    - ``"unstructured"``: individual weights by magnitude (``criterion="l1"``) or at random, per layer or with
      one global threshold (``scope="global"``).
    - ``"N:M"`` such as ``"2:4"``: in every group of M consecutive weights along the input dimension keep the N
      largest. The pattern is applied at ``start`` and kept; ``amount`` is ``1 - N/M`` by definition.
    - ``"structured"``: whole channels / neurons, with every coupled layer (residual adds, BatchNorm, the next
      layer's inputs) pruned together. ``amount`` is the fraction of channels removed. Criteria: ``"l1"``,
      ``"l2"`` (group magnitude), ``"bn_scale"``, ``"taylor"`` (first order, from gradients), ``"random"``.

    ``amount`` is the *absolute* target sparsity of the selected weights (not a fraction of what is left),
    reached along ``schedule`` between ``start`` and ``end``, updated every ``frequency`` optimizer steps.

    A weight shared by several layers (tied embedding and decoder) is pruned once, with one mask (unstructured
    and N:M); structured pruning refuses channels that cut a shared weight, at setup. Every fit starts afresh, so
    one instance can serve several Trainers. A checkpoint written after channels were removed carries a
    ``state_dict`` key (:data:`PRUNED_CHECKPOINT_KEY`) that makes ``load_from_checkpoint`` of the unpruned class
    name :func:`load_pruned_checkpoint` in its error; that function and this callback's loading drop it.

    Args:
        amount: final fraction pruned, in ``[0, 1)`` (weights for unstructured, channels for structured).
        mode: ``"unstructured"``, ``"structured"`` or ``"N:M"`` (e.g. ``"2:4"``).
        criterion: importance criterion (see above).
        scope: ``"layer"`` (every layer reaches ``amount``) or ``"global"`` (one ranking across layers).
        max_layer_amount: unstructured ``scope="global"`` only: the largest fraction of its weights any one layer
            may lose (``None``: no limit). The global ranking skips a layer once it reaches this fraction and
            prunes the next-ranked weights elsewhere, so the total still reaches ``amount``; it must therefore be
            at least ``amount``. Without it a layer whose weights all rank low (often the classifier) can lose
            every weight, which is warned about.
        schedule: schedule name or callable, see :mod:`lightning_compress.schedules`.
        start: when pruning starts (fraction of training, ``"step:N"`` or ``"epoch:N"``).
        end: when ``amount`` is reached (at the latest on the fit's last optimizer step, e.g. for ``end=1.0``).
        frequency: optimizer steps between mask updates (``None``: 20 updates over ``[start, end]``).
        initial_amount: amount at ``start``.
        modules: layers to prune (types and/or name patterns); for structured mode, the layers whose output
            channels are pruned.
        exclude: layers to leave alone.
        min_params: leave out layers with fewer parameters.
        round_to: structured mode: keep channel counts a multiple of this (fast kernels).
        example_input: input to trace the model (structured) and count MACs; default ``example_input_array``,
            else the first training sample.
        materialize: make the pruning permanent at the end of training.
        log_per_layer: also log the sparsity of every pruned weight.
        seed: seed of the random criterion.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> pruning = GradualPruning(amount=0.9, mode="unstructured", schedule="agp", start=0.1, end=0.7)
        >>> trainer = Trainer(callbacks=[pruning], max_epochs=10, logger=False)
        >>> GradualPruning(amount=0.5, mode="2:4")
        Traceback (most recent call last):
        ...
        ValueError: `mode='2:4'` fixes the sparsity at 1 - 2/4 = 0.5; leave `amount` unset (None).
    """

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
        materialize: bool = True,
        log_per_layer: bool = False,
        seed: int = 0,
    ) -> None:
        nm = _NM.match(mode) if isinstance(mode, str) else None
        if nm is not None:
            self.n, self.m = int(nm.group(1)), int(nm.group(2))
            if not 1 <= self.n <= self.m:
                raise ValueError(f"`mode={mode!r}`: N:M needs 1 <= N <= M, e.g. '2:4'.")
            if amount is not None:
                raise ValueError(
                    f"`mode={mode!r}` fixes the sparsity at 1 - {self.n}/{self.m} = {1 - self.n / self.m:g}; "
                    "leave `amount` unset (None)."
                )
            amount = 1.0 - self.n / self.m
            self.mode = "N:M"
        else:
            self.mode = check_choice(mode, ("unstructured", "structured"), "mode") if mode != "N:M" else mode
            if self.mode == "N:M":
                raise ValueError("`mode='N:M'` needs numbers, e.g. `mode='2:4'`.")
            if amount is None:
                raise ValueError(
                    f"`amount` is required for `mode={mode!r}`: the final fraction to prune, e.g. 0.9."
                )
        self.amount = validate_amount(amount, "amount")
        self.initial_amount = validate_amount(initial_amount, "initial_amount")
        if self.initial_amount > self.amount:
            raise ValueError(
                f"`initial_amount={initial_amount}` is above `amount={amount}`; pruning only grows."
            )
        if self.mode == "structured":
            from lightning_compress.pruning.structured import IMPORTANCES

            self.criterion = check_choice(criterion, IMPORTANCES, "criterion")
        else:
            self.criterion = check_choice(criterion, CRITERIA, "criterion")
        self.scope = check_choice(scope, SCOPES, "scope")
        if self.mode == "N:M":
            # The N:M pattern is one magnitude decision per group of M weights, taken once at `start`.
            if self.criterion not in ("l1", "l2"):
                raise ValueError(
                    f"`criterion={criterion!r}` does not apply to `mode={mode!r}`: N:M keeps the largest "
                    "magnitudes in every group. Leave `criterion` at 'l1'."
                )
            if self.scope != "layer":
                raise ValueError(
                    f"`scope={scope!r}` does not apply to `mode={mode!r}`: every group of M weights keeps N, "
                    "so there is nothing to rank globally. Leave `scope` at 'layer'."
                )
            if self.initial_amount != 0.0:
                raise ValueError(
                    f"`initial_amount={initial_amount!r}` does not apply to `mode={mode!r}`: the pattern is "
                    "applied whole at `start`. Leave `initial_amount` at 0."
                )
        self.max_layer_amount = self._check_max_layer_amount(max_layer_amount)
        if schedule != "exponential":
            resolve_schedule(schedule)
        elif schedule not in SCHEDULE_NAMES:
            raise ValueError(f"Unknown `schedule={schedule!r}`.")
        self.schedule = schedule
        self.start = validate_point(start, "start")
        self.end = validate_point(end, "end")
        if isinstance(self.start, float) and isinstance(self.end, float) and self.end < self.start:
            raise ValueError(f"`end={end}` is before `start={start}`. Pruning must end after it starts.")
        if frequency is not None and (
            isinstance(frequency, bool) or not isinstance(frequency, int) or frequency < 1
        ):
            raise ValueError(
                f"`frequency={frequency!r}` must be a positive number of optimizer steps, or None."
            )
        self.frequency = frequency
        if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
            raise ValueError(f"`round_to={round_to!r}` must be a positive integer (1 disables rounding).")
        self.round_to = round_to
        self.selection = ModuleSelection(modules, exclude, min_params)
        self.example_input = example_input
        for name, flag in (("materialize", materialize), ("log_per_layer", log_per_layer)):
            if not isinstance(flag, bool):
                raise TypeError(f"`{name}={flag!r}` must be True or False.")
        self.materialize = materialize
        self.log_per_layer = log_per_layer
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"`seed={seed!r}` must be an integer (the seed of the random criterion).")
        self.seed = seed

        # State, rebuilt in `setup` and restored from checkpoints.
        self.masks: dict[str, Tensor] = {}
        self._keep_params: list[Tensor] = []
        self._keep_masks: list[Tensor] = []
        self.plan: dict[str, list[int]] = {}
        self.current_amount = 0.0
        self.last_update_step: int | None = None
        self.materialized = False
        self.materialize_max_abs_diff: float | None = None
        self._schedule: Schedule | None = None
        self._params: dict[str, nn.Parameter] = {}
        self._pruner: Any = None
        self._example: Any = None
        self._taylor: dict[str, Tensor] = {}
        self._generator = torch.Generator().manual_seed(seed)
        self._hooks: list[Any] = []
        self._metrics: dict[str, float] = {}
        self._structure_metrics: dict[str, float] = {}
        self._structure_key: tuple | None = None
        self._dense_macs = 0
        self._layer_macs: dict[str, int] = {}
        self._last_input: Any = None
        self._emptied: set[str] = set()
        self._training_ran = False

    def _check_max_layer_amount(self, value: float | None) -> float | None:
        if value is None:
            return None
        if self.mode != "unstructured" or self.scope != "global":
            raise ValueError(
                f"`max_layer_amount={value!r}` applies to `mode='unstructured', scope='global'` only "
                f"(here mode={self.mode!r}, scope={self.scope!r}): with `scope='layer'` every layer loses "
                "exactly `amount`. Leave it unset, or use `scope='global'`."
            )
        if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
            raise TypeError(f"`max_layer_amount={value!r}` must be a number in (0, 1].")
        if not self.amount <= value <= 1.0 or value == 0.0:
            raise ValueError(
                f"`max_layer_amount={value!r}` must be in [amount, 1] = [{self.amount:g}, 1]: no layer may lose "
                "more than this fraction, so below `amount` the total could never reach `amount`."
            )
        return float(value)

    def _reset(self) -> None:
        """Forget what an earlier fit decided: every fit prunes its own model from scratch (a resumed fit then
        loads its state from the checkpoint)."""
        self.masks = {}
        self._keep_params, self._keep_masks = [], []
        self.plan = {}
        self.current_amount = 0.0
        self.last_update_step = None
        self.materialized = False
        self.materialize_max_abs_diff = None
        self._taylor = {}
        self._generator = torch.Generator().manual_seed(self.seed)
        self._metrics, self._structure_metrics = {}, {}
        self._structure_key = None
        self._last_input = None
        self._emptied = set()
        self._training_ran = False

    # -- setup ---------------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if set_up_in_order(self, trainer, pl_module, stage):
            return
        if pl_module not in _HINT_HOOKS:
            # Our own loading (resume, `Trainer.test(ckpt_path=...)`) drops the hint that checkpoints of a
            # structurally pruned model carry for `load_from_checkpoint` users; removed again in `teardown`.
            _HINT_HOOKS[pl_module] = pl_module.register_load_state_dict_pre_hook(_drop_hint)
        if stage != "fit":
            return
        self._reset()
        if any(type(c).__name__ == "BinaryWeights" for c in trainer.callbacks):  # type: ignore[attr-defined]
            raise ValueError(
                "GradualPruning and BinaryWeights cannot share a fit: BinaryWeights reparametrizes every weight it "
                "selects as binary/ternary values, so the weights pruning masks are not the ones the model uses. "
                "Use one of them: BinaryWeights(mode='ternary') has zeros of its own."
            )
        remember_original(trainer, pl_module)
        watch_loss(trainer)
        selected = self.selection.select(pl_module)
        self._schedule = self._build_schedule(trainer)
        if self.mode == "structured":
            self._setup_structured(trainer, pl_module, selected)
        else:
            # A weight shared by several layers (tied embedding and decoder) is pruned once, under the name
            # `named_parameters()` gives it, with one mask; every layer that uses it sees the same zeros.
            canonical = {id(p): n for n, p in pl_module.named_parameters()}
            self._params = {}
            users: dict[str, list[str]] = {}
            for name, module in selected:
                weight = getattr(module, "weight", None)
                if isinstance(weight, nn.Parameter):
                    key = canonical.get(id(weight), f"{name}.weight")
                    self._params[key] = weight
                    users.setdefault(key, []).append(name)
            if not self._params:
                raise ValueError(f"The selection {self.selection} has no `weight` parameter to prune.")
            if self.mode == "N:M":
                validate_nm(self.n, self.m, {k: p.shape for k, p in self._params.items()})
            self._layer_macs = {}
            example = self._find_example(pl_module)
            if example is not None:
                # Each weight of a Linear/Conv layer takes part in the same number of multiply-accumulates, so
                # a layer's zeros remove that fraction of its MACs (for hardware or kernels that skip them).
                try:
                    macs = count_macs_by_module(pl_module, example)
                except Exception as err:
                    raise ValueError(
                        f"The model could not run on its example input ({type(err).__name__}: {err}). Pass an "
                        "`example_input` (or set `example_input_array`) that `model(example_input)` accepts: a "
                        "tuple is unpacked into positional arguments, a dict into keyword arguments."
                    ) from err
                self._dense_macs = macs[""]
                self._layer_macs = {
                    key: sum(macs.get(name, 0) for name in names) for key, names in users.items()
                }
        if self.criterion == "taylor" and self._schedule.start == 0:
            raise ValueError(
                "`criterion='taylor'` ranks channels by their gradients, and there are none before the first "
                "optimizer step: start pruning at step 1 or later (e.g. `start='step:1'`)."
            )
        if self.criterion == "taylor" and not pl_module.automatic_optimization:
            raise ValueError(
                "`criterion='taylor'` reads gradients before each optimizer step, which needs automatic "
                "optimization; choose 'l1' or 'l2' for a LightningModule with manual optimization."
            )

    def _build_schedule(self, trainer: pl.Trainer) -> Schedule:
        if self.mode == "N:M":
            # The pattern is fixed: applied at `start`, kept afterwards.
            schedule = build_schedule(
                trainer, self.amount, self.amount, self.start, self.start, "constant", 1
            )
        else:
            schedule = build_schedule(
                trainer, self.initial_amount, self.amount, self.start, self.end, self.schedule, 1
            )
        end = schedule.end
        estimated = trainer.estimated_stepping_batches
        if math.isfinite(estimated) and estimated >= 0:  # a fit of unknown length may give `"step:N"` points
            last = int(estimated) - 1
            if schedule.start > last:
                raise ValueError(
                    f"`start={self.start!r}` is optimizer step {schedule.start}, but this fit has {last + 1} steps "
                    f"(0 to {last}): pruning would never happen."
                )
            # Masks are updated before a step runs: an `end` at or past the fit's length (`end=1.0`) is moved to
            # the last step, so that `amount` is reached.
            end = min(end, last)
        frequency = 1 if self.mode == "N:M" else self.frequency or max(1, (end - schedule.start) // 20)
        return Schedule(schedule.initial, schedule.final, schedule.start, end, schedule.schedule, frequency)

    def _setup_structured(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, selected: list[tuple[str, nn.Module]]
    ) -> None:
        precision = str(getattr(trainer, "precision", "32-true"))
        if precision.endswith("-true") and precision != "32-true":
            raise ValueError(
                f"`mode='structured'` cannot run with `Trainer(precision={precision!r})`: the channels are "
                "removed at the end of training by tracing the model on a float32 example input, which a model "
                "whose weights are converted to another dtype rejects. Use `precision='bf16-mixed'` (or "
                "'16-mixed'): the weights stay float32 and the forward still runs in low precision; or use "
                "`mode='unstructured'`."
            )
        self._example = self._find_example(pl_module, trainer.train_dataloader)
        if self._example is None:
            raise ValueError(
                "Structured pruning traces the model and needs an example input: set "
                "`example_input_array` on the LightningModule or pass `example_input`."
            )
        self._pruner = _Structure(
            pl_module,
            self._example,
            selected,
            ignored=self.selection.excluded(pl_module),
            criterion=self.criterion,
            scope=self.scope,
            round_to=self.round_to,
        )
        channels = self._pruner.channels
        inexact = [g.root for g in channels.groups if not g.exact] if channels is not None else []
        if inexact:
            rank_zero_warn(
                f"GradualPruning: the channel groups of {inexact} pass through a LayerNorm, which normalizes "
                "across channels, so zeroing a channel is not the same as removing it: validation during "
                "training scores the masked model, and the model with the channels removed will differ. "
                "Leave these layers out (`exclude=`) for an exact match."
            )
        if self._pruner.tied:
            from lightning_compress.pruning.structured import tied_weights_message

            raise ValueError(tied_weights_message(self._pruner.tied))
        if self._pruner.skipped:
            skipped = "; ".join(f"{name!r}: {why}" for name, why in self._pruner.skipped.items())
            rank_zero_info(f"GradualPruning leaves these layers' channels alone: {skipped}.")
        if self.amount > 0:
            removable = self._pruner.removable(self.amount)
            stuck = [name for name, count in removable.items() if count == 0]
            why = (
                f"at `amount={self.amount:g}` with `round_to={self.round_to}` (the kept channel count is rounded "
                "to a multiple of `round_to`, and heads to whole heads, at least one kept)"
            )
            if stuck and len(stuck) == len(removable):
                sizes = ", ".join(f"{name!r} ({self._pruner.size(name)})" for name in stuck)
                raise ValueError(
                    f"Structured pruning would remove nothing from the selected layers: {sizes} {why}. Lower "
                    "`round_to` (e.g. `round_to=1`) or raise `amount`."
                )
            if stuck:
                rank_zero_warn(
                    f"GradualPruning removes nothing from {stuck} {why}. Lower `round_to` or leave them out "
                    "with `exclude=`."
                )
        params = dict(pl_module.named_parameters())
        self._params = {name: params[name] for name in self._pruner.params}

    def _find_example(self, pl_module: pl.LightningModule, loader: Any = None) -> Any:
        """One sample on the module's device: ``example_input``, else ``example_input_array``, else the first
        batch of ``loader``; ``None`` when there is none of them."""
        example = self.example_input if self.example_input is not None else pl_module.example_input_array
        if example is None:
            if loader is None:
                return None
            example = first_input(next(iter(loader)))
        device = next(pl_module.parameters()).device
        return to_device(detach_input(example, max_batch=1), device)

    # -- training ------------------------------------------------------------------------------------

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()
        # The strategy may have replaced the parameter objects (FSDP with `use_orig_params=True`): look them
        # up again by name, and refuse what masks cannot follow. A graph may have moved the layers
        # (QuantizationAwareTraining): the names recorded at setup are looked up through it.
        named = named_parameters_by_original_name(pl_module)
        missing = [name for name in self._params if name not in named]
        if missing:
            raise ValueError(
                f"After {type(trainer.strategy).__name__} wrapped the model, parameters {missing[:3]} are gone "
                "(flattened). With FSDP pass `use_orig_params=True` to the strategy."
            )
        resharded = [name for name, p in self._params.items() if named[name].shape != p.shape]
        if resharded:
            raise ValueError(
                f"{type(trainer.strategy).__name__} shards parameters {resharded[:3]} across processes; pruning "
                "masks need whole parameters. Use DDP, or FSDP on a single device."
            )
        self._params = {name: named[name] for name in self._params}
        params = set(self._params.values())
        for optimizer in trainer.optimizers:
            owned = [p for group in optimizer.param_groups for p in group["params"] if p in params]
            if owned:
                self._hooks.append(optimizer.register_step_post_hook(self._after_optimizer_step))
        if self.masks:
            # Resumed: the loaded weights already carry the zeros; keep them exact from the first step on, and
            # log the restored state until the next update (there is none after `end`).
            self._move_masks(pl_module)
            self._apply(trainer)
            self._metrics = self._compute_metrics(pl_module, self.current_amount)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        assert self._schedule is not None
        if self.mode == "structured":
            # Real data for the check that removing the channels changes nothing (kept by reference; a few
            # samples of it are saved in checkpoints, so that a fit resumed at its last step checks the same).
            try:
                self._last_input = first_input(batch)
            except TypeError:
                self._last_input = None
        step = trainer.global_step
        if (
            step > self._schedule.end
            or self.last_update_step == step
            or not self._schedule.is_update_step(step)
        ):
            return
        target = self._schedule.value(step)
        if target > self.current_amount or not self.masks:
            self._update_masks(trainer, pl_module, target)
            record_event(trainer, self, f"masks updated to amount {self.current_amount:.3g}")
        self.last_update_step = step

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self.criterion == "taylor":
            # Sum the gradients since the last decision; the pruner scores |w * g| per group from them.
            with torch.no_grad():
                for name, param in self._params.items():
                    if param.grad is not None:
                        grad = param.grad.detach()
                        self._taylor[name] = (
                            self._taylor[name] + grad if name in self._taylor else grad.clone()
                        )
        if not self.masks:
            return
        grads = [p.grad for p in self._keep_params]
        if all(g is not None for g in grads):
            torch._foreach_mul_(grads, self._keep_masks)
        else:
            pairs = [(g, keep) for g, keep in zip(grads, self._keep_masks, strict=True) if g is not None]
            if pairs:
                torch._foreach_mul_([g for g, _ in pairs], [keep for _, keep in pairs])

    def _after_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self.masks:
            with torch.no_grad():
                torch._foreach_mul_(self._keep_params, self._keep_masks)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.masks and trainer.global_step % _PARK_EVERY == 0:
            self._park_optimizer_state(trainer)
        if not trainer.loggers:
            return
        # `log` costs tens of microseconds per call: only call it on the steps the loggers will write.
        connector = getattr(trainer, "_logger_connector", None)
        if connector is not None and not connector.should_update_logs:
            return
        for name, value in self._metrics.items():
            pl_module.log(name, value, on_step=True, on_epoch=False, sync_dist=False)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.mode != "structured" or not self.plan:
            return
        # What the model will cost once the channels are removed: measured on a pruned copy, once per epoch
        # (tracing and pruning a copy at every mask update would cost more than the training steps).
        key = tuple((root, len(idxs)) for root, idxs in self.plan.items())
        if self._structure_key != key:
            with float_view(pl_module):
                pruned = self._pruner.materialize(copy.deepcopy(pl_module), self.plan)
            self._structure_metrics = {
                "pruning/macs_after_removal": float(
                    count_macs(pruned, to_device(self._example, pl_module.device))
                ),
                "pruning/params_after_removal": float(sum(p.numel() for p in pruned.parameters())),
            }
            self._structure_key = key
        for name, value in self._structure_metrics.items():
            pl_module.log(name, value, on_step=False, on_epoch=True, sync_dist=False)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._training_ran = True

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A fit resumed from the checkpoint of its last step (`max_steps` reached) skips the training loop,
        # `on_train_end` included: remove the channels here instead.
        if not self._training_ran:
            self.on_train_end(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()
        if not self.materialize or self.materialized:
            return
        if self.mode == "structured" and self.plan:
            # Channels are removed from the float layers (a graph running the model follows the change).
            with float_view(pl_module):
                masked = copy.deepcopy(pl_module).eval()
                self._pruner.materialize(pl_module, self.plan)
                pl_module.eval()
                with torch.no_grad():
                    diff = _max_abs_diff(masked, pl_module, self._example)
                    if self._last_input is not None:
                        batch = to_device(detach_input(self._last_input, _CHECK_SAMPLES), pl_module.device)
                        # A model that takes more than the batch's first element is checked on the example only.
                        with contextlib.suppress(TypeError, ValueError, RuntimeError):
                            diff = max(diff, _max_abs_diff(masked, pl_module, batch))
                    self._last_input = None
            self.materialize_max_abs_diff = diff
            if diff > 1e-4:
                rank_zero_warn(
                    f"Removing the pruned channels changed the outputs by up to {diff:.3g}: the masked and the "
                    "materialized models differ. Please report the model architecture."
                )
            rank_zero_info(
                f"GradualPruning removed {sum(len(v) for v in self.plan.values())} channels and heads "
                f"(max output difference {diff:.2e})."
            )
        self.masks = {}
        self._keep_params, self._keep_masks = [], []
        self.materialized = True

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            forget_original(trainer)  # the next fit takes a fresh copy of its own model
        self._remove_hooks()
        # The model leaves the Trainer as the user built it: a pickled module must not need this package.
        hint_hook = _HINT_HOOKS.pop(pl_module, None)
        if hint_hook is not None:
            hint_hook.remove()

    # -- decisions -----------------------------------------------------------------------------------

    def _update_masks(self, trainer: pl.Trainer, pl_module: pl.LightningModule, target: float) -> None:
        weights = {name: param.detach() for name, param in self._params.items()}
        if self.mode == "N:M":
            masks = nm_masks(weights, self.n, self.m)
        elif self.mode == "unstructured":
            masks = unstructured_masks(
                weights,
                target,
                scope=self.scope,
                criterion=self.criterion,
                previous=self.masks or None,
                generator=self._generator,
                max_layer_amount=self.max_layer_amount,
            )
            self._warn_emptied(masks, target)
        else:
            grads = None
            if self.criterion == "taylor":
                grads = self._reduced_taylor(trainer)
            with float_view(pl_module):  # the pruner reads the layers under the names it recorded
                masks, plan = self._pruner.compute_masks(
                    pl_module, target, grads=grads, previous=self.plan or None, generator=self._generator
                )
            self.plan = trainer.strategy.broadcast(plan, src=0)
            self._taylor = {}
        # Every rank must hold the same masks; rank zero decides.
        masks = trainer.strategy.broadcast({k: v.cpu() for k, v in masks.items()}, src=0)
        self.masks = masks
        self._move_masks(pl_module)
        self.current_amount = target
        self._apply(trainer)
        self._metrics = self._compute_metrics(pl_module, target)

    def _warn_emptied(self, masks: Mapping[str, Tensor], target: float) -> None:
        emptied = [name for name, mask in masks.items() if not bool(mask.any()) and name not in self._emptied]
        if not emptied:
            return
        self._emptied.update(emptied)
        hint = (
            "cap what one layer may lose with `max_layer_amount` (in [amount, 1), e.g. "
            f"{round(self.amount + (1 - self.amount) / 2, 4):g})"
            if self.scope == "global"
            else "lower `amount`"
        )
        rank_zero_warn(
            f"GradualPruning pruned every weight of {emptied} at amount {target:.4g} (scope={self.scope!r}): "
            f"these layers' outputs no longer depend on their inputs. To keep some of them, {hint}, or leave "
            "them out with `exclude=`."
        )

    def _reduced_taylor(self, trainer: pl.Trainer) -> dict[str, Tensor]:
        if not self._taylor:
            raise ValueError(
                "`criterion='taylor'` needs gradients before the first pruning step, but none were seen. "
                "Start pruning after at least one optimizer step (e.g. `start='step:1'` or later)."
            )
        return {
            name: trainer.strategy.reduce(score, reduce_op="mean") for name, score in self._taylor.items()
        }

    def _move_masks(self, pl_module: pl.LightningModule) -> None:
        self.masks = {k: v.to(device=self._params[k].device, dtype=torch.bool) for k, v in self.masks.items()}
        # What every step touches: (parameter, mask as 1.0/0.0 in its dtype). One fused multiply is about ten
        # times faster on the CPU than masked_fill with a bool mask; kept values are unchanged and pruned ones
        # stay exactly zero (a weight that was negative may read -0.0 until the next decision rewrites +0.0).
        self._keep_params = [self._params[k] for k in self.masks]
        self._keep_masks = [mask.to(self._params[k].dtype) for k, mask in self.masks.items()]

    def _apply(self, trainer: pl.Trainer) -> None:
        apply_masks(self._params, self.masks)
        self._park_optimizer_state(trainer)

    def _park_optimizer_state(self, trainer: pl.Trainer) -> None:
        # Pruned entries of the optimizer state: first moments (momentum, Adam's exp_avg) zero, so nothing is
        # left to revive the weights; second moments at 1.0 (see `_SECOND_MOMENTS`).
        with torch.no_grad():
            for optimizer in trainer.optimizers:
                for param, mask in zip(self._keep_params, self.masks.values(), strict=True):
                    for key, value in optimizer.state.get(param, {}).items():
                        if isinstance(value, Tensor) and value.shape == param.shape:
                            value.masked_fill_(~mask, 1.0 if key in _SECOND_MOMENTS else 0.0)

    def _compute_metrics(self, pl_module: pl.LightningModule, target: float) -> dict[str, float]:
        zeros = sum(int((p == 0).sum()) for p in self._params.values())
        total = sum(p.numel() for p in self._params.values())
        metrics = {
            "pruning/weight_sparsity": zeros / total,
            "pruning/remaining_params": float(sum(int((p != 0).sum()) for p in pl_module.parameters())),
        }
        if self.mode == "structured":
            # `amount` counts channels here: the reached fraction is compared with it, not weight sparsity
            # (a channel's weights are a different share of the whole in every group).
            metrics["pruning/target_removed_channel_fraction"] = float(target)
            channel_plan, head_plan = self._pruner._split(self.plan)
            if self._pruner.channels is not None:
                removed = sum(len(v) for v in channel_plan.values())
                total_channels = sum(group.size for group in self._pruner.channels.groups)
                metrics["pruning/removed_channels"] = float(removed)
                metrics["pruning/removed_channel_fraction"] = removed / max(total_channels, 1)
            if self._pruner.heads is not None:
                removed = sum(len(v) for v in head_plan.values())
                total_heads = sum(group.num_heads for group in self._pruner.heads.groups)
                metrics["pruning/removed_heads"] = float(removed)
                metrics["pruning/removed_head_fraction"] = removed / max(total_heads, 1)
        else:
            metrics["pruning/target_weight_sparsity"] = float(target)
        if self.mode != "structured" and self._layer_macs:
            skipped = sum(
                macs * float((self._params[name] == 0).float().mean())
                for name, macs in self._layer_macs.items()
            )
            metrics["pruning/nonzero_macs"] = self._dense_macs - skipped
        if self.log_per_layer:
            for name, param in self._params.items():
                if name.endswith("weight") and param.dim() > 1:
                    metrics[per_layer_name("pruning/", "weight_sparsity", name)] = float(
                        (param == 0).float().mean()
                    )
        return metrics

    def _remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    # -- checkpoints ---------------------------------------------------------------------------------

    @functools.cached_property
    def state_key(self) -> str:  # Lightning reads it at every hook call: computed once
        # Several GradualPruning callbacks (e.g. different layers, different modes) keep separate states.
        return self._generate_state_key(mode=self.mode, amount=self.amount, selection=str(self.selection))

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self.mode == "structured" and self.materialized and any(self.plan.values()):
            add_checkpoint_hint(checkpoint, PRUNED_CHECKPOINT_KEY)

    def state_dict(self) -> dict[str, Any]:
        return {
            "masks": {name: pack_mask(mask) for name, mask in self.masks.items()},
            "plan": {k: list(v) for k, v in self.plan.items()},
            "current_amount": self.current_amount,
            "last_update_step": self.last_update_step,
            "materialized": self.materialized,
            "taylor": {k: v.detach().cpu() for k, v in self._taylor.items()},
            "generator": self._generator.get_state(),
            "mode": self.mode,
            "check_input": to_device(detach_input(self._last_input, _CHECK_SAMPLES), "cpu"),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("mode", self.mode) != self.mode:
            raise ValueError(
                f"The checkpoint was written by GradualPruning(mode={state_dict['mode']!r}); "
                f"this callback has mode={self.mode!r}."
            )
        self.masks = {name: unpack_mask(packed) for name, packed in state_dict["masks"].items()}
        self.plan = {k: list(v) for k, v in state_dict["plan"].items()}
        self.current_amount = state_dict["current_amount"]
        self.last_update_step = state_dict["last_update_step"]
        self.materialized = state_dict["materialized"]
        self._taylor = dict(state_dict.get("taylor", {}))
        self._generator.set_state(state_dict["generator"])
        self._last_input = state_dict.get("check_input")


def _max_abs_diff(a: nn.Module, b: nn.Module, example: Any) -> float:
    example = to_device(example, next(b.parameters()).device)
    out_a, out_b = call_module(a, example), call_module(b, example)
    return float((out_a - out_b).abs().max()) if isinstance(out_a, Tensor) else 0.0


def load_pruned_checkpoint(
    model: nn.Module, checkpoint: str | os.PathLike | Mapping[str, Any], example_input: Any = None
) -> nn.Module:
    """Load a checkpoint written by a run with :class:`GradualPruning` into a freshly built model.

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

        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> ckpt = {"state_dict": net.state_dict(), "callbacks": {}}
        >>> load_pruned_checkpoint(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), ckpt)[0]
        Linear(in_features=4, out_features=8, bias=True)
    """
    if not isinstance(checkpoint, Mapping):
        checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=False)
    state_dict = dict(checkpoint["state_dict"])
    drop_checkpoint_hints(state_dict)
    plan: dict[str, list[int]] = {}
    for key, state in checkpoint.get("callbacks", {}).items():
        if key.startswith("GradualPruning") and state.get("mode") == "structured":
            plan.update({root: list(idxs) for root, idxs in state["plan"].items() if idxs})
    if not plan:
        model.load_state_dict(state_dict)
        return model
    example = example_input if example_input is not None else getattr(model, "example_input_array", None)
    if example is None:
        raise ValueError("Replaying structured pruning traces the model: pass `example_input`.")
    named = dict(model.named_modules())
    structure = _Structure(
        model,
        example,
        [(name, named[name]) for name in plan],
        ignored=[],
        criterion="l1",
        scope="layer",
        round_to=1,
    )
    current = model.state_dict()
    if all(current[k].shape == v.shape for k, v in state_dict.items() if k in current):
        # Written while pruning: load the weights first, then remove the channels and heads.
        model.load_state_dict(state_dict)
        return structure.materialize(model, plan)
    structure.materialize(model, plan)
    model.load_state_dict(state_dict)
    return model


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

    def removable(self, amount: float) -> dict[str, int]:
        """The most channels (per channel group root) or heads (per attention module) ``amount`` removes."""
        found = self.channels.removable(amount) if self.channels is not None else {}
        if self.heads is not None:
            groups = self.heads.groups
            if self.scope == "layer":
                found.update(
                    {g.module: min(math.floor(amount * g.num_heads + 1e-9), g.num_heads - 1) for g in groups}
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

    def _split(self, plan: Mapping[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
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
    ) -> tuple[dict[str, Tensor], dict[str, list[int]]]:
        channel_prev, head_prev = self._split(previous)
        masks: dict[str, Tensor] = {}
        plan: dict[str, list[int]] = {}
        if self.channels is not None:
            m, p = self.channels.compute_masks(
                model, amount, grads=grads, previous=channel_prev or None, generator=generator
            )
            masks.update(m)
            plan.update(p)
        if self.heads is not None:
            m, p = self.heads.compute_masks(
                model,
                amount,
                scope=self.scope,
                criterion=self.criterion,
                grads=grads,
                previous=head_prev or None,
                generator=generator,
            )
            masks.update(m)
            plan.update(p)
        return masks, plan

    def materialize(self, model: nn.Module, plan: Mapping[str, Sequence[int]]) -> nn.Module:
        channel_plan, head_plan = self._split(plan)
        # Channels first: the graph is traced with the attention modules as they were built.
        if self.channels is not None and channel_plan:
            self.channels.materialize(model, channel_plan)
        if self.heads is not None and head_plan:
            self.heads.materialize(model, head_plan)
        return model
