"""Stochastic depth and block removal for residual networks, in plain torch (no Lightning).

- :func:`find_blocks`: the residual blocks of a model, named or found from an example input;
- :class:`DepthDrop`: forward hooks that skip blocks at random while training (Huang et al., 2016);
- :func:`measure_importance`, :func:`plan_removal`, :func:`replace_by_identity`: rank the blocks by the loss
  increase when each alone is skipped, and replace the least important ones by ``nn.Identity``
  (:func:`remove_blocks_` does all three);
- :func:`restore_depth`: give a freshly built model the structure of a checkpoint with removed blocks.

A *residual block* is a module whose forward computes ``x + f(x)`` internally. Its output ``y`` then has the shape
of its input ``x``, and ``f = y - x`` is its residual: skipping the block means returning ``x``.
"""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
import functools
import hashlib
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_compress import _checks
from lightning_compress._checkpoints import HINT_PREFIX, configure_fresh_model, drop_checkpoint_hints
from lightning_compress._inputs import call_module, first_input, input_shapes, to_device
from lightning_compress.selection import Selector
from lightning_compress.stats import count_macs_per_sample

__all__ = [
    "CONTAINERS",
    "MODES",
    "DepthConfig",
    "DepthDrop",
    "RemovalPlan",
    "absent_blocks",
    "check_neighbours",
    "check_removal",
    "checkpoint_hint",
    "cross_entropy_loss",
    "draw_keep",
    "find_blocks",
    "hinted_blocks",
    "measure_importance",
    "plan_removal",
    "put_back",
    "remove_blocks_",
    "removed_in",
    "replace_by_identity",
    "restore_depth",
    "stochastic_depth_",
    "survival_probabilities",
    "trace_calls",
]

MODES = ("row", "batch")
# Modules that only hold others: never a block themselves, the blocks are found inside them.
CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
LossFn = Callable[[nn.Module, Any], Tensor]


@dataclass(frozen=True)
class DepthConfig:
    """What stochastic depth and block removal do (validated on construction).

    Args:
        blocks: the residual blocks: name patterns (glob, or ``"re:..."``) and/or module types, as ``modules`` in
            every callback (types and patterns together: a block must match both); ``None``: found by
            :func:`find_blocks`.
        survival: the probability that the last block is kept while training, in ``(0, 1]``; block ``l`` of
            ``L`` survives with ``1 - l/L * (1 - survival)`` (1: no stochastic depth).
        mode: ``"row"``: one keep/skip draw per sample; ``"batch"``: one per block and step.
        seed: seeds the draws (with the step and the block's index) and the batches the removal ranks on.
        remove: the number of blocks to remove (``None``: none, unless ``target_macs``).
        target_macs: remove blocks until the MACs per sample are at most this fraction of the original's.
        removal_batches: training batches the loss increase of each skipped block is measured on.

    Example::

        >>> DepthConfig(survival=0.5).survival
        0.5
        >>> DepthConfig(survival=0.0)
        Traceback (most recent call last):
        ...
        ValueError: `survival=0.0` must be a number > 0 and <= 1: the probability that the last block is kept while training (1 keeps every block).
    """

    blocks: Selector = None
    survival: float = 0.8
    mode: str = "row"
    seed: int = 0
    remove: int | None = None
    target_macs: float | None = None
    removal_batches: int = 4

    def __post_init__(self) -> None:
        _check_blocks(self.blocks)
        survival = _checks.check_number(
            self.survival,
            "survival",
            0.0,
            1.0,
            low_open=True,
            hint="the probability that the last block is kept while training (1 keeps every block).",
        )
        object.__setattr__(self, "survival", survival)
        _checks.check_choice(self.mode, "mode", MODES)
        _checks.check_int(self.seed, "seed", 0)
        if self.remove is not None and self.target_macs is not None:
            raise ValueError(
                f"`remove={self.remove!r}` and `target_macs={self.target_macs!r}` both say how many blocks to "
                "remove: give one of them."
            )
        if self.remove is not None:
            _checks.check_int(self.remove, "remove", 1, hint="the number of blocks to remove (None: none).")
        if self.target_macs is not None:
            target = _checks.check_number(
                self.target_macs,
                "target_macs",
                0.0,
                1.0,
                low_open=True,
                high_open=True,
                hint="the MACs per sample kept, as a fraction of the original model's, e.g. 0.7.",
            )
            object.__setattr__(self, "target_macs", target)
        _checks.check_int(self.removal_batches, "removal_batches", 1)

    @property
    def removes(self) -> bool:
        """Whether blocks are removed (``remove`` or ``target_macs`` given)."""
        return self.remove is not None or self.target_macs is not None


