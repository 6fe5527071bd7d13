"""Wanda, SparseGPT and magnitude 2:4 one-shot pruning of the small GPT as it trains longer.

Wanda's large margin over magnitude pruning on billion-parameter models comes from their outlier features: a few
input features with norms far above the rest. This benchmark asks whether longer training grows such features in
the small GPT of :mod:`benchmarks.language_model` (the same :class:`examples.language.TinyGPT`, data pipeline and
optimizer, on more of the standard library's source): one pretraining run, its weights taken at several steps,
each copy pruned one-shot to 2:4 by ``prune_`` with each criterion (calibrated on the first training batches) and
measured by held-out perplexity, with the spread of the pruned layers' input-feature norms (largest / median per
layer, what Wanda weighs magnitudes by). ``share`` is a criterion's perplexity increase over magnitude's.

Configuration ``training_length`` (``python -m benchmarks run training_length``; ``--quick``: seconds).
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from benchmarks.common import Context, Result, input_spread, markdown_table
from benchmarks.common import fit as common_fit
from benchmarks.language_model import SPARSE_MODULES, lm, sparse_layers, train_loader
from benchmarks.language_model import Settings as ModelSettings
from examples.language import TokenWindows, load_corpus, perplexity
from lightning_compress.pruning import PruningConfig, prune_

TITLE = (
    "The small GPT trained longer: Wanda vs SparseGPT vs magnitude at 2:4 one-shot, and its input-norm spread"
)

CRITERIA = ("l1", "wanda", "sparsegpt")


@dataclass(frozen=True)
class Settings:
    """The full run's settings (about 25 minutes on one CPU thread)."""

    steps: tuple[int, ...] = (
        1200,
        2400,
        4800,
    )  # the weights are taken after these optimizer steps of one run
    train_bytes: int = 8_000_000
    val_bytes: int = 65_536
    block_size: int = 64
    d_model: int = 256
    n_heads: int = 4
    n_layers: int = 4
    batch_size: int = 16
    lr: float = 1e-3
    warmup_steps: int = 100
    calibration_batches: int = 8
    threads: int = 1
    seed: int = 0


QUICK = {
    "steps": (10, 20),
    "train_bytes": 40_000,
    "val_bytes": 4_096,
    "block_size": 32,
    "d_model": 32,
    "n_layers": 2,
    "batch_size": 8,
    "warmup_steps": 5,
    "calibration_batches": 2,
}


class Snapshots(Callback):
    """Copies of the model's weights after the optimizer steps given."""

    def __init__(self, steps: tuple[int, ...]) -> None:
        self.steps, self.states = set(steps), {}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if trainer.global_step in self.steps:
            self.states[trainer.global_step] = copy.deepcopy(pl_module.model.state_dict())


def measure(args: Settings) -> dict[str, Any]:
    sizes = ModelSettings(
        train_bytes=args.train_bytes,
        val_bytes=args.val_bytes,
        block_size=args.block_size,
        d_model=args.d_model,
        n_heads=args.n_heads,
        n_layers=args.n_layers,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    corpus = load_corpus(args.train_bytes, args.val_bytes, seed=args.seed)
    train = TokenWindows(corpus.train, args.block_size)
    val = TokenWindows(corpus.val, args.block_size)
    calibration = [x for x, _ in itertools.islice(train_loader(train, sizes), args.calibration_batches)]
    torch.manual_seed(args.seed)
    snapshots = Snapshots(args.steps)
    model = lm(sizes, args.lr, args.warmup_steps)
    common_fit(
        model,
        None,
        None,
        [snapshots],
        args.seed,
        max_steps=max(args.steps),
        loader=train_loader(train, sizes),
    )
    rows = []
    for step in args.steps:
        net = lm(sizes, args.lr, args.warmup_steps).model
        net.load_state_dict(snapshots.states[step])
        net.eval()
        spread = input_spread(net, sparse_layers(net), calibration)
        row: dict[str, Any] = {"step": step, "tokens_seen": step * args.batch_size * args.block_size}
        row |= {"dense": perplexity(net, val), "spread_median": spread["median"], "spread_max": spread["max"]}
        for criterion in CRITERIA:
            pruned = copy.deepcopy(net)
            config = PruningConfig(mode="2:4", criterion=criterion, modules=list(SPARSE_MODULES))
            prune_(pruned, config, calibration=calibration)
            row[criterion] = perplexity(pruned, val)
        for criterion in ("wanda", "sparsegpt"):
            row[f"{criterion}_share"] = (row[criterion] - row["dense"]) / (row["l1"] - row["dense"])
        rows.append(row)
        print(f"  step {step}: {row}", flush=True)
    return {"rows": rows, "train_tokens": len(corpus.train), "val_tokens": len(corpus.val)}


def run(args: Settings, context: Context) -> Result:
    torch.set_num_threads(args.threads)
    results = measure(args)
    return Result(results, report(results, args))


def report(results: dict[str, Any], args: Settings) -> str:
    columns = ["step", "tokens_seen", "dense", *CRITERIA, "wanda_share", "sparsegpt_share"]
    columns += ["spread_median", "spread_max"]
    rows = results["rows"]
    lines = [
        "## Held-out perplexity: dense, and pruned one-shot to 2:4 by each criterion\n\n"
        + markdown_table(rows, columns),
        f"Model: TinyGPT, {args.n_layers} pre-LN blocks of width {args.d_model}, {args.n_heads} heads, bytes, context "
        f"{args.block_size}. One run of {max(args.steps)} steps of {args.batch_size} windows on "
        f"{results['train_tokens']:,} training tokens (the standard library's `.py` files; AdamW lr {args.lr:g}, "
        f"{args.warmup_steps} warm-up steps, cosine to 10 % over the whole run), its weights taken after "
        f"{', '.join(map(str, args.steps))} steps; held-out perplexity on {results['val_tokens']:,} tokens of other "
        "files. Pruning: the blocks' weight matrices (as in `language_model`), 2:4, by `prune_` calibrated on the "
        f"first {args.calibration_batches} training batches. `share`: the criterion's perplexity increase over "
        "magnitude's (`l1`); `spread`: the largest over the median input-feature norm per pruned layer, the median "
        "and the largest over the layers.",
    ]
    first, last = rows[0], rows[-1]
    lines.append(
        f"From step {first['step']} to {last['step']} the dense perplexity went from {first['dense']:.3f} to "
        f"{last['dense']:.3f}; Wanda's share of magnitude's damage from {first['wanda_share']:.2f} to "
        f"{last['wanda_share']:.2f}, SparseGPT's from {first['sparsegpt_share']:.2f} to "
        f"{last['sparsegpt_share']:.2f}; the median spread from {first['spread_median']:.1f}x to "
        f"{last['spread_median']:.1f}x."
    )
    return "\n\n".join(lines)
