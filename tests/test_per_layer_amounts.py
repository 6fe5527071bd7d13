"""Per-layer levels: GradualPruning(layer_amounts=...) and LowRankReplacement(layer_ranks=...), given by the user
or handed over by a budget (`accept_allocation`): every layer reaches its own level, ramps in proportion, fails
early on bad input, and resumes bit-exactly."""

import csv
import math
import textwrap
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from examples.data import DigitsDataModule
from examples.models import ImageClassifier
from lightning_compress import GradualPruning, LowRankReplacement
from lightning_compress.budget.sensitivity import kept_rank, pruned_count, removed_channels
from lightning_compress.low_rank import LowRankConfig, low_rank_
from lightning_compress.pruning import PruningConfig, PruningPlan, prune_
from lightning_compress.pruning.core import pruning_schedule
from tests.conftest import RecordSteps, SGDClassifier, fit_or_resume, trainer_kwargs


class MLP(pl.LightningModule):
    """64 -> 48 -> 24 -> 10 on the flattened 8x8 digits."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 24), nn.ReLU(), nn.Linear(24, 10)
        )
        self.example_input_array = torch.zeros(2, 1, 8, 8)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class ResCNN(MLP):
    """A stem, one residual block (its second conv is coupled to the stem by the add), a strided conv, a head."""

    def __init__(self):
        super().__init__()
        del self.net
        self.stem, self.bn = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv1, self.conv2 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        h = torch.relu(self.bn(self.stem(x)))
        h = torch.relu(h + self.conv2(torch.relu(self.conv1(h))))
        return self.head(torch.relu(self.down(h)).mean((2, 3)))


class RecordUpdates(Callback):
    """After every step: the schedule value and, per layer, the zeroed weights (unstructured) or removed channels."""

    def __init__(self, pruning):
        self.pruning, self.records = pruning, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.pruning.mode == "structured":
            counts = {root: len(removed) for root, removed in self.pruning.plan.items()}
        else:
            counts = {
                name: int((p == 0).sum())
                for name, p in pl_module.named_parameters()
                if name in self.pruning.masks
            }
        self.records.append((self.pruning.current_amount, counts))


def _fit(tmp_path, digits, model, callbacks, **overrides):
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, **overrides), callbacks=callbacks)
    trainer.fit(model, datamodule=digits)
    return trainer


def test_unstructured_layers_reach_their_own_amounts_and_ramp_in_proportion(tmp_path, digits):
    amounts = {"net.1": 0.9, "net.3": 0.6}  # net.5 keeps `amount`
    pruning = GradualPruning(
        amount=0.3, layer_amounts=amounts, start=0.0, end=0.6, frequency=2, per_layer=True
    )
    record = RecordUpdates(pruning)
    logger = CSVLogger(tmp_path, name="csv")
    model = MLP()
    _fit(tmp_path, digits, model, [pruning, record], logger=logger, log_every_n_steps=1)
    finals = {"net.1.weight": 0.9, "net.3.weight": 0.6, "net.5.weight": 0.3}
    sizes = {name: p.numel() for name, p in model.named_parameters() if name in finals}
    for name, final in finals.items():  # the budget counts the removed weights the same way
        assert int((model.get_parameter(name) == 0).sum()) == pruned_count(sizes[name], final)
    values = sorted({v for v, _ in pruning_records(record)})
    assert len([v for v in values if 0.0 < v < 0.3]) >= 3 and values[-1] == 0.3
    for v, zeros in pruning_records(record):  # every layer at its own amount x v / amount
        assert zeros == {name: round(final * v / 0.3 * sizes[name]) for name, final in finals.items()}
    # The per-layer sparsity the loggers get: each layer at its own amount.
    with open(f"{logger.log_dir}/metrics.csv") as file:
        rows = list(csv.DictReader(file))
    last = {k: float(v) for row in rows for k, v in row.items() if k.startswith("pruning/per_layer/") and v}
    for name, final in finals.items():
        logged = last[f"pruning/per_layer/weight_sparsity/{name}"]
        assert logged == pytest.approx(pruned_count(sizes[name], final) / sizes[name], abs=1e-6)


def pruning_records(record):
    return [(v, zeros) for v, zeros in record.records if v > 0]


def test_amount_left_unset_is_the_weighted_mean_of_the_layer_amounts_without_a_trainer():
    torch.manual_seed(0)
    model = MLP().net
    amounts = {"1": 0.9, "3": 0.5, "5": 0.25}
    config = PruningConfig(layer_amounts=amounts)
    plan = PruningPlan(model, config)
    sizes = {"1": 64 * 48, "3": 48 * 24, "5": 24 * 10}
    mean = sum(amounts[k] * sizes[k] for k in sizes) / sum(sizes.values())
    assert plan.final_amount == pytest.approx(mean)
    assert pruning_schedule(config, 0, 10, steps=20, final=plan.final_amount).value(10) == plan.final_amount
    plan = prune_(model, config)  # no amount: every layer its own
    assert [int((model[int(k)].weight == 0).sum()) for k in sizes] == [
        round(amounts[k] * sizes[k]) for k in sizes
    ]
    stats = plan.statistics()  # the logged target is the sparsity reached (to rounding)
    assert stats["target_weight_sparsity"] == pytest.approx(mean)
    assert stats["weight_sparsity"] == pytest.approx(mean, abs=1 / sum(sizes.values()))


def test_structured_layers_lose_their_own_output_channels_and_ramp_in_proportion(tmp_path, digits):
    amounts = {"stem": 0.5, "conv1": 0.25, "down": 0.75, "head": 0.5}  # `head` feeds the output: left whole
    pruning = GradualPruning(
        mode="structured", layer_amounts=amounts, round_to=1, start=0.0, end=0.6, frequency=2
    )
    record = RecordUpdates(pruning)
    model = ResCNN()
    with pytest.warns(UserWarning, match=r"`layer_amounts` names \['head'\], but pruning leaves them"):
        _fit(tmp_path, digits, model, [pruning, record], limit_train_batches=12)
    # The budget counts removed channels the same way (`round_to=1`); conv2 shares the stem's channels.
    kept = {
        name: size - removed_channels(size, amounts[name])
        for name, size in (("stem", 8), ("conv1", 8), ("down", 16))
    }
    assert kept == {"stem": 4, "conv1": 6, "down": 4}
    assert (model.stem.out_channels, model.conv2.out_channels, model.bn.num_features) == (4, 4, 4)
    assert (model.conv1.out_channels, model.down.out_channels, model.head.out_features) == (6, 4, 10)
    # No `amount`: the schedule ends at the mean of the group amounts, weighted by their channels.
    final = (0.5 * 8 + 0.25 * 8 + 0.75 * 16) / 32
    sizes = {"stem": 8, "conv1": 8, "down": 16}
    values = sorted({v for v, _ in pruning_records(record)})
    assert values[-1] == pytest.approx(final) and len([v for v in values if v < final]) >= 3
    for v, removed in pruning_records(record):
        want = {r: min(math.floor(amounts[r] * v / values[-1] * n + 1e-9), n - 1) for r, n in sizes.items()}
        assert removed == want


def test_coupled_layers_share_their_channels_and_take_the_smallest_amount():
    model = ResCNN()
    config = PruningConfig(
        mode="structured", round_to=1, layer_amounts={"stem": 0.5, "conv2": 0.25}, amount=0.5
    )
    with pytest.warns(UserWarning, match="they lose the smallest"):
        plan = prune_(model, config, example_input=torch.zeros(1, 1, 8, 8))
    assert (model.stem.out_channels, model.conv2.out_channels, model.conv1.out_channels) == (6, 6, 4)
    assert plan.max_abs_diff < 1e-5


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"layer_amounts": {"net.1": 1.0}},
            ValueError,
            r"`layer_amounts\['net.1'\]=1.0` must be in \[0, 1\)",
        ),
        (
            {"layer_amounts": {"net.1": "0.5"}},
            TypeError,
            r"`layer_amounts\['net.1'\]='0.5'` must be a number",
        ),
        ({"layer_amounts": [0.5]}, TypeError, r"`layer_amounts=\[0.5\]` must be a mapping"),
        ({"layer_amounts": {1: 0.5}}, TypeError, r"`layer_amounts` has the key 1"),
        (
            {"layer_amounts": {"a": 0.5}, "scope": "global"},
            ValueError,
            r"`layer_amounts` and `scope='global'`",
        ),
        ({"layer_amounts": {"a": 0.5}, "mode": "2:4"}, ValueError, r"`layer_amounts` and `mode='2:4'`"),
    ],
)
def test_bad_layer_amounts_fail_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        GradualPruning(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"layer_amounts": {"net.2": 0.5}},
            r"names 'net.2' \(did you mean '.*'net.1'.*\?\), which is not among the 3 layers",
        ),
        ({}, r"`amount` is required for `mode='unstructured'`.*`CompressionBudget`"),
        ({"mode": "structured"}, r"`amount` is required for `mode='structured'`.*`CompressionBudget`"),
        (
            {"layer_amounts": {"net.1": 0.5}},
            r"by the layers `layer_amounts` does not name \('net.3', 'net.5'\)",
        ),
        (
            {"layer_amounts": {"net.1": 0.1, "net.3": 0.1, "net.5": 0.1}, "initial_amount": 0.5},
            r"`initial_amount=0.5` is above the mean of `layer_amounts`, 0.1",
        ),
    ],
)
def test_bad_layer_amounts_fail_at_setup_before_any_step(tmp_path, digits, kwargs, match):
    steps = RecordSteps()
    with pytest.raises(ValueError, match=match):
        _fit(tmp_path, digits, MLP(), [GradualPruning(**kwargs), steps])
    assert steps.steps == []


def _resume_run(tmp_path, digits, ckpt_path=None, checkpoint=None):
    pl.seed_everything(7, verbose=False)
    amounts = {"net.0": 0.3, "net.3": 0.6, "net.8": 0.9, "net.10": 0.5}
    pruning = GradualPruning(layer_amounts=amounts, criterion="random", start=0.1, end=0.8, frequency=3)
    model = SGDClassifier("small_cnn", weight_decay=1e-3)
    fit_or_resume(
        tmp_path, digits, model, [pruning], ckpt_path, checkpoint, max_epochs=2, limit_train_batches=10
    )
    return model, pruning


def test_a_run_with_layer_amounts_resumes_bit_exactly(tmp_path, digits):
    full, _ = _resume_run(tmp_path / "full", digits)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    _resume_run(tmp_path / "first", digits, checkpoint=ckpt)
    path = tmp_path / "ckpt" / "epoch=0-step=10.ckpt"
    state = torch.load(path, weights_only=False)["callbacks"]
    assert next(v for k, v in state.items() if "GradualPruning" in k)["current_amount"] > 0.0  # mid-ramp
    resumed, _ = _resume_run(tmp_path / "second", digits, ckpt_path=path)
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert int((resumed.net[8].weight == 0).sum()) == pruned_count(resumed.net[8].weight.numel(), 0.9)


def test_the_checkpoint_key_is_unchanged_without_layer_amounts_and_holds_the_given_ones():
    pruning = GradualPruning(amount=0.5)
    assert pruning.state_key_fields() == {
        "mode": "unstructured",
        "amount": 0.5,
        "selection": str(pruning.selection),
    }
    one, other = (GradualPruning(layer_amounts={"a": value}) for value in (0.5, 0.6))
    assert one.state_key != other.state_key and "layer_amounts" in one.state_key


def test_budget_scheme_names_the_levels_each_pruning_mode_takes():
    assert GradualPruning(amount=0.5).budget_scheme == "prune"
    assert GradualPruning(mode="structured").budget_scheme == "prune_structured"
    assert GradualPruning(amount=0.5, scope="global").budget_scheme is None
    assert GradualPruning(mode="2:4").budget_scheme is None
    assert LowRankReplacement(rank=0.5).budget_scheme == "low_rank"


def test_accept_allocation_prunes_at_the_given_amounts_and_keeps_the_checkpoint_key(tmp_path, digits):
    pruning = GradualPruning(mode="structured", round_to=1, start=0.0, end=0.5)
    pruning.accept_allocation({"layer_amounts": {"net.0": 0.25, "net.3": 0.75, "net.8": 0.5}})
    model = ImageClassifier("small_cnn")
    _fit(tmp_path, digits, model, [pruning], limit_train_batches=8)
    assert (model.net[0].out_channels, model.net[3].out_channels, model.net[8].out_features) == (12, 8, 32)
    assert pruning.state_key == GradualPruning(mode="structured", round_to=1, start=0.0, end=0.5).state_key
    with pytest.raises(TypeError, match=r"GradualPruning takes `\{'layer_amounts': \{layer: level\}\}`"):
        pruning.accept_allocation({"layer_ranks": {"net.0": 0.5}})
    with pytest.raises(ValueError, match=r"`layer_amounts` and `mode='2:4'`"):
        GradualPruning(mode="2:4").accept_allocation({"layer_amounts": {"net.0": 0.5}})


def test_layer_ranks_set_each_layers_factors(tmp_path, digits):
    ranks = {"net.1": 4, "net.3": 0.25, "net.5": 1.0}  # net.5 at its full rank would not get smaller
    lowrank = LowRankReplacement(rank=0.5, layer_ranks=ranks, method="svd", verbose=False)
    model = MLP()
    _fit(tmp_path, digits, model, [lowrank], max_steps=2)
    assert (model.net[1].first.out_features, model.net[1].second.in_features) == (4, 4)
    assert model.net[3].first.out_features == kept_rank(24, 0.25) == 6  # the budget's rank of a fraction
    assert isinstance(model.net[5], nn.Linear) and "not fewer than" in lowrank.skipped["net.5"]
    assert lowrank.layers == {"net.1": {"kind": "linear", "rank": 4}, "net.3": {"kind": "linear", "rank": 6}}


def test_low_rank_accept_allocation_and_bad_layer_ranks(tmp_path, digits):
    lowrank = LowRankReplacement(method="svd", verbose=False)  # no rule: the levels come from a budget
    key = lowrank.state_key
    lowrank.accept_allocation({"layer_ranks": {"net.1": 0.125, "net.3": 0.5, "net.5": 0.5}})
    model = MLP()
    _fit(tmp_path, digits, model, [lowrank], max_steps=1)
    assert [model.net[i].first.out_features for i in (1, 3, 5)] == [kept_rank(48, 0.125), 12, 5]
    assert lowrank.state_key == key == LowRankReplacement(method="svd").state_key
    for kwargs, match in [
        ({}, r"Give exactly one of `rank`.*got none.*`CompressionBudget\(scheme='low_rank'\)`"),
        (
            {"layer_ranks": {"net.4": 2}},
            r"`layer_ranks` names 'net.4' \(did you mean .*\), which is not among the 3",
        ),
        ({"layer_ranks": {"net.1": 2}}, r"`layer_ranks` does not name \['net.3', 'net.5'\]"),
        (
            {"rank": 2, "layer_ranks": {"net.1": 100}},
            r"`layer_ranks\['net.1'\]=100` is too large for layer 'net.1'",
        ),
    ]:
        steps = RecordSteps()
        with pytest.raises(ValueError, match=match):
            _fit(tmp_path, digits, MLP(), [LowRankReplacement(method="svd", verbose=False, **kwargs), steps])
        assert steps.steps == []
    with pytest.raises(ValueError, match=r"`layer_ranks\['a'\]=0.0` must be a positive int"):
        LowRankReplacement(layer_ranks={"a": 0.0})


def test_low_rank_with_layer_ranks_without_a_trainer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 36, 32))
    config = LowRankConfig(layer_ranks={"0": 0.5, "3": 8}, conv="channel", method="svd")
    result = low_rank_(model, config, example_input=torch.zeros(1, 4, 8, 8))
    # "channel": a 3x3 conv with r filters, then 1x1; the full rank is min(16, 4*3*3) = 16.
    assert (model[0][0].out_channels, model[0][1].in_channels) == (kept_rank(16, 0.5), 8)
    assert model[3].first.out_features == 8 and result.skipped == {}


def test_layer_amounts_and_layer_ranks_come_from_a_lightning_cli_yaml_file(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(
        textwrap.dedent(
            """
            trainer:
              accelerator: cpu
              logger: false
              callbacks:
                - class_path: lightning_compress.GradualPruning
                  init_args:
                    mode: structured
                    layer_amounts: {net.0: 0.25, net.3: 0.5}
                - class_path: lightning_compress.LowRankReplacement
                  init_args:
                    layer_ranks: {net.8: 16, net.10: 0.5}
            model:
              arch: small_cnn
            """
        )
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli = LightningCLI(ImageClassifier, DigitsDataModule, args=["--config", str(config)], run=False)
    pruning, lowrank = (
        cb for cb in cli.trainer.callbacks if isinstance(cb, GradualPruning | LowRankReplacement)
    )
    assert pruning.layer_amounts == {"net.0": 0.25, "net.3": 0.5} and pruning.amount is None
    assert lowrank.layer_ranks == {"net.8": 16, "net.10": 0.5} and isinstance(
        lowrank.layer_ranks["net.8"], int
    )
