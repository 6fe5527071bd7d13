"""The shared lifecycle of `CompressionCallback`: ordering by declaration, the original copy on demand, finalize
once, hooks removed, logging under the prefix, the example input."""

import types

import lightning.pytorch as pl
import pytest
import torch
from conftest import NetClassifier, trainer_kwargs
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress import (
    GradualPruning,
    KnowledgeDistillation,
    LowRankReplacement,
    QuantizationAwareTraining,
    _checks,
    _lightning,
)
from lightning_compress.callback import (
    QUANTIZE,
    REPLACE_LAYERS,
    CompressionCallback,
    compression_callbacks,
    training_loader,
)


class Tiny(NetClassifier):
    def __init__(self):
        super().__init__(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))


def loader(n=32, batch_size=8, shuffle=False):
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(n, 4, generator=g), torch.randint(0, 2, (n,), generator=g))
    return DataLoader(data, batch_size=batch_size, shuffle=shuffle)


class Recorder(CompressionCallback):
    """Records the order of its setup and finalize calls in a shared list."""

    def __init__(self, name, order, journal, needs_original=False):
        self.name, self.journal = name, journal
        self.effect_order = order  # an instance value shadows the declaration: per-test orders
        self.needs_original = needs_original

    def prepare(self, trainer, pl_module):
        self.journal.append(("prepare", self.name, _lightning._ORIGINALS.get(trainer) is not None))

    def finalize(self, trainer, pl_module):
        self.journal.append(("finalize", self.name))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.journal.append(("batch", self.name, trainer.global_step))


def fit(tmp_path, model, callbacks, **overrides):
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=callbacks, **overrides))
    trainer.fit(model, loader())
    return trainer


def test_callbacks_set_up_and_finalize_in_effect_order_whatever_the_list_order(tmp_path):
    journal = []
    late = Recorder("quantize", QUANTIZE, journal)
    early = Recorder("replace", REPLACE_LAYERS, journal)
    other = Callback()
    trainer = fit(tmp_path, Tiny(), [late, other, early], max_steps=2)
    batches = [("batch", name, step) for step in (1, 2) for name in ("replace", "quantize")]
    assert journal == [
        ("prepare", "replace", False),
        ("prepare", "quantize", False),
        *batches,
        ("finalize", "replace"),
        ("finalize", "quantize"),
    ]
    assert compression_callbacks(trainer) == [early, late]
    # The order comes from the declarations: the user's list is left as it was.
    assert [c for c in trainer.callbacks if c in (late, other, early)] == [late, other, early]


def test_a_hook_called_outside_a_trainer_run_is_a_plain_call():
    journal = []
    late, early = Recorder("quantize", QUANTIZE, journal), Recorder("replace", REPLACE_LAYERS, journal)
    elsewhere = types.SimpleNamespace(global_step=3, callbacks=[pl.Callback()])
    late.on_train_batch_end(elsewhere, None, None, None, 0)  # not attached to that trainer: only itself
    assert journal == [("batch", "quantize", 3)]
    attached = types.SimpleNamespace(global_step=4, callbacks=[late, early])
    late.on_train_batch_end(attached, None, None, None, 0)  # the first in the list runs both, in effect order
    early.on_train_batch_end(attached, None, None, None, 0)  # already ran
    assert journal[1:] == [("batch", "replace", 4), ("batch", "quantize", 4)]


class Backward(CompressionCallback):
    effect_order = QUANTIZE

    def __init__(self):
        self.calls = 0

    def on_before_backward(self, trainer, pl_module, loss):
        self.calls += 1


def test_a_hook_only_a_later_callback_defines_still_runs(tmp_path):
    # The first compression callback in the list defines no `on_before_backward`: it runs the later one's.
    journal = []
    backward = Backward()
    fit(tmp_path, Tiny(), [Recorder("replace", REPLACE_LAYERS, journal), backward], max_steps=3)
    assert backward.calls == 3


def test_the_original_copy_is_taken_only_when_a_callback_needs_it(tmp_path):
    journal = []
    fit(tmp_path, Tiny(), [Recorder("a", REPLACE_LAYERS, journal)])
    assert journal[0] == ("prepare", "a", False)  # no copy of the model: no callback reads it

    journal.clear()
    model = Tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reader = Recorder("b", QUANTIZE, journal, needs_original=True)

    class Check(Callback):
        def on_train_end(self, trainer, pl_module):
            original = CompressionCallback.original(trainer, pl_module)
            self.equal = all(torch.equal(original.state_dict()[k], v) for k, v in before.items())
            self.frozen = not any(p.requires_grad for p in original.parameters())

    check = Check()
    trainer = fit(tmp_path, model, [Recorder("a", REPLACE_LAYERS, journal), reader, check])
    assert journal[0] == ("prepare", "a", True)  # the first one to set up took it, for the one that needs it
    assert check.equal and check.frozen  # the copy is the model before training, never trained
    assert trainer not in _lightning._ORIGINALS  # released at teardown


def test_finalize_runs_once_and_also_for_a_fit_resumed_at_its_last_step(tmp_path):
    journal = []
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
    fit(tmp_path, Tiny(), [Recorder("a", REPLACE_LAYERS, journal), ckpt], enable_checkpointing=True)
    assert journal.count(("finalize", "a")) == 1

    journal.clear()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[Recorder("a", REPLACE_LAYERS, journal)]))
    trainer.fit(Tiny(), loader(), ckpt_path=str(tmp_path / "last.ckpt"))
    assert trainer.global_step == 4  # nothing trained: the checkpoint was written at the last step
    assert journal.count(("finalize", "a")) == 1


