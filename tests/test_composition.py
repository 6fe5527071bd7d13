"""Several compression callbacks in one fit, with default arguments: order of effects, supported and refused pairs."""

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging, StochasticWeightAveraging
from torch import nn

from lightning_compress import (
    BinaryWeights,
    CompressionMonitor,
    GradualPruning,
    KnowledgeDistillation,
    LowRankReplacement,
    QuantizationAwareTraining,
    StochasticDepth,
    WeightSharing,
)
from lightning_compress.callback import compression_callbacks
from lightning_compress.distillation import FeatureLoss
from lightning_compress.quantization import load_qat_checkpoint
from lightning_compress.quantization.pt2e import convert_int8, prepare_int8_qat
from lightning_compress.stats import count_macs
from tests.conftest import RecordSteps, ResidualNet, trainer_kwargs

EFFECT_ORDER = [
    "StochasticDepth",
    "LowRankReplacement",
    "GradualPruning",
    "KnowledgeDistillation",
    "QuantizationAwareTraining",
]


def _fit(tmp_path, digits, callbacks, model=None, **overrides):
    model = model or ResidualNet()
    kwargs = dict(max_steps=2, limit_val_batches=1, callbacks=callbacks)
    kwargs.update(overrides)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, **kwargs))
    trainer.fit(model, digits)
    return model, trainer


def _names(trainer):
    """The compression callbacks in the order they take effect (the user's list is left as given)."""
    return [type(c).__name__ for c in compression_callbacks(trainer) if type(c).__name__ in EFFECT_ORDER]


def _int8_zero_fraction(model):
    weights = [p for p in model.parameters() if p.dtype == torch.int8 and p.dim() > 1]
    assert weights, "no int8 weights: the model was not converted"
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


# -- names recorded by one callback resolve after QuantizationAwareTraining's graph took over the layers -------


@pytest.mark.parametrize("qat_first", [False, True])
def test_default_qat_with_low_rank_in_either_order(tmp_path, digits, qat_first):
    lowrank, qat = LowRankReplacement(rank=0.5, verbose=False), QuantizationAwareTraining()
    model, trainer = _fit(tmp_path, digits, [qat, lowrank] if qat_first else [lowrank, qat])
    assert _names(trainer) == ["LowRankReplacement", "QuantizationAwareTraining"]
    assert len(lowrank.layers) == 7  # the stem, four block convs, the projection shortcut and the head
    assert qat.converted and model.net.converted
    assert qat.parity["argmax_agreement"] >= 0.9


def test_default_qat_with_pruning_does_not_depend_on_list_order(tmp_path, digits):
    results = []
    for qat_first in (False, True):
        pl.seed_everything(0)
        pruning, qat = GradualPruning(amount=0.5), QuantizationAwareTraining()
        model, trainer = _fit(tmp_path, digits, [qat, pruning] if qat_first else [pruning, qat])
        assert _names(trainer) == ["GradualPruning", "QuantizationAwareTraining"]
        assert pruning.current_amount == 0.5
        # Symmetric int8 keeps pruned weights at exactly zero.
        assert _int8_zero_fraction(model) >= 0.5
        results.append({k: v.clone() for k, v in model.state_dict().items()})
    assert results[0].keys() == results[1].keys()
    for key in results[0]:
        assert torch.equal(results[0][key], results[1][key]), key


# -- refused pairs: raised at setup, before the first step, naming both callbacks and the fix ----------------

