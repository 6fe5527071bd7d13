"""Budget-driven compression cores: per-layer sensitivity, cost tables and the allocation of levels."""

from __future__ import annotations

import copy
import itertools
import json
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress.budget.allocation import Allocation, allocate, uniform
from lightning_compress.budget.costs import CostTable, layer_costs
from lightning_compress.budget.sensitivity import (
    DEFAULT_LEVELS,
    Sensitivity,
    SensitivityConfig,
    compress_layer,
    measure_sensitivity,
)
from lightning_compress.stats import count_macs_per_sample, count_parameters, raw_size_bytes

SCHEMES = ("prune", "prune_structured", "low_rank", "quantize")
LEVEL = {"prune": 0.7, "prune_structured": 0.5, "low_rank": 0.25, "quantize": 4}


class Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.bn(self.conv2(torch.relu(self.conv1(x)))))


class ConvNet(nn.Module):
    """A stem with stride 2, one residual block, a linear head: 1x8x8 inputs, 10 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, stride=2, padding=1)
        self.block = Residual(8)
        self.head = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.block(torch.relu(self.stem(x))), 1))


def mlp() -> nn.Sequential:
    """LeNet-300-100 at a tenth of its width, on 8x8 digits-sized inputs."""
    return nn.Sequential(nn.Linear(64, 30), nn.ReLU(), nn.Linear(30, 10), nn.ReLU(), nn.Linear(10, 10))


class TwoBranch(nn.Module):
    """Two parallel linear layers of the same shape whose outputs add up; ``scale`` weighs branch ``a``."""

    def __init__(self, scale_a: float, scale_b: float) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(16, 6), nn.Linear(16, 6)
        with torch.no_grad():
            self.a.weight.mul_(scale_a)
            self.b.weight.mul_(scale_b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x)


def self_labelled(
    model: nn.Module, inputs: torch.Tensor, batch: int = 32
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Batches labelled with the model's own predictions: any change of its outputs raises the loss."""
    with torch.no_grad():
        labels = model(inputs).argmax(dim=1)
    return [(inputs[i : i + batch], labels[i : i + batch]) for i in range(0, len(inputs), batch)]


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().clone().view(torch.int32)


# -- compress_layer ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_compress_layer_compresses_then_restores_the_exact_bits(scheme, kind):
    layer = nn.Conv2d(6, 10, 3) if kind == "conv" else nn.Linear(24, 10)
    weight, bias = bits(layer.weight), bits(layer.bias)
    original = layer.weight.detach().clone()
    rows = layer.weight.shape[0]
    with compress_layer(layer, scheme, LEVEL[scheme]):
        w = layer.weight.detach().reshape(rows, -1)
        if scheme == "prune":
            assert int((w == 0).sum()) == round(0.7 * w.numel())
        elif scheme == "prune_structured":
            zero_rows = (w == 0).all(dim=1)
            assert int(zero_rows.sum()) == 5
            assert bool((layer.bias[zero_rows] == 0).all())
            assert not bool((layer.bias[~zero_rows] == 0).any())
        elif scheme == "low_rank":
            assert int(torch.linalg.matrix_rank(w)) == math.ceil(0.25 * min(w.shape))
        else:  # symmetric 4 bits: at most 15 values per row, the largest magnitude kept
            assert max(len(torch.unique(row)) for row in w) <= 15
            assert torch.allclose(w.abs().amax(dim=1), original.reshape(rows, -1).abs().amax(dim=1))
    assert torch.equal(bits(layer.weight), weight) and torch.equal(bits(layer.bias), bias)
    with pytest.raises(RuntimeError, match="inside"), compress_layer(layer, scheme, LEVEL[scheme]):
        raise RuntimeError("inside")
    assert torch.equal(bits(layer.weight), weight) and torch.equal(bits(layer.bias), bias)


def test_zeroed_channels_give_the_output_of_the_layer_without_them():
    layer = nn.Linear(12, 8)
    x = torch.randn(5, 12)
    with compress_layer(layer, "prune_structured", 0.5), torch.no_grad():
        out = layer(x)
        kept = (layer.weight != 0).any(dim=1)
        smaller = nn.Linear(12, int(kept.sum()))
        smaller.weight.copy_(layer.weight[kept])
        smaller.bias.copy_(layer.bias[kept])
        assert torch.equal(out[:, kept], smaller(x))
        assert bool((out[:, ~kept] == 0).all())


