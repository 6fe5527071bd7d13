import csv
import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from examples.models import ImageClassifier
from lightning_compress import GradualPruning
from lightning_compress.callback import compression_callbacks
from lightning_compress.low_rank import (
    InputStatistics,
    LowRankConfig,
    LowRankConv2d,
    LowRankLinear,
    LowRankReplacement,
    TuckerConv2d,
    allocate_budget,
    decompose,
    factorize,
    layer_features,
    low_rank_,
    rank_for_energy,
    restore_low_rank,
    skip_reason,
)
from lightning_compress.stats import count_macs
from tests._ddp import run_worker
from tests.conftest import (
    RecordSteps,
    SGDClassifier,
    StopAfterFirstEpoch,
    dict_batches,
    fit_or_resume,
    trainer_kwargs,
)

REPO = Path(__file__).resolve().parents[1]


def _correlated(rows, features, generator, decay=3.0, offset=0.5):
    """Inputs whose features are strongly correlated, with a spectrum spanning `decay` decades."""
    mix = torch.randn(features, features, generator=generator) * torch.logspace(0, -decay, features)
    return torch.randn(rows, features, generator=generator) @ mix.T + offset


def _stats(layer, x, kind, gram=True):
    stats = InputStatistics()
    stats.update(layer_features(layer, x, kind), gram=gram)
    return stats


def _relative(a, b, bias=None):
    reference = b if bias is None else b - bias
    return float((a - b).detach().norm() / reference.detach().norm())


# -- the functional core ------------------------------------------------------------------------------------


LAYERS = {
    "linear": (lambda: nn.Linear(24, 16), (40, 24)),
    "linear_nobias_3d": (lambda: nn.Linear(24, 16, bias=False), (4, 10, 24)),
    "tucker": (lambda: nn.Conv2d(6, 10, 3, stride=2, padding=1, dilation=1), (4, 6, 9, 9)),
    "tucker_dilated_nobias": (lambda: nn.Conv2d(6, 10, 3, padding=2, dilation=2, bias=False), (4, 6, 9, 9)),
    "channel": (lambda: nn.Conv2d(6, 10, (3, 5), stride=(1, 2), padding=(1, 2)), (4, 6, 9, 9)),
    "channel_1x1": (lambda: nn.Conv2d(6, 10, 1), (4, 6, 9, 9)),
}


@pytest.mark.parametrize("method", ["svd", "whitened", "asvd"])
@pytest.mark.parametrize("case", sorted(LAYERS))
def test_full_rank_reproduces_the_layer(case, method):
    make, shape = LAYERS[case]
    layer = make()
    x = torch.randn(*shape)
    conv = "channel" if case.startswith("channel") else "tucker"
    kind = "linear" if case.startswith("linear") else conv
    stats = _stats(layer, x, kind if tuple(getattr(layer, "kernel_size", (3,))) != (1, 1) else "channel")
    decomposition = decompose(layer, conv=conv, stats=None if method == "svd" else stats, method=method)
    replacement = decomposition.build(decomposition.full_rank)
    expected_type = {"linear": LowRankLinear, "tucker": TuckerConv2d, "channel": LowRankConv2d}
    assert isinstance(replacement, expected_type[decomposition.kind])
    assert torch.allclose(replacement(x), layer(x), atol=1e-5)
    weight_error, _ = decomposition.errors(replacement)
    assert weight_error < 1e-6


@pytest.mark.parametrize("case", ["linear", "channel"])
def test_reported_errors_equal_the_measured_ones_at_lower_rank(case):
    make, shape = LAYERS[case]
    layer = make()
    kind = "linear" if case == "linear" else "channel"
    x = torch.randn(*shape)
    stats = _stats(layer, x, kind)
    for method in ("svd", "whitened"):
        decomposition = decompose(layer, conv="channel", stats=stats, method=method)
        replacement = decomposition.build(4)
        weight_error, output_error = decomposition.errors(replacement)
        bias = layer.bias if layer.bias is None or case == "linear" else layer.bias[:, None, None]
        measured = _relative(replacement(x), layer(x), bias)
        assert output_error == pytest.approx(measured, rel=1e-4)
        assert 0.05 < output_error < 1.0
        delta = decomposition.layer.weight - replacement.dense_weight()
        assert weight_error == pytest.approx(float(delta.norm() / layer.weight.norm()), rel=1e-4)
    plain = decompose(layer, conv="channel")
    # Eckart-Young: the weight error of the truncated SVD is the energy left out.
    assert plain.errors(plain.build(4))[0] == pytest.approx(plain.relative_error_estimate(4) ** 0.5, rel=1e-5)


def test_whitened_factorization_has_lower_activation_error_than_plain_svd_on_correlated_inputs():
    g = torch.Generator().manual_seed(0)
    calibration, held_out = _correlated(4000, 64, g).split(2000)
    torch.manual_seed(0)
    layer = nn.Linear(64, 48)
    errors = {}
    for method in ("svd", "asvd", "whitened"):
        stats = _stats(layer, calibration, "linear", gram=method == "whitened")
        replacement = factorize(layer, 12, stats=None if method == "svd" else stats, method=method)
        errors[method] = _relative(replacement(held_out), layer(held_out), layer.bias)
    # Measured on held-out rows: svd 0.692, asvd 0.653, whitened 0.222 (rank 12 of 48).
    assert errors["whitened"] < 0.4 * errors["svd"]
    assert errors["whitened"] < 0.3 < 0.6 < errors["svd"]
    assert errors["asvd"] < errors["svd"]


def test_whitened_tucker_also_lowers_the_output_error():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, padding=1)
    x = torch.einsum(
        "nchw,dc->ndhw", torch.randn(16, 8, 10, 10), torch.randn(8, 8) * torch.logspace(0, -2, 8)
    )
    errors = {}
    for method in ("svd", "whitened"):
        stats = _stats(conv, x, "tucker")
        replacement = factorize(conv, (3, 6), stats=None if method == "svd" else stats, method=method)
        errors[method] = _relative(replacement(x), conv(x), conv.bias[:, None, None])
    assert errors["whitened"] < 0.6 * errors["svd"]


