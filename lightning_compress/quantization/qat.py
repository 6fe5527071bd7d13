"""QuantizationAwareTraining: train with simulated quantization, then convert to a real int8 or low-bit model."""

from __future__ import annotations

import math
import os
import weakref
from contextlib import nullcontext
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_compress import _checks, _lightning
from lightning_compress import callback as _callback
from lightning_compress._events import record_event
from lightning_compress._lightning import first_input
from lightning_compress.callback import (
    QUANTIZE,
    SHARE_VALUES,
    CompressionCallback,
    compression_callbacks,
    first_batches,
)
from lightning_compress.export import check_writable
from lightning_compress.quantization import qat_core
from lightning_compress.quantization.int8_qat import float_copy, ship_int8, whole_forward_graph
from lightning_compress.quantization.low_bit import check_low_bit_supported, low_bit_config
from lightning_compress.quantization.qat_checkpoint import CHECKPOINT_HINT, load_qat_checkpoint
from lightning_compress.quantization.qat_core import SCHEMES, QuantizationConfig
from lightning_compress.quantization.qat_core import ErrorRecorder as _ErrorRecorder
from lightning_compress.schedules import Point, validate_point
from lightning_compress.selection import Selector
from lightning_compress.stats import TensorFormat

__all__ = ["CHECKPOINT_HINT", "SCHEMES", "QuantizationAwareTraining", "check_low_bit_supported"]
__all__ += ["load_qat_checkpoint", "low_bit_config", "whole_forward_graph"]


