import csv
import io
import os
import subprocess
import sys
import warnings
import zipfile

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from examples.models import ImageClassifier
from lightning_compress import GradualPruning
from lightning_compress.callback import compression_callbacks
from lightning_compress.quantization.pt2e import (
    QuantizedGraphModule,
    compile_for_cpu,
    convert_int8,
    export_for_quantization,
    fake_quantizers,
    load_quantized,
    prepare_int8_qat,
    save_quantized,
    sync_observers,
)
from lightning_compress.quantization.qat import QuantizationAwareTraining, check_low_bit_supported
from lightning_compress.quantization.qat_core import QuantizationConfig, convert_qat, prepare_qat
from tests._ddp import run_worker
from tests.conftest import NetClassifier, RecordSteps, fit_or_resume, trainer_kwargs


def _has_vnni():
    try:
        with open("/proc/cpuinfo") as info:
            flags = info.read()
    except OSError:
        return True
    return any(flag in flags for flag in ("avx512_vnni", "avx_vnni", "amx_int8"))


def _mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


class SharedReluBlock(nn.Module):
    """A residual block that calls one ReLU module twice, as many user models do."""

    def __init__(self, width=8):
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.conv2(self.relu(self.conv1(x))) + x)


def _shared_relu_net():
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        SharedReluBlock(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    )


def _train(module, steps=30, seed=0):
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-2)
    for _ in range(steps):
        x = torch.randn(32, 1, 8, 8, generator=generator)
        y = (x.mean(dim=(1, 2, 3)) > 0).long() + 2 * (x[:, 0, 0, 0] > 0).long()
        loss = nn.functional.cross_entropy(module(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


# -- the functional core ---------------------------------------------------------------------------------


def test_one_relu_used_twice_breaks_raw_torchao_but_not_prepare_int8_qat():
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

    from lightning_compress.quantization.pt2e import _x86_quantizer

    net, x = _shared_relu_net(), torch.randn(2, 1, 8, 8)
    raw = torch.export.export(net, (x,)).module()
    with pytest.raises(ValueError, match="more than one output node"):
        prepare_qat_pt2e(raw, _x86_quantizer(is_qat=True))
    prepared = prepare_int8_qat(net, (x,))
    _train(prepared)
    converted = convert_int8(prepared)
    test = torch.randn(64, 1, 8, 8)
    with torch.no_grad():
        fake, real = prepared.eval()(test), converted(test)
    assert (fake.argmax(1) == real.argmax(1)).float().mean() >= 0.98
    assert (fake - real).abs().max() < 0.05 * fake.abs().max()
    # Both ReLUs are quantized: the block's two outputs each get their own quantize op.
    ops = [n for n in converted.graph.graph.nodes if "quantize_per_tensor" in str(n.target)]
    assert len(ops) >= 6


def test_eval_raises_on_the_raw_prepared_graph_and_switches_batch_norm_on_ours():
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

    from lightning_compress.quantization.pt2e import _x86_quantizer

    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3))
    x = torch.randn(16, 1, 8, 8)
    raw = prepare_qat_pt2e(export_for_quantization(net, (x,)), _x86_quantizer(is_qat=True))
    with pytest.raises(NotImplementedError):
        raw.eval()
    prepared = prepare_int8_qat(net, (x,))
    prepared(x)
    running_mean = net[1].running_mean.clone()
    prepared.eval()
    with torch.no_grad():
        together = prepared(x)
        alone = torch.cat([prepared(x[i : i + 2])[:1] for i in range(0, 16, 2)])
    # In eval mode batch norm uses running statistics: a sample's output does not depend on its batch, and
    # the statistics do not move.
    assert torch.allclose(together[::2], alone, atol=1e-5)
    assert torch.equal(net[1].running_mean, running_mean)
    prepared.train()
    prepared(x)
    assert not torch.equal(net[1].running_mean, running_mean)


def test_mode_switch_runs_under_a_flop_counter_and_leaves_its_hooks_in_place():
    from torch.nn.modules import module as module_globals
    from torch.utils.flop_counter import FlopCounterMode

    net = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.5), nn.ReLU(), nn.Linear(16, 3))
    x = torch.randn(4, 8)
    prepared = prepare_int8_qat(net, (x,))
    prepared(x)
    prepared.eval()
    # Lightning's model summary runs the example input like this: the graph switches to eval at this call.
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        hooks = dict(module_globals._global_forward_pre_hooks)
        first, second = prepared(x), prepared(x)
        assert dict(module_globals._global_forward_pre_hooks) == hooks and hooks
    assert torch.equal(first, second)  # dropout is off
    assert counter.get_total_flops() >= 2 * 4 * (8 * 16 + 16 * 3)  # the model's matmuls are still counted


