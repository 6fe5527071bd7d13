import csv
import math
import warnings
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from examples.models import ImageClassifier
from lightning_compress import GradualPruning, _lightning
from lightning_compress.schedules import Schedule
from tests._ddp import run_worker
from tests.conftest import RecordSteps, SGDClassifier, TiedLM, fit_or_resume, trainer_kwargs


class ZerosAfterEveryStep(Callback):
    """Records, after every optimizer step, whether every masked weight is exactly zero."""

    def __init__(self, pruning):
        self.pruning = pruning
        self.violations = 0
        self.checked = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        params = dict(pl_module.named_parameters())
        for name, mask in self.pruning.masks.items():
            self.checked += 1
            self.violations += int((params[name].detach()[~mask] != 0).sum())


def _selected_sparsity(model, names):
    params = dict(model.named_parameters())
    zeros = sum(int((params[n] == 0).sum()) for n in names)
    return zeros / sum(params[n].numel() for n in names)


def test_unstructured_agp_reaches_target_and_zeros_stay_zero_under_momentum(tmp_path, digits):
    pruning = GradualPruning(amount=0.8, start=0.0, end=0.5, frequency=2)
    check = ZerosAfterEveryStep(pruning)
    model = SGDClassifier("small_cnn", weight_decay=1e-3)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=2), callbacks=[pruning, check])
    trainer.fit(model, datamodule=digits)
    names = ["net.0.weight", "net.3.weight", "net.8.weight", "net.10.weight"]
    assert check.checked > 0 and check.violations == 0
    for name in names:  # per-layer scope: every layer reaches 80% exactly (rounded count)
        p = dict(model.named_parameters())[name]
        assert int((p == 0).sum()) == round(0.8 * p.numel())
    assert _selected_sparsity(model, names) == pytest.approx(0.8, abs=1e-3)
    # No reparametrization is left behind: a plain module with plain parameters and unchanged keys.
    assert set(model.state_dict()) == set(ImageClassifier("small_cnn").state_dict())
    assert not any(hasattr(m, "weight_orig") or hasattr(m, "parametrizations") for m in model.modules())


class AdamWClassifier(ImageClassifier):
    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3, weight_decay=0.05, amsgrad=True)


def test_under_adamw_pruned_weights_stay_zero_and_their_second_moments_stay_normal(tmp_path, digits):
    pruning = GradualPruning(amount=0.8, start=0.0, end=0.3, frequency=2, finalize=False)
    check = ZerosAfterEveryStep(pruning)
    model = AdamWClassifier("small_cnn")
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=11), callbacks=[pruning, check])
    trainer.fit(model, datamodule=digits)
    assert trainer.global_step > 2 * 100 and check.checked > 0 and check.violations == 0
    params = dict(model.named_parameters())
    optimizer = trainer.optimizers[0]
    for name, mask in pruning.masks.items():
        state = optimizer.state[params[name]]
        assert torch.equal(state["exp_avg"][~mask], torch.zeros(int((~mask).sum())))
        # Parked at 1.0 and decayed by beta2 = 0.999 for under 100 steps since: normal floats, never 0 or
        # denormal (the CPU's sqrt is many times slower on those).
        for key in ("exp_avg_sq", "max_exp_avg_sq"):
            assert float(state[key][~mask].min()) >= 0.999**100, (name, key)
        assert (state["exp_avg_sq"][mask] > 0).float().mean() > 0.99  # kept entries: the real statistics


def test_global_scope_prunes_layers_unequally_but_hits_the_total(tmp_path, digits):
    pruning = GradualPruning(amount=0.7, scope="global", start=0.0, end=0.3, frequency=1)
    model = ImageClassifier("small_cnn")
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=1), callbacks=[pruning])
    trainer.fit(model, datamodule=digits)
    names = ["net.0.weight", "net.3.weight", "net.8.weight", "net.10.weight"]
    assert _selected_sparsity(model, names) == pytest.approx(0.7, abs=1e-4)
    per_layer = [float((dict(model.named_parameters())[n] == 0).float().mean()) for n in names]
    assert max(per_layer) - min(per_layer) > 0.05


