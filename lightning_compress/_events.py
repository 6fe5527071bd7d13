"""Compression events recorded by the callbacks, and a warning when the training loss jumps right after one."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor


@dataclass(frozen=True)
class CompressionEvent:
    """One change a callback made to the model during training, at optimizer step ``step``."""

    step: int
    callback: str
    event: str


class LossJumpDetector(Callback):
    """Warns once when the training loss jumps right after a compression event.

    Every callback that changes the model during training (pruning masks, fake quantization, frozen batch
    norm, factorized layers, clustered weights) records its events here; this callback is added to the
    Trainer automatically with the defaults below. Add it yourself to change them.

    A jump is a training loss, among the ``window`` losses following an event, above both ``factor`` times
    the median of the (up to ``history``) losses before the event and that median plus ``min_increase``; a
    non-finite loss is a jump too. Losses stay on their device: the only host synchronization is one
    comparison per step during the ``window`` steps after an event.

    Args:
        factor: how many times the recent median counts as a jump; ``None`` turns the check off.
        min_increase: the smallest absolute increase that counts, so noise on a tiny loss does not.
        window: how many training losses after an event are checked.
        history: how many losses before the event form the median (at least 3 must be seen).

    Example::

        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[LossJumpDetector(factor=3.0)], logger=False)
        >>> watch_loss(trainer).factor
        3.0
    """

    def __init__(
        self, factor: float | None = 4.0, min_increase: float = 0.5, window: int = 3, history: int = 20
    ) -> None:
        if factor is not None and not (isinstance(factor, int | float) and factor > 1.0):
            raise ValueError(
                f"`factor` must be a number above 1 (or None to turn the check off), got {factor!r}."
            )
        if not (isinstance(min_increase, int | float) and min_increase >= 0):
            raise ValueError(f"`min_increase` must be a non-negative number, got {min_increase!r}.")
        for name, value, low in (("window", window, 1), ("history", history, 3)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"`{name}` must be an integer >= {low}, got {value!r}.")
        self.factor = None if factor is None else float(factor)
        self.min_increase = float(min_increase)
        self.window = window
        self.history = history
        self.events: list[CompressionEvent] = []
        self._reset()

    def _reset(self) -> None:
        self._losses: deque[Tensor] = deque(maxlen=self.history)
        self._new: list[CompressionEvent] = []
        # [event, threshold, losses left to check]; the threshold stays a tensor until it is compared.
        self._armed: list[list[Any]] = []
        self.warned = False

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.events = []
        self._reset()

    def record(self, trainer: pl.Trainer, callback: object, event: str) -> CompressionEvent:
        """Note that ``callback`` changed the model (``event`` says how) at the current optimizer step."""
        name = callback if isinstance(callback, str) else type(callback).__name__
        recorded = CompressionEvent(int(trainer.global_step), name, event)
        self.events.append(recorded)
        if self.factor is not None and not self.warned:
            self._new.append(recorded)
        return recorded

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        if self.factor is None or self.warned:
            return
        loss = loss.detach().float()
        if self._new:
            # Events recorded before this forward pass: this loss is the first one that sees them.
            if len(self._losses) >= 3:
                median = torch.stack(list(self._losses)).median()
                threshold = torch.maximum(median * self.factor, median + self.min_increase)
                self._armed += [[event, median, threshold, self.window] for event in self._new]
            self._new = []
        if self._armed:
            self._check(trainer, loss)
        self._losses.append(loss)

    def _check(self, trainer: pl.Trainer, loss: Tensor) -> None:
        thresholds = torch.stack([threshold for _, _, threshold, _ in self._armed])
        jumped = (~torch.isfinite(loss)) | (loss > thresholds)
        hit = int(jumped.int().argmax()) if bool(jumped.any()) else -1
        if hit >= 0:
            event, median, threshold, left = self._armed[hit]
            value = float(loss)
            shown = f"{value:.4g}" if math.isfinite(value) else str(value)
            rank_zero_warn(
                f"The training loss jumped to {shown} at step {trainer.global_step}, "
                f"{self.window - left} step(s) after `{event.callback}` {event.event} at step {event.step} "
                f"(median of the previous {len(self._losses)} losses: {float(median):.4g}; a jump is above "
                f"{float(threshold):.4g}). The compression event probably broke the model: check its settings "
                "(a later or more gradual schedule, a lower learning rate). This is warned once per fit.",
                category=UserWarning,
            )
            self.warned = True
            self._armed = []
            return
        for entry in self._armed:
            entry[3] -= 1
        self._armed = [entry for entry in self._armed if entry[3] > 0]


def watch_loss(trainer: pl.Trainer | None) -> LossJumpDetector | None:
    """The Trainer's :class:`LossJumpDetector`, added with its defaults when the user did not add one.

    Compression callbacks call it in ``setup`` so the losses before their first event are seen.
    """
    if trainer is None:
        return None
    for callback in trainer.callbacks:
        if isinstance(callback, LossJumpDetector):
            return callback
    detector = LossJumpDetector()
    trainer.callbacks.append(detector)
    return detector


def record_event(trainer: pl.Trainer | None, callback: object, event: str) -> None:
    """Record that ``callback`` changed the model during training (``event``: what it did, in a few words)."""
    detector = watch_loss(trainer)
    if detector is not None and trainer is not None:
        detector.record(trainer, callback, event)


def compression_events(trainer: pl.Trainer) -> list[CompressionEvent]:
    """The compression events recorded in the current (or last) fit of ``trainer``."""
    detectors = [cb for cb in trainer.callbacks if isinstance(cb, LossJumpDetector)]
    return list(detectors[0].events) if detectors else []
