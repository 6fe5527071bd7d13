"""CompressionMonitor: log compression statistics to the Trainer's loggers and report before vs after at the end."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, Checkpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn

from lightning_compress._inputs import call_module, input_shapes
from lightning_compress._lightning import (
    detach_input,
    first_input,
    forget_original,
    log_step,
    per_layer_name,
    remember_original,
    to_device,
)
from lightning_compress.export import atomic_write, check_writable
from lightning_compress.stats import (
    CompressionStats,
    TensorFormat,
    compare_latency,
    compression_stats,
    compression_summary,
    count_macs,
    repeat_sample,
)

LATENCY_MODES = ("auto", "eager", "compiled")


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


def _metric(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def latency_mode(module: nn.Module) -> str:
    """How a model is run once deployed: ``"compiled"`` when it holds a converted int8 graph, else ``"eager"``.

    A converted PT2E int8 graph only gets int8 kernels through
    :func:`~lightning_compress.quantization.pt2e.compile_for_cpu` (inductor with weight freezing); run eagerly
    it dequantizes every weight at every call and is slower than the fp32 model.

    Example::

        >>> latency_mode(nn.Linear(2, 2))
        'eager'
    """
    # Importing the quantization stack costs seconds; a model cannot hold its graphs unless it was imported.
    pt2e = sys.modules.get("lightning_compress.quantization.pt2e")
    if pt2e is None:
        return "eager"
    converted = any(isinstance(m, pt2e.QuantizedGraphModule) and m.converted for m in module.modules())
    return "compiled" if converted else "eager"


def _deployable(module: nn.Module, mode: str) -> Any:
    if mode == "eager":
        return module
    from lightning_compress.quantization.pt2e import QuantizedGraphModule, compile_for_cpu

    # A graph installed as the whole forward is what runs when the model is called: compile it directly.
    from lightning_compress.quantization.qat import whole_forward_graph

    graph = whole_forward_graph(module)
    return compile_for_cpu(graph if isinstance(graph, QuantizedGraphModule) else module)


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
    for name, values in (report.get("metrics") or {}).items():
        rows.append((name, _metric(values.get("before")), _metric(values.get("after")), ""))
    for row in report.get("latency") or ():
        rows.append(
            (
                f"latency ms, batch {row['batch_size']} ({row['mode']})",
                f"{row['before_ms']:.3f}",
                f"{row['after_ms']:.3f}",
                f"{row['speedup']:.2f}x",
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
    and ``size_ratio``; with ``per_layer=True`` also ``per_layer/sparsity/<parameter name>``. At the end of training it
    logs the final ratios under ``prefix + "final/"``, prints a table on rank zero and writes it as JSON
    (``report_path``; by default ``compression_report.json`` in the log directory of the Trainer's logger, and
    no file at all with ``logger=False``, so that runs never overwrite each other's report in the working
    directory). The report is also kept in :attr:`report`.

    "Before" is the model as it was before any compression callback changed it; "after" is the model at the
    end of training, after the compression callbacks finalized it (the monitor runs its end-of-training
    hook after theirs, wherever it is listed). MACs are counted for one sample.

    Latency is measured for both side by side in one run, the way each would be deployed: a model holding a
    converted int8 graph runs compiled (:func:`~lightning_compress.quantization.pt2e.compile_for_cpu`, the
    only way it gets int8 kernels), and the original is then compiled the same way so that the ratio compares
    like with like; other models run eagerly. The table says which (``eager``/``compiled``).

    ``metrics`` are read from the LightningModule's own validation loop, run once on the original model and
    once on the final one at the end of training (each in a separate, callback-free Trainer over the fit's
    validation loaders), so "before" and "after" are measured the same way on the same data.

    Args:
        example_input: input for MACs and latency; default: the LightningModule's ``example_input_array``,
            else the first sample of the first training batch.
        log_every_n_steps: log every N optimizer steps (``None``: only at epoch ends).
        log_on_epoch_end: log at the end of every training epoch (through ``pl_module.log``, so the values
            also reach ``trainer.callback_metrics`` and can be monitored by other callbacks).
        per_layer: also log the sparsity of every weight.
        metrics: names the LightningModule logs in validation (e.g. ``["val_acc"]``) to report for the
            original and the final model.
        measure_latency: time the original and the final model side by side at the end.
        latency_batch_size: also time at this batch size (the example's first sample repeated); batch 1 is
            always timed.
        latency_mode: ``"auto"`` (compiled when the final model holds a converted int8 graph, else eager),
            ``"eager"`` or ``"compiled"`` (both models through ``compile_for_cpu``).
        latency_repeats: timed calls per model and round (median reported).
        latency_threads: threads while timing (``None``: leave ``torch.get_num_threads()``).
        report_path: where to write the JSON report (``None``: ``compression_report.json`` in the logger's
            directory; no file without a logger). A directory fails at construction, a path where no file can
            be created fails at setup. The report and the plots are written atomically (a temporary file in the
            same directory, then renamed): an interrupted write leaves the previous file, never a partial one.
        plots: also draw the report (needs the ``plots`` extra, matplotlib): sparsity target vs reached over
            steps, per-weight sparsity and bits, stored size per tensor; written as PNG files beside the report
            (``<report stem>.<figure>.png``) and sent to loggers that take figures (TensorBoard, MLflow).
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
        metrics: Sequence[str] = (),
        measure_latency: bool = True,
        latency_batch_size: int | None = None,
        latency_mode: str = "auto",
        latency_repeats: int = 20,
        latency_threads: int | None = None,
        report_path: str | os.PathLike | None = None,
        plots: bool = False,
        prefix: str = "compression/",
        verbose: bool = True,
    ) -> None:
        if log_every_n_steps is not None and (
            isinstance(log_every_n_steps, bool)
            or not isinstance(log_every_n_steps, int)
            or log_every_n_steps < 1
        ):
            raise ValueError(f"`log_every_n_steps={log_every_n_steps!r}` must be a positive integer or None.")
        if isinstance(latency_repeats, bool) or not isinstance(latency_repeats, int) or latency_repeats < 1:
            raise ValueError(f"`latency_repeats={latency_repeats!r}` must be a positive integer.")
        if latency_threads is not None and (
            isinstance(latency_threads, bool) or not isinstance(latency_threads, int) or latency_threads < 1
        ):
            raise ValueError(f"`latency_threads={latency_threads!r}` must be a positive integer or None.")
        if latency_batch_size is not None and (
            isinstance(latency_batch_size, bool)
            or not isinstance(latency_batch_size, int)
            or latency_batch_size < 1
        ):
            raise ValueError(
                f"`latency_batch_size={latency_batch_size!r}` must be a positive integer or None."
            )
        if latency_mode not in LATENCY_MODES:
            raise ValueError(
                f"`latency_mode={latency_mode!r}` must be one of {', '.join(map(repr, LATENCY_MODES))}."
            )
        if isinstance(metrics, str) or not all(isinstance(m, str) and m for m in metrics):
            raise TypeError(
                f"`metrics={metrics!r}` must be a list of logged names, e.g. `metrics=['val_acc']`."
            )
        for argument, value in (
            ("log_on_epoch_end", log_on_epoch_end),
            ("per_layer", per_layer),
            ("measure_latency", measure_latency),
            ("plots", plots),
            ("verbose", verbose),
        ):
            if not isinstance(value, bool):
                raise TypeError(f"`{argument}={value!r}` must be True or False.")
        if not isinstance(prefix, str):
            raise TypeError(f"`prefix={prefix!r}` must be a string such as 'compression/'.")
        if report_path is not None:
            if isinstance(report_path, bool) or not isinstance(report_path, str | os.PathLike):
                raise TypeError(
                    f"`report_path={report_path!r}` must be a file path (str or os.PathLike), or None."
                )
            if Path(report_path).expanduser().is_dir():
                raise ValueError(
                    f"`report_path={os.fspath(report_path)!r}` is a directory; give a file name, e.g. "
                    f"`report_path={str(Path(report_path) / 'compression_report.json')!r}`."
                )
        if plots:
            from lightning_compress.plots import require_matplotlib

            require_matplotlib()
        self.example_input = example_input
        self.log_every_n_steps = log_every_n_steps
        self.log_on_epoch_end = log_on_epoch_end
        self.per_layer = per_layer
        self.metrics = list(metrics)
        self.measure_latency = measure_latency
        self.latency_batch_size = latency_batch_size
        self.latency_mode = latency_mode
        self.plots = plots
        self.latency_repeats = latency_repeats
        self.latency_threads = latency_threads
        self.report_path = report_path
        self.prefix = prefix
        self.verbose = verbose
        self.before: CompressionStats | None = None
        self.report: dict[str, Any] | None = None
        self._example: Any = None
        self._report_target: Path | None = None
        self._macs_cache: tuple[tuple, int | None] | None = None
        self._last_logged_step: int | None = None
        self.history: list[dict[str, Any]] = []
        self.figures: dict[str, Path] = {}

    # -- lifecycle -----------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        # Resolved on every process: `trainer.log_dir` is a collective call under DDP.
        self._report_target = self._report_file(trainer)
        if self._report_target is not None:
            check_writable(self._report_target, "report_path", ".json")
        if self.metrics and not is_overridden("validation_step", pl_module):
            raise ValueError(
                f"`metrics={self.metrics!r}` are read from validation, but {type(pl_module).__name__} has no "
                "`validation_step`. Add one that logs them, or pass `metrics=[]`."
            )
        if self.metrics and trainer.limit_val_batches == 0:
            raise ValueError(
                f"`metrics={self.metrics!r}` are read from validation, but `limit_val_batches=0` turns it off. "
                "Allow validation batches, or pass `metrics=[]`."
            )
        self.history = []
        original = remember_original(trainer, pl_module)
        # Run the end-of-training hook after every other callback's, so that the final numbers describe the
        # model the compression callbacks finalized, whatever order the user listed them in.
        # A new list, not an in-place move: Lightning is iterating the current one. Checkpoint callbacks stay last.
        others = [c for c in trainer.callbacks if c is not self]  # type: ignore[attr-defined]
        checkpoints = [c for c in others if isinstance(c, Checkpoint)]
        trainer.callbacks = [c for c in others if not isinstance(c, Checkpoint)] + [self, *checkpoints]  # type: ignore[attr-defined]
        self._example = self._initial_example(pl_module)
        self._check_example(pl_module, original)
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
        # Under gradient accumulation the first micro-batches end before any optimizer step: nothing to log yet.
        if trainer.global_step == 0:
            return
        # `global_step` stays the same over accumulated micro-batches: log once per optimizer step.
        if self._last_logged_step == trainer.global_step:
            return
        self._last_logged_step = trainer.global_step
        metrics = self._metrics(trainer, pl_module)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=log_step(trainer))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Fail after the first validation, not after training, when a named metric is never logged.
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        missing = [name for name in self.metrics if name not in trainer.callback_metrics]
        if missing:
            available = sorted(trainer.callback_metrics)
            raise ValueError(
                f"`metrics`: {missing} not logged by {type(pl_module).__name__}'s validation "
                f"(logged: {available}). Name metrics from that list."
            )

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
            "metrics": self._evaluate_both(trainer, original, pl_module) if self.metrics else {},
            "latency": None,
        }
        if self.measure_latency and self._example is not None and trainer.is_global_zero:
            report["latency"] = self._latency(original, pl_module)
        self.report = report
        final = {
            f"{self.prefix}final/{k}": float(v) for k, v in summary.items() if isinstance(v, int | float)
        }
        for row in report["latency"] or ():
            suffix = "" if row["batch_size"] == 1 else f"_batch{row['batch_size']}"
            final[f"{self.prefix}final/speedup{suffix}"] = row["speedup"]
        for name, values in report["metrics"].items():
            for when in ("before", "after"):
                if values[when] is not None:
                    final[f"{self.prefix}final/{name}_{when}"] = values[when]
        for logger in trainer.loggers:
            logger.log_metrics(final, step=log_step(trainer))
        if trainer.is_global_zero:
            path = self._report_target
            if path is not None:
                with atomic_write(path) as partial:
                    Path(partial).write_text(json.dumps(report, indent=2))
            if self.plots:
                self._plot(trainer, report, path)
            if self.verbose:
                where = (
                    f"written to {path}" if path is not None else "no file: no logger and no `report_path`"
                )
                rank_zero_info(f"Compression report ({where}):\n{format_report(report)}")

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
        # One sample: MACs are reported per sample, and latency batches are built by repeating it.
        return None if example is None else detach_input(example, max_batch=1)

    def _check_example(self, pl_module: pl.LightningModule, original: nn.Module) -> None:
        # Run the example once through the unchanged model, so that a wrong shape fails here and not as a
        # warning and missing numbers at the end.
        if self._example is None:
            return
        argument = "example_input" if self.example_input is not None else "example_input_array"
        device = next(original.parameters(), torch.empty(0)).device
        try:
            with torch.no_grad():
                call_module(original, to_device(self._example, device))
        except Exception as err:
            raise ValueError(
                f"`{argument}` of shape {input_shapes(self._example)} (its first sample) was rejected by "
                f"{type(pl_module).__name__}: {type(err).__name__}: {err}. Pass an input the model's forward "
                f"accepts, e.g. one batch of training inputs."
            ) from err

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
            self._remember(trainer, stats.sparsity, float(summary["compression_rate"] or 0.0))
        if self.per_layer:
            metrics.update(
                {per_layer_name(p, "sparsity", name): value for name, value in stats.layer_sparsity.items()}
            )
        return metrics

    def _remember(self, trainer: pl.Trainer, sparsity: float, compression_rate: float) -> None:
        if not self.plots:
            return
        # A callback that exposes the amount its schedule asks for now is plotted as the target.
        targets = {
            type(cb).__name__: float(cb.current_amount)
            for cb in trainer.callbacks  # type: ignore[attr-defined]
            if isinstance(getattr(cb, "current_amount", None), int | float)
        }
        entry = {
            "step": trainer.global_step,
            "sparsity": sparsity,
            "compression_rate": compression_rate,
            "targets": targets,
        }
        if self.history and self.history[-1]["step"] == entry["step"]:
            self.history[-1] = entry
        else:
            self.history.append(entry)

    def _latency(self, original: nn.Module, final: nn.Module) -> list[dict[str, Any]]:
        mode = latency_mode(final) if self.latency_mode == "auto" else self.latency_mode
        device = next(final.parameters(), torch.empty(0)).device
        original = original.to(device)
        models = {"before": _deployable(original, mode), "after": _deployable(final, mode)}
        rows = []
        for batch_size in sorted({1, self.latency_batch_size or 1}):
            example = to_device(repeat_sample(self._example, batch_size), device)
            if mode == "compiled":
                # The first call compiles (seconds): outside the timings.
                with torch.no_grad():
                    for model in models.values():
                        call_module(model, example)
            results = compare_latency(
                models, example, repeats=self.latency_repeats, threads=self.latency_threads
            )
            before, after = results["before"], results["after"]
            rows.append(
                {
                    "batch_size": batch_size,
                    "mode": mode,
                    "before_ms": before.median_ms,
                    "after_ms": after.median_ms,
                    "speedup": before.median_ms / after.median_ms,
                    "threads": after.threads,
                    "repeats": after.repeats,
                }
            )
        return rows

    def _evaluate_both(
        self, trainer: pl.Trainer, original: nn.Module, final: pl.LightningModule
    ) -> dict[str, dict[str, float | None]]:
        loaders = trainer.val_dataloaders
        if loaders is None:
            rank_zero_warn(
                "CompressionMonitor: no validation ran during fit, so `metrics` cannot be reported."
            )
            return {name: {"before": None, "after": None} for name in self.metrics}
        before = self._evaluate(trainer, original, loaders)
        # A copy: validating the model in place would attach it to another Trainer. References to this
        # Trainer (from hooks of other callbacks) are not copied.
        after = self._evaluate(trainer, copy.deepcopy(final, memo={id(trainer): None}), loaders)
        return {name: {"before": before.get(name), "after": after.get(name)} for name in self.metrics}

    def _evaluate(self, trainer: pl.Trainer, model: nn.Module, loaders: Any) -> dict[str, float]:
        device = next(model.parameters(), torch.empty(0)).device
        if isinstance(model, pl.LightningModule):
            # Lightning caches which attribute holds each logged torchmetrics object by object id; a copy
            # carries the cache of the model it was copied from.
            model._metric_attributes = None
        with _quiet_lightning():
            results = self._validate(trainer, model, device, loaders)
        merged: dict[str, float] = {}
        for result in results:
            merged.update(result)
        return {name: float(merged[name]) for name in self.metrics if name in merged}

    def _validate(self, trainer: pl.Trainer, model: nn.Module, device: torch.device, loaders: Any) -> Any:
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
        return evaluator.validate(model, dataloaders=loaders, verbose=False)  # type: ignore[arg-type]

    def _plot(self, trainer: pl.Trainer, report: dict[str, Any], path: Path | None) -> None:
        import matplotlib.pyplot as plt

        from lightning_compress.plots import report_figures

        figures = report_figures(report, self.history)
        self.figures = {}
        for name, figure in figures.items():
            if path is not None:
                file = path.with_name(f"{path.stem}.{name}.png")
                with atomic_write(file) as partial:
                    figure.savefig(partial, dpi=100, format="png")
                self.figures[name] = file
            tag = f"{self.prefix}report/{name}"
            for logger in trainer.loggers:
                experiment = logger.experiment
                if hasattr(experiment, "add_figure"):  # TensorBoard
                    experiment.add_figure(tag, figure, global_step=trainer.global_step, close=False)
                elif hasattr(experiment, "log_figure") and getattr(logger, "run_id", None):  # MLflow
                    experiment.log_figure(logger.run_id, figure, f"{tag}.png")
            plt.close(figure)

    def _report_file(self, trainer: pl.Trainer) -> Path | None:
        if self.report_path is not None:
            return Path(self.report_path)
        # Without a logger there is no run directory: writing to the working directory would overwrite the
        # previous run's report.
        if not trainer.loggers or trainer.log_dir is None:
            return None
        return Path(trainer.log_dir) / "compression_report.json"


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    # The evaluation Trainer would print its device summary at every report; the rank of the process running
    # it must stay what the training Trainer set.
    rank = rank_zero_only.rank
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
        rank_zero_only.rank = rank
