"""Activation-aware pruning: the math of Wanda and SparseGPT on synthetic layers, the plain-torch verb, and
GradualPruning(criterion="wanda" | "sparsegpt") in short fits (exact sparsity and N:M pattern, one-shot quality,
bit-exact resume, the training left undisturbed, early errors)."""

import copy
import itertools
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

from lightning_compress import GradualPruning, LowRankReplacement
from lightning_compress.pruning import (
    PruningConfig,
    PruningPlan,
    collect_statistics,
    layer_columns,
    nm_keep,
    prune_,
    sparsegpt_prune,
    unstructured_masks,
    wanda_mask,
)
from tests._ddp import run_worker
from tests.conftest import (
    MaskedEncoder,
    PaddedAttention,
    RecordSteps,
    dict_batches,
    fit_or_resume,
    trainer_kwargs,
)

# -- the math, on synthetic layers ----------------------------------------------------------------------


def _layer_inputs(seed, rows=1024, features=64, outliers=4, correlated=True):
    """Inputs with a few features 20x larger than the rest and (``correlated``) a low-rank shared part."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, features, generator=g)
    if correlated:
        x = torch.randn(rows, 16, generator=g) @ torch.randn(16, features, generator=g) + 0.3 * x
    scale = torch.ones(features)
    scale[torch.randperm(features, generator=g)[:outliers]] = 20.0
    return x * scale, torch.randn(32, features, generator=g)


def _output_error(x, w, pruned):
    return float((x @ (w - pruned).T).norm() / (x @ w.T).norm())


def _magnitude(w, amount=None, nm=None):
    return w * (nm_keep(w.abs(), *nm) if nm else unstructured_masks({"w": w}, amount)["w"])


@pytest.mark.parametrize("target", [{"amount": 0.5}, {"nm": (2, 4)}], ids=["50%", "2:4"])
def test_sparsegpt_reconstructs_the_layer_output_better_than_wanda_and_magnitude(target):
    for seed in range(3):
        x, w = _layer_inputs(seed)
        magnitude = _output_error(x, w, _magnitude(w, **target))
        wanda = _output_error(x, w, w * wanda_mask(w, x.norm(dim=0), **target))
        new, mask = sparsegpt_prune(w, x.T @ x, **target)
        sparsegpt = _output_error(x, w, new)
        # Measured (50% and 2:4): magnitude 0.20-0.51, Wanda 0.055-0.085, SparseGPT 0.032-0.047.
        assert sparsegpt < 0.8 * wanda and wanda < 0.4 * magnitude, (seed, magnitude, wanda, sparsegpt)
        assert torch.equal(new == 0, ~mask) and int((~mask).sum()) == w.numel() // 2


def test_sparsegpt_moves_a_pruned_weight_onto_the_others_as_least_squares_does():
    x, w = _layer_inputs(0, rows=256, features=12, outliers=0)
    x, w = x.double(), w[:1].double()
    previous = torch.ones_like(w, dtype=torch.bool)
    previous[0, 0] = False  # prune the first column only: every other weight may compensate
    new, _ = sparsegpt_prune(w, x.T @ x, 1 / 12, previous=previous, damp=1e-10)
    best = torch.linalg.lstsq(x[:, 1:], x @ w[0]).solution  # the optimal remaining weights
    assert new[0, 0] == 0 and torch.allclose(new[0, 1:], best, atol=1e-6, rtol=1e-6)


def test_wanda_keeps_the_weights_of_large_inputs_where_magnitude_drops_them():
    x, w = _layer_inputs(1, correlated=False)
    magnitude = _output_error(x, w, _magnitude(w, 0.5))
    wanda = _output_error(x, w, w * wanda_mask(w, x.norm(dim=0), 0.5))
    assert wanda < 0.4 * magnitude, (magnitude, wanda)  # measured 0.056 vs 0.28
    big = x.norm(dim=0) > 3 * x.norm(dim=0).median()
    kept = wanda_mask(w, x.norm(dim=0), 0.5)
    assert kept[:, big].float().mean() > 0.95 and _magnitude(w, 0.5)[:, big].ne(0).float().mean() < 0.7


@pytest.mark.parametrize("prune", ["wanda", "sparsegpt"])
@pytest.mark.parametrize(
    ("shape", "groups"),
    [((10, 30), 1), ((6, 4, 3, 3), 1), ((8, 2, 3, 3), 2)],
    ids=["linear", "conv", "grouped"],
)
def test_counts_are_exact_the_nm_pattern_is_exact_and_masks_only_grow(prune, shape, groups):
    g = torch.Generator().manual_seed(0)
    columns = shape[1] * (shape[2] * shape[3] if len(shape) == 4 else 1)
    x = torch.randn(200, groups, columns, generator=g)
    w = torch.randn(shape, generator=g)

    def run(amount=None, nm=None, previous=None):
        if prune == "wanda":
            return w * (m := wanda_mask(w, x.norm(dim=0), amount, nm=nm, previous=previous)), m
        return sparsegpt_prune(w, torch.einsum("rgi,rgj->gij", x, x), amount, nm=nm, previous=previous)

    _, first = run(0.3)
    assert int((~first).sum()) == round(
        0.3 * w.numel()
    )  # an amount whose count is not a multiple of the rows
    rows = (~first).reshape(shape[0], -1).sum(1)
    if prune == "wanda":
        assert int(rows.max() - rows.min()) <= 1  # compared within each output row, rows share the count
    second_w, second = run(0.65, previous=first)
    assert int((~second).sum()) == round(0.65 * w.numel()) and not bool((second & ~first).any())
    assert torch.equal(second_w == 0, ~second)
    nm_w, kept = run(nm=(1, 2))  # 1:2 along the input channels, at every output and kernel position
    assert bool((kept.movedim(1, -1).reshape(-1, 2).sum(-1) == 1).all()) and torch.equal(nm_w == 0, ~kept)


def test_dead_inputs_are_pruned_first():
    x, w = _layer_inputs(2, rows=256, features=16, outliers=0)
    x[:, :3] = 0.0  # three inputs that never fire
    for new, mask in (
        (None, wanda_mask(w, x.norm(dim=0), 0.25)),
        sparsegpt_prune(w, x.T @ x, 0.25),
    ):
        assert not bool(mask[:, :3].any()) and int((~mask).sum()) == 128
        assert new is None or bool(torch.isfinite(new).all())


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(3, 4, 3, padding=1),
        nn.Conv2d(3, 4, 4, padding="same", dilation=2),
        nn.Conv2d(4, 6, 3, stride=2, groups=2, padding_mode="reflect", padding=1),
    ],
    ids=["padded", "same-even-kernel", "strided-grouped-reflect"],
)
def test_conv_columns_reproduce_the_convolution(conv):
    x = torch.randn(2, conv.in_channels, 9, 9)
    cols = layer_columns(conv, x)  # (rows, groups, in/groups * kh * kw)
    weight = conv.weight.reshape(conv.groups, conv.out_channels // conv.groups, -1)
    out = torch.einsum("rgc,goc->rgo", cols, weight).reshape(cols.shape[0], -1) + conv.bias
    expected = conv(x)
    assert torch.allclose(out, expected.permute(0, 2, 3, 1).reshape(-1, conv.out_channels), atol=1e-5)


def test_a_conv_is_pruned_as_the_linear_layer_of_its_unfolded_inputs():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    linear = nn.Linear(36, 6)
    linear.weight.data = conv.weight.detach().reshape(6, -1).clone()
    images = [torch.randn(3, 4, 7, 7) for _ in range(2)]
    unfolded = [F.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 36) for x in images]
    conv_stats = collect_statistics(conv, {"w": [conv]}, images, gram=True)["w"]
    linear_stats = collect_statistics(linear, {"w": [linear]}, unfolded, gram=True)["w"]
    assert conv_stats.count == linear_stats.count == 2 * 3 * 49
    assert torch.allclose(conv_stats.gram, linear_stats.gram, rtol=1e-5, atol=1e-3)
    mask = wanda_mask(conv.weight, conv_stats.norms, 0.5)
    assert torch.equal(mask.reshape(6, -1), wanda_mask(linear.weight, linear_stats.norms, 0.5))
    new, kept = sparsegpt_prune(conv.weight, conv_stats.hessian, 0.5)
    new_linear, kept_linear = sparsegpt_prune(linear.weight, linear_stats.hessian, 0.5)
    assert torch.equal(kept.reshape(6, -1), kept_linear)
    assert torch.allclose(new.reshape(6, -1), new_linear, atol=1e-5)


def test_prune_runs_the_calibration_in_eval_mode_and_leaves_no_hook():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.5), nn.ReLU(), nn.Linear(16, 4))
    config = PruningConfig(amount=0.5, criterion="wanda", calibration_batches=2)
    with pytest.raises(
        ValueError, match=r"`criterion='wanda'` decides from the layers' inputs: pass `calibration`"
    ):
        prune_(model, config)
    seen = []
    model[3].register_forward_pre_hook(lambda module, args: seen.append(model[1].training))
    batches = [torch.randn(4, 8) for _ in range(5)]
    prune_(model, config, calibration=batches)
    assert seen == [False, False] and model.training  # 2 of the 5 batches, in eval mode, the mode restored
    assert (len(model[0]._forward_pre_hooks), len(model[3]._forward_pre_hooks)) == (0, 1)  # only the test's
    assert [int((model[i].weight == 0).sum()) for i in (0, 3)] == [64, 32]


def _attention_layers(model):
    return {"attn": [model.attn], "attn.out_proj": [model.attn.out_proj], "fc": [model.fc]}


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "positions_first"])
def test_a_calibration_mask_counts_the_positions_it_keeps_as_if_the_padding_were_not_there(batch_first):
    torch.manual_seed(0)
    model = PaddedAttention(batch_first).eval()
    batch = next(iter(dict_batches(n=8)))
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    layers = _attention_layers(model)
    masked = collect_statistics(
        model, layers, [inputs], gram=True, positions=lambda x: x["attention_mask"].bool()
    )
    # Each sample alone, cut to its real tokens: no padding to leave out.
    alone = [
        {"input_ids": i[None, : int(m.sum())], "attention_mask": m[None, : int(m.sum())]}
        for i, m in zip(inputs["input_ids"], inputs["attention_mask"], strict=True)
    ]
    reference = collect_statistics(model, layers, alone, gram=True)
    real = int(inputs["attention_mask"].sum())
    assert real < inputs["attention_mask"].numel()  # the batch has padding
    everything = collect_statistics(model, layers, [inputs], gram=True)
    for name in layers:
        assert masked[name].count == reference[name].count == real, name
        torch.testing.assert_close(masked[name].sq_sum, reference[name].sq_sum, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(masked[name].gram, reference[name].gram, rtol=1e-4, atol=1e-4)
        assert everything[name].count == inputs["attention_mask"].numel()
        assert not torch.allclose(everything[name].sq_sum, reference[name].sq_sum, rtol=1e-2), name


class PooledAndFlat(nn.Module):
    """One Linear on the mean over positions, one on the positions flattened into rows."""

    def __init__(self):
        super().__init__()
        self.head, self.flat = nn.Linear(4, 2), nn.Linear(4, 2)

    def forward(self, x):
        return self.head(x.mean(1)).sum() + self.flat(x.reshape(-1, 4)).sum()


def test_a_calibration_mask_leaves_whole_the_inputs_that_have_no_positions():
    # A pooled (batch, features) input counts every sample; rows laid out (batch·positions, features) are masked.
    model = PooledAndFlat()
    x = torch.randn(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    layers = {"head": [model.head], "flat": [model.flat]}
    stats = collect_statistics(model, layers, [x], positions=lambda inputs: mask[: len(inputs)])
    assert stats["head"].count == 2
    torch.testing.assert_close(stats["head"].sq_sum[0], (x.mean(1) ** 2).sum(0))
    assert stats["flat"].count == 3
    torch.testing.assert_close(stats["flat"].sq_sum[0], (x[mask.bool()] ** 2).sum(0))


# -- early errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"amount": 0.5, "mode": "structured", "criterion": "wanda"}, ValueError, r"`criterion='wanda'` does not apply to `mode='structured'`.*`mode='unstructured'`"),
        ({"amount": 0.5, "criterion": "sparsegpt", "scope": "global"}, ValueError, r"`criterion='sparsegpt'` does not apply to `scope='global'`.*Leave `scope` at 'layer'"),
        ({"amount": 0.5, "criterion": "wanda", "scope": "global", "max_layer_amount": 0.9}, ValueError, r"`criterion='wanda'` does not apply to `scope='global'`"),
        ({"mode": "2:4", "criterion": "random"}, ValueError, r"`criterion='random'` does not apply to `mode='2:4'`.*'wanda', 'sparsegpt'"),
        ({"amount": 0.5, "criterion": "wanda", "calibration_batches": 0}, ValueError, r"`calibration_batches=0` must be a positive integer"),
        ({"amount": 0.5, "criterion": "wanda", "calibration_batches": "8"}, TypeError, r"`calibration_batches='8'` must be a positive integer"),
        ({"amount": 0.5, "criterion": "wanda", "calibration_input": "input_ids"}, TypeError, r"`calibration_input='input_ids'` must be a function from a training batch"),
        ({"amount": 0.5, "criterion": "wanda", "calibration_mask": "attention_mask"}, TypeError, r"`calibration_mask='attention_mask'` must be a function from the model input to a \(batch, positions\) mask"),
    ],
)  # fmt: skip
def test_bad_combinations_fail_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        GradualPruning(**kwargs)
    with pytest.raises(error, match=match):
        PruningConfig(**kwargs)


def test_a_layer_whose_inputs_are_not_collected_is_refused_when_the_plan_is_built():
    model = nn.Sequential(nn.Conv1d(4, 4, 3), nn.Flatten(), nn.Linear(8, 2))
    with pytest.raises(
        ValueError,
        match=r"nn.Linear, nn.Conv2d and nn.MultiheadAttention layers.*'0' \(Conv1d\).*`exclude=\['0'\]`",
    ):
        PruningPlan(model, PruningConfig(amount=0.5, criterion="sparsegpt", modules=[nn.Conv1d, nn.Linear]))
    plan = PruningPlan(model, PruningConfig(amount=0.5, criterion="sparsegpt", modules=nn.Linear))
    with pytest.raises(ValueError, match=r"call `calibrate\(inputs\)` before each `compute_masks`"):
        plan.compute_masks(0.5)


# -- GradualPruning in short fits ------------------------------------------------------------------------


class OutlierNet(pl.LightningModule):
    """Digits through a Linear whose inputs include four pixels scaled up 25x (outlier features), a Conv2d and a
    Linear classifier; every layer's inputs are a multiple of 4 (for 2:4). SGD with momentum and weight decay."""

    def __init__(self, data=None, shuffle=False):
        super().__init__()
        self.data, self.shuffle = data, shuffle
        scale = torch.ones(64)
        scale[[19, 28, 35, 44]] = 25.0
        self.register_buffer("scale", scale)
        self.fc1, self.conv, self.fc2 = nn.Linear(64, 64), nn.Conv2d(4, 8, 3, padding=1), nn.Linear(128, 10)

    def forward(self, x):
        h = torch.relu(self.fc1(x.flatten(1) * self.scale))
        return self.fc2(torch.relu(self.conv(h.reshape(-1, 4, 4, 4))).flatten(1))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.02, momentum=0.9, weight_decay=1e-3)

    def train_dataloader(self):
        # No generator of its own: a shuffling sampler seeds itself from the global random state.
        return torch.utils.data.DataLoader(self.data, batch_size=64, shuffle=self.shuffle)


