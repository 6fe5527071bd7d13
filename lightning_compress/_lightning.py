"""Small helpers shared by the callbacks: training length, the original model, example inputs."""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import os
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_compress._checkpoints import HINT_PREFIX, add_checkpoint_hint, drop_checkpoint_hints  # noqa: F401
from lightning_compress._inputs import detach_input, first_batches, first_input, preserved_rng, to_device  # noqa: F401
from lightning_compress.schedules import Point, Schedule, ScheduleFn, resolve_point

# One frozen copy of the model as it was before any callback changed it, per Trainer. Every callback that
# changes structure calls `remember_original` first, so whichever callback runs first takes the copy.
_ORIGINALS: weakref.WeakKeyDictionary[pl.Trainer, nn.Module] = weakref.WeakKeyDictionary()


def at_fit_precision(trainer: pl.Trainer, module: nn.Module) -> nn.Module:
    """``module`` converted in place as Lightning converts the fit's LightningModule after the callbacks' setup:
    its floating-point weights to ``bfloat16``/``float16``/``float64`` with ``precision="bf16-true"``/``"16-true"``
    /``"64-true"``; unchanged with any other precision (mixed precision keeps fp32 weights)."""
    dtype = _TRUE_PRECISIONS.get(str(trainer.precision))
    return module if dtype is None else module.to(dtype=dtype)


# The precisions in which Lightning converts the LightningModule's weights (any strategy's plugin).
_TRUE_PRECISIONS = {"bf16-true": torch.bfloat16, "16-true": torch.float16, "64-true": torch.float64}


def remember_original(trainer: pl.Trainer, pl_module: pl.LightningModule) -> nn.Module:
    """Return the frozen copy of ``pl_module`` taken before the first compression change of this fit, at the fit's
    precision (the model the fit would train without compression)."""
    original = _ORIGINALS.get(trainer)
    if original is None:
        original = at_fit_precision(trainer, copy.deepcopy(pl_module))
        original.eval()
        original.requires_grad_(False)
        _ORIGINALS[trainer] = original
    return original


def forget_original(trainer: pl.Trainer) -> None:
    """Release the copy taken by :func:`remember_original` (at teardown)."""
    _ORIGINALS.pop(trainer, None)


def defines_configure_model(model: nn.Module) -> bool:
    """Whether ``model`` is a LightningModule that builds (some of) its layers in ``configure_model``."""
    hook = getattr(type(model), "configure_model", None)
    return isinstance(model, pl.LightningModule) and hook is not pl.LightningModule.configure_model


def _identities(model: nn.Module) -> list[tuple[str, int]]:
    modules = [(name, id(module)) for name, module in model.named_modules(remove_duplicate=False)]
    return modules + [(name, id(p)) for name, p in model.named_parameters(remove_duplicate=False)]


def build_model(trainer: pl.Trainer, pl_module: nn.Module) -> None:
    """Run the LightningModule's ``configure_model`` now when the model has no parameters yet, on the strategy's
    device (the precision converts the layers later, as it does a model built in ``__init__``).

    Lightning calls ``configure_model`` after the callbacks' ``setup``; the callbacks select and change the layers
    in ``setup``, so a model that builds its layers there is built first. A model with parameters already (built
    in ``__init__``) is left for Lightning to call the hook on (it may wrap the layers, as ``torch.compile``).
    Lightning asks the hook to be idempotent (it calls it again, at every stage); one that builds new layers at its
    second call would drop what the callbacks did, so it is called twice and refused then.
    """
    # Built in `__init__` (or by the first compression callback to set up): the hook is Lightning's to call (it
    # may wrap the layers, e.g. torch.compile).
    if not defines_configure_model(pl_module) or next(pl_module.parameters(), None) is not None:
        return

    def configure(module: nn.Module) -> None:
        # Without the precision's init context: the layers are float32 at setup, as a model built in `__init__`
        # is; Lightning converts both after the callbacks set up ("bf16-true").
        strategy = trainer.strategy
        with torch.device(strategy.root_device), strategy.model_sharded_context():
            module.configure_model()  # type: ignore[operator]

    configure(pl_module)
    before = _identities(pl_module)
    configure(pl_module)
    if _identities(pl_module) != before:
        name = type(pl_module).__name__
        raise ValueError(
            f"`{name}.configure_model` built new layers when called a second time. Lightning calls it again "
            "after the compression callbacks set up (and at every `validate`/`test`/`predict`), which would "
            "drop the layers they changed. Make it idempotent, as Lightning asks: build only what is "
            "missing, e.g. `if self.net is not None: return` at its start."
        )


