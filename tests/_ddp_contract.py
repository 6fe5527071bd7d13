"""Worker for the DDP part of the contract tests: two CPU processes (gloo) fit every case of
``tests/test_contract.py`` in turn, each from the same seeded model; each rank saves, per case, the model state it
ends with, or the error that stopped the fit, as ``<case>.rank<rank>.pt``."""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from _ddp import ddp_trainer

from examples.data import DigitsDataModule
from tests.test_contract import BATCHES, CASES, EPOCHS, made, tiny_model

if __name__ == "__main__":
    out = Path(sys.argv[1])
    for case in CASES:
        pl.seed_everything(0, verbose=False)
        model = tiny_model(case)
        trainer = ddp_trainer(made(case), max_epochs=EPOCHS, limit_train_batches=BATCHES)
        try:
            trainer.fit(model, datamodule=DigitsDataModule(batch_size=32))
            result = {"state": {k: v.detach().clone() for k, v in model.state_dict().items()}}
        except Exception as error:  # both ranks fail alike (a setup error); the next case still runs
            result = {"error": f"{type(error).__name__}: {error}"}
        result.update(world_size=trainer.world_size, global_step=trainer.global_step)
        torch.save(result, out / f"{case}.rank{trainer.global_rank}.pt")
