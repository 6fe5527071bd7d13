"""QuantizationAwareTraining: train with simulated quantization, then convert to a real int8 or low-bit model."""

from __future__ import annotations

import contextlib
import difflib
import functools
import math
import os
import tempfile
import weakref
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from lightning_compress._events import record_event, watch_loss
from lightning_compress._inputs import as_call, call_module
from lightning_compress._lightning import (
    add_checkpoint_hint,
    detach_input,
    drop_checkpoint_hints,
    first_input,
    forget_original,
    log_step,
    per_layer_name,
    register_host,
    remember_original,
    resolve_step,
    set_up_in_order,
    to_device,
    unregister_host,
)
from lightning_compress.export import check_writable
from lightning_compress.quantization.pt2e import (
    QuantizedGraphModule,
    compile_for_cpu,
    convert_int8,
    fake_quantizers,
    prepare_int8_qat,
    quantized_weight_names,
    save_quantized,
    sync_observers,
)
from lightning_compress.schedules import Point, validate_point
from lightning_compress.selection import ModuleSelection, Selector
from lightning_compress.stats import TensorFormat, compare_latency

SCHEMES = ("int8", "int8-dynamic-intx", "intx-weight-only", "int4-weight-only")
LOW_BIT_SCHEMES = SCHEMES[1:]
# The group sizes torchao's int4 weight-only kernels accept.
INT4_GROUP_SIZES = (32, 64, 128, 256)
# Children of the LightningModule that hold the quantized forward when the whole forward is quantized.
ROOT_CHILD = "quantized"
# An entry added to the saved ``state_dict`` of a model this callback changed: loading the checkpoint into the
# plain class (``load_from_checkpoint``, strict) lists it among the unexpected keys, which says what to use.
CHECKPOINT_HINT = (
    "lightning_compress: QuantizationAwareTraining changed this model's structure; load this checkpoint with "
    "`lightning_compress.quantization.load_qat_checkpoint(YourModule(...), path)`, not load_from_checkpoint"
)


def _broadcast_buffers(trainer: pl.Trainer, module: nn.Module) -> None:
    """Give every process rank zero's buffers (batch-norm statistics, observer state) before conversion.

    DDP sends rank zero's buffers at the start of each forward, but the last training forward updates each
    process's batch-norm statistics with its own batch: without this, each process would fold different
    statistics into its int8 model.
    """
    if trainer.world_size <= 1:
        return
    buffers = dict(module.named_buffers())
    source = trainer.strategy.broadcast(
        {name: b.detach().cpu().clone() for name, b in buffers.items()}, src=0
    )
    with torch.no_grad():
        for name, buffer in buffers.items():
            buffer.copy_(source[name])


def whole_forward_graph(module: nn.Module) -> nn.Module | None:
    """The quantized graph that runs as ``module``'s whole forward (``module=None``), or ``None``."""
    forward = module.__dict__.get("forward")
    owner = getattr(forward, "__self__", None)
    return owner if isinstance(owner, nn.Module) else None


_SUPPORTED_PRECISION = ("32-true", "32", "bf16-mixed")
# Callbacks that rewrite every weight to their own storage format, which the int8 graph would quantize again.
_REWRITE_WEIGHTS = {"WeightSharing": "k-means shared values", "BinaryWeights": "binary/ternary values"}


# -- low-bit weight schemes (torchao QATConfig) ---------------------------------------------------------


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

    Example::

        >>> check_low_bit_supported("intx-weight-only", 4, 32)
    """
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    config = low_bit_config(scheme, bits, group_size)
    # The probe's input size is a multiple of `group_size`: whether the model's layers are is checked apart,
    # naming them, so that this only tells whether the machine can run the scheme.
    in_features = group_size * max(1, 256 // group_size) if group_size else 256
    probe = nn.Sequential(nn.Linear(in_features, 16))
    try:
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


def _layer_types(target: nn.Module) -> str:
    """The kinds of layers with parameters in ``target``, for error messages."""
    kinds = sorted(
        {type(m).__name__ for m in target.modules() if any(True for _ in m.parameters(recurse=False))}
    )
    return ", ".join(kinds) if kinds else "no layers with parameters"


def _selected_linears(
    target: nn.Module, selection: ModuleSelection, scheme: str, where: str
) -> dict[str, nn.Module]:
    problem = (
        f"`scheme={scheme!r}` quantizes `nn.Linear` layers, and {where} has none that the selection "
        f"{selection} picks (its layers: {_layer_types(target)}). Point `module=` at a part with "
        "nn.Linear layers, or widen `modules`/`exclude`."
    )
    try:
        chosen = {name: m for name, m in selection.select(target) if isinstance(m, nn.Linear)}
    except ValueError as err:
        if "matches no module" not in str(err):
            raise  # e.g. a name pattern that matches nothing: that message names the pattern
        raise ValueError(problem) from err
    if not chosen:
        raise ValueError(problem)
    return chosen


def _check_group_size(linears: dict[str, nn.Module], group_size: int | None, prefix: str = "") -> None:
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


def _low_bit_quantizers(target: nn.Module) -> Iterator[nn.Module]:
    from torchao.quantization.qat.linear import FakeQuantizedLinear

    for module in target.modules():
        if isinstance(module, FakeQuantizedLinear):
            for quantizer in (module.activation_fake_quantizer, module.weight_fake_quantizer):
                if quantizer is not None:
                    yield quantizer


# -- helpers ---------------------------------------------------------------------------------------------


class _Captured(Exception):
    def __init__(self, args: tuple, kwargs: dict) -> None:
        super().__init__()
        self.args_, self.kwargs_ = args, kwargs


@contextlib.contextmanager
def _mode(module: nn.Module, training: bool) -> Iterator[None]:
    saved = [(m, m.training) for m in module.modules()]
    module.train(training)
    try:
        yield
    finally:
        for m, flag in saved:
            m.training = flag


def _capture_inputs(pl_module: nn.Module, target: nn.Module, example: Any) -> tuple[tuple, dict]:
    """The inputs ``target`` receives when ``pl_module`` runs on ``example`` (the forward stops there)."""
    if target is pl_module:
        return as_call(example)

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        raise _Captured(args, kwargs)

    handle = target.register_forward_pre_hook(hook, with_kwargs=True)
    args, kwargs = as_call(example)
    try:
        with _mode(pl_module, False), torch.no_grad():
            pl_module(*args, **kwargs)
    except _Captured as captured:
        return detach_input(captured.args_), detach_input(captured.kwargs_)
    finally:
        handle.remove()
    raise ValueError(
        f"The quantized submodule ({type(target).__name__}) is not called by the LightningModule's forward, "
        "so its input is unknown. Quantize a module that `forward` calls, or pass `example_input`."
    )


def _dataloader(trainer: pl.Trainer, stage: str) -> Any:
    loop = {
        "fit": trainer.fit_loop,
        "validate": trainer.validate_loop,
        "test": trainer.test_loop,
        "predict": trainer.predict_loop,
    }[stage]
    source = getattr(loop, "_data_source", None)
    if source is None or not source.is_defined():
        return None
    try:
        return source.dataloader()
    except Exception:
        return None


def _first_batch(loader: Any) -> Any:
    if isinstance(loader, list | tuple):
        loader = loader[0] if loader else None
    if loader is None:
        return None
    try:
        return next(iter(loader))
    except (StopIteration, TypeError):
        return None


def _relative_error(reference: Tensor, approximation: Tensor) -> float:
    norm = float(reference.detach().float().norm())
    return float((approximation.detach().float() - reference.detach().float()).norm()) / norm if norm else 0.0


class _ErrorRecorder:
    """Relative L2 error between each fake-quantizer's input and output, on the steps it is switched on."""

    def __init__(self) -> None:
        self.active = False
        self.errors: dict[str, list[float]] = {"weight": [], "activation": []}
        self.kinds: dict[nn.Module, str] = {}

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self.active and isinstance(output, Tensor) and args and isinstance(args[0], Tensor):
            self.errors[self.kinds.get(module, "activation")].append(_relative_error(args[0], output))

    def pop(self) -> dict[str, float]:
        result = {k: sum(v) / len(v) for k, v in self.errors.items() if v}
        self.errors = {"weight": [], "activation": []}
        return result


