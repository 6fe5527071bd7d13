"""Export a compressed model to a file that loads without this package: torch, torch.export or ONNX, parity-checked.

:func:`export` works on a copy of the model: the layer classes of this package are swapped for plain torch ones
(low-rank layers become ``nn.Sequential`` of ``nn.Linear`` / ``nn.Conv2d`` with the same state-dict keys, a
converted int8 graph becomes a plain ``torch.fx.GraphModule``, parametrizations of this package are baked
into the weights, and hooks this package registered are dropped), the file is written under a temporary name
in the destination directory, loaded back, compared with the in-memory model on sample inputs, and only then
moved into place with ``os.replace``. A failed write or a failed parity check leaves the previous file as it
was and no temporary file behind.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
import os
import pickle
import stat
import tempfile
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from lightning_compress._inputs import as_call

__all__ = [
    "FORMATS",
    "ExportError",
    "ExportResult",
    "atomic_write",
    "check_writable",
    "export",
    "to_plain_torch",
]

FORMATS = ("torch", "export", "onnx")
_SUFFIX = {"torch": ".pt", "export": ".pt2", "onnx": ".onnx"}
_PACKAGE = __name__.split(".")[0]
# onnxruntime fuses QuantizeLinear/DequantizeLinear pairs into integer kernels. On x86-64 CPUs without VNNI the
# u8 x s8 kernel sums pairs of products in 16 bits (VPMADDUBSW) and saturates, which changed the predictions of
# a quantized model measured here; this session option selects the kernel that does not saturate.
ONNX_QUANTIZED_SESSION_CONFIG = {"session.x64quantprecision": "1"}


class ExportError(ValueError):
    """The exported file does not reproduce the in-memory model within the tolerance (nothing was written)."""


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export` wrote and how closely the file reproduces the in-memory model.

    Attributes:
        path: the written file.
        format: ``"torch"``, ``"export"`` or ``"onnx"``.
        bytes: size of the file.
        quantized: whether the model holds quantized (``quantized_decomposed``) ops.
        max_abs_diff: largest absolute difference between the file's outputs and the model's, on all samples.
        argmax_agreement: fraction of samples whose argmax over the last dimension agrees (1.0 for outputs
            without a class dimension).
        tolerance: the largest difference the check accepted (``atol + rtol * max |model output|``).
        min_agreement: the smallest agreement the check accepted (``None``: not checked).
        samples: number of input batches compared.
        session_config: onnxruntime session config entries the check used (and that deployment should use).
    """

    path: str
    format: str
    bytes: int
    quantized: bool
    max_abs_diff: float
    argmax_agreement: float
    tolerance: float
    min_agreement: float | None
    samples: int
    session_config: dict[str, str] = field(default_factory=dict)


# -- paths and atomic writes ------------------------------------------------------------------------------


def check_writable(path: str | os.PathLike, argument_name: str, suffix: str = "") -> Path:
    """Check that a file can be written at ``path`` (without creating anything); return it as a ``Path``.

    Missing parent directories are fine (writers create them) as long as the nearest existing ancestor is a
    writable directory. Errors name ``argument_name`` and say what to change.

    Args:
        path: the file to be written.
        argument_name: the argument the path came from, for the error message.
        suffix: the file extension suggested when ``path`` is a directory.

    Example::

        >>> import tempfile
        >>> tmp = tempfile.mkdtemp()
        >>> check_writable(Path(tmp) / "new" / "model.pt2", "export_path").name
        'model.pt2'
        >>> check_writable(tmp, "export_path", ".pt2")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: `export_path='...'` is a directory; give a file path such as '.../model.pt2'.
        >>> os.rmdir(tmp)
    """
    if isinstance(path, bool) or not isinstance(path, str | os.PathLike):
        raise TypeError(f"`{argument_name}={path!r}` must be a file path (str or os.PathLike).")
    target = Path(path).expanduser()
    if target.is_dir():
        raise ValueError(
            f"`{argument_name}={os.fspath(path)!r}` is a directory; give a file path such as "
            f"{str(target / ('model' + suffix))!r}."
        )
    existing = target.absolute().parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(
            f"`{argument_name}={os.fspath(path)!r}` cannot be created: {str(existing)!r} is a file, not a "
            "directory. Choose a path whose parent is a directory."
        )
    try:
        handle, probe = tempfile.mkstemp(prefix=".write-check.", dir=existing)
    except OSError as err:
        raise ValueError(
            f"`{argument_name}={os.fspath(path)!r}` is not writable: files cannot be created in "
            f"{str(existing)!r} ({err.strerror}). Choose a path in a writable directory."
        ) from err
    os.close(handle)
    os.remove(probe)
    return target


