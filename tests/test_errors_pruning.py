"""Every public argument of GradualPruning: a bad value fails before training, naming the argument.

The table of `docs/pruning.md` ("What fails early") lists these same cases.
"""

import inspect

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from examples.models import ImageClassifier
from lightning_compress import GradualPruning
from tests.conftest import RecordSteps, TiedLM, trainer_kwargs

# (arguments, exception, message fragment): each fails in the constructor.
AT_CONSTRUCTION = [
    (
        {"amount": 0.5, "criterion": "wanda", "calibration_batches": 0},
        ValueError,
        r"`calibration_batches=0` must be a positive integer",
    ),
    (
        {"amount": 0.5, "criterion": "wanda", "calibration_input": "x"},
        TypeError,
        r"`calibration_input='x'` must be a function from a training batch to the model's input",
    ),
    (
        {"amount": 0.5, "criterion": "wanda", "calibration_mask": "attention_mask"},
        TypeError,
        r"`calibration_mask='attention_mask'` must be a function from the model input to a \(batch, positions\) mask",
    ),
    ({"amount": 1.0}, ValueError, r"`amount=1.0` must be in \[0, 1\)"),
    ({"amount": -0.1}, ValueError, r"`amount=-0.1` must be in \[0, 1\)"),
    ({"amount": "0.5"}, TypeError, r"`amount='0.5'` must be a number"),
    (
        {"amount": 0.5, "layer_amounts": {"net.0": 1.0}},
        ValueError,
        r"`layer_amounts\['net.0'\]=1.0` must be in \[0, 1\)",
    ),
    ({"amount": 0.5, "mode": "2:4"}, ValueError, r"`mode='2:4'` fixes the sparsity .* leave `amount` unset"),
    ({"amount": 0.5, "mode": "blocks"}, ValueError, r"Unknown `mode='blocks'`"),
    ({"mode": "3:2"}, ValueError, r"`mode='3:2'`: N:M needs 1 <= N <= M"),
    ({"mode": "N:M"}, ValueError, r"`mode='N:M'` needs numbers, e.g. `mode='2:4'`"),
    ({"amount": 0.5, "criterion": "taylor"}, ValueError, r"Unknown `criterion='taylor'`"),
    (
        {"amount": 0.5, "mode": "structured", "criterion": "magnitude"},
        ValueError,
        r"Unknown `criterion='magnitude'`",
    ),
    (
        {"mode": "2:4", "criterion": "random"},
        ValueError,
        r"`criterion='random'` does not apply to `mode='2:4'`",
    ),
    ({"amount": 0.5, "scope": "model"}, ValueError, r"Unknown `scope='model'`"),
    ({"mode": "2:4", "scope": "global"}, ValueError, r"`scope='global'` does not apply to `mode='2:4'`"),
    (
        {"amount": 0.9, "max_layer_amount": 0.95},
        ValueError,
        r"`max_layer_amount=0.95` applies to .*scope='global'",
    ),
    (
        {"amount": 0.5, "mode": "structured", "scope": "global", "max_layer_amount": 0.9},
        ValueError,
        r"`max_layer_amount=0.9` applies to `mode='unstructured', scope='global'` only",
    ),
    (
        {"amount": 0.9, "scope": "global", "max_layer_amount": 0.5},
        ValueError,
        r"`max_layer_amount=0.5` must be in \[amount, 1\] = \[0.9, 1\]",
    ),
    (
        {"amount": 0.9, "scope": "global", "max_layer_amount": "all"},
        TypeError,
        r"`max_layer_amount='all'` must be a number",
    ),
    ({"amount": 0.5, "schedule": "cubic"}, ValueError, r"Unknown `schedule='cubic'`"),
    ({"amount": 0.5, "start": 1.5}, ValueError, r"`start=1.5` is outside \[0, 1\]"),
    ({"amount": 0.5, "start": "soon"}, ValueError, r"`start='soon'` is not understood"),
    ({"amount": 0.5, "end": True}, TypeError, r"`end=True` is a bool"),
    ({"amount": 0.5, "start": 0.8, "end": 0.2}, ValueError, r"`end=0.2` is before `start=0.8`"),
    (
        {"amount": 0.5, "frequency": 0},
        ValueError,
        r"`frequency=0` must be a positive number of optimizer steps",
    ),
    ({"amount": 0.5, "frequency": 2.5}, ValueError, r"`frequency=2.5` must be a positive number"),
    ({"amount": 0.5, "initial_amount": 1.2}, ValueError, r"`initial_amount=1.2` must be in \[0, 1\)"),
    ({"amount": 0.5, "initial_amount": 0.6}, ValueError, r"`initial_amount=0.6` is above `amount=0.5`"),
    (
        {"mode": "2:4", "initial_amount": 0.1},
        ValueError,
        r"`initial_amount=0.1` does not apply to `mode='2:4'`",
    ),
    ({"amount": 0.5, "modules": []}, ValueError, r"`modules=\[\]` is empty and would select nothing"),
    ({"amount": 0.5, "modules": [3]}, TypeError, r"`modules` got 3"),
    (
        {"amount": 0.5, "modules": "re:("},
        ValueError,
        r"`modules` pattern 're:\(' is not a valid regular expression",
    ),
    ({"amount": 0.5, "exclude": [1.5]}, TypeError, r"`exclude` got 1.5"),
    ({"amount": 0.5, "min_params": -1}, ValueError, r"`min_params=-1` must be a non-negative integer"),
    ({"amount": 0.5, "round_to": 0}, ValueError, r"`round_to=0` must be a positive integer"),
    ({"amount": 0.5, "round_to": True}, ValueError, r"`round_to=True` must be a positive integer"),
    ({"amount": 0.5, "finalize": "yes"}, TypeError, r"`finalize='yes'` must be True or False"),
    ({"amount": 0.5, "per_layer": 1}, TypeError, r"`per_layer=1` must be True or False"),
    ({"amount": 0.5, "materialize": "yes"}, TypeError, r"`materialize='yes'` must be True or False"),
    ({"amount": 0.5, "log_per_layer": 1}, TypeError, r"`log_per_layer=1` must be True or False"),
    (
        {"amount": 0.5, "materialize": True, "finalize": False},
        ValueError,
        r"got both `materialize=True` and `finalize=False`: give only `finalize`",
    ),
    ({"amount": 0.5, "seed": "0"}, TypeError, r"`seed='0'` must be an integer"),
]