def test_analytic_params_and_macs_match_the_built_modules():
    for case in ("linear_nobias_3d", "tucker", "channel", "channel_1x1"):
        make, shape = LAYERS[case]
        layer = make()
        x = torch.randn(1, *shape[1:])
        conv = "channel" if case.startswith("channel") else "tucker"
        decomposition = decompose(layer, conv=conv)
        rank = (2, 5) if decomposition.kind == "tucker" else 3
        replacement = decomposition.build(rank)
        y = layer(x)
        positions = (
            (x.numel() // 24, x.numel() // 24)
            if case.startswith("linear")
            else (x.shape[-2] * x.shape[-1], y.shape[-2] * y.shape[-1])
        )
        assert decomposition.params(rank) == sum(p.numel() for p in replacement.parameters())
        assert decomposition.params() == sum(p.numel() for p in layer.parameters())
        assert decomposition.macs(positions, rank) == count_macs(replacement, x)
        assert decomposition.macs(positions) == count_macs(layer, x)


def test_rank_rules_by_hand():
    # Energies 9, 4, 1, 1 of 15: 60%, 86.7%, 93.3%, 100%.
    s = torch.tensor([3.0, 2.0, 1.0, 1.0])
    assert [rank_for_energy(s, e) for e in (0.5, 0.6, 0.61, 0.9, 0.95, 1.0)] == [1, 1, 2, 3, 4, 4]
    layer = nn.Linear(10, 4)
    with torch.no_grad():
        layer.weight.copy_(torch.diag(s) @ torch.eye(4, 10))
    d = decompose(layer)
    assert d.rank_for_energy(0.9) == 3 and d.rank_for_fraction(0.5) == 2 and d.rank_for_fraction(0.3) == 2
    assert d.relative_error_estimate(2) == pytest.approx(2 / 15)
    tucker = decompose(nn.Conv2d(4, 8, 3))
    assert tucker.rank_for_fraction(0.25) == (1, 2)
    assert tucker.chain()[:3] == [(1, 1), (1, 2), (2, 3)] and tucker.chain()[-1] == (4, 8)
    assert tucker.clamp_rank(6) == (4, 6)
    with pytest.raises(ValueError, match="larger than both channel counts"):
        tucker.clamp_rank(9)


def test_budget_allocation_by_hand():
    # a: 10 per rank, energy left out 0.4 -> 0.1 -> 0.05, dense 40; b: 30 per rank, 0.5 -> 0, dense 100.
    options = {"a": [(10, 0.4), (20, 0.1), (30, 0.05)], "b": [(30, 0.5), (60, 0.0)]}
    dense = {"a": 40, "b": 100}
    # Target 0.5 * 140 = 70, 40 spent at rank 1. Best gain per cost: a's step (0.3/10) -> 50; then b's
    # (0.5/30) would reach 80 and is dropped; a climbs (0.05/10) -> 60, then goes dense (0.05/10) -> 70.
    assert allocate_budget(options, dense, 0.5) == {"a": None, "b": 0}
    # Target 84: a's step -> 50, b's step -> 80, a's next step (90) no longer fits.
    assert allocate_budget(options, dense, 0.6) == {"a": 1, "b": 1}
    with pytest.raises(ValueError, match="below the cheapest factorization"):
        allocate_budget(options, dense, 0.25)


def test_grouped_convolutions_and_linear_subclasses_are_skipped_with_a_reason():
    assert "grouped convolution (groups=4)" in skip_reason(nn.Conv2d(8, 8, 3, groups=4))
    attention = nn.MultiheadAttention(16, 2)
    assert "subclasses nn.Linear" in skip_reason(attention.out_proj)
    assert "not an nn.Linear or nn.Conv2d" in skip_reason(nn.Conv1d(4, 4, 3))
    with pytest.raises(ValueError, match="grouped convolution"):
        decompose(nn.Conv2d(8, 8, 3, groups=8))
    with pytest.raises(ValueError, match="needs statistics of the layer's inputs"):
        decompose(nn.Linear(4, 4), method="whitened")


def test_restore_rebuilds_every_form_from_a_state_dict():
    torch.manual_seed(0)

    def net():
        return nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1),
            nn.Conv2d(8, 8, 3, padding=1, bias=False),
            nn.Flatten(),
            nn.Linear(8 * 4 * 4, 10),
        )

    trained = net()
    trained[0] = factorize(trained[0], (2, 4))
    trained[1] = factorize(trained[1], 3, conv="channel")
    trained[3] = factorize(trained[3], 5)
    fresh = net()
    assert restore_low_rank(fresh, trained.state_dict()) == ["0", "1", "3"]
    fresh.load_state_dict(trained.state_dict())
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(fresh(x), trained(x))
    # A factorization of another rank is rebuilt too; one of the same rank is kept.
    other = net()
    other[3] = factorize(other[3], 7)
    kept = other[0] = factorize(other[0], (2, 4))
    assert restore_low_rank(other, trained.state_dict()) == ["1", "3"] and other[0] is kept


