"""Compress neural networks while fine-tuning them with PyTorch Lightning."""

from lightning_compress.pruning.gradual import GradualPruning
from lightning_compress.report import CompressionMonitor, format_report
from lightning_compress.schedules import Schedule
from lightning_compress.selection import ModuleSelection, select_modules
from lightning_compress.stats import (
    CompressionStats,
    LatencyResult,
    TensorFormat,
    compare_latency,
    compression_stats,
    compression_summary,
)

__version__ = "0.1.0"

__all__ = [
    "CompressionMonitor",
    "CompressionStats",
    "GradualPruning",
    "LatencyResult",
    "ModuleSelection",
    "Schedule",
    "TensorFormat",
    "__version__",
    "compare_latency",
    "compression_stats",
    "compression_summary",
    "format_report",
    "select_modules",
]