LAYERS = ("fc1.weight", "conv.weight", "fc2.weight")


def _keyword_inputs(batch):
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def test_a_batch_the_model_cannot_take_as_it_is_fails_at_setup_naming_calibration_input(tmp_path):
    # The default model input of a dict batch is its `input_ids`; this forward also needs `attention_mask`.
    record = RecordSteps()
    pruning = GradualPruning(mode="2:4", criterion="wanda", start=0.5, end=0.5, modules=nn.Linear)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=4), callbacks=[pruning, record])
    with pytest.raises(
        ValueError,
        match=r"model input is their `input_ids` alone.*`attention_mask`.*Pass `calibration_input`",
    ):
        trainer.fit(MaskedEncoder(), dict_batches())
    assert record.steps == []


class OptionalMaskEncoder(MaskedEncoder):
    """A Hugging Face-style signature: the mask is optional, so the model also runs on `input_ids` alone."""

    def forward(self, input_ids, attention_mask=None):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return super().forward(input_ids, attention_mask)


@pytest.mark.parametrize(
    "make",
    [
        lambda **kw: GradualPruning(
            mode="2:4", criterion="wanda", modules=nn.Linear, start=0.0, end=0.0, **kw
        ),
        lambda **kw: LowRankReplacement(rank=8, method="whitened", modules=["proj"], **kw),
    ],
    ids=["wanda", "whitened_low_rank"],
)
def test_a_dict_batch_whose_default_input_leaves_out_an_argument_of_the_forward_fails_at_setup(
    tmp_path, make
):
    # The model would run on `input_ids` alone, the padding counted as tokens: a silent wrong calibration.
    record = RecordSteps()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=2), callbacks=[make(), record])
    with pytest.raises(
        ValueError,
        match=r"`input_ids` alone, but the model's forward also takes `attention_mask`.*"
        r"calibration_input=lambda batch: \{'input_ids': batch\['input_ids'\], 'attention_mask'",
    ):
        trainer.fit(OptionalMaskEncoder(), dict_batches())
    assert record.steps == []
    # Told how to call the model, the same fit runs; `labels`, a target, is not asked for.
    trainer = pl.Trainer(
        **trainer_kwargs(tmp_path, max_steps=2), callbacks=[make(calibration_input=_keyword_inputs)]
    )
    trainer.fit(OptionalMaskEncoder(), dict_batches())
    assert trainer.global_step == 2