class _TokenClassifier(nn.Module):
    """Token ids and a padding mask to class logits (mean over the real tokens)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.fc = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, ids, mask):
        h = torch.relu(self.fc(self.emb(ids))) * mask.unsqueeze(-1)
        return self.head(h.sum(1) / mask.sum(1, keepdim=True))


def test_int8_graphs_take_token_batches_of_any_length_and_float_inputs_of_other_sizes_get_a_clear_error():
    torch.manual_seed(0)
    net = _TokenClassifier()
    ids, mask = torch.randint(0, 20, (4, 12)), torch.ones(4, 12)
    prepared = prepare_int8_qat(net, (ids, mask.long()))
    for length in (12, 5, 17):  # batches padded to their own longest sequence
        batch = torch.randint(0, 20, (3, length))
        assert prepared(batch, torch.ones(3, length, dtype=torch.long)).shape == (3, 3)
    converted = convert_int8(prepared)
    short = torch.randint(0, 20, (2, 7))
    padded = torch.cat([short, torch.zeros(2, 4, dtype=torch.long)], 1)
    pad_mask = torch.cat([torch.ones(2, 7), torch.zeros(2, 4)], 1).long()
    with torch.no_grad():
        # The padding changes nothing: the graph runs on both lengths and the mask leaves the padding out.
        assert torch.allclose(
            converted(short, torch.ones(2, 7).long()), converted(padded, pad_mask), atol=1e-5
        )

    float_net = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
    graph = prepare_int8_qat(float_net, (torch.randn(2, 5, 8),))
    assert graph(torch.randn(7, 5, 8)).shape == (7, 5, 8)  # any batch size
    with pytest.raises(
        ValueError, match=r"dimension that is not the batch.*pad every batch.*int8-dynamic-intx"
    ):
        graph(torch.randn(2, 6, 8))


def _tiny_classifier():
    net = nn.Sequential(nn.Linear(16, 32), nn.Dropout(0.1), nn.ReLU(), nn.Linear(32, 4))
    return NetClassifier(net, example_input_array=torch.randn(2, 16))


def _tiny_loader():
    data = torch.utils.data.TensorDataset(torch.randn(32, 16), torch.randint(0, 4, (32,)))
    return torch.utils.data.DataLoader(data, batch_size=8)


def test_qat_with_lightnings_default_model_summary(tmp_path):
    pl.seed_everything(0, verbose=False)
    model, qat = _tiny_classifier(), QuantizationAwareTraining()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=3, enable_model_summary=True), callbacks=[qat])
    trainer.fit(model, _tiny_loader())
    assert trainer.global_step == 3 and isinstance(model.net, QuantizedGraphModule) and model.net.converted


def test_fake_quant_is_logged_for_the_batch_that_trained_with_it(tmp_path):
    # The batch at step 1 trains in float: its row says so (its end sees `global_step` already at 2).
    logger = CSVLogger(tmp_path, name="csv")
    kwargs = trainer_kwargs(tmp_path, max_steps=4, logger=logger, log_every_n_steps=1)
    trainer = pl.Trainer(**kwargs, callbacks=[QuantizationAwareTraining(start="step:2")])
    trainer.fit(_tiny_classifier(), _tiny_loader())
    with open(f"{logger.log_dir}/metrics.csv") as file:
        rows = [r for r in csv.DictReader(file) if r.get("quantization/fake_quant")]
    assert [(int(r["step"]), float(r["quantization/fake_quant"])) for r in rows] == [
        (0, 0.0),
        (1, 0.0),
        (2, 1.0),
        (3, 1.0),
    ]


class _StopAt(Callback):
    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        trainer.should_stop = trainer.global_step >= self.step


@pytest.mark.parametrize("scheme", ["int8", "int8-dynamic-intx"])
def test_a_fit_stopped_before_start_keeps_the_float_model_and_says_so(tmp_path, scheme):
    # EarlyStopping or max_time can end the fit before any step trained with quantization: nothing to convert with.
    pl.seed_everything(0, verbose=False)
    model = _tiny_classifier()
    qat = QuantizationAwareTraining(
        scheme=scheme, start="step:6", **({"group_size": 16} if scheme != "int8" else {})
    )
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=8, max_epochs=3), callbacks=[qat, _StopAt(4)])
    with pytest.warns(
        UserWarning, match=r"stopped at step 4, before `start='step:6'` \(step 6\).*stays float"
    ):
        trainer.fit(model, _tiny_loader())
    assert trainer.global_step == 4 and not qat.converted
    assert type(model.net[0]) is nn.Linear and model.net[0].weight.dtype == torch.float32
    model(torch.randn(3, 16))  # the float model runs


def test_naive_save_of_the_converted_graph_is_larger_than_fp32_and_ours_is_four_times_smaller(tmp_path):
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    net = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    x = torch.randn(4, 256)
    prepared = prepare_int8_qat(net, (x,))
    prepared(torch.randn(64, 256))
    prepared.eval()
    prepared.sync()
    naive = convert_pt2e(__import__("copy").deepcopy(prepared.graph))
    ours = convert_int8(prepared)

    def saved(state):
        buffer = io.BytesIO()
        torch.save(state, buffer)
        return buffer.getbuffer().nbytes

    fp32 = saved(net.state_dict())
    assert saved(naive.state_dict()) > 1.2 * fp32  # the unused fp32 parameters are still there
    assert saved(ours.state_dict()) < 0.28 * fp32  # int8 weights + fp32 biases and scales + int64 zero points
    # The shipped program: int8 weights + scales + the graph.
    big_input = torch.randn(10_000, 256)
    fp32_file = save_quantized(net.eval(), (big_input[:100],), tmp_path / "fp32.pt2")
    int8_file = save_quantized(ours, (big_input[:100],), tmp_path / "int8.pt2")
    assert int8_file < 0.28 * fp32_file
    with zipfile.ZipFile(tmp_path / "int8.pt2") as archive:
        sample = sum(i.file_size for i in archive.infolist() if "sample_inputs" in i.filename)
    assert sample < 4 * 256 * 4 + 2048  # two samples saved, not the 10,000-row tensor they were cut from
    loaded = load_quantized(tmp_path / "int8.pt2")
    test = torch.randn(8, 256)
    assert torch.equal(loaded.eval()(test), ours(test))


def test_the_saved_program_loads_in_a_process_without_this_package(tmp_path):
    net = _mlp()
    prepared = prepare_int8_qat(net, (torch.randn(2, 1, 8, 8),))
    prepared(torch.randn(32, 1, 8, 8))
    converted = convert_int8(prepared)
    save_quantized(converted, (torch.randn(2, 1, 8, 8),), tmp_path / "m.pt2")
    x = torch.randn(5, 1, 8, 8)
    torch.save(x, tmp_path / "x.pt")
    torch.save(converted(x), tmp_path / "y.pt")
    code = (
        "import sys, torch, torchao.quantization.pt2e\n"
        "assert 'lightning_compress' not in sys.modules\n"
        f"m = torch.export.load({str(tmp_path / 'm.pt2')!r}).module()\n"
        f"x, y = torch.load({str(tmp_path / 'x.pt')!r}), torch.load({str(tmp_path / 'y.pt')!r})\n"
        "assert torch.equal(m(x), y)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=120)


def test_observers_are_averaged_across_processes_and_scales_follow():
    prepared = prepare_int8_qat(_mlp(), (torch.randn(2, 1, 8, 8),))
    prepared(torch.randn(32, 1, 8, 8))
    quantizers = [q for q in prepared.modules() if hasattr(q, "activation_post_process")]
    before = [(q.activation_post_process.min_val.clone(), q.scale.clone()) for q in quantizers]
    synced = sync_observers(prepared, lambda t: t * 2)  # a stand-in collective that changes the values
    assert synced == len(quantizers) == 4
    for q, (min_val, scale) in zip(quantizers, before, strict=True):
        assert torch.equal(q.activation_post_process.min_val, 2 * min_val)
        assert torch.allclose(q.scale, q.calculate_qparams()[0]) and not torch.equal(q.scale, scale)


def test_export_failure_names_the_line_and_suggests_a_submodule():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(4, 4)

        def forward(self, x):
            if x.sum() > 0:
                return self.body(x)
            return x

    with pytest.raises(ValueError) as info:
        prepare_int8_qat(DataDependent(), (torch.randn(2, 4),))
    message = str(info.value)
    assert "torch.export cannot trace DataDependent" in message
    assert "test_quantization.py:" in message and "if x.sum() > 0" in message
    assert "module='body'" in message


def test_compiled_int8_graph_matches_the_converted_graph_and_leaves_inductor_config_as_it_was():
    import torch._inductor.config as inductor_config
    from torch._dynamo.utils import counters

    prepared = prepare_int8_qat(_mlp(), (torch.randn(2, 1, 8, 8),))
    _train(prepared, steps=5)
    converted = convert_int8(prepared)
    before = inductor_config.freezing
    counters["inductor"].clear()
    compiled = compile_for_cpu(converted)
    x = torch.randn(256, 1, 8, 8)
    with torch.no_grad():
        out, reference = compiled(x), converted(x)
    assert inductor_config.freezing == before
    # Freezing was on while it compiled: the int8 linear layers were lowered to oneDNN's int8 kernels.
    assert counters["inductor"]["qlinear_weight_prepack_matcher_count"] >= 1
    if _has_vnni():
        assert torch.allclose(out, reference, atol=1e-4)
    else:
        # Without VNNI/AMX, oneDNN's u8 x s8 kernels add pairs of products in saturating 16-bit integers, so
        # the compiled int8 graph drifts from the reference arithmetic (measured on an AVX2-only CPU: 1.6%
        # relative error, 98.4% argmax agreement).
        assert float((out - reference).norm() / reference.norm()) < 0.03
        assert float((out.argmax(1) == reference.argmax(1)).float().mean()) >= 0.95


# -- the verbs on a plain nn.Module, without a Trainer ------------------------------------------------------


def _conv_net():
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 4))


def test_prepare_and_convert_qat_int8_on_a_plain_module_without_a_trainer():
    model = _conv_net()
    prepared = prepare_qat(model, QuantizationConfig(), example_input=torch.randn(2, 1, 8, 8))
    assert (
        isinstance(prepared, QuantizedGraphModule)
        and prepared.graph.get_parameter("0.weight") is model[0].weight
    )
    _train(prepared, steps=20)
    converted = convert_qat(prepared, QuantizationConfig())
    x = torch.randn(64, 1, 8, 8)
    with torch.no_grad():
        fake, real = prepared.eval()(x), converted(x)
    assert converted.converted and (fake.argmax(1) == real.argmax(1)).float().mean() >= 0.98
    assert float((real - fake).norm() / fake.norm()) < 0.03
    # The batch norm was folded into the convolution: the int8 graph holds no batch-norm op.
    assert not any("batch_norm" in str(n.target) for n in converted.graph.graph.nodes)
    assert sum(p.dtype == torch.int8 for p in converted.parameters()) == 2


def test_prepare_qat_of_a_named_part_replaces_that_module_in_place():
    model = nn.Sequential()
    model.add_module("body", _conv_net())
    model.add_module("scale", nn.Linear(4, 4))
    config = QuantizationConfig(module="body")
    float_body = model.body
    assert prepare_qat(model, config, example_input=torch.randn(2, 1, 8, 8)) is model
    assert isinstance(model.body, QuantizedGraphModule) and isinstance(model.scale, nn.Linear)
    assert dict(model.body.named_parameters())["0.weight"] is float_body[0].weight
    _train(model, steps=5)
    convert_qat(model, config)
    assert model.body.converted and tuple(model(torch.randn(3, 1, 8, 8)).shape) == (3, 4)


def test_prepare_and_convert_qat_low_bit_on_a_plain_module_reproduce_the_fake_quantized_outputs():
    from torchao.quantization import IntxUnpackedToInt8Tensor

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    config = QuantizationConfig(scheme="intx-weight-only", bits=3, group_size=8, exclude="2")
    prepared = prepare_qat(model, config)
    x = torch.randn(8, 16)
    with torch.no_grad():
        fake = prepared(x)
    convert_qat(prepared, config)
    assert isinstance(model[0].weight, IntxUnpackedToInt8Tensor) and type(model[2]) is nn.Linear
    assert model[0].weight.qdata.min() >= -4 and model[0].weight.qdata.max() <= 3
    with torch.no_grad():
        assert torch.allclose(model(x), fake, atol=1e-5)


def test_quantization_config_checks_its_fields():
    assert QuantizationConfig(scheme="int4-weight-only").weight_group_size == 128
    with pytest.raises(ValueError, match=r"Unknown `scheme='int3'`"):
        QuantizationConfig(scheme="int3")
    with pytest.raises(ValueError, match=r"`modules` and `exclude` select the `nn.Linear` layers"):
        QuantizationConfig(exclude="net.0")
    with pytest.raises(ValueError, match=r"`module=''` must be a submodule name"):
        QuantizationConfig(module="")


# -- torchao's private functions: used only in the versions where they were checked ---------------------------


@pytest.fixture
def torchao_version(monkeypatch):
    """Makes the installed torchao report another version; the warning is given again for the test."""
    import torchao

    from lightning_compress.quantization import _torchao_private

    monkeypatch.setattr(_torchao_private, "_warned", False)

    def set_version(version):
        monkeypatch.setattr(torchao, "__version__", version)

    return set_version


@pytest.mark.parametrize(
    ("version", "swapped"),
    [("0.12.0", True), ("0.18.0+cpu", True), ("0.11.1", False), ("0.19.0.dev20260101", False)],
)
def test_private_swaps_apply_only_to_the_checked_torchao_versions_and_results_stay_the_same(
    torchao_version, version, swapped
):
    import warnings

    import torchao.quantization.pt2e.qat_utils as qat_utils
    import torchao.quantization.pt2e.utils as pt2e_utils

    from lightning_compress.quantization._torchao_private import cached_patterns

    x = torch.randn(8, 1, 8, 8)

    def quantize():  # prepare, observe, switch to eval and back (a graph rewrite), convert
        torch.manual_seed(0)
        prepared = prepare_int8_qat(_mlp(), (x,))
        prepared(x)
        prepared.eval()(x)
        return convert_int8(prepared.train())(x)

    reference = quantize()
    torchao_version(version)
    original = (pt2e_utils._get_aten_graph_module_for_pattern, qat_utils._fold_conv_bn_qat_helper)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with cached_patterns():
            inside = (pt2e_utils._get_aten_graph_module_for_pattern, qat_utils._fold_conv_bn_qat_helper)
        result = quantize()
    assert (inside[0] is not original[0], inside[1] is not original[1]) == (swapped, swapped)
    assert (pt2e_utils._get_aten_graph_module_for_pattern, qat_utils._fold_conv_bn_qat_helper) == original
    private = [w for w in caught if "private torchao functions" in str(w.message)]
    assert len(private) == (0 if swapped else 1)  # once per process, however many calls
    assert torch.equal(result, reference)


def test_module_caches_are_released_only_in_the_checked_torchao_versions(torchao_version):
    from torchao.utils import _assert_and_get_unique_device

    from lightning_compress.quantization._torchao_private import release_torchao_module_cache

    for version, kept in (("0.19.0", 1), ("0.18.1", 0)):
        torchao_version(version)
        _assert_and_get_unique_device.cache_clear()
        _assert_and_get_unique_device(nn.Linear(2, 2))
        with pytest.warns(UserWarning) if kept else __import__("contextlib").nullcontext():
            release_torchao_module_cache()
        assert _assert_and_get_unique_device.cache_info().currsize == kept, version


# -- the callback -----------------------------------------------------------------------------------------


def test_convert_is_the_deprecated_name_of_finalize():
    with pytest.warns(DeprecationWarning, match=r"`QuantizationAwareTraining\(convert=...\)` is deprecated"):
        qat = QuantizationAwareTraining(convert=False)
    assert qat.finalize_at_end is False and QuantizationAwareTraining(finalize=False).finalize_at_end is False
    with pytest.raises(ValueError, match=r"got both `convert=True` and `finalize=False`"):
        QuantizationAwareTraining(convert=True, finalize=False)


def test_the_low_bit_machine_probe_leaves_the_random_state_as_it_was():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    check_low_bit_supported("intx-weight-only", 4, 32)
    assert torch.equal(torch.rand(3), expected)


class CaptureFakeQuantOutputs(Callback):
    """Listed before QAT, so its end-of-training hook sees the fake-quantized model on a validation batch."""

    def on_train_end(self, trainer, pl_module):
        x, _ = next(iter(trainer.val_dataloaders))
        pl_module.eval()
        with torch.no_grad():
            self.x, self.logits = x, pl_module(x)
        pl_module.train()


class ModelWithWiderCNN(ImageClassifier):
    def __init__(self):
        super().__init__("small_cnn", arch_kwargs={"width": 32})


@pytest.fixture(scope="module")
def qat_fit(tmp_path_factory, digits):
    """One QAT fit shared by several tests: pruning + QAT on the wider small CNN, with checkpoints and a logger."""
    root = tmp_path_factory.mktemp("qat_fit")
    pl.seed_everything(0, verbose=False)
    pruning = GradualPruning(amount=0.5, start=0.0, end=0.3, modules=nn.Linear)
    qat = QuantizationAwareTraining(
        module="net",
        start=0.2,
        freeze_observers=0.8,
        freeze_bn=0.8,
        export_path=root / "model.pt2",
        measure=True,
        log_every_n_steps=5,
    )
    capture = CaptureFakeQuantOutputs()
    ckpt = ModelCheckpoint(dirpath=root / "ckpt", save_top_k=-1, every_n_epochs=1)
    logger = CSVLogger(root, name="logs")
    model = ModelWithWiderCNN()
    trainer = pl.Trainer(
        **trainer_kwargs(root, max_epochs=3, logger=logger, enable_checkpointing=True, log_every_n_steps=5),
        callbacks=[pruning, capture, qat, ckpt],
    )
    trainer.fit(model, datamodule=digits)
    with open(f"{logger.log_dir}/metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return {"model": model, "trainer": trainer, "qat": qat, "capture": capture, "root": root, "rows": rows}


def test_converted_model_agrees_with_the_fake_quantized_model(qat_fit):
    model, capture, qat = qat_fit["model"], qat_fit["capture"], qat_fit["qat"]
    assert isinstance(model.net, QuantizedGraphModule) and model.net.converted
    with torch.no_grad():
        real = model(capture.x)
    fake = capture.logits
    assert (fake.argmax(1) == real.argmax(1)).float().mean() >= 0.99
    assert (fake - real).abs().max() < 0.05 * fake.abs().max()
    assert qat.parity["argmax_agreement"] >= 0.99 and qat.parity["relative_error"] < 0.02
    assert qat_fit["trainer"].callback_metrics["val_acc"] > 0.85


def test_shipped_artifact_is_about_four_times_smaller(qat_fit):
    artifact = qat_fit["qat"].artifact
    assert artifact["bytes"] == os.path.getsize(artifact["path"])
    assert artifact["fp32_bytes"] == os.path.getsize(artifact["fp32_path"])
    assert artifact["size_ratio"] > 3.3
    with zipfile.ZipFile(artifact["path"]) as a, zipfile.ZipFile(artifact["fp32_path"]) as b:
        int8 = sum(i.file_size for i in a.infolist() if "/weights/weight_" in i.filename)
        fp32 = sum(i.file_size for i in b.infolist() if "/weights/weight_" in i.filename)
    assert int8 < 0.26 * fp32
    loaded = load_quantized(artifact["path"])
    x = qat_fit["capture"].x
    with torch.no_grad():
        assert torch.equal(loaded(x), qat_fit["model"](x))


def test_measure_reports_sizes_and_compiled_latencies_and_logs_them(qat_fit):
    measured, artifact = qat_fit["qat"].measurements, qat_fit["qat"].artifact
    # The same programs as the exported ones, saved the same way (the archive's member names follow the file
    # name, hence a few hundred bytes of difference).
    assert measured["measured_int8_bytes"] == pytest.approx(artifact["bytes"], rel=0.01)
    assert measured["measured_fp32_bytes"] == pytest.approx(artifact["fp32_bytes"], rel=0.01)
    assert measured["measured_size_ratio"] == pytest.approx(artifact["size_ratio"], rel=0.01)
    assert 0 < measured["latency_int8_ms"] < 1e3 and 0 < measured["latency_fp32_ms"] < 1e3
    assert measured["speedup"] == pytest.approx(measured["latency_fp32_ms"] / measured["latency_int8_ms"])
    logged = [r for r in qat_fit["rows"] if r.get("quantization/speedup")]
    assert len(logged) == 1
    assert float(logged[0]["quantization/speedup"]) == pytest.approx(measured["speedup"], rel=1e-6)


def test_pruned_zeros_stay_zero_through_fake_quant_and_conversion(qat_fit):
    qat, model = qat_fit["qat"], qat_fit["model"]
    latent = dict(qat._stashed["net"].named_parameters())  # the float module the graph was cut from
    for name in ("8.weight", "10.weight"):
        pruned = latent[name] == 0
        assert pruned.float().mean().item() == pytest.approx(0.5, abs=1e-3)
        int8 = next(
            p for p in model.net.parameters() if p.dtype == torch.int8 and p.shape == latent[name].shape
        )
        assert (int8[pruned] == 0).all()
        assert (int8 == 0).float().mean().item() >= 0.5


def test_metrics_reach_the_logger(qat_fit):
    rows = qat_fit["rows"]
    columns = set().union(*(r.keys() for r in rows))
    for name in (
        "quantization/weight_error",
        "quantization/activation_error",
        "quantization/fake_quant",
        "quantization/layers_quantized",
        "quantization/per_layer/bits/net.8.weight",
        "quantization/size_fp32_bytes",
        "quantization/size_quantized_bytes",
        "quantization/parity_argmax_agreement",
        "quantization/artifact_size_ratio",
    ):
        assert name in columns, name
    fake_quant = {
        int(r["step"]): float(r["quantization/fake_quant"]) for r in rows if r.get("quantization/fake_quant")
    }
    total = qat_fit["trainer"].global_step
    assert all(v == (step >= round(0.2 * total)) for step, v in fake_quant.items())
    errors = [float(r["quantization/weight_error"]) for r in rows if r.get("quantization/weight_error")]
    assert errors and all(0.0 < e < 0.1 for e in errors)
    layers = [
        float(r["quantization/layers_quantized"]) for r in rows if r.get("quantization/layers_quantized")
    ]
    assert layers[-1] == 1.0
    sizes = [r for r in rows if r.get("quantization/size_quantized_bytes")][-1]
    ratio = float(sizes["quantization/size_fp32_bytes"]) / float(sizes["quantization/size_quantized_bytes"])
    assert 3.5 < ratio < 4.0


def test_validate_and_test_with_a_checkpoint_after_qat(qat_fit, digits, tmp_path):
    checkpoint = sorted((qat_fit["root"] / "ckpt").glob("epoch=2-*.ckpt"))[0]
    trainer = qat_fit["trainer"]
    in_process = trainer.validate(qat_fit["model"], datamodule=digits, ckpt_path=checkpoint, verbose=False)
    assert qat_fit["model"].net.converted
    # A new process: a fresh float model and a fresh callback rebuild the structure from the checkpoint.
    model = ModelWithWiderCNN()
    fresh = pl.Trainer(**trainer_kwargs(tmp_path), callbacks=[QuantizationAwareTraining(module="net")])
    again = fresh.validate(model, datamodule=digits, ckpt_path=checkpoint, verbose=False)
    assert isinstance(model.net, QuantizedGraphModule) and model.net.converted
    assert again[0]["val_acc"] == pytest.approx(in_process[0]["val_acc"], abs=1e-6)
    assert again[0]["val_acc"] == pytest.approx(float(trainer.callback_metrics["val_acc"]), abs=0.02)
    tested = fresh.test(model, datamodule=digits, ckpt_path=checkpoint, verbose=False)
    assert tested[0]["test_acc"] > 0.85


class RecordPhases(Callback):
    """After every training step: the step, the observed ranges and the batch-norm running means."""

    def __init__(self):
        self.steps, self.ranges, self.running_means = [], [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append(trainer.global_step - 1)
        observers = [q.activation_post_process for _, q in fake_quantizers(pl_module.net)]
        self.ranges.append(torch.cat([t.flatten() for o in observers for t in (o.min_val, o.max_val)]))
        means = [v.clone() for k, v in pl_module.net.state_dict().items() if k.endswith("running_mean")]
        self.running_means.append(torch.cat(means))


def _resume_run(tmp_path, digits, ckpt_path=None, checkpoint=None, record=None):
    pl.seed_everything(3, verbose=False)
    qat = QuantizationAwareTraining(
        module="net", start=0.25, freeze_observers=0.75, freeze_bn=0.6, convert=False
    )
    model = ImageClassifier("small_cnn")
    fit_or_resume(
        tmp_path, digits, model, [qat, record], ckpt_path, checkpoint, max_epochs=2, limit_train_batches=6
    )
    return model


def test_resume_mid_qat_continues_exactly(tmp_path, digits):
    phases = RecordPhases()
    full = _resume_run(tmp_path / "full", digits, record=phases)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    _resume_run(tmp_path / "first", digits, checkpoint=ckpt)
    after = RecordPhases()
    resumed = _resume_run(
        tmp_path / "second", digits, ckpt_path=tmp_path / "ckpt" / "epoch=0-step=6.ckpt", record=after
    )
    assert after.steps == list(range(6, 12))  # it did continue from the checkpoint, not start again
    state_full, state_resumed = full.state_dict(), resumed.state_dict()
    assert state_full.keys() == state_resumed.keys()
    assert any("activation_post_process" in k for k in state_full)
    for name, value in state_full.items():
        assert torch.equal(value, state_resumed[name]), name
    # The lifecycle of the uninterrupted run, 12 steps: fp32 until `start` (step 3), ranges observed until
    # `freeze_observers` (step 9), batch-norm statistics updated until `freeze_bn` (step 7).
    assert phases.steps == list(range(12))
    for step in range(1, 12):
        ranges_moved = not torch.equal(phases.ranges[step], phases.ranges[step - 1])
        means_moved = not torch.equal(phases.running_means[step], phases.running_means[step - 1])
        assert ranges_moved == (3 <= step < 9), step
        assert means_moved == (step < 7), step
    assert torch.isinf(phases.ranges[2]).all() and torch.isfinite(phases.ranges[3]).all()


def test_whole_forward_is_quantized_when_no_module_is_named(tmp_path, digits):
    qat = QuantizationAwareTraining(start=0.0)
    capture = CaptureFakeQuantOutputs()
    model = ImageClassifier("small_cnn")
    model.example_input_array = None  # the example comes from the first training batch
    trainer = pl.Trainer(
        **trainer_kwargs(tmp_path), callbacks=[capture, qat], limit_train_batches=10, limit_val_batches=1
    )
    trainer.fit(model, datamodule=digits)
    # The child the forward calls was replaced by its graph; no method of the model was touched.
    assert isinstance(model.net, QuantizedGraphModule) and model.net.converted
    assert list(model._modules) == ["net", "train_acc", "val_acc", "test_acc"] and "forward" not in vars(
        model
    )
    assert type(qat._stashed["net"]) is nn.Sequential  # the float module it took the place of
    with torch.no_grad():
        real = model(capture.x)
    assert (real.argmax(1) == capture.logits.argmax(1)).float().mean() >= 0.98
    fake_accuracy = (capture.logits.argmax(1) == next(iter(digits.val_dataloader()))[1]).float().mean()
    validated = trainer.validate(model, datamodule=digits, verbose=False)[0]["val_acc"]
    assert validated == pytest.approx(float(fake_accuracy), abs=0.02)


class TwoChildren(ImageClassifier):
    """A forward that spreads the model over two children: the features, then a head."""

    def __init__(self):
        super().__init__("small_cnn")
        self.features, self.head = self.net[:8], self.net[8:]
        del self.net

    def forward(self, x):
        return self.head(self.features(x))


def test_without_module_each_child_the_forward_calls_becomes_its_own_graph(tmp_path, digits):
    qat = QuantizationAwareTraining(start=0.0)
    model = TwoChildren()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=4, limit_val_batches=1), callbacks=[qat])
    trainer.fit(model, datamodule=digits)
    assert isinstance(model.features, QuantizedGraphModule) and model.features.converted
    assert isinstance(model.head, QuantizedGraphModule) and model.head.converted
    # Every conv and linear weight is int8, in the graph of its own child.
    int8 = {name.split(".")[0] for name, p in model.named_parameters() if p.dtype == torch.int8}
    assert int8 == {"features", "head"}
    assert sum(p.dtype == torch.int8 for p in model.parameters()) == 4
    assert qat.parity["argmax_agreement"] >= 0.95


class DataDependentClassifier(ImageClassifier):
    """Python control flow on the data in the LightningModule's forward, around the child it calls."""

    def forward(self, x):
        if x.mean() > 0:
            return self.net(x)
        return -self.net(x)


