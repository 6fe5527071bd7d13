"""Freezing batch norm during QAT: warned about with adaptive optimizers, recorded as an event, cause shown."""

import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from examples.models import ImageClassifier, residual_cnn
from lightning_compress import QuantizationAwareTraining
from lightning_compress._events import compression_events
from tests.conftest import SGDClassifier, trainer_kwargs


def _fit(tmp_path, digits, model, **qat_kwargs):
    qat = QuantizationAwareTraining(module="net", start=0.25, convert=False, **qat_kwargs)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=4, limit_val_batches=0), callbacks=[qat])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, datamodule=digits)
    return trainer, [str(w.message) for w in caught if "freeze_bn" in str(w.message)]


def test_freeze_bn_with_adam_is_warned_at_train_start_and_recorded_as_an_event(tmp_path, digits):
    trainer, warned = _fit(tmp_path, digits, ImageClassifier("small_cnn"), freeze_bn=0.5)
    assert len(warned) == 1
    assert "`freeze_bn=0.5` with Adam at lr=0.001" in warned[0]
    assert "Leave `freeze_bn=None`" in warned[0]
    events = [(e.step, e.event) for e in compression_events(trainer)]
    assert events == [(1, "fake quantization started"), (2, "batch norm frozen")]


@pytest.mark.parametrize("freeze_bn", [None, 0.5])
def test_no_warning_without_freeze_bn_or_with_sgd(tmp_path, digits, freeze_bn):
    model = ImageClassifier("small_cnn") if freeze_bn is None else SGDClassifier("small_cnn", lr=1e-3)
    _, warned = _fit(tmp_path, digits, model, freeze_bn=freeze_bn)
    assert warned == []


def _pre_bn_shift(freeze: bool, optimizer_class, lr: float, steps: int = 6) -> float:
    """Largest |batch mean - running mean| / running std of any batch-norm input after a few training steps."""
    torch.manual_seed(0)
    x = torch.randn(256, 1, 8, 8)
    y = (x.mean((1, 2, 3)) > 0).long()
    model = residual_cnn(widths=(8, 16, 32), num_classes=2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(30):  # trained with batch statistics, as before the freeze
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():  # running statistics of the current weights (momentum 1: one full-batch estimate)
        for norm in norms:
            norm.momentum = 1.0
        model(x)
    if freeze:
        for norm in norms:
            norm.eval()
    optimizer = optimizer_class(model.parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    shifts = []
    hooks = [
        norm.register_forward_hook(
            lambda m, args, out: shifts.append(
                float(
                    ((args[0].mean((0, 2, 3)) - m.running_mean).abs() / (m.running_var + m.eps).sqrt()).max()
                )
            )
        )
        for norm in norms
    ]
    with torch.no_grad():
        model.eval()(x)
    for hook in hooks:
        hook.remove()
    return max(shifts)


def test_adam_steps_move_conv_outputs_away_from_frozen_statistics_sgd_steps_do_not():
    adam = _pre_bn_shift(True, torch.optim.Adam, 1e-3)
    sgd = _pre_bn_shift(True, torch.optim.SGD, 1e-3)
    assert adam > 0.5
    assert sgd < 0.05
    assert adam > 10 * sgd
