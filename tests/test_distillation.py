import copy
import csv
import inspect
import math
import os

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from examples.models import ImageClassifier
from lightning_compress._lightning import remember_original
from lightning_compress.distillation import (
    DistillationCapture,
    DistillationConfig,
    FeatureAdapter,
    FeatureLoss,
    KnowledgeDistillation,
    attention_map,
    attention_transfer_loss,
    distill,
    embedding_loss,
    hint_loss,
    hinton_loss,
    make_adapter,
    mix_losses,
    top1_agreement,
)
from lightning_compress.distillation.callback import ADAPTERS_ATTRIBUTE
from tests._ddp import run_worker
from tests.conftest import RecordSteps, SGDClassifier, fit_or_resume, trainer_kwargs

# -- functional core ------------------------------------------------------------------------------


def test_hinton_loss_matches_the_hand_computed_kl_and_scales_by_t_squared():
    s = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]])
    t = torch.tensor([[0.0, 0.0], [math.log(4.0), 0.0]])
    # Row 1: p_t = (1/2, 1/2), p_s = (3/4, 1/4): KL = ½ ln(2/3) + ½ ln 2 = ½ ln(4/3).
    # Row 2: p_t = (4/5, 1/5), p_s = (1/2, 1/2): KL = 4/5 ln(8/5) + 1/5 ln(2/5).
    row1 = 0.5 * math.log(4 / 3)
    row2 = 0.8 * math.log(1.6) + 0.2 * math.log(0.4)
    assert float(hinton_loss(s, t, temperature=1.0)) == pytest.approx((row1 + row2) / 2, rel=1e-6)
    # At T = 3 the logits are divided by 3 and the divergence multiplied by 9.
    p_t = F.softmax(t.double() / 3, dim=1)
    p_s = F.softmax(s.double() / 3, dim=1)
    expected = 9 * float((p_t * (p_t.log() - p_s.log())).sum(1).mean())
    assert float(hinton_loss(s, t, temperature=3.0)) == pytest.approx(expected, rel=1e-5)


def test_hinton_loss_defaults_to_the_callbacks_temperature_of_one():
    s, t = torch.tensor([[math.log(3.0), 0.0]]), torch.zeros(1, 2)
    assert KnowledgeDistillation("self").temperature == 1.0
    assert (
        float(hinton_loss(s, t))
        == float(hinton_loss(s, t, temperature=1.0))
        == pytest.approx(0.5 * math.log(4 / 3))
    )


def test_hinton_gradient_is_t_times_the_softened_probability_difference():
    s = torch.tensor([[1.0, -2.0, 0.5], [0.3, 0.2, 0.1]], requires_grad=True)
    t = torch.tensor([[0.0, 1.0, 2.0], [2.0, 0.0, -1.0]])
    temperature = 5.0
    hinton_loss(s, t, temperature).backward()
    expected = temperature * (F.softmax(s.detach() / temperature, 1) - F.softmax(t / temperature, 1)) / 2
    torch.testing.assert_close(s.grad, expected)


def test_hinton_loss_on_sequences_averages_over_positions_and_rejects_other_classes():
    s, t = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    flat = hinton_loss(s.reshape(6, 5), t.reshape(6, 5), 2.0)
    assert float(hinton_loss(s, t, 2.0)) == pytest.approx(float(flat))
    with pytest.raises(ValueError, match=r"\(2, 3, 5\) and teacher logits \(2, 3, 4\)"):
        hinton_loss(s, torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="`temperature=-1.0` must be a finite number > 0"):
        hinton_loss(s, t, -1.0)


def test_mix_losses_weights_task_and_distillation_by_alpha():
    task, distill = torch.tensor(3.0), torch.tensor(7.0)
    assert [float(mix_losses(task, distill, a)) for a in (0.0, 0.5, 1.0)] == [3.0, 5.0, 7.0]
    with pytest.raises(ValueError, match="`alpha=-0.1` must be in \\[0, 1\\]"):
        mix_losses(task, distill, -0.1)


def test_adapter_is_a_1x1_convolution_or_a_linear_map_but_no_conv_or_linear_module():
    adapter = FeatureAdapter((2, 3, 5, 5), (2, 4, 5, 5))
    conv = nn.Conv2d(3, 4, 1)
    conv.weight.data.copy_(adapter.weight.data[:, :, None, None])
    conv.bias.data.copy_(adapter.bias.data)
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(adapter(x), conv(x))
    assert not isinstance(adapter, nn.Conv2d | nn.Linear)
    assert not any(isinstance(m, nn.Conv2d | nn.Linear) for m in adapter.modules())
    pooled = FeatureAdapter((2, 3, 8, 8), (2, 4, 4, 4))
    torch.testing.assert_close(pooled(x.repeat(1, 1, 2, 2)[:, :, :8, :8]).shape, torch.Size([2, 4, 4, 4]))
    tokens = FeatureAdapter((2, 7, 6), (2, 7, 9))
    y = torch.randn(2, 7, 6)
    torch.testing.assert_close(tokens(y), y @ tokens.weight.T + tokens.bias)
    with pytest.raises(ValueError, match="same rank"):
        FeatureAdapter((2, 3, 5, 5), (2, 10))
    with pytest.raises(ValueError, match="other than the feature dimension"):
        FeatureAdapter((2, 7, 6), (2, 8, 9))
    # Deterministic and independent of the global random stream.
    state = torch.get_rng_state()
    a = make_adapter((1, 3), (1, 4), generator=torch.Generator().manual_seed(0))
    b = make_adapter((1, 3), (1, 4), generator=torch.Generator().manual_seed(0))
    assert torch.equal(a.weight, b.weight) and torch.equal(torch.get_rng_state(), state)


def test_hint_loss_is_the_mean_squared_error_through_the_adapter():
    student = torch.tensor([[1.0, 2.0]])
    assert float(hint_loss(student, torch.tensor([[0.0, 5.0]]))) == pytest.approx(5.0)
    adapter = FeatureAdapter((1, 2), (1, 3))
    with torch.no_grad():
        adapter.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        adapter.bias.zero_()
    # adapter(student) = (1, 2, 3); differences to (1, 2, 6) are (0, 0, -3): 9 / 3.
    loss = hint_loss(student, torch.tensor([[1.0, 2.0, 6.0]]), adapter)
    assert float(loss.detach()) == pytest.approx(3.0)
    loss.backward()
    assert adapter.weight.grad is not None and float(adapter.weight.grad.abs().sum()) > 0
    with pytest.raises(ValueError, match="pass an adapter"):
        hint_loss(student, torch.zeros(1, 3))


