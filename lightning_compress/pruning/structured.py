"""Structured (channel) pruning driven by torch-pruning's dependency graph: mask during training, remove at the end.

Removing output channel ``c`` of a layer forces every coupled tensor to lose the matching slice: the BatchNorm
that follows it, the input channels of every consumer, and, across a residual add or a concatenation, the
channels of the other producers. Which slices move together is read from ``torch_pruning.DependencyGraph``
and never re-derived here; one such set of coupled channels is a :class:`ChannelGroup`.

Two phases share one plan (``{root: [removed channel indices]}``):

- while training, :meth:`StructuredPruner.compute_masks` turns the plan into parameter masks that zero whole
  groups; shapes do not change, so optimizers, checkpoints and hooks keep working;
- at the end, :meth:`StructuredPruner.materialize` removes the planned channels for real with torch-pruning.

For Conv/Linear/BatchNorm/InstanceNorm/PReLU/Embedding groups the masked model computes exactly what the
pruned one does. Groups that pass through a LayerNorm are marked ``exact=False``: it normalizes across
channels, so zeroed channels still change its statistics until they are removed.
"""

from __future__ import annotations

import copy
import difflib
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch_pruning as tp
from torch import Tensor, nn
from torch_pruning.pruner import function as tp_function

from lightning_compress._inputs import call_module, to_device
from lightning_compress.pruning.masks import SCOPES, check_choice, computed_weight
from lightning_compress.schedules import validate_amount
from lightning_compress.selection import tied_parameter_names

IMPORTANCES = ("l1", "l2", "bn_scale", "taylor", "random")

_ROOT_TYPES = (nn.modules.conv._ConvNd, nn.Linear)
_NO_PARAMS = {
    tp.ops.OPTYPE.CONCAT,
    tp.ops.OPTYPE.SPLIT,
    tp.ops.OPTYPE.ELEMENTWISE,
    tp.ops.OPTYPE.RESHAPE,
    tp.ops.OPTYPE.UNBIND,
    tp.ops.OPTYPE.EXPAND,
    tp.ops.OPTYPE.SLICE,
    tp.ops.OPTYPE.OUTPUT,
}
# Ops that cut the channel dimension into pieces: removal would change the piece sizes the forward expects.
_CUTS = {tp.ops.OPTYPE.SPLIT, tp.ops.OPTYPE.UNBIND, tp.ops.OPTYPE.SLICE}


def _whole_dimension(before: Sequence[int], after: Sequence[int], dim: int) -> bool:
    """Whether dimension ``dim`` of a tensor shaped ``before`` is one whole dimension of its view shaped ``after``.

    Example::

        >>> _whole_dimension((2, 5, 32), (10, 32), 2), _whole_dimension((2, 5, 32), (2, 5, 4, 8), 2)
        (True, False)
    """
    prefix, running = math.prod(before[:dim]), 1
    for size in after:
        if running == prefix and size == before[dim]:
            return True
        running *= size
    return False


def _cuts_channels(node: Any, channels: int) -> bool:
    """Whether a view/reshape node of the dependency graph splits or merges the channels it passes (a projection's
    outputs viewed as ``(heads, head_dim)``): removal would then change the sizes the forward hard-codes, or shift
    the head boundaries. A flatten torch-pruning maps itself (a convolution's ``(C, H, W)`` into a Linear) does not
    count; a view whose shapes autograd does not record does."""
    from torch_pruning.dependency.index_mapping import _FlattenIndexMapping

    if any(isinstance(d.index_mapping[0], _FlattenIndexMapping) for d in node.dependencies):
        return False
    grad_fn = node.grad_fn
    before = getattr(grad_fn, "_saved_self_sym_sizes", None)
    metadata = getattr(grad_fn, "_input_metadata", None)
    if before is None or not metadata:
        return True
    before, after = [int(n) for n in before], [int(n) for n in metadata[0].shape]
    dims = [d for d, n in enumerate(before) if n == channels]
    return not dims or not all(_whole_dimension(before, after, d) for d in dims)


class NoChannelGroupError(ValueError):
    """The traced model has no channel group to prune among the selected layers (tracing itself worked)."""


@dataclass(eq=False)
class ParamSlice:
    """The entries of one parameter that a group removes: index ``positions[i]`` along ``dim`` goes with
    root channel ``channels[i]`` (several positions can share a channel, e.g. after a ``flatten``).

    Args:
        param: qualified parameter name, as in ``model.named_parameters()``.
        dim: the dimension that shrinks.
        channels: root channel index of each position (``long``).
        positions: index along ``dim`` (``long``).
        bn_scale: whether this is a BatchNorm weight (``gamma``), used by ``importance="bn_scale"``.
    """

    param: str
    dim: int
    channels: Tensor
    positions: Tensor
    bn_scale: bool = False


