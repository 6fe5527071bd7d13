"""A small GPT on the standard library's source: low-bit QAT against PTQ, width pruning with and without
self-distillation, and unstructured / 2:4 sparsity, side by side.

:class:`examples.language.TinyGPT` (bytes, a few million parameters) is pretrained on the source files of Python's
standard library (split into training and validation by file; the weights are cached under the run's folder and
reused), then every arm is fine-tuned the same number of steps from those weights, with the same data order and a
cosine learning-rate decay:

- ``dense``: the pretrained model as it is, and ``dense_ft``: fine-tuned with no compression (the fair reference);
- ``ptq_<scheme>_<bits>bit``: ``quantize_low_bit`` of the fine-tuned float model (4- and 3-bit weights in groups of
  32), against ``qat_<scheme>_<bits>bit``: ``QuantizationAwareTraining`` fine-tuning from the pretrained weights, converted at the end to
  the same torchao format; the share of the PTQ degradation that QAT recovers is
  ``(ppl_ptq - ppl_qat) / (ppl_ptq - ppl_dense_ft)``;
- ``width`` and ``width_kd``: ``GradualPruning(mode="structured")`` of attention heads and MLP neurons to at most
  half the MACs per token (the heads and neurons removed at the end), alone and with
  ``KnowledgeDistillation(teacher="self")`` from the uncompressed model;
- ``<criterion>_<mode>_oneshot`` and ``<criterion>_<mode>``: 50 % unstructured and 2:4 sparsity of the blocks'
  ``nn.Linear`` weights by ``GradualPruning(criterion=...)`` for each of :data:`CRITERIA`, evaluated right after
  the mask is set (a one-step fit at learning rate 0) and after fine-tuning with the mask.

Every arm reports held-out perplexity, parameters (and nonzero ones), MACs per token and the CPU latency of one
forward pass over a ``block_size`` sequence, timed interleaved with the others (median of repeats), as ratios to
``dense``.

Configuration ``language_model`` (``python -m benchmarks run language_model``); a larger model, e.g. on a GPU
machine: ``python -m benchmarks.language_model --width 512``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import itertools
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader

from benchmarks.common import (
    Context,
    Result,
    StepTimer,
    check_known,
    criterion_targets,
    input_spread,
    machine,
    markdown_table,
    shown,
)
from benchmarks.common import fit as common_fit
from examples.language import LanguageModel, TokenWindows, load_corpus, perplexity
from lightning_compress import GradualPruning, KnowledgeDistillation, QuantizationAwareTraining
from lightning_compress.pruning import PruningConfig, prune_
from lightning_compress.quantization import degradation_recovered, quantize_low_bit
from lightning_compress.stats import compare_latency, count_macs_per_sample, count_nonzero, count_parameters

TITLE = "A small GPT on Python source: low-bit QAT vs PTQ, width pruning + self-distillation, 2:4 and 50 % sparsity"

# Pruning criteria of the sparsity arms: each adds a one-shot and a fine-tuned arm per mode of SPARSE_MODES.
CRITERIA = ["l1", "wanda", "sparsegpt"]
SPARSE_MODES = ("unstructured", "2:4")
QAT_SCHEMES = ("int8-dynamic-intx", "intx-weight-only", "int4-weight-only")
# Width pruning: the attention heads and the MLP's hidden neurons (the residual stream keeps its width).
WIDTH_MODULES = ("*blocks.*.attn", "*blocks.*.mlp.fc1")
# Sparsity: the blocks' nn.Linear layers, and with each attention's out_proj its packed q/k/v input projection.
SPARSE_MODULES: tuple[Any, ...] = (nn.Linear, "*blocks.*")
# nn.MultiheadAttention reads its output projection's weight directly: QAT cannot swap that layer.
QUANT_EXCLUDE = ("*.out_proj",)


@dataclass(frozen=True)
class Settings:
    """The full run's settings (about 20 minutes on one CPU thread: on a shared 2-core machine a second thread mostly
    waits for a busy core)."""

    train_bytes: int = 2_000_000  # training tokens (bytes of the training files)
    val_bytes: int = 65_536  # held-out tokens (bytes of other files)
    block_size: int = 64
    d_model: int = 256
    n_heads: int = 4
    n_layers: int = 4
    mlp_ratio: int = 4
    batch_size: int = 16
    pretrain_steps: int = 1200
    pretrain_lr: float = 1e-3
    warmup_steps: int = 100
    finetune_steps: int = 200  # every arm, from the pretrained weights
    finetune_lr: float = 3e-4
    schemes: tuple[str, ...] = ("int8-dynamic-intx",)  # low-bit QAT / PTQ schemes
    bits: tuple[int, ...] = (4, 3)  # weight bits of the QAT / PTQ arms, one pair each
    group_size: int = 32
    macs_reduction: float = 2.0  # width pruning: at most 1 / this of the dense MACs per token
    prune_end: float = 0.5  # width and sparsity pruning ramps (AGP) over this fraction of fine-tuning
    alpha: float = 0.5  # self-distillation
    temperature: float = 1.0
    sparsity: float = 0.5  # unstructured amount
    criteria: tuple[str, ...] | None = None  # None: CRITERIA
    sparse_modes: tuple[str, ...] = SPARSE_MODES
    latency_batch: int = 1
    repeats: int = 10
    threads: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        check_known(self.schemes, QAT_SCHEMES, "schemes")
        check_known(self.sparse_modes, SPARSE_MODES, "sparse_modes")


QUICK = {
    "train_bytes": 40_000,
    "val_bytes": 4_096,
    "block_size": 32,
    "d_model": 32,
    "n_heads": 4,
    "n_layers": 2,
    "batch_size": 8,
    "pretrain_steps": 30,
    "warmup_steps": 5,
    "finetune_steps": 8,
    "repeats": 2,
    "threads": 1,
}


def criteria(settings: Settings) -> list[str]:
    """The pruning criteria of the sparsity arms: the settings' or :data:`CRITERIA`."""
    return list(settings.criteria) if settings.criteria is not None else list(CRITERIA)


