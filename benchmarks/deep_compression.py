"""Deep Compression on Fashion-MNIST: pruning, then k-means weight sharing, then Huffman coding, on LeNet-300-100.

The pipeline of Han et al. (2016), one stage after the other on the same model, in one run:

1. train the dense model;
2. prune the weights with ``GradualPruning`` while retraining: 92% (Deep Compression kept 8% of
   LeNet-300-100's weights) and, from the same dense model, 95%;
3. share the remaining weights with ``WeightSharing`` (6-bit indices, 64 shared values per layer, as in the
   paper) while retraining the shared values;
4. Huffman-code the indices and the relative positions.

Reported per stage: test accuracy and the compression ratio, dense fp32 bytes / compressed bytes of the whole
model (biases included, stored fp32). The sizes of stages 2-4 come from ``WeightSharing.storage_report``:
sparse values with ``index_bits``-bit relative positions, 6-bit indices plus the fp32 codebook, and the sizes of
the actual Huffman-coded bit streams. Target: at least 40x at no more than 0.5 point of accuracy lost.

Configuration ``deep_compression`` (``python -m benchmarks run deep_compression``; needs
``apt-get install -y dataset-fashion-mnist``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from benchmarks.common import Context, Result, fit, image_data, markdown_table, test_accuracy
from examples.models import ImageClassifier
from lightning_compress import GradualPruning
from lightning_compress.quantization import WeightSharing

TITLE = "Deep Compression on Fashion-MNIST: pruning, weight sharing, Huffman coding"


@dataclass(frozen=True)
class Settings:
    """The full run's settings."""

    dense_epochs: int = 10
    prune_epochs: int = 10
    share_epochs: int = 4
    amounts: tuple[float, ...] = (0.92, 0.95)  # fractions of the weights pruned
    bits: int = 6  # bits per shared-value index
    index_bits: int | None = None  # bits per relative position (None: the cheapest of 3-8)
    finetune_lr: float = 3e-4
    limit_train: int | None = None  # training images (None: all 55,000)
    threads: int = 1
    seed: int = 0


QUICK = {"limit_train": 2000, "dense_epochs": 2, "prune_epochs": 2, "share_epochs": 1, "amounts": (0.92,)}


