"""Low-bit weight quantization-aware training of ``nn.Linear`` layers through torchao's ``QATConfig``.

The selected layers become torchao's ``FakeQuantizedLinear`` (same parameters, same state-dict keys) and are
converted with ``QATConfig(base_config, step="convert")``, which reproduces the fake-quantized outputs exactly.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lightning_compress.quantization.qat_core import (
    LOW_BIT_SCHEMES,
    QATParts,
    QuantizationConfig,
    layer_types,
)
from lightning_compress.selection import ModuleSelection, Selector


def low_bit_config(scheme: str, bits: int, group_size: int | None) -> Any:
    """The torchao post-training config a low-bit QAT scheme converts to.

    Args:
        scheme: ``"int8-dynamic-intx"`` (int8 dynamic per-token activations, ``bits``-bit weights),
            ``"intx-weight-only"`` (``bits``-bit weights, float activations) or ``"int4-weight-only"``.
        bits: weight bits, 2 to 8.
        group_size: weights per scale along the input dimension; ``None`` for one scale per output channel.

    Example::

        >>> type(low_bit_config("intx-weight-only", 4, 32)).__name__
        'IntxWeightOnlyConfig'
    """
    from torchao.quantization import (
        Int4WeightOnlyConfig,
        Int8DynamicActivationIntxWeightConfig,
        IntxWeightOnlyConfig,
        PerAxis,
        PerGroup,
    )

    dtype = getattr(torch, f"int{bits}")
    granularity = PerGroup(group_size) if group_size else PerAxis(0)
    if scheme == "int8-dynamic-intx":
        return Int8DynamicActivationIntxWeightConfig(weight_dtype=dtype, weight_granularity=granularity)
    if scheme == "intx-weight-only":
        return IntxWeightOnlyConfig(weight_dtype=dtype, granularity=granularity)
    if scheme == "int4-weight-only":
        return Int4WeightOnlyConfig(group_size=group_size or 128)
    raise ValueError(
        f"Unknown low-bit `scheme={scheme!r}`. Use one of {', '.join(map(repr, LOW_BIT_SCHEMES))}."
    )


def check_low_bit_supported(scheme: str, bits: int, group_size: int | None) -> None:
    """Run prepare → convert → forward of ``scheme`` on a tiny layer; raise a clear error if this machine can't.

    The global random state is left as it was.

    Example::

        >>> check_low_bit_supported("intx-weight-only", 4, 32)
    """
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    config = low_bit_config(scheme, bits, group_size)
    # The probe's input size is a multiple of `group_size`: whether the model's layers are is checked apart,
    # naming them, so that this only tells whether the machine can run the scheme.
    in_features = group_size * max(1, 256 // group_size) if group_size else 256
    try:
        with torch.random.fork_rng(devices=[]):
            probe = nn.Sequential(nn.Linear(in_features, 16))
            quantize_(probe, QATConfig(config, step="prepare"))
            probe(torch.randn(2, in_features))  # a training step's forward: fake quantization runs
            quantize_(probe, QATConfig(config, step="convert"))
            with torch.no_grad():
                probe(torch.randn(2, in_features))
    except Exception as err:
        raise ValueError(
            f"`scheme={scheme!r}` cannot be converted on this machine ({type(err).__name__}: {err}). "
            "Use `scheme='intx-weight-only'` or 'int8-dynamic-intx' with `bits=4`, which convert on CPU."
        ) from err


def selected_linears(
    target: nn.Module, selection: ModuleSelection, scheme: str, where: str
) -> dict[str, nn.Module]:
    """The ``nn.Linear`` layers of ``target`` that ``selection`` picks; an error naming the fix when none."""
    problem = (
        f"`scheme={scheme!r}` quantizes `nn.Linear` layers, and {where} has none that the selection "
        f"{selection} picks (its layers: {layer_types(target)}). Point `module=` at a part with "
        "nn.Linear layers, or widen `modules`/`exclude`."
    )
    try:
        chosen = {name: m for name, m in selection.select(target) if isinstance(m, nn.Linear)}
    except ValueError as err:
        if "matches no module" not in str(err):
            raise  # e.g. a name pattern that matches nothing: that message names the pattern
        raise ValueError(problem) from err
    inside = attention_projections(target)
    left = sorted(name for name in chosen if name in inside)
    if left:
        warnings.warn(
            f"`scheme={scheme!r}` leaves {', '.join(left)} in float: nn.MultiheadAttention reads its output "
            "projection's weight directly, so a swapped layer would not be quantized while training. Pass "
            "`exclude=['*.out_proj']` to silence this.",
            stacklevel=3,
        )
        chosen = {name: m for name, m in chosen.items() if name not in inside}
    if not chosen:
        raise ValueError(problem)
    return chosen


def attention_projections(target: nn.Module) -> set[str]:
    """Names of the ``out_proj`` layers of the ``nn.MultiheadAttention`` modules in ``target``.

    Example::

        >>> attention_projections(nn.Sequential(nn.MultiheadAttention(8, 2), nn.Linear(8, 8)))
        {'0.out_proj'}
    """
    return {
        f"{name}.out_proj" if name else "out_proj"
        for name, module in target.named_modules()
        if isinstance(module, nn.MultiheadAttention)
    }


def check_group_size(linears: dict[str, nn.Module], group_size: int | None, prefix: str = "") -> None:
    """``group_size`` must divide the input size of every layer of ``linears`` (named with ``prefix``)."""
    if group_size is None:
        return
    bad = [
        f"{prefix}{name} (in_features={m.in_features})"
        for name, m in linears.items()
        if m.in_features % group_size
    ]
    if bad:
        raise ValueError(
            f"`group_size={group_size}` must divide the input size of every quantized layer; it does not for "
            f"{', '.join(bad)}. Choose a divisor, or leave those layers out with `exclude`."
        )


class LowBitParts(QATParts):
    """The ``nn.Linear`` layers a low-bit scheme fake-quantizes, then converts (see the module documentation).

    Example::

        >>> model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> parts = LowBitParts(QuantizationConfig(scheme="intx-weight-only", group_size=4, modules="2"))
        >>> parts.prepare(model)
        >>> type(model[2]).__name__, type(model[0]).__name__, parts.state(model)
        ('FakeQuantizedLinear', 'Linear', 'prepared')
    """

    def __init__(self, config: QuantizationConfig) -> None:
        super().__init__(config)
        # The fake-quantized layers, by name within the target (kept after conversion).
        self.prepared: dict[str, nn.Module] = {}

    def _torchao_config(self, step: str) -> Any:
        from torchao.quantization.qat import QATConfig

        config = low_bit_config(self.config.scheme, self.config.bits, self.config.group_size)  # type: ignore[arg-type]
        return QATConfig(config, step=step)

    def set_layers(self, names: list[str]) -> None:
        """Record the layers a checkpoint says were quantized (names within the target)."""
        prefix = f"{self.config.module}." if self.config.module else ""
        self.weight_names = {f"{prefix}{name}.weight": name for name in names}

    def checkpoint_state(self) -> dict[str, Any]:
        return {**super().checkpoint_state(), "layers": sorted(self.prepared)}

    def _fake_quantized(self, model: nn.Module) -> dict[str, nn.Module]:
        from torchao.quantization.qat.linear import FakeQuantizedLinear

        return {n: m for n, m in self.target(model).named_modules() if isinstance(m, FakeQuantizedLinear)}

    def state(self, model: nn.Module) -> str:
        if self._fake_quantized(model):
            return "prepared"
        return "converted" if self.prepared else "float"

    def prepare(self, model: nn.Module) -> None:
        from torchao.quantization import quantize_

        target = self.target(model)
        linears = selected_linears(target, self.config.selection, self.config.scheme, self.describe(model))
        check_group_size(
            linears, self.config.weight_group_size, f"{self.config.module}." if self.config.module else ""
        )
        self.float_layers = sum(isinstance(m, nn.Conv2d | nn.Linear) for m in target.modules())
        names = set(linears)
        quantize_(target, self._torchao_config("prepare"), filter_fn=lambda m, fqn: fqn in names)
        self.prepared = {name: target.get_submodule(name) for name in names}
        self.set_layers(sorted(names))

    def convert(self, model: nn.Module) -> None:
        from torchao.quantization import quantize_

        names = set(self._fake_quantized(model))
        quantize_(self.target(model), self._torchao_config("convert"), filter_fn=lambda m, fqn: fqn in names)

    def restore_float(self, model: nn.Module) -> None:
        target = self.target(model)
        if self.state(model) == "converted":
            for name, module in self.prepared.items():
                target.set_submodule(name, module)
        for name, module in self._fake_quantized(model).items():
            target.set_submodule(name, module.to_linear())  # type: ignore[operator]
        self.prepared = {}

    def quantizers(self, model: nn.Module) -> dict[nn.Module, str]:
        kinds: dict[nn.Module, str] = {}
        for linear in self._fake_quantized(model).values():
            for kind in ("weight", "activation"):
                quantizer = getattr(linear, f"{kind}_fake_quantizer", None)
                if quantizer is not None:
                    kinds[quantizer] = kind
        return kinds

    def set_phase(
        self, model: nn.Module, fake_quant: bool, observe: bool, bn_frozen: bool, reduce: Callable
    ) -> list[str]:
        quantizers = list(self.quantizers(model))
        started = fake_quant and any(not q.enabled for q in quantizers)
        for quantizer in quantizers:
            quantizer.enabled = fake_quant
        return ["fake quantization started"] if started else []

    def prepare_for_checkpoint(
        self, model: nn.Module, state_dict: dict[str, Any], prefix: str, fitting: bool
    ) -> None:
        from torch.utils._python_dispatch import is_traceable_wrapper_subclass

        for name in self.weight_names:
            value = state_dict.get(prefix + name)
            if value is not None:
                self.ensure(model, "converted" if is_traceable_wrapper_subclass(value) else "prepared")
                return


def quantize_low_bit(
    model: nn.Module,
    scheme: str = "int8-dynamic-intx",
    bits: int = 4,
    group_size: int | None = 32,
    modules: Selector = nn.Linear,
    exclude: Selector = None,
) -> nn.Module:
    """Post-training quantization of the selected ``nn.Linear`` layers of a float ``model``, in place.

    The layers are converted with the torchao config that quantization-aware training with the same arguments
    converts to (:func:`low_bit_config`), so a post-training and a quantization-aware model end in the same
    weight format and kernels; the weights are rounded as they are (no calibration, no training). The layer
    selection and its checks are those of :class:`QuantizationConfig` (``group_size`` must divide every selected
    layer's input size; the output projections of ``nn.MultiheadAttention`` are left in float).

    Args:
        model: a float model.
        scheme: ``"int8-dynamic-intx"``, ``"intx-weight-only"`` or ``"int4-weight-only"``.
        bits: weight bits, 2 to 8.
        group_size: weights per scale along the input (``None``: one scale per output channel).
        modules: the layers to quantize (types and/or name patterns).
        exclude: layers to leave in float.

    Returns:
        ``model``, its selected layers' weights now quantized tensors.

    Example::

        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))
        >>> x = torch.randn(8, 64)
        >>> reference = model(x)
        >>> _ = quantize_low_bit(model, "intx-weight-only", bits=4, group_size=32)
        >>> type(model[0].weight).__name__
        'IntxUnpackedToInt8Tensor'
        >>> 0 < float((model(x) - reference).abs().max()) < 0.1
        True
    """
    from torchao.quantization import quantize_

    if scheme == "int8":
        raise ValueError(
            "`scheme='int8'` (static int8) needs calibration: use `quantize_int8_ptq`; this function takes the "
            "low-bit weight schemes 'int8-dynamic-intx', 'intx-weight-only' and 'int4-weight-only'."
        )
    config = QuantizationConfig(
        scheme=scheme, bits=bits, group_size=group_size, modules=modules, exclude=exclude
    )
    linears = selected_linears(model, config.selection, scheme, f"the {type(model).__name__}")
    check_group_size(linears, config.weight_group_size)
    names = set(linears)
    with torch.no_grad():
        quantize_(
            model,
            low_bit_config(scheme, config.bits, group_size),  # type: ignore[arg-type]
            filter_fn=lambda m, fqn: fqn in names,
        )
    return model


def degradation_recovered(float_value: float, ptq_value: float, qat_value: float) -> float:
    """The fraction of the post-training quantization degradation that quantization-aware training recovers.

    ``(ptq - qat) / (ptq - float)`` for a lower-is-better metric such as perplexity or loss (for accuracy, the
    same ratio of the drops): 1 when QAT matches the float model, 0 when it is no better than PTQ, negative when
    worse, above 1 when it beats the float model. ``nan`` when PTQ lost nothing (nothing to recover).

    Args:
        float_value: the metric of the float model (the reference that PTQ quantizes).
        ptq_value: the metric after post-training quantization of that model.
        qat_value: the metric after quantization-aware training.

    Example::

        >>> degradation_recovered(float_value=10.0, ptq_value=13.0, qat_value=11.0)  # 2 of 3 points recovered
        0.6666666666666666
        >>> degradation_recovered(0.90, 0.80, 0.88)  # accuracy: 0.08 of the 0.10 drop
        0.7999999999999998
    """
    lost = ptq_value - float_value
    if lost == 0:
        return math.nan
    return (ptq_value - qat_value) / lost
