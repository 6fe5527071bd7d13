"""The budget benchmark: its quick configuration end to end, and the helpers that match the uniform run's
level and count what a compressed model reached."""

from __future__ import annotations

import doctest
import json
import math

import pytest
import torch
from torch import nn

from benchmarks import budget, runner
from benchmarks.budget import CASES, QUICK, achieved_fraction, grid, targets, uniform_level
from lightning_compress.budget import apply_allocation, layer_costs

NUMBERS = (
    "test_acc",
    "params",
    "nonzero_params",
    "macs",
    "size_bytes",
    "latency_ms",
    "latency_ratio",
    "predicted_fraction",
    "achieved_fraction",
)


def test_quick_run_compares_every_case_with_finite_numbers_and_writes_the_tables(tmp_path):
    # No Fashion-MNIST in `data_dir`: the quick run uses the digits upsampled to 28x28.
    outcome = runner.run("budget", quick=True, output=tmp_path, data_dir=tmp_path / "none")
    assert outcome.result is not None
    payload = outcome.result.payload
    rows = {(r["case"], r["method"]): r for r in payload["rows"]}
    for name, case in CASES.items():
        if case.metric == "latency" and (name, "budget") not in rows:
            # Measured on a shared machine, the latency table can put the target out of reach: a noted miss.
            assert any(
                f"`{name}`: CompressionBudget found the target out of reach" in n for n in outcome.notes
            )
            assert not payload["targets"][f"{name}: measured latency ratio <= 1.05 x {case.target:g}"]
            continue
        assert (name, "budget") in rows and (name, "uniform") in rows, outcome.notes
        fine_tuned = [rows[(name, "budget")], rows[(name, "uniform")]]
        for row in fine_tuned:
            measured = [key for key in NUMBERS if key != "predicted_fraction"]
            assert all(math.isfinite(row[key]) for key in measured), (name, row)
            assert 0.0 <= row["test_acc"] <= 1.0
        budget_row, uniform_row = fine_tuned
        assert uniform_row["levels"].startswith("all ")
        if (
            case.metric != "latency"
        ):  # latency: the table's budget is moved until the pruned model measures in
            assert budget_row["predicted_fraction"] <= case.target + 1e-9
            # Counted: the cost model counts what the pruned model reaches, channel groups included.
            assert budget_row["achieved_fraction"] <= budget_row["predicted_fraction"] + 1e-9
            assert uniform_row["achieved_fraction"] <= budget_row["achieved_fraction"] + 1e-9
            assert uniform_row["predicted_fraction"] == pytest.approx(
                uniform_row["achieved_fraction"], abs=1e-3
            )
        if case.scheme == "prune_structured" and case.metric != "latency":
            assert budget_row["achieved_fraction"] == pytest.approx(budget_row["predicted_fraction"])
        if case.scheme == "prune_structured" and case.metric == "latency":
            # The uniform amount is chosen by timing it against the budget run's model: nothing predicted.
            assert uniform_row["predicted_fraction"] is None
        assert not any(method == "uniform_achieved" for _, method in rows)
    assert {r["model"] for r in payload["rows"] if r["method"] == "dense"} == {
        "residual_cnn",
        "lenet_300_100",
    }
    assert set(payload["targets"]) == {
        *(f"{name}: budget accuracy >= uniform accuracy at equal budget" for name in CASES),
        "cnn_latency: measured latency ratio <= 1.05 x 0.5",
    }
    assert {r["case"] for r in payload["layers"]} == {
        r["case"] for r in payload["rows"] if r["method"] != "dense"
    }

    text = outcome.markdown_path.read_text()
    for heading in ("## Budget vs uniform, per case", "## Dense models", "## Levels per layer"):
        assert heading in text
    assert "| case | scheme | metric | target | method | test_acc |" in text
    assert "| lenet_params | low_rank | params | 0.3 | uniform |" in text
    assert "Targets: cnn_macs: budget accuracy >= uniform accuracy at equal budget: " in text
    stored = json.loads((tmp_path / "budget.json").read_text())
    assert stored["quick"] and stored["settings"]["cnn_limit_train"] == QUICK["cnn_limit_train"]


def test_uniform_level_is_the_least_compressed_level_within_the_allocation_cost():
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))
    table = layer_costs(model, torch.zeros(1, 10), "prune_structured", [0.25, 0.5, 0.75], "macs", ["0"])
    # Dense: 200 + 100 MACs; removing a fraction of the 20 hidden units keeps (1 - amount) of both layers.
    assert [table.total({"0": level}) for level in table.levels] == [300.0, 225.0, 150.0, 75.0]
    assert uniform_level(table, 225.0) == 0.25
    assert uniform_level(table, 224.0) == 0.5
    assert uniform_level(table, 300.0) == 0.0
    assert uniform_level(table, 74.0) is None  # 75 at the most compressed level


def test_achieved_fraction_counts_pruned_models_as_the_cost_table_predicts():
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    example = torch.zeros(1, 64)
    levels = {"0": 0.75, "2": 0.5}
    pruned = apply_allocation(budget.copy.deepcopy(dense), levels, "prune")
    for metric in ("params", "size"):
        table = layer_costs(dense, example, "prune", [0.5, 0.75], metric, ["0", "2"])
        predicted = table.total(levels) / table.full()
        assert achieved_fraction(pruned, dense, metric, "prune", example) == pytest.approx(predicted)
    # 2048 * 0.25 + 320 * 0.5 weights and 42 biases kept of 2410 parameters.
    assert achieved_fraction(pruned, dense, "params", "prune", example) == pytest.approx(714 / 2410)
    # A model with half the hidden units: both layers do half the MACs.
    narrow = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    assert achieved_fraction(narrow, dense, "macs", "prune_structured", example) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="measured side by side"):
        achieved_fraction(narrow, dense, "latency", "prune_structured", example)


def test_a_case_without_both_runs_misses_its_targets():
    rows = [
        {"case": "cnn_macs", "method": "budget", "test_acc": 0.8, "latency_ratio": 0.6},
        {"case": "cnn_macs", "method": "uniform", "test_acc": 0.8, "latency_ratio": 0.4},
        {"case": "cnn_latency", "method": "budget", "test_acc": 0.9, "latency_ratio": 0.526},
    ]
    met = targets({"cases": ["cnn_macs", "cnn_latency", "lenet_size"], "rows": rows})
    assert met == {
        "cnn_macs: budget accuracy >= uniform accuracy at equal budget": True,  # a tie counts as met
        "cnn_latency: budget accuracy >= uniform accuracy at equal budget": False,  # no uniform run
        "cnn_latency: measured latency ratio <= 1.05 x 0.5": False,  # 0.526 > 0.525
        "lenet_size: budget accuracy >= uniform accuracy at equal budget": False,  # out of reach: no runs
    }


def test_level_grids_hold_exact_steps_and_the_examples_run():
    assert grid(0.0625, 0.875, 0.0625) == tuple(i / 16 for i in range(1, 15))
    assert len(grid(0.3, 0.975, 0.025)) == 28 and grid(0.3, 0.975, 0.025)[-1] == 0.975
    assert doctest.testmod(budget).failed == 0
