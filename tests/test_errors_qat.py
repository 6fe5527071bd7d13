"""QuantizationAwareTraining: bad input fails before training, resuming and loading checkpoints, memory."""

import copy
import inspect
import json
import os
import subprocess
import sys
from collections import OrderedDict

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from examples.models import ImageClassifier
from lightning_compress.quantization import load_qat_checkpoint
from lightning_compress.quantization.pt2e import QuantizedGraphModule
from lightning_compress.quantization.qat import (
    CHECKPOINT_HINT,
    QuantizationAwareTraining,
    check_low_bit_supported,
)
from tests.conftest import MaskedEncoder, RecordSteps, dict_batches, fit_or_resume, trainer_kwargs

# -- every constructor argument: (arguments, exception, message fragment) ----------------------------------

AT_CONSTRUCTION = [
    ({"scheme": "int3"}, ValueError, r"Unknown `scheme='int3'`"),
    ({"module": ""}, ValueError, r"`module=''` must be a submodule name"),
    ({"module": 3}, ValueError, r"`module=3` must be a submodule name"),
    ({"start": 1.5}, ValueError, r"`start=1.5` is outside"),
    ({"start": "batch:3"}, ValueError, r"`start='batch:3'`"),
    ({"freeze_observers": -0.1}, ValueError, r"`freeze_observers=-0.1` is outside"),
    ({"freeze_bn": "step:-1"}, ValueError, r"`freeze_bn='step:-1'`"),
    ({"scheme": "intx-weight-only", "freeze_observers": 0.8}, ValueError, r"apply to `scheme='int8'`"),
    ({"scheme": "int8-dynamic-intx", "freeze_bn": 0.5}, ValueError, r"apply to `scheme='int8'`"),
    ({"finalize": "yes"}, TypeError, r"`finalize='yes'` must be True or False"),
    ({"convert": "yes"}, TypeError, r"`convert='yes'` must be True or False"),
    ({"bits": 4}, ValueError, r"`bits=4` is not available with `scheme='int8'`"),
    ({"bits": 8.0}, TypeError, r"`bits=8.0` must be an integer"),
    ({"scheme": "intx-weight-only", "bits": 9}, ValueError, r"`bits=9` is out of range"),
    ({"scheme": "intx-weight-only", "bits": 1}, ValueError, r"`bits=1` is out of range.*BinaryWeights"),
    ({"scheme": "int4-weight-only", "bits": 2}, ValueError, r"`scheme='int4-weight-only'` has 4-bit weights"),
    ({"group_size": 32}, ValueError, r"`group_size` applies to the low-bit schemes"),
    (
        {"scheme": "intx-weight-only", "group_size": 0},
        ValueError,
        r"`group_size=0` must be an integer of at least 2",
    ),
    (
        {"scheme": "intx-weight-only", "group_size": 1},
        ValueError,
        r"`group_size=1` must be an integer of at least 2",
    ),
    ({"scheme": "intx-weight-only", "group_size": 4.0}, ValueError, r"`group_size=4.0` must be an integer"),
    (
        {"scheme": "int4-weight-only", "group_size": 16},
        ValueError,
        r"`group_size=16` is not available.*32, 64",
    ),
    (
        {"modules": "net.*"},
        ValueError,
        r"`modules` and `exclude` select the `nn.Linear` layers of the low-bit",
    ),
    (
        {"exclude": "net.0"},
        ValueError,
        r"`modules` and `exclude` select the `nn.Linear` layers of the low-bit",
    ),
    ({"scheme": "intx-weight-only", "modules": [3]}, TypeError, r"`modules` got 3"),
    ({"scheme": "intx-weight-only", "exclude": [None]}, TypeError, r"`exclude` got None"),
    ({"example_input": "x"}, TypeError, r"`example_input` must be the LightningModule's input.*got str"),
    ({"export_path": 5}, TypeError, r"`export_path=5` must be a file path"),
    ({"export_path": "{tmp}"}, ValueError, r"`export_path='.*'` is a directory; give a file path such as"),
    ({"export_path": "{file}/model.pt2"}, ValueError, r"`export_path='.*'` cannot be created: .* is a file"),
    (
        {"scheme": "intx-weight-only", "export_path": "m.pt2"},
        ValueError,
        r"`export_path` saves the converted int8",
    ),
    ({"measure": 1}, TypeError, r"`measure=1` must be True or False"),
    ({"scheme": "intx-weight-only", "measure": True}, ValueError, r"`measure=True` compiles and times"),
    ({"log_every_n_steps": 0}, ValueError, r"`log_every_n_steps=0` must be a positive integer"),
]


