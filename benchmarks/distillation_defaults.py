"""Which ``KnowledgeDistillation`` defaults do not hurt: a T × alpha grid against the student alone, with and without BN.

Configuration ``distillation_defaults`` (``python -m benchmarks run distillation_defaults``; ``--data-dir`` points at
the four Fashion-MNIST IDX files when the Debian package is not installed: they can be unpacked from its ``.deb``
with ``dpkg-deb -x``).

A residual CNN teacher trains on 20,000 Fashion-MNIST training images; three students then train on the first
``labels`` images only (few labels), alone and distilled from it at every point of the grid, over several seeds:

- a small residual CNN (BatchNorm after every convolution; widths 8-16-32),
- the narrow CNN of ``benchmarks/distillation.py`` (two conv-BN layers, width 4),
- LeNet-300-100 (no BatchNorm).

Every run, alone or distilled, validates after each epoch on ``val_images`` held-out training images and ends with its best
epoch's weights, so no run is judged at an overfitted last epoch. Diagnostics on the residual student, at the old
default (T=4, alpha=0.5): the teacher kept in train mode (batch statistics; the callback itself always runs it in
eval mode), and the same inputs shifted by up to 2 pixels (the distillation term then sees augmented images).
Each distilled run also records the mean task loss and KL term of its last epoch, to show which one dominates.

The runs go to ``workers`` processes of one torch thread each. ``teacher_file`` keeps the trained teacher in that
file and reuses it when it exists (default: a temporary file).
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import Context, CosineClassifier, Result, check_known, image_data
from lightning_compress.distillation import KnowledgeDistillation

TITLE = "Distillation defaults: T x alpha against the student alone (Fashion-MNIST, few labels)"
STUDENTS: dict[str, dict[str, Any]] = {
    "residual CNN 8-16-32 (BN)": {"arch": "residual_cnn", "arch_kwargs": {"widths": [8, 16, 32]}, "lr": 3e-3},
    "small CNN width 4 (BN)": {
        "arch": "small_cnn",
        "arch_kwargs": {"width": 4, "image_size": 28},
        "lr": 3e-3,
    },
    "LeNet-300-100 (no BN)": {"arch": "lenet_300_100", "arch_kwargs": {}, "lr": 1e-3},
}


@dataclass(frozen=True)
class Settings:
    """The full run's settings."""

    seeds: tuple[int, ...] = (0, 1, 2)
    labels: int = 1000  # labelled training images of the students
    epochs: int = 12
    val_images: int = 1000
    batch_size: int = 64
    teacher_epochs: int = 2
    teacher_images: int | None = 20000
    teacher_batch_size: int = 128
    students: tuple[str, ...] = tuple(STUDENTS)
    temperatures: tuple[float, ...] = (1.0, 2.0, 4.0)
    alphas: tuple[float, ...] = (0.1, 0.5, 0.9)
    diagnostics: bool = True  # teacher in train mode, shifted inputs (on the residual student)
    workers: int = 2  # parallel processes, one torch thread each
    teacher_file: str | None = None  # keeps the trained teacher (reused when it exists)

    def __post_init__(self) -> None:
        check_known(self.students, STUDENTS, "students")

    def config(self) -> dict[str, Any]:
        """The nested description the runs and the report read."""
        return {
            "seeds": list(self.seeds),
            "labels": self.labels,
            "epochs": self.epochs,
            "val_images": self.val_images,
            "batch_size": self.batch_size,
            "teacher": {
                "arch": "residual_cnn",
                "arch_kwargs": {"widths": [16, 32, 64]},
                "epochs": self.teacher_epochs,
                "lr": 3e-3,
                "images": self.teacher_images,
                "batch_size": self.teacher_batch_size,
            },
            "students": {name: STUDENTS[name] for name in self.students},
            "temperatures": list(self.temperatures),
            "alphas": list(self.alphas),
            "diagnostics": {"student": "residual CNN 8-16-32 (BN)", "point": [4.0, 0.5]}
            if self.diagnostics and "residual CNN 8-16-32 (BN)" in self.students
            else None,
        }


QUICK = {
    "seeds": (0,),
    "labels": 256,
    "epochs": 2,
    "val_images": 500,
    "teacher_epochs": 2,
    "teacher_images": 1024,
    "teacher_batch_size": 64,
    "temperatures": (1.0, 4.0),
    "alphas": (0.5,),
    "diagnostics": False,
}


