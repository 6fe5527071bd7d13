"""The depthwise-separable form of the low-rank package: the factorization, `low_rank_`, CompactConvReplacement."""

import csv
import itertools
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from examples.models import ImageClassifier
from lightning_compress import KnowledgeDistillation
from lightning_compress.low_rank import (
    CompactConvReplacement,
    DepthwiseSeparableConv2d,
    InputStatistics,
    LowRankConfig,
    LowRankLinear,
    LowRankReplacement,
    decompose,
    factorize,
    layer_features,
    low_rank_,
    restore_low_rank,
)
from lightning_compress.stats import count_macs
from tests.conftest import RecordSteps, SGDClassifier, fit_or_resume, trainer_kwargs


def _slice_errors(weight, r):
    """``‖W − Ŵ‖ / ‖W‖`` of the best rank-``r`` approximation of every input channel's ``out × k·k`` slice,
    from the singular values of the slices, computed here on their own."""
    sigma = torch.linalg.svdvals(weight.detach().double().flatten(2).transpose(0, 1))  # (in, min(out, k·k))
    return float((sigma[:, r:].square().sum() / sigma.square().sum()).sqrt())


def _correlated(n, generator, mix):
    """Images whose channels are mixed (a spectrum over two decades) and whose pixels are spatially smoothed."""
    z = nn.functional.avg_pool2d(torch.randn(n, mix.shape[0], 12, 12, generator=generator), 3, 1, 1)
    return torch.einsum("nchw,dc->ndhw", z, mix) + 0.3


# -- the factorization --------------------------------------------------------------------------------------

GEOMETRIES = {
    "stride2_odd": (dict(in_channels=6, out_channels=16, kernel_size=3, stride=2, padding=1), (2, 6, 11, 13)),
    "dilated_nobias": (
        dict(in_channels=4, out_channels=12, kernel_size=3, padding=2, dilation=2, bias=False),
        (2, 4, 9, 9),
    ),
    "rect_kernel": (
        dict(in_channels=3, out_channels=20, kernel_size=(3, 5), stride=(1, 2), padding=(1, 2)),
        (2, 3, 9, 11),
    ),
    "few_outputs_reflect": (
        dict(in_channels=5, out_channels=4, kernel_size=3, padding=1, padding_mode="reflect"),
        (2, 5, 7, 7),
    ),
    "same_5x5": (dict(in_channels=3, out_channels=8, kernel_size=5, padding="same"), (2, 3, 7, 9)),
}


@pytest.mark.parametrize("case", sorted(GEOMETRIES))
def test_full_depth_multiplier_reproduces_the_layer_and_keeps_its_geometry(case):
    kwargs, shape = GEOMETRIES[case]
    conv = nn.Conv2d(**kwargs)
    x = torch.randn(*shape)
    d = decompose(conv, conv="depthwise")
    taps = math.prod(conv.kernel_size)
    assert d.kind == "depthwise" and d.full_rank == min(conv.out_channels, taps)
    separable = d.build(d.full_rank)
    assert isinstance(separable, DepthwiseSeparableConv2d) and separable.rank == d.full_rank
    with torch.no_grad():
        assert (separable(x) - conv(x)).abs().max() < 1e-5
    assert d.errors(separable)[0] < 1e-6
    stats = InputStatistics()
    stats.update(layer_features(conv, x, "depthwise"))
    for method in (
        "whitened",
        "asvd",
    ):  # each channel's patches whitened or scaled first: still exact at full
        data_aware = decompose(conv, conv="depthwise", stats=stats, method=method)
        with torch.no_grad():
            assert (data_aware.build(d.full_rank)(x) - conv(x)).abs().max() < 1e-4, method
    for r in (1, 2):
        depthwise, pointwise = d.build(r)
        assert depthwise.groups == depthwise.in_channels == conv.in_channels
        assert depthwise.out_channels == pointwise.in_channels == r * conv.in_channels
        assert pointwise.out_channels == conv.out_channels and pointwise.kernel_size == (1, 1)
        for attribute in ("kernel_size", "stride", "padding", "dilation", "padding_mode"):
            assert getattr(depthwise, attribute) == getattr(conv, attribute), attribute
        assert depthwise.bias is None and (pointwise.bias is None) == (conv.bias is None)
        assert d.build(r)(x).shape == conv(x).shape


