import itertools
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lightning_compress.schedules import (
    SCHEDULE_NAMES,
    Schedule,
    interpolate,
    resolve_point,
    validate_amount,
    validate_point,
)


def test_agp_matches_zhu_and_gupta_published_values():
    schedule = Schedule(initial=0.0, final=0.9, start=0, end=20, schedule="agp")
    values = [schedule.value(k) for k in (0, 5, 10, 15, 20)]
    assert values == pytest.approx([0.0, 0.520, 0.787, 0.886, 0.900], abs=5e-4)


def test_agp_formula_with_nonzero_start_and_frequency():
    # s_t = s_f + (s_i - s_f)(1 - (t - t0)/(n dt))^3 with t0 = 100, dt = 10, n = 5
    schedule = Schedule(initial=0.2, final=0.8, start=100, end=150, frequency=10)
    for k in range(6):
        expected = 0.8 + (0.2 - 0.8) * (1 - k / 5) ** 3
        assert schedule.value(100 + 10 * k) == pytest.approx(expected, abs=1e-12)
        # held between updates
        if k < 5:
            assert schedule.value(100 + 10 * k + 9) == pytest.approx(expected, abs=1e-12)
    assert schedule.value(0) == 0.2
    assert schedule.value(10_000) == 0.8


def test_linear_exponential_constant_one_shot_values():
    assert interpolate("linear", 0.3, 0.0, 0.5) == pytest.approx(0.15)
    # exponential: the density 1 - s shrinks geometrically: (1 - 0.99) = 0.01 → half way the density is 0.1
    assert interpolate("exponential", 0.5, 0.0, 0.99) == pytest.approx(0.9)
    assert interpolate("constant", 0.0, 0.1, 0.7) == pytest.approx(0.7)
    one_shot = Schedule(0.0, 0.6, start=10, end=30, schedule="one_shot")
    assert [one_shot.value(k) for k in (0, 10, 29, 30, 31)] == [0.0, 0.0, 0.0, 0.6, 0.6]


def test_user_callable_schedule():
    schedule = Schedule(0.0, 1.0 - 1e-9, start=0, end=10, schedule=lambda t: math.sqrt(t))
    assert schedule.value(4) == pytest.approx(math.sqrt(0.4) * (1.0 - 1e-9))


def test_callable_outside_unit_interval_is_rejected():
    schedule = Schedule(0.0, 0.5, start=0, end=10, schedule=lambda t: 2.0 * t)
    with pytest.raises(ValueError, match="fraction in \\[0, 1\\]"):
        schedule.value(8)


@given(
    initial=st.floats(0.0, 0.98),
    delta=st.floats(0.0, 0.98),
    start=st.integers(0, 1000),
    length=st.integers(0, 1000),
    frequency=st.integers(1, 50),
    name=st.sampled_from(SCHEDULE_NAMES),
)
def test_schedule_properties(initial, delta, start, length, frequency, name):
    final = min(initial + delta, 0.99)
    schedule = Schedule(initial, final, start=start, end=start + length, schedule=name, frequency=frequency)
    steps = sorted({0, start, start + length, start + length + 1, *range(start, start + length + 1, 7)})
    values = [schedule.value(s) for s in steps]
    assert schedule.value(start + length) == pytest.approx(final, abs=1e-12)
    if length > 0 and name != "constant":
        assert schedule.value(start) == pytest.approx(initial, abs=1e-12)
    for a, b in itertools.pairwise(values):
        assert b >= a - 1e-12  # monotone
    for v in values:
        assert initial - 1e-12 <= v <= final + 1e-12


@given(start=st.integers(0, 500), length=st.integers(1, 500), frequency=st.integers(1, 60))
def test_update_steps_hit_start_and_end(start, length, frequency):
    schedule = Schedule(0.0, 0.5, start=start, end=start + length, frequency=frequency)
    updates = [k for k in range(start + length + 5) if schedule.is_update_step(k)]
    assert updates[0] == start and updates[-1] == start + length
    # between two update steps the value is constant
    for a, b in itertools.pairwise(updates):
        assert len({schedule.value(k) for k in range(a, b)}) == 1


def test_points_resolve_to_steps():
    assert resolve_point(0.25, total_steps=400) == 100
    assert resolve_point(1.0, total_steps=400) == 400
    assert resolve_point("step:17", total_steps=400) == 17
    assert resolve_point("epoch:3", total_steps=400, steps_per_epoch=40) == 120
    with pytest.raises(ValueError, match="steps per epoch"):
        resolve_point("epoch:3", total_steps=400)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"start": 50, "end": 10}, "ends \\(step 10\\) before it starts \\(step 50\\)"),
        ({"schedule": "cubic"}, "Unknown `schedule='cubic'`"),
        ({"frequency": 0}, "`frequency=0` must be an integer >= 1"),
        ({"initial": 0.0, "final": 1.0, "schedule": "exponential"}, "below 1"),
    ],
)
def test_invalid_schedules_raise_clear_errors(kwargs, message):
    args = {"initial": 0.0, "final": 0.5, "start": 0, "end": 10, **kwargs}
    with pytest.raises(ValueError, match=message):
        Schedule(**args)


@pytest.mark.parametrize("amount", [-0.1, 1.0, 1.5])
def test_amount_outside_unit_interval_is_rejected(amount):
    with pytest.raises(ValueError, match="must be in \\[0, 1\\)"):
        validate_amount(amount)


@pytest.mark.parametrize("point", [-0.5, 1.5, "steps:3", "epoch:-1", "half"])
def test_bad_points_are_rejected(point):
    with pytest.raises(ValueError, match="`start="):
        validate_point(point, "start")
