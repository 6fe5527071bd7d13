"""Cost of one GradualPruning mask update against one training step, on a torchvision-style ResNet-18.

ResNet-18 (BasicBlock, BatchNorm, 4 stages, 11.2M parameters, ImageNet stem) on 3x32x32 inputs, batch 32,
SGD with momentum, synthetic data (only time is measured). For every mode and criterion one short fit runs
with mask updates at known steps; the update is timed around the callback's decision (scoring, ranking, the
masks, applying them, the logged statistics) and the step time is the median of the steps without an update.
One update per configuration is also profiled with cProfile (the functions with the most own time).

Configuration ``pruning_update_cost`` (``python -m benchmarks run pruning_update_cost``); its table also shows the
stored ``pruning_update_cost_before`` result of an earlier version, as the columns ``..._before``.
"""

from __future__ import annotations

import cProfile
import io
import json
import pstats
import statistics
import time
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.common import RESULTS, Context, Result, StepTimer, check_known, markdown_table
from lightning_compress import GradualPruning

TITLE = "Cost of one GradualPruning mask update against one training step (ResNet-18)"


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet18(nn.Module):
    """torchvision's ``resnet18`` layout: 7x7 stem, max-pool, stages of 64/128/256/512 channels, 2 blocks each."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        layers, inplanes = [], 64
        for i, planes in enumerate((64, 128, 256, 512)):
            stride = 1 if i == 0 else 2
            layers.append(nn.Sequential(BasicBlock(inplanes, planes, stride), BasicBlock(planes, planes)))
            inplanes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class Classifier(pl.LightningModule):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.net = ResNet18()
        self.example_input_array = torch.zeros(1, 3, size, size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


class UpdateClock:
    """Times the pruning callback's batch-start hook, where mask updates happen, from two callbacks around it.

    Listed just before and just after the pruning callback, ``before`` and ``after`` bracket its hook; a step
    counts as an update when the callback holds a new set of masks afterwards. The update at ``profile_step``
    runs under cProfile and is left out of the timings when there are others.
    """

    def __init__(self, pruning: GradualPruning, profile_step: int) -> None:
        self.pruning, self.profile_step = pruning, profile_step
        self.times: dict[int, float] = {}
        self.profile: list[dict[str, Any]] = []
        self._begin = 0.0
        self._masks: Any = None
        self._profiler: cProfile.Profile | None = None
        clock = self

        class Before(Callback):
            def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
                clock._masks = clock.pruning.masks
                if trainer.global_step == clock.profile_step:
                    clock._profiler = cProfile.Profile()
                    clock._profiler.enable()
                clock._begin = time.perf_counter()

        class After(Callback):
            def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
                elapsed = time.perf_counter() - clock._begin
                if clock._profiler is not None:
                    clock._profiler.disable()
                    clock.profile = _top(clock._profiler)
                    clock._profiler = None
                if clock.pruning.masks is not clock._masks:
                    clock.times[trainer.global_step] = elapsed

        self.before, self.after = Before(), After()

    @property
    def update_times(self) -> list[float]:
        timed = [t for step, t in self.times.items() if step != self.profile_step]
        return timed or list(self.times.values())


def _top(profiler: cProfile.Profile, n: int = 8) -> list[dict[str, Any]]:
    """The ``n`` functions with the most own time."""
    stats = pstats.Stats(profiler, stream=io.StringIO())
    rows = [
        {"function": f"{file.split('/')[-1]}:{line}({func})", "calls": calls, "own_s": own, "cum_s": cum}
        for (file, line, func), (_, calls, own, cum, _) in stats.stats.items()  # type: ignore[attr-defined]
    ]
    return sorted(rows, key=lambda r: -r["own_s"])[:n]


CASES: list[dict[str, Any]] = [
    {"mode": "unstructured", "criterion": "l1", "scope": "layer"},
    {"mode": "unstructured", "criterion": "l1", "scope": "global"},
    {"mode": "unstructured", "criterion": "random", "scope": "layer"},
    {"mode": "2:4", "criterion": "l1", "scope": "layer"},
    {"mode": "structured", "criterion": "l1", "scope": "layer"},
    {"mode": "structured", "criterion": "l2", "scope": "global"},
    {"mode": "structured", "criterion": "bn_scale", "scope": "layer"},
    {"mode": "structured", "criterion": "taylor", "scope": "layer"},
]


def _label(config: dict[str, Any]) -> str:
    return config["mode"] + ("" if config["mode"] == "2:4" else f" {config['criterion']} {config['scope']}")


LABELS = tuple(_label(config) for config in CASES)


@dataclass(frozen=True)
class Settings:
    """The full run's settings."""

    size: int = 32  # input height and width
    steps: int = 16  # optimizer steps per fit
    batch: int = 32
    threads: int = 2
    configs: tuple[str, ...] = LABELS  # which modes/criteria/scopes to time
    baseline: str | None = None  # a stored result of an earlier version to show beside this one

    def __post_init__(self) -> None:
        check_known(self.configs, LABELS, "configs")
        if self.steps < 14:
            raise ValueError(f"`steps={self.steps}`: the updates run at steps 4 to 12; use 14 or more.")