def test_attention_transfer_matches_the_reference_formula():
    torch.manual_seed(0)
    s, t = torch.randn(3, 4, 5, 5), torch.randn(3, 8, 5, 5)

    def at(x):  # Zagoruyko & Komodakis' reference code
        return F.normalize(x.pow(2).mean(1).view(x.size(0), -1))

    assert float(attention_transfer_loss(s, t)) == pytest.approx(
        float((at(s) - at(t)).pow(2).mean()), rel=1e-6
    )
    q = attention_map(torch.ones(1, 2, 2, 2))
    torch.testing.assert_close(q, torch.full((1, 4), 0.5))
    # The larger map is pooled to the smaller one: a map equal to the upsampled teacher costs nothing.
    small = torch.rand(2, 3, 4, 4)
    big = small.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    assert float(attention_transfer_loss(big, small)) == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="feature maps"):
        attention_transfer_loss(torch.randn(2, 5), torch.randn(2, 5))


def test_embedding_losses_cosine_and_mse():
    s = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    t = torch.tensor([[3.0, 0.0], [2.0, 0.0], [-1.0, -1.0]])
    assert float(embedding_loss(s, t, "cosine")) == pytest.approx((0.0 + 1.0 + 2.0) / 3)
    assert float(embedding_loss(s, t, "mse")) == pytest.approx((4 + 0 + 4 + 4 + 4 + 4) / 6)
    adapter = make_adapter((3, 2), (3, 5))
    assert embedding_loss(s, torch.randn(3, 5), "cosine", adapter).shape == ()
    with pytest.raises(ValueError, match="Unknown `metric='l1'`"):
        embedding_loss(s, t, "l1")


def test_top1_agreement_counts_equal_argmax():
    s = torch.tensor([[0.0, 1.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 3.0, 0.0]])
    t = torch.tensor([[0.0, 5.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 9.0], [1.0, 0.0, 0.0]])
    assert float(top1_agreement(s, t)) == 0.5


# -- the capture module: distillation on a plain nn.Module, without a Trainer -----------------------


def _linear(weight, bias):
    layer = nn.Linear(2, 3)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight))
        layer.bias.copy_(torch.tensor(bias))
    return layer


def test_capture_loss_on_a_plain_module_is_the_hand_computed_mix():
    student = _linear([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]], [0.0, 0.0, 0.0])
    teacher = _linear([[2.0, 0.0], [0.0, 0.0], [0.0, 0.0]], [0.0, 0.0, 0.0])
    x, y = torch.tensor([[math.log(2.0), 0.0]]), torch.tensor([1])
    capture = distill(student, teacher, DistillationConfig(alpha=0.25, temperature=2.0))
    logits = student(x)  # (ln 2, 0, 0): p_s at T=2 = (√2, 1, 1) / (√2 + 2)
    student(x + 1.0)  # a second call in the same step is not the one distilled
    loss = capture.loss(F.cross_entropy(logits, y))
    # teacher logits (2 ln 2, 0, 0): p_t at T=2 = (2, 1, 1) / 4
    p_t = torch.tensor([0.5, 0.25, 0.25])
    p_s = torch.tensor([math.sqrt(2.0), 1.0, 1.0]) / (math.sqrt(2.0) + 2.0)
    kl = float((p_t * (p_t / p_s).log()).sum()) * 4.0
    task = -math.log(1.0 / (2.0 + 2.0))  # softmax(ln 2, 0, 0)[1] = 1/4
    assert float(loss.detach()) == pytest.approx(0.75 * task + 0.25 * kl, rel=1e-6)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    loss.backward()
    assert student.weight.grad is not None and teacher.weight.grad is None
    with pytest.raises(RuntimeError, match="No call of the student's forward was recorded in this step"):
        capture.loss(F.cross_entropy(logits, y))  # the recording was consumed
    capture.remove()
    student(x)
    with pytest.raises(RuntimeError, match="No call of the student's forward"):
        capture.loss(F.cross_entropy(logits, y))  # no hooks any more


def test_capture_adapters_train_in_a_plain_loop_and_the_hint_term_falls():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    teacher = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
    config = DistillationConfig(alpha=1.0, logits=False, features=[FeatureLoss("0", loss="hint")])
    with pytest.raises(ValueError, match="pass `example_input`"):
        distill(student, teacher, config)
    with distill(student, teacher, config, example_input=torch.zeros(1, 4)) as capture:
        assert isinstance(capture, DistillationCapture)
        assert (capture.adapters["0"].in_features, capture.adapters["0"].out_features) == (8, 16)
        optimizer = torch.optim.SGD([*student.parameters(), *capture.adapters.parameters()], lr=0.2)
        x = torch.randn(64, 4)
        hints = []
        for _ in range(30):
            student(x)
            distilled = capture.distill()
            hints.append(float(distilled.terms["hint/0"].detach()))
            optimizer.zero_grad()
            distilled.loss.backward()
            optimizer.step()
    assert set(distilled.terms) == {"hint/0"} and distilled.logits is None
    assert hints[-1] < 0.5 * hints[0]
    student(x)
    assert not capture.captured  # the context manager removed the hooks


# -- the callback -----------------------------------------------------------------------------------


class Recorder(Callback):
    """Keeps, per optimizer step, the loss Lightning back-propagated and the metrics logged with it."""

    def __init__(self):
        self.rows = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("distillation/")}
        self.rows.append({"loss": float(outputs["loss"]), **metrics})


def _fit(tmp_path, digits, callbacks, model=None, **overrides):
    model = model if model is not None else ImageClassifier("small_cnn")
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, **overrides), callbacks=callbacks)
    trainer.fit(model, datamodule=digits)
    return model, trainer


def _narrow_teacher():
    return ImageClassifier("small_cnn", arch_kwargs={"width": 8})


