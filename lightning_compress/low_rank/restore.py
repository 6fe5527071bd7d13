"""Rebuilding factorized layers from a state dict, in plain torch, so that a saved low-rank model loads.

:func:`restore_low_rank` gives a freshly constructed model the factorized structure its state dict holds; the
load hook of :class:`~lightning_compress.low_rank.LowRankReplacement` calls it before the weights are copied in.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, MutableMapping
from typing import Any

import torch
from torch import nn

from lightning_compress._checkpoints import configure_fresh_model, drop_checkpoint_hints
from lightning_compress.low_rank.factorize import (
    FACTORIZED,
    DepthwiseSeparableConv2d,
    LowRankConv2d,
    LowRankLinear,
    Rank,
    TuckerConv2d,
)

# An extra entry of the checkpoints' `state_dict` that a strict `load_state_dict` of the plain model reports as an
# unexpected key, so that its error says how to load the factorized layers. The callback's load hook and
# `restore_low_rank` remove it again.
CHECKPOINT_HINT = (
    "lightning_compress: this checkpoint holds factorized layers (LowRankReplacement); call "
    "lightning_compress.low_rank.restore_low_rank(model, checkpoint['state_dict']) before load_state_dict, "
    "or load it through a Trainer that lists LowRankReplacement"
)


def restore_low_rank(model: nn.Module, state_dict: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Give ``model`` the factorized layers a state dict holds, so that ``model.load_state_dict`` fits it.

    A layer is rebuilt where the state dict has ``<name>.first.weight`` (``<name>.depthwise.weight`` for the
    depthwise form) but the model has a plain layer (or a factorization of another form or rank) there; the shapes
    in the state dict give the ranks. Weights are left at zero for
    ``load_state_dict`` to fill, and no random numbers are drawn; factors of a frozen layer are frozen. The entry
    :data:`CHECKPOINT_HINT` that checkpoints of :class:`~lightning_compress.low_rank.LowRankReplacement` carry (and
    any other hint of this package) is removed from ``state_dict`` (when it is mutable), so that a strict
    ``load_state_dict`` follows.

    Args:
        model: the model, e.g. a freshly constructed LightningModule.
        state_dict: the saved state (e.g. ``torch.load(ckpt)["state_dict"]``).
        prefix: prefix of ``model``'s keys in ``state_dict``.

    Returns:
        The names of the rebuilt layers.

    Example::

        >>> from lightning_compress.low_rank import factorize
        >>> trained = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> trained[0] = factorize(trained[0], rank=3)
        >>> fresh = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> restore_low_rank(fresh, trained.state_dict())
        ['0']
        >>> fresh.load_state_dict(trained.state_dict())
        <All keys matched successfully>
    """
    configure_fresh_model(model)
    if isinstance(state_dict, MutableMapping):
        drop_checkpoint_hints(state_dict, prefix)
    rebuilt = []
    for name, module in list(model.named_modules()):
        key = f"{prefix}{name}." if name else prefix
        form = _saved_form(state_dict, key)
        if form is None:
            continue
        if form == "depthwise" and isinstance(module, nn.Linear | LowRankLinear):
            continue  # a state dict of another model: load_state_dict reports the mismatch
        if isinstance(module, FACTORIZED):
            if _form_of(module) == form and rank_of(module) == _saved_rank(state_dict, key, form, module):
                continue
        elif type(module) not in (nn.Linear, nn.Conv2d) or key + "weight" in state_dict:
            continue
        replacement = _empty_like(module, state_dict, key, form)
        keep_trainability(module, replacement)
        set_submodule(model, name, replacement)
        rebuilt.append(name)
    return rebuilt


