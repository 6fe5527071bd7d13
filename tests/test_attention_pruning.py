"""Unstructured and N:M pruning of nn.MultiheadAttention's input projection (packed ``in_proj_weight``, or separate
q/k/v weights), with every criterion: selection, exact amounts and patterns, statistics, fits and resume."""

from __future__ import annotations

import copy
import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from examples.language import TinyGPT
from lightning_compress import GradualPruning
from lightning_compress.pruning import PruningConfig, PruningPlan, prune_
from lightning_compress.pruning.calibration import collect_statistics, wanda_mask
from tests.conftest import StopAfterFirstEpoch, trainer_kwargs

IN_PROJ = ("blocks.0.attn.in_proj_weight", "blocks.1.attn.in_proj_weight")


def _gpt(seed=0):
    torch.manual_seed(seed)
    return TinyGPT(block_size=16, d_model=32, n_heads=2, n_layers=2)


def _tokens(seed, batches=2):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (4, 16), generator=generator) for _ in range(batches)]


def _is_two_four(weight):
    return bool(((weight != 0).reshape(-1, 4).sum(-1) == 2).all())


@pytest.mark.parametrize("criterion", ["l1", "wanda", "sparsegpt"])
@pytest.mark.parametrize("mode", ["unstructured", "2:4"])
def test_the_default_selection_prunes_the_packed_input_projection_exactly(criterion, mode):
    model = _gpt()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    config = PruningConfig(amount=0.6 if mode == "unstructured" else None, mode=mode, criterion=criterion)
    plan = prune_(model, config, calibration=_tokens(1), finalize=False)
    params = dict(model.named_parameters())
    for name in IN_PROJ:
        weight = params[name].detach()
        assert torch.equal(weight != 0, plan.masks[name]), name
        if mode == "unstructured":
            assert int((weight == 0).sum()) == round(0.6 * weight.numel()) == 1843, name
        else:
            assert _is_two_four(weight), name
        if criterion != "sparsegpt":  # the kept weights are the old ones (sparsegpt updates them)
            assert torch.equal(weight[plan.masks[name]], before[name][plan.masks[name]]), name
    assert plan.layer_sparsity()[IN_PROJ[0]] == pytest.approx(
        0.6 if mode == "unstructured" else 0.5, abs=1e-3
    )


def test_the_pruned_attention_computes_with_the_masked_weight():
    model = _gpt()
    dense = copy.deepcopy(model)
    plan = prune_(model, PruningConfig(amount=0.5), finalize=False)
    attn, reference = model.blocks[0].attn.eval(), dense.blocks[0].attn.eval()
    x = torch.randn(3, 16, 32)
    with torch.no_grad():
        dense_out, _ = reference(x, x, x, need_weights=False)
        reference.in_proj_weight.mul_(plan.masks[IN_PROJ[0]])
        reference.out_proj.weight.mul_(plan.masks["blocks.0.attn.out_proj.weight"])
        pruned_out, _ = attn(x, x, x, need_weights=False)
        reference_out, _ = reference(x, x, x, need_weights=False)
    assert torch.equal(pruned_out, reference_out)
    assert (
        float((pruned_out - dense_out).norm() / dense_out.norm()) > 0.1
    )  # the pruning did change the attention


def test_excluding_the_attention_module_leaves_its_input_projection_alone():
    model = _gpt()
    plan = PruningPlan(model, PruningConfig(amount=0.5, exclude=["blocks.0.attn"]))
    assert IN_PROJ[0] not in plan.params and IN_PROJ[1] in plan.params
    assert "blocks.0.attn.out_proj.weight" in plan.params  # the output projection is a Linear of its own
    # Selecting attention modules alone prunes their projections, input and output.
    plan = PruningPlan(_gpt(), PruningConfig(amount=0.5, modules=nn.MultiheadAttention))
    assert sorted(plan.params) == sorted([*IN_PROJ, *(f"blocks.{i}.attn.out_proj.weight" for i in (0, 1))])


def test_layer_amounts_name_the_attention_module():
    model = _gpt()
    config = PruningConfig(amount=0.5, layer_amounts={"blocks.0.attn": 0.25, "blocks.0.attn.out_proj": 0.75})
    prune_(model, config)
    sparsity = {name: float((p == 0).float().mean()) for name, p in model.named_parameters()}
    assert sparsity[IN_PROJ[0]] == pytest.approx(0.25, abs=1e-3)
    assert sparsity["blocks.0.attn.out_proj.weight"] == pytest.approx(0.75, abs=1e-3)
    assert sparsity[IN_PROJ[1]] == pytest.approx(0.5, abs=1e-3)
    # Not named, the input projection follows its out_proj: amounts for the Linear layers alone (e.g. a budget's)
    # need no `amount`.
    model = _gpt()
    linears = {
        name: 0.2 + 0.1 * (i % 5)
        for i, (name, m) in enumerate(model.named_modules())
        if isinstance(m, nn.Linear)
    }
    prune_(model, PruningConfig(layer_amounts=linears))
    for i in (0, 1):
        weight = model.blocks[i].attn.in_proj_weight
        expected = linears[f"blocks.{i}.attn.out_proj"]
        assert int((weight == 0).sum()) == round(expected * weight.numel()), i


