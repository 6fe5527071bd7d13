"""What each compression callback costs while training: step time and peak memory against plain training.

One model for every case: the residual CNN of ``examples/models.py`` (stem, three residual stages with batch norm,
global pooling, linear head) on 1x28x28 inputs, Adam, one epoch of ``steps`` steps on synthetic images (only
time and memory are measured), a CSV logger as a user would have. Cases: plain training; ``GradualPruning``
unstructured and structured (``amount=0.5``, default schedule: a mask update at every step up to 70 % of the fit
for this short fit); ``QuantizationAwareTraining()`` (int8, fake quantization from the first step);
``LowRankReplacement(rank=0.5)``; ``KnowledgeDistillation(teacher="self")``; ``WeightSharing()``;
``CompressionMonitor()``. Every case uses the callback's default arguments except where named here.

Each case runs in a fresh Python process, so its peak resident memory (``VmHWM``) is its own. The process
reports the resident memory before the fit (after imports, model and data) and the peak after it; the step
time is the median (and the mean, which includes occasional work such as mask updates) of the wall time between
consecutive steps (``benchmarks.common.StepTimer``: forward, backward, optimizer and every callback's hooks),
the first 10 steps skipped. The cases run side by side in rounds (the order rotated every round); a case's ratio
to plain training is taken within each round and the median over rounds is reported, with its range.

Configuration ``overhead`` (``python -m benchmarks run overhead``: 3 rounds of 30 steps, widths 8-16-32, batch 32,
1 thread). Each case's process is ``python -m benchmarks.overhead '<case settings as JSON>'``.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import Context, Result, markdown_table

CASES = (
    "plain",
    "pruning_unstructured",
    "pruning_structured",
    "qat_int8",
    "low_rank",
    "distillation_self",
    "weight_sharing",
    "monitor",
)
LABELS = {
    "plain": "plain training",
    "pruning_unstructured": 'GradualPruning(amount=0.5, mode="unstructured")',
    "pruning_structured": 'GradualPruning(amount=0.5, mode="structured")',
    "qat_int8": "QuantizationAwareTraining() (int8)",
    "low_rank": "LowRankReplacement(rank=0.5)",
    "distillation_self": 'KnowledgeDistillation(teacher="self")',
    "weight_sharing": "WeightSharing() (5 bits)",
    "monitor": "CompressionMonitor()",
}
TITLE = "What each compression callback costs while training: step time and peak memory"
SKIPPED_STEPS = 10  # StepTimer.median_ms skips as many: allocator and first-call warm-up


@dataclass(frozen=True)
class Settings:
    """The full run's settings."""

    rounds: int = 3  # rounds of all cases, the order rotated every round
    steps: int = 30  # steps per fit
    batch: int = 32
    widths: tuple[int, ...] = (8, 16, 32)  # channels of the three stages
    threads: int = 1  # torch threads of each case's process
    cases: tuple[str, ...] = CASES

    def __post_init__(self) -> None:
        unknown = set(self.cases) - set(CASES)
        if unknown or "plain" not in self.cases:
            raise ValueError(
                f"`cases={self.cases}`: use some of {CASES}, 'plain' (the reference) among them."
            )


QUICK = {"rounds": 1, "steps": 15}


def _callbacks(case: str) -> list[Any]:
    from lightning_compress import (
        CompressionMonitor,
        GradualPruning,
        KnowledgeDistillation,
        LowRankReplacement,
        QuantizationAwareTraining,
        WeightSharing,
    )

    return {
        "plain": [],
        "pruning_unstructured": [GradualPruning(amount=0.5, mode="unstructured")],
        "pruning_structured": [GradualPruning(amount=0.5, mode="structured")],
        "qat_int8": [QuantizationAwareTraining()],
        "low_rank": [LowRankReplacement(rank=0.5, verbose=False)],
        "distillation_self": [KnowledgeDistillation(teacher="self")],
        "weight_sharing": [WeightSharing()],
        "monitor": [CompressionMonitor(verbose=False)],
    }[case]


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mib() -> float:
    # The high-water mark of this process image: `ru_maxrss` would start from the parent's peak (kept over exec).
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("VmHWM not found in /proc/self/status")


