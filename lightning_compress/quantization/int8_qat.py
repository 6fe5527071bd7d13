"""Static int8 quantization-aware training of the parts of a model (torchao PT2E, X86 inductor quantizer).

Each part is exported with ``torch.export``, prepared with ``prepare_qat_pt2e`` and takes the place of the float
module as a :class:`~lightning_compress.quantization.pt2e.QuantizedGraphModule` (module replacement: no method
of the model is touched); at the end each graph is converted with ``convert_pt2e``. The graphs share their
parameters with the float modules, which are kept (:attr:`Int8Parts.floats`) so that the float layers can be
put back for a while (:meth:`Int8Parts.float_view`: pruning removes channels from them).

The part is ``config.module``, or, with ``module=None``, each direct child of the model that the forward calls
and that holds convolution or linear layers. With a forward that calls one child (``self.net(x)``) that is the
whole forward's graph. Nothing is folded *across* children: a convolution and the batch norm that follows it
must live in the same child (wrap them, or name their parent with ``module=``), else the batch norm stays a
float op between two quantized graphs.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_compress import _checks
from lightning_compress._inputs import call_module
from lightning_compress.export import to_plain_torch
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
from lightning_compress.quantization.qat_core import (
    QATParts,
    QuantizationConfig,
    capture_inputs,
    layer_types,
    train_mode,
)
from lightning_compress.selection import tied_parameter_names
from lightning_compress.stats import compare_latency


def _holds_float(graph: nn.Module, path: str) -> bool:
    """Whether ``graph`` still holds a floating-point tensor under ``path`` (a weight left unquantized)."""
    try:
        tensor = graph.get_parameter(path)
    except AttributeError:
        try:
            tensor = graph.get_buffer(path)
        except AttributeError:
            return False
    return tensor.is_floating_point()


def _eval_mode(module: nn.Module) -> bool:
    """A layer that computes differently in eval mode (batch norm with running statistics, dropout with p > 0)
    and is in it."""
    if module.training:
        return False
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return module.track_running_stats
    return isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0


# The layers the X86 inductor quantizer quantizes the weights of.
QUANTIZABLE = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Linear,
)


class Int8Parts(QATParts):
    """The int8 graphs that take the place of parts of a model (see the module documentation).

    Example::

        >>> model = nn.Sequential()
        >>> model.add_module("net", nn.Sequential(nn.Linear(4, 8), nn.ReLU()))
        >>> model.add_module("head", nn.Linear(8, 2))
        >>> parts = Int8Parts(QuantizationConfig())
        >>> parts.example = torch.randn(2, 4)
        >>> parts.prepare(model)
        >>> sorted(parts.graphs(model)), sorted(parts.weight_names), parts.state(model)
        (['head', 'net'], ['head.weight', 'net.0.weight'], 'prepared')
    """

    def __init__(self, config: QuantizationConfig) -> None:
        super().__init__(config)
        # The float modules the graphs took the place of, by name (kept after conversion).
        self.floats: dict[str, nn.Module] = {}

    def _scope(self, name: str) -> str:
        # Ranges are keyed relative to the quantized module: `config.module`, else the model.
        return "" if self.config.module is not None else f"{name}."

    def graphs(self, model: nn.Module) -> dict[str, QuantizedGraphModule]:
        """The graphs installed in ``model``, by name."""
        if self.config.module is not None:
            current = self.target(model)
            return {self.config.module: current} if isinstance(current, QuantizedGraphModule) else {}
        return {n: c for n, c in model.named_children() if isinstance(c, QuantizedGraphModule)}

    def state(self, model: nn.Module) -> str:
        graphs = self.graphs(model).values()
        if not graphs:
            return "float"
        return "converted" if any(g.converted for g in graphs) else "prepared"

    def candidates(self, model: nn.Module) -> dict[str, nn.Module]:
        """The parts to quantize: ``config.module``, or the children with convolution or linear layers."""
        if self.config.module is not None:
            return {self.config.module: self.target(model)}
        return {
            n: c for n, c in model.named_children() if any(isinstance(m, QUANTIZABLE) for m in c.modules())
        }

    def prepare(self, model: nn.Module) -> None:
        if self.example is None:
            raise ValueError(
                "QuantizationAwareTraining exports the model and needs an example input: set "
                "`example_input_array` on the LightningModule or pass `example_input`."
            )
        self.restore_float(model)
        what = self.describe(model)
        candidates = self.candidates(model)
        inputs = capture_inputs(model, candidates, self.example, required=self.config.module is not None)
        graphs = {}
        for name, part in candidates.items():
            if name in inputs:  # with `module=None`, the children the forward calls
                args, kwargs = inputs[name]
                label = what if self.config.module else f"{type(model).__name__}.{name} (`module=None`)"
                if model.training:  # a fit: the graph trains every layer of the part in one mode
                    modes = {
                        f"{name}.{n}": type(m).__name__ for n, m in part.named_modules() if _eval_mode(m)
                    }
                    _checks.check_one_mode(label, modes)
                with train_mode(part, True):
                    graph = prepare_int8_qat(part, args, kwargs, what=label, name=name)
                if quantized_weight_names(graph.graph):
                    graphs[name] = graph
        if not graphs:
            raise ValueError(
                f"`scheme='int8'` found nothing to quantize in {what}: it quantizes the weights of the "
                "convolution and nn.Linear layers the forward calls, and there are none (its layers: "
                f"{layer_types(self.target(model))}). Point `module=` at a part with convolution or nn.Linear "
                "layers, or leave QuantizationAwareTraining out for this model."
            )
        self.floats = {name: candidates[name] for name in graphs}
        self.float_layers = sum(isinstance(m, QUANTIZABLE) for m in self.target(model).modules())
        self.install(model, graphs)

    def install(self, model: nn.Module, graphs: dict[str, QuantizedGraphModule]) -> None:
        """Put ``graphs`` in place of the modules of those names, and record the weights they quantize."""
        for name, graph in graphs.items():
            model.set_submodule(name, graph)
        prepared = {name: graph for name, graph in graphs.items() if not graph.converted}
        if prepared:  # a converted graph no longer tells its quantized weights apart: the names are kept
            self.weight_names = {
                f"{name}.{weight}": name
                for name, graph in prepared.items()
                for weight in quantized_weight_names(graph.graph)
            }

    def restore_float(self, model: nn.Module) -> None:
        graphs = self.graphs(model)
        if missing := [name for name in graphs if name not in self.floats]:
            raise ValueError(
                f"{missing} already hold{'s' if len(missing) == 1 else ''} an int8 graph converted by an earlier "
                "QuantizationAwareTraining, whose float layers this one does not have: an int8 graph cannot be "
                "trained again. Pass the callback of that fit again (it keeps the float layers), or build the model "
                "anew and load float weights."
            )
        for name in graphs:
            model.set_submodule(name, self.floats[name])

    def convert(self, model: nn.Module, ranges: dict[str, Tensor] | None = None) -> None:
        """Convert every graph; with ``ranges`` (see :meth:`quantizer_state`), load them into the graphs first."""
        converted = {}
        for name, graph in self.graphs(model).items():
            if ranges:
                scope = self._scope(name)
                own = {k[len(scope) :]: v for k, v in ranges.items() if k.startswith(scope)}
                if not own and len(self.graphs(model)) == 1:  # recorded from one graph of the whole forward
                    own = ranges
                graph.load_state_dict(own, strict=False)
            weights = list(quantized_weight_names(graph.graph))  # the conversion rewrites the graph
            converted[name] = convert_int8(graph)
            stayed = [w for w in weights if _holds_float(converted[name].graph, w)]
            self._left_float(name, stayed)
        self.install(model, converted)

    def _left_float(self, name: str, weights: list[str]) -> None:
        """Weights the conversion left in float (the int8 backend has no kernel for their layer, e.g. Conv1d)
        are no longer counted as int8, and said once."""
        scope = f"{name}." if name else ""
        stayed = [f"{scope}{w}" for w in weights if f"{scope}{w}" in self.weight_names]
        for weight in stayed:
            del self.weight_names[weight]
        if stayed:
            warnings.warn(
                f"The int8 conversion left {stayed} in float32: the x86 int8 backend has no kernel for the pattern "
                "their layers form (e.g. a Conv1d, or an nn.MultiheadAttention's projections). They trained with "
                "fake-quantized weights and now run in float32; the sizes and the report count them as float32.",
                stacklevel=2,
            )

    def ensure(self, model: nn.Module, want: str) -> None:
        # The converted graph bakes the activation ranges into its code, and a converted state dict does not hold
        # them: a converted model rebuilt from its float layers needs the ranges recorded at conversion.
        if want == "converted" and self.state(model) != "converted":
            super().ensure(model, "prepared")
            self.convert(model, self.ranges)
            return
        super().ensure(model, want)

    @contextlib.contextmanager
    def float_view(self, model: nn.Module) -> Iterator[None]:
        graphs = self.graphs(model)
        if not graphs or any(g.converted for g in graphs.values()):
            yield
            return
        self.restore_float(model)
        try:
            yield
        finally:
            changed = {
                name: self.floats[name]
                for name, graph in graphs.items()
                if not _same_parameters(self.floats[name], graph)
            }
            inputs = capture_inputs(model, changed, self.example) if changed else {}
            for name in changed:
                graphs[name] = self._prepare_again(name, graphs[name], inputs[name])
            self.install(model, graphs)

    def _prepare_again(
        self, name: str, old: QuantizedGraphModule, inputs: tuple[tuple, dict]
    ) -> QuantizedGraphModule:
        """Prepare the changed float module, carrying the phase and the ranges observed so far."""
        target = self.floats[name]
        args, kwargs = inputs
        with train_mode(target, True):
            graph = prepare_int8_qat(target, args, kwargs, what=f"{type(target).__name__} after a change")
        # One training-mode call lets the weight quantizers observe the new weights; batch-norm statistics and
        # the activation ranges (per tensor: the shapes still match) are put back as they were.
        statistics = {n: b.detach().clone() for n, b in target.named_buffers()}
        with torch.no_grad():
            graph(*args, **kwargs)
            for n, buffer in target.named_buffers():
                if n in statistics and statistics[n].shape == buffer.shape:
                    buffer.copy_(statistics[n])
        previous = dict(fake_quantizers(old))
        for n, quantizer in fake_quantizers(graph):
            before = previous.get(n)
            if before is None:
                continue
            state, mine = before.state_dict(), quantizer.state_dict()
            if state.keys() == mine.keys() and all(state[k].shape == mine[k].shape for k in state):
                quantizer.load_state_dict(state)
        graph.train(old.training)
        graph.fake_quant, graph.observe, graph.bn_frozen = old.fake_quant, old.observe, old.bn_frozen
        return graph

    def quantizers(self, model: nn.Module) -> dict[nn.Module, str]:
        kinds: dict[nn.Module, str] = {}
        for graph in self.graphs(model).values():
            weights = set(quantized_weight_names(graph.graph).values())
            kinds.update({q: "weight" if n in weights else "activation" for n, q in fake_quantizers(graph)})
        return kinds

    def set_phase(
        self, model: nn.Module, fake_quant: bool, observe: bool, bn_frozen: bool, reduce: Callable
    ) -> list[str]:
        graphs = [g for g in self.graphs(model).values() if not g.converted]
        if not graphs:
            return []
        first = graphs[0]
        before = (first.fake_quant, first.fake_quant and not first.observe, first.bn_frozen)
        now = (fake_quant, fake_quant and not observe, bn_frozen)
        events = ("fake quantization started", "observers frozen", "batch norm frozen")
        for graph in graphs:
            if graph.observe and not observe and fake_quant:
                sync_observers(graph, reduce)  # ranges freeze now: the same on every process first
            graph.fake_quant, graph.observe, graph.bn_frozen = fake_quant, observe, bn_frozen
        return [event for event, a, b in zip(events, now, before, strict=True) if a and not b]

    def synchronize(self, model: nn.Module, reduce: Callable, broadcast: Callable | None) -> None:
        """Average the observed ranges over the processes, give every process rank zero's buffers, and keep
        the ranges (:attr:`ranges`: a converted graph bakes them into its code, its state dict lacks them)."""
        for graph in self.graphs(model).values():
            sync_observers(graph, reduce)
            if broadcast is not None:
                # The last training forward updates each process's batch-norm statistics with its own batch:
                # every process folds rank zero's into its int8 model.
                buffers = dict(graph.named_buffers())
                source = broadcast({n: b.detach().cpu().clone() for n, b in buffers.items()})
                with torch.no_grad():
                    for n, buffer in buffers.items():
                        buffer.copy_(source[n])
        self.ranges = self.quantizer_state(model)

    def quantizer_state(self, model: nn.Module) -> dict[str, Tensor]:
        """The fake quantizers' entries of the graphs' state dicts (ranges, scales, switches), copied."""
        state = {}
        for name, graph in self.graphs(model).items():
            state.update({self._scope(name) + k: v for k, v in _quantizer_state(graph).items()})
        return state

    def prepare_for_checkpoint(
        self, model: nn.Module, state_dict: dict[str, Any], prefix: str, fitting: bool
    ) -> None:
        if self.config.module is None and LEGACY_CHILD not in model._modules:
            _from_whole_forward(model, state_dict, prefix)
        names = [self.config.module] if self.config.module is not None else list(model._modules)
        scopes = tuple(f"{prefix}{name}." for name in names)
        keys = [k for k in state_dict if k.startswith(scopes)]
        if any("_frozen_param" in k for k in keys):
            want = "converted"
        elif any("activation_post_process" in k for k in keys):
            want = "prepared"
        else:
            want = "float"
        if want == "float" and fitting and self.state(model) == "prepared":
            # Resuming a fit from a checkpoint written without quantization: QAT starts from its float weights,
            # with the quantizers as they are now.
            for name, graph in self.graphs(model).items():
                for key, value in _quantizer_state(graph).items():
                    state_dict.setdefault(f"{prefix}{name}.{key}", value)
            return
        if want == "converted" and not self.ranges and self.state(model) != "converted":
            raise ValueError(
                "This checkpoint holds a converted int8 model, whose activation ranges are kept in "
                "QuantizationAwareTraining's state, which Lightning loads after the weights. Load it with "
                "`lightning_compress.quantization.load_qat_checkpoint(YourModule(...), path)` (then validate or "
                "test the returned model without `ckpt_path`), or pass a checkpoint written during training."
            )
        self.ensure(model, want)
        for name, graph in self.graphs(model).items():
            _rename_tied(state_dict, f"{prefix}{name}.", graph, self.floats.get(name))
        if want == "converted":
            # A graph rebuilt from a fresh float model is converted with quantizers that never observed the
            # weights: its per-channel scales have one element, the checkpoint's one per channel. The code does
            # not depend on those shapes: the buffers are replaced and the load fills them.
            for name, graph in self.graphs(model).items():
                for key, buffer in list(graph.named_buffers()):
                    saved = state_dict.get(f"{prefix}{name}.{key}")
                    if isinstance(saved, Tensor) and saved.shape != buffer.shape:
                        owner, _, attr = key.rpartition(".")
                        parent = graph.get_submodule(owner) if owner else graph
                        parent.register_buffer(attr, torch.empty_like(saved, device=buffer.device))


def _rename_tied(
    state_dict: dict[str, Any], scope: str, graph: nn.Module, float_module: nn.Module | None
) -> None:
    """An exported graph may keep one name (or several) for a parameter the float model ties under several (an
    embedding shared with the output layer), and a graph rebuilt for loading may keep other names than the graph
    that was saved: the saved tensor goes under every name the graph expects, and under no other."""
    if float_module is None:
        return
    expected = set(graph.state_dict())
    for names in {tuple(group) for group in tied_parameter_names(float_module).values()}:
        saved = [scope + n for n in names if scope + n in state_dict]
        if not saved or all(scope + n in state_dict for n in names if n in expected):
            continue
        tensor = state_dict[saved[0]]
        for name in names:
            state_dict.pop(scope + name, None)
            if name in expected:
                state_dict[scope + name] = tensor


# Where earlier versions put the graph of the whole forward (`module=None`): a child of that name that took
# over the children the forward called.
LEGACY_CHILD = "quantized"


def _from_whole_forward(model: nn.Module, state_dict: dict[str, Any], prefix: str) -> None:
    """Rename, in place, the keys of a checkpoint written when ``module=None`` put the graph of the whole forward
    under ``quantized.``: ``quantized.net.0.weight`` is ``net.0.weight``, and the graph's own entries (quantizers,
    int8 constants) go to the one child the forward called, whose graph is the same."""
    legacy = f"{prefix}{LEGACY_CHILD}."
    keys = [k for k in state_dict if k.startswith(legacy)]
    if not keys:
        return
    children = {k[len(legacy) :].split(".", 1)[0] for k in keys} & set(model._modules)
    if len(children) != 1:
        raise ValueError(
            "This checkpoint was written by an earlier version of QuantizationAwareTraining(module=None), which "
            f"exported the whole forward as one graph over the children {sorted(children)}; each child is now "
            "quantized on its own, and that graph's quantizers cannot be given to one of them: fine-tune from "
            "the float weights instead."
        )
    child = children.pop()
    for key in keys:
        rest = key[len(legacy) :]
        state_dict[f"{prefix}{rest if rest.startswith(child + '.') else f'{child}.{rest}'}"] = state_dict.pop(
            key
        )


def _same_parameters(module: nn.Module, graph: QuantizedGraphModule) -> bool:
    params = dict(module.named_parameters())
    return all(params.get(name) is p for name, p in graph.graph.named_parameters())


def _quantizer_state(graph: nn.Module) -> dict[str, Tensor]:
    # Every name a quantizer is registered under (one quantizer can serve several ops under several names).
    kinds = tuple(type(q) for _, q in fake_quantizers(graph))
    names = tuple(f"{name}." for name, child in graph._modules.items() if isinstance(child, kinds))
    return {k: v.detach().cpu().clone() for k, v in graph.state_dict().items() if k.startswith(names)}


def snapshot(module: nn.Module) -> nn.Module:
    """A copy of ``module`` in plain torch and eval mode (see :func:`~lightning_compress.export.to_plain_torch`),
    unaffected by later changes of ``module``'s structure: the float model to compare the converted one with."""
    return to_plain_torch(module).eval()