@dataclass(eq=False)
class ChannelGroup:
    """One prunable dependency group: ``size`` channels that are removed together across ``slices``.

    Args:
        root: qualified name of the root module, the first producing layer of the group in model order.
        size: number of prunable channels (the root's output channels / output features).
        slices: every parameter slice one channel index maps to (producers' outputs, BatchNorm weight and
            bias, consumers' inputs).
        producers: modules whose outputs shrink (the root, coupled layers across residual adds, norms).
        consumers: modules whose inputs shrink.
        exact: ``False`` when a LayerNorm in the group makes masking differ from removal.
    """

    root: str
    size: int
    slices: tuple[ParamSlice, ...] = field(repr=False)
    producers: tuple[str, ...] = ()
    consumers: tuple[str, ...] = ()
    exact: bool = True

    @property
    def params(self) -> list[str]:
        """Names of the parameters the group touches, without duplicates."""
        return list(dict.fromkeys(s.param for s in self.slices))


# --------------------------------------------------------------------------- graph construction


def _tensors(obj: Any) -> list[Tensor]:
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, Mapping):
        obj = list(obj.values())
    if isinstance(obj, list | tuple):
        return [t for item in obj for t in _tensors(item)]
    return []


def _build_graph(model: nn.Module, example_input: Any) -> tuple[tp.DependencyGraph, set[Any]]:
    """Trace ``model`` once; return the graph and the autograd nodes of the model outputs.

    Tracing needs autograd (torch-pruning follows ``grad_fn``), so it runs under ``torch.enable_grad()`` with
    every parameter temporarily requiring a gradient; nothing is backpropagated. Train/eval flags and
    ``requires_grad`` flags are restored afterwards.
    """
    training = {m: m.training for m in model.modules()}
    requires = {p: p.requires_grad for p in model.parameters()}
    param = next(model.parameters(), None)
    if param is not None:
        example_input = to_device(example_input, param.device)
    outputs: list[Any] = []

    def forward(m: nn.Module, inputs: Any) -> Any:
        out = call_module(m, inputs)
        outputs.append(out)
        return out

    hint = (
        "Pass an `example_input` that `model(example_input)` accepts (a tuple is unpacked into positional "
        "arguments, a dict into keyword arguments) and make sure the outputs are tensors computed from the "
        "parameters."
    )
    try:
        with torch.enable_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for p in requires:
                p.requires_grad_(True)
            model.eval()
            graph = tp.DependencyGraph().build_dependency(
                model, example_inputs=example_input, forward_fn=forward, verbose=False
            )
    except Exception as err:
        raise ValueError(
            f"torch-pruning could not trace {type(model).__name__} with the given example input "
            f"({type(err).__name__}: {err}). {hint}"
        ) from err
    finally:
        for m, flag in training.items():
            m.training = flag
        for p, flag in requires.items():
            p.requires_grad_(flag)
    out_fns = {t.grad_fn for out in outputs for t in _tensors(out) if t.grad_fn is not None}
    if not out_fns:
        raise ValueError(f"The outputs of {type(model).__name__} do not depend on its parameters. {hint}")
    return graph, out_fns


def _module_slices(module: nn.Module, handler: Any, dim_hint: int) -> list[tuple[str, int]] | str:
    """``(local parameter name, dim)`` pairs that one channel of ``handler`` on ``module`` maps to, or the
    reason why the group cannot be masked."""
    pruner = getattr(handler, "__self__", None)
    out = getattr(handler, "__name__", "") == "prune_out_channels"
    if isinstance(pruner, tp_function.DepthwiseConvPruner):
        return [("weight", 0), ("bias", 0)]
    if isinstance(pruner, tp_function.ConvPruner):
        if out:
            return [("weight", 1 if module.transposed else 0), ("bias", 0)]
        return [("weight", 0 if module.transposed else 1)]
    if isinstance(pruner, tp_function.LinearPruner):
        return [("weight", 0), ("bias", 0)] if out else [("weight", 1)]
    if isinstance(pruner, tp_function.InstanceNormPruner) and module.track_running_stats:
        return f"{type(module).__name__} with running statistics (torch-pruning does not shrink them)"
    if isinstance(pruner, tp_function.BatchnormPruner | tp_function.InstanceNormPruner):
        return [("weight", 0), ("bias", 0)]
    if isinstance(pruner, tp_function.LayernormPruner):
        return [("weight", dim_hint), ("bias", dim_hint)]
    if isinstance(pruner, tp_function.GroupNormPruner):
        return f"{type(module).__name__} (its channel groups must keep dividing the width)"
    if isinstance(pruner, tp_function.PReLUPruner):
        return [("weight", 0)] if module.num_parameters > 1 else []
    if isinstance(pruner, tp_function.EmbeddingPruner):
        return [("weight", 1)]
    if isinstance(pruner, tp_function.MultiheadAttentionPruner):
        return (
            f"{type(module).__name__} (torch-pruning {tp.__version__} shrinks its embedding dimension, not whole "
            "heads, and the rescaled attention cannot be reproduced by masks)"
        )
    return f"{type(module).__name__} (no channel mapping for this layer type)"


def _grouped_conv(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.conv._ConvNd) and 1 < module.groups < module.out_channels