def test_training_loss_is_the_alpha_mix_of_task_and_distillation_terms(tmp_path, digits):
    teacher = _narrow_teacher()
    features = [FeatureLoss("net.3"), FeatureLoss("net.4", loss="attention", weight=50.0)]
    kd = KnowledgeDistillation(teacher, alpha=0.3, temperature=2.0, features=features)
    recorder = Recorder()
    _fit(tmp_path, digits, [kd, recorder], limit_train_batches=5)
    assert len(recorder.rows) == 5
    for row in recorder.rows:
        distill = (
            row["distillation/kl"]
            + row["distillation/hint/net.3"]
            + 50.0 * row["distillation/attention/net.4"]
        )
        assert row["distillation/loss"] == pytest.approx(distill, rel=1e-5)
        assert row["loss"] == pytest.approx(0.7 * row["distillation/task_loss"] + 0.3 * distill, rel=1e-5)
        assert 0.0 <= row["distillation/agreement"] <= 1.0
        assert row["distillation/temperature"] == 2.0


def test_alpha_zero_trains_exactly_like_plain_lightning(tmp_path, digits):
    pl.seed_everything(3, verbose=False)
    plain, _ = _fit(tmp_path / "a", digits, [], model=SGDClassifier("small_cnn"), limit_train_batches=6)
    pl.seed_everything(3, verbose=False)
    kd = KnowledgeDistillation("self", alpha=0.0)
    distilled, _ = _fit(tmp_path / "b", digits, [kd], model=SGDClassifier("small_cnn"), limit_train_batches=6)
    for (name, a), (_, b) in zip(plain.state_dict().items(), distilled.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


class Unlabelled(ImageClassifier):
    """Cross-entropy on the rows whose label is not -1; here every label is hidden."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        y = torch.full_like(y, -1)
        logits = self(x)
        labelled = y >= 0
        return F.cross_entropy(logits[labelled], y[labelled], reduction="sum") / labelled.sum().clamp_min(1)


def test_pure_distillation_copies_the_teacher_not_the_labels(tmp_path, digits):
    trained, _ = _fit(tmp_path / "t", digits, [], max_epochs=2)
    # A teacher that is confidently wrong: it predicts class k + 1 where the trained model predicts k.
    teacher = ImageClassifier("small_cnn")
    teacher.load_state_dict(trained.state_dict())
    with torch.no_grad():
        teacher.net[10].weight.copy_(trained.net[10].weight.roll(1, dims=0))
        teacher.net[10].bias.copy_(trained.net[10].bias.roll(1, dims=0))
    agreement = {}
    for alpha in (0.0, 1.0):
        pl.seed_everything(0, verbose=False)
        kd = KnowledgeDistillation(teacher, alpha=alpha, temperature=1.0)
        recorder = Recorder()
        _fit(tmp_path / str(alpha), digits, [kd, recorder], max_epochs=1)
        agreement[alpha] = sum(r["distillation/agreement"] for r in recorder.rows[-5:]) / 5
    assert agreement[1.0] > 0.7
    assert agreement[0.0] < 0.2
    # Images without labels (a transfer set): the task loss leaves them out, the distillation term still sees them.
    pl.seed_everything(0, verbose=False)
    kd = KnowledgeDistillation(teacher, alpha=0.5, temperature=1.0)
    recorder = Recorder()
    _fit(tmp_path / "unlabelled", digits, [kd, recorder], model=Unlabelled("small_cnn"), max_epochs=1)
    for row in recorder.rows:
        assert row["distillation/task_loss"] == 0.0
        assert row["loss"] == pytest.approx(0.5 * row["distillation/loss"], rel=1e-6)
    assert sum(r["distillation/agreement"] for r in recorder.rows[-5:]) / 5 > 0.7


def test_teacher_is_frozen_outside_the_module_optimizer_and_checkpoint(tmp_path, digits):
    kd = KnowledgeDistillation(_narrow_teacher(), features=[FeatureLoss("net.3")])
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1)
    model, trainer = _fit(tmp_path, digits, [kd, ckpt], limit_train_batches=4, enable_checkpointing=True)
    teacher = kd._teacher
    assert not teacher.training
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    optimized = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert not any(id(p) in optimized for p in teacher.parameters())
    assert all(id(p) in optimized for p in kd.adapters.parameters())
    state = torch.load(next(tmp_path.glob("*.ckpt")), weights_only=False)
    keys = set(state["state_dict"])
    assert keys == set(ImageClassifier("small_cnn").state_dict()) | {
        f"{ADAPTERS_ATTRIBUTE}.0.weight",
        f"{ADAPTERS_ATTRIBUTE}.0.bias",
    }
    kd_state = state["callbacks"][next(k for k in state["callbacks"] if "KnowledgeDistillation" in k)]
    assert set(kd_state) == {"teacher_fingerprint"}
    # After training: the adapters are gone, training_step is the class's again, the adapter trained.
    assert not hasattr(model, ADAPTERS_ATTRIBUTE) and "training_step" not in vars(model)
    assert set(model.state_dict()) == set(ImageClassifier("small_cnn").state_dict())
    initial = make_adapter((1, 32, 8, 8), (1, 16, 8, 8), generator=torch.Generator().manual_seed(0))
    assert float((kd.adapters["0"].weight - initial.weight).detach().abs().max()) > 1e-3


class ChangesTheModel(Callback):
    """A compression callback stand-in: takes the original first, then changes the weights at setup."""

    def setup(self, trainer, pl_module, stage):
        remember_original(trainer, pl_module)
        with torch.no_grad():
            pl_module.net[10].weight.zero_()


@pytest.mark.parametrize("kd_first", [True, False])
def test_self_teacher_is_the_model_before_any_callback_changed_it(tmp_path, digits, kd_first):
    model = ImageClassifier("small_cnn")
    before = model.net[10].weight.detach().clone()
    kd = KnowledgeDistillation("self")
    callbacks = [kd, ChangesTheModel()] if kd_first else [ChangesTheModel(), kd]
    _fit(tmp_path, digits, callbacks, model=model, max_steps=1)
    assert torch.equal(kd._teacher.net[10].weight, before)
    assert not torch.equal(model.net[10].weight, before)


def test_self_distillation_with_real_low_rank_and_structured_pruning(tmp_path, digits):
    from lightning_compress import GradualPruning
    from lightning_compress.low_rank import LowRankLinear, LowRankReplacement

    model = ImageClassifier("small_cnn")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kd = KnowledgeDistillation("self", features=[FeatureLoss("net.4")])
    lowrank = LowRankReplacement(rank=0.25, modules=nn.Linear, verbose=False)
    pruning = GradualPruning(amount=0.5, mode="structured", modules=nn.Conv2d, start=0.0, end=0.5)
    recorder = Recorder()
    _, trainer = _fit(tmp_path, digits, [kd, lowrank, pruning, recorder], model=model, max_epochs=2)
    # The teacher is the model as it was: dense layers, full channels, the weights before training.
    teacher = kd._teacher
    assert type(teacher.net[8]) is nn.Linear and teacher.net[3].out_channels == 32
    changed = [k for k, v in teacher.state_dict().items() if not torch.equal(v, before[k])]
    assert not changed, changed
    # The student was factorized and lost half of its channels for real, and trained on the mixed loss.
    assert isinstance(model.net[8], LowRankLinear) and model.net[3].out_channels == 16
    hints = [row["distillation/hint/net.4"] for row in recorder.rows]
    assert len(hints) == trainer.global_step and all(math.isfinite(h) for h in hints)
    # It learned (chance is 0.1), although its teacher here is the untrained model it started from.
    assert trainer.callback_metrics["val_acc"] > 0.3


def test_a_second_fit_of_the_same_trainer_distills_from_its_own_model(tmp_path, digits):
    kd = KnowledgeDistillation("self")
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=2), callbacks=[kd])
    trainer.fit(ImageClassifier("small_cnn"), datamodule=digits)
    second = ImageClassifier("small_cnn", arch_kwargs={"width": 8})
    before = {k: v.clone() for k, v in second.state_dict().items()}
    trainer.fit(second, datamodule=digits)  # sets up again (and stops at once: max_steps was reached)
    assert all(torch.equal(v, before[k]) for k, v in kd._teacher.state_dict().items())


def test_alpha_and_temperature_follow_the_schedule(tmp_path, digits):
    logger = CSVLogger(tmp_path, name="kd")
    kd = KnowledgeDistillation(
        "self",
        alpha=0.2,
        initial_alpha=1.0,
        temperature=2.0,
        initial_temperature=6.0,
        start=0.0,
        end="step:10",
    )
    _fit(tmp_path, digits, [kd], max_steps=14, logger=logger, log_every_n_steps=1)
    with open(f"{logger.log_dir}/metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("distillation/alpha")]
    alpha = {int(r["step"]): float(r["distillation/alpha"]) for r in rows}
    temperature = {int(r["step"]): float(r["distillation/temperature"]) for r in rows}
    assert (
        alpha[0] == pytest.approx(1.0) and alpha[5] == pytest.approx(0.6) and alpha[13] == pytest.approx(0.2)
    )
    assert temperature[0] == 6.0 and temperature[5] == pytest.approx(4.0) and temperature[10] == 2.0


def test_dict_output_and_checkpoint_teacher(tmp_path, digits):
    source = _narrow_teacher()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path / "t"), max_steps=1)
    trainer.fit(source, datamodule=digits)
    path = tmp_path / "teacher.ckpt"
    trainer.save_checkpoint(path)

    class DictStep(ImageClassifier):
        def training_step(self, batch, batch_idx):
            return {"loss": super().training_step(batch, batch_idx), "extra": torch.tensor(1.0)}

    kd = KnowledgeDistillation(str(path), teacher_class=ImageClassifier, alpha=1.0)
    recorder = Recorder()
    _fit(tmp_path, digits, [kd, recorder], model=DictStep("small_cnn"), limit_train_batches=3)
    assert kd._teacher.net[0].out_channels == 8
    torch.testing.assert_close(kd._teacher.net[0].weight, source.net[0].weight)
    assert recorder.rows[0]["loss"] == pytest.approx(recorder.rows[0]["distillation/loss"], rel=1e-5)


def test_teacher_precision_bf16_runs_the_teacher_in_bf16(tmp_path, digits):
    kd = KnowledgeDistillation("self", teacher_precision="bf16-true")
    recorder = Recorder()
    _fit(tmp_path, digits, [kd, recorder], limit_train_batches=3)
    assert {p.dtype for p in kd._teacher.parameters()} == {torch.bfloat16}
    assert math.isfinite(recorder.rows[-1]["distillation/kl"])


def test_a_bf16_true_fit_runs_its_teachers_and_the_report_at_its_precision(tmp_path, digits):
    from lightning_compress import CompressionMonitor, compression_stats

    # A "self" teacher (the shared copy the monitor reports as "before") and a given float32 teacher module.
    kd_self, kd_given = (
        KnowledgeDistillation("self", alpha=0.5),
        KnowledgeDistillation(_narrow_teacher(), alpha=0.5),
    )
    monitor = CompressionMonitor(latency_repeats=2, verbose=False)
    recorder = Recorder()
    _fit(tmp_path, digits, [kd_self, monitor, recorder], limit_train_batches=3, precision="bf16-true")
    _fit(tmp_path, digits, [kd_given], limit_train_batches=2, precision="bf16-true")
    for kd in (kd_self, kd_given):
        assert {p.dtype for p in kd._teacher.parameters()} == {torch.bfloat16}
    assert math.isfinite(recorder.rows[-1]["distillation/kl"])
    # Nothing was compressed: "before" is the model the fit trains without compression, in bf16 as well.
    report = monitor.report
    float32_bytes = compression_stats(ImageClassifier("small_cnn")).dense_bytes
    assert report["before"]["dense_bytes"] == report["after"]["dense_bytes"] < 0.6 * float32_bytes
    assert [row["batch_size"] for row in report["latency"]] == [1]


class ManualClassifier(ImageClassifier):
    def __init__(self, kd=None, **kwargs):
        super().__init__(**kwargs)
        self.automatic_optimization = False
        self.kd = kd

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        if self.kd is not None:
            loss = self.kd.combine(loss)
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        return loss


def test_manual_optimization_needs_combine_and_works_with_it(tmp_path, digits):
    kd = KnowledgeDistillation("self")
    with pytest.raises(RuntimeError, match=r"call `loss = kd.combine\(loss\)`"):
        _fit(tmp_path / "a", digits, [kd], model=ManualClassifier(), max_steps=2)
    kd = KnowledgeDistillation("self", alpha=0.5)
    recorder = Recorder()
    _fit(tmp_path / "b", digits, [kd, recorder], model=ManualClassifier(kd=kd), max_steps=3)
    row = recorder.rows[-1]
    assert row["loss"] == pytest.approx(0.5 * row["distillation/task_loss"] + 0.5 * row["distillation/loss"])
    # Under automatic optimization the callback adds the loss itself; adding it twice is refused.
    kd = KnowledgeDistillation("self")
    model = ManualClassifier(kd=kd)
    model.automatic_optimization = True
    model.training_step = lambda batch, batch_idx: kd.combine(F.cross_entropy(model(batch[0]), batch[1]))
    with pytest.raises(RuntimeError, match="remove the call"):
        _fit(tmp_path / "c", digits, [kd], model=model, max_steps=1)


def _plain_copies(teacher, student):
    return copy.deepcopy(teacher), copy.deepcopy(student)


def test_a_plain_loop_with_the_capture_gives_the_callbacks_loss_on_the_same_batch(tmp_path, digits):
    features = [FeatureLoss("net.3"), FeatureLoss("net.4", loss="attention", weight=50.0)]
    teacher, student = _narrow_teacher(), ImageClassifier("small_cnn")
    plain_teacher, plain_student = _plain_copies(teacher, student)
    kd = KnowledgeDistillation(teacher, alpha=0.3, temperature=2.0, features=features)
    recorder = Recorder()
    _fit(tmp_path, digits, [kd, recorder], model=student, limit_train_batches=1)

    config = DistillationConfig(alpha=0.3, temperature=2.0, features=features)
    capture = distill(plain_student, plain_teacher, config, example_input=plain_student.example_input_array)
    plain_student.train()
    x, y = next(iter(digits.train_dataloader()))
    loss = capture.loss(F.cross_entropy(plain_student(x), y))
    assert float(loss.detach()) == recorder.rows[0]["loss"]
    assert float(F.cross_entropy(plain_student(x), y)) == recorder.rows[0]["distillation/task_loss"]


class NoPatching(Callback):
    """Records, at every training batch, which methods the LightningModule instance holds of its own."""

    def __init__(self):
        self.patched = set()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.patched |= set(vars(pl_module)) & {"forward", "training_step", "__call__"}


@pytest.mark.parametrize("fp16", [False, True], ids=["fp32", "fp16-grad-scaler"])
def test_gradients_with_accumulation_equal_a_plain_loop_that_back_propagates_the_mixed_loss(
    tmp_path, digits, fp16
):
    """The callback changes Lightning's loss in place (divided for accumulation, scaled by the fp16 grad scaler);
    the parameters end exactly where back-propagating ``((1 - alpha) · task + alpha · distillation) / 2`` by hand
    takes them."""
    from lightning.pytorch.plugins import MixedPrecision

    features = [FeatureLoss("net.3"), FeatureLoss("net.4", loss="attention", weight=50.0)]
    teacher, student = _narrow_teacher(), SGDClassifier("small_cnn")
    plain_teacher, plain_student = _plain_copies(teacher, student)
    initial = student.net[3].weight.detach().clone()
    kd = KnowledgeDistillation(teacher, alpha=0.3, temperature=2.0, features=features, keep_adapters=True)
    no_patching = NoPatching()
    plugins = [MixedPrecision("16-mixed", "cpu")] if fp16 else None
    overrides = dict(limit_train_batches=6, accumulate_grad_batches=2, plugins=plugins)
    _fit(tmp_path, digits, [kd, no_patching], model=student, **overrides)
    assert no_patching.patched == set()

    config = DistillationConfig(alpha=0.3, temperature=2.0, features=features)
    capture = distill(plain_student, plain_teacher, config, example_input=plain_student.example_input_array)
    initial_adapter = capture.adapters["0"].weight.detach().clone()
    plain_student.distillation_adapters = capture.adapters
    optimizer = plain_student.configure_optimizers()
    scaler = torch.amp.GradScaler("cpu", enabled=fp16)
    plain_student.train()
    for i, (x, y) in zip(range(6), digits.train_dataloader(), strict=False):
        if i % 2 == 0:
            optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16, enabled=fp16):
            loss = capture.loss(F.cross_entropy(plain_student(x), y))
        scaler.scale(loss / 2).backward()
        if i % 2 == 1:
            scaler.step(optimizer)
            scaler.update()
    trained, by_hand = student.state_dict(), plain_student.state_dict()
    adapter = f"{ADAPTERS_ATTRIBUTE}.0.weight"
    assert list(trained) == list(by_hand) and adapter in trained
    for name, value in trained.items():
        assert torch.equal(value, by_hand[name]), name
    assert not torch.equal(trained["net.3.weight"], initial)
    assert not torch.equal(trained[adapter], initial_adapter)


def test_mixed_precision_mixes_the_loss_under_the_students_autocast(tmp_path, digits):
    features = [FeatureLoss("net.3"), FeatureLoss("net.4", loss="attention", weight=50.0)]
    kd = KnowledgeDistillation(_narrow_teacher(), alpha=0.3, temperature=2.0, features=features)
    recorder = Recorder()
    # The adapter's float32 weights meet the student's bfloat16 feature: only under the same autocast as the
    # student's forward can the distillation loss be computed at all.
    _fit(
        tmp_path,
        digits,
        [kd, recorder],
        limit_train_batches=4,
        precision="bf16-mixed",
        accumulate_grad_batches=2,
    )
    assert len(recorder.rows) == 4
    for row in recorder.rows:
        distill_loss = (
            row["distillation/kl"]
            + row["distillation/hint/net.3"]
            + 50.0 * row["distillation/attention/net.4"]
        )
        assert row["distillation/loss"] == pytest.approx(distill_loss, rel=1e-5)
        mixed = (0.7 * row["distillation/task_loss"] + 0.3 * row["distillation/loss"]) / 2
        assert row["loss"] == pytest.approx(mixed, rel=1e-5)


def test_adapters_under_ddp_looking_for_unused_parameters_fail_before_training(tmp_path, digits):
    environ = dict(os.environ)
    counter = RecordSteps()
    kd = KnowledgeDistillation(_narrow_teacher(), features=[FeatureLoss("net.3")])
    try:
        with pytest.raises(
            ValueError, match="DistributedDataParallel with `find_unused_parameters=True` does not"
        ):
            _fit(tmp_path, digits, [kd, counter], max_steps=2, strategy="ddp_find_unused_parameters_true")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        os.environ.clear()
        os.environ.update(environ)
    assert counter.steps == []


def _resume_run(tmp_path, digits, ckpt_path=None, checkpoint=None, teacher_seed=11, steps=None, **kd_kwargs):
    pl.seed_everything(teacher_seed, verbose=False)
    teacher = _narrow_teacher()
    pl.seed_everything(7, verbose=False)
    model = SGDClassifier("small_cnn")
    kd = KnowledgeDistillation(
        teacher,
        initial_alpha=0.9,
        alpha=0.3,
        features=[FeatureLoss("net.3"), FeatureLoss("net.4", loss="attention", weight=10.0)],
        keep_adapters=True,
        **kd_kwargs,
    )
    callbacks = [kd, steps or RecordSteps()]
    fit_or_resume(
        tmp_path, digits, model, callbacks, ckpt_path, checkpoint, max_epochs=3, limit_train_batches=6
    )
    return model, kd


def test_resume_from_a_mid_training_checkpoint_is_bit_exact(tmp_path, digits):
    full, _ = _resume_run(tmp_path / "full", digits)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    _resume_run(tmp_path / "first", digits, checkpoint=ckpt)
    path = tmp_path / "ckpt" / "epoch=0-step=6.ckpt"
    steps = RecordSteps()
    resumed, _ = _resume_run(tmp_path / "second", digits, ckpt_path=path, steps=steps)
    assert steps.steps == list(range(6, 18))  # continued from the checkpoint
    full_state, resumed_state = full.state_dict(), resumed.state_dict()
    assert f"{ADAPTERS_ATTRIBUTE}.0.weight" in full_state
    assert list(full_state) == list(resumed_state)
    for name, value in full_state.items():
        assert torch.equal(value, resumed_state[name]), name
    # A different teacher on resume is an error, unless the checkpoint carries the teacher.
    with pytest.raises(ValueError, match="teacher rebuilt for this resumed fit differs"):
        _resume_run(tmp_path / "third", digits, ckpt_path=path, teacher_seed=12)


def test_save_teacher_restores_the_teacher_from_the_checkpoint(tmp_path, digits):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    _, kd = _resume_run(tmp_path / "first", digits, checkpoint=ckpt, save_teacher=True)
    path = tmp_path / "ckpt" / "epoch=0-step=6.ckpt"
    _, resumed = _resume_run(tmp_path / "second", digits, ckpt_path=path, teacher_seed=12, save_teacher=True)
    for a, b in zip(kd._teacher.parameters(), resumed._teacher.parameters(), strict=True):
        assert torch.equal(a, b)


# Every constructor argument; docs/distillation.md ("What fails early") lists the same rows.
BAD_ARGUMENTS = [
    (
        {"teacher": "teacher.ckpt"},
        ValueError,
        "`teacher='teacher.ckpt'` is neither 'self' nor an existing",
    ),
    ({"teacher": 3}, TypeError, "`teacher` got int; pass 'self', an nn.Module, or a checkpoint path"),
    (
        {"teacher": __file__},
        ValueError,
        "is a checkpoint path: pass the LightningModule class .* `teacher_class`",
    ),
    (
        {"teacher": __file__, "teacher_class": nn.Linear},
        ValueError,
        "is a checkpoint path: pass the LightningModule class",
    ),
    (
        {"teacher": nn.Linear(2, 2), "teacher_class": ImageClassifier},
        ValueError,
        "`teacher_class` is only used to load a checkpoint path; `teacher` is a module",
    ),
    (
        {"teacher": "self", "teacher_class": ImageClassifier},
        ValueError,
        "`teacher_class` is only used to load a checkpoint path, not with teacher='self'",
    ),
    ({"teacher": "self", "alpha": 1.5}, ValueError, "`alpha=1.5` must be in \\[0, 1\\]"),
    ({"teacher": "self", "alpha": "0.5"}, TypeError, "`alpha='0.5'` must be a number in \\[0, 1\\]"),
    (
        {"teacher": "self", "temperature": 0.0},
        ValueError,
        "`temperature=0.0` must be a finite number > 0",
    ),
    ({"teacher": "self", "temperature": -2}, ValueError, "`temperature=-2` must be a finite number > 0"),
    ({"teacher": "self", "temperature": "4"}, TypeError, "`temperature='4'` must be a number > 0"),
    ({"teacher": "self", "logits": "yes"}, TypeError, "`logits='yes'` must be True or False"),
    (
        {"teacher": "self", "logits": False},
        ValueError,
        "Nothing to distill: `logits=False` and no `features`",
    ),
    ({"teacher": "self", "module": 3}, TypeError, "`module=3` must be a module name"),
    (
        {"teacher": "self", "teacher_module": 3},
        TypeError,
        "`teacher_module=3` must be a module name or None",
    ),
    ({"teacher": "self", "features": ["net.3"]}, TypeError, "`features` must hold FeatureLoss objects"),
    (
        {"teacher": "self", "features": FeatureLoss("net.3")},
        TypeError,
        "`features=FeatureLoss\\(.*\\)` must be a list of FeatureLoss objects",
    ),
    (
        {"teacher": "self", "features": [FeatureLoss("net.3"), FeatureLoss("net.3")]},
        ValueError,
        "`features` lists the same term twice",
    ),
    (
        {"teacher": "self", "initial_alpha": -0.1},
        ValueError,
        "`initial_alpha=-0.1` must be in \\[0, 1\\]",
    ),
    ({"teacher": "self", "initial_temperature": float("inf")}, ValueError, "`initial_temperature=inf`"),
    ({"teacher": "self", "schedule": "cubic"}, ValueError, "Unknown `schedule='cubic'`"),
    (
        {"teacher": "self", "schedule": lambda t: 2 * t},
        ValueError,
        "`schedule` callable returned 1.5 at t=0.75",
    ),
    ({"teacher": "self", "start": "batch:3"}, ValueError, "`start='batch:3'` is not understood"),
    ({"teacher": "self", "end": 1.5}, ValueError, "`end=1.5` is outside \\[0, 1\\]"),
    ({"teacher": "self", "start": 0.8, "end": 0.2}, ValueError, "`end=0.2` is before `start=0.8`"),
    ({"teacher": "self", "teacher_precision": "int8"}, ValueError, "Unknown `teacher_precision='int8'`"),
    ({"teacher": "self", "save_teacher": "no"}, TypeError, "`save_teacher='no'` must be True or False"),
    ({"teacher": "self", "keep_adapters": 1}, TypeError, "`keep_adapters=1` must be True or False"),
    (
        {"teacher": "self", "loss_mask": "attention_mask"},
        TypeError,
        "`loss_mask='attention_mask'` must be a function from the arguments of `module`'s call",
    ),
]


@pytest.mark.parametrize(("kwargs", "error", "match"), BAD_ARGUMENTS)
def test_bad_arguments_fail_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        KnowledgeDistillation(**kwargs)


def test_every_constructor_argument_has_a_row():
    covered = {name for kwargs, _, _ in BAD_ARGUMENTS for name in kwargs}
    covered.add("example_input")  # needs the model: checked at setup, tested below
    assert covered == set(inspect.signature(KnowledgeDistillation).parameters)


BAD_FEATURE_ARGUMENTS = [
    ({"student": 3}, TypeError, "`FeatureLoss.student=3` must be a module name \\(str\\)"),
    ({"student": "net.3", "teacher": 3}, TypeError, "`FeatureLoss.teacher=3` must be a module name"),
    ({"student": "net.3", "loss": "l1"}, ValueError, "Unknown `loss='l1'` for the feature 'net.3'"),
    (
        {"student": "net.3", "weight": -1.0},
        ValueError,
        "`FeatureLoss.weight=-1.0` must be a finite number >= 0",
    ),
    (
        {"student": "net.3", "weight": float("nan")},
        ValueError,
        "`FeatureLoss.weight=nan` must be a finite",
    ),
    (
        {"student": "net.3", "weight": True},
        ValueError,
        "`FeatureLoss.weight=True` must be a finite number",
    ),
]


@pytest.mark.parametrize(("kwargs", "error", "match"), BAD_FEATURE_ARGUMENTS)
def test_bad_feature_loss_arguments_fail_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        FeatureLoss(**kwargs)


def test_checkpoint_teacher_needs_its_class(tmp_path):
    path = tmp_path / "t.ckpt"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="pass the LightningModule class to load it with as `teacher_class`"):
        KnowledgeDistillation(path)


def _nan_teacher():
    teacher = ImageClassifier("small_cnn")
    with torch.no_grad():
        teacher.net[10].bias.fill_(float("nan"))
    return teacher


@pytest.mark.parametrize(
    ("make_kd", "match"),
    [
        (lambda: KnowledgeDistillation("self", features=[FeatureLoss("net.33")]), "Did you mean 'net.3'"),
        (
            lambda: KnowledgeDistillation("self", module="nett"),
            "`module='nett'`: no such submodule in the student .* Did you mean 'net'",
        ),
        (
            lambda: KnowledgeDistillation(
                _narrow_teacher(), features=[FeatureLoss("net.3", teacher="net.13")]
            ),
            "`features\\[0\\].teacher='net.13'`: no such submodule in the teacher ",
        ),
        (
            lambda: KnowledgeDistillation(ImageClassifier("small_cnn", num_classes=5)),
            r"Student logits have shape \(1, 10\) but the teacher's have \(1, 5\)",
        ),
        (lambda: KnowledgeDistillation(_nan_teacher()), "teacher's logits contain NaN or infinite values"),
        (
            lambda: KnowledgeDistillation(_narrow_teacher(), features=[FeatureLoss("net.3", loss="mse")]),
            "use loss='hint'",
        ),
        (
            lambda: KnowledgeDistillation(
                _narrow_teacher(), features=[FeatureLoss("net.9", loss="attention")]
            ),
            "Attention transfer needs feature maps",
        ),
    ],
)
def test_bad_setup_fails_before_any_training_step(tmp_path, digits, make_kd, match):
    counter = RecordSteps()
    with pytest.raises(ValueError, match=match):
        _fit(tmp_path, digits, [make_kd(), counter], max_steps=2)
    assert counter.steps == []


class SmallCNNOnly(ImageClassifier):
    """Builds the default small CNN whatever the checkpoint's hyperparameters say."""

    def __init__(self, num_classes=10):
        super().__init__("small_cnn", num_classes)


def _checkpoint(tmp_path, model):
    trainer = pl.Trainer(**trainer_kwargs(tmp_path))
    trainer.strategy.connect(model)
    path = tmp_path / "teacher.ckpt"
    trainer.save_checkpoint(path)
    return str(path)


@pytest.mark.parametrize(
    ("source", "match"),
    [
        (
            lambda: ImageClassifier("small_cnn", arch_kwargs={"width": 8}),
            "does not match `teacher_class=SmallCNNOnly`. Shapes differ: net.0.weight \\(8, 1, 3, 3\\) in the "
            "checkpoint vs \\(16, 1, 3, 3\\); net.0.bias \\(8,\\) in the checkpoint vs \\(16,\\);",
        ),
        (
            lambda: ImageClassifier("lenet_300_100"),
            "does not match `teacher_class=SmallCNNOnly`. SmallCNNOnly has keys the checkpoint lacks: net.0.weight, "
            "net.0.bias, .* The checkpoint has keys SmallCNNOnly lacks: net.5.weight, net.5.bias. Shapes differ: "
            "net.1.weight \\(300, 64\\) in the checkpoint vs \\(16,\\);",
        ),
    ],
)
def test_checkpoint_of_another_architecture_fails_at_setup_naming_keys_and_shapes(
    tmp_path, digits, source, match
):
    path = _checkpoint(tmp_path, source())
    counter = RecordSteps()
    kd = KnowledgeDistillation(path, teacher_class=SmallCNNOnly)
    with pytest.raises(
        ValueError, match=match + ".* Pass as `teacher_class` the LightningModule class that wrote"
    ):
        _fit(tmp_path, digits, [kd, counter], max_steps=2)
    assert counter.steps == []


def test_wrong_example_input_fails_at_setup_naming_it_and_its_shape(tmp_path, digits):
    counter = RecordSteps()
    kd = KnowledgeDistillation("self", example_input=torch.zeros(2, 1, 5, 5))
    with pytest.raises(
        ValueError,
        match="`example_input` of shape \\(2, 1, 5, 5\\) was rejected by the student \\(ImageClassifier\\)",
    ):
        _fit(tmp_path, digits, [kd, counter], max_steps=2)
    assert counter.steps == []


def test_teacher_that_cannot_take_the_students_input_fails_at_setup(tmp_path, digits):
    counter = RecordSteps()
    kd = KnowledgeDistillation(nn.Sequential(nn.Flatten(), nn.Linear(10, 10)))
    with pytest.raises(
        ValueError,
        match="The teacher \\(Sequential\\) cannot run its forward on the student's input \\(\\(1, 1, 8, 8\\),\\): "
        "RuntimeError: .* check `teacher`/`teacher_class`",
    ):
        _fit(tmp_path, digits, [kd, counter], max_steps=2)
    assert counter.steps == []


class NoExample(ImageClassifier):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.example_input_array = None


def test_without_an_example_input_the_checks_run_at_the_first_step(tmp_path, digits):
    with pytest.raises(ValueError, match="set `example_input_array`"):
        _fit(
            tmp_path,
            digits,
            [KnowledgeDistillation(_narrow_teacher(), features=[FeatureLoss("net.3")])],
            model=NoExample(),
            max_steps=2,
        )
    counter = RecordSteps()
    with pytest.raises(ValueError, match="teacher's logits contain NaN"):
        _fit(
            tmp_path,
            digits,
            [KnowledgeDistillation(_nan_teacher()), counter],
            model=NoExample(),
            max_steps=2,
        )
    assert len(counter.steps) == 1


def test_adapters_outside_every_optimizer_and_a_shared_teacher_are_errors(tmp_path, digits):
    class NetOnlyOptimizer(ImageClassifier):
        def configure_optimizers(self):
            return torch.optim.Adam(self.net.parameters())

    kd = KnowledgeDistillation(_narrow_teacher(), features=[FeatureLoss("net.3")])
    with pytest.raises(ValueError, match="adapters .* are in no optimizer"):
        _fit(tmp_path, digits, [kd], model=NetOnlyOptimizer(), max_steps=1)
    model = ImageClassifier("small_cnn")
    with pytest.raises(ValueError, match="shares parameters with the student"):
        _fit(tmp_path, digits, [KnowledgeDistillation(model.net)], model=model, max_steps=1)
    assert "training_step" not in vars(model)


def test_distills_through_a_compiled_network(tmp_path, digits):
    class Compiled(ImageClassifier):
        def configure_model(self):
            self.net = torch.compile(self.net)

    kd = KnowledgeDistillation("self", alpha=1.0, features=[FeatureLoss("net.4", loss="attention")])
    recorder = Recorder()
    _fit(tmp_path, digits, [kd, recorder], model=Compiled(), limit_train_batches=3)
    assert len(recorder.rows) == 3 and math.isfinite(recorder.rows[-1]["distillation/attention/net.4"])


def test_ddp_with_two_processes_trains_identically_on_both_ranks_and_logs(tmp_path):
    run_worker("_ddp_distillation.py", tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert ranks[0]["step"] == ranks[1]["step"] == 8
    for name, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][name]), name
    assert any(name.startswith(ADAPTERS_ATTRIBUTE) for name in ranks[0]["state"])
    assert ranks[0]["teacher_in_ddp"] is False
    with open(next(tmp_path.glob("logs/**/metrics.csv"))) as f:
        rows = [r for r in csv.DictReader(f) if r.get("distillation/kl")]
    assert len(rows) == 8
    assert all(math.isfinite(float(r["distillation/hint/net.3"])) for r in rows)


