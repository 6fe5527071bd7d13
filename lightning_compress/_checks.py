"""Argument checks of every callback and core, in one place: each error names the argument and the fix.

The generic checks come first; each scheme's own checks follow in its section. A callback checks its
arguments in ``__init__`` (so a bad YAML file fails before the Trainer is built) by calling these.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from lightning_compress.schedules import validate_amount, validate_point


class _Unset:
    """The default of a deprecated argument: tells "not given" apart from any value."""

    def __repr__(self) -> str:
        return "<unset>"


UNSET: Any = _Unset()


def renamed(owner: str, old: str, old_value: Any, new: str, new_value: Any, default: Any) -> Any:
    """The value of an argument renamed from ``old`` to ``new``: the old one (with a ``DeprecationWarning``) when
    given, else the new one. Giving both, with different values, is an error.

    Example::

        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     renamed("GradualPruning", "materialize", False, "finalize", True, True)
        False
        >>> str(caught[0].message)
        '`GradualPruning(materialize=...)` is deprecated: use `finalize=...`.'
        >>> renamed("GradualPruning", "materialize", UNSET, "finalize", False, True)
        False
    """
    if old_value is UNSET or old_value is None:  # None: LightningCLI needs a default of the argument's type
        return new_value
    warnings.warn(f"`{owner}({old}=...)` is deprecated: use `{new}=...`.", DeprecationWarning, stacklevel=3)
    if new_value != default and new_value != old_value:
        raise ValueError(
            f"`{owner}` got both `{old}={old_value!r}` and `{new}={new_value!r}`: give only `{new}`."
        )
    return old_value


def renamed_flags(owner: str, flags: dict[str, tuple[Any, str, Any, Any]]) -> list[bool]:
    """Boolean arguments renamed from the keys of ``flags`` (``{old: (old value or None, new, new value,
    default)}``), checked under the name the user gave; see :func:`renamed`. The old names default to ``None``
    (not given): LightningCLI checks every default against its type.

    Example::

        >>> renamed_flags("GradualPruning", {"materialize": (None, "finalize", False, True)})
        [False]
    """
    values = []
    for old, (old_value, new, new_value, default) in flags.items():
        given = UNSET if old_value is None else old_value
        value = renamed(owner, old, given, new, new_value, default)
        values.append(check_bool(value, new if given is UNSET else old))
    return values


def check_bool(value: Any, name: str) -> bool:
    """``value`` must be ``True`` or ``False``.

    Example::

        >>> check_bool(1, "finalize")
        Traceback (most recent call last):
        ...
        TypeError: `finalize=1` must be True or False.
    """
    if not isinstance(value, bool):
        raise TypeError(f"`{name}={value!r}` must be True or False.")
    return value


def check_int(value: Any, name: str, low: int | None = None, high: int | None = None, hint: str = "") -> int:
    """``value`` must be an integer (not a bool) in ``[low, high]``; ``hint`` is appended to the error.

    Example::

        >>> check_int(0, "bits", 1, 16, "2 to 65,536 shared values.")
        Traceback (most recent call last):
        ...
        ValueError: `bits=0` must be an integer from 1 to 16: 2 to 65,536 shared values.
    """
    if low is not None and high is not None:
        want = f"an integer from {low} to {high}"
    elif low is not None:
        want = "a positive integer" if low == 1 else f"an integer >= {low}"
    elif high is not None:
        want = f"an integer <= {high}"
    else:
        want = "an integer"
    message = f"`{name}={value!r}` must be {want}" + (f": {hint}" if hint else ".")
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(message)
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(message)
    return value


def check_number(
    value: Any,
    name: str,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    hint: str = "",
) -> float:
    """``value`` must be a finite number in the interval given (``low_open``/``high_open``: the bound excluded).

    Example::

        >>> check_number(0.0, "temperature", 0.0, low_open=True)
        Traceback (most recent call last):
        ...
        ValueError: `temperature=0.0` must be a number > 0.
    """
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {low:g}")
    if high is not None:
        parts.append(f"{'<' if high_open else '<='} {high:g}")
    want = "a number" + (" " + " and ".join(parts) if parts else "")
    message = f"`{name}={value!r}` must be {want}" + (f": {hint}" if hint else ".")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(message)
    value = float(value)
    if math.isnan(value) or math.isinf(value):
        raise ValueError(message)
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(message)
    if high is not None and (value >= high if high_open else value > high):
        raise ValueError(message)
    return value


def check_choice(value: Any, name: str, choices: Sequence[Any]) -> Any:
    """``value`` must be one of ``choices``.

    Example::

        >>> check_choice("l3", "criterion", ("l1", "l2"))
        Traceback (most recent call last):
        ...
        ValueError: Unknown `criterion='l3'`. Use one of 'l1', 'l2'.
    """
    if value not in choices:
        raise ValueError(f"Unknown `{name}={value!r}`. Use one of {', '.join(map(repr, choices))}.")
    return value


def check_layer_names(names: Any, selected: Sequence[str], argument: str, selection: Any) -> None:
    """Every name in ``names`` (e.g. the keys of ``layer_amounts``) is one of the ``selected`` layer names; the
    error lists close matches and how many layers ``selection`` picks.

    Example::

        >>> check_layer_names({"fc1": 0.5}, ["fc1", "fc2"], "layer_amounts", "(modules=[Linear])")
        >>> check_layer_names({"fc3": 0.5}, ["fc1", "fc2"], "layer_amounts", "(modules=[Linear])")
        Traceback (most recent call last):
        ...
        ValueError: `layer_amounts` names 'fc3' (did you mean 'fc2', 'fc1'?), which is not among the 2 layers the selection (modules=[Linear]) picks. Names are qualified as in `model.named_modules()`; leave out layers the selection does not pick, or widen `modules`.
    """
    import difflib

    unknown = [name for name in names or {} if name not in selected]
    if not unknown:
        return
    shown = []
    for name in unknown:
        close = difflib.get_close_matches(name, list(selected), n=3, cutoff=0.5)
        shown.append(f"{name!r}" + (f" (did you mean {', '.join(map(repr, close))}?)" if close else ""))
    which = "is not" if len(unknown) == 1 else "are not"
    raise ValueError(
        f"`{argument}` names {', '.join(shown)}, which {which} among the {len(selected)} layers the selection "
        f"{selection} picks. Names are qualified as in `model.named_modules()`; leave out layers the selection "
        "does not pick, or widen `modules`."
    )


def check_allocation(arguments: Any, key: str, owner: str) -> Any:
    """The one argument ``key`` of the per-layer levels a budget hands to ``owner`` (``{key: {layer: level}}``).

    Example::

        >>> check_allocation({"layer_ranks": {"fc": 0.5}}, "layer_ranks", "LowRankReplacement")
        {'fc': 0.5}
        >>> check_allocation({"layer_amounts": {"fc": 0.5}}, "layer_ranks", "LowRankReplacement")
        Traceback (most recent call last):
        ...
        TypeError: LowRankReplacement takes `{'layer_ranks': {layer: level}}` from a budget, got ['layer_amounts'].
    """
    if not isinstance(arguments, dict) or list(arguments) != [key]:
        got = list(arguments) if isinstance(arguments, dict) else type(arguments).__name__
        raise TypeError(f"{owner} takes `{{{key!r}: {{layer: level}}}}` from a budget, got {got}.")
    return arguments[key]


def check_levels_not_given(taker: Any, argument: str) -> None:
    """A budget hands ``taker`` its per-layer levels as ``argument``: none of the levels the user gave ``taker``
    (its ``given_levels``) may be set, or the budget's would silently replace them.

    Example::

        >>> class GradualPruning:
        ...     given_levels = {"amount": 0.5, "layer_amounts": None}
        >>> check_levels_not_given(GradualPruning(), "layer_amounts")
        Traceback (most recent call last):
        ...
        ValueError: GradualPruning(amount=0.5) and CompressionBudget both set how much to compress: the budget gives every layer its own level (as `layer_amounts`) for its `target`, which would replace amount=0.5. Leave `amount` unset (the budget's `target` sets the overall level), or remove the CompressionBudget.
    """
    given = {name: value for name, value in getattr(taker, "given_levels", {}).items() if value is not None}
    if given:
        shown, names = (
            ", ".join(f"{k}={v!r}" for k, v in given.items()),
            " and ".join(f"`{k}`" for k in given),
        )
        raise ValueError(
            f"{type(taker).__name__}({shown}) and CompressionBudget both set how much to compress: the budget gives "
            f"every layer its own level (as `{argument}`) for its `target`, which would replace {shown}. Leave "
            f"{names} unset (the budget's `target` sets the overall level), or remove the CompressionBudget."
        )


# -- weight sharing --


def check_sharing_bits(bits: Any) -> int:
    """Bits per shared-value index: an integer from 1 to 16 (2 to 65,536 shared values).

    Example::

        >>> check_sharing_bits(0)
        Traceback (most recent call last):
        ...
        ValueError: `bits=0` is out of range: weight sharing supports 1 to 16 bits (2 to 65,536 shared values).
    """
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise TypeError(f"`bits={bits!r}` must be an integer.")
    if not 1 <= bits <= 16:
        raise ValueError(
            f"`bits={bits}` is out of range: weight sharing supports 1 to 16 bits (2 to 65,536 shared values)."
        )
    return bits


def check_index_bits(index_bits: Any) -> int:
    """Bits per relative position of the sparse layout: an integer from 1 to 16."""
    if isinstance(index_bits, bool) or not isinstance(index_bits, int) or not 1 <= index_bits <= 16:
        raise ValueError(f"`index_bits={index_bits!r}` must be an integer from 1 to 16.")
    return index_bits


def check_iterations(iterations: Any) -> int:
    """The most k-means iterations: a positive integer."""
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"`iterations={iterations!r}` must be a positive integer.")
    return iterations


def check_seed(seed: Any) -> int:
    """The seed of the random centroid initialization: a non-negative integer."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"`seed={seed!r}` must be a non-negative integer (the seed of `init='random'`).")
    return seed


# -- binary --


def check_binary_mode(mode: Any, modes: Sequence[str]) -> str:
    """``"binary"`` or ``"ternary"`` (``modes``).

    Example::

        >>> check_binary_mode("int1", ("binary", "ternary"))
        Traceback (most recent call last):
        ...
        ValueError: Unknown `mode='int1'`. Use one of 'binary', 'ternary'.
    """
    return check_choice(mode, "mode", modes)


# -- monitor --


def check_positive_or_none(value: Any, name: str) -> int | None:
    """``None`` or a positive integer (a bool is refused).

    Example::

        >>> check_positive_or_none(0, "log_every_n_steps")
        Traceback (most recent call last):
        ...
        ValueError: `log_every_n_steps=0` must be a positive integer or None.
    """
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"`{name}={value!r}` must be a positive integer or None.")
    return value