class Student(CosineClassifier):
    """The benchmarks' classifier, optionally with random shifts of up to ``shift`` pixels on training inputs."""

    def __init__(self, *args: Any, shift: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.shift = shift

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self.shift:
            pad = F.pad(x, [self.shift] * 4, value=float(x.min()))
            i, j = (int(v) for v in torch.randint(0, 2 * self.shift + 1, (2,)))
            x = pad[..., i : i + x.shape[-2], j : j + x.shape[-1]]
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss


class TrainModeTeacher(nn.Module):
    """Keeps the wrapped teacher in train mode (BatchNorm on batch statistics) whatever ``eval()`` asks."""

    def __init__(self, teacher: nn.Module) -> None:
        super().__init__()
        self.teacher = teacher

    def train(self, mode: bool = True) -> TrainModeTeacher:
        return super().train(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.teacher(x)


class BestEpoch(pl.Callback):
    """Keeps the weights of the best validation epoch and loads them at the end; averages the last epoch's terms."""

    def __init__(self) -> None:
        self.best, self.epoch = -1.0, -1
        self.state: dict[str, torch.Tensor] | None = None
        self.terms: dict[str, list[float]] = {}

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.terms = {}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        for key in ("distillation/task_loss", "distillation/kl"):
            if key in trainer.callback_metrics:
                self.terms.setdefault(key, []).append(float(trainer.callback_metrics[key]))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        accuracy = float(trainer.callback_metrics["val_acc"])
        if accuracy > self.best:
            self.best, self.epoch = accuracy, trainer.current_epoch
            self.state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.state is not None:
            pl_module.load_state_dict(self.state)


def _trainer(epochs: int, callbacks: list, validate: bool) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=1.0 if validate else 0,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )


def _data(
    context: Context, limit: int | None, seed: int, config: dict, batch_size: int | None = None
) -> pl.LightningDataModule:
    return image_data(
        context,
        batch_size=batch_size or config["batch_size"],
        limit_train=limit,
        val_size=config["val_images"],
        seed=seed,
    )


@torch.no_grad()
def _accuracy(model: nn.Module, dataset: torch.utils.data.TensorDataset) -> float:
    model.eval()
    x, y = dataset.tensors
    predictions = torch.cat([model(x[i : i + 1000]).argmax(1) for i in range(0, len(x), 1000)])
    return float((predictions == y).float().mean())


def _model(spec: dict, seed: int, shift: int = 0) -> Student:
    pl.seed_everything(seed, verbose=False)
    return Student(
        spec["arch"],
        input_shape=(1, 28, 28),
        lr=spec["lr"],
        arch_kwargs=dict(spec["arch_kwargs"]),
        shift=shift,
    )


def train_teacher(config: dict, context: Context, path: str) -> dict:
    spec = config["teacher"]
    dm = _data(context, spec.get("images"), 0, config, spec["batch_size"])
    teacher = _model(spec, 0)
    start = time.perf_counter()
    if os.path.isfile(path):
        teacher.net.load_state_dict(torch.load(path))
    else:
        _trainer(spec["epochs"], [], validate=False).fit(teacher, datamodule=dm)
        torch.save(teacher.net.state_dict(), path)
    return {
        "test_accuracy": _accuracy(teacher, dm.test_set),
        "params": sum(p.numel() for p in teacher.net.parameters()),
        "train_seconds": time.perf_counter() - start,
        "train_images": len(dm.train_set),
        "val_images": len(dm.val_set),
    }


def run_one(job: dict) -> dict:
    """One student fit: ``job`` names the student, the seed, the grid point (None: alone) and a variant."""
    torch.set_num_threads(1)
    config = job["config"]
    teacher = _model(config["teacher"], 0).net
    teacher.load_state_dict(torch.load(job["teacher_path"]))
    spec = config["students"][job["student"]]
    context = Context(name="worker", quick=job["quick"], data_dir=Path(job["data_dir"]))
    dm = _data(context, config["labels"], job["seed"], config)
    model = _model(spec, job["seed"], shift=2 if job["variant"] == "shifted inputs" else 0)
    callbacks: list[pl.Callback] = []
    if job["point"] is not None:
        t, alpha = job["point"]
        used = TrainModeTeacher(teacher) if job["variant"] == "teacher in train mode" else teacher
        callbacks.append(KnowledgeDistillation(used, temperature=t, alpha=alpha))
    best = BestEpoch()
    trainer = _trainer(config["epochs"], [*callbacks, best], validate=True)
    pl.seed_everything(job["seed"], verbose=False)
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    seconds = time.perf_counter() - start
    return {
        **{k: job[k] for k in ("student", "seed", "point", "variant")},
        "test_accuracy": _accuracy(model, dm.test_set),
        "val_accuracy": best.best,
        "best_epoch": best.epoch,
        "seconds": seconds,
        "last_epoch_terms": {k: statistics.fmean(v) for k, v in best.terms.items()},
    }


def _label(point: list[float] | tuple[float, float] | None) -> str:
    return "alone" if point is None else f"T={point[0]:g} α={point[1]:g}"


def _jobs(config: dict, context: Context, teacher_path: str) -> list[dict]:
    points = [None] + [(t, a) for t in config["temperatures"] for a in config["alphas"]]
    base = {
        "config": config,
        "data_dir": str(context.data_dir),
        "quick": context.quick,
        "teacher_path": teacher_path,
    }
    diag = config["diagnostics"]

    def plain(seed: int) -> list[dict]:
        return [
            {**base, "student": s, "seed": seed, "point": p, "variant": "plain"}
            for s in config["students"]
            for p in points
        ]

    def diagnostics(seed: int) -> list[dict]:
        if diag is None:
            return []
        point = tuple(diag["point"])
        job = {**base, "student": diag["student"], "seed": seed}
        return [
            {**job, "point": point, "variant": "teacher in train mode"},
            *({**job, "point": p, "variant": "shifted inputs"} for p in (None, point, (1.0, 0.5))),
        ]

    # Two seeds of everything first, so that a run stopped early still compares every setting.
    seeds = config["seeds"]
    jobs = [job for seed in seeds[:2] for job in plain(seed)]
    jobs += [job for seed in seeds[:2] for job in diagnostics(seed)]
    jobs += [job for seed in seeds[2:] for job in [*plain(seed), *diagnostics(seed)]]
    return jobs


def _summary(values: list[float]) -> dict:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "values": values,
    }


