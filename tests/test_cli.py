"""The callbacks are configured from a LightningCLI YAML file, as users of LightningCLI write them."""

import textwrap

import pytest
import torch
from lightning.pytorch.cli import LightningCLI

from examples.data import DigitsDataModule
from examples.models import ImageClassifier
from lightning_compress import CompressionMonitor, GradualPruning, KnowledgeDistillation
from tests.conftest import dict_batches
from tests.test_distillation_mask import TokenTagger


def test_callbacks_from_a_lightning_cli_yaml_file(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(
        textwrap.dedent(
            f"""
            trainer:
              max_epochs: 1
              limit_train_batches: 4
              limit_val_batches: 1
              accelerator: cpu
              logger: false
              enable_checkpointing: false
              enable_progress_bar: false
              default_root_dir: {tmp_path}
              callbacks:
                - class_path: lightning_compress.GradualPruning
                  init_args:
                    amount: 0.6
                    mode: structured
                    criterion: l2
                    start: 0.0
                    end: 0.5
                    modules: ["net.0", "net.3"]
                - class_path: lightning_compress.CompressionMonitor
                  init_args:
                    measure_latency: false
                    verbose: false
            model:
              arch: small_cnn
            """
        )
    )
    cli = LightningCLI(
        ImageClassifier, DigitsDataModule, args=["fit", "--config", str(config)], save_config_callback=None
    )
    pruning = next(cb for cb in cli.trainer.callbacks if isinstance(cb, GradualPruning))
    monitor = next(cb for cb in cli.trainer.callbacks if isinstance(cb, CompressionMonitor))
    assert (pruning.amount, pruning.mode, pruning.criterion) == (0.6, "structured", "l2")
    # 60% of 16 and 32 channels, kept counts rounded to multiples of 8: 8 and 16 kept.
    assert [cli.model.net[0].out_channels, cli.model.net[3].out_channels] == [8, 16]
    assert monitor.report["summary"]["compression_rate"] > 1.5


def test_cli_rejects_a_bad_amount_before_training(tmp_path):
    with pytest.raises(ValueError, match="must be in \\[0, 1\\)"):
        LightningCLI(
            ImageClassifier,
            DigitsDataModule,
            args=[
                "fit",
                "--trainer.callbacks+=lightning_compress.GradualPruning",
                "--trainer.callbacks.amount=1.5",
                "--trainer.max_epochs=1",
            ],
            save_config_callback=None,
        )


def test_a_shipped_recipe_combines_with_model_and_trainer_arguments(tmp_path):
    from lightning_compress import LowRankReplacement, recipes

    cli = LightningCLI(
        ImageClassifier,
        DigitsDataModule,
        args=[
            "fit",
            "--config",
            str(recipes.path("low_rank")),
            "--model.arch=lenet_300_100",
            "--model.input_shape=[1, 8, 8]",
            "--trainer.max_steps=3",
            "--trainer.limit_val_batches=1",
            "--trainer.logger=false",
            "--trainer.enable_checkpointing=false",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}",
        ],
        save_config_callback=None,
    )
    low_rank = next(cb for cb in cli.trainer.callbacks if isinstance(cb, LowRankReplacement))
    assert cli.trainer.global_step == 3
    # LeNet-300-100 on 8x8 input: the 64->300 and 300->100 layers get factorized at about half their size.
    assert {"net.1", "net.3"} <= set(low_rank.layers)
    assert low_rank.layers["net.3"]["rank"] < 100


def real_tokens(inputs):
    """The positions of a padded batch that count (a function a YAML file names by its import path)."""
    return inputs["attention_mask"]


def keyword_inputs(batch):
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


class Tagger(TokenTagger):
    def train_dataloader(self):
        return dict_batches()


def test_function_arguments_are_given_by_import_path(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(
        textwrap.dedent(
            f"""
            trainer:
              max_steps: 2
              accelerator: cpu
              logger: false
              enable_checkpointing: false
              enable_progress_bar: false
              enable_model_summary: false
              default_root_dir: {tmp_path}
              callbacks:
                - class_path: lightning_compress.KnowledgeDistillation
                  init_args:
                    teacher: self
                    loss_mask: tests.test_cli.real_tokens
                - class_path: lightning_compress.GradualPruning
                  init_args:
                    amount: 0.5
                    criterion: wanda
                    start: 0.0
                    end: 0.0
                    modules: torch.nn.Linear
                    calibration_input: tests.test_cli.keyword_inputs
                    calibration_mask: tests.test_cli.real_tokens
            """
        )
    )
    cli = LightningCLI(Tagger, args=["fit", "--config", str(config)], save_config_callback=None)
    kd = next(cb for cb in cli.trainer.callbacks if isinstance(cb, KnowledgeDistillation))
    pruning = next(cb for cb in cli.trainer.callbacks if isinstance(cb, GradualPruning))
    named = lambda f: f"{f.__module__}.{f.__name__}"  # noqa: E731
    assert named(kd.loss_mask) == named(pruning.config.calibration_mask) == "tests.test_cli.real_tokens"
    assert named(pruning.config.calibration_input) == "tests.test_cli.keyword_inputs"
    assert cli.trainer.global_step == 2 and "distillation/kl" in cli.trainer.callback_metrics
    weights = [m.weight for m in cli.model.modules() if isinstance(m, torch.nn.Linear)]
    assert float(sum((w == 0).sum() for w in weights) / sum(w.numel() for w in weights)) == pytest.approx(0.5)
