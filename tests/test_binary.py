import inspect

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.nn.utils import parametrize

from examples.models import ImageClassifier
from lightning_compress import CompressionMonitor
from lightning_compress.quantization.binary import (
    BinaryConfig,
    BinaryWeights,
    QuantizedWeight,
    binarize,
    binarize_,
    make_permanent_,
    ternarize,
)
from lightning_compress.quantization.binary_core import (
    latent_weight,
    load_binary_checkpoint,
    set_enabled,
    storage_formats,
    weight_error,
)
from lightning_compress.stats import TensorFormat, compressed_size_bytes, raw_size_bytes
from tests.conftest import RecordSteps, TiedLM, fit_or_resume, trainer_kwargs

MIDDLE = ["net.3", "net.8"]  # small_cnn's inner conv and linear layers; the first and last stay fp32


def test_binary_scale_is_the_least_squares_optimum_per_channel():
    weight = torch.randn(16, 8, 3, 3)
    binary = binarize(weight)
    assert torch.equal(binary.sign(), torch.where(weight >= 0, 1.0, -1.0))
    alpha = binary.abs().amax(dim=(1, 2, 3))
    assert torch.allclose(alpha, weight.abs().mean(dim=(1, 2, 3)))
    error = (binary - weight).norm()
    for factor in (0.98, 1.02):
        assert (factor * binary - weight).norm() > error


def test_ternary_weights_have_three_levels_per_channel():
    weight = torch.randn(32, 64)
    ternary = ternarize(weight)
    for row, original in zip(ternary, weight, strict=True):
        levels = row.unique()
        assert len(levels) == 3 and levels[1] == 0 and levels[0] == -levels[2]
        delta = 0.7 * original.abs().mean()
        assert torch.equal(row != 0, original.abs() > delta)
        assert levels[2] == pytest.approx(float(original.abs()[original.abs() > delta].mean()), rel=1e-6)
    assert 0.3 < (ternary == 0).float().mean() < 0.6


def test_straight_through_estimator_passes_the_gradient_to_the_latent_weight():
    layer = nn.Linear(6, 3)
    parametrize.register_parametrization(layer, "weight", QuantizedWeight("binary"))
    x = torch.randn(5, 6)
    quantized = layer.weight.detach().clone().requires_grad_(True)
    nn.functional.linear(x, quantized, layer.bias).pow(2).sum().backward()
    layer(x).pow(2).sum().backward()
    assert torch.allclose(layer.parametrizations.weight.original.grad, quantized.grad)
    assert len(layer.weight[0].abs().unique()) == 1


def test_the_verb_quantizes_a_plain_module_trains_its_latent_weights_and_ends_plain():
    generator = torch.Generator().manual_seed(2)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    config = BinaryConfig(mode="ternary", exclude="0")
    layers = binarize_(model, config)
    assert list(layers) == ["2"] and not parametrize.is_parametrized(model[0])
    latent = latent_weight(model[2]).detach().clone()
    assert torch.equal(model[2].weight, ternarize(latent))
    x = torch.randn(5, 1, 6, 6, generator=generator)
    model(x).sum().backward()
    # Straight through: the latent weight gets the gradient of the ternary one, the summed input of each row.
    features = model[1](model[0](x)).detach()
    assert torch.allclose(latent_weight(model[2]).grad, features.sum(0).expand(3, -1), atol=1e-5)
    expected = float((ternarize(latent) - latent).norm() / latent.norm())
    assert weight_error(layers, "ternary") == pytest.approx(expected, rel=1e-6)
    set_enabled(layers, False)
    assert torch.equal(model[2].weight, latent)
    assert storage_formats(layers, config.bits, permanent=False) == {
        "2.parametrizations.weight.original": TensorFormat(bits=2, codebook_entries=3)
    }
    make_permanent_(layers)
    assert sorted(model.state_dict()) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    assert torch.equal(model[2].weight, ternarize(latent))
    assert all(len(row.abs().unique()) == 2 for row in model[2].weight.detach())  # 0 and one scale per row


class CheckForwardWeights(Callback):
    """Records, during training, the distinct magnitudes per row the layers compute with."""

    def __init__(self):
        self.levels, self.latent_levels = set(), set()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        for name in MIDDLE:
            module = pl_module.get_submodule(name)
            weight = module.weight.detach().flatten(1)
            self.levels.add(max(len(row.abs().unique()) for row in weight))
            latent = module.parametrizations.weight.original.detach().flatten(1)
            self.latent_levels.add(max(len(row.abs().unique()) for row in latent))


