"""Loading a checkpoint written by a fit with QuantizationAwareTraining into a freshly built model, without a Trainer."""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from lightning_compress._checkpoints import configure_fresh_model
from lightning_compress._inputs import to_device
from lightning_compress._lightning import detach_input
from lightning_compress.depth.core import restore_depth
from lightning_compress.low_rank.restore import restore_low_rank_of_checkpoint
from lightning_compress.pruning.core import rebuild_pruned_structure
from lightning_compress.quantization.qat_core import QuantizationConfig, qat_parts

# An entry added to the saved ``state_dict`` of a model QuantizationAwareTraining changed: loading the checkpoint
# into the plain class (``load_from_checkpoint``, strict) lists it among the unexpected keys, which says what to
# use.
CHECKPOINT_HINT = (
    "lightning_compress: QuantizationAwareTraining changed this model's structure; load this checkpoint with "
    "`lightning_compress.quantization.load_qat_checkpoint(YourModule(...), path)`, not load_from_checkpoint"
)


def load_qat_checkpoint(
    model: nn.Module, checkpoint: str | os.PathLike | Mapping[str, Any], example_input: Any = None
) -> nn.Module:
    """Load a checkpoint written by a fit with ``QuantizationAwareTraining`` into a freshly built model.

    ``LightningModule.load_from_checkpoint`` cannot: the checkpoint holds the fake-quantized (during training)
    or converted (after it) structure, not the float layers the class builds. This rebuilds that structure from
    the callback's state saved in the checkpoint (scheme, quantized part, quantized layers, example input and
    the int8 ranges), then loads the weights strictly. Works without a Trainer.

    Args:
        model: a new instance of the model that was trained (e.g. ``MyModule(**hparams)``).
        checkpoint: a path to a Lightning checkpoint, or the loaded checkpoint dict.
        example_input: the model's input, used to export it again with ``scheme="int8"`` (default: the one saved
            in the checkpoint, else ``model.example_input_array``).

    Returns:
        ``model``, quantized in place, with the checkpoint's weights.

    Example::

        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> load_qat_checkpoint(net, {"state_dict": net.state_dict(), "callbacks": {}})
        Traceback (most recent call last):
        ...
        ValueError: The checkpoint holds no QuantizationAwareTraining state (it was written by a fit without it): load it with `model.load_state_dict(checkpoint['state_dict'])` or `load_from_checkpoint`.
    """
    configure_fresh_model(model)
    if not isinstance(checkpoint, Mapping):
        checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=False)
    callbacks = checkpoint.get("callbacks") or {}
    states = [s for k, s in callbacks.items() if str(k).startswith("QuantizationAware")]
    if not states:
        raise ValueError(
            "The checkpoint holds no QuantizationAwareTraining state (it was written by a fit without it): load "
            "it with `model.load_state_dict(checkpoint['state_dict'])` or `load_from_checkpoint`."
        )
    state = states[0]
    if "module" not in state:
        raise ValueError(
            "The checkpoint's QuantizationAwareTraining state comes from an older version that did not record "
            "the quantized part: load it through a Trainer that lists the same QuantizationAwareTraining(...) "
            "(`trainer.validate(model, ckpt_path=...)`)."
        )
    parts = qat_parts(
        QuantizationConfig(state["scheme"], state["bits"], state.get("group_size"), state["module"])
    )
    if state.get("layers"):
        parts.set_layers(list(state["layers"]))  # type: ignore[attr-defined]
    parts.ranges = dict(state.get("ranges") or {})
    example = example_input if example_input is not None else state.get("example_input")
    if example is None:
        example = getattr(model, "example_input_array", None)
    if example is not None:
        device = next(model.parameters(), torch.empty(0)).device
        parts.example = to_device(detach_input(example, max_batch=2), device)
    state_dict = OrderedDict(checkpoint["state_dict"])
    # The modules' versions: without them torchao's observers load as an old version (their `eps` is reset).
    state_dict._metadata = getattr(checkpoint["state_dict"], "_metadata", {})  # type: ignore[attr-defined]
    # The structure the earlier schemes of the fit left, before the quantized part is exported from it: removed
    # blocks (their hint), factorized layers (their names are in the weights), then removed channels (the pruning
    # plan, traced on the float model).
    restore_depth(
        model, {"state_dict": state_dict, "callbacks": checkpoint.get("callbacks")}
    )  # drops every hint
    restore_low_rank_of_checkpoint(model, checkpoint, state_dict)
    rebuild_pruned_structure(model, checkpoint)
    parts.prepare_for_checkpoint(model, state_dict, "", fitting=False)
    model.load_state_dict(state_dict)
    return model