@pytest.mark.parametrize("criterion", ["wanda", "sparsegpt"])
def test_calibration_input_maps_the_batches_and_decides_as_the_core_does(tmp_path, criterion):
    torch.manual_seed(0)
    model = MaskedEncoder()
    dense = copy.deepcopy(model)
    pruning = GradualPruning(
        mode="2:4",
        criterion=criterion,
        modules=nn.Linear,
        start=0.0,
        end=0.0,
        calibration_batches=3,
        calibration_input=_keyword_inputs,
        finalize=False,
    )
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=2), callbacks=[pruning])
    trainer.fit(model, dict_batches())
    # The masks are decided before the first step: the core on the same three mapped batches decides the same.
    batches = list(itertools.islice(dict_batches(), 3))
    config = PruningConfig(
        mode="2:4",
        criterion=criterion,
        modules=nn.Linear,
        calibration_batches=3,
        calibration_input=_keyword_inputs,
    )
    prune_(dense, config, calibration=batches, finalize=False)
    for name in ("proj.weight", "head.weight"):
        assert torch.equal(pruning.masks[name], dict(dense.named_parameters())[name] != 0), name
    # With the attention mask left out (every position counted), Wanda decides otherwise on this data.
    ones = [{**b, "attention_mask": torch.ones_like(b["attention_mask"])} for b in batches]
    torch.manual_seed(0)
    other = MaskedEncoder()  # the same initial weights as `model`
    prune_(other, config, calibration=ones, finalize=False)
    assert not torch.equal(other.proj.weight != 0, dense.proj.weight != 0)


