"""Accuracy-aware search: the most compression whose validation metric stays within an accepted drop.

One global level (a budget fraction kept, a pruning amount, ...) is bisected between ``low`` and ``high``. Every
probe compresses a fresh copy of the original model at one level, fine-tunes it (optionally) and evaluates it; a
probe within the accepted drop moves the search toward more compression, one beyond it moves it back. The most
compressed accepted probe, and its fine-tuned model, is the answer. Plain torch: the caller's closures say how to
compress, fine-tune and evaluate, so any scheme and any training loop fit.

Example::

    >>> import torch
    >>> from torch import nn
    >>> model = nn.Linear(10, 1, bias=False)
    >>> with torch.no_grad():
    ...     _ = model.weight.copy_(torch.arange(1.0, 11.0))
    >>> def compress(copy, level):  # zero the smallest `level` fraction of the weights
    ...     with torch.no_grad():
    ...         copy.weight[0, : int(level * 10)] = 0.0
    >>> def evaluate(m):  # the weight magnitude kept: 55 on the original
    ...     return float(m.weight.detach().sum())
    >>> result = accuracy_aware_search(model, compress, evaluate, SearchConfig(max_drop=6.0, low=0.0, high=1.0))
    >>> result.level, result.baseline, result.metric
    (0.390625, 55.0, 49.0)
    >>> [probe["accepted"] for probe in result.probes]
    [False, True, True, False, False, True]
    >>> float(model.weight.detach().sum())  # the original is left as it was
    55.0
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from lightning_compress import _checks

MODES = ("max", "min")
MORE = ("high", "low")


@dataclass(frozen=True)
class SearchConfig:
    """What the accuracy-aware search looks for: checked when built, so a bad value fails before any training.

    Args:
        max_drop: the largest accepted drop of the metric (> 0), in the metric's units; with ``relative=True`` a
            fraction of the baseline metric (``0.01``: 1% of it).
        low: the lower end of the searched level.
        high: the upper end of the searched level (> ``low``).
        mode: ``"max"`` when a higher metric is better (accuracy): the drop is ``baseline - metric``; ``"min"``
            when lower is better (a loss): the drop is the increase ``metric - baseline``.
        relative: ``max_drop`` is a fraction of ``|baseline|``.
        more: which end of ``[low, high]`` compresses more: ``"high"`` for an amount removed, ``"low"`` for a
            fraction kept.
        probes: the most compress, fine-tune and evaluate rounds.
        tolerance: stop once the interval left to search is narrower than this (in the level's units; ``0``: run
            all ``probes``); below ``high - low``.
        seed: the random state every probe starts from, the same for each, so that a probe's outcome does not
            depend on the probes before it.

    Example::

        >>> SearchConfig(max_drop=0.01, low=0.0, high=1.0, more="middle")
        Traceback (most recent call last):
        ...
        ValueError: Unknown `more='middle'`. Use one of 'high', 'low'.
    """

    max_drop: float
    low: float
    high: float
    mode: str = "max"
    relative: bool = False
    more: str = "high"
    probes: int = 6
    tolerance: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        hint = "the largest accepted drop of the metric, e.g. 0.01"
        object.__setattr__(
            self, "max_drop", _checks.check_number(self.max_drop, "max_drop", 0.0, low_open=True, hint=hint)
        )
        _checks.check_choice(self.mode, "mode", MODES)
        _checks.check_bool(self.relative, "relative")
        _checks.check_choice(self.more, "more", MORE)
        low = _checks.check_number(self.low, "low")
        high = _checks.check_number(
            self.high, "high", low, low_open=True, hint="the search interval is [low, high]"
        )
        object.__setattr__(self, "low", low)
        object.__setattr__(self, "high", high)
        _checks.check_int(self.probes, "probes", 1, hint="the most fine-tune and evaluate rounds, e.g. 6.")
        object.__setattr__(
            self,
            "tolerance",
            _checks.check_number(
                self.tolerance,
                "tolerance",
                0.0,
                high - low,
                high_open=True,
                hint=f"the narrowest interval worth a probe; below high - low = {high - low:g}, or 0 to run "
                "all `probes`",
            ),
        )
        _checks.check_int(self.seed, "seed", 0, hint="the seed every probe starts from.")


@dataclass
class SearchResult:
    """The outcome of :func:`accuracy_aware_search`.

    Args:
        level: the most compressed accepted level, or ``None`` when no probe stayed within the drop.
        model: the compressed, fine-tuned copy at ``level`` (``None`` with it).
        baseline: the metric of the original model.
        metric: the metric of ``model`` (``None`` with it).
        probes: every probe in the order run: its ``level``, ``metric``, ``drop`` and whether it was ``accepted``.
        allowed_drop: the accepted drop in the metric's units (``max_drop``, times ``|baseline|`` when relative).

    Example::

        >>> result = SearchResult(level=None, model=None, baseline=0.9, metric=None, allowed_drop=0.01,
        ...                       probes=[{"level": 0.5, "metric": 0.8, "drop": 0.1, "accepted": False}])
        >>> print(result.format_table())
        probe     level     metric       drop  accepted
            1       0.5        0.8        0.1        no
        baseline 0.9, allowed drop 0.01: no level accepted
    """

    level: float | None
    model: nn.Module | None = field(repr=False)
    baseline: float
    metric: float | None
    probes: list[dict[str, Any]]
    allowed_drop: float

    def to_dict(self) -> dict[str, Any]:
        """The result without the model, JSON-serializable.

        Example::

            >>> SearchResult(None, None, 0.9, None, [], 0.01).to_dict()
            {'level': None, 'baseline': 0.9, 'metric': None, 'allowed_drop': 0.01, 'probes': []}
        """
        return {
            "level": self.level,
            "baseline": self.baseline,
            "metric": self.metric,
            "allowed_drop": self.allowed_drop,
            "probes": [dict(probe) for probe in self.probes],
        }

    def format_table(self) -> str:
        """The probes as a table, one line per probe in the order run, and the outcome below."""
        lines = [f"{'probe':>5} {'level':>9} {'metric':>10} {'drop':>10}  accepted"]
        for index, probe in enumerate(self.probes, 1):
            lines.append(
                f"{index:>5} {probe['level']:>9.4g} {probe['metric']:>10.4g} {probe['drop']:>10.4g}  "
                f"{'yes' if probe['accepted'] else 'no':>8}"
            )
        outcome = (
            "no level accepted"
            if self.level is None
            else f"level {self.level:.4g} accepted (metric {self.metric:.4g})"
        )
        lines.append(f"baseline {self.baseline:.4g}, allowed drop {self.allowed_drop:.4g}: {outcome}")
        return "\n".join(lines)


def accuracy_aware_search(
    model: nn.Module,
    compress: Callable[[nn.Module, float], Any],
    evaluate: Callable[[nn.Module], float],
    config: SearchConfig,
    fine_tune: Callable[[nn.Module, float], Any] | None = None,
    progress: Callable[[dict[str, Any]], Any] | None = None,
) -> SearchResult:
    """Bisect ``config``'s level for the most compression whose metric stays within ``config.max_drop``.

    The baseline is the metric of ``model``, which is never modified. Each probe deep-copies ``model``, calls
    ``compress(copy, level)``, ``fine_tune(copy, level)`` when given, and ``evaluate(copy)``. The first probe is at
    the middle of ``[low, high]``; an accepted probe moves the next one halfway toward the more compressed end, a
    rejected one halfway back, until ``config.probes`` probes ran or the interval left is narrower than
    ``config.tolerance``. Every probe starts from the random state ``config.seed`` (forked: the caller's random
    state is left as it was), so the same level gives the same outcome wherever it comes in the search.

    Args:
        model: the original model.
        compress: applies the compression at a level to a fresh copy of ``model``, in place.
        evaluate: the validation metric of a model (a number, or a one-element tensor).
        config: what to search.
        fine_tune: trains a compressed copy, in place (``None``: evaluate it as compressed).
        progress: called with each probe's record (``level``, ``metric``, ``drop``, ``accepted``) once it ran.

    Returns:
        The most compressed accepted level and its model, or ``level=None`` when no probe was accepted (no error:
        the caller decides what to do then).

    Example::

        >>> model = nn.Linear(4, 1)
        >>> def compress(copy, level):
        ...     with torch.no_grad():
        ...         _ = copy.weight.mul_(1.0 - level)
        >>> def evaluate(m):  # higher is better: 1.0 at level 0
        ...     return float(m.weight.detach().abs().sum() / model.weight.detach().abs().sum())
        >>> config = SearchConfig(max_drop=0.3, low=0.0, high=1.0, probes=4)
        >>> result = accuracy_aware_search(model, compress, evaluate, config)
        >>> result.level, [probe["level"] for probe in result.probes]
        (0.25, [0.5, 0.25, 0.375, 0.3125])
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be an nn.Module; got {type(model).__name__}.")
    if not isinstance(config, SearchConfig):
        raise TypeError(
            f"`config` must be a SearchConfig, e.g. SearchConfig(max_drop=0.01, low=0.0, high=1.0); got "
            f"{type(config).__name__}."
        )
    for name, function, signature in (
        ("compress", compress, "compress(model, level)"),
        ("evaluate", evaluate, "evaluate(model) -> float"),
        ("fine_tune", fine_tune, "fine_tune(model, level), or None"),
        ("progress", progress, "progress(probe), or None"),
    ):
        if function is None and name in ("fine_tune", "progress"):
            continue
        if not callable(function):
            raise TypeError(f"`{name}` must be a function `{signature}`; got {type(function).__name__}.")

    baseline = _baseline(model, evaluate, config.seed)
    allowed = config.max_drop * abs(baseline) if config.relative else config.max_drop
    if config.relative and baseline == 0.0:
        raise ValueError(
            "`relative=True` takes `max_drop` as a fraction of the baseline metric, but `evaluate(model)` returned "
            "0 on the original model. Give `max_drop` in the metric's units with `relative=False`."
        )
    sign = 1.0 if config.mode == "max" else -1.0
    # `safe` is the least compressed end of what is left to search, `bold` the most compressed end.
    safe, bold = (config.low, config.high) if config.more == "high" else (config.high, config.low)
    best_level: float | None = None
    best_model: nn.Module | None = None
    best_metric: float | None = None
    records: list[dict[str, Any]] = []
    while len(records) < config.probes and abs(bold - safe) >= config.tolerance:
        level = (safe + bold) / 2.0
        candidate = copy.deepcopy(model)
        with _forked_random_state(config.seed):
            compress(candidate, level)
            if fine_tune is not None:
                fine_tune(candidate, level)
            metric = _number(evaluate(candidate), "evaluate(model)")
        drop = sign * (baseline - metric)
        accepted = drop <= allowed  # a NaN metric is never accepted
        record = {"level": level, "metric": metric, "drop": drop, "accepted": accepted}
        records.append(record)
        if accepted:
            safe = level
            if best_level is None or _more_compressed(level, best_level, config.more):
                best_level, best_model, best_metric = level, candidate, metric
        else:
            bold = level
        del candidate
        if progress is not None:
            progress(dict(record))
    return SearchResult(best_level, best_model, baseline, best_metric, records, allowed)


def _baseline(model: nn.Module, evaluate: Callable[[nn.Module], float], seed: int) -> float:
    """The metric of the original ``model``; its train/eval flags are put back as they were."""
    modes = [(module, module.training) for module in model.modules()]
    try:
        with _forked_random_state(seed):
            baseline = _number(evaluate(model), "evaluate(model)")
    finally:
        for module, training in modes:
            module.training = training
    if not math.isfinite(baseline):
        raise ValueError(
            f"`evaluate(model)` returned {baseline} on the original model: the drop of every probe is measured "
            "from it, so it must be a finite number."
        )
    return baseline


def _number(value: Any, name: str) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value.detach())
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"`{name}` must return a number (the metric); got {type(value).__name__}.")
    return float(value)


def _more_compressed(level: float, than: float, more: str) -> bool:
    return level > than if more == "high" else level < than


@contextlib.contextmanager
def _forked_random_state(seed: int) -> Iterator[None]:
    """Seed torch's, NumPy's and Python's random generators with ``seed`` inside (as Lightning's
    ``seed_everything`` does), and restore them on the way out."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            np.random.seed(seed)
            random.seed(seed)
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
