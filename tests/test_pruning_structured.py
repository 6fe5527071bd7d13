import copy

import pytest
import torch
from torch import nn

from lightning_compress.pruning.structured import IMPORTANCES, StructuredPruner


class Block(nn.Module):
    def __init__(self, cin: int, mid: int, cout: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, mid, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(mid, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU()
        if cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))
        else:
            self.shortcut = nn.Identity()

    def forward(self, x):
        return self.relu2(self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x))))) + self.shortcut(x))


class ResNet(nn.Module):
    """stem(w1) -> block(w1 -> m1 -> w1, identity) -> block(w1 -> m2 -> w2, 1x1 projection) -> pool -> fc."""

    def __init__(self, w1: int = 16, m1: int = 16, m2: int = 32, w2: int = 32, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, w1, 3, padding=1, bias=False), nn.BatchNorm2d(w1), nn.ReLU())
        self.layer1 = Block(w1, m1, w1)
        self.layer2 = Block(w1, m2, w2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w2, classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.layer2(self.layer1(self.stem(x)))), 1))


def randomize_bn(model: nn.Module) -> None:
    """Give BatchNorms non-trivial affine parameters and running statistics."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)


def apply(model: nn.Module, masks) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, mask in masks.items():
            params[name].mul_(mask)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


X = torch.randn(2, 3, 8, 8)


@pytest.fixture
def resnet():
    model = ResNet()
    randomize_bn(model)
    return model.eval()


def test_groups_follow_the_dependency_graph(resnet):
    pruner = StructuredPruner(resnet, X)
    assert [(g.root, g.size) for g in pruner.groups] == [
        ("stem.0", 16),
        ("layer1.conv1", 16),
        ("layer2.conv1", 32),
        ("layer2.conv2", 32),
    ]
    stem = pruner.groups[0]
    assert stem.producers == ("stem.0", "stem.1", "layer1.conv2", "layer1.bn2")
    assert stem.consumers == ("layer1.conv1", "layer2.conv1", "layer2.shortcut.0")
    assert pruner.groups[3].producers == (
        "layer2.conv2",
        "layer2.bn2",
        "layer2.shortcut.0",
        "layer2.shortcut.1",
    )
    assert pruner.groups[3].consumers == ("fc",)
    assert pruner.skipped == {"fc": "its channels are outputs of the model, which are never pruned"}


def test_mask_then_materialize_matches_on_residual_cnn(resnet):
    pruner = StructuredPruner(resnet, X, round_to=8)
    masks, plan = pruner.compute_masks(resnet, 0.5)
    assert {root: len(idxs) for root, idxs in plan.items()} == {
        "stem.0": 8,
        "layer1.conv1": 8,
        "layer2.conv1": 16,
        "layer2.conv2": 16,
    }
    apply(resnet, masks)
    before = n_params(resnet)
    pruned = pruner.materialize(copy.deepcopy(resnet), plan)
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), resnet(x), atol=1e-5, rtol=0)
    assert pruned(x).shape == (4, 10)
    # Halving every group gives exactly the half-width architecture.
    assert before == 19_994
    assert n_params(pruned) == n_params(ResNet(8, 8, 16, 16)) == 5_266
    assert n_params(pruned) / before == pytest.approx(0.263, abs=1e-3)
    for root in plan:
        assert pruned.get_submodule(root).out_channels == 16 * (1 + root.startswith("layer2")) - len(
            plan[root]
        )
    assert pruned.layer1.bn2.running_mean.shape == (8,)
    assert pruned.fc.in_features == 16


def test_materialize_a_fresh_model_with_the_same_weights(resnet):
    pruner = StructuredPruner(resnet, X, importance="l2", round_to=4)
    masks, plan = pruner.compute_masks(resnet, 0.4)
    apply(resnet, masks)
    fresh = ResNet().eval()
    fresh.load_state_dict(resnet.state_dict())
    fresh.stem[0].weight.requires_grad_(False)
    pruned = pruner.materialize(fresh, plan)
    assert not pruned.stem[0].weight.requires_grad and pruned.stem[1].weight.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(pruned(X), resnet(X), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="already pruned"):
        pruner.materialize(pruned, plan)


def test_residual_add_couples_the_same_indices(resnet):
    pruner = StructuredPruner(resnet, X, round_to=1)
    masks, plan = pruner.compute_masks(resnet, 0.25)
    removed = set(plan["stem.0"])
    assert len(removed) == 4

    def dropped(name, dim):
        mask = masks[name]
        gone = ~mask.movedim(dim, 0).reshape(mask.shape[dim], -1).any(1)
        return set(torch.nonzero(gone).flatten().tolist())

    # stem output + layer1.conv2 output are added: the same channels go on both sides of the add ...
    assert dropped("stem.0.weight", 0) == dropped("layer1.conv2.weight", 0) == removed
    assert dropped("stem.1.weight", 0) == dropped("layer1.bn2.weight", 0) == removed
    # ... and from every consumer of the sum.
    assert dropped("layer1.conv1.weight", 1) == dropped("layer2.conv1.weight", 1) == removed
    assert dropped("layer2.shortcut.0.weight", 1) == removed
    # Projection block: conv2 and the 1x1 shortcut share their indices, the head loses those inputs.
    removed2 = set(plan["layer2.conv2"])
    assert dropped("layer2.conv2.weight", 0) == dropped("layer2.shortcut.0.weight", 0) == removed2
    assert dropped("layer2.shortcut.1.bias", 0) == dropped("fc.weight", 1) == removed2
    assert "fc.bias" not in masks


def test_batchnorm_weight_and_bias_are_masked(resnet):
    pruner = StructuredPruner(resnet, X, round_to=1)
    masks, plan = pruner.compute_masks(resnet, 0.5)
    for bn, root in [("layer1.bn1", "layer1.conv1"), ("layer2.bn1", "layer2.conv1"), ("stem.1", "stem.0")]:
        idxs = plan[root]
        assert not masks[f"{bn}.weight"][idxs].any() and not masks[f"{bn}.bias"][idxs].any()
        assert (
            int(masks[f"{bn}.weight"].sum())
            == int(masks[f"{bn}.bias"].sum())
            == pruner._group(root, "").size // 2
        )
    apply(resnet, masks)
    assert float(resnet.layer1.bn1.bias.detach()[plan["layer1.conv1"]].abs().sum()) == 0.0


@pytest.mark.parametrize(
    ("amount", "round_to", "kept"), [(0.3, 8, 24), (0.3, 1, 23), (0.5, 8, 16), (0.9, 8, 8)]
)
def test_round_to(amount, round_to, kept):
    model = nn.Sequential(nn.Conv2d(3, 32, 3), nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 32, 3), nn.ReLU())
    model.append(nn.Conv2d(32, 5, 1))
    pruner = StructuredPruner(model, X, round_to=round_to)
    _, plan = pruner.compute_masks(model, amount)
    assert [32 - len(plan[root]) for root in ("0", "3")] == [kept, kept]


def test_small_groups_keep_at_least_one_channel():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    pruner = StructuredPruner(model, torch.randn(1, 4), round_to=8)
    _, plan = pruner.compute_masks(model, 0.99)
    assert len(plan["0"]) == 2


def test_classifier_outputs_are_never_pruned(resnet):
    pruner = StructuredPruner(resnet, X, modules=None, round_to=1)
    assert "fc" not in pruner.roots
    masks, plan = pruner.compute_masks(resnet, 0.9)
    assert bool(masks["fc.weight"].any(1).all())
    pruned = pruner.materialize(copy.deepcopy(resnet), plan)
    assert pruned.fc.out_features == 10 and pruned(X).shape == (2, 10)
    with pytest.raises(ValueError, match="outputs of the model"):
        StructuredPruner(resnet, X, modules=["fc"])


def test_modules_and_ignored_select_groups(resnet):
    pruner = StructuredPruner(resnet, X, modules=["layer2"])
    assert pruner.roots == ["layer2.conv1", "layer2.conv2"]
    # Selecting one side of a residual add selects the whole coupled group.
    assert StructuredPruner(resnet, X, modules=["layer1.bn2"]).roots == ["stem.0"]
    pruner = StructuredPruner(resnet, X, ignored=["layer2.shortcut"])
    assert pruner.roots == ["stem.0", "layer1.conv1", "layer2.conv1"]
    assert pruner.skipped["layer2.conv2"] == "'layer2.shortcut.0' is in `ignored`"
    with pytest.raises(ValueError, match=r"no module named 'layer1\.conv3'.*Did you mean 'layer1\.conv2'"):
        StructuredPruner(resnet, X, modules=["layer1.conv3"])


def test_previous_plans_are_kept(resnet):
    pruner = StructuredPruner(resnet, X, round_to=1)
    _, first = pruner.compute_masks(resnet, 0.25)
    # Force a channel the ranking would keep: it must stay removed.
    best = int(pruner.importance_scores(resnet)["layer1.conv1"].argmax())
    first["layer1.conv1"] = sorted([*first["layer1.conv1"][:-1], best])
    masks, second = pruner.compute_masks(resnet, 0.5, previous=first)
    for root in first:
        assert set(first[root]) <= set(second[root])
        assert len(second[root]) == pruner._group(root, "").size // 2
    assert not masks["layer1.conv1.weight"][best].any()
    _, same = pruner.compute_masks(resnet, 0.1, previous=second)
    assert same == second
    with pytest.raises(ValueError, match="removes all 16 channels"):
        pruner.compute_masks(resnet, 0.1, previous={"layer1.conv1": list(range(16))})
    with pytest.raises(ValueError, match="no group root"):
        pruner.compute_masks(resnet, 0.1, previous={"fc": [0]})


def mlp_with_spread() -> nn.Sequential:
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    with torch.no_grad():
        for layer in model:
            if isinstance(layer, nn.Linear):
                layer.weight.fill_(1.0)
                layer.bias.zero_()
        model[2].weight[:16].mul_(0.01)  # half of the second group's channels are tiny
        model[0].weight.mul_(100.0)  # a uniform scale alone must not matter
    return model


def test_global_scope_prunes_unequally():
    model = mlp_with_spread()
    x = torch.randn(2, 8)
    _, layer_plan = StructuredPruner(model, x, scope="layer", round_to=1).compute_masks(model, 0.25)
    assert [len(v) for v in layer_plan.values()] == [8, 8]
    _, global_plan = StructuredPruner(model, x, scope="global", round_to=1).compute_masks(model, 0.25)
    assert global_plan == {"0": [], "2": list(range(16))}
    _, rounded = StructuredPruner(model, x, scope="global", round_to=8).compute_masks(model, 0.25)
    assert [len(v) for v in rounded.values()] == [0, 16]


def test_taylor_needs_gradients(resnet):
    pruner = StructuredPruner(resnet, X, importance="taylor", round_to=1)
    with pytest.raises(ValueError, match="needs gradients"):
        pruner.compute_masks(resnet, 0.5)
    resnet(X).square().sum().backward()
    grads = {n: p.grad for n, p in resnet.named_parameters()}
    scores = pruner.importance_scores(resnet, grads=grads)
    group = pruner._group("layer1.conv1", "")
    expected = sum(
        (resnet.get_parameter(s.param) * grads[s.param]).abs().movedim(s.dim, 0).reshape(16, -1).sum(1)
        for s in group.slices
    )
    torch.testing.assert_close(scores["layer1.conv1"], expected.detach())
    with pytest.raises(ValueError, match="has none for group 'stem.0'"):
        pruner.importance_scores(resnet, grads={"fc.weight": grads["fc.weight"]})


def test_bn_scale_follows_gamma(resnet):
    gamma = torch.tensor(
        [0.9, -0.05, 0.3, 2.0, -0.2, 0.01, 1.0, 0.5, 0.7, -0.8, 0.4, 0.6, 1.1, 0.02, 1.3, 0.1]
    )
    with torch.no_grad():
        resnet.layer1.bn1.weight.copy_(gamma)
    pruner = StructuredPruner(resnet, X, importance="bn_scale", round_to=1)
    torch.testing.assert_close(pruner.importance_scores(resnet)["layer1.conv1"], gamma.abs())
    _, plan = pruner.compute_masks(resnet, 0.25)
    assert plan["layer1.conv1"] == [1, 5, 13, 15]
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(ValueError, match="needs a BatchNorm.*group '0'"):
        StructuredPruner(mlp, torch.randn(1, 4), importance="bn_scale")


def test_random_is_reproducible(resnet):
    pruner = StructuredPruner(resnet, X, importance="random", round_to=1)
    _, a = pruner.compute_masks(resnet, 0.5, generator=torch.Generator().manual_seed(1))
    _, b = pruner.compute_masks(resnet, 0.5, generator=torch.Generator().manual_seed(1))
    _, c = pruner.compute_masks(resnet, 0.5, generator=torch.Generator().manual_seed(2))
    assert a == b and a != c


def test_lenet_300_100():
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10)
    )
    x = torch.randn(3, 1, 28, 28)
    pruner = StructuredPruner(model, x)
    assert [(g.root, g.size) for g in pruner.groups] == [("1", 300), ("3", 100)]
    masks, plan = pruner.compute_masks(model, 0.5)
    assert [len(plan["1"]), len(plan["3"])] == [148, 52]  # kept 152 and 48: multiples of 8
    apply(model, masks)
    pruned = pruner.materialize(copy.deepcopy(model), plan)
    assert [m.out_features for m in pruned if isinstance(m, nn.Linear)] == [152, 48, 10]
    assert n_params(pruned) == 784 * 152 + 152 + 152 * 48 + 48 + 48 * 10 + 10
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), model(x), atol=1e-5, rtol=0)


def test_flatten_maps_one_channel_to_many_inputs():
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 3))
    x = torch.randn(2, 1, 6, 6)
    pruner = StructuredPruner(model, x, round_to=1)
    masks, plan = pruner.compute_masks(model, 0.5)
    assert int((~masks["3.weight"][0]).sum()) == 4 * 16
    apply(model, masks)
    pruned = pruner.materialize(copy.deepcopy(model), plan)
    assert pruned[3].in_features == 4 * 16
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), model(x), atol=1e-5, rtol=0)


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.norm = nn.LayerNorm(16)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        h = self.embed(x)
        h = self.norm(h + self.attn(h, h, h, need_weights=False)[0])
        h = h + self.fc2(torch.relu(self.fc1(h)))
        return self.head(h.mean(1))


def test_multihead_attention_is_left_out():
    model = Encoder()
    x = torch.randn(2, 5, 6)
    pruner = StructuredPruner(model, x)
    assert pruner.roots == ["fc1"]
    assert "MultiheadAttention" in pruner.skipped["embed"]
    with pytest.raises(ValueError, match="attention heads of nn.MultiheadAttention is not supported"):
        StructuredPruner(model, x, modules=["attn"])
    with pytest.raises(ValueError, match="'embed': 'attn' is a MultiheadAttention"):
        StructuredPruner(model, x, modules=["fc2"])


def test_layernorm_groups_are_marked_inexact():
    model = nn.Sequential(nn.Linear(4, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 2))
    pruner = StructuredPruner(model, torch.randn(2, 4))
    assert [(g.root, g.exact) for g in pruner.groups] == [("0", False)]
    assert {"1.weight", "1.bias"} <= set(pruner.groups[0].params)


def test_errors_name_the_argument(resnet):
    with pytest.raises(ValueError, match="could not trace ResNet.*example_input"):
        StructuredPruner(resnet, torch.randn(2, 5, 8, 8))
    with pytest.raises(ValueError, match="Unknown `importance='fisher'`"):
        StructuredPruner(resnet, X, importance="fisher")
    with pytest.raises(ValueError, match="Unknown `scope='model'`"):
        StructuredPruner(resnet, X, scope="model")
    with pytest.raises(ValueError, match="round_to=0"):
        StructuredPruner(resnet, X, round_to=0)
    pruner = StructuredPruner(resnet, X)
    with pytest.raises(ValueError, match="amount=1.0"):
        pruner.compute_masks(resnet, 1.0)
    with pytest.raises(ValueError, match="does not match the model"):
        pruner.compute_masks(ResNet(w1=8), 0.5)
    assert set(IMPORTANCES) == {"l1", "l2", "bn_scale", "taylor", "random"}


def test_training_flags_are_restored(resnet):
    resnet.train()
    resnet.layer1.bn1.eval()
    StructuredPruner(resnet, X)
    assert resnet.training and resnet.stem[1].training and not resnet.layer1.bn1.training


class Branches(nn.Module):
    """Two convolutions concatenated, then split again with ``chunk``."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(24)
        self.c = nn.Conv2d(24, 16, 1)
        self.d = nn.Conv2d(8, 4, 1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        h = torch.relu(self.bn(torch.cat([self.a(x), self.b(x)], 1)))
        u, v = torch.chunk(self.c(h), 2, 1)
        return self.fc(self.d(u * v).mean((2, 3)))


def test_concat_offsets_and_chunks():
    model = Branches().eval()
    randomize_bn(model)
    x = torch.randn(2, 3, 6, 6)
    pruner = StructuredPruner(model, x, round_to=1)
    assert pruner.roots == ["a", "b", "d"]
    assert "split/chunk/slice" in pruner.skipped["c"]
    masks, plan = pruner.compute_masks(model, 0.5)
    # The BatchNorm after the concat loses a's channels at their index and b's shifted by 8.
    gone = set(torch.nonzero(~masks["bn.weight"]).flatten().tolist())
    assert gone == set(plan["a"]) | {8 + i for i in plan["b"]}
    apply(model, masks)
    pruned = pruner.materialize(copy.deepcopy(model), plan)
    assert pruned.bn.num_features == 12 and pruned.c.in_channels == 12
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), model(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("conv", "shape"),
    [(nn.Conv1d, (2, 4, 16)), (nn.Conv3d, (2, 4, 6, 6, 6)), (nn.ConvTranspose1d, (2, 4, 16))],
)
def test_conv1d_and_conv3d_channels_are_masked_and_removed_exactly(conv, shape):
    bn = {nn.Conv3d: nn.BatchNorm3d}.get(conv, nn.BatchNorm1d)
    model = nn.Sequential(conv(4, 16, 3), bn(16), nn.ReLU(), conv(16, 16, 3), nn.ReLU(), nn.Flatten(1))
    model.append(nn.LazyLinear(3))
    x = torch.randn(*shape)
    model(x)
    randomize_bn(model)
    model.eval()
    pruner = StructuredPruner(model, x, round_to=1)
    masks, plan = pruner.compute_masks(model, 0.5)
    assert {root: len(idxs) for root, idxs in plan.items()} == {"0": 8, "3": 8}
    apply(model, masks)
    expected = model(x)
    pruner.materialize(model, plan)
    assert (model[0].out_channels, model[1].num_features, model[3].in_channels, model[3].out_channels) == (
        8,
        8,
        8,
        8,
    )
    assert torch.allclose(model(x), expected, atol=1e-5)


