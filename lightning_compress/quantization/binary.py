"""BinaryWeights: binary or ternary weights with per-channel scales, trained through latent fp32 weights."""

from __future__ import annotations

import functools
import math
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lightning_compress._events import record_event, watch_loss
from lightning_compress._lightning import forget_original, remember_original, resolve_step, set_up_in_order
from lightning_compress.schedules import Point, validate_point
from lightning_compress.selection import ModuleSelection, Selector
from lightning_compress.stats import TensorFormat

MODES = ("binary", "ternary")
TERNARY_THRESHOLD = 0.7  # Li et al. 2016: delta = 0.7 * mean |w| approximates the optimal threshold


def _channel_dims(weight: Tensor) -> tuple[int, ...]:
    # One scale per output channel (dimension 0); a 1-D weight gets a single scale.
    return tuple(range(1, weight.dim())) or tuple(range(weight.dim()))


def binarize(weight: Tensor) -> Tensor:
    """XNOR-Net's binary-weight approximation: ``alpha * sign(w)`` with ``alpha = mean |w|`` per output channel.

    Example::

        >>> binarize(torch.tensor([[0.5, -1.5], [0.0, 2.0]]))
        tensor([[ 1., -1.],
                [ 1.,  1.]])
    """
    alpha = weight.abs().mean(dim=_channel_dims(weight), keepdim=True)
    # sign(0) is 0; a binary weight has no zero, so zeros take +alpha.
    return torch.where(weight >= 0, alpha, -alpha)


def ternarize(weight: Tensor, threshold: float = TERNARY_THRESHOLD) -> Tensor:
    """Ternary weights (Li et al. 2016): ``alpha * sign(w)`` where ``|w| > delta``, else 0, per output channel.

    ``delta = threshold * mean |w|`` and ``alpha`` is the mean ``|w|`` of the entries above ``delta``.

    Example::

        >>> ternarize(torch.tensor([[0.1, -1.0, 2.0, -0.2]]))  # delta = 0.7 * 0.825
        tensor([[ 0.0000, -1.5000,  1.5000,  0.0000]])
    """
    dims = _channel_dims(weight)
    magnitude = weight.abs()
    keep = magnitude > threshold * magnitude.mean(dim=dims, keepdim=True)
    alpha = (magnitude * keep).sum(dim=dims, keepdim=True) / keep.sum(dim=dims, keepdim=True).clamp(min=1)
    return torch.where(
        keep, torch.sign(weight) * alpha, torch.zeros((), dtype=weight.dtype, device=weight.device)
    )


class _StraightThrough(torch.autograd.Function):
    """Forward: the quantized weight, exactly. Backward: the gradient passes to the latent weight unchanged."""

    @staticmethod
    def forward(ctx: Any, latent: Tensor, mode: str) -> Tensor:
        return binarize(latent) if mode == "binary" else ternarize(latent)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


class QuantizedWeight(nn.Module):
    """Parametrization: the layer computes with binary/ternary weights, the optimizer updates the latent fp32 ones.

    The straight-through estimator passes the gradient of the quantized weight to the latent weight unchanged.
    While ``enabled`` is false the latent weight is used as it is.

    Args:
        mode: ``"binary"`` or ``"ternary"``.

    Example::

        >>> layer = nn.Linear(4, 2)
        >>> _ = parametrize.register_parametrization(layer, "weight", QuantizedWeight("binary"))
        >>> len(layer.weight[0].abs().unique())  # one magnitude per output channel
        1
    """

    def __init__(self, mode: str = "binary") -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"Unknown `mode={mode!r}`. Use one of {', '.join(map(repr, MODES))}.")
        self.mode = mode
        self.enabled = True

    def forward(self, latent: Tensor) -> Tensor:
        if not self.enabled:
            return latent
        return _StraightThrough.apply(latent, self.mode)