@pytest.mark.parametrize(("kwargs", "error", "match"), AT_CONSTRUCTION)
def test_bad_argument_fails_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        GradualPruning(**kwargs)


class Conv1dNet(pl.LightningModule):
    """Two Conv1d layers of 8 channels on the digits (each image read as 8 rows of 8 values)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(8, 8, 3, padding=1)
        self.c2 = nn.Conv1d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)
        self.example_input_array = torch.zeros(1, 1, 8, 8)

    def forward(self, x):
        x = x.reshape(-1, 8, 8)
        return self.fc(torch.relu(self.c2(torch.relu(self.c1(x)))).mean(-1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


# (arguments, model, trainer arguments, message fragment): each fails in `setup`, before the first step.
AT_SETUP = [
    ({}, "small_cnn", {}, r"`amount` is required for `mode='unstructured'`.*`CompressionBudget`"),
    ({"layer_amounts": {"net.2": 0.5}}, "small_cnn", {}, r"`layer_amounts` names 'net.2'"),
    (
        {"amount": 0.5, "modules": "decoder.*"},
        "small_cnn",
        {},
        r"`modules`: no name 'decoder.\*' in ImageClassifier",
    ),
    (
        {"amount": 0.5, "exclude": "head"},
        "small_cnn",
        {},
        r"`exclude`: no module named 'head' in ImageClassifier",
    ),
    ({"amount": 0.5, "min_params": 10**6}, "small_cnn", {}, r"min_params=1000000\) matches no module"),
    (
        {"amount": 0.5, "criterion": "sparsegpt", "calibration_input": lambda batch: batch[0].flatten(1)},
        "small_cnn",
        {},
        r"`criterion='sparsegpt'` runs the model on training batches to calibrate, and the model rejected the input "
        r"taken from the first one \(`calibration_input\(batch\)`\): RuntimeError.*Pass `calibration_input`",
    ),
    (
        {"amount": 0.5, "criterion": "wanda", "calibration_mask": lambda x: x.sum()},
        "small_cnn",
        {},
        r"`calibration_mask` must return a \(batch, positions\) tensor of booleans or 0/1.*shape \(\)",
    ),
    ({"mode": "2:3", "modules": nn.Linear}, "small_cnn", {}, r"`m=3` does not divide the size 512"),
    ({"amount": 0.5, "start": "epoch:3", "end": "epoch:4"}, "small_cnn", {}, r"is optimizer step 60"),
    (
        {"amount": 0.5, "example_input": torch.zeros(1, 3)},
        "small_cnn",
        {},
        r"could not run on its example input.*`example_input`",
    ),
    (
        {"amount": 0.5, "mode": "structured", "example_input": torch.zeros(1, 3)},
        "small_cnn",
        {},
        r"torch-pruning could not trace ImageClassifier .* Pass an `example_input`",
    ),
    (
        {"amount": 0.5, "mode": "structured", "criterion": "taylor", "start": 0.0},
        "small_cnn",
        {},
        r"`criterion='taylor'` ranks channels by their gradients.*`start='step:1'`",
    ),
    (
        {"amount": 0.5, "mode": "structured"},
        "small_cnn",
        {"precision": "bf16-true"},
        r"`mode='structured'` cannot run with `Trainer\(precision='bf16-true'\)`.*'bf16-mixed'",
    ),
    (
        {"amount": 0.5, "mode": "structured", "modules": nn.Conv1d},
        "conv1d",
        {},
        r"would remove nothing from the selected layers: 'c1' \(8 channels\), 'c2' \(8 channels\) at "
        r"`amount=0.5` with `round_to=8`.*`round_to=1`",
    ),
    (
        {"amount": 0.5, "mode": "structured"},
        "tied",
        {},
        r"cannot remove channels of tied weights \('mid': .*\['dec.weight', 'emb.weight'\]\).*`exclude=\['mid'\]`",
    ),
]


def _model(name):
    return {"conv1d": Conv1dNet, "tied": TiedLM}.get(name, lambda: ImageClassifier(name))()


@pytest.mark.parametrize(("kwargs", "model", "trainer_args", "match"), AT_SETUP)
def test_bad_argument_for_the_model_fails_at_setup(tmp_path, digits, kwargs, model, trainer_args, match):
    counter = RecordSteps()
    trainer = pl.Trainer(
        **trainer_kwargs(tmp_path, **trainer_args), callbacks=[GradualPruning(**kwargs), counter]
    )
    module = _model(model)
    with pytest.raises(ValueError, match=match):
        trainer.fit(module, datamodule=None if model == "tied" else digits)
    assert counter.steps == []


def test_the_tables_cover_every_public_argument():
    arguments = set(inspect.signature(GradualPruning.__init__).parameters) - {"self"}
    covered = {key for kwargs, *_ in AT_CONSTRUCTION + AT_SETUP for key in kwargs}
    assert arguments <= covered, sorted(arguments - covered)


def test_an_empty_modules_list_fails_in_every_callback_that_selects_layers():
    from lightning_compress import BinaryWeights, LowRankReplacement, QuantizationAwareTraining, WeightSharing

    for make in (
        lambda: LowRankReplacement(rank=0.5, modules=[]),
        lambda: WeightSharing(modules=[]),
        lambda: BinaryWeights(modules=[]),
        lambda: QuantizationAwareTraining(scheme="intx-weight-only", modules=[]),
    ):
        with pytest.raises(ValueError, match=r"`modules=\[\]` is empty and would select nothing"):
            make()