@pytest.mark.parametrize(
    ("width", "round_to", "scope", "removable"),
    [(8, 8, "layer", 0), (8, 1, "layer", 4), (12, 8, "layer", 4), (8, 8, "global", 0), (16, 8, "global", 8)],
)
def test_removable_says_what_round_to_leaves_to_prune(width, round_to, scope, removable):
    model = nn.Sequential(nn.Linear(4, width), nn.ReLU(), nn.Linear(width, 2))
    pruner = StructuredPruner(model, torch.randn(1, 4), round_to=round_to, scope=scope)
    assert pruner.removable(0.5) == {"0": removable}
    _, plan = pruner.compute_masks(model, 0.5)
    assert len(plan["0"]) <= removable


def test_groups_that_cut_tied_weights_are_refused_and_named():
    from lightning_compress.pruning.structured import NoChannelGroupError

    tied = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU())
    tied.extend([nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)])
    tied[6].weight = tied[4].weight
    pruner = StructuredPruner(tied, torch.randn(1, 4), round_to=1, strict=False)
    # Every group whose channels reach the shared tensor (as outputs of 4 or 6, or as inputs of 4 or 6) is refused.
    assert pruner.roots == ["0"] and sorted(pruner.tied) == ["2", "4", "6"]
    assert all("tied (shared) weight ['4.weight', '6.weight']" in why for why in pruner.tied.values())
    with pytest.raises(
        NoChannelGroupError, match=r"cannot remove channels of tied weights .*`exclude=\['4', '6'\]`"
    ):
        StructuredPruner(tied, torch.randn(1, 4), modules=["4", "6"], round_to=1, strict=False)