def check_repeats(value: Any, name: str) -> int:
    """A positive integer (a bool is refused), e.g. the timed calls per model."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}={value!r}` must be a positive integer.")
    return value


def check_latency_mode(mode: Any, modes: Sequence[str]) -> str:
    """How the models are timed: one of ``modes``."""
    if mode not in modes:
        raise ValueError(f"`latency_mode={mode!r}` must be one of {', '.join(map(repr, modes))}.")
    return mode


def check_metric_names(metrics: Any) -> list[str]:
    """A list of the names the LightningModule logs in validation (not a single string).

    Example::

        >>> check_metric_names("val_acc")
        Traceback (most recent call last):
        ...
        TypeError: `metrics='val_acc'` must be a list of logged names, e.g. `metrics=['val_acc']`.
    """
    if isinstance(metrics, str) or not all(isinstance(m, str) and m for m in metrics):
        raise TypeError(f"`metrics={metrics!r}` must be a list of logged names, e.g. `metrics=['val_acc']`.")
    return list(metrics)


def check_prefix(prefix: Any) -> str:
    """The prefix of every logged name: a string."""
    if not isinstance(prefix, str):
        raise TypeError(f"`prefix={prefix!r}` must be a string such as 'compression/'.")
    return prefix


def check_metrics_source(
    metrics: Sequence[str], model: Any, has_validation: bool, limit_val_batches: Any
) -> None:
    """Metrics read from validation need a ``validation_step`` and validation batches (``model``: for the message)."""
    if metrics and not has_validation:
        raise ValueError(
            f"`metrics={list(metrics)!r}` are read from validation, but {type(model).__name__} has no "
            "`validation_step`. Add one that logs them, or pass `metrics=[]`."
        )
    if metrics and limit_val_batches == 0:
        raise ValueError(
            f"`metrics={list(metrics)!r}` are read from validation, but `limit_val_batches=0` turns it off. "
            "Allow validation batches, or pass `metrics=[]`."
        )


def check_metrics_logged(metrics: Sequence[str], logged: Any, model: Any) -> None:
    """After a validation: every name in ``metrics`` is among the ``logged`` ones (``model``: for the message)."""
    missing = [name for name in metrics if name not in logged]
    if missing:
        raise ValueError(
            f"`metrics`: {missing} not logged by {type(model).__name__}'s validation "
            f"(logged: {sorted(logged)}). Name metrics from that list."
        )


def check_report_path(path: Any, default_name: str) -> Any:
    """``None`` or a file path that is not a directory (``default_name`` is the file name suggested then)."""
    import os
    from pathlib import Path

    if path is None:
        return None
    if isinstance(path, bool) or not isinstance(path, str | os.PathLike):
        raise TypeError(f"`report_path={path!r}` must be a file path (str or os.PathLike), or None.")
    if Path(path).expanduser().is_dir():
        raise ValueError(
            f"`report_path={os.fspath(path)!r}` is a directory; give a file name, e.g. "
            f"`report_path={str(Path(path) / default_name)!r}`."
        )
    return path


# -- pruning --


def check_pruning_mode(mode: Any, amount: Any) -> tuple[str, float, tuple[int, int] | None]:
    """The kind of pruning ``mode`` asks for (``"unstructured"``, ``"structured"`` or ``"N:M"``), the amount it
    removes and, for N:M, the numbers ``(N, M)``; N:M fixes the amount at ``1 - N/M``.

    Unstructured and structured pruning may leave ``amount`` unset here (``None``): per-layer amounts or a budget
    give it later, and :func:`check_pruning_amount_given` checks that one did.

    Example::

        >>> check_pruning_mode("2:4", None)
        ('N:M', 0.5, (2, 4))
        >>> check_pruning_mode("structured", None)
        ('structured', None, None)
    """
    import re

    nm = re.match(r"^(\d+):(\d+)$", mode) if isinstance(mode, str) else None
    if nm is not None:
        n, m = int(nm.group(1)), int(nm.group(2))
        if not 1 <= n <= m:
            raise ValueError(f"`mode={mode!r}`: N:M needs 1 <= N <= M, e.g. '2:4'.")
        if amount is not None:
            raise ValueError(
                f"`mode={mode!r}` fixes the sparsity at 1 - {n}/{m} = {1 - n / m:g}; leave `amount` unset (None)."
            )
        return "N:M", validate_amount(1.0 - n / m, "amount"), (n, m)
    if mode == "N:M":
        raise ValueError("`mode='N:M'` needs numbers, e.g. `mode='2:4'`.")
    if not isinstance(mode, str) or mode not in ("unstructured", "structured"):
        raise ValueError(
            f"Unknown `mode={mode!r}`. Use one of 'unstructured', 'structured', or N:M numbers such as '2:4'."
        )
    return mode, None if amount is None else validate_amount(amount, "amount"), None


def check_pruning_amount_given(mode: str, amount: Any, layer_amounts: Any, budget: bool = False) -> None:
    """Unstructured and structured pruning need ``amount`` or ``layer_amounts`` by the time they set up
    (``budget``: the message also names the budget callback that can give them).

    Example::

        >>> check_pruning_amount_given("structured", None, None)
        Traceback (most recent call last):
        ...
        ValueError: `amount` is required for `mode='structured'`: the final fraction to prune, e.g. 0.9, or per-layer fractions in `layer_amounts`.
    """
    if amount is not None or layer_amounts is not None:
        return
    also = (
        " (or add a `CompressionBudget` callback, which chooses `layer_amounts` before this callback sets up)"
        if budget
        else ""
    )
    raise ValueError(
        f"`amount` is required for `mode={mode!r}`: the final fraction to prune, e.g. 0.9, or per-layer fractions "
        f"in `layer_amounts`{also}."
    )


def check_layer_amounts(value: Any, kind: str, mode: str, scope: str) -> dict[str, float] | None:
    """Per-layer amounts: ``None`` or a mapping ``{layer name: fraction removed in [0, 1)}``, for unstructured
    pruning with ``scope="layer"`` and for structured pruning.

    Example::

        >>> check_layer_amounts({"fc1": 0.5, "fc2": 0}, "unstructured", "unstructured", "layer")
        {'fc1': 0.5, 'fc2': 0.0}
        >>> check_layer_amounts({"fc1": 0.5}, "unstructured", "unstructured", "global")
        Traceback (most recent call last):
        ...
        ValueError: `layer_amounts` and `scope='global'` do not go together: a global ranking chooses how much each layer loses. Use `scope='layer'` with `layer_amounts`, or leave `layer_amounts` unset.
    """
    from collections.abc import Mapping

    if value is None:
        return None
    if kind == "N:M":
        raise ValueError(
            f"`layer_amounts` and `mode={mode!r}` do not go together: N:M keeps the same pattern in every layer. "
            "Leave `layer_amounts` unset, or use `mode='unstructured'`/`'structured'`."
        )
    if scope != "layer":
        raise ValueError(
            f"`layer_amounts` and `scope={scope!r}` do not go together: a global ranking chooses how much each "
            "layer loses. Use `scope='layer'` with `layer_amounts`, or leave `layer_amounts` unset."
        )
    if not isinstance(value, Mapping):
        raise TypeError(
            f"`layer_amounts={value!r}` must be a mapping of layer names to fractions, e.g. "
            "`{'encoder.fc1': 0.5, 'encoder.fc2': 0.8}`."
        )
    checked: dict[str, float] = {}
    for name, amount in value.items():
        if not isinstance(name, str):
            raise TypeError(f"`layer_amounts` has the key {name!r}; keys are layer names (str).")
        checked[name] = validate_amount(amount, f"layer_amounts[{name!r}]")
    return checked


def check_pruning_method(mode: str, kind: str, criterion: Any, scope: Any, criteria: Sequence[str]) -> None:
    """``criterion`` (one of ``criteria``) and ``scope`` (``"layer"``/``"global"``) for a ``mode`` of ``kind``.

    Example::

        >>> check_pruning_method("2:4", "N:M", "l1", "global", ("l1", "l2", "random"))
        Traceback (most recent call last):
        ...
        ValueError: `scope='global'` does not apply to `mode='2:4'`: every group of M weights keeps N, so there is nothing to rank globally. Leave `scope` at 'layer'.
    """
    calibrated = ("wanda", "sparsegpt")  # decide from the layers' inputs on calibration batches
    if kind == "structured" and criterion in calibrated:
        raise ValueError(
            f"`criterion={criterion!r}` does not apply to `mode='structured'`: it scores single weights from the "
            "inputs they multiply, for `mode='unstructured'` and N:M modes such as '2:4'. Use `mode='unstructured'` "
            f"or '2:4' with it, or a structured criterion: {', '.join(map(repr, criteria))}."
        )
    check_choice(criterion, "criterion", criteria)
    check_choice(scope, "scope", ("layer", "global"))
    if criterion in calibrated and scope != "layer":
        why = (
            "its scores are compared within each output row of a layer (the input norms of different layers are "
            "on different scales)"
            if criterion == "wanda"
            else "it reconstructs each layer's outputs on their own"
        )
        raise ValueError(
            f"`criterion={criterion!r}` does not apply to `scope={scope!r}`: {why}. Leave `scope` at 'layer' (and "
            "give per-layer amounts with `layer_amounts`), or use `criterion='l1'` for a global ranking."
        )
    if kind != "N:M":
        return
    # The N:M pattern is one decision per group of M weights: by magnitude, or from the layers' inputs.
    if criterion not in ("l1", "l2", *calibrated):
        raise ValueError(
            f"`criterion={criterion!r}` does not apply to `mode={mode!r}`: N:M keeps the largest magnitudes in "
            "every group ('l1'), or the most important weights from the layers' inputs ('wanda', 'sparsegpt'). "
            "Leave `criterion` at 'l1'."
        )
    if scope != "layer":
        raise ValueError(
            f"`scope={scope!r}` does not apply to `mode={mode!r}`: every group of M weights keeps N, so there is "
            "nothing to rank globally. Leave `scope` at 'layer'."
        )


def check_calibration_batches(value: Any) -> int:
    """How many batches activation-aware criteria (``"wanda"``, ``"sparsegpt"``) run the model on per decision.

    Example::

        >>> check_calibration_batches(0)
        Traceback (most recent call last):
        ...
        ValueError: `calibration_batches=0` must be a positive integer: the training batches the model runs on before each mask update of `criterion='wanda'` or 'sparsegpt', e.g. 8.
    """
    hint = (
        "the training batches the model runs on before each mask update of `criterion='wanda'` or 'sparsegpt', "
        "e.g. 8."
    )
    return check_int(value, "calibration_batches", 1, hint=hint)


def check_max_layer_amount(value: Any, amount: float | None, kind: str, scope: str) -> float | None:
    """The most one layer may lose under unstructured global pruning: ``None`` or a number in ``[amount, 1]``.

    Example::

        >>> check_max_layer_amount(0.5, 0.9, "unstructured", "global")
        Traceback (most recent call last):
        ...
        ValueError: `max_layer_amount=0.5` must be in [amount, 1] = [0.9, 1]: no layer may lose more than this fraction, so below `amount` the total could never reach `amount`.
    """
    if value is None:
        return None
    if kind != "unstructured" or scope != "global":
        raise ValueError(
            f"`max_layer_amount={value!r}` applies to `mode='unstructured', scope='global'` only (here "
            f"mode={kind!r}, scope={scope!r}): with `scope='layer'` every layer loses exactly `amount`. Leave it "
            "unset, or use `scope='global'`."
        )
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise TypeError(f"`max_layer_amount={value!r}` must be a number in (0, 1].")
    if not (amount or 0.0) <= value <= 1.0 or value == 0.0:
        raise ValueError(
            f"`max_layer_amount={value!r}` must be in [amount, 1] = [{amount or 0.0:g}, 1]: no layer may lose more than "
            "this fraction, so below `amount` the total could never reach `amount`."
        )
    return float(value)


def check_initial_amount(
    value: Any, amount: float | None, kind: str, mode: str, what: str = "`amount={:g}`"
) -> float:
    """The amount a pruning schedule starts from: in ``[0, amount]`` (``amount=None``: not known yet, checked
    again when it is); N:M applies its pattern whole (0).

    Example::

        >>> check_initial_amount(0.6, 0.5, "unstructured", "unstructured")
        Traceback (most recent call last):
        ...
        ValueError: `initial_amount=0.6` is above `amount=0.5`; pruning only grows.
    """
    initial = validate_amount(value, "initial_amount")
    if amount is not None and initial > amount:
        raise ValueError(f"`initial_amount={value}` is above {what.format(amount)}; pruning only grows.")
    if kind == "N:M" and initial != 0.0:
        raise ValueError(
            f"`initial_amount={value!r}` does not apply to `mode={mode!r}`: the pattern is applied whole at "
            "`start`. Leave `initial_amount` at 0."
        )
    return initial


def check_round_to(value: Any) -> int:
    """Structured pruning keeps channel counts a multiple of this: a positive integer (a bool is refused).

    Example::

        >>> check_round_to(True)
        Traceback (most recent call last):
        ...
        ValueError: `round_to=True` must be a positive integer (1 disables rounding).
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`round_to={value!r}` must be a positive integer (1 disables rounding).")
    return value


