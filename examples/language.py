"""A small GPT on offline text: the Python standard library's source, byte by byte.

- :func:`stdlib_files` / :func:`load_corpus`: a fixed list of the ``.py`` files of the running Python's standard
  library (``sysconfig.get_paths()["stdlib"]``), split into training and validation *by file*, as byte tensors (a
  vocabulary of 256, no tokenizer);
- :class:`TokenWindows`: ``(input, target)`` windows of a byte tensor, the target shifted by one;
- :class:`TinyGPT`: a decoder-only transformer (token and learned position embeddings, pre-LN blocks with
  ``nn.MultiheadAttention`` under a causal mask and a GELU MLP, a final LayerNorm and a linear head), initialized
  as GPT-2;
- :class:`LanguageModel`: the LightningModule around it (next-token cross entropy, AdamW with a cosine decay, logs
  ``val_loss`` and ``val_ppl``).

Every piece is deterministic on the CPU for a given seed and the same Python installation.
"""

from __future__ import annotations

import functools
import math
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

VOCAB_SIZE = 256  # one token per byte
SKIPPED_FOLDERS = ("site-packages", "dist-packages", "__pycache__")


def stdlib_files(root: str | Path | None = None) -> list[Path]:
    """The ``.py`` files of the standard library (or under ``root``), sorted by their path relative to it.

    Installed third-party packages (``site-packages``, ``dist-packages``) are left out.

    Example::

        >>> files = stdlib_files()
        >>> len(files) > 100 and files == sorted(files)
        True
    """
    return list(_python_files(Path(root if root is not None else sysconfig.get_paths()["stdlib"])))


@functools.lru_cache(maxsize=4)
def _python_files(base: Path) -> tuple[Path, ...]:
    # Walking the standard library takes seconds: the corpora of one process share one walk.
    if not base.is_dir():
        raise FileNotFoundError(
            f"`root={str(base)!r}` is not a folder; give the folder of the .py files to read."
        )
    found = [
        p
        for p in base.rglob("*.py")
        if p.is_file() and not set(p.relative_to(base).parts) & set(SKIPPED_FOLDERS)
    ]
    return tuple(sorted(found, key=lambda p: p.relative_to(base).as_posix()))


@dataclass(frozen=True)
class Corpus:
    """Training and validation bytes, and the files each came from (relative paths)."""

    train: Tensor
    val: Tensor
    train_files: tuple[str, ...]
    val_files: tuple[str, ...]