def run_case(case: str, steps: int, batch: int, widths: tuple[int, ...], threads: int) -> dict[str, Any]:
    """One fit of ``case`` in this process; the numbers a worker prints."""
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.loggers import CSVLogger
    from torch.utils.data import DataLoader, TensorDataset

    from benchmarks.common import StepTimer
    from examples.models import ImageClassifier

    torch.set_num_threads(threads)
    pl.seed_everything(0, verbose=False)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(steps * batch, 1, 28, 28, generator=generator)
    y = torch.randint(0, 10, (steps * batch,), generator=generator)
    loader = DataLoader(TensorDataset(x, y), batch_size=batch)
    model = ImageClassifier("residual_cnn", input_shape=(1, 28, 28), arch_kwargs={"widths": widths})
    callbacks = _callbacks(case)
    timer = StepTimer()
    start_rss = _rss_mib()
    start_peak = _peak_rss_mib()
    with tempfile.TemporaryDirectory() as logs:
        trainer = pl.Trainer(
            max_epochs=1,
            accelerator="cpu",
            devices=1,
            logger=CSVLogger(logs),
            log_every_n_steps=10,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            callbacks=[timer, *callbacks],
        )
        began = time.perf_counter()
        trainer.fit(model, train_dataloaders=loader)
        fit_s = time.perf_counter() - began
    timed = timer.times[SKIPPED_STEPS:] or timer.times
    return {
        "case": case,
        "steps": trainer.global_step,
        "median_ms": timer.median_ms,
        "mean_ms": 1000 * statistics.mean(timed),
        "fit_s": fit_s,
        "rss_before_fit_mib": start_rss,
        "peak_before_fit_mib": start_peak,
        "peak_rss_mib": _peak_rss_mib(),
        "params_after": sum(p.numel() for p in model.parameters()),
    }


def _worker(case: str, args: Settings) -> dict[str, Any]:
    job = {
        "case": case,
        "steps": args.steps,
        "batch": args.batch,
        "widths": args.widths,
        "threads": args.threads,
    }
    command = [sys.executable, "-m", "benchmarks.overhead", json.dumps(job)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONWARNINGS="ignore")
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=Path(__file__).parents[1])
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"case {case} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(lines[-1])


def _summary(rounds: list[dict[str, dict[str, Any]]], cases: tuple[str, ...]) -> list[dict[str, Any]]:
    rows = []
    for case in cases:
        runs = [r[case] for r in rounds]
        plain = [r["plain"] for r in rounds]
        ratios = [m["median_ms"] / p["median_ms"] for m, p in zip(runs, plain, strict=True)]
        mean_ratios = [m["mean_ms"] / p["mean_ms"] for m, p in zip(runs, plain, strict=True)]
        extra = [m["peak_rss_mib"] - p["peak_rss_mib"] for m, p in zip(runs, plain, strict=True)]
        growth = [m["peak_rss_mib"] - m["rss_before_fit_mib"] for m in runs]
        rows.append(
            {
                "case": LABELS[case],
                "key": case,
                "step_ms": statistics.median(r["median_ms"] for r in runs),
                "step_ratio": statistics.median(ratios),
                "step_ratio_range": f"{min(ratios):.2f}-{max(ratios):.2f}",
                "mean_step_ms": statistics.median(r["mean_ms"] for r in runs),
                "mean_step_ratio": statistics.median(mean_ratios),
                "fit_s": statistics.median(r["fit_s"] for r in runs),
                "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in runs),
                "peak_vs_plain_mib": statistics.median(extra),
                "fit_growth_mib": statistics.median(growth),
                "params_after": runs[0]["params_after"],
            }
        )
    return rows


def run(args: Settings, context: Context) -> Result:
    began = time.perf_counter()
    cases = ("plain", *(c for c in args.cases if c != "plain"))
    rounds: list[dict[str, dict[str, Any]]] = []
    for i in range(args.rounds):
        order = cases[i % len(cases) :] + cases[: i % len(cases)]
        results = {}
        for case in order:
            results[case] = _worker(case, args)
            print(
                f"round {i + 1}/{args.rounds} {case}: {results[case]['median_ms']:.1f} ms/step, "
                f"peak {results[case]['peak_rss_mib']:.0f} MiB",
                flush=True,
            )
        rounds.append(results)
    rows = _summary(rounds, cases)
    payload = {
        "model": f"residual_cnn widths {args.widths}, input 1x28x28, batch {args.batch}, Adam, synthetic data",
        "load_average_at_end": os.getloadavg(),
        "wall_s": time.perf_counter() - began,
        "rows": rows,
        "runs": rounds,
    }
    table = markdown_table(
        rows,
        [
            "case",
            "step_ms",
            "step_ratio",
            "step_ratio_range",
            "mean_step_ratio",
            "peak_rss_mib",
            "peak_vs_plain_mib",
            "fit_growth_mib",
            "fit_s",
        ],
    )
    table += (
        f"\n\n`step_ratio`: median step time / plain training's, within each of {args.rounds} round(s), median "
        "(range) over rounds; `mean_step_ratio` the same with mean step times (mask updates, clustering and "
        "other occasional work included). `peak_rss_mib`: peak resident memory of the process (imports "
        "included); `peak_vs_plain_mib`: its excess over plain training's; `fit_growth_mib`: peak minus the "
        f"resident memory just before `fit`. {args.steps} steps per fit, batch {args.batch}, widths "
        f"{'-'.join(map(str, args.widths))}, {args.threads} torch thread(s), load average at the end "
        f"{os.getloadavg()[0]:.1f} (a shared machine)."
    )
    return Result(payload, table)


if __name__ == "__main__":
    job = json.loads(sys.argv[1])
    print(json.dumps(run_case(job["case"], job["steps"], job["batch"], tuple(job["widths"]), job["threads"])))
