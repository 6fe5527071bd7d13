"""The base of every compression callback: the lifecycle they share, and what each declares about itself.

A compression callback is a schedule and a lifecycle around a plain-torch core (``prune``, ``low_rank_``,
``prepare``/``convert``...). Everything the callbacks would otherwise repeat lives here:

- ordering: every Lightning hook of the compression callbacks runs in the order of their ``effect_order``
  (structure first, quantization last) whatever order ``Trainer(callbacks=...)`` lists them in, without
  reordering that list;
- the frozen copy of the original model, taken only when a callback in the fit declares ``needs_original``;
- turning ``start``/``end`` into optimizer steps (:meth:`step_of`);
- the example input (:meth:`example_input`) and the training loader (:func:`training_loader`);
- hooks on modules and optimizers, and their removal (:meth:`track_hook`, :meth:`on_optimizer_step`);
- logging under the callback's ``prefix`` (:meth:`log_values`);
- ``state_key``, ``finalize`` exactly once at the end of training, and teardown.

Subclasses implement :meth:`prepare` (the fit's setup), optionally :meth:`finalize` (make the compression
permanent at the end of training) and :meth:`release` (drop what the fit held), plus whichever Lightning hooks
their schedule needs. The constructor arguments ``finalize`` and ``example_input`` of the callbacks share their
names with methods of the base: subclasses keep them under other attribute names (``finalize_at_end``, a config
object) and call ``CompressionCallback.example_input(...)`` explicitly.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_compress import _checks
from lightning_compress._events import watch_loss
from lightning_compress._inputs import first_batches, to_device
from lightning_compress._inputs import preserved_rng as preserved_rng  # the callbacks draw batches with it
from lightning_compress._lightning import (
    LIGHTNING_HOOKS,
    build_model,
    check_steps_per_batch,
    detach_input,
    first_input,
    forget_original,
    guard_model,
    in_effect_order,
    log_step,
    remember_original,
    resolve_step,
)
from lightning_compress.schedules import Point

# The order in which the schemes take effect (``effect_order``): structure first (factorized layers, then
# pruning selects and masks the layers that exist), weight values next, distillation's hooks, quantization last.
# Before them all, whole blocks go (block removal), then a budget chooses per-layer levels on the layers left.
REMOVE_BLOCKS, ALLOCATE, REPLACE_LAYERS, REMOVE_WEIGHTS, SHARE_VALUES, DISTILL, QUANTIZE = (
    -2,
    -1,
    0,
    1,
    2,
    3,
    4,
)


class CompressionCallback(Callback):
    """Base class of the compression callbacks (see the module documentation).

    Declarations (class attributes a subclass sets):

    - ``prefix``: what its logged names start with, e.g. ``"pruning/"``;
    - ``effect_order``: when it takes effect among the compression callbacks of a fit (``None``: not ordered);
    - ``selects_layers``: it chooses layers by type or name when it sets up, so layers a callback replaces
      before it must exist by then;
    - ``changes_structure``: it replaces or removes modules (their names or shapes change);
    - ``needs_original``: it reads the frozen copy of the model as it was before any compression.

    Example::

        >>> class CountSteps(CompressionCallback):
        ...     prefix = "count/"
        ...     def prepare(self, trainer, pl_module):
        ...         self.steps = 0
        ...     def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        ...         self.steps += 1
        ...         self.log_values(pl_module, {"steps": self.steps})
        >>> CountSteps().state_key
        'CountSteps'
    """

    prefix: ClassVar[str] = ""
    effect_order: ClassVar[int | None] = None
    selects_layers: ClassVar[bool] = False
    changes_structure: ClassVar[bool] = False
    # The optimizer step at which a ramp (GradualPruning's amount) reaches its final value in this fit, from setup.
    ramp_end: int | None = None
    needs_original: ClassVar[bool] = False
    # It changes the class of the layers it selects in `setup` (a parametrization), without changing the structure.
    reparametrizes: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Every Lightning hook a subclass defines runs in effect order (see `_lightning.in_effect_order`).
        for name in LIGHTNING_HOOKS.intersection(vars(cls)):
            setattr(cls, name, in_effect_order(vars(cls)[name], name))

    # -- declarations read by the other callbacks --------------------------------------------------------

    def storage_formats(self, pl_module: pl.LightningModule) -> dict[str, Any]:
        """How the parameters this callback compressed are stored (``{name: TensorFormat}``); empty: as they are."""
        return {}

    # The scheme whose per-layer levels this callback takes from a `CompressionBudget` (see `accept_allocation`):
    # "prune", "prune_structured", "low_rank" or "quantize"; None: it takes none.
    budget_scheme: ClassVar[str | None] = None
    # The levels the user gave as arguments (e.g. ``{"amount": 0.5, "layer_amounts": None}``): a budget refuses to
    # replace any that is not None.
    given_levels: Mapping[str, Any] = {}

    def accept_allocation(self, arguments: dict[str, Any]) -> None:
        """Take the per-layer levels a budget chose (e.g. ``{"layer_amounts": {...}}``), before :meth:`prepare`."""
        raise NotImplementedError(f"{type(self).__name__} takes no per-layer levels from a budget.")

    def state_key_fields(self) -> dict[str, Any]:
        """The arguments that tell two instances of this class apart in a checkpoint (see ``state_key``)."""
        return {}

    @functools.cached_property
    def state_key(self) -> str:  # Lightning reads it at every hook call: computed once
        fields = self.state_key_fields()
        return self._generate_state_key(**fields) if fields else type(self).__qualname__

    # -- what subclasses implement -------------------------------------------------------------------------

    def prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Set up for a fit: select the layers, change the structure, resolve the schedule."""

    def prepare_evaluation(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Set up for ``validate``/``test``/``predict`` outside a fit (e.g. rebuild a converted model)."""

    def finalize(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Make the compression permanent at the end of training (called once per fit)."""

    def release(self) -> None:
        """Drop what the fit held (called at teardown and on an exception, after the hooks are removed)."""

    @property
    def changes_weights(self) -> bool:
        """It changes the weights' values or replaces layers in this fit: what weight averaging would undo."""
        return self.effect_order in (REPLACE_LAYERS, REMOVE_WEIGHTS, SHARE_VALUES, QUANTIZE)

    def unfinished(self, trainer: pl.Trainer) -> tuple[str, int, str] | None:
        """``(argument, its step, what is left undone)`` when the fit stopped before the step of that argument
        (EarlyStopping, ``max_time``): warned about at the end of training. ``None``: nothing is left undone."""
        return None

    # -- the lifecycle ---------------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Layers the LightningModule builds in `configure_model`, which Lightning calls after the callbacks' setup.
        build_model(trainer, pl_module)
        if stage != "fit":
            self.prepare_evaluation(trainer, pl_module, stage)
            return
        self._finalized = False
        _checks.check_not_spawned(self, trainer)
        if any(getattr(c, "needs_original", False) for c in trainer.callbacks):  # type: ignore[attr-defined]
            remember_original(trainer, pl_module)
        watch_loss(trainer)
        check_steps_per_batch(trainer, pl_module)
        guard_model(trainer, pl_module, compression_callbacks(trainer))
        _checks.check_no_weight_averaging(type(self).__name__, self.changes_weights, trainer.callbacks)
        self.prepare(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finalize_once(trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A fit resumed from a checkpoint written at its last step runs no training loop and skips
        # `on_train_end`: the compression still has to be made permanent.
        self._finalize_once(trainer, pl_module)

    def _finalize_once(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if getattr(self, "_finalized", True):
            return
        self._finalized = True
        if (undone := self.unfinished(trainer)) is not None:
            argument, step, what = undone
            rank_zero_warn(_checks.stopped_early(self, trainer.global_step, argument, step, what))
        self.remove_hooks()
        self.finalize(trainer, pl_module)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            forget_original(trainer)  # the next fit takes a fresh copy of its own model
        self.remove_hooks()
        self.release()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self.remove_hooks()

    # -- helpers for subclasses ------------------------------------------------------------------------------

    @staticmethod
    def original(trainer: pl.Trainer, pl_module: pl.LightningModule) -> nn.Module:
        """The frozen, never-mutated copy of the model as it was before any compression of this fit."""
        return remember_original(trainer, pl_module)

    @staticmethod
    def step_of(trainer: pl.Trainer, point: Point, name: str) -> int:
        """The optimizer step of a ``start``/``end`` value; ``name`` (the argument) is used in errors."""
        return resolve_step(trainer, point, name)

    @staticmethod
    def example_input(
        trainer: pl.Trainer | None,
        pl_module: pl.LightningModule,
        given: Any = None,
        max_batch: int | None = 1,
        model_input: Callable[[Any], Any] = first_input,
    ) -> Any:
        """One example input on the module's device, cut to ``max_batch`` samples; ``None`` when there is none.

        In order: ``given`` (the callback's ``example_input``), the LightningModule's ``example_input_array``,
        ``model_input(first training batch)``. Drawing the batch leaves the global random state as it was.
        """
        example = given if given is not None else getattr(pl_module, "example_input_array", None)
        if example is None and trainer is not None:
            loader = training_loader(trainer)
            if loader is not None:
                batches = first_batches(loader)
                example = model_input(batches[0]) if batches else None
        if example is None:
            return None
        device = next(pl_module.parameters(), torch.empty(0)).device
        return to_device(detach_input(example, max_batch=max_batch), device)

    @staticmethod
    def example_source(given: Any, pl_module: pl.LightningModule, batch_note: str = "") -> str:
        """Where :meth:`example_input` takes its example from (for messages); ``batch_note`` follows the
        training batch."""
        if given is not None:
            return "`example_input`"
        if getattr(pl_module, "example_input_array", None) is not None:
            return "the LightningModule's `example_input_array`"
        return f"the first training batch's model input {batch_note}".rstrip()

    def track_hook(self, handle: Any) -> Any:
        """Remember a hook handle (module or optimizer hook) so that :meth:`remove_hooks` removes it."""
        self.__dict__.setdefault("_handles", []).append(handle)
        return handle

    def on_optimizer_step(
        self, trainer: pl.Trainer, fn: Callable[[], None], params: Iterable[nn.Parameter] | None = None
    ) -> None:
        """Call ``fn()`` after every step of each optimizer (only those holding one of ``params`` when given)."""
        wanted = None if params is None else {id(p) for p in params}
        for optimizer in trainer.optimizers:
            if wanted is None or any(id(p) in wanted for g in optimizer.param_groups for p in g["params"]):
                self.track_hook(optimizer.register_step_post_hook(lambda *_: fn()))

    def remove_hooks(self) -> None:
        """Remove every hook registered through :meth:`track_hook`."""
        for handle in self.__dict__.pop("_handles", []):
            handle.remove()

    def log_values(
        self,
        pl_module: pl.LightningModule,
        values: Mapping[str, float],
        per_layer: Mapping[str, Mapping[str, float]] | None = None,
        epoch: bool = False,
    ) -> None:
        """Log ``values`` under :attr:`prefix` from a training hook (per step, or per epoch when ``epoch``).

        ``per_layer`` maps a statistic to ``{layer or parameter name: value}``, logged under
        ``<prefix>per_layer/<statistic>/<name>``. Per-epoch values are the same on every process; with
        several, they are averaged over them (``sync_dist``), as Lightning asks of epoch-level values.
        """
        trainer = getattr(pl_module, "_trainer", None)
        when = dict(
            on_step=not epoch, on_epoch=epoch, sync_dist=epoch and getattr(trainer, "world_size", 1) > 1
        )
        names = {self.prefix + name: value for name, value in values.items()}
        for stat, layers in (per_layer or {}).items():
            names.update({f"{self.prefix}per_layer/{stat}/{name}": value for name, value in layers.items()})
        for name, value in names.items():
            pl_module.log(name, _loggable(value), **when)

    def log_to_loggers(self, trainer: pl.Trainer, values: Mapping[str, float]) -> None:
        """Write ``values`` (under :attr:`prefix`) to every logger directly, from hooks where ``log`` is not
        allowed (``on_train_end``, ``setup``), at the step Lightning files the training loss under."""
        if trainer.is_global_zero:
            metrics = {self.prefix + name: float(value) for name, value in values.items()}
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=log_step(trainer))


def _loggable(value: Any) -> Any:
    # A tensor stays on its device (no host synchronization per value); Lightning reduces it.
    return value.detach() if isinstance(value, torch.Tensor) else float(value)


def training_loader(trainer: pl.Trainer) -> Iterable | None:
    """The training loader as the user gave it (before the strategy adds its distributed sampler).

    The one place that reads Lightning's private data source: the loader is needed in ``setup``, before
    Lightning builds ``trainer.train_dataloader``. With several loaders, the first.
    """
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


def evaluation_loader(trainer: pl.Trainer, stage: str) -> Any:
    """The loader of a ``validate``/``test``/``predict`` run (``"fit"``: the training loader; ``"validate"``
    during a fit: its validation loader), or ``None``."""
    if stage == "fit":
        return training_loader(trainer)
    loops = {"validate": trainer.validate_loop, "test": trainer.test_loop, "predict": trainer.predict_loop}
    loop = loops[stage]
    if stage == "validate" and trainer.state.fn == "fit":  # the validation data of the fit
        loop = trainer.fit_loop.epoch_loop.val_loop
    source = getattr(loop, "_data_source", None)
    if source is None or not source.is_defined():
        return None
    try:
        loader = source.dataloader()
    except Exception:
        return None
    if isinstance(loader, list | tuple):
        loader = loader[0] if loader else None
    return loader


# Every hook, also those the base leaves to Lightning's no-op: the first compression callback in the list runs
# the hook of the others even where it has none of its own.
for _name in LIGHTNING_HOOKS:
    setattr(CompressionCallback, _name, in_effect_order(getattr(CompressionCallback, _name), _name))


def compression_callbacks(trainer: pl.Trainer) -> list[CompressionCallback]:
    """The compression callbacks of ``trainer``, in the order they take effect."""
    found = [c for c in trainer.callbacks if isinstance(c, CompressionCallback)]  # type: ignore[attr-defined]
    return sorted(found, key=lambda c: (c.effect_order is None, c.effect_order or 0))
