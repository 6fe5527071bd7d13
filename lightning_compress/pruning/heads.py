"""Attention-head pruning for ``nn.MultiheadAttention``: mask whole heads while training, remove them at the end.

A head ``h`` of width ``d = embed_dim // num_heads`` owns rows ``h*d:(h+1)*d`` of the query, key and value
projections (weights and biases) and columns ``h*d:(h+1)*d`` of ``out_proj.weight``; one such set of slices
is a :class:`HeadGroup`. Zeroing the value rows and bias of a head makes its attention output zero, and its
zeroed ``out_proj`` columns would drop it anyway, so a masked model computes exactly what the model with the
head removed does. As in :mod:`lightning_compress.pruning.structured`, two phases share one plan
(``{module name: [removed head indices]}``): :meth:`HeadPruner.compute_masks` while training, and
:meth:`HeadPruner.materialize` at the end, which swaps each pruned attention for a narrower
:class:`PrunedMultiheadAttention`.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_compress.pruning.masks import SCOPES, check_choice
from lightning_compress.schedules import validate_amount

HEAD_CRITERIA = ("l1", "l2", "taylor", "random")


@dataclass(frozen=True)
class HeadSlice:
    """Where the heads of one attention module sit in one parameter: head ``h`` is the block
    ``start + h*head_dim : start + (h+1)*head_dim`` along ``dim``.

    Args:
        param: qualified parameter name, as in ``model.named_parameters()``.
        dim: the dimension the heads are laid out along (0 for projection rows, 1 for ``out_proj`` columns).
        start: offset of head 0 along ``dim`` (the q, k and v parts of a packed ``in_proj_weight`` start at
            0, ``embed_dim`` and ``2 * embed_dim``).
    """

    param: str
    dim: int
    start: int = 0


@dataclass(frozen=True)
class HeadGroup:
    """The heads of one ``nn.MultiheadAttention`` and every parameter slice a head maps to.

    Args:
        module: qualified module name.
        num_heads: number of heads of the unpruned module.
        head_dim: width of one head.
        slices: the q, k, v projection rows (weights and biases) and the ``out_proj`` columns.
    """

    module: str
    num_heads: int
    head_dim: int
    slices: tuple[HeadSlice, ...]

    @property
    def params(self) -> list[str]:
        """Names of the parameters the group touches, without duplicates."""
        return list(dict.fromkeys(s.param for s in self.slices))


def _head_slices(name: str, mha: nn.MultiheadAttention) -> tuple[HeadSlice, ...]:
    prefix = f"{name}." if name else ""
    e = mha.embed_dim
    if mha._qkv_same_embed_dim:
        slices = [HeadSlice(f"{prefix}in_proj_weight", 0, start) for start in (0, e, 2 * e)]
    else:
        slices = [HeadSlice(f"{prefix}{p}_proj_weight", 0) for p in "qkv"]
    if mha.in_proj_bias is not None:
        slices += [HeadSlice(f"{prefix}in_proj_bias", 0, start) for start in (0, e, 2 * e)]
    slices.append(HeadSlice(f"{prefix}out_proj.weight", 1))
    return tuple(slices)


def _float_mask(mask: Tensor | None, dtype: torch.dtype, name: str) -> Tensor | None:
    """An additive float mask: bool ``True`` (not allowed to attend) becomes ``-inf``, floats pass through."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    if not mask.is_floating_point():
        raise TypeError(f"`{name}` must be a bool or floating-point tensor, got {mask.dtype}.")
    return mask.to(dtype)


class PrunedMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` with only some of its heads, built by :meth:`HeadPruner.materialize`.

    The query, key and value projections are separate ``nn.Linear`` layers ``q_proj``, ``k_proj`` and
    ``v_proj`` of width ``num_heads * head_dim`` (the kept heads), and ``out_proj`` maps that width back to
    ``embed_dim``. ``forward`` takes the arguments of ``nn.MultiheadAttention.forward`` and returns
    ``(output, weights)``; the attention runs in ``F.scaled_dot_product_attention`` unless the weights are
    requested. A 3-D ``attn_mask`` is still given per *original* head (``(N * total_heads, L, S)``); the
    masks of the kept heads are picked out. Returned weights are averaged over the kept heads.

    ``nn.TransformerEncoderLayer`` runs a fused kernel in eval mode that needs the packed full-width
    projections of ``nn.MultiheadAttention``; ``in_proj_weight``, ``in_proj_bias`` (``None``) and
    ``_qkv_same_embed_dim`` (``False``) are the attributes it checks, and make it call this module instead.

    Args:
        embed_dim: model width (inputs of ``q_proj`` and outputs of ``out_proj``).
        head_dim: width of one head.
        heads: indices of the kept heads in the original module.
        total_heads: number of heads of the original module.
        kdim: width of the keys (default ``embed_dim``).
        vdim: width of the values (default ``embed_dim``).
        dropout: dropout probability on the attention weights, applied in training only.
        bias: whether the projections have biases.
        batch_first: inputs and outputs are ``(N, L, E)`` rather than ``(L, N, E)``.

    Example::

        >>> _ = torch.manual_seed(0)
        >>> mha = nn.MultiheadAttention(16, 4, batch_first=True).eval()
        >>> pruned = PrunedMultiheadAttention.from_attention(mha, heads=[0, 2]).eval()
        >>> pruned
        PrunedMultiheadAttention(
          embed_dim=16, heads=(0, 2) of 4, head_dim=4, batch_first=True
          (q_proj): Linear(in_features=16, out_features=8, bias=True)
          (k_proj): Linear(in_features=16, out_features=8, bias=True)
          (v_proj): Linear(in_features=16, out_features=8, bias=True)
          (out_proj): Linear(in_features=8, out_features=16, bias=True)
        )
        >>> x = torch.randn(2, 5, 16)
        >>> out, weights = pruned(x, x, x)
        >>> tuple(out.shape), tuple(weights.shape)
        ((2, 5, 16), (2, 5, 5))
    """

    in_proj_weight = None
    in_proj_bias = None
    _qkv_same_embed_dim = False

    def __init__(
        self,
        embed_dim: int,
        head_dim: int,
        heads: Sequence[int],
        total_heads: int,
        kdim: int | None = None,
        vdim: int | None = None,
        dropout: float = 0.0,
        bias: bool = True,
        batch_first: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        heads = tuple(int(h) for h in heads)
        if not heads or len(set(heads)) != len(heads) or not all(0 <= h < total_heads for h in heads):
            raise ValueError(
                f"`heads={list(heads)}` must be distinct indices in [0, {total_heads}), at least one of them."
            )
        self.embed_dim = embed_dim
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self.head_dim = head_dim
        self.heads = heads
        self.total_heads = total_heads
        self.num_heads = len(heads)
        self.dropout = dropout
        self.batch_first = batch_first
        width = self.num_heads * head_dim
        factory = {"device": device, "dtype": dtype}
        self.q_proj = nn.Linear(embed_dim, width, bias=bias, **factory)
        self.k_proj = nn.Linear(self.kdim, width, bias=bias, **factory)
        self.v_proj = nn.Linear(self.vdim, width, bias=bias, **factory)
        self.out_proj = nn.Linear(width, embed_dim, bias=bias, **factory)

    @classmethod
    def from_attention(cls, mha: nn.MultiheadAttention, heads: Sequence[int]) -> PrunedMultiheadAttention:
        """A copy of ``mha`` that keeps only ``heads`` (their weights are copied; ``requires_grad`` kept).

        Raises:
            ValueError: if ``mha`` has ``add_bias_kv=True`` or ``add_zero_attn=True`` (not supported).
        """
        _check_supported(mha, type(mha).__name__)
        d = mha.head_dim
        device, dtype = mha.out_proj.weight.device, mha.out_proj.weight.dtype
        pruned = cls(
            mha.embed_dim,
            d,
            heads,
            mha.num_heads,
            kdim=mha.kdim,
            vdim=mha.vdim,
            dropout=mha.dropout,
            bias=mha.in_proj_bias is not None,
            batch_first=mha.batch_first,
            device=device,
            dtype=dtype,
        )
        pruned.train(mha.training)
        rows = torch.cat([torch.arange(h * d, (h + 1) * d) for h in pruned.heads]).to(device)
        e = mha.embed_dim
        if mha._qkv_same_embed_dim:
            weights = [mha.in_proj_weight[i * e : (i + 1) * e] for i in range(3)]
        else:
            weights = [mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight]
        biases = list(mha.in_proj_bias.chunk(3)) if mha.in_proj_bias is not None else [None] * 3
        layers = [pruned.q_proj, pruned.k_proj, pruned.v_proj]
        with torch.no_grad():
            for layer, weight, b in zip(layers, weights, biases, strict=True):
                layer.weight.copy_(weight[rows])
                layer.weight.requires_grad_(weight.requires_grad)
                if b is not None:
                    layer.bias.copy_(b[rows])
                    layer.bias.requires_grad_(b.requires_grad)
            pruned.out_proj.weight.copy_(mha.out_proj.weight[:, rows])
            pruned.out_proj.weight.requires_grad_(mha.out_proj.weight.requires_grad)
            if mha.out_proj.bias is not None:
                pruned.out_proj.bias.copy_(mha.out_proj.bias)
                pruned.out_proj.bias.requires_grad_(mha.out_proj.bias.requires_grad)
        return pruned

    def extra_repr(self) -> str:
        text = (
            f"embed_dim={self.embed_dim}, heads={self.heads} of {self.total_heads}, head_dim={self.head_dim}"
        )
        if self.kdim != self.embed_dim or self.vdim != self.embed_dim:
            text += f", kdim={self.kdim}, vdim={self.vdim}"
        if self.dropout:
            text += f", dropout={self.dropout}"
        return text + f", batch_first={self.batch_first}"

    def _attention_mask(
        self,
        attn_mask: Tensor | None,
        key_padding_mask: Tensor | None,
        bsz: int,
        tgt_len: int,
        src_len: int,
        dtype: torch.dtype,
    ) -> Tensor | None:
        """One additive mask broadcastable to ``(N, num_heads, L, S)``, or ``None``."""
        mask = _float_mask(attn_mask, dtype, "attn_mask")
        if mask is not None:
            if mask.dim() == 2:
                if tuple(mask.shape) != (tgt_len, src_len):
                    raise RuntimeError(
                        f"The shape of the 2D attn_mask is {tuple(mask.shape)}, but should be {(tgt_len, src_len)}."
                    )
                mask = mask.view(1, 1, tgt_len, src_len)
            elif mask.dim() == 3:
                expected = (bsz * self.total_heads, tgt_len, src_len)
                if tuple(mask.shape) != expected:
                    raise RuntimeError(
                        f"The shape of the 3D attn_mask is {tuple(mask.shape)}, but should be {expected} "
                        f"(one mask per original head, {self.total_heads} heads)."
                    )
                kept = torch.tensor(self.heads, device=mask.device)
                mask = mask.view(bsz, self.total_heads, tgt_len, src_len).index_select(1, kept)
            else:
                raise RuntimeError(f"attn_mask's dimension {mask.dim()} is not supported")
        padding = _float_mask(key_padding_mask, dtype, "key_padding_mask")
        if padding is not None:
            if tuple(padding.shape) != (bsz, src_len):
                raise RuntimeError(
                    f"The shape of key_padding_mask is {tuple(padding.shape)}, but should be {(bsz, src_len)}."
                )
            padding = padding.view(bsz, 1, 1, src_len)
            mask = padding if mask is None else mask + padding
        return mask

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Attention over the kept heads; arguments and results as in ``nn.MultiheadAttention.forward``."""
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        bsz, tgt_len, _ = query.shape
        src_len = key.shape[1]
        if is_causal and attn_mask is None:
            raise RuntimeError(
                "Need attn_mask if specifying the is_causal hint. You may use the Transformer module method "
                "`generate_square_subsequent_mask` to create this mask."
            )
        # As nn.MultiheadAttention: the hint replaces the mask only when nothing has to be merged into it.
        causal = is_causal and key_padding_mask is None and not need_weights
        mask = (
            None
            if causal
            else self._attention_mask(attn_mask, key_padding_mask, bsz, tgt_len, src_len, query.dtype)
        )
        h, d = self.num_heads, self.head_dim
        q = self.q_proj(query).view(bsz, tgt_len, h, d).transpose(1, 2)
        k = self.k_proj(key).view(bsz, src_len, h, d).transpose(1, 2)
        v = self.v_proj(value).view(bsz, src_len, h, d).transpose(1, 2)
        dropout_p = self.dropout if self.training else 0.0
        weights: Tensor | None = None
        if need_weights:
            scores = (q * (1.0 / math.sqrt(d))) @ k.transpose(-2, -1)
            if mask is not None:
                scores = scores + mask
            weights = scores.softmax(dim=-1)
            if dropout_p > 0.0:
                weights = F.dropout(weights, p=dropout_p)
            out = weights @ v
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not batched:
                weights = weights.squeeze(0)
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal
            )
        out = self.out_proj(out.transpose(1, 2).reshape(bsz, tgt_len, h * d))
        if not batched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights


def _check_supported(mha: nn.MultiheadAttention, name: str) -> None:
    for flag, present in (("add_bias_kv", mha.bias_k is not None), ("add_zero_attn", mha.add_zero_attn)):
        if present:
            raise ValueError(
                f"{name!r} is an nn.MultiheadAttention with `{flag}=True`, which head pruning does not support "
                "(PrunedMultiheadAttention has no extra key/value positions). Leave it out with `modules`."
            )


def _select(model: nn.Module, modules: Sequence[str] | None) -> list[tuple[str, nn.MultiheadAttention]]:
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    if modules is None:
        if not found:
            raise ValueError(f"{type(model).__name__} has no nn.MultiheadAttention module to prune.")
        return found
    if isinstance(modules, str):
        modules = [modules]
    names = dict(model.named_modules())
    chosen: dict[str, nn.MultiheadAttention] = {}
    for selector in modules:
        if selector not in names:
            close = difflib.get_close_matches(selector, [n for n in names if n], n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ValueError(
                f"`modules`: no module named {selector!r} in {type(model).__name__}.{hint} "
                "Names are qualified as in `model.named_modules()`."
            )
        inside = [(n, m) for n, m in found if n == selector or not selector or n.startswith(f"{selector}.")]
        if not inside:
            listing = ", ".join(repr(n) for n, _ in found) or "none"
            raise ValueError(
                f"`modules`: {selector!r} ({type(names[selector]).__name__}) is no nn.MultiheadAttention and "
                f"contains none. Attention modules of {type(model).__name__}: {listing}."
            )
        chosen.update(inside)
    return [(n, m) for n, m in found if n in chosen]


class HeadPruner:
    """Score, mask and finally remove whole attention heads of the ``nn.MultiheadAttention`` modules of a model.

    Args:
        model: the model to prune; its weights are not changed here.
        modules: qualified names of the attention modules to prune, or of containers whose attention modules
            are all pruned (``None``: every ``nn.MultiheadAttention`` of ``model``).

    Raises:
        ValueError: if a name does not exist or selects no attention module, if there is none at all, or if a
            selected module uses ``add_bias_kv`` or ``add_zero_attn``.

    Example::

        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.MultiheadAttention(8, 4))
        >>> pruner = HeadPruner(model)
        >>> pruner.groups[0].module, pruner.groups[0].num_heads, pruner.groups[0].params
        ('0', 4, ['0.in_proj_weight', '0.in_proj_bias', '0.out_proj.weight'])
        >>> masks, plan = pruner.compute_masks(model, 0.5, criterion="random", generator=torch.Generator().manual_seed(0))
        >>> plan
        {'0': [2, 3]}
        >>> masks["0.out_proj.weight"][0]
        tensor([ True,  True,  True,  True, False, False, False, False])
        >>> pruner.materialize(model, plan)[0]
        PrunedMultiheadAttention(
          embed_dim=8, heads=(0, 1) of 4, head_dim=2, batch_first=False
          (q_proj): Linear(in_features=8, out_features=4, bias=True)
          (k_proj): Linear(in_features=8, out_features=4, bias=True)
          (v_proj): Linear(in_features=8, out_features=4, bias=True)
          (out_proj): Linear(in_features=4, out_features=8, bias=True)
        )
    """

    def __init__(self, model: nn.Module, modules: list[str] | None = None) -> None:
        selected = _select(model, modules)
        for name, mha in selected:
            _check_supported(mha, name)
        self.groups: list[HeadGroup] = [
            HeadGroup(name, mha.num_heads, mha.head_dim, _head_slices(name, mha)) for name, mha in selected
        ]

    def __repr__(self) -> str:
        heads = {g.module: g.num_heads for g in self.groups}
        return f"{type(self).__name__}(heads={heads})"

    @property
    def modules(self) -> list[str]:
        """Names of the attention modules this pruner handles, in model order."""
        return [g.module for g in self.groups]

    # ----------------------------------------------------------------------- helpers

    def _params(self, model: nn.Module) -> dict[str, Tensor]:
        params = dict(model.named_parameters())
        for group in self.groups:
            for s in group.slices:
                p = params.get(s.param)
                if (
                    p is None
                    or p.dim() <= s.dim
                    or p.shape[s.dim] < s.start + group.num_heads * group.head_dim
                ):
                    found = "missing" if p is None else f"of shape {tuple(p.shape)}"
                    raise ValueError(
                        f"`model` does not match the model this pruner was built on: parameter {s.param!r} is "
                        f"{found}. Pass the same model (before `materialize`), or build a new pruner."
                    )
        return params

    def _removed(self, plan: Mapping[str, Sequence[int]], argument: str) -> dict[str, list[int]]:
        known = {g.module: g for g in self.groups}
        for name in plan:
            if name not in known:
                raise ValueError(
                    f"`{argument}` names {name!r}, which is no attention module of this pruner: {self.modules}."
                )
        removed: dict[str, list[int]] = {}
        for group in self.groups:
            heads = sorted({int(h) for h in plan.get(group.module, ())})
            if any(not 0 <= h < group.num_heads for h in heads):
                raise ValueError(
                    f"`{argument}[{group.module!r}]` = {heads} has head indices outside [0, {group.num_heads})."
                )
            if len(heads) == group.num_heads:
                raise ValueError(
                    f"`{argument}[{group.module!r}]` removes all {group.num_heads} heads; at least one is kept."
                )
            removed[group.module] = heads
        return removed

    def _sums(
        self,
        group: HeadGroup,
        params: Mapping[str, Tensor],
        criterion: str,
        grads: Mapping[str, Tensor] | None,
    ) -> tuple[Tensor, int]:
        """Per head: the sum of ``|w|``, ``w**2`` or ``|w * grad|`` over all its slices, and its entry count."""
        total = torch.zeros(group.num_heads, dtype=torch.float64)
        entries = used = 0
        width = group.num_heads * group.head_dim
        for s in group.slices:
            w = params[s.param].detach()
            if criterion == "taylor":
                g = grads.get(s.param) if grads is not None else None
                if g is None:
                    continue
                values = (w.float() * g.detach().float().to(w.device)).abs()
            elif criterion == "l1":
                values = w.float().abs()
            else:
                values = w.float().square()
            block = values.narrow(s.dim, s.start, width).movedim(s.dim, 0).reshape(group.num_heads, -1)
            total += block.sum(dim=1).double().cpu()
            entries += block.shape[1]
            used += 1
        if criterion == "taylor" and used == 0:
            raise ValueError(
                f"`criterion='taylor'` needs gradients, and `grads` has none for {group.module!r} "
                f"(parameters {group.params}). Pass the gradients of these parameters."
            )
        return total, entries

    # ----------------------------------------------------------------------- scoring and planning

    def importance_scores(
        self,
        model: nn.Module,
        criterion: str = "l1",
        grads: Mapping[str, Tensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """Importance of every head, ``{module name: scores of shape (num_heads,)}``; the lowest go first.

        Args:
            model: the model the pruner was built on (or one with the same parameter names and shapes).
            criterion: ``"l1"`` (sum of ``|w|`` over all the head's slices), ``"l2"`` (their Euclidean
                norm), ``"taylor"`` (sum of ``|w * grad|``, first-order estimate of the loss change) or
                ``"random"`` (uniform, reproducible with ``generator``).
            grads: gradients by parameter name, needed by ``"taylor"``.
            generator: random source for ``"random"``.

        Example::

            >>> mha = nn.MultiheadAttention(4, 2, bias=False)
            >>> with torch.no_grad():
            ...     _ = mha.in_proj_weight.fill_(1.0)
            ...     _ = mha.out_proj.weight.fill_(0.5)
            >>> HeadPruner(mha).importance_scores(mha)  # per head: 3 * 2*4 ones + 4*2 halves
            {'': tensor([28., 28.])}
        """
        return self._scores(model, criterion, grads, generator, per_entry=False)

    def _scores(
        self,
        model: nn.Module,
        criterion: str,
        grads: Mapping[str, Tensor] | None,
        generator: torch.Generator | None,
        per_entry: bool,
    ) -> dict[str, Tensor]:
        """Head scores; with ``per_entry`` divided by the entry count of a head (the l2 norm becomes an RMS)
        so that heads of modules of different widths compare."""
        check_choice(criterion, HEAD_CRITERIA, "criterion")
        if criterion == "taylor" and not grads:
            raise ValueError(
                "`criterion='taylor'` needs gradients: pass `grads={parameter name: gradient}` (e.g. "
                "`{n: p.grad for n, p in model.named_parameters()}` after a backward pass)."
            )
        params = self._params(model)
        scores: dict[str, Tensor] = {}
        for group in self.groups:
            if criterion == "random":
                scores[group.module] = torch.rand(group.num_heads, generator=generator)
                continue
            total, entries = self._sums(group, params, criterion, grads)
            if per_entry:
                total = total / entries
            scores[group.module] = (total.sqrt() if criterion == "l2" else total).float()
        return scores

    def compute_masks(
        self,
        model: nn.Module,
        amount: float,
        *,
        scope: str = "layer",
        criterion: str = "l1",
        grads: Mapping[str, Tensor] | None = None,
        previous: Mapping[str, Sequence[int]] | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[dict[str, Tensor], dict[str, list[int]]]:
        """Choose the heads to remove and return ``(masks, plan)``.

        ``amount`` is the absolute fraction of heads removed: ``floor(amount * num_heads)`` per module
        (``scope="layer"``) or ``floor(amount * all heads)`` over all modules (``scope="global"``, one ranking
        of every head by its score per parameter entry, so modules of different widths compare and modules
        with smaller weights lose more heads). Every module keeps at least one head, and heads removed in
        ``previous`` stay removed.

        Args:
            model: the model the pruner was built on.
            amount: fraction of heads removed, in ``[0, 1)``.
            scope: ``"layer"`` or ``"global"``.
            criterion: see :meth:`importance_scores`.
            grads: gradients by parameter name, for ``criterion="taylor"``.
            previous: an earlier plan; its heads stay removed, so plans only grow.
            generator: random source for ``criterion="random"``.

        Returns:
            ``masks``: ``{parameter name: bool tensor of its shape, True = keep}`` for the q/k/v projection
            weights and biases and ``out_proj.weight`` of every module; ``plan``: ``{module name: sorted
            removed head indices}`` for every module.

        Example::

            >>> _ = torch.manual_seed(0)
            >>> model = nn.ModuleDict({"a": nn.MultiheadAttention(8, 4), "b": nn.MultiheadAttention(8, 4)})
            >>> with torch.no_grad():
            ...     _ = model["b"].in_proj_weight.mul_(0.01)
            >>> pruner = HeadPruner(model)
            >>> {k: len(v) for k, v in pruner.compute_masks(model, 0.5)[1].items()}
            {'a': 2, 'b': 2}
            >>> {k: len(v) for k, v in pruner.compute_masks(model, 0.5, scope="global")[1].items()}
            {'a': 1, 'b': 3}
        """
        amount = validate_amount(amount)
        check_choice(scope, SCOPES, "scope")
        check_choice(criterion, HEAD_CRITERIA, "criterion")
        forced = self._removed(previous or {}, "previous")
        scores = self._scores(model, criterion, grads, generator, per_entry=scope == "global")
        removed = {g.module: set(forced[g.module]) for g in self.groups}
        if scope == "layer":
            for g in self.groups:
                want = min(math.floor(amount * g.num_heads + 1e-9), g.num_heads - 1)
                order = torch.sort(scores[g.module].double(), stable=True).indices.tolist()
                for h in order:
                    if len(removed[g.module]) >= want:
                        break
                    removed[g.module].add(h)
        else:
            budget = math.floor(amount * sum(g.num_heads for g in self.groups) + 1e-9)
            budget -= sum(len(r) for r in removed.values())
            pool = [(g, h) for g in self.groups for h in range(g.num_heads) if h not in removed[g.module]]
            if budget > 0 and pool:
                pooled = torch.stack([scores[g.module][h].double() for g, h in pool])
                for k in torch.sort(pooled, stable=True).indices.tolist():
                    if budget <= 0:
                        break
                    g, h = pool[k]
                    if len(removed[g.module]) < g.num_heads - 1:
                        removed[g.module].add(h)
                        budget -= 1
        plan = {g.module: sorted(removed[g.module]) for g in self.groups}
        return self.masks_from_plan(model, plan), plan

    def masks_from_plan(self, model: nn.Module, plan: Mapping[str, Sequence[int]]) -> dict[str, Tensor]:
        """Parameter masks (``True`` = keep) that zero the heads of ``plan``, for every touched parameter.

        Example::

            >>> mha = nn.MultiheadAttention(4, 2)
            >>> masks = HeadPruner(mha).masks_from_plan(mha, {"": [1]})
            >>> masks["in_proj_bias"].view(3, 4)  # q, k and v parts
            tensor([[ True,  True, False, False],
                    [ True,  True, False, False],
                    [ True,  True, False, False]])
        """
        removed = self._removed(plan, "plan")
        params = self._params(model)
        masks: dict[str, Tensor] = {}
        for group in self.groups:
            d = group.head_dim
            for s in group.slices:
                p = params[s.param]
                mask = masks.get(s.param)
                if mask is None:
                    mask = masks[s.param] = torch.ones(p.shape, dtype=torch.bool, device=p.device)
                for h in removed[group.module]:
                    mask.narrow(s.dim, s.start + h * d, d).fill_(False)
        return masks

    # ----------------------------------------------------------------------- removal

    def materialize(self, model: nn.Module, plan: Mapping[str, Sequence[int]]) -> nn.Module:
        """Replace every attention module with removed heads in ``plan`` by a :class:`PrunedMultiheadAttention`
        holding the kept heads, in place, and return the model.

        Modules are found by name, so ``model`` may be a copy of the model the pruner was built on; modules
        whose heads are all kept stay as they are. The new modules hold new parameters: an optimizer created
        before holds the old ones, so create a new one (and drop any masks) afterwards. When the pruner was
        built on a bare ``nn.MultiheadAttention`` (module name ``""``), the replacement is returned.

        ``nn.TransformerEncoderLayer`` keeps working: in eval mode it normally runs a fused kernel that reads
        the packed projections of its ``self_attn``, and with a :class:`PrunedMultiheadAttention` it runs its
        regular path instead, which calls the module. ``nn.TransformerEncoder`` also turns a padded batch into
        a nested tensor in eval mode (``enable_nested_tensor``), which only that fused kernel accepts, so it is
        switched off (``use_nested_tensor = False``) on every encoder whose layers lost heads. Outputs at
        padded positions then hold computed values where the nested path returned zeros; the others agree.

        Example::

            >>> layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, batch_first=True).eval()
            >>> _ = HeadPruner(layer).materialize(layer, {"self_attn": [1, 3]})
            >>> layer.self_attn.heads, layer(torch.randn(2, 5, 16)).shape
            ((0, 2), torch.Size([2, 5, 16]))
        """
        removed = self._removed(plan, "plan")
        names = dict(model.named_modules())
        for group in self.groups:
            module = names.get(group.module)
            if not isinstance(module, nn.MultiheadAttention) or module.num_heads != group.num_heads:
                found = "missing" if module is None else f"a {type(module).__name__}"
                raise ValueError(
                    f"`model` does not match the model this pruner was built on: {group.module!r} is {found}, "
                    f"expected an nn.MultiheadAttention with {group.num_heads} heads. Was it already pruned?"
                )
        changed: list[str] = []
        for group in self.groups:
            if not removed[group.module]:
                continue
            kept = [h for h in range(group.num_heads) if h not in removed[group.module]]
            pruned = PrunedMultiheadAttention.from_attention(names[group.module], kept)
            if not group.module:
                return pruned
            parent_name, _, child = group.module.rpartition(".")
            setattr(names[parent_name], child, pruned)
            changed.append(group.module)
        for name, module in model.named_modules():
            if isinstance(module, nn.TransformerEncoder) and any(
                c.startswith(f"{name}." if name else "") for c in changed
            ):
                module.use_nested_tensor = False
        return model
