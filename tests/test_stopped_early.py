"""A fit that stops before a callback's schedule ends (EarlyStopping, ``max_time``) says what it left undone."""

import warnings

import lightning.pytorch as pl
import pytest
from conftest import ResidualNet, trainer_kwargs
from lightning.pytorch.callbacks import Callback

from lightning_compress import (
    BinaryWeights,
    GradualPruning,
    LowRankReplacement,
    StochasticDepth,
    WeightSharing,
)


class _StopAt(Callback):
    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        trainer.should_stop = trainer.global_step >= self.step


CASES = {
    "pruning": (
        lambda: GradualPruning(amount=0.5, end="step:6", frequency=1),
        "end",
        r"the amount is 0\.[0-4]\d* of 0\.5\.",
        lambda c: c.current_amount < 0.5,
    ),
    "low_rank": (
        lambda: LowRankReplacement(rank=0.5, start="step:6"),
        "start",
        r"no layer was factorized\.",
        lambda c: not c.layers,
    ),
    "depth": (
        lambda: StochasticDepth(remove=1, remove_at="step:6", verbose=False),
        "remove_at",
        r"no block was removed\.",
        lambda c: not c.removed,
    ),
    "weight_sharing": (
        lambda: WeightSharing(start="step:6"),
        "start",
        r"no weight was clustered\.",
        lambda c: not c.clustered,
    ),
    "binary": (
        lambda: BinaryWeights(start="step:6"),
        "start",
        r"no step trained binary weights\.",
        lambda c: c.finalized,  # still made binary, as asked, with the warning
    ),
}


def _fit(tmp_path, digits, callback, stop):
    extra = [_StopAt(stop)] if stop else []
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=8), callbacks=[callback, *extra])
    trainer.fit(ResidualNet(), datamodule=digits)
    return trainer


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_fit_stopped_before_the_schedule_ends_says_what_is_left_undone(tmp_path, digits, case):
    make, argument, left, undone = CASES[case]
    callback = make()
    name = type(callback).__name__
    message = rf"{name}: the fit stopped at step 3 \(EarlyStopping.*, before `{argument}='step:6'` \(step 6\): {left}"
    with pytest.warns(UserWarning, match=message):
        trainer = _fit(tmp_path, digits, callback, stop=3)
    assert trainer.global_step == 3 and undone(callback)
    # The same fit run to its end: nothing left undone, no warning.
    callback = make()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = _fit(tmp_path, digits, callback, stop=None)
    assert trainer.global_step == 8
    assert not [w for w in caught if "the fit stopped" in str(w.message)]
    assert undone(callback) == (case == "binary")  # binary weights are made binary in both fits
