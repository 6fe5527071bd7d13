"""One configuration per published result: the benchmark that produces it and the settings it runs with.

A configuration names a benchmark module of this package and overrides some fields of that module's ``Settings``
(a frozen dataclass whose defaults are the benchmark's full run). ``--quick`` applies the module's ``QUICK``
overrides on top, then the configuration's own ``quick`` ones: the same protocol at small sizes.

    python -m benchmarks list                      # every configuration
    python -m benchmarks run pruning               # regenerates benchmarks/results/pruning.{json,md}
    python -m benchmarks run pruning --quick       # the same at small sizes, written under runs/benchmarks/
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

REQUIREMENTS = ("gpu", "transformers")


@dataclass(frozen=True)
class Config:
    """A published result's recipe.

    Args:
        benchmark: the module of ``benchmarks/`` that runs it.
        settings: fields of the module's ``Settings`` that differ from its defaults.
        quick: fields for ``--quick`` on top of the module's ``QUICK``.
        notes: what a reader of the published result must know, e.g. that an earlier version of the code produced
            it (its result file says so too; a new run writes a new file without it).
        needs: what the run needs besides the CPU and the test dependencies (``"gpu"``, ``"transformers"``).
    """

    benchmark: str
    settings: Mapping[str, Any] = field(default_factory=dict)
    quick: Mapping[str, Any] = field(default_factory=dict)
    notes: str = ""
    needs: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        unknown = [need for need in self.needs if need not in REQUIREMENTS]
        if unknown:
            raise ValueError(f"`needs={self.needs}`: unknown {unknown}; use some of {REQUIREMENTS}.")

    @property
    def module(self) -> ModuleType:
        """The benchmark module (imported on first use)."""
        return importlib.import_module(f"benchmarks.{self.benchmark}")

    def build(self, quick: bool = False) -> Any:
        """The module's ``Settings`` for a full or a quick run; an unknown field is a ``TypeError``."""
        values = dict(self.settings)
        if quick:
            values.update(self.module.QUICK)
            values.update(self.quick)
        return self.module.Settings(**values)