def test_a_forward_torch_export_cannot_trace_quantizes_the_child_it_calls(tmp_path, digits):
    qat = QuantizationAwareTraining(start=0.0)
    model = DataDependentClassifier("small_cnn")
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=4, limit_val_batches=1), callbacks=[qat])
    trainer.fit(model, datamodule=digits)
    assert isinstance(model.net, QuantizedGraphModule) and model.net.converted
    assert qat.parity["argmax_agreement"] >= 0.95


class WithFloatHead(ImageClassifier):
    """The quantized `net` followed by a part that stays float: Lightning's bf16-mixed applies to that part."""

    def __init__(self):
        super().__init__("small_cnn")
        self.head = nn.Linear(10, 10)

    def forward(self, x):
        return self.head(self.net(x))


def test_bf16_mixed_runs_the_quantized_part_in_fp32(tmp_path, digits):
    class RecordDtypes(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            # Inside the Trainer's own autocast context (training_step runs under it) the dtypes are the
            # same; here it is re-entered for the check.
            with trainer.precision_plugin.forward_context():
                features = pl_module.net(batch[0])
                self.dtypes = (features.dtype, pl_module.head(features).dtype)

    record = RecordDtypes()
    qat = QuantizationAwareTraining(module="net", convert=False)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, precision="bf16-mixed"), callbacks=[qat, record])
    trainer.fit(WithFloatHead(), datamodule=digits)
    assert record.dtypes == (torch.float32, torch.bfloat16)
    assert trainer.callback_metrics["val_acc"] > 0.5


