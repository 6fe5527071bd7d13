"""Pruning masks: unstructured (per layer or global) and N:M semi-structured, as plain-torch functions.

A mask is a bool tensor of the weight's shape, ``True`` where the weight is kept. ``amount`` is always the
absolute fraction of entries pruned (zeroed), in ``[0, 1)``; counts are exact (``round(amount * numel)``)
even when scores tie, because entries are ranked with a stable sort rather than compared to a threshold.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lightning_compress.schedules import validate_amount

CRITERIA = ("l1", "l2", "random")
SCOPES = ("layer", "global")


def check_choice(value: str, choices: Sequence[str], name: str) -> str:
    """Check that ``value`` is one of ``choices``; the error names the argument ``name``.

    Example::

        >>> check_choice("global", SCOPES, "scope")
        'global'
        >>> check_choice("model", SCOPES, "scope")
        Traceback (most recent call last):
        ...
        ValueError: Unknown `scope='model'`. Use one of 'layer', 'global'.
    """
    if isinstance(value, str) and value in choices:
        return value
    raise ValueError(f"Unknown `{name}={value!r}`. Use one of {', '.join(repr(c) for c in choices)}.")


def magnitude_scores(
    weight: Tensor, criterion: str = "l1", generator: torch.Generator | None = None
) -> Tensor:
    """Importance of each entry of ``weight``; the lowest scores are pruned first.

    Args:
        weight: the tensor to score.
        criterion: ``"l1"`` (``|w|``), ``"l2"`` (``w**2``, the same ranking as ``"l1"``) or ``"random"``
            (uniform scores, reproducible with ``generator``).
        generator: random source for ``"random"``.

    Example::

        >>> magnitude_scores(torch.tensor([-3.0, 0.5, 2.0]))
        tensor([3.0000, 0.5000, 2.0000])
        >>> magnitude_scores(torch.tensor([-3.0, 0.5]), "l2")
        tensor([9.0000, 0.2500])
    """
    check_choice(criterion, CRITERIA, "criterion")
    if criterion == "random":
        device = generator.device if generator is not None else weight.device
        return torch.rand(weight.shape, generator=generator, device=device).to(weight.device)
    w = weight.detach().to(torch.promote_types(weight.dtype, torch.float32))
    return w.abs() if criterion == "l1" else w * w


def _kept_after_pruning(scores: Tensor, k: int) -> Tensor:
    """Flat bool mask pruning the ``k`` lowest ``scores`` (ties broken by position, earliest first).

    The same mask as pruning the first ``k`` entries of a stable ascending sort, without the sort: a full
    stable sort of a ResNet-18 layer takes about ten times as long as selecting the ``k``-th value, and made a
    mask update cost several training steps. Everything below that value is pruned, then the earliest entries
    equal to it. NaN scores (which a sort places last) fall back to the sort.
    """
    n = scores.numel()
    keep = torch.ones(n, dtype=torch.bool, device=scores.device)
    if k <= 0:
        return keep
    if k >= n:
        return keep.fill_(False)
    if bool(torch.isnan(scores).any()):
        keep[torch.sort(scores, stable=True).indices[:k]] = False
        return keep
    threshold = torch.kthvalue(scores, k).values
    below = scores < threshold
    ties = torch.nonzero(scores == threshold).flatten()
    keep[below] = False
    keep[ties[: k - int(below.sum())]] = False
    return keep


def unstructured_masks(
    weights: Mapping[str, Tensor],
    amount: float,
    *,
    scope: str = "layer",
    criterion: str = "l1",
    previous: Mapping[str, Tensor] | None = None,
    generator: torch.Generator | None = None,
    max_layer_amount: float | None = None,
    amounts: Mapping[str, float] | None = None,
) -> dict[str, Tensor]:
    """Unstructured masks pruning the fraction ``amount`` of the lowest-scored entries.

    Entries pruned in ``previous`` stay pruned, so masks only grow as a schedule raises ``amount``; where
    ``previous`` already prunes at least the target, it is returned unchanged.

    Args:
        weights: tensors to prune, by name.
        amount: absolute fraction of entries to prune, in ``[0, 1)``.
        scope: ``"layer"``: each tensor loses exactly ``round(amount * numel)`` entries; ``"global"``: one
            ranking across all tensors, ``round(amount * total)`` entries pruned in total (layers with
            smaller scores lose more).
        criterion: scoring, see :func:`magnitude_scores`.
        previous: masks from the last update, by name (missing names have none).
        generator: random source for ``criterion="random"``.
        max_layer_amount: ``scope="global"`` only: no tensor loses more than ``floor(max_layer_amount * numel)``
            entries; the ranking passes over a tensor at that limit and prunes the next-lowest entries of the
            others instead, so the total is still reached. In ``[amount, 1]``; ``None``: no limit.
        amounts: ``scope="layer"`` only: the amount of some tensors, by name (the others lose ``amount``).

    Returns:
        Bool masks (``True`` = keep) with the shapes and devices of ``weights``.

    Example::

        >>> w = {"a": torch.tensor([4.0, -1.0, 3.0, 2.0]), "b": torch.tensor([0.5, 5.0])}
        >>> unstructured_masks(w, 0.5)
        {'a': tensor([ True, False,  True, False]), 'b': tensor([False,  True])}
        >>> unstructured_masks(w, 0.34, scope="global")["a"]
        tensor([ True, False,  True,  True])
        >>> small = {"a": torch.tensor([4.0, 3.0, 2.0, 5.0]), "b": torch.tensor([0.1, 0.2])}
        >>> unstructured_masks(small, 0.5, scope="global")["b"]
        tensor([False, False])
        >>> unstructured_masks(small, 0.5, scope="global", max_layer_amount=0.5)
        {'a': tensor([ True, False, False,  True]), 'b': tensor([False,  True])}
        >>> unstructured_masks(w, 0.5, amounts={"a": 0.75})["a"]
        tensor([ True, False, False, False])
    """
    amount = validate_amount(amount)
    check_choice(scope, SCOPES, "scope")
    check_choice(criterion, CRITERIA, "criterion")
    if amounts:
        if scope != "layer":
            raise ValueError("Per-tensor `amounts` apply to `scope='layer'`; 'global' ranks across tensors.")
        unknown = [name for name in amounts if name not in weights]
        if unknown:
            raise KeyError(f"`amounts` names {unknown}, which are not in `weights` ({sorted(weights)}).")
        amounts = {name: validate_amount(value, f"amounts[{name!r}]") for name, value in amounts.items()}
    if max_layer_amount is not None:
        if scope != "global":
            raise ValueError(
                "`max_layer_amount` applies to `scope='global'`; with 'layer' every tensor loses `amount`."
            )
        if not amount <= max_layer_amount <= 1.0:
            raise ValueError(
                f"`max_layer_amount={max_layer_amount!r}` must be in [amount, 1] = [{amount:g}, 1], or the total "
                "could not be reached."
            )
    previous = previous or {}
    scores: dict[str, Tensor] = {}
    prev_masks: dict[str, Tensor] = {}
    for name, weight in weights.items():
        score = magnitude_scores(weight, criterion, generator).reshape(-1)
        prev = previous.get(name)
        if prev is not None:
            if prev.shape != weight.shape:
                raise ValueError(
                    f"`previous[{name!r}]` has shape {tuple(prev.shape)} but the weight has "
                    f"{tuple(weight.shape)}. Pass the masks computed for these same weights."
                )
            prev = prev.to(device=weight.device, dtype=torch.bool)
            prev_masks[name] = prev
            score = score.masked_fill(~prev.reshape(-1), float("-inf"))
        scores[name] = score

    prev_pruned = {name: int((~prev).sum()) for name, prev in prev_masks.items()}
    if scope == "layer":
        masks = {}
        for name, weight in weights.items():
            k = round((amounts or {}).get(name, amount) * weight.numel())
            if prev_pruned.get(name, -1) >= k:
                masks[name] = prev_masks[name].clone()
            else:
                masks[name] = _kept_after_pruning(scores[name], k).reshape(weight.shape)
        return masks

    if not weights:
        return {}
    k = round(amount * sum(w.numel() for w in weights.values()))
    if prev_masks and sum(prev_pruned.values()) >= k:
        return {
            name: prev_masks[name].clone() if name in prev_masks else torch.ones_like(w, dtype=torch.bool)
            for name, w in weights.items()
        }
    device = next(iter(weights.values())).device
    masks: dict[str, Tensor] = {}
    pool = dict(weights)
    while True:
        keep = _kept_after_pruning(torch.cat([scores[name].to(device) for name in pool]), k)
        offsets, offset = {}, 0
        for name, weight in pool.items():
            offsets[name] = (offset, offset + weight.numel())
            offset += weight.numel()
        # A tensor over its limit keeps exactly its limit of lowest entries and leaves the ranking; the budget
        # it gives up goes to the others, which can push more of them over, hence the loop (at most one pass
        # per tensor). Equal to walking one global ranking and skipping tensors that reached their limit.
        over = {}
        if max_layer_amount is not None:
            for name, (lo, hi) in offsets.items():
                cap = math.floor(max_layer_amount * pool[name].numel() + 1e-9)
                if int((~keep[lo:hi]).sum()) > cap:
                    over[name] = cap
        if not over:
            for name, (lo, hi) in offsets.items():
                masks[name] = keep[lo:hi].reshape(pool[name].shape).to(pool[name].device)
            break
        for name, cap in over.items():
            masks[name] = _kept_after_pruning(scores[name], cap).reshape(pool[name].shape)
            k -= cap
            del pool[name]
        if not pool:
            break
    return {name: masks[name] for name in weights}


def _check_nm(n: int, m: int) -> None:
    for name, value in (("n", n), ("m", m)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"`{name}={value!r}` must be an integer (N:M keeps n of every m weights).")
    if n < 1:
        raise ValueError(f"`n={n}` must be >= 1: N:M keeps n of every m weights, e.g. n=2, m=4.")
    if n > m:
        raise ValueError(f"`n={n}` is larger than `m={m}`: N:M keeps n of every m weights, so n <= m.")


def _check_group_size(size: int, n: int, m: int, where: str) -> None:
    if size % m == 0:
        return
    valid = [d for d in range(n + 1, size + 1) if size % d == 0]
    hint = (
        f"Use an `m` that divides {size}, e.g. m={min(valid, key=lambda d: (abs(d - m), d))}, or leave "
        "this tensor out of the selection."
        if valid
        else "Leave this tensor out of the selection."
    )
    raise ValueError(f"`m={m}` does not divide the size {size} of {where}. {hint}")


def validate_nm(n: int, m: int, shapes: Mapping[str, torch.Size]) -> None:
    """Check an N:M pattern against weight shapes before training; errors name the offending tensor.

    Args:
        n: weights kept per group.
        m: group size along the input dimension (dim 1).
        shapes: weight shapes by name.

    Example::

        >>> validate_nm(2, 4, {"fc": torch.Size([8, 16])})
        >>> validate_nm(2, 4, {"fc": torch.Size([8, 6])})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: `m=4` does not divide the size 6 of dim 1 of 'fc'. Use an `m` that divides 6, e.g. m=3...
    """
    _check_nm(n, m)
    for name, shape in shapes.items():
        if len(shape) < 2:
            raise ValueError(
                f"{name!r} has shape {tuple(shape)}; N:M groups run along dim 1 (the inputs), so it needs "
                "at least 2 dimensions. Leave it out of the selection."
            )
        _check_group_size(shape[1], n, m, f"dim 1 of {name!r}")


def nm_mask(weight: Tensor, n: int, m: int, dim: int = 1) -> Tensor:
    """N:M semi-structured mask: of every ``m`` consecutive entries along ``dim``, keep the ``n`` largest.

    Entries are ranked by ``|w|``.

    For a Linear weight ``[out, in]`` and a Conv2d weight ``[out, in, kh, kw]``, ``dim=1`` groups the input
    channels (for each output and kernel position), the layout of 2:4 sparse tensor cores. Ties keep the
    earlier entry.

    Args:
        weight: the tensor to mask.
        n: entries kept per group (``1 <= n <= m``).
        m: group size; must divide ``weight.shape[dim]``.
        dim: the dimension the groups run along.

    Example::

        >>> nm_mask(torch.tensor([[1.0, -4.0, 3.0, 2.0, 0.0, 5.0, -6.0, 1.0]]), n=2, m=4)
        tensor([[False,  True,  True, False, False,  True,  True, False]])
    """
    _check_nm(n, m)
    if not -weight.dim() <= dim < weight.dim():
        raise ValueError(f"`dim={dim}` is out of range for a weight of shape {tuple(weight.shape)}.")
    _check_group_size(weight.shape[dim], n, m, f"dim {dim} (shape {tuple(weight.shape)})")
    return nm_keep(magnitude_scores(weight), n, m, dim)


def nm_keep(scores: Tensor, n: int, m: int, dim: int = 1) -> Tensor:
    """The N:M mask of any ``scores``: in every ``m`` consecutive entries along ``dim``, the ``n`` highest kept
    (ties: the earlier entry). ``m`` must divide ``scores.shape[dim]`` (see :func:`validate_nm`).

    Example::

        >>> nm_keep(torch.tensor([[0.1, 0.9, 0.5, 0.5]]), 2, 4)
        tensor([[False,  True,  True, False]])
    """
    moved = scores.movedim(dim, -1)
    grouped = moved.reshape(*moved.shape[:-1], -1, m)
    keep_idx = torch.sort(grouped, dim=-1, descending=True, stable=True).indices[..., :n]
    keep = torch.zeros_like(grouped, dtype=torch.bool).scatter_(-1, keep_idx, True)
    return keep.reshape(moved.shape).movedim(-1, dim)


def nm_masks(weights: Mapping[str, Tensor], n: int, m: int) -> dict[str, Tensor]:
    """N:M masks along dim 1 for several tensors, checked up front with :func:`validate_nm`.

    Example::

        >>> masks = nm_masks({"fc": torch.randn(3, 8), "conv": torch.randn(2, 4, 3, 3)}, n=2, m=4)
        >>> mask_sparsity(masks)
        0.5
    """
    validate_nm(n, m, {name: w.shape for name, w in weights.items()})
    return {name: nm_mask(w, n, m) for name, w in weights.items()}


def apply_masks(params: Mapping[str, Tensor], masks: Mapping[str, Tensor]) -> None:
    """Zero the pruned entries of ``params`` in place: exact ``+0.0`` (also for NaN), kept values untouched.

    Args:
        params: tensors to mask, by name (names without a mask are left alone).
        masks: bool masks (``True`` = keep), by name.

    Example::

        >>> p = {"w": torch.tensor([1.5, -2.0, 3.0])}
        >>> apply_masks(p, {"w": torch.tensor([True, False, True])})
        >>> p["w"]
        tensor([1.5000, 0.0000, 3.0000])
    """
    with torch.no_grad():
        for name, mask in masks.items():
            if name not in params:
                raise KeyError(f"A mask is named {name!r} but no parameter is; known: {sorted(params)}.")
            param = params[name]
            if mask.shape != param.shape:
                raise ValueError(
                    f"The mask for {name!r} has shape {tuple(mask.shape)} but the parameter has "
                    f"{tuple(param.shape)}."
                )
            param.masked_fill_(~mask.to(device=param.device, dtype=torch.bool), 0.0)


def mask_sparsity(masks: Mapping[str, Tensor]) -> float:
    """Fraction of pruned (``False``) entries over all masks; ``0.0`` for none.

    Example::

        >>> mask_sparsity({"a": torch.tensor([True, False]), "b": torch.tensor([False, False])})
        0.75
    """
    total = sum(mask.numel() for mask in masks.values())
    if total == 0:
        return 0.0
    return sum(int((~mask.bool()).sum()) for mask in masks.values()) / total


_BIT_VALUES = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def pack_mask(mask: Tensor) -> dict:
    """Bit-pack a mask for checkpoints: 8 entries per byte, most significant bit first, on the CPU.

    Example::

        >>> packed = pack_mask(torch.tensor([[True, False, True], [True, True, True]]))
        >>> packed["shape"], packed["bits"]
        ([2, 3], tensor([188], dtype=torch.uint8))
    """
    flat = mask.detach().reshape(-1).to(device="cpu", dtype=torch.uint8)
    flat = torch.nn.functional.pad(flat, (0, -flat.numel() % 8))
    bits = (flat.reshape(-1, 8) * _BIT_VALUES).sum(dim=1).to(torch.uint8)
    return {"shape": list(mask.shape), "bits": bits}


def unpack_mask(packed: dict) -> Tensor:
    """Inverse of :func:`pack_mask`: the bool mask, on the device of ``packed["bits"]``.

    Example::

        >>> mask = torch.rand(5, 7) > 0.5
        >>> torch.equal(unpack_mask(pack_mask(mask)), mask)
        True
    """
    if not isinstance(packed, Mapping) or not {"shape", "bits"} <= packed.keys():
        raise ValueError("`packed` must be a dict with 'shape' and 'bits', as returned by `pack_mask`.")
    shape, bits = list(packed["shape"]), packed["bits"]
    numel = math.prod(shape)
    if bits.dtype != torch.uint8 or bits.numel() != math.ceil(numel / 8):
        raise ValueError(
            f"`packed['bits']` holds {bits.numel()} {bits.dtype} values; a mask of shape {shape} needs "
            f"{math.ceil(numel / 8)} uint8 bytes. Was it written by `pack_mask`?"
        )
    values = _BIT_VALUES.to(bits.device)
    flat = (bits.reshape(-1, 1) & values) != 0
    return flat.reshape(-1)[:numel].reshape(shape)


def computed_weight(module: nn.Module) -> bool:
    """Whether ``module``'s ``weight`` is computed from other tensors at each call: a parametrization
    (``torch.nn.utils.parametrizations.weight_norm``), or the older hooks (``torch.nn.utils.weight_norm``,
    ``spectral_norm``)."""
    hooks = getattr(module, "_forward_pre_hooks", {}).values()
    return parametrize.is_parametrized(module, "weight") or any(
        type(hook).__name__ in ("WeightNorm", "SpectralNorm") for hook in hooks
    )
