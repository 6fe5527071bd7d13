import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_compress.pruning.masks import (
    apply_masks,
    check_choice,
    magnitude_scores,
    mask_sparsity,
    nm_mask,
    nm_masks,
    pack_mask,
    unpack_mask,
    unstructured_masks,
    validate_nm,
)


def pruned(mask: torch.Tensor) -> int:
    return int((~mask).sum())


def test_layer_scope_prunes_exact_count_of_smallest_per_tensor():
    weights = {
        "a": torch.tensor([[0.1, -5.0, 0.3], [4.0, -0.2, 6.0]]),
        "b": torch.tensor([10.0, -20.0, 30.0, 1.0]),
    }
    masks = unstructured_masks(weights, 0.5)
    assert masks["a"].tolist() == [[False, True, False], [True, False, True]]
    assert masks["b"].tolist() == [False, True, True, False]
    assert masks["a"].dtype == torch.bool
    # round(0.25 * 6) = 2 (banker's rounding of 1.5), round(0.25 * 4) = 1
    masks = unstructured_masks(weights, 0.25)
    assert (pruned(masks["a"]), pruned(masks["b"])) == (2, 1)
    assert masks["b"].tolist() == [True, True, True, False]


def test_global_scope_prunes_the_layer_with_smaller_weights_more():
    weights = {"small": torch.full((10,), 0.01) * torch.arange(1, 11), "large": torch.arange(1.0, 11.0)}
    masks = unstructured_masks(weights, 0.6, scope="global")
    # 12 of 20 entries: all 10 small ones, then the two smallest large ones (1.0 and 2.0)
    assert pruned(masks["small"]) == 10
    assert pruned(masks["large"]) == 2
    assert masks["large"][:2].tolist() == [False, False]
    assert mask_sparsity(masks) == pytest.approx(0.6)
    layer = unstructured_masks(weights, 0.6, scope="layer")
    assert (pruned(layer["small"]), pruned(layer["large"])) == (6, 6)


def test_global_scope_interleaved_values():
    weights = {"a": torch.tensor([1.0, 4.0, 6.0]), "b": torch.tensor([[2.0, 3.0], [5.0, 7.0]])}
    masks = unstructured_masks(weights, 0.6, scope="global")  # round(4.2) = 4: 1, 2, 3, 4
    assert masks["a"].tolist() == [False, False, True]
    assert masks["b"].tolist() == [[False, False], [True, True]]


def test_ties_give_exact_counts_and_prune_earliest_first():
    weights = {"w": torch.ones(10), "v": torch.tensor([2.0, 1.0, 1.0, 1.0, 3.0])}
    masks = unstructured_masks(weights, 0.3)
    assert masks["w"].tolist() == [False] * 3 + [True] * 7
    assert masks["v"].tolist() == [True, False, False, True, True]  # round(1.5) = 2 of the three ties
    both = unstructured_masks({"a": torch.ones(4), "b": torch.ones(6)}, 0.5, scope="global")
    assert pruned(both["a"]) + pruned(both["b"]) == 5
    assert (pruned(both["a"]), pruned(both["b"])) == (4, 1)
    assert pruned(unstructured_masks({"z": torch.zeros(3, 3)}, 0.5)["z"]) == 4


def test_zero_amount_keeps_everything():
    masks = unstructured_masks({"w": torch.randn(4, 4)}, 0.0, scope="global")
    assert masks["w"].all()
    assert unstructured_masks({}, 0.5, scope="global") == {}


def test_masks_only_grow_with_previous():
    weight = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, 6.0, 7.0, 8.0])
    # previously pruned the *large* entries 0 and 7 (weights have since changed)
    previous = {"w": torch.tensor([False, True, True, True, True, True, True, False])}
    masks = unstructured_masks({"w": weight}, 0.5, previous=previous)
    assert pruned(masks["w"]) == 4
    assert masks["w"].tolist() == [False, True, True, False, False, True, True, False]
    # the target is below what is already pruned: previous comes back unchanged
    lower = unstructured_masks({"w": weight}, 0.125, previous=previous)
    assert torch.equal(lower["w"], previous["w"])
    # a growing schedule gives nested masks
    weights = {"a": torch.randn(64), "b": torch.randn(8, 8)}
    for scope in ("layer", "global"):
        prev = None
        for amount in (0.1, 0.3, 0.3, 0.5, 0.9):
            masks = unstructured_masks(weights, amount, scope=scope, previous=prev)
            if prev is not None:
                for name in weights:
                    assert not (masks[name] & ~prev[name]).any()
            if scope == "global":
                assert sum(pruned(m) for m in masks.values()) == round(amount * 128)
            else:
                assert (pruned(masks["a"]), pruned(masks["b"])) == (round(amount * 64),) * 2
            prev = masks