def check_pruning_frequency(value: Any) -> int | None:
    """Optimizer steps between two mask updates: a positive integer, or ``None`` (the callback chooses).

    Example::

        >>> check_pruning_frequency(0)
        Traceback (most recent call last):
        ...
        ValueError: `frequency=0` must be a positive number of optimizer steps, or None.
    """
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"`frequency={value!r}` must be a positive number of optimizer steps, or None.")
    return value


def check_taylor_setup(criterion: str, start_step: int, automatic_optimization: bool) -> None:
    """``criterion="taylor"`` ranks by gradients: it needs a step before the first decision and automatic
    optimization (it reads the gradients before each optimizer step)."""
    if criterion != "taylor":
        return
    if start_step == 0:
        raise ValueError(
            "`criterion='taylor'` ranks channels by their gradients, and there are none before the first "
            "optimizer step: start pruning at step 1 or later (e.g. `start='step:1'`)."
        )
    if not automatic_optimization:
        raise ValueError(
            "`criterion='taylor'` reads gradients before each optimizer step, which needs automatic "
            "optimization; choose 'l1' or 'l2' for a LightningModule with manual optimization."
        )


def check_taylor_gradients(grads: dict[str, Any]) -> dict[str, Any]:
    """``criterion="taylor"`` decides on gradients summed since the last decision: some must have been seen
    (returns ``grads``)."""
    if not grads:
        raise ValueError(
            "`criterion='taylor'` needs gradients before the first pruning step, but none were seen. "
            "Start pruning after at least one optimizer step (e.g. `start='step:1'` or later)."
        )
    return grads