def test_target_follows_the_schedule_and_reaches_the_logger(tmp_path, digits):
    logger = CSVLogger(tmp_path, name="prune")
    pruning = GradualPruning(amount=0.9, start="step:0", end="step:20", frequency=5)
    model = ImageClassifier("small_cnn")
    trainer = pl.Trainer(
        **trainer_kwargs(tmp_path, max_epochs=2, logger=logger, log_every_n_steps=1), callbacks=[pruning]
    )
    trainer.fit(model, datamodule=digits)
    with open(f"{logger.log_dir}/metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("pruning/target_weight_sparsity")]
    by_step = {int(r["step"]): float(r["pruning/target_weight_sparsity"]) for r in rows}
    schedule = Schedule(0.0, 0.9, start=0, end=20, frequency=5)
    # Lightning logs a step's metrics under the step index before the optimizer step increments it.
    for step, value in by_step.items():
        assert value == pytest.approx(schedule.value(step), abs=1e-6)  # logged as float32
    assert by_step[4] == pytest.approx(0.0) and by_step[5] == pytest.approx(0.52, abs=5e-4)
    assert by_step[max(by_step)] == pytest.approx(0.9)
    actual = {int(r["step"]): float(r["pruning/weight_sparsity"]) for r in rows}
    assert actual[10] == pytest.approx(schedule.value(10), abs=1e-3)
    # Remaining parameters and the MACs that multiply a nonzero weight, at the last update (90% of the weights
    # of the four layers zero); 337,536 dense MACs for one 8x8 image.
    last = rows[-1]
    params = dict(model.named_parameters())
    assert float(last["pruning/remaining_params"]) == sum(int((p != 0).sum()) for p in params.values())
    layer_macs = {"net.0.weight": 9216, "net.3.weight": 294912, "net.8.weight": 32768, "net.10.weight": 640}
    expected = 337536 - sum(m * float((params[n] == 0).float().mean()) for n, m in layer_macs.items())
    assert float(last["pruning/nonzero_macs"]) == pytest.approx(expected, rel=1e-6)
    assert float(last["pruning/nonzero_macs"]) == pytest.approx(0.1 * 337536, rel=0.01)


def test_end_at_the_last_step_still_reaches_the_amount(tmp_path, digits):
    # `end=1.0` resolves past the last optimizer step; the last update is moved onto it.
    pruning = GradualPruning(amount=0.8, start=0.0, end=1.0, schedule="linear", frequency=7)
    model = ImageClassifier("small_cnn")
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=1), callbacks=[pruning])
    trainer.fit(model, datamodule=digits)
    for layer in (model.net[0], model.net[3], model.net[8], model.net[10]):
        assert int((layer.weight == 0).sum()) == round(0.8 * layer.weight.numel())


def test_an_end_past_the_fit_warns_that_the_ramp_is_steeper(tmp_path, digits):
    steps = 6  # `end="step:6"` is the end of this fit: no warning; a later step is
    for end, warns in (("step:6", False), ("step:100", True), ("epoch:1", False), ("epoch:3", True)):
        pruning = GradualPruning(amount=0.5, start=0.0, end=end, modules=nn.Linear)
        trainer = pl.Trainer(
            **trainer_kwargs(tmp_path, max_steps=steps, limit_train_batches=steps), callbacks=[pruning]
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = ImageClassifier("small_cnn")
            trainer.fit(model, datamodule=digits)
        steeper = [w for w in caught if "past the end of this fit (step 5 is its last)" in str(w.message)]
        assert len(steeper) == warns, end
        for layer in (model.net[8], model.net[10]):  # the amount is reached all the same
            assert int((layer.weight == 0).sum()) == round(0.5 * layer.weight.numel())


def test_nm_two_four_keeps_two_of_every_four(tmp_path, digits):
    pruning = GradualPruning(mode="2:4", start=0.0, modules=nn.Linear)
    model = ImageClassifier("small_cnn")
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=1), callbacks=[pruning])
    trainer.fit(model, datamodule=digits)
    for layer in (model.net[8], model.net[10]):
        groups = layer.weight.detach().reshape(layer.out_features, -1, 4)
        assert ((groups != 0).sum(-1) == 2).all()  # exactly N kept: trained weights are never exactly zero
    assert pruning.amount == 0.5


def _resume_run(tmp_path, digits, epochs, ckpt_path=None, checkpoint=None, steps=None, **kwargs):
    pl.seed_everything(7, verbose=False)
    kwargs = kwargs or {"amount": 0.85, "criterion": "random"}
    pruning = GradualPruning(start=0.1, end=0.8, frequency=3, **kwargs)
    model = SGDClassifier("small_cnn", weight_decay=1e-3)
    callbacks = [pruning, steps or RecordSteps()]
    fit_or_resume(tmp_path, digits, model, callbacks, ckpt_path, checkpoint, max_epochs=epochs)
    return model, pruning