class PaddedClassifier(pl.LightningModule):
    """:class:`PaddedAttention` classifying dict batches (:func:`dict_batches`) by its mean over the real tokens."""

    def __init__(self):
        super().__init__()
        self.net = PaddedAttention()

    def forward(self, input_ids, attention_mask):
        mask = attention_mask.unsqueeze(-1)
        return (self.net(input_ids, attention_mask) * mask).sum(1) / mask.sum(1)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch["input_ids"], batch["attention_mask"]), batch["labels"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _real_positions(inputs):
    return inputs["attention_mask"]


@pytest.mark.parametrize("criterion", ["wanda", "sparsegpt"])
def test_calibration_mask_leaves_the_padding_out_of_the_callbacks_decision_as_out_of_the_cores(
    tmp_path, criterion
):
    torch.manual_seed(0)
    model = PaddedClassifier()
    dense = copy.deepcopy(model.net)
    options = dict(mode="2:4", criterion=criterion, modules=nn.Linear, calibration_batches=3)
    options |= dict(calibration_input=_keyword_inputs, calibration_mask=_real_positions)
    pruning = GradualPruning(start=0.0, end=0.0, finalize=False, **options)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=2), callbacks=[pruning])
    trainer.fit(model, dict_batches())
    batches = list(itertools.islice(dict_batches(), 3))
    masked, whole = copy.deepcopy(dense), copy.deepcopy(dense)
    prune_(masked, PruningConfig(**options), calibration=batches, finalize=False)
    options.pop("calibration_mask")
    prune_(whole, PruningConfig(**options), calibration=batches, finalize=False)
    names = ("attn.in_proj_weight", "attn.out_proj.weight", "fc.weight")
    kept = {name: dict(masked.named_parameters())[name] != 0 for name in names}
    for name in names:
        assert torch.equal(pruning.masks[f"net.{name}"], kept[name]), name
    # Counting the padded positions too decides otherwise.
    assert any(not torch.equal(kept[n], dict(whole.named_parameters())[n] != 0) for n in names)


