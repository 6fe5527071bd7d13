"""Low-rank factorizations of Linear and Conv2d layers, data-aware whitening and rank selection rules, in plain torch.

A weight ``W`` is replaced by a product of thinner factors:

- ``nn.Linear`` → :class:`LowRankLinear`: ``in → rank → out`` from the truncated SVD ``W ≈ (U√S)(√S Vᵀ)``,
  the bias kept on the second layer.
- ``nn.Conv2d`` → :class:`TuckerConv2d` (Tucker-2, Kim et al. 2016): a 1x1 conv to ``rank_in`` channels, the
  k×k core to ``rank_out`` channels, a 1x1 conv back to the output channels.
- ``nn.Conv2d`` → :class:`LowRankConv2d` (channel decomposition, Zhang et al. 2015): a k×k conv with ``rank``
  filters, then a 1x1 conv; the SVD of the weight reshaped to ``(out, in·k·k)``. 1x1 convs always take this form.
- ``nn.Conv2d`` → :class:`DepthwiseSeparableConv2d` (MobileNet style): a depthwise k×k conv with ``rank`` filters
  per input channel (the depth multiplier), then a 1x1 conv; per input channel ``i`` the truncated SVD of the slice
  ``W[:, i]`` reshaped to ``(out, k·k)``, ``U S Vᵀ``: the filters are the rows of ``Vᵀ``, the 1x1 weights ``U S``.
  1x1 and grouped convs are not split this way.

The factors come from the current weights, so at full rank the replacement computes the same function.
``method`` chooses what the truncation keeps:

- ``"svd"``: the best approximation of the weights (no data needed);
- ``"whitened"`` (SVD-LLM style): the best approximation of the layer's *outputs* on calibration inputs. With the
  input Gram matrix ``XᵀX/n = L Lᵀ`` (Cholesky, damped by ``damping · mean(diag)``), the SVD is taken of ``W L``
  and the input factor is mapped back through ``L⁻¹``;
- ``"asvd"`` (ASVD style): the cheap variant; the input columns are scaled by ``mean|x|^activation_exponent`` instead of ``L``.

The depthwise form whitens (or scales) each input channel's k×k patches on their own; with ``refine`` it then refits
its 1x1 weights by least squares so that the layer's outputs on the calibration inputs match the original's.
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_compress._checks import UNSET, renamed

METHODS = ("svd", "whitened", "asvd")
CONV_DECOMPOSITIONS = ("tucker", "channel", "depthwise")
Rank = int | tuple[int, int]

# Alternating refinement of the two Tucker factors after the HOSVD start; each sweep can only lower the error.
_TUCKER_SWEEPS = 2


def _empty(module_type: type[nn.Module], *args: object, **kwargs: object) -> nn.Module:
    # Zeros without drawing from the global random generator, so rebuilding a structure to load weights into
    # cannot shift the random stream of the training run.
    given = {key: value for key, value in kwargs.items() if value is not None}
    module = nn.utils.skip_init(module_type, *args, **given)
    for param in module.parameters():
        nn.init.zeros_(param)
    return module


class LowRankLinear(nn.Sequential):
    """A linear layer as two thinner ones: ``in_features → rank → out_features``; the bias sits on ``second``.

    Weights start at zero; :func:`factorize` fills them from a trained layer.

    Args:
        in_features: input features.
        out_features: output features.
        rank: width of the middle.
        bias: whether ``second`` has a bias.
        device: device of the parameters.
        dtype: dtype of the parameters.

    Example::

        >>> layer = LowRankLinear(8, 4, rank=2)
        >>> layer
        LowRankLinear(
          (first): Linear(in_features=8, out_features=2, bias=False)
          (second): Linear(in_features=2, out_features=4, bias=True)
        )
        >>> tuple(layer(torch.ones(3, 8)).shape), tuple(layer.dense_weight().shape)
        ((3, 4), (4, 8))
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        kw = {"device": device, "dtype": dtype}
        super().__init__(
            OrderedDict(
                first=_empty(nn.Linear, in_features, rank, bias=False, **kw),
                second=_empty(nn.Linear, rank, out_features, bias=bias, **kw),
            )
        )
        self.rank = rank

    def dense_weight(self) -> Tensor:
        """The ``(out_features, in_features)`` weight this product computes."""
        return self.second.weight @ self.first.weight

    # Read as an `nn.Linear`'s by code that takes the weights of a layer instead of calling it: the eval-mode fused
    # path of `nn.TransformerEncoderLayer`/`nn.TransformerEncoder` reads `linear1.weight` and `linear1.bias`.
    weight = property(dense_weight, doc="The dense weight (computed; the parameters are the two factors).")
    bias = property(lambda self: self.second.bias, doc="The bias (``second``'s).")