@dataclass
class _Candidate:
    root: str
    producers: list[str]
    group: ChannelGroup | None
    reason: str | None
    tied: bool = False


def tied_weights_message(tied: Mapping[str, str]) -> str:
    """The error for channel groups that cut tied weights (``{root: reason}``), naming the fix."""
    detail = "; ".join(f"{root!r}: {why}" for root, why in tied.items())
    return (
        f"Structured pruning cannot remove channels of tied weights ({detail}): torch-pruning would cut the "
        f"shared tensor once for every layer that uses it. Leave these layers out with `exclude={sorted(tied)}`, "
        "untie the weights, or prune them with `mode='unstructured'` or N:M (which prune a shared weight once, "
        "with one mask)."
    )


def _describe(
    graph: tp.DependencyGraph, model: nn.Module, module: nn.Module, root: str, out_fns: set[Any]
) -> _Candidate:
    names = {m: n for n, m in model.named_modules()}
    params = dict(model.named_parameters(remove_duplicate=False))
    param_names = {p: n for n, p in model.named_parameters()}
    tied_names = tied_parameter_names(model)
    tied: list[str] = []
    pruner = graph.get_pruner_of_module(module)
    size = int(pruner.get_out_channels(module))
    group = graph.get_pruning_group(module, pruner.prune_out_channels, list(range(size)))
    producers: list[str] = []
    consumers: list[str] = []
    pairs: dict[tuple[str, int], dict[tuple[int, int], None]] = {}
    bn_params: set[str] = set()
    reason: str | None = None
    exact = True
    reshaped = False
    for item in group:
        dep = item.dep
        node, handler = dep.target, dep.handler
        target = node.module
        is_out = graph.is_out_channel_pruning_fn(handler)
        if node.grad_fn in out_fns and is_out:
            reason = reason or "its channels are outputs of the model, which are never pruned"
        if node.type in _CUTS and any(d.index_mapping[0] is not None for d in node.dependencies):
            reason = reason or (
                "its channels pass through a split/chunk/slice of the channel dimension, whose sizes are fixed "
                "in the forward code"
            )
        reshaped = reshaped or (node.type == tp.ops.OPTYPE.RESHAPE and _cuts_channels(node, size))
        if node.type in _NO_PARAMS:
            continue
        if isinstance(target, nn.Parameter):
            local = [(param_names[target], node.pruning_dim)]
            prefix = ""
            (producers if is_out else consumers).append(param_names[target])
        else:
            name = names.get(target, "?")
            (producers if is_out else consumers).append(name)
            if _grouped_conv(target):
                reason = reason or f"{name!r} is a grouped convolution (groups={target.groups})"
                continue
            if computed_weight(target):
                reason = (
                    reason or f"{name!r} has a parametrized weight (e.g. weight_norm), computed at each call"
                )
                continue
            found = _module_slices(target, handler, node.pruning_dim)
            if isinstance(found, str):
                reason = reason or f"{name!r} is a {found}"
                continue
            if isinstance(target, nn.LayerNorm):
                exact = False
            prefix = f"{name}." if name else ""
            local = [(n, d) for n, d in found if getattr(target, n, None) is not None]
            if isinstance(target, nn.modules.batchnorm._BatchNorm) and target.affine:
                bn_params.add(f"{prefix}weight")
        for local_name, dim in local:
            pname = f"{prefix}{local_name}"
            if pname in tied_names:
                tied.append(pname)
            key = (pname, dim % params[pname].dim())
            bucket = pairs.setdefault(key, {})
            for pos, ch in zip(item.idxs, item.root_idxs, strict=True):
                bucket[(int(ch), int(pos))] = None
    order = {n: i for i, n in enumerate(names.values())}
    producers = sorted(dict.fromkeys(producers), key=lambda n: order.get(n, len(order)))
    consumers = sorted(dict.fromkeys(consumers), key=lambda n: order.get(n, len(order)))
    if reason is None and reshaped:  # after the reasons that name a layer
        reason = (
            "its channels pass through a view/reshape that splits or merges the channel dimension (e.g. into "
            "attention heads), whose sizes are fixed in the forward code"
        )
    if reason is None and tied:
        shared = sorted({n for p in tied for n in tied_names[p]})
        return _Candidate(
            root, producers, None, f"its channels cut the tied (shared) weight {shared}", tied=True
        )
    if reason is not None:
        return _Candidate(root, producers, None, reason)
    slices = []
    for (pname, dim), bucket in pairs.items():
        chs, poss = zip(*bucket, strict=True)
        slices.append(
            ParamSlice(
                pname,
                dim,
                torch.tensor(chs, dtype=torch.long),
                torch.tensor(poss, dtype=torch.long),
                bn_scale=dim == 0 and pname in bn_params,
            )
        )
    channel_group = ChannelGroup(
        root=root,
        size=size,
        slices=tuple(slices),
        producers=tuple(producers),
        consumers=tuple(consumers),
        exact=exact,
    )
    return _Candidate(root, list(channel_group.producers), channel_group, None)


