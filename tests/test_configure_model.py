"""A LightningModule that builds its layers in ``configure_model`` (Lightning calls the hook after the callbacks'
``setup``): the callbacks compress the layers it builds, and the loaders rebuild a fresh one."""

import lightning.pytorch as pl
import pytest
import torch
from conftest import trainer_kwargs

from examples.models import ImageClassifier, small_cnn
from lightning_compress import (
    CompressionMonitor,
    GradualPruning,
    KnowledgeDistillation,
    LowRankReplacement,
    load_pruned_checkpoint,
)
from lightning_compress.low_rank import LowRankLinear


class LazyClassifier(ImageClassifier):
    """The digits classifier with its network built in ``configure_model``; ``idempotent=False`` builds a new one
    at every call (what Lightning asks the hook not to do)."""

    def __init__(self, idempotent: bool = True) -> None:
        super().__init__("small_cnn")
        self.idempotent = idempotent
        self.net = None

    def configure_model(self) -> None:
        if self.idempotent and self.net is not None:
            return
        self.net = small_cnn(image_size=8)


def _dense_params() -> int:
    return sum(p.numel() for p in small_cnn(image_size=8).parameters())


def test_the_callbacks_compress_the_layers_configure_model_builds(tmp_path, digits):
    low_rank = LowRankReplacement(rank=0.5, modules=["net.8"], verbose=False)
    pruning = GradualPruning(amount=0.5, end="step:2", modules=["net.0", "net.3"])
    monitor = CompressionMonitor(measure_latency=False, verbose=False)
    callbacks = [low_rank, pruning, KnowledgeDistillation("self"), monitor]
    model = LazyClassifier()
    pl.Trainer(**trainer_kwargs(tmp_path, max_steps=3, limit_val_batches=1), callbacks=callbacks).fit(
        model, datamodule=digits
    )
    assert isinstance(model.net[8], LowRankLinear)
    for index in (0, 3):
        weight = model.net[index].weight
        assert (weight == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)
    assert monitor.before.total_params == _dense_params()
    assert monitor.report["after"]["nonzero_params"] < monitor.report["before"]["nonzero_params"]


def test_a_fresh_lazy_module_loads_the_structured_checkpoint(tmp_path, digits):
    callbacks = [
        LowRankReplacement(rank=0.5, modules=["net.8"], verbose=False),
        GradualPruning(amount=0.5, mode="structured", end="step:2", modules=["net.0", "net.3"]),
    ]
    model = LazyClassifier()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=3, limit_val_batches=0), callbacks=callbacks)
    trainer.fit(model, datamodule=digits)
    assert model.net[0].out_channels == 8
    trainer.save_checkpoint(tmp_path / "pruned.ckpt")
    fresh = load_pruned_checkpoint(LazyClassifier(), tmp_path / "pruned.ckpt")
    x = torch.randn(4, 1, 8, 8)
    model.eval(), fresh.eval()
    assert torch.equal(fresh(x), model(x))


def test_a_configure_model_that_builds_new_layers_each_call_is_refused_at_setup(tmp_path, digits):
    model = LazyClassifier(idempotent=False)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=2), callbacks=[GradualPruning(amount=0.5)])
    with pytest.raises(ValueError, match=r"`LazyClassifier.configure_model` built new layers .* idempotent"):
        trainer.fit(model, datamodule=digits)
    assert trainer.global_step == 0


def test_a_hook_that_reads_the_trainer_builds_the_model_the_callbacks_compress(tmp_path, digits):
    class SizedByTheTrainer(LazyClassifier):
        def configure_model(self) -> None:
            if self.net is None:
                self.net = small_cnn(
                    image_size=8, width=8 * self.trainer.max_steps
                )  # widths from the Trainer

    model = SizedByTheTrainer()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=2), callbacks=[GradualPruning(amount=0.5)])
    trainer.fit(model, datamodule=digits)
    assert model.net[0].out_channels == 16
    assert (model.net[0].weight == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)


def test_example_inputs_are_cast_only_to_the_one_dtype_of_a_model():
    from lightning_compress._inputs import for_module

    x = torch.randn(2, 4)
    assert for_module(x, torch.nn.Linear(4, 2).bfloat16()).dtype == torch.bfloat16
    mixed = torch.nn.Sequential(torch.nn.Embedding(4, 4).bfloat16(), torch.nn.Linear(4, 2))  # casts by itself
    assert for_module(x, mixed).dtype == torch.float32


def test_a_bf16_true_fit_compresses_the_layers_configure_model_builds(tmp_path, digits):
    # The layers are built float32 at setup, as a model built in `__init__`; Lightning converts both after.
    model = LazyClassifier()
    trainer = pl.Trainer(
        **trainer_kwargs(tmp_path, max_steps=2, precision="bf16-true"),
        callbacks=[GradualPruning(amount=0.5, end="step:1"), KnowledgeDistillation("self")],
    )
    trainer.fit(model, datamodule=digits)
    assert model.net[0].weight.dtype == torch.bfloat16
    assert (model.net[0].weight == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)
