"""Pruning benchmark on Fashion-MNIST, side by side in one run.

1. Unstructured, 90% of the weights: dense vs ``GradualPruning`` (AGP) vs Lightning's ``ModelPruning`` with
   per-epoch amounts that compound to 90% (lottery ticket off), on LeNet-300-100 and a LeNet-5-style CNN:
   test accuracy, reached sparsity, training step time as a ratio to the dense run.
2. Structured, 50% of the channels of a 3-stage residual CNN: dense vs ``GradualPruning(mode="structured")`` vs
   torch-pruning used by hand (prune once after dense training, then fine-tune the same number of epochs):
   MACs, parameters, CPU latency at batch 1 and 64 (interleaved, median of repeats), test accuracy.

Configuration ``pruning`` (``python -m benchmarks run pruning``; needs ``apt-get install -y dataset-fashion-mnist``).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

import torch
import torch_pruning as tp
from lightning.pytorch.callbacks import ModelPruning
from torch import nn

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
from examples.models import ImageClassifier
from lightning_compress import GradualPruning
from lightning_compress.stats import compare_latency, count_macs, count_parameters

TITLE = "Pruning on Fashion-MNIST: GradualPruning vs Lightning's ModelPruning vs torch-pruning by hand"
PARTS = ("unstructured", "structured", "step_time")


@dataclass(frozen=True)
class Settings:
    """The full run's settings."""

    parts: tuple[str, ...] = PARTS
    epochs: int = 10  # epochs of the unstructured runs
    structured_epochs: int = 4
    limit_train: int | None = None  # use only the first N training images
    repeats: int = 30
    seed: int = 0
    seeds: int = 1  # unstructured runs: seeds per model and method
    archs: tuple[str, ...] = ("lenet_300_100", "lenet5")  # unstructured models
    step_time_rounds: int = 3
    step_time_steps: int = 300  # training batches per timed epoch
    cnn_widths: tuple[int, ...] = (32, 64, 128)  # of the structured part's residual CNN

    def __post_init__(self) -> None:
        check_known(self.parts, PARTS, "parts")


QUICK = {
    "limit_train": 2000,
    "epochs": 2,
    "structured_epochs": 2,
    "repeats": 10,
    "seeds": 1,
    "archs": ("lenet_300_100",),
    "step_time_rounds": 1,
    "step_time_steps": 20,
    "cnn_widths": (16, 32, 64),
}


def _weight_sparsity(model: nn.Module) -> float:
    weights = [m.weight for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    zeros = sum(int((w == 0).sum()) for w in weights)
    return zeros / sum(w.numel() for w in weights)


def unstructured(args: Settings, context: Context) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int]:
    """Per-seed runs, their summary (mean accuracy, spread, median step-time ratio) and the training images."""
    runs = []
    prune_epochs = max(1, round(0.7 * args.epochs))
    per_epoch = 1 - (1 - 0.9) ** (1 / prune_epochs)  # compounds to 90% over the pruning epochs
    for arch in args.archs:
        dm = image_data(context, batch_size=128, limit_train=args.limit_train)
        for seed in range(args.seed, args.seed + args.seeds):
            dense_step = None
            for method in ("dense", "GradualPruning", "ModelPruning"):
                # The learning rate decays to zero on a cosine, so the last epoch's accuracy is not the accident
                # of one large step (with a constant rate it swung by more than the methods differ).
                model = CosineClassifier(arch, input_shape=(1, 28, 28), lr=1e-3)
                callbacks: list = []
                if method == "GradualPruning":
                    # The same pruning window as ModelPruning's, which prunes at the ends of epochs 0 to k-1.
                    pruning = GradualPruning(
                        amount=0.9, scope="global", start="epoch:1", end=f"epoch:{prune_epochs}"
                    )
                    callbacks = [pruning]
                elif method == "ModelPruning":
                    callbacks = [
                        ModelPruning(
                            "l1_unstructured",
                            amount=lambda epoch, k=prune_epochs, a=per_epoch: a if epoch < k else 0.0,
                            parameter_names=["weight"],
                            use_lottery_ticket_hypothesis=False,
                            make_pruning_permanent=True,
                            verbose=0,
                        )
                    ]
                _, timer = fit(model, dm, args.epochs, callbacks, seed=seed)
                step = timer.median_ms
                dense_step = dense_step or step
                row = {
                    "model": arch,
                    "method": method,
                    "seed": seed,
                    "epochs": args.epochs,
                    "test_acc": test_accuracy(model, dm),
                    "weight_sparsity": _weight_sparsity(model),
                    "step_ms": step,
                    "step_time_vs_dense": step / dense_step,
                }
                print(row, flush=True)
                runs.append(row)
    summary = []
    for arch in args.archs:
        for method in ("dense", "GradualPruning", "ModelPruning"):
            rows = [r for r in runs if r["model"] == arch and r["method"] == method]
            accs = [r["test_acc"] for r in rows]
            summary.append(
                {
                    "model": arch,
                    "method": method,
                    "seeds": len(rows),
                    "epochs": args.epochs,
                    "test_acc": statistics.mean(accs),
                    "test_acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                    "test_acc_per_seed": " ".join(f"{a:.4f}" for a in accs),
                    "weight_sparsity": statistics.mean(r["weight_sparsity"] for r in rows),
                    "step_ms": statistics.median(r["step_ms"] for r in rows),
                    "step_time_vs_dense": statistics.median(r["step_time_vs_dense"] for r in rows),
                }
            )
    return runs, summary, len(dm.train_set)


