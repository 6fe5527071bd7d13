"""Compression statistics for any ``torch.nn.Module``: parameters, sparsity, MACs, size and latency."""

from __future__ import annotations

import contextlib
import io
import math
import statistics
import time
from collections.abc import Callable, Hashable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from lightning_compress._inputs import call_module as _call

__all__ = [
    "CompressionStats",
    "LatencyResult",
    "TensorFormat",
    "compare_latency",
    "compressed_size_bytes",
    "compression_stats",
    "compression_summary",
    "count_macs",
    "count_macs_by_module",
    "count_macs_per_sample",
    "count_nonzero",
    "count_parameters",
    "dense_size_bytes",
    "layer_sparsity",
    "measure_latency",
    "repeat_sample",
    "sparsity",
    "tensor_sizes",
    "tensor_storage_bits",
]


@dataclass(frozen=True)
class TensorFormat:
    """How one parameter is stored once compressed.

    Args:
        bits: Bits per stored value: 32 for fp32, 8 for int8, 4 for indices into a 16-entry codebook, ...
        codebook_entries: Number of shared values (e.g. k-means centroids) the stored values index into;
            0 when the values are stored directly.
        codebook_bits: Bits per codebook entry.

    Example::

        >>> TensorFormat(bits=4, codebook_entries=16)
        TensorFormat(bits=4, codebook_entries=16, codebook_bits=32)
    """

    bits: int
    codebook_entries: int = 0
    codebook_bits: int = 32

    def __post_init__(self) -> None:
        if self.bits <= 0:
            raise ValueError(f"bits must be positive, got {self.bits}")
        if self.codebook_entries < 0:
            raise ValueError(f"codebook_entries must be non-negative, got {self.codebook_entries}")
        if self.codebook_bits <= 0:
            raise ValueError(f"codebook_bits must be positive, got {self.codebook_bits}")


@dataclass(frozen=True)
class LatencyResult:
    """Wall-clock latency of one forward pass, in milliseconds, and the settings it was measured under.

    Args:
        median_ms: Median over all timed calls.
        mean_ms: Mean over all timed calls.
        min_ms: Fastest timed call.
        stdev_ms: Sample standard deviation (0.0 with a single timed call).
        repeats: Number of timed calls.
        threads: ``torch.get_num_threads()`` while timing.
        batch_size: First dimension of the first tensor in the example input, if any.

    Example::

        >>> LatencyResult(2.0, 2.5, 1.5, 0.5, repeats=10, threads=1, batch_size=8).median_ms
        2.0
    """

    median_ms: float
    mean_ms: float
    min_ms: float
    stdev_ms: float
    repeats: int
    threads: int
    batch_size: int | None


