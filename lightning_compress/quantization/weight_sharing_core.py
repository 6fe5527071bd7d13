"""Weight sharing on a plain ``nn.Module`` (Deep Compression's trained quantization): k-means clusters, Huffman
coding and the storage of the shared weights. No Lightning here: :class:`~lightning_compress.quantization.WeightSharing`
schedules these during a fit.

Example::

    >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    >>> shared = share_weights_(model, WeightSharingConfig(bits=2))
    >>> sorted(shared.codebooks), len(model[0].weight.unique())
    (['0.weight', '2.weight'], 4)
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lightning_compress import _checks
from lightning_compress.selection import ModuleSelection, Selector
from lightning_compress.stats import TensorFormat

INITS = ("linear", "density", "random")


# -- k-means ---------------------------------------------------------------------------------------------


def init_centroids(
    values: Tensor, k: int, init: str = "linear", generator: torch.Generator | None = None
) -> Tensor:
    """Initial centroids for 1-D k-means, sorted (Han et al. 2016, section 3.2).

    ``"linear"`` spaces them evenly between the smallest and the largest value (keeps the rare large weights,
    which matter most); ``"density"`` puts them at evenly spaced quantiles; ``"random"`` picks values.

    Example::

        >>> init_centroids(torch.tensor([-1.0, 0.5, 3.0]), 3)
        tensor([-1.,  1.,  3.])
    """
    values = values.detach().flatten().float()
    if init == "linear":
        return torch.linspace(float(values.min()), float(values.max()), k, device=values.device)
    if init == "density":
        return torch.quantile(values, torch.linspace(0.0, 1.0, k + 2, device=values.device)[1:-1])
    if init == "random":
        picks = torch.randperm(values.numel(), generator=generator)[:k].to(values.device)
        return torch.sort(values[picks]).values
    raise ValueError(f"Unknown `init={init!r}`. Use one of {', '.join(map(repr, INITS))}.")


def _assign(values: Tensor, centroids: Tensor) -> Tensor:
    # With sorted centroids the nearest one is found by the midpoints between neighbours.
    return torch.bucketize(values, (centroids[1:] + centroids[:-1]) / 2)


def kmeans_1d(
    values: Tensor,
    k: int,
    *,
    init: str = "linear",
    iterations: int = 50,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Cluster scalar values into ``k`` centroids with Lloyd's algorithm.

    Args:
        values: any tensor; it is flattened.
        k: number of clusters (``>= 1``); fewer distinct values than ``k`` leave some clusters empty.
        init: ``"linear"``, ``"density"`` or ``"random"`` (see :func:`init_centroids`).
        iterations: maximum Lloyd iterations (stops earlier when the centroids stop moving).
        generator: random source for ``init="random"``.

    Returns:
        ``(centroids, assignments)``: sorted centroids of shape ``(k,)`` and the cluster of every value
        (``int64``, shape of the flattened input).

    Example::

        >>> centroids, assignments = kmeans_1d(torch.tensor([0.1, 0.2, 0.9, 1.0, 1.1]), 2)
        >>> centroids, assignments
        (tensor([0.1500, 1.0000]), tensor([0, 0, 1, 1, 1]))
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"`k={k!r}` must be a positive integer.")
    flat = values.detach().flatten().float()
    if flat.numel() == 0:
        return torch.zeros(k, device=flat.device), torch.zeros(0, dtype=torch.long, device=flat.device)
    centroids = init_centroids(flat, k, init, generator)
    for _ in range(iterations):
        assignments = _assign(flat, centroids)
        sums = torch.zeros(k, device=flat.device).index_add_(0, assignments, flat)
        counts = torch.bincount(assignments, minlength=k)
        updated = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
        # The means of neighbouring intervals stay ordered, but an empty cluster keeps its old value.
        updated = torch.sort(updated).values
        if torch.equal(updated, centroids):
            break
        centroids = updated
    return centroids, _assign(flat, centroids)


def share_weights(
    weight: Tensor,
    bits: int,
    *,
    init: str = "linear",
    iterations: int = 50,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Cluster the non-zero entries of ``weight`` into ``2**bits`` shared values; zeros (pruned) stay out.

    Returns:
        ``(codebook, indices, kept)``: the ``2**bits`` shared values, the codebook index of every entry
        (shape of ``weight``, 0 where pruned; ``uint8`` up to 8 bits, else ``int32``, which holds every index up
        to 16 bits) and the bool mask of the clustered entries.

    Example::

        >>> w = torch.tensor([[0.0, 0.11, -0.5], [0.09, 0.0, -0.52]])
        >>> codebook, indices, kept = share_weights(w, bits=1)
        >>> shared_tensor(codebook, indices, kept)
        tensor([[ 0.0000,  0.1000, -0.5100],
                [ 0.1000,  0.0000, -0.5100]])
    """
    kept = weight.detach() != 0
    centroids, assignments = kmeans_1d(
        weight.detach()[kept], 2**bits, init=init, iterations=iterations, generator=generator
    )
    dtype = torch.uint8 if bits <= 8 else torch.int32
    indices = torch.zeros(weight.shape, dtype=dtype)
    indices[kept.cpu()] = assignments.to(dtype).cpu()
    return centroids.to(weight.dtype), indices, kept.cpu()