@pytest.mark.parametrize(
    ("calibration_mask", "match"),
    [
        (lambda x: x["attention_mask"] * 2, r"`calibration_mask` must return a \(batch, positions\) tensor of booleans or 0/1.*values other than 0/1"),
        (lambda x: x["attention_mask"][0], r"`calibration_mask` must return a \(batch, positions\) tensor.*shape \(6,\)"),
        (lambda x: x["labels"], r"`calibration_mask` failed on the model input: KeyError: 'labels'. It takes what the model takes"),
        (lambda x: x["attention_mask"][:, :3], r"`calibration_mask` gave a mask of shape \(1, 3\) \(batch, positions\) for one sample, and no calibrated layer's input holds those positions"),
    ],
    ids=["not_binary", "one_dimension", "other_positions", "fails"],
)  # fmt: skip
def test_a_calibration_mask_that_does_not_fit_fails_at_setup(tmp_path, calibration_mask, match):
    record = RecordSteps()
    pruning = GradualPruning(
        mode="2:4",
        criterion="wanda",
        modules=nn.Linear,
        calibration_input=_keyword_inputs,
        calibration_mask=calibration_mask,
    )
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=4), callbacks=[pruning, record])
    with pytest.raises(ValueError, match=match):
        trainer.fit(PaddedClassifier(), dict_batches())
    assert record.steps == []


