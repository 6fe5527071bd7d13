"""CompressionBudget: plans in setup on the training data, hands per-layer levels to the callback that applies the
scheme, logs the allocation, refuses bad setups before the first step, and keeps its choice across a resume."""

import csv

import lightning.pytorch as pl
import pytest
import torch
from conftest import RecordSteps, trainer_kwargs
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from lightning_compress import CompressionBudget, GradualPruning, LowRankReplacement
from lightning_compress.callback import REMOVE_WEIGHTS, CompressionCallback


class MLP(pl.LightningModule):
    """A LeNet-300-100-like classifier, narrowed, on 8x8 inputs."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 24), nn.ReLU(), nn.Linear(24, 10)
        )

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(-1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class Taker(CompressionCallback):
    """Takes per-layer amounts, as GradualPruning does, and records them."""

    prefix = "taker/"
    effect_order = REMOVE_WEIGHTS
    budget_scheme = "prune"

    def __init__(self):
        self.received = []
        self.prepared_with = None

    def accept_allocation(self, arguments):
        self.received.append(arguments)

    def prepare(self, trainer, pl_module):
        self.prepared_with = self.received[-1] if self.received else None


def fit(tmp_path, digits, callbacks, model=None, **overrides):
    model = model or MLP()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=callbacks, limit_val_batches=2, **overrides))
    trainer.fit(model, datamodule=digits)
    return trainer, model


def test_levels_reach_the_taker_before_it_sets_up_and_meet_the_target(tmp_path, digits):
    taker = Taker()
    budget = CompressionBudget("prune", target=0.4, metric="params", batches=2, verbose=False)
    logger = CSVLogger(tmp_path, name="csv")
    # Listed after the callback it serves: it still runs first.
    fit(tmp_path, digits, [taker, budget], logger=logger, max_steps=2)
    assert taker.prepared_with == {"layer_amounts": budget.levels}
    assert sorted(budget.levels) == ["net.1", "net.3", "net.5"]
    allocation = budget.allocation
    assert allocation.fraction <= 0.4 + 1e-6
    assert allocation.cost == pytest.approx(budget.plan.costs.total(budget.levels))
    # Read back from the logger: the numbers of the allocation, and each layer's level.
    with open(f"{logger.log_dir}/metrics.csv") as file:
        rows = list(csv.DictReader(file))
    logged = {k: float(v) for row in rows for k, v in row.items() if k.startswith("budget/") and v}
    assert logged["budget/cost_fraction"] == pytest.approx(allocation.fraction)
    assert logged["budget/predicted_loss"] == pytest.approx(allocation.predicted_loss)
    assert logged["budget/per_layer/level/net.1"] == pytest.approx(budget.levels["net.1"])
    assert budget.figure_path.exists() and budget.figure_path.stat().st_size > 5_000


def test_the_allocation_beats_one_level_for_all_on_the_predicted_loss(tmp_path, digits):
    budget = CompressionBudget("prune", target=0.3, metric="params", batches=2, verbose=False, plots=False)
    fit(tmp_path, digits, [budget, Taker()], max_steps=1)
    plan = budget.plan
    assert plan.uniform is not None
    assert budget.allocation.predicted_loss <= plan.uniform.predicted_loss + 1e-9
    # Not one level for all: the layers differ in sensitivity.
    assert len(set(budget.levels.values())) > 1


def test_accuracy_aware_mode_keeps_the_most_compression_within_the_drop(tmp_path, digits):
    model = MLP()
    pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=3)).fit(model, datamodule=digits)
    budget = CompressionBudget(
        "prune",
        metric="params",
        batches=2,
        max_drop=0.05,
        probes=3,
        probe_steps=5,
        verbose=False,
        plots=False,
    )
    fit(tmp_path, digits, [budget, Taker()], model=model, max_steps=1)
    search = budget.search
    assert len(search.probes) == 3
    accepted = [p for p in search.probes if p["accepted"]]
    assert accepted and len(accepted) < len(search.probes)  # the search found the edge
    best = min(p["level"] for p in accepted)  # the smallest fraction of the cost kept
    assert budget.allocation.budget == pytest.approx(best)
    assert all((p["drop"] > 0.05) != p["accepted"] for p in search.probes)


@pytest.mark.parametrize(
    ("callbacks", "match"),
    [
        (lambda: [CompressionBudget("prune")], r"this fit has 0\. Add exactly one GradualPruning"),
        (lambda: [CompressionBudget("prune"), Taker(), Taker()], r"this fit has 2 \(Taker, Taker\)"),
    ],
)
def test_a_fit_without_exactly_one_taker_fails_before_any_step(tmp_path, digits, callbacks, match):
    with pytest.raises(ValueError, match=match):
        fit(tmp_path, digits, callbacks(), max_steps=1)


@pytest.mark.parametrize(
    ("scheme", "taker", "match"),
    [
        ("prune", lambda: GradualPruning(amount=0.5), r"GradualPruning\(amount=0.5\) and CompressionBudget"),
        (
            "prune_structured",
            lambda: GradualPruning(mode="structured", layer_amounts={"net.1": 0.5}),
            r"GradualPruning\(layer_amounts=\{'net.1': 0.5\}\) .*Leave `layer_amounts` unset",
        ),
        (
            "low_rank",
            lambda: LowRankReplacement(rank=0.5),
            r"LowRankReplacement\(rank=0.5\) .*\(as `layer_ranks`\) .*Leave `rank` unset",
        ),
    ],
)
def test_a_level_given_to_the_taker_is_refused_before_the_budget_measures(
    tmp_path, digits, scheme, taker, match
):
    # The budget would silently replace it with its own per-layer levels.
    budget, steps = CompressionBudget(scheme, target=0.5, verbose=False, plots=False), RecordSteps()
    with pytest.raises(ValueError, match=match):
        fit(tmp_path, digits, [budget, taker(), steps], max_steps=1)
    assert budget.plan is None and steps.steps == []


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"target": 0.0}, ValueError, "`target=0.0` must be a number > 0 and <= 1"),
        ({"metric": "flops"}, ValueError, "metric"),
        ({"scheme": "prune", "metric": "latency"}, ValueError, "dense CPU kernels do not get faster"),
        ({"scheme": "quantize", "levels": (32, 1)}, ValueError, "levels"),
        ({"batches": 0}, ValueError, "`batches=0`"),
        ({"max_drop": -0.1}, ValueError, "max_drop"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        CompressionBudget(**kwargs)


def test_a_checkpoint_with_other_levels_is_refused():
    budget = CompressionBudget("prune", verbose=False)
    budget.levels = {"net.1": 0.5}
    budget.load_state_dict({"levels": {"net.1": 0.5}})  # the same choice: accepted
    with pytest.raises(ValueError, match="Pass `cache=` a file"):
        budget.load_state_dict({"levels": {"net.1": 0.7}})


def test_a_low_bit_qat_quantizes_the_layers_the_budget_chose_and_leaves_the_others_in_float(tmp_path, digits):
    from lightning_compress import QuantizationAwareTraining

    qat = QuantizationAwareTraining(scheme="intx-weight-only", bits=4)
    budget = CompressionBudget("quantize", target=0.5, metric="size", batches=2, verbose=False, plots=False)
    _, model = fit(tmp_path, digits, [qat, budget], max_steps=2)
    # Measured at the two levels the callback can apply, on the layers it selects.
    assert budget.plan.sensitivity.levels == (32.0, 4.0)
    assert sorted(budget.levels) == ["net.1", "net.3", "net.5"]
    assert budget.allocation.fraction <= 0.5 + 1e-6
    floats = {name for name, bits in budget.levels.items() if bits == 32.0}
    quantized = set(budget.levels) - floats
    assert quantized and "net.1" in quantized  # the largest layer: the target cannot be met without it
    for name in budget.levels:  # converted: a quantized weight is a tensor subclass, a float one a Parameter
        weight = model.get_submodule(name).weight
        assert (type(weight) is nn.Parameter) == (name in floats), (name, type(weight))


def test_structured_budget_reaches_gradual_pruning_and_leaves_the_classifier_whole(tmp_path, digits):
    from examples.models import ImageClassifier
    from lightning_compress import GradualPruning
    from lightning_compress.budget.sensitivity import removed_channels

    pruning = GradualPruning(mode="structured", round_to=1, end=1.0, frequency=1)
    budget = CompressionBudget(
        "prune_structured", target=0.6, metric="macs", batches=2, verbose=False, plots=False
    )
    _, model = fit(tmp_path, digits, [pruning, budget], model=ImageClassifier("small_cnn"), max_steps=3)
    assert "net.10" not in budget.levels  # the classifier: its outputs are the model's
    assert pruning.layer_amounts == budget.levels
    # One level per channel group, each layer of a group with its group's channels removed.
    fresh = ImageClassifier("small_cnn")
    for name, amount in budget.levels.items():
        channels = fresh.get_submodule(name).weight.shape[0]
        assert model.get_submodule(name).weight.shape[0] == channels - removed_channels(channels, amount), (
            name
        )
    assert any(amount > 0 for amount in budget.levels.values())
    from lightning_compress.stats import count_macs_per_sample

    # The cost table counts what the next layers lose too: the pruned model costs what the budget predicted.
    achieved = count_macs_per_sample(model, torch.zeros(1, 1, 8, 8)) / budget.plan.costs.full()
    assert achieved == pytest.approx(budget.allocation.fraction, rel=1e-9)
    assert achieved <= 0.6


def test_the_tables_and_the_plot_reach_tensorboard(tmp_path, digits):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb")
    budget = CompressionBudget("prune", target=0.4, metric="params", batches=2, verbose=False)
    fit(tmp_path, digits, [budget, Taker()], logger=logger, max_steps=1)
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    assert "budget/sensitivity" in events.Tags()["images"]
    text = events.Tensors("budget/tables/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "optimal prune allocation" in text and "net.1" in text
    assert events.Scalars("budget/cost_fraction")[0].value == pytest.approx(budget.allocation.fraction)


def test_ddp_with_a_logger_every_rank_applies_rank_zeros_levels_and_the_plot_is_written(tmp_path):
    from tests._ddp import run_worker

    run_worker("_ddp_budget.py", tmp_path, timeout=240)  # a collective call on one rank only hangs
    levels = [torch.load(tmp_path / f"rank{rank}.pt")["levels"] for rank in (0, 1)]
    assert levels[0] == levels[1] and len(levels[0]) == 4
    assert (tmp_path / "logs" / "version_0" / "sensitivity.png").stat().st_size > 10_000


def test_without_a_run_directory_the_plot_is_written_nowhere(tmp_path, digits, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where a plot without a folder of its own used to land, run after run
    budget = CompressionBudget("prune", target=0.4, metric="params", batches=1, verbose=False)
    fit(tmp_path, digits, [budget, Taker()], max_steps=1)
    assert budget.figure_path is None and list(tmp_path.rglob("*.png")) == []
