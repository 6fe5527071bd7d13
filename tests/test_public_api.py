"""The names the package promises at its root and in each scheme package resolve to the implementations."""

import importlib

import pytest

import lightning_compress


def test_every_name_in_the_root_all_resolves():
    missing = [name for name in lightning_compress.__all__ if not hasattr(lightning_compress, name)]
    assert missing == []


@pytest.mark.parametrize(
    ("name", "module"),
    [
        ("FeatureLoss", "lightning_compress.distillation.callback"),
        ("load_pruned_checkpoint", "lightning_compress.pruning.gradual"),
        ("restore_low_rank", "lightning_compress.low_rank.replacement"),
        ("load_qat_checkpoint", "lightning_compress.quantization.qat"),
    ],
)
def test_loaders_and_feature_loss_are_exported_from_the_root(name, module):
    assert getattr(lightning_compress, name) is getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("package", ["pruning", "low_rank", "distillation", "quantization"])
def test_each_scheme_package_re_exports_its_public_names(package):
    module = importlib.import_module(f"lightning_compress.{package}")
    assert module.__all__ and [name for name in module.__all__ if not hasattr(module, name)] == []
    assert (
        lightning_compress.GradualPruning
        is importlib.import_module("lightning_compress.pruning").GradualPruning
    )