def _check_blocks(blocks: Any) -> None:
    if blocks is None:
        return
    items = [blocks] if isinstance(blocks, str | type) else blocks
    valid = isinstance(items, Iterable) and not isinstance(items, Mapping)
    items = list(items) if valid else []
    valid = valid and bool(items)
    for item in items:
        if isinstance(item, str) and item.startswith("re:"):
            try:
                re.compile(item[3:])
            except re.error as err:
                raise ValueError(
                    f"`blocks` pattern {item!r} is not a valid regular expression: {err}"
                ) from None
        ok = (isinstance(item, str) and item) or (isinstance(item, type) and issubclass(item, nn.Module))
        valid = valid and bool(ok)
    if not valid:
        raise TypeError(
            f"`blocks={blocks!r}` must be name patterns (e.g. 'layer*.*' or 're:blocks\\.\\d+') and/or residual "
            "block types (e.g. BasicBlock), or a list of them; None finds the blocks."
        )


# -- finding the blocks ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Call:
    """The first call of a module on the example input: shapes of its first input and of its output."""

    input_shape: tuple[int, ...] | None
    output_shape: tuple[int, ...] | str | None  # None: no output; a str: the output's type, not a tensor
    arguments: int


def _first_tensor(args: tuple, kwargs: Mapping[str, Any]) -> Tensor | None:
    return next((v for v in (*args, *kwargs.values()) if isinstance(v, Tensor)), None)


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    # Each submodule's own flag is restored: a model partly in eval mode stays that way.
    saved = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in saved:
            module.training = training


