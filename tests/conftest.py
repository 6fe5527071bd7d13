import os

import lightning.pytorch as pl
import pytest
import torch

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