REFUSED = [
    pytest.param(
        lambda: [
            KnowledgeDistillation(teacher="self", features=[FeatureLoss("net.3")]),
            QuantizationAwareTraining(),
        ],
        ["KnowledgeDistillation", "QuantizationAwareTraining", "net.3", "Distill the logits only", "module="],
        id="feature-distillation+int8-qat",
    ),
    pytest.param(
        lambda: [
            QuantizationAwareTraining(module="net"),
            KnowledgeDistillation(teacher="self", features=[FeatureLoss("net.4.conv2")]),
        ],
        ["KnowledgeDistillation", "QuantizationAwareTraining", "net.4.conv2", "module='net'"],
        id="int8-qat-of-net+feature-distillation-inside-it",
    ),
    pytest.param(
        lambda: [LowRankReplacement(rank=0.5, start=0.5), GradualPruning(amount=0.5)],
        ["LowRankReplacement", "GradualPruning", "start=None"],
        id="low-rank-during-training+pruning",
    ),
    pytest.param(
        lambda: [WeightSharing(), QuantizationAwareTraining()],
        ["WeightSharing", "QuantizationAwareTraining", "Use one of"],
        id="weight-sharing+int8-qat",
    ),
    pytest.param(
        lambda: [BinaryWeights(), QuantizationAwareTraining()],
        ["BinaryWeights", "QuantizationAwareTraining", "Use one of"],
        id="binary+int8-qat",
    ),
    pytest.param(
        # The drop hooks rewrite the blocks' outputs: inside the exported graph they would never run.
        lambda: [StochasticDepth(verbose=False), QuantizationAwareTraining()],
        ["StochasticDepth", "QuantizationAwareTraining", "net.3", "Only remove blocks (`survival=1.0`"],
        id="depth-drop+int8-qat",
    ),
    pytest.param(
        lambda: [GradualPruning(amount=0.5), StochasticWeightAveraging(swa_lrs=0.01)],
        ["GradualPruning and StochasticWeightAveraging cannot share a fit", "undoes"],
        id="pruning+swa",
    ),
    pytest.param(
        lambda: [LowRankReplacement(rank=0.5, verbose=False), EMAWeightAveraging()],
        [
            "LowRankReplacement and EMAWeightAveraging cannot share a fit",
            "average the weights in a fit of its own",
        ],
        id="low-rank+ema",
    ),
    pytest.param(
        lambda: [GradualPruning(amount=0.5), BinaryWeights()],
        ["GradualPruning", "BinaryWeights", "Use one of them"],
        id="pruning+binary",
    ),
]


@pytest.mark.parametrize("reverse", [False, True], ids=["listed", "reversed"])
@pytest.mark.parametrize(("make", "words"), REFUSED)
def test_refused_pair_fails_at_setup_naming_both_and_the_fix(tmp_path, digits, make, words, reverse):
    callbacks = make()
    if reverse:
        callbacks.reverse()
    steps = RecordSteps()
    with pytest.raises(ValueError) as raised:
        _fit(tmp_path, digits, [*callbacks, steps])
    assert steps.steps == []
    for word in words:
        assert word in str(raised.value)


# -- supported pairs with default arguments -----------------------------------------------------------------


def _check(callback, model, trainer):
    """What each callback must have done by the end of a short fit."""
    name = type(callback).__name__
    if name == "GradualPruning":
        assert callback.current_amount == pytest.approx(callback.amount)
        assert callback.materialized
    elif name == "QuantizationAwareTraining":
        assert callback.converted
        assert callback.parity["argmax_agreement"] >= 0.8
    elif name == "LowRankReplacement":
        assert len(callback.layers) >= 1
    elif name == "KnowledgeDistillation":
        assert "distillation/loss" in trainer.callback_metrics or any(
            k.startswith("distillation/") for k in trainer.callback_metrics
        )
    elif name == "WeightSharing":
        assert callback.codebooks
    elif name == "BinaryWeights":
        assert callback.finalized
    elif name == "StochasticDepth":
        assert callback.removed == ["net.3"] and callback.plan.macs_ratio > 1.0
    elif name == "CompressionMonitor":
        assert callback.before is not None


