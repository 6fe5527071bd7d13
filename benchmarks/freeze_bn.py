"""Freezing batch norm during training with Adam: what happens to the loss, and why (docs/quantization.md).

Model: a resnet18-style network (BasicBlock, 4 stages of two blocks, widths 16-32-64-128, 20 batch norms) on
scikit-learn's digits upsampled (bilinear) to 32x32; Adam 1e-3, batch 64, ``steps`` steps (160), seeded, the
same initial weights and the same batches in every run.

Table 1, three runs side by side:

- ``int8 QAT, freeze_bn``: ``QuantizationAwareTraining(start=0.5, freeze_bn=0.8)``: fake quantization from step
  80, batch norm frozen (running statistics used while training) from step 128;
- ``float, BN eval()``: no quantization; every batch norm switched to ``eval()`` from step 128;
- ``int8 QAT, no freeze_bn``: the first run without ``freeze_bn``.

Reported: the loss of the first step with frozen statistics ("at the freeze", step 128), the losses of the steps
after it, and the validation accuracy at the end of training.

Table 2: from the float run's model and Adam state at step 128, ``after`` (12) more steps on the same batches,
in plain torch, with batch statistics or with frozen ones, and with several optimizers. Reported: the losses and
the largest ``|batch mean - running mean| / sqrt(running var + eps)`` over every channel of every batch-norm
input, measured on each step's batch before its update (largest over the steps). The "frozen, Adam 1e-3, state
carried on" row repeats the float run's steps 128-139: its losses are checked against that run's.

Configuration ``freeze_bn`` (``python -m benchmarks run freeze_bn``: 160 steps, about 10 minutes on 2 shared cores).
"""

from __future__ import annotations

import copy
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from benchmarks.common import Context, Result, markdown_table
from examples.data import DigitsDataModule
from examples.models import ResidualBlock
from lightning_compress.quantization import QuantizationAwareTraining

TITLE = "Freezing batch norm during QAT with Adam: the loss after the freeze, and why"


@dataclass(frozen=True)
class Settings:
    """The full run's settings."""

    steps: int = 160  # training steps (batch 64)
    start: float = 0.5  # QAT start, fraction of training
    freeze: float = 0.8  # freeze_bn, fraction of training
    after: int = 12  # steps from the float checkpoint (table 2)
    seed: int = 0
    threads: int = 1  # torch threads (1: robust on a shared machine)

    def __post_init__(self) -> None:
        if int(self.freeze * self.steps) + self.after > self.steps:
            raise ValueError(
                f"`after={self.after}` steps from step {int(self.freeze * self.steps)} go past `steps={self.steps}`."
            )


QUICK = {"steps": 20, "after": 3}


def resnet18_style(
    in_channels: int = 1, num_classes: int = 10, widths: Sequence[int] = (16, 32, 64, 128)
) -> nn.Sequential:
    """ResNet-18's layout (a 3x3 stem, 4 stages of two basic blocks, stride 2 from stage 2) at small widths."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False),
        nn.BatchNorm2d(widths[0]),
        nn.ReLU(),
    ]
    previous = widths[0]
    for i, width in enumerate(widths):
        layers.append(ResidualBlock(previous, width, stride=1 if i == 0 else 2))
        layers.append(ResidualBlock(width, width))
        previous = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(previous, num_classes)]
    return nn.Sequential(*layers)


class Classifier(pl.LightningModule):
    """Cross-entropy on :func:`resnet18_style`, Adam at ``lr``; logs the validation accuracy."""

    def __init__(self, lr: float = 1e-3) -> None:
        super().__init__()
        self.lr = lr
        self.net = resnet18_style()
        self.example_input_array = torch.zeros(1, 1, 32, 32)
        self.val_acc = MulticlassAccuracy(10, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.val_acc(self(x), y)
        self.log("val_acc", self.val_acc)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class Digits32(DigitsDataModule):
    """The digits data module with its 8x8 images upsampled (bilinear) to 32x32."""

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "train_set"):
            return
        super().setup(stage)
        for name in ("train_set", "val_set", "test_set"):
            x, y = getattr(self, name).tensors
            x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
            setattr(self, name, TensorDataset(x, y))


class Record(Callback):
    """Each step's training loss; optionally the model and optimizer at step ``keep_at`` and later batches."""

    def __init__(self, keep_at: int | None = None, keep_batches: int = 0) -> None:
        self.losses: list[float] = []
        self.keep_at = keep_at
        self.keep_batches = keep_batches
        self.checkpoint: dict[str, Any] = {}
        self.batches: list[tuple[torch.Tensor, torch.Tensor]] = []

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.keep_at is None:
            return
        if trainer.global_step == self.keep_at:
            self.checkpoint = {
                "net": copy.deepcopy(pl_module.net.state_dict()),
                "adam": copy.deepcopy(trainer.optimizers[0].state_dict()),
            }
        if self.keep_at <= trainer.global_step < self.keep_at + self.keep_batches:
            self.batches.append((batch[0].clone(), batch[1].clone()))

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.losses.append(float(outputs["loss"]))