def check_pruning_precision(kind: str, precision: str) -> None:
    """Structured pruning removes channels by tracing the model in float32: weights converted to another dtype
    (``Trainer(precision="bf16-true")``) cannot be traced, mixed precision can.

    Example::

        >>> check_pruning_precision("structured", "bf16-mixed")
        >>> check_pruning_precision("structured", "16-true")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: `mode='structured'` cannot run with `Trainer(precision='16-true')`: ...
    """
    if kind == "structured" and precision.endswith("-true") and precision != "32-true":
        raise ValueError(
            f"`mode='structured'` cannot run with `Trainer(precision={precision!r})`: the channels are removed at "
            "the end of training by tracing the model on a float32 example input, which a model whose weights "
            "are converted to another dtype rejects. Use `precision='bf16-mixed'` (or '16-mixed'): the weights "
            "stay float32 and the forward still runs in low precision; or use `mode='unstructured'`."
        )


def check_pruning_checkpoint_mode(state: Any, mode: str) -> None:
    """A GradualPruning checkpoint state written with another ``mode`` cannot be resumed.

    Example::

        >>> check_pruning_checkpoint_mode({"mode": "structured"}, "unstructured")
        Traceback (most recent call last):
        ...
        ValueError: The checkpoint was written by GradualPruning(mode='structured'); this has 'unstructured'.
    """
    if (written := state.get("mode", mode)) != mode:
        raise ValueError(
            f"The checkpoint was written by GradualPruning(mode={written!r}); this has {mode!r}."
        )


def check_pruning_ramp(
    schedule: Any, start: Any, end: Any, frequency: Any
) -> tuple[Any, Any, Any, int | None]:
    """``schedule`` (a name or a callable), ``start``/``end`` (``end`` not before ``start``) and ``frequency``
    of a pruning schedule, as ``(schedule, start, end, frequency)``.

    Example::

        >>> check_pruning_ramp("agp", 0.8, 0.2, None)
        Traceback (most recent call last):
        ...
        ValueError: `end=0.2` is before `start=0.8`. Pruning must end after it starts.
    """
    from lightning_compress.schedules import resolve_schedule

    if schedule != "exponential":
        resolve_schedule(schedule)
    start_point, end_point = validate_point(start, "start"), validate_point(end, "end")
    if isinstance(start_point, float) and isinstance(end_point, float) and end_point < start_point:
        raise ValueError(f"`end={end}` is before `start={start}`. Pruning must end after it starts.")
    return schedule, start_point, end_point, check_pruning_frequency(frequency)


# -- distillation --


def check_alpha(alpha: Any, name: str = "alpha") -> float:
    """A mixing weight in ``[0, 1]``: the weight of the distillation loss (the task loss gets ``1 - alpha``).

    Example::

        >>> check_alpha(0.5)
        0.5
        >>> check_alpha(1.5)
        Traceback (most recent call last):
        ...
        ValueError: `alpha=1.5` must be in [0, 1]: the weight of the distillation loss, the task loss gets 1 - alpha.
    """
    if isinstance(alpha, bool) or not isinstance(alpha, int | float):
        raise TypeError(f"`{name}={alpha!r}` must be a number in [0, 1].")
    if math.isnan(alpha) or not 0.0 <= alpha <= 1.0:
        raise ValueError(
            f"`{name}={alpha!r}` must be in [0, 1]: the weight of the distillation loss, "
            "the task loss gets 1 - alpha."
        )
    return float(alpha)


def check_temperature(temperature: Any, name: str = "temperature") -> float:
    """A softmax temperature: a finite number above 0.

    Example::

        >>> check_temperature(4)
        4.0
        >>> check_temperature(0.0)
        Traceback (most recent call last):
        ...
        ValueError: `temperature=0.0` must be a finite number > 0 (1 is the plain softmax; Hinton et al. used 2 to 20).
    """
    if isinstance(temperature, bool) or not isinstance(temperature, int | float):
        raise TypeError(f"`{name}={temperature!r}` must be a number > 0.")
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(
            f"`{name}={temperature!r}` must be a finite number > 0 "
            "(1 is the plain softmax; Hinton et al. used 2 to 20)."
        )
    return float(temperature)


def check_teacher(teacher: Any, teacher_class: Any) -> Any:
    """``"self"``, an ``nn.Module`` (no ``teacher_class``), or an existing checkpoint file with the
    LightningModule class to load it with; a path comes back as a ``str``.

    Example::

        >>> check_teacher("self", None)
        'self'
        >>> check_teacher(3, None)
        Traceback (most recent call last):
        ...
        TypeError: `teacher` got int; pass 'self', an nn.Module, or a checkpoint path.
    """
    import os

    from torch import nn

    if isinstance(teacher, nn.Module) or (isinstance(teacher, str) and teacher == "self"):
        if teacher_class is not None and isinstance(teacher, nn.Module):
            raise ValueError("`teacher_class` is only used to load a checkpoint path; `teacher` is a module.")
        if teacher_class is not None:
            raise ValueError(
                "`teacher_class` is only used to load a checkpoint path, not with teacher='self'."
            )
        return teacher
    if not isinstance(teacher, str | os.PathLike):
        raise TypeError(
            f"`teacher` got {type(teacher).__name__}; pass 'self', an nn.Module, or a checkpoint path."
        )
    path = os.fspath(teacher)
    if "://" not in path and not os.path.isfile(path):
        raise ValueError(
            f"`teacher={path!r}` is neither 'self' nor an existing checkpoint file. Pass 'self', an "
            "nn.Module, or the path of a LightningModule checkpoint (with `teacher_class`)."
        )
    from lightning.pytorch import LightningModule  # only a checkpoint teacher needs Lightning

    if not (isinstance(teacher_class, type) and issubclass(teacher_class, LightningModule)):
        raise ValueError(
            f"`teacher={path!r}` is a checkpoint path: pass the LightningModule class to load it with as "
            "`teacher_class` (e.g. `teacher_class=MyModel`)."
        )
    return path


def check_module_name(value: Any, name: str, optional: bool = False) -> str | None:
    """A qualified module name (``""``: the model itself); ``None`` too when ``optional``.

    Example::

        >>> check_module_name(3, "teacher_module", optional=True)
        Traceback (most recent call last):
        ...
        TypeError: `teacher_module=3` must be a module name or None.
    """
    if value is None and optional:
        return None
    if not isinstance(value, str):
        hint = "a module name or None." if optional else "a module name ('' for the LightningModule itself)."
        raise TypeError(f"`{name}={value!r}` must be {hint}")
    return value


def check_feature_loss(student: Any, teacher: Any, loss: Any, weight: Any, losses: Sequence[str]) -> None:
    """The fields of one feature term: module names, a loss among ``losses``, a finite weight >= 0."""
    if not isinstance(student, str):
        raise TypeError(f"`FeatureLoss.student={student!r}` must be a module name (str).")
    if teacher is not None and not isinstance(teacher, str):
        raise TypeError(f"`FeatureLoss.teacher={teacher!r}` must be a module name (str) or None.")
    if loss not in losses:
        choices = ", ".join(repr(c) for c in losses)
        raise ValueError(f"Unknown `loss={loss!r}` for the feature {student!r}. Use one of {choices}.")
    if (
        isinstance(weight, bool)
        or not isinstance(weight, int | float)
        or not math.isfinite(weight)
        or weight < 0
    ):
        raise ValueError(f"`FeatureLoss.weight={weight!r}` must be a finite number >= 0.")


