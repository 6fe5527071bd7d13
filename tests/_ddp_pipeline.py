"""Worker for the DDP test of the composed pipeline: two CPU processes (gloo) run low-rank replacement, structured
pruning, self-distillation and int8 QAT in one fit; each rank saves what it ends with, so the test can compare."""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from _ddp import ddp_trainer
from lightning.pytorch.callbacks import Callback

from examples.data import DigitsDataModule
from examples.models import ImageClassifier
from lightning_compress import (
    GradualPruning,
    KnowledgeDistillation,
    LowRankReplacement,
    QuantizationAwareTraining,
)


class Save(Callback):
    def __init__(self, callbacks, out):
        self.callbacks, self.out = callbacks, Path(out)

    def on_train_end(self, trainer, pl_module):
        lowrank, pruning, _, qat = self.callbacks
        x = torch.linspace(0, 1, 4 * 64).reshape(4, 1, 8, 8)
        with torch.no_grad():
            logits = pl_module(x)
        torch.save(
            {
                "world_size": trainer.world_size,
                "state": {k: v.detach().clone() for k, v in pl_module.state_dict().items()},
                "logits": logits,
                "ranks": {name: layer["rank"] for name, layer in lowrank.layers.items()},
                "kept": {name: int(p.shape[0]) for name, p in qat._stashed["net"].named_parameters()},
                "converted": qat.converted,
                "materialized": pruning.materialized,
            },
            self.out / f"rank{trainer.global_rank}.pt",
        )


if __name__ == "__main__":
    pl.seed_everything(0, verbose=False)
    callbacks = [
        LowRankReplacement(rank=0.5, verbose=False),
        GradualPruning(amount=0.5, mode="structured", frequency=2),
        KnowledgeDistillation(teacher="self"),
        QuantizationAwareTraining(),
    ]
    model = ImageClassifier("residual_cnn", input_shape=(1, 8, 8), arch_kwargs={"widths": (8, 16)})
    trainer = ddp_trainer([*callbacks, Save(callbacks, sys.argv[1])], limit_train_batches=8, max_epochs=1)
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=32))