def test_low_rank_verb_replaces_layers_of_a_plain_module_without_a_trainer():
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10))
    dense = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10))
    dense.load_state_dict(model.state_dict())
    batches = [
        (_correlated(32, 64, g), torch.zeros(32)) for _ in range(4)
    ]  # (input, target): the input is used
    result = low_rank_(model, LowRankConfig(rank=12, modules="0"), calibration=batches)
    assert isinstance(model[0], LowRankLinear) and model[0].rank == 12 and type(model[2]) is nn.Linear
    assert result.method == "whitened" and result.layers == {"0": {"kind": "linear", "rank": 12}}
    assert (result.params_before, result.params_after) == (64 * 48 + 48 + 490, 12 * (64 + 48) + 48 + 490)
    assert (result.macs_before, result.macs_after) == (64 * 48 + 480, 12 * (64 + 48) + 480)  # one sample
    assert result.totals()["params_ratio"] == pytest.approx(3610 / 1882)
    # The reported output error is the one of the factors on the calibration inputs.
    x = torch.cat([batch[0] for batch in batches])
    with torch.no_grad():
        measured = _relative(model[0](x), dense[0](x), dense[0].bias)
    assert result.records[0]["output_error"] == pytest.approx(measured, rel=1e-4)
    assert result.records[0]["output_error"] < 0.65 * result.records[0]["weight_error"]  # 0.44 vs 0.75
    # Without calibration batches `method="auto"` is the plain SVD, which needs an example input for the MACs.
    with pytest.raises(ValueError, match="counts the MACs of each layer on an example input"):
        low_rank_(dense, LowRankConfig(rank=12))
    reference = factorize(dense[0], 12)
    plain = low_rank_(dense, LowRankConfig(rank=12, modules="0"), example_input=torch.zeros(1, 64))
    assert plain.method == "svd" and plain.records[0]["output_error"] is None
    assert torch.equal(dense[0].first.weight, reference.first.weight)
    assert torch.equal(dense[0].second.weight, reference.second.weight)


class PaddedTokens(nn.Module):
    """Token embeddings through a Linear at every position, padded ones too, then a head on the real tokens' mean."""

    def __init__(self):
        super().__init__()
        self.embed, self.proj, self.head = nn.Embedding(16, 32), nn.Linear(32, 32), nn.Linear(32, 4)

    def forward(self, input_ids, attention_mask):
        mask = attention_mask.unsqueeze(-1)
        return self.head((torch.relu(self.proj(self.embed(input_ids))) * mask).sum(1) / mask.sum(1))


def _token_inputs(batch):
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def test_a_calibration_mask_whitens_on_the_real_tokens_only():
    torch.manual_seed(0)
    model = PaddedTokens()
    batches = list(dict_batches())
    assert sum(int((b["attention_mask"] == 0).sum()) for b in batches) > 0  # padded
    # The same tokens without padding, one per sequence: what the masked statistics must equal.
    tokens = [b["input_ids"][b["attention_mask"].bool()][:, None] for b in batches]
    real = [{"input_ids": t, "attention_mask": torch.ones_like(t)} for t in tokens]
    factors = {}
    for name, config, calibration in [
        (
            "masked",
            LowRankConfig(rank=4, modules="proj", calibration_mask=lambda x: x["attention_mask"]),
            batches,
        ),
        ("real", LowRankConfig(rank=4, modules="proj"), real),
        ("whole", LowRankConfig(rank=4, modules="proj"), batches),
    ]:
        copy_ = PaddedTokens()
        copy_.load_state_dict(model.state_dict())
        result = low_rank_(copy_, config, calibration=calibration, calibration_input=_token_inputs)
        assert result.method == "whitened"
        factors[name] = (copy_.proj.first.weight, copy_.proj.second.weight, result.records[0]["output_error"])
    for masked, real_ in zip(factors["masked"], factors["real"], strict=True):
        torch.testing.assert_close(masked, real_, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(factors["whole"][0], factors["real"][0], atol=1e-3)


# -- the callback -------------------------------------------------------------------------------------------


# Bad arguments, at construction and at setup: tests/test_errors_low_rank.py.


def test_layers_that_would_not_shrink_are_left_and_reported(tmp_path, digits):
    lowrank = LowRankReplacement(rank=0.5, verbose=False)
    model = ImageClassifier("small_cnn")
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=1), callbacks=[lowrank])
    trainer.fit(model, datamodule=digits)
    # net.0 (1 -> 16 channels): Tucker at (1, 8) keeps 1 + 72 + 128 + 16 = 217 parameters > 160.
    assert type(model.net[0]) is nn.Conv2d
    assert lowrank.skipped["net.0"].startswith("rank (1, 8) would keep 217 parameters")
    assert isinstance(model.net[3], TuckerConv2d) and model.net[3].ranks == (8, 16)
    assert isinstance(model.net[8], LowRankLinear) and model.net[8].rank == 32
    assert isinstance(model.net[10], LowRankLinear) and model.net[10].rank == 5
    assert lowrank.method_used == "whitened"


def test_fixed_and_energy_ranks_in_a_fit(tmp_path, digits):
    model = ImageClassifier("small_cnn")
    fixed = LowRankReplacement(rank=6, modules=nn.Linear, verbose=False)
    pl.Trainer(**trainer_kwargs(tmp_path / "a", max_steps=1), callbacks=[fixed]).fit(model, datamodule=digits)
    assert {name: layer["rank"] for name, layer in fixed.layers.items()} == {"net.8": 6, "net.10": 6}

    model = ImageClassifier("small_cnn")
    weights = {name: model.get_submodule(name).weight.detach().clone() for name in ("net.8", "net.10")}
    energy = LowRankReplacement(energy=0.6, modules=nn.Linear, method="svd", verbose=False)
    pl.Trainer(**trainer_kwargs(tmp_path / "b", max_steps=1), callbacks=[energy]).fit(
        model, datamodule=digits
    )
    for name, weight in weights.items():
        # The smallest rank whose singular values hold 60% of the energy, computed here independently.
        sigma2 = torch.linalg.svdvals(weight.double()) ** 2
        expected = int((torch.cumsum(sigma2, 0) / sigma2.sum() < 0.6).sum()) + 1
        assert energy.layers[name]["rank"] == expected, name
    assert energy.method_used == "svd"