class Hooked(CompressionCallback):
    prefix = "hooked/"

    def prepare(self, trainer, pl_module):
        self.calls = 0
        self.track_hook(pl_module.net[0].register_forward_hook(lambda *_: None))

    def on_fit_start(self, trainer, pl_module):
        self.on_optimizer_step(trainer, self._count, params=pl_module.net[0].parameters())
        self.on_optimizer_step(trainer, self._count, params=[nn.Parameter(torch.ones(1))])  # in no optimizer

    def _count(self):
        self.calls += 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.log_values(pl_module, {"calls": self.calls}, per_layer={"seen": {"net.0": 1.0}})


def test_hooks_are_removed_and_values_logged_under_the_prefix(tmp_path):
    model = Tiny()
    hooked = Hooked()
    trainer = fit(tmp_path, model, [hooked])
    assert hooked.calls == 4  # one optimizer, 4 steps: the hook on an unrelated parameter was never added
    assert not model.net[0]._forward_hooks
    assert not trainer.optimizers[0]._optimizer_step_post_hooks
    assert trainer.callback_metrics["hooked/calls"].item() == 4.0
    assert "hooked/per_layer/seen/net.0" in trainer.callback_metrics


def test_example_input_order_and_the_random_state_is_left_alone(tmp_path):
    model = Tiny()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path))
    trainer.fit_loop._data_source.instance = loader(shuffle=True)  # what `fit` sets before `setup`
    given = torch.ones(5, 4)
    assert torch.equal(CompressionCallback.example_input(trainer, model, given, max_batch=2), given[:2])
    model.example_input_array = torch.zeros(3, 4)
    assert torch.equal(CompressionCallback.example_input(trainer, model), torch.zeros(1, 4))
    model.example_input_array = None
    state = torch.get_rng_state()
    example = CompressionCallback.example_input(trainer, model, max_batch=None)
    assert example.shape == (8, 4)  # the first training batch's input
    assert torch.equal(torch.get_rng_state(), state)  # the shuffle's draw did not move the global generator
    assert training_loader(trainer) is trainer.fit_loop._data_source.instance
    assert CompressionCallback.example_input(None, model) is None


def test_state_key_is_the_class_name_or_the_declared_fields():
    assert Hooked().state_key == "Hooked"

    class Keyed(CompressionCallback):
        def state_key_fields(self):
            return {"amount": 0.5}

    assert Keyed().state_key.endswith("Keyed{'amount': 0.5}")


@pytest.mark.parametrize("stage", ["validate"])
def test_evaluation_outside_a_fit_calls_prepare_evaluation(tmp_path, stage):
    seen = []

    class Eval(CompressionCallback):
        def prepare(self, trainer, pl_module):
            seen.append("fit")

        def prepare_evaluation(self, trainer, pl_module, stage):
            seen.append(stage)

    class WithVal(Tiny):
        def validation_step(self, batch, batch_idx):
            return None

    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[Eval()]))
    trainer.validate(WithVal(), loader(), verbose=False)
    assert seen == [stage]


class RecordBatches(Callback):
    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append(batch[0][:, 0].tolist())


@pytest.mark.parametrize(
    "make",
    [
        lambda: GradualPruning(
            mode="2:4",
            criterion="wanda",
            modules=nn.Linear,
            start=0.0,
            end=0.5,
            frequency=2,
            calibration_batches=2,
        ),
        lambda: QuantizationAwareTraining(scheme="intx-weight-only", group_size=4),
        lambda: LowRankReplacement(rank=2, method="whitened", calibration_batches=2),
    ],
    ids=["wanda", "qat_first_batch_example", "low_rank_whitened"],
)
def test_drawing_calibration_or_example_batches_leaves_a_seeded_loader_order_as_it_was(tmp_path, make):
    # A loader with its own generator: drawing batches from it (each `iter` draws from the generator) must not
    # change the order the training sees.
    orders = []
    for callbacks in ([], [make()]):
        record = RecordBatches()
        torch.manual_seed(0)
        data = loader(shuffle=True)
        data = DataLoader(
            data.dataset, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(3)
        )
        trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=2), callbacks=[*callbacks, record])
        trainer.fit(Tiny(), data)
        orders.append(record.seen)
    assert len(orders[0]) == 8
    assert orders[1] == orders[0]


@pytest.mark.parametrize(
    ("make", "refused"),
    [
        (lambda: QuantizationAwareTraining(), True),
        (lambda: LowRankReplacement(rank=0.5), True),
        (lambda: GradualPruning(amount=0.5, mode="structured"), True),
        (lambda: GradualPruning(amount=0.5), False),  # weight values only: they are copied back
        (lambda: KnowledgeDistillation(teacher="self"), False),
    ],
)
def test_a_callback_that_changes_the_structure_refuses_a_spawning_strategy(tmp_path, make, refused):
    # Lightning copies only the trained weights back into the launching process's model (no process is started
    # here: `setup` is called as the spawned process would).
    callback = make()
    spawned = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False, default_root_dir=tmp_path
    )
    if refused:
        with pytest.raises(ValueError, match=r"multiprocessing \(start method 'spawn'.*Use `strategy='ddp'`"):
            callback.setup(spawned, pl.LightningModule(), "fit")  # before anything is prepared
    else:
        _checks.check_not_spawned(callback, spawned)
    launched = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", logger=False, default_root_dir=tmp_path
    )
    _checks.check_not_spawned(callback, launched)  # each process runs the script: nothing to copy back
