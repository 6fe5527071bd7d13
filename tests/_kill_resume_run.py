"""One fit of the composed pipeline (low-rank, structured pruning, self-distillation, int8 QAT) for the
kill-and-resume tests.

Imported by ``tests/test_kill_resume.py`` for the uninterrupted and the resumed fits, and run as a script
(``python -m tests._kill_resume_run ROOT DENSE_WEIGHTS``) for the fit that is killed: the environment variable
``KILL_AT`` names the point (see :data:`KILL_POINTS`), where the process ends itself with SIGKILL, so no
Python cleanup, no ``finally`` block and no Lightning teardown runs. Checkpoints go to ``ROOT/ckpt`` (every
:data:`STEPS_PER_EPOCH` optimizer steps, i.e. at the last batch of every epoch, plus ``last.ckpt``); just before
dying the process writes ``ROOT/killed.json`` with the step it died at.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader, Sampler, TensorDataset

from lightning_compress import (
    GradualPruning,
    KnowledgeDistillation,
    LowRankReplacement,
    QuantizationAwareTraining,
)
from tests import conftest

# The same thread count as the test process (tests/conftest.py): the fits must agree to the bit.
torch.set_num_threads(min(2, os.cpu_count() or 1))

TRAIN_SAMPLES = 64
BATCH_SIZE = 32
STEPS_PER_EPOCH = TRAIN_SAMPLES // BATCH_SIZE
EPOCHS = 3
TOTAL_STEPS = STEPS_PER_EPOCH * EPOCHS
# GradualPruning's defaults (start=0.0, end=0.7) update the masks at every step from 0 to 4 of these 6.
PRUNING_UPDATE_STEP = 3
BOUNDARY_EPOCH = 2
# Where the killed fit dies:
# - "pruning_update": inside GradualPruning's mask update of step PRUNING_UPDATE_STEP, after the new masks
#   zeroed the weights in memory (mid-epoch; the last checkpoint is from the end of the previous epoch);
# - "epoch_boundary": at the start of epoch BOUNDARY_EPOCH, an ordinary point between two epochs;
# - "qat_convert": at the end of training, when QuantizationAwareTraining's int8 conversion starts (after
#   GradualPruning removed the pruned channels and the graph was prepared again on the smaller structure).
# For "qat_convert" the last checkpoint is the one of the last step: the resumed fit takes no step, it only
# finishes (removes the channels, converts).
KILL_POINTS = ("pruning_update", "epoch_boundary", "qat_convert")


class ResidualNet(conftest.ResidualNet):
    """The tests' tiny residual CNN (width 8); records the loss of every optimizer step it takes."""

    def __init__(self, width: int = 8, lr: float = 1e-2) -> None:
        super().__init__(width, lr)
        self.losses: dict[int, float] = {}

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        self.losses[self.trainer.global_step] = loss.detach().item()
        return loss


class EpochShuffle(Sampler[int]):
    """A new order every epoch that depends on the epoch only (Lightning calls ``set_epoch``, also on resume)."""

    def __init__(self, size: int, seed: int = 0) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


def digits() -> tuple[TensorDataset, TensorDataset]:
    """The first TRAIN_SAMPLES digits of the examples' training split, and 64 validation digits."""
    from examples.data import DigitsDataModule

    dm = DigitsDataModule()
    dm.setup("fit")
    train = TensorDataset(*(t[:TRAIN_SAMPLES] for t in dm.train_set.tensors))
    val = TensorDataset(*(t[:64] for t in dm.val_set.tensors))
    return train, val


class DigitsSubset(pl.LightningDataModule):
    def __init__(self) -> None:
        super().__init__()
        self.train_set, self.val_set = digits()

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=BATCH_SIZE, sampler=EpochShuffle(len(self.train_set)))


def dense_model(dense_path: str | os.PathLike) -> ResidualNet:
    """The model the compressed fit starts from, with the weights saved at ``dense_path`` (as every process
    must: ``teacher='self'`` is rebuilt from them on resume)."""
    model = ResidualNet()
    model.load_state_dict(torch.load(dense_path, weights_only=True))
    return model


def pipeline() -> list[Callback]:
    """The four callbacks with the arguments of docs/composition.md, listed in the order of the composition
    test (the opposite of the order they take effect in)."""
    return [
        QuantizationAwareTraining(),
        KnowledgeDistillation(teacher="self"),
        GradualPruning(amount=0.5, mode="structured"),
        LowRankReplacement(rank=0.5, verbose=False),
    ]


def _die(root: Path, trainer: pl.Trainer, point: str, **facts: Any) -> None:
    facts.update(point=point, global_step=trainer.global_step)
    root.mkdir(parents=True, exist_ok=True)
    (root / "killed.json").write_text(json.dumps(facts))
    os.kill(os.getpid(), signal.SIGKILL)


class _KillAtEpochStart(Callback):
    def __init__(self, root: Path, epoch: int) -> None:
        self.root, self.epoch = root, epoch

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            _die(self.root, trainer, "epoch_boundary")


def _arm(point: str, root: Path, callbacks: list[Callback], trainer: pl.Trainer) -> None:
    """Make the fit die at ``point`` (wrapping the callbacks' own methods on these instances only)."""
    _, _, pruning, _ = callbacks
    if point == "pruning_update":
        update = pruning._update_masks

        def update_then_die(trainer: pl.Trainer, pl_module: pl.LightningModule, target: float) -> None:
            update(trainer, pl_module, target)
            if trainer.global_step == PRUNING_UPDATE_STEP:
                _die(root, trainer, point)

        pruning._update_masks = update_then_die  # type: ignore[method-assign]
    elif point == "qat_convert":
        import lightning_compress.quantization.int8_qat as int8_module

        def die_converting(*args: Any, **kwargs: Any) -> Any:
            _die(root, trainer, point, channels_removed=pruning.materialized)

        int8_module.convert_int8 = die_converting  # type: ignore[assignment]
    elif point != "epoch_boundary":
        raise ValueError(f"KILL_AT={point!r}: choose one of {KILL_POINTS}.")


def fit(
    root: str | os.PathLike, dense_path: str | os.PathLike, kill_at: str | None = None, ckpt_path: Any = None
) -> tuple[ResidualNet, list[Callback], pl.Trainer]:
    """Fit the pipeline for EPOCHS epochs from the dense weights; checkpoints every epoch's last step."""
    root = Path(root)
    pl.seed_everything(0, verbose=False)
    model = dense_model(dense_path)
    callbacks = pipeline()
    checkpoint = ModelCheckpoint(
        dirpath=root / "ckpt", every_n_train_steps=STEPS_PER_EPOCH, save_top_k=-1, save_last=True
    )
    extra: list[Callback] = [checkpoint]
    if kill_at == "epoch_boundary":
        extra.append(_KillAtEpochStart(root, BOUNDARY_EPOCH))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=EPOCHS,
        deterministic=True,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        logger=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[*callbacks, *extra],
    )
    if kill_at is not None:
        _arm(kill_at, root, callbacks, trainer)
    trainer.fit(model, DigitsSubset(), ckpt_path=ckpt_path)
    return model, callbacks, trainer


if __name__ == "__main__":
    root, dense = Path(sys.argv[1]), sys.argv[2]
    fit(root, dense, kill_at=os.environ["KILL_AT"])
    sys.exit(f"KILL_AT={os.environ['KILL_AT']}: the fit ended without reaching the kill point")