def test_without_training_data_auto_falls_back_to_svd_and_whitened_is_refused(tmp_path):
    model = ImageClassifier("small_cnn")  # has an example_input_array, so MACs can be counted
    auto = LowRankReplacement(rank=4, modules=nn.Linear, verbose=False)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path), callbacks=[auto])
    auto.setup(trainer, model, "fit")
    assert auto.method_used == "svd" and isinstance(model.net[8], LowRankLinear)
    whitened = LowRankReplacement(rank=4, modules=nn.Linear, method="whitened", verbose=False)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path), callbacks=[whitened])
    with pytest.raises(ValueError, match="needs calibration batches from the training loader"):
        whitened.setup(trainer, ImageClassifier("small_cnn"), "fit")


def test_budget_keeps_the_requested_fraction_of_parameters(tmp_path, digits):
    model = ImageClassifier("small_cnn")
    dense = {n: sum(p.numel() for p in model.net[int(n)].parameters()) for n in ("0", "3", "8", "10")}
    lowrank = LowRankReplacement(budget=0.3, method="svd", verbose=False)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=1), callbacks=[lowrank])
    trainer.fit(model, datamodule=digits)
    after = sum(sum(p.numel() for p in model.net[int(n)].parameters()) for n in dense)
    eligible = sum(dense.values()) - sum(
        dense[n[4:]] for n in lowrank.skipped if "budget" not in lowrank.skipped[n]
    )
    kept = after - sum(dense[n[4:]] for n in lowrank.skipped if "budget" not in lowrank.skipped[n])
    assert 0.28 * eligible < kept <= 0.3 * eligible
    assert lowrank.totals["params_ratio"] > 2.5


def test_uniform_allocation_keeps_the_budget_in_every_layer(tmp_path, digits):
    model = ImageClassifier("small_cnn")
    lowrank = LowRankReplacement(budget=0.3, allocation="uniform", method="svd", verbose=False)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=1), callbacks=[lowrank])
    trainer.fit(model, datamodule=digits)
    # net.0 (1 -> 16, 3x3) too: Tucker at (1, 1) keeps 1 + 9 + 16 + 16 = 42 <= 0.3 * 160 parameters.
    assert set(lowrank.layers) == {"net.0", "net.3", "net.8", "net.10"}
    assert lowrank.layers["net.0"]["rank"] == [1, 1]
    for record in lowrank.records:
        assert record["params_after"] <= 0.3 * record["params_before"]
    # net.8 (512 -> 64): the largest rank with r * (512 + 64) + 64 <= 0.3 * 32832 is 16.
    assert lowrank.layers["net.8"]["rank"] == 16


def test_macs_budget_counts_macs(tmp_path, digits):
    model = ImageClassifier("small_cnn")
    lowrank = LowRankReplacement(budget=0.5, budget_on="macs", modules=nn.Conv2d, method="svd", verbose=False)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=1), callbacks=[lowrank])
    trainer.fit(model, datamodule=digits)
    before = sum(r["macs_before"] for r in lowrank.records)
    after = sum(r["macs_after"] for r in lowrank.records)
    skipped_macs = 16 * 9 * 64 if "net.0" in lowrank.skipped else 0  # a dense layer counts fully
    assert after + skipped_macs <= 0.5 * (before + skipped_macs) + 1
    assert lowrank.totals["macs_ratio"] > 1.5


def _two_replacements():
    """Convolutions and Linear layers by two callbacks, at different settings."""
    return [
        LowRankReplacement(
            rank=0.5, modules=nn.Conv2d, min_params=1000, calibration_batches=4, verbose=False
        ),
        LowRankReplacement(budget=0.25, modules=nn.Linear, method="svd", verbose=False),
    ]


def _fit(root, digits, epochs, ckpt_path=None, stop_early=False, logger=False, steps=None, lowranks=None):
    pl.seed_everything(3, verbose=False)
    lowranks = lowranks or [LowRankReplacement(budget=0.5, calibration_batches=4, verbose=False)]
    lowrank = lowranks[0] if len(lowranks) == 1 else lowranks
    checkpoint = ModelCheckpoint(dirpath=root / "ckpt", save_top_k=-1, every_n_epochs=1)
    callbacks = [*lowranks, checkpoint, steps or RecordSteps()] + (
        [StopAfterFirstEpoch()] if stop_early else []
    )
    model = SGDClassifier("small_cnn")
    trainer = pl.Trainer(
        **trainer_kwargs(
            root, max_epochs=epochs, enable_checkpointing=True, logger=logger, log_every_n_steps=1
        ),
        callbacks=callbacks,
        limit_val_batches=1,
    )
    trainer.fit(model, datamodule=digits, ckpt_path=ckpt_path)
    return model, lowrank, trainer


def test_fit_resumes_exactly_and_a_fresh_module_tests_from_the_checkpoint(tmp_path, digits):
    logger = CSVLogger(tmp_path, name="lowrank")
    full, lowrank, trainer = _fit(tmp_path / "full", digits, epochs=2, logger=logger)
    assert isinstance(full.net[8], LowRankLinear)
    _fit(tmp_path / "first", digits, epochs=2, stop_early=True)
    steps = RecordSteps()
    resumed, resumed_cb, _ = _fit(
        tmp_path / "second",
        digits,
        epochs=2,
        ckpt_path=tmp_path / "first" / "ckpt" / "epoch=0-step=20.ckpt",
        steps=steps,
    )
    assert steps.steps == list(range(20, 40))  # continued from the checkpoint
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert resumed_cb.layers == lowrank.layers

    # The ranks are in the checkpoint's callback state.
    ckpt = torch.load(tmp_path / "full" / "ckpt" / "epoch=1-step=40.ckpt", weights_only=False)
    state = next(v for k, v in ckpt["callbacks"].items() if "LowRankReplacement" in k)
    assert state["layers"] == lowrank.layers

    expected = trainer.test(full, datamodule=digits, verbose=False)[0]["test_acc"]
    tester = pl.Trainer(**trainer_kwargs(tmp_path / "test"), callbacks=[LowRankReplacement(budget=0.5)])
    fresh = SGDClassifier("small_cnn")
    result = tester.test(
        fresh, datamodule=digits, ckpt_path=tmp_path / "full" / "ckpt" / "epoch=1-step=40.ckpt"
    )
    assert result[0]["test_acc"] == expected > 0.5
    assert isinstance(fresh.net[8], LowRankLinear)

    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("low_rank/per_layer/rank/net.8")]
    assert float(rows[0]["low_rank/per_layer/rank/net.8"]) == lowrank.layers["net.8"]["rank"]
    assert float(rows[0]["low_rank/params_ratio"]) == pytest.approx(lowrank.totals["params_ratio"], rel=1e-6)
    assert (
        0.0
        < float(rows[0]["low_rank/per_layer/output_error/net.8"])
        < float(rows[0]["low_rank/per_layer/weight_error/net.8"])
    )