@dataclass(frozen=True)
class CompressionStats:
    """A snapshot of a model's size and cost.

    Args:
        total_params: Number of parameter entries (shared parameters counted once).
        nonzero_params: Number of non-zero parameter entries.
        sparsity: Fraction of parameter entries that are zero.
        macs: Multiply-accumulates of one forward pass, or ``None`` when no example input was given.
        dense_bytes: Size of the serialized ``state_dict`` (what ``torch.save`` writes).
        raw_bytes: Bytes of the ``state_dict`` tensors stored dense, without file overhead.
        compressed_bytes: Size of the ``state_dict`` when stored sparse and/or quantized.
        layer_sparsity: Fraction of zeros per weight, by parameter name.
        layer_bytes: Bytes of each ``state_dict`` tensor as counted in ``compressed_bytes``, by name (a tensor
            shared under several names is listed under its first name).
        layer_bits: Bits per stored value of each floating-point or quantized ``state_dict`` tensor, by name.
        layer_params: Number of entries of each weight listed in ``layer_sparsity`` (shows layers made smaller
            by structured pruning or factorization).

    Example::

        >>> stats = compression_stats(nn.Linear(2, 2, bias=False))
        >>> stats.total_params, stats.macs, stats.layer_sparsity
        (4, None, {'weight': 0.0})
    """

    total_params: int
    nonzero_params: int
    sparsity: float
    macs: int | None
    dense_bytes: int
    raw_bytes: int
    compressed_bytes: int
    layer_sparsity: dict[str, float]
    layer_bytes: dict[str, int] = field(default_factory=dict)
    layer_bits: dict[str, int] = field(default_factory=dict)
    layer_params: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Return the statistics as a JSON-serializable dict.

        Example::

            >>> import json
            >>> stats = compression_stats(nn.Linear(3, 1), torch.zeros(1, 3))
            >>> json.loads(json.dumps(stats.to_dict()))["macs"]
            3
        """
        return asdict(self)


def _nonzero(tensor: torch.Tensor) -> int:
    try:
        return int(torch.count_nonzero(tensor.detach()))
    except (NotImplementedError, RuntimeError):
        pass
    # Quantized tensors (torch or tensor subclasses) often lack count_nonzero but can be dequantized.
    try:
        return int(torch.count_nonzero(tensor.detach().dequantize()))
    except (NotImplementedError, RuntimeError, AttributeError, TypeError):
        # Unknown layout: assume nothing is zero rather than fail a statistics call.
        return tensor.numel()


def count_parameters(module: nn.Module) -> int:
    """Count the parameter entries of a module; a parameter shared by several submodules counts once.

    Args:
        module: The model.

    Example::

        >>> count_parameters(nn.Linear(10, 4))
        44
    """
    return sum(p.numel() for p in module.parameters())


def count_nonzero(module: nn.Module) -> int:
    """Count the non-zero parameter entries of a module; shared parameters count once.

    Args:
        module: The model.

    Example::

        >>> layer = nn.Linear(10, 4)
        >>> with torch.no_grad():
        ...     _ = layer.weight.fill_(1.0)
        ...     _ = layer.bias.zero_()
        >>> count_nonzero(layer)
        40
    """
    return sum(_nonzero(p) for p in module.parameters())


def sparsity(module: nn.Module) -> float:
    """Fraction of parameter entries that are exactly zero (0.0 for a module without parameters).

    Args:
        module: The model.

    Example::

        >>> layer = nn.Linear(4, 1, bias=False)
        >>> with torch.no_grad():
        ...     _ = layer.weight.copy_(torch.tensor([[1.0, 0.0, 0.0, 2.0]]))
        >>> sparsity(layer)
        0.5
        >>> sparsity(nn.ReLU())
        0.0
    """
    total = count_parameters(module)
    if total == 0:
        return 0.0
    return 1.0 - count_nonzero(module) / total


def _is_bias(name: str) -> bool:
    # Covers ``bias`` as well as names such as ``in_proj_bias`` or ``bias_k`` in attention layers.
    return "bias" in name.rsplit(".", 1)[-1]


def layer_sparsity(module: nn.Module, include_bias: bool = False) -> dict[str, float]:
    """Fraction of zeros of each parameter, keyed by parameter name, in ``named_parameters`` order.

    Args:
        module: The model.
        include_bias: Also report biases; by default only the other parameters (weights) are reported,
            since pruning usually leaves biases dense.

    Example::

        >>> model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
        >>> with torch.no_grad():
        ...     _ = model[0].weight.copy_(torch.tensor([[0.0, 1.0], [0.0, 1.0]]))
        ...     _ = model[1].weight.fill_(1.0)
        >>> layer_sparsity(model)
        {'0.weight': 0.5, '1.weight': 0.0}
    """
    result: dict[str, float] = {}
    for name, param in module.named_parameters():
        if not include_bias and _is_bias(name):
            continue
        numel = param.numel()
        result[name] = 1.0 - _nonzero(param) / numel if numel else 0.0
    return result


def _first_tensor(example_input: Any) -> torch.Tensor | None:
    if isinstance(example_input, torch.Tensor):
        return example_input
    values = example_input.values() if isinstance(example_input, Mapping) else example_input
    if isinstance(values, (tuple, list)) or isinstance(example_input, Mapping):
        for value in values:
            if isinstance(value, torch.Tensor):
                return value
    return None


def _batch_size(example_input: Any) -> int | None:
    tensor = _first_tensor(example_input)
    if tensor is None or tensor.dim() == 0:
        return None
    return int(tensor.shape[0])


@contextlib.contextmanager
def _eval_mode(modules: list[nn.Module]) -> Iterator[None]:
    # Each submodule's own flag is restored, so a model that was only partly in eval mode stays that way.
    saved = [(sub, sub.training) for module in modules for sub in module.modules()]
    try:
        for module in modules:
            module.eval()
        yield
    finally:
        for sub, training in saved:
            sub.training = training


@contextlib.contextmanager
def _num_threads(threads: int | None) -> Iterator[int]:
    previous = torch.get_num_threads()
    if threads is None:
        yield previous
        return
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)


def _cpu_attention_flops(
    query: torch.Size, key: torch.Size, value: torch.Size, *args: Any, **kwargs: Any
) -> int:
    # The counter receives shapes; same formula as the GPU attention kernels, which torch registers.
    return sdpa_flop_count(query, key, value)


# Attention on the CPU runs a kernel that torch's counter has no formula for: without this it counts as zero.
_EXTRA_FLOP_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops}


def count_macs(module: nn.Module, example_input: Any) -> int:
    """Count the multiply-accumulates of one forward pass (in eval mode, without autograd).

    Counted with :class:`torch.utils.flop_counter.FlopCounterMode`, which covers matrix multiplications,
    convolutions and attention; cheap element-wise operations are not counted. The module's training flags
    are restored afterwards.

    Args:
        module: The model.
        example_input: A tensor, a tuple/list of positional arguments or a dict of keyword arguments.

    Example::

        >>> count_macs(nn.Linear(10, 4), torch.zeros(3, 10))
        120
        >>> count_macs(nn.Conv2d(3, 8, kernel_size=3), torch.zeros(1, 3, 10, 10))  # 8*8 positions * 8 * 3*3*3
        13824
    """
    return _flop_counter(module, example_input).get_total_flops() // 2


def _map_tensors(example_input: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(example_input, torch.Tensor):
        return fn(example_input) if example_input.dim() > 0 else example_input
    if isinstance(example_input, (tuple, list)):
        return type(example_input)(_map_tensors(value, fn) for value in example_input)
    if isinstance(example_input, Mapping):
        return {key: _map_tensors(value, fn) for key, value in example_input.items()}
    return example_input


def repeat_sample(example_input: Any, batch_size: int) -> Any:
    """The first sample of an example input repeated to ``batch_size`` along the first dimension of every tensor.

    Tensors without dimensions and non-tensor values are kept as they are.

    Args:
        example_input: A tensor, a tuple/list of positional arguments or a dict of keyword arguments.
        batch_size: Number of samples wanted.

    Example::

        >>> repeat_sample(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), 3).tolist()
        [[1.0, 2.0], [1.0, 2.0], [1.0, 2.0]]
        >>> repeat_sample({"x": torch.zeros(4, 2), "flag": True}, 1)["x"].shape
        torch.Size([1, 2])
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    return _map_tensors(example_input, lambda t: t[:1].expand(batch_size, *t.shape[1:]).contiguous())


