"""Compact filters and depth on Fashion-MNIST: depthwise-separable convolutions and block removal, with and without
self-distillation, against structured pruning at the same MACs.

The residual CNN of the pruning benchmark is trained dense, then fine-tuned the same number of epochs from those
weights in each arm, with the same data order and a cosine learning-rate decay:

1. ``compact``: ``CompactConvReplacement(depth_multiplier=1)``: every k×k convolution becomes a depthwise k×k
   convolution and a 1x1 one, initialized by the per-input-channel SVD of its weights;
2. ``compact_kd``: the same and ``KnowledgeDistillation(teacher="self")`` (the teacher is the dense model);
3. ``depth``: ``StochasticDepth(remove=k)``: the least important residual blocks become ``nn.Identity``;
4. ``depth_kd``: the same and self-distillation;
5. ``pruning``: ``GradualPruning(mode="structured")`` with the one amount whose pruned model has at most the MACs of
   arm 1's (searched by pruning copies of the dense model and counting their MACs).

A ``dense`` run fine-tunes the dense weights as they are, for reference. Reported per arm: test accuracy (right after
the replacement or removal, and after fine-tuning), parameters, MACs per sample, the CPU latency ratio to the dense
model at batch 1 and 64 (the models timed interleaved, medians of repeats), and for the compact arms every replaced
layer's reconstruction error ``‖W − Ŵ‖ / ‖W‖``.

Configuration ``compact`` (``python -m benchmarks run compact``; needs ``apt-get install -y dataset-fashion-mnist``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
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
from lightning_compress import CompactConvReplacement, GradualPruning, KnowledgeDistillation
from lightning_compress.depth import StochasticDepth, find_blocks
from lightning_compress.low_rank import LowRankConfig, low_rank_
from lightning_compress.pruning import PruningConfig, prune_
from lightning_compress.stats import compare_latency, count_macs_per_sample, count_parameters

TITLE = "Compact filters and depth on Fashion-MNIST: CompactConvReplacement and StochasticDepth vs structured pruning"
ARMS = ("compact", "compact_kd", "depth", "depth_kd", "pruning")
BATCHES = (1, 64)  # the latency batch sizes
EXAMPLE = torch.zeros(1, 1, 28, 28)


@dataclass(frozen=True)
class Settings:
    """The full run's settings (about 17 minutes of CPU time: one torch thread)."""

    arms: tuple[str, ...] = ARMS
    pretrain_epochs: int = 4  # dense training
    finetune_epochs: int = 3  # every arm, from the same dense weights
    limit_train: int | None = 12_000  # use only the first N training images
    cnn_widths: tuple[int, ...] = (32, 64, 128)
    lr: float = 1e-3
    depth_multiplier: int = 1
    refine: bool = False  # CompactConvReplacement: refit the 1x1 weights on calibration batches
    remove: int = 1  # residual blocks StochasticDepth removes (this CNN has one with an identity shortcut)
    survival: float = 1.0  # StochasticDepth over the blocks left (none is left after removing the only one)
    alpha: float = 0.5  # KnowledgeDistillation
    temperature: float = 1.0
    prune_end: float = 0.5  # GradualPruning ramps the amount from the start of fine-tuning to this fraction
    round_to: int = 1  # GradualPruning: channel counts a multiple of this (1: the finest MACs match)
    amount_steps: int = 200  # the pruning amount is searched on the grid i / amount_steps
    repeats: int = 20
    threads: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        check_known(self.arms, ARMS, "arms")


QUICK = {
    "pretrain_epochs": 3,
    "finetune_epochs": 2,
    "limit_train": 2048,
    "cnn_widths": (16, 32, 64),
    "repeats": 5,
}


class AccuracyAtStart(Callback):
    """Test accuracy of the model as training starts: right after the replacement or the removal."""

    def __init__(self, datamodule: pl.LightningDataModule) -> None:
        self.datamodule = datamodule
        self.accuracy: float | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.accuracy = test_accuracy(pl_module, self.datamodule)
        pl_module.train()


