"""The main job's four-scheme pipeline on digits: validation accuracy by distillation temperature, over seeds.

Configurations ``pipeline`` (3 seeds x (no distillation, T=1, 2, 4), about 12 minutes on 2 cores),
``pipeline_10_epochs`` and ``pipeline_ablation`` (``python -m benchmarks run pipeline``).

Per seed, the residual CNN of ``examples/compress_digits.py`` (widths 16-32) trains dense for 6 epochs; every
variant then fine-tunes a copy of that same dense model for 6 epochs with ``LowRankReplacement(rank=0.5)``,
``GradualPruning(amount=0.5, mode="structured")`` and ``QuantizationAwareTraining()`` at their defaults, with
``KnowledgeDistillation(teacher="self", temperature=T)`` (alpha 0.5) or without distillation. The number is the
final int8 model's validation accuracy. With ``ablation`` the default pipeline (T=1) runs beside itself without
each structural scheme instead.
"""

from __future__ import annotations

import copy
import statistics
import time
import warnings
from dataclasses import dataclass

import lightning.pytorch as pl
import torch

from benchmarks.common import Context, Result
from examples.data import DigitsDataModule
from examples.models import ImageClassifier
from lightning_compress import (
    GradualPruning,
    KnowledgeDistillation,
    LowRankReplacement,
    QuantizationAwareTraining,
)

TITLE = "The four-scheme pipeline on digits: accuracy by distillation temperature"
ABLATIONS = ("without low-rank", "without pruning")


@dataclass(frozen=True)
class Settings:
    """The full run's settings (a temperature None: the pipeline without distillation)."""

    seeds: tuple[int, ...] = (0, 1, 2)
    dense_epochs: int = 6
    epochs: int = 6  # compression epochs
    temperatures: tuple[float | None, ...] = (None, 1.0, 2.0, 4.0)
    ablation: bool = False  # the default pipeline (T=1) beside itself without each structural scheme


QUICK = {"seeds": (0,), "dense_epochs": 1, "epochs": 1, "temperatures": (None, 1.0)}


def _trainer(epochs: int, callbacks: list) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        deterministic=True,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )


def _label(temperature: float | None) -> str:
    return "no distillation" if temperature is None else f"self-distillation T={temperature:g}"


def _callbacks(temperature: float | None, drop: str | None) -> list:
    callbacks: list = []
    if drop != "without low-rank":
        callbacks.append(LowRankReplacement(rank=0.5, verbose=False))
    if drop != "without pruning":
        callbacks.append(GradualPruning(amount=0.5, mode="structured"))
    callbacks.append(QuantizationAwareTraining())
    if temperature is not None:
        callbacks.append(KnowledgeDistillation(teacher="self", temperature=temperature))
    return callbacks


def run_seed(seed: int, args: Settings) -> list[dict]:
    pl.seed_everything(seed, verbose=False)
    data = DigitsDataModule(batch_size=64, shuffle=True, seed=seed)
    dense = ImageClassifier("residual_cnn", input_shape=(1, 8, 8), lr=1e-2, arch_kwargs={"widths": (16, 32)})
    _trainer(args.dense_epochs, []).fit(dense, data)
    dense_acc = _trainer(1, []).validate(dense, data, verbose=False)[0]["val_acc"]
    rows = []
    variants = (
        [(1.0, None)] + [(1.0, d) for d in ABLATIONS]
        if args.ablation
        else [(t, None) for t in args.temperatures]
    )
    for temperature, drop in variants:
        pl.seed_everything(seed, verbose=False)
        model = copy.deepcopy(dense)
        start = time.perf_counter()
        trainer = _trainer(args.epochs, _callbacks(temperature, drop))
        trainer.fit(model, data)
        acc = trainer.validate(model, data, verbose=False)[0]["val_acc"]
        rows.append(
            {
                "seed": seed,
                "temperature": temperature,
                "ablation": drop,
                "dense_val_acc": dense_acc,
                "val_acc": acc,
                "seconds": time.perf_counter() - start,
            }
        )
        label = _label(temperature) + (f", {drop}" if drop else "")
        print(f"seed {seed} | {label}: val_acc {acc:.4f} (dense {dense_acc:.4f})", flush=True)
    return rows


def markdown(args: Settings, runs: list[dict]) -> str:
    lines = [
        f"Residual CNN 16-32 ({args.dense_epochs} dense epochs, then {args.epochs} epochs of low-rank 0.5 + "
        "structured pruning 0.5 + int8 QAT, alpha 0.5). Validation accuracy of the final int8 model; per seed and "
        "mean ± std over seeds.",
        "",
        "| variant | " + " | ".join(f"seed {s}" for s in args.seeds) + " | mean ± std |",
        "|---|" + "---|" * (len(args.seeds) + 1),
    ]
    dense = {r["seed"]: r["dense_val_acc"] for r in runs}
    lines.append(
        "| dense (before compression) | "
        + " | ".join(f"{dense[s]:.4f}" for s in args.seeds)
        + f" | {statistics.mean(dense.values()):.4f} |"
    )
    variants = [(t, None) for t in args.temperatures] + [(1.0, drop) for drop in ABLATIONS]
    for temperature, drop in dict.fromkeys(variants):
        selected = [r for r in runs if r["temperature"] == temperature and r["ablation"] == drop]
        if not selected:
            continue
        by_seed = {r["seed"]: r["val_acc"] for r in selected}
        values = list(by_seed.values())
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        lines.append(
            f"| {_label(temperature)}{', ' + drop if drop else ''} | "
            + " | ".join(f"{by_seed[s]:.4f}" if s in by_seed else "" for s in args.seeds)
            + f" | {statistics.mean(values):.4f} ± {spread:.4f} |"
        )
    return "\n".join(lines)


def run(args: Settings, context: Context) -> Result:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    runs = [row for seed in args.seeds for row in run_seed(seed, args)]
    return Result({"runs": runs}, markdown(args, runs))