def test_resume_from_a_mid_pruning_checkpoint_is_bit_exact(tmp_path, digits):
    full, _ = _resume_run(tmp_path / "full", digits, epochs=3)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    _resume_run(tmp_path / "first", digits, epochs=3, checkpoint=ckpt)
    path = tmp_path / "ckpt" / "epoch=0-step=20.ckpt"
    # The first run went on to materialize; the checkpoint from mid-pruning is what a killed run leaves.
    steps = RecordSteps()
    resumed, pruning = _resume_run(tmp_path / "second", digits, epochs=3, ckpt_path=path, steps=steps)
    assert steps.steps[0] == 20 and len(steps.steps) == 40  # continued from step 20
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert pruning.current_amount == pytest.approx(0.85)


def test_structured_taylor_resume_takes_the_same_decisions(tmp_path, digits):
    kwargs = {"amount": 0.5, "mode": "structured", "criterion": "taylor"}
    full, full_pruning = _resume_run(tmp_path / "full", digits, epochs=3, **kwargs)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    _resume_run(tmp_path / "first", digits, epochs=3, checkpoint=ckpt, **kwargs)
    path = tmp_path / "ckpt" / "epoch=0-step=20.ckpt"
    saved = torch.load(path, weights_only=False)["callbacks"]
    state = next(v for k, v in saved.items() if "GradualPruning" in k)
    assert state["plan"] and state["taylor"]  # mid-pruning, with gradient sums since the last decision
    resumed, pruning = _resume_run(tmp_path / "second", digits, epochs=3, ckpt_path=path, **kwargs)
    assert pruning.plan == full_pruning.plan and sum(map(len, pruning.plan.values())) == 8 + 16 + 32
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_mid_pruning_checkpoint_loads_into_the_plain_module(tmp_path, digits):
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1)
    pruning = GradualPruning(amount=0.5, start=0.0, end=0.9)
    trainer = pl.Trainer(
        **trainer_kwargs(tmp_path, max_epochs=2, enable_checkpointing=True), callbacks=[pruning, ckpt]
    )
    trainer.fit(ImageClassifier("small_cnn"), datamodule=digits)
    plain = ImageClassifier.load_from_checkpoint(tmp_path / "epoch=0-step=20.ckpt")
    state = torch.load(tmp_path / "epoch=0-step=20.ckpt", weights_only=False)
    saved = state["callbacks"][next(k for k in state["callbacks"] if "GradualPruning" in k)]
    assert 0.0 < saved["current_amount"] < 0.5
    sparsity = float((plain.net[8].weight == 0).float().mean())
    assert sparsity == pytest.approx(saved["current_amount"], abs=1e-3)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"amount": 1.0}, ValueError, "`amount=1.0` must be in \\[0, 1\\)"),
        ({"amount": 0.5, "mode": "3:2"}, ValueError, "1 <= N <= M"),
        ({"amount": 0.5, "mode": "blocks"}, ValueError, "Unknown `mode='blocks'`"),
        ({"amount": 0.5, "start": 0.8, "end": 0.2}, ValueError, "before `start=0.8`"),
        ({"amount": 0.5, "criterion": "taylor"}, ValueError, "Unknown `criterion='taylor'`"),
        ({"amount": 0.5, "modules": [3]}, TypeError, "`modules` got 3"),
        ({"amount": 0.5, "frequency": 0}, ValueError, "`frequency=0`"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        GradualPruning(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "2:3", "modules": nn.Linear}, "does not divide|divisible|divide"),
        ({}, "`amount` is required"),
        ({"amount": 0.5, "modules": "decoder.*"}, "`modules`: no name 'decoder.\\*'"),
        ({"amount": 0.5, "start": "epoch:3", "end": "epoch:4"}, "step 60, but this fit has 20 steps"),
        (
            {"amount": 0.5, "mode": "structured", "criterion": "taylor", "start": 0.0},
            "none before the first optimizer",
        ),
    ],
)
def test_bad_setup_fails_before_any_training_step(tmp_path, digits, kwargs, match):
    counter = RecordSteps()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path), callbacks=[GradualPruning(**kwargs), counter])
    with pytest.raises(ValueError, match=match):
        trainer.fit(ImageClassifier("small_cnn"), datamodule=digits)
    assert counter.steps == []


class RecordValAccuracy(Callback):
    """The last validation accuracy seen while training (the masked model)."""

    value = None

    def on_validation_epoch_end(self, trainer, pl_module):
        self.value = float(trainer.callback_metrics["val_acc"])


