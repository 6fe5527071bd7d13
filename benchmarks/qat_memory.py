"""Resident memory of one process over repeated ``QuantizationAwareTraining`` fits (nothing may accumulate).

Run from the repository root::

    .venv/bin/python -m benchmarks.qat_memory           # 8 fits of the small CNN on digits, ~1 minute

Each fit trains a new ``ImageClassifier("small_cnn")`` for 4 steps with ``QuantizationAwareTraining()`` (int8,
converted at the end); the model is dropped and garbage-collected before the process's resident set size
(``VmRSS``) is read. Results: ``benchmarks/results/qat_memory.{json,md}``.
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import warnings

import lightning.pytorch as pl
import torch

from benchmarks.common import RESULTS, machine
from examples.data import DigitsDataModule
from examples.models import ImageClassifier
from lightning_compress import QuantizationAwareTraining


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("VmRSS not found in /proc/self/status")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fits", type=int, default=8)
    args = parser.parse_args()
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
                limit_train_batches=4,
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
    report = {
        "machine": machine(),
        "fits": args.fits,
        "rss_mib_after_each_fit": after,
        "growth_mib_per_fit": per_fit,
    }
    (RESULTS / "qat_memory.json").write_text(json.dumps(report, indent=2))
    table = " | ".join(f"{x:.0f}" for x in after)
    (RESULTS / "qat_memory.md").write_text(
        "# Resident memory over repeated QAT fits in one process\n\n"
        f"Machine: {report['machine']['cpu']}, torch {report['machine']['torch']}. "
        f"Command: `python -m benchmarks.qat_memory --fits {args.fits}`.\n\n"
        f"RSS (MiB) after each fit: {table}\n\n"
        f"Growth per fit after the second: **{per_fit:.1f} MiB**.\n"
    )
    print(
        f"RSS after each fit (MiB): {[round(x) for x in after]}; growth per fit after the second: {per_fit:.1f}"
    )


if __name__ == "__main__":
    main()
