"""Knowledge distillation on Fashion-MNIST: small students alone vs distilled, and pruning recovery by self-distillation.

Configurations ``distillation`` and ``distillation_transfer`` (``python -m benchmarks run distillation``). On a
machine shared with other jobs they use one torch thread: with 2 threads on 2 busy cores the OpenMP workers wait for
each other and a residual CNN step ran 9x slower here.

Part 1 trains a residual CNN teacher on the 55,000 training images, then two small students (a narrow CNN and
LeNet-300-100) on a subsample of the training images, alone and distilled (``KnowledgeDistillation`` with the
trained teacher), over 3 seeds. Every student run validates after each epoch and ends with its best epoch's
weights (alone and distilled alike). The default point (T=4, alpha=0.5) runs on every seed; a small grid over T and
alpha is searched on seed 0 by *validation* accuracy and its best point runs on the other seeds too. Reported: test
accuracy, the teacher-student gap and the fraction of it recovered, ``(distilled - alone) / (teacher - alone)``.

Part 2 trains LeNet-300-100 densely, then fine-tunes it while ``GradualPruning`` takes it to 95% sparsity (``amount``), with
and without ``KnowledgeDistillation(teacher="self")`` (same default and grid). Reported: the accuracy drop of
pruning alone and the fraction of it that self-distillation recovers.

With ``transfer`` the distilled runs learn from unlabelled images too: the MLP student distilled trains on all
training images, of which only the student's subsample keeps its labels, and the pruning part fine-tunes on 5,000
labelled images, the distilled runs on all the training images with the others unlabelled. The runs alone keep the
labelled images only (they have no use for images without labels).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from benchmarks.common import Context, CosineClassifier, Result, check_known, image_data
from lightning_compress.distillation import KnowledgeDistillation
from lightning_compress.pruning.gradual import GradualPruning

TITLE = "Knowledge distillation on Fashion-MNIST: students alone vs distilled, pruning recovery"
TEACHER = {"arch": "residual_cnn", "arch_kwargs": {"widths": [16, 32, 64]}, "lr": 3e-3}
STUDENTS = {
    "small_cnn (width 4)": {"arch": "small_cnn", "arch_kwargs": {"width": 4, "image_size": 28}, "lr": 3e-3},
    "lenet_300_100 (MLP)": {"arch": "lenet_300_100", "arch_kwargs": {}, "lr": 1e-3},
}


@dataclass(frozen=True)
class Settings:
    """The full run's settings.

    With ``transfer``, the distilled students train ``transfer_student_epochs`` on every training image, only the
    first ``student_train_images`` labelled; the pruning part fine-tunes on ``labelled_images`` labelled images,
    ``prune_alone_epochs`` alone, ``transfer_prune_epochs`` distilled on every image (the others unlabelled).
    """

    seeds: tuple[int, ...] = (0, 1, 2)
    teacher_epochs: int = 3
    teacher_train_images: int | None = None  # None: all 55,000
    students: tuple[str, ...] = tuple(STUDENTS)
    student_train_images: int = 5000
    student_epochs: int = 60
    teacher_precision: str = "bf16-true"
    default: tuple[float, float] = (4.0, 0.5)  # (temperature, alpha) run on every seed
    temperatures: tuple[float, ...] = (2.0, 4.0)  # the grid searched on the first seed
    alphas: tuple[float, ...] = (0.5, 0.9)
    prune_arch: str = "lenet_300_100"
    dense_epochs: int = 3
    prune_epochs: int = 5
    amount: float = 0.95
    batch_size: int = 128
    transfer: bool = False
    transfer_student_epochs: int = 15
    labelled_images: int = 5000
    prune_alone_epochs: int = 50
    transfer_prune_epochs: int = 20
    threads: int = 2

    def __post_init__(self) -> None:
        check_known(self.students, STUDENTS, "students")

    def config(self) -> dict[str, Any]:
        """The nested description the measurement and the report read."""
        config: dict[str, Any] = {
            "seeds": list(self.seeds),
            "teacher": {**TEACHER, "epochs": self.teacher_epochs},
            "students": {name: STUDENTS[name] for name in self.students},
            "student_train_images": self.student_train_images,
            "student_epochs": self.student_epochs,
            "teacher_precision": self.teacher_precision,
            "default": {"temperature": self.default[0], "alpha": self.default[1]},
            "grid": {"temperature": list(self.temperatures), "alpha": list(self.alphas)},
            "pruning": {
                "arch": self.prune_arch,
                "lr": STUDENTS["lenet_300_100 (MLP)"]["lr"],
                "dense_epochs": self.dense_epochs,
                "prune_epochs": self.prune_epochs,
                "amount": self.amount,
            },
            "batch_size": self.batch_size,
            "teacher_train_images": self.teacher_train_images,
        }
        if self.transfer:
            config["transfer"] = {
                "student_epochs": self.transfer_student_epochs,
                "labelled_images": self.labelled_images,
                "prune_alone_epochs": self.prune_alone_epochs,
                "prune_epochs": self.transfer_prune_epochs,
            }
        return config


QUICK = {
    "seeds": (0,),
    "teacher_epochs": 3,
    "teacher_train_images": 1024,
    "batch_size": 64,
    "student_train_images": 512,
    "student_epochs": 1,
    "temperatures": (4.0,),
    "alphas": (0.5,),
    "dense_epochs": 1,
    "prune_epochs": 1,
    "transfer_student_epochs": 1,
    "labelled_images": 512,
    "prune_alone_epochs": 2,
    "transfer_prune_epochs": 1,
    "threads": 1,
}


def _data(
    context: Context,
    limit: int | None,
    seed: int,
    batch_size: int,
    transfer: bool = False,
    total: int | None = None,
) -> pl.LightningDataModule:
    """The first ``limit`` training images; with ``transfer`` the first ``total`` (default: all), those after the
    first ``limit`` with the label -1 (unlabelled: only the distillation term learns from them)."""
    dm = image_data(context, batch_size=batch_size, limit_train=total if transfer else limit, seed=seed)
    if transfer and limit is not None:
        x, y = dm.train_set.tensors
        y = y.clone()
        y[limit:] = -1
        dm.train_set = TensorDataset(x, y)
    return dm


class PartlyLabelled(CosineClassifier):
    """Cross-entropy on the labelled images of a batch only (label -1: unlabelled). With every image labelled it
    is the plain classifier; a batch without labels contributes a zero task loss."""

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        labelled = y >= 0
        loss = F.cross_entropy(logits[labelled], y[labelled], reduction="sum") / labelled.sum().clamp_min(1)
        self.log("train_loss", loss, prog_bar=True)
        return loss


class BestEpoch(pl.Callback):
    """Keeps the weights of the epoch with the best validation accuracy and loads them when the fit ends.

    Every method gets the same treatment, so a run that overfits its small training set is judged at its best
    epoch rather than its last.
    """

    def __init__(self) -> None:
        self.best = -1.0
        self.epoch = -1
        self.state: dict[str, torch.Tensor] | None = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        accuracy = float(trainer.callback_metrics["val_acc"])
        if accuracy > self.best:
            self.best, self.epoch = accuracy, trainer.current_epoch
            self.state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.state is not None:
            # Distillation adapters saved with the best epoch are gone from the module by now.
            keys = pl_module.state_dict().keys()
            pl_module.load_state_dict({k: v for k, v in self.state.items() if k in keys})


def _fit(
    model: pl.LightningModule,
    dm: pl.LightningDataModule,
    epochs: int,
    callbacks: list,
    best_epoch: BestEpoch | None = None,
) -> float:
    """Train; with ``best_epoch`` validate after every epoch and end with the best epoch's weights."""
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0 if best_epoch is None else 1.0,
        num_sanity_val_steps=0,
        callbacks=callbacks if best_epoch is None else [*callbacks, best_epoch],
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