def check_features(features: Any, kind: type, logits: bool) -> tuple[Any, ...]:
    """A list of ``kind`` (``FeatureLoss``) objects with distinct terms; with ``logits=False`` not empty."""
    example = "e.g. `features=[FeatureLoss('layer3', loss='attention')]`"
    if isinstance(features, kind | str) or not isinstance(features, Sequence):
        raise TypeError(f"`features={features!r}` must be a list of FeatureLoss objects, {example}.")
    for feature in features:
        if not isinstance(feature, kind):
            raise TypeError(f"`features` must hold FeatureLoss objects; got {feature!r}. Write {example}.")
    labels = [f.label for f in features]
    if len(set(labels)) != len(labels):
        raise ValueError(f"`features` lists the same term twice: {labels}.")
    if not logits and not features:
        raise ValueError("Nothing to distill: `logits=False` and no `features`. Enable one of them.")
    return tuple(features)


def check_teacher_precision(value: Any, choices: Sequence[str]) -> str | None:
    """``None`` (the student's precision) or one of ``choices``."""
    if value is not None and value not in choices:
        choice = ", ".join(repr(c) for c in choices)
        raise ValueError(f"Unknown `teacher_precision={value!r}`. Use None or one of {choice}.")
    return value


def check_ramp(start: Any, end: Any) -> None:
    """Fractions of training ``start`` and ``end`` (already checked points) in order."""
    if isinstance(start, float) and isinstance(end, float) and end < start:
        raise ValueError(f"`end={end}` is before `start={start}`. The ramps must end after they start.")


def check_optional(check: Any, value: Any, name: str) -> Any:
    """``None``, or ``value`` as ``check(value, name)`` returns it.

    Example::

        >>> check_optional(check_alpha, None, "initial_alpha") is None
        True
        >>> check_optional(check_alpha, 1, "initial_alpha")
        1.0
    """
    return None if value is None else check(value, name)


# -- low rank --


def _low_rank_in(
    value: Any, low: float, high: float, closed_left: bool = False, closed_right: bool = False
) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        return False
    above = value >= low if closed_left else value > low
    below = value <= high if closed_right else value < high
    return above and below


# The forms of a k×k convolution (`conv=`), with what each one is, for the errors.
CONV_FORMS = {"tucker": "1x1 → k×k → 1x1", "channel": "k×k → 1x1", "depthwise": "depthwise k×k → 1x1"}


def check_low_rank_choice(value: Any, name: str, options: dict[str, str]) -> str:
    """``value`` must be one of ``options`` (``{option: what it means}``, shown in the error).

    Example::

        >>> check_low_rank_choice("cp", "conv", {"tucker": "1x1 → k×k → 1x1", "channel": "k×k → 1x1"})
        Traceback (most recent call last):
        ...
        ValueError: Unknown `conv='cp'`. Use 'tucker' (1x1 → k×k → 1x1) or 'channel' (k×k → 1x1).
    """
    if isinstance(value, str) and value in options:
        return value
    shown = [f"{option!r} ({meaning})" if meaning else repr(option) for option, meaning in options.items()]
    listing = shown[0] if len(shown) == 1 else f"{', '.join(shown[:-1])} or {shown[-1]}"
    raise ValueError(f"Unknown `{name}={value!r}`. Use {listing}.")


def check_low_rank_rule(
    rank: Any, energy: Any, budget: Any, budget_on: Any = "params", allocation: Any = "energy"
) -> str:
    """At most one rank rule (``rank``, ``energy`` or ``budget``) in its range; ``budget_on`` and ``allocation``
    known and given only with ``budget``. Returns the name of the rule given (``None``: none, which
    ``layer_ranks`` or a budget must then make up for, see :func:`check_low_rank_rule_given`).

    Example::

        >>> check_low_rank_rule(None, 0.9, None)
        'energy'
        >>> check_low_rank_rule(None, None, None) is None
        True
        >>> check_low_rank_rule(4, None, None, budget_on="macs")
        Traceback (most recent call last):
        ...
        ValueError: `budget_on='macs'` only applies with `budget`, which is not given: pass `budget=...` instead of `rank`, or leave `budget_on` out.
    """
    given = [
        name for name, value in (("rank", rank), ("energy", energy), ("budget", budget)) if value is not None
    ]
    if len(given) > 1:
        raise ValueError(f"{_ONE_RULE}; got {', '.join(f'`{n}`' for n in given)}.")
    if rank is not None:
        if isinstance(rank, bool) or not isinstance(rank, int | float):
            raise TypeError(f"`rank={rank!r}` must be an int (a fixed rank) or a float in (0, 1].")
        if (isinstance(rank, int) and rank < 1) or (isinstance(rank, float) and not 0.0 < rank <= 1.0):
            raise ValueError(
                f"`rank={rank!r}` must be a positive int (a fixed rank) or a float in (0, 1] "
                "(a fraction of the full rank)."
            )
    if energy is not None and not _low_rank_in(energy, 0.0, 1.0, closed_right=True):
        raise ValueError(
            f"`energy={energy!r}` must be in (0, 1]: the fraction of each layer's Σσ² the kept rank holds."
        )
    if budget is not None and not _low_rank_in(budget, 0.0, 1.0):
        raise ValueError(
            f"`budget={budget!r}` must be in (0, 1): the fraction of the selected layers' {budget_on} to keep."
        )
    check_low_rank_choice(budget_on, "budget_on", {"params": "", "macs": ""})
    check_low_rank_choice(allocation, "allocation", {"energy": "joint", "uniform": "per layer"})
    for name, value, default in (("budget_on", budget_on, "params"), ("allocation", allocation, "energy")):
        if budget is None and value != default:
            instead = f" instead of `{given[0]}`" if given else ""
            raise ValueError(
                f"`{name}={value!r}` only applies with `budget`, which is not given: pass `budget=...`{instead}, "
                f"or leave `{name}` out."
            )
    return given[0] if given else None


_ONE_RULE = "Give exactly one of `rank` (e.g. 32 or 0.25), `energy` (e.g. 0.9) or `budget` (e.g. 0.5)"


def check_low_rank_rule_given(
    rule: str | None, layer_ranks: Any, unnamed: Sequence[str], budget: bool
) -> None:
    """Without a rank rule (``rule`` is ``None``), ``layer_ranks`` must name every layer to factorize (``unnamed``:
    those it leaves out); ``budget``: the message also names the budget callback that can give them.

    Example::

        >>> check_low_rank_rule_given(None, {"fc1": 8}, ["fc2"], budget=False)
        Traceback (most recent call last):
        ...
        ValueError: Give exactly one of `rank` (e.g. 32 or 0.25), `energy` (e.g. 0.9) or `budget` (e.g. 0.5); got none, and `layer_ranks` does not name ['fc2']: give a rule for the layers it leaves out, or name them.
    """
    if rule is not None or (layer_ranks is not None and not unnamed):
        return
    if layer_ranks is not None:
        raise ValueError(
            f"{_ONE_RULE}; got none, and `layer_ranks` does not name {list(unnamed)}: give a rule for the layers it "
            "leaves out, or name them."
        )
    also = (
        ", or add a `CompressionBudget(scheme='low_rank')` callback, which chooses `layer_ranks` before this "
        "callback sets up"
        if budget
        else ""
    )
    raise ValueError(f"{_ONE_RULE}; got none. Or give a rank per layer in `layer_ranks`{also}.")


def check_layer_ranks(value: Any) -> dict[str, int | float] | None:
    """Per-layer ranks: ``None`` or a mapping ``{layer name: rank}``, a rank being a positive ``int`` (fixed) or a
    ``float`` in ``(0, 1]`` (a fraction of the layer's full rank).

    Example::

        >>> check_layer_ranks({"fc1": 8, "fc2": 0.25})
        {'fc1': 8, 'fc2': 0.25}
        >>> check_layer_ranks({"fc1": 1.5})
        Traceback (most recent call last):
        ...
        ValueError: `layer_ranks['fc1']=1.5` must be a positive int (a fixed rank) or a float in (0, 1] (a fraction of the full rank).
    """
    from collections.abc import Mapping

    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise TypeError(
            f"`layer_ranks={value!r}` must be a mapping of layer names to ranks, e.g. `{{'fc1': 32, 'fc2': 0.25}}`."
        )
    checked: dict[str, int | float] = {}
    for name, rank in value.items():
        if not isinstance(name, str):
            raise TypeError(f"`layer_ranks` has the key {name!r}; keys are layer names (str).")
        what = f"`layer_ranks[{name!r}]={rank!r}` must be a positive int (a fixed rank) or a float in (0, 1]"
        if isinstance(rank, bool) or not isinstance(rank, int | float):
            raise TypeError(f"{what}.")
        if (isinstance(rank, int) and rank < 1) or (isinstance(rank, float) and not 0.0 < rank <= 1.0):
            raise ValueError(f"{what} (a fraction of the full rank).")
        checked[name] = rank
    return checked