class LowRankConv2d(nn.Sequential):
    """A convolution as a k×k conv with ``rank`` filters followed by a 1x1 conv (channel decomposition).

    ``first`` keeps the original kernel size, stride, padding and dilation; ``second`` carries the bias.
    Weights start at zero; :func:`factorize` fills them from a trained layer.

    Example::

        >>> conv = LowRankConv2d(3, 8, kernel_size=3, rank=2, padding=1)
        >>> [tuple(p.shape) for p in conv.parameters()]
        [(2, 3, 3, 3), (8, 2, 1, 1), (8,)]
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        rank: int,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        kw = {"device": device, "dtype": dtype}
        first = _empty(
            nn.Conv2d,
            in_channels,
            rank,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            bias=False,
            padding_mode=padding_mode,
            **kw,
        )
        second = _empty(nn.Conv2d, rank, out_channels, 1, bias=bias, **kw)
        super().__init__(OrderedDict(first=first, second=second))
        self.rank = rank

    def dense_weight(self) -> Tensor:
        """The ``(out, in, kh, kw)`` weight this product computes."""
        first = self.first.weight
        return (self.second.weight.flatten(1) @ first.flatten(1)).reshape(-1, *first.shape[1:])


class TuckerConv2d(nn.Sequential):
    """A convolution as Tucker-2: 1x1 to ``ranks[0]`` channels, the k×k core to ``ranks[1]``, 1x1 back out.

    The core keeps the original kernel size, stride, padding and dilation; ``last`` carries the bias.
    Weights start at zero; :func:`factorize` fills them from a trained layer.

    Example::

        >>> conv = TuckerConv2d(16, 32, kernel_size=3, ranks=(4, 8), padding=1)
        >>> [tuple(p.shape) for p in conv.parameters()]
        [(4, 16, 1, 1), (8, 4, 3, 3), (32, 8, 1, 1), (32,)]
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        ranks: tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        kw = {"device": device, "dtype": dtype}
        rank_in, rank_out = ranks
        core = _empty(
            nn.Conv2d,
            rank_in,
            rank_out,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            bias=False,
            padding_mode=padding_mode,
            **kw,
        )
        super().__init__(
            OrderedDict(
                first=_empty(nn.Conv2d, in_channels, rank_in, 1, bias=False, **kw),
                core=core,
                last=_empty(nn.Conv2d, rank_out, out_channels, 1, bias=bias, **kw),
            )
        )
        self.ranks = (rank_in, rank_out)

    def dense_weight(self) -> Tensor:
        """The ``(out, in, kh, kw)`` weight this product computes."""
        return torch.einsum(
            "oa,abij,bc->ocij", self.last.weight[:, :, 0, 0], self.core.weight, self.first.weight[:, :, 0, 0]
        )