# -- measure_sensitivity -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["prune", "quantize"])
def test_a_layer_scaled_to_matter_more_is_more_sensitive(scheme):
    inputs = torch.randn(64, 16)
    config = SensitivityConfig(scheme, levels=(0.5, 0.9) if scheme == "prune" else (8, 4, 2), batches=2)

    def drift(model, batch):  # how far the outputs move from the uncompressed ones
        return torch.nn.functional.mse_loss(model(batch[0]), batch[1])

    for big, small in (("a", "b"), ("b", "a")):
        model = TwoBranch(5.0, 0.2) if big == "a" else TwoBranch(0.2, 5.0)
        with torch.no_grad():
            batches = [(x, model(x)) for x in inputs.split(32)]
        result = measure_sensitivity(model, batches, config, loss_fn=drift)
        assert result.base_loss == 0.0 and result.delta(big)[0] == result.delta(small)[0] == 0.0
        for level in range(1, len(result.levels)):
            assert result.delta(big)[level] > 100 * result.delta(small)[level] > 0.0


def test_measuring_leaves_weights_modes_and_random_state_as_they_were():
    model = ConvNet().train()
    model.block.bn.eval()  # a partly evaluating model stays so
    state = {k: bits(v) for k, v in model.state_dict().items() if v.dtype == torch.float32}
    data = TensorDataset(torch.randn(48, 1, 8, 8), torch.randint(0, 10, (48,)))
    loader = DataLoader(data, batch_size=16, shuffle=True)
    rng = torch.get_rng_state()
    messages = []
    result = measure_sensitivity(
        model, loader, SensitivityConfig("low_rank", batches=2), progress=messages.append
    )
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(bits(model.state_dict()[k]), v) for k, v in state.items())
    assert model.training and model.stem.training and not model.block.bn.training
    assert messages == [
        "sensitivity 1/4: stem",
        "sensitivity 2/4: block.conv1",
        "sensitivity 3/4: block.conv2",
        "sensitivity 4/4: head",
    ]
    assert result.batches == 2 and result.levels == DEFAULT_LEVELS["low_rank"]
    assert result.params == {"stem": 72, "block.conv1": 576, "block.conv2": 576, "head": 1280}
    assert all(len(values) == 6 and values[0] == result.base_loss for values in result.loss.values())


def test_the_cache_is_read_back_and_invalidated_when_the_levels_change(tmp_path):
    model = mlp()
    batches = self_labelled(model, torch.randn(96, 64))
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    cache = tmp_path / "sensitivity.json"
    config = SensitivityConfig("prune", levels=(0.5, 0.9), batches=3)
    first = measure_sensitivity(model, batches, config, cache=cache)
    assert len(calls) == 3 * (
        1 + 3 * 2
    )  # the base model, then 3 layers x 2 compressed levels, 3 batches each
    second = measure_sensitivity(model, batches, config, cache=cache)
    assert len(calls) == 21 and second == first
    changed = measure_sensitivity(
        model, batches, SensitivityConfig("prune", levels=(0.5,), batches=3), cache=cache
    )
    assert len(calls) == 21 + 3 * (1 + 3 * 1)
    assert changed.levels == (0.0, 0.5) and changed.loss["0"] == first.loss["0"][:2]
    assert json.loads(cache.read_text())["key"]["levels"] == [0.0, 0.5]