def _new_file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary file name next to ``path``; move it onto ``path`` only if the block completes.

    The temporary file lives in the destination directory, so the final ``os.replace`` is atomic: readers see
    the old file or the new one, never a partial one. On any exception the temporary file is removed and
    ``path`` is left as it was. Missing parent directories are created.

    Example::

        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     target = os.path.join(tmp, "model.pt")
        ...     with atomic_write(target) as partial:
        ...         torch.save({"w": torch.ones(2)}, partial)
        ...     sorted(os.listdir(tmp)), torch.load(target)["w"].tolist()
        (['model.pt'], [1.0, 1.0])
    """
    target = os.path.abspath(os.fspath(path))
    directory = os.path.dirname(target)
    os.makedirs(directory, exist_ok=True)
    name = os.path.basename(target)
    handle, partial = tempfile.mkstemp(
        prefix=f".{name}.", suffix=".partial" + os.path.splitext(name)[1], dir=directory
    )
    os.close(handle)
    try:
        yield partial
        # mkstemp creates the file readable by its owner only; give it the mode a new or replaced file has.
        mode = stat.S_IMODE(os.stat(target).st_mode) if os.path.exists(target) else _new_file_mode()
        os.chmod(partial, mode)
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


# -- a copy of the model in plain torch ---------------------------------------------------------------------


def _ours(value: Any) -> bool:
    """Whether a hook (or the function behind it) is defined by this package."""
    for attr in ("hook", "func", "__func__"):  # _WrappedHook, functools.partial, bound method
        value = getattr(value, attr, value)
    owner = getattr(value, "__module__", None) or type(value).__module__
    return isinstance(owner, str) and (owner == _PACKAGE or owner.startswith(_PACKAGE + "."))


def _hook_dicts(module: nn.Module) -> Iterator[dict]:
    for key, value in vars(module).items():
        if "hooks" in key and isinstance(value, dict):
            yield value


def _plain_graph(graph_module: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A picklable copy of an exported graph: no runtime shape-guard module, no export-specific tracer."""
    graph = copy.deepcopy(graph_module.graph)
    for node in list(graph.nodes):
        # The guard module re-checks input shapes; its wrapped __call__ cannot be pickled and nothing uses
        # its result.
        if node.op == "call_module" and str(node.target) == "_guards_fn" and not node.users:
            graph.erase_node(node)
    # Unpickling a GraphModule re-traces its code with the recorded tracer class; export's tracer needs
    # arguments unpickling cannot give it, the default tracer does not.
    graph._tracer_cls = None
    graph._tracer_extras = {}
    plain = torch.fx.GraphModule(graph_module, graph)
    for key in ("_in_spec", "_out_spec"):  # read by the generated code
        if hasattr(graph_module, key):
            setattr(plain, key, getattr(graph_module, key))
    return plain


def _replacement(module: nn.Module) -> nn.Module | None:
    from lightning_compress.low_rank.factorize import FACTORIZED

    if isinstance(module, FACTORIZED):
        return nn.Sequential(OrderedDict(module.named_children()))
    if type(module).__name__ == "QuantizedGraphModule" and _ours(type(module)):
        if not module.converted:
            raise ValueError(
                "The model holds a fake-quantized (prepared, not converted) int8 graph, which only "
                f"{_PACKAGE} and torchao can run. Export it after conversion: QuantizationAwareTraining("
                "convert=True) converts at the end of fit, or call "
                "lightning_compress.quantization.convert_int8 on the prepared module."
            )
        return _plain_graph(module.graph)
    return None


def _bake_parametrizations(model: nn.Module) -> None:
    from torch.nn.utils import parametrize

    for module in list(model.modules()):
        if not parametrize.is_parametrized(module):
            continue
        for name, plist in list(module.parametrizations.items()):
            if any(_ours(type(p)) for p in plist):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)