@pytest.mark.parametrize("criterion", ["l1", "taylor"])
def test_structured_removes_channels_and_the_pruned_model_matches_the_masked_one(tmp_path, digits, criterion):
    from lightning_compress.stats import count_macs, count_parameters

    pruning = GradualPruning(amount=0.5, mode="structured", criterion=criterion, start=0.1, end=0.6)
    record = RecordValAccuracy()
    model = ImageClassifier("small_cnn")
    dense_params = count_parameters(model)
    dense_macs = count_macs(model, model.example_input_array)
    model.net[4].eval()  # a frozen batch norm
    modes = [m.training for m in model.modules()]
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=2), callbacks=[pruning, record])
    trainer.fit(model, datamodule=digits)
    assert [m.training for m in model.modules()] == modes  # a second fit trains as the first did
    # Conv 16 -> 8 and 32 -> 16 channels, the hidden Linear 64 -> 32 features; the classifier keeps its 10 outputs.
    assert [model.net[0].out_channels, model.net[3].out_channels] == [8, 16]
    assert (model.net[8].in_features, model.net[8].out_features, model.net[10].out_features) == (256, 32, 10)
    assert count_parameters(model) < 0.3 * dense_params
    assert count_macs(model, model.example_input_array) < 0.3 * dense_macs
    assert pruning.materialize_max_abs_diff is not None and pruning.materialize_max_abs_diff < 1e-5
    # What was validated (masked) is what ships (pruned): same accuracy on the validation set.
    shipped = pl.Trainer(**trainer_kwargs(tmp_path)).validate(model, datamodule=digits, verbose=False)[0]
    assert shipped["val_acc"] == pytest.approx(record.value, abs=1e-6)


def test_structured_masks_zero_whole_groups_during_training(tmp_path, digits):
    class Inspect(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            removed = pruning.plan["net.0"]
            self.conv_out = pl_module.net[0].weight[removed].abs().sum().item()
            self.bn_weight = pl_module.net[1].weight[removed].abs().sum().item()
            self.bn_bias = pl_module.net[1].bias[removed].abs().sum().item()
            self.consumer_in = pl_module.net[3].weight[:, removed].abs().sum().item()
            self.n_removed = len(removed)

    pruning = GradualPruning(amount=0.5, mode="structured", start=0.0, end=0.5, finalize=False)
    inspect, check = Inspect(), ZerosAfterEveryStep(pruning)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path), callbacks=[pruning, inspect, check])
    trainer.fit(SGDClassifier("small_cnn", weight_decay=1e-3), datamodule=digits)  # momentum and weight decay
    assert check.checked > 0 and check.violations == 0
    assert inspect.n_removed == 8
    assert inspect.conv_out == inspect.bn_weight == inspect.bn_bias == inspect.consumer_in == 0.0


def test_ddp_two_processes_take_identical_decisions(tmp_path):
    run_worker("_ddp_pruning.py", tmp_path)
    for mode in ("structured", "unstructured"):
        rank0 = torch.load(tmp_path / f"{mode}_rank0.pt")
        rank1 = torch.load(tmp_path / f"{mode}_rank1.pt")
        assert rank0["world_size"] == 2
        assert rank0["masks"].keys() == rank1["masks"].keys() and rank0["masks"]
        for name in rank0["masks"]:
            assert torch.equal(rank0["masks"][name], rank1["masks"][name]), name
        assert rank0["plan"] == rank1["plan"]
        for name in rank0["weights"]:
            assert torch.equal(rank0["weights"][name], rank1["weights"][name]), name
    assert sum(len(v) for v in torch.load(tmp_path / "structured_rank0.pt")["plan"].values()) > 0
    masks = torch.load(tmp_path / "unstructured_rank0.pt")["masks"]
    pruned = sum(int((~m).sum()) for m in masks.values())
    assert pruned == round(0.8 * sum(m.numel() for m in masks.values()))