def test_sensitivity_tables_round_trip_and_plot(tmp_path):
    model = mlp()
    result = measure_sensitivity(
        model, self_labelled(model, torch.randn(32, 64)), SensitivityConfig("quantize")
    )
    assert Sensitivity.from_dict(json.loads(json.dumps(result.to_dict()))) == result
    rows = result.rows()
    assert [row["layer"] for row in rows] == ["0", "2", "4"]
    assert [row["2 bit"] for row in rows] == [result.delta(name)[3] for name in ("0", "2", "4")]
    table = result.format_table().splitlines()
    assert len(table) == 5 and table[1].split() == [
        "layer",
        "params",
        "32",
        "bit",
        "8",
        "bit",
        "4",
        "bit",
        "2",
        "bit",
    ]
    png = result.plot(tmp_path / "plots" / "sensitivity.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"scheme": "prune_channels"}, ValueError, "Unknown `scheme='prune_channels'`"),
        ({"scheme": "prune", "levels": (0.5, 1.0)}, ValueError, r"levels=1` must be in \[0, 1\)"),
        ({"scheme": "quantize", "levels": (8, 3.5)}, ValueError, "whole number of bits from 2 to 16, or 32"),
        ({"scheme": "low_rank", "levels": (0.0,)}, ValueError, r"must be in \(0, 1\] for scheme='low_rank'"),
        ({"scheme": "low_rank", "levels": 0.5}, TypeError, "must be a list of levels"),
        ({"scheme": "prune", "batches": 0}, ValueError, "`batches=0` must be a positive integer"),
    ],
)
def test_bad_configs_name_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        SensitivityConfig(**kwargs)


def test_a_layer_no_scheme_handles_and_batches_without_labels_are_clear_errors():
    model = ConvNet()
    with pytest.raises(ValueError, match=r"'block.bn' is a BatchNorm2d.*exclude=\['block.bn'\]"):
        measure_sensitivity(model, [], SensitivityConfig("prune", modules=["block.*"]))
    with pytest.raises(TypeError, match="Pass `loss_fn"):
        measure_sensitivity(model, [torch.randn(2, 1, 8, 8)], SensitivityConfig("prune"))


# -- cost tables -------------------------------------------------------------------------------------------------


def test_params_and_size_of_known_layers_by_hand():
    model = mlp()
    levels = {"prune": 0.5, "low_rank": 0.5, "quantize": 4}
    n, out, row = 64 * 30, 30, 64  # the first layer: 30 x 64 weights and 30 biases
    expected_params = {
        "prune": n / 2 + out,
        "low_rank": 15 * (out + row) + out,  # rank 15 of 30
        "quantize": n + out,
    }
    expected_size = {
        "prune": 4 * n / 2 + n / 8 + 4 * out,  # kept values + 1-bit mask + float bias
        "low_rank": 4 * (15 * (out + row) + out),
        "quantize": n * 4 / 8 + 4 * out + 4 * out,  # 4-bit codes + a float scale per row + float bias
    }
    for scheme, level in levels.items():
        params = layer_costs(model, None, scheme, [level], "params", ["0", "2"])
        assert params.cost["0"] == [n + out, expected_params[scheme]]
        assert params.full() == count_parameters(model) and params.fixed == 10 * 10 + 10
        size = layer_costs(model, None, scheme, [level], "size", ["0", "2"])
        assert size.cost["0"] == [4 * (n + out), expected_size[scheme]]
        assert size.full() == raw_size_bytes(model)


def test_macs_of_known_layers_by_hand():
    model, x = ConvNet(), torch.randn(4, 1, 8, 8)
    conv = 4 * 4 * 8 * (8 * 3 * 3)  # 4x4 output positions x 8 outputs x 72 inputs each, per sample
    expected = {
        "prune": [conv, conv * (1 - round(0.75 * 576) / 576)],
        "low_rank": [conv, 4 * 4 * 2 * (8 + 72)],  # rank ceil(0.25 * 8) = 2
        "quantize": [conv, conv],
    }
    for scheme, values in expected.items():
        level = 2 if scheme == "quantize" else (0.25 if scheme == "low_rank" else 0.75)
        table = layer_costs(model, x, scheme, [level], "macs", ["block.conv1", "head"])
        assert table.cost["block.conv1"] == values
        assert table.cost["head"][0] == 128 * 10
        assert table.full() == count_macs_per_sample(model, x)
        assert table.fixed == count_macs_per_sample(model, x) - conv - 1280


