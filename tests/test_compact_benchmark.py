"""The compact-filters-and-depth benchmark: its quick run end to end, its pruning-amount search and its targets."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from benchmarks import compact
from benchmarks.common import Context
from lightning_compress.stats import count_macs_per_sample

ARMS = ("dense", *compact.ARMS)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """The quick settings run once, on the digits (no Fashion-MNIST in the empty data folder)."""
    folder = tmp_path_factory.mktemp("compact")
    context = Context("compact", quick=True, output=folder, data_dir=folder / "none")
    threads = torch.get_num_threads()
    try:
        result = compact.run(compact.Settings(**compact.QUICK), context)
    finally:
        torch.set_num_threads(threads)
    return result, context


def test_quick_run_gives_every_arm_finite_numbers(quick):
    result, context = quick
    rows = {row["arm"]: row for row in result.payload["rows"]}
    assert tuple(rows) == ARMS
    columns = ["acc_at_start", "test_acc", "params", "macs", "macs_ratio", "step_ms"]
    columns += [column for b in compact.BATCHES for column in (f"speedup_b{b}", f"latency_b{b}_ms")]
    for arm, row in rows.items():
        for column in columns:
            assert math.isfinite(row[column]) and row[column] > 0, (arm, column, row[column])
        assert 0.0 <= row["test_acc"] <= 1.0
    assert rows["dense"]["macs_ratio"] == rows["dense"]["speedup_b1"] == rows["dense"]["speedup_b64"] == 1.0
    assert "used scikit-learn's digits" in context.notes[0]


def test_compact_and_depth_arms_have_fewer_macs_and_pruning_matches_the_compact_arm(quick):
    result, _ = quick
    rows = {row["arm"]: row for row in result.payload["rows"]}
    dense = rows["dense"]["macs"]
    for arm in ("compact", "compact_kd", "depth", "depth_kd", "pruning"):
        assert rows[arm]["macs"] < dense, arm
    # Depthwise-separable 3x3 convolutions at multiplier 1 (every k×k layer, the 1x1 shortcuts left alone).
    assert rows["compact"]["macs_ratio"] > 4 and rows["compact"]["params_ratio"] > 4
    assert rows["compact"]["macs"] == rows["compact_kd"]["macs"] == result.payload["compact_macs_counted"]
    # The one block with an identity shortcut is removed; the downsampling blocks cannot be.
    assert result.payload["residual_blocks"] == ["net.3"]
    assert rows["depth"]["removed_blocks"] == rows["depth_kd"]["removed_blocks"] == ["net.3"]
    assert 1.2 < rows["depth"]["macs_ratio"] < rows["compact"]["macs_ratio"]
    # The pruning amount is the smallest whose model has at most the compact arm's MACs.
    assert 0.75 * rows["compact"]["macs"] <= rows["pruning"]["macs"] <= rows["compact"]["macs"]
    assert 0 < result.payload["pruning_amount"] < 1


def test_compact_arms_report_a_reconstruction_error_per_replaced_layer(quick):
    result, _ = quick
    layers = [row for row in result.payload["per_layer"] if row["arm"] == "compact"]
    names = [row["layer"] for row in layers]
    assert names == [
        "net.0",
        "net.3.conv1",
        "net.3.conv2",
        "net.4.conv1",
        "net.4.conv2",
        "net.5.conv1",
        "net.5.conv2",
    ]
    for row in layers:
        # Rank 1 of each input channel's out x 9 slice: a large error, below the whole weight.
        assert 0.3 < row["weight_error"] < 1.0, row
        assert row["params_after"] < row["params_before"] and row["macs_ratio"] > 1
    assert sorted(result.payload["skipped"]["compact"]) == ["net.4.shortcut.0", "net.5.shortcut.0"]


def test_markdown_holds_the_tables_and_every_target(quick):
    result, _ = quick
    text = result.markdown
    assert "## Arms, fine-tuned alike from the same dense weights" in text
    assert "| arm | callbacks | acc_at_start | test_acc |" in text
    for arm in ARMS:
        assert f"\n| {arm} | " in text
    assert "## Compact arms: reconstruction error per replaced layer" in text
    assert "| compact | net.3.conv1 | 1 | " in text
    assert "## Block removal (depth, depth_kd)" in text
    targets = result.payload["targets"]
    assert len(targets) == 2 + 2 * len(compact.ARMS)
    for target, met in targets.items():
        assert f"{target}: {'met' if met else 'NOT met'}" in text


def test_matching_amount_is_the_smallest_on_the_grid_within_the_macs():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.Flatten(), nn.Linear(9216, 10)
    )
    limit = int(0.3 * count_macs_per_sample(net, compact.EXAMPLE))
    amount = compact.matching_amount(net, limit, round_to=1, steps=16)
    assert amount is not None
    assert compact._pruned_macs(net, amount, 1) <= limit < compact._pruned_macs(net, amount - 1 / 16, 1)
    assert compact.matching_amount(net, 10, round_to=1, steps=16) is None


def test_targets_and_observations_state_a_slower_depthwise_model_and_a_distillation_miss():
    rows = [
        {"arm": "dense", "test_acc": 0.9, "macs_ratio": 1.0, "speedup_b1": 1.0, "speedup_b64": 1.0},
        {"arm": "compact", "test_acc": 0.8, "macs_ratio": 6.0, "speedup_b1": 0.8, "speedup_b64": 1.5},
        {"arm": "compact_kd", "test_acc": 0.82, "macs_ratio": 6.0, "speedup_b1": 0.9, "speedup_b64": 1.4},
        {"arm": "depth", "test_acc": 0.88, "macs_ratio": 1.6, "speedup_b1": 1.4, "speedup_b64": 1.5},
        {"arm": "depth_kd", "test_acc": 0.87, "macs_ratio": 1.6, "speedup_b1": 1.3, "speedup_b64": 1.6},
    ]
    results = {"rows": rows, "residual_blocks": ["net.3"], "test_images": 1000}
    met = compact.targets(results)
    assert met["compact: distilled accuracy >= alone"] and not met["depth: distilled accuracy >= alone"]
    assert not met["compact: speed-up > 1.0x at batch 1"] and met["compact: speed-up > 1.0x at batch 64"]
    assert met["depth_kd: speed-up > 1.0x at batch 1"]
    lines = compact.observations(results)
    assert lines[0].startswith("`compact` is measured no faster than dense on this CPU: 0.80x at batch 1")
    assert "memory traffic" in lines[0] and lines[1].startswith("`compact_kd`")
    assert "1.60x fewer MACs, not the compact arm's 6.00x" in lines[2] and "(`net.3`)" in lines[2]
    assert lines[3:] == [
        "Self-distillation recovered accuracy in the compact arm: 0.8200 distilled against 0.8000 alone (+2.00 "
        "points; one seed, 1,000 test images).",
        "Self-distillation did not recover accuracy in the depth arm: 0.8700 distilled against 0.8800 alone (-1.00 "
        "points; one seed, 1,000 test images).",
    ]
