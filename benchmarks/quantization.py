"""Int8 quantization on Fashion-MNIST, side by side in one run: fp32 vs torchao post-training int8 vs QAT int8.

The model is the residual CNN of the pruning benchmark (``examples/models.py``, ``residual_cnn``, widths ``widths``):

- ``fp32``: trained ``epochs`` at lr 1e-3, then ``finetune_epochs`` at the fine-tuning lr (batch norm
  statistics settle at the low learning rate: evaluated right after the high-lr epochs the model is several
  points worse);
- ``PTQ int8``: that fp32 model, torchao PT2E post-training static int8 (``quantize_int8_ptq``: X86 inductor
  quantizer, calibrated on training batches), no training;
- ``QAT int8``: that fp32 model fine-tuned ``qat_epochs`` more with ``QuantizationAwareTraining``, converted
  to int8 at the end;
- ``fp32 (same steps as QAT)``: that fp32 model fine-tuned the same ``qat_epochs`` more without quantization,
  to separate what QAT costs from what the extra epochs bring.

Reported: test accuracy, the size of the saved ``.pt2`` program (``save_quantized``, the same for all) and the
ratio to fp32, CPU latency at batch 1 and 64 of every model compiled the same way (``compile_for_cpu``:
``torch.compile`` with inductor freezing, static shapes; timed interleaved after warm-up, medians), and the
training step time of QAT vs fp32 fine-tuning. Targets: QAT within 0.3 point of fp32 and at least PTQ's
accuracy; >= 3.5x smaller; >= 5x faster than fp32 at batch 64 and >= 1.3x at batch 1; QAT step <= 1.5x fp32.

Configuration ``quantization`` (``python -m benchmarks run quantization``; needs
``apt-get install -y dataset-fashion-mnist``).
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import Context, Result, fit, image_data, markdown_table, test_accuracy
from examples.models import ImageClassifier
from lightning_compress.quantization import (
    QuantizationAwareTraining,
    compile_for_cpu,
    quantize_int8_ptq,
    save_quantized,
)
from lightning_compress.stats import compare_latency

TITLE = "Int8 quantization on Fashion-MNIST: fp32 vs torchao PTQ vs QuantizationAwareTraining"


@dataclass(frozen=True)
class Settings:
    """The full run's settings."""

    epochs: int = 3  # fp32 training epochs
    finetune_epochs: int = 1  # fp32 epochs at the fine-tuning lr
    qat_epochs: int = 1  # QAT epochs after the fp32 model
    qat_lr: float = 1e-4  # fine-tuning and QAT learning rate
    limit_train: int | None = 20_000  # training images (None: all 55,000)
    threads: int = 1  # torch threads for everything (1: robust on a shared machine)
    calibration_batches: int = 32
    repeats: int = 20  # timed calls per model and round
    latency_batches: tuple[int, ...] = (1, 64)  # each compiles every model once more
    widths: tuple[int, ...] = (32, 64, 128)  # of the residual CNN's stages
    seed: int = 0


QUICK = {
    "limit_train": 1024,
    "epochs": 3,
    "calibration_batches": 2,
    "repeats": 5,
    "latency_batches": (64,),
    "widths": (8, 16, 32),
}


def _latency(models: dict[str, Any], batch: torch.Tensor, repeats: int) -> dict[str, float]:
    compiled = {name: compile_for_cpu(model) for name, model in models.items()}
    with torch.no_grad():
        for model in compiled.values():  # compile outside the timed region (seconds per model)
            model(batch)
    results = compare_latency(compiled, batch, repeats=repeats, warmup=3, rounds=3)
    return {name: result.median_ms for name, result in results.items()}