def check_low_rank_refine(refine: Any, conv: Any) -> bool:
    """``refine`` is a bool, and ``True`` only with ``conv="depthwise"`` (the form whose 1x1 weights it refits).

    Example::

        >>> check_low_rank_refine(True, "tucker")
        Traceback (most recent call last):
        ...
        ValueError: `refine=True` refits the 1x1 weights of `conv='depthwise'` layers, but `conv='tucker'`: give `conv='depthwise'`, or leave `refine` out.
    """
    check_bool(refine, "refine")
    if refine and conv != "depthwise":
        raise ValueError(
            f"`refine=True` refits the 1x1 weights of `conv='depthwise'` layers, but `conv={conv!r}`: give "
            "`conv='depthwise'`, or leave `refine` out."
        )
    return refine


def check_depth_multiplier(value: Any) -> int:
    """The depth multiplier of the depthwise form: a positive integer.

    Example::

        >>> check_depth_multiplier(0)
        Traceback (most recent call last):
        ...
        ValueError: `depth_multiplier=0` must be a positive integer: the number of k×k filters per input channel, e.g. 1 or 2 (per layer, `layer_ranks` also takes a fraction of min(out, k·k)).
    """
    hint = (
        "the number of k×k filters per input channel, e.g. 1 or 2 (per layer, `layer_ranks` also takes a "
        "fraction of min(out, k·k))."
    )
    return check_int(value, "depth_multiplier", 1, hint=hint)


def check_compact_modules(modules: Any) -> Any:
    """``modules`` of CompactConvReplacement narrowed to convolutions: layer types must be ``nn.Conv2d`` (or
    subclasses of it), and name patterns alone select the ``nn.Conv2d`` layers they match (``nn.Conv2d`` is
    added). Call it on a selection ``ModuleSelection`` has accepted.

    Example::

        >>> from torch import nn
        >>> check_compact_modules("net.*")
        [<class 'torch.nn.modules.conv.Conv2d'>, 'net.*']
        >>> check_compact_modules([nn.Linear, "net.*"])
        Traceback (most recent call last):
        ...
        ValueError: `modules` selects Linear layers, but CompactConvReplacement replaces k×k convolutions: select nn.Conv2d layers (by type and/or name), and leave Linear layers to LowRankReplacement.
    """
    from torch import nn

    items = [] if modules is None else [modules] if isinstance(modules, type | str) else list(modules)
    types = [item for item in items if isinstance(item, type)]
    others = [t.__name__ for t in types if not issubclass(t, nn.Conv2d)]
    if others:
        raise ValueError(
            f"`modules` selects {', '.join(others)} layers, but CompactConvReplacement replaces k×k convolutions: "
            f"select nn.Conv2d layers (by type and/or name), and leave {', '.join(others)} layers to "
            "LowRankReplacement."
        )
    return items if types else [nn.Conv2d, *items]


def check_compact_named(reasons: dict[str, str]) -> None:
    """Layers that ``modules`` names exactly (``{name: why it is not a k×k convolution}``) must be k×k convs.

    Example::

        >>> check_compact_named({"net.8": "Linear is not an nn.Conv2d"})
        Traceback (most recent call last):
        ...
        ValueError: `modules` names 'net.8', which CompactConvReplacement cannot make depthwise-separable: Linear is not an nn.Conv2d. Name k×k nn.Conv2d layers (groups=1), or leave these out.
    """
    if reasons:
        listing = "; ".join(
            f"{name!r}, which CompactConvReplacement cannot make depthwise-separable: {why}"
            for name, why in reasons.items()
        )
        raise ValueError(
            f"`modules` names {listing}. Name k×k nn.Conv2d layers (groups=1), or leave these out."
        )


def check_low_rank_count(value: Any, name: str) -> int:
    """``value`` must be a positive integer (a ``ValueError`` for any other value).

    Example::

        >>> check_low_rank_count(2.5, "calibration_batches")
        Traceback (most recent call last):
        ...
        ValueError: `calibration_batches=2.5` must be a positive integer.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}={value!r}` must be a positive integer.")
    return value


def check_low_rank_non_negative(value: Any, name: str) -> float:
    """``value`` must be a non-negative number (a ``ValueError`` for any other value, NaN included).

    Example::

        >>> check_low_rank_non_negative(float("nan"), "activation_exponent")
        Traceback (most recent call last):
        ...
        ValueError: `activation_exponent=nan` must be a non-negative number.
    """
    if not _low_rank_in(value, 0.0, math.inf, closed_left=True):
        raise ValueError(f"`{name}={value!r}` must be a non-negative number.")
    return float(value)


def check_function(value: Any, name: str, what: str, example: str) -> Any:
    """``None`` or a callable; else a ``TypeError`` saying that ``name`` must be a function ``what``."""
    if value is not None and not callable(value):
        raise TypeError(f"`{name}={value!r}` must be a function {what}, e.g. `{name}={example}`.")
    return value


def check_calibration_input(value: Any) -> Any:
    """``None`` or a function from a training batch to the model's input."""
    what = "from a training batch to the model's input"
    return check_function(value, "calibration_input", what, "lambda batch: batch[0]")


def check_calibration_mask(value: Any) -> Any:
    """``None`` or a function from the model input to a ``(batch, positions)`` mask."""
    what = "from the model input to a (batch, positions) mask of the positions that count"
    return check_function(value, "calibration_mask", what, "lambda x: x['attention_mask']")


def check_loss_mask(value: Any) -> Any:
    """``None`` or a function from the arguments of the distilled module's call to a ``(batch, positions)`` mask."""
    what = "from the arguments of `module`'s call, by name, to a (batch, positions) mask of the positions that count"
    return check_function(value, "loss_mask", what, "lambda x: x['attention_mask']")


def check_low_rank_deprecated(alpha: Any, log_per_layer: Any) -> tuple[Any, Any]:
    """The deprecated ``alpha`` and ``log_per_layer``, checked under their own names, or :data:`UNSET` where not
    given. They default to ``None`` rather than ``UNSET``: LightningCLI checks every default against its type."""
    return (
        UNSET if alpha is None else check_low_rank_non_negative(alpha, "alpha"),
        UNSET if log_per_layer is None else check_bool(log_per_layer, "log_per_layer"),
    )


def check_low_rank_data(config: Any, has_loader: bool, has_example: bool) -> None:
    """A data-aware ``config.method`` or ``config.refine`` needs a training loader; counting MACs needs an
    example input."""
    method, refine = config.method, config.refine
    if method in ("whitened", "asvd") and not has_loader:
        raise ValueError(
            f"`method={method!r}` needs calibration batches from the training loader, and this Trainer has none. "
            "Pass training data to `fit`, or use `method='svd'`."
        )
    if refine and not has_loader:
        raise ValueError(
            "`refine=True` needs calibration batches from the training loader, and this Trainer has none. "
            "Pass training data to `fit`, or leave `refine` out."
        )
    if not has_example:
        raise ValueError(
            "LowRankReplacement counts the MACs of each layer on an example input: set `example_input_array` "
            "on the LightningModule, pass `example_input`, or give the Trainer training data."
        )


def check_low_rank_first(me: Any, callbacks: Sequence[Any]) -> None:
    """No callback that selects layers (by its ``selects_layers`` declaration) sets up before ``me`` (``callbacks``
    in effect order), except another low-rank replacement (``me``'s class, a subclass of it or its base: the layers
    it factorized are not selected again)."""
    for callback in callbacks:
        if callback is me:
            return
        related = isinstance(callback, type(me)) or isinstance(me, type(callback))
        if getattr(callback, "selects_layers", False) and not related:
            other, mine = type(callback).__name__, type(me).__name__
            raise ValueError(
                f"{other} declares `effect_order={callback.effect_order}`, which sets it up before "
                f"{mine} (`effect_order={me.effect_order}`), but {mine} replaces layers "
                f"that {other} selects. Give {other} a later `effect_order`."
            )


