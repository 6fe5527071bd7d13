"""Models for the examples and benchmarks, and one LightningModule that trains any of them on images."""

from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy


def small_cnn(
    in_channels: int = 1, num_classes: int = 10, width: int = 16, image_size: int = 8
) -> nn.Sequential:
    """Two conv-BN-ReLU layers, a pooling step and a two-layer head: the digits example network."""
    pooled = image_size // 2
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1),
        nn.BatchNorm2d(2 * width),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * width * pooled * pooled, 64),
        nn.ReLU(),
        nn.Linear(64, num_classes),
    )


def lenet_300_100(in_features: int = 784, num_classes: int = 10) -> nn.Sequential:
    """LeNet-300-100 (LeCun et al. 1998; the Deep Compression MNIST MLP)."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_features, 300),
        nn.ReLU(),
        nn.Linear(300, 100),
        nn.ReLU(),
        nn.Linear(100, num_classes),
    )


def lenet5(in_channels: int = 1, num_classes: int = 10) -> nn.Sequential:
    """A LeNet-5-style CNN for 28x28 input (Caffe's variant used by Deep Compression: 20-50 conv, 500 FC)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 20, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(20, 50, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(50 * 4 * 4, 500),
        nn.ReLU(),
        nn.Linear(500, num_classes),
    )


class ResidualBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 projection) shortcut; one ReLU module per use."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


def residual_cnn(
    in_channels: int = 1, num_classes: int = 10, widths: Sequence[int] = (32, 64, 128)
) -> nn.Sequential:
    """A 3-stage residual CNN (stem, one residual block per stage, global pooling, linear head)."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False),
        nn.BatchNorm2d(widths[0]),
        nn.ReLU(),
    ]
    previous = widths[0]
    for i, width in enumerate(widths):
        layers.append(ResidualBlock(previous, width, stride=1 if i == 0 else 2))
        previous = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(previous, num_classes)]
    return nn.Sequential(*layers)


ARCHITECTURES = {
    "small_cnn": small_cnn,
    "lenet_300_100": lenet_300_100,
    "lenet5": lenet5,
    "residual_cnn": residual_cnn,
}


class ImageClassifier(pl.LightningModule):
    """Trains one of :data:`ARCHITECTURES` with cross-entropy and Adam; logs loss and accuracy.

    Args:
        arch: a name from :data:`ARCHITECTURES`.
        num_classes: number of classes.
        input_shape: shape of one input image, e.g. ``(1, 8, 8)``; sets ``example_input_array``.
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
        arch_kwargs: extra keyword arguments for the architecture function.

    Example::

        >>> model = ImageClassifier("small_cnn", input_shape=(1, 8, 8))
        >>> tuple(model(model.example_input_array).shape)
        (1, 10)
    """

    def __init__(
        self,
        arch: str = "small_cnn",
        num_classes: int = 10,
        input_shape: Sequence[int] = (1, 8, 8),
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        arch_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        if arch not in ARCHITECTURES:
            raise ValueError(f"Unknown `arch={arch!r}`; choose one of {sorted(ARCHITECTURES)}.")
        self.save_hyperparameters()
        kwargs = dict(arch_kwargs or {})
        if arch == "small_cnn":
            kwargs.setdefault("image_size", input_shape[-1])
        if arch == "lenet_300_100":
            kwargs.setdefault("in_features", int(torch.tensor(input_shape).prod()))
        self.net = ARCHITECTURES[arch](num_classes=num_classes, **kwargs)
        self.example_input_array = torch.zeros(1, *input_shape)
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.train_acc(logits, y)
        self.log("train_loss", loss, prog_bar=True)
        self.log("train_acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.log("val_loss", F.cross_entropy(logits, y), prog_bar=True)
        self.log("val_acc", self.val_acc, prog_bar=True)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.test_acc(logits, y)
        self.log("test_loss", F.cross_entropy(logits, y))
        self.log("test_acc", self.test_acc)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
