"""What LowRankReplacement refuses, and when: every public argument, at construction or at `setup`.

The table in docs/low_rank.md ("What fails early") lists the same cases.
"""

import inspect

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from examples.models import ImageClassifier
from lightning_compress import GradualPruning
from lightning_compress.low_rank import LowRankReplacement
from tests.conftest import RecordSteps, trainer_kwargs

CONSTRUCTION = [
    ({"rank": 0}, ValueError, r"`rank=0` must be a positive int \(a fixed rank\) or a float in \(0, 1\]"),
    ({"rank": -3}, ValueError, r"`rank=-3` must be a positive int"),
    ({"rank": 1.5}, ValueError, r"`rank=1.5` must be a positive int"),
    ({"rank": 0.0}, ValueError, r"`rank=0.0` must be a positive int"),
    ({"rank": True}, TypeError, r"`rank=True` must be an int \(a fixed rank\) or a float in \(0, 1\]"),
    ({"rank": "4"}, TypeError, r"`rank='4'` must be an int"),
    ({"rank": (4, 4)}, TypeError, r"`rank=\(4, 4\)` must be an int"),
    ({"energy": 0.0}, ValueError, r"`energy=0.0` must be in \(0, 1\]"),
    ({"energy": 1.01}, ValueError, r"`energy=1.01` must be in \(0, 1\]"),
    ({"energy": "0.9"}, ValueError, r"`energy='0.9'` must be in \(0, 1\]"),
    ({"budget": 0.0}, ValueError, r"`budget=0.0` must be in \(0, 1\)"),
    ({"budget": 1.0}, ValueError, r"`budget=1.0` must be in \(0, 1\)"),
    (
        {"rank": 4, "layer_ranks": {"net.8": 0}},
        ValueError,
        r"`layer_ranks\['net.8'\]=0` must be a positive int",
    ),
    ({"rank": 4, "energy": 0.9}, ValueError, r"Give exactly one of .*; got `rank`, `energy`"),
    (
        {"budget": 0.5, "budget_on": "flops"},
        ValueError,
        r"Unknown `budget_on='flops'`. Use 'params' or 'macs'",
    ),
    ({"rank": 4, "budget_on": "macs"}, ValueError, r"`budget_on='macs'` only applies with `budget`"),
    ({"budget": 0.5, "allocation": "greedy"}, ValueError, r"Unknown `allocation='greedy'`"),
    ({"rank": 4, "allocation": "uniform"}, ValueError, r"`allocation='uniform'` only applies with `budget`"),
    ({"rank": 4, "method": "pca"}, ValueError, r"Unknown `method='pca'`. Use one of 'auto', 'svd'"),
    ({"rank": 4, "conv": "cp"}, ValueError, r"Unknown `conv='cp'`. Use 'tucker'"),
    ({"rank": 4, "modules": [3]}, TypeError, r"`modules` got 3, which is neither a module name pattern"),
    ({"rank": 4, "modules": ""}, ValueError, r"`modules` contains an empty pattern"),
    (
        {"rank": 4, "modules": "re:("},
        ValueError,
        r"`modules` pattern 're:\(' is not a valid regular expression",
    ),
    ({"rank": 4, "exclude": [3]}, TypeError, r"`exclude` got 3"),
    ({"rank": 4, "min_params": -1}, ValueError, r"`min_params=-1` must be a non-negative integer"),
    (
        {"rank": 4, "calibration_batches": 0},
        ValueError,
        r"`calibration_batches=0` must be a positive integer",
    ),
    (
        {"rank": 4, "calibration_batches": 2.5},
        ValueError,
        r"`calibration_batches=2.5` must be a positive integer",
    ),
    ({"rank": 4, "calibration_input": "x"}, TypeError, r"`calibration_input='x'` must be a function"),
    (
        {"rank": 4, "calibration_mask": "attention_mask"},
        TypeError,
        r"`calibration_mask='attention_mask'` must be a function from the model input",
    ),
    ({"rank": 4, "damping": -0.1}, ValueError, r"`damping=-0.1` must be a non-negative number"),
    (
        {"rank": 4, "activation_exponent": float("nan")},
        ValueError,
        r"`activation_exponent=nan` must be a non-negative number",
    ),
    ({"rank": 4, "per_layer": "yes"}, TypeError, r"`per_layer='yes'` must be True or False"),
    # The deprecated names of `activation_exponent` and `per_layer` are checked under their own names.
    ({"rank": 4, "alpha": float("nan")}, ValueError, r"`alpha=nan` must be a non-negative number"),
    ({"rank": 4, "log_per_layer": "yes"}, TypeError, r"`log_per_layer='yes'` must be True or False"),
    (
        {"rank": 4, "alpha": 0.3, "activation_exponent": 0.7},
        ValueError,
        r"got both `alpha=0.3` and `activation_exponent=0.7`: give only `activation_exponent`",
    ),
    ({"rank": 4, "verbose": None}, TypeError, r"`verbose=None` must be True or False"),
    ({"rank": 4, "start": 1.5}, ValueError, r"`start=1.5` is outside \[0, 1\]"),
    ({"rank": 4, "start": "halfway"}, ValueError, r"`start='halfway'`"),
    ({"rank": 4, "start": True}, TypeError, r"`start=True`"),
]


