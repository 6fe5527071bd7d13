"""Schedules: pure functions from training progress (optimizer steps) to a target value.

Every callback of the package uses the same vocabulary for *when* something happens:

- ``start`` / ``end`` are a fraction of training (``0.25``), ``"step:N"`` or ``"epoch:N"``;
- ``schedule`` is one of ``"agp"`` (Zhu & Gupta's cubic), ``"linear"``, ``"exponential"``, ``"constant"``,
  ``"one_shot"``, or a callable mapping the progress ``t`` in ``[0, 1]`` to the fraction of the way from the
  initial to the final value;
- ``frequency`` is how many optimizer steps pass between two updates of the value.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

ScheduleFn = Callable[[float], float]
Point = float | int | str


def agp(t: float) -> float:
    """Zhu & Gupta's cubic ramp: ``1 - (1 - t)^3``; fast early, gentle at the end.

    With ``s_t = s_i + (s_f - s_i) * agp(t)`` this is ``s_f + (s_i - s_f)(1 - t)^3`` of the paper.

    Example::

        >>> round(0.9 * agp(5 / 20), 3)
        0.52
    """
    return 1.0 - (1.0 - t) ** 3


def linear(t: float) -> float:
    """Equal increments per update.

    Example::

        >>> linear(0.25)
        0.25
    """
    return t


def constant(t: float) -> float:
    """The final value from the start on (no ramp).

    Example::

        >>> constant(0.0)
        1.0
    """
    return 1.0


def one_shot(t: float) -> float:
    """Initial value until the end point, then the final value at once.

    Example::

        >>> one_shot(0.99), one_shot(1.0)
        (0.0, 1.0)
    """
    return 1.0 if t >= 1.0 else 0.0


SCHEDULES: dict[str, ScheduleFn] = {
    "agp": agp,
    "linear": linear,
    "constant": constant,
    "one_shot": one_shot,
}
# "exponential" interpolates geometrically and depends on the endpoints, so it is handled in `interpolate`.
SCHEDULE_NAMES = (*SCHEDULES, "exponential")


def interpolate(schedule: str | ScheduleFn, t: float, initial: float, final: float) -> float:
    """Value of ``schedule`` at progress ``t`` (clamped to ``[0, 1]``) between ``initial`` and ``final``.

    ``"exponential"`` moves the *remaining* quantity ``1 - value`` geometrically (for sparsity: the density
    shrinks by the same factor at every update), so it needs ``initial, final < 1``.

    Example::

        >>> [round(interpolate("agp", k / 20, 0.0, 0.9), 3) for k in (0, 5, 10, 15, 20)]
        [0.0, 0.52, 0.787, 0.886, 0.9]
        >>> round(interpolate("exponential", 0.5, 0.0, 0.99), 3)
        0.9
    """
    t = min(max(float(t), 0.0), 1.0)
    if schedule == "exponential":
        if t >= 1.0:
            return final
        ratio = (1.0 - final) / (1.0 - initial)
        return 1.0 - (1.0 - initial) * ratio**t
    fn = _ramp(schedule)
    if t >= 1.0 and fn is not one_shot:
        return final
    return initial + (final - initial) * _fraction(fn, t)


# Where a user callable is tried when it is resolved: a schedule that fails anywhere fails before training.
PROBE_POINTS = (0.0, 0.25, 0.5, 0.75, 1.0)


def resolve_schedule(schedule: str | ScheduleFn) -> ScheduleFn:
    """Return the ramp function for a schedule name or a user callable.

    A callable is called once at each of :data:`PROBE_POINTS`: one that raises, returns something other than a
    number, or returns a value outside ``[0, 1]`` is rejected here, before any training, not at the step that
    first reaches the bad value.

    Example::

        >>> resolve_schedule("linear")(0.5)
        0.5
        >>> resolve_schedule("cubic")
        Traceback (most recent call last):
        ...
        ValueError: Unknown `schedule='cubic'`. Use one of 'agp', 'linear', 'constant', 'one_shot', 'exponential', or a callable t -> fraction.
        >>> resolve_schedule(lambda t: 2 * t)
        Traceback (most recent call last):
        ...
        ValueError: `schedule` callable returned 1.5 at t=0.75; it must map the progress t in [0, 1] to a fraction in [0, 1], e.g. `schedule=lambda t: t ** 2`.
    """
    fn = _ramp(schedule)
    if fn not in SCHEDULES.values():
        _probe(fn)
    return fn


def _ramp(schedule: str | ScheduleFn) -> ScheduleFn:
    if callable(schedule):
        return schedule
    if isinstance(schedule, str) and schedule in SCHEDULES:
        return SCHEDULES[schedule]
    if schedule == "exponential":
        raise ValueError("`schedule='exponential'` depends on its endpoints; call `interpolate` instead.")
    names = ", ".join(repr(n) for n in SCHEDULE_NAMES)
    raise ValueError(f"Unknown `schedule={schedule!r}`. Use one of {names}, or a callable t -> fraction.")


def _probe(fn: ScheduleFn) -> None:
    for t in PROBE_POINTS:
        _fraction(fn, t)


def _fraction(fn: ScheduleFn, t: float) -> float:
    """``fn(t)`` as a float in ``[0, 1]``, or an error naming ``schedule`` that says what a schedule must be."""
    hint = "it must map the progress t in [0, 1] to a fraction in [0, 1], e.g. `schedule=lambda t: t ** 2`."
    try:
        value = fn(t)
    except Exception as err:
        raise ValueError(f"`schedule` callable raised {type(err).__name__} ({err}) at t={t}; {hint}") from err
    if isinstance(value, bool | str | bytes):
        raise TypeError(f"`schedule` callable returned {value!r} at t={t}, not a number; {hint}")
    try:
        fraction = float(value)
    except (TypeError, ValueError):
        raise TypeError(
            f"`schedule` callable returned a {type(value).__name__} at t={t}, not a number; {hint}"
        ) from None
    if math.isnan(fraction) or not 0.0 <= fraction <= 1.0:
        raise ValueError(f"`schedule` callable returned {fraction} at t={t}; {hint}")
    return fraction


_POINT = re.compile(r"^(step|epoch):(\d+)$")


def validate_point(point: Point, name: str) -> Point:
    """Check a ``start``/``end`` value without a trainer: a fraction in ``[0, 1]``, ``"step:N"`` or ``"epoch:N"``.

    Example::

        >>> validate_point("epoch:3", "start")
        'epoch:3'
        >>> validate_point(1.5, "end")
        Traceback (most recent call last):
        ...
        ValueError: `end=1.5` is outside [0, 1]. Give a fraction of training in [0, 1], or 'step:N' / 'epoch:N'.
    """
    hint = "Give a fraction of training in [0, 1], or 'step:N' / 'epoch:N'."
    if isinstance(point, bool):
        raise TypeError(f"`{name}={point!r}` is a bool. {hint}")
    if isinstance(point, int | float):
        if not 0.0 <= float(point) <= 1.0 or math.isnan(point):
            raise ValueError(f"`{name}={point!r}` is outside [0, 1]. {hint}")
        return float(point)
    if isinstance(point, str) and _POINT.match(point.strip()):
        return point.strip()
    raise ValueError(f"`{name}={point!r}` is not understood. {hint}")


def resolve_point(
    point: Point, total_steps: int, steps_per_epoch: int | None = None, name: str = "point"
) -> int:
    """Turn a ``start``/``end`` value into an optimizer step index.

    Args:
        point: a fraction of training, ``"step:N"`` or ``"epoch:N"``.
        total_steps: optimizer steps of the whole fit (``trainer.estimated_stepping_batches``).
        steps_per_epoch: optimizer steps per epoch; needed for ``"epoch:N"``.
        name: the argument ``point`` came from, for error messages.

    Example::

        >>> resolve_point(0.5, total_steps=100)
        50
        >>> resolve_point("epoch:2", total_steps=100, steps_per_epoch=10)
        20
        >>> resolve_point("step:7", total_steps=100)
        7
        >>> resolve_point(0.6, total_steps=1)  # a fraction below 1 stays within the fit, also a very short one
        0
    """
    point = validate_point(point, name)
    if isinstance(point, float):
        step = round(point * total_steps)
        return min(step, total_steps - 1) if point < 1.0 and total_steps > 0 else step
    kind, value = point.split(":")
    if kind == "step":
        return int(value)
    if steps_per_epoch is None:
        raise ValueError(
            f"`{name}={point!r}` counts epochs, but the number of optimizer steps per epoch is unknown in this "
            f"fit (the training data has no length, e.g. an IterableDataset without `__len__`). Count steps "
            f"instead: `{name}='step:N'`."
        )
    return int(value) * steps_per_epoch


@dataclass(frozen=True)
class Schedule:
    """A value that moves from ``initial`` to ``final`` between two optimizer steps.

    The value changes only every ``frequency`` steps: between updates it holds, which is what makes pruning
    masks and QAT phases stable between two decisions. ``n`` updates span ``[start, end]`` with
    ``n = ceil((end - start) / frequency)``; the last one lands exactly on ``end``.

    Args:
        initial: value before and at ``start``.
        final: value at and after ``end``.
        start: first optimizer step of the ramp.
        end: optimizer step at which ``final`` is reached (``>= start``).
        schedule: a name from :data:`SCHEDULE_NAMES` or a callable ``t -> fraction``.
        frequency: optimizer steps between updates (``>= 1``).

    Example::

        >>> s = Schedule(initial=0.0, final=0.9, start=0, end=20)
        >>> [round(s.value(k), 3) for k in (0, 5, 10, 15, 20, 30)]
        [0.0, 0.52, 0.787, 0.886, 0.9, 0.9]
        >>> Schedule(0.0, 0.9, start=0, end=20, frequency=10).value(15) == Schedule(0.0, 0.9, 0, 20).value(10)
        True
    """

    initial: float
    final: float
    start: int
    end: int
    schedule: str | ScheduleFn = "agp"
    frequency: int = 1

    def __post_init__(self) -> None:
        if self.end < self.start:
            raise ValueError(
                f"The schedule ends (step {self.end}) before it starts (step {self.start}). "
                "Move `end` after `start`."
            )
        if self.start < 0:
            raise ValueError(f"`start` resolves to step {self.start}; it must be >= 0.")
        if not isinstance(self.frequency, int) or self.frequency < 1:
            raise ValueError(f"`frequency={self.frequency!r}` must be an integer >= 1 (optimizer steps).")
        if self.schedule != "exponential":
            resolve_schedule(self.schedule)
        elif max(self.initial, self.final) >= 1.0:
            raise ValueError("`schedule='exponential'` needs initial and final values below 1.")

    def progress(self, step: int) -> float:
        """Progress ``t`` in ``[0, 1]`` at ``step``, held constant between updates."""
        if step <= self.start:
            return 0.0
        if step >= self.end:
            return 1.0
        span = self.end - self.start
        done = ((step - self.start) // self.frequency) * self.frequency
        return min(done / span, 1.0)

    def value(self, step: int) -> float:
        """Target value at optimizer step ``step``."""
        if self.end == self.start:
            return self.final if step >= self.end else self.initial
        return interpolate(self.schedule, self.progress(step), self.initial, self.final)

    def is_update_step(self, step: int) -> bool:
        """Whether the value may change at ``step`` (start, every ``frequency`` steps after it, and ``end``).

        Example::

            >>> s = Schedule(0.0, 0.5, start=10, end=30, frequency=10)
            >>> [k for k in range(0, 40) if s.is_update_step(k)]
            [10, 20, 30]
        """
        if step < self.start or step > self.end:
            return False
        return step == self.end or (step - self.start) % self.frequency == 0


def validate_amount(amount: float, name: str = "amount") -> float:
    """Check a target fraction such as a sparsity: a number in ``[0, 1)``.

    Example::

        >>> validate_amount(0.9)
        0.9
        >>> validate_amount(1.0)
        Traceback (most recent call last):
        ...
        ValueError: `amount=1.0` must be in [0, 1): it is the fraction of weights removed, and 1 would remove all.
    """
    if isinstance(amount, bool) or not isinstance(amount, int | float) or math.isnan(amount):
        raise TypeError(f"`{name}={amount!r}` must be a number in [0, 1).")
    if not 0.0 <= amount < 1.0:
        raise ValueError(
            f"`{name}={amount!r}` must be in [0, 1): it is the fraction of weights removed, and 1 would remove all."
        )
    return float(amount)
