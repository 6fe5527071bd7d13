"""Run 2:4-pruned Linear layers on the GPU's sparse tensor cores (``torch.sparse.to_sparse_semi_structured``)."""

from __future__ import annotations

import torch
from torch import nn

from lightning_compress.selection import Selector, select_modules


def is_two_four_sparse(weight: torch.Tensor) -> bool:
    """Whether every group of 4 consecutive weights along the input dimension has at most 2 non-zeros.

    Example::

        >>> is_two_four_sparse(torch.tensor([[1.0, 0.0, 2.0, 0.0], [0.0, 0.0, 0.0, 3.0]]))
        True
        >>> is_two_four_sparse(torch.tensor([[1.0, 1.0, 2.0, 0.0]]))
        False
    """
    if weight.dim() != 2 or weight.shape[1] % 4:
        return False
    return bool(((weight.reshape(weight.shape[0], -1, 4) != 0).sum(-1) <= 2).all())


def semi_structured_eligibility(module: nn.Module) -> str | None:
    """``None`` if ``module`` can use the 2:4 sparse kernels, else the reason it cannot.

    The kernels need a CUDA ``nn.Linear`` with a float16/bfloat16 weight whose both dimensions are multiples of
    64 and whose values follow the 2:4 pattern (e.g. after ``GradualPruning(mode="2:4")``).

    Example::

        >>> semi_structured_eligibility(nn.Linear(128, 128))
        'the weight is on cpu; the 2:4 sparse kernels need a CUDA GPU (compute capability 8.0 or newer)'
    """
    if not isinstance(module, nn.Linear):
        return f"it is a {type(module).__name__}, not an nn.Linear"
    weight = module.weight
    if weight.device.type != "cuda":
        return f"the weight is on {weight.device.type}; the 2:4 sparse kernels need a CUDA GPU (compute capability 8.0 or newer)"
    if weight.dtype not in (torch.float16, torch.bfloat16):
        return f"the weight is {weight.dtype}; convert the model to float16 or bfloat16 first"
    if weight.shape[0] % 64 or weight.shape[1] % 64:
        return f"its weight is {tuple(weight.shape)}; both dimensions must be multiples of 64"
    if not is_two_four_sparse(weight.detach()):
        return "its weight does not follow the 2:4 pattern; prune it with GradualPruning(mode='2:4') first"
    return None


def to_semi_structured(
    model: nn.Module, modules: Selector = nn.Linear, exclude: Selector = None, strict: bool = False
) -> dict[str, str]:
    """Store the weights of 2:4-pruned Linear layers in the semi-structured sparse format, in place.

    Matrix products with such a weight run on the sparse tensor cores (cuSPARSELt / CUTLASS), for inference.

    Args:
        model: the pruned model, on a CUDA device, in float16 or bfloat16.
        modules: which layers to convert (see :mod:`lightning_compress.selection`).
        exclude: layers to leave dense.
        strict: raise if a selected layer cannot be converted instead of leaving it dense.

    Returns:
        ``{layer name: reason}`` for every selected layer left dense.

    Example::

        >>> to_semi_structured(nn.Sequential(nn.Linear(64, 64)))
        {'0': 'the weight is on cpu; the 2:4 sparse kernels need a CUDA GPU (compute capability 8.0 or newer)'}
    """
    from torch.sparse import to_sparse_semi_structured

    skipped: dict[str, str] = {}
    for name, module in select_modules(model, modules, exclude):
        reason = semi_structured_eligibility(module)
        if reason is not None:
            if strict:
                raise ValueError(f"Layer {name!r} cannot use the 2:4 sparse kernels: {reason}.")
            skipped[name] = reason
            continue
        module.weight = nn.Parameter(to_sparse_semi_structured(module.weight.detach()), requires_grad=False)
    return skipped