def shared_tensor(codebook: Tensor, indices: Tensor, kept: Tensor) -> Tensor:
    """The weight a codebook and its indices stand for (zero where not kept).

    Example::

        >>> shared_tensor(torch.tensor([-1.0, 2.0]), torch.tensor([1, 0, 0], dtype=torch.uint8), torch.tensor([True, True, False]))
        tensor([ 2., -1.,  0.])
    """
    return torch.where(kept, codebook[indices.long()], torch.zeros((), dtype=codebook.dtype))


# -- Huffman coding --------------------------------------------------------------------------------------


def huffman_code_lengths(counts: Mapping[int, int]) -> dict[int, int]:
    """Code length of each symbol in an optimal prefix code for the given symbol counts.

    Example::

        >>> huffman_code_lengths({0: 5, 1: 2, 2: 1, 3: 1})
        {0: 1, 1: 2, 2: 3, 3: 3}
    """
    symbols = {s: c for s, c in counts.items() if c > 0}
    if not symbols:
        return {}
    if len(symbols) == 1:
        return {next(iter(symbols)): 1}
    # Heap of (count, tie-breaker, symbols in the subtree); merging adds one bit to each member.
    heap = [(count, symbol, [symbol]) for symbol, count in sorted(symbols.items())]
    heapq.heapify(heap)
    lengths = dict.fromkeys(symbols, 0)
    while len(heap) > 1:
        c1, t1, s1 = heapq.heappop(heap)
        c2, t2, s2 = heapq.heappop(heap)
        for symbol in s1 + s2:
            lengths[symbol] += 1
        heapq.heappush(heap, (c1 + c2, min(t1, t2), s1 + s2))
    return dict(sorted(lengths.items()))


def _canonical_codes(lengths: Mapping[int, int]) -> dict[int, int]:
    codes: dict[int, int] = {}
    code, previous = 0, 0
    for symbol, length in sorted(lengths.items(), key=lambda item: (item[1], item[0])):
        code <<= length - previous
        codes[symbol] = code
        code += 1
        previous = length
    return codes


def huffman_encode(symbols: Tensor | np.ndarray) -> tuple[bytes, dict[int, int]]:
    """Encode a stream of non-negative integer symbols with a canonical Huffman code.

    Returns:
        ``(data, lengths)``: the packed bit stream and the code length per symbol (which, with the number of
        symbols, is all a decoder needs for a canonical code).

    Example::

        >>> data, lengths = huffman_encode(torch.tensor([0, 0, 0, 0, 0, 1, 1, 2, 3]))
        >>> len(data), lengths  # 5*1 + 2*2 + 2*3 = 15 bits
        (2, {0: 1, 1: 2, 2: 3, 3: 3})
        >>> huffman_decode(data, lengths, 9).tolist()
        [0, 0, 0, 0, 0, 1, 1, 2, 3]
    """
    array = symbols.detach().cpu().numpy() if isinstance(symbols, Tensor) else np.asarray(symbols)
    array = array.astype(np.int64).ravel()
    if array.size == 0:
        return b"", {}
    values, counts = np.unique(array, return_counts=True)
    lengths = huffman_code_lengths(dict(zip(values.tolist(), counts.tolist(), strict=True)))
    codes = _canonical_codes(lengths)
    lookup_code = np.zeros(int(values.max()) + 1, dtype=np.int64)
    lookup_length = np.zeros(int(values.max()) + 1, dtype=np.int64)
    for symbol, length in lengths.items():
        lookup_code[symbol], lookup_length[symbol] = codes[symbol], length
    code, length = lookup_code[array], lookup_length[array]
    width = int(length.max())
    shifts = np.arange(width - 1, -1, -1)
    bits = (code[:, None] >> shifts) & 1
    used = np.arange(width)[None, :] >= (width - length)[:, None]
    return np.packbits(bits[used].astype(np.uint8)).tobytes(), lengths


