"""Shared pieces of the benchmarks: machine description, step timing, fitting, evaluation and result files."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from examples.models import ImageClassifier

RESULTS = Path(__file__).parent / "results"


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import lightning

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
    }


class StepTimer(Callback):
    """Wall time of every training step, taken between the starts of consecutive batches of an epoch.

    Listed first among the callbacks, the interval holds everything a step costs: loading the batch, forward,
    backward, the optimizer step and every callback's work, logging included.
    """

    def __init__(self) -> None:
        self.times: list[float] = []
        self._last: float | None = None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last = None

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, i: int
    ) -> None:
        now = time.perf_counter()
        if self._last is not None:
            self.times.append(now - self._last)
        self._last = now

    @property
    def median_ms(self) -> float:
        # Skip the first steps: allocator warm-up.
        return 1000 * statistics.median(self.times[10:] or self.times)


class CosineClassifier(ImageClassifier):
    """ImageClassifier with a cosine learning-rate decay to zero over the whole fit (per optimizer step).

    Every fit then ends with small steps, so its last epoch's accuracy is not the accident of one large step.
    """

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.Adam(
            self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay
        )
        steps = int(self.trainer.estimated_stepping_batches)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def fit(
    model: pl.LightningModule,
    datamodule: pl.LightningDataModule,
    epochs: int,
    callbacks: list[Callback] | None = None,
    seed: int = 0,
) -> tuple[pl.Trainer, StepTimer]:
    """Train quietly on the CPU with a step timer; returns the trainer and the timer."""
    pl.seed_everything(seed, verbose=False)
    timer = StepTimer()
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[timer, *(callbacks or [])],
    )
    trainer.fit(model, datamodule=datamodule)
    return trainer, timer


def test_accuracy(model: pl.LightningModule, datamodule: pl.LightningDataModule) -> float:
    """Top-1 accuracy of ``model`` on the datamodule's test split."""
    model.eval()
    correct = total = 0
    with torch.inference_mode():
        for x, y in datamodule.test_dataloader():
            correct += int((model(x).argmax(-1) == y).sum())
            total += len(y)
    return correct / total


def write_results(name: str, payload: dict[str, Any], table: str) -> None:
    """Write ``results/<name>.json`` and ``results/<name>.md`` and print the table."""
    RESULTS.mkdir(exist_ok=True)
    payload = {"machine": machine(), **payload}
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2))
    header = f"Machine: {payload['machine']['cpu']}, {payload['machine']['cores']} cores, torch {torch.__version__}\n\n"
    (RESULTS / f"{name}.md").write_text(header + table + "\n")
    print(header + table)


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A Markdown table of ``rows`` restricted to ``columns`` (floats with 4 significant digits)."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return "" if value is None else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
