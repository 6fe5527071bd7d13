"""The main job: train a small CNN on scikit-learn's digits while pruning half its channels; print the report.

Run from the repository root::

    python -m examples.compress_digits --max-epochs 8
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.loggers import CSVLogger

from examples.data import DigitsDataModule
from examples.models import ImageClassifier
from lightning_compress import CompressionMonitor, GradualPruning


def build_callbacks(args: argparse.Namespace) -> list[pl.Callback]:
    return [
        # Remove half of the channels of every conv/hidden layer, ramping up over the first 60% of training.
        GradualPruning(amount=args.channels, mode="structured", start=0.1, end=0.6),
        CompressionMonitor(log_every_n_steps=args.log_every_n_steps, per_layer=True, latency_threads=1),
    ]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-epochs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--channels", type=float, default=0.5, help="fraction of channels to remove")
    parser.add_argument("--log-every-n-steps", type=int, default=10)
    parser.add_argument("--output", type=Path, default=Path("runs/digits"))
    args = parser.parse_args(argv)

    pl.seed_everything(args.seed, verbose=False)
    datamodule = DigitsDataModule(batch_size=64)
    model = ImageClassifier("small_cnn", input_shape=DigitsDataModule.input_shape, lr=3e-3)
    callbacks = build_callbacks(args)
    trainer = pl.Trainer(
        max_epochs=args.max_epochs,
        accelerator="cpu",
        devices=1,
        deterministic=True,
        logger=CSVLogger(args.output, name="compress_digits"),
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=args.log_every_n_steps,
    )
    trainer.fit(model, datamodule=datamodule)
    test = trainer.test(model, datamodule=datamodule, verbose=False)[0]
    monitor = next(cb for cb in callbacks if isinstance(cb, CompressionMonitor))
    print(f"test accuracy: {test['test_acc']:.4f}  (metrics and report in {trainer.log_dir})")
    return {"test_acc": test["test_acc"], "report": monitor.report}


if __name__ == "__main__":
    main()