def huffman_decode(data: bytes, lengths: Mapping[int, int], count: int) -> np.ndarray:
    """Decode ``count`` symbols written by :func:`huffman_encode` (for checks; not fast)."""
    codes = _canonical_codes(lengths)
    table = {(lengths[s], c): s for s, c in codes.items()}
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8))
    out, code, length, position = [], 0, 0, 0
    while len(out) < count:
        code, length = (code << 1) | int(bits[position]), length + 1
        position += 1
        symbol = table.get((length, code))
        if symbol is not None:
            out.append(symbol)
            code, length = 0, 0
    return np.asarray(out, dtype=np.int64)


def _huffman_bytes(symbols: np.ndarray) -> int:
    data, lengths = huffman_encode(symbols)
    # The decoder needs the code length of each symbol value: one byte per symbol, up to the largest.
    table = (max(lengths) + 1) if lengths else 0
    return len(data) + table


# -- storage accounting ------------------------------------------------------------------------------------


def relative_positions(kept: Tensor, index_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Deep Compression's sparse layout: the gap to the previous stored entry in ``index_bits`` bits.

    A gap larger than ``2**index_bits`` is bridged with filler entries (stored zeros).

    Returns:
        ``(gaps, is_filler)``: one entry per stored value (gaps in ``[1, 2**index_bits]``), fillers marked.

    Example::

        >>> gaps, fillers = relative_positions(torch.tensor([True, False, False, False, False, False, True]), 2)
        >>> gaps.tolist(), fillers.tolist()  # positions 0 and 6: a gap of 6 > 4 needs one filler
        ([1, 4, 2], [False, True, False])
    """
    positions = np.flatnonzero(kept.detach().cpu().numpy().ravel())
    limit = 2**index_bits
    gaps = np.diff(np.concatenate([[-1], positions]))
    fillers = np.maximum(0, (gaps - 1) // limit)
    total = len(gaps) + int(fillers.sum())
    out_gaps = np.empty(total, dtype=np.int64)
    out_filler = np.zeros(total, dtype=bool)
    position = 0
    for gap, extra in zip(gaps.tolist(), fillers.tolist(), strict=True):
        for _ in range(extra):
            out_gaps[position], out_filler[position] = limit, True
            position += 1
            gap -= limit
        out_gaps[position] = gap
        position += 1
    return out_gaps, out_filler


@dataclass(frozen=True)
class LayerStorage:
    """Bytes to store one weight at each Deep Compression stage.

    Args:
        numel: entries of the weight.
        nonzero: entries kept (not pruned).
        entries: values stored in the sparse layout (kept entries plus fillers).
        bits: bits per codebook index.
        index_bits: bits per relative position (0: stored dense).
        dense_bytes: fp32, dense.
        pruned_bytes: fp32 values of the kept entries plus their positions (or dense, if cheaper).
        shared_bytes: codebook indices plus positions plus the fp32 codebook.
        huffman_bytes: Huffman-coded indices and positions plus the codebook and code tables.
    """

    numel: int
    nonzero: int
    entries: int
    bits: int
    index_bits: int
    dense_bytes: int
    pruned_bytes: int
    shared_bytes: int
    huffman_bytes: int


def layer_storage(
    weight: Tensor, indices: Tensor | None = None, bits: int = 32, index_bits: int = 5
) -> LayerStorage:
    """Account the storage of one weight: dense, pruned (sparse), weight-shared and Huffman-coded.

    Args:
        weight: the weight (zeros are pruned entries).
        indices: codebook index of every entry (``None``: not shared, values stored as fp32).
        bits: bits per codebook index.
        index_bits: bits per relative position in the sparse layout.

    Example::

        >>> w = torch.zeros(1000)
        >>> w[::10] = torch.linspace(-1, 1, 100)
        >>> codebook, indices, kept = share_weights(w, bits=2)
        >>> s = layer_storage(shared_tensor(codebook, indices, kept), indices, bits=2, index_bits=4)
        >>> s.dense_bytes, s.pruned_bytes, s.entries
        (4000, 450, 100)
        >>> s.shared_bytes  # 100 * (2 + 4) bits + 4 fp32 centroids
        91
    """
    kept = weight.detach() != 0
    numel, nonzero = weight.numel(), int(kept.sum())
    dense = numel * 4
    if indices is None:
        codes = np.zeros(0, dtype=np.int64)
        codebook = 0
    else:
        codes = indices.detach().cpu().numpy().astype(np.int64).ravel()
        codebook = 2**bits * 4
    sparse = index_bits > 0 and nonzero < numel
    if sparse:
        gaps, fillers = relative_positions(kept, index_bits)
        entries = len(gaps)
        symbols = np.full(entries, 2**bits, dtype=np.int64)  # fillers: one more symbol, the zero
        if indices is not None:
            symbols[~fillers] = codes[np.flatnonzero(kept.cpu().numpy().ravel())]
        symbol_bits = bits if not fillers.any() else math.ceil(math.log2(2**bits + 1))
        pruned = math.ceil(entries * (32 + index_bits) / 8)
        shared = math.ceil(entries * (symbol_bits + index_bits) / 8) + codebook
        huffman = _huffman_bytes(symbols) + _huffman_bytes(gaps - 1) + codebook
        if pruned >= dense:  # a barely pruned weight is cheaper dense
            sparse = False
    if not sparse:
        entries = numel
        pruned = dense
        shared = math.ceil(numel * bits / 8) + codebook if indices is not None else dense
        huffman = _huffman_bytes(codes) + codebook if indices is not None else dense
    return LayerStorage(
        numel=numel,
        nonzero=nonzero,
        entries=entries,
        bits=bits if indices is not None else 32,
        index_bits=index_bits if sparse else 0,
        dense_bytes=dense,
        pruned_bytes=pruned,
        shared_bytes=shared,
        huffman_bytes=huffman,
    )


# -- the whole model -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WeightSharingConfig:
    """What weight sharing does to a model: which layers, how many shared values, how they are found.

    Args:
        bits: bits per shared-value index (``2**bits`` clusters per weight), 1 to 16.
        modules: layers to share (types and/or name patterns).
        exclude: layers to leave alone.
        min_params: leave out layers with fewer parameters.
        init: centroid initialization: ``"linear"``, ``"density"`` or ``"random"`` (see :func:`init_centroids`).
        index_bits: bits per relative position in the sparse storage layout, 1 to 16.
        iterations: maximum k-means iterations.
        seed: seed of ``init="random"``.

    Example::

        >>> WeightSharingConfig(bits=4, modules=nn.Linear).selection
        ModuleSelection(modules=<class 'torch.nn.modules.linear.Linear'>, exclude=None, min_params=0)
        >>> WeightSharingConfig(init="kmeans++")
        Traceback (most recent call last):
        ...
        ValueError: Unknown `init='kmeans++'`. Use one of 'linear', 'density', 'random'.
    """

    bits: int = 5
    modules: Selector = (nn.Conv2d, nn.Linear)
    exclude: Selector = None
    min_params: int = 0
    init: str = "linear"
    index_bits: int = 5
    iterations: int = 50
    seed: int = 0
    selection: ModuleSelection = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _checks.check_sharing_bits(self.bits)
        object.__setattr__(self, "selection", ModuleSelection(self.modules, self.exclude, self.min_params))
        _checks.check_choice(self.init, "init", INITS)
        _checks.check_index_bits(self.index_bits)
        _checks.check_iterations(self.iterations)
        _checks.check_seed(self.seed)


def weight_parameters(model: nn.Module, selection: ModuleSelection) -> dict[str, nn.Parameter]:
    """The ``weight`` parameters of the selected layers, by the name ``named_parameters`` gives them.

    A weight tied to another layer's (an embedding reused by the output layer) is one tensor: it is listed once,
    under its first name, whichever of its layers was selected.

    Example::

        >>> model = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 5, bias=False))
        >>> model[1].weight = model[0].weight
        >>> list(weight_parameters(model, ModuleSelection(nn.Linear)))
        ['0.weight']
    """
    first_names = {id(p): n for n, p in model.named_parameters()}
    params: dict[str, nn.Parameter] = {}
    for name, module in selection.select(model):
        weight = getattr(module, "weight", None)
        if isinstance(weight, nn.Parameter):
            params[first_names.get(id(weight), f"{name}.weight")] = weight
    if not params:
        raise ValueError(f"The selection {selection} has no `weight` parameter to share.")
    return params


@dataclass
class SharedWeights:
    """The clusters of shared weights: per weight name, its codebook, the codebook index of every entry and the
    mask of the clustered (non-zero) entries; and how to keep the weights on them while they train.

    Per-cluster sums are taken in float64: the mean of identical float32 members is then exactly their value, so
    setting shared weights back to their cluster (:meth:`snap_`) changes nothing and a resumed run continues bit
    for bit.

    Args:
        bits: bits per index (``2**bits`` entries per codebook).
        codebooks: the shared values of each weight.
        indices: the codebook index of every entry of each weight (0 where pruned).
        kept: the clustered entries of each weight.
        quantization_error: relative L2 change of the weights at clustering.
    """

    bits: int
    codebooks: dict[str, Tensor] = field(default_factory=dict)
    indices: dict[str, Tensor] = field(default_factory=dict)
    kept: dict[str, Tensor] = field(default_factory=dict)
    quantization_error: float | None = None

    def _members(self, name: str, device: torch.device) -> tuple[Tensor, Tensor]:
        return self.indices[name].to(device).long(), self.kept[name].to(device)

    def cluster_sums(self, name: str, values: Tensor) -> tuple[Tensor, Tensor]:
        """Per-cluster sum of ``values`` (shape of the weight) over the members (float64), and the member counts."""
        index, kept = self._members(name, values.device)
        members = index[kept]
        sums = torch.zeros(2**self.bits, dtype=torch.float64, device=values.device)
        sums.index_add_(0, members, values[kept].double())
        return sums, torch.bincount(members, minlength=2**self.bits)

    def spread(self, name: str, per_cluster: Tensor) -> Tensor:
        """A tensor of the weight's shape holding each entry's cluster value (zero where not kept)."""
        index, kept = self._members(name, per_cluster.device)
        zero = torch.zeros((), dtype=per_cluster.dtype, device=per_cluster.device)
        return torch.where(kept, per_cluster[index], zero)

    def snap_(self, params: Mapping[str, Tensor]) -> None:
        """Set every weight exactly to its cluster's value (the members' mean) and keep it as the codebook."""
        with torch.no_grad():
            for name, param in params.items():
                sums, counts = self.cluster_sums(name, param.detach())
                codebook = self.codebooks[name].to(param.device, param.dtype)
                codebook = torch.where(counts > 0, (sums / counts.clamp(min=1)).to(param.dtype), codebook)
                param.copy_(self.spread(name, codebook))
                self.codebooks[name] = codebook.cpu()

    def sum_gradients_(self, params: Mapping[str, Tensor]) -> None:
        """Give every member of a cluster the sum of its members' gradients: the gradient of the shared value."""
        with torch.no_grad():
            for name, param in params.items():
                if param.grad is not None:
                    sums = self.cluster_sums(name, param.grad)[0].to(param.grad.dtype)
                    param.grad.copy_(self.spread(name, sums))

    def merge_optimizer_state_(self, optimizer: torch.optim.Optimizer, params: Mapping[str, Tensor]) -> None:
        """Give the members of a cluster the mean of their optimizer state, so that they take identical steps."""
        for name, param in params.items():
            for value in optimizer.state.get(param, {}).values():
                if isinstance(value, Tensor) and value.shape == param.shape:
                    sums, counts = self.cluster_sums(name, value)
                    with torch.no_grad():
                        value.copy_(self.spread(name, (sums / counts.clamp(min=1)).to(value.dtype)))

    def storage_formats(self) -> dict[str, TensorFormat]:
        """Each shared weight at ``bits`` bits plus its ``2**bits``-entry fp32 codebook."""
        return {name: TensorFormat(bits=self.bits, codebook_entries=2**self.bits) for name in self.codebooks}