def trace_calls(model: nn.Module, example_input: Any) -> dict[str, _Call]:
    """The first call of every submodule in one forward on ``example_input`` (eval mode, no gradients), in the
    order the calls end."""
    calls: dict[str, _Call] = {}

    def record(name: str, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if name not in calls:
            first = _first_tensor(args, kwargs)
            out = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
            shape = None if first is None else tuple(first.shape)
            calls[name] = _Call(shape, out, len(args) + len(kwargs))

    handles = [
        module.register_forward_hook(functools.partial(record, name), with_kwargs=True)
        for name, module in model.named_modules()
        if name
    ]
    try:
        with _eval_mode(model), torch.no_grad():
            call_module(model, example_input)
    finally:
        for handle in handles:
            handle.remove()
    return calls


def find_blocks(
    model: nn.Module, example_input: Any, blocks: Selector = None, removable: bool = False
) -> list[str]:
    """The qualified names of the residual blocks of ``model``, in forward order.

    With ``blocks=None`` a module is a block when all of these hold:

    1. it is not ``model`` itself and not a container (``nn.Sequential``, ``nn.ModuleList``, ``nn.ModuleDict``:
       stages are searched, not taken as a block);
    2. it has child modules and holds parameters (a single layer such as a same-padding convolution or a
       normalization is not a block);
    3. in a forward on ``example_input`` (eval mode) it returns one tensor of the shape of its first input;
    4. no module inside it satisfies 1-3 (a stage that is a module of its own, holding blocks, is not one).

    So in a ResNet the blocks with identity shortcuts are found, the downsampling ones (whose shape changes) are
    not. A block whose own submodules also keep the shape (an attention or MLP sublayer of a transformer block,
    a squeeze-excitation) is passed over for them: name the blocks with ``blocks`` there.

    Named ``blocks`` are checked the same way: each must be called and return a tensor of its input's shape, and
    no named block may hold another.

    Args:
        model: the model.
        example_input: an input of the model (a tensor, a tuple of positional arguments or a dict of keywords).
        blocks: name patterns and/or types (see :class:`DepthConfig`); ``None``: found as above.
        removable: each block is also called with one argument only (a removed block becomes ``nn.Identity``,
            which takes one).

    Example::

        >>> class Residual(nn.Module):
        ...     def __init__(self, width):
        ...         super().__init__()
        ...         self.fc = nn.Linear(width, width)
        ...     def forward(self, x):
        ...         return x + self.fc(x)
        >>> model = nn.Sequential(nn.Linear(2, 4), Residual(4), Residual(4), nn.Linear(4, 1))
        >>> find_blocks(model, torch.zeros(1, 2))
        ['1', '2']
        >>> find_blocks(model, torch.zeros(1, 2), blocks="0")
        Traceback (most recent call last):
        ...
        ValueError: `blocks`: block '0' (Linear) returns shape (1, 4) from an input of shape (1, 2); a residual block returns the shape of its input. Name only blocks whose output is `x + f(x)`.
    """
    calls = trace_calls(model, example_input)
    modules = dict(model.named_modules())
    if blocks is None:
        candidates = {
            name
            for name, module in modules.items()
            if name
            and not isinstance(module, CONTAINERS)
            and any(True for _ in module.children())
            and any(True for _ in module.parameters())
            and name in calls
            and calls[name].input_shape is not None
            and calls[name].input_shape == calls[name].output_shape
        }
        found = [n for n in calls if n in candidates and not any(c.startswith(n + ".") for c in candidates)]
        if not found:
            raise ValueError(
                f"Found no residual block in {type(model).__name__}: no submodule other than containers and "
                f"single layers returns a tensor of its input's shape on the example input of shape "
                f"{input_shapes(example_input)}. Name the blocks with `blocks=` (name patterns or types)."
            )
    else:
        named = _select(model, blocks)
        nested = [(a, b) for a in named for b in named if b.startswith(a + ".")]
        if nested:
            raise ValueError(
                f"`blocks` selects {nested[0][0]!r} and {nested[0][1]!r}, one inside the other: name only the "
                "residual blocks themselves."
            )
        for name in named:
            _check_block(name, modules[name], calls.get(name))
        found = [n for n in calls if n in named]
    if removable:
        for name in found:
            if calls[name].arguments != 1:
                raise ValueError(
                    f"Block {name!r} is called with {calls[name].arguments} arguments, but a removed block becomes "
                    "`nn.Identity`, which takes one. Leave it out of `blocks`, or do not remove blocks."
                )
    return found


def _select(model: nn.Module, blocks: Selector) -> list[str]:
    items = [blocks] if isinstance(blocks, str | type) else list(blocks or ())
    types = tuple(i for i in items if isinstance(i, type))
    patterns = [i for i in items if isinstance(i, str)]
    names = [n for n, _ in model.named_modules() if n]
    for pattern in patterns:
        if not any(_matches(n, pattern) for n in names):
            close = difflib.get_close_matches(pattern, names, n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ValueError(
                f"`blocks`: no module name matches {pattern!r} in {type(model).__name__}.{hint} Names are qualified "
                "as in `model.named_modules()`."
            )
    chosen = [
        n
        for n, m in model.named_modules()
        if n
        and (not types or isinstance(m, types))
        and (not patterns or any(_matches(n, p) for p in patterns))
    ]
    if not chosen:
        raise ValueError(f"`blocks={blocks!r}` selects no module of {type(model).__name__}.")
    return chosen


def _matches(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def _check_block(name: str, module: nn.Module, call: _Call | None) -> None:
    kind = type(module).__name__
    if call is None:
        raise ValueError(
            f"`blocks`: block {name!r} ({kind}) is not called in the model's forward on the example input, so it "
            "can be neither skipped nor removed. Name blocks that the forward calls."
        )
    if call.input_shape is None or call.input_shape != call.output_shape:
        got = (
            f"shape {call.output_shape}" if isinstance(call.output_shape, tuple) else f"a {call.output_shape}"
        )
        raise ValueError(
            f"`blocks`: block {name!r} ({kind}) returns {got} from an input of shape {call.input_shape}; a "
            "residual block returns the shape of its input. Name only blocks whose output is `x + f(x)`."
        )


# -- stochastic depth -----------------------------------------------------------------------------------------


def survival_probabilities(count: int, survival: float) -> list[float]:
    """The probability that each of ``count`` blocks (in forward order) is kept: ``1 - l/L * (1 - survival)``
    for block ``l`` of ``L`` (1-based), so the last keeps ``survival``.

    Example::

        >>> survival_probabilities(4, 0.6)
        [0.9, 0.8, 0.7, 0.6]
    """
    return [round(1.0 - (index / count) * (1.0 - survival), 12) for index in range(1, count + 1)]


def _seed(*values: int) -> int:
    # The same on every process and every run (Python's `hash` of a tuple is not, across interpreters).
    digest = hashlib.blake2b(repr(values).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def draw_keep(
    seed: int,
    step: int,
    index: int,
    size: int,
    probability: float,
    device: torch.device | str = "cpu",
    micro_batch: int = 0,
) -> Tensor:
    """Which of ``size`` rows block ``index`` keeps at optimizer ``step`` (``micro_batch``: the batch within a
    step of gradient accumulation): a bool tensor, ``True`` with ``probability``.

    Drawn from a generator of its own seeded from these numbers, so the draws are the same on every process and
    after a resume, and the global random state does not move.

    Example::

        >>> keep = draw_keep(seed=0, step=3, index=1, size=10_000, probability=0.8)
        >>> torch.equal(keep, draw_keep(0, 3, 1, 10_000, 0.8)), round(keep.float().mean().item(), 2)
        (True, 0.8)
    """
    device = torch.device(device)
    try:
        generator = torch.Generator(device=device)
    except RuntimeError:  # a device without generators of its own: draw on the CPU
        generator, draw_on = torch.Generator(), torch.device("cpu")
    else:
        draw_on = device
    generator.manual_seed(_seed(seed, step, micro_batch, index))
    return (torch.rand(size, generator=generator, device=draw_on) < probability).to(device)


class DepthDrop:
    """Stochastic depth (Huang et al., 2016) by forward hooks on the blocks of a model.

    With ``y = block(x)`` and the residual ``f = y - x``, a hook rewrites the output of a block in training mode:
    kept, ``x + f / p`` (scaled so that its expectation is the eval-mode output ``y``); skipped, ``x``. ``p`` is
    the block's survival probability (:func:`survival_probabilities` over the blocks still in the model), and the
    draws come from :func:`draw_keep` at the step set by :meth:`set_step`. In eval mode the output is left as it
    is. The block still runs (only its output is rewritten): training is not faster.

    Args:
        model: the model whose blocks are hooked (no method of it is replaced).
        blocks: the blocks' qualified names, in forward order (see :func:`find_blocks`).
        survival, mode, seed: see :class:`DepthConfig`.

    Example::

        >>> class Residual(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.fc = nn.Linear(3, 3)
        ...     def forward(self, x):
        ...         return x + self.fc(x)
        >>> model = nn.Sequential(Residual(), Residual())
        >>> drop = DepthDrop(model, ["0", "1"], survival=0.5, mode="batch")
        >>> drop.probabilities
        {'0': 0.75, '1': 0.5}
        >>> x = torch.randn(2, 3)
        >>> torch.equal(model.eval()(x), nn.Sequential(*model)(x))  # eval: unchanged
        True
        >>> drop.set_step(7)
        >>> _ = model.train()(x)
        >>> float(drop.kept_fraction()) in (0.0, 0.5, 1.0)
        True
        >>> drop.remove()
    """

    def __init__(
        self, model: nn.Module, blocks: Sequence[str], survival: float = 0.8, mode: str = "row", seed: int = 0
    ) -> None:
        config = DepthConfig(survival=survival, mode=mode, seed=seed)
        self.survival, self.mode, self.seed = config.survival, config.mode, config.seed
        self.blocks = list(blocks)
        self.step, self.micro_batch = 0, 0
        self.kept: dict[str, Tensor] = {}
        self.handles = [
            model.get_submodule(name).register_forward_hook(
                functools.partial(self._hook, name), with_kwargs=True
            )
            for name in self.blocks
        ]
        self.arrange(model)

    def arrange(self, model: nn.Module) -> None:
        """Number the blocks still in ``model`` (removed ones, now ``nn.Identity``, are left out) and give each its
        survival probability."""
        gone = set(removed_in(model, self.blocks))
        present = [n for n in self.blocks if n not in gone and _submodule(model, n) is not None]
        self.index = {name: index for index, name in enumerate(present, 1)}
        self.probabilities = dict(
            zip(present, survival_probabilities(len(present), self.survival), strict=True)
        )

    def set_step(self, step: int, micro_batch: int = 0) -> None:
        """The optimizer step (and batch within it) the next draws belong to; forgets the last step's record."""
        self.step, self.micro_batch = step, micro_batch
        self.kept = {}

    def kept_fraction(self) -> Tensor | None:
        """The fraction of blocks kept in the training forwards since :meth:`set_step` (``None``: none ran)."""
        if not self.kept:
            return None
        return torch.stack([value.to(torch.float32) for value in self.kept.values()]).mean()

    def remove(self) -> None:
        """Remove the hooks."""
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _hook(self, name: str, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        probability = self.probabilities.get(name)
        if not module.training or probability is None or probability >= 1.0 or not isinstance(output, Tensor):
            return None
        x = _first_tensor(args, kwargs)
        if x is None or x.shape != output.shape:
            raise RuntimeError(
                f"Block {name!r} returned shape {tuple(output.shape)} from an input of shape "
                f"{None if x is None else tuple(x.shape)}: stochastic depth needs a residual block, whose output "
                "has the shape of its input."
            )
        size = output.shape[0] if self.mode == "row" and output.dim() > 0 else 1
        keep = draw_keep(
            self.seed, self.step, self.index[name], size, probability, output.device, self.micro_batch
        )
        self.kept[name] = keep.detach().float().mean()
        keep = keep.reshape(-1, *([1] * (output.dim() - 1)))
        return torch.where(keep, x + (output - x) / probability, x)


def _submodule(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def removed_in(model: nn.Module, blocks: Iterable[str]) -> list[str]:
    """The ``blocks`` that are ``nn.Identity`` in ``model`` (removed).

    Example::

        >>> removed_in(nn.Sequential(nn.Linear(2, 2), nn.Identity()), ["0", "1"])
        ['1']
    """
    return [name for name in blocks if isinstance(_submodule(model, name), nn.Identity)]


def stochastic_depth_(model: nn.Module, config: DepthConfig, example_input: Any) -> DepthDrop:
    """Find the blocks of ``model`` (``config.blocks``) and attach stochastic depth to them.

    Call ``drop.set_step(step)`` before each training step, ``drop.remove()`` when done.

    Example::

        >>> class Residual(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.fc = nn.Linear(3, 3)
        ...     def forward(self, x):
        ...         return x + self.fc(x)
        >>> drop = stochastic_depth_(nn.Sequential(Residual(), Residual()), DepthConfig(), torch.zeros(1, 3))
        >>> drop.probabilities
        {'0': 0.9, '1': 0.8}
    """
    blocks = find_blocks(model, example_input, config.blocks)
    return DepthDrop(model, blocks, config.survival, config.mode, config.seed)


# -- block removal --------------------------------------------------------------------------------------------


def cross_entropy_loss(model: nn.Module, batch: Any) -> Tensor:
    """The default loss: cross entropy of ``model(x)`` against ``y`` for ``(x, ..., y)`` batches."""
    if not isinstance(batch, list | tuple) or len(batch) < 2:
        raise TypeError(
            f"The default loss reads `(x, y)` batches, got a {type(batch).__name__}. Pass "
            "`loss_fn(model, batch) -> scalar tensor`."
        )
    return F.cross_entropy(call_module(model, first_input(batch)), batch[-1])


def measure_importance(
    model: nn.Module, blocks: Sequence[str], batches: Iterable[Any], loss_fn: LossFn | None = None
) -> tuple[float, dict[str, float]]:
    """The mean loss over ``batches`` (eval mode, no gradients), and its increase when each block alone is
    skipped (returns its input).

    Example::

        >>> class Residual(nn.Module):
        ...     def __init__(self, scale):
        ...         super().__init__()
        ...         self.fc = nn.Linear(2, 2)
        ...         self.scale = scale
        ...     def forward(self, x):
        ...         return x + self.scale * self.fc(x)
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(Residual(1.0), Residual(0.0))
        >>> batches = [(torch.randn(8, 2), torch.randint(0, 2, (8,)))]
        >>> base, increase = measure_importance(model, ["0", "1"], batches)
        >>> increase["1"], increase["0"] != 0.0
        (0.0, True)
    """
    loss_fn = loss_fn or cross_entropy_loss
    device = next(model.parameters(), torch.empty(0)).device
    data = [to_device(batch, device) for batch in batches]
    if not data:
        raise ValueError("No batch to measure the blocks on: give at least one batch.")

    def evaluate() -> float:
        return sum(float(loss_fn(model, batch)) for batch in data) / len(data)

    def skip(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        return _first_tensor(args, kwargs)

    increase: dict[str, float] = {}
    with _eval_mode(model), torch.no_grad():
        base = evaluate()
        if not math.isfinite(base):
            raise ValueError(
                f"The model's loss is {base} before any block is skipped: check the model and data."
            )
        for name in blocks:
            handle = model.get_submodule(name).register_forward_hook(skip, with_kwargs=True)
            try:
                increase[name] = evaluate() - base
            finally:
                handle.remove()
    return base, increase


@dataclass(frozen=True)
class RemovalPlan:
    """Which blocks are removed, and why: the loss increase of each skipped alone, the MACs before and after.

    Example::

        >>> plan = RemovalPlan(("a", "b"), {"a": 0.5, "b": 0.01}, 0.3, ("b",), 1000, 600)
        >>> plan.macs_ratio
        1.6666666666666667
        >>> print(plan.summary())
        Block removal: 1 of 2 blocks removed, MACs per sample 1,000 -> 600 (1.67x fewer); base loss 0.3
        block  loss increase  removed
        a               +0.5
        b              +0.01  yes
    """

    blocks: tuple[str, ...]
    increase: dict[str, float]
    base_loss: float
    removed: tuple[str, ...]
    macs_before: int
    macs_after: int

    @property
    def macs_ratio(self) -> float:
        """MACs per sample before / after the removal (as ``macs_ratio`` everywhere in this package)."""
        return self.macs_before / self.macs_after if self.macs_after else math.inf

    def summary(self) -> str:
        """A table of the blocks, their loss increase and whether they are removed."""
        width = max([5, *(len(name) for name in self.blocks)])
        lines = [
            f"Block removal: {len(self.removed)} of {len(self.blocks)} blocks removed, MACs per sample "
            f"{self.macs_before:,} -> {self.macs_after:,} ({self.macs_ratio:.2f}x fewer); base loss "
            f"{self.base_loss:.4g}",
            f"{'block':<{width}}  {'loss increase':>13}  removed",
        ]
        for name in self.blocks:
            mark = "yes" if name in self.removed else ""
            lines.append(f"{name:<{width}}  {self.increase[name]:>+13.4g}  {mark}".rstrip())
        return "\n".join(lines)

    def to_state(self) -> dict[str, Any]:
        """A plain dict (lists, floats, ints) for checkpoints and broadcasting."""
        return {
            "blocks": list(self.blocks),
            "increase": dict(self.increase),
            "base_loss": self.base_loss,
            "removed": list(self.removed),
            "macs_before": self.macs_before,
            "macs_after": self.macs_after,
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> RemovalPlan:
        """The plan :meth:`to_state` wrote."""
        return cls(
            tuple(state["blocks"]),
            dict(state["increase"]),
            float(state["base_loss"]),
            tuple(state["removed"]),
            int(state["macs_before"]),
            int(state["macs_after"]),
        )


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def put_back(model: nn.Module, modules: Mapping[str, nn.Module]) -> None:
    """Put each module of ``modules`` (by qualified name, as :func:`replace_by_identity` returns them) back in
    ``model``."""
    for name, module in modules.items():
        _set_submodule(model, name, module)


@contextlib.contextmanager
def _without(model: nn.Module, names: Sequence[str]) -> Iterator[None]:
    saved = replace_by_identity(model, names)
    try:
        yield
    finally:
        put_back(model, saved)


def check_removal(
    model: nn.Module,
    blocks: Sequence[str],
    example_input: Any,
    remove: int | None = None,
    target_macs: float | None = None,
) -> None:
    """Whether ``remove`` blocks, or a ``target_macs`` fraction of the MACs, can be reached by removing some of
    ``blocks``: a ``ValueError`` naming the argument when not."""
    if remove is not None and remove > len(blocks):
        raise ValueError(
            f"`remove={remove}` blocks, but {type(model).__name__} has {len(blocks)} residual blocks "
            f"({', '.join(map(repr, blocks))}). Remove at most {len(blocks)}."
        )
    if target_macs is not None:
        before = count_macs_per_sample(model, example_input)
        with _without(model, blocks):
            least = count_macs_per_sample(model, example_input)
        if least > target_macs * before:
            raise ValueError(
                f"`target_macs={target_macs}` cannot be reached by removing blocks: without all {len(blocks)} "
                f"blocks the model still has {least / before:.3g} of its MACs per sample. Give a target of at "
                f"least {math.ceil(least / before * 1000) / 1000}, or prune or factorize as well."
            )


def check_neighbours(
    remove_at: Any, world_size: int, selecting: Sequence[str], earlier: Sequence[str], order: int
) -> None:
    """Whether blocks can be removed next to the other callbacks of a fit: ``selecting`` names those that select
    layers, ``earlier`` those of them that set up before the removal (at the same ``order``, listed before it in
    ``Trainer(callbacks=...)``). Removing in ``setup`` (``remove_at=None``) must come first; removing at a step
    needs a single process and no callback that selects layers.

    Example::

        >>> check_neighbours(None, 1, ["GradualPruning"], [], 0)
        >>> check_neighbours(0.5, 1, ["GradualPruning"], [], 0)
        Traceback (most recent call last):
        ...
        ValueError: StochasticDepth(remove_at=0.5) removes blocks during training, but GradualPruning set up on the layers as they were and would keep using those of the removed blocks. Leave `remove_at=None` (remove in `setup`, before they set up) to combine them.
    """
    if remove_at is None:
        if earlier:
            raise ValueError(
                f"{', '.join(earlier)} set up before StochasticDepth (they take effect at the same "
                f"`effect_order={order}`, in the order of `Trainer(callbacks=...)`) and select layers that removing "
                "blocks could take away. List StochasticDepth before them."
            )
        return
    name = f"StochasticDepth(remove_at={remove_at!r})"
    if world_size > 1:
        raise ValueError(
            f"{name} removes blocks during training, which needs a single process; with {world_size} processes "
            "leave `remove_at=None` (remove in `setup`)."
        )
    if selecting:
        raise ValueError(
            f"{name} removes blocks during training, but {', '.join(selecting)} set up on the layers as they were "
            "and would keep using those of the removed blocks. Leave `remove_at=None` (remove in `setup`, before "
            "they set up) to combine them."
        )


def plan_removal(
    model: nn.Module,
    blocks: Sequence[str],
    batches: Iterable[Any],
    example_input: Any,
    remove: int | None = None,
    target_macs: float | None = None,
    loss_fn: LossFn | None = None,
) -> RemovalPlan:
    """Choose the blocks to remove: the ``remove`` whose skip raises the loss least (:func:`measure_importance`),
    or, in that order, as many as needed for the MACs per sample to be at most ``target_macs`` times the
    original's. The model is left as it is.

    Example::

        >>> class Residual(nn.Module):
        ...     def __init__(self, scale):
        ...         super().__init__()
        ...         self.fc = nn.Linear(4, 4)
        ...         self.scale = scale
        ...     def forward(self, x):
        ...         return x + self.scale * self.fc(x)
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(Residual(1.0), Residual(0.0), Residual(1.0), nn.Linear(4, 2))
        >>> batches = [(torch.randn(8, 4), torch.randint(0, 2, (8,)))]
        >>> plan = plan_removal(model, ["0", "1", "2"], batches, torch.zeros(1, 4), remove=1)
        >>> plan.removed, plan.macs_before, plan.macs_after
        (('1',), 56, 40)
    """
    if (remove is None) == (target_macs is None):
        raise ValueError("Give exactly one of `remove` and `target_macs`.")
    check_removal(model, blocks, example_input, remove, target_macs)
    base, increase = measure_importance(model, blocks, batches, loss_fn)
    order = sorted(blocks, key=lambda name: (increase[name], blocks.index(name)))
    before = count_macs_per_sample(model, example_input)
    if remove is not None:
        chosen = order[:remove]
        with _without(model, chosen):
            after = count_macs_per_sample(model, example_input)
    else:
        assert target_macs is not None
        chosen = []
        for name in order:
            chosen.append(name)
            with _without(model, chosen):
                after = count_macs_per_sample(model, example_input)
            if after <= target_macs * before:
                break
    removed = tuple(n for n in blocks if n in chosen)
    return RemovalPlan(tuple(blocks), increase, base, removed, before, after)


def replace_by_identity(model: nn.Module, names: Iterable[str]) -> dict[str, nn.Module]:
    """Put an ``nn.Identity()`` in the place of each block ``names`` (already one: left out); returns the
    modules taken out, by name.

    Example::

        >>> model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
        >>> list(replace_by_identity(model, ["1"])), model[1]
        (['1'], Identity())
    """
    taken = {}
    for name in names:
        module = model.get_submodule(name)
        if not isinstance(module, nn.Identity):
            _set_submodule(model, name, nn.Identity())
            taken[name] = module
    return taken


def remove_blocks_(
    model: nn.Module,
    batches: Iterable[Any],
    config: DepthConfig,
    example_input: Any,
    loss_fn: LossFn | None = None,
) -> RemovalPlan:
    """Find the blocks (``config.blocks``), choose the least important (``config.remove`` or
    ``config.target_macs``, on the first ``config.removal_batches`` of ``batches``) and replace them by
    ``nn.Identity``: a real, shallower model.

    Example::

        >>> class Residual(nn.Module):
        ...     def __init__(self, scale):
        ...         super().__init__()
        ...         self.fc = nn.Linear(4, 4)
        ...         self.scale = scale
        ...     def forward(self, x):
        ...         return x + self.scale * self.fc(x)
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(Residual(1.0), Residual(0.0), Residual(1.0), nn.Linear(4, 2))
        >>> batches = [(torch.randn(8, 4), torch.randint(0, 2, (8,)))]
        >>> plan = remove_blocks_(model, batches, DepthConfig(target_macs=0.75), torch.zeros(1, 4))
        >>> plan.removed, model[1]
        (('1',), Identity())
    """
    if not config.removes:
        raise ValueError("`config` removes no block: give `remove` or `target_macs`.")
    blocks = find_blocks(model, example_input, config.blocks, removable=True)
    data = [batch for _, batch in zip(range(config.removal_batches), batches, strict=False)]
    plan = plan_removal(model, blocks, data, example_input, config.remove, config.target_macs, loss_fn)
    replace_by_identity(model, plan.removed)
    return plan


# -- checkpoints ----------------------------------------------------------------------------------------------

_HINT = (
    HINT_PREFIX
    + "this checkpoint has residual blocks replaced by nn.Identity (StochasticDepth removed blocks "
    "{names}); call lightning_compress.depth.restore_depth(model, checkpoint) before load_state_dict, or load it "
    "through a Trainer that lists StochasticDepth"
)
_HINTED = re.compile(re.escape(HINT_PREFIX) + r".*\(StochasticDepth removed blocks (\[.*\])\);")


def checkpoint_hint(names: Sequence[str]) -> str:
    """The entry a checkpoint's ``state_dict`` carries when blocks were removed: a strict ``load_state_dict``
    of the full model reports it as an unexpected key, saying how to load the checkpoint; it names the blocks.

    Example::

        >>> hinted_blocks({checkpoint_hint(["net.1", "net.2"]): torch.zeros(0)})
        ['net.1', 'net.2']
    """
    return _HINT.format(names=json.dumps(list(names)))


def hinted_blocks(state_dict: Mapping[str, Any], prefix: str = "") -> list[str] | None:
    """The removed blocks a state dict's hint names (see :func:`checkpoint_hint`); ``None``: no hint."""
    for key in state_dict:
        if key.startswith(prefix + HINT_PREFIX) and (match := _HINTED.match(key[len(prefix) :])):
            return list(json.loads(match.group(1)))
    return None


def restore_depth(
    model: nn.Module, checkpoint: Mapping[str, Any] | str | os.PathLike, prefix: str = ""
) -> list[str]:
    """Give ``model`` the removed blocks of a checkpoint (as ``nn.Identity``), so that ``model.load_state_dict``
    fits it.

    The blocks are read from the hint in the checkpoint's ``state_dict`` (:func:`checkpoint_hint`), or from the
    StochasticDepth state among its ``callbacks``. Every hint of this package is removed from the ``state_dict``
    (when it is mutable), so that a strict ``load_state_dict`` follows.

    Args:
        model: the model, e.g. a freshly constructed LightningModule.
        checkpoint: a Lightning checkpoint (its path, or the loaded dict), or a state dict.
        prefix: prefix of ``model``'s keys in the state dict.

    Returns:
        The names of the blocks replaced now.

    Example::

        >>> trained = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2))
        >>> _ = replace_by_identity(trained, ["1"])
        >>> checkpoint = {"state_dict": {**trained.state_dict(), checkpoint_hint(["1"]): torch.zeros(0)}}
        >>> fresh = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2))
        >>> restore_depth(fresh, checkpoint)
        ['1']
        >>> fresh.load_state_dict(checkpoint["state_dict"])
        <All keys matched successfully>
    """
    configure_fresh_model(model)
    if isinstance(checkpoint, str | os.PathLike):
        checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=False)
    state_dict = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, Mapping) else checkpoint
    names = hinted_blocks(state_dict, prefix)
    if names is None:
        states = (checkpoint.get("callbacks") or {}).items() if state_dict is not checkpoint else ()
        names = [n for key, s in states if key.startswith("StochasticDepth") for n in s.get("removed", ())]
    if isinstance(state_dict, MutableMapping):
        drop_checkpoint_hints(state_dict, prefix)
    return list(replace_by_identity(model, names))


def absent_blocks(
    model: nn.Module, state_dict: Mapping[str, Any], blocks: Iterable[str], prefix: str = ""
) -> list[str]:
    """The ``blocks`` whose module in ``model`` has state (weights, buffers) but none of it in ``state_dict``: the
    blocks a checkpoint without a hint was saved without."""
    absent = []
    for name in blocks:
        module = _submodule(model, name)
        if module is None or isinstance(module, nn.Identity) or not module.state_dict():
            continue
        if not any(key.startswith(f"{prefix}{name}.") for key in state_dict):
            absent.append(name)
    return absent
