"""Hints in checkpoints of a model whose structure a callback changed (plain torch, no Lightning)."""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn

# -- hints in checkpoints of a model whose structure a callback changed ------------------------------------
# Loading such a checkpoint into the freshly built class (Lightning's `load_from_checkpoint`, strict) fails, and
# that call cannot be changed. Strict loading lists unexpected keys first, so an extra, empty entry whose key is
# the instruction says what to use instead. Every loading path of this package drops all of them.
HINT_PREFIX = "lightning_compress: "


def add_checkpoint_hint(checkpoint: dict[str, Any], key: str) -> None:
    """Add the hint ``key`` (which starts with :data:`HINT_PREFIX`) to a checkpoint's ``state_dict``."""
    if "state_dict" in checkpoint:
        checkpoint["state_dict"][key] = torch.zeros(0)


def drop_checkpoint_hints(state_dict: dict[str, Any], prefix: str = "") -> list[str]:
    """Remove every hint from ``state_dict`` (keys under ``prefix``); returns the keys removed.

    Example::

        >>> state = {"weight": torch.ones(1), HINT_PREFIX + "use load_pruned_checkpoint": torch.zeros(0)}
        >>> [k.split(": ")[1] for k in drop_checkpoint_hints(state)], list(state)
        (['use load_pruned_checkpoint'], ['weight'])
    """
    hints = [key for key in state_dict if key.startswith(prefix + HINT_PREFIX)]
    for key in hints:
        del state_dict[key]
    return [key[len(prefix) :] for key in hints]


# The models a loader of this package has built: each one's `configure_model` runs once, whichever loader (or
# loader inside another loader) sees it first.
_CONFIGURED: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def configure_fresh_model(model: nn.Module) -> None:
    """Build the layers of a fresh LightningModule that creates them in ``configure_model`` (as Lightning's
    ``load_from_checkpoint`` does) before a loader rebuilds the structure a checkpoint holds; once per model.

    Example::

        >>> class Lazy(nn.Module):
        ...     def configure_model(self):
        ...         self.net = nn.Linear(2, 2)
        >>> model = Lazy()
        >>> configure_fresh_model(model); configure_fresh_model(model)
        >>> first = model.net; configure_fresh_model(model); model.net is first
        True
    """
    configure = getattr(model, "configure_model", None)
    if callable(configure) and model not in _CONFIGURED:
        _CONFIGURED.add(model)
        configure()