def run_directory(trainer: pl.Trainer) -> Path | None:
    """This run's own directory for the files a callback writes (the report, its plots): the first logger's
    versioned ``log_dir`` for TensorBoard and CSV, else ``<save_dir>/<name>/<version>``, where Lightning's
    ``ModelCheckpoint`` writes (MLflow: experiment and run id; W&B: project and run id). ``None`` without a logger,
    or when the logger keeps nothing on the local disk (a remote MLflow server). A collective call under DDP."""
    if not trainer.loggers:
        return None
    logger = trainer.loggers[0]
    if isinstance(logger, TensorBoardLogger | CSVLogger):
        folder = trainer.log_dir
    else:
        folder = None
        if logger.save_dir is not None:
            version = logger.version
            version = version if isinstance(version, str) else f"version_{version}"
            folder = os.path.join(logger.save_dir, str(logger.name), version)
        folder = trainer.strategy.broadcast(folder)
    return None if folder is None else Path(folder)


def training_steps(trainer: pl.Trainer) -> tuple[int, int | None]:
    """Optimizer steps of the whole fit and per epoch (``None`` when unknown, e.g. an infinite loader).

    With training data of unknown length, ``trainer.max_steps`` is the length of the fit. Without either,
    the error says how to give one.
    """
    total = trainer.estimated_stepping_batches
    # Lightning answers `max_steps` (-1 when unset) for data without a length, and infinity for endless epochs.
    if not math.isfinite(total) or total < 0:
        if trainer.max_epochs == -1:
            reason = "`max_epochs=-1` and `max_steps=-1` train without end"
        else:
            reason = "the training data has no length (an IterableDataset without `__len__`) and `max_steps` is unset"
        raise ValueError(
            f"The length of this fit is unknown: {reason}, so fractions of training (`start`/`end` such as 0.5) "
            "cannot be turned into steps. Set `Trainer(max_steps=N)` (fractions then count from it), or give "
            "optimizer steps, e.g. `start='step:100'`, `end='step:1000'`."
        )
    return int(total), steps_per_epoch(trainer)


def steps_per_epoch(trainer: pl.Trainer) -> int | None:
    """Optimizer steps per epoch, ``None`` when the training data has no length."""
    batches = trainer.num_training_batches
    if math.isfinite(batches) and batches > 0:
        return max(1, math.ceil(batches / trainer.accumulate_grad_batches))
    return None


def resolve_step(trainer: pl.Trainer, point: Point, name: str) -> int:
    """The optimizer step of a ``start``/``end`` value in this fit; ``name`` is the argument, for errors.

    Only a fraction of training needs the length of the fit: ``"step:N"`` resolves without it, so a fit of
    unknown length (an IterableDataset without ``__len__``) works with step counts.
    """
    if isinstance(point, float):
        total, per_epoch = training_steps(trainer)
    else:
        if trainer.train_dataloader is None:
            # What `estimated_stepping_batches` does first: `num_training_batches` is known after it.
            trainer.fit_loop.setup_data()
        total, per_epoch = 0, steps_per_epoch(trainer)
    return resolve_point(point, total, per_epoch, name)


def build_schedule(
    trainer: pl.Trainer,
    initial: float,
    final: float,
    start: Point,
    end: Point,
    schedule: str | ScheduleFn,
    frequency: int,
) -> Schedule:
    """Resolve ``start``/``end`` against the trainer and build the :class:`Schedule` in optimizer steps."""
    return Schedule(
        initial=initial,
        final=final,
        start=resolve_step(trainer, start, "start"),
        end=resolve_step(trainer, end, "end"),
        schedule=schedule,
        frequency=frequency,
    )


