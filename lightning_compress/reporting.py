"""The before/after compression report of a model: statistics with MACs per sample, latency measured side by side
the way each model is deployed, the table. No Lightning here: ``CompressionMonitor`` assembles it during a fit.

Example::

    >>> from torch import nn
    >>> original, final = nn.Linear(4, 4), nn.Linear(4, 4)
    >>> with torch.no_grad():
    ...     _ = final.weight[:2].zero_()
    >>> meter = ModelMeter(torch.zeros(1, 4))
    >>> report = assemble_report(meter.stats(original), meter.stats(final))
    >>> report["summary"]["compression_rate"], report["after"]["macs"]
    (1.6666666666666667, 16)
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_compress import _checks
from lightning_compress._inputs import call_module, for_module, input_shapes
from lightning_compress.export import atomic_write
from lightning_compress.stats import (
    CompressionStats,
    TensorFormat,
    compare_latency,
    compression_stats,
    compression_summary,
    count_macs,
    repeat_sample,
)

__all__ = [
    "LATENCY_MODES",
    "REPORT_FILE",
    "ModelMeter",
    "MonitorConfig",
    "assemble_report",
    "deployable",
    "final_values",
    "format_report",
    "latency_mode",
    "logged_values",
    "measure_latency_pair",
    "publish_report",
    "remember_point",
    "write_report",
]

LATENCY_MODES = ("auto", "eager", "compiled")
REPORT_FILE = "compression_report.json"


@dataclass(frozen=True)
class MonitorConfig:
    """What ``CompressionMonitor`` logs and reports (its arguments, checked; see its documentation).

    Example::

        >>> MonitorConfig(latency_mode="jit")
        Traceback (most recent call last):
        ...
        ValueError: `latency_mode='jit'` must be one of 'auto', 'eager', 'compiled'.
    """

    example_input: Any = field(default=None, compare=False)
    log_every_n_steps: int | None = None
    log_on_epoch_end: bool = True
    per_layer: bool = False
    metrics: Sequence[str] = ()
    measure_latency: bool = True
    latency_batch_size: int | None = None
    latency_mode: str = "auto"
    latency_repeats: int = 20
    latency_threads: int | None = None
    report_path: str | os.PathLike | None = None
    plots: bool = False
    prefix: str = "compression/"
    verbose: bool = True

    def __post_init__(self) -> None:
        _checks.check_positive_or_none(self.log_every_n_steps, "log_every_n_steps")
        _checks.check_repeats(self.latency_repeats, "latency_repeats")
        _checks.check_positive_or_none(self.latency_threads, "latency_threads")
        _checks.check_positive_or_none(self.latency_batch_size, "latency_batch_size")
        _checks.check_latency_mode(self.latency_mode, LATENCY_MODES)
        object.__setattr__(self, "metrics", tuple(_checks.check_metric_names(self.metrics)))
        for name in ("log_on_epoch_end", "per_layer", "measure_latency", "plots", "verbose"):
            _checks.check_bool(getattr(self, name), name)
        _checks.check_prefix(self.prefix)
        _checks.check_report_path(self.report_path, REPORT_FILE)
        if self.plots:
            from lightning_compress.plots import require_matplotlib

            require_matplotlib()

    @property
    def latency_options(self) -> dict[str, Any]:
        """The keyword arguments of :func:`measure_latency_pair` this configuration gives."""
        return {
            "mode": self.latency_mode,
            "batch_size": self.latency_batch_size,
            "repeats": self.latency_repeats,
            "threads": self.latency_threads,
        }


class ModelMeter:
    """Statistics of models (:func:`~lightning_compress.stats.compression_stats`) with the MACs of one example
    sample; the MAC count is kept while the parameter shapes stay the same.

    Args:
        example: one sample of model input (``None``: no MACs).
        warn: how a MAC count that failed is reported (the model is still measured, without MACs).

    Example::

        >>> meter = ModelMeter(torch.zeros(1, 3))
        >>> meter.stats(torch.nn.Linear(3, 2)).macs
        6
    """

    def __init__(self, example: Any = None, warn: Callable[[str], Any] = warnings.warn) -> None:
        self.example = example
        self.warn = warn
        self._cache: tuple[tuple, int | None] | None = None

    def macs(self, module: nn.Module) -> int | None:
        """Multiply-accumulates of ``module`` on the example (``None`` without one, or when it cannot run)."""
        if self.example is None:
            return None
        key = tuple((n, tuple(p.shape)) for n, p in module.named_parameters())
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        try:
            macs: int | None = count_macs(module, for_module(self.example, module))
        except (
            Exception
        ) as err:  # a traced/quantized graph the counter cannot run: report, don't fail training
            self.warn(f"CompressionMonitor could not count MACs ({type(err).__name__}: {err}).")
            macs = None
        self._cache = (key, macs)
        return macs

    def stats(self, module: nn.Module, formats: Mapping[str, TensorFormat] | None = None) -> CompressionStats:
        """The statistics of ``module``, its parameters stored in ``formats``, with MACs of the example."""
        stats = compression_stats(module, example_input=None, formats=formats or {})
        return CompressionStats(**{**stats.to_dict(), "macs": self.macs(module)})

    def check(self, model: nn.Module, argument: str) -> None:
        """Run the example once through ``model``: a shape it rejects fails here, naming ``argument``, rather
        than as missing numbers at the end."""
        if self.example is None:
            return
        try:
            with torch.no_grad():
                call_module(model, for_module(self.example, model))
        except Exception as err:
            raise ValueError(
                f"`{argument}` of shape {input_shapes(self.example)} (its first sample) was rejected by "
                f"{type(model).__name__}: {type(err).__name__}: {err}. Pass an input the model's forward "
                f"accepts, e.g. one batch of training inputs."
            ) from err


def logged_values(
    stats: CompressionStats, before: CompressionStats | None = None, per_layer: bool = False
) -> dict[str, float]:
    """The values the monitor logs for a model (names without the prefix), compared with ``before`` when given.

    Example::

        >>> before = CompressionStats(100, 100, 0.0, None, 700, 400, 400, {"w": 0.0})
        >>> after = CompressionStats(100, 25, 0.75, None, 700, 400, 200, {"w": 0.8})
        >>> logged_values(after, before, per_layer=True)
        {'sparsity': 0.75, 'nonzero_params': 25.0, 'params': 100.0, 'compressed_bytes': 200.0, 'compression_rate': 4.0, 'size_ratio': 2.0, 'per_layer/sparsity/w': 0.8}
    """
    values: dict[str, float] = {
        "sparsity": stats.sparsity,
        "nonzero_params": float(stats.nonzero_params),
        "params": float(stats.total_params),
        "compressed_bytes": float(stats.compressed_bytes),
    }
    if stats.macs is not None:
        values["macs"] = float(stats.macs)
    if before is not None:
        summary = compression_summary(before, stats)
        values["compression_rate"] = float(summary["compression_rate"] or 0.0)
        values["size_ratio"] = float(summary["size_ratio"] or 0.0)
    if per_layer:
        values.update({f"per_layer/sparsity/{name}": value for name, value in stats.layer_sparsity.items()})
    return values


def remember_point(
    history: list[dict[str, Any]],
    step: int,
    sparsity: float,
    compression_rate: float,
    targets: Mapping[str, float],
) -> None:
    """Add a point to the history the ``steps`` figure draws (a point at the same step replaces the last one).

    Example::

        >>> history = []
        >>> remember_point(history, 1, 0.1, 1.1, {"GradualPruning": 0.2})
        >>> remember_point(history, 1, 0.2, 1.25, {"GradualPruning": 0.2})
        >>> [(p["step"], p["sparsity"]) for p in history]
        [(1, 0.2)]
    """
    entry = {
        "step": step,
        "sparsity": sparsity,
        "compression_rate": compression_rate,
        "targets": dict(targets),
    }
    if history and history[-1]["step"] == step:
        history[-1] = entry
    else:
        history.append(entry)


def assemble_report(
    before: CompressionStats,
    after: CompressionStats,
    metrics: Mapping[str, Mapping[str, float | None]] | None = None,
    latency: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The report (JSON-serializable): both snapshots, their comparison, validation metrics and latency rows."""
    return {
        "before": before.to_dict(),
        "after": after.to_dict(),
        "summary": compression_summary(before, after),
        "metrics": {name: dict(values) for name, values in (metrics or {}).items()},
        "latency": latency,
    }


