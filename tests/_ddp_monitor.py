"""DDP worker for tests/test_monitor.py: 2 CPU processes fit with a CompressionMonitor that writes its report into
the logger's directory (`trainer.log_dir`, a collective call under DDP)."""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from _ddp import ddp_trainer
from lightning.pytorch.loggers import CSVLogger

from lightning_compress import CompressionMonitor
from tests.test_monitor import TinyNet, _tiny_loader


def main(out: Path) -> None:
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    monitor = CompressionMonitor(measure_latency=False, verbose=False)
    trainer = ddp_trainer([monitor], max_epochs=1, logger=CSVLogger(out / "logs", name="run"))
    trainer.fit(TinyNet(), train_dataloaders=_tiny_loader())
    torch.save({"report": monitor.report is not None}, out / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