def test_two_callbacks_on_different_layers_keep_separate_states_and_resume_exactly(tmp_path, digits):
    full, (convs, linears), _ = _fit(tmp_path / "full", digits, epochs=2, lowranks=_two_replacements())
    assert set(convs.layers) == {"net.3"} and set(linears.layers) == {"net.8"}
    assert convs.state_key != linears.state_key
    # Whole-model totals compare with the model before the first replacement.
    dense = sum(p.numel() for p in SGDClassifier("small_cnn").parameters())
    assert linears.totals["params_ratio"] == dense / sum(p.numel() for p in full.parameters())
    assert 1.0 < convs.totals["params_ratio"] < linears.totals["params_ratio"]
    assert isinstance(full.net[3], TuckerConv2d) and isinstance(full.net[8], LowRankLinear)
    _fit(tmp_path / "first", digits, epochs=2, stop_early=True, lowranks=_two_replacements())
    resumed, (resumed_convs, resumed_linears), _ = _fit(
        tmp_path / "second",
        digits,
        epochs=2,
        ckpt_path=tmp_path / "first" / "ckpt" / "epoch=0-step=20.ckpt",
        lowranks=_two_replacements(),
    )
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert resumed_convs.layers == convs.layers and resumed_linears.layers == linears.layers
    ckpt = torch.load(tmp_path / "full" / "ckpt" / "epoch=1-step=40.ckpt", weights_only=False)
    states = [v for k, v in ckpt["callbacks"].items() if "LowRankReplacement" in k]
    assert sorted(sorted(state["layers"]) for state in states) == [["net.3"], ["net.8"]]


class RecordLoss(Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def test_composes_with_gradual_pruning_on_the_factors(tmp_path, digits):
    lowrank = LowRankReplacement(rank=0.25, modules=nn.Linear, verbose=False)
    pruning = GradualPruning(amount=0.6, start=0.0, end=0.5, frequency=2, modules=nn.Linear)
    losses = RecordLoss()
    model = ImageClassifier("small_cnn")
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=2), callbacks=[lowrank, pruning, losses])
    trainer.fit(model, datamodule=digits)
    factors = [model.net[8].first, model.net[8].second, model.net[10].first, model.net[10].second]
    assert all(isinstance(f, nn.Linear) for f in factors)
    for factor in factors:
        assert float((factor.weight == 0).float().mean()) == pytest.approx(0.6, abs=0.01)
    first, last = sum(losses.losses[:5]) / 5, sum(losses.losses[-5:]) / 5
    assert last < 0.8 * first


def test_composes_with_int8_quantization_aware_training_of_the_factors(tmp_path, digits):
    from lightning_compress.quantization.pt2e import QuantizedGraphModule
    from lightning_compress.quantization.qat import QuantizationAwareTraining

    lowrank = LowRankReplacement(rank=0.25, modules=nn.Linear, verbose=False)
    qat = QuantizationAwareTraining(module="net", start=0.3)
    model = ImageClassifier("small_cnn")
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=2), callbacks=[lowrank, qat])
    trainer.fit(model, datamodule=digits)
    assert isinstance(model.net, QuantizedGraphModule) and model.net.converted
    # The factors, not the original layers, are what became int8: (rank, in) and (out, rank) weights.
    assert set(lowrank.layers) == {"net.8", "net.10"}
    expected = []
    for name, (in_features, out_features) in {"net.8": (512, 64), "net.10": (64, 10)}.items():
        rank = lowrank.layers[name]["rank"]
        expected += [(rank, in_features), (out_features, rank)]
    int8 = [tuple(p.shape) for p in model.net.parameters() if p.dtype == torch.int8 and p.dim() == 2]
    assert sorted(int8) == sorted(expected)
    assert qat.parity["argmax_agreement"] >= 0.98
    # The int8 model scores what the fake-quantized one did in the last validation of the fit (and trained:
    # chance is 0.1).
    fake_quant_acc = float(trainer.callback_metrics["val_acc"])
    int8_acc = trainer.validate(model, datamodule=digits, verbose=False)[0]["val_acc"]
    assert fake_quant_acc > 0.4 and int8_acc == pytest.approx(fake_quant_acc, abs=0.03)


class WatchReplacement(Callback):
    """Per step: the type of `net.8`, and whether the optimizer holds exactly the model's parameters, in order."""

    def __init__(self):
        self.types, self.aligned = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        optimized = [id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]]
        self.types.append(type(pl_module.net[8]).__name__)
        self.aligned.append(optimized == [id(p) for p in pl_module.parameters()])


def _later_fit(root, digits, start, ckpt_path=None, checkpoint=None, watch=None, steps=None):
    pl.seed_everything(4, verbose=False)
    lowrank = LowRankReplacement(rank=0.25, modules=nn.Linear, start=start, verbose=False)
    model = SGDClassifier("small_cnn")
    trainer = fit_or_resume(root, digits, model, [lowrank, watch, steps], ckpt_path, checkpoint, max_epochs=2)
    return model, lowrank, trainer