def check_low_rank_later(me: Any, callbacks: Sequence[Any], world_size: int) -> None:
    """Replacing layers during training (``me.start``): a single process, and no other callback that selects
    layers (by its ``selects_layers`` declaration)."""
    start = me.start
    if world_size > 1:
        raise ValueError(
            f"`start={start!r}` replaces layers during training, which needs a single process; with "
            f"{world_size} processes leave `start=None` (replace in `setup`)."
        )
    others = [type(c).__name__ for c in callbacks if c is not me and getattr(c, "selects_layers", False)]
    if others:
        raise ValueError(
            f"{type(me).__name__}(start={start!r}) replaces layers during training, but {', '.join(others)} set "
            "up on the layers as they were and would keep using the old ones. Leave `start=None` to combine them."
        )


def check_not_spawned(callback: Any, trainer: Any) -> None:
    """A callback that changes the model's structure does not run in processes a spawn/fork launcher starts:
    Lightning copies only the weights back into the launching process's model, which keeps its old structure."""
    from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher

    launcher = getattr(trainer.strategy, "launcher", None)
    if callback.changes_structure and isinstance(launcher, _MultiProcessingLauncher):
        raise ValueError(
            f"{type(callback).__name__} changes the model's structure in the training processes, and this strategy "
            f"({type(trainer.strategy).__name__}) starts them with multiprocessing (start method "
            f"{launcher._start_method!r}, as `strategy='ddp_spawn'` and `'ddp_fork'` do): at the end of fit Lightning "
            "copies only the weights back into this process's model, which keeps its old structure, so the "
            "compressed model would be lost. Use `strategy='ddp'` (each process runs the script)."
        )


def qat_stopped_early(step: int, start: Any, steps: Mapping[str, int | None]) -> str:
    """The warning for a fit that stopped at ``step``, before QAT's ``start`` (``steps["start"]``)."""
    return (
        f"QuantizationAwareTraining: the fit stopped at step {step}, before `start={start!r}` (step "
        f"{steps['start'] or 0}), so no step trained with quantization and there are no ranges to convert with: the "
        "model stays float. Lower `start`, or let the fit run past it."
    )


def check_no_weight_averaging(name: str, changes_weights: bool, callbacks: Sequence[Any]) -> None:
    """Lightning's weight averaging (``StochasticWeightAveraging``, ``WeightAveraging``/``EMAWeightAveraging``)
    keeps an average of the weights and writes it into the model: refused next to a callback that changes the
    weights or the structure (``changes_weights``), whose zeros, shared values or new layers the average would
    undo or not fit."""
    averaging = [type(c).__name__ for c in callbacks if _averages(c)]
    if changes_weights and averaging:
        raise ValueError(
            f"{name} and {averaging[0]} cannot share a fit: {averaging[0]} keeps its own average of the weights "
            f"and writes it into the model, which undoes what {name} does to the weights (zeros, shared or "
            "quantized values) or no longer fits its layers once they change shape. Compress in one fit, then "
            "average the weights in a fit of its own, or leave the averaging out."
        )


_AVERAGING = ("StochasticWeightAveraging", "WeightAveraging", "EMAWeightAveraging")


def _averages(callback: Any) -> bool:
    return any(cls.__name__ in _AVERAGING for cls in type(callback).__mro__)


def stopped_early(callback: Any, stopped: int, argument: str, step: int, undone: str) -> str:
    """The warning for a fit that stopped at step ``stopped``, before ``callback``'s ``argument`` (at ``step``)
    did what it was for (``undone``)."""
    name, value = type(callback).__name__, getattr(callback, argument)
    return (
        f"{name}: the fit stopped at step {stopped} (EarlyStopping, `max_time` or `should_stop`), before "
        f"`{argument}={value!r}` (step {step}): {undone}. Let the fit run longer, or give an earlier `{argument}`."
    )


def check_start_within_fit(
    start: Any,
    step: int,
    total: float,
    what: str,
    fix: str = "Give an earlier `start`.",
    argument: str = "start",
) -> None:
    """The step of ``start`` (the value of ``argument``) comes before the end of the fit (``total`` steps; -1 or
    not finite: unknown, unchecked); ``what`` says what would never happen, ``fix`` what to do."""
    if math.isfinite(total) and total >= 0 and step >= total:
        raise ValueError(
            f"`{argument}={start!r}` is step {step}, but this fit ends after {int(total)} steps: {what}. {fix}"
        )


def check_low_rank_start_step(start: Any, step: int, total: int) -> None:
    """The step of ``start`` comes before the end of the fit (``total`` steps)."""
    check_start_within_fit(
        start, step, total, "the layers would never be replaced",
        "Give an earlier `start`, or leave it out to replace in `setup`.",
    )  # fmt: skip


def check_low_rank_optimized(start: Any, outside: Sequence[str]) -> None:
    """Every layer replaced at ``start`` has its trainable parameters in an optimizer (``outside``: those
    that do not)."""
    if outside:
        raise ValueError(
            f"LowRankReplacement(start={start!r}) hands the factors of each replaced layer to the optimizer that "
            f"trains the layer, but no optimizer holds the trainable parameters of {', '.join(map(repr, outside))}. "
            "Add them to the optimizer in `configure_optimizers`, freeze them (`requires_grad_(False)`: their "
            "factors then stay frozen), or leave them out with `exclude=`."
        )


# -- quantization-aware training --


def check_qat_bits(scheme: str, bits: Any, group_size: Any, int4_group_sizes: Sequence[int]) -> int:
    """The weight bits of a quantization-aware training scheme (``None``: its default), checked with
    ``group_size``.

    Example::

        >>> check_qat_bits("intx-weight-only", 9, None, (32,))
        Traceback (most recent call last):
        ...
        ValueError: `bits=9` is out of range: low-bit schemes support 2 to 8-bit weights (torchao has no 1-bit integer weights; `BinaryWeights(mode='binary')` trains 1-bit weights).
    """
    if bits is not None and (isinstance(bits, bool) or not isinstance(bits, int)):
        raise TypeError(f"`bits={bits!r}` must be an integer.")
    if scheme == "int8":
        if bits not in (None, 8):
            raise ValueError(
                f"`bits={bits}` is not available with `scheme='int8'` (8-bit only). Use "
                "`scheme='int8-dynamic-intx'` or 'intx-weight-only' for 2 to 8-bit weights."
            )
        if group_size is not None:
            raise ValueError("`group_size` applies to the low-bit schemes; `scheme='int8'` is per channel.")
        return 8
    bits = 4 if bits is None else bits
    if scheme == "int4-weight-only" and bits != 4:
        raise ValueError(f"`scheme='int4-weight-only'` has 4-bit weights; got `bits={bits}`.")
    if not 2 <= bits <= 8:
        raise ValueError(
            f"`bits={bits}` is out of range: low-bit schemes support 2 to 8-bit weights (torchao has "
            "no 1-bit integer weights; `BinaryWeights(mode='binary')` trains 1-bit weights)."
        )
    if group_size is not None and (
        isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2
    ):
        raise ValueError(
            f"`group_size={group_size!r}` must be an integer of at least 2 (weights per scale), or None "
            "for one scale per output channel."
        )
    if scheme == "int4-weight-only" and group_size not in (None, *int4_group_sizes):
        raise ValueError(
            f"`group_size={group_size}` is not available with `scheme='int4-weight-only'`: use one of "
            f"{', '.join(map(str, int4_group_sizes))} (default 128)."
        )
    return bits


def check_qat_module(module: Any) -> str | None:
    """The part to quantize: a submodule name, or ``None`` for the whole forward."""
    if module is not None and (not isinstance(module, str) or not module):
        raise ValueError(
            f"`module={module!r}` must be a submodule name such as 'net', or None (whole forward)."
        )
    return module


def check_qat_layers(scheme: str, chosen: bool) -> None:
    """``modules``/``exclude`` (``chosen``: not their defaults) choose the layers of the low-bit schemes only."""
    if scheme == "int8" and chosen:
        raise ValueError(
            "`modules` and `exclude` select the `nn.Linear` layers of the low-bit schemes; "
            "`scheme='int8'` quantizes every convolution and linear layer of the exported part. Choose "
            "that part with `module='name'` (e.g. `module='backbone'`), or use a low-bit scheme."
        )