def float_copy(parts: Int8Parts, model: nn.Module) -> nn.Module | Exception:
    """The prepared part with its float layers (:func:`snapshot`), or why it could not be copied."""
    try:
        with parts.float_view(model):
            return snapshot(parts.target(model))
    except Exception as err:
        return err


def ship_int8(
    reference: nn.Module | Exception,
    int8: nn.Module,
    inputs: tuple[tuple, dict],
    export_path: str | os.PathLike | None,
    measure: bool,
) -> tuple[dict[str, float] | None, dict[str, Any] | None, Exception | None]:
    """Measure (:func:`measure_int8`) and save the converted model ``int8`` next to the float ``reference``.

    With ``export_path`` the int8 program is saved there and the float one beside it (``<name>.fp32.pt2``).
    Returns the measurements, the artifact record (paths, sizes, size ratio) and what failed, each ``None``
    when it did not happen.
    """
    measurements = None
    try:
        if isinstance(reference, Exception):
            raise reference
        args, kwargs = inputs
        with train_mode(int8, False):
            measurements = measure_int8(reference, int8, inputs) if measure else None
            if export_path is None:
                return measurements, None, None
            path = os.fspath(export_path)
            fp32_path = "{}.fp32{}".format(*os.path.splitext(path))
            fp32 = save_quantized(reference, args, fp32_path, kwargs)
            size = save_quantized(int8, args, path, kwargs)
    except Exception as err:
        return measurements, None, err
    artifact = {
        "path": path,
        "bytes": size,
        "fp32_path": fp32_path,
        "fp32_bytes": fp32,
        "size_ratio": fp32 / size,
    }
    return measurements, artifact, None


