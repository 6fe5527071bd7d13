"""Compress neural networks while fine-tuning them with PyTorch Lightning."""

from lightning_compress._events import CompressionEvent, LossJumpDetector
from lightning_compress.budget import CompressionBudget
from lightning_compress.callback import CompressionCallback
from lightning_compress.depth import StochasticDepth, restore_depth
from lightning_compress.distillation.callback import FeatureLoss, KnowledgeDistillation
from lightning_compress.export import ExportResult, check_writable, export
from lightning_compress.low_rank.compact import CompactConvReplacement
from lightning_compress.low_rank.replacement import LowRankReplacement, restore_low_rank
from lightning_compress.pruning.gradual import GradualPruning, load_pruned_checkpoint
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

# The quantization callbacks need torchao (`pip install 'lightning-compress[quant]'`): imported on first use.
_QUANTIZATION = ("BinaryWeights", "QuantizationAwareTraining", "WeightSharing", "load_qat_checkpoint")


def __getattr__(name: str) -> object:
    if name in _QUANTIZATION:
        from lightning_compress import quantization

        return getattr(quantization, name)
    raise AttributeError(f"module 'lightning_compress' has no attribute {name!r}")


__all__ = [
    "BinaryWeights",
    "CompactConvReplacement",
    "CompressionBudget",
    "CompressionCallback",
    "CompressionEvent",
    "CompressionMonitor",
    "CompressionStats",
    "ExportResult",
    "FeatureLoss",
    "GradualPruning",
    "KnowledgeDistillation",
    "LatencyResult",
    "LossJumpDetector",
    "LowRankReplacement",
    "ModuleSelection",
    "QuantizationAwareTraining",
    "Schedule",
    "StochasticDepth",
    "TensorFormat",
    "WeightSharing",
    "__version__",
    "check_writable",
    "compare_latency",
    "compression_stats",
    "compression_summary",
    "export",
    "format_report",
    "load_pruned_checkpoint",
    "load_qat_checkpoint",
    "restore_depth",
    "restore_low_rank",
    "select_modules",
]
