"""KnowledgeDistillation: train the student against a teacher's outputs and features along with its task loss."""

from __future__ import annotations

import copy
import difflib
import functools
import inspect
import itertools
import math
import os
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_compress._inputs import call_module as _call
from lightning_compress._inputs import input_shapes
from lightning_compress._lightning import (
    build_schedule,
    detach_input,
    forget_original,
    remember_original,
    set_up_in_order,
    to_device,
)
from lightning_compress.distillation.losses import (
    attention_transfer_loss,
    embedding_loss,
    hint_loss,
    hinton_loss,
    make_adapter,
    mix_losses,
    top1_agreement,
    validate_alpha,
    validate_temperature,
)
from lightning_compress.schedules import Point, Schedule, ScheduleFn, resolve_schedule, validate_point

FEATURE_LOSSES = ("hint", "attention", "cosine", "mse")
TEACHER_PRECISIONS = ("32-true", "64-true", "16-true", "bf16-true", "16-mixed", "bf16-mixed")
ADAPTERS_ATTRIBUTE = "distillation_adapters"
_DTYPES = {"32": torch.float32, "64": torch.float64, "16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class FeatureLoss:
    """One feature-level distillation term: a student module's output against a teacher module's output.

    Args:
        student: qualified name of the student module (``""`` is the LightningModule's own forward output).
        teacher: the teacher module's name; default: the same name as ``student``.
        loss: ``"hint"`` (FitNets: MSE through a trained adapter, created when the shapes differ),
            ``"attention"`` (attention transfer on ``(N, C, H, W)`` maps; channel counts may differ),
            ``"cosine"`` (``1 - cos`` on embeddings, through an adapter when the dimensions differ) or
            ``"mse"`` (MSE on equal shapes, no adapter).
        weight: multiplier of the term inside the distillation loss (attention transfer's ``β``).

    Example::

        >>> FeatureLoss("net.3", loss="attention", weight=500.0)
        FeatureLoss(student='net.3', teacher=None, loss='attention', weight=500.0)
        >>> FeatureLoss("net.3", loss="l1")
        Traceback (most recent call last):
        ...
        ValueError: Unknown `loss='l1'` for the feature 'net.3'. Use one of 'hint', 'attention', 'cosine', 'mse'.
    """

    student: str
    teacher: str | None = None
    loss: str = "hint"
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.student, str):
            raise TypeError(f"`FeatureLoss.student={self.student!r}` must be a module name (str).")
        if self.teacher is not None and not isinstance(self.teacher, str):
            raise TypeError(f"`FeatureLoss.teacher={self.teacher!r}` must be a module name (str) or None.")
        if self.loss not in FEATURE_LOSSES:
            choices = ", ".join(repr(c) for c in FEATURE_LOSSES)
            raise ValueError(
                f"Unknown `loss={self.loss!r}` for the feature {self.student!r}. Use one of {choices}."
            )
        weight = self.weight
        if (
            isinstance(weight, bool)
            or not isinstance(weight, int | float)
            or not math.isfinite(weight)
            or weight < 0
        ):
            raise ValueError(f"`FeatureLoss.weight={weight!r}` must be a finite number >= 0.")

    @property
    def teacher_name(self) -> str:
        """The teacher module's name (``student`` when not given)."""
        return self.student if self.teacher is None else self.teacher

    @property
    def label(self) -> str:
        """The name the term is logged under, e.g. ``hint/net.3``."""
        return f"{self.loss}/{self.student or 'output'}"