def test_replacing_later_points_the_optimizer_at_the_factors(tmp_path, digits):
    watch = WatchReplacement()
    model, lowrank, trainer = _later_fit(tmp_path, digits, start="step:7", watch=watch)
    assert watch.types[:7] == ["Linear"] * 7 and set(watch.types[7:]) == {"LowRankLinear"}
    assert all(watch.aligned) and len(watch.aligned) == 40
    optimizer = trainer.optimizers[0]
    factors = [model.net[8].first.weight, model.net[8].second.weight, model.net[8].second.bias]
    assert all(optimizer.state[p]["momentum_buffer"].abs().sum() > 0 for p in factors)  # they trained
    assert len(optimizer.state) == len(list(model.parameters()))  # no state left for the old layers
    # Factorized from the weights trained for 7 steps: the record's errors refer to those.
    assert set(lowrank.layers) == {"net.8", "net.10"} and lowrank.records[0]["weight_error"] > 0


@pytest.mark.parametrize("start", ["step:7", "epoch:1"], ids=["checkpoint-after", "checkpoint-before"])
def test_replacing_later_resumes_exactly_from_either_side_of_the_replacement(tmp_path, digits, start):
    full, _, _ = _later_fit(tmp_path / "full", digits, start)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    _later_fit(tmp_path / "first", digits, start, checkpoint=ckpt)
    steps = RecordSteps()
    resumed, _, _ = _later_fit(
        tmp_path / "second", digits, start, ckpt_path=tmp_path / "ckpt" / "epoch=0-step=20.ckpt", steps=steps
    )
    assert steps.steps == list(range(20, 40)) and isinstance(resumed.net[8], LowRankLinear)
    assert list(full.state_dict()) == list(resumed.state_dict())
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_replacing_later_refuses_callbacks_that_select_layers(tmp_path, digits):
    callbacks = [LowRankReplacement(rank=4, start=0.5), GradualPruning(amount=0.5)]
    trainer = pl.Trainer(**trainer_kwargs(tmp_path), callbacks=callbacks)
    with pytest.raises(ValueError, match="GradualPruning set up on the layers as they were"):
        trainer.fit(ImageClassifier("small_cnn"), datamodule=digits)
    assert trainer.global_step == 0


def test_selecting_callbacks_listed_first_set_up_after_it(tmp_path, digits):
    pruning, lowrank = GradualPruning(amount=0.5), LowRankReplacement(rank=4, verbose=False)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=2), callbacks=[pruning, lowrank])
    model = ImageClassifier("small_cnn")
    trainer.fit(model, datamodule=digits)
    assert compression_callbacks(trainer) == [lowrank, pruning]
    assert trainer.callbacks.index(pruning) < trainer.callbacks.index(lowrank)  # the user's list, as given
    assert isinstance(model.net[8], LowRankLinear)
    # The factors are what pruning selected: they reached its amount.
    for factor in (model.net[8].first, model.net[8].second):
        assert float((factor.weight == 0).float().mean()) == pytest.approx(0.5, abs=0.01)


def test_ddp_two_processes_take_identical_decisions(tmp_path, digits):
    run_worker("_ddp_low_rank.py", tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world_size"] == 2
    assert ranks[0]["layers"] == ranks[1]["layers"] and ranks[0]["layers"]
    assert ranks[0]["output_errors"] == ranks[1]["output_errors"]
    assert ranks[0]["weights"] == ranks[1]["weights"]
    # The statistics were all-reduced: each process saw 2 of the 4 calibration batches, yet the result is the
    # single-process one over all 4.
    single = LowRankReplacement(budget=0.4, calibration_batches=4, verbose=False)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path / "single", max_steps=1), callbacks=[single])
    trainer.fit(ImageClassifier("small_cnn"), datamodule=digits)
    assert single.layers == ranks[0]["layers"]
    for name, error in ranks[0]["output_errors"].items():
        assert error == pytest.approx(
            next(r["output_error"] for r in single.records if r["name"] == name), rel=1e-9
        )


# -- reliability: frozen layers, nothing to replace, optimizers, inputs, checkpoints, tied weights ------------


class FrozenClassifier(ImageClassifier):
    """`net.8` frozen (all of it, or its weight only); the optimizer takes the trainable parameters only."""

    def __init__(self, frozen):
        super().__init__("small_cnn")
        frozen_params = self.net[8].parameters() if frozen == "layer" else [self.net[8].weight]
        for param in frozen_params:
            param.requires_grad_(False)

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1, momentum=0.9)


class FirstFactors(Callback):
    """The parameters of `net.8` and `net.10` at the first step where they are factorized, and at the end."""

    def __init__(self):
        self.first = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.first is None and isinstance(pl_module.net[8], LowRankLinear):
            self.first = {
                k: v.clone() for k, v in pl_module.net.state_dict().items() if k.startswith(("8.", "10."))
            }


@pytest.mark.parametrize("frozen", ["layer", "weight"])
@pytest.mark.parametrize("start", [None, "step:2"], ids=["in-setup", "later"])
def test_factors_of_frozen_weights_stay_frozen_and_do_not_move(tmp_path, digits, frozen, start):
    lowrank = LowRankReplacement(rank=0.25, modules=nn.Linear, method="svd", start=start, verbose=False)
    watch = FirstFactors()
    model = FrozenClassifier(frozen)
    trainer = pl.Trainer(
        **trainer_kwargs(tmp_path, max_steps=5), callbacks=[lowrank, watch], limit_val_batches=0
    )
    trainer.fit(model, datamodule=digits)
    frozen_layer, trained_layer = model.net[8], model.net[10]
    assert isinstance(frozen_layer, LowRankLinear) and isinstance(trained_layer, LowRankLinear)
    assert [p.requires_grad for p in frozen_layer.parameters()] == [False, False, frozen == "weight"]
    assert all(p.requires_grad for p in trained_layer.parameters())
    final = model.net.state_dict()
    assert torch.equal(final["8.first.weight"], watch.first["8.first.weight"])
    assert torch.equal(final["8.second.weight"], watch.first["8.second.weight"])
    # A trainable bias (and every trainable layer) did train.
    assert torch.equal(final["8.second.bias"], watch.first["8.second.bias"]) == (frozen == "layer")
    assert not torch.equal(final["10.first.weight"], watch.first["10.first.weight"])


