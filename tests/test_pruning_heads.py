import copy

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_compress.pruning.heads import HeadPruner, PrunedMultiheadAttention

E, H, D = 32, 4, 8


class TinyTransformer(nn.Module):
    """tokens -> embedding -> self-attention (padding + causal masks, residual, LayerNorm) -> cross-attention
    to a memory whose keys and values have other widths (kdim=16, vdim=12) -> classifier."""

    def __init__(self, batch_first: bool = True) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Embedding(20, E)
        self.attn = nn.MultiheadAttention(E, H, dropout=0.1, batch_first=batch_first)
        self.norm = nn.LayerNorm(E)
        self.cross = nn.MultiheadAttention(E, H, kdim=16, vdim=12, batch_first=batch_first)
        self.head = nn.Linear(E, 5)

    def forward(self, tokens, memory_k, memory_v, key_padding_mask, attn_mask):
        x = self.embed(tokens)
        if not self.batch_first:
            x, memory_k, memory_v = x.transpose(0, 1), memory_k.transpose(0, 1), memory_v.transpose(0, 1)
        a, _ = self.attn(x, x, x, key_padding_mask=key_padding_mask, attn_mask=attn_mask, need_weights=False)
        x = self.norm(x + a)
        c, _ = self.cross(x, memory_k, memory_v)  # need_weights=True: the explicit softmax path
        x = x + c
        if not self.batch_first:
            x = x.transpose(0, 1)
        return self.head(x)


def inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 20, (3, 6), generator=g)
    memory_k = torch.randn(3, 4, 16, generator=g)
    memory_v = torch.randn(3, 4, 12, generator=g)
    padding = torch.zeros(3, 6, dtype=torch.bool)
    padding[0, 4:] = True
    padding[2, 5:] = True
    causal = torch.triu(torch.ones(6, 6, dtype=torch.bool), diagonal=1)
    return tokens, memory_k, memory_v, padding, causal


def make_model(batch_first: bool = True, seed: int = 0) -> TinyTransformer:
    torch.manual_seed(seed)
    model = TinyTransformer(batch_first)
    with torch.no_grad():  # non-trivial biases, so that masking them matters
        for module in (model.attn, model.cross):
            module.in_proj_bias.uniform_(-0.5, 0.5)
            module.out_proj.bias.uniform_(-0.5, 0.5)
    return model.eval()


def apply(model: nn.Module, masks) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, mask in masks.items():
            params[name].data *= mask


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class RecordOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


# --------------------------------------------------------------------------- masked == materialized


@pytest.mark.parametrize("batch_first", [True, False])
def test_masked_model_matches_materialized_model(batch_first):
    model = make_model(batch_first)
    pruner = HeadPruner(model)
    masks, plan = pruner.compute_masks(model, 0.5)
    assert {k: len(v) for k, v in plan.items()} == {"attn": 2, "cross": 2}
    apply(model, masks)
    materialized = pruner.materialize(copy.deepcopy(model), plan)
    assert isinstance(materialized.attn, PrunedMultiheadAttention)
    assert isinstance(materialized.cross, PrunedMultiheadAttention)
    assert materialized.attn.num_heads == materialized.cross.num_heads == 2
    x = inputs()
    with torch.no_grad():
        expected, got = model(*x), materialized(*x)
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # The masks zero something that mattered: the unmasked model computes something else.
    with torch.no_grad():
        assert (make_model(batch_first)(*x) - expected).abs().max() > 1e-3


def test_parameter_count_drops_by_the_removed_heads():
    model = make_model()
    pruner = HeadPruner(model)
    _, plan = pruner.compute_masks(model, 0.5)
    before = n_params(model)
    materialized = pruner.materialize(copy.deepcopy(model), plan)
    # One head of `attn`: D rows of q, k, v over E inputs, 3 * D biases, D columns of out_proj (E rows).
    per_attn_head = D * (3 * E) + 3 * D + E * D  # 1048
    # One head of `cross`: q over E, k over kdim=16, v over vdim=12 inputs.
    per_cross_head = D * (E + 16 + 12) + 3 * D + E * D  # 760
    assert before - n_params(materialized) == 2 * per_attn_head + 2 * per_cross_head == 3616
    assert before == n_params(model)  # the original is untouched


