"""Example inputs: call a module on one, move one to a device (a tensor, positional args or keyword args)."""

from __future__ import annotations

import contextlib
import inspect
import itertools
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn


def call_module(module: nn.Module, example_input: Any) -> Any:
    """Call ``module`` on an example input: a tensor, a tuple/list of positional args or a mapping of kwargs.

    A list is unpacked into positional arguments; wrap it in a tuple (``(lst,)``) to pass it as one argument.

    Example::

        >>> call_module(nn.Identity(), {"input": torch.ones(1)})
        tensor([1.])
    """
    if isinstance(example_input, Mapping):
        return module(**example_input)
    if isinstance(example_input, tuple | list):
        return module(*example_input)
    return module(example_input)


def to_device(example: Any, device: torch.device | str) -> Any:
    """Move an example input (tensor, tuple/list or mapping of them) to ``device``.

    Example::

        >>> to_device((torch.ones(1), {"mask": torch.zeros(1)}), "cpu")
        (tensor([1.]), {'mask': tensor([0.])})
    """
    if isinstance(example, torch.Tensor):
        return example.to(device)
    if isinstance(example, Mapping):
        return {k: to_device(v, device) for k, v in example.items()}
    if isinstance(example, list | tuple):
        return type(example)(to_device(e, device) for e in example)
    return example


def for_module(example: Any, module: nn.Module) -> Any:
    """An example input moved to ``module``'s device, its floating-point tensors cast to the dtype of ``module``'s
    floating-point weights when they share one (as Lightning casts the batches of a ``precision="bf16-true"`` fit).

    Example::

        >>> for_module((torch.ones(1), torch.ones(1, dtype=torch.long)), nn.Linear(1, 1).bfloat16())
        (tensor([1.], dtype=torch.bfloat16), tensor([1]))
    """
    device = next(module.parameters(), torch.empty(0)).device
    return cast_floating(to_device(example, device), weights_dtype(module))