def test_structured_checkpoints_load_without_the_callback(tmp_path, digits):
    from lightning_compress.pruning.gradual import load_pruned_checkpoint

    ckpt = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1)
    pruning = GradualPruning(amount=0.5, mode="structured", start=0.0, end=0.4)
    model = ImageClassifier("small_cnn")
    trainer = pl.Trainer(
        **trainer_kwargs(tmp_path, max_epochs=2, enable_checkpointing=True), callbacks=[pruning, ckpt]
    )
    trainer.fit(model, datamodule=digits)
    trainer.save_checkpoint(tmp_path / "final.ckpt")
    x = digits.val_set.tensors[0][:16]
    model.eval()
    expected = model(x)

    # Written after the channels were removed.
    restored = load_pruned_checkpoint(ImageClassifier("small_cnn"), tmp_path / "final.ckpt").eval()
    assert restored.net[0].out_channels == 8
    assert torch.equal(restored(x), expected)
    # Written during training (full shapes, masked): the plan is replayed on the trained weights.
    mid = load_pruned_checkpoint(ImageClassifier("small_cnn"), tmp_path / "epoch=1-step=40.ckpt").eval()
    assert mid.net[3].out_channels == 16
    assert torch.allclose(mid(x), expected, atol=1e-5)


def test_structured_metrics_reach_the_logger(tmp_path, digits):
    from lightning_compress.stats import count_macs

    logger = CSVLogger(tmp_path, name="structured")
    pruning = GradualPruning(amount=0.5, mode="structured", start=0.0, end=0.4)
    model = ImageClassifier("small_cnn")
    trainer = pl.Trainer(
        **trainer_kwargs(tmp_path, max_epochs=2, logger=logger, log_every_n_steps=5), callbacks=[pruning]
    )
    trainer.fit(model, datamodule=digits)
    with open(f"{logger.log_dir}/metrics.csv") as f:
        rows = list(csv.DictReader(f))
    macs = [float(r["pruning/macs_after_removal"]) for r in rows if r.get("pruning/macs_after_removal")]
    assert macs[-1] == count_macs(model, model.example_input_array)  # the logged cost is the shipped cost
    channels = [float(r["pruning/removed_channels"]) for r in rows if r.get("pruning/removed_channels")]
    assert channels == sorted(channels) and channels[-1] == 8 + 16 + 32


class TinyTransformer(ImageClassifier):
    """Digits as 8 tokens of 8 pixels through one transformer encoder layer."""

    def __init__(self):
        super().__init__("small_cnn")
        self.net = nn.Sequential()
        self.embed = nn.Linear(8, 32)
        self.encoder = nn.TransformerEncoderLayer(
            d_model=32, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True
        )
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        tokens = self.embed(x.reshape(len(x), 8, 8))
        return self.head(self.encoder(tokens).mean(1))


def test_structured_removes_attention_heads_and_feed_forward_neurons(tmp_path, digits):
    from lightning_compress.pruning.heads import PrunedMultiheadAttention
    from lightning_compress.stats import count_parameters

    pruning = GradualPruning(
        amount=0.5, mode="structured", start=0.0, end=0.5, modules=["encoder.self_attn", "encoder.linear1"]
    )
    model = TinyTransformer()
    dense_params = count_parameters(model)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=2), callbacks=[pruning])
    trainer.fit(model, datamodule=digits)
    attention = model.encoder.self_attn
    assert isinstance(attention, PrunedMultiheadAttention) and attention.num_heads == 2
    assert model.encoder.linear1.out_features == 32 and model.encoder.linear2.in_features == 32
    # 2 heads of 8: q, k, v rows (3 * 16 * 32 + 3 * 16 biases) and out_proj columns (32 * 16); 32 FFN neurons.
    removed_heads = 3 * 16 * 32 + 3 * 16 + 32 * 16
    removed_ffn = 32 * 32 + 32 + 32 * 32
    assert dense_params - count_parameters(model) == removed_heads + removed_ffn
    assert pruning.materialize_max_abs_diff < 1e-5


def test_heads_do_not_hide_a_model_that_cannot_be_traced(tmp_path, digits):
    counter = RecordSteps()
    model = TinyTransformer()
    model.example_input_array = torch.zeros(1, 5)  # cannot be reshaped into 8 tokens: tracing fails
    pruning = GradualPruning(
        amount=0.5, mode="structured", start=0.0, end=0.5, modules=["encoder.self_attn", "encoder.linear1"]
    )
    trainer = pl.Trainer(**trainer_kwargs(tmp_path), callbacks=[pruning, counter])
    with pytest.raises(ValueError, match="could not trace TinyTransformer"):
        trainer.fit(model, datamodule=digits)
    assert counter.steps == []


def test_layernorm_groups_are_warned_about_at_setup(tmp_path, digits):
    class FailOnFirstStep(Callback):
        def on_train_batch_start(self, *args):
            raise RuntimeError("stop")

    model = ImageClassifier("small_cnn")
    model.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, 10))
    pruning = GradualPruning(amount=0.5, mode="structured", start=0.0, end=0.5)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path), callbacks=[pruning, FailOnFirstStep()])
    with pytest.warns(UserWarning, match="'net.1'.*LayerNorm"), pytest.raises(RuntimeError, match="stop"):
        trainer.fit(model, datamodule=digits)


