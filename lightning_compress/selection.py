"""Target selection: which submodules a compression callback touches.

A selection is written the same way in every callback:

- ``modules``: a module type (``nn.Linear``), a qualified-name pattern (``"encoder.*.fc*"`` as a glob, or
  ``"re:encoder\\.\\d+\\.fc"`` as a regular expression), or a list of them. Types are OR-ed together and
  patterns are OR-ed together; when both are given a module must match a type *and* a pattern, so
  ``[nn.Linear, "encoder.*"]`` means "the Linear layers inside the encoder".
- ``exclude``: patterns (or types) to leave out.
- ``min_params``: leave out modules with fewer parameters of their own.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from torch import nn

SelectorItem = type | str
Selector = SelectorItem | Sequence[SelectorItem] | None

_GLOB_CHARS = set("*?[")


def _as_list(spec: Selector, argument: str = "modules") -> list[SelectorItem]:
    if spec is None:
        return []
    if isinstance(spec, type | str):
        return [spec]
    if not isinstance(spec, Iterable):
        raise TypeError(
            f"`{argument}={spec!r}` must be a layer type, a name pattern, or a list of them, e.g. "
            f"`{argument}=[nn.Linear, 'encoder.*']`."
        )
    return list(spec)


def selector_items(spec: Selector) -> list[SelectorItem]:
    """A ``modules``/``exclude`` value as a list of its items (``None``: none), to add items to it.

    Example::

        >>> selector_items("head"), selector_items(None), selector_items([nn.Linear, "fc*"])
        (['head'], [], [<class 'torch.nn.modules.linear.Linear'>, 'fc*'])
    """
    return _as_list(spec)


def _check_items(items: list[SelectorItem], argument: str) -> tuple[list[type], list[str]]:
    types: list[type] = []
    patterns: list[str] = []
    for item in items:
        if isinstance(item, str):
            if not item:
                raise ValueError(f"`{argument}` contains an empty pattern.")
            if item.startswith("re:"):
                try:
                    re.compile(item[3:])
                except re.error as err:
                    raise ValueError(
                        f"`{argument}` pattern {item!r} is not a valid regular expression: {err}"
                    ) from None
            patterns.append(item)
        elif isinstance(item, type) and issubclass(item, nn.Module):
            types.append(item)
        else:
            raise TypeError(
                f"`{argument}` got {item!r}, which is neither a module name pattern (str) nor a subclass of "
                "`torch.nn.Module`. Pass e.g. `nn.Linear` or 'encoder.*'."
            )
    return types, patterns


def _matches(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def _own_param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters(recurse=False))


@dataclass(frozen=True)
class ModuleSelection:
    """A validated selection rule; :meth:`select` applies it to a model.

    Args:
        modules: types and/or name patterns to select (``None``: every module that owns parameters).
        exclude: types and/or name patterns to leave out.
        min_params: minimum number of the module's own parameters.

    Example::

        >>> from torch import nn
        >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4, 2))
        >>> [name for name, _ in ModuleSelection(modules=[nn.Conv2d, nn.Linear]).select(model)]
        ['0', '3']
        >>> [name for name, _ in ModuleSelection(modules=nn.Linear, exclude="3").select(model)]
        Traceback (most recent call last):
        ...
        ValueError: The selection (modules=[Linear], exclude=['3'], min_params=0) matches no module of Sequential. Modules with parameters: '0' (Conv2d), '3' (Linear).
    """

    modules: Selector = None
    exclude: Selector = None
    min_params: int = 0
    _types: tuple[type, ...] = field(init=False, repr=False, compare=False)
    _patterns: tuple[str, ...] = field(init=False, repr=False, compare=False)
    _exclude_types: tuple[type, ...] = field(init=False, repr=False, compare=False)
    _exclude_patterns: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if (
            self.modules is not None
            and not isinstance(self.modules, type | str)
            and not _as_list(self.modules, "modules")
        ):
            raise ValueError(
                f"`modules={self.modules!r}` is empty and would select nothing: pass the layer types and/or name "
                "patterns to select, e.g. `modules=[nn.Linear]` (or `None` for every module with parameters)."
            )
        types, patterns = _check_items(_as_list(self.modules, "modules"), "modules")
        ex_types, ex_patterns = _check_items(_as_list(self.exclude, "exclude"), "exclude")
        if isinstance(self.min_params, bool) or not isinstance(self.min_params, int) or self.min_params < 0:
            raise ValueError(f"`min_params={self.min_params!r}` must be a non-negative integer.")
        object.__setattr__(self, "_types", tuple(types))
        object.__setattr__(self, "_patterns", tuple(patterns))
        object.__setattr__(self, "_exclude_types", tuple(ex_types))
        object.__setattr__(self, "_exclude_patterns", tuple(ex_patterns))

    def __str__(self) -> str:
        def show(items: Selector) -> str:
            return (
                "[" + ", ".join(i.__name__ if isinstance(i, type) else repr(i) for i in _as_list(items)) + "]"
            )

        return f"(modules={show(self.modules)}, exclude={show(self.exclude)}, min_params={self.min_params})"

    def _included(self, name: str, module: nn.Module) -> bool:
        if self._types and not isinstance(module, self._types):
            return False
        if self._patterns:
            return any(_matches(name, p) for p in self._patterns)
        if not self._types:
            return _own_param_count(module) > 0
        return True

    def _excluded(self, name: str, module: nn.Module) -> bool:
        if self._exclude_types and isinstance(module, self._exclude_types):
            return True
        return any(_matches(name, p) for p in self._exclude_patterns)

    def select(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """Return the selected ``(qualified name, module)`` pairs in ``named_modules`` order.

        Raises:
            ValueError: when a pattern matches no module name (with close matches suggested), or when the
                whole selection is empty.
        """
        named = [(n, m) for n, m in model.named_modules() if n]
        names = [n for n, _ in named]
        for pattern in (*self._patterns, *self._exclude_patterns):
            if not any(_matches(n, pattern) for n in names):
                argument = "modules" if pattern in self._patterns else "exclude"
                close = difflib.get_close_matches(pattern, names, n=3, cutoff=0.5)
                hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
                kind = "name" if pattern.startswith("re:") or _GLOB_CHARS & set(pattern) else "module named"
                raise ValueError(
                    f"`{argument}`: no {kind} {pattern!r} in {type(model).__name__}.{hint} "
                    "Names are qualified as in `model.named_modules()`."
                )
        chosen = [
            (n, m)
            for n, m in named
            if self._included(n, m) and not self._excluded(n, m) and _own_param_count(m) >= self.min_params
        ]
        if not chosen:
            with_params = [f"{n!r} ({type(m).__name__})" for n, m in named if _own_param_count(m) > 0]
            listing = ", ".join(with_params[:12]) + (", ..." if len(with_params) > 12 else "")
            raise ValueError(
                f"The selection {self} matches no module of {type(model).__name__}. "
                f"Modules with parameters: {listing or 'none'}."
            )
        return chosen

    def excluded(self, model: nn.Module) -> list[str]:
        """Names of the modules of ``model`` that ``exclude`` leaves out (for callbacks that must also keep
        them from being changed as a side effect, e.g. as coupled layers of structured pruning)."""
        return [n for n, m in model.named_modules() if n and self._excluded(n, m)]


def select_modules(
    model: nn.Module, modules: Selector = None, exclude: Selector = None, min_params: int = 0
) -> list[tuple[str, nn.Module]]:
    """Select submodules of ``model`` by type and/or qualified-name pattern.

    Args:
        model: the model to search.
        modules: types and/or name patterns (glob, or ``"re:..."`` for a regular expression).
        exclude: types and/or name patterns to leave out.
        min_params: minimum number of the module's own parameters.

    Example::

        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> [n for n, _ in select_modules(model, nn.Linear, min_params=20)]
        ['0']
        >>> select_modules(model, "head")
        Traceback (most recent call last):
        ...
        ValueError: `modules`: no module named 'head' in Sequential. Names are qualified as in `model.named_modules()`.
    """
    return ModuleSelection(modules, exclude, min_params).select(model)


def find_submodule(model: nn.Module, name: str, argument: str, owner: str = "", empty: str = "") -> nn.Module:
    """The submodule ``name`` of ``model`` (``""``: ``model`` itself); an unknown name is an error that names
    ``argument`` and suggests close matches. ``owner`` names the model in it, ``empty`` adds what the argument's
    empty value means.

    Example::

        >>> find_submodule(nn.Sequential(nn.Linear(2, 2)), "0", "module")
        Linear(in_features=2, out_features=2, bias=True)
    """
    if name == "":
        return model
    try:
        return model.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(
            f"`{argument}`: no such submodule in {owner or type(model).__name__}.{hint} "
            f"Names are qualified as in `model.named_modules()`{'; ' + empty if empty else ''}."
        ) from None


def tied_parameter_names(model: nn.Module) -> dict[str, list[str]]:
    """``{parameter name: every name of the same tensor}`` for the tensors that several layers share.

    Example::

        >>> model = nn.Sequential(nn.Embedding(4, 2), nn.Linear(2, 4, bias=False))
        >>> model[1].weight = model[0].weight
        >>> tied_parameter_names(model)
        {'0.weight': ['0.weight', '1.weight'], '1.weight': ['0.weight', '1.weight']}
    """
    names: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(parameter), []).append(name)
    return {n: group for group in names.values() if len(group) > 1 for n in group}
