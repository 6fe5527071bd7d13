"""Calibration statistics over the positions that count.

A calibration mask is a function from a model input to a boolean ``(batch, positions)`` tensor (e.g. the attention
mask of padded token ids): the layers' inputs count only at the positions it keeps. A layer input may hold the
positions batch first ``(batch, positions, ...)``, positions first ``(positions, batch, ...)`` (``nn.Transformer``'s
default) or flattened ``(batch·positions, ...)``, or not at all (a pooled ``(batch, features)``): a
:class:`PositionFilter` runs the model once on one sample of the first input, where these layouts differ, and
applies the mask to each input as it found it laid out.

Example::

    >>> from torch import nn
    >>> layer = nn.Linear(3, 2)
    >>> seen = []
    >>> positions = PositionFilter(lambda x: x["mask"])
    >>> handle = layer.register_forward_pre_hook(lambda m, args: seen.append(positions.rows("layer", args[0])))
    >>> x = {"input": torch.ones(2, 4, 3), "mask": torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])}
    >>> positions.run(lambda inputs: layer(inputs["input"]), x)
    >>> handle.remove()
    >>> seen[0] is None, tuple(seen[1].shape)  # the probe counts nothing; then the 5 real positions
    (True, (5, 3))
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import torch
from torch import Tensor

from lightning_compress._inputs import detach_input

LAYOUTS = ("batch_first", "positions_first", "flat")


class CalibrationMaskError(ValueError):
    """A position mask function (``calibration_mask``, ``loss_mask``) that failed or does not fit the model."""


def position_mask(
    calibration_mask: Callable[[Any], Any],
    model_input: Any,
    argument: str = "calibration_mask",
    takes: str = "what the model takes (after `calibration_input`)",
) -> Tensor:
    """The boolean ``(batch, positions)`` mask ``calibration_mask`` gives for ``model_input``, checked; errors name
    ``argument``, a function that takes ``takes``.

    Example::

        >>> position_mask(lambda x: x["attention_mask"], {"attention_mask": torch.tensor([[1, 1, 0]])})
        tensor([[ True,  True, False]])
    """
    try:
        mask = calibration_mask(model_input)
    except Exception as err:
        raise CalibrationMaskError(
            f"`{argument}` failed on the model input: {type(err).__name__}: {err}. It takes {takes}, e.g. "
            f"`{argument}=lambda x: x['attention_mask']`."
        ) from err
    binary = isinstance(mask, Tensor) and (
        mask.dtype == torch.bool or bool(((mask == 0) | (mask == 1)).all())
    )
    if binary and mask.dim() == 2:
        return mask.bool()
    got = repr(mask)
    if isinstance(mask, Tensor):
        got = f"a tensor of shape {tuple(mask.shape)}" + (
            " with values other than 0/1" if mask.dim() == 2 else ""
        )
    raise CalibrationMaskError(
        f"`{argument}` must return a (batch, positions) tensor of booleans or 0/1 (False / 0: leave the position "
        f"out), e.g. `{argument}=lambda x: x['attention_mask']`; it returned {got}."
    )


def input_layout(x: Tensor, mask: Tensor) -> str | None:
    """How a layer input ``x`` holds the positions of a ``(batch, positions)`` ``mask``: one of :data:`LAYOUTS`, or
    ``None`` (e.g. a pooled ``(batch, features)``). They differ for a mask of one sample and several positions.

    Example::

        >>> mask = torch.ones(1, 5, dtype=torch.bool)
        >>> [input_layout(torch.zeros(shape), mask) for shape in [(1, 5, 8), (5, 1, 8), (5, 8), (1, 8)]]
        ['batch_first', 'positions_first', 'flat', None]
    """
    batch, positions = mask.shape
    if x.dim() >= 3 and tuple(x.shape[:2]) == (batch, positions):
        return "batch_first"
    if x.dim() >= 3 and tuple(x.shape[:2]) == (positions, batch):
        return "positions_first"
    if x.dim() == 2 and x.shape[0] == batch * positions:
        return "flat"
    return None


def kept_rows(x: Tensor, mask: Tensor, layout: str | None) -> Tensor:
    """The rows of a layer input ``x`` at the positions ``mask`` keeps, ``x`` laid out as :func:`input_layout`
    says; all of ``x`` for the layout ``None`` (or a shape that does not fit it).

    Example::

        >>> x = torch.arange(12.0).reshape(2, 3, 2)
        >>> kept_rows(x, torch.tensor([[True, True, False], [True, False, False]]), "batch_first").tolist()
        [[0.0, 1.0], [2.0, 3.0], [6.0, 7.0]]
    """
    mask = mask.to(x.device)
    if layout == "positions_first":
        x = x.transpose(0, 1)
    if layout in ("batch_first", "positions_first") and tuple(x.shape[:2]) == tuple(mask.shape):
        return x[mask]
    if layout == "flat" and x.shape[0] == mask.numel():
        return x[mask.reshape(-1)]
    return x


class PositionFilter:
    """Applies ``calibration_mask`` (``None``: every position counts) to the layer inputs that forward hooks see
    while :meth:`run` calls the model.

    Hooks pass each input to :meth:`rows` under a key of their own (one per layer and argument) and count what it
    returns; ``None`` means the probe run (before the first input), which counts nothing.
    """

    def __init__(self, calibration_mask: Callable[[Any], Any] | None) -> None:
        self.function = calibration_mask
        self.mask: Tensor | None = None
        self.probing = False
        self.layouts: dict[Hashable, str | None] = {}
        self.probed = False

    def run(self, call: Callable[[Any], Any], model_input: Any) -> None:
        """``call(model_input)`` with its mask set; the first time, after a probe on the input's first sample."""
        if self.function is not None and not self.probed:
            self.probed = True
            one = detach_input(model_input, max_batch=1)
            self.mask, self.probing = position_mask(self.function, one), True
            try:
                call(one)
            finally:
                self.probing = False
            if not any(self.layouts.values()):
                raise CalibrationMaskError(
                    f"`calibration_mask` gave a mask of shape {tuple(self.mask.shape)} (batch, positions) for one "
                    "sample, and no calibrated layer's input holds those positions, laid out (batch, positions, "
                    "...), (positions, batch, ...) or (batch·positions, ...). Return the mask of the positions "
                    "the layers see (e.g. the attention mask of the input ids), or leave `calibration_mask` unset."
                )
        self.mask = None if self.function is None else position_mask(self.function, model_input)
        call(model_input)

    def whole(self, x: Tensor) -> Tensor | None:
        """An input the mask does not apply to (e.g. a convolution's): all of it; ``None`` while probing."""
        return None if self.probing else x

    def rows(self, key: Hashable, x: Tensor) -> Tensor | None:
        """The rows of ``x`` that count (all of it without a mask); ``None`` while probing."""
        if self.probing:
            assert self.mask is not None
            self.layouts[key] = input_layout(x, self.mask)
            return None
        return x if self.mask is None else kept_rows(x, self.mask, self.layouts.get(key))
