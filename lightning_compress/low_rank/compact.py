"""CompactConvReplacement: replace k×k convolutions by depthwise-separable ones, initialized from their weights.

The depthwise form of :mod:`lightning_compress.low_rank` (``conv="depthwise"``) as a callback: the lifecycle,
logging, checkpoints and distributed rules are those of :class:`LowRankReplacement`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
from torch import nn

from lightning_compress import _checks
from lightning_compress.low_rank.factorize import FACTORIZED, skip_reason
from lightning_compress.low_rank.replacement import LowRankReplacement
from lightning_compress.schedules import Point
from lightning_compress.selection import Selector

__all__ = ["CompactConvReplacement"]

_GLOB = set("*?[")


class CompactConvReplacement(LowRankReplacement):
    """Replace k×k ``nn.Conv2d`` layers by a depthwise k×k conv and a 1x1 conv (MobileNet style) before
    fine-tuning.

    Every selected convolution (``groups=1``, kernel larger than 1x1) becomes a
    :class:`~lightning_compress.low_rank.DepthwiseSeparableConv2d`: a depthwise conv with ``depth_multiplier``
    filters per input channel (same stride, padding and dilation), then a 1x1 conv with the original bias. The
    factors come from the layer's weights: per input channel ``i`` the slice ``W[:, i]`` (``out × k·k``) is cut to
    rank ``depth_multiplier`` by its truncated SVD ``U S Vᵀ``; the filters are the rows of ``Vᵀ``, the 1x1 weights
    ``U S``, the best approximation of that rank per slice (exact at ``min(out, k·k)``). With ``refine`` the 1x1
    weights are then refitted by least squares so that each layer's outputs on ``calibration_batches`` training
    batches match the original's. A layer whose replacement would not have fewer parameters and MACs
    (``in·r·(k·k + out)`` against ``out·in·k·k`` parameters) is left as it is, with the reason in
    :attr:`skipped`; so are 1x1 and grouped convolutions.

    The rest is :class:`LowRankReplacement`'s: when it replaces (``setup``, or ``start``), checkpoints (a resumed
    fit rebuilds the depthwise-separable layers before the weights load;
    :func:`~lightning_compress.low_rank.restore_low_rank` does it for a plain model) and DDP. It logs under
    ``compact/``: ``params_ratio``, ``macs_ratio``, ``replaced_layers``, ``skipped_layers``, and per layer
    ``per_layer/<stat>/<layer>`` for ``depth_multiplier``, ``weight_error`` (``‖W − Ŵ‖ / ‖W‖``, also in
    :attr:`records`), ``output_error`` (with ``refine``), ``params_ratio`` and ``macs_ratio``. In plain torch:
    ``low_rank_(model, LowRankConfig(conv="depthwise", rank=r, modules=nn.Conv2d))``. See ``docs/low_rank.md``.

    Args:
        depth_multiplier: filters per input channel, a positive ``int``.
        refine: refit the 1x1 weights on calibration batches (the training loader's first ones).
        calibration_batches: how many batches ``refine`` (and a data-aware ``method``) uses.
        modules: the convolutions to replace (``nn.Conv2d`` types and/or name patterns; patterns select the
            ``nn.Conv2d`` layers they match). A layer named exactly must be a k×k convolution.
        exclude: layers to leave alone.
        min_params: leave out layers with fewer parameters.
        method: ``"svd"`` (the SVD of each slice, the default), ``"whitened"`` or ``"asvd"`` (each input channel's
            patches whitened or scaled on their own first, from the calibration inputs).
        damping: ``refine``: how strongly the refitted 1x1 weights are held near their SVD values, relative;
            see :class:`~lightning_compress.low_rank.LowRankConfig` for the methods.
        layer_ranks: ``{layer name: depth multiplier}`` (an ``int``, or a ``float`` fraction of
            ``min(out, k·k)``) for the layers it names.
        calibration_input, example_input, per_layer, verbose, start: as for :class:`LowRankReplacement`.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> compact = CompactConvReplacement(depth_multiplier=2, refine=True)
        >>> trainer = Trainer(callbacks=[compact], max_epochs=1, logger=False)
        >>> compact.depth_multiplier, compact.config.conv
        (2, 'depthwise')
        >>> CompactConvReplacement(depth_multiplier=1.5)
        Traceback (most recent call last):
        ...
        TypeError: `depth_multiplier=1.5` must be a positive integer: the number of k×k filters per input channel, e.g. 1 or 2 (per layer, `layer_ranks` also takes a fraction of min(out, k·k)).
    """

    prefix = "compact/"
    # A budget prices the channel form's ranks; it hands none to this callback.
    budget_scheme = None

    def __init__(
        self,
        depth_multiplier: int = 1,
        refine: bool = False,
        calibration_batches: int = 8,
        modules: Selector = nn.Conv2d,
        exclude: Selector = None,
        min_params: int = 0,
        method: str = "svd",
        damping: float = 0.01,
        layer_ranks: dict[str, int | float] | None = None,
        calibration_input: Callable[[Any], Any] | None = None,
        example_input: Any = None,
        per_layer: bool = True,
        verbose: bool = True,
        start: Point | None = None,
    ) -> None:
        multiplier = _checks.check_depth_multiplier(depth_multiplier)
        super().__init__(
            rank=multiplier,
            method=method,
            conv="depthwise",
            modules=modules,
            exclude=exclude,
            min_params=min_params,
            calibration_batches=calibration_batches,
            calibration_input=calibration_input,
            example_input=example_input,
            damping=damping,
            per_layer=per_layer,
            verbose=verbose,
            start=start,
            layer_ranks=layer_ranks,
        )
        given = [modules] if isinstance(modules, type | str) else list(modules or [])
        self._named = [item for item in given if _exact(item)]
        self.config = dataclasses.replace(
            self.config, modules=_checks.check_compact_modules(modules), refine=refine
        )

    @property
    def depth_multiplier(self) -> int:
        """The depth multiplier of the layers ``layer_ranks`` does not name."""
        return self.config.rank  # type: ignore[return-value]

    def prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        modules = dict(pl_module.named_modules())
        _checks.check_compact_named(
            {name: why for name in self._named if name in modules and (why := _not_separable(modules[name]))}
        )
        super().prepare(trainer, pl_module)


def _exact(item: Any) -> bool:
    """A name rather than a pattern (or a type)."""
    return isinstance(item, str) and not item.startswith("re:") and not _GLOB & set(item)


def _not_separable(module: nn.Module) -> str | None:
    """Why ``module`` cannot take the depthwise form (``None``: it can, or it is already factorized)."""
    if isinstance(module, FACTORIZED):  # replaced by an earlier fit with this callback
        return None
    if not isinstance(module, nn.Conv2d):
        return f"{type(module).__name__} is not an nn.Conv2d"
    return skip_reason(module, "depthwise")