class DataDependentBlock(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.body = net

    def forward(self, x):
        if x.mean() > 0:
            return self.body(x)
        return -self.body(x)


class DataDependentChild(ImageClassifier):
    """The child the forward calls has Python control flow on the data."""

    def __init__(self, arch):
        super().__init__(arch)
        self.net = DataDependentBlock(self.net)


@pytest.mark.parametrize(
    ("model", "qat", "trainer_overrides", "match"),
    [
        (
            DataDependentChild,
            {},
            {},
            r"DataDependentChild.net \(`module=None`\).*if x.mean\(\) > 0.*module='net.body'",
        ),
        (ImageClassifier, {"module": "nett"}, {}, "no such submodule.*Did you mean 'net'"),
        (ImageClassifier, {"module": "net"}, {"precision": "bf16-true"}, "precision='bf16-true'"),
        (ImageClassifier, {"module": "net", "start": 1.0}, {}, "without ever training with quantization"),
        (ImageClassifier, {"module": "net", "start": 0.5, "freeze_observers": 0.2}, {}, "frozen before"),
        (
            ImageClassifier,
            {"scheme": "int4-weight-only", "module": "net"},
            {},
            "cannot be converted on this machine",
        ),
    ],
)
def test_bad_setup_fails_before_any_training_step(tmp_path, digits, model, qat, trainer_overrides, match):
    counter = RecordSteps()
    trainer = pl.Trainer(
        **trainer_kwargs(tmp_path, **trainer_overrides),
        callbacks=[QuantizationAwareTraining(**qat), counter],
    )
    with pytest.raises(ValueError, match=match):
        trainer.fit(model("small_cnn"), datamodule=digits)
    assert counter.steps == []


def test_pruning_listed_after_qat_takes_effect_first(tmp_path, digits):
    qat, pruning = QuantizationAwareTraining(module="net"), GradualPruning(amount=0.5)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=2), callbacks=[qat, pruning])
    trainer.fit(ImageClassifier("small_cnn"), datamodule=digits)
    assert compression_callbacks(trainer) == [pruning, qat]
    assert trainer.callbacks.index(qat) < trainer.callbacks.index(pruning)  # the user's list, as given
    assert pruning.current_amount == 0.5 and qat.converted


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"scheme": "int3"}, ValueError, "Unknown `scheme='int3'`"),
        ({"bits": 4}, ValueError, "`bits=4` is not available with `scheme='int8'`"),
        ({"scheme": "intx-weight-only", "bits": 9}, ValueError, "`bits=9` is out of range"),
        ({"scheme": "intx-weight-only", "bits": 0}, ValueError, "`bits=0` is out of range"),
        ({"scheme": "int4-weight-only", "bits": 2}, ValueError, "4-bit weights"),
        ({"scheme": "intx-weight-only", "group_size": 0}, ValueError, "`group_size=0`"),
        ({"group_size": 32}, ValueError, "`group_size` applies to the low-bit schemes"),
        ({"start": 1.5}, ValueError, "`start=1.5` is outside"),
        ({"module": ""}, ValueError, "must be a submodule name"),
        ({"bits": 8.0}, TypeError, "must be an integer"),
        ({"scheme": "intx-weight-only", "export_path": "m.pt2"}, ValueError, "`export_path` saves"),
        ({"scheme": "intx-weight-only", "freeze_observers": 0.8}, ValueError, "apply to `scheme='int8'`"),
        ({"scheme": "intx-weight-only", "measure": True}, ValueError, "`measure=True` compiles"),
        ({"scheme": "int8-dynamic-intx", "freeze_bn": 0.5}, ValueError, "apply to `scheme='int8'`"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        QuantizationAwareTraining(**kwargs)


# -- low-bit weight schemes (QATConfig) --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scheme", "bits", "accuracy"), [("intx-weight-only", 4, 0.8), ("int8-dynamic-intx", 2, 0.6)]
)
def test_low_bit_schemes_train_and_convert_exactly(tmp_path, digits, scheme, bits, accuracy):
    from torchao.quantization import IntxUnpackedToInt8Tensor

    qat = QuantizationAwareTraining(scheme=scheme, bits=bits, group_size=4, module="net", start=0.3)
    model = ImageClassifier("lenet_300_100")
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=2), callbacks=[qat])
    trainer.fit(model, datamodule=digits)
    for index in (1, 3, 5):
        weight = model.net[index].weight
        assert isinstance(weight, IntxUnpackedToInt8Tensor)
        codes = weight.qdata
        assert codes.min() >= -(2 ** (bits - 1)) and codes.max() <= 2 ** (bits - 1) - 1
        assert len(codes.unique()) > 2 ** (bits - 1)
    assert qat.parity["max_abs_diff"] < 1e-4 and qat.parity["argmax_agreement"] == 1.0
    assert qat.storage_formats(model)["net.1.weight"].bits == bits
    assert trainer.validate(model, datamodule=digits, verbose=False)[0]["val_acc"] > accuracy


