"""Static int8 quantization through torchao's PT2E path: export, prepare for QAT, convert, ship, compile."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import os
import re
import zipfile
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.fx import GraphModule

from lightning_compress.export import atomic_write
from lightning_compress.quantization._torchao_private import (
    CONV_OPS,
    cached_patterns,
    release_torchao_module_cache,
)

__all__ = [
    "QuantizedGraphModule",
    "compile_for_cpu",
    "convert_int8",
    "export_for_quantization",
    "fake_quantizers",
    "load_quantized",
    "prepare_int8_qat",
    "quantize_int8_ptq",
    "quantized_weight_names",
    "release_torchao_module_cache",
    "save_quantized",
    "slim_graph",
    "sync_observers",
]

# The tensors of the module a graph is cut from, kept when the graph is shared with a host module.
_SHARED = ("_modules", "_parameters", "_buffers", "_non_persistent_buffers_set")


def _x86_quantizer(is_qat: bool) -> Any:
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    config = get_default_x86_inductor_quantization_config(is_qat=is_qat)
    if is_qat:
        # torchao's QAT default tracks weight ranges with a slow moving average (0.01 per step), so weights
        # that grow during training get clipped. Jacob et al. use the current min/max of the weights.
        from torchao.quantization.pt2e.fake_quantize import FusedMovingAvgObsFakeQuantize

        keywords = dict(config.weight.observer_or_fake_quant_ctr.p.keywords, averaging_constant=1.0)
        exact = FusedMovingAvgObsFakeQuantize.with_args(**keywords)
        config = dataclasses.replace(
            config, weight=dataclasses.replace(config.weight, observer_or_fake_quant_ctr=exact)
        )
    return X86InductorQuantizer().set_global(config)


def _batch_dim_spec(value: Any) -> Any:
    # Float inputs: the batch dimension; integer inputs (token ids, attention masks): every dimension, so that
    # batches padded to their own longest sequence run through one graph.
    if isinstance(value, Tensor):
        if value.dim() == 0:
            return None
        dims = range(value.dim()) if not value.is_floating_point() else (0,)
        return {d: torch.export.Dim.AUTO for d in dims}
    if isinstance(value, list | tuple):
        return type(value)(_batch_dim_spec(v) for v in value)
    if isinstance(value, dict):
        return {k: _batch_dim_spec(v) for k, v in value.items()}
    return None


def _dynamic_shapes(module: nn.Module, args: tuple, kwargs: dict) -> Any:
    """Dimension 0 of every input tensor may vary (the batch), so one export serves every batch size, and every
    dimension of an integer one (a sequence of token ids of any length)."""
    if not kwargs:
        return tuple(_batch_dim_spec(a) for a in args)
    try:
        bound = inspect.signature(module.forward).bind(*args, **kwargs)
    except TypeError:
        return None
    return {name: _batch_dim_spec(value) for name, value in bound.arguments.items()}


def _at_least_two(value: Any) -> Any:
    # torch.export specializes a dimension of size 1, which would pin the batch size of the graph to 1.
    if isinstance(value, Tensor):
        value = value.detach()
        return torch.cat([value, value]) if value.dim() > 0 and value.shape[0] == 1 else value[:2].clone()
    if isinstance(value, list | tuple):
        return type(value)(_at_least_two(v) for v in value)
    if isinstance(value, dict):
        return {k: _at_least_two(v) for k, v in value.items()}
    return value


_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)\n\s*(.+)')
_GRAPH_FRAME = re.compile(r"# File: (\S+):(\d+) in (\S+), code: (.+)")


def _failing_line(text: str) -> str | None:
    """The last frame of user code (not torch's own) quoted in an export error."""
    frames = [(f, ln, fn, code) for f, ln, fn, code in _FRAME.findall(text)]
    frames += [(f, ln, fn, code) for f, ln, fn, code in _GRAPH_FRAME.findall(text)]
    user = [fr for fr in frames if f"{os.sep}torch{os.sep}" not in fr[0] and "<" not in fr[0]]
    if not user:
        return None
    path, line, function, code = user[-1]
    return f"{path}:{line} in {function}: `{code.strip()}`"


def _export_error(what: str, module: nn.Module, err: Exception, name: str = "") -> ValueError:
    text = str(err)
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(err).__name__)
    where = _failing_line(text)
    prefix = f"{name}." if name else ""
    children = [prefix + n for n, m in module.named_children() if any(True for _ in m.parameters())]
    hint = (
        f"Quantize a submodule that torch.export can trace instead, e.g. `module={children[0]!r}` "
        f"(submodules with parameters: {', '.join(repr(c) for c in children[:8])})"
        if children
        else "Quantize a submodule that torch.export can trace instead (`module='name'`)"
    )
    return ValueError(
        f"torch.export cannot trace {what} ({type(err).__name__}: {first[:300]})"
        + (f", at {where}" if where else "")
        + f". {hint}, or rewrite that line without data-dependent Python control flow."
    )


