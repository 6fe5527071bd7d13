"""Activation-aware pruning in plain torch: what a layer's inputs look like, and two criteria that use it.

A weight is read as a matrix ``(out, columns)``: a Linear's ``(out, in)``, a Conv2d's ``(out, in·kh·kw)`` (each
column multiplies one input channel at one kernel position, the im2col layout). :func:`collect_statistics` runs a
model on calibration inputs and sums, per column, the squared inputs (``Σ x_j²``) and optionally the Gram matrix
``H = Σ x xᵀ``. Then:

- :func:`wanda_mask` (Wanda, Sun et al. 2023) scores ``|W_ij| · ‖X_j‖₂`` and prunes the lowest scores within each
  output row (unstructured) or within each group of M weights (N:M): a small weight on an input with large
  activations matters more than its magnitude says.
- :func:`sparsegpt_prune` (SparseGPT, Frantar & Alistarh 2023) prunes column by column, choosing by
  ``w² / [H⁻¹]_cc²`` and moving each pruned weight's error onto the weights not yet visited (the optimal brain
  surgeon update), so that the layer's outputs on the calibration inputs change as little as possible. It returns
  new weights, not only a mask.

Masks are bool tensors of the weight's shape, ``True`` = keep; entries a ``previous`` mask pruned stay pruned.

Example::

    >>> wanda_mask(torch.ones(2, 4), torch.tensor([8.0, 1.0, 2.0, 0.5]), 0.5)  # equal weights: the inputs decide
    tensor([[ True, False,  True, False],
            [ True, False,  True, False]])
    >>> _ = torch.manual_seed(0)
    >>> x = torch.randn(256, 8) @ torch.randn(8, 8)
    >>> w = torch.randn(4, 8)
    >>> new, mask = sparsegpt_prune(w, x.T @ x, 0.5)
    >>> int((new == 0).sum()), bool((new[mask] != w[mask]).any())  # half pruned, kept weights adjusted
    (16, True)
"""

from __future__ import annotations

import copy
import itertools
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_compress._inputs import (
    call_module,
    check_default_input,
    detach_input,
    first_batches,
    first_input,
    to_device,
)
from lightning_compress._positions import PositionFilter
from lightning_compress.pruning.masks import _kept_after_pruning, nm_keep
from lightning_compress.stats import _eval_mode

CALIBRATED_CRITERIA = ("wanda", "sparsegpt")
LAYER_TYPES = (nn.Linear, nn.Conv2d, nn.MultiheadAttention)
# The arguments of nn.MultiheadAttention.forward whose rows the thirds of its packed `in_proj_weight` multiply.
ATTENTION_INPUTS = ("query", "key", "value")


