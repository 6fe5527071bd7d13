import itertools
import math

import lightning.pytorch as pl
import pytest
import torch
import torch.utils.data as torch_data
from hypothesis import given
from hypothesis import strategies as st

from lightning_compress import GradualPruning, QuantizationAwareTraining, WeightSharing
from lightning_compress.schedules import (
    SCHEDULE_NAMES,
    Schedule,
    interpolate,
    resolve_point,
    resolve_schedule,
    validate_amount,
    validate_point,
)
from tests.conftest import NetClassifier, RecordSteps, ResidualNet, trainer_kwargs


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


def _raises(t):
    return t if t < 0.5 else t / (t - t)


BAD_SCHEDULES = [
    (lambda t: 2.0 * t, ValueError, "`schedule` callable returned 1.5 at t=0.75; it must map the progress t"),
    (lambda t: t - 0.25, ValueError, "`schedule` callable returned -0.25 at t=0.0"),
    (lambda t: float("nan"), ValueError, "`schedule` callable returned nan at t=0.0"),
    (lambda t: "half", TypeError, "`schedule` callable returned 'half' at t=0.0, not a number"),
    (lambda t: None, TypeError, "`schedule` callable returned a NoneType at t=0.0, not a number"),
    (lambda t: t > 0.5, TypeError, "`schedule` callable returned False at t=0.0, not a number"),
    (
        _raises,
        ValueError,
        "`schedule` callable raised ZeroDivisionError \\(float division by zero\\) at t=0.5",
    ),
    (lambda: 0.5, ValueError, "`schedule` callable raised TypeError .* at t=0.0"),
]


@pytest.mark.parametrize(("fn", "error", "message"), BAD_SCHEDULES)
def test_bad_schedule_callable_fails_when_resolved(fn, error, message):
    with pytest.raises(error, match=message):
        resolve_schedule(fn)
    with pytest.raises(error, match=message):
        Schedule(0.0, 0.5, start=0, end=10, schedule=fn)


@pytest.mark.parametrize(("fn", "error", "message"), BAD_SCHEDULES)
@pytest.mark.parametrize("callback", ["GradualPruning", "KnowledgeDistillation"])
def test_every_callback_with_a_schedule_rejects_a_bad_callable_at_construction(callback, fn, error, message):
    from lightning_compress import GradualPruning, KnowledgeDistillation

    with pytest.raises(error, match=message):
        if callback == "GradualPruning":
            GradualPruning(amount=0.5, schedule=fn)
        else:
            KnowledgeDistillation(teacher="self", initial_alpha=0.0, schedule=fn)


def test_callable_out_of_range_between_the_probe_points_still_fails_when_reached():
    schedule = Schedule(0.0, 0.5, start=0, end=10, schedule=lambda t: 2.0 if 0.05 < t < 0.2 else t)
    assert [schedule.value(k) for k in (0, 5, 10)] == [0.0, 0.25, 0.5]
    with pytest.raises(ValueError, match="`schedule` callable returned 2.0 at t=0.1"):
        schedule.value(1)
    with pytest.raises(ValueError, match="returned 2.0 at t=0.15"):
        interpolate(lambda t: 2.0 if 0.05 < t < 0.2 else t, 0.15, 0.0, 1.0)


def test_good_callables_and_numeric_types_pass_the_probe():
    import numpy as np

    for fn in (math.sqrt, lambda t: np.float32(t), lambda t: torch.tensor(t), lambda t: 1, lambda t: 0):
        assert resolve_schedule(fn) is fn


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
    with pytest.raises(
        ValueError, match="`end='epoch:3'` counts epochs, .* Count steps instead: `end='step:N'`"
    ):
        resolve_point("epoch:3", total_steps=400, name="end")


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


# -- start/end against the Trainer: training data without a length -----------------------------------------


class _Stream(torch_data.IterableDataset):
    """16 samples, 4 features, 2 classes, and no `__len__`: the fit's length is unknown."""

    def __iter__(self):
        generator = torch.Generator().manual_seed(0)
        for _ in range(16):
            yield torch.randn(4, generator=generator), torch.randint(0, 2, (), generator=generator)


def _tiny():
    return NetClassifier(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)))


def _stream_fit(tmp_path, callback, **overrides):
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, **overrides), callbacks=[callback])
    trainer.fit(_tiny(), torch_data.DataLoader(_Stream(), batch_size=4))
    return trainer


def _callback(name, **kwargs):
    from lightning_compress import (
        BinaryWeights,
        GradualPruning,
        KnowledgeDistillation,
        QuantizationAwareTraining,
        WeightSharing,
    )

    return {
        "GradualPruning": lambda: GradualPruning(amount=0.5, **kwargs),
        "QuantizationAwareTraining": lambda: QuantizationAwareTraining(**kwargs),
        "KnowledgeDistillation": lambda: KnowledgeDistillation(teacher="self", initial_alpha=0.0, **kwargs),
        "WeightSharing": lambda: WeightSharing(bits=2, **kwargs),
        "BinaryWeights": lambda: BinaryWeights(**kwargs),
    }[name]()


