"""Half the MACs of a residual CNN on the digits, with per-layer levels chosen by CompressionBudget.

    python -m examples.budget_digits [--target 0.5] [--remove-blocks 1]

Trains the CNN dense, then fine-tunes it with ``CompressionBudget("prune_structured", target, metric="macs")``
handing each channel group its own amount of channels to ``GradualPruning(mode="structured")``; with
``--remove-blocks`` a ``StochasticDepth`` first removes that many residual blocks. Prints the sensitivity table,
the allocation, and the MACs and accuracy before and after.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning.pytorch as pl
import torch

from examples.data import DigitsDataModule
from examples.models import ImageClassifier
from lightning_compress import CompressionBudget, GradualPruning, StochasticDepth
from lightning_compress.stats import count_macs_per_sample


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dense-epochs", type=int, default=6)
    parser.add_argument("--max-epochs", type=int, default=6)
    parser.add_argument("--target", type=float, default=0.5, help="fraction of the MACs kept")
    parser.add_argument("--remove-blocks", type=int, default=0, help="residual blocks to remove first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=Path("runs/digits_budget"))
    args = parser.parse_args(argv)

    pl.seed_everything(args.seed, verbose=False)
    data = DigitsDataModule(batch_size=64)
    model = ImageClassifier("residual_cnn", arch_kwargs={"widths": (16, 32, 64)})
    quiet = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_model_summary=False)
    pl.Trainer(max_epochs=args.dense_epochs, default_root_dir=args.output, **quiet).fit(model, data)
    example = torch.zeros(1, 1, 8, 8)
    before = {"macs": count_macs_per_sample(model, example), **_test(model, data, args.output)}

    callbacks: list[pl.Callback] = [
        CompressionBudget("prune_structured", target=args.target, metric="macs", plots=False),
        GradualPruning(mode="structured", round_to=1),  # no amount: the budget gives one per layer
    ]
    if args.remove_blocks:
        callbacks.append(StochasticDepth(survival=1.0, remove=args.remove_blocks))
    pl.Trainer(max_epochs=args.max_epochs, default_root_dir=args.output, callbacks=callbacks, **quiet).fit(
        model, data
    )
    after = {"macs": count_macs_per_sample(model, example), **_test(model, data, args.output)}
    budget: CompressionBudget = callbacks[0]  # type: ignore[assignment]
    print(
        f"MACs per sample {before['macs']:,} -> {after['macs']:,} ({after['macs'] / before['macs']:.2f} of dense, "
        f"target {args.target}); test accuracy {before['test_acc']:.4f} -> {after['test_acc']:.4f}"
    )
    return {"before": before, "after": after, "levels": dict(budget.levels), "allocation": budget.allocation}


def _test(model: pl.LightningModule, data: DigitsDataModule, root: Path) -> dict[str, float]:
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=root)
    return {"test_acc": float(trainer.test(model, data, verbose=False)[0]["test_acc"])}


if __name__ == "__main__":
    main()