class HandWrittenAttention(nn.Module):
    """Attention written with nn.Linear q/k/v/o and a view into heads (as Hugging Face models do), then an MLP
    whose tokens are flattened with ``reshape(-1, C)`` (the channel dimension kept whole)."""

    def __init__(self, dim=16, heads=2, head_dim=None):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        b, t, c = x.shape
        d = self.head_dim or -1  # a hard-coded head size, or one the view infers
        q, k, v = (f(x).view(b, t, self.heads, d).transpose(1, 2) for f in (self.q, self.k, self.v))
        attended = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, -1) @ v
        x = x + self.o(attended.transpose(1, 2).reshape(b, t, c))
        hidden = torch.relu(self.fc1(x.reshape(-1, c)))
        return x + self.fc2(hidden).view(b, t, c)


@pytest.mark.parametrize("head_dim", [8, None], ids=["fixed_head_size", "inferred_head_size"])
def test_channels_viewed_into_attention_heads_are_left_alone_and_a_token_reshape_is_not(head_dim):
    # Removing single q/k/v channels would break the fixed view (8) or shift the head boundaries (-1).
    from lightning_compress.pruning.structured import NoChannelGroupError

    torch.manual_seed(0)
    model, x = HandWrittenAttention(head_dim=head_dim).eval(), torch.randn(2, 5, 16)
    with pytest.raises(
        NoChannelGroupError, match=r"'q' has no prunable channel group .*view/reshape that splits"
    ):
        StructuredPruner(model, x, modules=["q", "fc1"])
    pruner = StructuredPruner(model, x, round_to=1)
    assert "view/reshape that splits or merges the channel dimension" in pruner.skipped["q"]
    assert pruner.roots == ["fc1"]  # the MLP's neurons pass `reshape(-1, C)`, which keeps the channels whole
    masks, plan = pruner.compute_masks(model, 0.5)
    apply(model, masks)
    pruned = pruner.materialize(copy.deepcopy(model), plan)
    assert pruned.fc1.out_features == 32 and pruned.q.out_features == 16
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), model(x), atol=1e-5, rtol=0)