def test_low_bit_group_size_must_divide_every_layer(tmp_path, digits):
    qat = QuantizationAwareTraining(scheme="intx-weight-only", group_size=32, module="net")
    trainer = pl.Trainer(**trainer_kwargs(tmp_path), callbacks=[qat])
    with pytest.raises(ValueError, match=r"net.3 \(in_features=300\).*Choose a divisor"):
        trainer.fit(ImageClassifier("lenet_300_100"), datamodule=digits)


# -- distributed ------------------------------------------------------------------------------------------


def test_ddp_two_processes_train_and_agree_on_the_quantization_at_conversion(tmp_path):
    run_worker("_ddp_qat.py", tmp_path)
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert rank0["world_size"] == 2
    # Each process observed its own half of the data, so the ranges differed before conversion ...
    assert any(not torch.equal(a, b) for a, b in zip(rank0["ranges"], rank1["ranges"], strict=True))
    # ... and the converted int8 models are identical.
    assert rank0["converted"].keys() == rank1["converted"].keys()
    for name, value in rank0["converted"].items():
        assert torch.equal(value, rank1["converted"][name]), name
    assert rank0["parity"]["relative_error"] < 0.02


def test_a_new_qat_callback_on_a_model_converted_by_an_earlier_fit_names_the_fix(tmp_path):
    pl.seed_everything(0, verbose=False)
    model = _tiny_classifier()
    pl.Trainer(**trainer_kwargs(tmp_path, max_steps=2), callbacks=[QuantizationAwareTraining()]).fit(
        model, _tiny_loader()
    )
    assert model.net.converted
    again = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=2), callbacks=[QuantizationAwareTraining()])
    with pytest.raises(
        ValueError, match=r"\['net'\] already holds an int8 graph .*Pass the callback of that fit"
    ):
        again.fit(model, _tiny_loader())