@dataclass
class ColumnStatistics:
    """Sums over calibration rows of the inputs that multiply each column of a layer's weight.

    A grouped convolution has one set per group (its groups see different input channels), and so has the packed
    input projection of an ``nn.MultiheadAttention`` (``in_proj_weight``, ``(3·embed_dim, embed_dim)``): its query,
    key and value thirds multiply the ``query``, ``key`` and ``value`` arguments, which differ in cross-attention.

    Attributes:
        sq_sum: ``Σ x_j²`` per column, shape ``(groups, columns)``, float32.
        gram: ``Σ x xᵀ``, shape ``(groups, columns, columns)``, float32; ``None`` when not collected.
        count: rows summed (Linear: inputs; Conv2d: inputs times output positions; attention: query rows).

    Example::

        >>> stats = ColumnStatistics.empty(nn.Linear(2, 3), gram=True)
        >>> stats.update(torch.tensor([[[1.0, 2.0]], [[3.0, -4.0]]]))
        >>> stats.sq_sum.tolist(), stats.gram.tolist(), stats.count
        ([[10.0, 20.0]], [[[10.0, -10.0], [-10.0, 20.0]]], 2)
        >>> stats.norms.tolist()
        [[3.1622776985168457, 4.4721360206604]]
    """

    sq_sum: Tensor
    gram: Tensor | None = None
    count: int = 0

    @classmethod
    def empty(cls, layer: nn.Module, gram: bool = False, device: Any = None) -> ColumnStatistics:
        """Zeros for ``layer`` (an ``nn.Linear``, ``nn.Conv2d`` or ``nn.MultiheadAttention``), on ``device``
        (default: the weight's)."""
        groups, columns = layer_shape(layer)
        weight = layer.in_proj_weight if isinstance(layer, nn.MultiheadAttention) else layer.weight
        zeros = {"dtype": torch.float32, "device": device if device is not None else weight.device}
        return cls(
            torch.zeros(groups, columns, **zeros),
            torch.zeros(groups, columns, columns, **zeros) if gram else None,
        )

    def update(self, columns: Tensor, group: int | None = None) -> None:
        """Add rows shaped ``(rows, groups, columns)`` (see :func:`layer_columns`); or, with ``group``, rows
        ``(rows, columns)`` to that group alone (rows are counted for group 0)."""
        x = columns.detach().to(self.sq_sum.dtype)
        if group is not None:
            self.sq_sum[group] += (x * x).sum(0)
            if self.gram is not None:
                self.gram[group] += x.T @ x
            self.count += x.shape[0] if group == 0 else 0
            return
        self.sq_sum += (x * x).sum(0)
        if self.gram is not None:
            grouped = x.transpose(0, 1)  # (groups, rows, columns)
            self.gram += grouped.transpose(1, 2) @ grouped
        self.count += x.shape[0]

    def update_attention(self, query: Tensor, key: Tensor, value: Tensor) -> None:
        """Add the inputs of an ``nn.MultiheadAttention``'s packed input projection: each third of its rows (the
        query, key and value projections) sees its own argument."""
        columns = self.sq_sum.shape[-1]
        parts = [t.reshape(-1, columns) for t in (query, key, value)]
        if query is key and key is value:  # self-attention: one tensor, its sums shared by the three thirds
            x = parts[0].detach().to(self.sq_sum.dtype)
            self.sq_sum += (x * x).sum(0)
            if self.gram is not None:
                self.gram += x.T @ x
            self.count += x.shape[0]
            return
        for group, part in enumerate(parts):
            self.update(part, group)

    @property
    def norms(self) -> Tensor:
        """``‖X_j‖₂`` per column, ``(groups, columns)``: Wanda's input norms. A layer that never ran gets ones
        (its scores are then the magnitudes)."""
        return self.sq_sum.sqrt() if self.count else torch.ones_like(self.sq_sum)

    @property
    def hessian(self) -> Tensor:
        """The Gram matrix SparseGPT works from, ``(groups, columns, columns)``. A layer that never ran gets the
        identity (SparseGPT then prunes by magnitude and moves nothing)."""
        if self.gram is None:
            raise ValueError("No Gram matrix was collected: call `collect_statistics(..., gram=True)`.")
        if self.count:
            return self.gram
        eye = torch.eye(self.gram.shape[-1], dtype=self.gram.dtype, device=self.gram.device)
        return eye.expand_as(self.gram).clone()


def layer_shape(layer: nn.Module) -> tuple[int, int]:
    """``(groups, columns)`` of a layer's weight seen as a matrix: columns per output row.

    Example::

        >>> layer_shape(nn.Linear(4, 2)), layer_shape(nn.Conv2d(8, 8, 3, groups=2))
        ((1, 4), (2, 36))
        >>> layer_shape(nn.MultiheadAttention(8, 2))  # the packed input projection: query, key, value thirds
        (3, 8)
    """
    if isinstance(layer, nn.Linear):
        return 1, layer.in_features
    if isinstance(layer, nn.Conv2d):
        return layer.groups, layer.weight[0].numel()
    if isinstance(layer, nn.MultiheadAttention):
        if layer.in_proj_weight is None:
            raise TypeError(
                "Input statistics of nn.MultiheadAttention are collected for its packed `in_proj_weight`; this one "
                "has separate q/k/v projections (`kdim`/`vdim` differ from `embed_dim`)."
            )
        return 3, layer.embed_dim
    raise TypeError(
        f"Input statistics are collected for nn.Linear, nn.Conv2d and nn.MultiheadAttention, not "
        f"{type(layer).__name__}."
    )