def load_corpus(
    train_bytes: int = 2_000_000,
    val_bytes: int = 200_000,
    val_fraction: float = 0.1,
    seed: int = 0,
    root: str | Path | None = None,
) -> Corpus:
    """Bytes of the standard library's source, split by file: no file is in both splits.

    The sorted file list is shuffled with ``seed``; every file whose position ``i`` in that order has
    ``i % round(1 / val_fraction) == 0`` is a validation file, the others training files. Files are concatenated
    in that order (each followed by a newline) until each split holds ``train_bytes`` / ``val_bytes`` bytes.

    Args:
        train_bytes: size of the training split (bytes, i.e. tokens).
        val_bytes: size of the validation split.
        val_fraction: the share of files that go to validation.
        seed: the shuffle of the file list.
        root: folder of the ``.py`` files (default: the standard library).

    Example::

        >>> corpus = load_corpus(train_bytes=20_000, val_bytes=5_000)
        >>> len(corpus.train), len(corpus.val), corpus.train.dtype
        (20000, 5000, torch.uint8)
        >>> set(corpus.train_files) & set(corpus.val_files)
        set()
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"`val_fraction={val_fraction}` must lie in (0, 1), e.g. 0.1.")
    base = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    files = stdlib_files(base)
    order = list(range(len(files)))
    random.Random(seed).shuffle(order)
    every = max(2, round(1 / val_fraction))
    splits: dict[str, tuple[list[bytes], list[str], int]] = {
        "train": ([], [], train_bytes),
        "val": ([], [], val_bytes),
    }
    filled = {"train": 0, "val": 0}
    for i, index in enumerate(order):
        split = "val" if i % every == 0 else "train"
        chunks, names, limit = splits[split]
        if filled[split] >= limit:
            if all(filled[s] >= splits[s][2] for s in splits):
                break
            continue
        data = files[index].read_bytes() + b"\n"
        chunks.append(data)
        names.append(files[index].relative_to(base).as_posix())
        filled[split] += len(data)
    tensors = {}
    for split, (chunks, _, limit) in splits.items():
        data = b"".join(chunks)[:limit]
        if len(data) < limit:
            raise ValueError(
                f"The files under {str(base)!r} hold only {len(data):,} bytes for the {split} split; ask for fewer "
                f"(`{split}_bytes={limit:,}`)."
            )
        tensors[split] = torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()
    return Corpus(tensors["train"], tensors["val"], tuple(splits["train"][1]), tuple(splits["val"][1]))


class TokenWindows(Dataset):
    """``(input, target)`` windows of ``block_size`` tokens, the target shifted by one position.

    Window ``i`` starts at ``i * stride``; both tensors are ``int64``.

    Args:
        tokens: a 1-D tensor of token ids.
        block_size: tokens per window.
        stride: offset between consecutive windows (default ``block_size``: no overlap).

    Example::

        >>> windows = TokenWindows(torch.arange(10), block_size=4)
        >>> len(windows), windows[1]
        (2, (tensor([4, 5, 6, 7]), tensor([5, 6, 7, 8])))
    """

    def __init__(self, tokens: Tensor, block_size: int, stride: int | None = None) -> None:
        if tokens.dim() != 1:
            raise ValueError(f"`tokens` must be 1-D, got shape {tuple(tokens.shape)}.")
        self.stride = stride or block_size
        if block_size < 1 or self.stride < 1:
            raise ValueError(f"`block_size={block_size}` and `stride={stride}` must be positive.")
        if len(tokens) < block_size + 1:
            raise ValueError(
                f"{len(tokens)} tokens are too few for one window of `block_size={block_size}` (+1)."
            )
        self.tokens, self.block_size = tokens, block_size

    def __len__(self) -> int:
        return (len(self.tokens) - self.block_size - 1) // self.stride + 1

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        chunk = self.tokens[i * self.stride : i * self.stride + self.block_size + 1].long()
        return chunk[:-1], chunk[1:]


def causal_mask(length: int, device: torch.device | None = None) -> Tensor:
    """``(length, length)`` boolean mask, ``True`` where position ``t`` may not attend (keys after ``t``).

    Example::

        >>> causal_mask(3).int()
        tensor([[0, 1, 1],
                [0, 0, 1],
                [0, 0, 0]], dtype=torch.int32)
    """
    return torch.ones(length, length, dtype=torch.bool, device=device).triu(1)


class MLP(nn.Module):
    """``fc2(gelu(fc1(x)))``: the feed-forward part of a block (its hidden neurons are what width pruning removes)."""

    def __init__(self, d_model: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.fc2(self.act(self.fc1(x))))


class Block(nn.Module):
    """A pre-LN transformer block: ``x + attn(ln1(x))`` under a causal mask, then ``x + mlp(ln2(x))``."""

    def __init__(self, d_model: int, n_heads: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model, hidden, dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        h = self.ln1(x)
        mask = causal_mask(x.shape[1], x.device)
        attended, _ = self.attn(h, h, h, attn_mask=mask, need_weights=False, is_causal=True)
        x = x + self.dropout(attended)
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    """A decoder-only transformer over bytes: ``(batch, time)`` token ids to ``(batch, time, vocab)`` logits.

    Weights are initialized as GPT-2's: normal with standard deviation 0.02 (embeddings, projections), zero biases,
    and ``0.02 / sqrt(2 * n_layers)`` for the projections that write into the residual stream (``attn.out_proj``,
    ``mlp.fc2``).

    Args:
        vocab_size: number of token ids (256: bytes).
        block_size: the longest input (learned positions).
        d_model: width of the residual stream.
        n_heads: attention heads per block.
        n_layers: blocks.
        mlp_ratio: hidden neurons of each MLP per unit of ``d_model``.
        dropout: dropout of the attention weights, the attention output and the MLP output.

    Example::

        >>> model = TinyGPT(block_size=16, d_model=32, n_heads=2, n_layers=2)
        >>> tuple(model(torch.randint(0, 256, (3, 16))).shape)
        (3, 16, 256)
    """

    def __init__(
        self,
        vocab_size: int = VOCAB_SIZE,
        block_size: int = 128,
        d_model: int = 256,
        n_heads: int = 4,
        n_layers: int = 4,
        mlp_ratio: int = 4,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"`d_model={d_model}` must be a multiple of `n_heads={n_heads}`.")
        self.block_size = block_size
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(block_size, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            Block(d_model, n_heads, mlp_ratio * d_model, dropout) for _ in range(n_layers)
        )
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)
        self._init_weights(n_layers)

    def _init_weights(self, n_layers: int) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, nn.MultiheadAttention):
                nn.init.normal_(module.in_proj_weight, std=0.02)
                nn.init.zeros_(module.in_proj_bias)
        for block in self.blocks:
            for linear in (block.attn.out_proj, block.mlp.fc2):
                nn.init.normal_(linear.weight, std=0.02 / math.sqrt(2 * n_layers))

    def forward(self, idx: Tensor) -> Tensor:
        t = idx.shape[1]
        if t > self.block_size:
            raise ValueError(f"Input of {t} tokens is longer than `block_size={self.block_size}`.")
        positions = torch.arange(t, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(positions))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def language_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean next-token cross entropy of ``(batch, time, vocab)`` logits against ``(batch, time)`` targets.

    Example::

        >>> round(float(language_loss(torch.zeros(2, 3, 256), torch.zeros(2, 3, dtype=torch.long))), 4)  # ln 256
        5.5452
    """
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