def test_int8_counts_as_quantized_only_the_weights_it_quantizes():
    from lightning_compress.quantization.int8_qat import Int8Parts

    class Sequence1d(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv1d(4, 8, 3, padding=1), nn.Linear(8, 4)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).mean(-1))

    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("net", Sequence1d())
    parts = Int8Parts(QuantizationConfig())
    parts.example = torch.randn(2, 4, 16)
    parts.prepare(model)
    model(torch.randn(8, 4, 16))  # the observers see data
    # The x86 quantizer has no Conv1d pattern: its weight is never fake-quantized, and stays float32.
    assert list(parts.weight_names) == ["net.fc.weight"]
    assert parts.float_layers == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        parts.convert(model)
    assert list(parts.weight_names) == ["net.fc.weight"]
    assert model.net.graph.get_parameter("conv.weight").dtype == torch.float32
    assert parts.sizes(model, list(parts.weight_names))["layers_quantized"] == 0.5


def test_only_weights_count_as_quantized_not_a_layer_norm_before_a_quantized_input():
    from lightning_compress.quantization.pt2e import prepare_int8_qat, quantized_weight_names

    conv_bn = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LayerNorm(36))
    model = nn.Sequential(*conv_bn, nn.Linear(36, 2))
    prepared = prepare_int8_qat(model, (torch.randn(2, 1, 5, 5),))
    # The conv's weight reaches its quantizer through the batch-norm folding; the layer norm's weight only feeds
    # the activation that the Linear's input quantizer sees.
    assert sorted(quantized_weight_names(prepared.graph)) == ["0.weight", "5.weight"]
