"""Knowledge distillation: losses (plain torch) and the KnowledgeDistillation callback."""

from lightning_compress.distillation.callback import FeatureLoss, KnowledgeDistillation
from lightning_compress.distillation.losses import (
    FeatureAdapter,
    attention_map,
    attention_transfer_loss,
    embedding_loss,
    hint_loss,
    hinton_loss,
    make_adapter,
    mix_losses,
    top1_agreement,
)

__all__ = [
    "FeatureAdapter",
    "FeatureLoss",
    "KnowledgeDistillation",
    "attention_map",
    "attention_transfer_loss",
    "embedding_loss",
    "hint_loss",
    "hinton_loss",
    "make_adapter",
    "mix_losses",
    "top1_agreement",
]