def test_error_falls_with_the_multiplier_and_is_the_best_per_slice():
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 16, 3, padding=1)
    d = decompose(conv, conv="depthwise")
    errors = [d.errors(d.build(r))[0] for r in range(1, 10)]
    assert all(a > b for a, b in itertools.pairwise(errors))
    assert errors[0] > 0.8 and errors[-1] < 1e-6  # measured: 0.85 at r=1 for this random layer
    for r, error in enumerate(errors, start=1):
        # Eckart-Young per slice: the error is the energy the slices' SVDs leave out, and the estimate says so.
        assert error == pytest.approx(_slice_errors(conv.weight, r), rel=1e-6, abs=1e-6)  # float32 factors
        assert d.relative_error_estimate(r) == pytest.approx(error**2, rel=1e-5, abs=1e-12)
    # The factors are those of the task: unit-norm depthwise filters, 1x1 weights U·S.
    depthwise, pointwise = d.build(2)
    norms = depthwise.weight.flatten(1).norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-6)
    col = pointwise.weight[:, :, 0, 0].norm(dim=0).reshape(6, 2)  # ‖U_i S_i[:, j]‖ = σ_ij
    sigma = torch.linalg.svdvals(conv.weight.detach().flatten(2).transpose(0, 1))[:, :2]
    assert torch.allclose(col, sigma, atol=1e-5)


def test_parameters_and_macs_of_the_replacement():
    conv = nn.Conv2d(8, 24, 3, stride=2, padding=1)
    x = torch.zeros(1, 8, 9, 9)
    d = decompose(conv, conv="depthwise")
    positions = (81, 25)
    for r in (1, 3, 6):
        module = d.build(r)
        expected = 8 * r * 9 + 8 * r * 24 + 24
        assert sum(p.numel() for p in module.parameters()) == d.params(r) == expected
        assert count_macs(module, x) == d.macs(positions, r) == 25 * 8 * r * (9 + 24)
    assert d.params() == 24 * 8 * 9 + 24 and count_macs(conv, x) == d.macs(positions)
    # Saving parameters needs r·(k·k + out) < out·k·k: r ≤ 6 here (6·33 = 198 < 216 < 7·33).
    model = nn.Sequential(conv, nn.Conv2d(24, 24, 1), nn.Conv2d(24, 24, 3, groups=24), nn.Conv2d(24, 48, 3))
    result = low_rank_(
        model, LowRankConfig(conv="depthwise", rank=7), example_input=torch.zeros(1, 8, 13, 13)
    )
    assert result.layers == {"3": {"kind": "depthwise", "rank": 7, "in_channels": 24}}
    assert result.skipped["0"].startswith("rank 7 would keep 1,872 parameters")
    assert result.skipped["1"].startswith("1x1 convolution: `conv='depthwise'`")
    assert result.skipped["2"].startswith("grouped convolution (groups=24)")
    assert type(model[0]) is nn.Conv2d and isinstance(model[3], DepthwiseSeparableConv2d)
    # Above min(out, k·k) filters per channel the replacement is never smaller: left as is, with the reason.
    model = nn.Sequential(nn.Conv2d(24, 48, 3), nn.Conv2d(48, 4, 3))
    with pytest.warns(UserWarning, match=r"replaced no layer: at `rank=10` none of the 2 selected layers"):
        result = low_rank_(
            model, LowRankConfig(conv="depthwise", rank=10), example_input=torch.zeros(1, 24, 9, 9)
        )
    assert result.skipped["0"].startswith("depth multiplier 10 is above 9 = min(out, k·k)")
    assert result.skipped["1"].startswith("depth multiplier 10 is above 4 = min(out, k·k)")