def weights_dtype(module: nn.Module) -> torch.dtype | None:
    """The dtype of ``module``'s floating-point parameters when they all have one (``None`` without any, or for a
    model that mixes dtypes, whose forward casts by itself)."""
    dtypes = {p.dtype for p in module.parameters() if p.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else None


def cast_floating(example: Any, dtype: torch.dtype | None) -> Any:
    """The floating-point tensors of an example input (a tensor, tuple/list or mapping of them) cast to ``dtype``
    (none when ``dtype`` is ``None``); the others as they are."""
    if isinstance(example, torch.Tensor):
        return example.to(dtype) if dtype is not None and example.is_floating_point() else example
    if isinstance(example, Mapping):
        return {k: cast_floating(v, dtype) for k, v in example.items()}
    if isinstance(example, list | tuple):
        return type(example)(cast_floating(e, dtype) for e in example)
    return example


def input_shapes(example: Any) -> Any:
    """The shape of an example input, or of each tensor in it, for error messages.

    Example::

        >>> input_shapes((torch.ones(2, 3), {"mask": torch.zeros(2)}))
        ((2, 3), {'mask': (2,)})
    """
    if isinstance(example, torch.Tensor):
        return tuple(example.shape)
    if isinstance(example, Mapping):
        return {k: input_shapes(v) for k, v in example.items()}
    if isinstance(example, list | tuple):
        return type(example)(input_shapes(e) for e in example)
    return type(example).__name__


def as_call(example: Any) -> tuple[tuple, dict]:
    """An example input as the positional and keyword arguments of one call (a dict: keywords; a tuple: positions).

    Example::

        >>> as_call(torch.ones(2)), as_call({"x": 1}), as_call((1, 2))
        (((tensor([1., 1.]),), {}), ((), {'x': 1}), ((1, 2), {}))
    """
    if isinstance(example, dict):
        return (), dict(example)
    if isinstance(example, tuple | list):
        return tuple(example), {}
    return (example,), {}


def named_arguments(function: Any, args: tuple, kwargs: dict) -> dict[Any, Any]:
    """The arguments of a call of ``function`` by parameter name, however the call spelled them (keywords gathered by
    ``**kwargs`` appear under their own names); positional ones that no name takes stay under their index.

    Example::

        >>> def forward(input_ids, attention_mask=None, **extra): ...
        >>> named_arguments(forward, (1, 2), {}), named_arguments(forward, (1,), {"attention_mask": 2, "other": 3})
        ({'input_ids': 1, 'attention_mask': 2}, {'input_ids': 1, 'attention_mask': 2, 'other': 3})
    """
    try:
        bound = inspect.signature(function).bind_partial(*args, **kwargs)
    except (TypeError, ValueError):  # no signature, or one the call does not fit
        return {**dict(enumerate(args)), **kwargs}
    named: dict[Any, Any] = {}
    for name, value in bound.arguments.items():
        kind = bound.signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            named.update({len(named) + i: v for i, v in enumerate(value)})
        else:
            named[name] = value
    return named


# The entry of a dict batch that is the model input by default, the first present of these.
DICT_INPUT_KEYS = ("input", "inputs", "x", "input_ids", "pixel_values")


def first_input(batch: Any) -> Any:
    """The model input of a batch: the batch itself if a tensor, else its first element (``(x, y)``)."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, list | tuple) and batch:
        return batch[0]
    if isinstance(batch, dict):
        for key in DICT_INPUT_KEYS:
            if key in batch:
                return batch[key]
    raise TypeError(
        f"Cannot tell the model input in a batch of type {type(batch).__name__}. "
        "Set `example_input_array` on the LightningModule or pass `example_input`."
    )


# Keys of a dict batch that hold what the model is trained to predict, not what it reads.
TARGET_KEYS = ("labels", "label", "targets", "target", "y")


def check_default_input(model: nn.Module, batch: Any, argument: str = "calibration_input") -> None:
    """Refuse a dict ``batch`` whose default model input (:func:`first_input`: one entry) leaves out other entries
    that ``model.forward`` names as parameters (e.g. ``attention_mask`` beside ``input_ids``): the model would run
    without them, silently. Entries holding targets (:data:`TARGET_KEYS`) do not count.

    Example::

        >>> class Encoder(nn.Module):
        ...     def forward(self, input_ids, attention_mask=None):
        ...         return input_ids
        >>> check_default_input(Encoder(), {"input_ids": 1, "labels": 2})
        >>> check_default_input(Encoder(), {"input_ids": 1, "attention_mask": 2})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: The training batches are dicts and by default the model input is their `input_ids` alone, ...
    """
    if not isinstance(batch, dict):
        return
    chosen = next((key for key in DICT_INPUT_KEYS if key in batch), None)
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return
    named = [
        name
        for name, parameter in parameters.items()
        if parameter.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    ]
    left_out = [key for key in batch if key != chosen and key in named and key not in TARGET_KEYS]
    if chosen is None or not left_out:
        return
    wanted = [key for key in named if key == chosen or key in left_out]
    example = ", ".join(f"{key!r}: batch[{key!r}]" for key in wanted)
    raise ValueError(
        f"The training batches are dicts and by default the model input is their `{chosen}` alone, but the model's "
        f"forward also takes {', '.join(f'`{key}`' for key in left_out)}, which the batches hold: the model would "
        f"run without {'it' if len(left_out) == 1 else 'them'}. Pass `{argument}`, a function from a training batch "
        f"to the model's input, e.g. `{argument}=lambda batch: {{{example}}}` (or `lambda batch: batch[{chosen!r}]` "
        "to run it on that entry alone)."
    )


def first_input_or_none(batch: Any) -> Any:
    """:func:`first_input`, or ``None`` for a batch whose model input cannot be told."""
    try:
        return first_input(batch)
    except TypeError:
        return None


def detach_input(example: Any, max_batch: int | None = None) -> Any:
    """A detached CPU-independent copy of an example input, cut to ``max_batch`` samples when given."""
    if isinstance(example, torch.Tensor):
        out = example.detach()
        if max_batch is not None and out.dim() > 0:
            out = out[:max_batch]
        return out.clone()
    if isinstance(example, list | tuple):
        return type(example)(detach_input(e, max_batch) for e in example)
    if isinstance(example, dict):
        return {k: detach_input(v, max_batch) for k, v in example.items()}
    return example


@contextlib.contextmanager
def preserved_rng(*loaders: Any) -> Iterator[None]:
    """Draw batches without moving the global random state (a shuffling sampler seeds itself from it) nor the
    generators of ``loaders`` (``DataLoader(generator=...)``, a sampler's own generator), so that the training sees
    the batches it would have seen without the draw, and a resumed run, which does not draw at the same point, does
    not diverge."""
    devices = (
        [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    )
    generators: list[torch.Generator] = []
    for loader in loaders:
        batch_sampler = getattr(loader, "batch_sampler", None)
        for owner in (
            loader,
            getattr(loader, "sampler", None),
            batch_sampler,
            getattr(batch_sampler, "sampler", None),
        ):
            generator = getattr(owner, "generator", None)
            if isinstance(generator, torch.Generator) and not any(generator is g for g in generators):
                generators.append(generator)
    states = [generator.get_state() for generator in generators]
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            for generator, state in zip(generators, states, strict=True):
                generator.set_state(state)


def first_batches(loader: Iterable | None, *window: int | None) -> list[Any]:
    """The batches ``itertools.islice(loader, *window)`` (default: the first one), drawn without moving any
    random state (:func:`preserved_rng`); ``[]`` without a loader."""
    with preserved_rng(loader):
        return list(itertools.islice(() if loader is None else loader, *(window or (1,))))
