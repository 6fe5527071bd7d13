"""Distillation on plain torch modules: what to distill, and a capture that computes the loss with forward hooks.

:class:`DistillationConfig` says what to distill; :class:`DistillationCapture` records the student's input,
output and features with forward hooks, runs the teacher on the same input and computes the distillation
loss; :func:`distill` sets one up on any ``nn.Module``. Nothing here needs a Trainer, and the student's
methods are never replaced: keyword arguments and ``torch.compile`` keep working.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.hooks import RemovableHandle

from lightning_compress import _checks
from lightning_compress._inputs import (
    call_module,
    cast_floating,
    detach_input,
    input_shapes,
    named_arguments,
    to_device,
    weights_dtype,
)
from lightning_compress._positions import CalibrationMaskError, input_layout, kept_rows, position_mask
from lightning_compress.distillation.losses import (
    attention_transfer_loss,
    embedding_loss,
    hint_loss,
    hinton_loss,
    make_adapter,
    mix_losses,
    top1_agreement,
)
from lightning_compress.selection import find_submodule

FEATURE_LOSSES = ("hint", "attention", "cosine", "mse")
TEACHER_PRECISIONS = ("32-true", "64-true", "16-true", "bf16-true", "16-mixed", "bf16-mixed")
_DTYPES = {"32": torch.float32, "64": torch.float64, "16": torch.float16, "bf16": torch.bfloat16}
LOGITS = "logits"  # the logits term's key among a capture's layouts (a feature's is its index)
_LAID_OUT = {"batch_first": "(batch, positions, ...)", "positions_first": "(positions, batch, ...)"}
_MASK_TAKES = "the arguments of the call of `module`, by name (a dict)"


@dataclass(frozen=True)
class FeatureLoss:
    """One feature-level distillation term: a student module's output against a teacher module's output.

    Args:
        student: qualified name of the student module (``""`` is the student's own forward output).
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
        _checks.check_feature_loss(self.student, self.teacher, self.loss, self.weight, FEATURE_LOSSES)

    @property
    def teacher_name(self) -> str:
        """The teacher module's name (``student`` when not given)."""
        return self.student if self.teacher is None else self.teacher

    @property
    def label(self) -> str:
        """The name the term is logged under, e.g. ``hint/net.3``."""
        return f"{self.loss}/{self.student or 'output'}"


@dataclass(frozen=True)
class DistillationConfig:
    """What to distill and how to weigh it against the task loss.

    Args:
        alpha: weight of the distillation loss in ``[0, 1]``; the task loss gets ``1 - alpha``.
        temperature: softmax temperature ``> 0`` of the logits term.
        logits: distill ``module``'s output as logits with Hinton's loss.
        module: the student module whose input is fed to the teacher and whose output is distilled (``""``: the
            student itself).
        teacher_module: the teacher's module to call on that input (``None``: the same name as ``module``).
        features: feature-level terms (:class:`FeatureLoss`).
        teacher_precision: ``None`` (as the student's forward runs) or one of :data:`TEACHER_PRECISIONS`.
        loss_mask: a function from the arguments of the call of ``module``, by name (a dict, however the call spelled
            them), to a boolean ``(batch, positions)`` mask of the positions the logits and the per-position features
            count (``None``: all of them), e.g. ``lambda x: x["attention_mask"]`` to leave padding out. The outputs
            may hold the positions batch first, positions first or flattened (found on one sample of the example
            input); pooled outputs, feature maps and attention maps count whole. A batch it masks entirely adds
            nothing.

    Example::

        >>> config = DistillationConfig(alpha=0.3, module="net", features=[FeatureLoss("net.3")])
        >>> config.teacher_module, config.features
        ('net', (FeatureLoss(student='net.3', teacher=None, loss='hint', weight=1.0),))
        >>> DistillationConfig(logits=False)
        Traceback (most recent call last):
        ...
        ValueError: Nothing to distill: `logits=False` and no `features`. Enable one of them.
    """

    alpha: float = 0.5
    temperature: float = 1.0
    logits: bool = True
    module: str = ""
    teacher_module: str | None = None
    features: Sequence[FeatureLoss] = ()
    teacher_precision: str | None = None
    loss_mask: Callable[[Any], Any] | None = None

    def __post_init__(self) -> None:
        module = _checks.check_module_name(self.module, "module")
        teacher_module = _checks.check_module_name(self.teacher_module, "teacher_module", optional=True)
        values = {
            "alpha": _checks.check_alpha(self.alpha),
            "temperature": _checks.check_temperature(self.temperature),
            "logits": _checks.check_bool(self.logits, "logits"),
            "teacher_module": module if teacher_module is None else teacher_module,
            "features": _checks.check_features(self.features, FeatureLoss, self.logits),
            "teacher_precision": _checks.check_teacher_precision(self.teacher_precision, TEACHER_PRECISIONS),
            "loss_mask": _checks.check_loss_mask(self.loss_mask),
        }
        for name, value in values.items():
            object.__setattr__(self, name, value)

    @property
    def needs_adapters(self) -> bool:
        """Whether a feature term may need an adapter (``"hint"``/``"cosine"``), built by a dry run."""
        return any(f.loss in ("hint", "cosine") for f in self.features)

    @property
    def teacher_dtype(self) -> torch.dtype | None:
        """The dtype the teacher's weights are converted to (a ``"-true"`` ``teacher_precision``)."""
        if self.teacher_precision is None or not self.teacher_precision.endswith("-true"):
            return None
        return _DTYPES[self.teacher_precision.split("-")[0]]


class Distilled(NamedTuple):
    """The distillation loss of one student call: the weighted sum, each term, and the logits compared."""

    loss: Tensor
    terms: dict[str, Tensor]
    logits: tuple[Tensor, Tensor] | None

    def metrics(self, alpha: float, temperature: float) -> dict[str, Any]:
        """The values to log (detached): ``loss``, ``alpha``, each term, and with logits ``agreement`` (top-1)
        and ``temperature``."""
        metrics: dict[str, Any] = {"loss": self.loss.detach(), "alpha": alpha}
        metrics.update({name: value.detach() for name, value in self.terms.items()})
        if self.logits is not None and len(self.logits[0]):
            metrics["agreement"] = top1_agreement(*self.logits)
            metrics["temperature"] = temperature
        return metrics


def freeze_teacher(teacher: nn.Module, config: DistillationConfig) -> nn.Module:
    """Put ``teacher`` in eval mode without gradients, in the dtype of ``config.teacher_precision``."""
    teacher.eval()
    teacher.requires_grad_(False)
    if config.teacher_dtype is not None:
        teacher.to(dtype=config.teacher_dtype)
    return teacher


def check_apart(student: nn.Module, teacher: nn.Module) -> None:
    """The teacher must not share parameters with the student (be the student or a part of it)."""
    shared = {id(p) for p in student.parameters()}
    if any(id(p) in shared for p in teacher.parameters()):
        raise ValueError(
            "The teacher shares parameters with the student (it is the student or a part of it). Pass a "
            "separate model, or teacher='self' for a frozen copy of the student as it was at the start."
        )


def check_optimized(optimized: set[int], teacher: nn.Module, adapters: nn.Module | None) -> None:
    """The ``id`` of every optimized parameter (``optimized``) must leave out the teacher's, and include the
    adapters'."""
    if any(id(p) in optimized for p in teacher.parameters()):
        raise ValueError(
            "A teacher parameter is in an optimizer; the teacher must stay frozen. Build the optimizer from "
            "the student's parameters only."
        )
    if adapters is not None and any(id(p) not in optimized for p in adapters.parameters()):
        raise ValueError(
            "The FitNets adapters (`distillation_adapters` on a LightningModule) are in no optimizer, so they "
            "would never train. Build the optimizer from `self.parameters()` in configure_optimizers (in a plain "
            "loop: add `capture.adapters.parameters()`)."
        )


def check_wrapper(model: nn.Module, adapters: nn.Module | None) -> None:
    """The adapters train outside the model's forward, which a ``DistributedDataParallel`` wrapper that looks for
    unused parameters (``find_unused_parameters=True``) does not allow: it would mark them unused, then receive
    their gradients."""
    if adapters is not None and isinstance(model, DistributedDataParallel) and model.find_unused_parameters:
        raise ValueError(
            "The FitNets adapters train outside the model's forward, which DistributedDataParallel with "
            "`find_unused_parameters=True` does not support. Use `strategy='ddp'` (find_unused_parameters=False), "
            "or features that need no adapter (loss='attention', or equal student and teacher shapes)."
        )


def check_example(config: DistillationConfig, has_example: bool, how: str) -> None:
    """What needs an example input before training: the adapters (built before the optimizer) and the layouts of
    ``loss_mask``; ``how`` says how to give one."""
    if has_example:
        return
    if config.needs_adapters:
        raise ValueError(
            "A 'hint' or 'cosine' feature may need an adapter, which must exist before the optimizer is built: "
            f"{how} so that the student and the teacher run once first."
        )
    if config.loss_mask is not None:
        raise ValueError(
            "`loss_mask` needs the student to run once on an example input (one sample of it) before training, to "
            f"find how its outputs hold the positions: {how}."
        )


def find_module(model: nn.Module, name: str, argument: str, side: str) -> nn.Module:
    """The submodule ``name`` of the ``side`` (student or teacher) model (``""``: itself)."""
    owner = f"the {side} ({type(model).__name__})"
    return find_submodule(model, name, f"{argument}={name!r}", owner, "'' is the model itself")


class DistillationCapture:
    """Records a student's call with forward hooks, runs the teacher on its input, computes the distillation loss.

    A forward pre-hook on the student's ``config.module`` records the input of its first call since the last
    loss (calls may nest: the first to complete is the one kept), a forward hook its output, and forward hooks
    on the ``features`` modules their first outputs. :meth:`distill` then runs the teacher (eval mode, no
    gradients, in ``config.teacher_precision``) on the recorded input and returns the loss terms; :meth:`loss`
    mixes them with a task loss. ``record_if`` limits recording to the calls for which it returns ``True``.
    ``layouts`` (with ``config.loss_mask``): how the logits (:data:`LOGITS`) and each feature (its index) hold the
    positions, as a :meth:`dry_run` finds them.

    Example::

        >>> import torch.nn.functional as F
        >>> _ = torch.manual_seed(0)
        >>> student, teacher = nn.Linear(4, 3), nn.Linear(4, 3)
        >>> x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
        >>> with DistillationCapture(student, teacher, DistillationConfig(alpha=0.5)) as capture:
        ...     logits = student(x)
        ...     loss = capture.loss(F.cross_entropy(logits, y))
        >>> expected = 0.5 * F.cross_entropy(logits, y) + 0.5 * hinton_loss(logits, teacher(x))
        >>> torch.allclose(loss, expected)
        True
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        config: DistillationConfig,
        adapters: nn.ModuleDict | None = None,
        record_if: Callable[[], bool] | None = None,
        layouts: Mapping[str, str | None] | None = None,
    ) -> None:
        self.student, self.teacher, self.config = student, teacher, config
        self.adapters = adapters
        self.layouts = None if layouts is None else dict(layouts)
        self.record_if = record_if
        self._handles: list[RemovableHandle] = []
        self._teacher_running = False
        self._inputs: list[tuple[tuple, dict]] = []
        self.reset()

    # -- hooks -----------------------------------------------------------------------------------------------

    def check_names(self) -> None:
        """Look up every module the capture uses by name: an unknown name is a ``ValueError`` naming it."""
        find_module(self.student, self.config.module, "module", "student")
        for i, f in enumerate(self.config.features):
            find_module(self.student, f.student, f"features[{i}].student", "student")
        find_module(self.teacher, self.config.teacher_module or "", "teacher_module", "teacher")
        for i, f in enumerate(self.config.features):
            find_module(self.teacher, f.teacher_name, f"features[{i}].teacher", "teacher")

    def attach(self) -> list[RemovableHandle]:
        """Register the forward hooks (the modules are looked up by name now); returns their handles."""
        self.remove()
        self.check_names()
        entry = find_module(self.student, self.config.module, "module", "student")
        self._handles = [
            entry.register_forward_pre_hook(self._before, with_kwargs=True),
            entry.register_forward_hook(self._after),
        ]
        for i, f in enumerate(self.config.features):
            target = self.student.get_submodule(f.student)
            self._handles.append(target.register_forward_hook(self._feature_hook(i, student=True)))
        for i, f in enumerate(self.config.features):
            target = self.teacher.get_submodule(f.teacher_name)
            self._handles.append(target.register_forward_hook(self._feature_hook(i, student=False)))
        return list(self._handles)

    def remove(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> DistillationCapture:
        if not self._handles:
            self.attach()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()

    def _recording(self) -> bool:
        return self.record_if is None or self.record_if()

    def _before(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._recording():
            self._inputs.append((args, kwargs))

    def _after(self, module: nn.Module, args: tuple, output: Any) -> None:
        # Calls can nest (Lightning routes `training_step` through the LightningModule's own `__call__` under
        # DDP): inputs and outputs pair up like a stack, and the first call to complete is the one distilled.
        if self._recording() and self._inputs:
            inputs = self._inputs.pop()
            if self._capture is None:
                self._capture = (*inputs, output)

    def _feature_hook(self, index: int, student: bool) -> Callable[[nn.Module, tuple, Any], None]:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            recording = self._recording() if student else self._teacher_running
            store = self._student_features if student else self._teacher_features
            if recording and index not in store:
                feature = self.config.features[index]
                name = feature.student if student else feature.teacher_name
                store[index] = _as_tensor(output, f"the output of {name!r}")

        return hook

    # -- the loss --------------------------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget what was recorded (the next call of ``module`` is the one distilled)."""
        self._inputs = []
        self._capture: tuple[tuple, dict, Any] | None = None
        self._student_features: dict[int, Tensor] = {}
        self._teacher_features: dict[int, Tensor] = {}

    @property
    def captured(self) -> bool:
        """Whether a call of the student's ``module`` was recorded since the last loss."""
        return self._capture is not None

    def distill(self, temperature: float | None = None) -> Distilled:
        """Run the teacher on the recorded input and compute the distillation loss of the recorded call.

        ``distillation_loss = T² · KL(p_teacher ‖ p_student)`` (``logits``) ``+ Σ weight · feature term``.
        The recording is consumed: the next call of ``module`` is recorded for the next loss.
        """
        if self._capture is None:
            module = self.config.module
            where = "the student's forward" if not module else f"the student's module {module!r}"
            raise RuntimeError(
                f"No call of {where} was recorded in this step, so there is no student output to distill. Call "
                "it before the loss (in a LightningModule: in training_step, e.g. `logits = self(x)`), or set "
                "`module` to the module the step calls."
            )
        args, kwargs, output = self._capture
        temperature = self.config.temperature if temperature is None else temperature
        distilled = self._distilled(args, kwargs, output, self.run_teacher(args, kwargs), temperature)
        self._capture, self._student_features, self._teacher_features = None, {}, {}
        return distilled

    def _distilled(
        self, args: tuple, kwargs: dict, output: Any, teacher_output: Any, temperature: float
    ) -> Distilled:
        mask = self._mask(args, kwargs)
        logits = self.check_logits(output, teacher_output)
        terms: dict[str, Tensor] = {}
        if logits is not None:
            logits = self._kept(logits, mask, LOGITS, "the logits")
            terms["kl"] = _unless_empty(hinton_loss, *logits, temperature=temperature)
        distillation = torch.zeros((), device=_device(self.student))
        for i, feature in enumerate(self.config.features):
            term = self._feature_term(i, feature, mask)
            terms[feature.label] = term
            distillation = distillation + feature.weight * term
        if "kl" in terms:
            distillation = distillation + terms["kl"]
        return Distilled(distillation, terms, logits)

    def _mask(self, args: tuple, kwargs: dict) -> Tensor | None:
        """The ``(batch, positions)`` mask of ``config.loss_mask`` for the recorded input (``None`` without one)."""
        if self.config.loss_mask is None:
            return None
        if self.layouts is None:
            raise RuntimeError(
                "`loss_mask` needs the layouts of the outputs, found by a dry run on an example input: call "
                "`dry_run` first, or set up the capture with `distill(..., example_input=...)`."
            )
        return position_mask(self.config.loss_mask, self._arguments(args, kwargs), "loss_mask", _MASK_TAKES)

    def _arguments(self, args: tuple, kwargs: dict) -> dict[Any, Any]:
        """The recorded call's arguments by name, what ``config.loss_mask`` takes."""
        entry = find_module(self.student, self.config.module, "module", "student")
        return named_arguments(entry.forward, args, kwargs)

    def _kept(
        self, pair: tuple[Tensor, Tensor], mask: Tensor | None, key: str, what: str
    ) -> tuple[Tensor, Tensor]:
        """The student's and the teacher's rows of ``pair`` at the positions ``mask`` keeps, laid out as the
        ``key`` term was found at the dry run (all of them without a mask, or for a term that holds no positions)."""
        layout = self.layouts.get(key) if mask is not None and self.layouts else None
        if mask is None or layout is None:
            return pair
        kept = tuple(kept_rows(x, mask, layout) for x in pair)
        for x, rows in zip(pair, kept, strict=True):
            if rows is x:  # the shape does not fit the mask
                raise CalibrationMaskError(
                    f"`loss_mask` gave a mask of shape {tuple(mask.shape)} (batch, positions), and {what} of shape "
                    f"{tuple(x.shape)} does not hold them laid out {_LAID_OUT.get(layout, '(batch·positions, ...)')} "
                    "as at the dry run. Return the mask of this input's positions."
                )
        return kept[0], kept[1]

    def loss(self, task_loss: Tensor, alpha: float | None = None, temperature: float | None = None) -> Tensor:
        """``(1 - alpha) · task_loss + alpha · distillation_loss`` of the recorded call (see :meth:`distill`)."""
        distilled = self.distill(temperature)
        return mix_losses(task_loss, distilled.loss, self.config.alpha if alpha is None else alpha)

    def run_teacher(self, args: tuple, kwargs: dict) -> Any:
        """Call the teacher's ``teacher_module`` on the student's recorded input, recording its features."""
        if self.teacher.training:
            self.teacher.eval()
        entry = find_module(self.teacher, self.config.teacher_module or "", "teacher_module", "teacher")
        device = _device(self.teacher)
        if device is not None:
            args, kwargs = to_device((args, kwargs), device)
        # The teacher's own precision, else its weights' (the student's input is cast to what the fit trains at).
        args, kwargs = cast_floating((args, kwargs), self.config.teacher_dtype or weights_dtype(self.teacher))
        self._teacher_features = {}
        self._teacher_running = True
        try:
            with torch.no_grad(), self._teacher_context():
                output = entry(*args, **kwargs)
        finally:
            self._teacher_running = False
        for i, feature in enumerate(self.config.features):
            if i in self._teacher_features:
                _check_finite(self._teacher_features[i], f"the teacher's {feature.teacher_name!r} output")
        return output

    def _teacher_context(self) -> AbstractContextManager:
        precision = self.config.teacher_precision
        if precision is None:
            return nullcontext()
        device = (_device(self.teacher) or torch.device("cpu")).type
        if precision.endswith("-true"):
            # The student's autocast (a "-mixed" Trainer precision) must not override the teacher's own dtype.
            return torch.autocast(device, enabled=False)
        return torch.autocast(device, dtype=_DTYPES[precision.split("-")[0]])

    def check_logits(self, output: Any, teacher_output: Any) -> tuple[Tensor, Tensor] | None:
        """The student's and the teacher's logits (``None`` without ``logits``), checked for shape and NaN."""
        if not self.config.logits:
            return None
        student = _as_tensor(output, f"the student's {self.config.module or 'forward'!r} output")
        teacher = _as_tensor(
            teacher_output, f"the teacher's {self.config.teacher_module or 'forward'!r} output"
        )
        if student.shape != teacher.shape:
            raise ValueError(
                f"Student logits have shape {tuple(student.shape)} but the teacher's have "
                f"{tuple(teacher.shape)}. Hinton's loss needs the same classes in the same order: check the "
                "teacher (number of classes), or `module`/`teacher_module`, or distill features instead "
                "(`logits=False`, `features=[...]`)."
            )
        _check_finite(teacher, "the teacher's logits")
        return student, teacher

    def _feature_term(self, index: int, feature: FeatureLoss, mask: Tensor | None = None) -> Tensor:
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
        adapters = self.adapters
        adapter = adapters[str(index)] if adapters is not None and str(index) in adapters else None
        if feature.loss == "attention":
            return attention_transfer_loss(student, teacher)
        if feature.loss == "mse" and student.shape != teacher.shape:
            raise ValueError(
                f"`features[{index}]`: the student's {feature.student!r} output {tuple(student.shape)} and the "
                f"teacher's {feature.teacher_name!r} output {tuple(teacher.shape)} differ in shape, which 'mse' "
                "cannot compare; use loss='hint' (MSE through a trained adapter)."
            )
        student, teacher = self._kept(
            (student, teacher), mask, str(index), f"the output of {feature.student!r}"
        )
        if feature.loss == "hint":
            return _unless_empty(hint_loss, student, teacher, adapter=adapter)
        return _unless_empty(embedding_loss, student, teacher, metric=feature.loss, adapter=adapter)

    # -- the dry run -----------------------------------------------------------------------------------------

    def dry_run(
        self,
        example_input: Any,
        argument: str = "example_input",
        existing: Mapping[str, nn.Module] | None = None,
    ) -> bool:
        """Run the student and the teacher once on ``example_input`` (eval mode, no gradients): check the shapes
        and values of every term, and create the adapters the ``"hint"``/``"cosine"`` features need (set as
        :attr:`adapters`; those in ``existing`` are kept). ``argument`` names the example input in errors.

        Returns ``False`` (with a warning, the checks then happen at the first loss) when the student's forward
        does not call ``module`` on the example input; with a feature that may need an adapter that is an error.
        """
        attached = bool(self._handles)
        if not attached:
            self.attach()
        was_training = self.student.training
        self.reset()
        try:
            self.student.eval()
            with torch.no_grad():
                if self.config.loss_mask is not None and self._run_student(
                    detach_input(example_input, max_batch=1), argument
                ):
                    self.layouts = self._probe()
                    self.reset()
                if not self._run_student(example_input, argument):
                    return False
                args, kwargs, output = self._capture  # type: ignore[misc]
                self._inputs = []
                try:
                    teacher_output = self.run_teacher(args, kwargs)
                except (RuntimeError, TypeError) as err:  # the teacher's forward itself: shapes, arguments
                    raise self._teacher_rejects(args, kwargs, err) from err
                self.check_logits(output, teacher_output)
                self.adapters = self._build_adapters(existing or {})
                self._distilled(args, kwargs, output, teacher_output, self.config.temperature)
            return True
        finally:
            self.student.train(was_training)
            self.reset()
            if not attached:
                self.remove()

    def _run_student(self, example_input: Any, argument: str) -> bool:
        """Call the student on ``example_input`` (the dry run): whether it called ``module``; an error or a warning
        (the checks then run at the first loss) when it did not."""
        try:
            call_module(self.student, example_input)
        except _OutputError:
            raise
        except Exception as err:
            raise ValueError(
                f"`{argument}` of shape {input_shapes(example_input)} was rejected by the student "
                f"({type(self.student).__name__}) in the setup check: {type(err).__name__}: {err}. Pass "
                "an input the student's forward accepts, e.g. one batch of training inputs."
            ) from err
        if self._capture is not None:
            return True
        message = f"The student's forward did not call `module={self.config.module!r}` on `{argument}`"
        if self.config.needs_adapters or self.config.loss_mask is not None:
            needs = (
                "the adapters cannot be built"
                if self.config.needs_adapters
                else "`loss_mask` cannot be set up"
            )
            raise ValueError(f"{message}, so {needs}. Pass a matching input.")
        warnings.warn(f"{message}; the checks run at the first loss instead.", stacklevel=3)
        return False

    def _probe(self) -> dict[str, str | None]:
        """How the recorded call's output and features hold the positions of ``config.loss_mask``: run on one
        sample, where the layouts differ. Feature maps ``(N, C, H, W)`` and attention maps count whole."""
        assert self._capture is not None and self.config.loss_mask is not None
        args, kwargs, output = self._capture
        mask = position_mask(self.config.loss_mask, self._arguments(args, kwargs), "loss_mask", _MASK_TAKES)
        layouts: dict[str, str | None] = {LOGITS: None}
        if self.config.logits:
            layouts[LOGITS] = _sequence_layout(_as_tensor(output, "the student's output"), mask)
        for i, feature in enumerate(self.config.features):
            held = self._student_features.get(i)
            per_position = feature.loss != "attention" and held is not None
            layouts[str(i)] = _sequence_layout(held, mask) if per_position else None  # type: ignore[arg-type]
        if not any(layouts.values()):
            raise CalibrationMaskError(
                f"`loss_mask` gave a mask of shape {tuple(mask.shape)} (batch, positions) for one sample, and "
                "neither the logits nor a feature holds those positions, laid out (batch, positions, ...), "
                "(positions, batch, ...) or (batch·positions, ...). Distill per-position outputs (e.g. a language "
                "model's logits) or leave `loss_mask` unset."
            )
        return layouts

    def _teacher_rejects(self, args: tuple, kwargs: dict, err: Exception) -> ValueError:
        entry = self.config.teacher_module
        where = f"`teacher_module={entry!r}`" if entry else "its forward"
        return ValueError(
            f"The teacher ({type(self.teacher).__name__}) cannot run {where} on the student's input "
            f"{input_shapes((*args, *kwargs.values()))}: {type(err).__name__}: {err}. The teacher must accept what "
            "the student's `module` receives: check `teacher`/`teacher_class` (the architecture) and "
            "`module`/`teacher_module`."
        )

    def _build_adapters(self, existing: Mapping[str, nn.Module]) -> nn.ModuleDict | None:
        param = next(itertools.chain(self.student.parameters(), [torch.empty(0)]))
        generator = torch.Generator().manual_seed(0)
        adapters = nn.ModuleDict()
        for i, feature in enumerate(self.config.features):
            key = str(i)
            if feature.loss not in ("hint", "cosine"):
                continue
            if key in existing:
                adapters[key] = existing[key]
                continue
            student, teacher = self._student_features[i], self._teacher_features[i]
            adapter = make_adapter(tuple(student.shape), tuple(teacher.shape), generator=generator)
            if adapter is not None:
                adapters[key] = adapter.to(device=param.device, dtype=param.dtype)
        return adapters if len(adapters) else None


def distill(
    student: nn.Module, teacher: nn.Module, config: DistillationConfig, example_input: Any = None
) -> DistillationCapture:
    """Set up the distillation of ``student`` from ``teacher`` in a plain training loop: the hooks are attached.

    The teacher is frozen (eval mode, no gradients, ``config.teacher_precision``). With ``example_input`` a dry
    run checks every name, shape and value and creates the FitNets adapters (``capture.adapters``: train them
    with the student); without one the checks happen at the first loss. Call ``capture.remove()`` (or use the
    capture as a context manager) to detach it.

    Example::

        >>> import torch.nn.functional as F
        >>> _ = torch.manual_seed(0)
        >>> student = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> teacher = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
        >>> config = DistillationConfig(alpha=0.5, features=[FeatureLoss("0")])
        >>> capture = distill(student, teacher, config, example_input=torch.zeros(1, 4))
        >>> capture.adapters["0"]  # maps the student's 8 hidden units to the teacher's 16
        FeatureAdapter(linear 8 -> 16)
        >>> optimizer = torch.optim.SGD([*student.parameters(), *capture.adapters.parameters()], lr=0.1)
        >>> x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
        >>> losses = []
        >>> for _ in range(20):
        ...     loss = capture.loss(F.cross_entropy(student(x), y))
        ...     optimizer.zero_grad()
        ...     loss.backward()
        ...     optimizer.step()
        ...     losses.append(float(loss.detach()))
        >>> losses[-1] < losses[0]
        True
        >>> capture.remove()
    """
    check_apart(student, freeze_teacher(teacher, config))
    capture = DistillationCapture(student, teacher, config)
    check_example(config, example_input is not None, "pass `example_input`")
    if example_input is not None:
        capture.dry_run(example_input)
    capture.attach()
    return capture


def _unless_empty(loss: Callable[..., Tensor], student: Tensor, teacher: Tensor, **options: Any) -> Tensor:
    """``loss(student, teacher, **options)``, or a zero that keeps the graph when ``loss_mask`` kept no row."""
    if student.shape[0] == 0:
        return student.float().sum() * 0.0
    return loss(student, teacher, **options)


def _sequence_layout(x: Tensor, mask: Tensor) -> str | None:
    """:func:`~lightning_compress._positions.input_layout` of a 2-d or 3-d output (a 4-d one is a feature map)."""
    return input_layout(x, mask) if x.dim() <= 3 else None


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