def test_low_rank_verb_gives_the_depthwise_form_without_a_trainer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3), nn.Flatten())
    model.append(nn.Linear(32 * 4 * 4, 10))
    dense = [model[0], model[2]]
    reference = [factorize(layer, 2, conv="depthwise") for layer in dense]
    config = LowRankConfig(conv="depthwise", rank=2, layer_ranks={"2": 3}, modules=nn.Conv2d)
    result = low_rank_(model, config, example_input=torch.zeros(1, 3, 6, 6))
    assert result.method == "svd" and type(model[4]) is nn.Linear
    assert [model[0].rank, model[2].rank] == [2, 3]
    assert torch.equal(model[0].depthwise.weight, reference[0].depthwise.weight)
    assert torch.equal(model[0].pointwise.weight, reference[0].pointwise.weight)
    for record, layer in zip(result.records, dense, strict=True):
        assert record["kind"] == "depthwise" and record["output_error"] is None
        assert record["weight_error"] == pytest.approx(_slice_errors(layer.weight, record["rank"]), rel=1e-6)
    x = torch.randn(2, 3, 6, 6)
    assert model(x).shape == (2, 10)
    # A state dict of the result rebuilds the structure in a fresh model.
    fresh = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3), nn.Flatten())
    fresh.append(nn.Linear(32 * 4 * 4, 10))
    assert restore_low_rank(fresh, model.state_dict()) == ["0", "2"]
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh(x), model(x)) and fresh[2].rank == 3


def test_refinement_lowers_the_output_error_on_held_out_inputs():
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(6, 6, generator=g) * torch.logspace(0, -2, 6)
    calibration, held_out = _correlated(32, g, mix), _correlated(32, g, mix)
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 16, 3, padding=1)
    stats = InputStatistics()
    stats.update(layer_features(conv, calibration, "depthwise"))
    errors, reported = {}, {}
    with torch.no_grad():
        reference = conv(held_out) - conv.bias[:, None, None]
        whitened = decompose(conv, conv="depthwise", stats=stats, method="whitened").build(2)
        errors["whitened"] = float((whitened(held_out) - conv(held_out)).norm() / reference.norm())
        for refine in (False, True):
            d = decompose(conv, conv="depthwise", stats=stats, refine=refine)
            separable = d.build(2)
            errors[refine] = float((separable(held_out) - conv(held_out)).norm() / reference.norm())
            reported[refine] = d.errors(separable)[1]
            # The reported output error is the one measured on the calibration inputs.
            y, y_ref = separable(calibration), conv(calibration)
            measured = float((y - y_ref).norm() / (y_ref - conv.bias[:, None, None]).norm())
            assert reported[refine] == pytest.approx(measured, rel=1e-4)
    # Measured on the held-out images: 0.67 from the SVD alone, 0.34 refitted (the depthwise filters the same),
    # 0.48 with each channel's patches whitened before its SVD (seeds 1-5: refitted at 0.35-0.47 of the SVD's).
    assert errors[True] < 0.6 * errors[False]
    assert errors[True] < errors["whitened"] < 0.8 * errors[False]
    assert reported[True] < 0.6 * reported[False]
    # At the full multiplier the refit keeps the layer exact.
    full = decompose(conv, conv="depthwise", stats=stats, refine=True)
    with torch.no_grad():
        assert (full.build(9)(held_out) - conv(held_out)).abs().max() < 1e-4


def test_refinement_needs_calibration_and_the_depthwise_form():
    conv = nn.Conv2d(4, 8, 3)
    with pytest.raises(ValueError, match=r"`refine=True` needs the Gram matrix"):
        decompose(conv, conv="depthwise", refine=True)
    with pytest.raises(ValueError, match=r"`refine=True` refits the 1x1 weights of `conv='depthwise'`"):
        LowRankConfig(rank=2, refine=True)
    with pytest.raises(TypeError, match=r"`refine='yes'` must be True or False"):
        LowRankConfig(rank=2, conv="depthwise", refine="yes")
    model = nn.Sequential(conv)
    with pytest.raises(ValueError, match=r"`refine=True` fits the 1x1 weights .* on calibration batches"):
        low_rank_(
            model, LowRankConfig(rank=2, conv="depthwise", refine=True), example_input=torch.zeros(1, 4, 6, 6)
        )