def test_global_previous_already_beyond_target_is_kept():
    weights = {"a": torch.arange(1.0, 5.0), "b": torch.arange(1.0, 5.0)}
    previous = {"a": torch.tensor([False, False, False, True])}
    masks = unstructured_masks(weights, 0.25, scope="global", previous=previous)
    assert torch.equal(masks["a"], previous["a"])
    assert masks["b"].all()


def test_previous_with_wrong_shape_is_rejected():
    with pytest.raises(ValueError, match=r"`previous\['w'\]` has shape \(3,\) but the weight has \(4,\)"):
        unstructured_masks({"w": torch.ones(4)}, 0.5, previous={"w": torch.ones(3, dtype=torch.bool)})


def test_scores():
    w = torch.tensor([-3.0, 0.5, 2.0])
    assert magnitude_scores(w).tolist() == [3.0, 0.5, 2.0]
    assert magnitude_scores(w, "l2").tolist() == [9.0, 0.25, 4.0]
    weights = {"w": torch.randn(100)}
    assert torch.equal(
        unstructured_masks(weights, 0.4, criterion="l1")["w"],
        unstructured_masks(weights, 0.4, criterion="l2")["w"],
    )


def test_random_criterion_is_deterministic_per_generator_seed():
    weights = {"a": torch.randn(20, 20), "b": torch.randn(50)}

    def masks(seed):
        return unstructured_masks(
            weights, 0.5, scope="global", criterion="random", generator=torch.Generator().manual_seed(seed)
        )

    first, again, other = masks(0), masks(0), masks(1)
    assert all(torch.equal(first[n], again[n]) for n in weights)
    assert not all(torch.equal(first[n], other[n]) for n in weights)
    assert sum(pruned(m) for m in first.values()) == 225
    scores = magnitude_scores(torch.ones(3, 4), "random", torch.Generator().manual_seed(3))
    assert scores.shape == (3, 4)
    assert ((scores >= 0) & (scores < 1)).all()


def test_argument_errors():
    with pytest.raises(ValueError, match=r"`amount=1.0` must be in \[0, 1\)"):
        unstructured_masks({"w": torch.ones(4)}, 1.0)
    with pytest.raises(ValueError, match=r"`amount=-0.1` must be in \[0, 1\)"):
        unstructured_masks({"w": torch.ones(4)}, -0.1)
    with pytest.raises(ValueError, match="Unknown `scope='model'`. Use one of 'layer', 'global'."):
        unstructured_masks({"w": torch.ones(4)}, 0.5, scope="model")
    with pytest.raises(ValueError, match="Unknown `criterion='l3'`. Use one of 'l1', 'l2', 'random'."):
        unstructured_masks({"w": torch.ones(4)}, 0.5, criterion="l3")
    with pytest.raises(ValueError, match="Unknown `method='x'`"):
        check_choice("x", ("unstructured", "nm"), "method")


def brute_force_nm(weight: np.ndarray, n: int, m: int) -> np.ndarray:
    """Keep the n largest |w| of every m consecutive entries along dim 1 (earliest first on ties)."""
    keep = np.zeros(weight.shape, dtype=bool)
    rest = [range(s) for s in (weight.shape[0], *weight.shape[2:])]
    for out, *kernel in itertools.product(*rest):
        for start in range(0, weight.shape[1], m):
            group = [(out, c, *kernel) for c in range(start, start + m)]
            ranked = sorted(range(m), key=lambda i: (-abs(weight[group[i]]), i))
            for i in ranked[:n]:
                keep[group[i]] = True
    return keep


@pytest.mark.parametrize("shape", [(6, 16), (5, 8, 3, 3), (3, 4, 1, 2)])
def test_nm_keeps_n_largest_of_every_group_along_inputs(shape):
    torch.manual_seed(0)
    weight = torch.randn(shape)
    mask = nm_mask(weight, 2, 4)
    assert mask.shape == weight.shape and mask.dtype == torch.bool
    groups = mask.movedim(1, -1).reshape(-1, 4)
    assert (groups.sum(dim=1) == 2).all()
    assert np.array_equal(mask.numpy(), brute_force_nm(weight.numpy(), 2, 4))
    assert mask_sparsity({"w": mask}) == 0.5


def test_nm_with_ties_and_other_patterns():
    mask = nm_mask(torch.ones(2, 8), 2, 4)
    assert mask.tolist() == [[True, True, False, False] * 2] * 2
    weight = torch.randn(4, 24, 3)
    for n, m in [(1, 4), (4, 8), (3, 3), (1, 1)]:
        mask = nm_mask(weight, n, m)
        assert (mask.movedim(1, -1).reshape(-1, m).sum(dim=1) == n).all()
        assert np.array_equal(mask.numpy(), brute_force_nm(weight.numpy(), n, m))
    along_out = nm_mask(torch.randn(8, 3), 2, 4, dim=0)
    assert (along_out.t().reshape(-1, 4).sum(dim=1) == 2).all()