@torch.no_grad()
def perplexity(model: nn.Module, windows: Dataset, batch_size: int = 32) -> float:
    """``exp`` of the mean next-token cross entropy of ``model`` over every window (eval mode, no gradients).

    Example::

        >>> windows = TokenWindows(torch.randint(0, 256, (200,)), block_size=16)
        >>> model = TinyGPT(block_size=16, d_model=32, n_heads=2, n_layers=1)
        >>> 200 < perplexity(model, windows) < 320  # near uniform over 256 bytes at initialization
        True
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for x, y in DataLoader(windows, batch_size=batch_size):
            logits = model(x)
            total += float(
                F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1), reduction="sum")
            )
            count += y.numel()
    finally:
        model.train(was_training)
    return math.exp(total / count)


class LanguageModel(pl.LightningModule):
    """TinyGPT trained on next-token prediction: AdamW, linear warm-up then cosine decay to 10 % (per step).

    Logs ``train_loss``, ``val_loss`` (mean over the validation windows) and ``val_ppl`` (its exponential).

    Args:
        block_size, d_model, n_heads, n_layers, mlp_ratio, dropout: the :class:`TinyGPT`'s sizes.
        lr: peak learning rate.
        weight_decay: AdamW's decay (on matrices only: not on biases, LayerNorms and embeddings).
        warmup_steps: linear warm-up steps.
        min_lr_ratio: the learning rate at the last step, as a fraction of ``lr``.

    Example::

        >>> lm = LanguageModel(block_size=16, d_model=32, n_heads=2, n_layers=1)
        >>> tuple(lm(lm.example_input_array).shape)
        (1, 16, 256)
    """

    def __init__(
        self,
        block_size: int = 128,
        d_model: int = 256,
        n_heads: int = 4,
        n_layers: int = 4,
        mlp_ratio: int = 4,
        dropout: float = 0.0,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.1,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = TinyGPT(VOCAB_SIZE, block_size, d_model, n_heads, n_layers, mlp_ratio, dropout)
        self.example_input_array = torch.zeros(1, block_size, dtype=torch.long)
        self._val: list[tuple[float, int]] = []

    def forward(self, idx: Tensor) -> Tensor:
        return self.model(idx)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = language_loss(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        loss = language_loss(self(x), y)
        self._val.append((float(loss) * y.numel(), y.numel()))

    def on_validation_epoch_end(self) -> None:
        if not self._val:
            return
        loss = sum(s for s, _ in self._val) / sum(n for _, n in self._val)
        self._val.clear()
        self.log("val_loss", loss)
        self.log("val_ppl", math.exp(min(loss, 50.0)))

    def configure_optimizers(self) -> Any:
        decay = [p for n, p in self.named_parameters() if p.dim() >= 2 and "emb" not in n]
        rest = [p for n, p in self.named_parameters() if not (p.dim() >= 2 and "emb" not in n)]
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": self.hparams.weight_decay},
                {"params": rest, "weight_decay": 0.0},
            ],
            lr=self.hparams.lr,
            betas=(0.9, 0.95),
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup, floor = self.hparams.warmup_steps, self.hparams.min_lr_ratio

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