class DepthwiseSeparableConv2d(nn.Sequential):
    """A convolution as a depthwise k×k conv with ``rank`` filters per input channel, then a 1x1 conv.

    ``depthwise`` (``groups=in_channels``, ``in_channels·rank`` outputs, channel ``i·rank + j`` being filter ``j`` of
    input channel ``i``) keeps the original kernel size, stride, padding and dilation; ``pointwise`` carries the
    bias. ``rank`` is the depth multiplier. Weights start at zero; :func:`factorize` fills them from a trained layer.

    Example::

        >>> conv = DepthwiseSeparableConv2d(4, 8, kernel_size=3, rank=2, padding=1)
        >>> [tuple(p.shape) for p in conv.parameters()], conv.depthwise.groups
        ([(8, 1, 3, 3), (8, 8, 1, 1), (8,)], 4)
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        rank: int,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        kw = {"device": device, "dtype": dtype}
        depthwise = _empty(
            nn.Conv2d,
            in_channels,
            in_channels * rank,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=in_channels,
            bias=False,
            padding_mode=padding_mode,
            **kw,
        )
        pointwise = _empty(nn.Conv2d, in_channels * rank, out_channels, 1, bias=bias, **kw)
        super().__init__(OrderedDict(depthwise=depthwise, pointwise=pointwise))
        self.rank = rank

    def dense_weight(self) -> Tensor:
        """The ``(out, in, kh, kw)`` weight this product computes."""
        filters = self.depthwise.weight
        in_channels = self.depthwise.in_channels
        pointwise = self.pointwise.weight.reshape(-1, in_channels, self.rank)
        return torch.einsum(
            "oij,ijhw->oihw", pointwise, filters.reshape(in_channels, self.rank, *filters.shape[2:])
        )


FACTORIZED = (LowRankLinear, LowRankConv2d, TuckerConv2d, DepthwiseSeparableConv2d)


# -- which layers, in which form ----------------------------------------------------------------------


def skip_reason(layer: nn.Module, conv: str = "tucker") -> str | None:
    """Why ``layer`` cannot be factorized (in the form ``conv`` for a convolution), or ``None`` when it can.

    Only plain ``nn.Linear`` and ``nn.Conv2d`` are factorized: subclasses may have users that read ``.weight``
    directly (``nn.MultiheadAttention`` does with its ``out_proj``), and a grouped or depthwise convolution is
    already factorized along its channels. ``conv="depthwise"`` leaves 1x1 convolutions out: they have no k×k
    kernel to split into per-channel filters.

    Example::

        >>> skip_reason(nn.Linear(4, 4)) is None
        True
        >>> skip_reason(nn.Conv2d(8, 8, 3, groups=8))
        'grouped convolution (groups=8): its channels are already split, there is no full matrix to factorize'
        >>> skip_reason(nn.Conv2d(8, 8, 1), conv="depthwise")
        "1x1 convolution: `conv='depthwise'` splits k×k kernels into per-channel filters, a 1x1 kernel has none"
    """
    if type(layer) is nn.Linear:
        return None
    if type(layer) is nn.Conv2d:
        if layer.groups != 1:
            return (
                f"grouped convolution (groups={layer.groups}): its channels are already split, "
                "there is no full matrix to factorize"
            )
        if conv == "depthwise" and tuple(layer.kernel_size) == (1, 1):
            return (
                "1x1 convolution: `conv='depthwise'` splits k×k kernels into per-channel filters, a 1x1 kernel "
                "has none"
            )
        return None
    if isinstance(layer, nn.Linear | nn.Conv2d):
        base = "nn.Linear" if isinstance(layer, nn.Linear) else "nn.Conv2d"
        return f"{type(layer).__name__} subclasses {base}; its users may read `.weight` directly"
    return f"{type(layer).__name__} is not an nn.Linear or nn.Conv2d"


def layer_kind(layer: nn.Module, conv: str = "tucker") -> str:
    """The form a layer takes: ``"linear"``, ``"tucker"``, ``"channel"`` or ``"depthwise"`` (1x1 convs are
    ``"channel"``, and refused by ``conv="depthwise"``).

    Example::

        >>> layer_kind(nn.Conv2d(4, 4, 3)), layer_kind(nn.Conv2d(4, 4, 1)), layer_kind(nn.Conv2d(4, 4, 3), "channel")
        ('tucker', 'channel', 'channel')
    """
    _check_choice(conv, CONV_DECOMPOSITIONS, "conv")
    reason = skip_reason(layer, conv)
    if reason is not None:
        raise ValueError(f"Cannot factorize this layer: {reason}.")
    if isinstance(layer, nn.Linear):
        return "linear"
    if tuple(layer.kernel_size) == (1, 1):
        return "channel"
    return conv


def layer_features(layer: nn.Module, inputs: Tensor, kind: str) -> Tensor:
    """The rows a layer multiplies its weight with, shaped ``(rows, features)``, for input statistics.

    ``"linear"``: the input's last dimension; ``"channel"`` and ``"depthwise"``: the k×k patches the convolution
    sees (``in·k·k`` features, ordered as the weight); ``"tucker"``: the input channels at every position.

    Example::

        >>> conv = nn.Conv2d(2, 4, 3, padding=1)
        >>> tuple(layer_features(conv, torch.zeros(5, 2, 6, 6), "channel").shape)
        (180, 18)
        >>> tuple(layer_features(conv, torch.zeros(5, 2, 6, 6), "tucker").shape)
        (180, 2)
    """
    if kind == "linear":
        return inputs.reshape(-1, inputs.shape[-1])
    if kind == "tucker":
        return inputs.movedim(1, -1).reshape(-1, inputs.shape[1])
    padding = layer.padding
    if isinstance(padding, str):
        # 'same' pads (k-1)·d/2 on each side; for even kernels torch pads one more on one side, which
        # statistics over many positions do not notice.
        padding = (
            tuple(d * (k - 1) // 2 for k, d in zip(layer.kernel_size, layer.dilation, strict=True))
            if padding == "same"
            else (0, 0)
        )
    patches = F.unfold(inputs, layer.kernel_size, layer.dilation, padding, layer.stride)
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])


@dataclass
class InputStatistics:
    """Statistics of a layer's inputs, accumulated over calibration batches (in float64).

    Args:
        gram: ``Σ x xᵀ`` over all rows (for ``method="whitened"``), or ``None``.
        abs_sum: ``Σ |x|`` per feature (for ``method="asvd"``), or ``None``.
        count: number of rows.

    Example::

        >>> stats = InputStatistics()
        >>> stats.update(torch.tensor([[1.0, 2.0], [3.0, -4.0]]))
        >>> stats.gram.tolist(), stats.mean_abs.tolist(), stats.count
        ([[10.0, -10.0], [-10.0, 20.0]], [2.0, 3.0], 2)
    """

    gram: Tensor | None = None
    abs_sum: Tensor | None = None
    count: int = 0

    def update(self, features: Tensor, gram: bool = True) -> None:
        """Add rows ``(rows, features)``; with ``gram=False`` only the cheap ``Σ |x|`` is kept."""
        x = features.detach().reshape(-1, features.shape[-1]).to(torch.float64)
        abs_sum = x.abs().sum(0)
        self.abs_sum = abs_sum if self.abs_sum is None else self.abs_sum + abs_sum
        if gram:
            product = x.T @ x
            self.gram = product if self.gram is None else self.gram + product
        self.count += x.shape[0]

    @property
    def mean_gram(self) -> Tensor | None:
        """``E[x xᵀ]``, or ``None`` without a Gram matrix."""
        return None if self.gram is None or self.count == 0 else self.gram / self.count

    @property
    def mean_abs(self) -> Tensor | None:
        """``E|x|`` per feature."""
        return None if self.abs_sum is None or self.count == 0 else self.abs_sum / self.count


# -- the decomposition ----------------------------------------------------------------------------------


def _check_choice(value: str, choices: Sequence[str], name: str) -> str:
    if isinstance(value, str) and value in choices:
        return value
    raise ValueError(f"Unknown `{name}={value!r}`. Use one of {', '.join(repr(c) for c in choices)}.")


def _input_transform(
    stats: InputStatistics | None, method: str, features: int, damping: float, exponent: float
) -> tuple[Tensor, Tensor] | None:
    """``(T, T⁻¹)`` for the input side: the SVD is taken of ``W T`` and the input factor mapped back by ``T⁻¹``."""
    if method == "svd":
        return None
    if stats is None or stats.count == 0:
        raise ValueError(
            f"`method={method!r}` needs statistics of the layer's inputs (calibration data); "
            "pass `stats` or use `method='svd'`."
        )
    if method == "asvd":
        mean_abs = stats.mean_abs
        assert mean_abs is not None
        scale = mean_abs.clamp_min(0.0) ** exponent
        # Dead inputs would make the scale vanish and its inverse explode; `damping` sets the floor.
        floor = max(float(scale.mean()) * damping, torch.finfo(torch.float64).tiny)
        scale = scale.clamp_min(floor)
        return torch.diag(scale), torch.diag(1.0 / scale)
    gram = stats.mean_gram
    if gram is None:
        raise ValueError("`method='whitened'` needs the Gram matrix of the inputs (`InputStatistics.gram`).")
    if gram.shape != (features, features):
        raise ValueError(
            f"The input statistics have {gram.shape[0]} features, the layer expects {features}: "
            "collect them with `layer_features` for the same kind of decomposition."
        )
    mean_diag = float(torch.diagonal(gram).mean())
    if mean_diag <= 0.0:
        return None
    eye = torch.eye(features, dtype=torch.float64, device=gram.device)
    damped = gram + damping * mean_diag * eye
    factor, info = torch.linalg.cholesky_ex(damped)
    if int(info) != 0:
        # Round-off can leave a damped Gram matrix indefinite; a symmetric square root is as good a whitener.
        values, vectors = torch.linalg.eigh(damped)
        values = values.clamp_min(damping * mean_diag)
        return vectors * values.sqrt(), (vectors / values.sqrt()).T
    return factor, torch.linalg.solve_triangular(factor, eye, upper=False)


def _blocks(matrix: Tensor, channels: int) -> Tensor:
    """The diagonal blocks of a ``(channels·t, channels·t)`` matrix, shaped ``(channels, t, t)``."""
    taps = matrix.shape[0] // channels
    return matrix.reshape(channels, taps, channels, taps).diagonal(dim1=0, dim2=2).permute(2, 0, 1)


def _channel_transforms(
    stats: InputStatistics | None, method: str, channels: int, features: int, damping: float, exponent: float
) -> tuple[Tensor, Tensor] | None:
    """Per input channel ``(T_i, T_i⁻¹)`` over its k·k taps, shaped ``(channels, k·k, k·k)``: the depthwise form
    whitens (or scales) the patches of each channel on their own, so that each channel's truncation is the best
    for that channel's share of the output (correlations between channels are not seen)."""
    if method == "svd":
        return None
    gram = None if stats is None else stats.mean_gram
    if method == "asvd" or gram is None:  # a diagonal transform; without statistics this raises
        scale, unscale = _input_transform(stats, method, features, damping, exponent)  # type: ignore[misc]
        return _blocks(scale, channels), _blocks(unscale, channels)
    if gram.shape != (features, features):
        raise ValueError(
            f"The input statistics have {gram.shape[0]} features, the layer expects {features}: "
            "collect them with `layer_features` for the same kind of decomposition."
        )
    mean_diag = float(torch.diagonal(gram).mean())
    if mean_diag <= 0.0:
        return None
    taps = features // channels
    floor = max(damping * mean_diag, torch.finfo(torch.float64).tiny)
    eye = torch.eye(taps, dtype=torch.float64, device=gram.device)
    values, vectors = torch.linalg.eigh(_blocks(gram, channels) + damping * mean_diag * eye)
    root = values.clamp_min(floor).sqrt()[:, None, :]
    return vectors * root, (vectors / root).transpose(1, 2)


