"""Which ``KnowledgeDistillation`` defaults do not hurt: a T × alpha grid against the student alone, with and without BN.

Run from the repository root::

    .venv/bin/python -m benchmarks.distillation_defaults --workers 2   # the full grid (see the results for its time)
    .venv/bin/python -m benchmarks.distillation_defaults --quick        # a smoke test on a few hundred images

``--data-dir`` points at the four Fashion-MNIST IDX files when the Debian package is not installed (the files
can be unpacked from its ``.deb`` with ``dpkg-deb -x``).

A residual CNN teacher trains on 20,000 Fashion-MNIST training images; three students then train on the first
``--labels`` images only (few labels), alone and distilled from it at every point of the grid, over several seeds:

- a small residual CNN (BatchNorm after every convolution; widths 8-16-32),
- the narrow CNN of ``benchmarks/distillation.py`` (two conv-BN layers, width 4),
- LeNet-300-100 (no BatchNorm).

Every run, alone or distilled, validates after each epoch on 2,000 held-out training images and ends with its best
epoch's weights, so no run is judged at an overfitted last epoch. Diagnostics on the residual student, at the old
default (T=4, alpha=0.5): the teacher kept in train mode (batch statistics; the callback itself always runs it in
eval mode), and the same inputs shifted by up to 2 pixels (the distillation term then sees augmented images).
Each distilled run also records the mean task loss and KL term of its last epoch, to show which one dominates.

Results go to ``benchmarks/results/distillation_defaults.{json,md}``, rewritten after every run (a stopped run
leaves the runs done so far); one thread per worker process. ``--teacher PATH`` keeps the trained teacher there and
reuses it when the file exists.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import CosineClassifier, machine
from examples.data import FASHION_MNIST_DIR, FashionMNISTDataModule
from lightning_compress.distillation import KnowledgeDistillation

RESULTS = Path(__file__).resolve().parent / "results"

FULL: dict[str, Any] = {
    "seeds": [0, 1, 2],
    "labels": 1000,
    "epochs": 12,
    "val_images": 1000,
    "batch_size": 64,
    "teacher": {
        "arch": "residual_cnn",
        "arch_kwargs": {"widths": [16, 32, 64]},
        "epochs": 2,
        "lr": 3e-3,
        "images": 20000,
        "batch_size": 128,
    },
    "students": {
        "residual CNN 8-16-32 (BN)": {
            "arch": "residual_cnn",
            "arch_kwargs": {"widths": [8, 16, 32]},
            "lr": 3e-3,
        },
        "small CNN width 4 (BN)": {
            "arch": "small_cnn",
            "arch_kwargs": {"width": 4, "image_size": 28},
            "lr": 3e-3,
        },
        "LeNet-300-100 (no BN)": {"arch": "lenet_300_100", "arch_kwargs": {}, "lr": 1e-3},
    },
    "temperatures": [1.0, 2.0, 4.0],
    "alphas": [0.1, 0.5, 0.9],
    "diagnostics": {"student": "residual CNN 8-16-32 (BN)", "point": [4.0, 0.5]},
}
QUICK: dict[str, Any] = {
    **FULL,
    "seeds": [0],
    "labels": 256,
    "epochs": 1,
    "val_images": 500,
    "teacher": {**FULL["teacher"], "epochs": 1, "images": 2048},
    "temperatures": [1.0, 4.0],
    "alphas": [0.5],
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
    data_dir: str, limit: int | None, seed: int, config: dict, batch_size: int | None = None
) -> FashionMNISTDataModule:
    dm = FashionMNISTDataModule(
        data_dir=data_dir,
        batch_size=batch_size or config["batch_size"],
        val_size=config["val_images"],
        limit_train=limit,
        seed=seed,
    )
    dm.setup("fit")
    return dm


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


def train_teacher(config: dict, data_dir: str, path: str) -> dict:
    spec = config["teacher"]
    dm = _data(data_dir, spec.get("images"), 0, config, spec["batch_size"])
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
    }


def run_one(job: dict) -> dict:
    """One student fit: ``job`` names the student, the seed, the grid point (None: alone) and a variant."""
    torch.set_num_threads(1)
    config = job["config"]
    teacher = _model(config["teacher"], 0).net
    teacher.load_state_dict(torch.load(job["teacher_path"]))
    spec = config["students"][job["student"]]
    dm = _data(job["data_dir"], config["labels"], job["seed"], config)
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


def _jobs(config: dict, data_dir: str, teacher_path: str) -> list[dict]:
    points = [None] + [(t, a) for t in config["temperatures"] for a in config["alphas"]]
    base = {"config": config, "data_dir": data_dir, "teacher_path": teacher_path}
    diag = config["diagnostics"]
    point = tuple(diag["point"])

    def plain(seed: int) -> list[dict]:
        return [
            {**base, "student": s, "seed": seed, "point": p, "variant": "plain"}
            for s in config["students"]
            for p in points
        ]

    def diagnostics(seed: int) -> list[dict]:
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
    config, m = report["config"], report["machine"]
    lines = [
        "# Distillation defaults: T × alpha against the student alone (Fashion-MNIST, few labels)",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores shared with other jobs, {report['workers']} worker process(es) of "
        f"1 torch thread, torch {m['torch']}, lightning {m['lightning']}. Wall time {report['wall_seconds'] / 60:.1f} "
        f"min; {report['runs_done']} runs. Command: `.venv/bin/python -m benchmarks.distillation_defaults "
        + " ".join(report["argv"])
        + "`.",
        "",
        f"Teacher: residual CNN {config['teacher']['arch_kwargs']['widths']} ({report['teacher']['params']:,} "
        f"parameters), {config['teacher']['epochs']} epochs on {config['teacher'].get('images') or 55000:,} "
        "training images: "
        f"**{100 * report['teacher']['test_accuracy']:.2f} %** test accuracy. Students: the first "
        f"{config['labels']:,} training images, up to {config['epochs']} epochs (Adam, cosine decay, batch "
        f"{config['batch_size']}), best epoch by validation accuracy ({config['val_images']:,} held-out images). Test accuracy in %, "
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke test on a few hundred images")
    parser.add_argument(
        "--data-dir", default=FASHION_MNIST_DIR, help="folder with the Fashion-MNIST IDX files"
    )
    parser.add_argument("--workers", type=int, default=2, help="parallel processes, one torch thread each")
    parser.add_argument("--output", default=None, help="file stem under benchmarks/results/")
    parser.add_argument(
        "--teacher", default=None, help="file to keep the trained teacher in (reused if it exists)"
    )
    args = parser.parse_args()
    config = QUICK if args.quick else FULL
    torch.set_num_threads(1)
    start = time.perf_counter()
    load_before = os.getloadavg()
    stem = args.output or "distillation_defaults" + ("_quick" if args.quick else "")
    RESULTS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        teacher_path = args.teacher or os.path.join(tmp, "teacher.pt")
        teacher = train_teacher(config, args.data_dir, teacher_path)
        print(f"teacher: {teacher}", flush=True)
        jobs = _jobs(config, args.data_dir, teacher_path)
        runs: list[dict] = []
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(args.workers, mp_context=context) as pool:
            for run in pool.map(run_one, jobs):
                runs.append(run)
                print(
                    f"{run['student']} | {run['variant']} | {_label(run['point'])} | seed {run['seed']}: "
                    f"test {run['test_accuracy']:.4f} ({run['seconds']:.0f} s)",
                    flush=True,
                )
                report = {
                    "config": config,
                    "machine": {**machine(), "load_before": load_before, "load_after": os.getloadavg()},
                    "workers": args.workers,
                    "argv": sys.argv[1:],
                    "wall_seconds": time.perf_counter() - start,
                    "runs_done": f"{len(runs)} of {len(jobs)}",
                    "teacher": teacher,
                    "summary": summarize(runs),
                    "runs": runs,
                }
                (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=2))
                (RESULTS / f"{stem}.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
