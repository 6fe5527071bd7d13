"""KnowledgeDistillation: train the student against a teacher's outputs and features along with its task loss."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import fields
from typing import Any

import lightning.pytorch as pl
from torch import Tensor, nn

from lightning_compress import _checks
from lightning_compress._lightning import at_fit_precision, build_schedule
from lightning_compress.callback import DISTILL, CompressionCallback
from lightning_compress.distillation.core import (
    FEATURE_LOSSES,  # noqa: F401  (re-exported)
    TEACHER_PRECISIONS,  # noqa: F401  (re-exported)
    DistillationCapture,
    DistillationConfig,
    FeatureLoss,
    check_apart,
    check_example,
    check_optimized,
    check_wrapper,
)
from lightning_compress.distillation.losses import mix_losses
from lightning_compress.distillation.teacher import check_same_teacher, choose_teacher, fingerprint
from lightning_compress.schedules import Point, Schedule, ScheduleFn, resolve_schedule

ADAPTERS_ATTRIBUTE = "distillation_adapters"


class KnowledgeDistillation(CompressionCallback):
    """Fine-tune the student against a teacher: soft targets, hints, attention maps or embeddings.

    The loss Lightning back-propagates becomes ``(1 - alpha) · task_loss + alpha · distillation_loss``
    (Hinton's ``T² · KL(p_teacher ‖ p_student)`` on ``module``'s output plus the :class:`FeatureLoss` terms).
    The LightningModule is not modified: forward hooks record the student's call in ``training_step``, the
    teacher runs on its input in ``on_before_backward``, where the loss is mixed in place. Under manual
    optimization, call :meth:`combine` before ``manual_backward``. Details: ``docs/distillation.md``.

    Args:
        teacher: ``"self"``, an ``nn.Module``, or the path of a LightningModule checkpoint.
        teacher_class: the LightningModule class to load a checkpoint ``teacher`` with.
        alpha: weight of the distillation loss in ``[0, 1]``; the final value when ``initial_alpha`` is given.
        temperature: softmax temperature ``> 0``; the final value when ``initial_temperature`` is given.
        logits: distill ``module``'s output as logits with Hinton's loss.
        module: the student module whose input is fed to the teacher and whose output is distilled (``""``: the
            LightningModule's ``forward``); it must be called in ``training_step``.
        teacher_module: the teacher's module to call on that input (default: the same name as ``module``).
        features: feature-level terms.
        initial_alpha: ramp ``alpha`` from this value (``None``: constant).
        initial_temperature: ramp the temperature from this value (``None``: constant).
        schedule: shape of the ramps (see :mod:`lightning_compress.schedules`).
        start: when the ramps start (fraction of training, ``"step:N"`` or ``"epoch:N"``).
        end: when they reach ``alpha`` and ``temperature``.
        teacher_precision: ``None`` (as the student's forward runs) or one of :data:`TEACHER_PRECISIONS`.
        example_input: input of the dry run at ``setup`` (default: ``example_input_array``).
        save_teacher: store the teacher's weights in checkpoints instead of rebuilding it on resume.
        keep_adapters: leave the adapters on the LightningModule after training.
        loss_mask: a function from the arguments of ``module``'s call by name to a ``(batch, positions)`` mask of the
            positions that count, e.g. ``lambda x: x["attention_mask"]`` (see ``DistillationConfig``).

    Example::

        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[KnowledgeDistillation(teacher="self", alpha=0.5)], logger=False)
        >>> KnowledgeDistillation(teacher="self", temperature=0)
        Traceback (most recent call last):
        ...
        ValueError: `temperature=0` must be a finite number > 0 (1 is the plain softmax; Hinton et al. used 2 to 20).
    """

    prefix = "distillation/"
    effect_order = DISTILL

    def __init__(
        self,
        teacher: nn.Module | str | os.PathLike,
        teacher_class: type[pl.LightningModule] | None = None,
        alpha: float = 0.5,
        temperature: float = 1.0,
        logits: bool = True,
        module: str = "",
        teacher_module: str | None = None,
        features: Sequence[FeatureLoss] = (),
        initial_alpha: float | None = None,
        initial_temperature: float | None = None,
        schedule: str | ScheduleFn = "linear",
        start: Point = 0.0,
        end: Point = 1.0,
        teacher_precision: str | None = None,
        example_input: Any = None,
        save_teacher: bool = False,
        keep_adapters: bool = False,
        loss_mask: Callable[[Any], Any] | None = None,
    ) -> None:
        self.teacher = _checks.check_teacher(teacher, teacher_class)
        self.teacher_class = teacher_class
        config = DistillationConfig(
            alpha, temperature, logits, module, teacher_module, features, teacher_precision, loss_mask
        )
        vars(self).update({f.name: getattr(config, f.name) for f in fields(config)})
        self.initial_alpha = _checks.check_optional(_checks.check_alpha, initial_alpha, "initial_alpha")
        self.initial_temperature = _checks.check_optional(
            _checks.check_temperature, initial_temperature, "initial_temperature"
        )
        if schedule != "exponential":
            resolve_schedule(schedule)
        self.schedule = schedule
        self.start = _checks.validate_point(start, "start")
        self.end = _checks.validate_point(end, "end")
        _checks.check_ramp(self.start, self.end)
        self.example_input = example_input
        self.save_teacher = _checks.check_bool(save_teacher, "save_teacher")
        self.keep_adapters = _checks.check_bool(keep_adapters, "keep_adapters")

        self.adapters: nn.ModuleDict | None = None
        self._layouts: dict[str, str | None] | None = None
        self._teacher: nn.Module | None = None
        self._fingerprint: list[float] | None = None
        self._alpha_schedule: Schedule | None = None
        self._temperature_schedule: Schedule | None = None
        self._capture: DistillationCapture | None = None
        self._combined = False
        self._logged: dict[str, Any] | None = None

    @property
    def needs_original(self) -> bool:  # type: ignore[override]
        """A ``"self"`` teacher is the frozen copy of the model taken before any compression."""
        return isinstance(self.teacher, str) and self.teacher == "self"

    @property
    def config(self) -> DistillationConfig:
        """What to distill, as the plain-torch core takes it."""
        return DistillationConfig(**{f.name: getattr(self, f.name) for f in fields(DistillationConfig)})

    def hooked_layers(self) -> list[str]:
        """The student's layers (qualified names) whose outputs are read with forward hooks.

        Example::

            >>> KnowledgeDistillation(teacher=nn.Linear(2, 2), features=[FeatureLoss("net.1")]).hooked_layers()
            ['', 'net.1']
        """
        return [self.module, *(f.student for f in self.features)]

    def prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        config = self.config
        original = lambda: self.original(trainer, pl_module)  # noqa: E731
        convert = functools.partial(at_fit_precision, trainer)
        self._teacher = choose_teacher(self.teacher, self.teacher_class, original, config, convert)
        check_apart(pl_module, self._teacher)
        DistillationCapture(pl_module, self._teacher, config).check_names()
        ramps = ((self.initial_alpha, self.alpha), (self.initial_temperature, self.temperature))
        self._alpha_schedule, self._temperature_schedule = (
            None if a is None else build_schedule(trainer, a, b, self.start, self.end, self.schedule, 1)
            for a, b in ramps
        )
        self._fingerprint = fingerprint(self._teacher)
        self._dry_run(pl_module, config)

    def _dry_run(self, pl_module: pl.LightningModule, config: DistillationConfig) -> None:
        """Run the student and the teacher once on the example input: check shapes and values, build adapters."""
        assert self._teacher is not None
        # Given or `example_input_array` only (no Trainer: no training batch is drawn for it).
        example = CompressionCallback.example_input(None, pl_module, self.example_input, max_batch=2)
        how = "set `example_input_array` on the LightningModule or pass `example_input`"
        check_example(config, example is not None, how)
        self.adapters, self._layouts = None, None
        if example is None:
            return  # the checks run at the first training step
        capture = DistillationCapture(pl_module, self._teacher, config)
        argument = "example_input" if self.example_input is not None else "example_input_array"
        existing = getattr(pl_module, ADAPTERS_ATTRIBUTE, None)
        existing = existing if isinstance(existing, nn.ModuleDict) else None
        self.adapters = capture.adapters if capture.dry_run(example, argument, existing) else None
        self._layouts = capture.layouts
        if self.adapters is not None:
            setattr(pl_module, ADAPTERS_ATTRIBUTE, self.adapters)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self._teacher is not None
        self._teacher.to(device=pl_module.device)
        optimized = {id(p) for o in trainer.optimizers for group in o.param_groups for p in group["params"]}
        check_optimized(optimized, self._teacher, self.adapters)
        check_wrapper(trainer.strategy.model, self.adapters)
        # Hooks go on the structure as it is now, after every callback's setup. Only the calls made inside
        # `training_step` are recorded (not those of validation, or of another callback's hook).
        self.remove_hooks()
        in_step = lambda: getattr(pl_module, "_current_fx_name", None) == "training_step"  # noqa: E731
        config, layouts = self.config, self._layouts
        self._capture = DistillationCapture(pl_module, self._teacher, config, self.adapters, in_step, layouts)
        for handle in self._capture.attach():
            self.track_hook(handle)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._capture is not None:
            self._capture.reset()
        self._combined, self._logged = False, None

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        if not pl_module.automatic_optimization:
            if not self._combined:
                raise RuntimeError(
                    "KnowledgeDistillation cannot add its loss under manual optimization by itself: in "
                    "training_step, call `loss = kd.combine(loss)` (kd: this callback) before "
                    "`self.manual_backward(loss)`."
                )
            return
        assert self._capture is not None
        alpha, temperature = self._current(trainer)
        with trainer.precision_plugin.train_step_context():  # the autocast of the student's forward
            distilled = self._capture.distill(temperature)
        # `loss` is what Lightning back-propagates next: `training_step`'s loss divided for gradient accumulation
        # (a tensor of its own) and scaled for mixed precision. Mixing in place changes what is back-propagated.
        added = alpha * distilled.loss / trainer.accumulate_grad_batches
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        loss.mul_(1.0 - alpha).add_(added if scaler is None else scaler.scale(added))
        self._logged = distilled.metrics(alpha, temperature)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        metrics, self._logged = self._logged, None
        if metrics is None:
            return
        if "task_loss" not in metrics:
            # Lightning reports a copy of the loss taken before backward: report the mixed one instead.
            accumulate, reported = trainer.accumulate_grad_batches, outputs["loss"]
            metrics["task_loss"] = reported * accumulate
            outputs["loss"] = (
                reported * (1.0 - metrics["alpha"]) + metrics["alpha"] * metrics["loss"] / accumulate
            )
        for name in ("task_loss", *(n for n in metrics if n != "task_loss")):
            pl_module.log(self.prefix + name, metrics[name], on_step=True, on_epoch=False)

    def combine(self, task_loss: Tensor) -> Tensor:
        """Mix ``task_loss`` with the distillation loss of the current training step (manual optimization).

        Call it in ``training_step``, after the student's forward and before ``manual_backward`` (under automatic
        optimization the callback mixes the loss itself; in a plain loop use ``DistillationCapture.loss``).
        Returns ``(1 - alpha) · task_loss + alpha · distillation_loss``, ``task_loss`` being the loss against the
        labels.
        """
        capture = self._capture
        pl_module = None if capture is None else capture.student
        if capture is None or not isinstance(pl_module, pl.LightningModule) or pl_module._trainer is None:
            raise RuntimeError("`combine` works only inside `training_step` of a fit with this callback.")
        if pl_module.automatic_optimization:
            raise RuntimeError(
                "`combine` was called in training_step under automatic optimization, where "
                "KnowledgeDistillation adds its loss itself; remove the call (it is for manual optimization)."
            )
        alpha, temperature = self._current(pl_module.trainer)
        distilled = capture.distill(temperature)
        self._combined = True
        self._logged = {"task_loss": task_loss.detach(), **distilled.metrics(alpha, temperature)}
        return mix_losses(task_loss, distilled.loss, alpha)

    def _current(self, trainer: pl.Trainer) -> tuple[float, float]:
        step = trainer.global_step
        alpha = self._alpha_schedule.value(step) if self._alpha_schedule else self.alpha
        temperature = (
            self._temperature_schedule.value(step) if self._temperature_schedule else self.temperature
        )
        return alpha, temperature

    def finalize(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.adapters is not None and not self.keep_adapters and hasattr(pl_module, ADAPTERS_ATTRIBUTE):
            delattr(pl_module, ADAPTERS_ATTRIBUTE)

    def release(self) -> None:
        self._capture, self._logged = None, None

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"teacher_fingerprint": self._fingerprint}
        if self.save_teacher and self._teacher is not None:
            state["teacher"] = {k: v.detach().cpu() for k, v in self._teacher.state_dict().items()}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._teacher is None:
            return
        if "teacher" in state_dict:
            self._teacher.load_state_dict(state_dict["teacher"])
            self._fingerprint = fingerprint(self._teacher)
            return
        check_same_teacher(state_dict.get("teacher_fingerprint"), self._fingerprint)
