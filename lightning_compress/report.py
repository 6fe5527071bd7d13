"""CompressionMonitor: log compression statistics to the Trainer's loggers and report before vs after at the end.

The statistics, the latency measurement and the table are plain torch, in :mod:`lightning_compress.reporting`
(``format_report`` is re-exported here); this module takes them at the right points of a fit.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn

from lightning_compress import _checks
from lightning_compress._lightning import detach_input, first_input, run_directory
from lightning_compress.callback import CompressionCallback
from lightning_compress.export import check_writable
from lightning_compress.reporting import (
    LATENCY_MODES,
    REPORT_FILE,
    ModelMeter,
    MonitorConfig,
    assemble_report,
    final_values,
    format_report,
    latency_mode,
    logged_values,
    measure_latency_pair,
    publish_report,
    remember_point,
)
from lightning_compress.stats import CompressionStats, TensorFormat

__all__ = ["LATENCY_MODES", "CompressionMonitor", "format_report", "latency_mode", "storage_formats"]


def storage_formats(trainer: pl.Trainer, pl_module: nn.Module) -> dict[str, TensorFormat]:
    """How each parameter is stored, from the compression callbacks' ``storage_formats`` declarations (keyed by
    ``state_dict`` name); the monitor and the report count those tensors at that width."""
    formats: dict[str, TensorFormat] = {}
    for callback in trainer.callbacks:  # type: ignore[attr-defined]
        if isinstance(callback, CompressionCallback):
            formats.update(callback.storage_formats(pl_module))  # type: ignore[arg-type]
    return formats


class CompressionMonitor(CompressionCallback):
    """Logs compression statistics to every logger of the Trainer and reports before vs after at fit end.

    Logged under ``prefix``: ``sparsity``, ``nonzero_params``, ``params``, ``macs`` (per sample, when an example
    input is known), ``compressed_bytes``, ``compression_rate`` and ``size_ratio``; with ``per_layer=True`` also
    ``per_layer/sparsity/<parameter name>``. At the end of training it logs the final ratios under
    ``prefix + "final/"``, prints a table on rank zero, writes it as JSON and keeps it in :attr:`report`.
    "Before" is the model before any compression callback changed it; "after" is the model the compression
    callbacks finalized (the monitor's end-of-training step runs after theirs, wherever it is listed).
    docs/monitor.md says how each number (MACs per sample, latency, ``metrics``) is taken.

    Args:
        example_input: input for MACs and latency; default: the LightningModule's ``example_input_array``,
            else the first sample of the first training batch.
        log_every_n_steps: log every N optimizer steps (``None``: only at epoch ends).
        log_on_epoch_end: log at the end of every training epoch (through ``pl_module.log``: the values also
            reach ``trainer.callback_metrics``).
        per_layer: also log the sparsity of every weight.
        metrics: names the LightningModule logs in validation (e.g. ``["val_acc"]``) to report for both models.
        measure_latency: time the original and the final model side by side at the end.
        latency_batch_size: also time at this batch size (batch 1 is always timed).
        latency_mode: ``"auto"`` (compiled when the final model holds a converted int8 graph, else eager),
            ``"eager"`` or ``"compiled"`` (both models through ``compile_for_cpu``).
        latency_repeats: timed calls per model and round (median reported).
        latency_threads: threads while timing (``None``: leave ``torch.get_num_threads()``).
        report_path: the JSON report (``None``: ``compression_report.json`` in the logger's directory; no file
            without a logger), written atomically.
        plots: also draw the report (needs matplotlib), beside the report and to loggers that take figures.
        prefix: prefix of every logged name.
        verbose: print the table at the end (rank zero only).

    Example::

        >>> from lightning.pytorch import Trainer
        >>> monitor = CompressionMonitor(log_every_n_steps=10, per_layer=True)
        >>> trainer = Trainer(callbacks=[monitor], max_epochs=1, logger=False, enable_progress_bar=False)
    """

    prefix = "compression/"
    needs_original = True

    def __init__(
        self,
        example_input: Any = None,
        log_every_n_steps: int | None = None,
        log_on_epoch_end: bool = True,
        per_layer: bool = False,
        metrics: Sequence[str] = (),
        measure_latency: bool = True,
        latency_batch_size: int | None = None,
        latency_mode: str = "auto",
        latency_repeats: int = 20,
        latency_threads: int | None = None,
        report_path: str | Path | None = None,
        plots: bool = False,
        prefix: str = "compression/",
        verbose: bool = True,
    ) -> None:
        self.config = MonitorConfig(
            example_input, log_every_n_steps, log_on_epoch_end, per_layer, metrics, measure_latency,
            latency_batch_size, latency_mode, latency_repeats, latency_threads, report_path, plots, prefix, verbose,
        )  # fmt: skip
        self.prefix = prefix  # type: ignore[misc]  # the declaration, configurable per instance
        self.before: CompressionStats | None = None
        self.report: dict[str, Any] | None = None
        self.history: list[dict[str, Any]] = []
        self.figures: dict[str, Path] = {}
        self.meter = ModelMeter(warn=rank_zero_warn)
        self._report_target: Path | None = None
        self._last_logged_step: int | None = None

    def prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Resolved on every process: `trainer.log_dir` is a collective call under DDP.
        self._report_target = self._report_file(trainer)
        if self._report_target is not None:
            check_writable(self._report_target, "report_path", ".json")
        validates = is_overridden("validation_step", pl_module)
        _checks.check_metrics_source(self.config.metrics, pl_module, validates, trainer.limit_val_batches)
        self.history = []
        # Run the end-of-training step after every other callback's, so that the final numbers describe the
        # model the compression callbacks finalized, whatever order the user listed them in.
        # A new list, not an in-place move: Lightning is iterating the current one. Checkpoint callbacks stay last.
        others = [c for c in trainer.callbacks if c is not self]  # type: ignore[attr-defined]
        checkpoints = [c for c in others if isinstance(c, Checkpoint)]
        trainer.callbacks = [c for c in others if not isinstance(c, Checkpoint)] + [self, *checkpoints]  # type: ignore[attr-defined]
        # One sample: MACs are reported per sample, and latency batches are built by repeating it.
        example = CompressionCallback.example_input(None, pl_module, self.config.example_input)
        self.meter = ModelMeter(example, rank_zero_warn)
        original = self.original(trainer, pl_module)
        self.meter.check(
            original, "example_input" if self.config.example_input is not None else "example_input_array"
        )
        # Every fit measures its own model (a resumed fit then loads the first run's numbers from its checkpoint).
        self.before = self.meter.stats(original)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.meter.example is None:
            self.meter.example = detach_input(first_input(batch), max_batch=1)
            if self.before is not None and self.before.macs is None:
                self.before = self.meter.stats(self.original(trainer, pl_module))

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if (every := self.config.log_every_n_steps) is None or trainer.global_step % every != 0:
            return
        # Under gradient accumulation the first micro-batches end before any optimizer step: nothing to log yet.
        # `global_step` stays the same over accumulated micro-batches: log once per optimizer step.
        if trainer.global_step == 0 or self._last_logged_step == trainer.global_step:
            return
        self._last_logged_step = trainer.global_step
        self.log_to_loggers(trainer, self._values(trainer, pl_module))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Fail after the first validation, not after training, when a named metric is never logged.
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        _checks.check_metrics_logged(self.config.metrics, trainer.callback_metrics, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.config.log_on_epoch_end:
            self.log_values(pl_module, self._values(trainer, pl_module), epoch=True)

    def finalize(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        original = self.original(trainer, pl_module)
        after = self.meter.stats(pl_module, storage_formats(trainer, pl_module))
        assert self.before is not None
        metrics = self._evaluate_both(trainer, original, pl_module) if self.config.metrics else {}
        latency = None
        if self.config.measure_latency and self.meter.example is not None and trainer.is_global_zero:
            latency = measure_latency_pair(
                original, pl_module, self.meter.example, **self.config.latency_options
            )
        self.report = report = assemble_report(self.before, after, metrics, latency)
        self.log_to_loggers(trainer, final_values(report))
        if not trainer.is_global_zero:
            return
        path = self._report_target
        publish_report(trainer.loggers, path, report, f"{self.prefix}report")
        if self.config.plots:
            from lightning_compress.plots import write_figures

            self.figures = write_figures(
                report, self.history, path, trainer.loggers, f"{self.prefix}report/", trainer.global_step
            )
        if self.config.verbose:
            where = (
                f"written to {path}" if path is not None else "no file: no `report_path` nor local run folder"
            )
            rank_zero_info(f"Compression report ({where}):\n{format_report(report)}")

    def state_dict(self) -> dict[str, Any]:
        return {"before": None if self.before is None else self.before.to_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # The original model's numbers survive a resume even when the structure was rebuilt from a checkpoint.
        before = state_dict.get("before")
        if before is not None:
            self.before = CompressionStats(**before)

    def _values(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        stats = self.meter.stats(pl_module, storage_formats(trainer, pl_module))
        values = logged_values(stats, self.before, self.config.per_layer)
        if self.config.plots and self.before is not None:
            # A callback that exposes the amount its schedule asks for now is plotted as the target.
            targets = {
                type(cb).__name__: float(cb.current_amount)
                for cb in trainer.callbacks  # type: ignore[attr-defined]
                if isinstance(getattr(cb, "current_amount", None), int | float)
            }
            point = (trainer.global_step, stats.sparsity, values["compression_rate"], targets)
            remember_point(self.history, *point)
        return values

    def _evaluate_both(
        self, trainer: pl.Trainer, original: nn.Module, final: pl.LightningModule
    ) -> dict[str, dict[str, float | None]]:
        names, loaders = self.config.metrics, trainer.val_dataloaders
        if loaders is None:
            rank_zero_warn(
                "CompressionMonitor: no validation ran during fit, so `metrics` cannot be reported."
            )
            return {name: {"before": None, "after": None} for name in names}
        # A copy of the final model: validating it in place would attach it to another Trainer. References to
        # this Trainer (from hooks of other callbacks) are not copied.
        after = copy.deepcopy(final, memo={id(trainer): None})
        found = {
            when: self._evaluate(trainer, m, loaders) for when, m in (("before", original), ("after", after))
        }
        return {name: {when: values.get(name) for when, values in found.items()} for name in names}

    def _evaluate(self, trainer: pl.Trainer, model: nn.Module, loaders: Any) -> dict[str, float]:
        device = next(model.parameters(), torch.empty(0)).device
        if isinstance(model, pl.LightningModule):
            # Lightning caches which attribute holds each logged torchmetrics object by object id; a copy
            # carries the cache of the model it was copied from.
            model._metric_attributes = None
        with _quiet_lightning():
            evaluator = pl.Trainer(
                accelerator="gpu" if device.type == "cuda" else "cpu",
                devices=[device.index or 0] if device.type == "cuda" else 1,
                precision=trainer.precision,
                logger=False,
                callbacks=[],
                enable_progress_bar=False,
                enable_model_summary=False,
                enable_checkpointing=False,
                limit_val_batches=trainer.limit_val_batches,
                default_root_dir=trainer.default_root_dir,
            )
            results = evaluator.validate(model, dataloaders=loaders, verbose=False)  # type: ignore[arg-type]
        merged = {name: value for result in results for name, value in result.items()}
        return {name: float(merged[name]) for name in self.config.metrics if name in merged}

    def _report_file(self, trainer: pl.Trainer) -> Path | None:
        if self.config.report_path is not None:
            return Path(self.config.report_path)
        # Without a logger there is no run directory: writing to the working directory would overwrite the
        # previous run's report.
        folder = run_directory(trainer)
        return None if folder is None else folder / REPORT_FILE


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    # The evaluation Trainer would print its device summary at every report; the rank of the process running
    # it must stay what the training Trainer set.
    rank = rank_zero_only.rank
    levels = {
        logger: logger.level for logger in map(logging.getLogger, ("lightning.pytorch", "lightning.fabric"))
    }
    try:
        for logger in levels:
            logger.setLevel(logging.WARNING)
        yield
    finally:
        for logger, level in levels.items():
            logger.setLevel(level)
        rank_zero_only.rank = rank