def run(args: Settings, context: Context) -> Result:
    # On a shared machine, multi-threaded timings are dominated by OpenMP threads waiting for busy cores.
    torch.set_num_threads(args.threads)

    dm = image_data(context, batch_size=128, limit_train=args.limit_train, seed=args.seed)
    fp32 = ImageClassifier(
        "residual_cnn", input_shape=(1, 28, 28), lr=1e-3, arch_kwargs={"widths": args.widths}
    )
    fit(fp32, dm, args.epochs, seed=args.seed)
    # Lightning keeps the modules' train/eval flags at the start of fit: every fit starts in training mode.
    fp32.train().hparams.lr = args.qat_lr
    fit(fp32, dm, args.finetune_epochs, seed=args.seed + 1)
    fp32.eval()

    longer = copy.deepcopy(fp32).train()
    _, fp32_timer = fit(longer, dm, args.qat_epochs, seed=args.seed + 2)

    calibration = [x for x, _ in dm.train_dataloader()][: args.calibration_batches]
    example = calibration[0][:2]
    ptq = copy.deepcopy(fp32)
    ptq.net = quantize_int8_ptq(copy.deepcopy(fp32.net).eval(), (example,), calibration)

    qat = copy.deepcopy(fp32).train()
    callback = QuantizationAwareTraining(module="net", start=0.0, freeze_bn=0.5, freeze_observers=0.8)
    _, qat_timer = fit(qat, dm, args.qat_epochs, [callback], seed=args.seed + 2)

    models = {"fp32": fp32, "fp32 (same steps as QAT)": longer, "PTQ int8": ptq, "QAT int8": qat}
    accuracy = {name: test_accuracy(model, dm) for name, model in models.items()}

    sizes: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in models.items():
            sizes[name] = save_quantized(model.net.eval(), (example,), Path(tmp) / "model.pt2")

    x, _ = next(iter(dm.test_dataloader()))
    nets = {"fp32": fp32.net.eval(), "PTQ int8": ptq.net, "QAT int8": qat.net}
    latency = {batch: _latency(nets, x[:batch].contiguous(), args.repeats) for batch in args.latency_batches}

    rows = []
    for name in models:
        timed = name if name in nets else "fp32"
        rows.append(
            {
                "model": name,
                "test_acc": accuracy[name],
                "acc_vs_fp32_points": 100 * (accuracy[name] - accuracy["fp32"]),
                "file_bytes": sizes[name],
                "size_ratio": sizes["fp32"] / sizes[name],
                **{
                    key: value
                    for batch, timings in latency.items()
                    for key, value in (
                        (f"latency_b{batch}_ms", timings[timed]),
                        (f"speedup_b{batch}", timings["fp32"] / timings[timed]),
                    )
                },
            }
        )
    step_ratio = qat_timer.median_ms / fp32_timer.median_ms
    qat_row = rows[-1]
    same_steps = 100 * (accuracy["QAT int8"] - accuracy["fp32 (same steps as QAT)"])
    targets = {
        "QAT within 0.3 point of fp32": qat_row["acc_vs_fp32_points"] >= -0.3,
        "QAT within 0.3 point of fp32 with the same steps": same_steps >= -0.3,
        "QAT >= PTQ accuracy": accuracy["QAT int8"] >= accuracy["PTQ int8"],
        "QAT >= 3.5x smaller": qat_row["size_ratio"] >= 3.5,
        **({"QAT >= 5x faster at batch 64": qat_row["speedup_b64"] >= 5} if 64 in latency else {}),
        **({"QAT >= 1.3x faster at batch 1": qat_row["speedup_b1"] >= 1.3} if 1 in latency else {}),
        "QAT step <= 1.5x fp32 step": step_ratio <= 1.5,
    }
    columns = list(rows[0])
    lines = [markdown_table(rows, columns)]
    lines.append(
        f"Training step (median): fp32 {fp32_timer.median_ms:.1f} ms, QAT {qat_timer.median_ms:.1f} ms "
        f"-> {step_ratio:.2f}x. QAT parity at conversion: {callback.parity}."
    )
    lines.append(
        "Targets: " + "; ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in targets.items()) + "."
    )
    lines.append(
        f"Settings: residual CNN {'-'.join(map(str, args.widths))}, {len(dm.train_set):,} training images, "
        f"{args.threads} thread(s), batch 128, Adam lr 1e-3 "
        f"for {args.epochs} epochs, then {args.finetune_epochs} at lr {args.qat_lr:g}: the fp32 model; QAT and the "
        f"'same steps' fp32 model: {args.qat_epochs} epoch(s) more at lr {args.qat_lr:g}; PTQ calibrated on "
        f"{args.calibration_batches} training batches; latency: "
        f"3 rounds x {args.repeats} calls per model, medians; 'same steps' has the fp32 latency."
    )
    payload = {
        "rows": rows,
        "step_ms": {"fp32_finetune": fp32_timer.median_ms, "qat": qat_timer.median_ms, "ratio": step_ratio},
        "parity": callback.parity,
        "targets": targets,
    }
    return Result(payload, "\n\n".join(lines))