def final_values(report: Mapping[str, Any]) -> dict[str, float]:
    """The values logged at the end (names without the prefix): ``final/<summary>``, ``final/speedup`` (batch 1),
    ``final/speedup_batch<N>`` and ``final/<metric>_before``/``_after``.

    Example::

        >>> report = {"summary": {"size_ratio": 2.0, "macs_ratio": None}, "metrics": {"acc": {"before": 0.5,
        ...           "after": 0.75}}, "latency": [{"batch_size": 1, "speedup": 1.5}]}
        >>> final_values(report)
        {'final/size_ratio': 2.0, 'final/speedup': 1.5, 'final/acc_before': 0.5, 'final/acc_after': 0.75}
    """
    final = {f"final/{k}": float(v) for k, v in report["summary"].items() if isinstance(v, int | float)}
    for row in report.get("latency") or ():
        suffix = "" if row["batch_size"] == 1 else f"_batch{row['batch_size']}"
        final[f"final/speedup{suffix}"] = row["speedup"]
    for name, values in (report.get("metrics") or {}).items():
        for when in ("before", "after"):
            if values[when] is not None:
                final[f"final/{name}_{when}"] = values[when]
    return final


def write_report(path: str | os.PathLike, report: Mapping[str, Any]) -> None:
    """Write the report as JSON, atomically: an interrupted write leaves the previous file, never a partial one."""
    with atomic_write(path) as partial:
        Path(partial).write_text(json.dumps(report, indent=2))


