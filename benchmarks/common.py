"""Shared pieces of the benchmarks: what a run gets and returns, data, machine description, timing, fitting."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset

from examples.data import FASHION_MNIST_DIR, DigitsDataModule, FashionMNISTDataModule
from examples.models import ImageClassifier

RESULTS = Path(__file__).parent / "results"
FASHION_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


QUICK_EVALUATION = 2000  # validation and test images of Fashion-MNIST in a quick run


class Unavailable(RuntimeError):
    """A configuration needs something this machine lacks (a GPU, an optional package)."""


@dataclass
class Context:
    """What a benchmark gets besides its settings.

    Args:
        name: the configuration's name (the stem of the result files).
        quick: a quick run (small sizes); without Fashion-MNIST it falls back to the digits.
        output: folder of the result files; a benchmark's other files go under ``output / name``.
        data_dir: folder of the Fashion-MNIST IDX files.
        notes: lines the result file shows under its header (e.g. which data a quick run used).
    """

    name: str
    quick: bool = False
    output: Path = RESULTS
    data_dir: Path = Path(FASHION_MNIST_DIR)
    notes: list[str] = field(default_factory=list)

    @property
    def files(self) -> Path:
        """The folder for this run's files besides the results (figures, logs, cached models)."""
        return self.output / self.name

    def note(self, line: str) -> None:
        """Add ``line`` to the notes once."""
        if line not in self.notes:
            self.notes.append(line)


@dataclass
class Result:
    """What a benchmark returns: everything measured (JSON) and its Markdown tables with their settings."""

    payload: dict[str, Any]
    markdown: str


def check_known(values: Any, known: Any, argument: str) -> None:
    """Every one of ``values`` (the ``argument`` of a benchmark's settings) is one of ``known``."""
    unknown = set(values) - set(known)
    if unknown:
        raise ValueError(f"`{argument}={values}`: unknown {sorted(unknown)}; use some of {list(known)}.")


def shown(path: str | os.PathLike) -> str:
    """``path`` relative to the repository when it lies inside it (result files name no machine's folders)."""
    resolved = Path(path).resolve()
    root = RESULTS.resolve().parents[1]
    return str(resolved.relative_to(root)) if resolved.is_relative_to(root) else str(path)


def has_fashion_mnist(data_dir: str | os.PathLike) -> bool:
    """Whether the four Fashion-MNIST IDX files (gzip-compressed or not) are in ``data_dir``."""
    folder = Path(data_dir)
    return all((folder / f"{stem}.gz").exists() or (folder / stem).exists() for stem in FASHION_FILES)


class Digits28(DigitsDataModule):
    """scikit-learn's digits upsampled (bilinear) to 28x28 and standardized: a stand-in with Fashion-MNIST's shape.

    The split is the digits module's (a fixed permutation; 15 % validation, 15 % test); ``limit_train`` keeps the
    first training images, and ``flatten`` returns 784-vectors, as :class:`FashionMNISTDataModule` does.
    """

    def __init__(
        self,
        batch_size: int = 128,
        limit_train: int | None = None,
        flatten: bool = False,
        shuffle: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, shuffle=shuffle, seed=seed)
        self.limit_train = limit_train
        self.flatten = flatten
        self.input_shape = (784,) if flatten else (1, 28, 28)

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "train_set"):
            return
        super().setup(stage)
        train = self.train_set.tensors[0]
        self.available_train = len(train)
        mean, std = float(train.mean()), float(train.std())
        for name in ("train_set", "val_set", "test_set"):
            x, y = getattr(self, name).tensors
            if name == "train_set" and self.limit_train is not None:
                x, y = x[: self.limit_train], y[: self.limit_train]
            x = (F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False) - mean) / std
            setattr(self, name, TensorDataset(x.reshape(len(x), -1) if self.flatten else x, y))


def image_data(
    context: Context,
    batch_size: int = 128,
    limit_train: int | None = None,
    val_size: int = 5000,
    seed: int = 0,
    flatten: bool = False,
) -> FashionMNISTDataModule | Digits28:
    """Fashion-MNIST from ``context.data_dir``, set up; in a quick run without it, the digits at 28x28 (noted).

    A quick run on Fashion-MNIST validates and tests on the first :data:`QUICK_EVALUATION` images of each split.

    A full run without the files fails with :class:`FashionMNISTDataModule`'s error, which names the Debian package.
    """
    if context.quick and not has_fashion_mnist(context.data_dir):
        digits = Digits28(batch_size, limit_train, flatten, seed=seed)
        digits.setup("fit")
        context.note(
            f"Fashion-MNIST is not in `{context.data_dir}` (Debian package `dataset-fashion-mnist`): this quick run "
            f"used scikit-learn's digits upsampled to 28x28 instead ({digits.available_train:,} training images, or "
            f"the first N where a setting limits them; {len(digits.test_set)} test images)."
        )
        return digits
    dm = FashionMNISTDataModule(
        context.data_dir,
        batch_size=batch_size,
        val_size=val_size,
        flatten=flatten,
        limit_train=limit_train,
        seed=seed,
    )
    dm.prepare_data()
    dm.setup("fit")
    if context.quick:
        # Evaluating all 10,000 test images after every fit would cost a quick run more than its training.
        for name in ("val_set", "test_set"):
            x, y = getattr(dm, name).tensors
            setattr(dm, name, TensorDataset(x[:QUICK_EVALUATION], y[:QUICK_EVALUATION]))
        context.note(
            f"Quick run: validation and test on the first {QUICK_EVALUATION:,} images of each split only."
        )
    return dm


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import lightning

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average": [round(x, 1) for x in os.getloadavg()],
    }