def test_kept_heads_are_the_highest_scored():
    model = make_model()
    pruner = HeadPruner(model)
    scores = pruner.importance_scores(model)
    _, plan = pruner.compute_masks(model, 0.5)
    for name, s in scores.items():
        assert plan[name] == sorted(torch.argsort(s)[:2].tolist())
    materialized = pruner.materialize(copy.deepcopy(model), plan)
    kept = [h for h in range(H) if h not in plan["attn"]]
    assert materialized.attn.heads == tuple(kept)
    rows = torch.cat([torch.arange(h * D, (h + 1) * D) for h in kept])
    assert torch.equal(materialized.attn.k_proj.weight, model.attn.in_proj_weight[E : 2 * E][rows])
    assert torch.equal(materialized.attn.out_proj.weight, model.attn.out_proj.weight[:, rows])


def test_masks_cover_exactly_the_head_slices():
    model = make_model()
    pruner = HeadPruner(model)
    masks = pruner.masks_from_plan(model, {"attn": [1], "cross": []})
    assert sorted(masks) == [
        "attn.in_proj_bias",
        "attn.in_proj_weight",
        "attn.out_proj.weight",
        "cross.in_proj_bias",
        "cross.k_proj_weight",
        "cross.out_proj.weight",
        "cross.q_proj_weight",
        "cross.v_proj_weight",
    ]
    assert all(m.shape == dict(model.named_parameters())[n].shape for n, m in masks.items())
    # Head 1 = rows 8:16 of each of the q, k and v parts (3 * 8 * 32 weights) and columns 8:16 of out_proj.
    assert int((~masks["attn.in_proj_weight"]).sum()) == 3 * D * E
    assert not masks["attn.in_proj_weight"][[8, 15, 40, 47, 72, 79]].any()
    assert masks["attn.in_proj_weight"][[7, 16, 39, 48, 71, 80]].all()
    assert int((~masks["attn.in_proj_bias"]).sum()) == 3 * D
    assert not masks["attn.out_proj.weight"][:, 8:16].any() and masks["attn.out_proj.weight"][:, :8].all()
    assert all(bool(masks[n].all()) for n in masks if n.startswith("cross."))


def test_need_weights_are_averaged_over_the_kept_heads():
    model = make_model()
    pruner = HeadPruner(model, modules=["cross"])
    masks, plan = pruner.compute_masks(model, 0.5)
    apply(model, masks)
    materialized = pruner.materialize(copy.deepcopy(model), plan)
    _, memory_k, memory_v, _, _ = inputs()
    query = torch.randn(3, 6, E)
    kept = [h for h in range(H) if h not in plan["cross"]]
    with torch.no_grad():
        _, per_head = model.cross(query, memory_k, memory_v, average_attn_weights=False)
        _, averaged = materialized.cross(query, memory_k, memory_v)
        _, separate = materialized.cross(query, memory_k, memory_v, average_attn_weights=False)
        out, none = materialized.cross(query, memory_k, memory_v, need_weights=False)
    assert per_head.shape == (3, H, 6, 4)
    assert averaged.shape == (3, 6, 4) and separate.shape == (3, 2, 6, 4)
    torch.testing.assert_close(separate, per_head[:, kept], atol=1e-6, rtol=0)
    torch.testing.assert_close(averaged, per_head[:, kept].mean(dim=1), atol=1e-6, rtol=0)
    torch.testing.assert_close(averaged.sum(-1), torch.ones(3, 6))
    assert none is None and out.shape == (3, 6, E)


