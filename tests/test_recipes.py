"""Every shipped recipe runs through LightningCLI with the user's own model and data, and does what it says."""

import textwrap
import warnings

import pytest
import torch
from lightning.pytorch.cli import LightningCLI
from torch import nn

from examples.data import DigitsDataModule
from examples.models import ImageClassifier
from lightning_compress import recipes


def _run(tmp_path, name, model="small_cnn"):
    overrides = tmp_path / "run.yaml"
    overrides.write_text(
        textwrap.dedent(
            f"""
            trainer:
              max_epochs: 2
              limit_train_batches: 5
              limit_val_batches: 1
              num_sanity_val_steps: 0
              accelerator: cpu
              logger: false
              enable_checkpointing: false
              enable_progress_bar: false
              enable_model_summary: false
              default_root_dir: {tmp_path}
            model:
              arch: {model}
            """
        )
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli = LightningCLI(
            ImageClassifier,
            DigitsDataModule,
            args=["fit", "--config", str(recipes.path(name)), "--config", str(overrides)],
            save_config_callback=None,
        )
    return cli


def _callback(cli, class_name):
    return next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == class_name)


def _weights(model):
    return [m.weight for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]


def test_recipes_are_shipped_and_found_by_name():
    assert recipes.names() == [
        "deep_compression",
        "distillation",
        "full_pipeline",
        "int8_qat",
        "low_rank",
        "structured_2x",
    ]
    assert all(recipes.path(name).read_text().startswith("#") for name in recipes.names())
    with pytest.raises(ValueError, match="Unknown recipe `name='int4'`; choose one of"):
        recipes.path("int4")


def test_deep_compression_recipe_prunes_90_percent_and_shares_32_values(tmp_path):
    cli = _run(tmp_path, "deep_compression")
    weights = _weights(cli.model)
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert zeros == pytest.approx(0.9, abs=0.01)
    assert max(len(torch.unique(w[w != 0])) for w in weights) <= 32
    summary = _callback(cli, "CompressionMonitor").report["summary"]
    assert summary["size_ratio"] > 15


def test_structured_2x_recipe_halves_the_macs(tmp_path):
    cli = _run(tmp_path, "structured_2x", model="residual_cnn")
    summary = _callback(cli, "CompressionMonitor").report["summary"]
    assert summary["macs_ratio"] > 1.8
    assert cli.model.net[0].out_channels < 32  # channels removed for real


def test_int8_qat_recipe_converts_to_int8(tmp_path):
    cli = _run(tmp_path, "int8_qat")
    qat = _callback(cli, "QuantizationAwareTraining")
    assert qat.converted
    assert qat.parity["argmax_agreement"] > 0.9
    assert qat.freeze_bn is None
    assert _callback(cli, "CompressionMonitor").report["summary"]["size_ratio"] > 3.5


def test_low_rank_recipe_factorizes_the_layers(tmp_path):
    cli = _run(tmp_path, "low_rank")
    layers = _callback(cli, "LowRankReplacement").layers
    assert {"net.3", "net.8"} <= set(layers)
    assert layers["net.8"]["rank"] < 64
    summary = _callback(cli, "CompressionMonitor").report["summary"]
    assert summary["compression_rate"] > 1.5 and summary["macs_ratio"] > 1.5


def test_distillation_recipe_distills_from_the_original_model(tmp_path):
    cli = _run(tmp_path, "distillation")
    metrics = cli.trainer.callback_metrics
    assert float(metrics["distillation/alpha"]) == 0.5
    assert float(metrics["distillation/temperature"]) == 4.0
    assert float(metrics["distillation/kl"]) > 0


def test_full_pipeline_recipe_factorizes_prunes_distills_and_converts(tmp_path):
    cli = _run(tmp_path, "full_pipeline")
    assert _callback(cli, "LowRankReplacement").layers["net.8"]["rank"] == 32
    assert _callback(cli, "GradualPruning").current_amount == 0.5
    qat = _callback(cli, "QuantizationAwareTraining")
    assert qat.converted and qat.parity["argmax_agreement"] > 0.9
    assert float(cli.trainer.callback_metrics["distillation/kl"]) > 0
    summary = _callback(cli, "CompressionMonitor").report["summary"]
    assert summary["macs_ratio"] > 4 and summary["size_ratio"] > 15
