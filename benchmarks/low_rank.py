"""Low-rank benchmark on Fashion-MNIST: LowRankReplacement on LeNet-300-100 and a residual CNN.

A dense model is trained, then fine-tuned the same number of epochs from those weights: as is (dense), and
factorized by ``LowRankReplacement(budget=0.5)`` / ``budget=0.25`` (2x and 4x fewer parameters in the factorized
layers; data-aware whitening from the training loader). For the CNN, a 4x budget on MACs is run as well, since there
parameters and MACs sit in different layers, and so is every residual-block convolution at a third and at a quarter
of its ranks. Every fit (pretraining and each fine-tuning) decays its learning rate to zero on a cosine, so each
model is compared at the end of a converged fit, not at one noisy step. Reported: test accuracy right after the
factorization and after fine-tuning, whole-model parameter and MAC ratios, and the CPU latency ratio measured side
by side (median of interleaved repeats) at batch 1 and at a large batch, in up to three forms: eager as trained,
eager with the batch norms folded into the convolutions, and compiled by inductor with weight freezing. Training
and timing use ``threads`` torch threads (1 by default: on a shared machine, a second thread mostly waits for a core
and the timings measure the neighbours).

With ``minilm`` (settings of :mod:`benchmarks.low_rank_minilm`) the run also measures all-MiniLM-L6-v2, as the
published ``low_rank`` result did.

Configurations ``low_rank_fashion`` (about 38 minutes on 2 idle cores) and ``low_rank``
(``python -m benchmarks run low_rank_fashion``; needs ``apt-get install -y dataset-fashion-mnist``).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.fx.experimental.optimization import fuse

from benchmarks import low_rank_minilm
from benchmarks.common import (
    Context,
    CosineClassifier,
    Result,
    check_known,
    fit,
    image_data,
    markdown_table,
    test_accuracy,
)
from lightning_compress import LowRankReplacement
from lightning_compress.quantization import compile_for_cpu
from lightning_compress.stats import compare_latency, count_macs, count_parameters

TITLE = "Low-rank factorization on Fashion-MNIST: dense vs LowRankReplacement, fine-tuned alike"
FORMS = ("eager", "folded", "compiled")


@dataclass(frozen=True)
class Settings:
    """The full run's settings.

    ``budgets`` apply to both models, ``cnn_budgets`` to the CNN only (``(on, fraction)``: ``budget_on`` and
    ``budget`` of ``LowRankReplacement``); ``cnn_conv_ranks`` runs every residual-block convolution at ``1/k`` of
    its ranks for each ``k``.
    """

    lenet_pretrain: int = 5
    lenet_finetune: int = 2
    lenet_limit_train: int | None = None
    cnn_pretrain: int = 6
    cnn_finetune: int = 6
    cnn_limit_train: int | None = 12_000
    cnn_widths: tuple[int, ...] = (32, 64, 128)
    budgets: tuple[tuple[str, float], ...] = (("params", 0.5), ("params", 0.25))
    cnn_budgets: tuple[tuple[str, float], ...] = (("macs", 0.25),)
    cnn_conv_ranks: tuple[int, ...] = (3, 4)
    allocations: tuple[str, ...] = ("energy",)
    forms: tuple[str, ...] = FORMS  # the forms the latency is measured in
    repeats: int = 20
    threads: int = 1
    seed: int = 0
    minilm: Mapping[str, Any] | None = None  # settings of the MiniLM part, None: no MiniLM part

    def __post_init__(self) -> None:
        check_known(self.forms, FORMS, "forms")
        if self.minilm is not None:
            low_rank_minilm.Settings(**self.minilm)


QUICK = {
    "lenet_pretrain": 1,
    "lenet_finetune": 1,
    "lenet_limit_train": 2000,
    "cnn_pretrain": 4,
    "cnn_finetune": 1,
    "cnn_limit_train": 1024,
    "cnn_widths": (16, 32, 64),
    "cnn_conv_ranks": (4,),
    "forms": ("eager", "folded"),
    "repeats": 5,
}


def fold_batchnorm(net: nn.Module) -> nn.Module:
    """A copy of ``net`` in eval mode with every batch norm folded into the convolution that feeds it.

    ``torch.fx`` traces through the factorized layers, so a batch norm after a Tucker-2 convolution folds into
    its last 1x1 factor. The folded copy computes the same outputs as ``net`` in eval mode.
    """
    net = copy.deepcopy(net).eval()
    folded = fuse(net)
    example = torch.randn(2, 1, 28, 28)
    with torch.inference_mode():
        torch.testing.assert_close(folded(example), net(example), atol=1e-4, rtol=1e-4)
    return folded


def in_form(models: dict[str, CosineClassifier], form: str) -> dict[str, nn.Module]:
    """The models as timed: ``eager`` as trained, ``folded`` batch norms, or ``compiled`` by inductor (frozen)."""
    if form == "eager":
        return dict(models)
    if form == "folded":
        return {name: fold_batchnorm(model.net) for name, model in models.items()}
    return {name: compile_for_cpu(copy.deepcopy(model.net).eval()) for name, model in models.items()}


class AccuracyAtStart(Callback):
    """Test accuracy of the model as training starts, i.e. right after the factorization."""

    def __init__(self, datamodule: pl.LightningDataModule) -> None:
        self.datamodule = datamodule
        self.accuracy: float | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.accuracy = test_accuracy(pl_module, self.datamodule)
        pl_module.train()


def fashion(args: Settings, context: Context) -> list[dict[str, Any]]:
    rows = []
    setups = [
        ("lenet_300_100", args.lenet_pretrain, args.lenet_finetune, args.lenet_limit_train, 256),
        ("residual_cnn", args.cnn_pretrain, args.cnn_finetune, args.cnn_limit_train, 64),
    ]
    for arch, pretrain, finetune, limit, big_batch in setups:
        dm = image_data(context, batch_size=128, limit_train=limit)
        widths = {"widths": args.cnn_widths} if arch == "residual_cnn" else {}
        dense = CosineClassifier(arch, input_shape=(1, 28, 28), lr=1e-3, arch_kwargs=widths)
        start = time.perf_counter()
        fit(dense, dm, pretrain, seed=args.seed)
        pretrained_acc = test_accuracy(dense, dm)
        print(
            f"{arch}: pretrained {pretrain} epochs in {time.perf_counter() - start:.0f}s, acc {pretrained_acc:.4f}"
        )
        variants: dict[str, dict[str, Any]] = {"dense": {}}
        # For linear layers MACs and parameters shrink alike; convolutions differ, so the CNN also gets a 4x MACs
        # budget (a 2x one measured no faster than dense in earlier runs, and is left out to keep the run short).
        budgets = [*args.budgets, *(args.cnn_budgets if arch == "residual_cnn" else ())]
        for budget_on, budget in budgets:
            for allocation in args.allocations:
                name = f"low-rank {budget_on} {1 / budget:.0f}x" + (
                    f" ({allocation})" if len(args.allocations) > 1 else ""
                )
                variants[name] = {"budget": budget, "budget_on": budget_on, "allocation": allocation}
        if arch == "residual_cnn":
            # Every convolution of the residual blocks at a third / a quarter of its ranks (Tucker: both modes),
            # the stem (288 weights) and the linear head left alone: the cost is spread evenly over the layers,
            # where the energy allocation above concentrates the cuts in the last, parameter-heavy stage.
            for fraction in args.cnn_conv_ranks:
                variants[f"low-rank convs at 1/{fraction} rank"] = {
                    "rank": 1 / fraction,
                    "modules": nn.Conv2d,
                    "min_params": 1000,
                }
        models: dict[str, CosineClassifier] = {}
        results: dict[str, dict[str, Any]] = {}
        for name, kwargs in variants.items():
            model = copy.deepcopy(dense).train()  # Lightning keeps the flags it finds at the start of fit
            at_start = AccuracyAtStart(dm)
            callbacks: list[Callback] = [at_start]
            lowrank = None
            if kwargs:
                lowrank = LowRankReplacement(**kwargs, calibration_batches=8, verbose=False)
                callbacks.insert(0, lowrank)
            start = time.perf_counter()
            _, timer = fit(model, dm, finetune, callbacks, seed=args.seed + 1)
            models[name] = model.eval()
            results[name] = {
                "acc_after_factorization": at_start.accuracy,
                "test_acc": test_accuracy(model, dm),
                "step_ms": timer.median_ms,
                "replaced": len(lowrank.layers) if lowrank else 0,
                "ranks": {k: v["rank"] for k, v in lowrank.layers.items()} if lowrank else {},
            }
            print(f"  {name}: {results[name]} ({time.perf_counter() - start:.0f}s)")
        example = torch.zeros(1, 1, 28, 28)
        # Timed in three forms: as trained (eager modules); eager with every batch norm folded into the convolution
        # before it (for a factorized convolution: into its last factor); and compiled by inductor with weight
        # freezing (which folds the batch norms as well).
        # Every model and batch size compiles the same forward code once: lift dynamo's per-code recompile limit
        # (8), past which it would silently fall back to eager.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        forms = {form: in_form(models, form) for form in args.forms}
        latency = {
            (form, batch): compare_latency(
                nets,
                torch.randn(batch, 1, 28, 28),
                repeats=args.repeats,
                warmup=5,
                rounds=3,
                threads=args.threads,
            )
            for form, nets in forms.items()
            for batch in (1, big_batch)
        }
        base_params, base_macs = count_parameters(models["dense"]), count_macs(models["dense"], example)
        dense_acc = results["dense"]["test_acc"]
        for name, model in models.items():
            params, macs = count_parameters(model), count_macs(model, example)
            rows.append(
                {
                    "model": f"{arch} {'-'.join(map(str, args.cnn_widths))}" if widths else arch,
                    "variant": name,
                    "pretrain_epochs": pretrain,
                    "finetune_epochs": finetune,
                    "train_images": len(dm.train_set),
                    **results[name],
                    "acc_drop_points": 100 * (dense_acc - results[name]["test_acc"]),
                    "params": params,
                    "params_ratio": base_params / params,
                    "macs_ratio": base_macs / macs,
                    "big_batch": big_batch,
                }
            )
            for form in forms:
                suffix = "" if form == "eager" else f"_{form}"
                for batch, label in ((1, "b1"), (big_batch, "big_batch")):
                    timings = latency[form, batch]
                    rows[-1][f"speedup_{label}{suffix}"] = (
                        timings["dense"].median_ms / timings[name].median_ms
                    )
                    rows[-1][f"latency_{label}{suffix}_ms"] = timings[name].median_ms
    return rows


def run(args: Settings, context: Context) -> Result:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rows = fashion(args, context)
    suffixes = ["" if form == "eager" else f"_{form}" for form in args.forms]
    speedups = [column for sfx in suffixes for column in (f"speedup_b1{sfx}", f"speedup_big_batch{sfx}")]
    tables = [
        "## Fashion-MNIST: dense vs LowRankReplacement, fine-tuned the same number of epochs\n\n"
        + markdown_table(
            rows,
            [
                "model",
                "variant",
                "train_images",
                "acc_after_factorization",
                "test_acc",
                "acc_drop_points",
                "params_ratio",
                "macs_ratio",
                "big_batch",
                *speedups,
                "step_ms",
            ],
        )
        + f"\n\nLatency: eval mode, {args.threads} torch thread(s), the models of each architecture timed "
        f"interleaved, 3 rounds x {args.repeats} calls after warm-up, medians; speed-ups are dense / factorized "
        f"({', '.join(args.forms)})."
    ]
    payload: dict[str, Any] = {"fashion_mnist": rows}
    if args.minilm is not None:
        minilm_settings = {**args.minilm, **(low_rank_minilm.QUICK if context.quick else {})}
        part = low_rank_minilm.run(low_rank_minilm.Settings(**minilm_settings), context)
        payload.update(part.payload)
        tables.append(part.markdown)
    return Result(payload, "\n\n".join(tables))