def test_per_head_masks_causal_hint_unbatched_and_no_bias():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, bias=False).eval()
    pruner = HeadPruner(mha)
    plan = {"": [0, 2]}  # kept heads (1, 3): per-head masks must be picked out by index, not by position
    apply(mha, pruner.masks_from_plan(mha, plan))
    pruned = pruner.materialize(copy.deepcopy(mha), plan)
    assert pruned.heads == (1, 3)
    assert pruned.q_proj.bias is None and pruned.out_proj.bias is None
    x = torch.randn(5, 2, E)  # (L, N, E): batch_first=False
    per_head = torch.randn(2 * H, 5, 5)  # a float mask for every (sample, original head)
    causal = nn.Transformer.generate_square_subsequent_mask(5)
    padding = torch.zeros(2, 5).masked_fill_(torch.tensor([[False] * 4 + [True], [False] * 5]), float("-inf"))
    with torch.no_grad():
        for kwargs in (
            {"attn_mask": per_head},
            {"attn_mask": per_head, "key_padding_mask": padding},
            {"attn_mask": causal, "is_causal": True, "need_weights": False},
            {"attn_mask": causal, "is_causal": True, "key_padding_mask": padding, "need_weights": False},
        ):
            torch.testing.assert_close(
                pruned(x, x, x, **kwargs)[0], mha(x, x, x, **kwargs)[0], atol=1e-5, rtol=0
            )
        single = x[:, 0]  # unbatched (L, E)
        got, weights = pruned(single, single, single, attn_mask=causal)
        torch.testing.assert_close(got, mha(single, single, single, attn_mask=causal)[0], atol=1e-5, rtol=0)
        assert got.shape == (5, E) and weights.shape == (5, 5)
        with pytest.raises(RuntimeError, match="3D attn_mask"):
            pruned(x, x, x, attn_mask=torch.zeros(2 * 2, 5, 5))
        with pytest.raises(RuntimeError, match="is_causal"):
            pruned(x, x, x, is_causal=True)


def test_dropout_is_carried_and_off_in_eval():
    model = make_model()
    pruner = HeadPruner(model, modules=["attn"])
    _, plan = pruner.compute_masks(model, 0.5)
    materialized = pruner.materialize(copy.deepcopy(model), plan)
    attn = materialized.attn
    assert attn.dropout == 0.1 and not attn.training
    x = torch.randn(2, 6, E)
    torch.manual_seed(0)
    first = attn(x, x, x)[0]
    assert torch.equal(first, attn(x, x, x)[0])
    attn.train()
    torch.manual_seed(0)
    a = attn(x, x, x, need_weights=False)[0]
    b = attn(x, x, x, need_weights=False)[0]
    assert (a - b).abs().max() > 1e-3
    a[0].sum().backward()
    assert attn.q_proj.weight.grad is not None and attn.q_proj.weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------- planning


def test_global_scope_prunes_the_smaller_module_more():
    model = make_model()
    with torch.no_grad():
        for p in model.attn.parameters():
            p.mul_(10.0)
    pruner = HeadPruner(model)
    _, layer = pruner.compute_masks(model, 0.5, scope="layer")
    _, global_ = pruner.compute_masks(model, 0.5, scope="global")
    assert {k: len(v) for k, v in layer.items()} == {"attn": 2, "cross": 2}
    # 8 heads, 4 removed: `cross` loses all but one (its heads all score below `attn`'s), `attn` the rest.
    assert {k: len(v) for k, v in global_.items()} == {"attn": 1, "cross": 3}
    with torch.no_grad():
        for p in model.attn.parameters():
            p.mul_(0.001)
    _, reversed_ = pruner.compute_masks(model, 0.5, scope="global")
    assert {k: len(v) for k, v in reversed_.items()} == {"attn": 3, "cross": 1}


def test_global_scope_compares_scores_per_parameter_across_widths():
    torch.manual_seed(0)
    model = nn.ModuleDict(
        {"wide": nn.MultiheadAttention(E, H), "narrow": nn.MultiheadAttention(E, H, kdim=4, vdim=4)}
    )
    with torch.no_grad():
        for name, scale in (("wide", 0.10), ("narrow", 0.15)):
            for p in model[name].parameters():
                p.copy_(scale * (1 + 0.01 * torch.rand_like(p)))
    pruner = HeadPruner(model)
    scores = pruner.importance_scores(model)
    # Per head, `wide` has 1048 entries of ~0.10 and `narrow` 600 of ~0.15: `wide` has the larger sums ...
    assert scores["wide"].min() > scores["narrow"].max()
    # ... but the smaller weights, and loses more heads in the global ranking.
    _, plan = pruner.compute_masks(model, 0.5, scope="global")
    assert {k: len(v) for k, v in plan.items()} == {"wide": 3, "narrow": 1}
    _, plan_l2 = pruner.compute_masks(model, 0.5, scope="global", criterion="l2")
    assert {k: len(v) for k, v in plan_l2.items()} == {"wide": 3, "narrow": 1}


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_at_least_one_head_is_kept(scope):
    model = make_model()
    pruner = HeadPruner(model)
    masks, plan = pruner.compute_masks(model, 0.99, scope=scope)
    assert {k: len(v) for k, v in plan.items()} == {"attn": 3, "cross": 3}
    apply(model, masks)
    materialized = pruner.materialize(copy.deepcopy(model), plan)
    with torch.no_grad():
        torch.testing.assert_close(materialized(*inputs()), model(*inputs()), atol=1e-5, rtol=0)
    one = nn.MultiheadAttention(8, 1)
    assert HeadPruner(one).compute_masks(one, 0.9, scope=scope)[1] == {"": []}


