"""The teacher of a distillation: loaded from a LightningModule checkpoint, and fingerprinted for resuming."""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from lightning_compress.distillation.core import DistillationConfig, freeze_teacher

if TYPE_CHECKING:
    import lightning.pytorch as pl


def choose_teacher(
    teacher: nn.Module | str,
    teacher_class: type[pl.LightningModule] | None,
    original: Callable[[], nn.Module],
    config: DistillationConfig,
    at_fit_precision: Callable[[nn.Module], nn.Module],
) -> nn.Module:
    """The frozen teacher of a fit: the module given, the shared copy ``original()`` for ``"self"`` (a copy of it
    when the teacher has a precision of its own), or the one a checkpoint path holds. Without a precision of its
    own it runs at the student's: its weights converted as the fit converts the student (``at_fit_precision``)."""
    if isinstance(teacher, nn.Module):
        chosen = teacher
    elif teacher == "self":
        chosen = original() if config.teacher_dtype is None else copy.deepcopy(original())
    else:
        chosen = load_teacher(teacher, teacher_class)
    return freeze_teacher(chosen if config.teacher_dtype is not None else at_fit_precision(chosen), config)


def load_teacher(path: str, teacher_class: type[pl.LightningModule] | None) -> nn.Module:
    """Load a checkpoint teacher with its class; a mismatch says which keys and shapes differ."""
    assert teacher_class is not None, "a checkpoint teacher needs its class (checked at construction)"
    try:
        return teacher_class.load_from_checkpoint(path, map_location="cpu")
    except Exception as err:
        detail = _checkpoint_mismatch(path, teacher_class) or f"{type(err).__name__}: {err}."
        raise ValueError(
            f"`teacher={path!r}` does not match `teacher_class={teacher_class.__name__}`. {detail} Pass as "
            "`teacher_class` the LightningModule class that wrote the checkpoint (it is rebuilt from the "
            "hyperparameters saved in it), or pass the teacher as an nn.Module."
        ) from err


def _checkpoint_mismatch(path: str, teacher_class: type[pl.LightningModule]) -> str | None:
    """Which keys and shapes of a checkpoint's ``state_dict`` ``teacher_class`` lacks or holds differently."""
    try:
        # A checkpoint the user names as the teacher is loaded in full by Lightning anyway.
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        saved = checkpoint["state_dict"]
        hparams = dict(checkpoint.get("hyper_parameters") or {})
        parameters = inspect.signature(teacher_class.__init__).parameters
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            hparams = {k: v for k, v in hparams.items() if k in parameters}
        expected = teacher_class(**hparams).state_dict()
    except Exception:
        return None
    name = teacher_class.__name__
    missing = [k for k in expected if k not in saved]
    unexpected = [k for k in saved if k not in expected]
    shapes = [
        f"{k} {tuple(saved[k].shape)} in the checkpoint vs {tuple(expected[k].shape)}"
        for k in expected
        if k in saved and isinstance(saved[k], Tensor) and saved[k].shape != expected[k].shape
    ]
    parts = []
    if missing:
        parts.append(f"{name} has keys the checkpoint lacks: {_first(missing, ', ')}.")
    if unexpected:
        parts.append(f"The checkpoint has keys {name} lacks: {_first(unexpected, ', ')}.")
    if shapes:
        parts.append(f"Shapes differ: {_first(shapes, '; ')}.")
    return " ".join(parts) or None


def _first(items: list[str], separator: str, n: int = 4) -> str:
    shown = separator.join(items[:n])
    return shown if len(items) <= n else f"{shown} (and {len(items) - n} more)"


def fingerprint(model: nn.Module) -> list[float]:
    """Sums and sums of squares (float64) of every floating tensor: equal models, equal fingerprints.

    Example::

        >>> layer = nn.Linear(2, 1)
        >>> with torch.no_grad():
        ...     _ = layer.weight.fill_(1.0), layer.bias.fill_(-2.0)
        >>> fingerprint(layer)
        [0.0, 6.0]
    """
    total, squares = 0.0, 0.0
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.is_floating_point():
                t = tensor.detach().double()
                total += float(t.sum())
                squares += float(t.pow(2).sum())
    return [total, squares]


def same_fingerprint(a: Sequence[float], b: Sequence[float]) -> bool:
    """Whether two fingerprints are equal up to float64 rounding."""
    return all(math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-9) for x, y in zip(a, b, strict=True))


def check_same_teacher(saved: Sequence[float] | None, current: Sequence[float] | None) -> None:
    """The teacher rebuilt on resume must be the one a checkpoint was trained with (``saved`` fingerprint).

    Example::

        >>> check_same_teacher([1.0, 2.0], [1.0, 2.5])
        Traceback (most recent call last):
        ...
        ValueError: The teacher rebuilt for this resumed fit differs from the one the checkpoint was trained with. With teacher='self', build the student exactly as in the first run (e.g. load the same pretrained weights) before resuming; or use `save_teacher=True` to keep the teacher in the checkpoints.
    """
    if saved is not None and current is not None and not same_fingerprint(saved, current):
        raise ValueError(
            "The teacher rebuilt for this resumed fit differs from the one the checkpoint was trained with. "
            "With teacher='self', build the student exactly as in the first run (e.g. load the same "
            "pretrained weights) before resuming; or use `save_teacher=True` to keep the teacher in the "
            "checkpoints."
        )