def test_self_attention_statistics_are_those_of_the_query_for_every_third():
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(3, 5, 8)
    stats = collect_statistics(attn, {"a": [attn]}, [(x, x, x)], gram=True)["a"]
    rows = x.reshape(-1, 8)
    assert stats.count == 15
    for third in range(3):
        assert torch.allclose(stats.sq_sum[third], (rows * rows).sum(0))
        assert torch.allclose(stats.gram[third], rows.T @ rows, atol=1e-5)


def test_the_output_projection_statistics_are_the_heads_outputs_it_multiplies():
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(8, 2, batch_first=True)
    x, future = torch.randn(3, 5, 8), torch.ones(5, 5, dtype=torch.bool).triu(1)
    inputs = {"query": x, "key": x, "value": x, "attn_mask": future}
    stats = collect_statistics(attn, {"out": [attn.out_proj]}, [inputs], gram=True)["out"]
    with torch.no_grad():  # the heads by hand: project, split into 2 heads of 4, attend causally, concatenate
        q, k, v = (x @ attn.in_proj_weight.T + attn.in_proj_bias).chunk(3, -1)
        q, k, v = (t.reshape(3, 5, 2, 4).transpose(1, 2) for t in (q, k, v))
        heads = F.scaled_dot_product_attention(q, k, v, attn_mask=~future).transpose(1, 2).reshape(15, 8)
    assert stats.count == 15
    assert torch.allclose(stats.sq_sum[0], (heads * heads).sum(0), rtol=1e-4)
    assert torch.allclose(stats.gram[0], heads.T @ heads, atol=1e-5)
    with warnings.catch_warnings():  # every pruned weight of TinyGPT gets statistics: no layer "did not run"
        warnings.simplefilter("error")
        plan = PruningPlan(_gpt(), PruningConfig(amount=0.5, criterion="wanda"))
        plan.calibrate(_tokens(0))
    assert plan.input_statistics["blocks.0.attn.out_proj.weight"].count == 2 * 4 * 16


class CrossAttention(nn.Module):
    """Queries from ``x``, keys and values from a memory of another length and scale (given by keyword)."""

    def __init__(self, kdim=None):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True, kdim=kdim, vdim=kdim)
        self.head = nn.Linear(8, 4)

    def forward(self, x, memory):
        out, _ = self.attn(x, key=memory, value=memory * 3.0, need_weights=False)
        return self.head(out)


def test_cross_attention_thirds_get_the_statistics_of_their_own_inputs():
    torch.manual_seed(0)
    model = CrossAttention()
    x, memory = torch.randn(2, 5, 8), torch.randn(2, 7, 8)
    memory[..., 0] *= 1000.0  # a large key/value feature: Wanda keeps its weights in the k and v thirds only
    stats = collect_statistics(model, {"attn": [model.attn]}, [(x, memory)])["attn"]
    for third, inputs in enumerate((x, memory, memory * 3.0)):
        rows = inputs.reshape(-1, 8)
        assert torch.allclose(stats.sq_sum[third], (rows * rows).sum(0), rtol=1e-5), third
    assert stats.count == 10  # query rows

    weight = model.attn.in_proj_weight.detach().clone()
    plan = prune_(
        model, PruningConfig(amount=0.5, criterion="wanda"), calibration=[(x, memory)], finalize=False
    )
    mask = plan.masks["attn.in_proj_weight"]
    assert torch.equal(mask, wanda_mask(weight, stats.norms, 0.5))
    assert int((~mask).sum()) == weight.numel() // 2
    assert bool(mask[8:, 0].all()) and not bool(mask[:8, 0].all())  # column 0: kept for k and v, not for q


def test_cross_attention_sparsegpt_reconstructs_each_projection_from_its_own_inputs():
    torch.manual_seed(0)
    model = CrossAttention()
    # Correlated inputs (near rank 3), the case where moving a pruned weight onto the others pays.
    x = torch.randn(8, 5, 3) @ torch.randn(3, 8) + 0.05 * torch.randn(8, 5, 8)
    memory = torch.randn(8, 7, 3) @ torch.randn(3, 8) + 0.05 * torch.randn(8, 7, 8)
    weight = model.attn.in_proj_weight.detach().clone()
    inputs = [t.reshape(-1, 8) for t in (x, memory, memory * 3.0)]
    errors = {}
    for criterion in ("l1", "sparsegpt"):
        pruned = copy.deepcopy(model)
        prune_(
            pruned, PruningConfig(amount=0.5, criterion=criterion, modules="attn"), calibration=[(x, memory)]
        )
        new = pruned.attn.in_proj_weight.detach()
        assert int((new == 0).sum()) == 96
        # The output error of the query, key and value projections, each on the inputs it multiplies.
        errors[criterion] = sum(
            float((rows @ (weight - new)[8 * g : 8 * (g + 1)].T).norm()) for g, rows in enumerate(inputs)
        )
    assert errors["sparsegpt"] < 0.7 * errors["l1"], errors