def compact_macs(model: nn.Module, depth_multiplier: int) -> int:
    """MACs per sample of ``model`` with every k×k convolution made depthwise-separable (on a copy).

    Example::

        >>> net = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1))
        >>> count_macs_per_sample(net, EXAMPLE), compact_macs(net, 1)
        (7451136, 1060752)
    """
    replaced = copy.deepcopy(model)
    config = LowRankConfig(conv="depthwise", rank=depth_multiplier, modules=nn.Conv2d, method="svd")
    low_rank_(replaced, config, example_input=EXAMPLE)
    return count_macs_per_sample(replaced, EXAMPLE)


def matching_amount(model: nn.Module, macs: int, round_to: int, steps: int) -> float | None:
    """The smallest structured-pruning amount ``i / steps`` whose pruned ``model`` has at most ``macs`` MACs per
    sample (counted on a pruned copy); ``None`` when even ``(steps - 1) / steps`` leaves more.

    The channel counts follow from the amount alone, so the one-shot copy has the MACs of a model pruned gradually
    to that amount. A bisection: the MACs fall as the amount grows.

    Example::

        >>> net = nn.Sequential(nn.Conv2d(1, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
        >>> dense = count_macs_per_sample(net, EXAMPLE)
        >>> amount = matching_amount(net, dense // 4, round_to=1, steps=16)
        >>> amount, _pruned_macs(net, amount, 1) <= dense // 4 < _pruned_macs(net, amount - 1 / 16, 1)
        (0.5625, True)
    """
    amounts = [i / steps for i in range(1, steps)]
    if _pruned_macs(model, amounts[-1], round_to) > macs:
        return None
    low, high = 0, len(amounts) - 1
    while low < high:
        middle = (low + high) // 2
        if _pruned_macs(model, amounts[middle], round_to) <= macs:
            high = middle
        else:
            low = middle + 1
    return amounts[low]


def _pruned_macs(model: nn.Module, amount: float, round_to: int) -> int:
    pruned = copy.deepcopy(model)
    prune_(pruned, PruningConfig(amount, "structured", round_to=round_to), example_input=EXAMPLE)
    return count_macs_per_sample(pruned, EXAMPLE)


def _arm_callbacks(arm: str, args: Settings, amount: float | None) -> list[Callback]:
    distill = [KnowledgeDistillation(teacher="self", alpha=args.alpha, temperature=args.temperature)]
    if arm.startswith("compact"):
        compact = CompactConvReplacement(
            depth_multiplier=args.depth_multiplier, refine=args.refine, verbose=False
        )
        return [compact, *(distill if arm.endswith("_kd") else [])]
    if arm.startswith("depth"):
        depth = StochasticDepth(survival=args.survival, remove=args.remove, seed=args.seed, verbose=False)
        return [depth, *(distill if arm.endswith("_kd") else [])]
    return [
        GradualPruning(
            amount=amount, mode="structured", start=0.0, end=args.prune_end, round_to=args.round_to
        )
    ]