def count_macs_per_sample(module: nn.Module, example_input: Any) -> int:
    """Multiply-accumulates of a forward pass over one sample: the first sample of ``example_input``.

    Whatever the batch size of ``example_input``, only its first sample is run, so the count does not grow
    with the batch (a model whose cost depends on the batch, e.g. attention across samples, is counted at
    batch 1).

    Example::

        >>> count_macs_per_sample(nn.Linear(10, 4), torch.zeros(3, 10))
        40
    """
    return count_macs(module, repeat_sample(example_input, 1))


def count_macs_by_module(module: nn.Module, example_input: Any) -> dict[str, int]:
    """Multiply-accumulates of one forward pass per submodule name (``""``: the whole module), as
    :func:`count_macs` counts them; modules without counted operations are left out.

    Example::

        >>> net = nn.Sequential(nn.Linear(10, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> count_macs_by_module(net, torch.zeros(3, 10))
        {'': 144, '0': 120, '2': 24}
    """
    counter = _flop_counter(module, example_input)
    root = type(module).__name__
    macs = {"": counter.get_total_flops() // 2}
    for key, ops in counter.get_flop_counts().items():
        if key.startswith(f"{root}."):
            macs[key[len(root) + 1 :]] = sum(ops.values()) // 2
    return macs


def _flop_counter(module: nn.Module, example_input: Any) -> FlopCounterMode:
    counter = FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOP_FORMULAS)
    # The fused attention fast path (eval-mode nn.MultiheadAttention / TransformerEncoderLayer) has no FLOP
    # formula and would count as zero: count the equivalent unfused computation instead.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with _eval_mode([module]), torch.no_grad(), counter:
            _call(module, example_input)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return counter