def test_nm_masks_for_linear_and_conv_weights():
    model = torch.nn.Sequential(torch.nn.Conv2d(8, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4, 12))
    weights = {name: p.detach() for name, p in model.named_parameters() if p.dim() > 1}
    masks = nm_masks(weights, 2, 4)
    assert set(masks) == {"0.weight", "2.weight"}
    assert (masks["0.weight"].permute(0, 2, 3, 1).reshape(-1, 4).sum(dim=1) == 2).all()
    assert (masks["2.weight"].reshape(-1, 4).sum(dim=1) == 2).all()
    assert mask_sparsity(masks) == 0.5


def test_nm_errors_name_the_argument_and_tensor():
    with pytest.raises(ValueError, match="`n=5` is larger than `m=4`"):
        nm_mask(torch.ones(2, 8), 5, 4)
    with pytest.raises(ValueError, match="`n=0` must be >= 1"):
        nm_mask(torch.ones(2, 8), 0, 4)
    with pytest.raises(TypeError, match="`m=4.0` must be an integer"):
        nm_mask(torch.ones(2, 8), 2, 4.0)
    with pytest.raises(ValueError, match=r"`m=4` does not divide the size 6 of dim 1 .* e\.g\. m=3"):
        nm_mask(torch.ones(2, 6), 2, 4)
    with pytest.raises(ValueError, match=r"`m=4` does not divide the size 10 of dim 1 of 'fc'.* m=5"):
        validate_nm(2, 4, {"ok": torch.Size([3, 8]), "fc": torch.Size([3, 10])})
    with pytest.raises(ValueError, match="size 1 of dim 1 of 'head'. Leave this tensor out"):
        nm_masks({"head": torch.ones(3, 1)}, 1, 2)
    with pytest.raises(ValueError, match="'bias' has shape \\(4,\\); .* at least 2 dimensions"):
        validate_nm(2, 4, {"bias": torch.Size([4])})
    with pytest.raises(ValueError, match="`dim=2` is out of range"):
        nm_mask(torch.ones(2, 8), 2, 4, dim=2)
    validate_nm(2, 4, {"fc": torch.Size([3, 8]), "conv": torch.Size([4, 16, 3, 3])})


@pytest.mark.parametrize("size", [1, 7, 8, 9, 1000])
def test_pack_unpack_round_trip(size):
    mask = torch.rand(size, generator=torch.Generator().manual_seed(size)) > 0.5
    packed = pack_mask(mask)
    assert packed["bits"].dtype == torch.uint8
    assert packed["bits"].numel() == math.ceil(size / 8)
    assert packed["shape"] == [size]
    assert torch.equal(unpack_mask(packed), mask)
    assert np.array_equal(packed["bits"].numpy(), np.packbits(mask.numpy()))


def test_pack_unpack_multidimensional_and_errors():
    mask = torch.rand(3, 5, 7) > 0.3
    packed = pack_mask(mask)
    assert packed["shape"] == [3, 5, 7] and packed["bits"].numel() == 14
    assert torch.equal(unpack_mask(packed), mask)
    for edge in (torch.ones(0, dtype=torch.bool), torch.ones(3, dtype=torch.bool), torch.tensor(False)):
        assert torch.equal(unpack_mask(pack_mask(edge)), edge)
    with pytest.raises(ValueError, match=r"needs 2 uint8 bytes"):
        unpack_mask({"shape": [9], "bits": torch.zeros(1, dtype=torch.uint8)})
    with pytest.raises(ValueError, match="'shape' and 'bits'"):
        unpack_mask({"bits": torch.zeros(1, dtype=torch.uint8)})


def test_apply_masks_gives_exact_zeros_and_leaves_kept_values_bit_identical():
    weight = torch.tensor([1.0e-30, -2.5, float("nan"), -0.0, 3.0, float("-inf")], requires_grad=True)
    original = weight.detach().clone()
    mask = torch.tensor([True, False, False, True, True, False])
    apply_masks({"w": weight}, {"w": mask})
    assert weight.requires_grad and weight.grad is None
    assert weight.detach()[~mask].tolist() == [0.0, 0.0, 0.0]
    assert not torch.signbit(weight.detach()[~mask]).any()
    kept, before = weight.detach()[mask], original[mask]
    assert torch.equal(kept.view(torch.int32), before.view(torch.int32))
    with pytest.raises(KeyError, match="'v'"):
        apply_masks({"w": weight}, {"v": mask})
    with pytest.raises(ValueError, match="has shape \\(2,\\) but the parameter has \\(6,\\)"):
        apply_masks({"w": weight}, {"w": mask[:2]})