def test_previous_plan_stays_pruned():
    model = make_model()
    pruner = HeadPruner(model)
    best = int(torch.argmax(pruner.importance_scores(model)["attn"]))
    _, plan = pruner.compute_masks(model, 0.5, previous={"attn": [best]})
    assert best in plan["attn"] and len(plan["attn"]) == 2 and len(plan["cross"]) == 2
    _, later = pruner.compute_masks(model, 0.75, previous=plan)
    assert set(plan["attn"]) < set(later["attn"]) and set(plan["cross"]) < set(later["cross"])
    # A plan that already removes more than the target is kept as is.
    _, same = pruner.compute_masks(model, 0.25, previous=later)
    assert same == later
    _, same_global = pruner.compute_masks(model, 0.25, scope="global", previous=later)
    assert same_global == later


def test_random_is_reproducible_with_a_seeded_generator():
    model = make_model()
    pruner = HeadPruner(model)

    def plan(seed):
        return pruner.compute_masks(
            model, 0.5, criterion="random", generator=torch.Generator().manual_seed(seed)
        )[1]

    assert plan(3) == plan(3)
    assert len({str(plan(seed)) for seed in range(8)}) > 1


def test_l2_and_taylor_scores():
    model = make_model()
    pruner = HeadPruner(model)
    w, b, o = model.attn.in_proj_weight, model.attn.in_proj_bias, model.attn.out_proj.weight
    rows = [*range(8, 16), *range(E + 8, E + 16), *range(2 * E + 8, 2 * E + 16)]  # head 1
    l2 = (w[rows].square().sum() + b[rows].square().sum() + o[:, 8:16].square().sum()).sqrt()
    assert torch.allclose(pruner.importance_scores(model, "l2")["attn"][1], l2)
    with pytest.raises(ValueError, match="needs gradients"):
        pruner.importance_scores(model, "taylor")
    with pytest.raises(ValueError, match="needs gradients"):
        pruner.compute_masks(model, 0.5, criterion="taylor")
    model.train()
    model(*inputs()).square().sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    scores = pruner.importance_scores(model, "taylor", grads=grads)
    g_w, g_b, g_o = (
        model.attn.in_proj_weight.grad,
        model.attn.in_proj_bias.grad,
        model.attn.out_proj.weight.grad,
    )
    taylor = (
        (w[rows] * g_w[rows]).abs().sum()
        + (b[rows] * g_b[rows]).abs().sum()
        + (o[:, 8:16] * g_o[:, 8:16]).abs().sum()
    )
    assert torch.allclose(scores["attn"][1], taylor, rtol=1e-5)
    _, plan = pruner.compute_masks(model, 0.5, criterion="taylor", grads=grads)
    assert plan["attn"] == sorted(torch.argsort(scores["attn"])[:2].tolist())
    with pytest.raises(ValueError, match="has none for 'cross'"):
        pruner.importance_scores(model, "taylor", grads={"attn.in_proj_weight": g_w})


# --------------------------------------------------------------------------- nn.TransformerEncoder(Layer)