def dense_size_bytes(module: nn.Module) -> int:
    """Size in bytes of ``torch.save(module.state_dict())``, serialized in memory.

    Args:
        module: The model.

    Example::

        >>> dense_size_bytes(nn.Linear(100, 100)) > (100 * 100 + 100) * 4
        True
    """
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def tensor_storage_bits(tensor: torch.Tensor, fmt: TensorFormat | None = None) -> int:
    """Bits needed to store a tensor in the cheapest of three layouts, plus its codebook if it has one.

    The layouts are dense (``numel * bits``), bitmask (``nnz * bits + numel`` mask bits) and coordinate list
    (``nnz * (bits + ceil(log2(numel)))``). Wrapper tensor subclasses (e.g. quantized weights) without an
    explicit format cost what the tensors they wrap cost, as in :func:`compressed_size_bytes`.

    Args:
        tensor: The tensor to store.
        fmt: Storage format; defaults to the tensor's own element size with no codebook.

    Example::

        >>> weight = torch.zeros(100)
        >>> weight[:10] = 1.0
        >>> tensor_storage_bits(weight)  # coordinate list: 10 * (32 + 7)
        390
        >>> tensor_storage_bits(torch.ones(100), TensorFormat(bits=4, codebook_entries=16))  # 100*4 + 16*32
        912
    """
    if fmt is None and is_traceable_wrapper_subclass(tensor):
        names, _ = tensor.__tensor_flatten__()
        return sum(_default_bits(getattr(tensor, name)) for name in names)
    bits = fmt.bits if fmt is not None else tensor.element_size() * 8
    numel = tensor.numel()
    nnz = _nonzero(tensor)
    index_bits = (numel - 1).bit_length() if numel > 1 else 0  # == ceil(log2(numel))
    dense = numel * bits
    bitmask = nnz * bits + numel
    coordinates = nnz * (bits + index_bits)
    codebook = fmt.codebook_entries * fmt.codebook_bits if fmt is not None else 0
    return min(dense, bitmask, coordinates) + codebook


def _default_bits(tensor: torch.Tensor) -> int:
    if is_traceable_wrapper_subclass(tensor):
        return tensor_storage_bits(tensor)
    if tensor.is_floating_point() or tensor.is_complex():
        return tensor_storage_bits(tensor)
    # Integer and boolean tensors (step counters, indices, quantized codes) are kept as they are:
    # only floating-point values are what pruning zeroes and the sparse layouts are meant for.
    return tensor.numel() * tensor.element_size() * 8


