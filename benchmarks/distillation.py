"""Knowledge distillation on Fashion-MNIST: small students alone vs distilled, and pruning recovery by self-distillation.

Run from the repository root::

    .venv/bin/python -m benchmarks.distillation            # the full run (about 10 minutes on 2 idle cores)
    .venv/bin/python -m benchmarks.distillation --quick    # a smoke test on a few hundred images

Part 1 trains a residual CNN teacher on the 55,000 training images, then two small students (a narrow CNN and
LeNet-300-100) on a subsample of the training images, alone and distilled (``KnowledgeDistillation`` with the
trained teacher), over 3 seeds. The default (T=4, alpha=0.5) runs on every seed; a small grid over T and alpha is
searched on seed 0 by *validation* accuracy and its best point runs on the other seeds too. Reported: test
accuracy, the teacher-student gap and the fraction of it recovered, ``(distilled - alone) / (teacher - alone)``.

Part 2 trains LeNet-300-100 densely, then fine-tunes it while ``GradualPruning`` takes it to 95% sparsity, with
and without ``KnowledgeDistillation(teacher="self")``. Reported: the accuracy drop of pruning alone and the
fraction of it that self-distillation recovers.

Results go to ``benchmarks/results/distillation.json`` and ``benchmarks/results/distillation.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from examples.data import FashionMNISTDataModule
from examples.models import ImageClassifier
from lightning_compress.distillation import KnowledgeDistillation
from lightning_compress.pruning.gradual import GradualPruning

RESULTS = Path(__file__).resolve().parent / "results"

FULL = {
    "seeds": [0, 1, 2],
    "teacher": {"arch": "residual_cnn", "arch_kwargs": {"widths": [16, 32, 64]}, "epochs": 3, "lr": 3e-3},
    "students": {
        "small_cnn (width 4)": {
            "arch": "small_cnn",
            "arch_kwargs": {"width": 4, "image_size": 28},
            "lr": 3e-3,
        },
        "lenet_300_100 (MLP)": {"arch": "lenet_300_100", "arch_kwargs": {}, "lr": 1e-3},
    },
    "student_train_images": 5000,
    "student_epochs": 10,
    "default": {"temperature": 4.0, "alpha": 0.5},
    "grid": {"temperature": [2.0, 4.0, 8.0], "alpha": [0.5, 0.9]},
    "pruning": {"arch": "lenet_300_100", "lr": 1e-3, "dense_epochs": 3, "prune_epochs": 2, "amount": 0.95},
    "batch_size": 128,
}
QUICK = {
    **FULL,
    "teacher": {**FULL["teacher"], "epochs": 1},
    "student_train_images": 512,
    "student_epochs": 1,
    "grid": {"temperature": [2.0, 4.0], "alpha": [0.5]},
    "pruning": {**FULL["pruning"], "dense_epochs": 1, "prune_epochs": 1},
    "teacher_train_images": 1024,
}


class Classifier(ImageClassifier):
    """ImageClassifier with a cosine learning-rate decay over the whole fit (per optimizer step)."""

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        steps = int(self.trainer.estimated_stepping_batches)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _data(limit: int | None, seed: int, batch_size: int) -> FashionMNISTDataModule:
    dm = FashionMNISTDataModule(batch_size=batch_size, limit_train=limit, seed=seed)
    dm.setup("fit")
    return dm


def _fit(model: pl.LightningModule, dm: pl.LightningDataModule, epochs: int, callbacks: list) -> float:
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    return (time.perf_counter() - start) / max(1, trainer.global_step)


@torch.no_grad()
def _accuracy(model: torch.nn.Module, dataset: torch.utils.data.TensorDataset) -> float:
    model.eval()
    x, y = dataset.tensors
    predictions = torch.cat([model(x[i : i + 1000]).argmax(1) for i in range(0, len(x), 1000)])
    return float((predictions == y).float().mean())


def _model(spec: dict, seed: int) -> Classifier:
    pl.seed_everything(seed, verbose=False)
    return Classifier(
        spec["arch"], input_shape=(1, 28, 28), lr=spec["lr"], arch_kwargs=dict(spec["arch_kwargs"])
    )


def _note(log: list[str], line: str) -> None:
    log.append(line)
    print(line, flush=True)


def _summary(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "values": values,
    }


def _student_run(
    config: dict, spec: dict, seed: int, teacher: torch.nn.Module, point: tuple[float, float] | None
) -> dict:
    dm = _data(config["student_train_images"], seed, config["batch_size"])
    model = _model(spec, seed)
    callbacks = []
    if point is not None:
        callbacks.append(KnowledgeDistillation(teacher, temperature=point[0], alpha=point[1]))
    step = _fit(model, dm, config["student_epochs"], callbacks)
    return {
        "test_accuracy": _accuracy(model, dm.test_set),
        "val_accuracy": _accuracy(model, dm.val_set),
        "seconds_per_step": step,
    }


def _label(point: tuple[float, float]) -> str:
    return f"T={point[0]:g}, alpha={point[1]:g}"


def _recovered(runs: dict, label: str, teacher_acc: float, seeds: list[int]) -> dict:
    fractions = [
        (runs[label][s]["test_accuracy"] - runs["alone"][s]["test_accuracy"])
        / (teacher_acc - runs["alone"][s]["test_accuracy"])
        for s in seeds
    ]
    return _summary(fractions)


def run_student(
    config: dict, name: str, spec: dict, teacher: torch.nn.Module, teacher_acc: float, log: list
) -> dict:
    seeds = config["seeds"]
    default = (config["default"]["temperature"], config["default"]["alpha"])
    grid = [(t, a) for t in config["grid"]["temperature"] for a in config["grid"]["alpha"]]
    runs: dict[str, dict[int, dict]] = {}

    def record(label: str, seed: int, point: tuple[float, float] | None) -> None:
        out = _student_run(config, spec, seed, teacher, point)
        runs.setdefault(label, {})[seed] = out
        _note(
            log, f"{name} {label} seed {seed}: test {out['test_accuracy']:.4f} val {out['val_accuracy']:.4f}"
        )

    for seed in seeds:
        record("alone", seed, None)
    for point in grid:
        record(_label(point), seeds[0], point)
    best = max(grid, key=lambda point: runs[_label(point)][seeds[0]]["val_accuracy"])
    for point in dict.fromkeys([default, best]):
        for seed in seeds[1:]:
            record(_label(point), seed, point)
    alone = _summary([runs["alone"][s]["test_accuracy"] for s in seeds])
    return {
        "params": sum(p.numel() for p in _model(spec, 0).net.parameters()),
        "alone": alone,
        "gap_to_teacher": teacher_acc - alone["mean"],
        "default": {
            "point": _label(default),
            **_summary([runs[_label(default)][s]["test_accuracy"] for s in seeds]),
        },
        "default_recovered": _recovered(runs, _label(default), teacher_acc, seeds),
        "best": {"point": _label(best), **_summary([runs[_label(best)][s]["test_accuracy"] for s in seeds])},
        "best_recovered": _recovered(runs, _label(best), teacher_acc, seeds),
        "grid_seed0": {_label(point): runs[_label(point)][seeds[0]] for point in grid},
        "step_time_ratio_distilled_vs_alone": statistics.median(
            runs[_label(default)][s]["seconds_per_step"] / runs["alone"][s]["seconds_per_step"] for s in seeds
        ),
        "runs": {label: {str(s): v for s, v in by_seed.items()} for label, by_seed in runs.items()},
    }


def run_students(config: dict, log: list[str]) -> dict:
    teacher_dm = _data(config.get("teacher_train_images"), 0, config["batch_size"])
    teacher = _model(config["teacher"], 0)
    teacher_step = _fit(teacher, teacher_dm, config["teacher"]["epochs"], [])
    teacher_acc = _accuracy(teacher, teacher_dm.test_set)
    _note(log, f"teacher: test accuracy {teacher_acc:.4f}")
    return {
        "teacher": {
            "test_accuracy": teacher_acc,
            "params": sum(p.numel() for p in teacher.parameters()),
            "seconds_per_step": teacher_step,
        },
        "students": {
            name: run_student(config, name, spec, teacher, teacher_acc, log)
            for name, spec in config["students"].items()
        },
    }


def run_pruning(config: dict, log: list[str]) -> dict:
    spec = {**config["pruning"], "arch_kwargs": {}}
    batch = config["batch_size"]
    rows: dict[str, list[float]] = {"dense": [], "pruned": [], "pruned_distilled": [], "sparsity": []}
    for seed in config["seeds"]:
        dm = _data(config.get("teacher_train_images"), seed, batch)
        dense = _model(spec, seed)
        _fit(dense, dm, spec["dense_epochs"], [])
        rows["dense"].append(_accuracy(dense, dm.test_set))
        for label, distill in (("pruned", False), ("pruned_distilled", True)):
            model = _model(spec, seed)
            model.load_state_dict(dense.state_dict())
            callbacks: list = [GradualPruning(amount=spec["amount"], start=0.0, end=0.6)]
            if distill:
                callbacks.append(KnowledgeDistillation(teacher="self"))
            pl.seed_everything(seed, verbose=False)
            _fit(model, dm, spec["prune_epochs"], callbacks)
            rows[label].append(_accuracy(model, dm.test_set))
            if not distill:
                weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
                rows["sparsity"].append(
                    sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
                )
        _note(
            log,
            f"pruning seed {seed}: dense {rows['dense'][-1]:.4f} pruned {rows['pruned'][-1]:.4f} "
            f"pruned+KD {rows['pruned_distilled'][-1]:.4f}",
        )
    drops = [d - p for d, p in zip(rows["dense"], rows["pruned"], strict=True)]
    recovered = [
        (k - p) / (d - p) if d != p else float("nan")
        for d, p, k in zip(rows["dense"], rows["pruned"], rows["pruned_distilled"], strict=True)
    ]
    return {
        "dense": _summary(rows["dense"]),
        "pruned": _summary(rows["pruned"]),
        "pruned_distilled": _summary(rows["pruned_distilled"]),
        "sparsity": _summary(rows["sparsity"]),
        "drop": _summary(drops),
        "recovered": _summary(recovered),
        "recovered_of_mean_drop": (
            statistics.fmean(rows["pruned_distilled"]) - statistics.fmean(rows["pruned"])
        )
        / statistics.fmean(drops),
    }


def _images(config: dict) -> str:
    return f"{config.get('teacher_train_images') or 55000:,}"


def _pct(summary: dict) -> str:
    return f"{100 * summary['mean']:.2f} ± {100 * summary['std']:.2f}"


def markdown(report: dict) -> str:
    config, machine, students = report["config"], report["machine"], report["students"]
    teacher = students["teacher"]
    lines = [
        "# Knowledge distillation on Fashion-MNIST",
        "",
        f"Machine: {machine['processor']}, {machine['cpus']} CPUs, {machine['torch_threads']} torch threads, "
        f"torch {machine['torch']}, lightning {machine['lightning']}. Load average before/after: "
        f"{machine['load_before']} / {machine['load_after']}. Wall time {report['wall_seconds'] / 60:.1f} min.",
        "",
        "Mean ± standard deviation over seeds "
        + ", ".join(map(str, config["seeds"]))
        + " (test accuracy, %).",
        "",
        "## Students alone vs distilled from a residual CNN",
        "",
        f"Teacher: residual CNN (widths {config['teacher']['arch_kwargs']['widths']}, {teacher['params']:,} "
        f"parameters), {config['teacher']['epochs']} epochs on {_images(config)} training images: "
        f"**{100 * teacher['test_accuracy']:.2f}%**. Students: {config['student_train_images']:,} training images "
        f"(the first of the training split; subsampled to keep the run short), {config['student_epochs']} epochs, "
        "Adam with cosine decay, batch 128. The grid (T in "
        f"{config['grid']['temperature']}, alpha in {config['grid']['alpha']}) was searched on seed 0 by validation "
        "accuracy (5,000 held-out training images).",
        "",
        "| student | params | alone | gap to teacher | distilled, T=4 α=0.5 | gap recovered | best grid point "
        "| distilled, best | gap recovered | step time distilled / alone |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in students["students"].items():
        lines.append(
            f"| {name} | {s['params']:,} | {_pct(s['alone'])} | {100 * s['gap_to_teacher']:.2f} | "
            f"{_pct(s['default'])} | {_pct(s['default_recovered'])} % | {s['best']['point']} | {_pct(s['best'])} | "
            f"{_pct(s['best_recovered'])} % | {s['step_time_ratio_distilled_vs_alone']:.2f}x |"
        )
    p = report["pruning"]
    cfg = config["pruning"]
    lines += [
        "",
        "## Pruning recovery: GradualPruning to 95% with and without self-distillation",
        "",
        f"LeNet-300-100 trained densely for {cfg['dense_epochs']} epochs on {_images(config)} training images, then "
        f"fine-tuned {cfg['prune_epochs']} epochs while GradualPruning (unstructured, AGP, start 0, end 0.6) "
        f"reaches {cfg['amount']:.0%} sparsity (measured: {_pct(p['sparsity'])} % of the Linear weights), without "
        "and with `KnowledgeDistillation(teacher='self')` (T=4, α=0.5; the teacher is the dense model).",
        "",
        "| dense | pruned 95% | pruned 95% + self-distillation | drop (points) | drop recovered |",
        "|---|---|---|---|---|",
        f"| {_pct(p['dense'])} | {_pct(p['pruned'])} | {_pct(p['pruned_distilled'])} | {_pct(p['drop'])} | "
        f"{_pct(p['recovered'])} % (of the mean drop: {100 * p['recovered_of_mean_drop']:.0f} %) |",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke test on a few hundred images")
    parser.add_argument("--output", default=None, help="file stem under benchmarks/results/")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch CPU threads")
    args = parser.parse_args()
    config = QUICK if args.quick else FULL
    torch.set_num_threads(args.threads)
    log: list[str] = []
    machine = {
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "lightning": pl.__version__,
        "load_before": " ".join(f"{x:.1f}" for x in os.getloadavg()),
    }
    start = time.perf_counter()
    students = run_students(config, log)
    pruning = run_pruning(config, log)
    machine["load_after"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    report = {
        "config": config,
        "machine": machine,
        "wall_seconds": time.perf_counter() - start,
        "students": students,
        "pruning": pruning,
        "log": log,
    }
    stem = args.output or ("distillation_quick" if args.quick else "distillation")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=2))
    text = markdown(report)
    (RESULTS / f"{stem}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