@pytest.mark.parametrize(("mode", "levels", "ratio"), [("binary", 1, 30), ("ternary", 2, 15)])
def test_training_uses_quantized_weights_and_ends_with_a_plain_quantized_model(
    tmp_path, digits, mode, levels, ratio
):
    binary = BinaryWeights(mode=mode, modules=MIDDLE)
    check = CheckForwardWeights()
    monitor = CompressionMonitor(measure_latency=False, verbose=False)
    model = ImageClassifier("small_cnn")
    keys = set(model.state_dict())
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=3), callbacks=[binary, check, monitor])
    trainer.fit(model, datamodule=digits)
    # Forward passes used at most `levels` magnitudes per row (one scale, plus zero for ternary); the latent
    # weights are full fp32.
    assert check.levels == {levels} and min(check.latent_levels) > 50
    assert set(model.state_dict()) == keys and not parametrize.is_parametrized(model.net[3])
    for name in MIDDLE:
        rows = model.get_submodule(name).weight.detach().flatten(1)
        assert all(len(row.abs().unique()) == levels for row in rows)
    assert trainer.callback_metrics["val_acc"] > 0.75
    assert 0.0 < float(trainer.callback_metrics["binary/weight_error"]) < 1.0
    # Storage: 1 or 2 bits per weight plus an fp32 scale per output channel.
    layer = model.net[8]
    formats = {"weight": binary.storage_formats(model)["net.8.weight"]}
    weight_only = nn.Module()
    weight_only.register_buffer("weight", layer.weight.detach())
    assert raw_size_bytes(weight_only) / compressed_size_bytes(weight_only, formats) > ratio
    assert monitor.report["after"]["compressed_bytes"] < monitor.report["before"]["raw_bytes"] / 4


def test_fp32_warm_up_before_start_and_latent_clipping(tmp_path, digits):
    binary = BinaryWeights(start="step:4", modules=MIDDLE, clip_latent=True)
    check = CheckForwardWeights()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path), callbacks=[binary, check], limit_train_batches=6)
    model = ImageClassifier("small_cnn")
    trainer.fit(model, datamodule=digits)
    # Steps 0-3: the latent weights used as they are; steps 4-5: one magnitude per row (binary).
    assert max(check.levels) > 50 and min(check.levels) == 1
    trainer = pl.Trainer(
        **trainer_kwargs(tmp_path),
        callbacks=[binary := BinaryWeights(modules=MIDDLE, clip_latent=True, finalize=False)],
    )

    class LargeLR(ImageClassifier):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=5.0)

    model = LargeLR("small_cnn")
    trainer.fit(model, datamodule=digits)
    for name in MIDDLE:
        latent = model.get_submodule(name).parametrizations.weight.original
        assert latent.abs().max() <= 1.0 and latent.abs().max() == 1.0


def _resume_run(tmp_path, digits, ckpt_path=None, checkpoint=None, steps=None):
    pl.seed_everything(11, verbose=False)
    binary = BinaryWeights(mode="ternary", start="step:2", modules=MIDDLE)
    model = ImageClassifier("small_cnn")
    callbacks = [binary, steps or RecordSteps()]
    fit_or_resume(
        tmp_path, digits, model, callbacks, ckpt_path, checkpoint, max_epochs=2, limit_train_batches=5
    )
    return model


def test_resume_mid_training_is_bit_exact(tmp_path, digits):
    full = _resume_run(tmp_path / "full", digits)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    _resume_run(tmp_path / "first", digits, checkpoint=ckpt)
    saved = torch.load(tmp_path / "ckpt" / "epoch=0-step=5.ckpt", weights_only=False)["state_dict"]
    assert "net.3.parametrizations.weight.original" in saved  # the latent weights are what is checkpointed
    steps = RecordSteps()
    resumed = _resume_run(
        tmp_path / "second", digits, ckpt_path=tmp_path / "ckpt" / "epoch=0-step=5.ckpt", steps=steps
    )
    assert steps.steps == [5, 6, 7, 8, 9]  # continued from the checkpoint
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


# Every constructor argument; docs/quantization.md ("What fails early") lists the same rows.
BAD_ARGUMENTS = [
    ({"mode": "int1"}, ValueError, "Unknown `mode='int1'`. Use one of 'binary', 'ternary'."),
    ({"start": -0.1}, ValueError, "`start=-0.1` is outside \\[0, 1\\]"),
    ({"start": "batch:3"}, ValueError, "`start='batch:3'` is not understood"),
    ({"modules": [5]}, TypeError, "`modules` got 5, which is neither a module name pattern"),
    ({"exclude": [5]}, TypeError, "`exclude` got 5, which is neither a module name pattern"),
    ({"min_params": -1}, ValueError, "`min_params=-1` must be a non-negative integer"),
    ({"clip_latent": "yes"}, TypeError, "`clip_latent='yes'` must be True or False"),
    ({"finalize": 1}, TypeError, "`finalize=1` must be True or False"),
]