QUICK = {
    "configs": ("unstructured l1 layer", "structured l1 layer"),
    "baseline": None,
    "steps": 14,
    "batch": 8,
    "threads": 1,
}


def measure(config: dict[str, Any], size: int, steps: int, batch: int) -> dict[str, Any]:
    pl.seed_everything(0, verbose=False)
    x = torch.randn(steps * batch, 3, size, size)
    y = torch.randint(0, 10, (steps * batch,))
    loader = DataLoader(TensorDataset(x, y), batch_size=batch)
    model = Classifier(size)
    kwargs: dict[str, Any] = {
        "mode": config["mode"],
        "criterion": config["criterion"],
        "scope": config["scope"],
    }
    if config["mode"] != "2:4":
        kwargs.update(
            amount=0.5 if config["mode"] == "structured" else 0.9, start="step:4", end="step:12", frequency=2
        )
    else:
        # The stem's 3 input channels cannot hold groups of 4.
        kwargs.update(start="step:4", exclude="net.conv1")
    pruning = GradualPruning(**kwargs)
    # The second update (the first may warm caches); N:M decides once, at `start`.
    clock = UpdateClock(pruning, profile_step=4 if config["mode"] == "2:4" else 6)
    timer = StepTimer()
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[timer, clock.before, pruning, clock.after],
    )
    trainer.fit(model, train_dataloaders=loader)
    # timer.times[i] is the interval from the start of batch i to that of batch i + 1: the step taken at
    # global step i, including any update that ran at its start.
    plain = [t for i, t in enumerate(timer.times) if i >= 2 and i not in clock.times]
    step = statistics.median(plain)
    update = statistics.median(clock.update_times)
    return {
        "config": _label(config),
        **config,
        "updates": len(clock.update_times),
        "step_ms": 1000 * step,
        "update_ms": 1000 * update,
        "update_max_ms": 1000 * max(clock.update_times),
        "ratio": update / step,
        "profile": clock.profile,
    }


def run(args: Settings, context: Context) -> Result:
    torch.set_num_threads(args.threads)
    rows = []
    for config in CASES:
        if _label(config) not in args.configs:
            continue
        row = measure(config, args.size, args.steps, args.batch)
        print(
            f"{row['config']}: step {row['step_ms']:.0f} ms, update {row['update_ms']:.0f} ms, ratio {row['ratio']:.2f}"
        )
        rows.append(row)
    before = {}
    if args.baseline is not None:
        before = {r["config"]: r for r in json.loads((RESULTS / f"{args.baseline}.json").read_text())["rows"]}
    for row in rows:
        if row["config"] in before:
            row["ratio_before"] = before[row["config"]]["ratio"]
            row["update_ms_before"] = before[row["config"]]["update_ms"]
    payload = {
        "model": f"ResNet-18 (torchvision layout), input 3x{args.size}x{args.size}, batch {args.batch}",
        "rows": rows,
    }
    columns = ["config", "updates", "step_ms", "update_ms", "ratio"]
    if before:
        columns = ["config", "updates", "step_ms", "update_ms_before", "ratio_before", "update_ms", "ratio"]
    table = markdown_table(rows, columns)
    table += (
        f"\n\n`ratio` = one mask update / one training step (medians), in the same fit; ResNet-18 on "
        f"3x{args.size}x{args.size} inputs, batch {args.batch}, {args.threads} torch thread(s)."
    )
    if before:
        table += (
            f" The `..._before` columns are the stored result `{args.baseline}` of an earlier version, measured in "
            "another run: compare its ratio, not its milliseconds."
        )
    return Result(payload, table)