class QuantizationAwareTraining(CompressionCallback):
    """Quantization-aware training (Jacob et al. 2018) with torchao, and conversion to the real quantized model.

    ``scheme="int8"`` (default): static int8 through torchao's PT2E path, batch norm folded, converted to an int8
    graph; ``"int8-dynamic-intx"``, ``"intx-weight-only"``: 2 to 8-bit ``nn.Linear`` weights (``QATConfig``);
    ``"int4-weight-only"`` where torchao converts it. ``module`` names the submodule to quantize; ``None``: each
    direct child the forward calls that holds conv or linear layers (int8 replaces each by its exported graph;
    nothing is folded across two children). fp32 until ``start``, then fake quantization; at the end
    (``finalize=True``) the real quantized model, compared with the fake-quantized one (:attr:`parity`).
    Verbs for a plain ``nn.Module``: :mod:`~lightning_compress.quantization.qat_core`. See docs/quantization.md.

    Args:
        scheme: see above.
        module: qualified name of the submodule to quantize, or ``None`` (each child the forward calls).
        start: when fake quantization starts (fp32 warm-up before).
        freeze_observers: when quantization ranges stop updating (``None``: never).
        freeze_bn: when batch norm statistics stop updating (``None``: never; warned with adaptive optimizers).
        finalize: convert to the real quantized model at the end of training.
        bits: weight bits: 8 for ``"int8"`` (the default), 2 to 8 for the low-bit schemes (default 4).
        group_size: low-bit schemes: weights per scale (``None``: one scale per output channel).
        modules: low-bit schemes: the ``nn.Linear`` layers to quantize (types and/or name patterns).
        exclude: low-bit schemes: layers to leave in float.
        example_input: the LightningModule's input; default ``example_input_array``, else the first batch.
        export_path: where to save the converted int8 program (``.pt2``) at the end of training.
        measure: at conversion, measure saved sizes and compiled latencies of fp32 and int8 (rank zero).
        log_every_n_steps: how often the quantization error is measured and logged.
        convert: deprecated name of ``finalize``.

    Example::

        >>> qat = QuantizationAwareTraining(scheme="int8", module="net", start=0.5, freeze_observers=0.8)
        >>> QuantizationAwareTraining(scheme="int8", bits=4)
        Traceback (most recent call last):
        ...
        ValueError: `bits=4` is not available with `scheme='int8'` (8-bit only). Use `scheme='int8-dynamic-intx'` or 'intx-weight-only' for 2 to 8-bit weights.
    """

    prefix = "quantization/"
    effect_order = QUANTIZE
    selects_layers = True
    changes_structure = True

    def __init__(
        self,
        scheme: str = "int8",
        module: str | None = None,
        start: Point = 0.0,
        freeze_observers: Point | None = None,
        freeze_bn: Point | None = None,
        finalize: bool = True,
        bits: int | None = None,
        group_size: int | None = None,
        modules: Selector = nn.Linear,
        exclude: Selector = None,
        example_input: Any = None,
        export_path: str | os.PathLike | None = None,
        measure: bool = False,
        log_every_n_steps: int = 50,
        convert: bool | None = None,
    ) -> None:
        old = _checks.UNSET if convert is None else convert
        fin = _checks.renamed("QuantizationAwareTraining", "convert", old, "finalize", finalize, True)
        self.config = QuantizationConfig(scheme, bits, group_size, module, modules, exclude)
        _checks.check_qat_int8_options(scheme, measure, export_path, freeze_observers, freeze_bn)
        self.finalize_at_end = _checks.check_bool(fin, "finalize" if convert is None else "convert")
        self.measure = _checks.check_bool(measure, "measure")
        self._example_arg = _checks.check_model_input(example_input)
        if export_path is not None:
            check_writable(export_path, "export_path", ".pt2")
        self.points = {"start": validate_point(start, "start")}
        for name, point in (("freeze_observers", freeze_observers), ("freeze_bn", freeze_bn)):
            self.points[name] = None if point is None else validate_point(point, name)
        self.start, self.freeze_observers, self.freeze_bn = self.points.values()
        self.log_every_n_steps = _checks.check_int(log_every_n_steps, "log_every_n_steps", 1)
        self.scheme, self.module, self.bits, self.group_size = scheme, module, self.config.bits, group_size
        self.export_path, self._parts = export_path, qat_core.qat_parts(self.config)
        self.converted, self._fitting, self._training_ran = False, False, False
        self.parity: dict[str, float] | None = None  # set at conversion, as the next two
        self.artifact: dict[str, Any] | None = None
        self.measurements: dict[str, float] | None = None
        self._steps: dict[str, int | None] = {}
        self._recorder = _ErrorRecorder()

    def state_key_fields(self) -> dict[str, Any]:
        return {"scheme": self.scheme, "module": self.module}

    @property
    def budget_scheme(self) -> str | None:  # type: ignore[override]  # a low-bit scheme's layers may stay float
        return None if self.scheme == "int8" else "quantize"

    def accept_allocation(self, arguments: dict[str, Any]) -> None:
        self.config = qat_core.allocate_bits(self.config, arguments["layer_bits"])
        self._parts = qat_core.qat_parts(self.config)

    @property
    def _stashed(self) -> dict[str, nn.Module]:
        """The float modules the int8 graphs took the place of, by name (kept after conversion)."""
        return getattr(self._parts, "floats", {})

    def storage_formats(self, pl_module: pl.LightningModule) -> dict[str, TensorFormat]:
        """Quantized weights at their bit width, by state-dict name (empty once converted to int8)."""
        if self.converted and self.scheme == "int8":
            return {}
        return {name: TensorFormat(bits=self.bits) for name in self._parts.weight_names}  # type: ignore[arg-type]

    def prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.prepare_evaluation(trainer, pl_module, "fit")
        if self.export_path is not None:
            check_writable(self.export_path, "export_path", ".pt2")
        estimated = trainer.estimated_stepping_batches  # -1 or infinity when the length is unknown
        total = int(estimated) if math.isfinite(estimated) and estimated >= 0 else None
        self._steps = {n: None if p is None else self.step_of(trainer, p, n) for n, p in self.points.items()}
        _checks.check_qat_steps(self.points, self._steps, total, self.scheme == "int8", self.finalize_at_end)
        self.converted, self._training_ran = False, False
        self._parts.ensure(pl_module, "prepared")
        self._recorder.kinds = self._parts.quantizers(pl_module)
        for quantizer in self._recorder.kinds:
            self.track_hook(quantizer.register_forward_hook(self._recorder))
        self._fitting = True

    def prepare_evaluation(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        _checks.check_qat_precision(trainer.precision)
        if self.scheme == "int8":
            parts = list(self._parts.candidates(pl_module))  # type: ignore[attr-defined]
            _checks.check_qat_neighbours(compression_callbacks(trainer), parts, self.module, SHARE_VALUES)
        else:
            check_low_bit_supported(self.scheme, self.bits, self.group_size)  # type: ignore[arg-type]
        self._parts.target(pl_module)
        if self._parts.example is None:
            example = self.example_input(trainer, pl_module, self._example_arg, 2)
            if example is None and stage != "fit":  # the first batch of this stage's data
                batches = first_batches(_callback.evaluation_loader(trainer, stage))
                given = first_input(batches[0]) if batches else None
                example = None if given is None else self.example_input(None, pl_module, given, 2)
            self._parts.example = example
            qat_core.check_example_runs(pl_module, example, given=self._example_arg is not None)
        self.track_hook(pl_module.register_load_state_dict_pre_hook(self._before_load))
        # Other callbacks get the float layers back for a while (to remove pruned channels) through this view,
        # held weakly: the registry outlives the fit.
        view = weakref.WeakMethod(self._parts.float_view)
        _lightning.register_float_view(pl_module, lambda m: (view() or (lambda _: nullcontext()))(m))  # type: ignore[misc]

    def _before_load(self, module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        """Rebuild the structure the checkpoint was saved with, just before its weights load."""
        _lightning.drop_checkpoint_hints(state_dict, prefix)
        self._parts.prepare_for_checkpoint(module, state_dict, prefix, self._fitting)
        self.converted = self._parts.state(module) == "converted"

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: Any) -> None:
        states = checkpoint.get("callbacks") or {}
        if trainer.state.fn != "fit" or any(str(k).startswith(type(self).__name__) for k in states):
            return
        # Written without this callback: the float weights loaded into the prepared structure; QAT starts there.
        step = int(checkpoint.get("global_step", 0))
        message = _checks.check_qat_resume(trainer.ckpt_path, step, self._steps, self.points)
        (rank_zero_warn if step > (self._steps["start"] or 0) else rank_zero_info)(message)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: Any) -> None:
        if self._parts.state(pl_module) != "float":
            _lightning.add_checkpoint_hint(checkpoint, CHECKPOINT_HINT)

    def state_dict(self) -> dict[str, Any]:
        state = {"scheme": self.scheme, "bits": self.bits, "converted": self.converted, "parity": self.parity}
        return {**state, **self._parts.checkpoint_state()}  # what `load_qat_checkpoint` rebuilds from

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        _checks.check_qat_checkpoint(state_dict, self.scheme, self.bits)  # type: ignore[arg-type]
        self.parity = state_dict.get("parity")
        self._parts.ranges = dict(state_dict.get("ranges") or {})

    def _apply_phase(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        step, start, observers, bn = trainer.global_step, *self._steps.values()
        fake_quant = step >= (start or 0)
        observe = fake_quant and (observers is None or step < observers)
        reduce = lambda t: trainer.strategy.reduce(t, reduce_op="mean")  # noqa: E731
        bn_frozen = bn is not None and step >= bn
        for event in self._parts.set_phase(pl_module, fake_quant, observe, bn_frozen, reduce):
            record_event(trainer, self, event)
        return fake_quant

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._parts.state(pl_module) == "converted":
            raise ValueError(
                "The model holds the converted quantized weights (loaded from a checkpoint saved after "
                "conversion), which cannot be trained. Resume from a checkpoint saved during training."
            )
        self._training_ran = True
        if warning := qat_core.frozen_bn_warning(trainer.optimizers, self.freeze_bn):
            rank_zero_warn(warning, category=UserWarning)
        self._apply_phase(trainer, pl_module)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        # Logged for this batch at its end, when `global_step` has already moved on.
        self._fake_quant = fake_quant = self._apply_phase(trainer, pl_module)
        self._recorder.active = fake_quant and trainer.global_step % self.log_every_n_steps == 0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        values = {"fake_quant": float(self._fake_quant)}
        if self._recorder.active:
            self._recorder.active = False
            values.update({f"{kind}_error": error for kind, error in self._recorder.pop().items()})
        self.log_values(pl_module, values)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        quantized = list(self.storage_formats(pl_module))
        bits = {"bits": dict.fromkeys(quantized, float(self.bits))}  # type: ignore[arg-type]
        self.log_values(pl_module, self._parts.sizes(pl_module, quantized), bits, epoch=True)

    def finalize(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._training_ran:  # a fit resumed at its last step: no batch set the phase
            self._apply_phase(trainer, pl_module)
        if not self.finalize_at_end or self._parts.state(pl_module) != "prepared":
            return
        if trainer.global_step <= (self._steps["start"] or 0):  # stopped early (EarlyStopping, max_time)
            self._parts.restore_float(pl_module)
            return rank_zero_warn(_checks.qat_stopped_early(trainer.global_step, self.start, self._steps))
        loader = trainer.val_dataloaders
        batches = first_batches(loader[0] if isinstance(loader, list | tuple) and loader else loader)
        inputs = self._parts.target_inputs(pl_module, qat_core.parity_input(batches, self._parts.example))
        target = lambda: self._parts.target(pl_module)  # noqa: E731  (a graph replaces it)
        broadcast = (lambda obj: trainer.strategy.broadcast(obj, src=0)) if trainer.world_size > 1 else None
        self._parts.synchronize(pl_module, lambda t: trainer.strategy.reduce(t, reduce_op="mean"), broadcast)
        before = qat_core.run(target(), inputs)
        ship = self.scheme == "int8" and trainer.is_global_zero and (self.export_path or self.measure)
        reference = float_copy(self._parts, pl_module) if ship else None  # type: ignore[arg-type]
        self._parts.convert(pl_module)
        self.converted, failure = True, None
        self.parity = qat_core.parity(before, qat_core.run(target(), inputs))
        if ship:
            shipped = ship_int8(reference, target(), inputs, self.export_path, self.measure)  # type: ignore[arg-type]
            self.measurements, self.artifact, failure = shipped
        rank_zero_info(
            f"QuantizationAwareTraining converted the model ({self.scheme}): argmax agreement "
            f"{self.parity['argmax_agreement']:.4f}, max |logit diff| {self.parity['max_abs_diff']:.3g}."
        )
        metrics = {f"parity_{k}": v for k, v in self.parity.items()}
        if self.artifact:
            metrics.update(
                artifact_bytes=self.artifact["bytes"], artifact_size_ratio=self.artifact["size_ratio"]
            )
        self.log_to_loggers(trainer, {**metrics, **(self.measurements or {})})
        if failure is not None:
            raise qat_core.shipping_failed(failure, self.export_path) from failure

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn != "fit" and self.finalize_at_end and self._parts.state(pl_module) == "prepared":
            self._parts.convert(pl_module)
            self.converted = True

    on_test_start = on_predict_start = on_validation_start

    def release(self) -> None:
        self._fitting = False