def _top_left_vectors(matrix: Tensor, rank: int) -> Tensor:
    return torch.linalg.svd(matrix, full_matrices=False)[0][:, :rank]


class Decomposition:
    """The full factorization of one layer, from which replacements of any rank are cut.

    Built by :func:`decompose`. ``singular_values`` are those of the (whitened) weight for the ``"linear"`` and
    ``"channel"`` forms; for ``"tucker"`` there are two spectra, ``input_singular_values`` (over the input
    channels) and ``output_singular_values``. For ``"depthwise"``, ``channel_singular_values`` (``(in, q)``,
    ``q = min(out, k·k)``) are those of every input channel's slice, and ``singular_values`` their root sum of
    squares over the channels, ``sqrt(Σ_i σ_ij²)``: the energy a depth multiplier keeps, as for the other forms.
    A rank is an ``int`` (the depth multiplier for ``"depthwise"``), or ``(rank_in, rank_out)`` for Tucker.
    """

    def __init__(
        self,
        layer: nn.Module,
        kind: str,
        transform: tuple[Tensor, Tensor] | None,
        stats: InputStatistics | None,
        refine: bool = False,
        damping: float = 0.01,
    ) -> None:
        self.layer = layer
        self.kind = kind
        self.stats = stats
        self.refine = refine
        self.damping = damping
        weight = layer.weight.detach().to(torch.float64)
        self._weight = weight
        scale, unscale = transform if transform is not None else (None, None)
        self._unscale = unscale
        if kind == "depthwise":
            slices = weight.flatten(2).transpose(0, 1)  # (in, out, k·k)
            m = slices if scale is None else slices @ scale
            self._u, self.channel_singular_values, self._vh = torch.linalg.svd(m, full_matrices=False)
            self.singular_values = self.channel_singular_values.square().sum(0).sqrt()
            self.full_rank: Rank = min(slices.shape[1:])
        elif kind == "tucker":
            m = weight if scale is None else torch.einsum("ocij,cd->odij", weight, scale)
            self._m = m
            self._u_out, self.output_singular_values = torch.linalg.svd(m.flatten(1), full_matrices=False)[:2]
            self._u_in, self.input_singular_values = torch.linalg.svd(
                m.transpose(0, 1).flatten(1), full_matrices=False
            )[:2]
            self.full_rank = (weight.shape[1], weight.shape[0])
        else:
            matrix = weight.flatten(1)
            m = matrix if scale is None else matrix @ scale
            self._u, self.singular_values, self._vh = torch.linalg.svd(m, full_matrices=False)
            self.full_rank = min(matrix.shape)

    # -- ranks -------------------------------------------------------------------------------------------

    def check_rank(self, rank: Rank) -> Rank:
        """Validate a rank for this layer (ints for the matrix forms, ``(rank_in, rank_out)`` for Tucker)."""
        if self.kind == "tucker":
            if isinstance(rank, int):
                rank = (rank, rank)
            rank_in, rank_out = (int(r) for r in rank)
            max_in, max_out = self.full_rank  # type: ignore[misc]
            if not (1 <= rank_in <= max_in and 1 <= rank_out <= max_out):
                raise ValueError(
                    f"Tucker ranks {(rank_in, rank_out)} are outside [1, {max_in}] x [1, {max_out}] "
                    "(input channels, output channels)."
                )
            return (rank_in, rank_out)
        if not isinstance(rank, int) or isinstance(rank, bool):
            raise TypeError(f"A rank of a {self.kind} factorization is an int, got {rank!r}.")
        if not 1 <= rank <= self.full_rank:  # type: ignore[operator]
            raise ValueError(f"rank={rank} is outside [1, {self.full_rank}] for this layer.")
        return rank

    def rank_for_fraction(self, fraction: float) -> Rank:
        """``ceil(fraction · full rank)`` (per mode for Tucker)."""
        if self.kind == "tucker":
            return tuple(max(1, math.ceil(fraction * r - 1e-9)) for r in self.full_rank)  # type: ignore[return-value, union-attr]
        return max(1, math.ceil(fraction * self.full_rank - 1e-9))  # type: ignore[operator]

    def rank_for_energy(self, energy: float) -> Rank:
        """The smallest rank whose singular values hold ``energy`` of ``Σσ²`` (per mode for Tucker)."""
        if self.kind == "tucker":
            return (
                rank_for_energy(self.input_singular_values, energy),
                rank_for_energy(self.output_singular_values, energy),
            )
        return rank_for_energy(self.singular_values, energy)

    def clamp_rank(self, rank: int) -> Rank:
        """A fixed integer rank for this layer: Tucker takes it per mode, capped at each mode's size."""
        if self.kind == "tucker":
            max_in, max_out = self.full_rank  # type: ignore[misc]
            if rank > max(max_in, max_out):
                raise ValueError(f"rank={rank} is larger than both channel counts ({max_in}, {max_out}).")
            return (min(rank, max_in), min(rank, max_out))
        if rank > self.full_rank:  # type: ignore[operator]
            raise ValueError(f"rank={rank} is larger than the full rank {self.full_rank}.")
        return rank

    def chain(self) -> list[Rank]:
        """Ranks from the smallest to full, the steps a budget allocation climbs (proportional per mode for Tucker)."""
        if self.kind != "tucker":
            return list(range(1, self.full_rank + 1))  # type: ignore[operator]
        max_in, max_out = self.full_rank  # type: ignore[misc]
        steps = max(max_in, max_out)
        ranks: list[Rank] = []
        for t in range(1, steps + 1):
            rank = (math.ceil(t * max_in / steps), math.ceil(t * max_out / steps))
            if not ranks or ranks[-1] != rank:
                ranks.append(rank)
        return ranks

    def relative_error_estimate(self, rank: Rank) -> float:
        """Energy left out, relative: ``Σ_{i>r} σᵢ² / Σ σᵢ²`` (the sum over both modes for Tucker, an upper bound)."""
        rank = self.check_rank(rank)
        if self.kind == "tucker":
            rank_in, rank_out = rank  # type: ignore[misc]
            return _tail(self.input_singular_values, rank_in) + _tail(self.output_singular_values, rank_out)
        return _tail(self.singular_values, rank)  # type: ignore[arg-type]

    # -- costs -------------------------------------------------------------------------------------------

    def params(self, rank: Rank | None = None) -> int:
        """Parameters of the replacement at ``rank`` (``None``: of the original layer)."""
        layer = self.layer
        bias = 0 if layer.bias is None else layer.bias.numel()
        if rank is None:
            return layer.weight.numel() + bias
        rank = self.check_rank(rank)
        out_dim, in_dim = self._weight.shape[0], self._weight[0].numel()
        if self.kind == "tucker":
            rank_in, rank_out = rank  # type: ignore[misc]
            taps = self._weight[0, 0].numel()
            return self._weight.shape[1] * rank_in + rank_in * rank_out * taps + rank_out * out_dim + bias
        if self.kind == "depthwise":
            taps = self._weight[0, 0].numel()
            return self._weight.shape[1] * rank * (taps + out_dim) + bias  # type: ignore[operator]
        return rank * (in_dim + out_dim) + bias  # type: ignore[operator]

    def macs(self, positions: tuple[int, int], rank: Rank | None = None) -> int:
        """Multiply-accumulates per sample at ``rank`` (``None``: the original layer).

        Args:
            positions: ``(input positions, output positions)`` per sample: ``(H_in·W_in, H_out·W_out)`` for a
                convolution, ``(rows, rows)`` for a linear layer (e.g. the tokens of a sequence).
            rank: the rank, or ``None``.
        """
        positions_in, positions_out = positions
        out_dim, in_dim = self._weight.shape[0], self._weight[0].numel()
        if rank is None:
            return positions_out * out_dim * in_dim
        rank = self.check_rank(rank)
        if self.kind == "tucker":
            rank_in, rank_out = rank  # type: ignore[misc]
            taps = self._weight[0, 0].numel()
            return positions_in * self._weight.shape[1] * rank_in + positions_out * (
                rank_in * rank_out * taps + rank_out * out_dim
            )
        if self.kind == "depthwise":
            channels = self._weight.shape[1] * rank  # type: ignore[operator]
            return positions_out * channels * (self._weight[0, 0].numel() + out_dim)
        return positions_out * rank * (in_dim + out_dim)  # type: ignore[operator]

    # -- building ----------------------------------------------------------------------------------------

    def build(self, rank: Rank) -> nn.Module:
        """The replacement at ``rank``, initialized from the layer's weights (and inputs, when data-aware)."""
        rank = self.check_rank(rank)
        layer = self.layer
        like = {"device": layer.weight.device, "dtype": layer.weight.dtype}
        bias = layer.bias is not None
        if self.kind == "tucker":
            module: nn.Module = TuckerConv2d(
                layer.in_channels,
                layer.out_channels,
                layer.kernel_size,
                rank,  # type: ignore[arg-type]
                stride=layer.stride,
                padding=layer.padding,
                dilation=layer.dilation,
                bias=bias,
                padding_mode=layer.padding_mode,
                **like,
            )
            first, core, last = self._tucker_factors(*rank)  # type: ignore[misc]
            weights = {"first": first[:, :, None, None], "core": core, "last": last[:, :, None, None]}
        elif self.kind == "depthwise":
            module = DepthwiseSeparableConv2d(
                layer.in_channels,
                layer.out_channels,
                layer.kernel_size,
                rank,  # type: ignore[arg-type]
                stride=layer.stride,
                padding=layer.padding,
                dilation=layer.dilation,
                bias=bias,
                padding_mode=layer.padding_mode,
                **like,
            )
            filters, pointwise = self._depthwise_factors(rank)  # type: ignore[arg-type]
            weights = {
                "depthwise": filters.reshape(-1, 1, *layer.kernel_size),
                "pointwise": pointwise[:, :, None, None],
            }
        else:
            r = rank
            root = self.singular_values[:r].sqrt()  # type: ignore[misc]
            first = root[:, None] * self._vh[:r]  # type: ignore[misc]
            if self._unscale is not None:
                first = first @ self._unscale
            second = self._u[:, :r] * root  # type: ignore[misc]
            if self.kind == "linear":
                module = LowRankLinear(layer.in_features, layer.out_features, r, bias=bias, **like)  # type: ignore[arg-type]
                weights = {"first": first, "second": second}
            else:
                module = LowRankConv2d(
                    layer.in_channels,
                    layer.out_channels,
                    layer.kernel_size,
                    r,  # type: ignore[arg-type]
                    stride=layer.stride,
                    padding=layer.padding,
                    dilation=layer.dilation,
                    bias=bias,
                    padding_mode=layer.padding_mode,
                    **like,
                )
                weights = {
                    "first": first.reshape(r, *layer.weight.shape[1:]),
                    "second": second[:, :, None, None],
                }  # type: ignore[misc]
        with torch.no_grad():
            for name, value in weights.items():
                getattr(module, name).weight.copy_(value)
            out = getattr(module, {"tucker": "last", "depthwise": "pointwise"}.get(self.kind, "second"))
            if bias:
                out.bias.copy_(layer.bias.detach())
        return module

    def _depthwise_factors(self, rank: int) -> tuple[Tensor, Tensor]:
        """The ``(in·rank, k·k)`` depthwise filters and the ``(out, in·rank)`` 1x1 weights at a depth multiplier."""
        filters = self._vh[
            :, :rank
        ]  # (in, rank, k·k): the top right singular vectors of every channel's slice
        if self._unscale is not None:
            filters = filters @ self._unscale
        pointwise = (self._u[:, :, :rank] * self.channel_singular_values[:, None, :rank]).transpose(0, 1)
        pointwise = pointwise.reshape(self._weight.shape[0], -1)
        if self.refine:
            pointwise = self._refit(filters, pointwise)
        return filters.reshape(-1, filters.shape[-1]), pointwise

    def _refit(self, filters: Tensor, pointwise: Tensor) -> Tensor:
        """The 1x1 weights ``P`` that best map the depthwise outputs ``z = D x`` to the layer's ``W x`` over the
        calibration inputs, held near their SVD values ``P₀``: ``P = (W G Dᵀ + λ P₀)(D G Dᵀ + λ I)⁻¹``, with ``G``
        the inputs' Gram matrix and ``λ = damping · mean(diag(D G Dᵀ))``. At the full multiplier both are ``W D⁻¹``."""
        gram = self.stats.mean_gram if self.stats is not None else None
        assert gram is not None  # checked by `decompose`
        d = torch.block_diag(*filters)  # (in·rank, in·k·k): channel i's filters act on channel i's patch
        cross = d @ gram
        a = cross @ d.T
        ridge = self.damping * float(torch.diagonal(a).mean())
        eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
        return (self._weight.flatten(1) @ cross.T + ridge * pointwise) @ torch.linalg.pinv(
            a + ridge * eye, hermitian=True
        )

    def _tucker_factors(self, rank_in: int, rank_out: int) -> tuple[Tensor, Tensor, Tensor]:
        m = self._m
        u_out, u_in = self._u_out[:, :rank_out], self._u_in[:, :rank_in]
        if (rank_in, rank_out) != self.full_rank:
            for _ in range(_TUCKER_SWEEPS):
                u_out = _top_left_vectors(torch.einsum("ocij,cb->obij", m, u_in).flatten(1), rank_out)
                u_in = _top_left_vectors(torch.einsum("ocij,oa->caij", m, u_out).flatten(1), rank_in)
        core = torch.einsum("ocij,oa,cb->abij", m, u_out, u_in)
        first = u_in.T if self._unscale is None else u_in.T @ self._unscale
        return first, core, u_out

    def errors(self, module: nn.Module) -> tuple[float, float | None]:
        """``(weight error, output error)`` of a replacement, both relative (Frobenius norms).

        The weight error is ``‖W − W'‖ / ‖W‖``. The output error is ``‖(W − W')x‖ / ‖Wx‖`` over the calibration
        inputs (from their Gram matrix; bias excluded) — exact for ``"linear"``, ``"channel"`` and ``"depthwise"``,
        an estimate that ignores correlations between positions for ``"tucker"``; ``None`` without a Gram matrix.
        """
        approx = module.dense_weight().detach().to(torch.float64)  # type: ignore[operator]
        delta = self._weight - approx
        weight_error = float(delta.norm() / self._weight.norm().clamp_min(1e-30))
        gram = self.stats.mean_gram if self.stats is not None else None
        if gram is None:
            return weight_error, None
        if self.kind == "tucker":
            d, w = delta.flatten(2), self._weight.flatten(2)
            num = torch.einsum("ocp,cd,odp->", d, gram, d)
            den = torch.einsum("ocp,cd,odp->", w, gram, w)
        else:
            d, w = delta.flatten(1), self._weight.flatten(1)
            num = torch.einsum("oc,cd,od->", d, gram, d)
            den = torch.einsum("oc,cd,od->", w, gram, w)
        return weight_error, float(num.clamp_min(0.0).sqrt() / den.clamp_min(1e-30).sqrt())


