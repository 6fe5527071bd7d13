"""Binary and ternary weights on a plain ``nn.Module``: the quantizers, the straight-through parametrization and
the verb :func:`binarize_`. No Lightning here: :class:`~lightning_compress.quantization.BinaryWeights` schedules
them during a fit.

Example::

    >>> model = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> layers = binarize_(model, BinaryConfig(mode="binary"))
    >>> [len(row.abs().unique()) for row in model[0].weight]  # one magnitude per output channel
    [1, 1, 1, 1]
    >>> make_permanent_(layers)
    >>> sorted(model.state_dict())
    ['0.bias', '0.weight', '2.bias', '2.weight']
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lightning_compress import _checks
from lightning_compress._checkpoints import configure_fresh_model, drop_checkpoint_hints
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


def quantize(weight: Tensor, mode: str) -> Tensor:
    """:func:`binarize` (``mode="binary"``) or :func:`ternarize` (``mode="ternary"``) a weight."""
    return binarize(weight) if mode == "binary" else ternarize(weight)


class _StraightThrough(torch.autograd.Function):
    """Forward: the quantized weight, exactly. Backward: the gradient passes to the latent weight unchanged."""

    @staticmethod
    def forward(ctx: Any, latent: Tensor, mode: str) -> Tensor:
        return quantize(latent, mode)

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
        self.mode = _checks.check_binary_mode(mode, MODES)
        self.enabled = True

    def forward(self, latent: Tensor) -> Tensor:
        if not self.enabled:
            return latent
        return _StraightThrough.apply(latent, self.mode)


@dataclass(frozen=True)
class BinaryConfig:
    """Which layers get binary or ternary weights.

    Args:
        mode: ``"binary"`` (1 bit per weight) or ``"ternary"`` (2 bits), plus one fp32 scale per output channel.
        modules: layers to quantize (types and/or name patterns).
        exclude: layers to leave in fp32.
        min_params: leave out layers with fewer parameters.

    Example::

        >>> BinaryConfig(mode="ternary").bits
        2
        >>> BinaryConfig(mode="quaternary")
        Traceback (most recent call last):
        ...
        ValueError: Unknown `mode='quaternary'`. Use one of 'binary', 'ternary'.
    """

    mode: str = "binary"
    modules: Selector = (nn.Conv2d, nn.Linear)
    exclude: Selector = None
    min_params: int = 0
    selection: ModuleSelection = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _checks.check_binary_mode(self.mode, MODES)
        object.__setattr__(self, "selection", ModuleSelection(self.modules, self.exclude, self.min_params))

    @property
    def bits(self) -> int:
        """Bits per stored weight: 1 (binary) or 2 (ternary)."""
        return 1 if self.mode == "binary" else 2


def binarize_(model: nn.Module, config: BinaryConfig, enabled: bool = True) -> dict[str, nn.Module]:
    """Make the selected layers of ``model`` compute with binary/ternary weights, keeping latent fp32 weights.

    Each selected layer's ``weight`` gets a :class:`QuantizedWeight` parametrization: the forward pass uses the
    quantized weight, gradients reach the latent one (``<layer>.parametrizations.weight.original``), which the
    optimizer updates. :func:`make_permanent_` leaves the quantized values as plain weights.

    Args:
        model: the model, changed in place.
        config: the mode and the layers.
        enabled: ``False`` computes with the latent weights until :func:`set_enabled` turns the quantization on.

    Returns:
        The parametrized layers by qualified name.

    Example::

        >>> model = nn.Sequential(nn.Linear(4, 3))
        >>> layers = binarize_(model, BinaryConfig(mode="ternary"))
        >>> latent = latent_weight(layers["0"])
        >>> torch.equal(model[0].weight, ternarize(latent))
        True
    """
    selected = [
        (n, m) for n, m in config.selection.select(model) if isinstance(getattr(m, "weight", None), Tensor)
    ]
    if not selected:
        raise ValueError(f"The selection {config.selection} has no `weight` parameter to quantize.")
    layers: dict[str, nn.Module] = {}
    for name, module in selected:
        if not parametrize.is_parametrized(module, "weight"):
            parametrize.register_parametrization(module, "weight", QuantizedWeight(config.mode))
        layers[name] = module
    set_enabled(layers, enabled)
    return layers


def set_enabled(layers: Mapping[str, nn.Module], enabled: bool) -> None:
    """Compute with the quantized weights (``True``) or with the latent ones (``False``)."""
    for module in layers.values():
        module.parametrizations.weight[0].enabled = enabled


def latent_weight(module: nn.Module) -> nn.Parameter:
    """The latent fp32 weight of a layer :func:`binarize_` parametrized (what the optimizer updates)."""
    return module.parametrizations.weight.original


def clip_latent_(layers: Mapping[str, nn.Module], bound: float = 1.0) -> None:
    """Clip the latent weights to ``[-bound, bound]`` (BinaryConnect)."""
    with torch.no_grad():
        for module in layers.values():
            latent_weight(module).clamp_(-bound, bound)


def weight_error(layers: Mapping[str, nn.Module], mode: str) -> float:
    """Relative L2 distance between the latent weights and their binary/ternary values.

    Example::

        >>> model = nn.Sequential(nn.Linear(2, 1))
        >>> with torch.no_grad():
        ...     _ = model[0].weight.copy_(torch.tensor([[1.0, -3.0]]))
        >>> round(weight_error(binarize_(model, BinaryConfig()), "binary"), 4)  # |(2, -2) - (1, -3)| / |(1, -3)|
        0.4472
    """
    changed, norm = 0.0, 0.0
    with torch.no_grad():
        for module in layers.values():
            latent = latent_weight(module)
            changed += float((quantize(latent, mode) - latent).float().norm() ** 2)
            norm += float(latent.float().norm() ** 2)
    return math.sqrt(changed / norm) if norm else 0.0


def make_permanent_(layers: Mapping[str, nn.Module]) -> None:
    """Remove the parametrizations: each layer holds its binary/ternary weight as a plain parameter."""
    set_enabled(layers, True)
    for module in layers.values():
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)


_LATENT = ".parametrizations.weight.original"


def permanent_weights_hook(mode: str) -> Any:
    """A ``load_state_dict`` pre-hook: a state dict written while training (each layer's latent weight under
    ``<layer>.parametrizations.weight.original``) loads into a model whose layers hold their permanent weights
    (after :func:`make_permanent_`), as the ``mode`` values of those latent weights.

    Example::

        >>> model = nn.Sequential(nn.Linear(3, 2))
        >>> _ = model.register_load_state_dict_pre_hook(permanent_weights_hook("binary"))
        >>> latent = torch.tensor([[0.5, -1.0, 1.5], [2.0, -2.0, 2.0]])
        >>> _ = model.load_state_dict({"0.parametrizations.weight.original": latent, "0.bias": torch.zeros(2)})
        >>> model[0].weight.data
        tensor([[ 1., -1.,  1.],
                [ 2., -2.,  2.]])
    """

    def hook(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        for key in [k for k in state_dict if k.startswith(prefix) and k.endswith(_LATENT)]:
            try:
                layer = module.get_submodule(key[len(prefix) : -len(_LATENT)])
            except AttributeError:
                continue
            if not parametrize.is_parametrized(layer, "weight"):
                state_dict[key[: -len(_LATENT)] + ".weight"] = quantize(state_dict.pop(key), mode)

    return hook


def load_binary_checkpoint(
    model: nn.Module, checkpoint: Mapping[str, Any] | str | os.PathLike, mode: str | None = None
) -> nn.Module:
    """Load a Lightning checkpoint of a fit with ``BinaryWeights`` into ``model`` (e.g. a freshly built one), which
    then holds plain binary/ternary weights: written after the fit, the checkpoint holds them; written while
    training (``ModelCheckpoint``'s best or last), it holds the latent weights, made binary/ternary here with
    the ``mode`` the callback recorded (or the one given). Returns ``model``.

    Example::

        >>> latent = torch.tensor([[0.5, -1.0, 1.5], [2.0, -2.0, 2.0]])
        >>> state = {"0.parametrizations.weight.original": latent, "0.bias": torch.zeros(2)}
        >>> checkpoint = {"state_dict": state, "callbacks": {"BinaryWeights{'mode': 'binary'}": {"mode": "binary"}}}
        >>> load_binary_checkpoint(nn.Sequential(nn.Linear(3, 2)), checkpoint)[0].weight.data
        tensor([[ 1., -1.,  1.],
                [ 2., -2.,  2.]])
    """
    configure_fresh_model(model)
    if not isinstance(checkpoint, Mapping):
        checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=False)
    recorded = [
        s.get("mode") for k, s in (checkpoint.get("callbacks") or {}).items() if k.startswith("BinaryWeights")
    ]
    state_dict = dict(checkpoint["state_dict"])
    drop_checkpoint_hints(state_dict)  # those other callbacks of the fit wrote
    mode = mode or next((m for m in recorded if m), None)
    if mode is None and any(key.endswith(_LATENT) for key in state_dict):
        raise ValueError(
            "The checkpoint holds latent weights but no BinaryWeights state says how they were quantized: pass "
            "`mode='binary'` or `mode='ternary'`."
        )
    handle = model.register_load_state_dict_pre_hook(permanent_weights_hook(mode or "binary"))
    try:
        model.load_state_dict(state_dict)
    finally:
        handle.remove()
    return model


def storage_formats(layers: Mapping[str, nn.Module], bits: int, permanent: bool) -> dict[str, TensorFormat]:
    """Each quantized weight at ``bits`` bits plus one fp32 scale per output channel, by ``state_dict`` name
    (the latent weight's while parametrized, the plain weight's once ``permanent``)."""
    formats = {}
    for name, module in layers.items():
        key = f"{name}.weight" if permanent else f"{name}.parametrizations.weight.original"
        formats[key] = TensorFormat(bits=bits, codebook_entries=module.weight.shape[0])
    return formats