def restore_low_rank_layers(model: nn.Module, layers: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """:func:`restore_low_rank` from the record ``LowRankReplacement`` keeps in its state (``{name: {"kind",
    "rank"}}``, its ``layers``) rather than from the weights' names: for a checkpoint whose weights another scheme
    renamed (an int8 graph holds them as ``_frozen_param<i>``). Returns the names of the rebuilt layers.

    Example::

        >>> net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Conv2d(4, 6, 3))
        >>> restore_low_rank_layers(net, {"0": {"kind": "linear", "rank": 3}, "2": {"kind": "tucker", "rank": [2, 4]}})
        ['0', '2']
        >>> net[0].first.out_features, tuple(net[2].core.weight.shape)
        (3, (4, 2, 3, 3))
    """
    modules = dict(model.named_modules())
    shapes: dict[str, Any] = {}
    for name, layer in layers.items():
        module, rank, key = modules.get(name), layer["rank"], f"{name}."
        if module is None:
            continue
        kind = layer["kind"]
        # Only the sizes `_saved_rank` reads and the bias `_empty_like` looks for: placeholders without storage.
        if kind == "tucker":
            shapes[key + "first.weight"] = torch.empty(rank[0], 0, device="meta")
            shapes[key + "core.weight"] = torch.empty(rank[1], 0, device="meta")
            last = "last"
        elif kind == "depthwise":
            shapes[key + "depthwise.weight"] = torch.empty(_in_channels(module) * rank, 0, device="meta")
            last = "pointwise"
        else:
            shapes[key + "first.weight"] = torch.empty(rank, 0, device="meta")
            last = "second"
        if _has_bias(module):
            shapes[f"{key}{last}.bias"] = torch.empty(0, device="meta")
    return restore_low_rank(model, shapes)


def restore_low_rank_of_checkpoint(
    model: nn.Module, checkpoint: Mapping[str, Any], state_dict: Mapping[str, Any]
) -> list[str]:
    """Give ``model`` the factorized layers of a Lightning checkpoint, as the fit that wrote it first built them:
    from the state of its ``LowRankReplacement`` callbacks (:func:`restore_low_rank_layers`; the ranks a later
    structured pruning may have cut are the weights' shapes, not these), else from ``state_dict``'s names
    (:func:`restore_low_rank`). Returns the names of the rebuilt layers."""
    records = [
        state["layers"]
        for key, state in (checkpoint.get("callbacks") or {}).items()
        if str(key).startswith("LowRankReplacement") and state.get("layers")
    ]
    if not records:
        return restore_low_rank(model, state_dict)
    return [name for layers in records for name in restore_low_rank_layers(model, layers)]


def _has_bias(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear | nn.Conv2d):
        return module.bias is not None
    return any(name.endswith("bias") for name, _ in module.named_parameters())


def load_hook(checkpoint_path: Callable[[], Any]) -> Callable[..., None]:
    """A ``load_state_dict`` pre-hook that runs :func:`restore_low_rank` before the weights are copied in.

    It refuses a state dict that holds dense weights where the module has factors (a checkpoint written without
    the replacement), naming ``checkpoint_path()`` when it gives one, and the ways to factorize those weights.
    """

    def hook(module: nn.Module, state_dict: MutableMapping[str, Any], prefix: str, *args: Any) -> None:
        dense = [
            name
            for name, layer in module.named_modules()
            if isinstance(layer, FACTORIZED)
            and f"{prefix}{name}.weight" in state_dict
            and _saved_form(state_dict, f"{prefix}{name}.") is None
        ]
        if dense:
            path = checkpoint_path()
            source = f"The checkpoint {str(path)!r}" if path else "The state dict being loaded"
            raise ValueError(
                f"{source} holds the dense layer(s) {', '.join(map(repr, dense))} where the model has "
                "LowRankReplacement's factors: it was written without LowRankReplacement (or before its `start`), "
                "so it has no factors to load. To factorize the trained weights, load them into the model "
                "(`model.load_state_dict(torch.load(path)['state_dict'])`) and call `trainer.fit(model)` without "
                "`ckpt_path`; or keep `ckpt_path` and give `LowRankReplacement(start='step:0', ...)`, which "
                "factorizes the loaded weights at the first step."
            )
        restore_low_rank(module, state_dict, prefix)

    return hook


def rank_in_state(
    shapes: Mapping[str, tuple[int, ...]], name: str, in_channels: int | None = None
) -> Rank | None:
    """The rank of the factorized layer ``name`` from state-dict shapes (``None``: not factorized); the depth
    multiplier of the depthwise form needs the layer's ``in_channels`` (``None`` without them).

    Example::

        >>> rank_in_state({"fc.first.weight": (3, 8), "fc.second.weight": (2, 3)}, "fc")
        3
        >>> rank_in_state({"conv.depthwise.weight": (16, 1, 3, 3)}, "conv", in_channels=8)
        2
    """
    depthwise = shapes.get(f"{name}.depthwise.weight")
    if depthwise is not None:
        return None if not in_channels else depthwise[0] // in_channels
    first = shapes.get(f"{name}.first.weight")
    if first is None:
        return None
    core = shapes.get(f"{name}.core.weight")
    return (first[0], core[0]) if core is not None else first[0]


def check_recorded_ranks(
    layers: Mapping[str, Mapping[str, Any]], shapes: Mapping[str, tuple[int, ...]]
) -> None:
    """The factorized layers recorded (``{name: {"rank": ...}}``, with ``"in_channels"`` for the depthwise form)
    are in the state-dict ``shapes`` at that rank.

    Example::

        >>> check_recorded_ranks({"fc": {"rank": 4}}, {"fc.first.weight": (3, 8)})
        Traceback (most recent call last):
        ...
        RuntimeError: The low-rank replacement recorded layer 'fc' at rank 4, but the model has rank 3. The checkpoint and the callback's state disagree.
    """
    # A weight a later callback reparametrizes (binary weights) is saved as `<layer>.parametrizations.weight.original`.
    shapes = {k.replace(".parametrizations.", ".").removesuffix(".original"): v for k, v in shapes.items()}
    for name, layer in layers.items():
        rank = rank_in_state(shapes, name, layer.get("in_channels"))
        if rank != (tuple(layer["rank"]) if isinstance(layer["rank"], list) else layer["rank"]):
            found = "no factorized layer there" if rank is None else f"rank {rank}"
            raise RuntimeError(
                f"The low-rank replacement recorded layer {name!r} at rank {layer['rank']}, but the model has "
                f"{found}. The checkpoint and the callback's state disagree."
            )


def rank_of(module: nn.Module) -> Rank | None:
    """The rank of a factorized layer (``(rank_in, rank_out)`` for Tucker); ``None`` for any other module."""
    if isinstance(module, TuckerConv2d):
        return module.ranks
    if isinstance(module, LowRankLinear | LowRankConv2d | DepthwiseSeparableConv2d):
        return module.rank
    return None


def keep_trainability(old: nn.Module, new: nn.Module) -> None:
    """Factors of a frozen weight (bias) stay frozen: factorizing must not start training what was frozen."""
    weight = any(p.requires_grad for n, p in old.named_parameters() if not n.endswith("bias"))
    bias = any(p.requires_grad for n, p in old.named_parameters() if n.endswith("bias"))
    for name, param in new.named_parameters():
        param.requires_grad_(bias if name.endswith("bias") else weight)


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` in the place of ``model``'s submodule ``name``."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _saved_form(state_dict: Mapping[str, Any], key: str) -> str | None:
    """``"depthwise"``, ``"tucker"`` or ``"matrix"`` (linear and channel forms) of the factors under ``key``."""
    if key + "depthwise.weight" in state_dict:
        return "depthwise"
    if key + "first.weight" not in state_dict:
        return None
    return "tucker" if key + "core.weight" in state_dict else "matrix"


def _form_of(module: nn.Module) -> str:
    if isinstance(module, DepthwiseSeparableConv2d | TuckerConv2d):
        return "depthwise" if isinstance(module, DepthwiseSeparableConv2d) else "tucker"
    return "matrix"


def _in_channels(module: nn.Module) -> int:
    if isinstance(module, nn.Conv2d):
        return module.in_channels
    return module[0].in_channels  # type: ignore[index]


def _saved_rank(state_dict: Mapping[str, Any], key: str, form: str, module: nn.Module) -> Rank:
    if form == "depthwise":
        return int(state_dict[key + "depthwise.weight"].shape[0]) // _in_channels(module)
    first = state_dict[key + "first.weight"]
    if form == "tucker":
        return (int(first.shape[0]), int(state_dict[key + "core.weight"].shape[0]))
    return int(first.shape[0])


def _empty_like(module: nn.Module, state_dict: Mapping[str, Any], key: str, form: str) -> nn.Module:
    rank = _saved_rank(state_dict, key, form, module)
    tucker = form == "tucker"
    param = next(module.parameters())
    like = {"device": param.device, "dtype": param.dtype}
    last = {"tucker": "last", "depthwise": "pointwise"}.get(form, "second")
    bias = f"{key}{last}.bias" in state_dict
    if isinstance(module, nn.Linear | LowRankLinear):
        in_features = module.in_features if isinstance(module, nn.Linear) else module.first.in_features
        out_features = module.out_features if isinstance(module, nn.Linear) else module.second.out_features
        return LowRankLinear(in_features, out_features, rank, bias=bias, **like)  # type: ignore[arg-type]
    # The k×k convolution carries the layer's geometry: the layer itself, the Tucker core, or the first factor
    # (the depthwise one).
    spatial = (
        module
        if isinstance(module, nn.Conv2d)
        else module.core
        if isinstance(module, TuckerConv2d)
        else module[0]
    )
    in_channels = _in_channels(module)
    out_channels = module.out_channels if isinstance(module, nn.Conv2d) else module[-1].out_channels
    geometry = {
        "stride": spatial.stride,
        "padding": spatial.padding,
        "dilation": spatial.dilation,
        "bias": bias,
        "padding_mode": spatial.padding_mode,
        **like,
    }
    if tucker:
        return TuckerConv2d(in_channels, out_channels, spatial.kernel_size, rank, **geometry)  # type: ignore[arg-type]
    if form == "depthwise":
        size = spatial.kernel_size
        return DepthwiseSeparableConv2d(in_channels, out_channels, size, rank, **geometry)  # type: ignore[arg-type]
    return LowRankConv2d(in_channels, out_channels, spatial.kernel_size, rank, **geometry)  # type: ignore[arg-type]