def _storage_key(tensor: torch.Tensor) -> Hashable:
    # state_dict() hands out fresh detached views, so tied tensors are recognized by the memory they view.
    if is_traceable_wrapper_subclass(tensor):
        names, _ = tensor.__tensor_flatten__()
        return (type(tensor), tuple(_storage_key(getattr(tensor, name)) for name in names))
    try:
        pointer = tensor.untyped_storage().data_ptr()
    except (NotImplementedError, RuntimeError):
        pointer = 0
    if pointer == 0:
        # Meta, empty or storage-less tensors have no address to compare.
        return ("id", id(tensor))
    return (pointer, tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)


def compressed_size_bytes(module: nn.Module, formats: Mapping[str, TensorFormat] | None = None) -> int:
    """Bytes needed to store the ``state_dict`` sparse and/or quantized.

    Every tensor (parameters and buffers; a tensor shared under several names counts once) costs
    :func:`tensor_storage_bits` with its format, rounded up to whole bytes. Integer and boolean tensors
    without a format (e.g. ``num_batches_tracked``) are counted dense at their dtype size.

    Args:
        module: The model.
        formats: Storage format per ``state_dict`` name; names not listed keep their dtype's size, and
            names that are not in the ``state_dict`` are ignored.

    Example::

        >>> layer = nn.Linear(4, 2, bias=False)
        >>> compressed_size_bytes(layer)  # dense fp32: 8 * 4 bytes
        32
        >>> compressed_size_bytes(layer, {"weight": TensorFormat(bits=8)})
        8
    """
    return sum(tensor_sizes(module, formats).values())


def tensor_sizes(module: nn.Module, formats: Mapping[str, TensorFormat] | None = None) -> dict[str, int]:
    """Bytes of every ``state_dict`` tensor as :func:`compressed_size_bytes` counts them, by name.

    A tensor shared under several names is listed once, under its first name.

    Example::

        >>> tensor_sizes(nn.Linear(4, 2), {"weight": TensorFormat(bits=8)})
        {'weight': 8, 'bias': 8}
    """
    formats = formats or {}
    sizes: dict[str, int] = {}
    for names, tensor in _unique_tensors(module):
        fmt = next((formats[name] for name in names if name in formats), None)
        bits = _default_bits(tensor) if fmt is None else tensor_storage_bits(tensor, fmt)
        sizes[names[0]] = math.ceil(bits / 8)
    return sizes


def _value_bits(module: nn.Module, formats: Mapping[str, TensorFormat]) -> dict[str, int]:
    bits: dict[str, int] = {}
    for names, tensor in _unique_tensors(module):
        fmt = next((formats[name] for name in names if name in formats), None)
        if fmt is not None:
            bits[names[0]] = fmt.bits
        elif is_traceable_wrapper_subclass(tensor):
            inner, _ = tensor.__tensor_flatten__()
            bits[names[0]] = getattr(tensor, inner[0]).element_size() * 8
        elif tensor.is_floating_point() or tensor.is_quantized or tensor.dtype in (torch.int8, torch.uint8):
            bits[names[0]] = tensor.element_size() * 8
    return bits


def raw_size_bytes(module: nn.Module) -> int:
    """Bytes of the ``state_dict`` tensors stored dense at their dtype, without any file overhead.

    The like-for-like reference for :func:`compressed_size_bytes` (a tensor shared under several names counts once).

    Example::

        >>> raw_size_bytes(nn.Linear(4, 2))  # (8 + 2) fp32 values
        40
    """
    return sum(math.ceil(_dense_bits(tensor) / 8) for _, tensor in _unique_tensors(module))