def _sparsity(model: nn.Module) -> float:
    weights = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def _compress(
    dense: ImageClassifier,
    dense_acc: float,
    dm: pl.LightningDataModule,
    amount: float,
    args: Settings,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Stages 2-4 from a copy of the dense model; returns its table rows and its storage details."""
    model = copy.deepcopy(dense).train()  # Lightning keeps the train/eval flags at the start of fit
    model.hparams.lr = args.finetune_lr
    pruning = GradualPruning(amount=amount, scope="global", start=0.0, end=0.6, modules=nn.Linear)
    fit(model, dm, args.prune_epochs, [pruning], seed=args.seed + 1)
    pruned_acc = test_accuracy(model, dm)
    sparsity = _sparsity(model)

    sharing = WeightSharing(bits=args.bits, start=0.0, modules=nn.Linear)
    fit(model.train(), dm, args.share_epochs, [sharing], seed=args.seed + 2)
    shared_acc = test_accuracy(model, dm)
    # The width of the relative positions is a storage choice (it does not change the model): an encoder
    # picks the cheapest. Every width is reported.
    sweep = []
    for index_bits in range(3, 9):
        sharing.index_bits = index_bits
        candidate = sharing.storage_report(model)
        sweep.append(
            {"index_bits": index_bits, **candidate["total"], "huffman_ratio": candidate["ratios"]["huffman"]}
        )
    best = args.index_bits or max(sweep, key=lambda row: row["huffman_ratio"])["index_bits"]
    sharing.index_bits = best
    report = sharing.storage_report(model)
    total, ratios = report["total"], report["ratios"]
    stages = [
        (f"2. pruned {amount:.0%}", args.prune_epochs, pruned_acc, "pruned"),
        (f"3. + weight sharing ({args.bits} bits)", args.share_epochs, shared_acc, "shared"),
        (f"4. + Huffman coding ({best}-bit positions)", 0, shared_acc, "huffman"),
    ]
    rows = [
        {
            "pruned": amount,
            "stage": label,
            "epochs": epochs,
            "test_acc": accuracy,
            "acc_drop_points": 100 * (dense_acc - accuracy),
            "bytes": total[f"{stage}_bytes"],
            "compression_ratio": ratios[stage],
        }
        for label, epochs, accuracy, stage in stages
    ]
    details = {
        "amount": amount,
        "sparsity": sparsity,
        "index_bits": best,
        "layers": [{"layer": name, **layer} for name, layer in report["layers"].items()],
        "index_bits_sweep": sweep,
    }
    return rows, details


def run(args: Settings, context: Context) -> Result:
    torch.set_num_threads(args.threads)
    dm = image_data(context, batch_size=128, limit_train=args.limit_train, seed=args.seed)
    dense = ImageClassifier("lenet_300_100", input_shape=(1, 28, 28), lr=1e-3)
    _, timer = fit(dense, dm, args.dense_epochs, seed=args.seed)
    dense_acc = test_accuracy(dense, dm)
    dense_bytes = sum(t.numel() * t.element_size() for t in dense.state_dict().values())
    rows: list[dict[str, Any]] = [
        {
            "pruned": 0.0,
            "stage": "1. dense",
            "epochs": args.dense_epochs,
            "test_acc": dense_acc,
            "acc_drop_points": 0.0,
            "bytes": dense_bytes,
            "compression_ratio": 1.0,
        }
    ]
    details = []
    for amount in args.amounts:
        stage_rows, detail = _compress(dense, dense_acc, dm, amount, args)
        rows += stage_rows
        details.append(detail)

    columns = ["pruned", "stage", "epochs", "test_acc", "acc_drop_points", "bytes", "compression_ratio"]
    verdicts = []
    for amount in args.amounts:
        final = [r for r in rows if r["pruned"] == amount][-1]
        met = final["compression_ratio"] >= 40 and final["acc_drop_points"] <= 0.5
        verdicts.append(
            f"pruned {amount:.0%}: {final['compression_ratio']:.1f}x at {final['acc_drop_points']:+.2f} points of "
            f"accuracy lost -> {'met' if met else 'NOT met'}"
        )
    sections = [
        markdown_table(rows, columns),
        "Target >= 40x at <= 0.5 point lost (Deep Compression on MNIST: 40x, 92% pruned): "
        + "; ".join(verdicts)
        + ".",
        f"Settings: {len(dm.train_set):,} training images, {args.threads} thread(s), batch 128, Adam (lr 1e-3 "
        f"dense, {args.finetune_lr:g} for retraining), global magnitude pruning (AGP over the first 60% of the "
        f"pruning epochs), {args.bits}-bit shared values, seed {args.seed}. Sizes include the fp32 biases. "
        f"Dense step {timer.median_ms:.2f} ms.",
    ]
    for detail in details:
        sections.append(f"Per layer, pruned {detail['amount']:.0%} (reached {detail['sparsity']:.4f}):")
        sections.append(
            markdown_table(
                detail["layers"],
                [
                    "layer",
                    "numel",
                    "nonzero",
                    "entries",
                    "bits",
                    "index_bits",
                    "dense_bytes",
                    "pruned_bytes",
                    "shared_bytes",
                    "huffman_bytes",
                ],
            )
        )
        sections.append(f"Width of the relative positions, pruned {detail['amount']:.0%} (storage only):")
        sections.append(
            markdown_table(
                detail["index_bits_sweep"],
                ["index_bits", "pruned_bytes", "shared_bytes", "huffman_bytes", "huffman_ratio"],
            )
        )
    return Result({"stages": rows, "details": details, "verdicts": verdicts}, "\n\n".join(sections))