def test_latency_table_has_a_positive_time_per_layer_and_level():
    model, x = ConvNet(), torch.randn(8, 1, 8, 8)
    rng = torch.get_rng_state()
    for scheme, levels, layers in (
        ("prune_structured", [0.5], ["stem", "block.conv1"]),  # channel groups: the head's outputs stay
        ("low_rank", [0.5, 0.25], ["stem", "block.conv1", "head"]),
    ):
        table = layer_costs(model, x, scheme, levels, "latency", layers, repeats=3, threads=1)
        assert list(table.cost) == layers
        assert all(len(values) == len(levels) + 1 for values in table.cost.values())
        # Structured: a layer whose outputs and inputs follow two groups is a shared term; each row with the
        # others uncompressed holds all of a group's layers.
        alone = table.linearized({}).cost
        assert all(0 < v < math.inf for values in alone.values() for v in values)
        assert 0 <= table.fixed < math.inf
    assert torch.equal(torch.get_rng_state(), rng)
    for scheme in ("prune", "quantize"):
        with pytest.raises(ValueError, match="dense CPU kernels do not get faster.*prune_structured"):
            layer_costs(model, x, scheme, None, "latency", ["stem"])


# -- allocation --------------------------------------------------------------------------------------------------


def test_allocation_compresses_the_insensitive_layer_harder_and_beats_uniform():
    model = TwoBranch(5.0, 0.05)  # `a` decides the outputs, `b` barely matters
    levels = [0.1 * i for i in range(1, 10)] + [0.95]
    sens = measure_sensitivity(
        model, self_labelled(model, torch.randn(128, 16)), SensitivityConfig("prune", levels=levels)
    )
    costs = layer_costs(model, None, "prune", levels, "params", list(sens.loss))
    for budget in (0.4, 0.5, 0.7):
        best, same = allocate(sens, costs, budget), uniform(sens, costs, budget)
        target = budget * costs.full()
        assert best.cost <= target and same.cost <= target
        assert best.levels["b"] > best.levels["a"]
        assert best.predicted_loss <= same.predicted_loss
        assert best.cost == costs.total(best.levels)
        assert best.predicted_loss == pytest.approx(sens.base_loss + sum(best.deltas.values()), abs=1e-12)
        # Optimal on monotone costs: the budget left is less than one level step of a layer (plus rounding).
        step = max(abs(a - b) for values in costs.cost.values() for a, b in itertools.pairwise(values))
        rounding = 2 * (target - costs.fixed - sum(min(v) for v in costs.cost.values())) / 2000
        assert target - best.cost < step + rounding
    whole = allocate(sens, costs, 1.0)
    assert whole.predicted_loss <= sens.base_loss and whole.cost <= costs.full()


def test_an_infeasible_budget_names_the_smallest_reachable_fraction():
    levels = (0.0, 0.5)
    sens = Sensitivity("prune", levels, 1.0, {"fc": [1.0, 1.5]})
    costs = CostTable("params", levels, {"fc": [80.0, 40.0]}, fixed=20.0, scheme="prune")
    with pytest.raises(
        ValueError,
        match=r"`budget=0.5` is out of reach.* costs 0.6 of its uncompressed params.*"
        r"at least 0.6, add more aggressive levels than 0.5, or select more layers",
    ):
        allocate(sens, costs, 0.5)
    with pytest.raises(ValueError, match=r"No single level meets `budget=0.5`.*\(0: 1, 0.5: 0.6\)"):
        uniform(sens, costs, 0.5)
    with pytest.raises(ValueError, match="compute the costs with the sensitivity's levels"):
        allocate(sens, CostTable("params", (0.0, 0.9), {"fc": [80.0, 8.0]}, 20.0), 0.5)


def _brute_force(deltas: np.ndarray, costs: np.ndarray, fixed: float, target: float) -> float:
    best = math.inf
    for combo in itertools.product(range(costs.shape[1]), repeat=costs.shape[0]):
        rows = range(costs.shape[0])
        if fixed + sum(costs[i, k] for i, k in zip(rows, combo, strict=True)) <= target:
            best = min(best, sum(deltas[i, k] for i, k in zip(rows, combo, strict=True)))
    return best