def summarize(runs: list[dict]) -> dict:
    """Per student and variant: test accuracy per setting and its difference to the run alone of the same seed."""
    table: dict[str, dict[str, dict]] = {}
    alone = {(r["student"], r["variant"], r["seed"]): r["test_accuracy"] for r in runs if r["point"] is None}
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for r in runs:
        groups.setdefault((r["student"], r["variant"], _label(r["point"])), []).append(r)
    for (student, variant, label), rs in groups.items():
        rs = sorted(rs, key=lambda r: r["seed"])
        reference = [
            alone.get((student, "plain" if variant == "teacher in train mode" else variant, r["seed"]))
            for r in rs
        ]
        entry = {"test_accuracy": _summary([r["test_accuracy"] for r in rs])}
        if label != "alone" and all(v is not None for v in reference):
            entry["vs_alone"] = _summary([r["test_accuracy"] - a for r, a in zip(rs, reference, strict=True)])
        terms = [r["last_epoch_terms"] for r in rs if r["last_epoch_terms"]]
        if terms:
            entry["task_loss"] = statistics.fmean(t["distillation/task_loss"] for t in terms)
            entry["kl"] = statistics.fmean(t["distillation/kl"] for t in terms)
        table.setdefault(f"{student} | {variant}", {})[label] = entry
    return table


def _pct(s: dict, sign: bool = False) -> str:
    return f"{100 * s['mean']:{'+' if sign else ''}.2f} ± {100 * s['std']:.2f}"


def markdown(report: dict) -> str:
    config = report["config"]
    lines = [
        f"{report['runs_done']} runs in {report['workers']} worker process(es) of 1 torch thread.",
        "",
        f"Teacher: residual CNN {config['teacher']['arch_kwargs']['widths']} ({report['teacher']['params']:,} "
        f"parameters), {config['teacher']['epochs']} epochs on {report['teacher']['train_images']:,} "
        "training images: "
        f"**{100 * report['teacher']['test_accuracy']:.2f} %** test accuracy. Students: the first "
        f"{config['labels']:,} training images, up to {config['epochs']} epochs (Adam, cosine decay, batch "
        f"{config['batch_size']}), best epoch by validation accuracy ({report['teacher']['val_images']:,} held-out images). Test accuracy in %, "
        f"mean ± std over seeds {config['seeds']}; Δ = distilled − alone, per seed (same seed, same data order).",
        "",
    ]
    for group, rows in report["summary"].items():
        lines += [
            f"## {group}",
            "",
            "| setting | test accuracy | Δ vs alone | last-epoch task loss | last-epoch KL |",
        ]
        lines.append("|---|---|---|---|---|")
        for label, e in rows.items():
            delta = _pct(e["vs_alone"], sign=True) if "vs_alone" in e else ""
            task = f"{e['task_loss']:.3f}" if "task_loss" in e else ""
            kl = f"{e['kl']:.3f}" if "kl" in e else ""
            lines.append(f"| {label} | {_pct(e['test_accuracy'])} | {delta} | {task} | {kl} |")
        lines.append("")
    return "\n".join(lines)


def run(settings: Settings, context: Context) -> Result:
    config = settings.config()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        teacher_path = settings.teacher_file or os.path.join(tmp, "teacher.pt")
        teacher = train_teacher(config, context, teacher_path)
        print(f"teacher: {teacher}", flush=True)
        jobs = _jobs(config, context, teacher_path)
        runs: list[dict] = []
        spawn = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(settings.workers, mp_context=spawn) as pool:
            for done in pool.map(run_one, jobs):
                runs.append(done)
                print(
                    f"{done['student']} | {done['variant']} | {_label(done['point'])} | seed {done['seed']}: "
                    f"test {done['test_accuracy']:.4f} ({done['seconds']:.0f} s)",
                    flush=True,
                )
    report = {
        "config": config,
        "workers": settings.workers,
        "runs_done": f"{len(runs)} of {len(jobs)}",
        "teacher": teacher,
        "summary": summarize(runs),
        "runs": runs,
    }
    return Result(report, markdown(report))