def test_mask_sparsity():
    assert mask_sparsity({}) == 0.0
    assert (
        mask_sparsity({"a": torch.ones(3, dtype=torch.bool), "b": torch.zeros(1, dtype=torch.bool)}) == 0.25
    )


@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(1, 9), min_size=1, max_size=3),
    amount=st.floats(0.0, 1.0, exclude_max=True),
    seed=st.integers(0, 2**16),
    ties=st.booleans(),
)
def test_pruned_count_is_round_amount_times_numel(shape, amount, seed, ties):
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    if ties:
        weight = weight.round()
    numel = weight.numel()
    masks = unstructured_masks({"w": weight, "v": weight * 2}, amount)
    assert pruned(masks["w"]) == pruned(masks["v"]) == round(amount * numel)
    total = unstructured_masks({"w": weight, "v": weight * 2}, amount, scope="global")
    assert sum(pruned(m) for m in total.values()) == round(amount * 2 * numel)
    kept = weight.abs()[masks["w"]]
    dropped = weight.abs()[~masks["w"]]
    if kept.numel() and dropped.numel():
        assert dropped.max() <= kept.min()


def _capped_greedy(weights, amount, cap_fraction):
    """Reference: walk one global ascending ranking of |w| (ties by position), skipping tensors at their cap."""
    entries = sorted(
        (float(v), order, name, i)
        for order, (name, w) in enumerate(weights.items())
        for i, v in enumerate(w.abs().reshape(-1).tolist())
    )
    entries.sort(key=lambda e: e[0])  # stable: ties stay in (tensor, position) order
    budget = round(amount * sum(w.numel() for w in weights.values()))
    caps = {name: math.floor(cap_fraction * w.numel() + 1e-9) for name, w in weights.items()}
    masks = {name: torch.ones(w.numel(), dtype=torch.bool) for name, w in weights.items()}
    for _, _, name, i in entries:
        if budget == 0:
            break
        if int((~masks[name]).sum()) < caps[name]:
            masks[name][i] = False
            budget -= 1
    return {name: m.reshape(weights[name].shape) for name, m in masks.items()}


@pytest.mark.parametrize("cap", [0.9, 0.95, 0.99, 1.0])
def test_max_layer_amount_caps_every_tensor_and_still_reaches_the_total(cap):
    gen = torch.Generator().manual_seed(0)
    weights = {
        "big": torch.randn(40, 30, generator=gen),
        "tiny_scale": torch.randn(10, 8, generator=gen) * 1e-3,  # ranks lowest: global pruning takes it whole
        "mid": torch.randn(20, 10, generator=gen) * 0.1,
    }
    uncapped = unstructured_masks(weights, 0.9, scope="global")
    assert pruned(uncapped["tiny_scale"]) == 80
    masks = unstructured_masks(weights, 0.9, scope="global", max_layer_amount=cap)
    total = sum(w.numel() for w in weights.values())
    assert sum(pruned(m) for m in masks.values()) == round(0.9 * total)
    for name, w in weights.items():
        assert pruned(masks[name]) <= math.floor(cap * w.numel() + 1e-9)
    assert pruned(masks["tiny_scale"]) == math.floor(cap * 80 + 1e-9)
    reference = _capped_greedy(weights, 0.9, cap)
    for name in weights:
        assert torch.equal(masks[name], reference[name]), name


def test_max_layer_amount_keeps_earlier_masks_and_rejects_bad_values():
    weights = {"a": torch.arange(1.0, 11.0), "b": torch.arange(1.0, 11.0) * 1e-3}
    first = unstructured_masks(weights, 0.4, scope="global", max_layer_amount=0.6)
    assert [pruned(first["a"]), pruned(first["b"])] == [2, 6]
    later = unstructured_masks(weights, 0.5, scope="global", max_layer_amount=0.6, previous=first)
    assert [pruned(later["a"]), pruned(later["b"])] == [4, 6]
    assert bool((later["a"] <= first["a"]).all() and (later["b"] <= first["b"]).all())
    with pytest.raises(ValueError, match=r"`max_layer_amount=0.3` must be in \[amount, 1\] = \[0.4, 1\]"):
        unstructured_masks(weights, 0.4, scope="global", max_layer_amount=0.3)
    with pytest.raises(ValueError, match=r"`max_layer_amount` applies to `scope='global'`"):
        unstructured_masks(weights, 0.4, max_layer_amount=0.6)