def _case(seed: int, integer: bool) -> tuple[Sensitivity, CostTable, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    levels = (0.0, 0.3, 0.6, 0.9)
    dense = np.array([80.0, 70.0, 60.0])
    costs = dense[:, None] * rng.uniform(0.1, 1.0, size=(3, 4))
    costs[:, 0] = dense
    if integer:
        costs = np.floor(costs)
    deltas = rng.normal(0.3, 0.3, size=(3, 4))  # some negative
    deltas[:, 0] = 0.0
    names = ["a", "b", "c"]
    sens = Sensitivity("prune", levels, 2.0, {n: list(2.0 + deltas[i]) for i, n in enumerate(names)})
    table = CostTable("params", levels, {n: list(costs[i]) for i, n in enumerate(names)}, 46.0, "prune")
    return sens, table, deltas, costs


def test_the_dynamic_program_matches_brute_force_on_three_layers_and_four_levels():
    for seed in range(12):
        # Integer costs, a whole model of 256 and a cost step of exactly 1: the program is exact.
        sens, table, deltas, costs = _case(seed, integer=True)
        lowest = 46 + costs.min(axis=1).sum()
        for target in range(int(lowest), 257, 7):
            room = int(target - lowest)
            result = allocate(sens, table, target / 256, resolution=max(room, 1))
            expected = _brute_force(deltas, costs, 46.0, target)
            assert result.predicted_loss - 2.0 == pytest.approx(expected, abs=1e-12)
            assert result.cost <= target
        # Real-valued costs: between the optimum of the budget and that of the budget less the rounding.
        sens, table, deltas, costs = _case(seed, integer=False)
        lowest = 46 + costs.min(axis=1).sum()
        for budget in (0.5, 0.7, 0.9):
            target = budget * table.full()
            if target < lowest:
                continue
            result = allocate(sens, table, budget, resolution=50)
            rounding = 3 * (target - lowest) / 50
            found = result.predicted_loss - 2.0
            assert _brute_force(deltas, costs, 46.0, target) - 1e-12 <= found
            assert found <= _brute_force(deltas, costs, 46.0, target - rounding) + 1e-12
            assert result.cost <= target * (1 + 1e-12)


def test_allocation_feeds_the_callbacks_per_layer_arguments():
    levels = (32.0, 8.0)
    sens = Sensitivity("quantize", levels, 1.0, {"a": [1.0, 1.001], "b": [1.0, 1.5]})
    costs = CostTable("size", levels, {"a": [400.0, 120.0], "b": [400.0, 120.0]}, 0.0, "quantize")
    result = allocate(sens, costs, 0.7)
    assert result.levels == {"a": 8.0, "b": 32.0}
    assert result.callback_arguments() == {"layer_bits": result.levels}
    assert result.levels["b"] == 32.0
    assert result.fraction == pytest.approx(520 / 800)
    assert isinstance(result, Allocation) and json.loads(json.dumps(result.to_dict()))["method"] == "optimal"
    assert result.format_table().splitlines()[-1].startswith("optimal quantize allocation: size 520 of 800")


# -- structured budgets: channel groups --------------------------------------------------------------------------


def small_residual_cnn() -> nn.Module:
    from examples.models import residual_cnn

    torch.manual_seed(0)
    return residual_cnn(widths=(8, 16, 32))


def pruned_cost(model: nn.Module, levels: dict[str, float], example: torch.Tensor) -> tuple[int, int, int]:
    """Parameters, MACs per sample and stored bytes of a copy of ``model`` with the channels removed."""
    from lightning_compress.pruning import PruningConfig, prune_

    pruned = copy.deepcopy(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = PruningConfig(mode="structured", round_to=1, layer_amounts=levels)
        prune_(pruned, config, example_input=example)
    # One name per channel group: no coupled layers with different amounts, no named layer left alone.
    assert not [w for w in caught if "layer_amounts" in str(w.message)], [str(w.message) for w in caught]
    return count_parameters(pruned), count_macs_per_sample(pruned, example), raw_size_bytes(pruned)


def group_names(model: nn.Module, example: torch.Tensor) -> list[str]:
    """The channel groups of every Conv/Linear layer of ``model``, by name."""
    from lightning_compress.budget.groups import channel_units

    layers = [name for name, module in model.named_modules() if isinstance(module, nn.Conv2d | nn.Linear)]
    return [unit.name for unit in channel_units(model, example, layers)[1]]


def test_structured_costs_count_the_inputs_the_next_layer_loses_by_hand():
    model, x = mlp(), torch.zeros(1, 64)  # 64 -> 30 -> 10 -> 10
    table = layer_costs(model, x, "prune_structured", [0.5], "params", ["0", "2"])
    # Half of the 30 hidden units: their rows of layer 0 and their columns of layer 2 go.
    assert table.total({"0": 0.5}) == 15 * 64 + 15 + 10 * 15 + 10 + 10 * 10 + 10
    # Both groups at half: layer 2 keeps 5 x 15 weights, the classifier 10 x 5.
    assert table.total({"0": 0.5, "2": 0.5}) == 15 * 64 + 15 + 5 * 15 + 5 + 10 * 5 + 10
    assert table.full() == count_parameters(model)
    assert [(weight, sorted(factors)) for weight, factors in table.cross] == [(300.0, ["0", "2"])]
    macs = layer_costs(model, x, "prune_structured", [0.5], "macs", ["0", "2"])
    assert macs.total({"0": 0.5, "2": 0.5}) == 15 * 64 + 5 * 15 + 10 * 5
    # A table is keyed by channel group: two layers coupled by the residual add are one group.
    with pytest.raises(ValueError, match=r"share one channel group.*name it once, as 'stem'"):
        layer_costs(
            ConvNet(), torch.zeros(1, 1, 8, 8), "prune_structured", None, "macs", ["stem", "block.conv2"]
        )
    with pytest.raises(ValueError, match=r"Layers \['head'\] have no channel group.*outputs of the model"):
        layer_costs(ConvNet(), torch.zeros(1, 1, 8, 8), "prune_structured", None, "macs", ["stem", "head"])


@pytest.mark.parametrize("make", [mlp, small_residual_cnn])
def test_structured_cost_tables_predict_the_pruned_model_exactly(make):
    model = make()
    x = torch.zeros(1, 64) if make is mlp else torch.zeros(1, 1, 8, 8)
    levels = [i / 8 for i in range(1, 8)]
    batches = [(x, torch.zeros(1, dtype=torch.long))]
    names = list(
        measure_sensitivity(model, batches, SensitivityConfig("prune_structured", levels=levels)).loss
    )
    tables = {
        metric: layer_costs(model, x, "prune_structured", levels, metric, names)
        for metric in ("params", "macs", "size")
    }
    assert tables["params"].cross  # some layer's outputs and inputs belong to two groups
    rng = np.random.default_rng(0)
    for _ in range(3):
        chosen = {name: float(rng.choice(levels)) for name in names}
        params, macs, size = pruned_cost(model, chosen, x)
        assert tables["params"].total(chosen) == params
        assert tables["macs"].total(chosen) == macs
        assert tables["size"].total(chosen) == size


def test_shared_cost_terms_are_allocated_as_well_as_brute_force_and_never_exceed_the_budget():
    levels, kept = (0.0, 0.25, 0.5, 0.75), [1.0, 0.75, 0.5, 0.25]
    names = ["a", "b", "c"]
    for seed in range(10):
        rng = np.random.default_rng(seed)
        own = {
            name: [float(w) * k for k in kept] for name, w in zip(names, rng.uniform(10, 100, 3), strict=True)
        }
        # A chain of groups: the layer between two groups shrinks with both (weight x kept_a x kept_b).
        cross = [
            (float(w), {a: kept, b: kept})
            for w, a, b in zip(rng.uniform(20, 200, 2), "ab", "bc", strict=True)
        ]
        table = CostTable("params", levels, own, 5.0, "prune_structured", cross)
        deltas = np.cumsum(rng.uniform(0, 0.3, (3, 4)), axis=1)
        deltas[:, 0] = 0.0
        sens = Sensitivity(
            "prune_structured", levels, 1.0, {n: list(1 + deltas[i]) for i, n in enumerate(names)}
        )
        for budget in (0.3, 0.5, 0.7):
            target = budget * table.full()
            feasible = [
                sum(deltas[i, k] for i, k in enumerate(combo))
                for combo in itertools.product(range(4), repeat=3)
                if table.total_at(dict(zip(names, combo, strict=True))) <= target
            ]
            result = allocate(sens, table, budget)
            assert result.cost == table.total(result.levels) <= target
            assert result.cost == pytest.approx(table.fixed + sum(result.layer_costs.values()))
            assert result.predicted_loss - 1.0 == pytest.approx(min(feasible), abs=1e-12)


def wide_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 48), nn.ReLU(), nn.Linear(48, 10))


