"""Worker for the DDP test: two CPU processes (gloo) run int8 QAT; each rank saves its observer ranges before
conversion and its converted model, so the test can compare them."""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from _ddp import ddp_trainer
from lightning.pytorch.callbacks import Callback

from examples.data import DigitsDataModule
from examples.models import ImageClassifier
from lightning_compress.quantization.pt2e import fake_quantizers
from lightning_compress.quantization.qat import QuantizationAwareTraining


class RecordRanges(Callback):
    """Listed before QAT: sees each rank's own observer ranges before conversion synchronizes them."""

    def on_train_end(self, trainer, pl_module):
        self.ranges = [q.activation_post_process.min_val.clone() for _, q in fake_quantizers(pl_module.net)]
        self.ranges += [q.activation_post_process.max_val.clone() for _, q in fake_quantizers(pl_module.net)]


class Save(Callback):
    def __init__(self, qat, record, out):
        self.qat, self.record, self.out = qat, record, Path(out)

    def on_train_end(self, trainer, pl_module):
        torch.save(
            {
                "world_size": trainer.world_size,
                "ranges": self.record.ranges,
                "converted": {k: v.detach().clone() for k, v in pl_module.net.state_dict().items()},
                "parity": self.qat.parity,
            },
            self.out / f"rank{trainer.global_rank}.pt",
        )


if __name__ == "__main__":
    pl.seed_everything(0, verbose=False)
    record = RecordRanges()
    qat = QuantizationAwareTraining(module="net", start=0.0)
    # No validation: the last forward is a training step, so each rank ends with its own ranges.
    trainer = ddp_trainer([record, qat, Save(qat, record, sys.argv[1])], limit_train_batches=8)
    trainer.fit(ImageClassifier("lenet_300_100"), datamodule=DigitsDataModule(batch_size=32))
