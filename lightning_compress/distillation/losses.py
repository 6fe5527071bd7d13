"""Distillation losses as plain-torch functions: soft targets, hints, attention transfer, embeddings."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# The argument checks, under the names this module has always exported.
from lightning_compress._checks import check_alpha as validate_alpha
from lightning_compress._checks import check_temperature as validate_temperature

EMBEDDING_METRICS = ("cosine", "mse")


def _flatten_classes(logits: Tensor) -> Tensor:
    # Classes on the last dimension; every other dimension (batch, sequence positions) is a row.
    return logits.reshape(-1, logits.shape[-1]) if logits.dim() != 2 else logits


def hinton_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Hinton et al. (2015) soft-target loss: ``T² · KL(softmax(z_t / T) ‖ softmax(z_s / T))``.

    The Kullback-Leibler divergence from the teacher's softened distribution to the student's, summed over the
    classes (last dimension) and averaged over every other position (the batch, and sequence positions for
    ``(batch, length, classes)`` logits). It equals the cross-entropy of the student against the teacher's soft
    targets minus the teacher's entropy, so its gradient is that of the paper; the factor ``T²`` keeps the
    gradient scale independent of the temperature, so it can be mixed with the task loss by a fixed ``alpha``
    (:func:`mix_losses`). Computed in float32 whatever the input precision.

    Args:
        student_logits: ``(..., classes)``, with gradients.
        teacher_logits: the same shape; used as targets (no gradient flows into them).
        temperature: softmax temperature ``T > 0``; the default 1 (the plain softmax) is
            :class:`~lightning_compress.distillation.KnowledgeDistillation`'s default too. Hinton et al. used 2
            to 20; higher values give more weight to the teacher's small logits.

    Example::

        >>> # T = 1: p_t = (0.5, 0.5), p_s = softmax(log 3, 0) = (0.75, 0.25);
        >>> # KL = 0.5 ln(0.5/0.75) + 0.5 ln(0.5/0.25) = 0.5 ln(4/3) = 0.1438
        >>> s, t = torch.tensor([[math.log(3.0), 0.0]]), torch.zeros(1, 2)
        >>> round(float(hinton_loss(s, t)), 4)  # the default T = 1
        0.1438
        >>> # T = 2: p_s = softmax(log √3, 0) = (√3, 1) / (√3 + 1); KL = ½ ln((√3 + 1)² / (4√3)) = 0.03725, x T²
        >>> round(float(hinton_loss(s, t, temperature=2.0)), 4)
        0.149
    """
    validate_temperature(temperature)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"Student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} "
            "differ in shape; soft targets need the same classes in the same order."
        )
    s = _flatten_classes(student_logits.float()) / temperature
    t = _flatten_classes(teacher_logits.detach().float()) / temperature
    kl = F.kl_div(F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1), reduction="batchmean", log_target=True)
    return kl * temperature**2


def mix_losses(task_loss: Tensor, distillation_loss: Tensor, alpha: float) -> Tensor:
    """``(1 - alpha) · task_loss + alpha · distillation_loss``: Hinton's weighted average of the two objectives.

    Args:
        task_loss: the loss against the labels.
        distillation_loss: the loss against the teacher.
        alpha: weight of the distillation loss, in ``[0, 1]``.

    Example::

        >>> float(mix_losses(torch.tensor(2.0), torch.tensor(4.0), alpha=0.25))
        2.5
    """
    alpha = validate_alpha(alpha)
    return (1.0 - alpha) * task_loss + alpha * distillation_loss