def _fill_paths(kwargs, tmp_path):
    (tmp_path / "a_file").write_text("")
    paths = {"{tmp}": str(tmp_path), "{file}": str(tmp_path / "a_file")}
    filled = dict(kwargs)
    if isinstance(filled.get("export_path"), str):
        for marker, value in paths.items():
            filled["export_path"] = filled["export_path"].replace(marker, value)
    return filled


@pytest.mark.parametrize(("kwargs", "error", "match"), AT_CONSTRUCTION)
def test_bad_argument_fails_at_construction(tmp_path, kwargs, error, match):
    with pytest.raises(error, match=match):
        QuantizationAwareTraining(**_fill_paths(kwargs, tmp_path))


def test_export_path_in_a_directory_nothing_can_be_written_to_fails_at_construction(tmp_path):
    # /proc takes no new files, even for root; elsewhere a directory without write permission.
    locked = "/proc" if os.path.isdir("/proc") else tmp_path / "locked"
    if locked != "/proc":
        locked.mkdir()
        locked.chmod(0o500)
    with pytest.raises(ValueError, match=r"`export_path=.*` is not writable: files cannot be created in"):
        QuantizationAwareTraining(export_path=os.path.join(locked, "model.pt2"))


# -- arguments that need the model or the Trainer: they fail at setup, before any training step -------------


