"""DataModules for the examples and benchmarks: scikit-learn digits (embedded) and Fashion-MNIST (Debian files)."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


class _TensorDataModule(pl.LightningDataModule):
    """Shared loader logic: in-memory tensors, unshuffled evaluation, seeded shuffling for training."""

    train_set: TensorDataset
    val_set: TensorDataset
    test_set: TensorDataset

    def __init__(self, batch_size: int, shuffle: bool, seed: int) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            self.train_set, batch_size=self.batch_size, shuffle=self.shuffle, generator=generator
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=256)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=256)


class DigitsDataModule(_TensorDataModule):
    """scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes), shipped inside the scikit-learn wheel.

    Images are scaled to ``[0, 1]`` and shaped ``(1, 8, 8)``. A fixed permutation splits them into
    train / validation / test (``val_fraction`` and ``test_fraction`` of the images each).

    Example::

        >>> dm = DigitsDataModule(batch_size=32)
        >>> dm.setup("fit")
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> tuple(x.shape), y.dtype, len(dm.train_set) + len(dm.val_set) + len(dm.test_set)
        ((32, 1, 8, 8), torch.int64, 1797)
    """

    num_classes = 10
    input_shape = (1, 8, 8)

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        shuffle: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, shuffle, seed)
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "train_set"):
            return
        try:
            from sklearn.datasets import load_digits
        except ImportError as err:
            raise ImportError(
                "The digits example needs scikit-learn: `pip install 'lightning-compress[examples]'`."
            ) from err
        digits = load_digits()
        x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        y = torch.tensor(digits.target, dtype=torch.long)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(1234))
        n_val, n_test = int(len(x) * self.val_fraction), int(len(x) * self.test_fraction)
        val, test, train = order[:n_val], order[n_val : n_val + n_test], order[n_val + n_test :]
        self.train_set = TensorDataset(x[train], y[train])
        self.val_set = TensorDataset(x[val], y[val])
        self.test_set = TensorDataset(x[test], y[test])


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzip-compressed or not, into a numpy array."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (header {data[:4]!r}).")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find(data_dir: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (data_dir / name).exists():
            return data_dir / name
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem}(.gz) not found in {data_dir}. On Debian/Ubuntu install it with "
        "`apt-get update && apt-get install -y dataset-fashion-mnist` (files land in "
        f"{FASHION_MNIST_DIR}), or pass `data_dir` pointing at the four IDX files."
    )


class FashionMNISTDataModule(_TensorDataModule):
    """Fashion-MNIST (60,000 train + 10,000 test 28x28 images, 10 classes) read from local IDX files.

    The last ``val_size`` training images are held out for validation; the official test set is the test split.
    Normalized with the training-set mean 0.2860 and std 0.3530. Set ``flatten=True`` for MLPs.

    Args:
        data_dir: folder with ``train-images-idx3-ubyte.gz`` etc. (default: the Debian package's folder).
        batch_size: training batch size.
        val_size: training images held out for validation.
        flatten: return images as 784-vectors instead of ``(1, 28, 28)``.
        limit_train: use only the first N training images (quick runs).
    """

    num_classes = 10

    def __init__(
        self,
        data_dir: str | os.PathLike = FASHION_MNIST_DIR,
        batch_size: int = 128,
        val_size: int = 5000,
        flatten: bool = False,
        limit_train: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, shuffle, seed)
        self.data_dir = Path(data_dir)
        self.val_size = val_size
        self.flatten = flatten
        self.limit_train = limit_train
        self.input_shape = (784,) if flatten else (1, 28, 28)

    def _load(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        images = read_idx(_find(self.data_dir, f"{split}-images-idx3-ubyte"))
        labels = read_idx(_find(self.data_dir, f"{split}-labels-idx1-ubyte"))
        x = (torch.from_numpy(images.astype(np.float32)) / 255.0 - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
        x = x.reshape(len(x), -1) if self.flatten else x.unsqueeze(1)
        return x, torch.from_numpy(labels.astype(np.int64))

    def prepare_data(self) -> None:
        for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte"):
            _find(self.data_dir, stem)

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "train_set"):
            return
        x, y = self._load("train")
        n_train = len(x) - self.val_size
        train_x, train_y = x[:n_train], y[:n_train]
        if self.limit_train is not None:
            train_x, train_y = train_x[: self.limit_train], train_y[: self.limit_train]
        self.train_set = TensorDataset(train_x, train_y)
        self.val_set = TensorDataset(x[n_train:], y[n_train:])
        self.test_set = TensorDataset(*self._load("t10k"))