def fine_tune(args: Settings, context: Context) -> dict[str, Any]:
    """Train the dense model, fine-tune every arm from its weights, count and time them: the results dictionary."""
    widths = {"widths": args.cnn_widths}
    dense = CosineClassifier("residual_cnn", input_shape=(1, 28, 28), lr=args.lr, arch_kwargs=widths)
    # MACs follow from the shapes alone: the pruning amount is found before any training is spent.
    dense_macs = count_macs_per_sample(dense, EXAMPLE)
    target = compact_macs(dense.net, args.depth_multiplier)
    amount = None
    if "pruning" in args.arms:
        amount = matching_amount(dense, target, args.round_to, args.amount_steps)
        if amount is None:
            raise ValueError(
                f"No structured-pruning amount below 1 reaches the compact arm's MACs ({target:,} of "
                f"{dense_macs:,}): raise `depth_multiplier`, or leave 'pruning' out of `arms`."
            )
    dm = image_data(context, batch_size=128, limit_train=args.limit_train, seed=args.seed)
    fit(dense, dm, args.pretrain_epochs, seed=args.seed)
    results: dict[str, Any] = {
        "train_images": len(dm.train_set),
        "test_images": len(dm.test_set),
        "pretrained_acc": test_accuracy(dense, dm),
        "residual_blocks": find_blocks(dense, EXAMPLE, removable=True),
        "compact_macs_counted": target,
        "pruning_amount": amount,
    }
    models: dict[str, CosineClassifier] = {}
    runs: dict[str, dict[str, Any]] = {}
    per_layer: list[dict[str, Any]] = []
    for arm in ("dense", *args.arms):
        model = copy.deepcopy(dense).train()  # Lightning keeps the training flags it finds when `fit` starts
        callbacks = [] if arm == "dense" else _arm_callbacks(arm, args, amount)
        at_start = AccuracyAtStart(dm)
        _, timer = fit(model, dm, args.finetune_epochs, [*callbacks, at_start], seed=args.seed + 1)
        models[arm] = model.eval()
        runs[arm] = {
            "acc_at_start": at_start.accuracy,
            "test_acc": test_accuracy(model, dm),
            "step_ms": timer.median_ms,
        }
        first = callbacks[0] if callbacks else None
        if isinstance(first, CompactConvReplacement):
            runs[arm]["replaced_layers"] = len(first.layers)
            runs[arm]["skipped_layers"] = dict(first.skipped)
            per_layer += [{"arm": arm, **_layer_row(record)} for record in first.records]
        if isinstance(first, StochasticDepth):
            assert first.plan is not None
            runs[arm]["removed_blocks"] = list(first.removed)
            runs[arm]["removal"] = first.plan.summary()
        print(f"{arm}: {runs[arm]}", flush=True)
    latency = {
        batch: compare_latency(
            models, torch.randn(batch, 1, 28, 28), repeats=args.repeats, rounds=3, threads=args.threads
        )
        for batch in BATCHES
    }
    dense_params = count_parameters(dense)
    rows = []
    for arm, model in models.items():
        macs, params = count_macs_per_sample(model, EXAMPLE), count_parameters(model)
        row = {
            "arm": arm,
            "callbacks": _describe(arm, args, amount),
            "epochs": args.finetune_epochs,
            **{k: v for k, v in runs[arm].items() if k not in ("removal", "skipped_layers")},
            "acc_drop_points": 100 * (runs["dense"]["test_acc"] - runs[arm]["test_acc"]),
            "params": params,
            "params_ratio": dense_params / params,
            "macs": macs,
            "macs_ratio": dense_macs / macs,
        }
        for batch in BATCHES:
            row[f"latency_b{batch}_ms"] = latency[batch][arm].median_ms
            row[f"speedup_b{batch}"] = latency[batch]["dense"].median_ms / latency[batch][arm].median_ms
        rows.append(row)
    results.update(
        rows=rows,
        per_layer=per_layer,
        removal={arm: run["removal"] for arm, run in runs.items() if "removal" in run},
        skipped={arm: run["skipped_layers"] for arm, run in runs.items() if "skipped_layers" in run},
        latency_threads=latency[BATCHES[0]]["dense"].threads,
    )
    return results


def _layer_row(record: dict[str, Any]) -> dict[str, Any]:
    return {
        "layer": record["name"],
        "depth_multiplier": record["rank"],
        "params_before": record["params_before"],
        "params_after": record["params_after"],
        "macs_ratio": record["macs_before"] / record["macs_after"],
        "weight_error": record["weight_error"],
        "output_error": record["output_error"],
    }


def _describe(arm: str, args: Settings, amount: float | None) -> str:
    """The arm's callbacks as a user would write them."""
    distill = (
        f' + KnowledgeDistillation(teacher="self", alpha={args.alpha:g}, temperature={args.temperature:g})'
        if arm.endswith("_kd")
        else ""
    )
    if arm.startswith("compact"):
        refine = ", refine=True" if args.refine else ""
        return f"CompactConvReplacement(depth_multiplier={args.depth_multiplier}{refine})" + distill
    if arm.startswith("depth"):
        return f"StochasticDepth(remove={args.remove}, survival={args.survival:g})" + distill
    if arm == "pruning":
        return f'GradualPruning(amount={amount:g}, mode="structured", round_to={args.round_to})'
    return "none (dense)"