class KnowledgeDistillation(Callback):
    """Fine-tune the student against a teacher: soft targets, hints, attention maps or embeddings.

    The training loss becomes ``(1 - alpha) · task_loss + alpha · distillation_loss``, where ``task_loss`` is
    what the LightningModule's ``training_step`` returns (a tensor, or a dict's ``"loss"``) and
    ``distillation_loss`` is Hinton's ``T² · KL(p_teacher ‖ p_student)`` on the logits (``logits=True``) plus
    every :class:`FeatureLoss` term times its weight.

    How it works, with an unmodified LightningModule:

    - a forward pre-hook on the student's ``module`` (default ``""``, the LightningModule itself) records the
      input of its first call in each training step, and forward hooks record that call's output and the
      outputs of the feature modules; ``forward`` is never patched, so keyword arguments and ``torch.compile``
      keep working;
    - the LightningModule *instance*'s ``training_step`` is wrapped (in ``setup``, undone in ``teardown``):
      after the user's step returns its loss, the teacher runs on the recorded input and the distillation
      term is added. Lightning then normalizes (gradient accumulation), scales (mixed precision) and
      back-propagates the sum as usual, and DDP sees the whole loss inside its forward;
    - with manual optimization the loss cannot be changed behind the user's back: call :meth:`combine` on the
      task loss before ``manual_backward`` (a step that does not is an error).

    The teacher is ``"self"`` (a frozen copy of the student taken before any compression callback changed it,
    whatever order the callbacks are listed in, so a pruned/quantized/factorized model is fine-tuned against
    the original), an ``nn.Module``, or a LightningModule checkpoint path with its class. It runs in eval mode
    without gradients, on the student's device, in ``teacher_precision``; it is not a submodule of the
    LightningModule, so no optimizer, DDP wrapper or checkpoint sees it. On resume it is rebuilt the same way,
    and a fingerprint saved in the checkpoint makes a different teacher an error (``save_teacher=True``
    stores its weights instead).

    FitNets adapters (created when a ``"hint"``/``"cosine"`` feature's shapes differ) train with the student:
    they are registered on the LightningModule as ``distillation_adapters`` in ``setup``, before
    ``configure_optimizers``, so the optimizer, DDP and checkpoints include them; they are removed at the end of
    training (unless ``keep_adapters=True``) and are never part of the exported model. Creating them needs one
    dry run of the student and the teacher at ``setup`` on ``example_input`` (default: the LightningModule's
    ``example_input_array``), which also checks shapes and finiteness before any training step.

    Logged (``pl_module.log``, every step): ``distillation/task_loss``, ``distillation/loss``, one
    ``distillation/<term>`` per term (``kl``, ``hint/<module>``, ...), ``distillation/agreement`` (top-1
    agreement of student and teacher logits), ``distillation/alpha`` and ``distillation/temperature``.

    Args:
        teacher: ``"self"``, an ``nn.Module``, or the path of a LightningModule checkpoint.
        teacher_class: the LightningModule class to load a checkpoint ``teacher`` with.
        alpha: weight of the distillation loss in ``[0, 1]`` (the task loss gets ``1 - alpha``); the final value
            when ``initial_alpha`` is given.
        temperature: softmax temperature ``> 0`` of the logits term; the final value when ``initial_temperature``
            is given. The default 1 (with ``alpha=0.5``) was the only grid point that helped every student measured
            with few labels (BatchNorm or not); ``T=4`` hurt a residual BatchNorm student (docs/distillation.md).
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

    Example::

        >>> from lightning.pytorch import Trainer
        >>> kd = KnowledgeDistillation(teacher="self", alpha=0.5, temperature=1.0)
        >>> trainer = Trainer(callbacks=[kd], max_epochs=1, logger=False)
        >>> KnowledgeDistillation(teacher="self", temperature=0)
        Traceback (most recent call last):
        ...
        ValueError: `temperature=0` must be a finite number > 0 (1 is the plain softmax; Hinton et al. used 2 to 20).
    """

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
    ) -> None:
        if isinstance(teacher, nn.Module):
            if teacher_class is not None:
                raise ValueError(
                    "`teacher_class` is only used to load a checkpoint path; `teacher` is a module."
                )
        elif isinstance(teacher, str) and teacher == "self":
            if teacher_class is not None:
                raise ValueError(
                    "`teacher_class` is only used to load a checkpoint path, not with teacher='self'."
                )
        elif isinstance(teacher, str | os.PathLike):
            path = os.fspath(teacher)
            if "://" not in path and not os.path.isfile(path):
                raise ValueError(
                    f"`teacher={path!r}` is neither 'self' nor an existing checkpoint file. Pass 'self', an "
                    "nn.Module, or the path of a LightningModule checkpoint (with `teacher_class`)."
                )
            if not (isinstance(teacher_class, type) and issubclass(teacher_class, pl.LightningModule)):
                raise ValueError(
                    f"`teacher={path!r}` is a checkpoint path: pass the LightningModule class to load it with as "
                    "`teacher_class` (e.g. `teacher_class=MyModel`)."
                )
            teacher = path
        else:
            raise TypeError(
                f"`teacher` got {type(teacher).__name__}; pass 'self', an nn.Module, or a checkpoint path."
            )
        self.teacher = teacher
        self.teacher_class = teacher_class
        self.alpha = validate_alpha(alpha, "alpha")
        self.temperature = validate_temperature(temperature, "temperature")
        self.initial_alpha = None if initial_alpha is None else validate_alpha(initial_alpha, "initial_alpha")
        self.initial_temperature = (
            None
            if initial_temperature is None
            else validate_temperature(initial_temperature, "initial_temperature")
        )
        if schedule != "exponential":
            resolve_schedule(schedule)
        self.schedule = schedule
        self.start = validate_point(start, "start")
        self.end = validate_point(end, "end")
        if isinstance(self.start, float) and isinstance(self.end, float) and self.end < self.start:
            raise ValueError(f"`end={end}` is before `start={start}`. The ramps must end after they start.")
        if not isinstance(module, str):
            raise TypeError(f"`module={module!r}` must be a module name ('' for the LightningModule itself).")
        if teacher_module is not None and not isinstance(teacher_module, str):
            raise TypeError(f"`teacher_module={teacher_module!r}` must be a module name or None.")
        for argument, value in (
            ("logits", logits),
            ("save_teacher", save_teacher),
            ("keep_adapters", keep_adapters),
        ):
            if not isinstance(value, bool):
                raise TypeError(f"`{argument}={value!r}` must be True or False.")
        if isinstance(features, FeatureLoss | str) or not isinstance(features, Sequence):
            raise TypeError(
                f"`features={features!r}` must be a list of FeatureLoss objects, e.g. "
                "`features=[FeatureLoss('layer3', loss='attention')]`."
            )
        self.logits = logits
        self.module = module
        self.teacher_module = module if teacher_module is None else teacher_module
        self.features = tuple(features)
        for feature in self.features:
            if not isinstance(feature, FeatureLoss):
                raise TypeError(
                    f"`features` must hold FeatureLoss objects; got {feature!r}. "
                    "Write e.g. `features=[FeatureLoss('layer3', loss='attention')]`."
                )
        labels = [f.label for f in self.features]
        if len(set(labels)) != len(labels):
            raise ValueError(f"`features` lists the same term twice: {labels}.")
        if not self.logits and not self.features:
            raise ValueError("Nothing to distill: `logits=False` and no `features`. Enable one of them.")
        if teacher_precision is not None and teacher_precision not in TEACHER_PRECISIONS:
            choices = ", ".join(repr(c) for c in TEACHER_PRECISIONS)
            raise ValueError(
                f"Unknown `teacher_precision={teacher_precision!r}`. Use None or one of {choices}."
            )
        self.teacher_precision = teacher_precision
        self.example_input = example_input
        self.save_teacher = save_teacher
        self.keep_adapters = keep_adapters

        self.adapters: nn.ModuleDict | None = None
        self._teacher: nn.Module | None = None
        self._fingerprint: list[float] | None = None
        self._alpha_schedule: Schedule | None = None
        self._temperature_schedule: Schedule | None = None
        self._pl_module: pl.LightningModule | None = None
        self._handles: list[RemovableHandle] = []
        self._wrapped: tuple[pl.LightningModule, Any] | None = None
        self._recording = False
        self._teacher_recording = False
        self._entry_inputs: list[tuple[tuple, dict]] = []
        self._capture: tuple[tuple, dict, Any] | None = None
        self._student_features: dict[int, Tensor] = {}
        self._teacher_features: dict[int, Tensor] = {}
        self._combined = False

    # -- setup ---------------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if set_up_in_order(self, trainer, pl_module, stage) or stage != "fit":
            return
        original = remember_original(trainer, pl_module)
        self._pl_module = pl_module
        self._teacher = self._build_teacher(original)
        self._check_not_shared(pl_module, self._teacher)
        self._resolve(pl_module, self.module, self._feature_names("student"), "student")
        self._resolve(self._teacher, self.teacher_module, self._feature_names("teacher"), "teacher")
        self._alpha_schedule = self._ramp(trainer, self.initial_alpha, self.alpha)
        self._temperature_schedule = self._ramp(trainer, self.initial_temperature, self.temperature)
        self._fingerprint = _fingerprint(self._teacher)
        self._dry_run(pl_module)
        self._wrap_training_step(pl_module)

    def hooked_layers(self) -> list[str]:
        """The student's layers (qualified names) whose outputs are read with forward hooks.

        Example::

            >>> KnowledgeDistillation(teacher=nn.Linear(2, 2), features=[FeatureLoss("net.1")]).hooked_layers()
            ['', 'net.1']
        """
        return [self.module, *(name for _, name in self._feature_names("student"))]

    def _build_teacher(self, original: nn.Module) -> nn.Module:
        dtype = self._teacher_dtype()
        if isinstance(self.teacher, nn.Module):
            teacher = self.teacher
        elif self.teacher == "self":
            # The shared original copy serves as the teacher as long as nothing about it has to change.
            teacher = copy.deepcopy(original) if dtype is not None else original
        else:
            assert self.teacher_class is not None
            teacher = _load_teacher(self.teacher, self.teacher_class)
        teacher.eval()
        teacher.requires_grad_(False)
        if dtype is not None:
            teacher.to(dtype=dtype)
        return teacher

    def _teacher_dtype(self) -> torch.dtype | None:
        if self.teacher_precision is None or not self.teacher_precision.endswith("-true"):
            return None
        return _DTYPES[self.teacher_precision.split("-")[0]]

    @staticmethod
    def _check_not_shared(pl_module: nn.Module, teacher: nn.Module) -> None:
        student = {id(p) for p in pl_module.parameters()}
        if any(id(p) in student for p in teacher.parameters()):
            raise ValueError(
                "The teacher shares parameters with the student (it is the student or a part of it). Pass a "
                "separate model, or teacher='self' for a frozen copy of the student as it was at the start."
            )

    def _feature_names(self, side: str) -> list[tuple[str, str]]:
        if side == "student":
            return [(f"features[{i}].student", f.student) for i, f in enumerate(self.features)]
        return [(f"features[{i}].teacher", f.teacher_name) for i, f in enumerate(self.features)]

    def _resolve(self, model: nn.Module, entry: str, features: list[tuple[str, str]], side: str) -> None:
        argument = "module" if side == "student" else "teacher_module"
        for arg, name in [(argument, entry), *features]:
            _get_module(model, name, arg, side)

    def _ramp(self, trainer: pl.Trainer, initial: float | None, final: float) -> Schedule | None:
        if initial is None:
            return None
        return build_schedule(trainer, initial, final, self.start, self.end, self.schedule, 1)

    def _example(self, pl_module: pl.LightningModule) -> Any:
        example = self.example_input if self.example_input is not None else pl_module.example_input_array
        if example is None:
            return None
        device = next(pl_module.parameters()).device
        return to_device(detach_input(example, max_batch=2), device)

    def _dry_run(self, pl_module: pl.LightningModule) -> None:
        """Run the student and the teacher once on the example input: check shapes and values, build adapters."""
        assert self._teacher is not None
        needs_adapters = any(f.loss in ("hint", "cosine") for f in self.features)
        example = self._example(pl_module)
        if example is None:
            if needs_adapters:
                raise ValueError(
                    "A 'hint' or 'cosine' feature may need an adapter, which must exist before the optimizer is "
                    "built: set `example_input_array` on the LightningModule or pass `example_input` so that "
                    "KnowledgeDistillation can run the student and the teacher once at setup."
                )
            return
        was_training = pl_module.training
        self._register_student_hooks(pl_module)
        self._register_teacher_hooks()
        self._start_step()
        try:
            pl_module.eval()
            with torch.no_grad():
                try:
                    _call(pl_module, example)
                except _OutputError:
                    raise
                except Exception as err:
                    argument = "example_input" if self.example_input is not None else "example_input_array"
                    raise ValueError(
                        f"`{argument}` of shape {input_shapes(example)} was rejected by the student "
                        f"({type(pl_module).__name__}) in the setup check: {type(err).__name__}: {err}. Pass an "
                        "input the LightningModule's forward accepts, e.g. one batch of training inputs."
                    ) from err
                self._recording = False
                if self._capture is None:
                    message = (
                        f"The LightningModule's forward did not call `module={self.module!r}` on the example "
                        "input, so the setup checks were skipped"
                    )
                    if needs_adapters:
                        raise ValueError(
                            f"{message}; adapters cannot be built. Pass a matching `example_input`."
                        )
                    rank_zero_warn(f"{message}; they run at the first training step instead.")
                    return
                args, kwargs, output = self._capture
                try:
                    teacher_output = self._run_teacher(args, kwargs)
                except (RuntimeError, TypeError) as err:  # the teacher's forward itself: shapes, arguments
                    raise self._teacher_rejects(args, kwargs, err) from err
                self._check(output, teacher_output)
                self._build_adapters(pl_module)
                for i, feature in enumerate(self.features):
                    self._feature_term(i, feature)
        finally:
            pl_module.train(was_training)
            self._clear()
            self._remove_hooks()

    def _teacher_rejects(self, args: tuple, kwargs: dict, err: Exception) -> ValueError:
        assert self._teacher is not None
        where = f"`teacher_module={self.teacher_module!r}`" if self.teacher_module else "its forward"
        return ValueError(
            f"The teacher ({type(self._teacher).__name__}) cannot run {where} on the student's input "
            f"{input_shapes((*args, *kwargs.values()))}: {type(err).__name__}: {err}. The teacher must accept what "
            "the student's `module` receives: check `teacher`/`teacher_class` (the architecture) and "
            "`module`/`teacher_module`."
        )

    def _build_adapters(self, pl_module: pl.LightningModule) -> None:
        existing = getattr(pl_module, ADAPTERS_ATTRIBUTE, None)
        param = next(pl_module.parameters())
        generator = torch.Generator().manual_seed(0)
        adapters = nn.ModuleDict()
        for i, feature in enumerate(self.features):
            if feature.loss not in ("hint", "cosine"):
                continue
            student, teacher = self._student_features[i], self._teacher_features[i]
            key = str(i)
            if isinstance(existing, nn.ModuleDict) and key in existing:
                adapters[key] = existing[key]
                continue
            adapter = make_adapter(tuple(student.shape), tuple(teacher.shape), generator=generator)
            if adapter is not None:
                adapters[key] = adapter.to(device=param.device, dtype=param.dtype)
        self.adapters = adapters if len(adapters) else None
        if self.adapters is not None:
            setattr(pl_module, ADAPTERS_ATTRIBUTE, adapters)

    def _wrap_training_step(self, pl_module: pl.LightningModule) -> None:
        if self._wrapped is not None:
            return
        previous = vars(pl_module).get("training_step")
        original = pl_module.training_step

        @functools.wraps(original)
        def training_step(*args: Any, **kwargs: Any) -> Any:
            return self._training_step(pl_module, original, *args, **kwargs)

        pl_module.training_step = training_step  # type: ignore[method-assign]
        self._wrapped = (pl_module, previous)

    def _unwrap_training_step(self) -> None:
        if self._wrapped is None:
            return
        pl_module, previous = self._wrapped
        if previous is None:
            vars(pl_module).pop("training_step", None)
        else:
            pl_module.training_step = previous  # type: ignore[method-assign]
        self._wrapped = None

    # -- training ------------------------------------------------------------------------------------

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self._teacher is not None
        self._teacher.to(device=pl_module.device)
        optimized = {
            id(p) for optimizer in trainer.optimizers for g in optimizer.param_groups for p in g["params"]
        }
        if any(id(p) in optimized for p in self._teacher.parameters()):
            raise ValueError(
                "A teacher parameter is in an optimizer; the teacher must stay frozen. Build the optimizer from "
                "the student's parameters only."
            )
        if self.adapters is not None and any(id(p) not in optimized for p in self.adapters.parameters()):
            raise ValueError(
                f"The FitNets adapters (`{ADAPTERS_ATTRIBUTE}` on the LightningModule) are in no optimizer, so "
                "they would never train. Build the optimizer from `self.parameters()` in configure_optimizers."
            )
        # Hooks go on the structure as it is now, after every callback's setup.
        self._remove_hooks()
        self._register_student_hooks(pl_module)
        self._register_teacher_hooks()

    def _register_student_hooks(self, pl_module: pl.LightningModule) -> None:
        entry = _get_module(pl_module, self.module, "module", "student")

        def before(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if self._recording:
                self._entry_inputs.append((args, kwargs))

        def after(module: nn.Module, args: tuple, output: Any) -> None:
            # Calls can nest (Lightning routes `training_step` through the LightningModule's own `__call__` under
            # DDP): inputs and outputs pair up like a stack, and the first call to complete is the one distilled.
            if self._recording and self._entry_inputs:
                inputs = self._entry_inputs.pop()
                if self._capture is None:
                    self._capture = (*inputs, output)

        self._handles.append(entry.register_forward_pre_hook(before, with_kwargs=True))
        self._handles.append(entry.register_forward_hook(after))
        for i, feature in enumerate(self.features):
            target = _get_module(pl_module, feature.student, f"features[{i}].student", "student")
            self._handles.append(target.register_forward_hook(self._feature_hook(i, student=True)))

    def _register_teacher_hooks(self) -> None:
        assert self._teacher is not None
        for i, feature in enumerate(self.features):
            target = _get_module(self._teacher, feature.teacher_name, f"features[{i}].teacher", "teacher")
            self._handles.append(target.register_forward_hook(self._feature_hook(i, student=False)))

    def _feature_hook(self, index: int, student: bool) -> Callable[[nn.Module, tuple, Any], None]:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            recording, store = (
                (self._recording, self._student_features)
                if student
                else (self._teacher_recording, self._teacher_features)
            )
            if recording and index not in store:
                feature = self.features[index]
                name = feature.student if student else feature.teacher_name
                store[index] = _as_tensor(output, f"the output of {name!r}")

        return hook

    def _start_step(self) -> None:
        self._clear()
        self._recording = True
        self._combined = False

    def _clear(self) -> None:
        self._recording = False
        self._entry_inputs = []
        self._capture = None
        self._student_features = {}
        self._teacher_features = {}

    def _training_step(
        self, pl_module: pl.LightningModule, original: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> Any:
        self._start_step()
        try:
            output = original(*args, **kwargs)
            if not pl_module.automatic_optimization:
                if not self._combined:
                    raise RuntimeError(
                        "KnowledgeDistillation cannot add its loss under manual optimization by itself: in "
                        "training_step, call `loss = kd.combine(loss)` (kd: this callback) before "
                        "`self.manual_backward(loss)`."
                    )
                return output
            if self._combined:
                raise RuntimeError(
                    "`combine` was called in training_step under automatic optimization, where "
                    "KnowledgeDistillation adds its loss itself; remove the call (it is for manual optimization)."
                )
            if output is None:
                return None
            if isinstance(output, Mapping):
                if "loss" not in output:
                    return output  # Lightning itself reports the missing key.
                return {**output, "loss": self._combine(pl_module, output["loss"])}
            if isinstance(output, Tensor):
                return self._combine(pl_module, output)
            return output
        finally:
            self._clear()

    def combine(self, task_loss: Tensor) -> Tensor:
        """Mix ``task_loss`` with the distillation loss of the current training step.

        Called automatically after ``training_step``; call it yourself under manual optimization, after the
        student's forward and before ``manual_backward``.

        Args:
            task_loss: the loss against the labels.

        Returns:
            ``(1 - alpha) · task_loss + alpha · distillation_loss``.
        """
        if self._pl_module is None or self._pl_module._trainer is None:
            raise RuntimeError("`combine` works only inside `training_step` of a fit with this callback.")
        return self._combine(self._pl_module, task_loss)

    def _combine(self, pl_module: pl.LightningModule, task_loss: Tensor) -> Tensor:
        if self._capture is None:
            where = "the LightningModule's forward" if not self.module else f"the module {self.module!r}"
            raise RuntimeError(
                f"KnowledgeDistillation saw no call of {where} in this training step, so it has no student "
                "output to distill. Call it in training_step (e.g. `logits = self(x)`), or set `module` to the "
                "module your training_step calls."
            )
        args, kwargs, output = self._capture
        teacher_output = self._run_teacher(args, kwargs)
        logits = self._check(output, teacher_output)
        step = pl_module.trainer.global_step
        alpha = self._alpha_schedule.value(step) if self._alpha_schedule else self.alpha
        temperature = (
            self._temperature_schedule.value(step) if self._temperature_schedule else self.temperature
        )
        terms: dict[str, Tensor] = {}
        if logits is not None:
            terms["kl"] = hinton_loss(logits[0], logits[1], temperature)
        distillation = torch.zeros((), device=task_loss.device)
        for i, feature in enumerate(self.features):
            term = self._feature_term(i, feature)
            terms[feature.label] = term
            distillation = distillation + feature.weight * term
        if "kl" in terms:
            distillation = distillation + terms["kl"]
        total = mix_losses(task_loss, distillation, alpha)
        self._combined = True

        metrics = {"task_loss": task_loss.detach(), "loss": distillation.detach(), "alpha": alpha}
        metrics.update({name: value.detach() for name, value in terms.items()})
        if logits is not None:
            metrics["agreement"] = top1_agreement(*logits)
            metrics["temperature"] = temperature
        for name, value in metrics.items():
            pl_module.log(f"distillation/{name}", value, on_step=True, on_epoch=False)
        self._student_features, self._teacher_features, self._capture = {}, {}, None
        return total

    def _feature_term(self, index: int, feature: FeatureLoss) -> Tensor:
        student = self._student_features.get(index)
        teacher = self._teacher_features.get(index)
        if student is None or teacher is None:
            side, name = (
                ("student", feature.student) if student is None else ("teacher", feature.teacher_name)
            )
            raise RuntimeError(
                f"The {side} module {name!r} of `features[{index}]` produced no output while the "
                f"{'student ran' if student is None else 'teacher ran on the recorded input'}; choose a module "
                f"that runs inside `{'module' if student is None else 'teacher_module'}`."
            )
        adapter = (
            self.adapters[str(index)] if self.adapters is not None and str(index) in self.adapters else None
        )
        if feature.loss == "hint":
            return hint_loss(student, teacher, adapter)
        if feature.loss == "attention":
            return attention_transfer_loss(student, teacher)
        if feature.loss == "mse" and student.shape != teacher.shape:
            raise ValueError(
                f"`features[{index}]`: the student's {feature.student!r} output {tuple(student.shape)} and the "
                f"teacher's {feature.teacher_name!r} output {tuple(teacher.shape)} differ in shape, which 'mse' "
                "cannot compare; use loss='hint' (MSE through a trained adapter)."
            )
        return embedding_loss(student, teacher, feature.loss, adapter)

    def _run_teacher(self, args: tuple, kwargs: dict) -> Any:
        assert self._teacher is not None
        if self._teacher.training:
            self._teacher.eval()
        entry = _get_module(self._teacher, self.teacher_module, "teacher_module", "teacher")
        device = _device(self._teacher)
        if device is not None:
            # A no-op in training (the teacher sits on the student's device); at setup it may not yet.
            args, kwargs = to_device((args, kwargs), device)
        dtype = self._teacher_dtype()
        if dtype is not None:
            args, kwargs = _cast_floating((args, kwargs), dtype)
        self._teacher_features = {}
        self._teacher_recording = True
        try:
            with torch.no_grad(), self._teacher_context():
                output = entry(*args, **kwargs)
        finally:
            self._teacher_recording = False
        for i, feature in enumerate(self.features):
            if i in self._teacher_features:
                _check_finite(self._teacher_features[i], f"the teacher's {feature.teacher_name!r} output")
        return output

    def _teacher_context(self) -> AbstractContextManager:
        if self.teacher_precision is None:
            return nullcontext()
        assert self._teacher is not None
        device = (_device(self._teacher) or torch.device("cpu")).type
        if self.teacher_precision.endswith("-true"):
            # The student's autocast (a "-mixed" Trainer precision) must not override the teacher's own dtype.
            return torch.autocast(device, enabled=False)
        return torch.autocast(device, dtype=_DTYPES[self.teacher_precision.split("-")[0]])

    def _check(self, output: Any, teacher_output: Any) -> tuple[Tensor, Tensor] | None:
        if not self.logits:
            return None
        student = _as_tensor(output, f"the student's {self.module or 'forward'!r} output")
        teacher = _as_tensor(teacher_output, f"the teacher's {self.teacher_module or 'forward'!r} output")
        if student.shape != teacher.shape:
            raise ValueError(
                f"Student logits have shape {tuple(student.shape)} but the teacher's have "
                f"{tuple(teacher.shape)}. Hinton's loss needs the same classes in the same order: check the "
                "teacher (number of classes), or `module`/`teacher_module`, or distill features instead "
                "(`logits=False`, `features=[...]`)."
            )
        _check_finite(teacher, "the teacher's logits")
        return student, teacher

    # -- end -----------------------------------------------------------------------------------------

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.adapters is not None and not self.keep_adapters and hasattr(pl_module, ADAPTERS_ATTRIBUTE):
            delattr(pl_module, ADAPTERS_ATTRIBUTE)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            forget_original(trainer)  # the next fit takes a fresh copy of its own model
        if stage == "fit":
            self._release()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._release()

    def _release(self) -> None:
        self._remove_hooks()
        self._unwrap_training_step()
        self._clear()
        self._pl_module = None

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # -- checkpoints ---------------------------------------------------------------------------------

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
            self._fingerprint = _fingerprint(self._teacher)
            return
        saved = state_dict.get("teacher_fingerprint")
        if (
            saved is not None
            and self._fingerprint is not None
            and not _same_fingerprint(saved, self._fingerprint)
        ):
            raise ValueError(
                "The teacher rebuilt for this resumed fit differs from the one the checkpoint was trained with. "
                "With teacher='self', build the student exactly as in the first run (e.g. load the same "
                "pretrained weights) before resuming; or use `save_teacher=True` to keep the teacher in the "
                "checkpoints."
            )


def _load_teacher(path: str, teacher_class: type[pl.LightningModule]) -> nn.Module:
    """Load a checkpoint ``teacher`` with its class; a mismatch says which keys and shapes differ."""
    try:
        return teacher_class.load_from_checkpoint(path, map_location="cpu")
    except Exception as err:
        detail = _checkpoint_mismatch(path, teacher_class) or f"{type(err).__name__}: {err}."
        raise ValueError(
            f"`teacher={path!r}` does not match `teacher_class={teacher_class.__name__}`. {detail} Pass as "
            "`teacher_class` the LightningModule class that wrote the checkpoint (it is rebuilt from the "
            "hyperparameters saved in it), or pass the teacher as an nn.Module."
        ) from err


def _checkpoint_mismatch(path: str, teacher_class: type[pl.LightningModule]) -> str | None:
    """Which keys and shapes of a checkpoint's ``state_dict`` ``teacher_class`` lacks or holds differently."""
    try:
        # A checkpoint the user names as the teacher is loaded in full by Lightning anyway.
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        saved = checkpoint["state_dict"]
        hparams = dict(checkpoint.get("hyper_parameters") or {})
        parameters = inspect.signature(teacher_class.__init__).parameters
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            hparams = {k: v for k, v in hparams.items() if k in parameters}
        expected = teacher_class(**hparams).state_dict()
    except Exception:
        return None
    name = teacher_class.__name__
    missing = [k for k in expected if k not in saved]
    unexpected = [k for k in saved if k not in expected]
    shapes = [
        f"{k} {tuple(saved[k].shape)} in the checkpoint vs {tuple(expected[k].shape)}"
        for k in expected
        if k in saved and isinstance(saved[k], Tensor) and saved[k].shape != expected[k].shape
    ]
    parts = []
    if missing:
        parts.append(f"{name} has keys the checkpoint lacks: {_first(missing, ', ')}.")
    if unexpected:
        parts.append(f"The checkpoint has keys {name} lacks: {_first(unexpected, ', ')}.")
    if shapes:
        parts.append(f"Shapes differ: {_first(shapes, '; ')}.")
    return " ".join(parts) or None


def _first(items: list[str], separator: str, n: int = 4) -> str:
    shown = separator.join(items[:n])
    return shown if len(items) <= n else f"{shown} (and {len(items) - n} more)"


def _get_module(model: nn.Module, name: str, argument: str, side: str) -> nn.Module:
    if name == "":
        return model
    try:
        return model.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(
            f"`{argument}`: the {side} ({type(model).__name__}) has no module named {name!r}.{hint} "
            "Names are qualified as in `model.named_modules()`; '' is the model itself."
        ) from None


def _device(module: nn.Module) -> torch.device | None:
    tensor = next(itertools.chain(module.parameters(), module.buffers()), None)
    return None if tensor is None else tensor.device


class _OutputError(TypeError):
    """A module output holds no tensor to distill (raised by the hooks, not by the model)."""


def _as_tensor(value: Any, what: str) -> Tensor:
    """The tensor of a module output: itself, a mapping's/an object's ``logits``, or a tuple's first item."""
    if isinstance(value, Tensor):
        return value
    if isinstance(value, Mapping) and "logits" in value:
        return _as_tensor(value["logits"], what)
    if hasattr(value, "logits") and isinstance(value.logits, Tensor):
        return value.logits
    if isinstance(value, tuple | list) and value and isinstance(value[0], Tensor):
        return value[0]
    raise _OutputError(
        f"Cannot find a tensor in {what} (a {type(value).__name__}); a module output must be a tensor, a "
        "tuple whose first item is one, or carry `logits`."
    )


def _check_finite(tensor: Tensor, what: str) -> None:
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(
            f"{what.capitalize()} contain NaN or infinite values. A teacher must produce finite outputs: check "
            "its weights, and with a low `teacher_precision` try '32-true'."
        )


def _cast_floating(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, tuple | list):
        return type(value)(_cast_floating(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _cast_floating(v, dtype) for k, v in value.items()}
    return value


def _fingerprint(model: nn.Module) -> list[float]:
    """Sums and sums of squares (float64) of every floating tensor: equal models, equal fingerprints."""
    total, squares = 0.0, 0.0
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.is_floating_point():
                t = tensor.detach().double()
                total += float(t.sum())
                squares += float(t.pow(2).sum())
    return [total, squares]


def _same_fingerprint(a: Sequence[float], b: Sequence[float]) -> bool:
    return all(math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-9) for x, y in zip(a, b, strict=True))