class StepsPerBatchCheck(Callback):
    """Warns once when ``trainer.global_step`` advances more than one step per training batch (manual
    optimization stepping several optimizers) in a fit whose length counts batches (no ``max_steps``): the
    schedules count ``global_step``, so fractions of training and ``"epoch:N"`` resolve to steps that come
    that many times too early. Added by the compression callbacks in ``setup`` (see :func:`check_steps_per_batch`).
    """

    def __init__(self) -> None:
        self.before, self.warned = 0, False

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self.before = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        steps = trainer.global_step - self.before
        if steps > 1 and not self.warned:
            self.warned = True
            rank_zero_warn(
                f"`trainer.global_step` advanced {steps} steps in one training batch (manual optimization "
                f"stepping {steps} optimizers), but this fit's length counts batches "
                f"({trainer.estimated_stepping_batches} steps): the compression schedules count `global_step`, so "
                f"`start`/`end` given as fractions of training or as 'epoch:N' take effect {steps}x too early. "
                "Set `Trainer(max_steps=...)` in `global_step` units (fractions then count from it), or give "
                "'step:N' values."
            )


class ModelGuard(Callback):
    """Gives the LightningModule back the submodules it had before the compression callbacks set up when the fit
    ends before training: an exception in ``setup``, ``on_fit_start`` or the sanity check, or a tuner trial
    (``Tuner.lr_find``/``scale_batch_size``, which trains a copy of the run and leaves without finishing it). A
    fit retried on the same model then starts from the model the user built, not a half-compressed one.

    Added by the compression callbacks in ``setup`` (see :func:`guard_model`) when one of them changes the
    structure there. The snapshot is dropped when training starts or the fit ends (a tuner trial ends with
    ``teardown`` alone).
    """

    def __init__(self, pl_module: nn.Module) -> None:
        self.module = weakref.ref(pl_module)
        parts = ("_modules", "_parameters", "_buffers")
        try:
            self.saved: dict[str, dict] | None = copy.deepcopy(
                {k: dict(getattr(pl_module, k)) for k in parts}
            )
        except RuntimeError:  # a model torch cannot copy (`torch.nn.utils.weight_norm`'s hooks): no guard
            self.saved = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not _tuner_trial(trainer):
            self.saved = None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.saved = None  # a fit resumed at its last step does not train, and ends normally

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self.restore()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.restore()  # a tuner trial ends with `teardown` alone

    def restore(self) -> None:
        saved, self.saved, module = self.saved, None, self.module()
        if saved is None or module is None:
            return
        for key, value in saved.items():
            getattr(module, key).clear()
            getattr(module, key).update(value)
        _FLOAT_VIEWS.pop(module, None)  # a graph that ran the float modules is gone with them


def _tuner_trial(trainer: pl.Trainer) -> bool:
    """Whether this fit is a tuner's trial: Lightning's finders that end the fit once they found their value."""
    names = ("LearningRateFinder", "BatchSizeFinder")
    return any(type(c).__name__ in names and getattr(c, "_early_exit", False) for c in trainer.callbacks)  # type: ignore[attr-defined]


def guard_model(trainer: pl.Trainer, pl_module: nn.Module, callbacks: Iterable[Any]) -> None:
    """Add a :class:`ModelGuard` of ``pl_module`` for this fit when one of ``callbacks`` changes the structure (or
    the class) of its layers in ``setup``; once per fit."""
    if not any(
        getattr(c, "changes_structure", False) or getattr(c, "reparametrizes", False) for c in callbacks
    ):
        return
    listed = trainer.callbacks  # type: ignore[attr-defined]
    if any(isinstance(c, ModelGuard) and c.saved is not None for c in listed):
        return
    trainer.callbacks = [c for c in listed if not isinstance(c, ModelGuard)] + [ModelGuard(pl_module)]  # type: ignore[attr-defined]