def test_a_run_resumed_after_the_ramp_still_logs_its_sparsity(tmp_path, digits):
    def run(ckpt_path=None, logger=False, callbacks=()):
        pruning = GradualPruning(amount=0.6, start=0.0, end=0.25)  # the ramp ends at step 10 of 40
        kwargs = trainer_kwargs(
            tmp_path, max_epochs=2, logger=logger, log_every_n_steps=1, enable_checkpointing=bool(callbacks)
        )
        trainer = pl.Trainer(**kwargs, callbacks=[pruning, *callbacks])
        trainer.fit(ImageClassifier("small_cnn"), datamodule=digits, ckpt_path=ckpt_path)

    run(callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)])
    logger = CSVLogger(tmp_path, name="resumed")
    run(ckpt_path=tmp_path / "ckpt" / "epoch=0-step=20.ckpt", logger=logger)
    with open(f"{logger.log_dir}/metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("pruning/weight_sparsity")]
    assert len(rows) == 20 and min(int(r["step"]) for r in rows) == 20
    assert all(float(r["pruning/weight_sparsity"]) == pytest.approx(0.6, abs=1e-3) for r in rows)


def test_taylor_scores_are_averaged_over_processes_before_the_decision(tmp_path, digits, monkeypatch):
    calls = []

    class Strategy:
        def reduce(self, tensor, reduce_op):
            calls.append(reduce_op)
            return tensor * 2  # what another rank's scores would add

    reduced = _lightning.mean_over_processes(SimpleNamespace(strategy=Strategy()), {"w": torch.ones(3)})
    assert calls == ["mean"] and torch.equal(reduced["w"], torch.full((3,), 2.0))
    # The decision takes the averaged scores.
    averaged = []
    monkeypatch.setattr(
        _lightning, "mean_over_processes", lambda trainer, scores: averaged.append(sorted(scores)) or scores
    )
    pruning = GradualPruning(amount=0.5, mode="structured", criterion="taylor", start="step:1", end="step:2")
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=3), callbacks=[pruning])
    trainer.fit(ImageClassifier("small_cnn"), datamodule=digits)
    assert len(averaged) == 2 and "net.0.weight" in averaged[0]


def test_structured_leaves_excluded_layers_whole(tmp_path, digits):
    pruning = GradualPruning(amount=0.5, mode="structured", start=0.0, end=0.5, exclude="net.3")
    model = ImageClassifier("small_cnn")
    trainer = pl.Trainer(**trainer_kwargs(tmp_path), callbacks=[pruning])
    trainer.fit(model, datamodule=digits)
    assert model.net[0].out_channels == 8 and model.net[8].out_features == 32  # pruned
    assert model.net[3].out_channels == 32 and model.net[3].in_channels == 8  # its own channels kept


def test_taylor_with_manual_optimization_fails_at_setup(tmp_path, digits):
    class Manual(ImageClassifier):
        def __init__(self):
            super().__init__("small_cnn")
            self.automatic_optimization = False

    counter = RecordSteps()
    pruning = GradualPruning(amount=0.5, mode="structured", criterion="taylor", start="step:1")
    trainer = pl.Trainer(**trainer_kwargs(tmp_path), callbacks=[pruning, counter])
    with pytest.raises(ValueError, match="needs automatic optimization"):
        trainer.fit(Manual(), datamodule=digits)
    assert counter.steps == []


def test_a_structured_callback_reused_for_a_second_fit_shrinks_the_second_model(tmp_path, digits):
    pruning = GradualPruning(amount=0.5, mode="structured", start=0.0, end=0.5)
    shapes = []
    for run in ("first", "second"):
        model = ImageClassifier("small_cnn")
        trainer = pl.Trainer(**trainer_kwargs(tmp_path / run, limit_train_batches=6), callbacks=[pruning])
        trainer.fit(model, datamodule=digits)
        shapes.append((model.net[0].out_channels, model.net[3].out_channels, model.net[8].out_features))
        assert pruning.materialized and sum(map(len, pruning.plan.values())) == 8 + 16 + 32
    assert shapes == [(8, 16, 32), (8, 16, 32)]