# -- the callback -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"depth_multiplier": 0}, ValueError, r"`depth_multiplier=0` must be a positive integer"),
        ({"depth_multiplier": 1.5}, TypeError, r"`depth_multiplier=1.5` must be a positive integer"),
        ({"depth_multiplier": "2"}, TypeError, r"`depth_multiplier='2'` must be a positive integer"),
        ({"depth_multiplier": True}, TypeError, r"`depth_multiplier=True` must be a positive integer"),
        ({"refine": 1}, TypeError, r"`refine=1` must be True or False"),
        ({"modules": nn.Linear}, ValueError, r"`modules` selects Linear layers, but CompactConvReplacement"),
        ({"method": "pca"}, ValueError, r"Unknown `method='pca'`"),
        ({"layer_ranks": {"net.3": 0}}, ValueError, r"`layer_ranks\['net.3'\]=0` must be a positive int"),
        ({"calibration_batches": 0}, ValueError, r"`calibration_batches=0` must be a positive integer"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        CompactConvReplacement(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"modules": "net.8"}, ValueError, r"`modules` names 'net.8', which .* Linear is not an nn.Conv2d"),
        ({"modules": ["net.3", "net.1"]}, ValueError, r"names 'net.1', .*: BatchNorm2d is not an nn.Conv2d"),
        (
            {"modules": "net.8*"},
            ValueError,
            r"The selection \(modules=\[Conv2d, 'net.8\*'\], .* matches no module",
        ),
        ({"modules": "net.3", "exclude": "net.30"}, ValueError, r"`exclude`: no module named 'net.30'"),
    ],
)
def test_bad_arguments_for_this_model_fail_at_setup_before_any_step(tmp_path, digits, kwargs, error, match):
    steps = RecordSteps()
    compact = CompactConvReplacement(**kwargs, verbose=False)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=3), callbacks=[compact, steps])
    with pytest.raises(error, match=match):
        trainer.fit(ImageClassifier("small_cnn"), datamodule=digits)
    assert steps.steps == []


def test_refine_without_training_data_fails_at_setup(tmp_path):
    plain = CompactConvReplacement(verbose=False)  # the SVD needs no data: the example input counts the MACs
    model = ImageClassifier("small_cnn")
    plain.setup(pl.Trainer(**trainer_kwargs(tmp_path), callbacks=[plain]), model, "fit")
    assert isinstance(model.net[3], DepthwiseSeparableConv2d) and plain.method_used == "svd"
    refine = CompactConvReplacement(refine=True)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path), callbacks=[refine])
    with pytest.raises(ValueError, match=r"`refine=True` needs calibration batches from the training loader"):
        refine.setup(trainer, ImageClassifier("small_cnn"), "fit")


