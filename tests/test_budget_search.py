"""Accuracy-aware search: bisection toward the most compression within an accepted metric drop."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
from torch import nn

from lightning_compress.budget.search import SearchConfig, accuracy_aware_search

N = 1000  # weights of the synthetic model: magnitudes 1..N, so a level is resolved to 1/N
TOTAL = N * (N + 1) / 2  # their summed magnitude


def _magnitude_model() -> nn.Linear:
    """A linear layer whose weight magnitudes are 1..N in a shuffled order, with random signs."""
    generator = torch.Generator().manual_seed(0)
    magnitudes = torch.randperm(N, generator=generator).add(1).float()
    signs = torch.randint(0, 2, (N,), generator=generator).float() * 2 - 1
    model = nn.Linear(N, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(magnitudes * signs)
    return model


def _zero_smallest(model: nn.Module, fraction: float) -> None:
    """Zero the smallest-magnitude ``fraction`` of the weights (rounded down to whole weights)."""
    count = math.floor(fraction * N + 1e-9)
    with torch.no_grad():
        order = model.weight.abs().flatten().argsort()
        model.weight.view(-1)[order[:count]] = 0.0


def _kept(model: nn.Module) -> float:
    """The fraction of the original weight magnitude the model keeps: 1.0 unpruned, less as more is zeroed."""
    return float(model.weight.detach().abs().sum()) / TOTAL


def _most_zeroed(max_drop: float) -> int:
    """The most weights zeroed while the lost magnitude (1 + 2 + ... + k) / TOTAL stays within ``max_drop``."""
    count = 0
    while (count + 1) * (count + 2) / 2 / TOTAL <= max_drop:
        count += 1
    return count


def _restore_half(model: nn.Module, level: float) -> None:
    """A fine-tuning that wins back half of the magnitude lost, spread over the weights left."""
    with torch.no_grad():
        kept = model.weight.abs().sum()
        model.weight.mul_((kept + (TOTAL - kept) / 2) / kept)


def test_search_finds_the_threshold_within_tolerance():
    config = SearchConfig(max_drop=0.1, low=0.0, high=1.0, probes=12, tolerance=0.01)
    result = accuracy_aware_search(_magnitude_model(), _zero_smallest, _kept, config)
    # Zeroing up to k* weights is within the drop: every level below (k* + 1) / N, none above.
    threshold = (_most_zeroed(0.1) + 1) / N
    assert result.level is not None
    assert 0.0 < threshold - result.level < config.tolerance
    assert result.baseline == 1.0
    assert result.metric == pytest.approx(_kept(result.model))
    assert 1.0 - result.metric <= 0.1
    # The interval halves per probe: 7 probes take it from 1 to 1/128, the first width below 0.01.
    assert len(result.probes) == math.ceil(math.log2(1.0 / config.tolerance))
    for probe in result.probes:
        assert probe["accepted"] == (probe["level"] < threshold)


def test_mode_min_with_fraction_kept_searches_toward_low():
    """A loss (lower is better) and a level that is the fraction kept (less is more compressed)."""
    config = SearchConfig(
        max_drop=0.05, low=0.0, high=1.0, mode="min", more="low", probes=10, tolerance=0.005
    )

    def keep(model, level):
        _zero_smallest(model, 1.0 - level)

    result = accuracy_aware_search(_magnitude_model(), keep, lambda m: 1.0 - _kept(m), config)
    threshold = 1.0 - (_most_zeroed(0.05) + 1) / N  # accepted above it
    assert result.baseline == 0.0
    assert 0.0 < result.level - threshold < config.tolerance
    losses = [probe["metric"] for probe in result.probes]
    assert [probe["drop"] for probe in result.probes] == losses  # the drop of a loss is its increase
    assert all(probe["accepted"] == (probe["level"] > threshold) for probe in result.probes)


def test_relative_drop_is_a_fraction_of_the_baseline():
    absolute = SearchConfig(max_drop=0.1, low=0.0, high=1.0, probes=10)
    relative = SearchConfig(max_drop=0.1, low=0.0, high=1.0, probes=10, relative=True)
    plain = accuracy_aware_search(_magnitude_model(), _zero_smallest, _kept, absolute)
    scaled = accuracy_aware_search(_magnitude_model(), _zero_smallest, lambda m: 50.0 * _kept(m), relative)
    assert scaled.baseline == 50.0
    assert scaled.allowed_drop == pytest.approx(5.0)
    assert scaled.level == plain.level
    assert [p["accepted"] for p in scaled.probes] == [p["accepted"] for p in plain.probes]
    # The same drop in absolute units would accept everything scaled by 50: it goes much further.
    loose = accuracy_aware_search(_magnitude_model(), _zero_smallest, lambda m: 50.0 * _kept(m), absolute)
    assert loose.level < plain.level


def test_fine_tune_runs_once_per_probe_on_the_model_evaluated_and_its_effect_counts():
    config = SearchConfig(max_drop=0.1, low=0.0, high=1.0, probes=10, tolerance=0.002)
    compressed, tuned, evaluated = [], [], []

    def compress(model, level):
        compressed.append((model, level))
        _zero_smallest(model, level)

    def fine_tune(model, level):
        tuned.append((model, level))
        _restore_half(model, level)

    def evaluate(model):
        evaluated.append(model)
        return _kept(model)

    original = _magnitude_model()
    result = accuracy_aware_search(original, compress, evaluate, config, fine_tune=fine_tune)
    levels = [probe["level"] for probe in result.probes]
    assert [level for _, level in tuned] == levels == [level for _, level in compressed]
    assert evaluated[0] is original  # the baseline, then one evaluation per probe
    assert len(evaluated) == len(levels) + 1
    for (model_c, _), (model_t, _), model_e in zip(compressed, tuned, evaluated[1:], strict=True):
        assert model_c is model_t is model_e
        assert model_c is not original
    accepted = [model for (model, level) in tuned if level == result.level]
    assert len(accepted) == 1 and result.model is accepted[0]
    # Winning back half the loss doubles the drop the compression may cost: the search goes further.
    without = accuracy_aware_search(_magnitude_model(), _zero_smallest, _kept, config)
    threshold = (_most_zeroed(0.2) + 1) / N
    assert 0.0 < threshold - result.level < config.tolerance
    assert result.level > without.level + 0.05


def test_original_model_and_callers_random_state_are_untouched():
    original = _magnitude_model()
    original.train()
    before = {name: tensor.clone() for name, tensor in original.state_dict().items()}

    def evaluate(model):
        model.eval()  # an evaluation switches to eval mode: the original's mode must come back
        return _kept(model)

    def noisy_tune(model, level):
        with torch.no_grad():
            model.weight.add_(torch.randn_like(model.weight) * np.random.rand() * random.random())

    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    states = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    config = SearchConfig(max_drop=0.1, low=0.0, high=1.0)
    result = accuracy_aware_search(original, _zero_smallest, evaluate, config, fine_tune=noisy_tune)
    assert torch.equal(torch.get_rng_state(), states[0])
    assert np.array_equal(np.random.get_state()[1], states[1])
    assert random.getstate() == states[2]
    assert original.training
    after = original.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[name], before[name]) for name in before)
    assert result.model is not original
    assert not torch.equal(result.model.weight, original.weight)


def test_probes_follow_the_bisection_in_order_and_reach_progress():
    config = SearchConfig(max_drop=0.3, low=2.0, high=10.0, more="low", probes=5, tolerance=0.0)

    def keep(model, level):  # level: how many tenths of the weights are kept, 2..10
        _zero_smallest(model, 1.0 - level / 10.0)

    seen = []
    result = accuracy_aware_search(_magnitude_model(), keep, _kept, config, progress=seen.append)
    assert seen == result.probes
    assert len(result.probes) == 5
    safe, bold = 10.0, 2.0  # least and most compressed ends
    for probe in result.probes:
        assert probe["level"] == (safe + bold) / 2
        assert probe["drop"] == pytest.approx(1.0 - probe["metric"])
        assert probe["accepted"] == (probe["drop"] <= 0.3)
        safe, bold = (probe["level"], bold) if probe["accepted"] else (safe, probe["level"])
    accepted = [probe["level"] for probe in result.probes if probe["accepted"]]
    assert result.level == min(accepted)
    assert any(not probe["accepted"] for probe in result.probes)
    table = result.format_table().splitlines()
    assert len(table) == 1 + 5 + 1
    assert table[-1].endswith(f"level {result.level:.4g} accepted (metric {result.metric:.4g})")
    assert json.loads(json.dumps(result.to_dict())) == {
        "level": result.level,
        "baseline": 1.0,
        "metric": result.metric,
        "allowed_drop": 0.3,
        "probes": result.probes,
    }


def test_tolerance_stops_the_search_before_the_probes_run_out():
    config = SearchConfig(max_drop=0.1, low=0.0, high=1.0, probes=50, tolerance=0.3)
    result = accuracy_aware_search(_magnitude_model(), _zero_smallest, _kept, config)
    # widths 1 -> 0.5 -> 0.25: two probes, then the interval is narrower than 0.3
    assert [probe["level"] for probe in result.probes] == [0.5, 0.25]


def test_no_probe_accepted_gives_no_level_and_no_error():
    config = SearchConfig(max_drop=1e-6, low=0.0, high=1.0, probes=6)
    result = accuracy_aware_search(_magnitude_model(), _zero_smallest, _kept, config)
    assert (result.level, result.model, result.metric) == (None, None, None)
    assert len(result.probes) == 6
    assert not any(probe["accepted"] for probe in result.probes)
    assert min(probe["level"] for probe in result.probes) == 1 / 64
    assert result.format_table().endswith("no level accepted")
    assert json.loads(json.dumps(result.to_dict()))["level"] is None


def test_probes_are_seeded_alike_so_order_does_not_change_an_outcome():
    def noisy_tune(model, level):
        with torch.no_grad():
            model.weight.add_(torch.randn_like(model.weight) * 50.0)

    def search(high, seed=0):
        config = SearchConfig(max_drop=0.01, low=0.0, high=high, probes=3, seed=seed)
        return accuracy_aware_search(_magnitude_model(), _zero_smallest, _kept, config, fine_tune=noisy_tune)

    first = search(1.0)
    assert [probe["level"] for probe in first.probes[:2]] == [0.5, 0.25]  # 0.25 comes second here ...
    again = search(0.5)
    assert again.probes[0]["level"] == 0.25  # ... and first here
    assert again.probes[0]["metric"] == first.probes[1]["metric"]
    assert search(1.0).probes == first.probes
    assert search(1.0, seed=1).probes[0]["metric"] != first.probes[0]["metric"]


@pytest.mark.parametrize(
    ("arguments", "error", "match"),
    [
        ({"max_drop": 0.0}, ValueError, r"`max_drop=0.0` must be a number > 0"),
        ({"max_drop": -0.1}, ValueError, r"`max_drop=-0.1`"),
        ({"max_drop": float("nan")}, ValueError, r"`max_drop=nan`"),
        ({"max_drop": "1%"}, TypeError, r"`max_drop='1%'`"),
        ({"mode": "maximize"}, ValueError, r"Unknown `mode='maximize'`. Use one of 'max', 'min'"),
        ({"relative": 1}, TypeError, r"`relative=1` must be True or False"),
        ({"more": "middle"}, ValueError, r"Unknown `more='middle'`"),
        ({"low": 1.0, "high": 1.0}, ValueError, r"`high=1.0` must be a number > 1: the search interval"),
        ({"low": float("-inf")}, ValueError, r"`low=-inf`"),
        ({"probes": 0}, ValueError, r"`probes=0` must be a positive integer"),
        ({"probes": 2.5}, TypeError, r"`probes=2.5`"),
        ({"tolerance": -0.1}, ValueError, r"`tolerance=-0.1` must be a number >= 0 and < 1"),
        ({"tolerance": 1.0}, ValueError, r"`tolerance=1.0` must be a number >= 0 and < 1"),
        ({"seed": -1}, ValueError, r"`seed=-1` must be an integer >= 0"),
    ],
)
def test_bad_config_fails_naming_the_field(arguments, error, match):
    with pytest.raises(error, match=match):
        SearchConfig(**{"max_drop": 0.01, "low": 0.0, "high": 1.0, **arguments})


def test_bad_arguments_fail_before_any_probe():
    calls = []

    def compress(model, level):
        calls.append(level)

    config = SearchConfig(max_drop=0.1, low=0.0, high=1.0, relative=True)
    model = _magnitude_model()
    with pytest.raises(TypeError, match=r"`compress` must be a function `compress\(model, level\)`"):
        accuracy_aware_search(model, "prune", _kept, config)
    with pytest.raises(TypeError, match=r"`config` must be a SearchConfig"):
        accuracy_aware_search(model, compress, _kept, {"max_drop": 0.1})
    with pytest.raises(ValueError, match=r"`relative=True`.*returned 0 on the original model"):
        accuracy_aware_search(model, compress, lambda m: 0.0, config)
    with pytest.raises(ValueError, match=r"returned nan on the original model"):
        accuracy_aware_search(model, compress, lambda m: float("nan"), config)
    with pytest.raises(TypeError, match=r"`evaluate\(model\)` must return a number"):
        accuracy_aware_search(model, compress, lambda m: {"acc": 1.0}, config)
    assert calls == []
    # A one-element tensor is a number.
    result = accuracy_aware_search(
        model, _zero_smallest, lambda m: m.weight.detach().abs().sum() / TOTAL, config
    )
    assert result.baseline == 1.0 and result.level is not None


def test_digits_classifier_fine_tuning_accepts_at_least_as_much_pruning():
    """A real MLP on sklearn digits, magnitude pruning and 30 SGD steps of fine-tuning between probes."""
    from sklearn.datasets import load_digits

    features, labels = load_digits(return_X_y=True)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    x = torch.tensor(features, dtype=torch.float32)[order] / 16.0
    y = torch.tensor(labels)[order]
    x_train, y_train, x_val, y_val = x[:1300], y[:1300], x[1300:], y[1300:]

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x_train), y_train).backward()
        optimizer.step()

    def weights(m):
        return [layer.weight for layer in m if isinstance(layer, nn.Linear)]

    def prune(m, level):  # global magnitude pruning of the linear weights
        with torch.no_grad():
            scores = torch.cat([w.abs().flatten() for w in weights(m)])
            count = int(level * scores.numel())
            if count:
                cut = scores.kthvalue(count).values
                for w in weights(m):
                    w.masked_fill_(w.abs() <= cut, 0.0)

    def fine_tune(m, level):
        masks = [w != 0 for w in weights(m)]
        sgd = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
        for _ in range(30):
            batch = torch.randint(0, len(y_train), (64,))
            sgd.zero_grad()
            nn.functional.cross_entropy(m(x_train[batch]), y_train[batch]).backward()
            sgd.step()
            with torch.no_grad():
                for w, mask in zip(weights(m), masks, strict=True):
                    w.mul_(mask)

    def accuracy(m):
        with torch.no_grad():
            return float((m(x_val).argmax(1) == y_val).float().mean())

    config = SearchConfig(max_drop=0.01, low=0.0, high=1.0, probes=6)
    plain = accuracy_aware_search(model, prune, accuracy, config)
    tuned = accuracy_aware_search(model, prune, accuracy, config, fine_tune=fine_tune)
    assert plain.baseline == tuned.baseline > 0.9
    assert plain.level is not None and tuned.level is not None
    assert tuned.level >= plain.level
    assert tuned.baseline - tuned.metric <= 0.01
    sparsity = float(
        sum((w == 0).sum() for w in weights(tuned.model)) / sum(w.numel() for w in weights(model))
    )
    assert sparsity == pytest.approx(tuned.level, abs=0.01)
    print(plain.format_table(), tuned.format_table(), sep="\n")