def _tail(singular_values: Tensor, rank: int) -> float:
    energy = singular_values.to(torch.float64) ** 2
    total = float(energy.sum())
    return float(energy[rank:].sum()) / total if total > 0 else 0.0


def decompose(
    layer: nn.Module,
    *,
    conv: str = "tucker",
    stats: InputStatistics | None = None,
    method: str = "svd",
    damping: float = 0.01,
    activation_exponent: float = 0.5,
    alpha: float = UNSET,
    refine: bool = False,
) -> Decomposition:
    """Factorize a trained ``nn.Linear`` or ``nn.Conv2d`` at full rank; cut replacements with ``.build(rank)``.

    Args:
        layer: the layer.
        conv: ``"tucker"``, ``"channel"`` or ``"depthwise"`` for a k×k convolution (1x1 convs are ``"channel"``,
            and cannot be ``"depthwise"``).
        stats: statistics of the layer's inputs, from :func:`layer_features` rows of the same kind
            (needed by ``"whitened"`` and ``"asvd"``, and with its Gram matrix by ``refine``).
        method: ``"svd"``, ``"whitened"`` or ``"asvd"`` (see the module docstring).
        damping: ``"whitened"``: ``damping · mean(diag(XᵀX/n))`` is added to the Gram matrix's diagonal before its
            Cholesky factorization; ``"asvd"``: floor of the column scales, relative to their mean; ``refine``:
            how strongly the refitted 1x1 weights are held near their SVD values (relative, see ``refine``).
        activation_exponent: ``"asvd"``: exponent of the mean absolute input.
        alpha: deprecated name of ``activation_exponent``.
        refine: ``"depthwise"`` only: refit the 1x1 weights by least squares so that the replacement's outputs on
            the inputs of ``stats`` match the layer's (the depthwise filters fixed).

    Example::

        >>> _ = torch.manual_seed(0)
        >>> layer = nn.Linear(16, 8)
        >>> d = decompose(layer)
        >>> d.kind, d.full_rank, d.params(), d.params(4), d.macs((1, 1), 4)
        ('linear', 8, 136, 104, 96)
        >>> x = torch.randn(5, 16)
        >>> bool(torch.allclose(d.build(8)(x), layer(x), atol=1e-5))
        True
        >>> weight_error, output_error = d.errors(d.build(4))  # Eckart-Young: the tail of the spectrum
        >>> abs(weight_error - d.relative_error_estimate(4) ** 0.5) < 1e-6, output_error
        (True, None)
    """
    _check_choice(method, METHODS, "method")
    kind = layer_kind(layer, conv)
    exponent = renamed("decompose", "alpha", alpha, "activation_exponent", activation_exponent, 0.5)
    if damping < 0 or exponent < 0:
        raise ValueError(f"`damping={damping}` and `activation_exponent={exponent}` must be non-negative.")
    features = layer.weight.shape[1] if kind == "tucker" else layer.weight[0].numel()
    if refine and kind != "depthwise":
        raise ValueError(
            f"`refine=True` refits the 1x1 weights of the depthwise form, not of a {kind!r} one."
        )
    if refine and (stats is None or stats.mean_gram is None or stats.mean_gram.shape != (features, features)):
        raise ValueError(
            "`refine=True` needs the Gram matrix of the layer's k×k input patches (`stats` from "
            "`layer_features(layer, x, 'depthwise')` with `gram=True`)."
        )
    if kind == "depthwise":
        transform = _channel_transforms(stats, method, layer.weight.shape[1], features, damping, exponent)
    else:
        transform = _input_transform(stats, method, features, damping, exponent)
    return Decomposition(layer, kind, transform, stats, refine=refine, damping=damping)