UNKNOWN_LENGTH = (
    "The length of this fit is unknown: the training data has no length \\(an IterableDataset without "
    "`__len__`\\) and `max_steps` is unset, so fractions of training .* Set `Trainer\\(max_steps=N\\)` "
    "\\(fractions then count from it\\), or give optimizer steps, e.g. `start='step:100'`"
)


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("GradualPruning", {}),
        ("KnowledgeDistillation", {}),
        ("WeightSharing", {"start": 0.5}),
        ("BinaryWeights", {"start": 0.5}),
        ("QuantizationAwareTraining", {"start": 0.5}),
    ],
)
def test_fractions_of_a_fit_of_unknown_length_fail_at_setup_with_the_fix(tmp_path, name, kwargs):
    steps = RecordSteps()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path), callbacks=[_callback(name, **kwargs), steps])
    with pytest.raises(ValueError, match=UNKNOWN_LENGTH):
        trainer.fit(_tiny(), torch_data.DataLoader(_Stream(), batch_size=4))
    assert steps.steps == []


def test_endless_epochs_name_the_cause(tmp_path):
    with pytest.raises(ValueError, match="unknown: `max_epochs=-1` and `max_steps=-1` train without end"):
        _stream_fit(tmp_path, _callback("WeightSharing", start=0.5), max_epochs=-1)


def test_fractions_count_from_max_steps_when_the_data_has_no_length(tmp_path):
    sharing = _callback("WeightSharing", start=0.5)
    kd = _callback("KnowledgeDistillation", start=0.25, end=0.75)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=8, max_epochs=-1), callbacks=[sharing, kd])
    trainer.fit(_tiny(), torch_data.DataLoader(_Stream(), batch_size=4))
    assert trainer.global_step == 8
    assert sharing._start_step == 4
    assert (kd._alpha_schedule.start, kd._alpha_schedule.end) == (2, 6)


@pytest.mark.parametrize(
    "name",
    [
        "WeightSharing",
        "BinaryWeights",
        "KnowledgeDistillation",
        "GradualPruning",
        "QuantizationAwareTraining",
    ],
)
def test_step_counts_work_without_a_known_length(tmp_path, name):
    kwargs = {"start": "step:1"}
    if name in ("KnowledgeDistillation", "GradualPruning"):
        kwargs["end"] = "step:3"
    callback = _callback(name, **kwargs)
    trainer = _stream_fit(tmp_path, callback)
    assert trainer.global_step == 4  # one pass over the 16 samples
    if name == "GradualPruning":
        assert (callback._schedule.start, callback._schedule.end) == (1, 3)
        assert callback.current_amount == pytest.approx(0.5)
    elif name == "QuantizationAwareTraining":
        assert callback._steps["start"] == 1 and callback.converted
    elif name == "WeightSharing":
        assert callback._start_step == 1 and callback.clustered
    elif name == "BinaryWeights":
        assert callback._start_step == 1 and callback.finalized
    else:
        assert (callback._alpha_schedule.start, callback._alpha_schedule.end) == (1, 3)


def test_epochs_without_a_known_epoch_length_name_the_argument(tmp_path):
    with pytest.raises(
        ValueError, match="`start='epoch:1'` counts epochs, .* Count steps instead: `start='step:N'`"
    ):
        _stream_fit(tmp_path, _callback("WeightSharing", start="epoch:1"))


@pytest.mark.parametrize(
    ("make", "dev_run"),
    [
        (lambda: GradualPruning(amount=0.5, start=0.6, end=0.9), True),
        (lambda: WeightSharing(start=0.6), True),
        (lambda: QuantizationAwareTraining(start=0.5, freeze_observers=0.8), 3),
    ],
    ids=["pruning", "weight-sharing", "qat-observers"],
)
def test_fractions_stay_within_a_fast_dev_run(tmp_path, digits, make, dev_run):
    # 0.6 of a 1-step fit rounds to step 1, past its only step; 0.5 and 0.8 of 3 steps both round to step 2.
    callback = make()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, fast_dev_run=dev_run), callbacks=[callback])
    trainer.fit(ResidualNet(), datamodule=digits)
    assert trainer.global_step == dev_run
    if isinstance(callback, GradualPruning):
        assert callback.current_amount == pytest.approx(0.5, abs=0.01)
    elif isinstance(callback, WeightSharing):
        assert callback.clustered
    else:  # started on step 2 (0.5 of 3 rounds to even), observers frozen after it
        assert (
            callback._steps["start"] == 2 and callback._steps["freeze_observers"] == 3 and callback.converted
        )