@pytest.mark.parametrize(("kwargs", "error", "match"), BAD_ARGUMENTS)
def test_bad_arguments_fail_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        BinaryWeights(**kwargs)


def test_every_constructor_argument_has_a_row():
    covered = {name for kwargs, _, _ in BAD_ARGUMENTS for name in kwargs}
    assert covered == set(inspect.signature(BinaryWeights).parameters)


def test_unknown_layer_fails_at_setup(tmp_path, digits):
    trainer = pl.Trainer(**trainer_kwargs(tmp_path), callbacks=[BinaryWeights(modules="net.99")])
    with pytest.raises(ValueError, match="no module named 'net.99'"):
        trainer.fit(ImageClassifier("small_cnn"), datamodule=digits)


@pytest.mark.parametrize("mode", ["binary", "ternary"])
def test_tied_weights_are_binarized_once_and_stay_tied(tmp_path, mode):

    model = TiedLM()
    callback = BinaryWeights(mode=mode, modules=[nn.Embedding, nn.Linear])
    pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=1), callbacks=[callback]).fit(model)
    assert callback.finalized and model.dec.weight is model.emb.weight
    allowed = 2 if mode == "binary" else 3  # +-a per row (and 0 for ternary)
    for row in model.emb.weight.detach():
        assert row.unique().numel() <= allowed
        assert torch.allclose(row.abs()[row != 0], row.abs()[row != 0][0].expand(int((row != 0).sum())))


def test_a_fit_resumed_at_its_last_step_still_ends_with_plain_quantized_weights(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    kwargs = trainer_kwargs(tmp_path, max_epochs=1, enable_checkpointing=True)
    first = pl.Trainer(**kwargs, callbacks=[BinaryWeights(modules="mid"), checkpoint])
    first.fit(TiedLM())
    assert "mid.parametrizations.weight.original" in torch.load(tmp_path / "last.ckpt")["state_dict"]
    model, binary, steps = TiedLM(), BinaryWeights(modules="mid"), RecordSteps()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=1), callbacks=[binary, steps])
    trainer.fit(model, ckpt_path=str(tmp_path / "last.ckpt"))
    # Nothing left to train: the checkpoint was written at the last step.
    assert steps.steps == [] and trainer.global_step == first.global_step == 8
    assert binary.finalized and not parametrize.is_parametrized(model.mid)
    assert all(len(row.abs().unique()) == 1 for row in model.mid.weight.detach())


def test_a_checkpoint_written_while_training_tests_in_the_finalized_model(tmp_path, digits):
    # `trainer.test(ckpt_path=...)` after the fit: the checkpoint holds latent weights, the model binary ones.
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_train_steps=3)
    model = ImageClassifier("small_cnn")
    kwargs = trainer_kwargs(tmp_path, max_steps=6, enable_checkpointing=True, limit_test_batches=2)
    trainer = pl.Trainer(**kwargs, callbacks=[BinaryWeights(), checkpoint])
    trainer.fit(model, datamodule=digits)
    final = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.test(model, datamodule=digits, ckpt_path=str(tmp_path / "epoch=0-step=6.ckpt"), verbose=False)
    # The last checkpoint's latent weights, made binary: exactly the weights the fit ended with.
    assert all(torch.equal(model.state_dict()[k], final[k]) for k in final)
    trainer.test(model, datamodule=digits, ckpt_path=str(tmp_path / "epoch=0-step=3.ckpt"), verbose=False)
    weight = model.net[0].weight.detach()
    assert not torch.equal(weight, final["net.0.weight"])
    assert all(len(row.abs().unique()) == 1 for row in weight.flatten(1))  # binary: one magnitude per row
    # Without a Trainer, into a fresh model: the checkpoint written while training, and the one after the fit.
    fresh = load_binary_checkpoint(ImageClassifier("small_cnn"), tmp_path / "epoch=0-step=6.ckpt")
    assert all(torch.equal(fresh.state_dict()[k], final[k]) for k in final)
    trainer.save_checkpoint(tmp_path / "post_fit.ckpt")
    fresh = load_binary_checkpoint(ImageClassifier("small_cnn"), tmp_path / "post_fit.ckpt")
    assert all(torch.equal(fresh.state_dict()[k], model.state_dict()[k]) for k in final)