@pytest.mark.parametrize(
    ("kwargs", "modules"),
    [
        ({"amount": 0.75}, (nn.Linear,)),
        ({"amount": 0.75}, (nn.Embedding, nn.Linear)),
        ({"mode": "2:4"}, (nn.Embedding, nn.Linear)),
    ],
)
def test_tied_weights_are_pruned_once_with_one_mask(tmp_path, kwargs, modules):
    pruning = GradualPruning(start=0.0, end=0.5, modules=list(modules), **kwargs)
    check = ZerosAfterEveryStep(pruning)
    model = TiedLM(momentum=0.9)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=2), callbacks=[pruning, check])
    trainer.fit(model)
    assert model.dec.weight is model.emb.weight
    # One mask for the shared tensor, under the name `named_parameters()` gives it.
    assert sorted(pruning._plan.params) == ["emb.weight", "mid.weight"]
    assert check.checked > 0 and check.violations == 0
    assert int((model.emb.weight == 0).sum()) == 32 * 16 * (0.5 if "mode" in kwargs else 0.75)


class SmallHead(ImageClassifier):
    """The classifier starts with weights 1000x smaller than the rest: a global ranking prunes it first."""

    def __init__(self):
        super().__init__("small_cnn")
        with torch.no_grad():
            self.net[10].weight.mul_(1e-3)


def test_global_pruning_warns_when_a_layer_loses_every_weight(tmp_path, digits):
    pruning = GradualPruning(amount=0.9, scope="global", schedule="one_shot", start=0.0, end=0.0)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, limit_train_batches=3), callbacks=[pruning])
    with pytest.warns(
        UserWarning, match=r"pruned every weight of \['net.10.weight'\] at amount 0.9 .*`max_layer_amount`"
    ):
        trainer.fit(SmallHead(), datamodule=digits)


def test_max_layer_amount_keeps_part_of_every_layer_and_the_total(tmp_path, digits):
    pruning = GradualPruning(
        amount=0.9, scope="global", schedule="one_shot", start=0.0, end=0.0, max_layer_amount=0.95
    )
    model = SmallHead()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, limit_train_batches=3), callbacks=[pruning])
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*pruned every weight.*")
        trainer.fit(model, datamodule=digits)
    names = ["net.0.weight", "net.3.weight", "net.8.weight", "net.10.weight"]
    params = dict(model.named_parameters())
    assert int((params["net.10.weight"] == 0).sum()) == math.floor(0.95 * 640)  # at its limit, not all 640
    assert max(float((params[n] == 0).float().mean()) for n in names) <= 0.95
    total = sum(params[n].numel() for n in names)
    assert sum(int((params[n] == 0).sum()) for n in names) == round(0.9 * total)


class SaveAt(Callback):
    def __init__(self, step, path):
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


def test_a_pruned_checkpoint_names_the_loader_to_use(tmp_path, digits):
    from lightning_compress.pruning.gradual import PRUNED_CHECKPOINT_KEY, load_pruned_checkpoint

    pruning = GradualPruning(amount=0.5, mode="structured", start=0.0, end=0.5)
    model = ImageClassifier("small_cnn")
    mid = SaveAt(4, tmp_path / "mid.ckpt")  # written while the channels are masked
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, limit_train_batches=6), callbacks=[pruning, mid])
    trainer.fit(model, datamodule=digits)
    trainer.save_checkpoint(tmp_path / "final.ckpt")
    assert PRUNED_CHECKPOINT_KEY in torch.load(tmp_path / "final.ckpt", weights_only=False)["state_dict"]
    # The mid-fit checkpoint (`ckpt_path="best"` of a ModelCheckpoint, say) into the model whose channels are gone:
    with pytest.raises(
        RuntimeError, match=r"written while the pruned channels were still masked.*load_pruned"
    ):
        trainer.test(model, datamodule=digits, ckpt_path=tmp_path / "mid.ckpt", verbose=False)
    assert (
        load_pruned_checkpoint(ImageClassifier("small_cnn"), tmp_path / "mid.ckpt").net[0].out_channels == 8
    )
    # Lightning's loader into the unpruned class: the error says which helper to use.
    with pytest.raises(
        RuntimeError, match=r"Unexpected key\(s\) in state_dict: .*load_pruned_checkpoint\(YourModule"
    ):
        ImageClassifier.load_from_checkpoint(tmp_path / "final.ckpt")
    # The helper and our own loading (Trainer.test with the callback) drop the key.
    restored = load_pruned_checkpoint(ImageClassifier("small_cnn"), tmp_path / "final.ckpt")
    assert restored.net[0].out_channels == 8 and PRUNED_CHECKPOINT_KEY not in restored.state_dict()
    (result,) = trainer.test(model, datamodule=digits, ckpt_path=tmp_path / "final.ckpt", verbose=False)
    assert 0.0 <= result["test_acc"] <= 1.0
    assert not model._load_state_dict_pre_hooks  # removed at teardown: a pickled model needs no hook of ours
    # Resuming a fit from it into an unpruned model: the strict loading error says how to rebuild the model.
    again = pl.Trainer(
        **trainer_kwargs(tmp_path, max_epochs=2), callbacks=[GradualPruning(amount=0.5, mode="structured")]
    )
    with pytest.raises(
        RuntimeError, match=r"channels were removed by structured pruning.*load_pruned_checkpoint"
    ):
        again.fit(ImageClassifier("small_cnn"), datamodule=digits, ckpt_path=tmp_path / "final.ckpt")