def targets(results: dict[str, Any]) -> dict[str, bool]:
    """The benchmark's targets, checked on the stored rows: self-distillation recovers accuracy (distilled >= alone)
    in the compact and depth arms, and every arm is measurably faster than dense (speed-up > 1.0x) at each batch.

    Example::

        >>> rows = [
        ...     {"arm": "dense", "test_acc": 0.90, "speedup_b1": 1.0, "speedup_b64": 1.0},
        ...     {"arm": "compact", "test_acc": 0.85, "speedup_b1": 1.3, "speedup_b64": 0.8},
        ...     {"arm": "compact_kd", "test_acc": 0.86, "speedup_b1": 1.2, "speedup_b64": 0.8},
        ... ]
        >>> for target, met in targets({"rows": rows}).items():
        ...     print(f"{target}: {met}")
        compact: distilled accuracy >= alone: True
        compact: speed-up > 1.0x at batch 1: True
        compact: speed-up > 1.0x at batch 64: False
        compact_kd: speed-up > 1.0x at batch 1: True
        compact_kd: speed-up > 1.0x at batch 64: False
    """
    met: dict[str, bool] = {}
    by = {r["arm"]: r for r in results["rows"]}
    for arm in (a for a in ARMS if a in by):
        if f"{arm}_kd" in by:
            met[f"{arm}: distilled accuracy >= alone"] = by[f"{arm}_kd"]["test_acc"] >= by[arm]["test_acc"]
        for batch in BATCHES:
            met[f"{arm}: speed-up > 1.0x at batch {batch}"] = by[arm][f"speedup_b{batch}"] > 1.0
    return met


def observations(results: dict[str, Any]) -> list[str]:
    """Plain statements of what the numbers show where a target is missed or an arm falls short of its aim."""
    by = {r["arm"]: r for r in results["rows"]}
    lines = []
    for arm in (a for a in ARMS if a in by):
        slower = [b for b in BATCHES if by[arm][f"speedup_b{b}"] <= 1.0]
        if not slower:
            continue
        measured = " and ".join(f"{by[arm][f'speedup_b{b}']:.2f}x at batch {b}" for b in slower)
        line = f"`{arm}` is measured no faster than dense on this CPU: {measured}"
        if arm.startswith("compact"):
            line += (
                f", with {by[arm]['macs_ratio']:.1f}x fewer MACs. A depthwise convolution does one multiply-accumulate "
                "per weight and input value it loads: it is bound by memory traffic rather than arithmetic, and "
                "each replaced layer adds a layer (and its activations) of its own"
            )
        lines.append(line + ".")
    if "depth" in by and "compact" in by and by["depth"]["macs_ratio"] < 0.8 * by["compact"]["macs_ratio"]:
        blocks = results["residual_blocks"]
        lines.append(
            f"Block removal reaches {by['depth']['macs_ratio']:.2f}x fewer MACs, not the compact arm's "
            f"{by['compact']['macs_ratio']:.2f}x: this CNN has {len(blocks)} residual "
            f"block{'s' if len(blocks) != 1 else ''} with an identity shortcut "
            f"({', '.join(f'`{b}`' for b in blocks)}), the only ones that keep their input's shape and can be "
            "removed; the downsampling blocks cannot."
        )
    for arm in (a for a in ("compact", "depth") if a in by and f"{a}_kd" in by):
        alone, distilled = by[arm]["test_acc"], by[f"{arm}_kd"]["test_acc"]
        verb = "recovered" if distilled >= alone else "did not recover"
        lines.append(
            f"Self-distillation {verb} accuracy in the {arm} arm: {distilled:.4f} distilled against {alone:.4f} "
            f"alone ({100 * (distilled - alone):+.2f} points; one seed, {results['test_images']:,} test images)."
        )
    return lines