_MINILM = {
    "sentences": 6000,
    "held_out": 512,
    "calibration_batches": 16,
    "distill_steps": 1500,
    "distill_lr": 2e-4,
}
_MINILM_LONG = {
    "sentences": 6000,
    "held_out": 512,
    "calibration_batches": 16,
    "distill_lr": 4e-4,
    "distill_schedule": "cosine",
    "warmup_steps": 100,
    "augment": True,
}
_LOOP = (
    "Produced by an earlier version of the benchmark whose fine-tuning was a hand-written distillation loss in "
    "the LightningModule (fixed teacher embeddings of the training sentences, or embedded in the step with "
    "`augment`); the configuration now fine-tunes with the package's `KnowledgeDistillation` callback (the same "
    "`1 - cos` of the sentence embeddings, the teacher run at each step) and has not been rerun at this length."
)
CONFIGS: dict[str, Config] = {
    "binary": Config("binary"),
    "budget": Config("budget"),
    "calibration_mask": Config("calibration_mask", needs=("transformers",)),
    "compact": Config("compact"),
    "language_model": Config("language_model"),
    # The same protocol at twice the width (12.8 M parameters), on the CPU (about 90 minutes).
    "language_model_width512_heads8": Config("language_model", {"d_model": 512, "n_heads": 8}),
    "minilm_compress": Config("minilm_compress", needs=("transformers",)),
    "minilm_compress_dropout": Config(
        "minilm_compress",
        {
            "dropout": None,
            "criteria": (),
            "sparse_modes": (),
        },  # its QAT arms with the model's dropout (0.1) on
        needs=("transformers",),
    ),
    "deep_compression": Config("deep_compression"),
    "distillation": Config("distillation", {"threads": 1}),
    "distillation_transfer": Config(
        "distillation",
        {
            "threads": 1,
            "transfer": True,
            "students": ("lenet_300_100 (MLP)",),
            "temperatures": (1.0, 2.0, 4.0),
        },
    ),
    "distillation_defaults": Config("distillation_defaults", {"workers": 2}),
    "freeze_bn": Config("freeze_bn"),
    "gpu_check": Config("gpu_check", needs=("gpu",)),
    "low_rank": Config(
        "low_rank",
        {
            "cnn_pretrain": 2,
            "cnn_finetune": 1,
            "cnn_limit_train": 8000,
            "cnn_budgets": (),
            "cnn_conv_ranks": (),
            "forms": ("eager",),
            "minilm": {"distill_steps": 40},
        },
        notes="A shortened run of both parts by an earlier version of the benchmark, which timed the eager "
        "models only, ran fewer CNN variants and fine-tuned MiniLM with a hand-written distillation loss in the "
        "LightningModule; the configuration now fine-tunes with the package's `KnowledgeDistillation` callback "
        "and has not been rerun.",
        needs=("transformers",),
    ),
    "low_rank_fashion": Config("low_rank"),
    "low_rank_minilm": Config(
        "low_rank_minilm",
        _MINILM,
        notes=_LOOP,
        needs=("transformers",),
    ),
    "low_rank_minilm_augment": Config(
        "low_rank_minilm", {**_MINILM_LONG, "distill_steps": 1500}, notes=_LOOP, needs=("transformers",)
    ),
    "low_rank_minilm_long": Config(
        "low_rank_minilm",
        {**_MINILM_LONG, "distill_steps": 6000, "methods": ("whitened",)},
        notes=_LOOP,
        needs=("transformers",),
    ),
    "low_rank_minilm_nodropout": Config(
        "low_rank_minilm",
        {**_MINILM_LONG, "distill_steps": 1500, "dropout": 0.0},
        notes=_LOOP,
        needs=("transformers",),
    ),
    "low_rank_minilm_nodropout_long": Config(
        "low_rank_minilm",
        {**_MINILM_LONG, "distill_steps": 6000, "dropout": 0.0, "methods": ("whitened",)},
        notes=_LOOP,
        needs=("transformers",),
    ),
    "low_rank_minilm_nodropout_long_svd": Config(
        "low_rank_minilm",
        {**_MINILM_LONG, "distill_steps": 6000, "dropout": 0.0, "methods": ("svd",)},
        notes=_LOOP,
        needs=("transformers",),
    ),
    "low_rank_minilm_layers": Config(
        "low_rank_minilm",
        {
            **_MINILM,
            "token_weight": 1.0,
            "all_layers": True,
            "methods": ("whitened",),
            "threads": 2,
        },
        needs=("transformers",),
    ),
    "low_rank_minilm_layers_padding": Config(
        "low_rank_minilm",
        {
            **_MINILM,
            "token_weight": 1.0,
            "all_layers": True,
            "token_mask": False,
            "methods": ("whitened",),
            "threads": 2,
        },
        needs=("transformers",),
    ),
    "low_rank_minilm_text": Config(
        "low_rank_minilm",
        {
            "sentences": 40000,
            "held_out": 512,
            "calibration_batches": 16,
            "distill_steps": 1500,
            "distill_lr": 2e-4,
            "text_packages": ("torch", "numpy", "transformers", "lightning", "sklearn", "scipy"),
            "methods": ("whitened",),
            "threads": 2,
        },
        notes=_LOOP,
        needs=("transformers",),
    ),
    "low_rank_gpu": Config(
        "low_rank_minilm",
        {
            "accelerator": "gpu",
            "sentences": 6000,
            "held_out": 512,
            "max_length": 48,
            "distill_steps": 2000,
            "distill_batch": 64,
            "distill_lr": 2e-4,
            "latency_batch": 64,
            "repeats": 20,
        },
        notes=_LOOP,
        needs=("gpu", "transformers"),
    ),
    "low_rank_gpu_token": Config(
        "low_rank_minilm",
        {
            "accelerator": "gpu",
            "sentences": 6000,
            "held_out": 512,
            "max_length": 48,
            "distill_steps": 2500,
            "distill_batch": 64,
            "distill_lr": 1e-4,
            "token_weight": 1.0,
            "methods": ("whitened",),
            "latency_batch": 64,
            "repeats": 10,
        },
        notes=_LOOP,
        needs=("gpu", "transformers"),
    ),
    "overhead": Config("overhead"),
    "pipeline": Config("pipeline"),
    "pipeline_10_epochs": Config("pipeline", {"epochs": 10}),
    "pipeline_ablation": Config("pipeline", {"seeds": (0,), "ablation": True}),
    "pruning": Config("pruning", {"seeds": 3}),
    "pruning_update_cost": Config("pruning_update_cost", {"baseline": "pruning_update_cost_before"}),
    "pruning_update_cost_before": Config(
        "pruning_update_cost",
        notes="Measured with an earlier version of GradualPruning that ranked the weights with a stable sort (since "
        "replaced by a k-th value selection): rerunning this configuration measures the current code, which "
        "`pruning_update_cost` compares against these stored numbers.",
    ),
    "qat_memory": Config("qat_memory"),
    "quantization": Config("quantization"),
    "report_example": Config("report_example"),
    "training_length": Config("training_length"),
}

# The configuration whose quick run stands for each benchmark in `make bench` (docs/results.md), in page order.
BENCH: tuple[str, ...] = (
    "pruning",
    "pruning_update_cost",
    "quantization",
    "qat_memory",
    "freeze_bn",
    "binary",
    "deep_compression",
    "low_rank_fashion",
    "low_rank_minilm_nodropout_long",
    "compact",
    "distillation",
    "distillation_defaults",
    "pipeline",
    "budget",
    "language_model",
    "training_length",
    "minilm_compress",
    "calibration_mask",
    "overhead",
    "report_example",
    "gpu_check",
)