SUPPORTED = {
    "unstructured+int8": lambda: [GradualPruning(amount=0.5), QuantizationAwareTraining()],
    "structured+int8": lambda: [GradualPruning(amount=0.5, mode="structured"), QuantizationAwareTraining()],
    # The stem has one input channel: nothing to group 2:4 there.
    "2:4+int8": lambda: [GradualPruning(mode="2:4", exclude="net.0"), QuantizationAwareTraining()],
    "structured+low-rank": lambda: [
        GradualPruning(amount=0.5, mode="structured"),
        LowRankReplacement(rank=0.5, verbose=False),
    ],
    "unstructured+low-rank": lambda: [
        GradualPruning(amount=0.5),
        LowRankReplacement(rank=0.5, verbose=False),
    ],
    "low-bit+low-rank": lambda: [
        QuantizationAwareTraining(scheme="intx-weight-only"),
        LowRankReplacement(rank=0.5, verbose=False),
    ],
    "int8+distillation-logits": lambda: [QuantizationAwareTraining(), KnowledgeDistillation(teacher="self")],
    "structured+distillation-features": lambda: [
        KnowledgeDistillation(teacher="self", features=[FeatureLoss("net.3")]),
        GradualPruning(amount=0.5, mode="structured"),
    ],
    "low-rank+distillation-features": lambda: [
        KnowledgeDistillation(teacher="self", features=[FeatureLoss("net.3")]),
        LowRankReplacement(rank=0.5, verbose=False),
    ],
    "unstructured+weight-sharing": lambda: [WeightSharing(), GradualPruning(amount=0.5)],
    "low-rank+weight-sharing": lambda: [WeightSharing(), LowRankReplacement(rank=0.5, verbose=False)],
    "int8+monitor": lambda: [CompressionMonitor(), QuantizationAwareTraining()],
    "low-rank+binary": lambda: [BinaryWeights(), LowRankReplacement(rank=0.5, verbose=False)],
    "depth-removal+int8": lambda: [
        QuantizationAwareTraining(),
        StochasticDepth(survival=1.0, remove=1, verbose=False),
    ],
}


@pytest.mark.parametrize("pair", list(SUPPORTED))
def test_supported_pair_with_default_arguments(tmp_path, digits, pair):
    callbacks = SUPPORTED[pair]()
    # Listed against the order of effects: the library puts them in order.
    model, trainer = _fit(tmp_path, digits, list(reversed(callbacks)))
    assert trainer.global_step == 2
    ordered = _names(trainer)
    assert ordered == sorted(ordered, key=EFFECT_ORDER.index)
    for callback in callbacks:
        _check(callback, model, trainer)


# -- the graph stays finite when a channel is pruned together with its batch norm ---------------------------


def test_prepared_graph_is_exact_for_a_channel_pruned_with_its_batch_norm():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3)
    )
    prepared = prepare_int8_qat(model, (torch.randn(2, 1, 8, 8),))
    with torch.no_grad():  # what structured pruning's masks do to channel 1
        model[0].weight[1] = 0
        model[1].weight[1] = 0
        model[1].bias[1] = 0
    x = torch.randn(16, 1, 8, 8)
    for _ in range(3):
        out = prepared(x)
    assert torch.isfinite(out).all()  # 0 / 0 in the folded batch norm would be NaN
    prepared.eval()
    reference = prepared(x)
    converted = convert_int8(prepared)
    assert (converted(x).argmax(1) == reference.argmax(1)).float().mean() == 1.0
    assert (converted(x) - reference).abs().max() < 0.05


# -- the main pipeline: low-rank, structured pruning, int8 QAT and self-distillation in one fit ---------------