class Embedder(pl.LightningModule):
    """Nothing int8 can quantize: an embedding and a layer norm."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.norm = nn.LayerNorm(8)
        self.example_input_array = torch.zeros(2, 4, dtype=torch.long)

    def forward(self, x):
        return self.norm(self.embed(x)).mean(1)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _token_loader(n=64):
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(0, 16, (n, 4), generator=generator)
    return DataLoader(TensorDataset(x, x[:, 0] % 8), batch_size=16)


AT_SETUP = [
    ("small_cnn", {"module": "net"}, {"precision": "bf16-true"}, r"`precision='bf16-true'` is not supported"),
    ("small_cnn", {"module": "net"}, {"precision": "16-true"}, r"`precision='16-true'` is not supported"),
    ("small_cnn", {"module": "net"}, {"precision": "64-true"}, r"`precision='64-true'` is not supported"),
    ("small_cnn", {"module": "nett"}, {}, r"`module='nett'`: no such submodule.*Did you mean 'net'"),
    ("small_cnn", {"module": "net.1"}, {}, r"`scheme='int8'` found nothing to quantize in `module='net.1'`"),
    ("embedder", {}, {}, r"found nothing to quantize in Embedder.forward.*Embedding, LayerNorm"),
    (
        "embedder",
        {"scheme": "intx-weight-only"},
        {},
        r"`scheme='intx-weight-only'` quantizes `nn.Linear` layers.*Embedding, LayerNorm",
    ),
    (
        "lenet_300_100",
        {"scheme": "intx-weight-only", "group_size": 5, "module": "net"},
        {},
        r"`group_size=5` must divide the input size .* not for net.1 \(in_features=64\)\. Choose a divisor",
    ),
    (
        "lenet_300_100",
        {"scheme": "intx-weight-only", "group_size": 32, "modules": "net.9"},
        {},
        r"`modules`: no module named 'net.9' in ImageClassifier",
    ),
    (
        "frozen_backbone",
        {},
        {},
        r"trains ImageClassifier.net .* its layers net.1 \(BatchNorm2d\), net.4 \(BatchNorm2d\) are in eval mode"
        r".*`freeze_bn=0.0`",
    ),
    ("small_cnn", {"module": "net", "start": 1.0}, {}, r"without ever training with quantization"),
    ("small_cnn", {"module": "net", "start": 0.5, "freeze_observers": 0.2}, {}, r"frozen before"),
    (
        "small_cnn",
        {"scheme": "int4-weight-only", "module": "net"},
        {},
        r"cannot be converted on this machine",
    ),
]


def test_only_layers_that_compute_differently_in_eval_mode_are_refused_in_eval_mode():
    from lightning_compress.quantization.int8_qat import _eval_mode

    assert _eval_mode(nn.BatchNorm2d(4).eval()) and _eval_mode(nn.Dropout(0.5).eval())
    assert not _eval_mode(nn.BatchNorm2d(4, track_running_stats=False).eval())  # batch statistics either way
    assert not _eval_mode(nn.Dropout(0.0).eval()) and not _eval_mode(nn.BatchNorm2d(4))


@pytest.mark.parametrize(("model", "kwargs", "trainer_args", "match"), AT_SETUP)
def test_bad_setup_fails_before_any_training_step(tmp_path, digits, model, kwargs, trainer_args, match):
    if kwargs.get("scheme") == "int4-weight-only":
        try:
            check_low_bit_supported("int4-weight-only", 4, None)
        except ValueError:
            pass
        else:
            pytest.skip("this machine converts int4-weight-only")
    counter = RecordSteps()
    trainer = pl.Trainer(
        **trainer_kwargs(tmp_path, **trainer_args), callbacks=[QuantizationAwareTraining(**kwargs), counter]
    )
    module = (
        Embedder() if model == "embedder" else ImageClassifier(model.replace("frozen_backbone", "small_cnn"))
    )
    if model == "frozen_backbone":
        module.net[:6].eval()  # fine-tuning the head on a backbone whose batch norm keeps its statistics
    with pytest.raises(ValueError, match=match):
        if model == "embedder":
            trainer.fit(module, _token_loader())
        else:
            trainer.fit(module, datamodule=digits)
    assert counter.steps == []
    # The failed setup leaves the model as it was: no graph installed.
    assert not any(isinstance(m, QuantizedGraphModule) for m in module.modules())


def test_a_model_input_the_forward_rejects_fails_before_training_not_at_conversion(tmp_path):
    # From a dict batch the callback can only guess the model input (`input_ids`); the forward also needs
    # `attention_mask`. The error comes at setup, naming the argument that fixes it.
    torch.manual_seed(0)
    counter = RecordSteps()
    qat = QuantizationAwareTraining(scheme="intx-weight-only", bits=4, group_size=16)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=2), callbacks=[qat, counter])
    with pytest.raises(
        ValueError, match=r"first batch's model input.*rejected it: TypeError.*example_input="
    ) as info:
        trainer.fit(MaskedEncoder(), dict_batches())
    assert "attention_mask" in str(info.value)
    assert counter.steps == []


def test_a_dict_example_input_converts_also_with_dict_validation_batches(tmp_path):
    torch.manual_seed(0)
    loader = dict_batches()
    batch = next(iter(loader))
    example = {"input_ids": batch["input_ids"][:2], "attention_mask": batch["attention_mask"][:2]}
    qat = QuantizationAwareTraining(scheme="intx-weight-only", bits=4, group_size=16, example_input=example)
    counter = RecordSteps()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=3), callbacks=[qat, counter])
    module = MaskedEncoder()
    trainer.fit(module, loader, dict_batches(16))
    assert counter.steps == [0, 1, 2]
    assert qat.converted
    # The parity compares the fake-quantized and the converted model on the named input: the same 4-bit grid.
    assert qat.parity["argmax_agreement"] == 1.0
    assert qat.parity["max_abs_diff"] < 1e-3
    assert module(**example).shape == (2, 4)


def test_the_parity_runs_on_a_validation_batch_when_its_input_has_the_example_input_form(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    module = _Wrapped(model, example=torch.zeros(2, 32))
    sizes = []
    model.register_forward_pre_hook(lambda m, args: sizes.append((m.training, args[0].shape[0])))
    x = torch.randn(48, 32, generator=torch.Generator().manual_seed(0))
    train = DataLoader(TensorDataset(x[:32], x[:32, 0].gt(0).long()), batch_size=8)
    val = DataLoader(TensorDataset(x[32:], x[32:, 0].gt(0).long()), batch_size=16)
    qat = QuantizationAwareTraining(scheme="intx-weight-only", bits=4, group_size=16)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=2, limit_val_batches=1), callbacks=[qat])
    trainer.fit(module, train, val)
    assert qat.converted
    # The setup check on the example (2 samples), then the parity: fake-quantized and converted, on 16 samples.
    assert sizes[0] == (False, 2)
    assert sizes[-2:] == [(False, 16), (False, 16)]


class _Wrapped(pl.LightningModule):
    def __init__(self, net, example):
        super().__init__()
        self.net, self.example_input_array = net, example

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", F.cross_entropy(self(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_the_tables_cover_every_public_argument():
    arguments = set(inspect.signature(QuantizationAwareTraining.__init__).parameters) - {"self"}
    covered = {key for kwargs, *_ in AT_CONSTRUCTION for key in kwargs}
    covered |= {key for _, kwargs, *_ in AT_SETUP for key in kwargs}
    assert arguments <= covered, sorted(arguments - covered)


@pytest.mark.parametrize(("scheme", "group_size"), [("intx-weight-only", 5), ("int8-dynamic-intx", 3)])
def test_a_group_size_that_does_not_divide_256_is_not_blamed_on_the_machine(scheme, group_size):
    # The machine probe used a 256-input layer, so any group size that does not divide 256 was reported as
    # "cannot be converted on this machine".
    check_low_bit_supported(scheme, 4, group_size)


# -- resuming from a checkpoint written without QuantizationAwareTraining -----------------------------------


class RecordFirstWeights(Callback):
    def on_train_start(self, trainer, pl_module):
        self.weights = {
            k: v.detach().clone() for k, v in pl_module.state_dict().items() if k.endswith("weight")
        }


def _float_checkpoint(tmp_path, digits):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    model = ImageClassifier("small_cnn")
    fit_or_resume(tmp_path, digits, model, [], checkpoint=checkpoint, max_epochs=2, limit_train_batches=4)
    return tmp_path / "ckpt" / "epoch=0-step=4.ckpt"


def _resume(tmp_path, digits, path, **qat):
    qat = QuantizationAwareTraining(**qat)
    record = RecordFirstWeights()
    model = ImageClassifier("small_cnn")
    trainer = fit_or_resume(
        tmp_path, digits, model, [qat, record], ckpt_path=path, max_epochs=2, limit_train_batches=4
    )
    return model, qat, record, trainer


@pytest.mark.parametrize("module", ["net", None])
def test_resuming_a_float_checkpoint_with_qat_quantizes_from_its_weights(tmp_path, digits, module, caplog):
    path = _float_checkpoint(tmp_path, digits)
    saved = torch.load(path, weights_only=True)["state_dict"]
    with caplog.at_level("INFO"):
        model, qat, record, trainer = _resume(tmp_path, digits, path, module=module, start=0.5)
    assert "was written without QuantizationAwareTraining" in caplog.text
    assert "fake quantization from step 4 as planned" in caplog.text
    # Before the fix the float structure was put back, training went on in fp32 and nothing was converted.
    assert qat.converted and trainer.global_step == 8
    # With `module=None` too the graph takes the place of `net`, the child the forward calls: same names.
    assert isinstance(model.net, QuantizedGraphModule) and model.net.converted
    # Quantization-aware training started from the checkpoint's float weights.
    for name in ("0.weight", "3.weight", "8.weight", "10.weight"):
        assert torch.equal(record.weights["net." + name], saved["net." + name]), name
    assert qat.parity["argmax_agreement"] >= 0.95


def test_resuming_a_float_checkpoint_after_start_warns_that_quantization_starts_late(tmp_path, digits):
    path = _float_checkpoint(tmp_path, digits)
    with pytest.warns(
        UserWarning, match=r"at step 4, after `start=0.0` \(step 0\): fake quantization starts now"
    ):
        _, qat, _, _ = _resume(tmp_path, digits, path, module="net", start=0.0)
    assert qat.converted


def test_resuming_a_float_checkpoint_after_freeze_observers_fails_before_training(tmp_path, digits):
    path = _float_checkpoint(tmp_path, digits)
    counter = RecordSteps()
    qat = QuantizationAwareTraining(module="net", start=0.0, freeze_observers=0.25)
    trainer = pl.Trainer(
        **trainer_kwargs(tmp_path, max_epochs=2),
        callbacks=[qat, counter],
        limit_train_batches=4,
        limit_val_batches=1,
    )
    match = r"epoch=0-step=4.ckpt' was written without QuantizationAwareTraining at step 4, at or after `freeze_obs"
    with pytest.raises(ValueError, match=match + r"ervers=0.25` \(step 2\).*later `freeze_observers`"):
        trainer.fit(ImageClassifier("small_cnn"), datamodule=digits, ckpt_path=path)
    assert counter.steps == []


# -- loading a QAT checkpoint outside the Trainer ----------------------------------------------------------


@pytest.mark.parametrize(
    "qat", [{"module": "net"}, {}, {"scheme": "intx-weight-only", "module": "net", "group_size": 4}]
)
def test_a_qat_checkpoint_names_its_loader_and_the_loader_rebuilds_the_model(tmp_path, digits, qat):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    model = ImageClassifier("small_cnn")
    callback = QuantizationAwareTraining(**qat)
    trainer = pl.Trainer(
        **trainer_kwargs(tmp_path, max_epochs=1, enable_checkpointing=True),
        callbacks=[callback, checkpoint],
        limit_train_batches=4,
        limit_val_batches=1,
    )
    trainer.fit(model, datamodule=digits)
    # Written during training: the fake-quantized structure, rebuilt tensor for tensor.
    during = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["state_dict"]
    assert CHECKPOINT_HINT in during
    rebuilt = load_qat_checkpoint(ImageClassifier("small_cnn"), tmp_path / "ckpt" / "last.ckpt").state_dict()
    assert rebuilt.keys() == during.keys() - {CHECKPOINT_HINT}
    assert all(torch.equal(rebuilt[k], during[k]) for k in rebuilt if isinstance(rebuilt[k], torch.Tensor))
    # Written after training: the converted model.
    path = tmp_path / "final.ckpt"
    trainer.save_checkpoint(path)
    with pytest.raises(
        RuntimeError, match=r"lightning_compress.quantization.load_qat_checkpoint\(YourModule"
    ):
        # torch cannot map torchao's low-bit tensors with Lightning's default (callable) map_location.
        ImageClassifier.load_from_checkpoint(path, map_location="cpu")
    loaded = load_qat_checkpoint(ImageClassifier("small_cnn"), path)
    x = next(iter(digits.val_dataloader()))[0][:32]
    model.eval()
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    if qat.get("scheme"):
        return  # Lightning's Trainer cannot read torchao's low-bit tensors (callable map_location): see the docs
    # A Trainer that lists the callback drops the hint when it loads a checkpoint written during training ...
    during = tmp_path / "ckpt" / "last.ckpt"
    fresh = pl.Trainer(
        **trainer_kwargs(tmp_path), callbacks=[QuantizationAwareTraining(**qat)], limit_val_batches=1
    )
    fresh.validate(ImageClassifier("small_cnn"), datamodule=digits, ckpt_path=during, verbose=False)
    # ... and refuses to rebuild a converted one in a new process: it would get the ranges too late.
    fresh = pl.Trainer(
        **trainer_kwargs(tmp_path), callbacks=[QuantizationAwareTraining(**qat)], limit_val_batches=1
    )
    with pytest.raises(ValueError, match=r"holds a converted int8 model.*load_qat_checkpoint\(YourModule"):
        fresh.validate(ImageClassifier("small_cnn"), datamodule=digits, ckpt_path=path, verbose=False)


def _as_written_by_earlier_versions(checkpoint, float_layers):
    """A `module=None` checkpoint as earlier versions wrote it: the graph of the whole forward was the child
    `quantized` (`quantized.net.0.weight`, `quantized.activation_post_process_0.scale`), its ranges keyed alike."""
    state = OrderedDict()
    for key, value in checkpoint["state_dict"].items():
        rest = key.removeprefix("net.")
        if rest != key:
            key = "quantized." + (key if rest.split(".")[0] in float_layers else rest)
        state[key] = value
    state._metadata = checkpoint["state_dict"]._metadata
    callbacks = copy.deepcopy(checkpoint["callbacks"])
    for callback in callbacks.values():
        if "ranges" in callback:
            callback["ranges"] = {k.removeprefix("net."): v for k, v in callback["ranges"].items()}
    return {**checkpoint, "state_dict": state, "callbacks": callbacks}


def test_a_checkpoint_of_the_whole_forward_graph_written_by_earlier_versions_still_loads(tmp_path, digits):
    model = ImageClassifier("small_cnn")
    float_layers = set(model.net._modules)
    trainer = pl.Trainer(
        **trainer_kwargs(tmp_path, max_epochs=1, enable_checkpointing=True),
        callbacks=[QuantizationAwareTraining(), ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)],
        limit_train_batches=4,
        limit_val_batches=1,
    )
    trainer.fit(model, datamodule=digits)
    trainer.save_checkpoint(tmp_path / "final.ckpt")
    x = next(iter(digits.val_dataloader()))[0][:32]
    for path in (tmp_path / "ckpt" / "last.ckpt", tmp_path / "final.ckpt"):  # during training, converted
        checkpoint = torch.load(path, weights_only=False)
        legacy = _as_written_by_earlier_versions(checkpoint, float_layers)
        graph_entries = [
            k for k in legacy["state_dict"] if k.startswith("quantized.") and ".net." not in f".{k}"
        ]
        assert graph_entries and not any(k.startswith("net.") for k in legacy["state_dict"])
        expected = load_qat_checkpoint(ImageClassifier("small_cnn"), checkpoint).eval()
        loaded = load_qat_checkpoint(ImageClassifier("small_cnn"), legacy).eval()
        assert isinstance(loaded.net, QuantizedGraphModule) and "quantized" not in loaded._modules
        state, loaded_state = expected.state_dict(), loaded.state_dict()
        assert state.keys() == loaded_state.keys()
        assert all(torch.equal(v, loaded_state[k]) for k, v in state.items() if isinstance(v, torch.Tensor))
        with torch.no_grad():
            assert torch.equal(loaded(x), expected(x)), path.name


def test_load_qat_checkpoint_refuses_a_checkpoint_written_without_qat():
    net = nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"holds no QuantizationAwareTraining state"):
        load_qat_checkpoint(net, {"state_dict": net.state_dict(), "callbacks": {}})


# -- tied weights -------------------------------------------------------------------------------------------


class TiedLM(pl.LightningModule):
    """An embedding whose weight the output layer reuses (as in language models)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.body = nn.Linear(8, 8)
        self.head = nn.Linear(8, 16, bias=False)
        self.head.weight = self.embed.weight
        self.example_input_array = torch.zeros(2, 4, dtype=torch.long)

    def forward(self, x):
        return self.head(torch.relu(self.body(self.embed(x)))).mean(1)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", F.cross_entropy(self(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class RecordTie(Callback):
    def on_train_batch_end(self, trainer, pl_module, *args):
        self.parameters = sum(p.numel() for p in pl_module.parameters())
        self.in_optimizer = sum(p.numel() for g in trainer.optimizers[0].param_groups for p in g["params"])


