"""BinaryWeights: binary or ternary weights with per-channel scales, trained through latent fp32 weights.

The quantizers and the parametrization are plain torch, in :mod:`lightning_compress.quantization.binary_core`
(re-exported here); this module schedules them during a fit.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from torch import nn

from lightning_compress import _checks
from lightning_compress._events import record_event
from lightning_compress.callback import SHARE_VALUES, CompressionCallback
from lightning_compress.quantization import binary_core as core
from lightning_compress.quantization.binary_core import (
    MODES,
    TERNARY_THRESHOLD,
    BinaryConfig,
    QuantizedWeight,
    binarize,
    binarize_,
    make_permanent_,
    ternarize,
)
from lightning_compress.schedules import Point, validate_point
from lightning_compress.selection import Selector
from lightning_compress.stats import TensorFormat

__all__ = [
    "MODES",
    "TERNARY_THRESHOLD",
    "BinaryConfig",
    "BinaryWeights",
    "QuantizedWeight",
    "binarize",
    "binarize_",
    "make_permanent_",
    "ternarize",
]


class BinaryWeights(CompressionCallback):
    """Train with binary (BinaryConnect / XNOR-Net) or ternary (TWN) weights, keeping latent fp32 weights.

    In ``setup`` every selected layer's ``weight`` gets a parametrization (:func:`binarize_`): the forward pass
    (training and validation) uses ``alpha * sign(w)`` (``"binary"``) or ``alpha * sign(w) * [|w| > 0.7 mean|w|]``
    (``"ternary"``) with one scale ``alpha`` per output channel, while the optimizer updates the latent fp32
    weights (straight-through estimator); with ``clip_latent`` the latent weights are kept in ``[-1, 1]`` as
    in BinaryConnect. Before ``start`` the layers use their latent weights (fp32 warm-up). At the end of
    training (``finalize=True``) the parametrization is removed and the layers hold the binary/ternary
    values, so the model is a plain module again.

    Storage: 1 bit (binary) or 2 bits (ternary) per weight plus one fp32 scale per output channel — 32x and
    16x smaller weights — reported to ``CompressionMonitor`` through :meth:`storage_formats`. Keeping the
    first and last layers in fp32 (``exclude``) is common and costs little storage.

    Logged: ``binary/weight_error`` (relative L2 distance between latent and quantized weights) and
    ``binary/weight_bits``.

    Args:
        mode: ``"binary"`` or ``"ternary"``.
        start: when the quantized weights start being used (fraction of training, ``"step:N"``, ``"epoch:N"``).
        modules: layers to quantize (types and/or name patterns).
        exclude: layers to leave in fp32.
        min_params: leave out layers with fewer parameters.
        clip_latent: clip latent weights to ``[-1, 1]`` after every optimizer step.
        finalize: replace the latent weights by the quantized ones at the end of training.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> binary = BinaryWeights(mode="ternary", exclude=["net.0", "net.10"])
        >>> trainer = Trainer(callbacks=[binary], max_epochs=5, logger=False)
        >>> BinaryWeights(mode="quaternary")
        Traceback (most recent call last):
        ...
        ValueError: Unknown `mode='quaternary'`. Use one of 'binary', 'ternary'.
    """

    prefix = "binary/"
    reparametrizes = True
    effect_order = SHARE_VALUES
    selects_layers = True

    def __init__(
        self,
        mode: str = "binary",
        start: Point = 0.0,
        modules: Selector = (nn.Conv2d, nn.Linear),
        exclude: Selector = None,
        min_params: int = 0,
        clip_latent: bool = False,
        finalize: bool = True,
    ) -> None:
        self.config = BinaryConfig(mode=mode, modules=modules, exclude=exclude, min_params=min_params)
        self.start = validate_point(start, "start")
        self.clip_latent = _checks.check_bool(clip_latent, "clip_latent")
        # The argument `finalize`; `finalize()` is the end-of-training step every compression callback has.
        self.finalize_at_end = _checks.check_bool(finalize, "finalize")
        self.mode, self.bits, self.selection = mode, self.config.bits, self.config.selection
        self.finalized = False
        self._start_step = 0
        self._layers: dict[str, nn.Module] = {}

    def state_key_fields(self) -> dict[str, Any]:
        return {"mode": self.mode, "modules": str(self.selection)}

    def prepare_evaluation(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # `Trainer.test(ckpt_path="best")`: a checkpoint written while training loads into the finalized model.
        self.track_hook(pl_module.register_load_state_dict_pre_hook(core.permanent_weights_hook(self.mode)))

    def prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._layers = binarize_(pl_module, self.config, enabled=False)
        self.finalized = False
        self._start_step = self.step_of(trainer, self.start, "start")
        _checks.check_start_within_fit(
            self.start,
            self._start_step,
            trainer.estimated_stepping_batches,
            "no step would train the binary weights",
        )
        core.set_enabled(self._layers, self._start_step == 0)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.remove_hooks()
        if self.clip_latent:
            latents = [core.latent_weight(m) for m in self._layers.values()]
            self.on_optimizer_step(trainer, lambda: core.clip_latent_(self._layers), params=latents)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self._start_step > 0:
            record_event(trainer, self, f"{self.mode} weights switched on")
        core.set_enabled(self._layers, trainer.global_step >= self._start_step)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step % max(trainer.log_every_n_steps, 1) != 0:
            return
        self.log_values(pl_module, {"weight_error": self.weight_error(), "weight_bits": self.bits})

    def weight_error(self) -> float:
        """Relative L2 distance between the latent weights and their binary/ternary values."""
        return core.weight_error(self._layers, self.mode)

    def finalize(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.finalize_at_end and not self.finalized:
            make_permanent_(self._layers)
            self.finalized = True

    def unfinished(self, trainer: pl.Trainer) -> tuple[str, int, str] | None:
        if trainer.global_step <= self._start_step:  # the weights are still made binary at the end
            return "start", self._start_step, "no step trained binary weights"
        return None

    def storage_formats(self, pl_module: pl.LightningModule) -> dict[str, TensorFormat]:
        """Each quantized weight at 1 (binary) or 2 (ternary) bits plus one fp32 scale per output channel."""
        return core.storage_formats(self._layers, self.bits, permanent=self.finalized)

    def state_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "finalized": self.finalized}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("mode", self.mode) != self.mode:
            raise ValueError(
                f"The checkpoint was written by BinaryWeights(mode={state_dict['mode']!r}); this callback has "
                f"mode={self.mode!r}."
            )