@pytest.mark.parametrize("start", [None, "step:1"], ids=["in-setup", "later"])
def test_replacing_nothing_warns_once_naming_rank_and_modules(tmp_path, digits, start):
    # At 0.9 of the full rank neither Linear layer gets smaller: 58 * (512 + 64) + 64 > 32,832 parameters.
    lowrank = LowRankReplacement(rank=0.9, modules=nn.Linear, method="svd", start=start, verbose=False)
    model = ImageClassifier("small_cnn")
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=4), callbacks=[lowrank])
    with pytest.warns(
        UserWarning, match=r"replaced no layer: at `rank=0.9` none of the 2 selected layers"
    ) as caught:
        trainer.fit(model, datamodule=digits)
    messages = [str(w.message) for w in caught if "replaced no layer" in str(w.message)]
    assert len(messages) == 1  # one attempt: later steps do not factorize again
    assert "net.8: rank 58 would keep 33,472 parameters" in messages[0] and "`modules`" in messages[0]
    assert type(model.net[8]) is nn.Linear and lowrank.layers == {}


class HeadOnlyOptimizer(ImageClassifier):
    def configure_optimizers(self):
        return torch.optim.SGD(self.net[10].parameters(), lr=0.1)


def test_replacing_later_refuses_layers_no_optimizer_holds_before_training(tmp_path, digits):
    counter = RecordSteps()
    lowrank = LowRankReplacement(rank=0.25, modules=nn.Linear, start="step:2", verbose=False)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=5), callbacks=[lowrank, counter])
    with pytest.raises(
        ValueError, match=r"no optimizer holds the trainable parameters of 'net.8'\. Add them"
    ):
        trainer.fit(HeadOnlyOptimizer("small_cnn"), datamodule=digits)
    assert counter.steps == []


class TwoInputs(pl.LightningModule):
    """`forward(x, mask)`; batches are `(x, mask, y)` tuples or `{"x", "mask", "y"}` dicts."""

    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(32, 64)
        self.out = nn.Linear(64, 4)
        self.example_input_array = (torch.zeros(1, 32), torch.ones(1, 32))

    def forward(self, x, mask):
        return self.out(torch.relu(self.hidden(x * mask)))

    def training_step(self, batch, batch_idx):
        x, mask, y = (batch["x"], batch["mask"], batch["y"]) if isinstance(batch, dict) else batch
        return nn.functional.cross_entropy(self(x, mask), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class DictDataset(torch.utils.data.Dataset):
    def __init__(self, x, mask, y):
        self.x, self.mask, self.y = x, mask, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"x": self.x[i], "mask": self.mask[i], "y": self.y[i]}


def _two_input_loader(kind):
    g = torch.Generator().manual_seed(0)
    x, mask, y = torch.randn(64, 32, generator=g), torch.ones(64, 32), torch.randint(0, 4, (64,), generator=g)
    data = DictDataset(x, mask, y) if kind == "dict" else torch.utils.data.TensorDataset(x, mask, y)
    return torch.utils.data.DataLoader(data, batch_size=16)


@pytest.mark.parametrize(
    ("kind", "fix", "error", "match"),
    [
        (
            "tuple",
            lambda batch: (batch[0], batch[1]),
            TypeError,
            r"calibrate.*pass `calibration_input`, a function from a training batch",
        ),
        (
            "dict",  # the forward names the batch's other entry: refused before the model runs
            lambda batch: {"x": batch["x"], "mask": batch["mask"]},
            ValueError,
            r"their `x` alone, but the model's forward also takes `mask`.*Pass `calibration_input`",
        ),
    ],
)
def test_a_two_argument_forward_points_at_calibration_input(tmp_path, kind, fix, error, match):
    counter = RecordSteps()
    lowrank = LowRankReplacement(rank=8, modules="hidden", verbose=False)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=2), callbacks=[lowrank, counter])
    with pytest.raises(error, match=match):
        trainer.fit(TwoInputs(), _two_input_loader(kind))
    assert counter.steps == []
    lowrank = LowRankReplacement(rank=8, modules="hidden", calibration_input=fix, verbose=False)
    model = TwoInputs()
    pl.Trainer(**trainer_kwargs(tmp_path, max_steps=2), callbacks=[lowrank]).fit(
        model, _two_input_loader(kind)
    )
    assert lowrank.method_used == "whitened" and model.hidden.rank == 8
    assert (
        lowrank.records[0]["output_error"] < lowrank.records[0]["weight_error"]
    )  # calibrated on the batches


def test_resuming_from_a_checkpoint_written_without_it_names_the_checkpoint_and_the_fix(tmp_path, digits):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    dense = pl.Trainer(
        **trainer_kwargs(tmp_path, max_epochs=1, enable_checkpointing=True, limit_train_batches=4),
        callbacks=[checkpoint],
        limit_val_batches=0,
    )
    dense.fit(SGDClassifier("small_cnn"), datamodule=digits)
    path = tmp_path / "ckpt" / "epoch=0-step=4.ckpt"
    counter = RecordSteps()
    lowrank = LowRankReplacement(rank=0.25, modules=nn.Linear, verbose=False)
    trainer = pl.Trainer(
        **trainer_kwargs(tmp_path, max_epochs=2, limit_train_batches=4), callbacks=[lowrank, counter]
    )
    with pytest.raises(
        ValueError, match=r"epoch=0-step=4\.ckpt' holds the dense layer\(s\) 'net.8', 'net.10'"
    ):
        trainer.fit(SGDClassifier("small_cnn"), datamodule=digits, ckpt_path=path)
    assert counter.steps == []

    # The fix the message gives: `start='step:0'` factorizes the loaded, trained weights at the first step.
    later = LowRankReplacement(rank=0.25, modules=nn.Linear, method="svd", start="step:0", verbose=False)
    first, watch, steps = FirstFactors(), WatchReplacement(), RecordSteps()
    model = SGDClassifier("small_cnn")
    trainer = pl.Trainer(
        **trainer_kwargs(tmp_path, max_epochs=2, limit_train_batches=4),
        callbacks=[later, first, watch, steps],
    )
    trainer.fit(model, datamodule=digits, ckpt_path=path)
    assert steps.steps == [4, 5, 6, 7] and watch.types == ["LowRankLinear"] * 4 and all(watch.aligned)
    trained = torch.load(path, weights_only=True)["state_dict"]
    reference = nn.Linear(512, 64)
    reference.load_state_dict({"weight": trained["net.8.weight"], "bias": trained["net.8.bias"]})
    expected = factorize(reference, 16)
    assert torch.equal(first.first["8.first.weight"], expected.first.weight)
    assert torch.equal(first.first["8.second.weight"], expected.second.weight)


