"""A fit that ends before training (an error in setup or the sanity check, a tuner's trial) gives the model back
as it was: a retried fit compresses the model the user built, once."""

import lightning.pytorch as pl
import pytest
import torch
from conftest import ResidualNet, trainer_kwargs
from lightning.pytorch.tuner import Tuner

from lightning_compress import (
    CompressionMonitor,
    GradualPruning,
    LowRankReplacement,
    QuantizationAwareTraining,
    StochasticDepth,
)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_a_setup_error_after_the_structure_changed_gives_the_model_back(tmp_path, digits):
    model = ResidualNet()
    before, types = _state(model), [type(m) for m in model.modules()]
    params = sum(p.numel() for p in model.parameters())

    def callbacks():
        depth = StochasticDepth(remove=1, verbose=False)
        low_rank = LowRankReplacement(rank=0.5, verbose=False)
        return [
            depth,
            low_rank,
            CompressionMonitor(metrics=["val_acc"], measure_latency=False, verbose=False),
        ]

    # The monitor refuses its setup after the block removal and the factorization were done.
    failing = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=2, limit_val_batches=0), callbacks=callbacks())
    with pytest.raises(ValueError, match="limit_val_batches=0"):
        failing.fit(model, datamodule=digits)
    assert [type(m) for m in model.modules()] == types
    after = _state(model)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    # The retry removes one block and factorizes, from the full model.
    retry = callbacks()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=2, limit_val_batches=1), callbacks=retry)
    trainer.fit(model, datamodule=digits)
    assert retry[0].removed == ["net.3"] and retry[1].layers
    assert retry[2].before.total_params == params  # the report's "before" is the full model


def test_a_tuner_trial_leaves_the_model_as_it_was(tmp_path, digits):
    model = ResidualNet()
    before, types = _state(model), [type(m) for m in model.modules()]
    callbacks = [GradualPruning(amount=0.5), QuantizationAwareTraining()]
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=1), callbacks=callbacks)
    Tuner(trainer).lr_find(model, datamodule=digits, num_training=5)
    assert [type(m) for m in model.modules()] == types  # no graph, no masks left by the trial
    after = _state(model)
    assert all(torch.equal(after[k], before[k]) for k in before)
    trainer.fit(model, datamodule=digits)
    assert callbacks[0].current_amount == pytest.approx(0.5, abs=0.01) and callbacks[1].converted
