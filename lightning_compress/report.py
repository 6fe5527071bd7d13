"""CompressionMonitor: log compression statistics to the Trainer's loggers and report before vs after at the end."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, Checkpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_compress._lightning import (
    detach_input,
    first_input,
    forget_original,
    remember_original,
    to_device,
)
from lightning_compress.stats import (
    CompressionStats,
    TensorFormat,
    compare_latency,
    compression_stats,
    compression_summary,
    count_macs,
)


def storage_formats(trainer: pl.Trainer, pl_module: nn.Module) -> dict[str, TensorFormat]:
    """Collect how each parameter is stored from the callbacks that change it (``storage_formats`` method).

    A callback that stores weights at a lower bit width or with a codebook implements
    ``storage_formats(pl_module) -> dict[str, TensorFormat]`` keyed by ``state_dict`` name; the monitor
    and the report count those tensors at that width.
    """
    formats: dict[str, TensorFormat] = {}
    for callback in trainer.callbacks:  # type: ignore[attr-defined]
        provider = getattr(callback, "storage_formats", None)
        if callable(provider) and callback is not None:
            formats.update(provider(pl_module))
    return formats


def format_report(report: Mapping[str, Any]) -> str:
    """Render a report (as written by :class:`CompressionMonitor`) as a before/after table.

    Example::

        >>> before = {"total_params": 100, "nonzero_params": 100, "sparsity": 0.0, "macs": 1000,
        ...           "dense_bytes": 700, "raw_bytes": 400, "compressed_bytes": 400}
        >>> after = dict(before, nonzero_params=10, sparsity=0.9, compressed_bytes=80)
        >>> summary = {"compression_rate": 10.0, "size_ratio": 5.0, "macs_ratio": 1.0}
        >>> print(format_report({"before": before, "after": after, "summary": summary}))
        metric                   before       after     ratio
        parameters                  100         100
        non-zero parameters         100          10    10.00x
        sparsity                  0.00%      90.00%
        MACs per sample           1,000       1,000     1.00x
        file size (bytes)           700         700
        stored size (bytes)         400          80     5.00x
    """
    before, after, summary = report["before"], report["after"], report["summary"]

    def num(value: Any) -> str:
        return "-" if value is None else f"{value:,}"

    def ratio(key: str) -> str:
        value = summary.get(key)
        return "" if value is None else f"{value:.2f}x"

    rows = [
        ("parameters", num(before["total_params"]), num(after["total_params"]), ""),
        (
            "non-zero parameters",
            num(before["nonzero_params"]),
            num(after["nonzero_params"]),
            ratio("compression_rate"),
        ),
        ("sparsity", f"{before['sparsity']:.2%}", f"{after['sparsity']:.2%}", ""),
        ("MACs per sample", num(before["macs"]), num(after["macs"]), ratio("macs_ratio")),
        ("file size (bytes)", num(before["dense_bytes"]), num(after["dense_bytes"]), ""),
        (
            "stored size (bytes)",
            num(before["raw_bytes"]),
            num(after["compressed_bytes"]),
            ratio("size_ratio"),
        ),
    ]
    latency = report.get("latency")
    if latency:
        rows.append(
            (
                f"latency ms (batch {latency['batch_size']})",
                f"{latency['before_ms']:.3f}",
                f"{latency['after_ms']:.3f}",
                f"{latency['speedup']:.2f}x",
            )
        )
    width = max(len(r[0]) for r in rows)
    lines = [f"{'metric':<{width}} {'before':>11} {'after':>11} {'ratio':>9}"]
    lines += [f"{a:<{width}} {b:>11} {c:>11} {d:>9}".rstrip() for a, b, c, d in rows]
    return "\n".join(lines)


class CompressionMonitor(Callback):
    """Logs compression statistics to every logger of the Trainer and reports before vs after at fit end.

    Logged under ``prefix`` (default ``"compression/"``): ``sparsity``, ``nonzero_params``, ``params``,
    ``macs`` (per sample, when an example input is known), ``compressed_bytes``, ``compression_rate``
    and ``size_ratio``; with ``per_layer=True`` also ``sparsity/<parameter name>``. At the end of training it
    logs the final ratios under ``prefix + "final/"``, prints a table on rank zero and writes it as JSON
    (``compression_report.json`` in the Trainer's log directory unless ``report_path`` is given). The report
    is also kept in :attr:`report`.

    "Before" is the model as it was before any compression callback changed it; "after" is the model at the
    end of training, after the compression callbacks finalized it (the monitor runs its end-of-training
    hook after theirs, wherever it is listed). Latency is measured for both side by side in one run.

    Args:
        example_input: input for MACs and latency; default: the LightningModule's ``example_input_array``,
            else the first sample of the first training batch.
        log_every_n_steps: log every N optimizer steps (``None``: only at epoch ends).
        log_on_epoch_end: log at the end of every training epoch (through ``pl_module.log``, so the values
            also reach ``trainer.callback_metrics`` and can be monitored by other callbacks).
        per_layer: also log the sparsity of every weight.
        measure_latency: time the original and the final model side by side at the end.
        latency_repeats: timed calls per model and round (median reported).
        latency_threads: threads while timing (``None``: leave ``torch.get_num_threads()``).
        report_path: where to write the JSON report (``None``: the Trainer's log directory).
        prefix: prefix of every logged name.
        verbose: print the table at the end (rank zero only).

    Example::

        >>> from lightning.pytorch import Trainer
        >>> monitor = CompressionMonitor(log_every_n_steps=10, per_layer=True)
        >>> trainer = Trainer(callbacks=[monitor], max_epochs=1, logger=False, enable_progress_bar=False)
    """

    def __init__(
        self,
        example_input: Any = None,
        log_every_n_steps: int | None = None,
        log_on_epoch_end: bool = True,
        per_layer: bool = False,
        measure_latency: bool = True,
        latency_repeats: int = 20,
        latency_threads: int | None = None,
        report_path: str | os.PathLike | None = None,
        prefix: str = "compression/",
        verbose: bool = True,
    ) -> None:
        if log_every_n_steps is not None and (
            isinstance(log_every_n_steps, bool)
            or not isinstance(log_every_n_steps, int)
            or log_every_n_steps < 1
        ):
            raise ValueError(f"`log_every_n_steps={log_every_n_steps!r}` must be a positive integer or None.")
        if not isinstance(latency_repeats, int) or latency_repeats < 1:
            raise ValueError(f"`latency_repeats={latency_repeats!r}` must be a positive integer.")
        if latency_threads is not None and (not isinstance(latency_threads, int) or latency_threads < 1):
            raise ValueError(f"`latency_threads={latency_threads!r}` must be a positive integer or None.")
        self.example_input = example_input
        self.log_every_n_steps = log_every_n_steps
        self.log_on_epoch_end = log_on_epoch_end
        self.per_layer = per_layer
        self.measure_latency = measure_latency
        self.latency_repeats = latency_repeats
        self.latency_threads = latency_threads
        self.report_path = report_path
        self.prefix = prefix
        self.verbose = verbose
        self.before: CompressionStats | None = None
        self.report: dict[str, Any] | None = None
        self._example: Any = None
        self._macs_cache: tuple[tuple, int | None] | None = None
        self._last_logged_step: int | None = None

    # -- lifecycle -----------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        original = remember_original(trainer, pl_module)
        # Run the end-of-training hook after every other callback's, so that the final numbers describe the
        # model the compression callbacks finalized, whatever order the user listed them in.
        # A new list, not an in-place move: Lightning is iterating the current one. Checkpoint callbacks stay last.
        others = [c for c in trainer.callbacks if c is not self]  # type: ignore[attr-defined]
        checkpoints = [c for c in others if isinstance(c, Checkpoint)]
        trainer.callbacks = [c for c in others if not isinstance(c, Checkpoint)] + [self, *checkpoints]  # type: ignore[attr-defined]
        self._example = self._initial_example(pl_module)
        if self.before is None:
            self.before = self._stats(trainer, original, formats={})

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._example is None:
            self._example = detach_input(first_input(batch), max_batch=1)
            if self.before is not None and self.before.macs is None:
                original = remember_original(trainer, pl_module)
                self.before = self._stats(trainer, original, formats={})

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.log_every_n_steps is None or trainer.global_step % self.log_every_n_steps != 0:
            return
        # `global_step` stays the same over accumulated micro-batches: log once per optimizer step.
        if self._last_logged_step == trainer.global_step:
            return
        self._last_logged_step = trainer.global_step
        metrics = self._metrics(trainer, pl_module)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.log_on_epoch_end:
            return
        for name, value in self._metrics(trainer, pl_module).items():
            pl_module.log(name, float(value), on_step=False, on_epoch=True, sync_dist=False)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        original = remember_original(trainer, pl_module)
        after = self._stats(trainer, pl_module, storage_formats(trainer, pl_module))
        assert self.before is not None
        summary = compression_summary(self.before, after)
        report: dict[str, Any] = {
            "before": self.before.to_dict(),
            "after": after.to_dict(),
            "summary": summary,
            "latency": None,
        }
        if self.measure_latency and self._example is not None and trainer.is_global_zero:
            report["latency"] = self._latency(original, pl_module)
        self.report = report
        final = {
            f"{self.prefix}final/{k}": float(v) for k, v in summary.items() if isinstance(v, int | float)
        }
        if report["latency"]:
            final[f"{self.prefix}final/speedup"] = report["latency"]["speedup"]
        for logger in trainer.loggers:
            logger.log_metrics(final, step=trainer.global_step)
        if trainer.is_global_zero:
            path = self._report_file(trainer)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(report, indent=2))
            if self.verbose:
                rank_zero_info(f"Compression report (written to {path}):\n{format_report(report)}")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            forget_original(trainer)

    # -- checkpoints ---------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"before": None if self.before is None else self.before.to_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # The original model's numbers survive a resume even when the structure was rebuilt from a checkpoint.
        before = state_dict.get("before")
        if before is not None:
            self.before = CompressionStats(**before)

    # -- helpers -------------------------------------------------------------------------------------

    def _initial_example(self, pl_module: pl.LightningModule) -> Any:
        example = self.example_input if self.example_input is not None else pl_module.example_input_array
        return None if example is None else detach_input(example)

    def _macs(self, module: nn.Module) -> int | None:
        if self._example is None:
            return None
        # MACs change only when shapes do: cache on the parameter shapes.
        key = tuple((n, tuple(p.shape)) for n, p in module.named_parameters())
        if self._macs_cache is not None and self._macs_cache[0] == key:
            return self._macs_cache[1]
        device = next(module.parameters(), torch.empty(0)).device
        try:
            macs: int | None = count_macs(module, to_device(self._example, device))
        except (
            Exception
        ) as err:  # a traced/quantized graph the counter cannot run: report, don't fail training
            rank_zero_warn(f"CompressionMonitor could not count MACs ({type(err).__name__}: {err}).")
            macs = None
        self._macs_cache = (key, macs)
        return macs

    def _stats(
        self, trainer: pl.Trainer, module: nn.Module, formats: dict[str, TensorFormat]
    ) -> CompressionStats:
        stats = compression_stats(module, example_input=None, formats=formats)
        return CompressionStats(**{**stats.to_dict(), "macs": self._macs(module)})

    def _metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        stats = self._stats(trainer, pl_module, storage_formats(trainer, pl_module))
        p = self.prefix
        metrics: dict[str, float] = {
            f"{p}sparsity": stats.sparsity,
            f"{p}nonzero_params": float(stats.nonzero_params),
            f"{p}params": float(stats.total_params),
            f"{p}compressed_bytes": float(stats.compressed_bytes),
        }
        if stats.macs is not None:
            metrics[f"{p}macs"] = float(stats.macs)
        if self.before is not None:
            summary = compression_summary(self.before, stats)
            metrics[f"{p}compression_rate"] = float(summary["compression_rate"] or 0.0)
            metrics[f"{p}size_ratio"] = float(summary["size_ratio"] or 0.0)
        if self.per_layer:
            metrics.update({f"{p}sparsity/{name}": value for name, value in stats.layer_sparsity.items()})
        return metrics

    def _latency(self, original: nn.Module, final: nn.Module) -> dict[str, Any]:
        device = next(final.parameters(), torch.empty(0)).device
        example = to_device(self._example, device)
        original = original.to(device)
        results = compare_latency(
            {"before": original, "after": final},
            example,
            repeats=self.latency_repeats,
            threads=self.latency_threads,
        )
        before, after = results["before"], results["after"]
        return {
            "before_ms": before.median_ms,
            "after_ms": after.median_ms,
            "speedup": before.median_ms / after.median_ms,
            "batch_size": after.batch_size,
            "threads": after.threads,
            "repeats": after.repeats,
        }

    def _report_file(self, trainer: pl.Trainer) -> Path:
        if self.report_path is not None:
            return Path(self.report_path)
        return Path(trainer.log_dir or trainer.default_root_dir) / "compression_report.json"
