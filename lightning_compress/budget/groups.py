"""Channel groups as the unit of structured budgets: what one group's channels remove, and what that costs.

Structured pruning removes channels of a whole torch-pruning channel group at once: the output rows of every
producer (layers joined by a residual add share their channels), the BatchNorm entries that follow, and the input
columns of every consumer. The ``prune_structured`` budget therefore measures, prices and allocates one level per
group (:class:`ChannelUnit`), named by a layer of the group that the user selected (its root when selected), the
name ``GradualPruning(layer_amounts=...)`` takes for the whole group.

- :func:`channel_units`: the groups of the selected layers, traced once with the pruning callbacks' own
  dependency graph (:class:`~lightning_compress.pruning.structured.StructuredPruner`);
- :func:`unit_masks`: the parameter masks that remove a level of one group's channels (the lowest L1 norms,
  as ``GradualPruning(criterion="l1")`` ranks them); zeroing them gives exactly the model with the channels
  removed (Conv/Linear/BatchNorm groups);
- :func:`cost_terms`: the model's parameters, stored bytes or MACs as a sum of products of the groups' kept
  fractions (a consumer's weight shrinks with its own group's outputs *and* with its input group's channels).

Example::

    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> _, units = channel_units(model, torch.zeros(1, 4), ["0", "2", "4"])
    >>> [(unit.name, unit.size, unit.consumers) for unit in units]
    [('0', 8, ('2',)), ('2', 8, ('4',))]
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_compress.budget.sensitivity import removed_channels
from lightning_compress.pruning.structured import ChannelGroup, NoChannelGroupError, StructuredPruner

__all__ = ["ChannelUnit", "channel_units", "cost_terms", "masked", "unit_masks"]


@dataclass(frozen=True)
class ChannelUnit:
    """One channel group as the budget sees it.

    Args:
        name: the group's name in sensitivity and cost tables and in ``layer_amounts``: its root when the
            root is selected, else its first selected producer.
        group: the torch-pruning channel group.
        layers: the selected producers of the group (the layers whose output channels the level removes).
    """

    name: str
    group: ChannelGroup
    layers: tuple[str, ...]

    @property
    def size(self) -> int:
        """The group's channels."""
        return self.group.size

    @property
    def consumers(self) -> tuple[str, ...]:
        """The layers whose inputs shrink with the group."""
        return self.group.consumers

    def kept(self, level: float) -> float:
        """The fraction of the group's channels ``level`` keeps.

        Example::

            >>> from lightning_compress.pruning.structured import ChannelGroup
            >>> ChannelUnit("conv", ChannelGroup("conv", 6, ()), ("conv",)).kept(0.5)
            0.5
        """
        return (self.size - removed_channels(self.size, level)) / self.size


def channel_units(
    model: nn.Module, example_input: Any, selected: Sequence[str], excluded: Sequence[str] = ()
) -> tuple[StructuredPruner, list[ChannelUnit]]:
    """The channel groups the ``selected`` layers produce, as structured pruning will remove them.

    Args:
        model: the model (traced once on ``example_input``; its weights are not changed).
        example_input: one batch of the model's input.
        selected: names of the selected layers; a group is a unit when one of its producers is selected.
        excluded: layers whose output channels stay (a group one of them produces is left out).

    Raises:
        ValueError: without ``example_input``, or when no selected layer has a prunable group.
    """
    if example_input is None:
        raise ValueError(
            "scheme='prune_structured' traces the model's channel groups: pass `example_input` (one batch of "
            "its input)."
        )
    try:
        pruner = StructuredPruner(
            model,
            example_input,
            modules=list(selected),
            ignored=list(excluded),
            importance="l1",
            scope="layer",
            round_to=1,
            strict=False,
        )
    except NoChannelGroupError as err:
        raise ValueError(
            f"No selected layer has output channels structured pruning can remove ({err}). Select other layers "
            "with `modules=`."
        ) from err
    chosen = set(selected)
    units = []
    for group in pruner.groups:
        layers = tuple(name for name in group.producers if name in chosen)
        if not layers:
            continue
        units.append(ChannelUnit(group.root if group.root in chosen else layers[0], group, layers))
    return pruner, units