@pytest.mark.parametrize("qat", [{}, {"scheme": "intx-weight-only", "group_size": 4}])
def test_tied_embedding_and_output_weights_train_as_one_tensor_and_convert(tmp_path, qat):
    record = RecordTie()
    model = TiedLM()
    trainer = pl.Trainer(
        **trainer_kwargs(tmp_path, max_epochs=2), callbacks=[QuantizationAwareTraining(**qat), record]
    )
    trainer.fit(model, _token_loader(128), _token_loader(32))
    # One tensor of 16 x 8 shared by both layers, trained once: 128 + 72 (body) parameters, not 328.
    assert record.parameters == record.in_optimizer == 16 * 8 + 8 * 8 + 8
    callback = trainer.callbacks[0]
    assert callback.converted
    assert callback.parity["argmax_agreement"] >= 0.9
    if qat:  # the output layer holds the quantized tensor, the lookup keeps the trained float one
        assert type(model.head.weight).__name__ == "IntxUnpackedToInt8Tensor"
        assert callback.parity["max_abs_diff"] < 1e-5


class _TiedNet(nn.Module):
    def __init__(self, embed, body, head):
        super().__init__()
        self.embed, self.body, self.head = embed, body, head

    def forward(self, x):
        return self.head(torch.relu(self.body(self.embed(x)))).mean(1)