@pytest.mark.parametrize(
    ("criterion", "mode"),
    [("wanda", "unstructured"), ("sparsegpt", "unstructured"), ("wanda", "2:4"), ("sparsegpt", "2:4")],
)
def test_gradual_pruning_reaches_the_exact_sparsity_or_pattern(tmp_path, digits, criterion, mode):
    amount = 0.7 if mode == "unstructured" else None
    pruning = GradualPruning(
        amount, mode, criterion, start=0.0, end=0.6, frequency=2, calibration_batches=2, finalize=False
    )
    model = OutlierNet()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, limit_train_batches=4), callbacks=[pruning])
    trainer.fit(model, datamodule=digits)
    params = dict(model.named_parameters())
    for name in LAYERS:
        weight = params[name].detach()
        assert torch.equal(weight != 0, pruning.masks[name]), name  # exact zeros, trained weights elsewhere
        if mode == "unstructured":
            assert int((weight == 0).sum()) == round(0.7 * weight.numel()), name
        else:
            assert bool(((weight != 0).movedim(1, -1).reshape(-1, 4).sum(-1) == 2).all()), name


class Record(Callback):
    """The loss of every training step, whether the module trained in train mode, and the global random state."""

    def __init__(self):
        self.losses, self.modes, self.rng = [], [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))
        self.modes.append(pl_module.training)
        self.rng.append(torch.random.get_rng_state())