def test_fit_logs_and_records_errors_and_resumes_bit_exactly(tmp_path, digits):
    def compact():
        return CompactConvReplacement(
            depth_multiplier=2, refine=True, calibration_batches=2, layer_ranks={"net.3": 1}, verbose=False
        )

    def model():  # the same initial weights for every fit, and the same random state after
        pl.seed_everything(0, verbose=False)
        return SGDClassifier("small_cnn")

    settings = dict(max_epochs=2, limit_train_batches=3)
    full_cb, logger, full = compact(), CSVLogger(tmp_path, name="compact"), model()
    weights = {name: full.get_submodule(name).weight.detach().clone() for name in ("net.0", "net.3")}
    fit_or_resume(tmp_path / "full", digits, full, [full_cb], logger=logger, log_every_n_steps=1, **settings)
    assert isinstance(full.net[0], DepthwiseSeparableConv2d) and isinstance(
        full.net[3], DepthwiseSeparableConv2d
    )
    assert type(full.net[8]) is nn.Linear  # only convolutions
    assert full_cb.layers == {
        "net.0": {"kind": "depthwise", "rank": 2, "in_channels": 1},
        "net.3": {"kind": "depthwise", "rank": 1, "in_channels": 16},
    }
    records = {r["name"]: r for r in full_cb.records}
    # net.3 refitted at multiplier 1: a weight error at least the SVD's (its optimum), an output error below it.
    assert records["net.3"]["weight_error"] >= _slice_errors(weights["net.3"], 1) - 1e-6
    assert 0.0 < records["net.3"]["output_error"] < records["net.3"]["weight_error"]
    assert records["net.3"]["params_after"] == 16 * 1 * (9 + 32) + 32
    # net.0 has one input channel: min(16, 9) = 9 > 2 filters, a rank-2 cut of its single slice.
    assert records["net.0"]["weight_error"] >= _slice_errors(weights["net.0"], 2) - 1e-6
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("compact/per_layer/weight_error/net.3")]
    assert float(rows[0]["compact/per_layer/weight_error/net.3"]) == pytest.approx(
        records["net.3"]["weight_error"]
    )
    assert float(rows[0]["compact/per_layer/depth_multiplier/net.0"]) == 2.0
    assert float(rows[0]["compact/params_ratio"]) == pytest.approx(full_cb.totals["params_ratio"])
    assert full_cb.totals["params_ratio"] > 1.0

    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    fit_or_resume(tmp_path / "first", digits, model(), [compact()], checkpoint=checkpoint, **settings)
    steps, resumed_cb, resumed = RecordSteps(), compact(), model()
    path = tmp_path / "ckpt" / "epoch=0-step=3.ckpt"
    fit_or_resume(tmp_path / "second", digits, resumed, [resumed_cb, steps], ckpt_path=path, **settings)
    assert steps.steps == [3, 4, 5]
    state, resumed_state = full.state_dict(), resumed.state_dict()
    assert list(state) == list(resumed_state)
    for key, value in state.items():
        assert torch.equal(value, resumed_state[key]), key
    assert resumed_cb.state_dict() == full_cb.state_dict()

    # Plain torch: the checkpoint's weights load into a freshly built model.
    saved = torch.load(path, weights_only=True)["state_dict"]
    fresh = SGDClassifier("small_cnn")
    assert restore_low_rank(fresh, saved) == ["net.0", "net.3"]
    fresh.load_state_dict(saved)
    assert fresh.net[3].rank == 1 and fresh.net[0].rank == 2


def test_composes_with_self_distillation_and_low_rank_linear_layers(tmp_path, digits):
    model = ImageClassifier("small_cnn")
    kd = KnowledgeDistillation(teacher="self")
    compact = CompactConvReplacement(verbose=False)
    lowrank = LowRankReplacement(rank=4, modules=nn.Linear, verbose=False)
    losses = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(trainer.callback_metrics["distillation/loss"]))

    # The compression callbacks set up in effect order, whatever order they are listed in.
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=4), callbacks=[kd, lowrank, compact, Record()])
    trainer.fit(model, datamodule=digits)
    assert isinstance(model.net[3], DepthwiseSeparableConv2d) and isinstance(model.net[8], LowRankLinear)
    teacher = kd._teacher
    assert type(teacher.net[3]) is nn.Conv2d and type(teacher.net[8]) is nn.Linear  # the model before both
    assert set(compact.layers) == {"net.0", "net.3"} and set(lowrank.layers) == {"net.8", "net.10"}
    assert compact.state_key != lowrank.state_key
    # The student differs from its dense teacher, so the distillation loss is positive, and it falls.
    assert len(losses) == 4 and all(math.isfinite(v) and v > 0 for v in losses)
    assert losses[-1] < losses[0]