class TiedInOneChild(TiedLM):
    """:class:`TiedLM` with its three layers in one child, which int8 QAT exports as one graph."""

    def __init__(self):
        super().__init__()
        self.net = _TiedNet(self.embed, self.body, self.head)
        del self.embed, self.body, self.head

    def forward(self, x):
        return self.net(x)


def test_tied_weights_resume_mid_qat_exactly_and_load_into_a_fresh_model(tmp_path):
    def run(folder, ckpt_path=None, checkpoint=None):
        torch.manual_seed(0)
        model, record = TiedInOneChild(), RecordTie()
        callbacks = [QuantizationAwareTraining(start=0.25, freeze_observers=0.75), record, checkpoint]
        kwargs = trainer_kwargs(folder, max_epochs=2, enable_checkpointing=checkpoint is not None)
        trainer = pl.Trainer(**kwargs, callbacks=[c for c in callbacks if c is not None])
        trainer.fit(model, _token_loader(64), _token_loader(32), ckpt_path=ckpt_path)
        return model, record

    full, _ = run(tmp_path / "full", checkpoint=ModelCheckpoint(tmp_path / "ckpt", save_top_k=-1))
    written = tmp_path / "ckpt" / "epoch=0-step=4.ckpt"
    resumed, record = run(tmp_path / "resumed", ckpt_path=written)
    assert record.parameters == record.in_optimizer == 16 * 8 + 8 * 8 + 8  # still one shared tensor
    assert full.state_dict().keys() == resumed.state_dict().keys()
    for name, value in full.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name
    # The checkpoint written while training loads into a fresh model: the fake-quantized model at epoch 0.
    fresh = load_qat_checkpoint(TiedInOneChild(), written)
    saved = torch.load(written, weights_only=False)["state_dict"]
    assert torch.equal(fresh.state_dict()["net.head.weight"], saved["net.head.weight"])


