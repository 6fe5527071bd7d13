"""The example reports of docs/monitor.md, from real runs: CompressionMonitor on the digits demo.

Two fits of the demo network (small CNN on scikit-learn's digits, 8 epochs, seed 0), each with a
``CompressionMonitor(metrics=["val_acc"], latency_batch_size=64, plots=True)``:

- ``pruning``: ``GradualPruning`` removes half of the channels (the main job, ``examples/compress_digits.py``);
  the final model runs eagerly.
- ``int8``: ``QuantizationAwareTraining(scheme="int8", measure=True)`` from the middle of training; the final
  model holds a converted int8 graph, so the monitor times both models compiled (``compile_for_cpu``), and the
  QAT callback's own measurement of the same two models is printed beside it.

Configuration ``report_example`` (``python -m benchmarks run report_example``): writes the result files and, under
``benchmarks/results/report_example/``, each fit's CSV logs, report and figures.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger

from benchmarks.common import Context, Result, shown
from examples.data import DigitsDataModule
from examples.models import ImageClassifier
from lightning_compress import CompressionMonitor, GradualPruning, QuantizationAwareTraining
from lightning_compress.report import format_report

TITLE = "CompressionMonitor reports of the digits demo (the examples of docs/monitor.md)"
SCHEMES = ("pruning", "int8")


@dataclass(frozen=True)
class Settings:
    """The full run's settings."""

    epochs: int = 8
    schemes: tuple[str, ...] = SCHEMES

    def __post_init__(self) -> None:
        unknown = set(self.schemes) - set(SCHEMES)
        if unknown:
            raise ValueError(f"`schemes={self.schemes}`: unknown {sorted(unknown)}; use some of {SCHEMES}.")


QUICK = {"epochs": 1}


def fit_with_monitor(name: str, scheme: pl.Callback, epochs: int, out: Path) -> dict[str, Any]:
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


def run(args: Settings, context: Context) -> Result:
    torch.set_num_threads(min(2, torch.get_num_threads()))
    out = context.files
    runs = {
        "pruning": lambda: GradualPruning(amount=0.5, mode="structured", start=0.1, end=0.6),
        "int8": lambda: QuantizationAwareTraining(scheme="int8", start=0.5, measure=True),
    }
    results = {
        name: fit_with_monitor(name, make(), args.epochs, out)
        for name, make in runs.items()
        if name in args.schemes
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
    sections.append(f"Logs, reports and figures of each fit: `{shown(out)}`.")
    payload = {name: {k: v for k, v in r.items() if k != "table"} for name, r in results.items()}
    return Result(payload, "\n\n".join(sections))