class FeatureAdapter(nn.Module):
    """A learned linear map from a student feature to the teacher's shape (the FitNets regressor).

    For feature maps ``(N, C, H, W)`` it is a 1x1 convolution from the student's to the teacher's channels,
    followed by adaptive average pooling when the spatial sizes differ; for vectors ``(N, D)`` and token
    sequences ``(N, L, D)`` it is a linear layer on the last dimension. The parameters are held directly (not
    as an ``nn.Conv2d``/``nn.Linear`` submodule) so that compression callbacks selecting layers by type leave
    the adapter alone.

    Args:
        student_shape: shape of one student feature, batch dimension included.
        teacher_shape: shape of the teacher feature it must match.
        generator: random source of the initialization (PyTorch's default for Linear/Conv2d layers).

    Example::

        >>> adapter = FeatureAdapter((2, 8, 6, 6), (2, 16, 3, 3))
        >>> tuple(adapter(torch.randn(2, 8, 6, 6)).shape)
        (2, 16, 3, 3)
        >>> tuple(FeatureAdapter((4, 10, 32), (4, 10, 48))(torch.randn(4, 10, 32)).shape)
        (4, 10, 48)
    """

    def __init__(
        self,
        student_shape: tuple[int, ...],
        teacher_shape: tuple[int, ...],
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        student_shape, teacher_shape = tuple(student_shape), tuple(teacher_shape)
        if len(student_shape) != len(teacher_shape) or len(student_shape) not in (2, 3, 4):
            raise ValueError(
                f"Cannot map a student feature of shape {student_shape} to a teacher feature of shape "
                f"{teacher_shape}: adapters handle (N, D) vectors, (N, L, D) sequences and (N, C, H, W) maps "
                "of the same rank. Choose layers whose outputs have matching ranks."
            )
        self.conv = len(student_shape) == 4
        channel = 1 if self.conv else -1
        if not self.conv and student_shape[:-1][1:] != teacher_shape[:-1][1:]:
            raise ValueError(
                f"Student feature {student_shape} and teacher feature {teacher_shape} differ in a dimension "
                "other than the feature dimension (last); an adapter only maps features."
            )
        self.in_features, self.out_features = student_shape[channel], teacher_shape[channel]
        self.output_size = teacher_shape[2:] if self.conv and student_shape[2:] != teacher_shape[2:] else None
        self.weight = nn.Parameter(torch.empty(self.out_features, self.in_features))
        self.bias = nn.Parameter(torch.empty(self.out_features))
        # nn.Linear / nn.Conv2d's default initialization, from a private generator so that creating an
        # adapter leaves the global random stream alone.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5), generator=generator)
        bound = 1.0 / math.sqrt(self.in_features)
        nn.init.uniform_(self.bias, -bound, bound, generator=generator)

    def forward(self, feature: Tensor) -> Tensor:
        if not self.conv:
            return F.linear(feature, self.weight, self.bias)
        out = F.conv2d(feature, self.weight[:, :, None, None], self.bias)
        if self.output_size is not None:
            out = F.adaptive_avg_pool2d(out, self.output_size)
        return out

    def extra_repr(self) -> str:
        kind = "1x1 conv" if self.conv else "linear"
        pool = f", pooled to {tuple(self.output_size)}" if self.output_size is not None else ""
        return f"{kind} {self.in_features} -> {self.out_features}{pool}"


def make_adapter(
    student_shape: tuple[int, ...], teacher_shape: tuple[int, ...], generator: torch.Generator | None = None
) -> FeatureAdapter | None:
    """The :class:`FeatureAdapter` that maps a student feature to the teacher's shape, or ``None`` if equal.

    Example::

        >>> make_adapter((2, 16, 7, 7), (2, 16, 7, 7)) is None
        True
        >>> make_adapter((2, 8, 7, 7), (2, 16, 7, 7))
        FeatureAdapter(1x1 conv 8 -> 16)
    """
    if tuple(student_shape) == tuple(teacher_shape):
        return None
    return FeatureAdapter(student_shape, teacher_shape, generator=generator)


def _check_same_shape(student: Tensor, teacher: Tensor, what: str) -> None:
    if student.shape != teacher.shape:
        raise ValueError(
            f"{what}: the student feature {tuple(student.shape)} and the teacher feature "
            f"{tuple(teacher.shape)} differ in shape; pass an adapter (see `make_adapter`)."
        )


def hint_loss(student_feature: Tensor, teacher_feature: Tensor, adapter: nn.Module | None = None) -> Tensor:
    """FitNets (Romero et al. 2015) hint loss: mean squared error between ``adapter(student)`` and the teacher.

    The adapter (the paper's regressor) is trained with the student; without one the shapes must be equal.
    The paper's ``½‖·‖²`` summed over the feature is replaced by the mean over all entries, which keeps the
    scale independent of the feature size (multiply by the weight of the term to compare).

    Args:
        student_feature: the student's guided layer output, with gradients.
        teacher_feature: the teacher's hint layer output (no gradient flows into it).
        adapter: maps the student feature to the teacher's shape, e.g. from :func:`make_adapter`.

    Example::

        >>> # differences 1 and 3 -> (1 + 9) / 2
        >>> float(hint_loss(torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 5.0]])))
        5.0
    """
    mapped = adapter(student_feature) if adapter is not None else student_feature
    _check_same_shape(mapped, teacher_feature, "hint_loss")
    return F.mse_loss(mapped.float(), teacher_feature.detach().float())


def attention_map(feature: Tensor, p: float = 2.0) -> Tensor:
    """Spatial attention map of Zagoruyko & Komodakis (2017): ``F(A) = Σ_c |A_c|^p``, flattened, L2-normalized.

    Averaged rather than summed over channels (as in the authors' code), which changes nothing after the
    normalization.

    Args:
        feature: ``(N, C, *spatial)`` activations.
        p: the power (the paper uses 2).

    Example::

        >>> a = torch.zeros(1, 2, 2, 2)
        >>> a[0, :, 0, 0] = 1.0  # all the activation at one position
        >>> attention_map(a)
        tensor([[1., 0., 0., 0.]])
    """
    if feature.dim() < 3:
        raise ValueError(
            f"Attention transfer needs feature maps (N, C, H, W) or (N, C, L); got shape {tuple(feature.shape)}."
        )
    return F.normalize(feature.float().abs().pow(p).mean(1).flatten(1), dim=1)


def attention_transfer_loss(student_feature: Tensor, teacher_feature: Tensor, p: float = 2.0) -> Tensor:
    """Attention transfer (Zagoruyko & Komodakis 2017): squared distance between normalized attention maps.

    ``mean over batch and positions of (Q_s - Q_t)²`` with ``Q = attention_map(feature)``, as in the authors'
    reference code (their ``β = 1000`` is the weight of the term). Channel counts may differ; when the spatial
    sizes differ the larger map is average-pooled to the smaller one.

    Args:
        student_feature: ``(N, C_s, H, W)``, with gradients.
        teacher_feature: ``(N, C_t, H', W')``.
        p: the power of :func:`attention_map`.

    Example::

        >>> s = torch.zeros(1, 3, 1, 2); s[0, :, 0, 0] = 1.0  # student attends to position 0
        >>> t = torch.zeros(1, 5, 1, 2); t[0, :, 0, 1] = 2.0  # teacher attends to position 1
        >>> float(attention_transfer_loss(s, t))  # Q_s = (1, 0), Q_t = (0, 1): (1 + 1) / 2 positions
        1.0
    """
    if student_feature.shape[0] != teacher_feature.shape[0]:
        raise ValueError(
            f"Student and teacher features have different batch sizes ({student_feature.shape[0]} vs "
            f"{teacher_feature.shape[0]})."
        )
    s_size, t_size = student_feature.shape[2:], teacher_feature.shape[2:]
    if s_size != t_size:
        if len(s_size) != 2 or len(t_size) != 2:
            raise ValueError(
                f"Attention maps of spatial sizes {tuple(s_size)} and {tuple(t_size)} cannot be matched."
            )
        smaller = min(s_size, t_size, key=lambda size: size[0] * size[1])
        if s_size != smaller:
            student_feature = F.adaptive_avg_pool2d(student_feature, smaller)
        if t_size != smaller:
            teacher_feature = F.adaptive_avg_pool2d(teacher_feature, smaller)
    q_s = attention_map(student_feature, p)
    q_t = attention_map(teacher_feature.detach(), p)
    return (q_s - q_t).pow(2).mean()


def embedding_loss(
    student_embedding: Tensor,
    teacher_embedding: Tensor,
    metric: str = "cosine",
    adapter: nn.Module | None = None,
) -> Tensor:
    """Distance between student and teacher embeddings (encoders without logits, e.g. sentence embedders).

    ``"cosine"``: ``1 - cos(s, t)`` along the last dimension, averaged over the other dimensions (0 when the
    directions agree, 2 when opposite); ``"mse"``: the mean squared error.

    Args:
        student_embedding: ``(..., D)``, with gradients.
        teacher_embedding: ``(..., D')``; ``D' != D`` needs an ``adapter``.
        metric: ``"cosine"`` or ``"mse"``.
        adapter: maps the student embedding to the teacher's dimension.

    Example::

        >>> s, t = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([[3.0, 0.0], [2.0, 0.0]])
        >>> float(embedding_loss(s, t, "cosine"))  # cos = 1 and 0
        0.5
        >>> float(embedding_loss(s, t, "mse"))  # (4 + 0 + 4 + 4) / 4
        3.0
    """
    if metric not in EMBEDDING_METRICS:
        raise ValueError(
            f"Unknown `metric={metric!r}`. Use one of {', '.join(map(repr, EMBEDDING_METRICS))}."
        )
    mapped = adapter(student_embedding) if adapter is not None else student_embedding
    _check_same_shape(mapped, teacher_embedding, "embedding_loss")
    s, t = mapped.float(), teacher_embedding.detach().float()
    if metric == "mse":
        return F.mse_loss(s, t)
    return (1.0 - F.cosine_similarity(s, t, dim=-1)).mean()


def top1_agreement(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Fraction of rows (positions) where the student's and the teacher's top class are the same.

    Example::

        >>> s = torch.tensor([[2.0, 1.0], [0.0, 1.0], [5.0, 0.0]])
        >>> t = torch.tensor([[1.0, 0.0], [1.0, 0.0], [3.0, 1.0]])
        >>> round(float(top1_agreement(s, t)), 4)
        0.6667
    """
    s, t = _flatten_classes(student_logits.detach()), _flatten_classes(teacher_logits.detach())
    return (s.argmax(-1) == t.argmax(-1)).float().mean()