def _model(spec: dict, seed: int) -> CosineClassifier:
    pl.seed_everything(seed, verbose=False)
    return PartlyLabelled(
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


def _label(point: tuple[float, float]) -> str:
    return f"T={point[0]:g}, alpha={point[1]:g}"


def _compare(
    config: dict,
    name: str,
    run: Callable[[int, tuple[float, float] | None], dict],
    reference: Callable[[int], float],
    log: list[str],
) -> dict:
    """Runs alone and distilled (default on every seed, grid on the first, best grid point on every seed).

    ``reference(seed)`` is the accuracy distillation aims at (the teacher's, or the dense model's): the
    fraction recovered is ``(distilled - alone) / (reference - alone)`` per seed.
    """
    seeds = config["seeds"]
    default = (config["default"]["temperature"], config["default"]["alpha"])
    grid = [(t, a) for t in config["grid"]["temperature"] for a in config["grid"]["alpha"]]
    runs: dict[str, dict[int, dict]] = {}

    def record(label: str, seed: int, point: tuple[float, float] | None) -> None:
        out = run(seed, point)
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

    def test(label: str) -> list[float]:
        return [runs[label][s]["test_accuracy"] for s in seeds]

    def recovered(label: str) -> dict:
        alone = test("alone")
        return _summary(
            [(d - a) / (reference(s) - a) for s, a, d in zip(seeds, alone, test(label), strict=True)]
        )

    return {
        "alone": _summary(test("alone")),
        "reference": _summary([reference(s) for s in seeds]),
        "gap": _summary([reference(s) - a for s, a in zip(seeds, test("alone"), strict=True)]),
        "default": {"point": _label(default), **_summary(test(_label(default)))},
        "default_recovered": recovered(_label(default)),
        "best": {"point": _label(best), **_summary(test(_label(best)))},
        "best_recovered": recovered(_label(best)),
        "grid_seed0": {_label(point): runs[_label(point)][seeds[0]] for point in grid},
        "step_time_ratio_distilled_vs_alone": statistics.median(
            runs[_label(default)][s]["seconds_per_step"] / runs["alone"][s]["seconds_per_step"] for s in seeds
        ),
        "runs": {label: {str(s): v for s, v in by_seed.items()} for label, by_seed in runs.items()},
    }


def _evaluate(
    model: torch.nn.Module, dm: pl.LightningDataModule, step: float, best_epoch: BestEpoch | None = None
) -> dict:
    out = {
        "test_accuracy": _accuracy(model, dm.test_set),
        "val_accuracy": _accuracy(model, dm.val_set),
        "seconds_per_step": step,
    }
    if best_epoch is not None:
        out["best_epoch"] = best_epoch.epoch
    return out


def run_students(config: dict, log: list[str], context: Context) -> dict:
    teacher_dm = _data(context, config.get("teacher_train_images"), 0, config["batch_size"])
    teacher = _model(config["teacher"], 0)
    teacher_step = _fit(teacher, teacher_dm, config["teacher"]["epochs"], [])
    teacher_acc = _accuracy(teacher, teacher_dm.test_set)
    _note(log, f"teacher: test accuracy {teacher_acc:.4f}")
    result: dict[str, Any] = {
        "teacher": {
            "test_accuracy": teacher_acc,
            "params": sum(p.numel() for p in teacher.parameters()),
            "seconds_per_step": teacher_step,
        },
        "students": {},
        "train_images": len(teacher_dm.train_set),
        "val_images": len(teacher_dm.val_set),
    }
    for name, spec in config["students"].items():

        def run(seed: int, point: tuple[float, float] | None, spec: dict = spec) -> dict:
            transfer = point is not None and "transfer" in config
            dm = _data(
                context,
                config["student_train_images"],
                seed,
                config["batch_size"],
                transfer,
                config.get("teacher_train_images"),
            )
            epochs = config["transfer"]["student_epochs"] if transfer else config["student_epochs"]
            model = _model(spec, seed)
            callbacks = []
            if point is not None:
                callbacks.append(
                    KnowledgeDistillation(
                        teacher,
                        temperature=point[0],
                        alpha=point[1],
                        teacher_precision=config["teacher_precision"],
                    )
                )
            best = BestEpoch()
            return _evaluate(model, dm, _fit(model, dm, epochs, callbacks, best), best)

        result["students"][name] = {
            "params": sum(p.numel() for p in _model(spec, 0).net.parameters()),
            **_compare(config, name, run, lambda seed: teacher_acc, log),
        }
    return result


def run_pruning(config: dict, log: list[str], context: Context) -> dict:
    spec = {**config["pruning"], "arch_kwargs": {}}
    dense: dict[int, dict] = {}
    sparsity: list[float] = []

    def dense_model(seed: int) -> dict:
        if seed not in dense:
            model = _model(spec, seed)
            dm = _data(context, config.get("teacher_train_images"), seed, config["batch_size"])
            _fit(model, dm, spec["dense_epochs"], [])
            dense[seed] = {"state": model.state_dict(), "test_accuracy": _accuracy(model, dm.test_set)}
            _note(log, f"dense seed {seed}: test {dense[seed]['test_accuracy']:.4f}")
        return dense[seed]

    def run(seed: int, point: tuple[float, float] | None) -> dict:
        if "transfer" in config:  # fine-tuning on the labelled images; distilled: the others too, unlabelled
            transfer = config["transfer"]
            epochs = transfer["prune_alone_epochs"] if point is None else transfer["prune_epochs"]
            dm = _data(
                context,
                transfer["labelled_images"],
                seed,
                config["batch_size"],
                point is not None,
                config.get("teacher_train_images"),
            )
        else:
            epochs = spec["prune_epochs"]
            dm = _data(context, config.get("teacher_train_images"), seed, config["batch_size"])
        model = _model(spec, seed)
        model.load_state_dict(dense_model(seed)["state"])
        callbacks: list = [GradualPruning(amount=spec["amount"], start=0.0, end=0.6)]
        if point is not None:
            callbacks.append(KnowledgeDistillation("self", temperature=point[0], alpha=point[1]))
        pl.seed_everything(seed, verbose=False)
        out = _evaluate(model, dm, _fit(model, dm, epochs, callbacks))
        weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
        sparsity.append(sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights))
        return out

    label = f"pruned {spec['amount']:.0%}"
    result = _compare(config, label, run, lambda seed: dense_model(seed)["test_accuracy"], log)
    params = sum(p.numel() for p in _model(spec, 0).net.parameters())
    return {**result, "sparsity": _summary(sparsity), "params": params}