def _dense_bits(tensor: torch.Tensor) -> int:
    if is_traceable_wrapper_subclass(tensor):
        names, _ = tensor.__tensor_flatten__()
        return sum(_dense_bits(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size() * 8


def _unique_tensors(module: nn.Module) -> list[tuple[list[str], torch.Tensor]]:
    state = module.state_dict()
    groups: dict[Hashable, list[str]] = {}
    for name, value in state.items():
        if isinstance(value, torch.Tensor):
            groups.setdefault(_storage_key(value), []).append(name)
    return [(names, state[names[0]]) for names in groups.values()]


def _synchronizer(modules: list[nn.Module], example_input: Any) -> Callable[[], None] | None:
    # CUDA kernels run asynchronously; without a sync the timer would only measure the kernel launches.
    tensors = [p for module in modules for p in module.parameters()]
    first = _first_tensor(example_input)
    if first is not None:
        tensors.append(first)
    if any(t.device.type == "cuda" for t in tensors):
        return torch.cuda.synchronize
    return None


def _time_calls(
    module: nn.Module, example_input: Any, count: int, sync: Callable[[], None] | None
) -> list[float]:
    times = []
    for _ in range(count):
        if sync is not None:
            sync()
        start = time.perf_counter()
        _call(module, example_input)
        if sync is not None:
            sync()
        times.append((time.perf_counter() - start) * 1000.0)
    return times


def _summarize(times: list[float], threads: int, batch_size: int | None) -> LatencyResult:
    return LatencyResult(
        median_ms=statistics.median(times),
        mean_ms=statistics.fmean(times),
        min_ms=min(times),
        stdev_ms=statistics.stdev(times) if len(times) > 1 else 0.0,
        repeats=len(times),
        threads=threads,
        batch_size=batch_size,
    )


def _check_counts(repeats: int, warmup: int) -> None:
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    if warmup < 0:
        raise ValueError(f"warmup must be non-negative, got {warmup}")


def measure_latency(
    module: nn.Module,
    example_input: Any,
    *,
    repeats: int = 20,
    warmup: int = 5,
    threads: int | None = None,
) -> LatencyResult:
    """Time forward passes of a module in eval mode under ``torch.inference_mode``.

    The training flags and ``torch.get_num_threads()`` are restored afterwards. To compare models, prefer
    :func:`compare_latency`, which interleaves their timings.

    Args:
        module: The model.
        example_input: A tensor, a tuple/list of positional arguments or a dict of keyword arguments.
        repeats: Number of timed calls.
        warmup: Number of untimed calls first (allocator, caches, lazy initialization).
        threads: Intra-op thread count while timing; ``None`` keeps the current one.

    Example::

        >>> result = measure_latency(nn.Linear(8, 8), torch.zeros(4, 8), repeats=3, warmup=1, threads=1)
        >>> result.repeats, result.threads, result.batch_size, result.median_ms > 0
        (3, 1, 4, True)
    """
    _check_counts(repeats, warmup)
    sync = _synchronizer([module], example_input)
    with _eval_mode([module]), _num_threads(threads) as used_threads, torch.inference_mode():
        _time_calls(module, example_input, warmup, sync)
        times = _time_calls(module, example_input, repeats, sync)
    return _summarize(times, used_threads, _batch_size(example_input))


def compare_latency(
    modules: Mapping[str, nn.Module],
    example_input: Any,
    *,
    repeats: int = 20,
    warmup: int = 5,
    threads: int | None = None,
    rounds: int = 3,
) -> dict[str, LatencyResult]:
    """Time several models side by side, so machine noise affects them alike; use this for speed-up ratios.

    After ``warmup`` untimed calls per model, each of ``rounds`` rounds times every model ``repeats`` times,
    starting from a different model each round. Each result summarizes all ``rounds * repeats`` timings of
    its model. Models run in eval mode under ``torch.inference_mode``; training flags and the thread count
    are restored afterwards.

    Args:
        modules: Models by name.
        example_input: A tensor, a tuple/list of positional arguments or a dict of keyword arguments,
            given to every model.
        repeats: Timed calls per model per round.
        warmup: Untimed calls per model before the first round.
        threads: Intra-op thread count while timing; ``None`` keeps the current one.
        rounds: Number of interleaved rounds.

    Example::

        >>> results = compare_latency({"small": nn.Linear(4, 4), "big": nn.Linear(4, 64)}, torch.zeros(2, 4),
        ...                           repeats=2, warmup=1, rounds=2)
        >>> {name: result.repeats for name, result in results.items()}
        {'small': 4, 'big': 4}
    """
    _check_counts(repeats, warmup)
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    names = list(modules)
    models = [modules[name] for name in names]
    sync = _synchronizer(models, example_input)
    times: dict[str, list[float]] = {name: [] for name in names}
    with _eval_mode(models), _num_threads(threads) as used_threads, torch.inference_mode():
        for name in names:
            _time_calls(modules[name], example_input, warmup, sync)
        for round_index in range(rounds):
            # Rotating the start keeps any position effect (e.g. caches evicted by the previous model)
            # from always landing on the same model.
            shift = round_index % len(names) if names else 0
            for name in names[shift:] + names[:shift]:
                times[name].extend(_time_calls(modules[name], example_input, repeats, sync))
    batch_size = _batch_size(example_input)
    return {name: _summarize(times[name], used_threads, batch_size) for name in names}


def compression_stats(
    module: nn.Module,
    example_input: Any = None,
    formats: Mapping[str, TensorFormat] | None = None,
) -> CompressionStats:
    """Collect parameter counts, sparsity, MACs and sizes of a model in one snapshot.

    Args:
        module: The model.
        example_input: Input for counting MACs (see :func:`count_macs`); ``None`` skips the count.
        formats: Storage formats for :func:`compressed_size_bytes`.

    Example::

        >>> stats = compression_stats(nn.Linear(10, 4), torch.zeros(3, 10))
        >>> stats.total_params, stats.macs, stats.compressed_bytes
        (44, 120, 176)
    """
    sizes = tensor_sizes(module, formats)
    return CompressionStats(
        total_params=count_parameters(module),
        nonzero_params=count_nonzero(module),
        sparsity=sparsity(module),
        macs=count_macs(module, example_input) if example_input is not None else None,
        dense_bytes=dense_size_bytes(module),
        raw_bytes=raw_size_bytes(module),
        compressed_bytes=sum(sizes.values()),
        layer_sparsity=layer_sparsity(module),
        layer_bytes=sizes,
        layer_bits=_value_bits(module, formats or {}),
        layer_params={name: p.numel() for name, p in module.named_parameters() if not _is_bias(name)},
    )


def _ratio(numerator: int, denominator: int) -> float:
    if denominator == 0:
        return math.inf if numerator else math.nan
    return numerator / denominator


def compression_summary(before: CompressionStats, after: CompressionStats) -> dict[str, float | int | None]:
    """Compare two snapshots: compression rate, size ratio and MAC ratio.

    ``compression_rate`` is the number of parameters before divided by the non-zero parameters after;
    ratios with a zero denominator are ``inf`` (``nan`` for 0/0).

    Args:
        before: Statistics of the original model.
        after: Statistics of the compressed model.

    Example::

        >>> before = CompressionStats(100, 100, 0.0, 1000, 700, 400, 400, {})
        >>> after = CompressionStats(100, 25, 0.75, 250, 700, 400, 200, {})
        >>> summary = compression_summary(before, after)
        >>> summary["compression_rate"], summary["size_ratio"], summary["macs_ratio"]
        (4.0, 2.0, 4.0)
    """
    macs_ratio = None
    if before.macs is not None and after.macs is not None:
        macs_ratio = _ratio(before.macs, after.macs)
    return {
        "params_before": before.total_params,
        "params_after": after.nonzero_params,
        "compression_rate": _ratio(before.total_params, after.nonzero_params),
        "size_before": before.raw_bytes,
        "size_after": after.compressed_bytes,
        "size_ratio": _ratio(before.raw_bytes, after.compressed_bytes),
        "macs_before": before.macs,
        "macs_after": after.macs,
        "macs_ratio": macs_ratio,
        "sparsity_after": after.sparsity,
    }
