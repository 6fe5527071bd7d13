"""Compression events are recorded, and a loss that jumps right after one is warned about once."""

import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from examples.models import ImageClassifier
from lightning_compress import GradualPruning
from lightning_compress._events import LossJumpDetector, compression_events, record_event, watch_loss
from tests.conftest import trainer_kwargs


class ScaleWeights(Callback):
    """A synthetic compression event: multiplies every weight by ``scale`` at step ``step``."""

    def __init__(self, step: int, scale: float) -> None:
        self.step, self.scale = step, scale

    def setup(self, trainer, pl_module, stage):
        watch_loss(trainer)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            with torch.no_grad():
                for param in pl_module.parameters():
                    param.mul_(self.scale)
            record_event(trainer, self, f"weights scaled by {self.scale:g}")


def _fit(tmp_path, digits, *callbacks, steps=14):
    model = ImageClassifier("small_cnn", lr=1e-2)
    trainer = pl.Trainer(
        **trainer_kwargs(tmp_path, max_steps=steps, limit_val_batches=0), callbacks=list(callbacks)
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, datamodule=digits)
    return trainer, [str(w.message) for w in caught if "training loss jumped" in str(w.message)]


def test_a_loss_jump_after_an_event_is_warned_once_with_step_event_and_callback(tmp_path, digits):
    trainer, jumps = _fit(
        tmp_path, digits, ScaleWeights(step=10, scale=-30.0), ScaleWeights(step=12, scale=-30.0)
    )
    assert len(jumps) == 1
    assert "at step 10" in jumps[0]
    assert "0 step(s) after `ScaleWeights` weights scaled by -30 at step 10" in jumps[0]
    assert [(e.step, e.callback) for e in compression_events(trainer)] == [
        (10, "ScaleWeights"),
        (12, "ScaleWeights"),
    ]
    detector = next(cb for cb in trainer.callbacks if isinstance(cb, LossJumpDetector))
    assert detector.warned


def test_harmless_events_and_gradual_pruning_do_not_warn(tmp_path, digits):
    pruning = GradualPruning(amount=0.5, start=0.0, end=0.5, frequency=2)
    trainer, jumps = _fit(tmp_path, digits, ScaleWeights(step=10, scale=1.0), pruning)
    events = compression_events(trainer)
    assert jumps == []
    assert ("ScaleWeights", 10) in [(e.callback, e.step) for e in events]
    assert [e.step for e in events if e.callback == "GradualPruning"] == [0, 2, 4, 6, 7]
    assert [e.event for e in events if e.callback == "GradualPruning"][-1] == "masks updated to amount 0.5"


def test_a_users_detector_settings_are_used_and_factor_none_turns_it_off(tmp_path, digits):
    detector = LossJumpDetector(factor=None)
    trainer, jumps = _fit(tmp_path, digits, detector, ScaleWeights(step=10, scale=-30.0))
    assert jumps == []
    assert sum(isinstance(cb, LossJumpDetector) for cb in trainer.callbacks) == 1
    assert [e.event for e in detector.events] == ["weights scaled by -30"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"factor": 1.0}, "`factor` must be a number above 1"),
        ({"min_increase": -1}, "`min_increase` must be a non-negative number"),
        ({"window": 0}, "`window` must be an integer >= 1"),
        ({"history": 2}, "`history` must be an integer >= 3"),
    ],
)
def test_bad_detector_settings_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LossJumpDetector(**kwargs)