class ZeroLearningRate(Callback):
    """Sets every learning rate to 0 before the first step: the fit only applies the callbacks' masks."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = 0.0
        for config in trainer.lr_scheduler_configs:
            config.scheduler.base_lrs = [0.0 for _ in config.scheduler.base_lrs]


def lm(settings: Settings, lr: float, warmup: int) -> LanguageModel:
    """A :class:`LanguageModel` of the settings' sizes."""
    return LanguageModel(
        block_size=settings.block_size,
        d_model=settings.d_model,
        n_heads=settings.n_heads,
        n_layers=settings.n_layers,
        mlp_ratio=settings.mlp_ratio,
        lr=lr,
        warmup_steps=warmup,
    )


def train_loader(windows: TokenWindows, settings: Settings) -> DataLoader:
    """Shuffled windows in the same order for every fit (a generator seeded with the settings' seed)."""
    generator = torch.Generator().manual_seed(settings.seed)
    return DataLoader(
        windows, batch_size=settings.batch_size, shuffle=True, generator=generator, drop_last=True
    )


def fit(
    model: pl.LightningModule, loader: DataLoader, steps: int, callbacks: list[Callback], seed: int
) -> StepTimer:
    """``steps`` optimizer steps on the CPU, quietly, with a step timer; returns the timer."""
    return common_fit(model, None, None, callbacks, seed, max_steps=steps, loader=loader)[1]


