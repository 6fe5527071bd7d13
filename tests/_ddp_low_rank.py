"""Worker for the DDP test of LowRankReplacement: 2 CPU processes; each writes its decisions to a JSON file."""

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from _ddp import ddp_trainer
from lightning.pytorch.callbacks import Callback

from examples.data import DigitsDataModule
from examples.models import ImageClassifier
from lightning_compress.low_rank import LowRankReplacement


class WriteDecisions(Callback):
    def __init__(self, out_dir: str, lowrank: LowRankReplacement) -> None:
        self.out_dir = out_dir
        self.lowrank = lowrank

    def on_train_end(self, trainer, pl_module):
        weights = {name: float(p.detach().double().sum()) for name, p in pl_module.named_parameters()}
        result = {
            "layers": self.lowrank.layers,
            "output_errors": {r["name"]: r["output_error"] for r in self.lowrank.records},
            "weights": weights,
            "world_size": trainer.world_size,
        }
        Path(self.out_dir, f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    lowrank = LowRankReplacement(budget=0.4, calibration_batches=4, verbose=False)
    trainer = ddp_trainer([lowrank, WriteDecisions(out_dir, lowrank)], max_steps=3)
    trainer.fit(ImageClassifier("small_cnn"), datamodule=DigitsDataModule(batch_size=64, shuffle=False))


if __name__ == "__main__":
    main(sys.argv[1])