def step_times(args: Settings, context: Context) -> tuple[list[dict[str, Any]], int, int]:
    """Training step time at 90% sparsity, side by side: short fits of dense, GradualPruning and ModelPruning
    interleaved over rounds; each fit prunes to 90% after its first epoch, its second epoch is timed."""
    rows = []
    for arch in args.archs:
        dm = image_data(context, batch_size=128, limit_train=128 * args.step_time_steps)
        steps = len(dm.train_dataloader())
        skip = min(10, (steps - 1) // 2)  # allocator and first-call warm-up
        times: dict[str, list[float]] = {"dense": [], "GradualPruning": [], "ModelPruning": []}
        for round_ in range(args.step_time_rounds):
            for method in times:
                model = ImageClassifier(arch, input_shape=(1, 28, 28), lr=1e-3)
                callbacks: list = []
                if method == "GradualPruning":
                    callbacks = [
                        GradualPruning(
                            amount=0.9, scope="global", start="epoch:1", end="epoch:1", schedule="one_shot"
                        )
                    ]
                elif method == "ModelPruning":
                    callbacks = [
                        ModelPruning(
                            "l1_unstructured",
                            amount=lambda epoch: 0.9 if epoch == 0 else 0.0,
                            parameter_names=["weight"],
                            use_lottery_ticket_hypothesis=False,
                            make_pruning_permanent=True,
                            verbose=0,
                        )
                    ]
                _, timer = fit(model, dm, 2, callbacks, seed=args.seed + round_)
                second_epoch = timer.times[-(steps - 1) :]
                times[method].append(1000 * statistics.median(second_epoch[skip:]))
        dense = statistics.median(times["dense"])
        for method, values in times.items():
            row = {
                "model": arch,
                "method": method,
                "rounds": len(values),
                "steps_timed": steps - 1 - skip,
                "step_ms": statistics.median(values),
                "step_time_vs_dense": statistics.median(values) / dense,
                "step_ms_per_round": " ".join(f"{v:.3f}" for v in values),
            }
            print(row, flush=True)
            rows.append(row)
    return rows, steps, skip


def _prune_by_hand(model: ImageClassifier, example: torch.Tensor, ratio: float) -> None:
    importance = tp.importance.GroupMagnitudeImportance(p=1)
    pruner = tp.pruner.BasePruner(
        model.net,
        example,
        importance=importance,
        pruning_ratio=ratio,
        ignored_layers=[model.net[-1]],
        round_to=8,
    )
    pruner.step()


def structured(args: Settings, context: Context) -> tuple[list[dict[str, Any]], int]:
    dm = image_data(context, batch_size=128, limit_train=args.limit_train)
    epochs = args.structured_epochs
    widths = {"widths": args.cnn_widths}
    models: dict[str, ImageClassifier] = {}
    rows = []

    dense = ImageClassifier("residual_cnn", input_shape=(1, 28, 28), lr=1e-3, arch_kwargs=widths)
    fit(dense, dm, epochs, seed=args.seed)
    models["dense"] = dense

    ours = ImageClassifier("residual_cnn", input_shape=(1, 28, 28), lr=1e-3, arch_kwargs=widths)
    pruning = GradualPruning(amount=0.5, mode="structured", start=0.25, end=0.6, round_to=8)
    fit(ours, dm, epochs, [pruning], seed=args.seed)
    models["GradualPruning structured"] = ours

    hand = ImageClassifier("residual_cnn", input_shape=(1, 28, 28), lr=1e-3, arch_kwargs=widths)
    pre = epochs // 2
    fit(hand, dm, pre, seed=args.seed)
    _prune_by_hand(hand, torch.zeros(1, 1, 28, 28), 0.5)
    fit(hand, dm, epochs - pre, seed=args.seed + 1)
    models["torch-pruning by hand (one shot)"] = hand

    example = torch.zeros(1, 1, 28, 28)
    latency = {
        batch: compare_latency(
            {k: m.eval() for k, m in models.items()},
            torch.randn(batch, 1, 28, 28),
            repeats=args.repeats,
            rounds=3,
        )
        for batch in (1, 64)
    }
    base_macs, base_params = count_macs(dense, example), count_parameters(dense)
    for name, model in models.items():
        macs, params = count_macs(model, example), count_parameters(model)
        row = {
            "model": "residual_cnn",
            "method": name,
            "epochs": epochs,
            "test_acc": test_accuracy(model, dm),
            "macs": macs,
            "macs_ratio": base_macs / macs,
            "params": params,
            "params_ratio": base_params / params,
            "latency_b1_ms": latency[1][name].median_ms,
            "speedup_b1": latency[1]["dense"].median_ms / latency[1][name].median_ms,
            "latency_b64_ms": latency[64][name].median_ms,
            "speedup_b64": latency[64]["dense"].median_ms / latency[64][name].median_ms,
        }
        if name.startswith("GradualPruning"):
            row["masked_vs_pruned_max_abs_diff"] = pruning.materialize_max_abs_diff
        print(row)
        rows.append(row)
    return rows, len(dm.train_set)


def targets(results: dict[str, Any]) -> dict[str, bool]:
    """The benchmark's targets, checked on the stored rows."""
    met: dict[str, bool] = {}
    by = {(r["model"], r["method"]): r for r in results.get("unstructured", [])}
    for model in sorted({m for m, _ in by}):
        ours, dense, theirs = by[(model, "GradualPruning")], by[(model, "dense")], by[(model, "ModelPruning")]
        met[f"{model}: accuracy >= ModelPruning's"] = ours["test_acc"] >= theirs["test_acc"]
        met[f"{model}: accuracy >= dense - 0.5 point"] = ours["test_acc"] >= dense["test_acc"] - 0.005
        # The side-by-side measurement, when there is one, is the one to trust over the sequential long runs.
        timed = {(r["model"], r["method"]): r for r in results.get("step_time", [])}
        ratio = timed.get((model, "GradualPruning"), ours)["step_time_vs_dense"]
        met[f"{model}: step time <= 1.05x dense"] = ratio <= 1.05
    rows = {r["method"].split(" ")[0]: r for r in results.get("structured", [])}
    if rows:
        ours, dense, hand = rows["GradualPruning"], rows["dense"], rows["torch-pruning"]
        met["structured: >= 3.5x fewer MACs"] = ours["macs_ratio"] >= 3.5
        # Both pruned models have the same layer shapes (equal MACs and parameters), so their latencies can
        # only differ by timing noise: "at least the same speed-up" is checked within 3%.
        same = ours["macs"] == hand["macs"] and ours["params"] == hand["params"]
        slack = 0.97 if same else 1.0
        met["structured: speed-up >= by hand at batch 1"] = ours["speedup_b1"] >= slack * hand["speedup_b1"]
        met["structured: speed-up >= by hand at batch 64"] = (
            ours["speedup_b64"] >= slack * hand["speedup_b64"]
        )
        met["structured: accuracy >= dense - 0.5 point"] = ours["test_acc"] >= dense["test_acc"] - 0.005
        met["structured: accuracy > one-shot by hand"] = ours["test_acc"] > hand["test_acc"]
    return met


def report(results: dict[str, Any], settings: Settings) -> str:
    """The Markdown tables, the settings and the targets of a results dictionary."""
    tables = []
    if "unstructured" in results:
        prune_epochs = max(1, round(0.7 * settings.epochs))
        tables.append(
            "## Unstructured 90%\n\n"
            + markdown_table(
                results["unstructured"],
                [
                    "model",
                    "method",
                    "seeds",
                    "epochs",
                    "test_acc",
                    "test_acc_std",
                    "test_acc_per_seed",
                    "weight_sparsity",
                    "step_ms",
                    "step_time_vs_dense",
                ],
            )
            + f"\n\nSettings: {results['train_images']:,} training images, batch 128, Adam lr 1e-3 "
            f"decaying to zero on a cosine (per step), {settings.epochs} epochs, the same seeds and data order for the three methods. GradualPruning: AGP "
            f"to 90% over epochs 1 to {prune_epochs}, one global threshold. ModelPruning: global L1, per-epoch "
            f"amounts compounding to 90% at the ends of epochs 0 to {prune_epochs - 1}, lottery ticket off. Step time: "
            "median interval between the starts of consecutive training batches (everything a step costs); "
            "ratio to the dense run of the same seed, median over seeds."
        )
    if "step_time" in results:
        tables.append(
            "## Training step time at 90% sparsity, side by side\n\n"
            + markdown_table(
                results["step_time"],
                [
                    "model",
                    "method",
                    "rounds",
                    "steps_timed",
                    "step_ms",
                    "step_time_vs_dense",
                    "step_ms_per_round",
                ],
            )
            + f"\n\nSettings: per round, one short fit per method in turn ({settings.step_time_rounds} rounds): "
            f"epoch 0 ({results['step_time_batches']} batches of 128) trains and then prunes to 90% (GradualPruning "
            "one-shot at the start of epoch 1, ModelPruning at the end of epoch 0), epoch 1 is timed (median "
            f"interval between batch starts, the first {results['step_time_skipped']} skipped); medians over the rounds."
        )
    if "structured" in results:
        epochs = settings.structured_epochs
        tables.append(
            "## Structured 50% of channels\n\n"
            + markdown_table(
                results["structured"],
                [
                    "method",
                    "epochs",
                    "test_acc",
                    "macs_ratio",
                    "params_ratio",
                    "speedup_b1",
                    "speedup_b64",
                    "latency_b1_ms",
                    "latency_b64_ms",
                ],
            )
            + f"\n\nSettings: residual CNN {'-'.join(map(str, settings.cnn_widths))} (3 stages, skip connections, "
            "BatchNorm), "
            f"{results['train_images']:,} training images, {epochs} epochs for every model. GradualPruning: "
            "structured L1 group magnitude, 50% of the channels between 0.25 and 0.6 of training, round_to=8, "
            f"removed at the end. By hand: {epochs // 2} dense epochs, torch-pruning once (same criterion, ratio, "
            f"round_to), {epochs - epochs // 2} fine-tuning epochs. Latency: eval mode, inference_mode, "
            f"{results['latency_threads']} threads, the models timed interleaved, 3 rounds x {settings.repeats} "
            "calls after warm-up, medians."
        )
    tables.append(
        "Targets: "
        + "; ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in results["targets"].items())
        + "."
    )
    return "\n\n".join(tables)


def run(args: Settings, context: Context) -> Result:
    torch.manual_seed(args.seed)
    results: dict[str, Any] = {}
    if "unstructured" in args.parts:
        results["unstructured_runs"], results["unstructured"], results["train_images"] = unstructured(
            args, context
        )
    if "structured" in args.parts:
        results["structured"], results["train_images"] = structured(args, context)
        results["latency_threads"] = torch.get_num_threads()
    if "step_time" in args.parts:
        results["step_time"], results["step_time_batches"], results["step_time_skipped"] = step_times(
            args, context
        )
    results["targets"] = targets(results)
    return Result(results, report(results, args))
