"""The main job: compress a residual CNN on scikit-learn's digits with four schemes in one fit; print the report.

A dense model is trained first (the "pretrained" model a user starts from). Then one fine-tuning run
replaces layers by low-rank factors, removes half of the channels, distils from the uncompressed model and
trains for int8, all with default arguments. The report compares the original and the final model (size,
MACs, measured latency, validation accuracy), and the int8 model is written to a file that loads with
plain torch.

Run from the repository root::

    python -m examples.compress_digits
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.loggers import CSVLogger

from examples.data import DigitsDataModule
from examples.models import ImageClassifier
from lightning_compress import (
    CompressionMonitor,
    GradualPruning,
    KnowledgeDistillation,
    LowRankReplacement,
    QuantizationAwareTraining,
    export,
)


def build_callbacks(args: argparse.Namespace) -> list[pl.Callback]:
    # The list order does not matter: the callbacks take effect in a fixed order (docs/composition.md).
    return [
        LowRankReplacement(
            rank=0.5, verbose=False
        ),  # factors with half the parameters, where that is smaller
        GradualPruning(amount=args.channels, mode="structured"),  # remove this fraction of channels
        KnowledgeDistillation(teacher="self"),  # the uncompressed model teaches the compressed one
        QuantizationAwareTraining(),  # int8 weights and activations, converted at the end of the fit
        CompressionMonitor(
            metrics=["val_acc"],
            per_layer=True,
            latency_batch_size=64,
            latency_threads=1,
            log_every_n_steps=args.log_every_n_steps,
            plots=args.plots,
        ),
    ]


def trainer(args: argparse.Namespace, max_epochs: int, name: str, callbacks=()) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        devices=1,
        deterministic=True,
        logger=CSVLogger(args.output, name=name),
        callbacks=list(callbacks),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=args.log_every_n_steps,
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dense-epochs", type=int, default=6, help="epochs of dense training first")
    parser.add_argument("--max-epochs", type=int, default=10, help="epochs of compression fine-tuning")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--channels", type=float, default=0.5, help="fraction of channels to remove")
    parser.add_argument("--log-every-n-steps", type=int, default=10)
    parser.add_argument("--no-plots", dest="plots", action="store_false", help="skip the PNG plots")
    parser.add_argument("--output", type=Path, default=Path("runs/digits"))
    args = parser.parse_args(argv)
    # Lightning 2.6 on torch 2.13 warns about a torch-internal class on every exported graph call.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")

    pl.seed_everything(args.seed, verbose=False)
    datamodule = DigitsDataModule(batch_size=64, shuffle=True)
    model = ImageClassifier(
        "residual_cnn", input_shape=DigitsDataModule.input_shape, lr=1e-2, arch_kwargs={"widths": (16, 32)}
    )
    trainer(args, args.dense_epochs, "dense").fit(model, datamodule=datamodule)

    callbacks = build_callbacks(args)
    fit = trainer(args, args.max_epochs, "compress_digits", callbacks)
    fit.fit(model, datamodule=datamodule)
    test = fit.test(model, datamodule=datamodule, verbose=False)[0]

    monitor = next(cb for cb in callbacks if isinstance(cb, CompressionMonitor))
    deployed = export(model, Path(fit.log_dir) / "model_int8.pt2", format="export")
    print(f"test accuracy: {test['test_acc']:.4f}")
    print(
        f"deployable int8 model: {deployed.path}  (torch.export.load(path).module(); {deployed.bytes:,} bytes)"
    )
    print(f"metrics, report and plots: {fit.log_dir}")
    return {"test_acc": test["test_acc"], "report": monitor.report, "export": deployed}


if __name__ == "__main__":
    main()