def mean_over_processes(trainer: pl.Trainer, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each of ``tensors`` averaged over the fit's processes (itself in a single process)."""
    return {name: trainer.strategy.reduce(tensor, reduce_op="mean") for name, tensor in tensors.items()}


def check_steps_per_batch(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """Add a :class:`StepsPerBatchCheck` to a fit with manual optimization and no ``max_steps`` (once)."""
    if pl_module.automatic_optimization or trainer.max_steps != -1:
        return
    if not any(isinstance(c, StepsPerBatchCheck) for c in trainer.callbacks):  # type: ignore[attr-defined]
        trainer.callbacks.append(StepsPerBatchCheck())  # type: ignore[attr-defined]


def replace_parameters(trainer: pl.Trainer, replaced: dict[nn.Parameter, list[nn.Parameter]]) -> None:
    """Point every optimizer at the parameters of layers replaced during training.

    ``replaced`` maps each old parameter to the parameters that take its place (an empty list: it is gone). In
    every parameter group the new parameters take the old one's position, so they train with its group's
    hyperparameters (learning rate, weight decay) and in the order ``module.parameters()`` lists them for the
    new structure — what ``configure_optimizers`` builds when a resumed run rebuilds that structure, so the
    checkpointed optimizer state loads. The old parameters' state is dropped; the new ones start without state
    (their shapes differ: there is nothing to carry over). Learning-rate schedulers hold the optimizers and keep
    working. A trainable new parameter that lands in no optimizer is an error.

    Only single-process training is supported: distributed wrappers register parameters when they wrap.
    """
    if trainer.world_size > 1:
        raise RuntimeError(
            "Replacing layers during training needs a single process: "
            f"{type(trainer.strategy).__name__} registered the parameters when it wrapped the model. "
            "Replace in `setup` instead (the default)."
        )
    by_id = {id(old): new for old, new in replaced.items()}
    placed: set[int] = set()
    for optimizer in trainer.optimizers:
        for group in optimizer.param_groups:
            params: list[torch.Tensor] = []
            for param in group["params"]:
                if id(param) in by_id:
                    params.extend(by_id[id(param)])
                    placed.update(id(p) for p in by_id[id(param)])
                else:
                    params.append(param)
            group["params"] = params
        for old in replaced:
            optimizer.state.pop(old, None)
    missing = [p for new in replaced.values() for p in new if p.requires_grad and id(p) not in placed]
    if missing:
        raise RuntimeError(
            f"{len(missing)} new trainable parameters belong to no optimizer: the replaced layers' parameters "
            "were not in any optimizer's parameter groups."
        )


def per_layer_name(prefix: str, stat: str, name: str) -> str:
    """The logged name of one layer's value: ``<prefix>per_layer/<stat>/<name>``.

    Every callback files per-layer values under ``per_layer/`` so that no logged name is a ``/``-prefix of
    another: trackers that store a metric as a file (MLflow's file store) cannot also hold
    ``<name>/<weight>`` beneath it.

    Example::

        >>> per_layer_name("pruning/", "weight_sparsity", "net.0.weight")
        'pruning/per_layer/weight_sparsity/net.0.weight'
    """
    return f"{prefix}per_layer/{stat}/{name}"


def log_step(trainer: pl.Trainer) -> int:
    """The step under which a callback writes to ``trainer.loggers`` directly.

    Lightning files what ``pl_module.log`` receives in ``on_train_batch_end`` (and the training loss) under the
    0-based index of the optimizer step just taken, and epoch-end values under the epoch's last step. Values
    written with ``logger.log_metrics`` go under the same index, ``global_step - 1``, so every callback's
    numbers line up with each other and with the loss (0 before the first step).
    """
    return max(trainer.global_step - 1, 0)


# -- composition: one order of effects, the float layers behind a graph -------------------------------------

# Lightning calls each hook on the callbacks in list order. The compression callbacks' hooks are wrapped
# (`in_effect_order`, applied by `CompressionCallback` to every hook a subclass defines): the first compression
# callback in `trainer.callbacks` runs the hook of all of them, in their declared `effect_order` (structure first,
# quantization last, the report after everything), and Lightning's calls to the others are skipped. Every hook
# (setup, the per-step updates, finalize at the end) runs in the declared order, whatever order the user listed
# the callbacks in, and `trainer.callbacks` stays the user's list. Inside such a run, and for a callback that is
# not attached to the trainer it is called with, a hook is a plain method call.
_RUNNING = threading.local()

# The hooks Lightning calls on every callback in list order.
LIGHTNING_HOOKS = frozenset(
    name for name in vars(pl.Callback) if name.startswith("on_") or name in ("setup", "teardown")
)


def _effect_order(callback: object) -> int | None:
    # Declared by the class (a user's subclass keeps its place), or by the instance.
    return getattr(callback, "effect_order", None)


def in_effect_order(hook: Callable[..., Any], name: str) -> Callable[..., Any]:
    """``hook`` (the callback method Lightning calls as ``name``) run for every compression callback in effect
    order by the first of them in the trainer's list."""
    if getattr(hook, "_in_effect_order", False):
        return hook

    @functools.wraps(hook)
    def ordered(callback: Any, trainer: Any, *args: Any, **kwargs: Any) -> Any:
        if getattr(_RUNNING, "active", False) or _effect_order(callback) is None:
            return hook(callback, trainer, *args, **kwargs)
        listed = getattr(trainer, "callbacks", None)
        participants = [c for c in listed if _effect_order(c) is not None] if isinstance(listed, list) else []
        if not any(c is callback for c in participants):
            return hook(callback, trainer, *args, **kwargs)
        if participants[0] is not callback:
            return None  # the first one in the list already ran it for every compression callback
        _RUNNING.active = True
        try:
            for other in sorted(participants, key=_effect_order):  # type: ignore[arg-type]
                getattr(other, name)(trainer, *args, **kwargs)
        finally:
            _RUNNING.active = False
        return None

    ordered._in_effect_order = True  # type: ignore[attr-defined]
    return ordered


# A callback that runs the model through a graph of its own (QuantizationAwareTraining) hides the float modules
# the graph took over. It registers here how to get them back for a while; the others edit them through it.
# The view takes the module as an argument: a value holding the key would keep it alive in the weak dictionary.
_FLOAT_VIEWS: weakref.WeakKeyDictionary[nn.Module, Callable[[nn.Module], AbstractContextManager[None]]] = (
    weakref.WeakKeyDictionary()
)


def register_float_view(
    pl_module: nn.Module, view: Callable[[nn.Module], AbstractContextManager[None]]
) -> None:
    """Record that ``view(pl_module)`` shows the float layers a graph runs (see :func:`float_view`)."""
    _FLOAT_VIEWS[pl_module] = view


@contextlib.contextmanager
def float_view(pl_module: nn.Module) -> Iterator[None]:
    """Inside, ``pl_module`` holds its float layers under their own names and its forward runs them.

    Structural edits made inside (e.g. channels removed) are carried into the graph when it comes back.
    Without a registered graph this does nothing.
    """
    view = _FLOAT_VIEWS.get(pl_module)
    if view is None:
        yield
        return
    with view(pl_module):
        yield


@contextlib.contextmanager
def calibration_inputs(
    trainer: pl.Trainer, loader: Any, count: int, to_input: Callable[[Any], Any] | None = None
) -> Iterator[Iterator[Any]]:
    """This rank's share of the first ``count`` batches of ``loader`` as model inputs (``to_input(batch)``, by
    default :func:`first_input`), converted as the trainer's precision converts inputs; run them inside the
    context (the precision's forward context, the global random state left as it was)."""
    precision = trainer.strategy.precision_plugin
    batches = first_batches(loader, trainer.global_rank, count, trainer.world_size)
    with preserved_rng(), precision.forward_context():
        yield (precision.convert_input((to_input or first_input)(batch)) for batch in batches)