def test_transformer_encoder_layer_falls_back_from_its_fused_kernel():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=64, dropout=0.1, batch_first=True).eval()
    pruner = HeadPruner(layer)
    masks, plan = pruner.compute_masks(layer, 0.5)
    apply(layer, masks)
    materialized = pruner.materialize(copy.deepcopy(layer), plan)
    x = torch.randn(3, 7, E)
    padding = torch.zeros(3, 7, dtype=torch.bool)
    padding[0, 5:] = True
    with torch.no_grad(), RecordOps() as masked_ops:
        expected = layer(x, src_key_padding_mask=padding)
    with torch.no_grad(), RecordOps() as pruned_ops:
        got = materialized(x, src_key_padding_mask=padding)
    # The masked layer runs the fused eval kernel (packed full-width projections); the pruned one cannot, and
    # runs its regular path, which calls PrunedMultiheadAttention (scaled_dot_product_attention inside).
    assert "aten._transformer_encoder_layer_fwd" in masked_ops.ops
    assert "aten._transformer_encoder_layer_fwd" not in pruned_ops.ops
    assert any("scaled_dot_product" in op for op in pruned_ops.ops)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    with torch.no_grad():  # training-mode path (no fused kernel) with dropout off agrees too
        layer.train().dropout.p = materialized.train().dropout.p = 0.0
        layer.dropout1.p = layer.dropout2.p = materialized.dropout1.p = materialized.dropout2.p = 0.0
        layer.self_attn.dropout = materialized.self_attn.dropout = 0.0
        torch.testing.assert_close(materialized(x), layer(x), atol=1e-5, rtol=0)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_transformer_encoder_stops_using_nested_tensors():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=64, batch_first=True)
    encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=True).eval()
    assert encoder.use_nested_tensor
    pruner = HeadPruner(encoder, modules=["layers.1"])
    assert pruner.modules == ["layers.1.self_attn"]
    masks, plan = pruner.compute_masks(encoder, 0.5)
    apply(encoder, masks)
    materialized = pruner.materialize(copy.deepcopy(encoder), plan)
    assert not materialized.use_nested_tensor and encoder.use_nested_tensor
    assert isinstance(materialized.layers[0].self_attn, nn.MultiheadAttention)
    x = torch.randn(3, 7, E)
    padding = torch.zeros(3, 7, dtype=torch.bool)
    padding[0, 5:] = True
    with torch.no_grad():
        expected = encoder(x, src_key_padding_mask=padding)
        got = materialized(x, src_key_padding_mask=padding)
        no_padding = encoder(x), materialized(x)
    # The nested path of the masked encoder returns zeros at padded positions; the regular path computes them.
    assert expected[padding].abs().max() == 0 and got[padding].abs().max() > 0.1
    torch.testing.assert_close(got[~padding], expected[~padding], atol=1e-5, rtol=0)
    torch.testing.assert_close(no_padding[1], no_padding[0], atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("flag", ["add_bias_kv", "add_zero_attn"])
def test_unsupported_attention_options_raise(flag):
    model = nn.Sequential(nn.MultiheadAttention(E, H, **{flag: True}))
    with pytest.raises(ValueError, match=f"'0' is an nn.MultiheadAttention with `{flag}=True`"):
        HeadPruner(model)
    with pytest.raises(ValueError, match=flag):
        PrunedMultiheadAttention.from_attention(model[0], [0, 1])


def test_bad_selections_and_plans_raise():
    model = make_model()
    with pytest.raises(ValueError, match="Did you mean 'attn'"):
        HeadPruner(model, modules=["atn"])
    with pytest.raises(ValueError, match="is no nn.MultiheadAttention"):
        HeadPruner(model, modules=["head"])
    with pytest.raises(ValueError, match="no nn.MultiheadAttention module"):
        HeadPruner(nn.Linear(2, 2))
    pruner = HeadPruner(model)
    with pytest.raises(ValueError, match="removes all 4 heads"):
        pruner.compute_masks(model, 0.5, previous={"attn": [0, 1, 2, 3]})
    with pytest.raises(ValueError, match="outside"):
        pruner.masks_from_plan(model, {"attn": [4]})
    with pytest.raises(ValueError, match="no attention module of this pruner"):
        pruner.masks_from_plan(model, {"norm": [0]})
    with pytest.raises(ValueError, match="Unknown `scope='model'`"):
        pruner.compute_masks(model, 0.5, scope="model")
    with pytest.raises(ValueError, match="must be in"):
        pruner.compute_masks(model, 1.0)
    once = pruner.materialize(copy.deepcopy(model), {"attn": [0]})
    with pytest.raises(ValueError, match="already pruned"):
        pruner.materialize(once, {"attn": [0]})


def test_a_plan_without_removed_heads_leaves_the_model_unchanged():
    model = make_model()
    pruner = HeadPruner(model)
    copy_ = pruner.materialize(copy.deepcopy(model), {"attn": [], "cross": []})
    assert isinstance(copy_.attn, nn.MultiheadAttention) and n_params(copy_) == n_params(model)
    bare = nn.MultiheadAttention(8, 2)
    assert isinstance(HeadPruner(bare).materialize(bare, {"": [1]}), PrunedMultiheadAttention)