def cluster_weights(params: Mapping[str, Tensor], config: WeightSharingConfig) -> SharedWeights:
    """Cluster the non-zero entries of each weight into ``2**config.bits`` shared values (the weights are not
    changed: :meth:`SharedWeights.snap_` sets them)."""
    generator = torch.Generator().manual_seed(config.seed)
    shared = SharedWeights(config.bits)
    changed, norm = 0.0, 0.0
    for name, param in params.items():
        codebook, indices, kept = share_weights(
            param.detach().cpu(),
            config.bits,
            init=config.init,
            iterations=config.iterations,
            generator=generator,
        )
        values = shared_tensor(codebook, indices, kept).to(param.device)
        changed += float((values - param.detach()).float().norm() ** 2)
        norm += float(param.detach().float().norm() ** 2)
        shared.codebooks[name], shared.indices[name], shared.kept[name] = codebook, indices, kept
    shared.quantization_error = math.sqrt(changed / norm) if norm else 0.0
    return shared


def share_weights_(model: nn.Module, config: WeightSharingConfig) -> SharedWeights:
    """Replace the weights of the selected layers of ``model`` by their shared values, in place.

    Returns:
        The clusters (codebooks and indices) by weight name; zeros (pruned entries) stay zero.

    Example::

        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(32, 8))
        >>> shared = share_weights_(model, WeightSharingConfig(bits=3))
        >>> len(model[0].weight.unique()), shared.codebooks["0.weight"].numel()
        (8, 8)
        >>> torch.equal(model[0].weight, shared.codebooks["0.weight"][shared.indices["0.weight"].long()])
        True
    """
    params = weight_parameters(model, config.selection)
    shared = cluster_weights(params, config)
    shared.snap_(params)
    return shared


