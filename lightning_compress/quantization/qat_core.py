"""Quantization-aware training on a plain ``nn.Module``: one config, two verbs, two cores behind one interface.

:class:`QuantizationConfig` says *what* (scheme, bits, group size, which part); :func:`prepare_qat` inserts fake
quantization for training and :func:`convert_qat` makes the real quantized model. The static int8 scheme goes
through torchao's PT2E path (:mod:`~lightning_compress.quantization.int8_qat`), the low-bit weight schemes through
torchao's ``QATConfig`` (:mod:`~lightning_compress.quantization.low_bit`); both implement :class:`QATParts`, which
:class:`~lightning_compress.quantization.QuantizationAwareTraining` drives during a fit. No Lightning here.

Example::

    >>> model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    >>> config = QuantizationConfig(scheme="intx-weight-only", bits=4, group_size=8)
    >>> prepared = prepare_qat(model, config)
    >>> _ = prepared(torch.randn(8, 16))  # train as usual
    >>> converted = convert_qat(prepared, config)
    >>> type(converted[0].weight).__name__
    'IntxUnpackedToInt8Tensor'
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_compress import _checks
from lightning_compress._inputs import as_call, first_input_or_none, input_shapes
from lightning_compress._inputs import to_device as _to_device
from lightning_compress.selection import ModuleSelection, Selector, find_submodule, selector_items

SCHEMES = ("int8", "int8-dynamic-intx", "intx-weight-only", "int4-weight-only")
LOW_BIT_SCHEMES = SCHEMES[1:]
# The group sizes torchao's int4 weight-only kernels accept.
INT4_GROUP_SIZES = (32, 64, 128, 256)


@dataclass(frozen=True)
class QuantizationConfig:
    """What quantization-aware training does to a model.

    Args:
        scheme: ``"int8"`` (static int8 weights and activations through torchao's PT2E path, batch norm folded),
            ``"int8-dynamic-intx"`` (int8 dynamic activations, ``bits``-bit weights), ``"intx-weight-only"``
            (``bits``-bit weights) or ``"int4-weight-only"``; the last three quantize ``nn.Linear`` layers.
        bits: weight bits: 8 for ``"int8"`` (the default), 2 to 8 for the low-bit schemes (default 4).
        group_size: low-bit schemes: weights per scale along the input (``None``: one scale per output channel).
        module: qualified name of the part to quantize; ``None``: the whole model (see :func:`prepare_qat`).
        modules: low-bit schemes: the ``nn.Linear`` layers to quantize (types and/or name patterns).
        exclude: low-bit schemes: layers to leave in float.

    Example::

        >>> QuantizationConfig(scheme="intx-weight-only").bits
        4
        >>> QuantizationConfig(scheme="int8", bits=4)
        Traceback (most recent call last):
        ...
        ValueError: `bits=4` is not available with `scheme='int8'` (8-bit only). Use `scheme='int8-dynamic-intx'` or 'intx-weight-only' for 2 to 8-bit weights.
    """

    scheme: str = "int8"
    bits: int | None = None
    group_size: int | None = None
    module: str | None = None
    modules: Selector = nn.Linear
    exclude: Selector = None
    selection: ModuleSelection = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _checks.check_choice(self.scheme, "scheme", SCHEMES)
        bits = _checks.check_qat_bits(self.scheme, self.bits, self.group_size, INT4_GROUP_SIZES)
        object.__setattr__(self, "bits", bits)
        _checks.check_qat_module(self.module)
        _checks.check_qat_layers(self.scheme, self.modules is not nn.Linear or self.exclude is not None)
        object.__setattr__(self, "selection", ModuleSelection(self.modules, self.exclude))

    @property
    def weight_group_size(self) -> int | None:
        """The group size the weights are quantized with (torchao's default 128 for ``"int4-weight-only"``)."""
        return 128 if self.scheme == "int4-weight-only" and self.group_size is None else self.group_size


def allocate_bits(config: QuantizationConfig, layer_bits: Mapping[str, float]) -> QuantizationConfig:
    """``config`` with the layers a budget left at 32 bits kept in float (added to ``exclude``).

    A low-bit scheme quantizes every selected layer to ``config.bits``: the only other level a layer can have is
    float (32).

    Example::

        >>> config = QuantizationConfig("intx-weight-only", bits=4)
        >>> allocate_bits(config, {"fc1": 4, "fc2": 32}).selection.exclude
        ['fc2']
        >>> allocate_bits(config, {"fc1": 8})
        Traceback (most recent call last):
        ...
        ValueError: QuantizationAwareTraining(bits=4) quantizes a layer to 4 bits or leaves it in float (32); the budget chose [8.0] bits. Give CompressionBudget `levels=(32, 4)`, its default next to this callback.
    """
    other = sorted({float(b) for b in layer_bits.values()} - {32.0, float(config.bits or 0)})
    if other:
        raise ValueError(
            f"QuantizationAwareTraining(bits={config.bits}) quantizes a layer to {config.bits} bits or leaves it in "
            f"float (32); the budget chose {other} bits. Give CompressionBudget `levels=(32, {config.bits})`, its "
            "default next to this callback."
        )
    exclude = selector_items(config.exclude)
    exclude += [name for name, bits in layer_bits.items() if float(bits) == 32.0 and name not in exclude]
    return dataclasses.replace(config, exclude=exclude or None)


def shipping_failed(failure: BaseException, export_path: Any) -> RuntimeError:
    """The error when the int8 model was converted but saving it to ``export_path`` (or measuring it) failed."""
    what = f"saving it to `export_path={os.fspath(export_path)!r}`" if export_path else "measuring it"
    return RuntimeError(
        f"QuantizationAwareTraining converted the model, but {what} failed ({type(failure).__name__}: "
        f"{failure}). The converted model is installed in the LightningModule and usable; save it with "
        "`lightning_compress.export(model, path)` once the cause is fixed."
    )


# -- helpers both cores use --------------------------------------------------------------------------------


@contextlib.contextmanager
def train_mode(module: nn.Module, training: bool) -> Iterator[None]:
    """``module`` (and every submodule) in train or eval mode for a while, each flag put back afterwards."""
    saved = [(m, m.training) for m in module.modules()]
    module.train(training)
    try:
        yield
    finally:
        for m, flag in saved:
            m.training = flag


def detached(example: Any) -> Any:
    """A detached copy of an example input (tensors cloned), whatever its nesting."""
    if isinstance(example, Tensor):
        return example.detach().clone()
    if isinstance(example, list | tuple):
        return type(example)(detached(e) for e in example)
    if isinstance(example, dict):
        return {k: detached(v) for k, v in example.items()}
    return example


def run(module: nn.Module, inputs: tuple[tuple, dict]) -> Any:
    """``module``'s output on ``inputs`` (positional and keyword arguments) in eval mode, without gradients."""
    with train_mode(module, False), torch.no_grad():
        return module(*inputs[0], **inputs[1])


def check_example_runs(model: nn.Module, example: Any, given: bool) -> None:
    """Run ``model`` once on ``example`` (eval mode, no gradients; nothing without one) before training, so that an
    input the model rejects fails now, named by where it came from (``given``: the callback's ``example_input``,
    else the model's ``example_input_array``, else a batch), rather than at the conversion after the last step.

    Example::

        >>> model = nn.Linear(4, 2)
        >>> check_example_runs(model, torch.zeros(1, 4), given=True)
        >>> check_example_runs(model, torch.zeros(1, 3), given=True)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: QuantizationAwareTraining runs the model on `example_input` ...
    """
    if example is None:
        return
    source = "the first batch's model input (no `example_input` nor `example_input_array` was given)"
    if given or getattr(model, "example_input_array", None) is not None:
        source = "`example_input`" if given else "`example_input_array`"
    try:
        run(model, as_call(example))
    except Exception as err:
        raise ValueError(
            f"QuantizationAwareTraining runs the model on {source} (shapes {input_shapes(example)}) to convert "
            f"it at the end, and the model rejected it: {type(err).__name__}: {err}. Pass "
            "`QuantizationAwareTraining(example_input=...)` (or set `example_input_array` on the LightningModule) "
            "with one input the forward accepts: a tensor, a tuple of positional inputs or a dict of keyword "
            "inputs, e.g. `{'input_ids': ..., 'attention_mask': ...}`."
        ) from err


def parity_input(batches: list[Any], example: Any) -> Any:
    """The model input of ``batches[0]`` (a validation batch: more samples for the conversion's parity check) when it
    has the form of ``example`` (or there is no example), else ``None`` (the example is used): not ``input_ids``
    alone for a model that takes ``{"input_ids": ..., "attention_mask": ...}``.

    Example::

        >>> parity_input([(torch.zeros(64, 3), torch.zeros(64))], torch.zeros(2, 3)).shape
        torch.Size([64, 3])
        >>> parity_input([{"input_ids": torch.zeros(64, 3)}], {"input_ids": torch.zeros(2, 3), "mask": None}) is None
        True
    """
    given = first_input_or_none(batches[0]) if batches else None
    return given if example is None or given is None or same_form(given, example) else None


def same_form(a: Any, b: Any) -> bool:
    """Whether two model inputs have the same form: tensors of the same rank, sequences of the same length or
    dicts of the same keys, item by item (the batch sizes may differ).

    Example::

        >>> same_form(torch.zeros(64, 3), torch.zeros(2, 3)), same_form(torch.zeros(2, 3), {"x": torch.zeros(2, 3)})
        (True, False)
    """
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return a.dim() == b.dim()
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(same_form(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_form(a[k], b[k]) for k in a)
    return type(a) is type(b)


class _Captured(Exception):
    pass


def capture_inputs(
    model: nn.Module, parts: dict[str, nn.Module], example: Any, required: bool = True
) -> dict[str, tuple[tuple, dict]]:
    """The inputs each of ``parts`` (by name) receives at its first call when ``model`` runs on ``example``.

    The forward runs in eval mode without gradients, and stops once every part has been called. A part the
    forward does not call is an error when ``required``, else left out.

    Example::

        >>> model = nn.Sequential(nn.Linear(4, 3), nn.ReLU())
        >>> args, kwargs = capture_inputs(model, {"1": model[1]}, torch.ones(2, 4))["1"]
        >>> tuple(args[0].shape), kwargs
        ((2, 3), {})
    """
    found: dict[str, tuple[tuple, dict]] = {}
    if any(part is model for part in parts.values()):
        found.update({name: as_call(example) for name, part in parts.items() if part is model})

    def hook(name: str) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if name not in found:
                found[name] = (detached(args), detached(kwargs))
            if len(found) == len(parts):
                raise _Captured

        return record

    wanted = {name: part for name, part in parts.items() if name not in found}
    handles = [part.register_forward_pre_hook(hook(name), with_kwargs=True) for name, part in wanted.items()]
    args, kwargs = as_call(example)
    try:
        if wanted:
            with train_mode(model, False), torch.no_grad():
                model(*args, **kwargs)
    except _Captured:
        pass
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name in parts if name not in found]
    if missing and required:
        raise ValueError(
            f"The quantized submodule ({type(parts[missing[0]]).__name__}) is not called by the LightningModule's "
            "forward, so its input is unknown. Quantize a module that `forward` calls, or pass `example_input`."
        )
    return found


def layer_types(target: nn.Module) -> str:
    """The kinds of layers with parameters in ``target``, for error messages.

    Example::

        >>> layer_types(nn.Sequential(nn.Embedding(4, 2), nn.ReLU(), nn.LayerNorm(2)))
        'Embedding, LayerNorm'
    """
    kinds = sorted(
        {type(m).__name__ for m in target.modules() if any(True for _ in m.parameters(recurse=False))}
    )
    return ", ".join(kinds) if kinds else "no layers with parameters"


def relative_error(reference: Tensor, approximation: Tensor) -> float:
    """``||approximation - reference|| / ||reference||`` (0 for a zero reference)."""
    norm = float(reference.detach().float().norm())
    return float((approximation.detach().float() - reference.detach().float()).norm()) / norm if norm else 0.0


def parity(before: Any, after: Any) -> dict[str, float]:
    """How closely ``after`` (the converted model's output) follows ``before`` (the fake-quantized one's).

    Example::

        >>> parity(torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, 2.5]]))["argmax_agreement"]
        1.0
    """
    if not isinstance(before, Tensor) or not isinstance(after, Tensor):
        return dict.fromkeys(("argmax_agreement", "max_abs_diff", "relative_error"), float("nan"))
    before, after = before.detach().float(), after.detach().float()
    agreement = float((before.argmax(-1) == after.argmax(-1)).float().mean()) if before.dim() > 1 else 1.0
    return {
        "argmax_agreement": agreement,
        "max_abs_diff": float((before - after).abs().max()),
        "relative_error": relative_error(before, after),
    }


class ErrorRecorder:
    """A forward hook for fake quantizers: the relative L2 error between input and output, while ``active``."""

    def __init__(self) -> None:
        self.active = False
        self.errors: dict[str, list[float]] = {"weight": [], "activation": []}
        self.kinds: dict[nn.Module, str] = {}

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self.active and isinstance(output, Tensor) and args and isinstance(args[0], Tensor):
            self.errors[self.kinds.get(module, "activation")].append(relative_error(args[0], output))

    def pop(self) -> dict[str, float]:
        """The mean error per kind (``"weight"``, ``"activation"``) since the last call."""
        result = {k: sum(v) / len(v) for k, v in self.errors.items() if v}
        self.errors = {"weight": [], "activation": []}
        return result


_ADAPTIVE = (
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.Adamax,
    torch.optim.NAdam,
    torch.optim.RAdam,
    torch.optim.RMSprop,
    torch.optim.Adagrad,
)


def frozen_bn_warning(optimizers: list[torch.optim.Optimizer], freeze_bn: Any) -> str | None:
    """What to warn about when batch norm is frozen (``freeze_bn``) under an adaptive optimizer at a usual
    learning rate, else ``None``.

    Adaptive optimizers move every weight by about ``lr`` whatever its gradient. Batch statistics cancel the
    resulting per-channel shift of each conv output; frozen running statistics do not, and the shift compounds
    through the network (measured: a residual net's loss from 0.008 to 32 in 7 Adam steps).

    Example::

        >>> optimizer = torch.optim.Adam(nn.Linear(2, 2).parameters(), lr=1e-3)
        >>> frozen_bn_warning([optimizer], 0.8)[:40]
        '`freeze_bn=0.8` with Adam at lr=0.001: o'
    """
    for optimizer in optimizers:
        lr = max(float(group["lr"]) for group in optimizer.param_groups)
        if freeze_bn is not None and isinstance(optimizer, _ADAPTIVE) and lr >= 1e-4:
            return (
                f"`freeze_bn={freeze_bn!r}` with {type(optimizer).__name__} at lr={lr:g}: once batch norm uses its "
                "frozen running statistics, steps of this size shift each layer's outputs away from them and "
                "training can collapse. Leave `freeze_bn=None` (the statistics then keep tracking the weights), or "
                "lower the learning rate at least 10x from that point, or use SGD. See docs/quantization.md, "
                "'Freezing batch norm'."
            )
    return None


# -- the interface of the cores ----------------------------------------------------------------------------


class QATParts:
    """The part of a model that quantization-aware training changes, and how: what both cores implement.

    A model is in one of three states: ``"float"``, ``"prepared"`` (fake quantization) or ``"converted"``.
    ``example`` is the model's input (parts are exported or checked on it); ``weight_names`` maps each quantized
    weight (its name in the model's state dict) to the part holding it.
    """

    def __init__(self, config: QuantizationConfig) -> None:
        self.config = config
        self.example: Any = None
        self.weight_names: dict[str, str] = {}
        self.float_layers = 0
        self.ranges: dict[str, Tensor] = {}

    def target(self, model: nn.Module) -> nn.Module:
        """The module ``config.module`` names in ``model`` (``model`` itself for ``None``)."""
        name = self.config.module
        if name is None:
            return model
        return find_submodule(model, name, f"module={name!r}", empty="None quantizes the whole forward")

    def describe(self, model: nn.Module) -> str:
        """The quantized part, as errors name it."""
        if self.config.module is None:
            return f"{type(model).__name__}.forward (`module=None`)"
        return f"`module={self.config.module!r}` ({type(self.target(model)).__name__})"

    def state(self, model: nn.Module) -> str:
        raise NotImplementedError

    def prepare(self, model: nn.Module) -> None:
        """Put fake quantization in place (from the float state)."""
        raise NotImplementedError

    def convert(self, model: nn.Module) -> None:
        """Replace the prepared parts by the real quantized ones."""
        raise NotImplementedError

    def restore_float(self, model: nn.Module) -> None:
        """Put the float layers back (from any state)."""
        raise NotImplementedError

    def float_view(self, model: nn.Module) -> contextlib.AbstractContextManager[None]:
        """The float layers in place for a while; structural edits made meanwhile are prepared again."""
        return contextlib.nullcontext()

    def quantizers(self, model: nn.Module) -> dict[nn.Module, str]:
        """Every fake quantizer, and what it quantizes: ``"weight"`` or ``"activation"``."""
        raise NotImplementedError

    def set_phase(
        self, model: nn.Module, fake_quant: bool, observe: bool, bn_frozen: bool, reduce: Callable
    ) -> list[str]:
        """Switch fake quantization, range observation and batch-norm statistics; return the events reached
        (``"fake quantization started"``, ``"observers frozen"``, ``"batch norm frozen"``)."""
        raise NotImplementedError

    def synchronize(self, model: nn.Module, reduce: Callable, broadcast: Callable | None) -> None:
        """Make every process hold the same quantization state before conversion (``reduce``: a mean over the
        processes; ``broadcast``: rank zero's object, ``None`` for one process)."""

    def prepare_for_checkpoint(
        self, model: nn.Module, state_dict: dict[str, Any], prefix: str, fitting: bool
    ) -> None:
        """Give ``model`` the structure ``state_dict`` was saved with, just before it loads."""
        raise NotImplementedError

    def target_inputs(self, model: nn.Module, example: Any = None) -> tuple[tuple, dict]:
        """The quantized part's input when ``model`` runs on ``example`` (default: :attr:`example`), on the
        model's device, as positional and keyword arguments."""
        example = self.example if example is None else example
        example = _to_device(detached(example), next(model.parameters(), torch.empty(0)).device)
        target = self.target(model)
        return as_call(example) if target is model else capture_inputs(model, {"": target}, example)[""]

    def checkpoint_state(self) -> dict[str, Any]:
        """What a checkpoint needs to rebuild the structure without the callback's arguments (see
        ``load_qat_checkpoint``): the quantized part, the low-bit layers, the int8 ranges, the example input."""
        example = None if self.example is None else _to_device(detached(self.example), "cpu")
        return {
            "module": self.config.module,
            "group_size": self.config.group_size,
            "layers": None,
            "ranges": self.ranges,
            "example_input": example,
        }

    def sizes(self, model: nn.Module, quantized: list[str]) -> dict[str, float]:
        """The fraction of conv/linear layers quantized, and the weight bytes in fp32 and at the quantized bits
        (``quantized``: the names of the parameters stored at ``config.bits``)."""
        params = dict(model.named_parameters())
        fp32 = sum(p.numel() * 4 for p in params.values())
        size = fp32 - sum(params[n].numel() * (4 - self.config.bits / 8) for n in quantized if n in params)  # type: ignore[operator]
        layers = len(self.weight_names) / max(self.float_layers, len(self.weight_names), 1)
        return {"layers_quantized": layers, "size_fp32_bytes": fp32, "size_quantized_bytes": size}

    def ensure(self, model: nn.Module, want: str) -> None:
        """Bring ``model`` to the state ``want`` (``"float"``, ``"prepared"`` or ``"converted"``)."""
        current = self.state(model)
        if current == want:
            return
        if current == "converted" or want == "float":
            self.restore_float(model)
        if want == "float":
            return
        if self.state(model) == "float":
            self.prepare(model)
        if want == "converted":
            self.convert(model)


def qat_parts(config: QuantizationConfig) -> QATParts:
    """The core that implements ``config.scheme``."""
    if config.scheme == "int8":
        from lightning_compress.quantization.int8_qat import Int8Parts

        return Int8Parts(config)
    from lightning_compress.quantization.low_bit import LowBitParts

    return LowBitParts(config)


# -- the verbs -----------------------------------------------------------------------------------------------


def prepare_qat(
    model: nn.Module, config: QuantizationConfig | None = None, example_input: Any = None
) -> nn.Module:
    """Insert fake quantization into ``model`` for training; returns the model to train.

    With a low-bit scheme the selected ``nn.Linear`` layers are swapped for torchao's ``FakeQuantizedLinear``
    in place. With ``"int8"`` the part ``config.module`` names is exported and replaced in place by a
    :class:`~lightning_compress.quantization.pt2e.QuantizedGraphModule`; with ``module=None`` the whole model is
    exported and the graph module is returned (``model`` is not changed; the graph shares its parameters).

    Args:
        model: a float model, in the train/eval mode to prepare it in (train it afterwards).
        config: the scheme (default: ``QuantizationConfig()``, static int8).
        example_input: an input of ``model`` (a tensor, a tuple of positional inputs or a dict of keyword
            inputs), needed by ``"int8"``; default: ``model.example_input_array``.

    Example::

        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3))
        >>> x = torch.randn(16, 1, 8, 8)
        >>> prepared = prepare_qat(model, QuantizationConfig(), example_input=x)
        >>> _ = prepared(x)  # a training step's forward: ranges are observed
        >>> converted = convert_qat(prepared, QuantizationConfig())
        >>> prepared.eval()(x).argmax(1).equal(converted(x).argmax(1))
        True
    """
    config = config or QuantizationConfig()
    example = example_input if example_input is not None else getattr(model, "example_input_array", None)
    if config.scheme == "int8" and config.module is None:
        from lightning_compress.quantization.pt2e import prepare_int8_qat

        if example is None:
            raise ValueError("`example_input` is needed to export the model: pass an input of the model.")
        args, kwargs = as_call(example)
        return prepare_int8_qat(model, args, kwargs)
    parts = qat_parts(config)
    parts.example = example
    parts.prepare(model)
    return model


def convert_qat(model: nn.Module, config: QuantizationConfig | None = None) -> nn.Module:
    """Make the real quantized model out of one :func:`prepare_qat` returned (and that was trained).

    In place, except for an int8 graph module given as ``model``: its converted copy is returned. See
    :func:`prepare_qat` for an example.
    """
    from lightning_compress.quantization.pt2e import QuantizedGraphModule, convert_int8

    if isinstance(model, QuantizedGraphModule):
        return convert_int8(model)
    qat_parts(config or QuantizationConfig()).convert(model)
    return model