def _pretrained(digits):
    torch.manual_seed(0)
    model = OutlierNet(digits.train_set, shuffle=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for x, y in itertools.islice(itertools.cycle(torch.utils.data.DataLoader(digits.train_set, 128)), 150):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model


def test_one_shot_sparsegpt_loses_less_than_magnitude_and_leaves_the_training_undisturbed(tmp_path, digits):
    pretrained = _pretrained(digits)  # loss 0.13 on the training set
    results = {}
    for criterion in ("l1", "wanda", "sparsegpt"):
        pl.seed_everything(3, verbose=False)
        record = Record()
        pruning = GradualPruning(0.5, criterion=criterion, start=0.0, end=0.0, finalize=False)
        trainer = pl.Trainer(**trainer_kwargs(tmp_path, limit_train_batches=2), callbacks=[pruning, record])
        trainer.fit(copy.deepcopy(pretrained))
        results[criterion] = record
    # The loss of the first step, taken right after pruning half of every layer: measured 2.08 (magnitude), 0.28
    # (Wanda), 0.17 (SparseGPT).
    first = {criterion: record.losses[0] for criterion, record in results.items()}
    assert first["sparsegpt"] < 0.7 * first["wanda"] and first["wanda"] < 0.3 * first["l1"], first
    for record in results.values():  # calibration ran in eval mode and drew no random number
        assert record.modes == [True] * 2
        assert all(torch.equal(a, b) for a, b in zip(record.rng, results["l1"].rng, strict=True))


def _resume_run(tmp_path, digits, ckpt_path=None, checkpoint=None):
    pl.seed_everything(7, verbose=False)
    pruning = GradualPruning(
        0.8, criterion="sparsegpt", start=0.1, end=0.9, frequency=2, calibration_batches=3
    )
    model = OutlierNet()
    fit_or_resume(
        tmp_path, digits, model, [pruning], ckpt_path, checkpoint, max_epochs=2, limit_train_batches=5
    )
    return model, pruning


def test_a_sparsegpt_run_resumes_bit_exactly(tmp_path, digits):
    full, _ = _resume_run(tmp_path / "full", digits)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    _resume_run(tmp_path / "first", digits, checkpoint=ckpt)
    path = tmp_path / "ckpt" / "epoch=0-step=5.ckpt"
    states = torch.load(path, weights_only=False)["callbacks"]
    state = next(v for k, v in states.items() if "GradualPruning" in k)
    assert 0 < state["current_amount"] < 0.8  # written mid-ramp: updates on both sides of the checkpoint
    resumed, pruning = _resume_run(tmp_path / "second", digits, ckpt_path=path)
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert pruning.current_amount == pytest.approx(0.8)


class SaveDecision(Callback):
    """Writes, per rank, the weights before pruning and the masks and weights right after the one-shot update."""

    def __init__(self, pruning, out):
        self.pruning, self.out = pruning, Path(out)

    def on_train_start(self, trainer, pl_module):
        self.before = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        self.eval_calls = 0
        pl_module.fc1.register_forward_pre_hook(
            lambda m, a: setattr(self, "eval_calls", self.eval_calls + (not m.training))
        )

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 0:
            torch.save(
                {
                    "before": self.before,
                    "masks": {k: v.cpu() for k, v in self.pruning.masks.items()},
                    "after": {k: v.detach().clone() for k, v in pl_module.named_parameters()},
                    "eval_calls": self.eval_calls,
                    "world_size": trainer.world_size,
                },
                self.out / f"rank{trainer.global_rank}.pt",
            )


def test_ddp_ranks_calibrate_on_their_share_and_hold_rank_zeros_decision(tmp_path):
    run_worker("test_calibrated_pruning.py", tmp_path)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert rank0["world_size"] == 2
    assert (rank0["eval_calls"], rank1["eval_calls"]) == (2, 1)  # of the 3 batches: 0 and 2 | 1
    for name in LAYERS:
        assert torch.equal(rank0["masks"][name], rank1["masks"][name]), name
        assert torch.equal(rank0["after"][name], rank1["after"][name]), name
    # The same decision as one process calibrating on the three batches: the sums were added over the ranks.
    from examples.data import DigitsDataModule

    model = OutlierNet()
    model.load_state_dict(rank0["before"])
    data = DigitsDataModule(batch_size=32)
    data.setup("fit")
    batches = [x for x, _ in itertools.islice(data.train_dataloader(), 3)]
    config = PruningConfig(0.5, criterion="sparsegpt", calibration_batches=3)
    plan = prune_(model, config, calibration=batches, finalize=False)
    # Measured: identical masks, weights within 2e-6 (from rank zero's batches alone: 98.6% of the masks, 0.13).
    for name in LAYERS:
        agree = float((plan.masks[name] == rank0["masks"][name]).float().mean())
        weights = dict(model.named_parameters())[name].detach()
        assert agree > 0.999 and torch.allclose(weights, rank0["after"][name], atol=1e-4), (name, agree)


if __name__ == "__main__":  # the DDP worker: two CPU processes prune once, at the first step
    from examples.data import DigitsDataModule
    from tests._ddp import ddp_trainer

    pl.seed_everything(0, verbose=False)
    pruning = GradualPruning(
        0.5, criterion="sparsegpt", start=0.0, end=0.0, calibration_batches=3, finalize=False
    )
    trainer = ddp_trainer([pruning, SaveDecision(pruning, sys.argv[1])], limit_train_batches=1)
    trainer.fit(OutlierNet(), datamodule=DigitsDataModule(batch_size=32))