class WidthFromInput(nn.Module):
    """A patch embedding and a block whose attention reads the width from its input (``B, N, C = x.shape``), as
    timm-style attention does: narrowing the residual stream breaks the head view of the whole q/k/v outputs."""

    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.heads, self.embed = heads, nn.Linear(8, dim)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.fc1, self.fc2, self.head = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim), nn.Linear(dim, 3)

    def forward(self, x):
        x = self.embed(x)
        b, n, c = x.shape
        q, k, v = (
            f(x).reshape(b, n, self.heads, c // self.heads).transpose(1, 2) for f in (self.q, self.k, self.v)
        )
        x = x + self.o((torch.softmax(q @ k.transpose(-1, -2), -1) @ v).transpose(1, 2).reshape(b, n, c))
        x = x + self.fc2(torch.relu(self.fc1(x)))
        return self.head(x.mean(1))


def test_a_group_whose_removal_breaks_the_forward_is_left_alone_with_the_error():
    torch.manual_seed(0)
    model, x = WidthFromInput().eval(), torch.randn(2, 5, 8)
    pruner = StructuredPruner(model, x, round_to=1)
    assert "the forward fails once its channels are removed (RuntimeError: shape" in pruner.skipped["embed"]
    assert pruner.roots == ["fc1"]  # the MLP's neurons still go
    masks, plan = pruner.compute_masks(model, 0.5)
    apply(model, masks)
    pruned = pruner.materialize(copy.deepcopy(model), plan)
    assert pruned.fc1.out_features == 32 and pruned.embed.out_features == 16
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), model(x), atol=1e-5, rtol=0)