def to_plain_torch(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in which nothing needs this package: what :func:`export` writes (``model`` is unchanged).

    - low-rank layers (``LowRankLinear``, ``LowRankConv2d``, ``TuckerConv2d``) become ``nn.Sequential`` of
      the same ``nn.Linear`` / ``nn.Conv2d`` children (same state-dict keys, same outputs);
    - a converted int8 ``QuantizedGraphModule`` becomes its ``torch.fx.GraphModule`` (calling it needs the
      ``quantized_decomposed`` ops: ``import torch.ao.quantization.fx._decomposed`` or ``import torchao``);
    - parametrizations defined here (binary / ternary weights) are baked into the weights;
    - an ``nn.TransformerEncoderLayer`` with factorized feed-forward layers takes its regular path in eval mode
      (its fused kernel reads dense weights), and its ``nn.TransformerEncoder`` builds no nested tensors;
    - forward, state-dict and load hooks registered by this package's callbacks are dropped.

    Raises:
        ValueError: for a fake-quantized (not yet converted) int8 graph.

    Example::

        >>> from lightning_compress.low_rank import LowRankLinear
        >>> model = nn.Sequential(LowRankLinear(8, 4, rank=2), nn.ReLU())
        >>> plain = to_plain_torch(model)
        >>> type(plain[0]).__name__, sorted(plain.state_dict()) == sorted(model.state_dict())
        ('Sequential', True)
    """
    memo: dict[int, Any] = {}
    for module in model.modules():
        for hooks in _hook_dicts(module):
            # Pre-seeding the memo keeps deepcopy from copying a callback (and everything it holds) along
            # with its bound-method hooks.
            memo[id(hooks)] = OrderedDict((k, v) for k, v in hooks.items() if not _ours(v))
        # A LightningModule's link to its Trainer is not part of the model.
        for key in ("_trainer", "_fabric"):
            value = vars(module).get(key)
            if value is not None:
                memo[id(value)] = None
    plain = copy.deepcopy(model, memo)

    replaced: dict[int, nn.Module] = {}
    root = _replacement(plain)
    if root is not None:
        replaced[id(plain)] = root
        plain = root
    for parent in list(plain.modules()):
        for name, child in list(parent._modules.items()):
            if child is None:
                continue
            if id(child) not in replaced:
                new = _replacement(child)
                if new is None:
                    continue
                replaced[id(child)] = new
            parent._modules[name] = replaced[id(child)]
    # Attributes outside the module tree that pointed at a replaced module or at one of its methods.
    for module in plain.modules():
        for key, value in list(vars(module).items()):
            owner = getattr(value, "__self__", None) if inspect.ismethod(value) else None
            if isinstance(value, nn.Module) and id(value) in replaced:
                vars(module)[key] = replaced[id(value)]
            elif isinstance(owner, nn.Module) and id(owner) in replaced:
                vars(module)[key] = getattr(replaced[id(owner)], value.__name__)
    _bake_parametrizations(plain)
    _regular_transformer_paths(plain)
    return plain


def _regular_transformer_paths(model: nn.Module) -> None:
    """``nn.TransformerEncoderLayer`` in eval mode runs a fused kernel that reads ``linear1.weight`` and
    ``linear2.weight``, which a factorized (now ``nn.Sequential``) layer does not have: such layers take their
    regular path, which calls the children, and their encoders build no nested tensor for that kernel."""

    def factorized(layer: nn.Module) -> bool:
        return isinstance(layer, nn.TransformerEncoderLayer) and not (
            isinstance(layer.linear1, nn.Linear) and isinstance(layer.linear2, nn.Linear)
        )

    for module in model.modules():
        if factorized(module):
            module.activation_relu_or_gelu = 0  # what the fused path is chosen on (a custom activation has 0)
        elif isinstance(module, nn.TransformerEncoder) and any(map(factorized, module.layers)):
            module.use_nested_tensor = False


def _package_classes(model: nn.Module) -> list[str]:
    return [f"{name or '<root>'} ({type(m).__name__})" for name, m in model.named_modules() if _ours(type(m))]


# -- inputs, outputs and the parity check ---------------------------------------------------------------------


def _tensors(value: Any) -> list[Tensor]:
    return [leaf for leaf in pytree.tree_leaves(value) if isinstance(leaf, Tensor)]


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    saved = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, flag in saved:
            module.training = flag


def _is_quantized(model: nn.Module) -> bool:
    for module in model.modules():
        if isinstance(module, torch.fx.GraphModule) and any(
            "quantized_decomposed" in str(node.target) for node in module.graph.nodes
        ):
            return True
    return False


def _compare(reference: list[list[Tensor]], outputs: list[list[Tensor]]) -> tuple[float, float, float]:
    """Max abs difference, argmax agreement and max |reference| over all samples and output tensors."""
    max_diff, scale, agree, total = 0.0, 0.0, 0.0, 0
    for ref_leaves, out_leaves in zip(reference, outputs, strict=True):
        if len(ref_leaves) != len(out_leaves):
            raise ExportError(
                f"The exported file returns {len(out_leaves)} tensors, the model {len(ref_leaves)}."
            )
        for ref, out in zip(ref_leaves, out_leaves, strict=True):
            ref, out = ref.detach().float().cpu(), out.detach().float().cpu()
            if ref.shape != out.shape:
                raise ExportError(
                    f"The exported file returns shape {tuple(out.shape)}, the model {tuple(ref.shape)}."
                )
            if ref.numel() == 0:
                continue
            max_diff = max(max_diff, float((ref - out).abs().max()))
            scale = max(scale, float(ref.abs().max()))
            if ref.dim() > 1 and ref.shape[-1] > 1:
                agree += float((ref.argmax(-1) == out.argmax(-1)).float().sum())
                total += ref.argmax(-1).numel()
    return max_diff, (agree / total if total else 1.0), scale


# -- writers and loaders ------------------------------------------------------------------------------------


def _batch_dynamic(plain: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict, Any]:
    from lightning_compress.quantization.pt2e import _at_least_two, _dynamic_shapes

    args, kwargs = _at_least_two(args), _at_least_two(kwargs)
    return args, kwargs, _dynamic_shapes(plain, args, kwargs)


def _write_torch(plain: nn.Module, args: tuple, kwargs: dict, file: str) -> None:
    try:
        torch.save(plain, file)
    except (AttributeError, TypeError, RuntimeError, pickle.PicklingError) as err:
        raise ValueError(
            f"`format='torch'` pickles the whole module, and this one cannot be pickled ({type(err).__name__}: "
            f"{err}; torchao's low-bit weights and parametrized layers such as weight_norm, for two, cannot). Use "
            "`format='export'` or `format='onnx'`, or save its `state_dict()`."
        ) from err


def _write_export(plain: nn.Module, args: tuple, kwargs: dict, file: str) -> None:
    from lightning_compress.quantization.pt2e import _deflate_metadata

    args, kwargs, dynamic = _batch_dynamic(plain, args, kwargs)
    program = torch.export.export(plain, args, kwargs, dynamic_shapes=dynamic)
    torch.export.save(program, file)
    _deflate_metadata(file)


def _write_onnx(plain: nn.Module, args: tuple, kwargs: dict, file: str) -> None:
    args, kwargs, dynamic = _batch_dynamic(plain, args, kwargs)
    program = torch.onnx.export(
        plain, args, kwargs=kwargs, dynamo=True, dynamic_shapes=dynamic, verbose=False, optimize=True
    )
    assert program is not None
    # One self-contained file: external weight files would keep the temporary name they were written under.
    program.save(file, external_data=False)
    _unshare_quantization_parameters(file)


def _unshare_quantization_parameters(file: str) -> None:
    """Give every quantized layer's nodes their own initializers, as onnxruntime's Q/DQ fusion needs them.

    The exporter shares one initializer among the nodes that quantize with the same parameters (both inputs of a
    residual add), and a layer called twice has one DequantizeLinear of its weight feeding two Gemm/MatMul nodes,
    which share its bias too. onnxruntime's fusion with ``session.x64quantprecision`` then fails to create the
    session ("Attempt to replace the existing tensor"). So each further reader of a weight's DequantizeLinear gets
    a DequantizeLinear of its own, and each further reader of an initializer that a Q/DQ node or a reader of a
    dequantized weight takes gets a copy of it: scales and zero points cost a few bytes, a shared layer's weight is
    stored once per call.
    """
    import onnx

    model = onnx.load(file)
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    readers: dict[str, list[tuple[Any, int]]] = {}
    for node in graph.node:
        for position, name in enumerate(node.input):
            readers.setdefault(name, []).append((node, position))
    changed = False
    nodes = list(graph.node)
    for node in nodes:
        if node.op_type != "DequantizeLinear" or node.input[0] not in initializers:
            continue
        for count, (reader, position) in enumerate(readers.get(node.output[0], [])[1:], start=1):
            twin = copy.deepcopy(node)
            twin.name, twin.output[0] = f"{node.name}_call{count}", f"{node.output[0]}_call{count}"
            reader.input[position] = twin.output[0]
            graph.node.insert(list(graph.node).index(node) + 1, twin)
            changed = True
    dequantized = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    seen: set[str] = set()
    copies = 0
    for node in graph.node:
        quantizing = node.op_type in ("QuantizeLinear", "DequantizeLinear")
        if not quantizing and not dequantized.intersection(node.input):
            continue
        for position, name in enumerate(node.input):
            if name not in initializers:
                continue
            if name not in seen:
                seen.add(name)
                continue
            copies += 1
            duplicate = copy.deepcopy(initializers[name])
            duplicate.name = f"{name}_copy{copies}"
            graph.initializer.append(duplicate)
            node.input[position] = duplicate.name
    if changed or copies:
        onnx.save(model, file)


_WRITERS = {"torch": _write_torch, "export": _write_export, "onnx": _write_onnx}


def _onnx_runner(file: str, config: dict[str, str]) -> Any:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    for key, value in config.items():
        options.add_session_config_entry(key, value)
    session = onnxruntime.InferenceSession(file, sess_options=options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]

    def run(*args: Any, **kwargs: Any) -> list[Tensor]:
        feeds = [t.detach().cpu().numpy() for t in _tensors((args, kwargs))]
        outputs = session.run(None, dict(zip(names, feeds, strict=False)))
        return [torch.from_numpy(o) for o in outputs]

    return run


def _load(format: str, file: str, config: dict[str, str]) -> Any:
    """The written file loaded back, as its users load it; a file that does not load is an :class:`ExportError`."""
    others = " or ".join(repr(f) for f in _WRITERS if f != format)
    try:
        if format == "torch":
            return torch.load(file, weights_only=False)
        if format == "export":
            return torch.export.load(file).module()
        return _onnx_runner(file, config)
    except ImportError:
        raise  # a missing runtime (onnxruntime): install it
    except Exception as err:
        raise ExportError(
            f"The {format!r} file was written but does not load back ({type(err).__name__}: {err}), so nothing "
            f"was written. Use `format={others}`."
        ) from err


def _check_tolerance(value: float | None, name: str) -> None:
    if value is not None and (
        isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0 or math.isinf(value)
    ):
        raise ValueError(f"`{name}={value!r}` must be a finite number >= 0 (or None for the default).")


def export(
    model: nn.Module,
    path: str | os.PathLike,
    format: str = "export",
    example_input: Any = None,
    *,
    check_inputs: Sequence[Any] = (),
    atol: float | None = None,
    rtol: float | None = None,
    min_agreement: float | None = None,
) -> ExportResult:
    """Write ``model`` to ``path`` in a form that loads without this package, after checking its outputs.

    Formats:

    - ``"torch"``: the whole module, pickled with ``torch.save`` (load with ``torch.load(path,
      weights_only=False)``). The classes of this package are replaced by plain torch ones (see
      :func:`to_plain_torch`); the model's own classes (a user ``nn.Module`` or ``LightningModule``) are
      pickled by reference, so loading needs the user's code. Stays trainable.
    - ``"export"``: a ``torch.export`` ExportedProgram (``.pt2``; load with ``torch.export.load(path).module()``),
      with a dynamic batch dimension. Needs neither this package nor the user's code.
    - ``"onnx"``: ONNX through ``torch.onnx.export(dynamo=True)`` (onnxscript), for onnxruntime and other
      runtimes, with a dynamic batch dimension; int8 graphs become QuantizeLinear / DequantizeLinear pairs.

    The file is written under a temporary name in the destination directory, loaded back and run on
    ``example_input`` and every entry of ``check_inputs``; its outputs must be within
    ``atol + rtol * max|model output|`` of the in-memory model's (in eval mode) and, when ``min_agreement``
    is set, agree on the argmax over the last dimension for that fraction of samples. Only then is it moved
    onto ``path`` (``os.replace``). Int8 models (``quantized_decomposed`` ops) loaded with ``"torch"`` or
    ``"export"`` need ``import torch.ao.quantization.fx._decomposed`` (part of torch) or ``import torchao``
    first. Onnxruntime runs int8 models with integer kernels that round differently; the check runs it with
    :data:`ONNX_QUANTIZED_SESSION_CONFIG` (reported in ``session_config``), which deployment should use too.

    Args:
        model: an ``nn.Module`` or ``LightningModule``, as compressed by this package's callbacks (pruned,
            low-rank, converted int8) or not. It is not modified.
        path: the file to write (parent directories are created).
        format: ``"torch"``, ``"export"`` or ``"onnx"``.
        example_input: an input of ``model`` (a tensor, a tuple of positional inputs, or a dict of keyword
            inputs); default: the LightningModule's ``example_input_array``.
        check_inputs: more inputs to compare the file and the model on.
        atol: absolute tolerance (default ``1e-4``).
        rtol: tolerance relative to the largest model output (default ``1e-4``; ``0.05`` for int8 in ONNX).
        min_agreement: smallest accepted argmax agreement (default: not checked; ``0.98`` for int8 in ONNX).

    Returns:
        An :class:`ExportResult` with the path, size and measured parity.

    Raises:
        ExportError: (a ``ValueError``) the file's outputs differ beyond the tolerance; nothing is written.
        ValueError, TypeError: a bad argument, an unwritable path, or a not yet converted int8 graph.

    Example::

        >>> import tempfile
        >>> from lightning_compress.low_rank import LowRankLinear
        >>> model = nn.Sequential(LowRankLinear(8, 4, rank=2), nn.ReLU())
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     result = export(model, os.path.join(tmp, "model.pt2"), "export", torch.randn(3, 8))
        ...     loaded = torch.export.load(result.path).module()
        ...     x = torch.randn(5, 8)
        ...     torch.allclose(loaded(x), model(x)), result.max_abs_diff < 1e-6, result.format
        (True, True, 'export')
    """
    if format not in FORMATS:
        raise ValueError(f"Unknown `format={format!r}`. Use one of {', '.join(map(repr, FORMATS))}.")
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be an nn.Module (or LightningModule), got {type(model).__name__}.")
    for value, name in ((atol, "atol"), (rtol, "rtol"), (min_agreement, "min_agreement")):
        _check_tolerance(value, name)
    if min_agreement is not None and min_agreement > 1:
        raise ValueError(f"`min_agreement={min_agreement}` is a fraction of samples: use a value in [0, 1].")
    target = check_writable(path, "path", _SUFFIX[format])
    if example_input is None:
        example_input = getattr(model, "example_input_array", None)
    if example_input is None:
        raise ValueError(
            "`example_input` is needed to export the model (and to check the file's outputs): pass an input "
            "of the model, or set `example_input_array` on the LightningModule."
        )
    if isinstance(check_inputs, Tensor | dict) or not isinstance(check_inputs, Sequence):
        raise TypeError("`check_inputs` must be a list of model inputs, e.g. `[x1, x2]`.")

    plain = to_plain_torch(model)
    plain.eval()
    if format == "torch":
        leftover = _package_classes(plain)
        if leftover:
            raise ValueError(
                f"format='torch' pickles the module classes, and {', '.join(leftover)} belong to {_PACKAGE}, "
                "which the file should not need. Use `format='export'` or 'onnx', which save the computation "
                "graph only."
            )
    quantized = _is_quantized(plain)
    onnx_int8 = format == "onnx" and quantized
    atol = 1e-4 if atol is None else float(atol)
    rtol = (0.05 if onnx_int8 else 1e-4) if rtol is None else float(rtol)
    if min_agreement is None and onnx_int8:
        min_agreement = 0.98
    config = dict(ONNX_QUANTIZED_SESSION_CONFIG) if onnx_int8 else {}

    samples = [as_call(example_input)] + [as_call(x) for x in check_inputs]
    with torch.no_grad(), _eval_mode(model):
        reference = [_tensors(model(*a, **k)) for a, k in samples]
    args, kwargs = samples[0]

    with atomic_write(target) as partial:
        _WRITERS[format](plain, args, kwargs, partial)
        loaded = _load(format, partial, config)
        with torch.no_grad():
            outputs = [_tensors(loaded(*a, **k)) for a, k in samples]
        max_diff, agreement, scale = _compare(reference, outputs)
        tolerance = atol + rtol * scale
        failed = not max_diff <= tolerance or (min_agreement is not None and agreement < min_agreement)
        if failed:
            raise ExportError(
                f"The {format!r} file does not reproduce the model: max |difference| {max_diff:.3g} "
                f"(tolerance {tolerance:.3g} = atol {atol:g} + rtol {rtol:g} x max |output| {scale:.3g}), "
                f"argmax agreement {agreement:.4f}"
                + (f" (minimum {min_agreement:g})" if min_agreement is not None else "")
                + f". Nothing was written to {os.fspath(path)!r}. Loosen `atol`/`rtol`/`min_agreement` if "
                "this difference is acceptable."
            )
    return ExportResult(
        path=str(target),
        format=format,
        bytes=os.path.getsize(target),
        quantized=quantized,
        max_abs_diff=max_diff,
        argmax_agreement=agreement,
        tolerance=tolerance,
        min_agreement=min_agreement,
        samples=len(samples),
        session_config=config,
    )