def test_deprecated_materialize_and_log_per_layer_still_work_and_warn(tmp_path, digits):
    with pytest.warns(
        DeprecationWarning, match=r"`GradualPruning\(materialize=...\)` is deprecated: use `finalize"
    ):
        pruning = GradualPruning(amount=0.5, mode="structured", start=0.0, end=0.5, materialize=False)
    with pytest.warns(DeprecationWarning, match=r"`GradualPruning\(log_per_layer=...\)` is deprecated"):
        assert GradualPruning(amount=0.5, log_per_layer=True).per_layer is True
    model = ImageClassifier("small_cnn")
    pl.Trainer(**trainer_kwargs(tmp_path), callbacks=[pruning]).fit(model, datamodule=digits)
    # `materialize=False` is `finalize=False`: the channels are masked, not removed, and the masks are kept.
    assert model.net[0].out_channels == 16 and not pruning.materialized
    assert len(pruning.plan["net.0"]) == 8 and float((model.net[0].weight == 0).float().mean()) == 0.5
    assert pruning.masks and pruning.finalize_at_end is False


def test_gradual_pruning_alone_keeps_no_copy_of_the_model(tmp_path, digits):
    from lightning_compress._lightning import _ORIGINALS

    class CountCopies(Callback):
        def __init__(self):
            self.copies = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.copies.append(trainer in _ORIGINALS)

    check = CountCopies()
    pruning = GradualPruning(amount=0.5, mode="structured", start=0.0, end=0.5)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, limit_train_batches=4), callbacks=[pruning, check])
    trainer.fit(ImageClassifier("small_cnn"), datamodule=digits)
    assert check.copies == [False] * 4
    assert not pruning.needs_original and pruning.changes_structure and pruning.selects_layers
    assert not GradualPruning(amount=0.5).changes_structure


class TwoOptimizers(pl.LightningModule):
    """Manual optimization stepping two optimizers per batch (as a GAN does): ``global_step`` advances by two."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.body, self.head = nn.Linear(64, 32), nn.Linear(32, 10)

    def forward(self, x):
        return self.head(torch.relu(self.body(x.flatten(1))))

    def training_step(self, batch, batch_idx):
        x, y = batch
        for optimizer in self.optimizers():
            optimizer.zero_grad()
            self.manual_backward(nn.functional.cross_entropy(self(x), y))
            optimizer.step()

    def configure_optimizers(self):
        return torch.optim.SGD(self.body.parameters(), lr=0.05), torch.optim.SGD(
            self.head.parameters(), lr=0.05
        )


@pytest.mark.parametrize("max_steps", [-1, 12])
def test_two_optimizers_stepped_per_batch_warn_that_fractions_come_early(tmp_path, digits, max_steps):
    # 6 batches step 12 times: a fit counted in batches (no max_steps) resolves end=1.0 to step 6, half way.
    pruning = GradualPruning(amount=0.5, start=0.0, end=1.0, frequency=1)
    overrides = dict(limit_train_batches=6, max_steps=max_steps, max_epochs=1 if max_steps == -1 else -1)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, **overrides), callbacks=[pruning])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(TwoOptimizers(), datamodule=digits)
    early = [str(w.message) for w in caught if "advanced 2 steps in one training batch" in str(w.message)]
    assert trainer.global_step == 12 and pruning.current_amount == pytest.approx(0.5, abs=0.01)
    if max_steps == -1:
        assert len(early) == 1 and "take effect 2x too early" in early[0] and "max_steps" in early[0]
        assert pruning._schedule.end == 5  # the ramp ended at step 5 of 12
    else:  # max_steps counts global steps, as the schedules do: the ramp ends on the last step
        assert early == [] and pruning._schedule.end == 11
