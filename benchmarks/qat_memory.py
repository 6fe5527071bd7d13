"""Resident memory of one process over repeated ``QuantizationAwareTraining`` fits (nothing may accumulate).

Configuration ``qat_memory`` (``python -m benchmarks run qat_memory``: 8 fits of the small CNN on digits, about a
minute). Each fit trains a new ``ImageClassifier("small_cnn")`` for 4 steps with ``QuantizationAwareTraining()`` (int8,
converted at the end); the model is dropped and garbage-collected before the process's resident set size
(``VmRSS``) is read.
"""

from __future__ import annotations

import gc
import tempfile
import warnings
from dataclasses import dataclass

import lightning.pytorch as pl
import torch

from benchmarks.common import Context, Result
from examples.data import DigitsDataModule
from examples.models import ImageClassifier
from lightning_compress import QuantizationAwareTraining

TITLE = "Resident memory over repeated QAT fits in one process"


@dataclass(frozen=True)
class Settings:
    """The full run's settings."""

    fits: int = 8
    steps: int = 4  # training steps per fit

    def __post_init__(self) -> None:
        if self.fits < 3:
            raise ValueError(
                f"`fits={self.fits}`: the growth is measured from the second fit on; use 3 or more."
            )


QUICK = {"fits": 3}


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("VmRSS not found in /proc/self/status")


def run(args: Settings, context: Context) -> Result:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    data = DigitsDataModule()
    after: list[float] = []
    with tempfile.TemporaryDirectory() as root:
        for _ in range(args.fits):
            model = ImageClassifier("small_cnn")
            pl.Trainer(
                accelerator="cpu",
                max_epochs=1,
                limit_train_batches=args.steps,
                limit_val_batches=0,
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                default_root_dir=root,
                callbacks=[QuantizationAwareTraining()],
            ).fit(model, data)
            del model
            gc.collect()
            after.append(rss_mib())
    per_fit = (after[-1] - after[1]) / (len(after) - 2)  # the first fit loads libraries and compiles patterns
    table = " | ".join(f"{x:.0f}" for x in after)
    text = (
        f"RSS (MiB) after each fit: {table}\n\n"
        f"Growth per fit after the second: **{per_fit:.1f} MiB** ({args.steps} training steps per fit)."
    )
    return Result({"rss_mib_after_each_fit": after, "growth_mib_per_fit": per_fit}, text)
