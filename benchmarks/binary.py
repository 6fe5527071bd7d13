"""Binary and ternary weights on Fashion-MNIST, side by side in one run: fp32 vs ``BinaryWeights``.

Every model is trained from scratch for the same epochs with the same seed and data order:

- ``fp32``: the dense model;
- ``binary`` / ``ternary``: ``BinaryWeights`` on every conv and linear layer from the first step (BinaryConnect
  and XNOR-Net's binary-weight network: ``alpha * sign(w)``; ternary weight networks: ``alpha * {-1, 0, 1}``,
  one fp32 ``alpha`` per output channel), latent fp32 weights updated through the straight-through estimator;
- ``... first/last fp32``: the same with the first and the last layer left in fp32, as is common.

Reported: test accuracy and its difference to fp32 in points, the bytes of the weights and of the whole model
(``compressed_size_bytes`` with the callback's storage formats: 1 or 2 bits per weight plus the scales; biases
and the fp32 layers at 32 bits) and the ratios to fp32.

Configuration ``binary`` (``python -m benchmarks run binary``; needs ``apt-get install -y dataset-fashion-mnist``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
from torch import nn

from benchmarks.common import Context, Result, fit, image_data, markdown_table, test_accuracy
from examples.models import ImageClassifier
from lightning_compress.quantization import BinaryWeights
from lightning_compress.stats import compressed_size_bytes, tensor_storage_bits

LAYERS = (nn.Conv2d, nn.Linear)


def _weight_bytes(model: nn.Module, formats: dict) -> tuple[int, int]:
    """(fp32 bytes, stored bytes) of the conv/linear weights alone."""
    fp32 = stored = 0
    for name, module in model.named_modules():
        if isinstance(module, LAYERS):
            fp32 += module.weight.numel() * 4
            stored += math.ceil(tensor_storage_bits(module.weight, formats.get(f"{name}.weight")) / 8)
    return fp32, stored


TITLE = "Binary and ternary weights on Fashion-MNIST: fp32 vs BinaryWeights"


@dataclass(frozen=True)
class Settings:
    """The full run's settings (every model trains ``epochs`` from scratch on ``limit_train`` images, None: all)."""

    archs: tuple[str, ...] = ("lenet_300_100", "lenet5")
    epochs: int = 10
    lr: float = 1e-3
    limit_train: int | None = None
    seed: int = 0


QUICK = {"archs": ("lenet_300_100",), "epochs": 1, "limit_train": 2000}


def run(settings: Settings, context: Context) -> Result:
    dm = image_data(context, batch_size=128, limit_train=settings.limit_train)
    rows = measure(settings, dm)
    table = markdown_table(rows, list(rows[0]))
    table += (
        f"\n\nSettings: {len(dm.train_set):,} training images, batch 128, Adam lr {settings.lr:g}, "
        f"{settings.epochs} epochs for every model, same seed and data order; binary/ternary from the first step."
    )
    return Result({"rows": rows}, table)


def measure(args: Settings, dm: pl.LightningDataModule) -> list[dict[str, Any]]:
    rows = []
    for arch in args.archs:
        layers = [
            n
            for n, m in ImageClassifier(arch, input_shape=(1, 28, 28)).named_modules()
            if isinstance(m, LAYERS)
        ]
        variants: dict[str, BinaryWeights | None] = {"fp32": None}
        for mode in ("binary", "ternary"):
            variants[mode] = BinaryWeights(mode=mode, modules=LAYERS)
            variants[f"{mode} first/last fp32"] = BinaryWeights(
                mode=mode, modules=LAYERS, exclude=[layers[0], layers[-1]]
            )
        base_acc = base_bytes = None
        for name, callback in variants.items():
            model = ImageClassifier(arch, input_shape=(1, 28, 28), lr=args.lr)
            fit(model, dm, args.epochs, [callback] if callback else [], seed=args.seed)
            formats = callback.storage_formats(model) if callback else {}
            acc = test_accuracy(model, dm)
            total = compressed_size_bytes(model, formats)
            fp32_weights, weights = _weight_bytes(model, formats)
            base_acc = acc if base_acc is None else base_acc
            base_bytes = total if base_bytes is None else base_bytes
            row = {
                "model": arch,
                "variant": name,
                "epochs": args.epochs,
                "test_acc": acc,
                "acc_vs_fp32_points": 100 * (acc - base_acc),
                "weight_bytes": weights,
                "weight_ratio": fp32_weights / weights,
                "model_bytes": total,
                "model_ratio": base_bytes / total,
            }
            print(row, flush=True)
            rows.append(row)
    return rows