def separate_repeated_calls(graph: GraphModule) -> list[str]:
    """Give every call of a module that is called more than once its own source in the graph metadata.

    torchao's X86 quantizer groups graph nodes by the module they came from, so one ``nn.ReLU`` instance used
    twice (common in residual blocks) becomes one group with two outputs and fails with "Input partition
    has more than one output node". Export already tells the calls apart (``relu``, ``relu@1``); this copies
    that distinction into the module path the quantizer reads. Returns the names of the modules concerned.

    Example::

        >>> class Block(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.fc, self.relu = nn.Linear(4, 4), nn.ReLU()
        ...     def forward(self, x):
        ...         return self.relu(self.fc(self.relu(x)))
        >>> graph = export_for_quantization(Block(), (torch.randn(2, 4),))
        >>> separate_repeated_calls(graph)  # already done by export_for_quantization
        []
    """
    repeated: set[str] = set()
    for node in graph.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if node.op != "call_function" or not stack:
            continue
        key = next(reversed(stack))
        if "@" not in key:
            continue
        fqn, cls = stack[key]
        suffix = "@" + key.rsplit("@", 1)[1]
        if not fqn.endswith(suffix):
            stack[key] = (fqn + suffix, cls)
            repeated.add(fqn)
    return sorted(repeated)


def export_for_quantization(
    module: nn.Module, args: tuple, kwargs: dict | None = None, *, what: str | None = None, name: str = ""
) -> GraphModule:
    """Export ``module`` with torch.export into a graph the PT2E quantizers accept: the batch dimension of float
    inputs and every dimension of integer inputs (token ids, masks: batches padded to their longest sequence) may
    vary, the other sizes are the example's.

    Args:
        module: the module to export, in the train/eval mode the graph should have.
        args: positional example inputs (their values do not matter, their shapes and dtypes do).
        kwargs: keyword example inputs.
        what: how to name the module in errors.
        name: the module's qualified name in the model, so that the submodules errors suggest are named in full.

    Raises:
        ValueError: when torch.export cannot trace the module; the message quotes the failing line of user
            code and suggests quantizing a submodule.

    Example::

        >>> graph = export_for_quantization(nn.Sequential(nn.Linear(4, 2)), (torch.randn(2, 4),))
        >>> tuple(graph(torch.randn(5, 4)).shape)  # any batch size
        (5, 2)
    """
    kwargs = dict(kwargs or {})
    args, kwargs = _at_least_two(tuple(args)), _at_least_two(kwargs)
    what = what or type(module).__name__
    try:
        exported = torch.export.export(
            module, args, kwargs, dynamic_shapes=_dynamic_shapes(module, args, kwargs)
        )
    except Exception as err:
        raise _export_error(what, module, err, name) from err
    graph = exported.module()
    separate_repeated_calls(graph)
    return graph


