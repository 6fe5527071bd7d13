"""The main job's four-scheme pipeline on digits: validation accuracy by distillation temperature, over seeds.

Run from the repository root::

    .venv/bin/python -m benchmarks.pipeline            # 3 seeds x (no distillation, T=1, 2, 4), ~12 min on 2 cores
    .venv/bin/python -m benchmarks.pipeline --quick    # 1 seed, 1 + 1 epochs
    .venv/bin/python -m benchmarks.pipeline --seeds 0 --ablation --output pipeline_ablation
    .venv/bin/python -m benchmarks.pipeline --seeds 0 --epochs 10 --output pipeline_10_epochs

Per seed, the residual CNN of ``examples/compress_digits.py`` (widths 16-32) trains dense for 6 epochs; every
variant then fine-tunes a copy of that same dense model for 6 epochs with ``LowRankReplacement(rank=0.5)``,
``GradualPruning(amount=0.5, mode="structured")`` and ``QuantizationAwareTraining()`` at their defaults, with
``KnowledgeDistillation(teacher="self", temperature=T)`` (alpha 0.5) or without distillation. The number is the
final int8 model's validation accuracy. Results: ``benchmarks/results/pipeline.{json,md}``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
import warnings

import lightning.pytorch as pl
import torch

from benchmarks.common import RESULTS, machine
from examples.data import DigitsDataModule
from examples.models import ImageClassifier
from lightning_compress import (
    GradualPruning,
    KnowledgeDistillation,
    LowRankReplacement,
    QuantizationAwareTraining,
)

TEMPERATURES = (None, 1.0, 2.0, 4.0)
ABLATIONS = ("without low-rank", "without pruning")


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


def run(seed: int, dense_epochs: int, epochs: int, ablation: bool = False) -> list[dict]:
    pl.seed_everything(seed, verbose=False)
    data = DigitsDataModule(batch_size=64, shuffle=True, seed=seed)
    dense = ImageClassifier("residual_cnn", input_shape=(1, 8, 8), lr=1e-2, arch_kwargs={"widths": (16, 32)})
    _trainer(dense_epochs, []).fit(dense, data)
    dense_acc = _trainer(1, []).validate(dense, data, verbose=False)[0]["val_acc"]
    rows = []
    # --ablation: the default pipeline (T=1) beside itself without each structural scheme.
    variants = (
        [(1.0, None)] + [(1.0, d) for d in ABLATIONS] if ablation else [(t, None) for t in TEMPERATURES]
    )
    for temperature, drop in variants:
        pl.seed_everything(seed, verbose=False)
        model = copy.deepcopy(dense)
        start = time.perf_counter()
        trainer = _trainer(epochs, _callbacks(temperature, drop))
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


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        "# The four-scheme pipeline on digits: accuracy by distillation temperature",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch thread(s), torch {m['torch']}, "
        f"lightning {m['lightning']}. Wall time {report['wall_seconds'] / 60:.1f} min. "
        f"Command: `python -m benchmarks.pipeline {' '.join(report['argv'])}`.",
        "",
        f"Residual CNN 16-32 ({report['config']['dense_epochs']} dense epochs, then "
        f"{report['config']['epochs']} epochs of low-rank 0.5 + structured pruning 0.5 + int8 QAT, alpha 0.5). "
        "Validation accuracy of the final int8 model; per seed and mean ± std over seeds.",
        "",
        "| variant | " + " | ".join(f"seed {s}" for s in report["config"]["seeds"]) + " | mean ± std |",
        "|---|" + "---|" * (len(report["config"]["seeds"]) + 1),
    ]
    dense = {r["seed"]: r["dense_val_acc"] for r in report["runs"]}
    lines.append(
        "| dense (before compression) | "
        + " | ".join(f"{dense[s]:.4f}" for s in report["config"]["seeds"])
        + f" | {statistics.mean(dense.values()):.4f} |"
    )
    variants = [(t, None) for t in TEMPERATURES] + [(1.0, drop) for drop in ABLATIONS]
    for temperature, drop in variants:
        runs = [r for r in report["runs"] if r["temperature"] == temperature and r.get("ablation") == drop]
        if not runs:
            continue
        by_seed = {r["seed"]: r["val_acc"] for r in runs}
        values = list(by_seed.values())
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        lines.append(
            f"| {_label(temperature)}{', ' + drop if drop else ''} | "
            + " | ".join(f"{by_seed[s]:.4f}" if s in by_seed else "" for s in report["config"]["seeds"])
            + f" | {statistics.mean(values):.4f} ± {spread:.4f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 1 + 1 epochs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=6, help="compression epochs")
    parser.add_argument(
        "--ablation", action="store_true", help="also the pipeline without each structural scheme"
    )
    parser.add_argument("--output", default=None, help="file stem under benchmarks/results/")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    config = {
        "seeds": [0] if args.quick else args.seeds,
        "dense_epochs": 1 if args.quick else 6,
        "epochs": 1 if args.quick else args.epochs,
        "ablation": args.ablation,
    }
    start = time.perf_counter()
    runs: list[dict] = []
    stem = args.output or ("pipeline_quick" if args.quick else "pipeline")
    RESULTS.mkdir(parents=True, exist_ok=True)
    for seed in config["seeds"]:
        runs += run(seed, config["dense_epochs"], config["epochs"], args.ablation)
    report = {
        "config": config,
        "machine": {**machine(), "load": os.getloadavg()},
        "argv": sys.argv[1:],
        "wall_seconds": time.perf_counter() - start,
        "runs": runs,
    }
    (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=2))
    (RESULTS / f"{stem}.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
