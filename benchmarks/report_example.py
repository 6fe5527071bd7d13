"""The example reports of docs/monitor.md, from real runs: CompressionMonitor on the digits demo.

Two fits of the demo network (small CNN on scikit-learn's digits, 8 epochs, seed 0), each with a
``CompressionMonitor(metrics=["val_acc"], latency_batch_size=64, plots=True)``:

- ``pruning``: ``GradualPruning`` removes half of the channels (the main job, ``examples/compress_digits.py``);
  the final model runs eagerly.
- ``int8``: ``QuantizationAwareTraining(scheme="int8", measure=True)`` from the middle of training; the final
  model holds a converted int8 graph, so the monitor times both models compiled (``compile_for_cpu``), and the
  QAT callback's own measurement of the same two models is printed beside it.

Run from the repository root (about 3 minutes on 2 cores)::

    python -m benchmarks.report_example

Writes ``benchmarks/results/report_example.{json,md}`` and the report files and figures under
``benchmarks/results/report_example/``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger

from benchmarks.common import RESULTS, write_results
from examples.data import DigitsDataModule
from examples.models import ImageClassifier
from lightning_compress import CompressionMonitor, GradualPruning, QuantizationAwareTraining
from lightning_compress.report import format_report


def run(name: str, scheme: pl.Callback, epochs: int, out: Path) -> dict[str, Any]:
    pl.seed_everything(0, verbose=False)
    monitor = CompressionMonitor(
        log_every_n_steps=5,
        per_layer=True,
        metrics=["val_acc"],
        latency_batch_size=64,
        latency_threads=1,
        plots=True,
        verbose=False,
    )
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        deterministic=True,
        logger=CSVLogger(out, name=name, version=0),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=5,
        callbacks=[scheme, monitor],
    )
    model = ImageClassifier("small_cnn", input_shape=DigitsDataModule.input_shape, lr=3e-3)
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=64))
    assert monitor.report is not None
    table = format_report(monitor.report)
    print(f"\n== {name} ==\n{table}")
    result: dict[str, Any] = {"report": monitor.report, "table": table, "log_dir": trainer.log_dir}
    measurements = getattr(scheme, "measurements", None)
    if measurements:
        result["qat_measurements"] = measurements
        print(f"QuantizationAwareTraining(measure=True): {measurements}")
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--only", choices=["pruning", "int8"], default=None)
    args = parser.parse_args(argv)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    out = RESULTS / "report_example"
    runs = {
        "pruning": lambda: GradualPruning(amount=0.5, mode="structured", start=0.1, end=0.6),
        "int8": lambda: QuantizationAwareTraining(scheme="int8", start=0.5, measure=True),
    }
    results = {
        name: run(name, make(), args.epochs, out) for name, make in runs.items() if args.only in (None, name)
    }
    sections = []
    for name, result in results.items():
        section = f"## {name}\n\n```\n{result['table']}\n```"
        if "qat_measurements" in result:
            m = result["qat_measurements"]
            section += (
                f"\n\nQuantizationAwareTraining(measure=True), batch of the validation loader, compiled: "
                f"fp32 {m['latency_fp32_ms']:.3f} ms, int8 {m['latency_int8_ms']:.3f} ms, {m['speedup']:.2f}x"
            )
        sections.append(section)
    write_results(
        "report_example",
        {name: {k: v for k, v in r.items() if k != "table"} for name, r in results.items()},
        "\n\n".join(sections),
    )
    return results


if __name__ == "__main__":
    main()