def unit_masks(
    pruner: StructuredPruner, model: nn.Module, unit: ChannelUnit, level: float, scores: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """The masks (``True``: keep) of every parameter of ``unit``'s group with ``level`` of its channels removed:
    the channels of the lowest ``scores`` (:meth:`StructuredPruner.importance_scores`), ``floor(level * size)`` of
    them, at least one kept."""
    count = removed_channels(unit.size, level)
    order = torch.sort(scores[unit.group.root].double(), stable=True).indices
    masks = pruner.masks_from_plan(model, {unit.group.root: [int(i) for i in order[:count]]})
    return {name: masks[name] for name in unit.group.params}


@contextlib.contextmanager
def masked(model: nn.Module, masks: Mapping[str, Tensor]) -> Iterator[None]:
    """Zero what ``masks`` drops in ``model``'s parameters for the duration of the block; the exact values come
    back on exit (also on an exception)."""
    params = dict(model.named_parameters())
    saved = {name: params[name].detach().clone() for name in masks}
    try:
        with torch.no_grad():
            for name, mask in masks.items():
                params[name].mul_(mask.to(params[name].dtype))
        yield
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                params[name].copy_(value)


# A cost term: (weight, {unit name: power}); its cost is the weight times the product of the units' kept
# fractions raised to their powers (a weight whose two dimensions follow one group shrinks with its square).
Term = tuple[float, dict[str, int]]


def cost_terms(
    model: nn.Module, units: Sequence[ChannelUnit], metric: str, macs: Mapping[str, int] | None = None
) -> tuple[list[Term], float]:
    """The cost of the units' parameters as terms of the units' kept fractions, and the cost of the rest.

    ``"params"``: every parameter entry counts 1; ``"size"``: its bytes (BatchNorm running statistics shrink
    with the BatchNorm's weight); ``"macs"``: each Conv/Linear layer's counted MACs (``macs``, by module
    name) scale with the fraction of its weight kept. ``fixed`` is what no group changes.

    Example::

        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> _, units = channel_units(model, torch.zeros(1, 4), ["0", "2"])
        >>> terms, fixed = cost_terms(model, units, "params")
        >>> terms
        [(32.0, {'0': 1}), (8.0, {'0': 1}), (64.0, {'0': 1, '2': 1}), (8.0, {'2': 1}), (16.0, {'2': 1})]
        >>> fixed  # the classifier's bias
        2.0
    """
    touched: dict[str, dict[str, int]] = {}
    for unit in units:
        for piece in unit.group.slices:
            powers = touched.setdefault(piece.param, {})
            powers[unit.name] = powers.get(unit.name, 0) + 1
    modules = dict(model.named_modules())
    terms: list[Term] = []
    if metric == "macs":
        macs = macs or {}
        counted = 0.0
        for name, module in modules.items():
            weight = getattr(module, "weight", None)
            key = f"{name}.weight" if name else "weight"
            if key in touched and isinstance(weight, Tensor) and macs.get(name, 0):
                terms.append((float(macs[name]), dict(touched[key])))
                counted += macs[name]
        return terms, float(macs.get("", 0)) - counted
    unique = {id(p): (name, p) for name, p in model.named_parameters()}
    for name, param in unique.values():
        if name in touched:
            value = param.numel() * (param.element_size() if metric == "size" else 1)
            terms.append((float(value), dict(touched[name])))
    total = float(sum(p.numel() for _, p in unique.values()))
    if metric == "size":
        from lightning_compress.stats import raw_size_bytes

        for name, module in modules.items():
            if not isinstance(module, nn.modules.batchnorm._BatchNorm) or f"{name}.weight" not in touched:
                continue
            for buffer in (module.running_mean, module.running_var):
                if isinstance(buffer, Tensor):
                    value = float(buffer.numel() * buffer.element_size())
                    terms.append((value, dict(touched[f"{name}.weight"])))
        total = float(raw_size_bytes(model))
    return terms, total - sum(weight for weight, _ in terms)
