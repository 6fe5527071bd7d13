"""Worker for the DDP test: two CPU processes (gloo) prune with a data-dependent criterion; each rank saves
its decisions so the test can compare them."""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from _ddp import ddp_trainer
from lightning.pytorch.callbacks import Callback

from examples.data import DigitsDataModule
from examples.models import ImageClassifier
from lightning_compress import GradualPruning


class SaveDecisions(Callback):
    def __init__(self, pruning, out):
        self.pruning, self.out = pruning, Path(out)

    def on_train_end(self, trainer, pl_module):
        torch.save(
            {
                "masks": {k: v.cpu() for k, v in self.pruning.masks.items()},
                "plan": self.pruning.plan,
                # Parameters, not buffers: BatchNorm running statistics are per rank without SyncBatchNorm.
                "weights": {k: v.detach().cpu() for k, v in pl_module.named_parameters()},
                "world_size": trainer.world_size,
            },
            self.out / f"{self.pruning.mode}_rank{trainer.global_rank}.pt",
        )


def run(out, **pruning_kwargs):
    pl.seed_everything(0, verbose=False)
    pruning = GradualPruning(start=0.2, end=0.8, frequency=2, finalize=False, **pruning_kwargs)
    trainer = ddp_trainer([pruning, SaveDecisions(pruning, out)], limit_train_batches=8)
    trainer.fit(ImageClassifier("small_cnn"), datamodule=DigitsDataModule(batch_size=32))


if __name__ == "__main__":
    out = sys.argv[1]
    run(out, amount=0.5, mode="structured", criterion="taylor")
    run(out, amount=0.8, mode="unstructured", scope="global")