def test_configured_from_a_lightning_cli_yaml_file(tmp_path):
    from lightning.pytorch.cli import LightningCLI

    from examples.data import DigitsDataModule

    config = tmp_path / "config.yaml"
    config.write_text(
        f"""
trainer:
  max_epochs: 1
  limit_train_batches: 3
  limit_val_batches: 1
  accelerator: cpu
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  default_root_dir: {tmp_path}
  callbacks:
    - class_path: lightning_compress.distillation.KnowledgeDistillation
      init_args:
        teacher: self
        alpha: 0.7
        temperature: 3.0
        features:
          - student: net.3
            loss: attention
            weight: 100.0
model:
  arch: small_cnn
"""
    )
    cli = LightningCLI(
        ImageClassifier, DigitsDataModule, args=["fit", "--config", str(config)], save_config_callback=None
    )
    kd = next(cb for cb in cli.trainer.callbacks if isinstance(cb, KnowledgeDistillation))
    assert (kd.teacher, kd.alpha, kd.temperature) == ("self", 0.7, 3.0)
    assert kd.features == (FeatureLoss("net.3", loss="attention", weight=100.0),)
    assert "distillation/attention/net.3" in cli.trainer.callback_metrics


def test_defaults_are_t1_alpha_half_and_keep_the_task_gradient_at_least_as_large():
    kd = KnowledgeDistillation("self")
    assert (kd.temperature, kd.alpha) == (1.0, 0.5)
    # A student that already agrees with its teacher's top class but is less sure than the label: at T=1 the
    # soft-target gradient per logit, alpha * (p_s - p_t), is at most the task gradient, (1 - alpha) * (p_s - y).
    # At the old T=4 the T² factor makes it 2.9x the task gradient here.
    student = torch.tensor([[2.0, 0.0, 0.0]], requires_grad=True)
    teacher = torch.tensor([[5.0, 1.0, 0.0]])
    label = torch.tensor([0])

    def grad_norms(temperature, alpha):
        task = torch.autograd.grad((1 - alpha) * F.cross_entropy(student, label), student)[0].norm()
        soft = torch.autograd.grad(alpha * hinton_loss(student, teacher, temperature), student)[0].norm()
        return float(task), float(soft)

    task, soft = grad_norms(kd.temperature, kd.alpha)
    assert task == pytest.approx(0.1304, abs=1e-4) and soft == pytest.approx(0.1155, abs=1e-4)
    task4, soft4 = grad_norms(4.0, kd.alpha)
    assert soft4 / task4 == pytest.approx(2.915, abs=1e-3)