class BinaryWeights(Callback):
    """Train with binary (BinaryConnect / XNOR-Net) or ternary (TWN) weights, keeping latent fp32 weights.

    In ``setup`` every selected layer's ``weight`` gets a parametrization: the forward pass (training and
    validation) uses ``alpha * sign(w)`` (``"binary"``) or ``alpha * sign(w) * [|w| > 0.7 mean|w|]``
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
        if mode not in MODES:
            raise ValueError(f"Unknown `mode={mode!r}`. Use one of {', '.join(map(repr, MODES))}.")
        for argument, value in (("clip_latent", clip_latent), ("finalize", finalize)):
            if not isinstance(value, bool):
                raise TypeError(f"`{argument}={value!r}` must be True or False.")
        self.mode = mode
        self.bits = 1 if mode == "binary" else 2
        self.start = validate_point(start, "start")
        self.selection = ModuleSelection(modules, exclude, min_params)
        self.clip_latent = clip_latent
        self.finalize = finalize
        self.finalized = False
        self._start_step = 0
        self._layers: dict[str, nn.Module] = {}
        self._hooks: list[Any] = []

    @functools.cached_property
    def state_key(self) -> str:  # Lightning reads it at every hook call: computed once
        return self._generate_state_key(mode=self.mode, modules=str(self.selection))

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if set_up_in_order(self, trainer, pl_module, stage) or stage != "fit":
            return
        remember_original(trainer, pl_module)
        watch_loss(trainer)
        selected = [
            (n, m)
            for n, m in self.selection.select(pl_module)
            if isinstance(getattr(m, "weight", None), Tensor)
        ]
        if not selected:
            raise ValueError(f"The selection {self.selection} has no `weight` parameter to quantize.")
        self._layers = {}
        for name, module in selected:
            if not parametrize.is_parametrized(module, "weight"):
                parametrize.register_parametrization(module, "weight", QuantizedWeight(self.mode))
            self._layers[name] = module
        self.finalized = False
        self._start_step = resolve_step(trainer, self.start, "start")
        self._enable(self._start_step == 0)

    def _enable(self, enabled: bool) -> None:
        for module in self._layers.values():
            module.parametrizations.weight[0].enabled = enabled

    def _latent(self, module: nn.Module) -> nn.Parameter:
        return module.parametrizations.weight.original

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()
        if self.clip_latent:
            latents = {self._latent(m) for m in self._layers.values()}
            for optimizer in trainer.optimizers:
                if any(p in latents for group in optimizer.param_groups for p in group["params"]):
                    self._hooks.append(optimizer.register_step_post_hook(self._clip))

    def _clip(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        with torch.no_grad():
            for module in self._layers.values():
                self._latent(module).clamp_(-1.0, 1.0)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self._start_step > 0:
            record_event(trainer, self, f"{self.mode} weights switched on")
        self._enable(trainer.global_step >= self._start_step)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step % max(trainer.log_every_n_steps, 1) != 0:
            return
        pl_module.log("binary/weight_error", self.weight_error(), on_step=True, on_epoch=False)
        pl_module.log("binary/weight_bits", float(self.bits), on_step=True, on_epoch=False)

    def weight_error(self) -> float:
        """Relative L2 distance between the latent weights and their binary/ternary values."""
        changed, norm = 0.0, 0.0
        with torch.no_grad():
            for module in self._layers.values():
                latent = self._latent(module)
                quantized = binarize(latent) if self.mode == "binary" else ternarize(latent)
                changed += float((quantized - latent).float().norm() ** 2)
                norm += float(latent.float().norm() ** 2)
        return math.sqrt(changed / norm) if norm else 0.0

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()
        if not self.finalize or self.finalized:
            return
        self._enable(True)
        for module in self._layers.values():
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        self.finalized = True

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            forget_original(trainer)  # the next fit takes a fresh copy of its own model
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def storage_formats(self, pl_module: pl.LightningModule) -> dict[str, TensorFormat]:
        """Each quantized weight at 1 (binary) or 2 (ternary) bits plus one fp32 scale per output channel."""
        formats = {}
        for name, module in self._layers.items():
            key = f"{name}.weight" if self.finalized else f"{name}.parametrizations.weight.original"
            channels = module.weight.shape[0]
            formats[key] = TensorFormat(bits=self.bits, codebook_entries=channels)
        return formats

    def state_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "finalized": self.finalized}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("mode", self.mode) != self.mode:
            raise ValueError(
                f"The checkpoint was written by BinaryWeights(mode={state_dict['mode']!r}); this callback has "
                f"mode={self.mode!r}."
            )