def attention_inputs(args: tuple, kwargs: Mapping[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
    """The ``query``, ``key`` and ``value`` of a call of ``nn.MultiheadAttention``, given positionally or by
    keyword (as a forward pre-hook with kwargs sees them).

    Example::

        >>> q, k = torch.zeros(1), torch.ones(1)
        >>> attention_inputs((q,), {"key": k, "value": k})[1] is k
        True
    """
    given = dict(zip(ATTENTION_INPUTS, args, strict=False))
    given.update({name: kwargs[name] for name in ATTENTION_INPUTS if name in kwargs})
    return given["query"], given["key"], given["value"]


def layer_columns(layer: nn.Module, inputs: Tensor) -> Tensor:
    """The inputs each column of ``layer``'s weight multiplies, shaped ``(rows, groups, columns)``.

    Linear: one row per input vector. Conv2d: one row per sample and output position, the receptive field
    unfolded in the weight's ``(in, kh, kw)`` order (padding, stride, dilation and ``padding_mode`` as the layer
    applies them), so that ``conv(x)`` equals ``columns @ weight.reshape(out, -1).T`` plus the bias.

    Example::

        >>> conv = nn.Conv2d(2, 4, 3, padding=1)
        >>> x = torch.randn(5, 2, 6, 6)
        >>> cols = layer_columns(conv, x)
        >>> tuple(cols.shape)
        (180, 1, 18)
        >>> out = (cols[:, 0] @ conv.weight.reshape(4, -1).T + conv.bias).reshape(5, 36, 4).permute(0, 2, 1)
        >>> torch.allclose(out.reshape(5, 4, 6, 6), conv(x), atol=1e-5)
        True
    """
    if isinstance(layer, nn.Linear):
        return inputs.reshape(-1, 1, layer.in_features)
    if not isinstance(layer, nn.Conv2d):
        layer_shape(layer)  # raises the error that names the type
    x = inputs if inputs.dim() == 4 else inputs.unsqueeze(0)
    if isinstance(layer.padding, str):
        pads: list[int] = []
        for k, d in zip(reversed(layer.kernel_size), reversed(layer.dilation), strict=True):
            total = d * (k - 1) if layer.padding == "same" else 0
            pads += [total // 2, total - total // 2]  # torch pads an odd remainder on the right/bottom
    else:
        pads = [p for p in reversed(layer.padding) for _ in (0, 1)]
    if any(pads):
        mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
        x = F.pad(x, pads, mode=mode)
    patches = F.unfold(x, layer.kernel_size, layer.dilation, 0, layer.stride)  # (N, in·kh·kw, positions)
    groups, columns = layer_shape(layer)
    return patches.transpose(1, 2).reshape(-1, groups, columns)


def attention_heads_output(module: nn.MultiheadAttention, args: tuple, kwargs: Mapping[str, Any]) -> Tensor:
    """The input of ``module.out_proj`` in the call ``module(*args, **kwargs)``: the heads' outputs, concatenated.

    Computed by a copy of the module (sharing its parameters, without its hooks) whose output projection is the
    identity; the module itself is not changed.

    Example::

        >>> _ = torch.manual_seed(0)
        >>> attn = nn.MultiheadAttention(8, 2, batch_first=True).eval()
        >>> x = torch.randn(2, 3, 8)
        >>> heads = attention_heads_output(attn, (x, x, x), {})
        >>> torch.allclose(attn.out_proj(heads), attn(x, x, x)[0], atol=1e-6)
        True
    """
    probe = copy.copy(module)
    for hooks in (
        "_forward_hooks",
        "_forward_hooks_with_kwargs",
        "_forward_hooks_always_called",
        "_forward_pre_hooks",
        "_forward_pre_hooks_with_kwargs",
    ):
        setattr(probe, hooks, OrderedDict())
    weight = module.out_proj.weight
    identity = nn.Linear(weight.shape[1], weight.shape[1], device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        identity.weight.copy_(torch.eye(weight.shape[1], dtype=weight.dtype, device=weight.device))
        identity.bias.zero_()
    probe._modules = {**module._modules, "out_proj": identity}
    return probe(*args, **{**kwargs, "need_weights": False})[0]


def calibration_inputs(
    batches: Iterable[Any],
    calibration_input: Callable[[Any], Any] | None,
    default: Callable[[Any], Any] | None = None,
) -> Iterator[Any]:
    """The model inputs of ``batches``: each mapped by ``calibration_input``, else by ``default``, else as it is.

    Example::

        >>> list(calibration_inputs([{"x": 1}, {"x": 2}], lambda batch: batch["x"]))
        [1, 2]
    """
    mapping = calibration_input or default
    return (mapping(batch) if mapping is not None else batch for batch in batches)


def check_calibration_input(
    model: nn.Module,
    loader: Iterable[Any] | None,
    config: Any,
    layers: Mapping[str, Sequence[nn.Module]] | None = None,
) -> None:
    """Run ``model`` once (eval mode, no gradients) on two samples of the input of the first batch of ``loader``
    (drawn without moving any random state), as calibration will (``config.calibration_input``, default the batch's
    first element), so that an input it rejects fails before training, naming ``calibration_input``; with
    ``config.calibration_mask``, once more collecting the statistics of ``layers`` (``{name: modules}``), so that a
    mask that does not fit fails too, naming ``calibration_mask``. Nothing to do without batches or for a
    criterion that needs none.

    Example::

        >>> from lightning_compress.pruning import PruningConfig
        >>> config = PruningConfig(amount=0.5, criterion="wanda", calibration_input=lambda batch: batch["x"])
        >>> check_calibration_input(nn.Linear(4, 2), [{"x": torch.ones(8, 4)}], config)
        >>> check_calibration_input(nn.Linear(4, 2), [{"x": torch.ones(8, 3)}], config)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: `criterion='wanda'` runs the model on training batches to calibrate, and the model rejected ...
    """
    batches = first_batches(loader) if config.calibrated else []
    if not batches:
        return
    if config.calibration_input is None:
        check_default_input(model, batches[0])
    try:
        example = next(calibration_inputs(batches[:1], config.calibration_input, first_input))
        device = next(model.parameters(), torch.empty(0)).device
        example = to_device(detach_input(example, max_batch=2), device)
        with torch.no_grad(), _eval_mode([model]):
            call_module(model, example)
    except Exception as err:
        source = (
            "`calibration_input(batch)`"
            if config.calibration_input is not None
            else "the batch's first element"
        )
        raise ValueError(
            f"`criterion={config.criterion!r}` runs the model on training batches to calibrate, and the model rejected "
            f"the input taken from the first one ({source}): {type(err).__name__}: {err}. Pass `calibration_input`, "
            "a function from a training batch to the model's input, e.g. `calibration_input=lambda batch: "
            "{'input_ids': batch['input_ids'], 'attention_mask': batch['attention_mask']}`."
        ) from err
    if config.calibration_mask is not None and layers:
        collect_statistics(model, layers, [example], positions=config.calibration_mask)


def collect_statistics(
    model: nn.Module,
    layers: Mapping[str, Sequence[nn.Module]],
    inputs: Iterable[Any],
    *,
    gram: bool = False,
    batches: int | None = None,
    reduce: Callable[[Tensor], Tensor] | None = None,
    positions: Callable[[Any], Any] | None = None,
) -> dict[str, ColumnStatistics]:
    """Run ``model`` on ``inputs`` and sum the inputs of ``layers`` per weight column.

    The model runs in eval mode under ``torch.no_grad()`` (each submodule's mode is restored after); forward
    pre-hooks record the inputs and are removed after, also on an error.

    Args:
        model: the model to run.
        layers: ``{name: modules}``: the ``nn.Linear``/``nn.Conv2d`` layers whose inputs are summed under one name
            (several modules sharing one weight sum into one entry), or ``nn.MultiheadAttention`` modules, whose
            packed input projection is summed per third from the ``query``, ``key`` and ``value`` arguments.
        inputs: model inputs (a tensor, a tuple of positional arguments or a dict of keyword arguments), moved to
            the model's device.
        gram: also sum the Gram matrix ``Σ x xᵀ`` (SparseGPT; ``columns²`` floats per layer).
        batches: use at most this many inputs (``None``: all).
        reduce: sums a tensor over processes (e.g. ``lambda t: trainer.strategy.reduce(t, reduce_op="sum")``), so
            that processes that ran different inputs end with the statistics of all of them.
        positions: a function from a model input to a boolean ``(batch, positions)`` mask, ``calibration_mask``:
            the layers' inputs count only at the positions it keeps, e.g. not the padding. How each input holds
            the positions (batch or positions first, or flattened; an attention's ``query`` and heads' outputs,
            its ``key``/``value`` counting whole unless they are the ``query``) is seen on one sample of the first
            input, run once more before it (:class:`~lightning_compress._positions.PositionFilter`); an input with
            none of these layouts (a pooled ``(batch, features)``) counts whole. A ``ValueError`` when no layer
            input holds the positions.

    Returns:
        ``{name: ColumnStatistics}``.

    Example::

        >>> model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> stats = collect_statistics(model, {"0": [model[0]]}, [torch.ones(5, 3), torch.ones(2, 3)])
        >>> stats["0"].sq_sum.tolist(), stats["0"].count
        ([[7.0, 7.0, 7.0]], 7)
    """
    device = next(itertools.chain(model.parameters(), model.buffers()), torch.empty(0)).device
    stats = {name: ColumnStatistics.empty(modules[0], gram) for name, modules in layers.items()}
    for name, modules in layers.items():
        for module in modules:
            if layer_shape(module) != tuple(stats[name].sq_sum.shape):
                raise ValueError(f"The layers under {name!r} have weights of different shapes.")

    # With `positions`, the model first runs on one sample of the first input (counting nothing) to see how each
    # layer input holds the positions; the mask then applies to each as laid out.
    filter_ = PositionFilter(positions)

    def record(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            target = stats[name].sq_sum.device
            if isinstance(module, nn.MultiheadAttention):
                # Self-attention passes one tensor three times: it stays one (`.to` returns it when already there).
                query, key, value = (t.to(target) for t in attention_inputs(args, kwargs))
                rows = filter_.rows(
                    (name, id(module), "query"), query
                )  # another sequence (key, value) counts whole
                if rows is not None:
                    key, value = (rows if t is query else t for t in (key, value))
                    stats[name].update_attention(rows, key, value)
                return
            x = args[0] if args else next(iter(kwargs.values()))
            rows = (
                filter_.rows((name, id(module), "input"), x)
                if isinstance(module, nn.Linear)
                else filter_.whole(x)
            )
            if rows is not None:
                stats[name].update(layer_columns(module, rows.to(target)))

        return hook

    # An nn.MultiheadAttention multiplies its `out_proj` weight without calling `out_proj`: the inputs of that
    # Linear (the heads' outputs, concatenated) are recomputed from the attention module's own call.
    owners = {
        id(m.out_proj): m for m in model.modules() if isinstance(m, nn.MultiheadAttention) and m is not model
    }
    if isinstance(model, nn.MultiheadAttention):
        owners[id(model.out_proj)] = model

    def record_output_projection(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            heads = filter_.rows((name, id(module), "heads"), attention_heads_output(module, args, kwargs))
            if heads is not None:
                stats[name].update(heads.reshape(-1, 1, heads.shape[-1]).to(stats[name].sq_sum.device))

        return hook

    handles = [
        owners[id(module)].register_forward_hook(record_output_projection(name), with_kwargs=True)
        if id(module) in owners
        else module.register_forward_pre_hook(record(name), with_kwargs=True)
        for name, modules in layers.items()
        for module in modules
    ]
    seen = 0
    try:
        with torch.no_grad(), _eval_mode([model]):
            for x in itertools.islice(inputs, batches):
                filter_.run(partial(call_module, model), to_device(x, device))
                seen += 1
    finally:
        for handle in handles:
            handle.remove()
    if reduce is not None:
        counts = reduce(
            torch.tensor([seen] + [s.count for s in stats.values()], dtype=torch.float64, device=device)
        )
        seen = int(counts[0])
        for s, count in zip(stats.values(), counts[1:].tolist(), strict=True):
            s.count = int(count)
            s.sq_sum = reduce(s.sq_sum)
            s.gram = None if s.gram is None else reduce(s.gram)
    if seen == 0:
        raise ValueError(
            "No calibration inputs: activation-aware pruning runs the model on some (e.g. the first batches of "
            "the training data) to see what each layer's inputs look like."
        )
    return stats


# -- Wanda ----------------------------------------------------------------------------------------------


def _as_rows(weight: Tensor, groups: int) -> Tensor:
    """``weight`` as ``(out, columns)``, checked against statistics with ``groups`` groups."""
    if weight.dim() < 2:
        raise ValueError(f"A weight of shape {tuple(weight.shape)} has no input columns to score.")
    out = weight.shape[0]
    if out % groups:
        raise ValueError(f"A weight with {out} outputs cannot be split into {groups} groups.")
    return weight.reshape(out, -1)


def _per_group(stat: Tensor, columns: int, dims: int) -> Tensor:
    """``stat`` with a leading groups dimension: ``dims`` is its number of dimensions per group."""
    stat = stat.unsqueeze(0) if stat.dim() == dims else stat
    if stat.shape[-1] != columns:
        raise ValueError(
            f"The input statistics have {stat.shape[-1]} columns and the weight {columns}: collect them on this "
            "layer (a Conv2d's columns are in·kh·kw)."
        )
    return stat


def wanda_scores(weight: Tensor, norms: Tensor) -> Tensor:
    """Wanda's importance ``|W_ij| · ‖X_j‖₂``, in the weight's shape.

    Args:
        weight: a Linear ``(out, in)`` or Conv2d ``(out, in, kh, kw)`` weight.
        norms: the input norms per column, ``(columns,)`` or ``(groups, columns)`` (:attr:`ColumnStatistics.norms`).

    Example::

        >>> wanda_scores(torch.tensor([[1.0, -2.0], [3.0, 4.0]]), torch.tensor([2.0, 0.5]))
        tensor([[2., 1.],
                [6., 2.]])
    """
    norms = _per_group(norms, weight[0].numel() if weight.dim() > 1 else 0, 1)
    rows = _as_rows(weight, norms.shape[0])
    per_row = norms.to(rows.device).repeat_interleave(rows.shape[0] // norms.shape[0], dim=0)
    return (rows.detach().abs().float() * per_row).reshape(weight.shape)


def _spread(total: int, available: Tensor) -> Tensor:
    """``total`` units shared among groups in proportion to what each has ``available`` (never more than it has,
    rounding so that the shares add up to ``total`` exactly).

    Example::

        >>> _spread(5, torch.tensor([4, 4, 4])).tolist(), _spread(3, torch.tensor([0, 2, 6])).tolist()
        ([1, 2, 2], [0, 0, 3])
    """
    available = available.to(torch.int64).reshape(-1)
    whole = int(available.sum())
    if total <= 0 or whole == 0:
        return torch.zeros_like(available)
    total = min(total, whole)
    ends = total * available.cumsum(0) // whole
    return ends - torch.cat([ends.new_zeros(1), ends[:-1]])


def _row_masks(scores: Tensor, count: int, previous: Tensor) -> Tensor:
    """Prune ``count`` entries of ``scores`` (out, columns) in all, the lowest of each row, rows sharing the new
    prunes in proportion to what they still keep; entries ``previous`` pruned stay pruned."""
    new = count - int((~previous).sum())
    if new <= 0:
        return previous.clone()
    kept = previous.sum(1)
    targets = (previous.shape[1] - kept) + _spread(new, kept).to(kept.device)
    scores = scores.masked_fill(~previous, float("-inf"))
    order = torch.sort(scores, dim=1, stable=True).indices  # ties: the earlier column first
    positions = torch.arange(scores.shape[1], device=scores.device)
    return torch.empty_like(previous).scatter_(1, order, positions >= targets[:, None])


def _check_target(amount: float | None, nm: tuple[int, int] | None) -> None:
    if (amount is None) == (nm is None):
        raise ValueError("Give either `amount` (unstructured) or `nm=(n, m)` (N:M), not both or neither.")
    if amount is not None and not 0.0 <= amount < 1.0:
        raise ValueError(f"`amount={amount!r}` must be in [0, 1).")


def _previous(previous: Tensor | None, weight: Tensor) -> Tensor:
    if previous is None:
        return torch.ones(weight.shape, dtype=torch.bool, device=weight.device)
    if previous.shape != weight.shape:
        raise ValueError(f"`previous` has shape {tuple(previous.shape)}, the weight {tuple(weight.shape)}.")
    return previous.to(device=weight.device, dtype=torch.bool)


def wanda_mask(
    weight: Tensor,
    norms: Tensor,
    amount: float | None = None,
    *,
    nm: tuple[int, int] | None = None,
    previous: Tensor | None = None,
) -> Tensor:
    """Wanda's mask: the lowest :func:`wanda_scores` pruned within each output row, or in each group of M.

    Unstructured: ``round(amount · numel)`` entries are pruned in all, every row losing its share (rows differ by
    at most one when ``previous`` is even), ties pruned earliest column first. N:M (``nm=(n, m)``): in every group
    of ``m`` consecutive weights along dim 1 (input channels) the ``n`` highest scores are kept.

    Args:
        weight: a Linear or Conv2d weight.
        norms: input norms per column (:attr:`ColumnStatistics.norms`).
        amount: fraction of the weight pruned, in ``[0, 1)``; or
        nm: ``(n, m)``.
        previous: a mask whose pruned entries stay pruned.

    Example::

        >>> w = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
        >>> wanda_mask(w, torch.tensor([10.0, 1.0, 1.0, 1.0]), 0.5)
        tensor([[ True, False, False,  True]])
        >>> wanda_mask(w, torch.tensor([10.0, 1.0, 1.0, 1.0]), nm=(1, 2))
        tensor([[ True, False, False,  True]])
    """
    _check_target(amount, nm)
    keep = _previous(previous, weight)
    scores = wanda_scores(weight, norms).to(weight.device)
    if nm is not None:
        return nm_keep(scores.masked_fill(~keep, float("-inf")), *nm) & keep
    rows = scores.reshape(weight.shape[0], -1)
    count = round(amount * weight.numel())  # type: ignore[operator]
    return _row_masks(rows, count, keep.reshape(rows.shape)).reshape(weight.shape)


# -- SparseGPT ------------------------------------------------------------------------------------------


def _inverse_factor(hessian: Tensor, damp: float) -> tuple[Tensor, Tensor]:
    """The upper Cholesky factor of ``(H + λI)⁻¹`` (λ = ``damp`` × the mean diagonal of the inputs that fired), and
    which inputs fired. An input that never fired (zero diagonal) gets the mean diagonal: its row and column of
    ``H`` stay zero elsewhere, so its weight neither moves error onto the others nor takes any."""
    h = hessian.to(torch.float64).clone()
    diagonal = h.diagonal()
    live = diagonal > 0
    base = float(diagonal[live].mean()) if bool(live.any()) else 1.0
    diagonal[~live] = base
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for attempt in range(6):
        # Round-off can leave a nearly singular H indefinite: more dampening until the factorization exists.
        factor, info = torch.linalg.cholesky_ex(h + damp * 10**attempt * base * eye)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(factor)
            return torch.linalg.cholesky(inverse, upper=True), live
    raise ValueError(
        "The Gram matrix of the layer's inputs is not positive semi-definite (NaN or Inf inputs?)."
    )


def _obs_prune(
    w: Tensor,
    u: Tensor,
    live: Tensor,
    keep: Tensor,
    quotas: list[int] | None,
    nm: tuple[int, int] | None,
    block: int,
) -> None:
    """Prune ``w`` (rows, columns) in place, column by column in blocks, updating ``keep``.

    ``u`` is the upper Cholesky factor of the inverse Hessian. Unstructured: block ``b`` prunes ``quotas[b]`` more
    entries, the lowest ``w² / u_cc²`` of the block when it starts. N:M: each group of ``m`` columns keeps the ``n``
    highest, chosen when the sweep reaches it. Weights of inputs that never fired (not ``live``) score zero: they
    cost nothing on the calibration inputs. Every pruned weight's error ``(w - 0) / u_cc`` is taken off the columns
    not visited yet, along row ``c`` of ``u`` (optimal brain surgeon, one column at a time).
    """
    columns = w.shape[1]

    def scores(w1: Tensor, d: Tensor, live1: Tensor, k1: Tensor) -> Tensor:
        return (w1 * w1 / (d * d) * live1).masked_fill(~k1, float("-inf"))

    for index, start in enumerate(range(0, columns, block)):
        end = min(start + block, columns)
        w1, k1, u1 = w[:, start:end].clone(), keep[:, start:end].clone(), u[start:end, start:end]
        d, live1 = u1.diagonal(), live[start:end]
        errors = torch.zeros_like(w1)
        if quotas is not None and quotas[index] > 0:
            count = int((~k1).sum()) + quotas[index]
            k1 = _kept_after_pruning(scores(w1, d, live1, k1).reshape(-1), count).reshape(k1.shape)
        for j in range(end - start):
            if nm is not None and j % nm[1] == 0:
                group = slice(j, j + nm[1])
                k1[:, group] &= nm_keep(scores(w1[:, group], d[group], live1[group], k1[:, group]), *nm)
            q = torch.where(k1[:, j], w1[:, j], torch.zeros_like(w1[:, j]))
            error = (w1[:, j] - q) / d[j]
            w1[:, j + 1 :] -= error[:, None] * u1[j, j + 1 :][None, :]
            w1[:, j] = q
            errors[:, j] = error
        w[:, start:end], keep[:, start:end] = w1, k1
        w[:, end:] -= errors @ u[start:end, end:]


def sparsegpt_prune(
    weight: Tensor,
    hessian: Tensor,
    amount: float | None = None,
    *,
    nm: tuple[int, int] | None = None,
    previous: Tensor | None = None,
    block_size: int = 128,
    damp: float = 0.01,
) -> tuple[Tensor, Tensor]:
    """SparseGPT: prune a layer's weight so that its outputs on the calibration inputs change least.

    The weight is read as ``(out, columns)`` (a Conv2d's in·kh·kw columns; for N:M in ``(kh, kw, in)`` order, so
    that groups of M input channels are consecutive). With ``H`` the Gram matrix of the inputs, dampened by
    ``damp`` times its mean diagonal (the weights of inputs that never fired score zero and move nothing), columns
    are swept in blocks of ``block_size``: the mask of each block is chosen by ``w² / [H⁻¹]_cc²`` (the error a
    pruned weight causes after the others compensate), and each pruned weight's error is moved onto the columns
    not swept yet with the Cholesky factor of ``H⁻¹``. Entries ``previous`` pruned stay pruned (zero, as their
    error is moved on); the rest of the new prunes are shared among blocks in proportion to what they keep.

    Args:
        weight: a Linear ``(out, in)`` or Conv2d ``(out, in/groups, kh, kw)`` weight (not changed).
        hessian: ``Σ x xᵀ`` of its inputs, ``(columns, columns)`` or ``(groups, columns, columns)``
            (:attr:`ColumnStatistics.hessian`); any positive scale.
        amount: fraction of the weight pruned (``round(amount · numel)`` entries), in ``[0, 1)``; or
        nm: ``(n, m)``: keep ``n`` of every ``m`` consecutive weights along dim 1.
        previous: a mask whose pruned entries stay pruned.
        block_size: columns per block (a multiple of ``m`` is used for N:M).
        damp: dampening, as a fraction of the mean diagonal of ``H``.

    Returns:
        ``(new weight, mask)``: the weight (its dtype and shape) with exact zeros where the mask is ``False``.

    Example::

        >>> _ = torch.manual_seed(0)
        >>> x = torch.randn(512, 8) @ torch.randn(8, 32) + 0.1 * torch.randn(512, 32)  # correlated inputs
        >>> w = torch.randn(16, 32)
        >>> new, mask = sparsegpt_prune(w, x.T @ x, nm=(2, 4))
        >>> bool((mask.reshape(16, 8, 4).sum(-1) == 2).all()), torch.equal(new == 0, ~mask)
        (True, True)
        >>> magnitude = w * nm_keep(w.abs(), 2, 4)  # the output error, relative to magnitude pruning's:
        >>> round(float((x @ (w - new).T).norm() / (x @ (w - magnitude).T).norm()), 2)
        0.4
    """
    _check_target(amount, nm)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"`block_size={block_size!r}` must be a positive integer.")
    keep = _previous(previous, weight)
    columns = weight[0].numel() if weight.dim() > 1 else 0
    hessians = _per_group(hessian, columns, 2)
    groups = hessians.shape[0]
    w = _as_rows(weight, groups).detach().to(torch.float32).clone()
    k = keep.reshape(w.shape).clone()
    order = None
    if nm is not None and weight.dim() == 4:
        # Groups of M input channels at one kernel position become consecutive columns.
        channels, taps = weight.shape[1], weight.shape[2] * weight.shape[3]
        order = torch.arange(columns, device=w.device).reshape(channels, taps).T.reshape(-1)
        w, k, hessians = w[:, order], k[:, order], hessians[:, order][:, :, order]
    block = max(nm[1], block_size // nm[1] * nm[1]) if nm is not None else block_size
    starts = range(0, columns, block)
    rows = w.shape[0] // groups
    quotas = None
    if amount is not None:
        kept = torch.stack(
            [k[g * rows : (g + 1) * rows, s : s + block].sum() for g in range(groups) for s in starts]
        )
        quotas = _spread(round(amount * weight.numel()) - int((~k).sum()), kept).tolist()
    for g in range(groups):
        u, live = _inverse_factor(hessians[g].to(w.device), damp)
        part = slice(g * rows, (g + 1) * rows)  # views of w and k: pruned in place
        share = None if quotas is None else quotas[g * len(starts) : (g + 1) * len(starts)]
        _obs_prune(w[part], u.to(torch.float32), live, k[part], share, nm, block)
    if order is not None:
        inverse = torch.argsort(order)
        w, k = w[:, inverse], k[:, inverse]
    return w.reshape(weight.shape).to(weight.dtype), k.reshape(weight.shape)
