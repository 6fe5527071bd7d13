import os

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback

# Tests run on the CPU with a fixed thread count so results are reproducible.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    pl.seed_everything(0, verbose=False)


@pytest.fixture(scope="session")
def digits():
    from examples.data import DigitsDataModule

    dm = DigitsDataModule(batch_size=64, shuffle=False)
    dm.setup("fit")
    return dm


def trainer_kwargs(tmp_path, **overrides):
    """Quiet, deterministic CPU Trainer settings for tests."""
    kwargs = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        deterministic=True,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        logger=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
    )
    kwargs.update(overrides)
    return kwargs


class StopAfterFirstEpoch(Callback):
    """Ends a fit after its first epoch: the run that writes the checkpoint a resume test starts from."""

    def on_train_epoch_end(self, trainer, pl_module):
        trainer.should_stop = True


class RecordSteps(Callback):
    """The global step at the start of every training batch: shows where a resumed fit really started."""

    def __init__(self):
        self.steps = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.steps.append(trainer.global_step)