class QuantizationAwareTraining(Callback):
    """Quantization-aware training (Jacob et al. 2018) with torchao, and conversion to the real quantized model.

    Schemes:

    - ``"int8"`` (default): static int8 for conv / linear models through torchao's PT2E path — the quantized
      part of the model is exported with ``torch.export``, prepared with the X86 inductor quantizer in QAT mode
      (per-channel symmetric int8 weights, per-tensor uint8 activations, batch norm folded into convolutions)
      and converted with ``convert_pt2e``. Run the converted model through
      :func:`~lightning_compress.quantization.pt2e.compile_for_cpu` for int8 kernels.
    - ``"int8-dynamic-intx"``, ``"intx-weight-only"``: low-bit weights (``bits`` from 2 to 8, one scale per
      output channel or per ``group_size`` inputs) for ``nn.Linear`` layers through
      ``torchao.quantization.qat.QATConfig``; the first also quantizes activations dynamically to int8.
    - ``"int4-weight-only"``: accepted only where torchao can convert it (not on CPU); checked at setup.

    Which part is quantized (int8): ``module=None`` quantizes the LightningModule's whole ``forward``; a name
    such as ``"net"`` or ``"backbone.encoder"`` quantizes that submodule only (use it when ``forward`` does
    something ``torch.export`` cannot trace). The prepared graph takes the place of the float part in the
    model: a named submodule is replaced by a :class:`~lightning_compress.quantization.pt2e.QuantizedGraphModule`
    with the same state-dict keys plus the quantizers' buffers; for the whole forward that module is added as
    the child ``quantized``, takes over the children the forward used, and the instance's ``forward`` calls it.
    ``training_step``/``validation_step`` keep calling ``self(x)`` or ``self.net(x)`` as before; Lightning's
    ``train()``/``eval()`` switching works (observers only update in training mode).

    Lifecycle (``start``/``freeze_observers``/``freeze_bn`` take a fraction of training, ``"step:N"`` or
    ``"epoch:N"``): fp32 training until ``start``, then fake quantization with observers updating ranges,
    observers frozen from ``freeze_observers`` (ranges are averaged across processes at that point), batch norm
    statistics frozen from ``freeze_bn``. At the end of training (``convert=True``) the model is converted;
    the converted model's outputs are compared with the fake-quantized model on a validation batch
    (:attr:`parity`), and with ``export_path`` the int8 program is saved (only the tensors it uses:
    :attr:`artifact` records its size next to the fp32 program saved the same way).

    Checkpoints: the prepared structure is rebuilt in ``setup`` from the arguments, before Lightning loads the
    weights, so a resumed run continues exactly. Loading a checkpoint whose structure differs from the current
    model (e.g. ``Trainer.test(ckpt_path=...)`` after conversion, or a converted checkpoint in a new process)
    rebuilds the right structure just before the weights load; with ``convert=True`` validation and test
    outside ``fit`` run the converted model. Resuming a fit from a checkpoint written without this callback
    starts QAT from its float weights. Without a Trainer, load a QAT checkpoint with :func:`load_qat_checkpoint`.

    Works with ``GradualPruning`` in any list order (the prepared graph shares the pruned parameters; symmetric
    quantization keeps zeros exactly zero; channels removed by structured pruning at the end of training are
    followed by preparing the graph again), with ``LowRankReplacement``, with logits distillation, with
    ``precision="bf16-mixed"`` (the quantized part runs in fp32) and with DDP. This callback always takes effect
    last, whatever the list order; other callbacks find the layers under the names they recorded.

    Logged: ``quantization/weight_error`` and ``quantization/activation_error`` (relative L2 error of the
    fake quantization), ``quantization/fake_quant``, ``quantization/layers_quantized`` (fraction of conv /
    linear layers), ``quantization/per_layer/bits/<weight>``, ``quantization/size_fp32_bytes`` and
    ``quantization/size_quantized_bytes`` (weights at their bit width), and at conversion the parity and
    artifact sizes. :meth:`storage_formats` lets ``CompressionMonitor`` count quantized weights at their bits.

    Args:
        scheme: see above.
        module: qualified name of the submodule to quantize, or ``None`` for the whole ``forward``.
        start: when fake quantization starts (fp32 warm-up before).
        freeze_observers: when quantization ranges stop updating (``None``: never).
        freeze_bn: when batch norm stops updating its statistics and normalizes with them while training
            (``None``: never, the default). Only with a small learning rate or SGD: adaptive optimizers at usual
            learning rates shift the layers' outputs away from the frozen statistics (warned at train start).
        convert: convert to the real quantized model at the end of training.
        bits: weight bits: 8 for ``"int8"`` (the default), 2 to 8 for the low-bit schemes (default 4).
        group_size: low-bit schemes: weights per scale (``None``: one scale per output channel).
        modules: low-bit schemes: the ``nn.Linear`` layers to quantize (types and/or name patterns).
        exclude: low-bit schemes: layers to leave in float.
        example_input: the LightningModule's input used to export the model; default ``example_input_array``,
            else the first training batch.
        export_path: where to save the converted int8 program (``.pt2``) at the end of training.
        measure: at conversion, also measure the int8 model against the fp32 one on rank zero (:attr:`measurements`,
            logged): the size of both saved programs, and the latency of both compiled the same way
            (``compile_for_cpu``: inductor with freezing) on a validation batch, median of interleaved repeats after
            warm-up. Costs two compilations (seconds).
        log_every_n_steps: how often the quantization error is measured and logged.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> qat = QuantizationAwareTraining(scheme="int8", module="net", start=0.5, freeze_observers=0.8)
        >>> trainer = Trainer(callbacks=[qat], max_epochs=4, logger=False)
        >>> QuantizationAwareTraining(scheme="int8", bits=4)
        Traceback (most recent call last):
        ...
        ValueError: `bits=4` is not available with `scheme='int8'` (8-bit only). Use `scheme='int8-dynamic-intx'` or 'intx-weight-only' for 2 to 8-bit weights.
    """

    def __init__(
        self,
        scheme: str = "int8",
        module: str | None = None,
        start: Point = 0.0,
        freeze_observers: Point | None = None,
        freeze_bn: Point | None = None,
        convert: bool = True,
        bits: int | None = None,
        group_size: int | None = None,
        modules: Selector = nn.Linear,
        exclude: Selector = None,
        example_input: Any = None,
        export_path: str | os.PathLike | None = None,
        measure: bool = False,
        log_every_n_steps: int = 50,
    ) -> None:
        if scheme not in SCHEMES:
            raise ValueError(f"Unknown `scheme={scheme!r}`. Use one of {', '.join(map(repr, SCHEMES))}.")
        if bits is not None and (isinstance(bits, bool) or not isinstance(bits, int)):
            raise TypeError(f"`bits={bits!r}` must be an integer.")
        if scheme == "int8":
            if bits not in (None, 8):
                raise ValueError(
                    f"`bits={bits}` is not available with `scheme='int8'` (8-bit only). Use "
                    "`scheme='int8-dynamic-intx'` or 'intx-weight-only' for 2 to 8-bit weights."
                )
            bits = 8
            if group_size is not None:
                raise ValueError(
                    "`group_size` applies to the low-bit schemes; `scheme='int8'` is per channel."
                )
        else:
            bits = 4 if bits is None else bits
            if scheme == "int4-weight-only" and bits != 4:
                raise ValueError(f"`scheme='int4-weight-only'` has 4-bit weights; got `bits={bits}`.")
            if not 2 <= bits <= 8:
                raise ValueError(
                    f"`bits={bits}` is out of range: low-bit schemes support 2 to 8-bit weights (torchao has "
                    "no 1-bit integer weights; `BinaryWeights(mode='binary')` trains 1-bit weights)."
                )
            if group_size is not None and (
                isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2
            ):
                raise ValueError(
                    f"`group_size={group_size!r}` must be an integer of at least 2 (weights per scale), or None "
                    "for one scale per output channel."
                )
            if scheme == "int4-weight-only" and group_size not in (None, *INT4_GROUP_SIZES):
                raise ValueError(
                    f"`group_size={group_size}` is not available with `scheme='int4-weight-only'`: use one of "
                    f"{', '.join(map(str, INT4_GROUP_SIZES))} (default 128)."
                )
        if measure and scheme != "int8":
            raise ValueError(
                f"`measure=True` compiles and times the int8 program of `scheme='int8'`; `scheme={scheme!r}` has "
                "no compiled CPU program to time."
            )
        if export_path is not None and scheme != "int8":
            raise ValueError(
                f"`export_path` saves the converted int8 program of `scheme='int8'`; `scheme={scheme!r}` converts "
                "in place (save the model's state_dict instead)."
            )
        if module is not None and (not isinstance(module, str) or not module):
            raise ValueError(
                f"`module={module!r}` must be a submodule name such as 'net', or None (whole forward)."
            )
        for name, flag in (("convert", convert), ("measure", measure)):
            if not isinstance(flag, bool):
                raise TypeError(f"`{name}={flag!r}` must be True or False.")
        if scheme == "int8" and (modules is not nn.Linear or exclude is not None):
            raise ValueError(
                "`modules` and `exclude` select the `nn.Linear` layers of the low-bit schemes; "
                "`scheme='int8'` quantizes every convolution and linear layer of the exported part. Choose "
                "that part with `module='name'` (e.g. `module='backbone'`), or use a low-bit scheme."
            )
        if example_input is not None and not isinstance(example_input, Tensor | tuple | list | dict):
            raise TypeError(
                f"`example_input` must be the LightningModule's input: a tensor, a tuple/list of positional "
                f"inputs or a dict of keyword inputs; got {type(example_input).__name__}."
            )
        if export_path is not None:
            check_writable(export_path, "export_path", ".pt2")
        self.start = validate_point(start, "start")
        self.freeze_observers = (
            None if freeze_observers is None else validate_point(freeze_observers, "freeze_observers")
        )
        self.freeze_bn = None if freeze_bn is None else validate_point(freeze_bn, "freeze_bn")
        if scheme != "int8" and (freeze_observers is not None or freeze_bn is not None):
            raise ValueError(
                f"`freeze_observers` and `freeze_bn` apply to `scheme='int8'`; `scheme={scheme!r}` has no "
                "observers (weight scales follow the weights at every step, activations are quantized "
                "dynamically) and quantizes only `nn.Linear` layers. Leave both unset."
            )
        if (
            isinstance(log_every_n_steps, bool)
            or not isinstance(log_every_n_steps, int)
            or log_every_n_steps < 1
        ):
            raise ValueError(f"`log_every_n_steps={log_every_n_steps!r}` must be a positive integer.")
        self.scheme = scheme
        self.module = module
        self.convert = convert
        self.bits = bits
        self.group_size = group_size
        self.selection = ModuleSelection(modules, exclude)
        self.example_input = example_input
        self.export_path = export_path
        self.measure = measure
        self.log_every_n_steps = log_every_n_steps
        self.measurements: dict[str, float] | None = None
        self._training_ran = False

        self.converted = False
        self.parity: dict[str, float] | None = None
        self.artifact: dict[str, Any] | None = None
        self._steps: dict[str, int | None] = {}
        self._float: nn.Module | None = None
        self._stashed: dict[str, nn.Module] = {}
        self._prepared_linears: dict[str, nn.Module] = {}
        self._model_example: Any = None
        self._load_hook: Any = None
        self._fitting = False
        self._ranges: dict[str, Tensor] = {}
        self._recorder = _ErrorRecorder()
        self._recorder_hooks: list[Any] = []
        self._weight_names: dict[str, str] = {}
        self._float_layers = 0

    @functools.cached_property
    def state_key(self) -> str:  # Lightning reads it at every hook call: computed once
        return self._generate_state_key(scheme=self.scheme, module=self.module)

    # -- structure -----------------------------------------------------------------------------------

    def _where(self, pl_module: pl.LightningModule) -> tuple[nn.Module, str]:
        """The parent module and attribute name under which the quantized part lives."""
        if self.module is None:
            return pl_module, ROOT_CHILD
        parent_name, _, attr = self.module.rpartition(".")
        try:
            parent = pl_module.get_submodule(parent_name) if parent_name else pl_module
            getattr(parent, attr)
        except AttributeError:
            names = [n for n, _ in pl_module.named_modules() if n]
            close = difflib.get_close_matches(self.module, names, n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ValueError(
                f"`module={self.module!r}`: no such submodule in {type(pl_module).__name__}.{hint} "
                "Names are qualified as in `model.named_modules()`; None quantizes the whole forward."
            ) from None
        if not isinstance(getattr(parent, attr), nn.Module):
            raise ValueError(f"`module={self.module!r}` is not an nn.Module.")
        return parent, attr

    def _describe(self, pl_module: pl.LightningModule) -> str:
        """The quantized part, as errors name it."""
        if self.module is None:
            return f"{type(pl_module).__name__}.forward (`module=None`)"
        return f"`module={self.module!r}` ({type(self._float_target(pl_module)).__name__})"

    def _installed(self, pl_module: pl.LightningModule) -> nn.Module | None:
        parent, attr = self._where(pl_module)
        current = parent._modules.get(attr) if self.module is None else getattr(parent, attr)
        return current if isinstance(current, QuantizedGraphModule) else None

    def _state(self, pl_module: pl.LightningModule) -> str:
        if self.scheme != "int8":
            from torchao.quantization.qat.linear import FakeQuantizedLinear

            target = self._float_target(pl_module)
            if any(isinstance(m, FakeQuantizedLinear) for m in target.modules()):
                return "prepared"
            return "converted" if self._prepared_linears else "float"
        host = self._installed(pl_module)
        if host is None:
            return "float"
        return "converted" if host.converted else "prepared"

    def _float_target(self, pl_module: pl.LightningModule) -> nn.Module:
        if self.module is None:
            return pl_module
        parent, attr = self._where(pl_module)
        return getattr(parent, attr)

    def _install(self, pl_module: pl.LightningModule, host: QuantizedGraphModule) -> None:
        parent, attr = self._where(pl_module)
        # Other callbacks find the layers they recorded through this, and get the float layers back for a while
        # (e.g. to remove pruned channels) with `float_view`.
        prefix = "" if self.module is not None else f"{ROOT_CHILD}."
        register_host(pl_module, prefix, _weak_float_view(self))
        if self.module is not None:
            setattr(parent, attr, host)
            return
        # The whole forward: the host takes over the children the exported forward used (same objects).
        for name in list(host._modules):
            if name in pl_module._modules:
                self._stashed[name] = pl_module._modules.pop(name)  # type: ignore[assignment]
        pl_module.add_module(ROOT_CHILD, host)
        # A bound method, not the module: assigning a module to `forward` (as Lightning's DDP forward
        # redirection does when it puts back what it found) would register it as a child named "forward"
        # and leave the class's forward running.
        object.__setattr__(pl_module, "forward", host.__call__)

    def _uninstall(self, pl_module: pl.LightningModule) -> None:
        unregister_host(pl_module)
        if self.module is not None:
            parent, attr = self._where(pl_module)
            assert self._float is not None
            setattr(parent, attr, self._float)
            return
        pl_module._modules.pop(ROOT_CHILD, None)
        pl_module.__dict__.pop("forward", None)
        for name, child in self._stashed.items():
            pl_module.add_module(name, child)
        self._stashed = {}

    @contextlib.contextmanager
    def _float_view(self, pl_module: pl.LightningModule) -> Iterator[None]:
        """The float layers in place of the graph for a while; structural edits made meanwhile are prepared again."""
        host = self._installed(pl_module)
        if host is None or host.converted:
            yield
            return
        self._uninstall(pl_module)
        try:
            yield
        finally:
            params = dict(self._float_target(pl_module).named_parameters())
            if all(params.get(name) is p for name, p in host.graph.named_parameters()):
                self._install(pl_module, host)
            else:
                self._prepare_again(pl_module, host)

    def _prepare_again(self, pl_module: pl.LightningModule, old: QuantizedGraphModule) -> None:
        """Prepare the changed float structure, carrying the phase and the ranges observed so far."""
        target = self._float_target(pl_module)
        args, kwargs = _capture_inputs(pl_module, target, self._model_example)
        with _mode(target, True):
            host = prepare_int8_qat(target, args, kwargs, what=f"{type(target).__name__} after a change")
        # One training-mode call lets the weight quantizers observe the new weights; batch-norm statistics and
        # the activation ranges (per tensor: the shapes still match) are put back as they were.
        statistics = {name: b.detach().clone() for name, b in target.named_buffers()}
        with torch.no_grad():
            _call_with(host, (args, kwargs))
            for name, buffer in target.named_buffers():
                if name in statistics and statistics[name].shape == buffer.shape:
                    buffer.copy_(statistics[name])
        previous = dict(fake_quantizers(old))
        for name, quantizer in fake_quantizers(host):
            before = previous.get(name)
            if before is None:
                continue
            state = before.state_dict()
            mine = quantizer.state_dict()
            if state.keys() == mine.keys() and all(state[k].shape == mine[k].shape for k in state):
                quantizer.load_state_dict(state)
        host.train(old.training)
        host.fake_quant, host.observe, host.bn_frozen = old.fake_quant, old.observe, old.bn_frozen
        self._install(pl_module, host)
        self._weight_names = quantized_weight_names(host.graph)

    def _ensure(self, pl_module: pl.LightningModule, want: str) -> None:
        """Bring the model to ``want`` (``"float"``, ``"prepared"`` or ``"converted"``) structure."""
        current = self._state(pl_module)
        if current == want:
            return
        if self.scheme != "int8":
            self._ensure_low_bit(pl_module, current, want)
            return
        if current != "float":
            self._uninstall(pl_module)
        if want == "float":
            return
        target = self._float_target(pl_module)
        self._float = None if self.module is None else target
        if self._model_example is None:
            raise ValueError(
                "QuantizationAwareTraining exports the model and needs an example input: set "
                "`example_input_array` on the LightningModule or pass `example_input`."
            )
        args, kwargs = _capture_inputs(pl_module, target, self._model_example)
        what = self._describe(pl_module)
        self._float_layers = sum(isinstance(m, nn.Conv2d | nn.Linear) for m in target.modules())
        with _mode(target, True):
            host = prepare_int8_qat(target, args, kwargs, what=what)
        self._install(pl_module, host)
        self._weight_names = quantized_weight_names(host.graph)
        if not self._weight_names:
            self._uninstall(pl_module)
            raise ValueError(
                f"`scheme='int8'` found nothing to quantize in {what}: it quantizes the weights of the "
                "convolution and nn.Linear layers the forward calls, and there are none (its layers: "
                f"{_layer_types(target)}). Point `module=` at a part with convolution or nn.Linear layers, "
                "or leave QuantizationAwareTraining out for this model."
            )
        if want == "converted":
            # The converted graph bakes the activation ranges into its code, and the converted state dict does
            # not hold them: conversion needs the ranges the quantizers had (kept in this callback's state).
            if self._ranges:
                host.load_state_dict(self._ranges, strict=False)
            self._install_converted(pl_module, convert_int8(host))

    def _install_converted(self, pl_module: pl.LightningModule, converted: QuantizedGraphModule) -> None:
        self._uninstall(pl_module)
        self._install(pl_module, converted)
        self.converted = True

    def _ensure_low_bit(self, pl_module: pl.LightningModule, current: str, want: str) -> None:
        from torchao.quantization import quantize_
        from torchao.quantization.qat import QATConfig

        target = self._float_target(pl_module)
        config = low_bit_config(self.scheme, self.bits, self.group_size)
        if current == "converted" and want in ("prepared", "float"):
            for name, module in self._prepared_linears.items():
                target.set_submodule(name, module)
            current = "prepared"
        if current == "float":
            linears = _selected_linears(target, self.selection, self.scheme, self._describe(pl_module))
            group_size = self.group_size
            if self.scheme == "int4-weight-only" and group_size is None:
                group_size = 128  # torchao's default for int4
            _check_group_size(linears, group_size, f"{self.module}." if self.module else "")
            self._float_layers = sum(isinstance(m, nn.Conv2d | nn.Linear) for m in target.modules())
            names = set(linears)
            quantize_(target, QATConfig(config, step="prepare"), filter_fn=lambda m, fqn: fqn in names)
            self._prepared_linears = {name: target.get_submodule(name) for name in names}
            self._weight_names = {f"{name}.weight": name for name in names}
            current = "prepared"
        if current == "prepared" and want == "float":
            for name, module in self._prepared_linears.items():
                target.set_submodule(name, module.to_linear())  # type: ignore[operator]
            self._prepared_linears = {}
        elif current == "prepared" and want == "converted":
            names = set(self._prepared_linears)
            quantize_(target, QATConfig(config, step="convert"), filter_fn=lambda m, fqn: fqn in names)
            self.converted = True

    # -- setup ---------------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if set_up_in_order(self, trainer, pl_module, stage):
            return
        self._check_precision(trainer)
        if stage == "fit" and self.export_path is not None:
            check_writable(self.export_path, "export_path", ".pt2")
        self._check_hooked_layers(trainer)
        if self.scheme != "int8":
            check_low_bit_supported(self.scheme, self.bits, self.group_size)
        if stage == "fit":
            remember_original(trainer, pl_module)
            watch_loss(trainer)
        self._where(pl_module)
        if self._model_example is None:
            self._model_example = self._find_example(trainer, pl_module, stage)
        if self._load_hook is None:
            self._load_hook = pl_module.register_load_state_dict_pre_hook(self._before_load)
        if stage != "fit":
            return
        self._training_ran = False
        estimated = trainer.estimated_stepping_batches
        # Lightning answers `max_steps` (-1 when unset) for data without a length, and infinity for endless epochs.
        total = int(estimated) if math.isfinite(estimated) and estimated >= 0 else None
        self._steps = {
            name: None if point is None else resolve_step(trainer, point, name)
            for name, point in (
                ("start", self.start),
                ("freeze_observers", self.freeze_observers),
                ("freeze_bn", self.freeze_bn),
            )
        }
        observers = self._steps["freeze_observers"]
        if observers is not None and observers <= (self._steps["start"] or 0) and self.scheme == "int8":
            raise ValueError(
                f"`freeze_observers={self.freeze_observers!r}` (step {observers}) is not after `start={self.start!r}` "
                f"(step {self._steps['start']}): the ranges would be frozen before observing any data. Move it later."
            )
        if self.convert and total is not None and (self._steps["start"] or 0) >= total:
            raise ValueError(
                f"`start={self.start!r}` resolves to step {self._steps['start']}, but training has {total} steps: "
                "the model would be converted without ever training with quantization. Start earlier."
            )
        self.converted = False
        self._ensure(pl_module, "prepared")
        self._attach_recorder(pl_module)
        self._fitting = True

    def _check_precision(self, trainer: pl.Trainer) -> None:
        precision = str(trainer.precision)
        if precision not in _SUPPORTED_PRECISION:
            raise ValueError(
                f"QuantizationAwareTraining needs fp32 weights; `precision={precision!r}` is not supported. Use "
                "'32-true', or 'bf16-mixed' (the quantized part then runs in fp32, the rest in bf16)."
            )

    def _check_hooked_layers(self, trainer: pl.Trainer) -> None:
        if self.scheme != "int8":
            return  # low-bit schemes keep the float modules and call them: hooks still fire
        inside = "" if self.module is None else self.module
        for callback in trainer.callbacks:  # type: ignore[attr-defined]
            name = type(callback).__name__
            if name in _REWRITE_WEIGHTS:
                raise ValueError(
                    f"{name} and QuantizationAwareTraining(scheme='int8') both decide how the weights are stored "
                    f"({name}: {_REWRITE_WEIGHTS[name]}; int8: per-channel int8 in an exported graph). Use one of "
                    "them: e.g. prune, then quantize to int8; or prune, then share weights."
                )
            layers = getattr(callback, "hooked_layers", None)
            if not callable(layers):
                continue
            # The graph module itself is called (its hooks fire); the layers inside it are not.
            caught = [n for n in layers() if (n and not inside) or n.startswith(f"{inside}.")]
            if caught:
                part = "the whole forward" if self.module is None else f"`module={self.module!r}`"
                raise ValueError(
                    f"{type(callback).__name__} reads the layers {caught[:3]} with forward hooks, but "
                    f"QuantizationAwareTraining(scheme='int8') runs {part} as one exported graph that calls no "
                    "submodule, so the hooks would never fire. Distill the logits only (no `features`), "
                    "quantize a submodule that does not contain those layers (`module=...`), or use a low-bit "
                    "scheme (`scheme='intx-weight-only'`)."
                )

    def _find_example(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> Any:
        example = self.example_input if self.example_input is not None else pl_module.example_input_array
        if example is None:
            batch = _first_batch(_dataloader(trainer, stage))
            if batch is None:
                return None
            example = first_input(batch)
        device = next(pl_module.parameters(), torch.empty(0)).device
        return to_device(detach_input(example, max_batch=2), device)

    def _before_load(self, module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        """Rebuild the structure the checkpoint was saved with, just before its weights load."""
        drop_checkpoint_hints(state_dict, prefix)
        if self.scheme != "int8":
            want = self._low_bit_state_of(state_dict)
        else:
            scope = f"{prefix}{self.module if self.module is not None else ROOT_CHILD}."
            keys = [k for k in state_dict if k.startswith(scope)]
            if any("_frozen_param" in k for k in keys):
                want = "converted"
            elif any("activation_post_process" in k for k in keys):
                want = "prepared"
            else:
                want = "float"
        if want == "float" and self._fitting and self._state(module) == "prepared":  # type: ignore[arg-type]
            # Resuming a fit from a checkpoint written without this callback: QAT starts from its float weights.
            self._adopt_float_weights(module, state_dict, prefix)  # type: ignore[arg-type]
            return
        if (
            want == "converted"
            and self.scheme == "int8"
            and not self._ranges
            and self._state(module) != "converted"
        ):  # type: ignore[arg-type]
            # Lightning loads the weights before this callback's state, which holds the activation ranges the
            # converted graph's code needs: rebuilding without them would give wrong outputs.
            raise ValueError(
                "This checkpoint holds a converted int8 model, whose activation ranges are kept in "
                "QuantizationAwareTraining's state, which Lightning loads after the weights. Load it with "
                "`lightning_compress.quantization.load_qat_checkpoint(YourModule(...), path)` (then validate or "
                "test the returned model without `ckpt_path`), or pass a checkpoint written during training."
            )
        if want is not None:
            self._ensure(module, want)  # type: ignore[arg-type]
        if want == "converted" and self.scheme == "int8":
            self._match_converted_shapes(module, state_dict, prefix)  # type: ignore[arg-type]

    def _match_converted_shapes(
        self, pl_module: pl.LightningModule, state_dict: dict[str, Any], prefix: str
    ) -> None:
        """Give the rebuilt int8 graph's quantization parameters the checkpoint's shapes.

        A graph rebuilt from a fresh float model is converted with quantizers that never observed the weights,
        so its per-channel scales and zero points have one element; the checkpoint's have one per channel. The
        graph's code does not depend on those shapes: the buffers are replaced and the load fills them.
        """
        host = self._installed(pl_module)
        if host is None:
            return
        scope = f"{prefix}{self.module if self.module is not None else ROOT_CHILD}."
        for name, buffer in list(host.named_buffers()):
            saved = state_dict.get(scope + name)
            if isinstance(saved, Tensor) and saved.shape != buffer.shape:
                owner, _, attr = name.rpartition(".")
                parent = host.get_submodule(owner) if owner else host
                parent.register_buffer(attr, torch.empty_like(saved, device=buffer.device))

    def _adopt_float_weights(
        self, pl_module: pl.LightningModule, state_dict: dict[str, Any], prefix: str
    ) -> None:
        """Make a float checkpoint's state dict load into the prepared graph, quantizers as they are now."""
        host = self._installed(pl_module)
        assert host is not None
        scope = f"{prefix}{self.module if self.module is not None else ROOT_CHILD}."
        if self.module is None:  # the graph took over the children of the whole forward
            for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(scope)]:
                if key[len(prefix) :].split(".", 1)[0] in host._modules:
                    state_dict[scope + key[len(prefix) :]] = state_dict.pop(key)
        for key, value in _quantizer_state(host).items():
            state_dict.setdefault(scope + key, value)

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        states = checkpoint.get("callbacks") or {}
        if trainer.state.fn != "fit" or any(str(k).startswith(type(self).__name__) for k in states):
            return
        # The checkpoint was written without QuantizationAwareTraining: the model weights loaded into the
        # prepared structure (see `_adopt_float_weights`); check that the schedule still makes sense from here.
        step = int(checkpoint.get("global_step", 0))
        start = self._steps.get("start") or 0
        frozen = self._steps.get("freeze_observers")
        where = (
            f"The checkpoint {os.fspath(trainer.ckpt_path)!r} was written without QuantizationAwareTraining"
        )
        if self.scheme == "int8" and frozen is not None and step >= frozen:
            raise ValueError(
                f"{where} at step {step}, at or after `freeze_observers={self.freeze_observers!r}` (step {frozen}): "
                "quantization would start with its ranges already frozen, before observing any data. Resume "
                f"with a later `freeze_observers` (e.g. 'step:{step + max(1, frozen - start)}'), or from a "
                f"checkpoint written before step {frozen}."
            )
        if step > start:
            rank_zero_warn(
                f"{where} at step {step}, after `start={self.start!r}` (step {start}): fake quantization starts "
                f"now, from the checkpoint's float weights, {step - start} steps later than planned, with fresh "
                "quantization ranges.",
                category=UserWarning,
            )
        else:
            rank_zero_info(
                f"{where}: quantization-aware training starts from its float weights; fake quantization "
                f"from step {start} as planned."
            )

    def _low_bit_state_of(self, state_dict: dict[str, Any]) -> str | None:
        from torch.utils._python_dispatch import is_traceable_wrapper_subclass

        prefix = f"{self.module}." if self.module else ""
        for name in self._weight_names:
            value = state_dict.get(prefix + name)
            if value is not None:
                return "converted" if is_traceable_wrapper_subclass(value) else "prepared"
        return None

    # -- training ------------------------------------------------------------------------------------

    def _attach_recorder(self, pl_module: pl.LightningModule) -> None:
        for handle in self._recorder_hooks:
            handle.remove()
        self._recorder_hooks = []
        kinds: dict[nn.Module, str] = {}
        if self.scheme == "int8":
            host = self._installed(pl_module)
            assert host is not None
            weights = set(self._weight_names.values())
            kinds = {q: "weight" if name in weights else "activation" for name, q in fake_quantizers(host)}
        else:
            for linear in self._prepared_linears.values():
                for kind in ("weight", "activation"):
                    quantizer = getattr(linear, f"{kind}_fake_quantizer", None)
                    if quantizer is not None:
                        kinds[quantizer] = kind
        self._recorder.kinds = kinds
        self._recorder_hooks = [quantizer.register_forward_hook(self._recorder) for quantizer in kinds]

    def _phase(self, step: int) -> tuple[bool, bool, bool]:
        start = self._steps.get("start") or 0
        observers = self._steps.get("freeze_observers")
        bn = self._steps.get("freeze_bn")
        fake_quant = step >= start
        observe = fake_quant and (observers is None or step < observers)
        return fake_quant, observe, bn is not None and step >= bn

    def _apply_phase(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        fake_quant, observe, bn_frozen = self._phase(trainer.global_step)
        if self.scheme == "int8":
            host = self._installed(pl_module)
            if host is None or host.converted:
                return
            if host.observe and not observe and fake_quant:
                # Ranges freeze now: make them the same on every process first.
                sync_observers(host, lambda t: trainer.strategy.reduce(t, reduce_op="mean"))
            for event, now, before in (
                ("fake quantization started", fake_quant, host.fake_quant),
                ("observers frozen", fake_quant and not observe, host.fake_quant and not host.observe),
                ("batch norm frozen", bn_frozen, host.bn_frozen),
            ):
                if now and not before:
                    record_event(trainer, self, event)
            host.fake_quant, host.observe, host.bn_frozen = fake_quant, observe, bn_frozen
        else:
            if fake_quant and trainer.global_step == (self._steps.get("start") or 0) > 0:
                record_event(trainer, self, "fake quantization started")
            for quantizer in _low_bit_quantizers(self._float_target(pl_module)):
                quantizer.enabled = fake_quant

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._state(pl_module) == "converted":
            raise ValueError(
                "The model holds the converted quantized weights (loaded from a checkpoint saved after "
                "conversion), which cannot be trained. Resume from a checkpoint saved during training."
            )
        self._training_ran = True
        self._warn_frozen_bn_with_adaptive_steps(trainer)
        self._apply_phase(trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A fit resumed from the checkpoint of its last step (`max_steps` reached) skips the training loop,
        # `on_train_end` included: convert here instead.
        if not self._training_ran:
            self._apply_phase(trainer, pl_module)
            self.on_train_end(trainer, pl_module)

    def _warn_frozen_bn_with_adaptive_steps(self, trainer: pl.Trainer) -> None:
        # Adaptive optimizers move every weight by about `lr` whatever its gradient. Batch statistics cancel
        # the resulting per-channel shift of each conv output; frozen running statistics do not, and the shift
        # compounds through the network (measured: a residual net's loss from 0.008 to 32 in 7 Adam steps).
        if self.freeze_bn is None:
            return
        for optimizer in trainer.optimizers:
            lr = max(float(group["lr"]) for group in optimizer.param_groups)
            if isinstance(optimizer, _ADAPTIVE) and lr >= 1e-4:
                rank_zero_warn(
                    f"`freeze_bn={self.freeze_bn!r}` with {type(optimizer).__name__} at lr={lr:g}: once batch "
                    "norm uses its frozen running statistics, steps of this size shift each layer's outputs "
                    "away from them and training can collapse. Leave `freeze_bn=None` (the statistics then "
                    "keep tracking the weights), or lower the learning rate at least 10x from that point, or "
                    "use SGD. See docs/quantization.md, 'Freezing batch norm'.",
                    category=UserWarning,
                )
                return

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._apply_phase(trainer, pl_module)
        fake_quant = self._phase(trainer.global_step)[0]
        self._recorder.active = fake_quant and trainer.global_step % self.log_every_n_steps == 0

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        fake_quant = self._phase(trainer.global_step)[0]
        metrics = {"quantization/fake_quant": float(fake_quant)}
        if self._recorder.active:
            self._recorder.active = False
            metrics.update({f"quantization/{k}_error": v for k, v in self._recorder.pop().items()})
        for name, value in metrics.items():
            pl_module.log(name, value, on_step=True, on_epoch=False, sync_dist=False)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for name, value in self.summary(pl_module).items():
            pl_module.log(name, value, on_step=False, on_epoch=True, sync_dist=False)

    def summary(self, pl_module: pl.LightningModule) -> dict[str, float]:
        """Bits per quantized weight, fraction of conv/linear layers quantized, weight bytes fp32 vs quantized."""
        params = dict(pl_module.named_parameters())
        quantized = {name: params[name] for name in self.storage_formats(pl_module) if name in params}
        total_layers = max(self._float_layers, len(self._weight_names), 1)
        fp32 = sum(p.numel() * 4 for p in params.values())
        size = fp32 - sum(p.numel() * (4 - self.bits / 8) for p in quantized.values())
        metrics = {
            "quantization/layers_quantized": len(self._weight_names) / total_layers,
            "quantization/size_fp32_bytes": float(fp32),
            "quantization/size_quantized_bytes": float(size),
        }
        metrics.update(
            {per_layer_name("quantization/", "bits", name): float(self.bits) for name in quantized}
        )
        return metrics

    # -- conversion ----------------------------------------------------------------------------------

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for handle in self._recorder_hooks:
            handle.remove()
        self._recorder_hooks = []
        if not self.convert or self._state(pl_module) != "prepared":
            return
        failure: Exception | None = None
        parity_input = self._parity_input(trainer, pl_module)
        if self.scheme == "int8":
            host = self._installed(pl_module)
            assert host is not None
            sync_observers(host, lambda t: trainer.strategy.reduce(t, reduce_op="mean"))
            _broadcast_buffers(trainer, host)
            self._ranges = _quantizer_state(host)
            converted = convert_int8(host)
            self.parity = self._compare(host, converted, parity_input)
            self._uninstall(pl_module)
            reference = None
            try:
                # The fp32 program and the measurements need the float model, installed only until here.
                if self.export_path is not None and trainer.is_global_zero:
                    reference = self._export_reference(pl_module, parity_input)
                if self.measure and trainer.is_global_zero:
                    self.measurements = self._measure(self._float_target(pl_module), converted, parity_input)
            finally:
                # Whatever saving or measuring does, the trained model is kept: converted and installed.
                self._install(pl_module, converted)
                self.converted = True
            if self.export_path is not None and trainer.is_global_zero:
                try:
                    self.artifact = self._export(converted, parity_input, reference)
                except Exception as err:
                    failure = err
        else:
            target = self._float_target(pl_module)
            with _mode(target, False), torch.no_grad():
                before = _call_with(target if self.module else pl_module, parity_input)
            self._ensure(pl_module, "converted")
            with _mode(target, False), torch.no_grad():
                after = _call_with(target if self.module else pl_module, parity_input)
            self.parity = _parity(before, after)
        rank_zero_info(
            f"QuantizationAwareTraining converted the model ({self.scheme}): argmax agreement "
            f"{self.parity['argmax_agreement']:.4f}, max |logit diff| {self.parity['max_abs_diff']:.3g}."
        )
        metrics = {f"quantization/parity_{k}": v for k, v in self.parity.items()}
        if self.artifact:
            metrics["quantization/artifact_bytes"] = float(self.artifact["bytes"])
            metrics["quantization/artifact_size_ratio"] = float(self.artifact["size_ratio"])
        if self.measurements:
            metrics.update({f"quantization/{k}": v for k, v in self.measurements.items()})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=log_step(trainer))
        if failure is not None:
            raise RuntimeError(
                f"QuantizationAwareTraining converted the model, but saving it to `export_path="
                f"{os.fspath(self.export_path)!r}` failed ({type(failure).__name__}: {failure}). The converted "
                "model is installed in the LightningModule and usable; save it with "
                "`lightning_compress.export(model, path)` once the cause is fixed."
            ) from failure

    def _parity_input(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[tuple, dict]:
        batch = _first_batch(trainer.val_dataloaders) if trainer.val_dataloaders is not None else None
        example = self._model_example if batch is None else first_input(batch)
        device = next(pl_module.parameters(), torch.empty(0)).device
        example = to_device(detach_input(example), device)
        if self.scheme != "int8":
            return (
                _capture_inputs(pl_module, self._float_target(pl_module), example)
                if self.module
                else as_call(example)
            )
        host = self._installed(pl_module)
        assert host is not None
        return _capture_inputs(pl_module, host, example) if self.module else as_call(example)

    def _compare(
        self, prepared: QuantizedGraphModule, converted: QuantizedGraphModule, inputs: tuple[tuple, dict]
    ) -> dict[str, float]:
        with _mode(prepared, False), torch.no_grad():
            before = _call_with(prepared, inputs)
            after = _call_with(converted, inputs)
        return _parity(before, after)

    def _export_reference(self, pl_module: pl.LightningModule, inputs: tuple[tuple, dict]) -> tuple[str, int]:
        """Save the float model the same way as the int8 one, next to it (``<name>.fp32.pt2``), for comparison."""
        path = Path(self.export_path)  # type: ignore[arg-type]
        reference = path.with_name(path.stem + ".fp32" + path.suffix)
        args, kwargs = inputs
        target = self._float_target(pl_module)
        with _mode(target, False):
            return str(reference), save_quantized(target, args, reference, kwargs)

    def _export(
        self, converted: QuantizedGraphModule, inputs: tuple[tuple, dict], reference: tuple[str, int] | None
    ) -> dict[str, Any]:
        args, kwargs = inputs
        path = os.fspath(self.export_path)  # type: ignore[arg-type]
        size = save_quantized(converted, args, path, kwargs)
        artifact: dict[str, Any] = {"path": path, "bytes": size}
        if reference is not None:
            artifact.update(fp32_path=reference[0], fp32_bytes=reference[1], size_ratio=reference[1] / size)
        return artifact

    def _measure(
        self, fp32: nn.Module, converted: QuantizedGraphModule, inputs: tuple[tuple, dict]
    ) -> dict[str, float]:
        args, kwargs = inputs
        # One call form for the timing loop: positional arguments, or keyword arguments alone.
        call = kwargs if kwargs and not args else args
        with tempfile.TemporaryDirectory() as tmp, _mode(fp32, False):
            fp32_bytes = save_quantized(fp32, args, Path(tmp) / "fp32.pt2", kwargs)
            int8_bytes = save_quantized(converted, args, Path(tmp) / "int8.pt2", kwargs)
            compiled = {"fp32": compile_for_cpu(fp32), "int8": compile_for_cpu(converted)}
            with torch.no_grad():
                for model in compiled.values():  # the first call compiles: outside the timings
                    call_module(model, call)
            latency = compare_latency(compiled, call, repeats=20, warmup=3, rounds=3)
        return {
            "measured_fp32_bytes": float(fp32_bytes),
            "measured_int8_bytes": float(int8_bytes),
            "measured_size_ratio": fp32_bytes / int8_bytes,
            "latency_fp32_ms": latency["fp32"].median_ms,
            "latency_int8_ms": latency["int8"].median_ms,
            "speedup": latency["fp32"].median_ms / latency["int8"].median_ms,
        }

    # -- validation / test outside fit -----------------------------------------------------------------

    def _convert_for_evaluation(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "fit" or not self.convert or self._state(pl_module) != "prepared":
            return
        if self.scheme == "int8":
            host = self._installed(pl_module)
            assert host is not None
            self._install_converted(pl_module, convert_int8(host))
        else:
            self._ensure(pl_module, "converted")

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._convert_for_evaluation(trainer, pl_module)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._convert_for_evaluation(trainer, pl_module)

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._convert_for_evaluation(trainer, pl_module)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            forget_original(trainer)  # the next fit takes a fresh copy of its own model
            self._fitting = False
        for handle in self._recorder_hooks:
            handle.remove()
        self._recorder_hooks = []
        if self._load_hook is not None:
            self._load_hook.remove()
            self._load_hook = None

    # -- reporting -----------------------------------------------------------------------------------

    def storage_formats(self, pl_module: pl.LightningModule) -> dict[str, TensorFormat]:
        """Quantized weights at their bit width, by state-dict name (empty once converted: the tensors are int)."""
        if self.converted and self.scheme == "int8":
            return {}
        if self.module is not None:
            prefix = f"{self.module}."
        else:
            prefix = f"{ROOT_CHILD}." if self.scheme == "int8" else ""
        return {prefix + name: TensorFormat(bits=self.bits) for name in self._weight_names}

    # -- checkpoints ---------------------------------------------------------------------------------

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self._state(pl_module) != "float":
            add_checkpoint_hint(checkpoint, CHECKPOINT_HINT)

    def state_dict(self) -> dict[str, Any]:
        example = self._model_example
        return {
            "scheme": self.scheme,
            "bits": self.bits,
            "converted": self.converted,
            "parity": self.parity,
            # What `load_qat_checkpoint` needs to rebuild the structure without the constructor arguments.
            "module": self.module,
            "group_size": self.group_size,
            "layers": sorted(self._prepared_linears) if self.scheme != "int8" else None,
            "ranges": self._ranges,
            "example_input": None
            if example is None
            else to_device(detach_input(example), torch.device("cpu")),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if (
            state_dict.get("scheme", self.scheme) != self.scheme
            or state_dict.get("bits", self.bits) != self.bits
        ):
            raise ValueError(
                f"The checkpoint was written by QuantizationAwareTraining(scheme={state_dict['scheme']!r}, "
                f"bits={state_dict['bits']}); this callback has scheme={self.scheme!r}, bits={self.bits}."
            )
        self.parity = state_dict.get("parity")
        self._ranges = dict(state_dict.get("ranges") or {})


def load_qat_checkpoint(
    model: nn.Module, checkpoint: str | os.PathLike | Mapping[str, Any], example_input: Any = None
) -> nn.Module:
    """Load a checkpoint written by a fit with :class:`QuantizationAwareTraining` into a freshly built model.

    ``LightningModule.load_from_checkpoint`` cannot: the checkpoint holds the fake-quantized (during training)
    or converted (after it) structure, not the float layers the class builds. This rebuilds that structure from
    the callback's state saved in the checkpoint (scheme, quantized part, example input), then loads the weights
    strictly. Works without a Trainer.

    Args:
        model: a new instance of the model that was trained (e.g. ``MyModule(**hparams)``).
        checkpoint: a path to a Lightning checkpoint, or the loaded checkpoint dict.
        example_input: the model's input, used to export it again with ``scheme="int8"`` (default: the one saved
            in the checkpoint, else ``model.example_input_array``).

    Returns:
        ``model``, quantized in place, with the checkpoint's weights.

    Example::

        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> load_qat_checkpoint(net, {"state_dict": net.state_dict(), "callbacks": {}})
        Traceback (most recent call last):
        ...
        ValueError: The checkpoint holds no QuantizationAwareTraining state (it was written by a fit without it): load it with `model.load_state_dict(checkpoint['state_dict'])` or `load_from_checkpoint`.
    """
    if not isinstance(checkpoint, Mapping):
        checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=False)
    states = [
        s for k, s in (checkpoint.get("callbacks") or {}).items() if str(k).startswith("QuantizationAware")
    ]
    if not states:
        raise ValueError(
            "The checkpoint holds no QuantizationAwareTraining state (it was written by a fit without it): load "
            "it with `model.load_state_dict(checkpoint['state_dict'])` or `load_from_checkpoint`."
        )
    state = states[0]
    if "module" not in state:
        raise ValueError(
            "The checkpoint's QuantizationAwareTraining state comes from an older version that did not record "
            "the quantized part: load it through a Trainer that lists the same QuantizationAwareTraining(...) "
            "(`trainer.validate(model, ckpt_path=...)`)."
        )
    layers = state.get("layers")
    qat = QuantizationAwareTraining(
        scheme=state["scheme"],
        module=state["module"],
        bits=state["bits"],
        group_size=state.get("group_size"),
        modules=list(layers) if layers else nn.Linear,
    )
    if layers:
        qat._weight_names = {f"{name}.weight": name for name in layers}
    qat._ranges = dict(state.get("ranges") or {})
    example = example_input if example_input is not None else state.get("example_input")
    if example is None:
        example = getattr(model, "example_input_array", None)
    if example is not None:
        device = next(model.parameters(), torch.empty(0)).device
        qat._model_example = to_device(detach_input(example, max_batch=2), device)
    handle = model.register_load_state_dict_pre_hook(qat._before_load)
    try:
        model.load_state_dict(checkpoint["state_dict"])
    finally:
        handle.remove()
    return model


def _quantizer_state(host: nn.Module) -> dict[str, Tensor]:
    """The fake quantizers' entries of a prepared graph's state dict (ranges, scales, switches), copied."""
    # Every name a quantizer is registered under (one quantizer can serve several ops under several names).
    kinds = tuple(type(q) for _, q in fake_quantizers(host))
    names = tuple(f"{name}." for name, child in host._modules.items() if isinstance(child, kinds))
    return {k: v.detach().cpu().clone() for k, v in host.state_dict().items() if k.startswith(names)}


def _weak_float_view(callback: QuantizationAwareTraining) -> Any:
    """``callback._float_view`` without holding ``callback``.

    The host registry is keyed weakly by the LightningModule, but Lightning gives every callback the module's
    ``log`` method: a registry entry that held the callback would hold the module forever (every fit's model,
    graphs and optimizer state stayed alive in a process that runs several fits).
    """
    method = weakref.WeakMethod(callback._float_view)

    def view(pl_module: pl.LightningModule) -> contextlib.AbstractContextManager[None]:
        bound = method()
        return contextlib.nullcontext() if bound is None else bound(pl_module)

    return view


_ADAPTIVE = (
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.Adamax,
    torch.optim.NAdam,
    torch.optim.RAdam,
    torch.optim.RMSprop,
    torch.optim.Adagrad,
)


def _call_with(module: nn.Module, inputs: tuple[tuple, dict]) -> Any:
    args, kwargs = inputs
    return module(*args, **kwargs)


def _parity(before: Any, after: Any) -> dict[str, float]:
    if not isinstance(before, Tensor) or not isinstance(after, Tensor):
        return {
            "argmax_agreement": float("nan"),
            "max_abs_diff": float("nan"),
            "relative_error": float("nan"),
        }
    before, after = before.detach().float(), after.detach().float()
    agreement = float((before.argmax(-1) == after.argmax(-1)).float().mean()) if before.dim() > 1 else 1.0
    return {
        "argmax_agreement": agreement,
        "max_abs_diff": float((before - after).abs().max()),
        "relative_error": _relative_error(before, after),
    }