def measure_int8(fp32: nn.Module, int8: nn.Module, inputs: tuple[tuple, dict]) -> dict[str, float]:
    """The saved size of both programs (in eval mode), and their latency compiled the same way
    (``compile_for_cpu``: inductor with freezing), interleaved, median of 3 rounds x 20 calls after warm-up.
    Costs two compilations."""
    args, kwargs = inputs
    call = kwargs if kwargs and not args else args  # one call form for the timing loop
    with tempfile.TemporaryDirectory() as tmp:
        fp32_bytes = save_quantized(fp32, args, Path(tmp) / "fp32.pt2", kwargs)
        int8_bytes = save_quantized(int8, args, Path(tmp) / "int8.pt2", kwargs)
        compiled = {"fp32": compile_for_cpu(fp32), "int8": compile_for_cpu(int8)}
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


def whole_forward_graph(module: nn.Module) -> nn.Module | None:
    """The module that runs as ``module``'s whole forward when one was set on the instance, else ``None``.

    Quantization-aware training replaces child modules only (with ``module=None``, each child the forward
    calls), so for the models it produces this is ``None``: the model itself is what runs.

    Example::

        >>> whole_forward_graph(nn.Linear(2, 2)) is None
        True
    """
    forward = module.__dict__.get("forward")
    owner = getattr(forward, "__self__", None)
    return owner if isinstance(owner, nn.Module) else None
