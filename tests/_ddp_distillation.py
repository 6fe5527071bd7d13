"""DDP worker for tests/test_distillation.py: 2 CPU processes distill with a FitNets adapter; each rank saves its state."""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from _ddp import ddp_trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger

from examples.data import DigitsDataModule
from examples.models import ImageClassifier
from lightning_compress.distillation import FeatureLoss, KnowledgeDistillation


class SaveRankState(Callback):
    def __init__(self, out: Path, kd: KnowledgeDistillation) -> None:
        self.out = out
        self.kd = kd

    def on_train_end(self, trainer, pl_module):
        wrapped = {id(p) for p in trainer.strategy.model.parameters()}
        result = {
            # Buffers (BatchNorm statistics) are per rank between DDP's broadcasts; parameters must agree.
            "state": {k: v.detach().cpu() for k, v in pl_module.named_parameters()},
            "step": trainer.global_step,
            "teacher_in_ddp": any(id(p) in wrapped for p in self.kd._teacher.parameters()),
        }
        torch.save(result, self.out / f"rank{trainer.global_rank}.pt")


def main(out: Path) -> None:
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    teacher = ImageClassifier("small_cnn", arch_kwargs={"width": 8})
    model = ImageClassifier("small_cnn")
    kd = KnowledgeDistillation(teacher, features=[FeatureLoss("net.3")], keep_adapters=True)
    trainer = ddp_trainer(
        [kd, SaveRankState(out, kd)], max_steps=8, logger=CSVLogger(out / "logs"), log_every_n_steps=1
    )
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=32, shuffle=False))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