# -- memory ----------------------------------------------------------------------------------------------


_FITS_IN_ONE_PROCESS = """
import gc, json, sys, tempfile, pathlib
import lightning.pytorch as pl, torch
from torch.fx import GraphModule
from examples.data import DigitsDataModule
from examples.models import ImageClassifier
from lightning_compress.quantization.qat import QuantizationAwareTraining
from tests.conftest import trainer_kwargs

root = pathlib.Path(tempfile.mkdtemp())
digits = DigitsDataModule(batch_size=64, shuffle=False)
digits.setup("fit")

def fit(index):
    model = ImageClassifier("small_cnn")
    trainer = pl.Trainer(
        **trainer_kwargs(root / str(index), max_steps=2),
        callbacks=[QuantizationAwareTraining(module="net")],
        limit_val_batches=1,
    )
    trainer.fit(model, datamodule=digits)
    digits.trainer = None  # the datamodule would keep the last Trainer
    return torch.utils.weak.WeakIdRef(model)

def graphs():
    gc.collect()
    return sum(isinstance(o, GraphModule) for o in gc.get_objects())

models = [fit(0)]
before = graphs()
models += [fit(i) for i in range(1, 5)]
growth = graphs() - before  # collects the garbage first
print(json.dumps({"alive": [ref() is not None for ref in models], "graphs": growth}))
"""


def test_qat_fits_in_one_process_release_their_models_and_graphs():
    # A fresh interpreter, as a user's script: pytest's own machinery keeps Trainers of a test alive.
    done = subprocess.run(
        [sys.executable, "-c", _FITS_IN_ONE_PROCESS],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    # Before: every model stayed alive (the host registry held the callback, to which Lightning gives the
    # model's `log`), and torchao's device caches held every prepared and converted graph (+4 graph modules
    # per fit, +16 here).
    assert result["alive"] == [False] * 5
    assert result["graphs"] <= 1