def test_all_four_in_one_fit_give_a_smaller_int8_model_that_stays_accurate(tmp_path):
    from examples.data import DigitsDataModule

    data = DigitsDataModule(batch_size=64, shuffle=True)
    model = ResidualNet(width=16)
    pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=6)).fit(model, data)
    dense_params = sum(p.numel() for p in model.parameters())
    dense_macs = count_macs(model, torch.zeros(1, 1, 8, 8))

    callbacks = [
        QuantizationAwareTraining(),
        KnowledgeDistillation(teacher="self"),
        GradualPruning(amount=0.5, mode="structured"),
        LowRankReplacement(rank=0.5, verbose=False),
    ]
    qat, _, pruning, lowrank = callbacks
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=6, callbacks=callbacks))
    trainer.fit(model, data)
    assert _names(trainer) == EFFECT_ORDER[1:]  # all but StochasticDepth
    accuracy = trainer.validate(model, data, verbose=False)[0]["val_acc"]

    assert qat.converted and model.net.converted
    assert qat.parity["argmax_agreement"] >= 0.9  # 0.965 measured
    assert pruning.materialized and pruning.materialize_max_abs_diff < 1e-4
    float_net = qat._stashed["net"]
    assert sum(p.numel() for p in float_net.parameters()) < 0.5 * dense_params
    assert count_macs(float_net, torch.zeros(1, 1, 8, 8)) < 0.5 * dense_macs
    int8 = sum(p.numel() for p in model.parameters() if p.dtype == torch.int8)
    assert int8 >= 0.9 * sum(p.numel() for p in float_net.parameters() if p.dim() > 1)
    assert len(lowrank.layers) >= 1
    # Measured 0.762 / 0.885 / 0.862 with seeds 0 / 1 / 2 (6 epochs on digits); 0.993 for the dense model, 0.1
    # for chance. The bound catches a broken pipeline, not the seed-to-seed spread.
    assert accuracy >= 0.7

    # The post-fit checkpoint loads into a fresh model without a Trainer: the factorized layers, the removed
    # channels and the int8 graph are rebuilt in that order, and the model computes exactly what it did.
    trainer.save_checkpoint(tmp_path / "post_fit.ckpt")
    rebuilt = load_qat_checkpoint(ResidualNet(width=16), tmp_path / "post_fit.ckpt").eval()
    x = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))


def test_a_post_fit_checkpoint_of_block_removal_and_int8_loads_into_a_fresh_model(tmp_path, digits):
    from lightning_compress import load_pruned_checkpoint

    callbacks = [StochasticDepth(survival=1.0, remove=1, verbose=False), QuantizationAwareTraining()]
    model, trainer = _fit(tmp_path, digits, callbacks)
    trainer.save_checkpoint(tmp_path / "post_fit.ckpt")
    # The removed block first (from the checkpoint's hint), then the int8 graph of the shallower model.
    rebuilt = load_qat_checkpoint(ResidualNet(), tmp_path / "post_fit.ckpt").eval()
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model.eval()(x))
    # The pruning loader rebuilds removed blocks too (a checkpoint of block removal alone).
    depth = StochasticDepth(survival=1.0, remove=1, verbose=False)
    shallow, trainer = _fit(tmp_path / "depth", digits, [depth])
    trainer.save_checkpoint(tmp_path / "depth.ckpt")
    loaded = load_pruned_checkpoint(ResidualNet(), tmp_path / "depth.ckpt").eval()
    assert isinstance(loaded.net[3], nn.Identity) and depth.removed == ["net.3"]
    with torch.no_grad():
        assert torch.equal(loaded(x), shallow.eval()(x))


def test_a_subclass_of_a_compression_callback_keeps_its_place_in_the_order():
    from lightning_compress._lightning import _effect_order

    class MyPruning(GradualPruning):
        pass

    assert _effect_order(MyPruning(amount=0.5)) == _effect_order(GradualPruning(amount=0.5)) == 1
    assert _effect_order(pl.Callback()) is None


def test_the_four_scheme_pipeline_takes_the_same_decisions_on_every_ddp_rank(tmp_path):
    from tests._ddp import run_worker

    run_worker("_ddp_pipeline.py", tmp_path)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert rank0["world_size"] == rank1["world_size"] == 2
    assert rank0["converted"] and rank0["materialized"] and rank1["converted"] and rank1["materialized"]
    assert rank0["ranks"] and rank0["ranks"] == rank1["ranks"]
    assert rank0["kept"] == rank1["kept"]
    assert rank0["kept"]["4.bn1.weight"] < 16  # the second stage's channels were removed before conversion
    assert "4.conv2.first.weight" in rank0["kept"]  # and its layers factorized
    assert rank0["state"].keys() == rank1["state"].keys()
    for key, value in rank0["state"].items():
        assert torch.equal(value, rank1["state"][key]), key
    assert torch.equal(rank0["logits"], rank1["logits"])