def check_qat_int8_options(
    scheme: str, measure: bool, export_path: Any, freeze_observers: Any, freeze_bn: Any
) -> None:
    """``measure``, ``export_path``, ``freeze_observers`` and ``freeze_bn`` apply to ``scheme='int8'`` only."""
    if measure and scheme != "int8":
        raise ValueError(
            f"`measure=True` compiles and times the int8 program of `scheme='int8'`; `scheme={scheme!r}` has "
            "no compiled CPU program to time."
        )
    if export_path is not None and scheme != "int8":
        raise ValueError(
            f"`export_path` saves the converted int8 program of `scheme='int8'`; `scheme={scheme!r}` converts "
            "in place (save the model's state_dict instead)."
        )
    if scheme != "int8" and (freeze_observers is not None or freeze_bn is not None):
        raise ValueError(
            f"`freeze_observers` and `freeze_bn` apply to `scheme='int8'`; `scheme={scheme!r}` has no "
            "observers (weight scales follow the weights at every step, activations are quantized "
            "dynamically) and quantizes only `nn.Linear` layers. Leave both unset."
        )


def check_model_input(example: Any, name: str = "example_input") -> Any:
    """A model input: a tensor, a tuple/list of positional inputs or a dict of keyword inputs (or ``None``)."""
    import torch

    if example is not None and not isinstance(example, torch.Tensor | tuple | list | dict):
        raise TypeError(
            f"`{name}` must be the LightningModule's input: a tensor, a tuple/list of positional "
            f"inputs or a dict of keyword inputs; got {type(example).__name__}."
        )
    return example


def check_qat_precision(precision: Any) -> None:
    """Quantization-aware training needs fp32 weights (``"bf16-mixed"`` runs the quantized part in fp32)."""
    if str(precision) not in ("32-true", "32", "bf16-mixed"):
        raise ValueError(
            f"QuantizationAwareTraining needs fp32 weights; `precision={str(precision)!r}` is not supported. Use "
            "'32-true', or 'bf16-mixed' (the quantized part then runs in fp32, the rest in bf16)."
        )


def check_qat_steps(
    points: dict[str, Any], steps: dict[str, int | None], total: int | None, int8: bool, finalize: bool
) -> None:
    """The resolved schedule (``steps``, of the arguments ``points``) in a fit of ``total`` steps. Fractions that
    land on the same step only by rounding in a very short fit (``fast_dev_run``) keep their order: the observers
    then freeze one step after ``start`` (``steps`` is updated)."""
    start, observers = steps["start"] or 0, steps["freeze_observers"]
    given = points["freeze_observers"], points["start"] or 0.0
    if (
        observers is not None
        and observers <= start
        and all(isinstance(p, float) for p in given)
        and given[0] > given[1]
    ):
        steps["freeze_observers"] = observers = start + 1
    if int8 and observers is not None and observers <= start:
        raise ValueError(
            f"`freeze_observers={points['freeze_observers']!r}` (step {observers}) is not after "
            f"`start={points['start']!r}` (step {start}): the ranges would be frozen before observing any data. "
            "Move it later."
        )
    if finalize and total is not None and start >= total:
        raise ValueError(
            f"`start={points['start']!r}` resolves to step {start}, but training has {total} steps: "
            "the model would be converted without ever training with quantization. Start earlier."
        )


def check_qat_resume(path: Any, step: int, steps: dict[str, int | None], points: dict[str, Any]) -> str:
    """Resuming at ``step`` from a checkpoint written without quantization (at ``path``) must leave the
    observers something to observe; returns what to tell (a warning when quantization starts late). ``steps``
    and ``points`` hold the ``start`` and ``freeze_observers`` steps and arguments."""
    import os

    start, frozen = steps["start"] or 0, steps["freeze_observers"]
    where = f"The checkpoint {os.fspath(path)!r} was written without QuantizationAwareTraining"
    if frozen is not None and step >= frozen:
        raise ValueError(
            f"{where} at step {step}, at or after `freeze_observers={points['freeze_observers']!r}` (step {frozen}): "
            "quantization would start with its ranges already frozen, before observing any data. Resume "
            f"with a later `freeze_observers` (e.g. 'step:{step + max(1, frozen - start)}'), or from a "
            f"checkpoint written before step {frozen}."
        )
    if step > start:
        return (
            f"{where} at step {step}, after `start={points['start']!r}` (step {start}): fake quantization starts "
            "now, from the "
            f"checkpoint's float weights, {step - start} steps later than planned, with fresh quantization ranges."
        )
    return (
        f"{where}: quantization-aware training starts from its float weights; fake quantization from step "
        f"{start} as planned."
    )


def check_qat_checkpoint(state: dict[str, Any], scheme: str, bits: int) -> None:
    """The QuantizationAwareTraining ``state`` of a checkpoint must come from the same ``scheme`` and ``bits``."""
    if (state.get("scheme", scheme), state.get("bits", bits)) != (scheme, bits):
        raise ValueError(
            f"The checkpoint was written by QuantizationAwareTraining(scheme={state['scheme']!r}, "
            f"bits={state['bits']}); this callback has scheme={scheme!r}, bits={bits}."
        )


def check_one_mode(part: str, eval_layers: Mapping[str, str]) -> None:
    """Int8 QAT trains a part as one exported graph, in one mode: refuse a part holding batch norm or dropout the
    user put in eval mode (a frozen backbone), which the graph would train (``eval_layers``: ``{name: type}``).

    Example::

        >>> check_one_mode("Net.net (`module=None`)", {"net.1": "BatchNorm2d"})
        Traceback (most recent call last):
        ...
        ValueError: QuantizationAwareTraining(scheme='int8') trains Net.net (`module=None`) as one exported graph, in one mode, but its layers net.1 (BatchNorm2d) are in eval mode while the fit trains: the graph would train them (batch norm normalizing with batch statistics and updating its running statistics, dropout dropping). Put them in train mode (`.train()`) and give `freeze_bn=0.0` to keep every batch norm of the part at its running statistics, or quantize only a part that trains (`module=...`).
    """
    if eval_layers:
        listed = ", ".join(f"{name} ({kind})" for name, kind in list(eval_layers.items())[:4])
        more = f" and {len(eval_layers) - 4} more" if len(eval_layers) > 4 else ""
        raise ValueError(
            f"QuantizationAwareTraining(scheme='int8') trains {part} as one exported graph, in one mode, but its "
            f"layers {listed}{more} are in eval mode while the fit trains: the graph would train them (batch norm "
            "normalizing with batch statistics and updating its running statistics, dropout dropping). Put them "
            "in train mode (`.train()`) and give `freeze_bn=0.0` to keep every batch norm of the part at its "
            "running statistics, or quantize only a part that trains (`module=...`)."
        )


def check_qat_neighbours(
    callbacks: Sequence[Any], parts: Sequence[str], module: str | None, share_values: int
) -> None:
    """Int8 QAT runs each quantized part as one exported graph: refuse the callbacks that store every weight in
    a format of their own (``effect_order == share_values``), and those that read layers inside a part with
    forward hooks (``hooked_layers()``), which would never fire."""
    for callback in callbacks:
        name = type(callback).__name__
        if getattr(callback, "effect_order", None) == share_values:
            raise ValueError(
                f"{name} and QuantizationAwareTraining(scheme='int8') both decide how the weights are stored "
                f"({name}: values of its own; int8: per-channel int8 in an exported graph). Use one of them: e.g. "
                "prune, then quantize to int8; or prune, then share weights."
            )
        layers = getattr(callback, "hooked_layers", None)
        caught = (
            [n for n in layers() if any(n.startswith(f"{p}.") for p in parts)] if callable(layers) else []
        )
        if caught:
            part = f"`module={module!r}`" if module else f"each child the forward calls ({', '.join(parts)})"
            own = getattr(callback, "without_hooks", "Distill the logits only (no `features`)")
            raise ValueError(
                f"{name} reads the layers {caught[:3]} with forward hooks, but QuantizationAwareTraining("
                f"scheme='int8') runs {part} as one exported graph that calls no submodule, so the hooks would "
                f"never fire. {own}, quantize a submodule that does not contain those layers (`module=...`), or "
                "use a low-bit scheme (`scheme='intx-weight-only'`)."
            )