@pytest.mark.parametrize(("kwargs", "error", "match"), CONSTRUCTION)
def test_bad_arguments_fail_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        LowRankReplacement(**kwargs)


class HeadOnlyOptimizer(ImageClassifier):
    def configure_optimizers(self):
        return torch.optim.SGD(self.net[10].parameters(), lr=0.1)


SETUP = [
    (
        {},
        ValueError,
        r"Give exactly one of `rank` \(e.g. 32 or 0.25\), `energy` \(e.g. 0.9\) or `budget` \(e.g. 0.5\); got none",
    ),
    ({"layer_ranks": {"net.9": 4}}, ValueError, r"`layer_ranks` names 'net.9'"),
    (
        {"rank": 65, "modules": nn.Linear},
        ValueError,
        r"`rank=65` is too large for layer 'net.8': rank=65 is larger",
    ),
    ({"rank": 4, "modules": "head"}, ValueError, r"`modules`: no module named 'head' in ImageClassifier"),
    ({"rank": 4, "exclude": "head"}, ValueError, r"`exclude`: no module named 'head' in ImageClassifier"),
    (
        {"rank": 4, "min_params": 10**6},
        ValueError,
        r"The selection \(.*min_params=1000000\) matches no module",
    ),
    (
        {"rank": 4, "modules": nn.BatchNorm2d},
        ValueError,
        r"None of the layers selected by .* can be factorized: net.1: BatchNorm2d is not an nn.Linear or nn.Conv2d",
    ),
    (
        {"budget": 0.01},
        ValueError,
        r"`budget=0.01` is below the cheapest factorization of the selected layers",
    ),
    (
        {"rank": 4, "example_input": torch.zeros(1, 3, 8, 8)},
        ValueError,
        r"the model cannot be called on `example_input`: RuntimeError",
    ),
    (
        {"rank": 4, "calibration_input": lambda batch: batch[1]},
        ValueError,
        r"calibrate, and calling it on one failed .* Check that `calibration_input` returns what the model",
    ),
    (
        {"rank": 4, "start": "step:2", "calibration_input": lambda batch: batch[1]},
        ValueError,
        r"Check that `calibration_input` returns what the model's forward takes",
    ),
    (
        {"rank": 4, "calibration_mask": lambda x: torch.ones(len(x), 5)},
        ValueError,
        r"`calibration_mask` gave a mask of shape \(1, 5\) \(batch, positions\) for one sample, and no calibrated "
        r"layer's input holds those positions",
    ),
    (
        {"rank": 4, "start": "step:5"},
        ValueError,
        r"`start='step:5'` is step 5, but this fit ends after 5 steps",
    ),
    ({"rank": 4, "start": 1.0}, ValueError, r"`start=1.0` is step 5, but this fit ends after 5 steps"),
    (
        {"rank": 4, "start": 0.5, "callbacks": [GradualPruning(amount=0.5)]},
        ValueError,
        r"GradualPruning set up on the layers as they were and would keep using the old ones",
    ),
    (
        {"rank": 4, "modules": nn.Linear, "start": "step:2", "model": HeadOnlyOptimizer},
        ValueError,
        r"no optimizer holds the trainable parameters of 'net.8'",
    ),
]


@pytest.mark.parametrize(("kwargs", "error", "match"), SETUP)
def test_bad_arguments_for_this_model_fail_at_setup_before_any_step(tmp_path, digits, kwargs, error, match):
    kwargs = dict(kwargs)
    extra, model = kwargs.pop("callbacks", []), kwargs.pop("model", ImageClassifier)("small_cnn")
    steps = RecordSteps()
    lowrank = LowRankReplacement(**kwargs, verbose=False)  # constructing it is fine
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=5), callbacks=[lowrank, *extra, steps])
    with pytest.raises(error, match=match):
        trainer.fit(model, datamodule=digits)
    assert steps.steps == []


def test_every_public_argument_is_in_a_table():
    arguments = set(inspect.signature(LowRankReplacement).parameters)
    covered = {name for kwargs, _, _ in CONSTRUCTION + SETUP for name in kwargs} - {"callbacks", "model"}
    assert arguments <= covered, sorted(arguments - covered)


@pytest.mark.parametrize(
    ("old", "new", "value", "attribute"),
    [
        ("alpha", "activation_exponent", 0.25, "activation_exponent"),
        ("log_per_layer", "per_layer", False, "per_layer"),
    ],
)
def test_deprecated_argument_names_still_work_and_warn(old, new, value, attribute):
    with pytest.warns(
        DeprecationWarning, match=rf"`LowRankReplacement\({old}=...\)` is deprecated: use `{new}=...`"
    ):
        lowrank = LowRankReplacement(rank=4, **{old: value})
    assert getattr(lowrank, attribute) == value
    assert (
        getattr(LowRankReplacement(rank=4), attribute) != value
    )  # the default differs: the value came through
