"""Per-layer sensitivity: how much the loss rises when one layer alone is compressed at each level.

Four schemes share one vocabulary with the callbacks; a *level* says how far a layer is compressed:

- ``"prune"``: unstructured magnitude (L1) pruning of the weight; level = ``amount``, the fraction removed;
- ``"prune_structured"``: output channels (Conv) / output features (Linear) with the smallest L1 norm removed;
  level = ``amount`` of channels removed (at least one is kept). :func:`compress_layer` zeroes one layer's
  rows and bias entries; :func:`measure_sensitivity` measures whole channel groups (every layer the channels
  reach, see :mod:`~lightning_compress.budget.groups`), exactly as removing them would change the model;
- ``"low_rank"``: truncated SVD of the weight (a Conv weight reshaped to ``out x (in*k*k)``); level = the
  fraction of the full rank ``min(out, in*k*k)`` kept, rank ``max(1, ceil(fraction * full))``;
- ``"quantize"``: symmetric per-output-channel fake quantization of the weight; level = bits (32: float).

The uncompressed level (amount 0, rank fraction 1.0, 32 bits) is always part of the levels.
:func:`measure_sensitivity` evaluates a model on a few batches once as it is, then once per selected layer and
level with only that layer compressed (:func:`compress_layer`), and returns a :class:`Sensitivity` table that
:func:`~lightning_compress.budget.allocation.allocate` turns into per-layer levels.

Example::

    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    >>> batches = [(torch.randn(32, 8), torch.randint(0, 3, (32,))) for _ in range(2)]
    >>> result = measure_sensitivity(model, batches, SensitivityConfig("quantize", levels=(8, 2)))
    >>> result.levels, list(result.loss)
    ((32.0, 8.0, 2.0), ['0', '2'])
    >>> result.delta("0")[0], result.delta("0")[2] > result.delta("0")[1]
    (0.0, True)
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import math
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.utils import parametrize

from lightning_compress import _checks
from lightning_compress._inputs import call_module, first_input, to_device
from lightning_compress.selection import ModuleSelection, Selector
from lightning_compress.stats import _eval_mode

__all__ = [
    "DEFAULT_LEVELS",
    "LAYER_TYPES",
    "SCHEMES",
    "UNCOMPRESSED",
    "Sensitivity",
    "SensitivityConfig",
    "check_layer",
    "compress_layer",
    "compressed_weight",
    "kept_rank",
    "level_label",
    "measure_sensitivity",
    "normalize_levels",
    "pruned_count",
    "removed_channels",
]

SCHEMES = ("prune", "prune_structured", "low_rank", "quantize")
DEFAULT_LEVELS: dict[str, tuple[float, ...]] = {
    "prune": (0.0, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95),
    "prune_structured": (0.0, 0.25, 0.5, 0.625, 0.75, 0.875),
    "low_rank": (1.0, 0.75, 0.5, 0.375, 0.25, 0.125),
    "quantize": (32.0, 8.0, 4.0, 2.0),
}
UNCOMPRESSED: dict[str, float] = {"prune": 0.0, "prune_structured": 0.0, "low_rank": 1.0, "quantize": 32.0}
LEVEL_NAMES = {
    "prune": "amount removed",
    "prune_structured": "amount of channels removed",
    "low_rank": "rank fraction kept",
    "quantize": "bits",
}
# Layers whose `weight` is `out x in x k...`: every scheme reads its output channels as the rows.
LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CACHE_FORMAT = "lightning_compress.sensitivity/1"


def _check_scheme(scheme: Any) -> str:
    return _checks.check_choice(scheme, "scheme", SCHEMES)


def _check_level(scheme: str, level: Any, argument: str = "level") -> float:
    if isinstance(level, bool) or not isinstance(level, int | float) or not math.isfinite(level):
        raise TypeError(f"`{argument}={level!r}` must be a finite number ({LEVEL_NAMES[scheme]}).")
    level = float(level)
    if scheme in ("prune", "prune_structured") and not 0.0 <= level < 1.0:
        raise ValueError(
            f"`{argument}={level:g}` must be in [0, 1) for scheme={scheme!r}: the fraction removed "
            "(1 would remove everything)."
        )
    if scheme == "low_rank" and not 0.0 < level <= 1.0:
        raise ValueError(
            f"`{argument}={level:g}` must be in (0, 1] for scheme='low_rank': the fraction of the full rank kept."
        )
    if scheme == "quantize" and not (level == 32.0 or (level == int(level) and 2 <= level <= 16)):
        raise ValueError(
            f"`{argument}={level:g}` must be a whole number of bits from 2 to 16, or 32 (float), "
            "for scheme='quantize'."
        )
    return level


def _compression_order(scheme: str, level: float) -> float:
    # Levels sort from the uncompressed one to the most compressed.
    return -level if scheme in ("low_rank", "quantize") else level


def normalize_levels(scheme: str, levels: Sequence[float] | None) -> tuple[float, ...]:
    """The checked levels of ``scheme`` as floats, the uncompressed level added, sorted from the uncompressed
    one to the most compressed, without duplicates (``None``: :data:`DEFAULT_LEVELS`).

    Example::

        >>> normalize_levels("low_rank", [0.25, 0.5, 0.25])
        (1.0, 0.5, 0.25)
        >>> normalize_levels("quantize", [4, 8])
        (32.0, 8.0, 4.0)
        >>> normalize_levels("prune", [0.5, 1.0])
        Traceback (most recent call last):
        ...
        ValueError: `levels=1` must be in [0, 1) for scheme='prune': the fraction removed (1 would remove everything).
    """
    scheme = _check_scheme(scheme)
    if levels is None:
        return DEFAULT_LEVELS[scheme]
    if isinstance(levels, str) or not isinstance(levels, Iterable):
        raise TypeError(
            f"`levels={levels!r}` must be a list of levels ({LEVEL_NAMES[scheme]}), e.g. "
            f"`levels={list(DEFAULT_LEVELS[scheme][:3])}`."
        )
    checked = {_check_level(scheme, level, "levels") for level in levels}
    checked.add(UNCOMPRESSED[scheme])
    return tuple(sorted(checked, key=lambda level: _compression_order(scheme, level)))


def level_label(scheme: str, level: float) -> str:
    """A short column label of a level: ``"8 bit"`` for ``quantize``, the number otherwise.

    Example::

        >>> level_label("quantize", 8.0), level_label("prune", 0.625)
        ('8 bit', '0.625')
    """
    return f"{int(level)} bit" if scheme == "quantize" else f"{level:g}"


def pruned_count(numel: int, amount: float) -> int:
    """Weights unstructured pruning at ``amount`` removes from a weight of ``numel`` entries (as the pruning
    callbacks count them).

    Example::

        >>> pruned_count(10, 0.25)
        2
    """
    return round(amount * numel)


def removed_channels(channels: int, amount: float) -> int:
    """Output channels structured pruning at ``amount`` removes from a layer of ``channels``: ``floor``, and at
    least one channel is kept.

    Example::

        >>> removed_channels(8, 0.875), removed_channels(1, 0.5), removed_channels(6, 0.5)
        (7, 0, 3)
    """
    return min(math.floor(amount * channels + 1e-9), channels - 1)


def kept_rank(full_rank: int, fraction: float) -> int:
    """The rank kept at a rank fraction: ``max(1, ceil(fraction * full_rank))``.

    Example::

        >>> kept_rank(10, 0.25), kept_rank(10, 0.01)
        (3, 1)
    """
    return max(1, math.ceil(fraction * full_rank - 1e-9))


def check_layer(name: str, module: nn.Module, scheme: str) -> None:
    """``module`` (called ``name`` in errors) must be a layer ``scheme`` can compress in place."""
    if not isinstance(module, LAYER_TYPES):
        raise ValueError(
            f"Layer {name!r} is a {type(module).__name__}; the budget schemes compress "
            f"{', '.join(t.__name__ for t in LAYER_TYPES)} layers. Leave it out with `exclude=[{name!r}]` or "
            "select by type, e.g. `modules=[nn.Conv2d, nn.Linear]`."
        )
    if parametrize.is_parametrized(module, "weight"):
        raise ValueError(
            f"Layer {name!r} has a parametrized `weight` (e.g. a pruning mask in training): measure the model "
            "before other compression is attached to it, or leave the layer out with `exclude`."
        )
    groups = getattr(module, "groups", 1)
    if scheme == "low_rank" and groups != 1:
        raise ValueError(
            f"Layer {name!r} is a grouped convolution (groups={groups}), which has no two-factor low-rank form. "
            f"Leave it out with `exclude=[{name!r}]`."
        )
    depthwise = groups == getattr(module, "in_channels", 0) == getattr(module, "out_channels", 0)
    if scheme == "prune_structured" and groups != 1 and not depthwise:
        raise ValueError(
            f"Layer {name!r} is a grouped convolution (groups={groups}) that is not depthwise: removing some of "
            f"its output channels breaks its groups. Leave it out with `exclude=[{name!r}]`."
        )


class _LayerCompressor:
    """The compressed weight (and bias) of one layer at any level, with what the levels share computed once
    (magnitudes, channel norms, the SVD)."""

    def __init__(self, module: nn.Module, scheme: str) -> None:
        self.scheme = scheme
        # A copy: the layer's own tensor holds other values while a level is swapped in.
        self.weight = module.weight.detach().clone()
        bias = getattr(module, "bias", None)
        self.bias = bias.detach() if isinstance(bias, Tensor) else None
        self.rows = self.weight.reshape(self.weight.shape[0], -1)
        work = self.rows.to(torch.promote_types(self.rows.dtype, torch.float32))
        if scheme == "prune":
            self.order = torch.sort(work.abs().flatten(), stable=True).indices
        elif scheme == "prune_structured":
            self.order = torch.sort(work.abs().sum(dim=1), stable=True).indices
        elif scheme == "low_rank":
            self.u, self.s, self.vh = torch.linalg.svd(work, full_matrices=False)

    def __call__(self, level: float) -> tuple[Tensor | None, Tensor | None]:
        """The new weight and bias at ``level``; ``None`` for what stays as it is."""
        weight, rows = self.weight, self.rows
        if level == UNCOMPRESSED[self.scheme]:
            return None, None
        if self.scheme == "prune":
            flat = rows.flatten().clone()
            flat[self.order[: pruned_count(flat.numel(), level)]] = 0
            return flat.reshape(weight.shape), None
        if self.scheme == "prune_structured":
            gone = self.order[: removed_channels(rows.shape[0], level)]
            new = rows.clone()
            new[gone] = 0
            bias = None
            if self.bias is not None:
                bias = self.bias.clone()
                bias[gone] = 0
            return new.reshape(weight.shape), bias
        if self.scheme == "low_rank":
            r = kept_rank(min(rows.shape), level)
            approx = (self.u[:, :r] * self.s[:r]) @ self.vh[:r]
            return approx.to(weight.dtype).reshape(weight.shape), None
        qmax = 2 ** (int(level) - 1) - 1
        work = rows.to(torch.promote_types(rows.dtype, torch.float32))
        scale = work.abs().amax(dim=1, keepdim=True) / qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        fake = torch.clamp(torch.round(work / scale), -qmax, qmax) * scale
        return fake.to(weight.dtype).reshape(weight.shape), None


def compressed_weight(module: nn.Module, scheme: str, level: float) -> tuple[Tensor, Tensor | None]:
    """The weight and bias of a ``nn.Linear``/``nn.Conv*`` layer compressed by ``scheme`` at ``level``, as
    detached tensors (the layer is not changed).

    Example::

        >>> layer = nn.Linear(4, 1, bias=False)
        >>> with torch.no_grad():
        ...     _ = layer.weight.copy_(torch.tensor([[0.5, -2.0, 1.5, 0.25]]))
        >>> compressed_weight(layer, "prune", 0.5)[0]
        tensor([[ 0.0000, -2.0000,  1.5000,  0.0000]])
        >>> compressed_weight(layer, "quantize", 2)[0]  # 3 values per row: -max, 0, max
        tensor([[ 0., -2.,  2.,  0.]])
    """
    scheme = _check_scheme(scheme)
    level = _check_level(scheme, level)
    check_layer(type(module).__name__, module, scheme)
    compressor = _LayerCompressor(module, scheme)
    weight, bias = compressor(level)
    return (compressor.weight if weight is None else weight), (compressor.bias if bias is None else bias)


@contextlib.contextmanager
def _swapped(module: nn.Module, weight: Tensor | None, bias: Tensor | None) -> Iterator[None]:
    # The values are copied into the layer's own parameters (never replacing them), and copied back exactly.
    targets = [
        (param, new) for param, new in ((module.weight, weight), (module.bias, bias)) if new is not None
    ]
    saved = [param.detach().clone() for param, _ in targets]
    try:
        with torch.no_grad():
            for param, new in targets:
                param.copy_(new)
        yield
    finally:
        with torch.no_grad():
            for (param, _), original in zip(targets, saved, strict=True):
                param.copy_(original)


@contextlib.contextmanager
def compress_layer(module: nn.Module, scheme: str, level: float) -> Iterator[nn.Module]:
    """Compress one layer's weight in place by ``scheme`` at ``level`` for the duration of the block; the exact
    original values come back on exit (also on an exception).

    Example::

        >>> layer = nn.Linear(6, 4)
        >>> before = layer.weight.detach().clone()
        >>> with compress_layer(layer, "low_rank", 0.25):
        ...     int(torch.linalg.matrix_rank(layer.weight.detach()))
        1
        >>> torch.equal(layer.weight, before)
        True
    """
    scheme = _check_scheme(scheme)
    level = _check_level(scheme, level)
    check_layer(type(module).__name__, module, scheme)
    with _swapped(module, *_LayerCompressor(module, scheme)(level)):
        yield module


@dataclass(frozen=True)
class SensitivityConfig:
    """What :func:`measure_sensitivity` measures: checked when built.

    Args:
        scheme: ``"prune"``, ``"prune_structured"``, ``"low_rank"`` or ``"quantize"`` (see the module docs).
        levels: the levels to measure (``None``: :data:`DEFAULT_LEVELS` of the scheme). Stored checked, with the
            uncompressed level added, sorted from it to the most compressed.
        modules: the layers to measure (types and/or name patterns); every one must be a
            ``nn.Linear``/``nn.Conv1d``/``nn.Conv2d``/``nn.Conv3d``.
        exclude: layers to leave out.
        min_params: leave out layers with fewer parameters.
        batches: how many batches to evaluate the model on, for every probe.

    Example::

        >>> SensitivityConfig("low_rank", levels=[0.5]).levels
        (1.0, 0.5)
        >>> SensitivityConfig("prune", batches=0)
        Traceback (most recent call last):
        ...
        ValueError: `batches=0` must be a positive integer: how many batches each probe evaluates, e.g. 4.
    """

    scheme: str
    levels: Sequence[float] | None = None
    modules: Selector = (nn.Conv2d, nn.Linear)
    exclude: Selector = None
    min_params: int = 0
    batches: int = 4
    selection: ModuleSelection = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_scheme(self.scheme)
        object.__setattr__(self, "levels", normalize_levels(self.scheme, self.levels))
        _checks.check_int(self.batches, "batches", 1, hint="how many batches each probe evaluates, e.g. 4.")
        object.__setattr__(self, "selection", ModuleSelection(self.modules, self.exclude, self.min_params))

    def select(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """The layers of ``model`` this config measures, checked for the scheme."""
        selected = self.selection.select(model)
        for name, module in selected:
            check_layer(name, module, self.scheme)
        return selected


@dataclass
class Sensitivity:
    """Loss of the model with one layer at a time compressed at each level.

    Args:
        scheme: the scheme measured.
        levels: the levels, from the uncompressed one to the most compressed.
        base_loss: the loss of the uncompressed model (mean over the evaluated batches).
        loss: layer name -> loss with only that layer compressed, at each level (the first is ``base_loss``).
        params: layer name -> number of weight entries (for tables).
        batches: how many batches every probe evaluated.

    Example::

        >>> s = Sensitivity("prune", (0.0, 0.5), 1.0, {"fc": [1.0, 1.25]}, {"fc": 40}, batches=2)
        >>> s.delta("fc")
        [0.0, 0.25]
        >>> print(s.format_table())
        loss increase by amount removed (prune); base loss 1, 2 batches
        layer   params       0     0.5
        fc          40      +0   +0.25
    """

    scheme: str
    levels: tuple[float, ...]
    base_loss: float
    loss: dict[str, list[float]]
    params: dict[str, int] = field(default_factory=dict)
    batches: int = 0

    def delta(self, name: str) -> list[float]:
        """The loss increase over ``base_loss`` at each level for layer ``name``, sign kept: a negative value
        means the model measured better with the layer compressed (it happens, on few batches)."""
        if name not in self.loss:
            raise KeyError(f"No layer {name!r} in this sensitivity table; it has {list(self.loss)}.")
        return [loss - self.base_loss for loss in self.loss[name]]

    def rows(self) -> list[dict[str, Any]]:
        """One row per layer: ``layer``, ``params``, then the loss increase under each level's label."""
        labels = [level_label(self.scheme, level) for level in self.levels]
        return [
            {
                "layer": name,
                "params": self.params.get(name, 0),
                **dict(zip(labels, self.delta(name), strict=True)),
            }
            for name in self.loss
        ]

    def format_table(self) -> str:
        """The loss increases as a fixed-width text table, one line per layer."""
        labels = [level_label(self.scheme, level) for level in self.levels]
        width = max([5, *(len(name) for name in self.loss)])
        cells = [[f"{value:+.4g}" for value in self.delta(name)] for name in self.loss]
        widths = [max([7, len(label), *(len(row[i]) for row in cells)]) for i, label in enumerate(labels)]
        lines = [
            f"loss increase by {LEVEL_NAMES[self.scheme]} ({self.scheme}); base loss {self.base_loss:.4g}, "
            f"{self.batches} batches",
            f"{'layer':<{width}} {'params':>8} "
            + " ".join(f"{lb:>{w}}" for lb, w in zip(labels, widths, strict=True)),
        ]
        for name, row in zip(self.loss, cells, strict=True):
            lines.append(
                f"{name:<{width}} {self.params.get(name, 0):>8} "
                + " ".join(f"{c:>{w}}" for c, w in zip(row, widths, strict=True))
            )
        return "\n".join(line.rstrip() for line in lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable contents (:meth:`from_dict` reads them back)."""
        return {
            "scheme": self.scheme,
            "levels": list(self.levels),
            "base_loss": self.base_loss,
            "loss": {name: list(values) for name, values in self.loss.items()},
            "params": dict(self.params),
            "batches": self.batches,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Sensitivity:
        """The table written by :meth:`to_dict`.

        Example::

            >>> s = Sensitivity("quantize", (32.0, 8.0), 0.5, {"fc": [0.5, 0.52]})
            >>> Sensitivity.from_dict(s.to_dict()) == s
            True
        """
        return cls(
            scheme=data["scheme"],
            levels=tuple(float(level) for level in data["levels"]),
            base_loss=float(data["base_loss"]),
            loss={name: [float(v) for v in values] for name, values in data["loss"].items()},
            params={name: int(v) for name, v in data.get("params", {}).items()},
            batches=int(data.get("batches", 0)),
        )

    def figure(self) -> Any:
        """A matplotlib figure: the loss increase against the level, one line per layer."""
        from lightning_compress.plots import require_matplotlib

        require_matplotlib()
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 4.5), constrained_layout=True)
        positions = list(range(len(self.levels)))
        for name in self.loss:
            ax.plot(positions, self.delta(name), marker=".", label=name)
        ax.set_xticks(positions, [level_label(self.scheme, level) for level in self.levels])
        ax.set_xlabel(f"{LEVEL_NAMES[self.scheme]} (more compression to the right)")
        ax.set_ylabel("loss increase")
        ax.set_title(f"Sensitivity per layer ({self.scheme}, base loss {self.base_loss:.4g})")
        ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.grid(alpha=0.3)
        if len(self.loss) <= 20:
            ax.legend(fontsize=7, ncols=2)
        return fig

    def plot(self, path: str | os.PathLike) -> Path:
        """Write :meth:`figure` as a PNG file at ``path`` (atomically) and return the path.

        Example::

            >>> import tempfile
            >>> s = Sensitivity("prune", (0.0, 0.5), 1.0, {"fc": [1.0, 1.25]})
            >>> with tempfile.TemporaryDirectory() as folder:
            ...     s.plot(Path(folder) / "sensitivity.png").stat().st_size > 0
            True
        """
        from lightning_compress.export import atomic_write

        figure = self.figure()
        import matplotlib.pyplot as plt

        file = Path(path)
        try:
            with atomic_write(file) as partial:
                figure.savefig(partial, dpi=100, format="png")
        finally:
            plt.close(figure)
        return file


def _default_loss(model: nn.Module, batch: Any) -> Tensor:
    if not isinstance(batch, list | tuple) or len(batch) < 2:
        raise TypeError(
            f"The default loss reads `(x, y)` batches, got a {type(batch).__name__}. Pass "
            "`loss_fn(model, batch) -> scalar tensor`."
        )
    output = call_module(model, first_input(batch))
    if not isinstance(output, Tensor):
        raise TypeError(
            f"The default loss is the cross entropy of `model(x)`, but the model returned a "
            f"{type(output).__name__}. Pass `loss_fn(model, batch) -> scalar tensor`."
        )
    return F.cross_entropy(output, batch[-1])


def _cache_key(config: SensitivityConfig, layers: list[tuple[str, nn.Module]]) -> dict[str, Any]:
    key = {
        "scheme": config.scheme,
        "levels": list(config.levels),  # type: ignore[arg-type]
        "layers": [[name, list(module.weight.shape)] for name, module in layers],
        "batches": config.batches,
    }
    if config.scheme == "prune_structured":
        key["units"] = "channel groups"
    return key


Probe = Callable[[float], contextlib.AbstractContextManager[Any]]


def _layer_probe(module: nn.Module, scheme: str) -> Probe:
    compressor = _LayerCompressor(module, scheme)
    return lambda level: _swapped(module, *compressor(level))


def _group_probes(
    model: nn.Module, layers: list[tuple[str, nn.Module]], example_input: Any, excluded: list[str]
) -> list[tuple[str, int, Callable[[], Probe]]]:
    """One probe per channel group of the selected layers: its channels removed in every layer they reach."""
    from lightning_compress.budget.groups import channel_units, masked, unit_masks

    pruner, units = channel_units(model, example_input, [name for name, _ in layers], excluded)
    scores = pruner.importance_scores(model)
    named = dict(model.named_modules())
    probes: list[tuple[str, int, Callable[[], Probe]]] = []
    for unit in units:
        weights = sum(
            named[n].weight.numel() for n in unit.group.producers if isinstance(named.get(n), LAYER_TYPES)
        )

        def probe(unit: Any = unit) -> Probe:
            return lambda level: masked(model, unit_masks(pruner, model, unit, level, scores))

        probes.append((unit.name, weights, probe))
    return probes


def _read_cache(path: Path, key: dict[str, Any]) -> Sensitivity | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        if data.get("format") != _CACHE_FORMAT or data.get("key") != key:
            return None
        return Sensitivity.from_dict(data["sensitivity"])
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        warnings.warn(
            f"The sensitivity cache {str(path)!r} is unreadable ({err}); measuring again.", stacklevel=3
        )
        return None


def _write_cache(path: Path, key: dict[str, Any], result: Sensitivity) -> None:
    from lightning_compress.export import atomic_write

    with atomic_write(path) as partial:
        Path(partial).write_text(
            json.dumps({"format": _CACHE_FORMAT, "key": key, "sensitivity": result.to_dict()}, indent=1)
        )


def measure_sensitivity(
    model: nn.Module,
    batches: Iterable[Any],
    config: SensitivityConfig,
    loss_fn: Callable[[nn.Module, Any], Tensor] | None = None,
    progress: Callable[[str], Any] | None = None,
    cache: str | os.PathLike | None = None,
    example_input: Any = None,
) -> Sensitivity:
    """Measure the loss with each selected layer alone compressed at each of ``config.levels``.

    For ``prune_structured`` the unit is the channel group (see :mod:`~lightning_compress.budget.groups`): each
    probe removes a level of one group's channels from every layer they reach (the output rows of its
    producers, coupled across residual adds, the BatchNorm entries and the consumers' input columns), and the
    table is keyed by the group's name (its root layer, or its first selected producer), the name
    ``GradualPruning(layer_amounts=...)`` takes for the whole group. Layers whose channels structured pruning
    leaves (the model's outputs) get no row.

    The model runs in eval mode without gradients on the first ``config.batches`` of ``batches`` (moved to the
    model's device): once as it is, then once per layer and compressed level. Every probe evaluates the same
    batches, so the differences between probes come from the compression alone. Afterwards the weights are
    bit-exact as before, the training flags are restored and the global random state is as it was (batches
    drawn from a shuffling loader do not move it).

    Args:
        model: the model (any ``nn.Module``).
        batches: an iterable of batches, e.g. a ``DataLoader``.
        config: the scheme, levels, layers and number of batches.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``; default: cross entropy of ``model(x)`` against
            ``y`` for ``(x, y, ...)`` batches (``x`` the first element, ``y`` the last).
        progress: called once per layer with a message such as ``"sensitivity 3/12: net.3.conv1"``.
        cache: a JSON file. When it exists and was written for the same scheme, levels, layer names and shapes
            and number of batches, it is read instead of measuring; otherwise the result is written there. It
            cannot tell changed weights, data or ``loss_fn``: delete it after changing those.
        example_input: ``prune_structured``: the input the channel groups are traced on (default: the first
            input of ``batches``).

    Returns:
        The :class:`Sensitivity` table; each loss is the mean of ``loss_fn`` over the batches.
    """
    if not isinstance(config, SensitivityConfig):
        raise TypeError(f"`config` must be a SensitivityConfig, got {type(config).__name__}.")
    layers = config.select(model)
    key = _cache_key(config, layers)
    cache_path = Path(cache) if cache is not None else None
    if cache_path is not None:
        cached = _read_cache(cache_path, key)
        if cached is not None:
            return cached
    loss_fn = loss_fn or _default_loss
    device = next(model.parameters(), torch.empty(0)).device
    devices = (
        [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    )
    with torch.random.fork_rng(devices=devices):
        data = [to_device(batch, device) for batch in itertools.islice(iter(batches), config.batches)]
        if not data:
            raise ValueError("`batches` gave no batch: pass a loader (or a list) with at least one batch.")

        def evaluate() -> float:
            total = 0.0
            for batch in data:
                value = loss_fn(model, batch)
                try:
                    total += float(value)
                except (TypeError, ValueError, RuntimeError) as err:
                    raise TypeError(
                        f"`loss_fn` must return a scalar (a one-element tensor or a number), got {value!r}."
                    ) from err
            return total / len(data)

        with _eval_mode([model]), torch.no_grad():
            base = evaluate()
            if not math.isfinite(base):
                raise ValueError(
                    f"The uncompressed model's loss is {base}: check the model and `loss_fn` before measuring."
                )
            if config.scheme == "prune_structured":
                example = example_input if example_input is not None else first_input(data[0])
                probes = _group_probes(model, layers, example, config.selection.excluded(model))
            else:
                probes = [
                    (name, module.weight.numel(), functools.partial(_layer_probe, module, config.scheme))
                    for name, module in layers
                ]
            losses: dict[str, list[float]] = {}
            for index, (name, _, make) in enumerate(probes, 1):
                if progress is not None:
                    progress(f"sensitivity {index}/{len(probes)}: {name}")
                compress = make()
                values = [base]
                for level in config.levels[1:]:  # type: ignore[index]
                    with compress(level):
                        values.append(evaluate())
                losses[name] = values
    result = Sensitivity(
        scheme=config.scheme,
        levels=tuple(config.levels),  # type: ignore[arg-type]
        base_loss=base,
        loss=losses,
        params={name: weights for name, weights, _ in probes},
        batches=len(data),
    )
    if cache_path is not None:
        _write_cache(cache_path, key, result)
    return result