def pretrained(
    settings: Settings, loader: DataLoader, context: Context
) -> tuple[dict[str, torch.Tensor], dict]:
    """The pretrained weights, from the cache under the run's folder or trained (and cached) now."""
    keys = ("train_bytes", "block_size", "d_model", "n_heads", "n_layers", "mlp_ratio", "batch_size")
    keys += ("pretrain_steps", "pretrain_lr", "warmup_steps", "seed")
    described = {k: getattr(settings, k) for k in keys}
    digest = hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:12]
    path = context.files / f"pretrained_{digest}.ckpt"  # *.ckpt: not versioned
    if path.exists():
        stored = torch.load(path, weights_only=True)
        context.note(f"Pretrained weights reused from `{shown(path)}` (same sizes, data and steps).")
        return stored["state_dict"], stored["info"]
    torch.manual_seed(settings.seed)
    model = lm(settings, settings.pretrain_lr, settings.warmup_steps)
    timer = fit(model, loader, settings.pretrain_steps, [], settings.seed)
    info = {"pretrain_step_ms": timer.median_ms, "pretrain_seconds": sum(timer.times)}
    state = {k: v.detach().clone() for k, v in model.model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state, "info": info}, path)
    return state, info


def width_amount(model: nn.Module, example: torch.Tensor, reduction: float, steps: int = 100) -> float:
    """The smallest amount on the grid ``i / steps`` whose width-pruned ``model`` has at most 1 / ``reduction`` of
    its MACs (searched by pruning copies)."""
    limit = count_macs_per_sample(model, example) / reduction

    def macs(amount: float) -> int:
        pruned = copy.deepcopy(model)
        config = PruningConfig(amount=amount, mode="structured", modules=list(WIDTH_MODULES), round_to=8)
        prune_(pruned, config, example_input=example)
        return count_macs_per_sample(pruned, example)

    low, high = 0, steps - 1  # the amount `high / steps` is kept under the limit by the search
    if macs(high / steps) > limit:
        raise ValueError(f"Width pruning cannot reach {reduction}x fewer MACs on this model.")
    while low < high:
        middle = (low + high) // 2
        if macs(middle / steps) <= limit:
            high = middle
        else:
            low = middle + 1
    return high / steps


def sparse_pruning(mode: str, criterion: str, amount: float, end: float) -> GradualPruning:
    """The sparsity arms' callback: ``mode`` (``"unstructured"`` at ``amount``, or ``"2:4"``) by ``criterion`` on
    the blocks' ``nn.Linear`` layers, from the first step to ``end`` (``0.0``: at once)."""
    return GradualPruning(
        amount=amount if mode == "unstructured" else None,
        mode=mode,
        criterion=criterion,
        modules=list(SPARSE_MODULES),
        start=0.0,
        end=end,
    )