def _within(name: str, selectors: Iterable[str]) -> bool:
    return any(name == s or name.startswith(f"{s}.") for s in selectors)


def _check_names(model: nn.Module, names: Sequence[str] | None, argument: str) -> list[str]:
    if names is None:
        return []
    if isinstance(names, str):
        names = [names]
    known = [n for n, _ in model.named_modules() if n]
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ValueError(
                f"`{argument}`: no module named {name!r} in {type(model).__name__}.{hint} "
                "Names are qualified as in `model.named_modules()`."
            )
    return list(names)


# --------------------------------------------------------------------------- the pruner


class StructuredPruner:
    """Plan, mask and finally remove whole channel groups of a model.

    The dependency graph is traced once, in eval mode, on ``example_input``. Every Conv/Linear layer in model
    order that is not already part of a group roots a new group. Groups are left out (and listed with the
    reason in :attr:`skipped`) when:

    - their channels reach the model output (the classifier's outputs, a final segmentation conv, a returned
      feature map): the output shape never changes, so nothing needs to be passed as ``ignored`` for it;
    - a module in ``ignored`` would lose output channels (coupled groups are ignored as a whole);
    - masks cannot stand in for removal: the group contains an ``nn.MultiheadAttention`` (torch-pruning
      shrinks its embedding width, not whole heads), a grouped convolution, a GroupNorm, an LSTM or an
      unknown layer, or its channels are split/chunked/sliced in the forward code;
    - its channels cut a weight tensor that several layers share (tied weights, e.g. an embedding used again
      as the decoder): these are also listed in :attr:`tied`, and ``GradualPruning`` refuses them at setup.

    Tracing follows autograd, so it runs with gradients enabled (nothing is backpropagated); train/eval and
    ``requires_grad`` flags are restored afterwards.

    Args:
        model: the model to prune; its weights are not changed here.
        example_input: one input batch: a tensor, a tuple of positional arguments or a dict of keyword
            arguments. It is kept to trace the model again in :meth:`materialize`.
        modules: qualified module names (containers select everything inside); a group is pruned if any of
            its producing layers is selected (``None``: every prunable group).
        ignored: qualified module names whose output channels are kept; every group in which such a module
            would lose outputs is left out. They are still traced, so their inputs shrink with the layers
            that feed them.
        importance: how channels are ranked, one of :data:`IMPORTANCES` (see :meth:`importance_scores`).
        scope: ``"layer"`` (every group loses ``amount`` of its channels) or ``"global"`` (one ranking over
            all groups, after dividing each group's scores by their mean).
        round_to: the number of kept channels per group is rounded to a multiple of this where possible.
        strict: raise when a name in ``modules`` selects no prunable group; with ``False`` such layers are
            only listed in :attr:`skipped` (for selections by type, which also match e.g. the classifier).

    Raises:
        ValueError: if torch-pruning cannot trace the model with ``example_input``, if a name in ``modules``
            or ``ignored`` does not exist or selects no prunable group, or if no group is left.

    Example::

        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
        >>> pruner = StructuredPruner(model, torch.randn(1, 4), round_to=4)
        >>> pruner.groups
        [ChannelGroup(root='0', size=16, producers=('0',), consumers=('2',), exact=True)]
        >>> pruner.skipped
        {'2': 'its channels are outputs of the model, which are never pruned'}
        >>> masks, plan = pruner.compute_masks(model, 0.3)
        >>> sorted(masks), len(plan["0"])
        (['0.bias', '0.weight', '2.weight'], 4)
        >>> pruner.materialize(model, plan)
        Sequential(
          (0): Linear(in_features=4, out_features=12, bias=True)
          (1): ReLU()
          (2): Linear(in_features=12, out_features=2, bias=True)
        )
    """

    def __init__(
        self,
        model: nn.Module,
        example_input: Any,
        *,
        modules: list[str] | None = None,
        ignored: list[str] | None = None,
        importance: str = "l1",
        scope: str = "layer",
        round_to: int = 8,
        strict: bool = True,
    ) -> None:
        self.importance = check_choice(importance, IMPORTANCES, "importance")
        self.scope = check_choice(scope, SCOPES, "scope")
        if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
            raise ValueError(f"`round_to={round_to!r}` must be an integer >= 1 (use 1 for no rounding).")
        self.round_to = round_to
        self.example_input = example_input
        selected = _check_names(model, modules, "modules")
        ignored_names = _check_names(model, ignored, "ignored")
        names = dict(model.named_modules())
        for name in selected:
            if isinstance(names[name], nn.MultiheadAttention):
                raise ValueError(
                    f"`modules` selects {name!r}, a MultiheadAttention: pruning whole attention heads of "
                    f"nn.MultiheadAttention is not supported (torch-pruning {tp.__version__} only shrinks its "
                    "embedding width). Select the Linear/Conv layers to prune instead."
                )

        graph, out_fns = _build_graph(model, example_input)
        visited: set[str] = set()
        candidates: list[_Candidate] = []
        for name, module in model.named_modules():
            if not isinstance(module, _ROOT_TYPES) or module not in graph.module2node or name in visited:
                continue
            candidate = _describe(graph, model, module, name, out_fns)
            visited.update(candidate.producers)
            candidates.append(candidate)

        self.groups: list[ChannelGroup] = []
        self.skipped: dict[str, str] = {}
        self.tied: dict[str, str] = {}
        for cand in candidates:
            if selected and not any(_within(p, selected) for p in cand.producers):
                continue
            blocked = [p for p in cand.producers if _within(p, ignored_names)]
            if blocked:
                self.skipped[cand.root] = f"{blocked[0]!r} is in `ignored`"
            elif cand.group is None:
                self.skipped[cand.root] = str(cand.reason)
                if cand.tied:
                    self.tied[cand.root] = str(cand.reason)
            else:
                self.groups.append(cand.group)

        self._leave_out_unremovable(model)
        for name in selected if strict else ():
            if not any(_within(p, [name]) for g in self.groups for p in g.producers):
                why = [
                    f"{c.root!r}: {self.skipped[c.root]}"
                    for c in candidates
                    if c.root in self.skipped and any(_within(p, [name]) for p in c.producers)
                ]
                detail = (
                    f" ({'; '.join(dict.fromkeys(why))})"
                    if why
                    else " (it is no Conv/Linear layer in the graph)"
                )
                raise NoChannelGroupError(f"`modules`: {name!r} has no prunable channel group{detail}.")
        if not self.groups and self.tied:
            raise NoChannelGroupError(tied_weights_message(self.tied))
        if not self.groups:
            why = (
                "; ".join(f"{r!r}: {w}" for r, w in self.skipped.items()) or "no Conv/Linear layer was traced"
            )
            raise NoChannelGroupError(
                f"{type(model).__name__} has no prunable channel group ({why}). Check `modules`/`ignored`."
            )
        if self.importance == "bn_scale":
            for group in self.groups:
                self._bn_slices(group)

    def _leave_out_unremovable(self, model: nn.Module) -> None:
        """Leave out (with the reason in :attr:`skipped`) the groups whose removal breaks the model's forward, e.g.
        hand-written attention that reads the head width from its input's shape (``C = x.shape[-1]``) while its
        q/k/v projections are left whole: checked on a copy with one channel of each group removed, then, if that
        fails, group by group."""

        def failure(groups: list[ChannelGroup]) -> str | None:
            kept, self.groups = self.groups, groups
            try:
                trial = self.materialize(copy.deepcopy(model).eval(), {g.root: [0] for g in groups})
                with torch.no_grad():
                    call_module(trial, to_device(self.example_input, next(trial.parameters()).device))
                return None
            except Exception as error:  # whatever the user's forward raises on the narrower model
                return (
                    f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
                    if str(error)
                    else type(error).__name__
                )
            finally:
                self.groups = kept

        candidates = [g for g in self.groups if g.size > 1]
        if not candidates or failure(candidates) is None:
            return
        for group in candidates:
            if (reason := failure([group])) is not None:
                self.groups.remove(group)
                self.skipped[group.root] = f"the forward fails once its channels are removed ({reason})"

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(groups={[g.root for g in self.groups]}, importance={self.importance!r}, "
            f"scope={self.scope!r}, round_to={self.round_to})"
        )

    # ----------------------------------------------------------------------- helpers

    @property
    def roots(self) -> list[str]:
        """Root names of the prunable groups, in model order."""
        return [g.root for g in self.groups]

    def _group(self, root: str, argument: str) -> ChannelGroup:
        for group in self.groups:
            if group.root == root:
                return group
        raise ValueError(
            f"`{argument}` names {root!r}, which is no group root of this pruner. Roots: {self.roots}."
        )

    def _params(self, model: nn.Module) -> dict[str, Tensor]:
        params = dict(model.named_parameters())
        for group in self.groups:
            for s in group.slices:
                p = params.get(s.param)
                if p is None or p.dim() <= s.dim or p.shape[s.dim] <= int(s.positions.max()):
                    found = "missing" if p is None else f"of shape {tuple(p.shape)}"
                    raise ValueError(
                        f"`model` does not match the model this pruner was built on: parameter {s.param!r} is "
                        f"{found}. Pass the same model (before `materialize`), or build a new pruner."
                    )
        return params

    def _bn_slices(self, group: ChannelGroup) -> list[ParamSlice]:
        found = [s for s in group.slices if s.bn_scale]
        if not found:
            raise ValueError(
                f"`importance='bn_scale'` needs a BatchNorm with affine weights in every group, and group "
                f"{group.root!r} has none. Use another importance (e.g. 'l1') or put {group.root!r} in `ignored`."
            )
        return found

    def _removed_channels(
        self, plan: Mapping[str, Sequence[int]], argument: str = "plan"
    ) -> dict[str, Tensor]:
        """Check a plan and return ``{root: bool tensor of removed channels}`` for every group."""
        if not isinstance(plan, Mapping):
            raise TypeError(f"`{argument}` must be a mapping {{root name: list of channel indices}}.")
        removed = {g.root: torch.zeros(g.size, dtype=torch.bool) for g in self.groups}
        for root, idxs in plan.items():
            group = self._group(root, argument)
            idxs = [int(i) for i in idxs]
            bad = [i for i in idxs if not 0 <= i < group.size]
            if bad:
                raise ValueError(f"`{argument}[{root!r}]` has indices {bad} outside [0, {group.size}).")
            removed[root][idxs] = True
            if bool(removed[root].all()):
                raise ValueError(
                    f"`{argument}[{root!r}]` removes all {group.size} channels; keep at least one."
                )
        return removed

    # ----------------------------------------------------------------------- scoring

    def importance_scores(
        self,
        model: nn.Module,
        grads: Mapping[str, Tensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """One score per channel and group (``{root: float tensor of size group.size}``, on the CPU).

        Scores aggregate every slice of the group, so a channel is judged by everything removed with it:

        - ``"l1"``: sum of ``|w|``; ``"l2"``: square root of the sum of ``w**2``;
        - ``"bn_scale"``: ``|gamma|`` of the group's BatchNorm (the mean over BatchNorms when a residual add
          couples several);
        - ``"taylor"``: sum of ``|w * grad|`` (``grads`` keyed by parameter name, e.g. accumulated
          ``p.grad``);
        - ``"random"``: uniform, reproducible with ``generator``.

        Args:
            model: the model the pruner was built on (or one with the same parameter names and shapes).
            grads: gradients by parameter name, needed by ``"taylor"``.
            generator: random source for ``"random"``.

        Example::

            >>> model = nn.Sequential(nn.Linear(2, 3, bias=False), nn.Linear(3, 1, bias=False))
            >>> with torch.no_grad():
            ...     _ = model[0].weight.copy_(torch.tensor([[1.0, -1.0], [0.0, 3.0], [0.5, 0.0]]))
            ...     _ = model[1].weight.fill_(1.0)
            >>> pruner = StructuredPruner(model, torch.randn(1, 2), round_to=1)
            >>> pruner.importance_scores(model)
            {'0': tensor([3.0000, 4.0000, 1.5000])}
        """
        params = self._params(model)
        if self.importance == "taylor" and not grads:
            raise ValueError(
                "`importance='taylor'` needs gradients: pass `grads={parameter name: gradient}` (e.g. "
                "`{n: p.grad for n, p in model.named_parameters()}` after a backward pass)."
            )
        scores: dict[str, Tensor] = {}
        for group in self.groups:
            if self.importance == "random":
                scores[group.root] = torch.rand(group.size, generator=generator).float()
                continue
            if self.importance == "bn_scale":
                bns = self._bn_slices(group)
                total = torch.zeros(group.size)
                for s in bns:
                    gamma = params[s.param].detach().float().abs().cpu()
                    total.index_add_(0, s.channels, gamma[s.positions])
                scores[group.root] = total / len(bns)
                continue
            total = torch.zeros(group.size, dtype=torch.float64)
            used = 0
            for s in group.slices:
                w = params[s.param].detach()
                if self.importance == "taylor":
                    g = grads.get(s.param) if grads is not None else None
                    if g is None:
                        continue
                    values = (w.float() * g.detach().float().to(w.device)).abs()
                elif self.importance == "l1":
                    values = w.float().abs()
                else:
                    values = w.float().square()
                others = [d for d in range(values.dim()) if d != s.dim]
                per_pos = (values.sum(dim=others) if others else values).double().cpu()
                total.index_add_(0, s.channels, per_pos[s.positions])
                used += 1
            if self.importance == "taylor" and used == 0:
                raise ValueError(
                    f"`importance='taylor'` needs gradients, and `grads` has none for group {group.root!r} "
                    f"(parameters {group.params}). Pass the gradients of these parameters."
                )
            if self.importance == "l2":
                total = total.sqrt()
            scores[group.root] = total.float()
        return scores

    # ----------------------------------------------------------------------- planning

    def _kept(self, size: int, n_prune: int, n_forced: int) -> int:
        """Channels kept in a group of ``size`` when ``n_prune`` are wanted and ``n_forced`` already went."""
        keep = size - n_prune
        if size >= self.round_to:
            keep = math.floor(keep / self.round_to + 0.5) * self.round_to
            keep = max(keep, self.round_to)
        return max(1, min(keep, size, size - n_forced))

    def group_amounts(self, amount: float, amounts: Mapping[str, float] | None = None) -> dict[str, float]:
        """The amount of every group: ``amounts[root]`` where given (``scope="layer"`` only), else ``amount``.

        Example::

            >>> model = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))
            >>> StructuredPruner(model, torch.randn(1, 2), round_to=1).group_amounts(0.5, {"2": 0.25})
            {'0': 0.5, '2': 0.25}
        """
        amount = validate_amount(amount)
        if not amounts:
            return {g.root: amount for g in self.groups}
        if self.scope != "layer":
            raise ValueError(
                "Per-group `amounts` apply to `scope='layer'`; a global ranking chooses what each group loses."
            )
        for root in amounts:
            self._group(root, "amounts")
        return {
            g.root: validate_amount(amounts.get(g.root, amount), f"amounts[{g.root!r}]") for g in self.groups
        }

    def removable(self, amount: float, amounts: Mapping[str, float] | None = None) -> dict[str, int]:
        """The most channels each group can lose at ``amount`` (or its own in ``amounts``, by root) after rounding
        to ``round_to`` (exact for ``scope="layer"``, an upper bound for ``"global"``); ``0`` marks a group that
        pruning leaves whole.

        Example::

            >>> model = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 1))
            >>> StructuredPruner(model, torch.randn(1, 2), round_to=8).removable(0.5)
            {'0': 0}
            >>> StructuredPruner(model, torch.randn(1, 2), round_to=1).removable(0.5)
            {'0': 4}
            >>> StructuredPruner(model, torch.randn(1, 2), round_to=1).removable(0.5, {"0": 0.75})
            {'0': 6}
        """
        per_group = self.group_amounts(amount, amounts)
        if self.scope == "layer":
            return {
                g.root: g.size - self._kept(g.size, math.floor(per_group[g.root] * g.size + 1e-9), 0)
                for g in self.groups
            }
        amount = validate_amount(amount)
        if math.floor(amount * sum(g.size for g in self.groups) + 1e-9) == 0:
            return {g.root: 0 for g in self.groups}
        return {g.root: g.size - self._kept(g.size, g.size, 0) for g in self.groups}

    def compute_masks(
        self,
        model: nn.Module,
        amount: float,
        *,
        grads: Mapping[str, Tensor] | None = None,
        previous: Mapping[str, Sequence[int]] | None = None,
        generator: torch.Generator | None = None,
        amounts: Mapping[str, float] | None = None,
    ) -> tuple[dict[str, Tensor], dict[str, list[int]]]:
        """Choose the channels to remove and return ``(masks, plan)``.

        ``amount`` is the absolute fraction of channels removed, ``floor(amount * size)`` per group
        (``scope="layer"``; a group in ``amounts``, by root, uses its own) or over all groups
        (``scope="global"``); the kept count of each group is then
        rounded to the nearest multiple of ``round_to`` (at least ``round_to`` kept, and never all removed;
        groups smaller than ``round_to`` keep at least one channel). Channels removed in ``previous`` stay
        removed, even if that leaves a kept count off the ``round_to`` grid.

        Args:
            model: the model the pruner was built on.
            amount: fraction of channels removed, in ``[0, 1)``.
            grads: gradients by parameter name, for ``importance="taylor"``.
            previous: an earlier plan; its channels stay removed, so plans only grow.
            generator: random source for ``importance="random"``.
            amounts: ``scope="layer"``: the amount of some groups, by root (the others use ``amount``).

        Returns:
            ``masks``: ``{parameter name: bool tensor of its shape, True = keep}`` for every parameter the
            groups touch (producers' weights and biases, BatchNorm weight and bias, consumers' inputs);
            ``plan``: ``{root: sorted removed channel indices}`` for every group.

        Example::

            >>> _ = torch.manual_seed(0)
            >>> model = nn.Sequential(nn.Conv2d(3, 32, 3), nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 4, 1))
            >>> pruner = StructuredPruner(model, torch.randn(1, 3, 8, 8), round_to=8)
            >>> masks, plan = pruner.compute_masks(model, 0.3)
            >>> 32 - len(plan["0"]), int(masks["1.bias"].sum()), tuple(masks["3.weight"].shape)
            (24, 24, (4, 32, 1, 1))
            >>> _, later = pruner.compute_masks(model, 0.5, previous=plan)
            >>> set(plan["0"]) <= set(later["0"]), len(later["0"])
            (True, 16)
        """
        per_group = self.group_amounts(amount, amounts)
        forced = self._removed_channels(previous or {}, "previous")
        scores = self.importance_scores(model, grads=grads, generator=generator)
        counts: dict[str, int] = {}
        if self.scope == "layer":
            for g in self.groups:
                n_forced = int(forced[g.root].sum())
                want = max(math.floor(per_group[g.root] * g.size + 1e-9), n_forced)
                counts[g.root] = g.size - self._kept(g.size, want, n_forced)
        else:
            counts = self._global_counts(amount, scores, forced)
        plan: dict[str, list[int]] = {}
        for g in self.groups:
            removed = forced[g.root].clone()
            extra = counts[g.root] - int(removed.sum())
            if extra > 0:
                s = scores[g.root].clone().double()
                s[removed] = math.inf
                order = torch.sort(s, stable=True).indices
                removed[order[:extra]] = True
            plan[g.root] = [int(i) for i in torch.nonzero(removed).flatten()]
        return self.masks_from_plan(model, plan), plan

    def _global_counts(
        self, amount: float, scores: Mapping[str, Tensor], forced: Mapping[str, Tensor]
    ) -> dict[str, int]:
        total = sum(g.size for g in self.groups)
        budget = math.floor(amount * total + 1e-9) - sum(int(f.sum()) for f in forced.values())
        n = {g.root: int(forced[g.root].sum()) for g in self.groups}
        cap = {g.root: g.size - (self.round_to if g.size >= self.round_to else 1) for g in self.groups}
        pooled, owner = [], []
        for i, g in enumerate(self.groups):
            s = scores[g.root].double()
            mean = float(s[~forced[g.root]].mean()) if bool((~forced[g.root]).any()) else 0.0
            s = s / mean if mean > 0 and math.isfinite(mean) else s
            pooled.append(s[~forced[g.root]])
            owner.extend([i] * int((~forced[g.root]).sum()))
        if budget > 0 and owner:
            order = torch.sort(torch.cat(pooled), stable=True).indices.tolist()
            for k in order:
                if budget <= 0:
                    break
                root = self.groups[owner[k]].root
                if n[root] < cap[root]:
                    n[root] += 1
                    budget -= 1
        return {
            g.root: g.size - self._kept(g.size, n[g.root], int(forced[g.root].sum())) for g in self.groups
        }

    def masks_from_plan(self, model: nn.Module, plan: Mapping[str, Sequence[int]]) -> dict[str, Tensor]:
        """Parameter masks (``True`` = keep) that zero the channels of ``plan``, for every touched parameter.

        Example::

            >>> model = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 1))
            >>> pruner = StructuredPruner(model, torch.randn(1, 2), round_to=1)
            >>> pruner.masks_from_plan(model, {"0": [1, 2]})["2.weight"]
            tensor([[ True, False, False,  True]])
        """
        removed = self._removed_channels(plan)
        params = self._params(model)
        masks: dict[str, Tensor] = {}
        for group in self.groups:
            for s in group.slices:
                p = params[s.param]
                mask = masks.get(s.param)
                if mask is None:
                    mask = masks[s.param] = torch.ones(p.shape, dtype=torch.bool, device=p.device)
                hit = s.positions[removed[group.root][s.channels]]
                if hit.numel():
                    mask.index_fill_(s.dim, hit.to(p.device), False)
        return masks

    # ----------------------------------------------------------------------- removal

    def materialize(self, model: nn.Module, plan: Mapping[str, Sequence[int]]) -> nn.Module:
        """Remove the channels of ``plan`` from ``model`` in place with torch-pruning and return it.

        The dependency graph is traced again on ``model``, so ``model`` may be a copy of the model the pruner
        was built on (``copy.deepcopy``, or a new instance with the same weights). BatchNorm running
        statistics, biases and existing ``.grad`` tensors shrink with the weights; ``requires_grad`` flags are
        kept. Parameters are replaced by new tensors: an optimizer created before still holds the old ones,
        so create a new optimizer (and drop any masks) afterwards.

        Example::

            >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 2, 1))
            >>> pruner = StructuredPruner(model, torch.randn(1, 3, 6, 6), round_to=1)
            >>> pruned = pruner.materialize(model, {"0": [0, 5, 7]})
            >>> pruned[0].out_channels, pruned[1].running_mean.shape, pruned[3].in_channels
            (5, torch.Size([5]), 5)
        """
        removed = self._removed_channels(plan)
        names = dict(model.named_modules())
        for group in self.groups:
            if group.root not in names:
                raise ValueError(
                    f"`model` has no module {group.root!r}; pass the model this pruner was built on or a copy."
                )
        requires = {n: p.requires_grad for n, p in model.named_parameters()}
        graph, _ = _build_graph(model, self.example_input)
        module_names = {m: n for n, m in names.items()}
        param_names = {p: n for n, p in model.named_parameters()}
        with torch.no_grad():
            for group in self.groups:
                idxs = [int(i) for i in torch.nonzero(removed[group.root]).flatten()]
                if not idxs:
                    continue
                module = names[group.root]
                pruner = graph.get_pruner_of_module(module)
                current = pruner.get_out_channels(module)
                if current != group.size:
                    raise ValueError(
                        f"{group.root!r} has {current} output channels but the plan was made for {group.size}; "
                        "was the model already pruned? Build a new pruner on it."
                    )
                found = graph.get_pruning_group(module, pruner.prune_out_channels, idxs)
                producers = {
                    param_names.get(item.dep.target.module) or module_names.get(item.dep.target.module)
                    for item in found
                    if item.dep.target.type not in _NO_PARAMS
                    and graph.is_out_channel_pruning_fn(item.dep.handler)
                }
                if producers != set(group.producers):
                    raise ValueError(
                        f"The channels of {group.root!r} are coupled differently in `model` "
                        f"({sorted(map(str, producers))}) than in the model the pruner was built on "
                        f"({list(group.producers)}). Pass that model or a copy of it."
                    )
                found.prune(record_history=False)
        for n, p in model.named_parameters():
            if n in requires:
                p.requires_grad_(requires[n])
        return model
