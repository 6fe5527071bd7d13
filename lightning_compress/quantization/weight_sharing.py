"""WeightSharing: k-means trained quantization of weights (Deep Compression), with real Huffman-coded sizes."""

from __future__ import annotations

import functools
import heapq
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from lightning_compress._events import record_event, watch_loss
from lightning_compress._lightning import forget_original, remember_original, resolve_step, set_up_in_order
from lightning_compress.schedules import Point, validate_point
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


# -- the callback ----------------------------------------------------------------------------------------


class WeightSharing(Callback):
    """Trained quantization by weight sharing (Gong et al. 2014; Han et al. 2016, "Deep Compression").

    At ``start`` the non-zero weights of every selected layer are clustered into ``2**bits`` shared values
    with 1-D k-means (linear initialization by default); pruned zeros stay out of the clusters and stay
    zero. From then on the shared values are fine-tuned: the gradient of each shared value is the sum of the
    gradients of its members (every member receives that sum, and the optimizer state of the members is
    merged at clustering time, so all members take the same step), and after every optimizer step each
    weight is set back exactly to its cluster's value. The weights always hold the shared values, so
    validation measures the weight-shared model and checkpoints load into the plain model.

    Storage (``storage_report``): per layer the indices at ``bits`` bits plus the fp32 codebook plus, for
    a pruned layer, Deep Compression's relative positions at ``index_bits`` bits (with fillers for long
    gaps); and the same streams Huffman-coded — the coded size is that of the actual bit streams, produced
    by :func:`huffman_encode`. Run it after pruning (e.g. ``GradualPruning`` ending before ``start``).

    Logged: ``weight_sharing/compression_ratio`` (dense fp32 bytes of the model / bytes with Huffman coding),
    ``weight_sharing/size_bytes``, ``weight_sharing/quantization_error`` (relative L2 change of the weights
    at clustering). :meth:`storage_formats` lets ``CompressionMonitor`` count the layers at ``bits`` bits
    plus their codebook.

    Args:
        bits: bits per shared-value index (``2**bits`` clusters), 1 to 16.
        start: when the weights are clustered (fraction of training, ``"step:N"`` or ``"epoch:N"``).
        modules: layers to share (types and/or name patterns).
        exclude: layers to leave alone.
        min_params: leave out layers with fewer parameters.
        init: centroid initialization: ``"linear"``, ``"density"`` or ``"random"``.
        index_bits: bits per relative position in the sparse storage layout, 1 to 16.
        iterations: maximum k-means iterations.
        seed: seed of ``init="random"``.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> sharing = WeightSharing(bits=5, start=0.5, modules=[nn.Linear])
        >>> trainer = Trainer(callbacks=[sharing], max_epochs=4, logger=False)
        >>> WeightSharing(bits=0)
        Traceback (most recent call last):
        ...
        ValueError: `bits=0` is out of range: weight sharing supports 1 to 16 bits (2 to 65,536 shared values).
    """

    def __init__(
        self,
        bits: int = 5,
        start: Point = 0.0,
        modules: Selector = (nn.Conv2d, nn.Linear),
        exclude: Selector = None,
        min_params: int = 0,
        init: str = "linear",
        index_bits: int = 5,
        iterations: int = 50,
        seed: int = 0,
    ) -> None:
        if isinstance(bits, bool) or not isinstance(bits, int):
            raise TypeError(f"`bits={bits!r}` must be an integer.")
        if not 1 <= bits <= 16:
            raise ValueError(
                f"`bits={bits}` is out of range: weight sharing supports 1 to 16 bits (2 to 65,536 shared values)."
            )
        if isinstance(index_bits, bool) or not isinstance(index_bits, int) or not 1 <= index_bits <= 16:
            raise ValueError(f"`index_bits={index_bits!r}` must be an integer from 1 to 16.")
        if init not in INITS:
            raise ValueError(f"Unknown `init={init!r}`. Use one of {', '.join(map(repr, INITS))}.")
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
            raise ValueError(f"`iterations={iterations!r}` must be a positive integer.")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"`seed={seed!r}` must be a non-negative integer (the seed of `init='random'`).")
        self.bits = bits
        self.start = validate_point(start, "start")
        self.selection = ModuleSelection(modules, exclude, min_params)
        self.init = init
        self.index_bits = index_bits
        self.iterations = iterations
        self.seed = seed

        self.codebooks: dict[str, Tensor] = {}
        self.indices: dict[str, Tensor] = {}
        self.kept: dict[str, Tensor] = {}
        self.quantization_error: float | None = None
        self._start_step = 0
        self._params: dict[str, nn.Parameter] = {}
        self._hooks: list[Any] = []

    @functools.cached_property
    def state_key(self) -> str:  # Lightning reads it at every hook call: computed once
        return self._generate_state_key(bits=self.bits, modules=str(self.selection))

    @property
    def clustered(self) -> bool:
        """Whether the weights have been clustered."""
        return bool(self.codebooks)

    # -- lifecycle -----------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if set_up_in_order(self, trainer, pl_module, stage) or stage != "fit":
            return
        remember_original(trainer, pl_module)
        watch_loss(trainer)
        # A weight tied to another layer's (an embedding reused by the output layer) is one tensor: it is
        # clustered once, under the name `named_parameters` gives it, whichever of its layers was selected.
        first_names = {id(p): n for n, p in pl_module.named_parameters()}
        self._params = {}
        for name, module in self.selection.select(pl_module):
            weight = getattr(module, "weight", None)
            if isinstance(weight, nn.Parameter):
                self._params[first_names.get(id(weight), f"{name}.weight")] = weight
        if not self._params:
            raise ValueError(f"The selection {self.selection} has no `weight` parameter to share.")
        self._start_step = resolve_step(trainer, self.start, "start")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()
        params = set(self._params.values())
        for optimizer in trainer.optimizers:
            if any(p in params for group in optimizer.param_groups for p in group["params"]):
                self._hooks.append(optimizer.register_step_post_hook(self._after_optimizer_step))
        if self.clustered:
            self._snap()  # resumed: keep the loaded weights exactly on their shared values

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self.clustered and trainer.global_step >= self._start_step:
            self._cluster(trainer, pl_module)

    def _cluster(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        generator = torch.Generator().manual_seed(self.seed)
        changed, norm = 0.0, 0.0
        for name, param in self._params.items():
            codebook, indices, kept = share_weights(
                param.detach().cpu(),
                self.bits,
                init=self.init,
                iterations=self.iterations,
                generator=generator,
            )
            shared = shared_tensor(codebook, indices, kept).to(param.device)
            changed += float((shared - param.detach()).float().norm() ** 2)
            norm += float(param.detach().float().norm() ** 2)
            self.codebooks[name], self.indices[name], self.kept[name] = codebook, indices, kept
        # Every rank must hold the same clusters; rank zero decides (the weights are equal under DDP anyway).
        state = trainer.strategy.broadcast((self.codebooks, self.indices, self.kept), src=0)
        self.codebooks, self.indices, self.kept = state
        self.quantization_error = math.sqrt(changed / norm) if norm else 0.0
        self._merge_optimizer_state(trainer)
        self._snap()
        record_event(trainer, self, f"weights clustered into {2**self.bits} shared values")
        rank_zero_info(
            f"WeightSharing clustered {len(self._params)} weights into {2**self.bits} shared values each "
            f"(relative change {self.quantization_error:.3g})."
        )

    def _members(self, name: str, device: torch.device) -> tuple[Tensor, Tensor]:
        return self.indices[name].to(device).long(), self.kept[name].to(device)

    def _cluster_sums(self, name: str, values: Tensor) -> tuple[Tensor, Tensor]:
        """Per-cluster sum of ``values`` (shape of the weight) over the members, and the member counts.

        Summed in float64: the mean of identical float32 members is then exactly their value, so snapping
        shared weights back to their cluster changes nothing (and a resumed run continues bit for bit).
        """
        index, kept = self._members(name, values.device)
        members = index[kept]
        sums = torch.zeros(2**self.bits, dtype=torch.float64, device=values.device)
        sums.index_add_(0, members, values[kept].double())
        return sums, torch.bincount(members, minlength=2**self.bits)

    def _spread(self, name: str, per_cluster: Tensor) -> Tensor:
        index, kept = self._members(name, per_cluster.device)
        return torch.where(
            kept, per_cluster[index], torch.zeros((), dtype=per_cluster.dtype, device=per_cluster.device)
        )

    def _merge_optimizer_state(self, trainer: pl.Trainer) -> None:
        # Members of a cluster must take identical steps from now on: give them identical optimizer state.
        for optimizer in trainer.optimizers:
            for name, param in self._params.items():
                for value in optimizer.state.get(param, {}).values():
                    if isinstance(value, Tensor) and value.shape == param.shape:
                        sums, counts = self._cluster_sums(name, value)
                        with torch.no_grad():
                            value.copy_(self._spread(name, (sums / counts.clamp(min=1)).to(value.dtype)))

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if not self.clustered:
            return
        with torch.no_grad():
            for name, param in self._params.items():
                if param.grad is not None:
                    # The gradient of a shared value is the sum over its members; every member gets it.
                    sums = self._cluster_sums(name, param.grad)[0].to(param.grad.dtype)
                    param.grad.copy_(self._spread(name, sums))

    def _after_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self.clustered:
            self._snap()

    def _snap(self) -> None:
        """Set every weight exactly to its cluster's value (the members' mean) and keep it as the codebook."""
        with torch.no_grad():
            for name, param in self._params.items():
                sums, counts = self._cluster_sums(name, param.detach())
                codebook = self.codebooks[name].to(param.device, param.dtype)
                codebook = torch.where(counts > 0, (sums / counts.clamp(min=1)).to(param.dtype), codebook)
                param.copy_(self._spread(name, codebook))
                self.codebooks[name] = codebook.cpu()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.quantization_error is not None:
            pl_module.log(
                "weight_sharing/quantization_error", self.quantization_error, on_step=True, on_epoch=False
            )

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.clustered:
            return
        report = self.storage_report(pl_module)
        pl_module.log(
            "weight_sharing/compression_ratio", report["ratios"]["huffman"], on_step=False, on_epoch=True
        )
        pl_module.log(
            "weight_sharing/size_bytes", float(report["total"]["huffman_bytes"]), on_step=False, on_epoch=True
        )

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            forget_original(trainer)  # the next fit takes a fresh copy of its own model
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    # -- reporting -----------------------------------------------------------------------------------

    def storage_formats(self, pl_module: pl.LightningModule) -> dict[str, TensorFormat]:
        """Shared weights at ``bits`` bits plus their ``2**bits``-entry fp32 codebook."""
        if not self.clustered:
            return {}
        return {name: TensorFormat(bits=self.bits, codebook_entries=2**self.bits) for name in self.codebooks}

    def storage_report(self, pl_module: nn.Module) -> dict[str, Any]:
        """Bytes of the whole model at each Deep Compression stage, per layer and in total, and the ratios.

        Every parameter and buffer that is not a shared weight counts as fp32 (or its dtype), dense; a tensor
        held under several names (tied weights) counts once.
        """
        layers: dict[str, LayerStorage] = {}
        params = dict(pl_module.named_parameters())
        for name in self._params:
            weight = params[name].detach().cpu()
            layers[name] = layer_storage(
                weight, self.indices.get(name), self.bits if self.clustered else 32, self.index_bits
            )
        seen = {id(p) for p in self._params.values()}
        other = 0
        for t in pl_module.state_dict(keep_vars=True).values():
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

    # -- checkpoints ---------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "bits": self.bits,
            "codebooks": self.codebooks,
            "indices": self.indices,
            "kept": self.kept,
            "quantization_error": self.quantization_error,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("bits", self.bits) != self.bits:
            raise ValueError(
                f"The checkpoint was written by WeightSharing(bits={state_dict['bits']}); this callback has bits={self.bits}."
            )
        self.codebooks = dict(state_dict["codebooks"])
        self.indices = dict(state_dict["indices"])
        self.kept = dict(state_dict["kept"])
        self.quantization_error = state_dict.get("quantization_error")
