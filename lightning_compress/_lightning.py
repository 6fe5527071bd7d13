"""Small helpers shared by the callbacks: training length, the original model, example inputs."""

from __future__ import annotations

import copy
import math
import weakref
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_compress._inputs import to_device  # noqa: F401  (re-exported for the callbacks)
from lightning_compress.schedules import Point, Schedule, ScheduleFn, resolve_point

# One frozen copy of the model as it was before any callback changed it, per Trainer. Every callback that
# changes structure calls `remember_original` first, so whichever callback runs first takes the copy.
_ORIGINALS: weakref.WeakKeyDictionary[pl.Trainer, nn.Module] = weakref.WeakKeyDictionary()


def remember_original(trainer: pl.Trainer, pl_module: pl.LightningModule) -> nn.Module:
    """Return the frozen copy of ``pl_module`` taken before the first compression change of this fit."""
    original = _ORIGINALS.get(trainer)
    if original is None:
        original = copy.deepcopy(pl_module)
        original.eval()
        original.requires_grad_(False)
        _ORIGINALS[trainer] = original
    return original


def forget_original(trainer: pl.Trainer) -> None:
    """Release the copy taken by :func:`remember_original` (at teardown)."""
    _ORIGINALS.pop(trainer, None)


def training_steps(trainer: pl.Trainer) -> tuple[int, int | None]:
    """Optimizer steps of the whole fit and per epoch (``None`` when unknown, e.g. an infinite loader)."""
    total = trainer.estimated_stepping_batches
    if not math.isfinite(total):
        raise ValueError(
            "The length of training is unknown (infinite `max_steps`/`max_epochs` or an iterable dataset "
            "without length), so fractional `start`/`end` cannot be resolved. Set `max_steps` or use 'step:N'."
        )
    per_epoch: int | None = None
    batches = trainer.num_training_batches
    if math.isfinite(batches) and batches > 0:
        per_epoch = max(1, math.ceil(batches / trainer.accumulate_grad_batches))
    return int(total), per_epoch


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
    total, per_epoch = training_steps(trainer)
    return Schedule(
        initial=initial,
        final=final,
        start=resolve_point(start, total, per_epoch),
        end=resolve_point(end, total, per_epoch),
        schedule=schedule,
        frequency=frequency,
    )


def first_input(batch: Any) -> Any:
    """The model input of a batch: the batch itself if a tensor, else its first element (``(x, y)``)."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, list | tuple) and batch:
        return batch[0]
    if isinstance(batch, dict):
        for key in ("input", "inputs", "x", "input_ids", "pixel_values"):
            if key in batch:
                return batch[key]
    raise TypeError(
        f"Cannot tell the model input in a batch of type {type(batch).__name__}. "
        "Set `example_input_array` on the LightningModule or pass `example_input`."
    )


def detach_input(example: Any, max_batch: int | None = None) -> Any:
    """A detached CPU-independent copy of an example input, cut to ``max_batch`` samples when given."""
    if isinstance(example, torch.Tensor):
        out = example.detach()
        if max_batch is not None and out.dim() > 0:
            out = out[:max_batch]
        return out.clone()
    if isinstance(example, list | tuple):
        return type(example)(detach_input(e, max_batch) for e in example)
    if isinstance(example, dict):
        return {k: detach_input(v, max_batch) for k, v in example.items()}
    return example


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
