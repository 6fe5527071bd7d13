"""Every use of torchao's private functions, in one place, gated on the torchao versions where it was checked.

Two speed-ups and one memory fix reach into torchao's internals:

- :func:`cached_patterns` swaps ``_get_aten_graph_module_for_pattern`` (torchao exports every small pattern graph
  again at every rewrite: converting one model exports ~100 of them, tens of seconds on a small CPU) for a
  per-process cache, and ``_fold_conv_bn_qat_helper`` for one that skips the convolution kinds absent from the
  graph;
- :func:`release_torchao_module_cache` clears the ``functools.cache`` of the device helpers torchao's PT2E passes
  call, which otherwise keeps every module they saw alive for the life of the process.

These names and signatures are torchao's internals and may change in any release. Within
:data:`CHECKED_VERSIONS` they are used; outside it torchao's own functions run unchanged (slower, and holding
its caches) and a warning says so, once per process.
"""

from __future__ import annotations

import contextlib
import copy
import re
import sys
import warnings
from collections.abc import Callable, Hashable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.fx import GraphModule

# The torchao versions (minor releases, lowest included, highest excluded) where these private functions were
# checked: their names, signatures and behaviour.
CHECKED_VERSIONS = ((0, 12), (0, 19))

_warned = False

# The patterns depend only on the pattern code and the example shapes: exported once per process, copied out.
_PATTERNS: dict[Hashable, GraphModule] = {}

CONV_OPS = {
    "conv1d": torch.ops.aten.conv1d,
    "conv2d": torch.ops.aten.conv2d,
    "conv_transpose1d": torch.ops.aten.conv_transpose1d,
    "conv_transpose2d": torch.ops.aten.conv_transpose2d,
}

# torchao's PT2E passes call both (the second through torch.ao helpers they reuse).
_DEVICE_CACHES = (
    ("torchao.utils", "_assert_and_get_unique_device"),
    ("torch.ao.quantization.fx.utils", "assert_and_get_unique_device"),
)


def torchao_version() -> tuple[int, int] | None:
    """The installed torchao's ``(major, minor)`` version, ``None`` when it cannot be read.

    Example::

        >>> torchao_version() >= (0, 12)
        True
    """
    import torchao

    match = re.match(r"(\d+)\.(\d+)", str(getattr(torchao, "__version__", "")))
    return (int(match[1]), int(match[2])) if match else None


def private_functions_usable() -> bool:
    """Whether the installed torchao is one where the private functions were checked; warns once if not.

    Example::

        >>> private_functions_usable()
        True
    """
    global _warned
    version = torchao_version()
    low, high = CHECKED_VERSIONS
    if version is not None and low <= version < high:
        return True
    if not _warned:
        _warned = True
        found = "an unreadable version" if version is None else "{}.{}".format(*version)
        warnings.warn(
            f"lightning_compress speeds up torchao's PT2E quantization and frees its module caches through "
            f"private torchao functions checked with torchao {low[0]}.{low[1]} to {high[0]}.{high[1] - 1}; this "
            f"is torchao {found}, so torchao's own functions run instead: int8 conversion is slower and each "
            "quantized model stays in memory until the process ends. Install a torchao in that range to get "
            "them back.",
            UserWarning,
            stacklevel=2,
        )
    return False


def _signature(value: Any) -> Hashable:
    if isinstance(value, Tensor):
        return ("tensor", tuple(value.shape), value.dtype, value.device.type)
    if isinstance(value, list | tuple):
        return tuple(_signature(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _signature(v)) for k, v in value.items()))
    return value


@contextlib.contextmanager
def cached_patterns() -> Iterator[None]:
    """Within, torchao's pattern graphs come from a per-process cache, and conv-BN folding skips the convolution
    kinds absent from the graph; afterwards torchao's functions are put back and its module caches cleared.

    Outside :data:`CHECKED_VERSIONS` nothing is swapped (see :func:`private_functions_usable`).

    Example::

        >>> import torchao.quantization.pt2e.utils as pt2e_utils
        >>> original = pt2e_utils._get_aten_graph_module_for_pattern
        >>> with cached_patterns():
        ...     swapped = pt2e_utils._get_aten_graph_module_for_pattern is not original
        >>> swapped, pt2e_utils._get_aten_graph_module_for_pattern is original
        (True, True)
    """
    if not private_functions_usable():
        yield
        return
    import torchao.quantization.pt2e.qat_utils as qat_utils
    import torchao.quantization.pt2e.utils as pt2e_utils

    original = pt2e_utils._get_aten_graph_module_for_pattern
    original_fold = qat_utils._fold_conv_bn_qat_helper

    def cached(pattern: Callable, example_inputs: tuple, is_cuda: bool = False, **kwargs: Any) -> GraphModule:
        fn = getattr(pattern, "fn", pattern)  # torchao wraps some patterns in a fresh WrapperModule
        cells = tuple(c.cell_contents for c in (getattr(fn, "__closure__", None) or ()))
        key = (
            getattr(fn, "__code__", fn),
            _signature(cells),
            _signature(example_inputs),
            is_cuda,
            _signature(kwargs),
        )
        try:
            hit = _PATTERNS.get(key)
        except TypeError:  # something unhashable in the closure: no caching
            return original(pattern, example_inputs, is_cuda, **kwargs)
        if hit is None:
            hit = _PATTERNS[key] = original(pattern, example_inputs, is_cuda, **kwargs)
        return copy.deepcopy(hit)

    def fold(m: GraphModule, conv_fn: Callable, example_inputs: tuple, is_cuda: bool) -> GraphModule:
        # Conversion tries the conv1d, conv2d and both transposed kinds; only the kinds present can match.
        op = CONV_OPS.get(getattr(conv_fn, "__name__", ""))
        if op is not None and not any(getattr(n.target, "overloadpacket", None) is op for n in m.graph.nodes):
            return m
        return original_fold(m, conv_fn, example_inputs, is_cuda)

    pt2e_utils._get_aten_graph_module_for_pattern = cached
    qat_utils._get_aten_graph_module_for_pattern = cached
    qat_utils._fold_conv_bn_qat_helper = fold
    try:
        yield
    finally:
        pt2e_utils._get_aten_graph_module_for_pattern = original
        qat_utils._get_aten_graph_module_for_pattern = original
        qat_utils._fold_conv_bn_qat_helper = original_fold
        release_torchao_module_cache()


def release_torchao_module_cache() -> None:
    """Forget the modules torchao's PT2E passes have looked at.

    torchao (and the torch.ao helpers it reuses) memoize the device of every module their passes see
    (``functools.cache`` keyed by the module), so each prepared, converted or mode-switched graph — with its
    weights, and the model around it — stayed alive for the life of the process, and a graph moved to another
    device afterwards got its old device back. Outside :data:`CHECKED_VERSIONS` this does nothing.

    Example::

        >>> from torch import nn
        >>> from torchao.utils import _assert_and_get_unique_device
        >>> _ = _assert_and_get_unique_device(nn.Linear(2, 2))
        >>> release_torchao_module_cache()
        >>> _assert_and_get_unique_device.cache_info().currsize
        0
    """
    if not private_functions_usable():
        return
    for module_name, function in _DEVICE_CACHES:
        module = sys.modules.get(module_name)  # only those already imported hold anything
        cache_clear = getattr(getattr(module, function, None), "cache_clear", None)
        if cache_clear is not None:
            cache_clear()