@pytest.mark.parametrize("make", [wide_mlp, small_residual_cnn])
def test_a_structured_allocation_pruned_for_real_meets_its_target(make):
    # Enough channels per group that the levels can come within 5% of a target.
    model = make()
    x = torch.zeros(1, 64) if make is wide_mlp else torch.zeros(1, 1, 8, 8)
    levels = tuple(i / 32 for i in range(32))
    names = group_names(model, x)
    # A sensitivity that rises with the amount, more steeply for some groups than for others.
    weights = np.linspace(1.0, 3.0, len(names))
    sens = Sensitivity(
        "prune_structured",
        levels,
        1.0,
        {n: [1.0 + w * lv**2 for lv in levels] for n, w in zip(names, weights, strict=True)},
    )
    for metric, column in (("params", 0), ("macs", 1)):
        table = layer_costs(model, x, "prune_structured", levels, metric, names)
        for target in (0.35, 0.6):
            allocation = allocate(sens, table, target)
            achieved = pruned_cost(model, allocation.levels, x)[column] / table.full()
            assert achieved == pytest.approx(allocation.fraction, abs=1e-12)
            assert 0.95 * target <= achieved <= target, (metric, target, allocation.levels)
            assert allocation.predicted_loss <= uniform(sens, table, target).predicted_loss