def test_separate_qkv_weights_are_pruned_by_magnitude_and_refused_by_calibrated_criteria():
    model = CrossAttention(kdim=12)
    plan = prune_(model, PruningConfig(mode="2:4"), finalize=False)
    for name in ("attn.q_proj_weight", "attn.k_proj_weight", "attn.v_proj_weight"):
        assert _is_two_four(dict(model.named_parameters())[name]), name
    assert len(plan.masks) == 5  # q, k, v, out_proj, head
    with pytest.raises(ValueError, match=r"\['attn'\] have separate q/k/v projections.*`exclude=\['attn'\]`"):
        PruningPlan(CrossAttention(kdim=12), PruningConfig(amount=0.5, criterion="wanda"))


def test_nonzero_macs_count_the_input_projection():
    model = _gpt()
    example = torch.zeros(1, 16, dtype=torch.long)
    plan = PruningPlan(model, PruningConfig(amount=0.5), example_input=example)
    # 16 tokens times (3·32·32) for the input projection, times 32·32 for the output projection.
    assert plan.layer_macs[IN_PROJ[0]] == 16 * 3 * 32 * 32
    assert plan.layer_macs["blocks.0.attn.out_proj.weight"] == 16 * 32 * 32
    plan.compute_masks(0.5)
    plan.apply()
    stats = plan.statistics()
    pruned = sum(macs * 0.5 for macs in plan.layer_macs.values())
    assert stats["nonzero_macs"] == pytest.approx(plan.dense_macs - pruned, rel=1e-3)


# -- GradualPruning ------------------------------------------------------------------------------------------


class TinyLM(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = TinyGPT(block_size=16, d_model=32, n_heads=2, n_layers=2)

    def forward(self, idx):
        return self.model(idx)

    def training_step(self, batch, batch_idx):
        idx, targets = batch
        logits = self(idx)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3, weight_decay=0.1)

    def train_dataloader(self):
        tokens = torch.randint(0, 256, (40, 17), generator=torch.Generator().manual_seed(0))
        dataset = torch.utils.data.TensorDataset(tokens[:, :-1], tokens[:, 1:])
        return torch.utils.data.DataLoader(dataset, batch_size=8)


def _fit(tmp_path, criterion, mode, ckpt_path=None, checkpoint=None):
    pl.seed_everything(5, verbose=False)
    amount = 0.7 if mode == "unstructured" else None
    pruning = GradualPruning(
        amount, mode, criterion, start=0.0, end=0.7, frequency=2, calibration_batches=2, finalize=False
    )
    model = TinyLM()
    callbacks = [pruning] + ([checkpoint, StopAfterFirstEpoch()] if checkpoint else [])
    kwargs = trainer_kwargs(tmp_path, max_epochs=2, enable_checkpointing=checkpoint is not None)
    pl.Trainer(**kwargs, callbacks=callbacks).fit(model, ckpt_path=ckpt_path)
    return model.model, pruning


@pytest.mark.parametrize(("criterion", "mode"), [("sparsegpt", "unstructured"), ("wanda", "2:4")])
def test_gradual_pruning_keeps_the_input_projection_exact_through_training(tmp_path, criterion, mode):
    model, pruning = _fit(tmp_path, criterion, mode)
    params = dict(model.named_parameters())
    for name in IN_PROJ:
        key = f"model.{name}"
        weight = params[name].detach()
        assert torch.equal(weight != 0, pruning.masks[key]), name
        if mode == "unstructured":
            assert int((weight == 0).sum()) == round(0.7 * weight.numel()), name
        else:
            assert _is_two_four(weight), name


def test_a_run_pruning_the_input_projection_resumes_bit_exactly(tmp_path):
    full, _ = _fit(tmp_path / "full", "wanda", "unstructured")
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    _fit(tmp_path / "first", "wanda", "unstructured", checkpoint=checkpoint)
    resumed, pruning = _fit(
        tmp_path / "second", "wanda", "unstructured", ckpt_path=tmp_path / "ckpt" / "epoch=0-step=5.ckpt"
    )
    assert float((full.blocks[0].attn.in_proj_weight == 0).float().mean()) > 0
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert pruning.current_amount == pytest.approx(0.7)