def fake_quantizers(module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """The observer / fake-quantize modules PT2E inserted into a prepared graph, by name."""
    from torchao.quantization.pt2e.fake_quantize import FakeQuantizeBase

    for name, sub in module.named_modules():
        if isinstance(sub, FakeQuantizeBase):
            yield name, sub


def quantized_weight_names(graph: GraphModule) -> dict[str, str]:
    """Map each weight the prepared graph fake-quantizes (qualified name) to its fake-quantize module.

    Example::

        >>> prepared = prepare_int8_qat(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), (torch.randn(2, 4),))
        >>> quantized_weight_names(prepared.graph)
        {'0.weight': 'activation_post_process_1'}
    """
    quantizers = dict(fake_quantizers(graph))
    result: dict[str, str] = {}
    for node in graph.graph.nodes:
        if node.op != "call_module" or node.target not in quantizers:
            continue
        if _reads_an_input(node.args[0]):
            continue  # an activation's quantizer (its input may come from a layer norm with a weight of its own)
        # Walk up through the few ops between a weight and its fake-quantize (conv-BN folding multiplies it).
        frontier, seen = list(node.args[:1]), 0
        while frontier and seen < 8:
            current = frontier.pop(0)
            seen += 1
            if not isinstance(current, torch.fx.Node):
                continue
            if current.op == "get_attr" and str(current.target).endswith("weight"):
                result[str(current.target)] = str(node.target)
                break
            if current.op == "call_function":
                frontier.extend(a for a in current.args if isinstance(a, torch.fx.Node))
    return result


def _reads_an_input(node: Any) -> bool:
    """Whether ``node``'s value depends on the graph's inputs (an activation), not only on its parameters and
    buffers (a weight, possibly multiplied by batch-norm factors)."""
    frontier, seen = [node], set()
    while frontier:
        current = frontier.pop()
        if not isinstance(current, torch.fx.Node) or current in seen:
            continue
        seen.add(current)
        if current.op == "placeholder":
            return True
        frontier.extend(current.all_input_nodes)
    return False


# The global module hooks of torch.nn.modules.module: a tracker that installs them (Lightning's model summary counts
# FLOPs under one) makes torch.export fail on the pattern graphs a mode switch traces.
GLOBAL_MODULE_HOOKS = (
    "_global_forward_pre_hooks",
    "_global_forward_hooks",
    "_global_forward_hooks_always_called",
    "_global_forward_hooks_with_kwargs",
    "_global_backward_pre_hooks",
    "_global_backward_hooks",
)


@contextlib.contextmanager
def untracked() -> Iterator[None]:
    """Within, the global module hooks and the active dispatch modes (a FLOP counter, a module tracker) are
    suspended; they are restored after, also on an error.

    Example::

        >>> from torch.utils.flop_counter import FlopCounterMode
        >>> with FlopCounterMode(display=False) as counter:
        ...     with untracked():
        ...         _ = nn.Linear(4, 4)(torch.randn(2, 4))
        >>> counter.get_total_flops()
        0
    """
    from torch.nn.modules import module as module_globals
    from torch.utils._python_dispatch import _disable_current_modes

    saved = {
        name: getattr(module_globals, name) for name in GLOBAL_MODULE_HOOKS if hasattr(module_globals, name)
    }
    for name, hooks in saved.items():
        setattr(module_globals, name, type(hooks)())
    try:
        with _disable_current_modes():
            yield
    finally:
        for name, hooks in saved.items():
            setattr(module_globals, name, hooks)


def _set_graph_mode(graph: GraphModule, current: tuple[bool, bool], target: tuple[bool, bool]) -> None:
    """Switch dropout and batch norm of an exported graph between train and eval behaviour (a graph rewrite, which
    traces torchao's patterns: outside any module tracker or dispatch mode of the caller, see :func:`untracked`)."""
    from torchao.quantization.pt2e.export_utils import _replace_batchnorm, _replace_dropout

    with untracked(), cached_patterns():
        if current[0] != target[0]:
            _replace_dropout(graph, train_to_eval=not target[0])
        if current[1] != target[1]:
            _replace_batchnorm(graph, train_to_eval=not target[1])


def _device_type(values: Iterable[Any]) -> str:
    for value in values:
        if isinstance(value, Tensor):
            return value.device.type
    return "cpu"


def _as_float32(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.float() if value.dtype in (torch.bfloat16, torch.float16) else value
    if isinstance(value, list | tuple):
        return type(value)(_as_float32(v) for v in value)
    if isinstance(value, dict):
        return {k: _as_float32(v) for k, v in value.items()}
    return value


class QuantizedGraphModule(nn.Module):
    """A regular ``nn.Module`` around an exported (fake-quantized or converted) graph.

    The graph's submodules, parameters and buffers *are* this module's (the same dictionaries), so the
    state-dict keys, ``parameters()``, optimizers, DDP and ``.to()`` see exactly the graph's tensors. What the
    graph itself cannot do, this module does:

    - ``train()`` / ``eval()`` work (they raise on a bare exported graph): dropout and batch norm are switched
      by rewriting the graph, lazily, at the next call; observers never update in eval mode.
    - the phase flags ``fake_quant`` (simulate int8), ``observe`` (update ranges) and ``bn_frozen`` (batch
      norm uses its running statistics while training) are applied at every call;
    - autocast is switched off inside and low-precision float inputs are cast to fp32, so the quantized part
      runs in fp32 under ``precision="bf16-mixed"`` while the rest of the model uses bf16.

    Args:
        graph: an exported graph (from :func:`prepare_int8_qat` or :func:`convert_int8`).
        converted: whether the graph is a converted int8 graph (no training behaviour left).

    Example::

        >>> prepared = prepare_int8_qat(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), (torch.randn(2, 4),))
        >>> prepared.eval().training, sorted(prepared.state_dict())[:2]
        (False, ['0.bias', '0.weight'])
    """

    def __init__(self, graph: GraphModule, converted: bool = False) -> None:
        super().__init__()
        self.converted = converted
        self.fake_quant = True
        self.observe = True
        self.bn_frozen = False
        # The graph is exported in training mode; converted graphs are in eval form for good.
        self._graph_mode = (False, False) if converted else (True, True)
        object.__setattr__(self, "graph", graph)
        self._share()

    def _share(self) -> None:
        for key in _SHARED:
            object.__setattr__(self, key, getattr(self.graph, key))
        object.__setattr__(self, "_quantizers", [q for _, q in fake_quantizers(self.graph)])

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for key in (*_SHARED, "_quantizers"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._share()

    def sync(self) -> None:
        """Bring the graph's dropout / batch-norm form and the quantizer flags in line with the settings."""
        if self.converted:
            return
        target = (self.training, self.training and not self.bn_frozen)
        if target != self._graph_mode:
            _set_graph_mode(self.graph, self._graph_mode, target)
            self._graph_mode = target
        observe = int(self.observe and self.training)
        fake_quant = int(self.fake_quant)
        for quantizer in self._quantizers:
            quantizer.observer_enabled.fill_(observe)
            quantizer.fake_quant_enabled.fill_(fake_quant)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.sync()
        args, kwargs = _as_float32(args), _as_float32(kwargs)
        device = _device_type([*args, *kwargs.values()])
        try:
            if not torch.is_autocast_enabled(device):  # e.g. while torch.export traces it: no autocast region
                return self.graph(*args, **kwargs)
            with torch.autocast(device, enabled=False):
                return self.graph(*args, **kwargs)
        except (AssertionError, RuntimeError) as err:
            if "Guard failed" not in str(err):
                raise
            raise ValueError(
                f"The int8 graph was exported for inputs of the example input's sizes, and this call's inputs differ "
                f"from them in a dimension that is not the batch ({err}). Only the batch dimension of float inputs "
                "and every dimension of integer inputs (token ids, masks) may vary: pad every batch to the example "
                "input's sizes, or quantize with a low-bit scheme (scheme='int8-dynamic-intx'), which takes any shape."
            ) from err

    def extra_repr(self) -> str:
        return "converted int8" if self.converted else "fake-quantized"


# Marks the nodes `_guard_zero_scales` inserts, so that `_unguard_zero_scales` finds them again.
_GUARD = "lightning_compress_zero_scale_guard"


def _guard_zero_scales(graph: GraphModule) -> int:
    """Make the folded batch norm of a prepared graph exact for channels whose scale is zero.

    QAT folds batch norm as ``conv(x, w * s) / s`` with ``s = gamma / std``; a channel pruned together with its
    batch norm (gamma = 0, weights 0) computes 0 / 0 = NaN, which then spreads through the observers. Where
    ``s`` is zero the division is by 1 instead (the convolution's output is exactly 0 there, and so is the
    batch norm's with beta = 0). Returns the number of guarded divisions.
    """
    aten = torch.ops.aten
    conv_ops = set(CONV_OPS.values())
    guarded = 0
    for node in list(graph.graph.nodes):
        if node.op != "call_function" or node.target is not aten.div.Tensor or len(node.args) != 2:
            continue
        out, scale = node.args
        if not isinstance(out, torch.fx.Node) or not isinstance(scale, torch.fx.Node):
            continue
        if getattr(out.target, "overloadpacket", None) not in conv_ops:
            continue
        with graph.graph.inserting_before(node):
            zero = graph.graph.call_function(aten.eq.Scalar, (scale, 0.0))
            safe = graph.graph.call_function(aten.where.ScalarSelf, (zero, 1.0, scale))
        for inserted in (zero, safe):
            inserted.meta.update({k: v for k, v in scale.meta.items() if k != "val"})
            inserted.meta[_GUARD] = True
        node.args = (out, safe)
        guarded += 1
    if guarded:
        graph.recompile()
    return guarded


def _unguard_zero_scales(graph: GraphModule) -> None:
    """Remove what :func:`_guard_zero_scales` inserted, so that conversion recognizes the folding pattern."""
    for node in reversed(list(graph.graph.nodes)):
        if node.meta.get(_GUARD) and node.target is torch.ops.aten.where.ScalarSelf:
            node.replace_all_uses_with(node.args[2])
            graph.graph.erase_node(node)
    for node in reversed(list(graph.graph.nodes)):
        if node.meta.get(_GUARD) and not node.users:
            graph.graph.erase_node(node)
    graph.recompile()


def prepare_int8_qat(
    module: nn.Module, args: tuple, kwargs: dict | None = None, *, what: str | None = None, name: str = ""
) -> QuantizedGraphModule:
    """Export ``module`` and insert int8 fake quantization for training (torchao PT2E, X86 inductor quantizer).

    Static int8: per-channel symmetric int8 weights and per-tensor affine uint8 activations, batch norm folded
    into the preceding convolution during training. The returned module shares its parameters with
    ``module`` (same tensor objects), so optimizers and other callbacks holding them keep working.

    Args:
        module: a float model (conv / linear layers), exported in its current train/eval mode (train it).
        args: positional example inputs.
        kwargs: keyword example inputs.
        what: how to name the module in errors.
        name: the module's qualified name in the model (see :func:`export_for_quantization`).

    Example::

        >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3))
        >>> prepared = prepare_int8_qat(model, (torch.randn(2, 1, 8, 8),))
        >>> prepared.graph.get_parameter("0.weight") is model[0].weight
        True
        >>> tuple(prepared(torch.randn(5, 1, 8, 8)).shape)
        (5, 3)
    """
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

    what = what or type(module).__name__
    graph = export_for_quantization(module, args, kwargs, what=what, name=name)
    try:
        with cached_patterns():
            prepared = prepare_qat_pt2e(graph, _x86_quantizer(is_qat=True))
    except ValueError as err:
        if "more than one output node" not in str(err):
            raise
        raise ValueError(
            f"torchao's X86 quantizer could not group the ops of {what} ({err}). This "
            "happens when one module instance (often an activation such as nn.ReLU) is called at several "
            "places through a path export does not tell apart; give each call its own module instance."
        ) from err
    _guard_zero_scales(prepared)
    return QuantizedGraphModule(prepared)


def sync_observers(module: nn.Module, reduce: Callable[[Tensor], Tensor]) -> int:
    """Make every process's quantization ranges equal: reduce (e.g. average) min/max, recompute scales.

    Args:
        module: a prepared model (its fake-quantize modules are found by type).
        reduce: a collective such as ``lambda t: trainer.strategy.reduce(t, reduce_op="mean")``.

    Returns:
        The number of fake-quantize modules synchronized (those that have observed data).

    Example::

        >>> prepared = prepare_int8_qat(nn.Sequential(nn.Linear(4, 4)), (torch.randn(2, 4),))
        >>> _ = prepared(torch.randn(8, 4))
        >>> sync_observers(prepared, lambda t: t)  # one process: nothing changes
        2
    """
    count = 0
    with torch.no_grad():
        for _, quantizer in fake_quantizers(module):
            observer = quantizer.activation_post_process
            if not hasattr(observer, "min_val") or not torch.isfinite(observer.min_val).all():
                continue
            observer.min_val.copy_(reduce(observer.min_val.detach().clone()))
            observer.max_val.copy_(reduce(observer.max_val.detach().clone()))
            scale, zero_point = quantizer.calculate_qparams()
            quantizer.scale.resize_(scale.shape).copy_(scale)
            quantizer.zero_point.resize_(zero_point.shape).copy_(zero_point)
            count += 1
    return count


def slim_graph(graph: GraphModule) -> GraphModule:
    """A copy of ``graph`` holding only the tensors and submodules its code uses.

    A converted PT2E graph still carries every fp32 parameter of the model it came from (the weights now
    live as int8 constants), so saved as is it is larger than the fp32 model. Integer weight constants are
    kept as (frozen) parameters so that parameter counts still describe the model.

    Example::

        >>> prepared = prepare_int8_qat(nn.Sequential(nn.Linear(64, 64)), (torch.randn(2, 64),))
        >>> _ = prepared(torch.randn(8, 64))
        >>> converted = convert_int8(prepared)
        >>> sorted((k, v.dtype) for k, v in converted.state_dict().items() if v.numel() > 64)
        [('_frozen_param0', torch.int8)]
    """
    root: dict[str, Any] = {}
    for node in graph.graph.nodes:
        if node.op == "get_attr":
            value = _get_attr(graph, str(node.target))
            # Integer weight constants: frozen parameters, so parameter counts still describe the model.
            if isinstance(value, Tensor) and not value.is_floating_point() and value.dim() > 1:
                value = nn.Parameter(value, requires_grad=False)
            root[str(node.target)] = value
        elif node.op == "call_module":
            root[str(node.target)] = graph.get_submodule(str(node.target))
    return GraphModule(root, copy.deepcopy(graph.graph), class_name=type(graph).__name__)


def _get_attr(module: nn.Module, target: str) -> Any:
    for part in target.split("."):
        module = getattr(module, part)
    return module


def convert_int8(prepared: QuantizedGraphModule) -> QuantizedGraphModule:
    """Convert a fake-quantized model into the real int8 graph (``prepared`` is left unchanged).

    The result holds int8 weights, fp32 per-channel scales and the fp32 biases, nothing else (see
    :func:`slim_graph`). Run it as it is, or through :func:`compile_for_cpu` for int8 kernels.

    Example::

        >>> prepared = prepare_int8_qat(nn.Sequential(nn.Linear(8, 4)), (torch.randn(2, 8),))
        >>> x = torch.randn(16, 8)
        >>> _ = prepared(x)
        >>> converted = convert_int8(prepared)
        >>> prepared.eval()(x).argmax(1).equal(converted(x).argmax(1))
        True
    """
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    if prepared.converted:
        return prepared
    training = prepared.training
    prepared.eval()
    prepared.sync()
    try:
        graph = copy.deepcopy(prepared.graph)
    finally:
        prepared.train(training)
    _unguard_zero_scales(graph)
    with cached_patterns():
        converted = convert_pt2e(graph)
    return QuantizedGraphModule(slim_graph(converted), converted=True)


def quantize_int8_ptq(
    module: nn.Module, args: tuple, calibration: Iterable[Any], kwargs: dict | None = None
) -> QuantizedGraphModule:
    """Post-training static int8 quantization (no training): export, calibrate, convert.

    Args:
        module: a float model, in eval mode.
        args: positional example inputs for export.
        calibration: batches of model inputs (a tensor, or a tuple of positional inputs) to observe ranges on.
        kwargs: keyword example inputs.

    Example::

        >>> model = nn.Sequential(nn.Linear(8, 4)).eval()
        >>> quantized = quantize_int8_ptq(model, (torch.randn(2, 8),), [torch.randn(32, 8)])
        >>> quantized.converted, tuple(quantized(torch.randn(3, 8)).shape)
        (True, (3, 4))
    """
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    graph = export_for_quantization(module, args, kwargs)
    with cached_patterns():
        prepared = prepare_pt2e(graph, _x86_quantizer(is_qat=False))
    with torch.no_grad():
        for batch in calibration:
            prepared(*batch) if isinstance(batch, tuple | list) else prepared(batch)
    with cached_patterns():
        converted = convert_pt2e(prepared)
    return QuantizedGraphModule(slim_graph(converted), converted=True)


def save_quantized(
    module: nn.Module, args: tuple, path: str | os.PathLike, kwargs: dict | None = None
) -> int:
    """Save a model as a self-contained ``.pt2`` program (graph + the tensors it uses); return the file size.

    The saved program also stores its example inputs, so they are cut to two samples and copied (a slice of
    a large tensor would otherwise save the whole tensor). The graph description (JSON) is deflated inside the
    zip archive; tensors are stored as they are. Load with :func:`load_quantized`, or without this package
    with ``import torchao`` (it registers the quantized ops) and ``torch.export.load(path).module()``.

    The file is written atomically (a temporary file in the same directory, then ``os.replace``): an
    interrupted save leaves the previous file as it was.

    Args:
        module: a converted model (:func:`convert_int8`) or any exportable float model, for comparison.
        args: positional example inputs.
        path: destination file (parent directories are created).
        kwargs: keyword example inputs.

    Example::

        >>> import tempfile, os
        >>> model = nn.Sequential(nn.Linear(256, 256)).eval()
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     size = save_quantized(model, (torch.randn(1000, 256)[:500],), os.path.join(tmp, "fp32.pt2"))
        >>> 256 * 257 * 4 < size < 256 * 257 * 4 * 1.05  # the example input adds 2 samples, not 500
        True
    """
    target = module.graph if isinstance(module, QuantizedGraphModule) else module
    example = _at_least_two(tuple(args))
    kw = _at_least_two(dict(kwargs or {}))
    exported = torch.export.export(target, example, kw, dynamic_shapes=_dynamic_shapes(target, example, kw))
    with atomic_write(path) as partial:
        torch.export.save(exported, partial)
        _deflate_metadata(partial)
    return os.path.getsize(path)


def _deflate_metadata(path: str) -> None:
    # torch.export.save stores every entry uncompressed; its graph JSON is large next to int8 weights.
    with (
        atomic_write(path) as partial,
        zipfile.ZipFile(path) as source,
        zipfile.ZipFile(partial, "w") as target,
    ):
        for info in source.infolist():
            method = zipfile.ZIP_DEFLATED if info.filename.endswith(".json") else zipfile.ZIP_STORED
            target.writestr(info.filename, source.read(info.filename), compress_type=method)


def load_quantized(path: str | os.PathLike) -> QuantizedGraphModule:
    """Load a program written by :func:`save_quantized`, ready to call (``eval()`` works).

    Example::

        >>> import tempfile, os
        >>> model = nn.Sequential(nn.Linear(4, 2)).eval()
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     _ = save_quantized(model, (torch.randn(2, 4),), os.path.join(tmp, "m.pt2"))
        ...     loaded = load_quantized(os.path.join(tmp, "m.pt2"))
        >>> x = torch.randn(3, 4)
        >>> torch.allclose(loaded(x), model(x))
        True
    """
    import torchao.quantization.pt2e  # noqa: F401  (registers the quantized_decomposed ops)

    return QuantizedGraphModule(torch.export.load(os.fspath(path)).module(), converted=True)


def compile_for_cpu(module: nn.Module, dynamic: bool | None = False) -> nn.Module:
    """``torch.compile`` with inductor's weight freezing, which is what turns an int8 graph into int8 kernels.

    Without freezing the int8 graph runs as dequantize + fp32 ops and is no faster than fp32. The per-call
    ``options`` of ``torch.compile`` do not reach the quantization passes, so each call of the result runs with
    inductor's global ``freezing`` flag switched on, and the flag is put back afterwards: other compiled
    functions of the process are unaffected. Freezing applies to inference: call the result under
    ``torch.no_grad()``. The first call compiles and costs seconds; time it after a warm-up. ``dynamic=False``
    (default) compiles each input shape separately, with static shapes.

    Example::

        >>> import torch._inductor.config as inductor_config
        >>> compiled = compile_for_cpu(nn.Linear(4, 2))
        >>> callable(compiled), inductor_config.freezing
        (True, False)
    """
    import torch._inductor.config as inductor_config

    target = module.graph if isinstance(module, QuantizedGraphModule) and module.converted else module
    return _CompiledWithFreezing(torch.compile(target, dynamic=dynamic), inductor_config)


class _CompiledWithFreezing(nn.Module):
    """Calls a compiled module with inductor's ``freezing`` on, and puts the flag back after each call."""

    def __init__(self, compiled: nn.Module, inductor_config: Any) -> None:
        super().__init__()
        self.compiled = compiled
        self._config = inductor_config

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with self._config.patch(freezing=True):
            return self.compiled(*args, **kwargs)