def test_group_sensitivity_is_the_loss_of_the_model_with_the_channels_removed():
    from lightning_compress.budget.core import apply_allocation
    from lightning_compress.pruning import PruningConfig, prune_

    model = small_residual_cnn().eval()
    inputs = torch.randn(64, 1, 8, 8)
    batches = self_labelled(model, inputs)
    sens = measure_sensitivity(
        model, batches, SensitivityConfig("prune_structured", levels=(0.5,), batches=2)
    )
    # The stem and the first block's second conv add up (one group); the classifier's outputs stay.
    assert list(sens.loss) == ["0", "3.conv1", "4.conv1", "4.conv2", "5.conv1", "5.conv2"]
    assert sens.params["0"] == 72 + 576  # stem and block conv2 weights
    for name in sens.loss:
        pruned = copy.deepcopy(model)
        prune_(
            pruned,
            PruningConfig(mode="structured", round_to=1, layer_amounts={name: 0.5}, amount=0.0),
            example_input=inputs[:1],
        )
        masked = apply_allocation(copy.deepcopy(model), {name: 0.5}, "prune_structured", inputs[:1])
        with torch.no_grad():
            losses = [
                sum(float(F.cross_entropy(m(x), y)) for x, y in batches) / len(batches)
                for m in (pruned.eval(), masked)
            ]
        assert sens.loss[name][1] == pytest.approx(losses[0], abs=1e-5)
        assert sens.loss[name][1] == pytest.approx(losses[1], abs=1e-5)
        assert abs(sens.loss[name][1] - sens.base_loss) > 1e-4  # half the channels change the outputs


def test_a_structured_latency_plan_times_the_pruned_model_it_allocates():
    from lightning_compress.budget.core import BudgetConfig, plan_budget

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    inputs = torch.randn(256, 128)
    config = BudgetConfig(
        "prune_structured", target=0.8, metric="latency", levels=(0.5, 0.75), batches=1, latency_repeats=3
    )
    plan = plan_budget(model, self_labelled(model, inputs, batch=256), config, example_input=inputs)
    allocation = plan.allocation
    # The pruned copy was timed against the model; the table's own price is kept beside it.
    assert allocation.measured_fraction is not None and 0.0 < allocation.measured_fraction < math.inf
    assert allocation.budget == 0.8 and set(allocation.levels) == {"0", "2"}
    assert any(level > 0 for level in allocation.levels.values())
    assert f"measured {allocation.measured_fraction:.3g}, budget 0.8)" in allocation.format_table()
