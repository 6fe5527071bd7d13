"""Knowledge distillation: losses and a capture module (plain torch), and the KnowledgeDistillation callback."""

from lightning_compress.distillation.callback import FeatureLoss, KnowledgeDistillation
from lightning_compress.distillation.core import (
    DistillationCapture,
    DistillationConfig,
    Distilled,
    distill,
)
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
    "DistillationCapture",
    "DistillationConfig",
    "Distilled",
    "FeatureAdapter",
    "FeatureLoss",
    "KnowledgeDistillation",
    "attention_map",
    "attention_transfer_loss",
    "distill",
    "embedding_loss",
    "hint_loss",
    "hinton_loss",
    "make_adapter",
    "mix_losses",
    "top1_agreement",
]