def publish_report(
    loggers: Sequence[Any], path: Path | None, report: Mapping[str, Any], folder: str = "compression/report"
) -> None:
    """Write the report to ``path`` and attach it to the runs of the loggers that keep files (see
    :func:`~lightning_compress.plots.send_file`). Without ``path`` (no ``report_path`` and no local run directory:
    MLflow on a database or a server), a temporary copy is attached to the runs of those loggers."""
    from lightning_compress.plots import send_file

    if path is not None:
        write_report(path, report)
        send_file(loggers, path, folder)
        return
    if not loggers:
        return
    with tempfile.TemporaryDirectory() as folder_on_disk:
        copy = Path(folder_on_disk) / REPORT_FILE
        write_report(copy, report)
        send_file(loggers, copy, folder)


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


def deployable(module: nn.Module, mode: str) -> Any:
    """``module`` as it runs once deployed: itself (``"eager"``), or compiled with ``compile_for_cpu``."""
    if mode == "eager":
        return module
    from lightning_compress.quantization.pt2e import compile_for_cpu

    return compile_for_cpu(module)


def measure_latency_pair(
    original: nn.Module,
    final: nn.Module,
    example: Any,
    *,
    mode: str = "auto",
    batch_size: int | None = None,
    repeats: int = 20,
    threads: int | None = None,
) -> list[dict[str, Any]]:
    """Time the original and the final model side by side, at batch 1 and at ``batch_size`` (the example's first
    sample repeated), both run the way the final model is deployed (``mode="auto"``, see :func:`latency_mode`).

    Example::

        >>> rows = measure_latency_pair(nn.Linear(4, 4), nn.Linear(4, 2), torch.zeros(1, 4), batch_size=3, repeats=2)
        >>> [(row["batch_size"], row["mode"], row["repeats"]) for row in rows]
        [(1, 'eager', 6), (3, 'eager', 6)]
    """
    mode = latency_mode(final) if mode == "auto" else mode
    device = next(final.parameters(), torch.empty(0)).device
    original = original.to(device)
    models = {"before": deployable(original, mode), "after": deployable(final, mode)}
    rows = []
    for size in sorted({1, batch_size or 1}):
        inputs = for_module(repeat_sample(example, size), final)
        if mode == "compiled":
            # The first call compiles (seconds): outside the timings.
            with torch.no_grad():
                for model in models.values():
                    call_module(model, inputs)
        results = compare_latency(models, inputs, repeats=repeats, threads=threads)
        before, after = results["before"], results["after"]
        rows.append(
            {
                "batch_size": size,
                "mode": mode,
                "before_ms": before.median_ms,
                "after_ms": after.median_ms,
                "speedup": before.median_ms / after.median_ms,
                "threads": after.threads,
                "repeats": after.repeats,
            }
        )
    return rows


def _metric(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def format_report(report: Mapping[str, Any]) -> str:
    """Render a report (as written by ``CompressionMonitor``) as a before/after table.

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