def _images(report: dict) -> str:
    return f"{report['students']['train_images']:,}"


def _pct(summary: dict) -> str:
    return f"{100 * summary['mean']:.2f} ± {100 * summary['std']:.2f}"


def _row(name: str, params: int, r: dict) -> str:
    return (
        f"| {name} | {params:,} | {_pct(r['reference'])} | {_pct(r['alone'])} | {_pct(r['gap'])} | "
        f"{_pct(r['default'])} | {_pct(r['default_recovered'])} % | {r['best']['point']} | {_pct(r['best'])} | "
        f"{_pct(r['best_recovered'])} % | {r['step_time_ratio_distilled_vs_alone']:.2f}x |"
    )


def markdown(report: dict) -> str:
    config, students = report["config"], report["students"]
    teacher, pruning = students["teacher"], report["pruning"]
    cfg = config["pruning"]
    default = f"T={config['default']['temperature']:g} α={config['default']['alpha']:g}"
    header = (
        f"| {{model}} | params | {{reference}} | alone | gap | distilled, {default} | gap recovered | best grid "
        "point | distilled, best | gap recovered | step time distilled / alone |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [
        "Test accuracy in %, mean ± standard deviation over seeds "
        + ", ".join(map(str, config["seeds"]))
        + ". Gap recovered = (distilled − alone) / (reference − alone), per seed, then averaged. "
        "The grid (T in "
        f"{config['grid']['temperature']} × alpha in {config['grid']['alpha']}) is searched on the first seed by "
        f"validation accuracy ({students['val_images']:,} held-out training images); its best point then runs on "
        "every seed.",
        "",
        "## Students alone vs distilled from a residual CNN",
        "",
        f"Teacher (the reference): residual CNN, widths {config['teacher']['arch_kwargs']['widths']} "
        f"({teacher['params']:,} parameters), {config['teacher']['epochs']} epochs on {_images(report)} training "
        f"images: **{100 * teacher['test_accuracy']:.2f}%**; it runs in `teacher_precision="
        f"{config['teacher_precision']!r}` during distillation. Students: the first "
        f"{config['student_train_images']:,} training images (a subsample, to keep the run short), "
        f"up to {config['student_epochs']} epochs, Adam with cosine decay, batch {config['batch_size']}; every run "
        "(alone or distilled) validates after each epoch and keeps its best epoch by validation accuracy, so a "
        "student that overfits the small set alone is judged at its best, not its last, epoch.",
        "",
    ]
    transfer = config.get("transfer")
    if transfer:
        lines += [
            f"**Distilled runs with a transfer set**: they train on all {_images(report)} training images, of which "
            f"only the first {config['student_train_images']:,} keep their labels (the cross-entropy sees those; "
            f"the distillation term sees every image), for up to {transfer['student_epochs']} epochs. The runs "
            f"alone train on the {config['student_train_images']:,} labelled images as above.",
            "",
        ]
    lines.append(header.format(model="student", reference="teacher"))
    for name, s in students["students"].items():
        lines.append(_row(name, s["params"], s))
    lines += [
        "",
        f"## Pruning recovery: GradualPruning to {cfg['amount']:.0%} with and without self-distillation",
        "",
        f"{cfg['arch']} trained densely (the reference) for {cfg['dense_epochs']} epochs on {_images(report)} "
        f"training images, then fine-tuned {cfg['prune_epochs']} epochs while `GradualPruning` (unstructured, "
        f"per layer, AGP from 0 to {cfg['amount']:.0%} between 0 and 0.6 of training) prunes it; measured sparsity "
        f"of the Linear weights {_pct(pruning['sparsity'])} %. Distilled: `KnowledgeDistillation(teacher='self')`, "
        "the teacher being the dense model.",
        "",
    ]
    if transfer:
        lines += [
            f"**With a transfer set**: the fine-tuning has {transfer['labelled_images']:,} labelled images; alone it "
            f"runs {transfer['prune_alone_epochs']} epochs on them, distilled {transfer['prune_epochs']} epochs on "
            f"all {_images(report)} images, the others unlabelled (the epoch counts above do not apply).",
            "",
        ]
    lines += [
        header.format(model="model", reference="dense"),
        _row(f"{cfg['arch']}, {cfg['amount']:.0%} pruned", pruning["params"], pruning),
    ]
    return "\n".join(lines)


def run(settings: Settings, context: Context) -> Result:
    config = settings.config()
    torch.set_num_threads(settings.threads)
    log: list[str] = []
    students = run_students(config, log, context)
    pruning = run_pruning(config, log, context)
    report = {"config": config, "students": students, "pruning": pruning, "log": log}
    return Result(report, markdown(report))