def factorize(
    layer: nn.Module,
    rank: Rank,
    *,
    conv: str = "tucker",
    stats: InputStatistics | None = None,
    method: str = "svd",
    damping: float = 0.01,
    activation_exponent: float = 0.5,
    alpha: float = UNSET,
    refine: bool = False,
) -> nn.Module:
    """Replace one trained layer by its low-rank factorization at ``rank`` (see :func:`decompose`).

    Example::

        >>> conv = nn.Conv2d(8, 16, 3, padding=1)
        >>> tucker = factorize(conv, (8, 16))
        >>> x = torch.randn(2, 8, 5, 5)
        >>> bool(torch.allclose(tucker(x), conv(x), atol=1e-5)), type(factorize(conv, 4, conv="channel")).__name__
        (True, 'LowRankConv2d')
        >>> separable = factorize(conv, 9, conv="depthwise")  # min(out, k·k) filters per channel: exact
        >>> bool(torch.allclose(separable(x), conv(x), atol=1e-5)), type(separable).__name__
        (True, 'DepthwiseSeparableConv2d')
    """
    exponent = renamed("factorize", "alpha", alpha, "activation_exponent", activation_exponent, 0.5)
    decomposition = decompose(
        layer,
        conv=conv,
        stats=stats,
        method=method,
        damping=damping,
        activation_exponent=exponent,
        refine=refine,
    )
    return decomposition.build(rank)


