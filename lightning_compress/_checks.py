"""Argument checks of every callback and core, in one place: each error names the argument and the fix.

The generic checks come first; each scheme's own checks follow in its section. A callback checks its
arguments in ``__init__`` (so a bad YAML file fails before the Trainer is built) by calling these.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

from lightning_compress.schedules import validate_amount, validate_point  # noqa: F401  (re-exported)


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
    if old_value is UNSET:
        return new_value
    warnings.warn(f"`{owner}({old}=...)` is deprecated: use `{new}=...`.", DeprecationWarning, stacklevel=3)
    if new_value != default and new_value != old_value:
        raise ValueError(
            f"`{owner}` got both `{old}={old_value!r}` and `{new}={new_value!r}`: give only `{new}`."
        )
    return old_value


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