def sparse_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers the sparsity arms prune whose inputs run through ``forward``: the blocks' ``nn.Linear`` and
    attention modules (each attention's output projection is read by the attention itself)."""
    return {
        name: module
        for name, module in model.named_modules()
        if name.startswith("blocks.")
        and (
            isinstance(module, nn.MultiheadAttention)
            or (isinstance(module, nn.Linear) and ".attn." not in name)
        )
    }


def widths(model: nn.Module) -> str:
    """The attention heads and MLP neurons per block of a TinyGPT, e.g. ``"heads 2,2; mlp 512,496"``.

    Example::

        >>> from examples.language import TinyGPT
        >>> widths(TinyGPT(block_size=8, d_model=16, n_heads=2, n_layers=2))
        'heads 2,2; mlp 64,64'
    """
    heads = ",".join(str(block.attn.num_heads) for block in model.blocks)
    neurons = ",".join(str(block.mlp.fc1.out_features) for block in model.blocks)
    return f"heads {heads}; mlp {neurons}"


def measure(
    name: str, model: nn.Module, example: torch.Tensor, val: TokenWindows, **extra: Any
) -> dict[str, Any]:
    """Held-out perplexity, parameters (and nonzero ones), MACs per token and widths of one arm's model."""
    tokens = example.shape[1]
    return {
        "arm": name,
        "val_ppl": perplexity(model, val),
        "params": count_parameters(model),
        "nonzero_params": count_nonzero(model),
        "macs_per_token": count_macs_per_sample(model, example) / tokens,
        "widths": widths(model),
        **extra,
    }


def run_arms(settings: Settings, context: Context) -> dict[str, Any]:
    corpus = load_corpus(settings.train_bytes, settings.val_bytes, seed=settings.seed)
    train = TokenWindows(corpus.train, settings.block_size)
    val = TokenWindows(corpus.val, settings.block_size)
    state, info = pretrained(settings, train_loader(train, settings), context)
    example = torch.zeros(1, settings.block_size, dtype=torch.long)
    lr, steps, seed = settings.finetune_lr, settings.finetune_steps, settings.seed

    def start() -> LanguageModel:
        model = lm(settings, lr, 0)
        model.model.load_state_dict(state)
        return model

    rows: list[dict[str, Any]] = []
    models: dict[str, nn.Module] = {}

    def arm(name: str, callbacks: list[Callback], arm_steps: int = steps, **extra: Any) -> nn.Module:
        model = start()
        # A fresh loader per fit: every arm sees the same batches in the same order.
        loader = train_loader(train, settings)
        timer = fit(model, loader, arm_steps, callbacks, seed) if arm_steps else None
        net = model.model.eval()
        step_ms = timer.median_ms if timer is not None and arm_steps > 1 else None
        rows.append(measure(name, net, example, val, step_ms=step_ms, **extra))
        models[name] = net
        return net

    arm("dense", [], 0, method="none (pretrained)")
    calibration = [x for x, _ in itertools.islice(train_loader(train, settings), 8)]
    spread = input_spread(models["dense"], sparse_layers(models["dense"]), calibration)
    dense_ft = arm("dense_ft", [], method="none")
    recovered: dict[str, float] = {}
    parity: dict[str, Any] = {}
    for scheme in settings.schemes:
        for bits in settings.bits:
            quant = dict(bits=bits, group_size=settings.group_size, exclude=list(QUANT_EXCLUDE))
            tag, label = f"{scheme}_{bits}bit", f"{scheme!r}, bits={bits}"
            ptq = quantize_low_bit(copy.deepcopy(dense_ft), scheme, **quant)
            rows.append(
                measure(f"ptq_{tag}", ptq, example, val, method=f"quantize_low_bit(dense_ft, {label})")
            )
            models[f"ptq_{tag}"] = ptq
            qat = QuantizationAwareTraining(scheme=scheme, **quant)
            arm(f"qat_{tag}", [qat], method=f"QuantizationAwareTraining({label})")
            parity[tag] = qat.parity
            by = {r["arm"]: r["val_ppl"] for r in rows}
            recovered[tag] = degradation_recovered(by["dense_ft"], by[f"ptq_{tag}"], by[f"qat_{tag}"])

    amount = width_amount(start().model.eval(), example, settings.macs_reduction)

    def width() -> GradualPruning:
        return GradualPruning(
            amount=amount, mode="structured", modules=list(WIDTH_MODULES), round_to=8, end=settings.prune_end
        )

    arm("width", [width()], method=f"GradualPruning(structured, amount={amount:g})")
    distill = KnowledgeDistillation(teacher="self", alpha=settings.alpha, temperature=settings.temperature)
    arm("width_kd", [width(), distill], method=f"GradualPruning(structured, amount={amount:g}) + KD(self)")

    for criterion in criteria(settings):
        for mode in settings.sparse_modes:
            tag = f"{criterion}_{mode.replace(':', 'of')}"
            label = f"GradualPruning({mode}, {criterion})"
            oneshot = [sparse_pruning(mode, criterion, settings.sparsity, 0.0), ZeroLearningRate()]
            arm(f"{tag}_oneshot", oneshot, 1, method=f"{label}, one-shot")
            fine_tuned = [sparse_pruning(mode, criterion, settings.sparsity, settings.prune_end)]
            arm(tag, fine_tuned, method=f"{label}, fine-tuned")

    batch = example.expand(settings.latency_batch, -1).contiguous()
    timed = {r["arm"]: models[r["arm"]] for r in rows if not r["arm"].endswith("_oneshot")}
    latency = compare_latency(
        timed, batch, repeats=settings.repeats, warmup=2, threads=torch.get_num_threads()
    )
    dense = rows[0]
    for row in rows:
        row["params_ratio"] = dense["params"] / row["params"]
        row["macs_ratio"] = dense["macs_per_token"] / row["macs_per_token"]
        row["sparsity"] = 1 - row["nonzero_params"] / row["params"]
        result = latency.get(row["arm"])
        if result is None:  # a one-shot arm has its fine-tuned arm's structure and kernels
            result = latency[row["arm"].removesuffix("_oneshot")]
        row["latency_ms"] = result.median_ms
        row["speedup"] = latency["dense"].median_ms / result.median_ms
    return {
        "rows": rows,
        "recovered": recovered,
        "qat_parity": parity,
        "width_amount": amount,
        "input_spread": spread,
        "pretrained_info": info,
        "train_files": len(corpus.train_files),
        "val_files": len(corpus.val_files),
        "train_tokens": len(corpus.train),
        "val_tokens": len(corpus.val),
        "latency_threads": torch.get_num_threads(),
    }


def targets(results: dict[str, Any]) -> dict[str, bool]:
    """Targets: QAT recovers at least two thirds of the PTQ degradation; width pruning halves the MACs;
    self-distillation does at least as well as width pruning alone; Wanda and SparseGPT raise the perplexity less
    than magnitude at 2:4 one-shot, and by at most half as much (:func:`benchmarks.common.criterion_targets`).

    Example::

        >>> rows = [{"arm": "dense", "macs_ratio": 1.0, "val_ppl": 3.0}, {"arm": "width", "macs_ratio": 2.0,
        ...     "val_ppl": 4.0}, {"arm": "width_kd", "macs_ratio": 2.0, "val_ppl": 3.9}]
        >>> targets({"rows": rows, "recovered": {"int8-dynamic-intx": 0.5}})
        {'int8-dynamic-intx: QAT recovers >= 2/3 of the PTQ degradation': False, 'width: >= 2x fewer MACs per token': True, 'width_kd: perplexity <= width': True}
    """
    by = {r["arm"]: r for r in results["rows"]}
    met = {
        f"{scheme}: QAT recovers >= 2/3 of the PTQ degradation": value >= 2 / 3
        for scheme, value in results["recovered"].items()
    }
    if "width" in by:
        met["width: >= 2x fewer MACs per token"] = by["width"]["macs_ratio"] >= 2.0 - 1e-9
    if "width" in by and "width_kd" in by:
        met["width_kd: perplexity <= width"] = by["width_kd"]["val_ppl"] <= by["width"]["val_ppl"]
    if "dense" in by:
        increase = {
            arm.removesuffix("_2of4_oneshot"): row["val_ppl"] - by["dense"]["val_ppl"]
            for arm, row in by.items()
            if arm.endswith("_2of4_oneshot")
        }
        met.update(criterion_targets(increase, "2:4 one-shot", "perplexity increase"))
    return met


def observations(results: dict[str, Any]) -> list[str]:
    """Plain statements of what the numbers show: quantized arms no faster than dense, distillation's effect.

    Example::

        >>> rows = [{"arm": "dense", "val_ppl": 3.0, "speedup": 1.0}, {"arm": "qat_x", "val_ppl": 3.1,
        ...     "speedup": 0.5}, {"arm": "width", "val_ppl": 4.0, "speedup": 1.6}, {"arm": "width_kd",
        ...     "val_ppl": 3.8, "speedup": 1.6}]
        >>> for line in observations({"rows": rows}):
        ...     print(line)
        `qat_x` is measured slower than dense on this CPU (0.50x): the low-bit weights save memory, not time, with these kernels.
        Self-distillation lowered the width-pruned model's perplexity from 4.000 to 3.800 (-5.0 %; one seed).
    """
    by = {r["arm"]: r for r in results["rows"]}
    lines = [
        f"`{arm}` is measured slower than dense on this CPU ({row['speedup']:.2f}x): the low-bit "
        "weights save memory, not time, with these kernels."
        for arm, row in by.items()
        if arm.startswith(("ptq_", "qat_")) and row["speedup"] < 1.0
    ]
    for tag, share in results.get("recovered", {}).items():
        reference, ptq = by["dense_ft"]["val_ppl"], by[f"ptq_{tag}"]["val_ppl"]
        if math.isfinite(share) and ptq < 1.01 * reference:
            lines.append(
                f"`{tag}`: PTQ raised the perplexity by only {100 * (ptq / reference - 1):.2f} % ({reference:.3f} to "
                f"{ptq:.3f}; QAT {by[f'qat_{tag}']['val_ppl']:.3f}), so the recovered share ({100 * share:.0f} %) "
                "is a ratio of small differences from one seed."
            )
    if "width" in by and "width_kd" in by:
        alone, distilled = by["width"]["val_ppl"], by["width_kd"]["val_ppl"]
        verb = "lowered" if distilled < alone else "did not lower"
        lines.append(
            f"Self-distillation {verb} the width-pruned model's perplexity from {alone:.3f} to {distilled:.3f} "
            f"({100 * (distilled / alone - 1):+.1f} %; one seed)."
        )
    return lines


def report(results: dict[str, Any], settings: Settings) -> str:
    """The Markdown table, the settings and the targets of a results dictionary."""
    columns = ["arm", "method", "widths", "val_ppl", "params", "params_ratio", "sparsity", "macs_per_token"]
    columns += ["macs_ratio", "latency_ms", "speedup", "step_ms"]
    info = results["pretrained_info"]
    dense = results["rows"][0]
    recovered = "; ".join(
        f"`{scheme}`: {100 * value:.1f} %" if math.isfinite(value) else f"`{scheme}`: PTQ lost nothing"
        for scheme, value in results["recovered"].items()
    )
    lines = [
        "## Arms, fine-tuned alike from the same pretrained weights\n\n"
        + markdown_table(results["rows"], columns),
        f"Model: TinyGPT, {settings.n_layers} pre-LN blocks of width {settings.d_model}, {settings.n_heads} heads, "
        f"MLP {settings.mlp_ratio}x, byte vocabulary (256), context {settings.block_size}; {dense['params']:,} "
        f"parameters. Data: the `.py` files of Python's standard library, split by file ("
        f"{results['train_files']} training files, {results['train_tokens']:,} tokens; {results['val_files']} "
        f"held-out files, {results['val_tokens']:,} tokens). Pretrained {settings.pretrain_steps} steps of "
        f"{settings.batch_size} windows (AdamW lr {settings.pretrain_lr:g}, {settings.warmup_steps} warm-up steps, "
        f"cosine to 10 %; median step {info['pretrain_step_ms']:.0f} ms), then every arm fine-tuned "
        f"{settings.finetune_steps} steps from those weights (lr {settings.finetune_lr:g}, cosine to 10 %, the same "
        "data order). `val_ppl`: exp of the mean next-token cross entropy over the held-out windows.",
        f"Quantization: {' and '.join(map(str, settings.bits))}-bit weights in groups of {settings.group_size} on every `nn.Linear` but the "
        "attention output projections (which `nn.MultiheadAttention` reads directly); PTQ rounds the fine-tuned "
        "float model (`dense_ft`), QAT fine-tunes from the pretrained weights with fake quantization and converts "
        "to the same torchao format. Share of the PTQ perplexity increase recovered by QAT, "
        f"(ppl_ptq - ppl_qat) / (ppl_ptq - ppl_dense_ft): {recovered}.",
        f"Width pruning: attention heads and MLP neurons (`GradualPruning(mode='structured', modules="
        f"{list(WIDTH_MODULES)}, round_to=8)`), the amount {results['width_amount']:g} the smallest on a grid of 1/100 "
        f"whose model has at most 1/{settings.macs_reduction:g} of the dense MACs per token, ramped (AGP) over the "
        f"first {settings.prune_end:g} of fine-tuning and removed at the end; `width_kd` adds "
        f"`KnowledgeDistillation(teacher='self', alpha={settings.alpha:g}, temperature={settings.temperature:g})`, "
        "the teacher being the pretrained model.",
        f"Sparsity: the blocks' weight matrices (the attention's packed q/k/v and output projections, the MLP), "
        f"{settings.sparsity:g} unstructured or 2:4; "
        "`_oneshot` arms are evaluated right after the mask is set (a one-step fit at learning rate 0), the others "
        f"after fine-tuning (the amount ramped over the first {settings.prune_end:g}). The masked weights are stored "
        "dense and run on dense kernels: their latency is the dense model's; `sparsity` is the fraction of zeros "
        "among all parameters. Spread of the pruned layers' input-feature norms on 8 training batches (largest / "
        f"median per layer, what Wanda weighs magnitudes by): median {results['input_spread']['median']:.1f}x, "
        f"largest {results['input_spread']['max']:.1f}x.",
        f"MACs per token: counted on one sequence of {settings.block_size} tokens, divided by its length. Latency: "
        f"one forward pass of a ({settings.latency_batch}, {settings.block_size}) batch, eval mode, inference_mode, "
        f"{results['latency_threads']} torch thread(s), the models timed interleaved, 3 rounds x {settings.repeats} "
        "calls after warm-up, medians; speed-up = dense / arm. `step_ms`: median training step.",
        *observations(results),
        "Targets: "
        + "; ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in results["targets"].items())
        + ".",
    ]
    return "\n\n".join(lines)


def run(args: Settings, context: Context) -> Result:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    results = run_arms(args, context)
    results["targets"] = targets(results)
    return Result(results, report(results, args))


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.language_model [--width D] [--heads H] [--quick]``: the configuration at another model
    size (e.g. on a GPU machine), written as ``runs/benchmarks/language_model_width<D>.{json,md}``."""
    from benchmarks import runner
    from benchmarks.configs import Config

    parser = argparse.ArgumentParser(prog="python -m benchmarks.language_model", description=TITLE)
    parser.add_argument("--width", type=int, default=None, help="d_model (default: the configuration's)")
    parser.add_argument(
        "--heads", type=int, default=None, help="attention heads (default: the configuration's)"
    )
    parser.add_argument("--quick", action="store_true", help="small sizes (results under runs/benchmarks/)")
    parser.add_argument("--output", default=None, help="folder of the result files")
    args = parser.parse_args(argv)
    changes = {k: v for k, v in (("d_model", args.width), ("n_heads", args.heads)) if v is not None}
    config = Config("language_model", changes)
    settings = dataclasses.replace(
        config.build(args.quick), **changes
    )  # the sizes asked for, also when quick
    name = "language_model" + "".join(
        f"_{label}{value}" for label, value in (("width", args.width), ("heads", args.heads)) if value
    )
    # Published results come from `python -m benchmarks run language_model`; other sizes are written aside.
    folder = Path(args.output) if args.output else runner.QUICK_OUTPUT
    context = Context(name, quick=args.quick, output=folder)
    started, began, cpu = machine(), time.perf_counter(), runner.cpu_seconds()
    result = run(settings, context)
    command = "python -m benchmarks.language_model" + (" " + " ".join(argv) if argv else "")
    seconds, cpu = time.perf_counter() - began, runner.cpu_seconds() - cpu
    outcome = runner.Outcome(name, args.quick, command, seconds, result, context.notes, cpu)
    path = runner.write(outcome, config, settings, started, folder)
    print(path.read_text())
    return 0


if __name__ == "__main__":
    import logging
    import warnings

    # As `python -m benchmarks`: the program's own output only.
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    raise SystemExit(main(sys.argv[1:]))