def report(results: dict[str, Any], settings: Settings) -> str:
    """The Markdown tables, the settings and the targets of a results dictionary."""
    widths = "-".join(map(str, settings.cnn_widths))
    speedups = [c for b in BATCHES for c in (f"speedup_b{b}", f"latency_b{b}_ms")]
    tables = [
        "## Arms, fine-tuned alike from the same dense weights\n\n"
        + markdown_table(
            results["rows"],
            [
                "arm",
                "callbacks",
                "acc_at_start",
                "test_acc",
                "acc_drop_points",
                "params",
                "params_ratio",
                "macs",
                "macs_ratio",
                *speedups,
                "step_ms",
            ],
        )
        + f"\n\nSettings: residual CNN {widths} (3 stages, one residual block each, BatchNorm), trained dense "
        f"{settings.pretrain_epochs} epochs (test accuracy {results['pretrained_acc']:.4f}), then every arm "
        f"fine-tuned {settings.finetune_epochs} epochs from those weights; {results['train_images']:,} training "
        f"images, batch 128, Adam lr {settings.lr:g} decaying to zero on a cosine (per step), the same data order "
        f"for every arm; accuracy on {results['test_images']:,} test images, `acc_at_start` right after the "
        "replacement or removal (the pruning arm prunes during fine-tuning). CompactConvReplacement and "
        "StochasticDepth act in `setup`; StochasticDepth ranks the blocks by the loss increase when each is skipped "
        "alone on 4 training batches ("
        + (
            "with `survival=1` no stochastic depth runs on the blocks left). "
            if settings.survival == 1
            else f"then stochastic depth with `survival={settings.survival:g}` on the blocks left). "
        )
        + "GradualPruning: L1 group magnitude, the amount ramped (AGP) from the start of fine-tuning to "
        f"{settings.prune_end:g} of it, the channels removed at the end; its amount is the smallest on a grid of "
        f"1/{settings.amount_steps} whose pruned model has at most the compact arm's MACs "
        f"({results['compact_macs_counted']:,}, counted on a replaced copy). MACs per sample counted on one 28x28 "
        "image. Latency: eval mode, "
        f"inference_mode, {results['latency_threads']} torch thread(s), the models timed interleaved, 3 rounds x "
        f"{settings.repeats} calls after warm-up, medians; speed-up = dense / arm. `step_ms`: median training step."
    ]
    if results["per_layer"]:
        # The distilled arm starts from the same factors: its rows are shown only where they differ.
        arms = list(dict.fromkeys(row["arm"] for row in results["per_layer"]))
        shown = [
            r
            for r in results["per_layer"]
            if r["arm"] == arms[0] or not _same_layers(results, arms[0], r["arm"])
        ]
        same = [arm for arm in arms[1:] if _same_layers(results, arms[0], arm)]
        skipped = results["skipped"][arms[0]]
        tables.append(
            "## Compact arms: reconstruction error per replaced layer\n\n"
            + markdown_table(
                shown,
                [
                    "arm",
                    "layer",
                    "depth_multiplier",
                    "params_before",
                    "params_after",
                    "macs_ratio",
                    "weight_error",
                    "output_error",
                ],
            )
            + "\n\n`weight_error` = ‖W − Ŵ‖ / ‖W‖ between the dense weights and their depthwise-separable "
            "replacement (per-input-channel truncated SVD); `output_error` with `refine` only."
            + "".join(f" `{arm}` replaced the same layers with the same errors." for arm in same)
            + " Left as they are: "
            + (", ".join(f"`{layer}` ({why.rstrip('.')})" for layer, why in skipped.items()) or "none")
            + "."
        )
    for summary, arms in _grouped(results["removal"]).items():
        tables.append(f"## Block removal ({', '.join(arms)})\n\n```\n{summary}\n```")
    tables += observations(results)
    tables.append(
        "Targets: "
        + "; ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in results["targets"].items())
        + "."
    )
    return "\n\n".join(tables)


def _same_layers(results: dict[str, Any], arm: str, other: str) -> bool:
    rows = [
        [{k: v for k, v in r.items() if k != "arm"} for r in results["per_layer"] if r["arm"] == a]
        for a in (arm, other)
    ]
    return rows[0] == rows[1] and results["skipped"][arm] == results["skipped"][other]


def _grouped(values: dict[str, str]) -> dict[str, list[str]]:
    """``{arm: text}`` as ``{text: [arms]}``."""
    grouped: dict[str, list[str]] = {}
    for arm, text in values.items():
        grouped.setdefault(text, []).append(arm)
    return grouped


def run(args: Settings, context: Context) -> Result:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    results = fine_tune(args, context)
    results["targets"] = targets(results)
    return Result(results, report(results, args))
