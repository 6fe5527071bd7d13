"""Train a small GPT on the standard library's source, then prune it to 2:4 with SparseGPT and fine-tune.

``python -m examples.prune_gpt`` (about two minutes on 2 CPU cores) prints the held-out perplexity of the dense
model, right after the one-shot pruning and after fine-tuning with the 2:4 masks held.
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from examples.language import LanguageModel, TokenWindows, load_corpus, perplexity
from lightning_compress import GradualPruning


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--criterion", default="sparsegpt", help="'l1', 'wanda' or 'sparsegpt'")
    parser.add_argument("--train-bytes", type=int, default=300_000)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--steps", type=int, default=300, help="dense training steps")
    parser.add_argument("--finetune-steps", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    pl.seed_everything(args.seed, verbose=False)
    corpus = load_corpus(train_bytes=args.train_bytes, val_bytes=16_384, seed=args.seed)
    train, val = TokenWindows(corpus.train, 64), TokenWindows(corpus.val, 64)
    model = LanguageModel(block_size=64, d_model=args.d_model, n_heads=4, n_layers=2, warmup_steps=20)
    quiet = dict(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_model_summary=False,
        enable_progress_bar=False, limit_val_batches=0, num_sanity_val_steps=0,
    )  # fmt: skip

    def fit(steps: int, callbacks: list[pl.Callback]) -> None:
        loader = DataLoader(
            train, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(args.seed)
        )
        pl.Trainer(max_steps=steps, callbacks=callbacks, **quiet).fit(model, loader)

    fit(args.steps, [])
    dense = perplexity(model.model, val)
    # One-shot at the first step (start = end), then fine-tuning with the masks held.
    pruning = GradualPruning(mode="2:4", criterion=args.criterion, start=0.0, end=0.0, calibration_batches=4)
    one_shot: dict[str, float] = {}

    class AfterPruning(pl.Callback):  # runs after GradualPruning set the masks, before the first step
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if not one_shot:
                one_shot["ppl"] = perplexity(pl_module.model, val)

    fit(args.finetune_steps, [pruning, AfterPruning()])
    tuned = perplexity(model.model, val)
    zeros = {
        n: float((p == 0).float().mean()) for n, p in model.model.named_parameters() if n.endswith("weight")
    }
    print(
        f"held-out perplexity: dense {dense:.3f}, 2:4 {args.criterion} one-shot {one_shot['ppl']:.3f}, "
        f"after {args.finetune_steps} fine-tuning steps {tuned:.3f}"
    )
    return {"dense": dense, "one_shot": one_shot["ppl"], "fine_tuned": tuned, "zeros": zeros}


if __name__ == "__main__":
    main()