class StepTimer(Callback):
    """Wall time of every training step, taken between the starts of consecutive batches of an epoch.

    Listed first among the callbacks, the interval holds everything a step costs: loading the batch, forward,
    backward, the optimizer step and every callback's work, logging included.
    """

    def __init__(self) -> None:
        self.times: list[float] = []
        self._last: float | None = None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last = None

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, i: int
    ) -> None:
        now = time.perf_counter()
        if self._last is not None:
            self.times.append(now - self._last)
        self._last = now

    @property
    def median_ms(self) -> float:
        # Skip the first steps: allocator warm-up.
        return 1000 * statistics.median(self.times[10:] or self.times)


class CosineClassifier(ImageClassifier):
    """ImageClassifier with a cosine learning-rate decay to zero over the whole fit (per optimizer step).

    Every fit then ends with small steps, so its last epoch's accuracy is not the accident of one large step.
    """

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.Adam(
            self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay
        )
        steps = int(self.trainer.estimated_stepping_batches)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def fit(
    model: pl.LightningModule,
    datamodule: pl.LightningDataModule | None,
    epochs: int | None,
    callbacks: list[Callback] | None = None,
    seed: int = 0,
    *,
    max_steps: int = -1,
    loader: DataLoader | None = None,
) -> tuple[pl.Trainer, StepTimer]:
    """Train quietly on the CPU with a step timer; returns the trainer and the timer.

    ``datamodule`` for ``epochs``, or a training ``loader`` alone (no validation) for ``max_steps`` steps.
    """
    pl.seed_everything(seed, verbose=False)
    timer = StepTimer()
    trainer = pl.Trainer(
        max_epochs=epochs,
        max_steps=max_steps,
        limit_val_batches=None if loader is None else 0,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[timer, *(callbacks or [])],
    )
    trainer.fit(model, train_dataloaders=loader, datamodule=datamodule)
    return trainer, timer


def test_accuracy(model: pl.LightningModule, datamodule: pl.LightningDataModule) -> float:
    """Top-1 accuracy of ``model`` on the datamodule's test split."""
    model.eval()
    correct = total = 0
    with torch.inference_mode():
        for x, y in datamodule.test_dataloader():
            correct += int((model(x).argmax(-1) == y).sum())
            total += len(y)
    return correct / total


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A Markdown table of ``rows`` restricted to ``columns`` (floats with 4 significant digits)."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return "" if value is None else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def criterion_targets(losses: dict[str, float], label: str, metric: str) -> dict[str, bool]:
    """Wanda and SparseGPT against magnitude (``"l1"``) on one measure of damage (lower is better), each by
    ``criterion: damage``: less damage than magnitude, and at most half of it ("far better").

    Example::

        >>> criterion_targets({"l1": 0.4, "wanda": 0.3, "sparsegpt": 0.1}, "2:4 one-shot", "degradation")
        {'wanda 2:4 one-shot: less degradation than magnitude': True, 'wanda 2:4 one-shot: at most half the degradation of magnitude': False, 'sparsegpt 2:4 one-shot: less degradation than magnitude': True, 'sparsegpt 2:4 one-shot: at most half the degradation of magnitude': True}
    """
    met: dict[str, bool] = {}
    for criterion in ("wanda", "sparsegpt"):
        if criterion in losses and "l1" in losses:
            met[f"{criterion} {label}: less {metric} than magnitude"] = losses[criterion] < losses["l1"]
            met[f"{criterion} {label}: at most half the {metric} of magnitude"] = (
                losses[criterion] <= losses["l1"] / 2
            )
    return met


def input_spread(
    model: torch.nn.Module,
    layers: dict[str, torch.nn.Module],
    inputs: list[Any],
    positions: Callable[[Any], Any] | None = None,
) -> dict[str, float]:
    """How uneven the input features of ``layers`` are on ``inputs``: per layer, the largest over the median of its
    input features' norms (``√Σ x_j²``; an attention's packed projection: the largest of its query / key / value
    thirds'), summarized as the median and the largest over the layers; ``positions``: the calibration mask
    (``calibration_mask``) of the positions that count. Wanda's score ``|W| · ‖x_j‖`` departs
    from magnitude pruning as far as these norms differ.

    Example::

        >>> layer = torch.nn.Linear(4, 2)
        >>> spread = input_spread(layer, {"": layer}, [torch.tensor([[1.0, 1.0, 1.0, 8.0]])])
        >>> spread["median"], spread["max"]
        (8.0, 8.0)
    """
    from lightning_compress.pruning import collect_statistics

    stats = collect_statistics(
        model, {name: [layer] for name, layer in layers.items()}, inputs, positions=positions
    )
    ratios = []
    for stat in stats.values():
        norms = stat.sq_sum.sqrt()
        ratios.append(float((norms.max(-1).values / norms.median(-1).values).max()))
    return {"median": statistics.median(ratios), "max": max(ratios)}