# -- rank rules -------------------------------------------------------------------------------------------


def rank_for_energy(singular_values: Tensor, energy: float) -> int:
    """The smallest rank ``r`` with ``Σ_{i≤r} σᵢ² ≥ energy · Σ σᵢ²``.

    Example::

        >>> s = torch.tensor([2.0, 1.0, 1.0])  # energies 4, 1, 1 of 6
        >>> rank_for_energy(s, 0.6), rank_for_energy(s, 0.7), rank_for_energy(s, 1.0)
        (1, 2, 3)
    """
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"`energy={energy}` must be in (0, 1].")
    squares = singular_values.detach().to(torch.float64) ** 2
    total = float(squares.sum())
    if total == 0.0:
        return 1
    cumulative = torch.cumsum(squares, 0) / total
    # A tolerance, so that energy=1.0 is met by the last non-zero singular value despite round-off.
    rank = int(torch.searchsorted(cumulative, torch.tensor(energy - 1e-12, dtype=torch.float64))) + 1
    return min(rank, len(singular_values))


def allocate_budget(
    options: Mapping[str, Sequence[tuple[float, float]]],
    dense_costs: Mapping[str, float],
    budget: float,
) -> dict[str, int | None]:
    """Choose ranks for several layers jointly so that their total cost is at most ``budget`` of the dense cost.

    Every layer starts at its first option; then, greedily, the step with the largest error decrease per unit of
    cost is taken while it fits: one option up, or, from the last option, back to the dense layer (error 0).

    Args:
        options: per layer, ``(cost, error)`` of the candidate ranks in increasing order (every one cheaper than
            the dense layer; e.g. the relative energy left out as the error).
        dense_costs: per layer, the cost of leaving it as is.
        budget: the fraction of ``Σ dense_costs`` to spend, in ``(0, 1)``.

    Returns:
        The chosen option index per layer, ``None`` where the layer stays dense.

    Example::

        >>> options = {"a": [(1, 0.5), (2, 0.1), (3, 0.05)], "b": [(2, 0.6), (4, 0.1)]}
        >>> allocate_budget(options, {"a": 10, "b": 10}, budget=0.3)  # 3 spent; a's step (0.4/1), then b's (0.5/2)
        {'a': 1, 'b': 1}
        >>> allocate_budget(options, {"a": 10, "b": 10}, budget=0.25)  # b's step no longer fits, a climbs on
        {'a': 2, 'b': 0}
        >>> allocate_budget(options, {"a": 10, "b": 10}, budget=0.1)
        Traceback (most recent call last):
        ...
        ValueError: `budget=0.1` is below the cheapest factorization of the selected layers (0.1500 of their cost at the smallest ranks). Raise the budget or select fewer layers.
    """
    if not 0.0 < budget < 1.0:
        raise ValueError(f"`budget={budget}` must be in (0, 1).")
    total = float(sum(dense_costs[name] for name in options))
    target = budget * total
    choice: dict[str, int | None] = {name: 0 for name in options}
    spent = sum(float(opts[0][0]) for opts in options.values())
    if spent > target * (1 + 1e-12):
        raise ValueError(
            f"`budget={budget}` is below the cheapest factorization of the selected layers "
            f"({spent / total:.4f} of their cost at the smallest ranks). Raise the budget or select fewer layers."
        )

    def push(heap: list, name: str) -> None:
        index = choice[name]
        opts = options[name]
        if index is None:
            return
        if index + 1 < len(opts):
            gain = opts[index][1] - opts[index + 1][1]
            cost = opts[index + 1][0] - opts[index][0]
        else:
            gain, cost = opts[index][1], dense_costs[name] - opts[index][0]
        ratio = math.inf if cost <= 0 else gain / cost
        heapq.heappush(heap, (-ratio, name, cost))

    heap: list = []
    for name in options:
        push(heap, name)
    while heap:
        _, name, cost = heapq.heappop(heap)
        if spent + cost > target * (1 + 1e-12):
            continue
        spent += cost
        index = choice[name]
        assert index is not None
        choice[name] = index + 1 if index + 1 < len(options[name]) else None
        push(heap, name)
    return choice