def storage_report(
    model: nn.Module, names: list[str] | Mapping[str, Any], shared: SharedWeights | None, index_bits: int = 5
) -> dict[str, Any]:
    """Bytes of the whole model at each Deep Compression stage, per layer and in total, and the ratios.

    ``names`` are the shared weights (names from ``named_parameters``); with ``shared=None`` (not clustered yet)
    they count as fp32 values. Every other parameter and buffer counts dense at its dtype; a tensor held under
    several names (tied weights) counts once.

    Example::

        >>> model = nn.Sequential(nn.Linear(100, 10, bias=False))
        >>> shared = share_weights_(model, WeightSharingConfig(bits=2))
        >>> report = storage_report(model, ["0.weight"], shared)
        >>> report["total"]["dense_bytes"], report["total"]["shared_bytes"]  # 1000 * 2 bits + 4 fp32 values
        (4000, 266)
    """
    params = dict(model.named_parameters())
    layers: dict[str, LayerStorage] = {}
    for name in names:
        weight = params[name].detach().cpu()
        indices = shared.indices.get(name) if shared is not None else None
        bits = shared.bits if shared is not None and shared.codebooks else 32
        layers[name] = layer_storage(weight, indices, bits, index_bits)
    seen = {id(params[name]) for name in names}
    other = 0
    for t in model.state_dict(keep_vars=True).values():
        if isinstance(t, Tensor) and id(t) not in seen:
            seen.add(id(t))
            other += t.numel() * t.element_size()
    stages = ("dense_bytes", "pruned_bytes", "shared_bytes", "huffman_bytes")
    total = {stage: other + sum(getattr(layer, stage) for layer in layers.values()) for stage in stages}
    dense = total["dense_bytes"]
    return {
        "layers": {name: asdict(layer) for name, layer in layers.items()},
        "total": total,
        "ratios": {stage.removesuffix("_bytes"): dense / total[stage] for stage in stages},
    }
