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

Run from the repository root (needs ``apt-get install -y dataset-fashion-mnist``)::

    python -m benchmarks.deep_compression          # full run
    python -m benchmarks.deep_compression --quick  # a couple of minutes: fewer images and epochs
"""

from __future__ import annotations

import argparse
import copy
from typing import Any

import torch
from torch import nn

from benchmarks.common import fit, markdown_table, test_accuracy, write_results
from examples.data import FashionMNISTDataModule
from examples.models import ImageClassifier
from lightning_compress import GradualPruning
from lightning_compress.quantization import WeightSharing


def _sparsity(model: nn.Module) -> float:
    weights = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def _compress(
    dense: ImageClassifier,
    dense_acc: float,
    dm: FashionMNISTDataModule,
    amount: float,
    args: argparse.Namespace,
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dense-epochs", type=int, default=10)
    parser.add_argument("--prune-epochs", type=int, default=10)
    parser.add_argument("--share-epochs", type=int, default=4)
    parser.add_argument(
        "--amounts", type=float, nargs="+", default=[0.92, 0.95], help="fractions of the weights pruned"
    )
    parser.add_argument("--bits", type=int, default=6, help="bits per shared-value index")
    parser.add_argument(
        "--index-bits",
        type=int,
        default=None,
        help="bits per relative position (default: the cheapest of 3-8)",
    )
    parser.add_argument("--finetune-lr", type=float, default=3e-4)
    parser.add_argument("--limit-train", type=int, default=0, help="training images (0: all 55,000)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="10k images, 3 + 3 + 2 epochs")
    args = parser.parse_args(argv)
    if args.quick:
        args.limit_train = 10_000
        args.dense_epochs, args.prune_epochs, args.share_epochs = 3, 3, 2
    torch.set_num_threads(args.threads)

    dm = FashionMNISTDataModule(batch_size=128, limit_train=args.limit_train or None, seed=args.seed)
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
        f"Settings: {args.limit_train or 55_000} training images, {args.threads} thread(s), batch 128, Adam (lr 1e-3 "
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
    name = "deep_compression_quick" if args.quick else "deep_compression"
    write_results(
        name,
        {"settings": vars(args), "stages": rows, "details": details, "verdicts": verdicts},
        "\n\n".join(sections),
    )


if __name__ == "__main__":
    main()
