"""GPU checks: the CUDA paths of the callbacks, Lightning's FSDP strategy, and 2:4 sparse kernel speed.

Run from the repository root on a machine with a CUDA GPU::

    python -m benchmarks.gpu_check --out benchmarks/results

Each check is independent; a failing one is recorded with its error and the others still run.
"""

from __future__ import annotations

import argparse
import json
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from benchmarks.common import machine
from examples.data import DigitsDataModule
from examples.models import ImageClassifier
from lightning_compress import GradualPruning
from lightning_compress.pruning.masks import nm_masks
from lightning_compress.pruning.semi_structured import to_semi_structured


class ZerosAfterSteps(Callback):
    """Counts masked weights that are not exactly zero after optimizer steps."""

    def __init__(self, pruning: GradualPruning) -> None:
        self.pruning = pruning
        self.violations = 0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        params = dict(pl_module.named_parameters())
        for name, mask in self.pruning.masks.items():
            self.violations += int((params[name].detach()[~mask.to(params[name].device)] != 0).sum())


def _fit(pruning: GradualPruning, *extra: Callback, **trainer_kwargs: Any) -> dict[str, Any]:
    pl.seed_everything(0, verbose=False)
    check = ZerosAfterSteps(pruning)
    model = ImageClassifier("small_cnn")
    trainer = pl.Trainer(
        accelerator="gpu",
        devices=1,
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[pruning, check, *extra],
        **trainer_kwargs,
    )
    trainer.fit(model, datamodule=DigitsDataModule())
    val = trainer.validate(model, datamodule=DigitsDataModule(), verbose=False)[0]
    weights = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    return {
        "device": str(next(model.parameters()).device),
        "violations_after_steps": check.violations,
        "val_acc": val["val_acc"],
        "weight_sparsity": sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights),
        "channels": [model.net[0].out_channels, model.net[3].out_channels],
        "materialize_max_abs_diff": pruning.materialize_max_abs_diff,
    }


def unstructured_cuda() -> dict[str, Any]:
    return _fit(GradualPruning(amount=0.8, start=0.0, end=0.5))


def structured_cuda() -> dict[str, Any]:
    return _fit(GradualPruning(amount=0.5, mode="structured", criterion="taylor", start=0.1, end=0.6))


def unstructured_bf16_mixed() -> dict[str, Any]:
    return _fit(GradualPruning(amount=0.8, start=0.0, end=0.5), precision="bf16-mixed")


def pruning_with_self_distillation_and_low_rank_cuda() -> dict[str, Any]:
    from lightning_compress import KnowledgeDistillation, LowRankReplacement

    return _fit(
        GradualPruning(amount=0.5, start=0.0, end=0.5, modules="net.8"),
        LowRankReplacement(rank=0.5, modules="net.10"),
        KnowledgeDistillation(teacher="self"),
    )


def fsdp_single_gpu() -> dict[str, Any]:
    from lightning.pytorch.strategies import FSDPStrategy

    return _fit(GradualPruning(amount=0.8, start=0.0, end=0.5), strategy=FSDPStrategy(use_orig_params=True))


def fsdp_flat_params_fail_clearly() -> dict[str, Any]:
    from lightning.pytorch.strategies import FSDPStrategy

    try:
        _fit(GradualPruning(amount=0.8, start=0.0, end=0.5), strategy=FSDPStrategy(use_orig_params=False))
    except ValueError as err:
        return {"error": str(err)}
    return {"error": None}


def two_four_speed() -> dict[str, Any]:
    from torch.sparse import SparseSemiStructuredTensor

    torch.manual_seed(0)
    rows = []
    backends = ["cutlass"] + (["cusparselt"] if torch.backends.cusparselt.is_available() else [])
    for backend in backends:
        SparseSemiStructuredTensor._FORCE_CUTLASS = backend == "cutlass"
        for features, batch in ((4096, 4096), (8192, 8192), (8192, 64)):
            layer = nn.Linear(features, features, bias=False).cuda().half()
            with torch.no_grad():
                layer.weight.mul_(nm_masks({"w": layer.weight}, 2, 4)["w"])
            x = torch.randn(batch, features, device="cuda", dtype=torch.half)
            with torch.inference_mode():
                dense = layer(x)
            dense_ms = _time_cuda(layer, x)
            sparse_model = nn.Sequential(layer)
            to_semi_structured(sparse_model, strict=True)
            with torch.inference_mode():
                sparse = sparse_model(x)
            sparse_ms = _time_cuda(sparse_model, x)
            rows.append(
                {
                    "backend": backend,
                    "features": features,
                    "batch": batch,
                    "dense_ms": dense_ms,
                    "sparse_2_4_ms": sparse_ms,
                    "speedup": dense_ms / sparse_ms,
                    "max_rel_diff": float((sparse - dense).abs().max() / dense.abs().max()),
                }
            )
    SparseSemiStructuredTensor._FORCE_CUTLASS = False
    return {"rows": rows, "cusparselt_available": torch.backends.cusparselt.is_available()}


def _time_cuda(module: nn.Module, x: torch.Tensor, repeats: int = 50) -> float:
    with torch.inference_mode():
        for _ in range(10):
            module(x)
        torch.cuda.synchronize()
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            module(x)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


CHECKS: dict[str, Callable[[], dict[str, Any]]] = {
    "unstructured_cuda": unstructured_cuda,
    "structured_cuda": structured_cuda,
    "unstructured_bf16_mixed": unstructured_bf16_mixed,
    "pruning_with_self_distillation_and_low_rank_cuda": pruning_with_self_distillation_and_low_rank_cuda,
    "fsdp_single_gpu": fsdp_single_gpu,
    "fsdp_flat_params_fail_clearly": fsdp_flat_params_fail_clearly,
    "two_four_speed": two_four_speed,
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--only", nargs="*", default=None)
    args = parser.parse_args(argv)
    results: dict[str, Any] = {"machine": {**machine(), "gpu": torch.cuda.get_device_name(0)}}
    for name, check in CHECKS.items():
        if args.only and name not in args.only:
            continue
        try:
            results[name] = {"ok": True, **check()}
        except Exception as err:
            results[name] = {
                "ok": False,
                "error": f"{type(err).__name__}: {err}",
                "trace": traceback.format_exc(),
            }
        print(name, json.dumps(results[name], default=str)[:2000], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
