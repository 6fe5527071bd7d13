import os

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from examples.models import ImageClassifier, ResidualBlock

# Tests run on the CPU with a fixed thread count so results are reproducible.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    pl.seed_everything(0, verbose=False)


@pytest.fixture(scope="session")
def digits():
    from examples.data import DigitsDataModule

    dm = DigitsDataModule(batch_size=64, shuffle=False)
    dm.setup("fit")
    return dm


def trainer_kwargs(tmp_path, **overrides):
    """Quiet, deterministic CPU Trainer settings for tests."""
    kwargs = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        deterministic=True,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        logger=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
    )
    kwargs.update(overrides)
    return kwargs


class StopAfterFirstEpoch(Callback):
    """Ends a fit after its first epoch: the run that writes the checkpoint a resume test starts from."""

    def on_train_epoch_end(self, trainer, pl_module):
        trainer.should_stop = True


class RecordSteps(Callback):
    """The global step at the start of every training batch: shows where a resumed fit really started."""

    def __init__(self):
        self.steps = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.steps.append(trainer.global_step)


class SGDClassifier(ImageClassifier):
    """An :class:`ImageClassifier` trained with SGD (optimizer state that resume must restore), not Adam."""

    def __init__(
        self, arch: str = "small_cnn", *, lr: float = 0.05, momentum: float = 0.9, weight_decay: float = 0.0
    ) -> None:
        super().__init__(arch)
        self.sgd = dict(lr=lr, momentum=momentum, weight_decay=weight_decay)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), **self.sgd)


def fit_or_resume(tmp_path, digits, model, callbacks, ckpt_path=None, checkpoint=None, **trainer_overrides):
    """Fits ``model`` on the digits with ``callbacks`` (``None`` entries skipped) and one validation batch.

    With ``checkpoint`` (a ``ModelCheckpoint``) the fit writes checkpoints and stops after its first epoch: the
    run a resume test starts from. With ``ckpt_path`` the fit resumes from that checkpoint. Returns the trainer.
    """
    callbacks = [c for c in callbacks if c is not None]
    callbacks += [checkpoint, StopAfterFirstEpoch()] if checkpoint else []
    overrides = dict(enable_checkpointing=checkpoint is not None, limit_val_batches=1, **trainer_overrides)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, **overrides), callbacks=callbacks)
    trainer.fit(model, datamodule=digits, ckpt_path=ckpt_path)
    return trainer


class MaskedEncoder(pl.LightningModule):
    """A transformers-style module: ``forward(input_ids, attention_mask)``, dict batches with labels (see
    :func:`dict_batches`); padded positions are zeroed before the layers, so the mask changes what they see."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(16, 32)
        self.proj, self.head = torch.nn.Linear(32, 32), torch.nn.Linear(32, 4)

    def forward(self, input_ids, attention_mask):
        hidden = torch.relu(self.proj(self.embed(input_ids) * attention_mask.unsqueeze(-1)))
        return self.head(hidden.sum(1) / attention_mask.sum(1, keepdim=True))

    def training_step(self, batch, batch_idx):
        return torch.nn.functional.cross_entropy(
            self(batch["input_ids"], batch["attention_mask"]), batch["labels"]
        )

    def validation_step(self, batch, batch_idx):
        loss = torch.nn.functional.cross_entropy(
            self(batch["input_ids"], batch["attention_mask"]), batch["labels"]
        )
        self.log("val_loss", loss)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def dict_batches(n=48, seed=0):
    """Batches of 8 ``{"input_ids", "attention_mask", "labels"}`` dicts: 6 tokens, 1 to 6 of them real."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 16, (n, 6), generator=generator)
    mask = (torch.arange(6) < torch.randint(1, 7, (n, 1), generator=generator)).long()
    items = [
        {"input_ids": i, "attention_mask": m, "labels": i[0] % 4} for i, m in zip(ids, mask, strict=True)
    ]
    return torch.utils.data.DataLoader(items, batch_size=8)


class PaddedAttention(torch.nn.Module):
    """Tokens -> self-attention that ignores padded keys -> Linear, laid out (batch, positions) or (positions,
    batch); the padded positions still run through every layer, with inputs of their own."""

    def __init__(self, batch_first=True, classes=4):
        super().__init__()
        self.batch_first = batch_first
        self.embed = torch.nn.Embedding(16, 8)
        self.attn = torch.nn.MultiheadAttention(8, 2, batch_first=batch_first)
        self.fc = torch.nn.Linear(8, classes)

    def forward(self, input_ids, attention_mask):
        x = self.embed(input_ids) if self.batch_first else self.embed(input_ids).transpose(0, 1)
        padded = attention_mask == 0
        return self.fc(self.attn(x, x, x, key_padding_mask=padded, need_weights=False)[0])


class TiedLM(pl.LightningModule):
    """A tiny language model: an embedding whose weight is also the decoder's (tied), a residual layer between."""

    def __init__(self, momentum: float = 0.0):
        super().__init__()
        self.momentum = momentum
        self.emb = torch.nn.Embedding(32, 16)
        self.mid = torch.nn.Linear(16, 16)
        self.dec = torch.nn.Linear(16, 32, bias=False)
        self.dec.weight = self.emb.weight
        self.example_input_array = torch.zeros(1, 4, dtype=torch.long)

    def forward(self, tokens):
        h = self.emb(tokens)
        return self.dec(h + torch.relu(self.mid(h)))

    def training_step(self, batch, batch_idx):
        (tokens,) = batch
        logits = self(tokens[:, :-1])
        return torch.nn.functional.cross_entropy(logits.reshape(-1, 32), tokens[:, 1:].reshape(-1))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=self.momentum)

    def train_dataloader(self):
        tokens = torch.randint(0, 32, (64, 6), generator=torch.Generator().manual_seed(0))
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(tokens), batch_size=8)


class NetClassifier(pl.LightningModule):
    """``net`` trained on ``(x, y)`` batches with cross entropy and SGD; ``example_input_array`` when given."""

    def __init__(self, net, example_input_array=None, lr=0.1, momentum=0.0):
        super().__init__()
        self.net, self.example_input_array, self.lr, self.momentum = net, example_input_array, lr, momentum

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)


class ResidualNet(pl.LightningModule):
    """A small residual CNN with batch norm, held as ``self.net`` (two residual blocks share no ReLU)."""

    def __init__(self, width: int = 8, lr: float = 1e-2) -> None:
        super().__init__()
        self.lr = lr
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(1, width, 3, padding=1, bias=False),
            torch.nn.BatchNorm2d(width),
            torch.nn.ReLU(),
            ResidualBlock(width, width),
            ResidualBlock(width, 2 * width, stride=2),
            torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(),
            torch.nn.Linear(2 * width, 10),
        )
        self.example_input_array = torch.zeros(2, 1, 8, 8)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)