class BatchNormEval(Callback):
    """Switches every batch norm to ``eval()`` (running statistics, no updates) from step ``at`` on.

    Runs at every step: Lightning puts the model back in training mode after each validation.
    """

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step >= self.at:
            for module in pl_module.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.eval()


def _fit(
    seed: int, steps: int, dm: Digits32, callbacks: list[Callback]
) -> tuple[Classifier, pl.Trainer, float]:
    pl.seed_everything(seed, verbose=False)
    model = Classifier()
    batches_per_epoch = len(dm.train_dataloader())
    trainer = pl.Trainer(
        max_steps=steps,
        max_epochs=-(-steps // batches_per_epoch),
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )
    began = time.perf_counter()
    with warnings.catch_warnings():
        # The callback warns about freeze_bn with Adam at 1e-3: that combination is what is measured here.
        warnings.filterwarnings("ignore", message=".*freeze_bn=.*")
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        trainer.fit(model, datamodule=dm)
    return model, trainer, time.perf_counter() - began


def _largest_shift(net: nn.Module, x: torch.Tensor) -> float:
    """Largest |batch mean - running mean| / sqrt(running var + eps) over the channels of every batch-norm input."""
    largest = [0.0]

    def hook(bn: nn.BatchNorm2d, inputs: tuple[torch.Tensor, ...]) -> None:
        mean = inputs[0].detach().mean(dim=(0, 2, 3))
        std = (bn.running_var + bn.eps).sqrt()
        largest[0] = max(largest[0], float(((mean - bn.running_mean).abs() / std).max()))

    handles = [m.register_forward_pre_hook(hook) for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    try:
        with torch.no_grad():
            mode = [m.training for m in net.modules()]
            net.eval()  # no running-statistics update from this measurement
            net(x)
            for module, training in zip(net.modules(), mode, strict=True):
                module.training = training
    finally:
        for handle in handles:
            handle.remove()
    return largest[0]


def _continue(
    checkpoint: dict[str, Any],
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    frozen: bool,
    optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
    carry_adam_state: bool,
) -> dict[str, Any]:
    net = resnet18_style()
    net.load_state_dict(checkpoint["net"])
    net.train()
    if frozen:
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eval()
    opt = optimizer(list(net.parameters()))
    if carry_adam_state:
        lr = opt.param_groups[0]["lr"]
        # A copy: `load_state_dict` keeps the given tensors, which the steps then update in place.
        opt.load_state_dict(copy.deepcopy(checkpoint["adam"]))
        for group in opt.param_groups:
            group["lr"] = lr
    losses, shifts = [], []
    for x, y in batches:
        shifts.append(_largest_shift(net, x))
        opt.zero_grad()
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return {"losses": losses, "shifts": shifts, "largest_shift": max(shifts)}


def _losses_text(losses: list[float]) -> str:
    return ", ".join(f"{v:.3g}" for v in losses)


def run(args: Settings, context: Context) -> Result:
    torch.set_num_threads(args.threads)
    freeze_step = int(args.freeze * args.steps)

    dm = Digits32(batch_size=64, seed=args.seed)
    dm.setup("fit")

    runs: dict[str, dict[str, Any]] = {}
    float_record = Record(keep_at=freeze_step, keep_batches=args.after)
    specs: list[tuple[str, list[Callback], Record]] = []
    # Explicit steps: the fake quantization and the freeze start at exactly the steps the tables name.
    start, freeze = f"step:{int(args.start * args.steps)}", f"step:{freeze_step}"
    for name, freeze_bn in (("int8 QAT, freeze_bn", freeze), ("int8 QAT, no freeze_bn", None)):
        record = Record()
        qat = QuantizationAwareTraining(module="net", start=start, freeze_bn=freeze_bn, finalize=False)
        specs.append((name, [qat, record], record))
    specs.insert(1, ("float, BN eval()", [BatchNormEval(freeze_step), float_record], float_record))
    for name, callbacks, record in specs:
        _, trainer, seconds = _fit(args.seed, args.steps, dm, callbacks)
        assert trainer.global_step == args.steps and len(record.losses) == args.steps
        runs[name] = {
            "loss_at_freeze": record.losses[freeze_step],
            "losses_from_freeze": record.losses[freeze_step:],
            "loss_before_freeze": record.losses[freeze_step - 1],
            "val_acc": float(trainer.callback_metrics["val_acc"]),
            "seconds": seconds,
        }
        print(f"{name}: {seconds:.0f} s, val_acc {runs[name]['val_acc']:.3f}", flush=True)

    checkpoint, batches = float_record.checkpoint, float_record.batches
    running_var = torch.cat([v for k, v in checkpoint["net"].items() if k.endswith("running_var")])
    statistics_at_freeze = {
        "smallest_running_var": float(running_var.min()),
        "median_running_var": float(running_var.median()),
        "batch_norms": sum(k.endswith("running_var") for k in checkpoint["net"]),
    }

    def adam(lr: float) -> Callable[[list[nn.Parameter]], torch.optim.Optimizer]:
        return lambda params: torch.optim.Adam(params, lr=lr)

    variants = (
        ("batch statistics, Adam 1e-3 (no freeze, state carried on)", False, adam(1e-3), True),
        ("frozen, Adam 1e-3 (state carried on)", True, adam(1e-3), True),
        ("frozen, Adam 1e-3 (fresh state)", True, adam(1e-3), False),
        ("frozen, Adam 1e-4 (fresh state)", True, adam(1e-4), False),
        ("frozen, Adam 1e-4 (state carried on, lr lowered 10x)", True, adam(1e-4), True),
        (
            "frozen, SGD 1e-3, momentum 0.9 (fresh)",
            True,
            lambda params: torch.optim.SGD(params, lr=1e-3, momentum=0.9),
            False,
        ),
    )
    continued = {
        name: _continue(checkpoint, batches, frozen, make, carry) for name, frozen, make, carry in variants
    }
    # The carried-on frozen Adam run is the float run's own steps, replayed outside Lightning.
    replay = continued["frozen, Adam 1e-3 (state carried on)"]["losses"]
    lightning_losses = runs["float, BN eval()"]["losses_from_freeze"][: args.after]
    replay_max_abs_diff = max(abs(a - b) for a, b in zip(replay, lightning_losses, strict=True))
    if replay_max_abs_diff > 1e-4:
        raise RuntimeError(
            f"Table 2 does not replay the float run: its losses differ by {replay_max_abs_diff:.3g} from step "
            f"{freeze_step} on, so the checkpoint or the batches captured are not the run's."
        )

    rows1 = [
        {
            "run (same seed)": name,
            "loss before the freeze": run["loss_before_freeze"],
            "loss at the freeze": run["loss_at_freeze"],
            "next losses": _losses_text(run["losses_from_freeze"][1:7]),
            "max loss after": max(run["losses_from_freeze"][1:]),
            "val_acc at the end": run["val_acc"],
        }
        for name, run in runs.items()
    ]
    rows2 = [
        {
            f"from step {freeze_step}, {args.after} steps": name,
            "losses": _losses_text(result["losses"]),
            "largest shift (running std)": result["largest_shift"],
        }
        for name, result in continued.items()
    ]
    lines = [
        f"Table 1: {args.steps} steps, fake quantization from step {int(args.start * args.steps)}, "
        f"batch norm frozen / eval() from step {freeze_step}. 'next losses': the {min(6, args.steps - freeze_step - 1)} "
        "steps after the freeze; 'max loss after': the largest loss of every later step.",
        markdown_table(rows1, list(rows1[0])),
        f"Table 2: from the float run at step {freeze_step}, the same {args.after} batches. Largest shift: the "
        "largest |batch mean - running mean| / sqrt(running var + eps) of any channel of any batch-norm input, "
        "on each step's batch before its update, largest over the steps.",
        markdown_table(rows2, list(rows2[0])),
        f"Running statistics at step {freeze_step} ({statistics_at_freeze['batch_norms']} batch norms): smallest "
        f"running variance {statistics_at_freeze['smallest_running_var']:.3g}, median "
        f"{statistics_at_freeze['median_running_var']:.3g}. Replay check: the carried-on frozen Adam 1e-3 losses "
        f"differ from the float run's own by at most {replay_max_abs_diff:.2g}.",
        f"Settings: digits upsampled to 32x32, batch 64, Adam 1e-3, seed {args.seed}, {args.threads} thread(s); "
        f"run times: " + ", ".join(f"{n} {r['seconds']:.0f} s" for n, r in runs.items()) + ".",
    ]
    payload = {
        "freeze_step": freeze_step,
        "table1": runs,
        "table2": continued,
        "statistics_at_freeze": statistics_at_freeze,
        "replay_max_abs_diff": replay_max_abs_diff,
        "median_run_seconds": statistics.median(r["seconds"] for r in runs.values()),
    }
    return Result(payload, "\n\n".join(lines))
