"""GPU checks: the CUDA paths of the callbacks, Lightning's FSDP strategy, and 2:4 sparse kernel speed.

Configuration ``gpu_check`` (``python -m benchmarks run gpu_check`` on a machine with a CUDA GPU). Each check is
independent; a failing one is recorded with its error and the others still run.
"""

from __future__ import annotations

import json
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from benchmarks.common import Context, Result, Unavailable, check_known, markdown_table
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


def _fit(pruning: GradualPruning, *extra: Callback, epochs: int, **trainer_kwargs: Any) -> dict[str, Any]:
    pl.seed_everything(0, verbose=False)
    check = ZerosAfterSteps(pruning)
    model = ImageClassifier("small_cnn")
    trainer = pl.Trainer(
        accelerator="gpu",
        devices=1,
        max_epochs=epochs,
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


def unstructured_cuda(epochs: int) -> dict[str, Any]:
    return _fit(GradualPruning(amount=0.8, start=0.0, end=0.5), epochs=epochs)


def structured_cuda(epochs: int) -> dict[str, Any]:
    return _fit(
        GradualPruning(amount=0.5, mode="structured", criterion="taylor", start=0.1, end=0.6), epochs=epochs
    )


def unstructured_bf16_mixed(epochs: int) -> dict[str, Any]:
    return _fit(GradualPruning(amount=0.8, start=0.0, end=0.5), epochs=epochs, precision="bf16-mixed")


def pruning_with_self_distillation_and_low_rank_cuda(epochs: int) -> dict[str, Any]:
    from lightning_compress import KnowledgeDistillation, LowRankReplacement

    return _fit(
        GradualPruning(amount=0.5, start=0.0, end=0.5, modules="net.8"),
        LowRankReplacement(rank=0.5, modules="net.10"),
        KnowledgeDistillation(teacher="self"),
        epochs=epochs,
    )


def fsdp_single_gpu(epochs: int) -> dict[str, Any]:
    from lightning.pytorch.strategies import FSDPStrategy

    return _fit(
        GradualPruning(amount=0.8, start=0.0, end=0.5),
        strategy=FSDPStrategy(use_orig_params=True),
        epochs=epochs,
    )


def fsdp_flat_params_fail_clearly(epochs: int) -> dict[str, Any]:
    from lightning.pytorch.strategies import FSDPStrategy

    try:
        _fit(
            GradualPruning(amount=0.8, start=0.0, end=0.5),
            strategy=FSDPStrategy(use_orig_params=False),
            epochs=epochs,
        )
    except ValueError as err:
        return {"error": str(err)}
    return {"error": None}


def two_four_speed(epochs: int) -> dict[str, Any]:
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


CHECKS: dict[str, Callable[[int], dict[str, Any]]] = {
    "unstructured_cuda": unstructured_cuda,
    "structured_cuda": structured_cuda,
    "unstructured_bf16_mixed": unstructured_bf16_mixed,
    "pruning_with_self_distillation_and_low_rank_cuda": pruning_with_self_distillation_and_low_rank_cuda,
    "fsdp_single_gpu": fsdp_single_gpu,
    "fsdp_flat_params_fail_clearly": fsdp_flat_params_fail_clearly,
    "two_four_speed": two_four_speed,
}


TITLE = "GPU checks: the CUDA paths of the callbacks, FSDP, and 2:4 sparse kernel speed"


@dataclass(frozen=True)
class Settings:
    """The full run's settings."""

    checks: tuple[str, ...] = tuple(CHECKS)
    epochs: int = 2  # epochs of each fit on the digits (the 2:4 timing has none)

    def __post_init__(self) -> None:
        check_known(self.checks, CHECKS, "checks")


QUICK = {"checks": ("unstructured_cuda", "structured_cuda", "two_four_speed"), "epochs": 1}


def run(settings: Settings, context: Context) -> Result:
    if not torch.cuda.is_available():
        raise Unavailable("gpu_check needs a CUDA GPU.")
    results: dict[str, Any] = {"gpu": torch.cuda.get_device_name(0)}
    rows = []
    for name in settings.checks:
        try:
            results[name] = {"ok": True, **CHECKS[name](settings.epochs)}
        except Exception as err:
            results[name] = {
                "ok": False,
                "error": f"{type(err).__name__}: {err}",
                "trace": traceback.format_exc(),
            }
        print(name, json.dumps(results[name], default=str)[:2000], flush=True)
        shown = {k: v for k, v in results[name].items() if k not in ("trace", "rows")}
        rows.append(
            {"check": name, "ok": results[name]["ok"], "details": json.dumps(shown, default=str)[:300]}
        )
    text = markdown_table(rows, ["check", "ok", "details"])
    speed = results.get("two_four_speed", {}).get("rows")
    if speed:
        text += "\n\n2:4 sparse vs dense fp16 Linear (median of CUDA-event timings):\n\n" + markdown_table(
            speed, list(speed[0])
        )
    return Result(results, text)
