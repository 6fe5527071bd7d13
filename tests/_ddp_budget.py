"""Worker for the DDP budget test: two CPU processes (gloo) with a CSV logger; rank zero measures and chooses the
levels, every rank applies them; each rank saves what it applied."""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from _ddp import ddp_trainer
from lightning.pytorch.loggers import CSVLogger

from examples.data import DigitsDataModule
from examples.models import ImageClassifier
from lightning_compress import CompressionBudget, GradualPruning

if __name__ == "__main__":
    out = Path(sys.argv[1])
    pl.seed_everything(0, verbose=False)
    budget = CompressionBudget("prune", target=0.5, metric="params", batches=1, probes=2, probe_steps=2)
    logger = CSVLogger(out, name="logs", version=0)
    trainer = ddp_trainer(
        [budget, GradualPruning(end="step:2")], max_steps=3, logger=logger, default_root_dir=out
    )
    trainer.fit(ImageClassifier("small_cnn"), datamodule=DigitsDataModule(batch_size=32))
    torch.save({"levels": budget.levels}, out / f"rank{trainer.global_rank}.pt")