def test_plain_load_from_checkpoint_names_restore_low_rank(tmp_path, digits):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    lowrank = LowRankReplacement(rank=0.25, modules=nn.Linear, verbose=False)
    model = ImageClassifier("small_cnn")
    trainer = pl.Trainer(
        **trainer_kwargs(tmp_path, max_epochs=1, enable_checkpointing=True, limit_train_batches=2),
        callbacks=[lowrank, checkpoint],
        limit_val_batches=0,
    )
    trainer.fit(model, datamodule=digits)
    path = tmp_path / "ckpt" / "epoch=0-step=2.ckpt"
    with pytest.raises(
        RuntimeError,
        match=r"Unexpected key\(s\) in state_dict: \"lightning_compress: this checkpoint holds "
        r"factorized layers \(LowRankReplacement\); call lightning_compress\.low_rank\.restore_low_rank\(model, ",
    ):
        ImageClassifier.load_from_checkpoint(path)
    # The helper the key names removes it again: the weights load strictly.
    state = torch.load(path, weights_only=True)["state_dict"]
    fresh = ImageClassifier("small_cnn")
    assert restore_low_rank(fresh, state) == ["net.8", "net.10"]
    fresh.load_state_dict(state)
    x = torch.randn(4, 1, 8, 8)
    assert torch.equal(fresh.eval()(x), model.eval()(x))


class TiedLanguageModel(pl.LightningModule):
    """Token embedding tied to the output layer (one Parameter), with an untied hidden layer between."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 32)
        self.hidden = nn.Linear(32, 32)
        self.head = nn.Linear(32, 50, bias=False)
        self.head.weight = self.embed.weight
        self.example_input_array = torch.zeros(1, 6, dtype=torch.long)

    def forward(self, tokens):
        return self.head(torch.relu(self.hidden(self.embed(tokens))))

    def training_step(self, batch, batch_idx):
        tokens, targets = batch
        return nn.functional.cross_entropy(self(tokens).flatten(0, 1), targets.flatten())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_tied_weights_stay_tied_and_the_skipped_layer_is_named_in_a_warning(tmp_path):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 50, (32, 6), generator=g)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(tokens, tokens.roll(1, 1)), batch_size=8
    )
    lowrank = LowRankReplacement(rank=4, verbose=False)
    model = TiedLanguageModel()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=3), callbacks=[lowrank])
    with pytest.warns(
        UserWarning, match=r"tied weights as they are: 'head': its weight is shared with 'embed'"
    ):
        trainer.fit(model, loader)
    assert model.head.weight is model.embed.weight and type(model.head) is nn.Linear
    assert isinstance(model.hidden, LowRankLinear) and set(lowrank.layers) == {"hidden"}


def test_factorized_feed_forward_layers_keep_the_fused_transformer_paths_working():
    # nn.TransformerEncoderLayer in eval mode (no grad) runs a fused kernel that reads `linear1.weight`/`.bias`,
    # and nn.TransformerEncoder turns a padded batch into a nested tensor for it.
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=128, batch_first=True)
    model = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=True).eval()
    x = torch.randn(3, 5, 32)
    result = low_rank_(model, LowRankConfig(rank=0.25, modules=["*.linear1", "*.linear2"]), example_input=x)
    assert sorted(result.layers) == [f"layers.{i}.linear{j}" for i in (0, 1) for j in (1, 2)]
    assert isinstance(model.layers[0].linear1, LowRankLinear)
    padding = torch.tensor([[False] * 5, [False] * 3 + [True] * 2, [False] * 4 + [True]])
    with torch.no_grad():  # the fused paths
        fused, fused_padded = model(x), model(x, src_key_padding_mask=padding)
    slow, slow_padded = model(x), model(x, src_key_padding_mask=padding)  # grad enabled: the regular path
    assert torch.allclose(fused, slow, atol=1e-5)
    kept = ~padding  # the nested path leaves padded positions at zero
    assert torch.allclose(fused_padded[kept], slow_padded[kept], atol=1e-5)


def test_a_second_replacement_on_a_factorized_model_says_which_layers_were_factorized_before():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8), nn.ReLU(), nn.Linear(8, 6))
    x = torch.randn(2, 32)
    first = low_rank_(model, LowRankConfig(rank=4, modules=["0", "2"]), example_input=x)
    assert sorted(first.layers) == ["0", "2"]
    # The one layer left does not get smaller at that rank: the warning says why the others are not there.
    with pytest.warns(UserWarning, match=r"none of the 1 selected layers .* 2 layers were factorized before"):
        second = low_rank_(model, LowRankConfig(rank=4), example_input=x)
    assert second.layers == {} and isinstance(model[0], LowRankLinear)
    with pytest.raises(
        ValueError, match=r"can be factorized; 2 layers were factorized before .* or start from"
    ):
        low_rank_(model, LowRankConfig(rank=4, modules=["0", "2"]), example_input=x)
