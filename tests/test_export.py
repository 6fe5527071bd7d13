import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from examples.models import ImageClassifier
from lightning_compress import GradualPruning, LowRankReplacement, check_writable, export
from lightning_compress.export import ExportError, atomic_write, to_plain_torch
from lightning_compress.low_rank import LowRankConv2d, LowRankLinear, TuckerConv2d
from lightning_compress.quantization.pt2e import QuantizedGraphModule, prepare_int8_qat, save_quantized
from lightning_compress.quantization.qat import QuantizationAwareTraining
from tests.conftest import trainer_kwargs

# The module, not the function `lightning_compress.export` that shadows it as a package attribute.
export_module = importlib.import_module("lightning_compress.export")
qat_module = importlib.import_module("lightning_compress.quantization.qat")
REPO = Path(__file__).resolve().parents[1]


def _images(n, seed):
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


class FailingSave:
    """Stands in for the int8 save of QuantizationAwareTraining: fails (a full disk, say) after conversion."""

    def __init__(self, probe):
        self.probe, self.handed_over, self.outputs = probe, None, None

    def __call__(self, reference, converted, inputs, export_path, measure):
        self.handed_over = converted
        with torch.no_grad():
            self.outputs = converted(self.probe)
        return None, None, OSError(28, "No space left on device")


def _fit(tmp, digits, callbacks, **overrides):
    pl.seed_everything(0, verbose=False)
    model = ImageClassifier("small_cnn")
    kwargs = trainer_kwargs(tmp, max_epochs=1, limit_train_batches=8, limit_val_batches=1, **overrides)
    trainer = pl.Trainer(**kwargs, callbacks=callbacks)
    return model, trainer


@pytest.fixture(scope="module")
def compressed(tmp_path_factory, digits):
    """One short fit per compression: structured pruning, unstructured masks, low rank, int8 QAT."""
    root = tmp_path_factory.mktemp("compressed")
    models = {}

    model, trainer = _fit(root, digits, [GradualPruning(amount=0.5, mode="structured", start=0.0, end=0.5)])
    trainer.fit(model, datamodule=digits)
    models["pruned"] = model

    model, trainer = _fit(root, digits, [GradualPruning(amount=0.8, start=0.0, end=0.5)])
    trainer.fit(model, datamodule=digits)
    models["masked"] = model

    model, trainer = _fit(root, digits, [LowRankReplacement(rank=0.5, method="svd", verbose=False)])
    trainer.fit(model, datamodule=digits)
    models["low_rank"] = model

    qat = QuantizationAwareTraining(module="net", start=0.0, export_path=root / "int8" / "model.pt2")
    save = FailingSave(_images(32, 7))
    model, trainer = _fit(root, digits, [qat])
    with pytest.MonkeyPatch.context() as patch, pytest.raises(RuntimeError) as failure:
        patch.setattr(qat_module, "ship_int8", save)
        trainer.fit(model, datamodule=digits)
    models["int8"] = model
    return {"models": models, "qat": qat, "save": save, "failure": failure.value, "root": root}


def test_compressed_models_have_the_structures_export_must_handle(compressed):
    models = compressed["models"]
    assert models["pruned"].net[0].out_channels == 8  # 16 channels, half removed
    weights = [m.weight for m in models["masked"].modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert zeros == pytest.approx(0.8, abs=0.01)
    factorized = (LowRankLinear, LowRankConv2d, TuckerConv2d)
    assert sum(isinstance(m, factorized) for m in models["low_rank"].modules()) >= 2
    assert isinstance(models["int8"].net, QuantizedGraphModule) and models["int8"].net.converted


def test_a_failed_save_keeps_the_converted_model_installed_and_usable(compressed):
    qat, save, model = compressed["qat"], compressed["save"], compressed["models"]["int8"]
    failure = compressed["failure"]
    message = str(failure)
    assert "export_path=" in message and "No space left on device" in message
    assert "converted model is installed" in message
    assert isinstance(failure.__cause__, OSError)
    assert qat.converted and model.net is save.handed_over and model.net.converted
    with torch.no_grad():
        assert torch.equal(model(save.probe), save.outputs)
    assert qat.parity["argmax_agreement"] >= 0.9
    assert not (compressed["root"] / "int8" / "model.pt2").exists()


def _export_all(compressed, root):
    """Every compressed model in every format: the LightningModule for the graph formats, its `net` for torch."""
    results = {}
    x = _images(64, 1)
    for name, model in compressed["models"].items():
        for fmt in ("torch", "export", "onnx"):
            target = model.net if fmt == "torch" else model
            path = root / (name + export_module._SUFFIX[fmt])
            results[name, fmt] = export(target, path, fmt, x, check_inputs=[_images(5, 2)])
    return results, x


@pytest.fixture(scope="module")
def exported(compressed, tmp_path_factory):
    root = tmp_path_factory.mktemp("exported")
    results, x = _export_all(compressed, root)
    return {"results": results, "x": x, "root": root}


@pytest.mark.parametrize("name", ["pruned", "masked", "low_rank"])
@pytest.mark.parametrize("fmt", ["torch", "export", "onnx"])
def test_float_models_export_with_parity(exported, name, fmt):
    result = exported["results"][name, fmt]
    assert result.format == fmt and not result.quantized and result.samples == 2
    assert result.bytes == os.path.getsize(result.path) > 0
    assert result.max_abs_diff <= result.tolerance < 1e-3
    assert result.argmax_agreement == 1.0
    assert result.session_config == {}


@pytest.mark.parametrize("fmt", ["torch", "export", "onnx"])
def test_int8_model_exports_with_parity(exported, fmt):
    result = exported["results"]["int8", fmt]
    assert result.quantized
    if fmt == "onnx":
        assert result.session_config == {"session.x64quantprecision": "1"}
        assert result.argmax_agreement >= result.min_agreement == 0.98
        assert result.max_abs_diff <= result.tolerance
    else:  # the same graph and kernels as in memory
        assert result.max_abs_diff == 0.0 and result.argmax_agreement == 1.0


def test_int8_files_are_smaller_than_the_float_files_and_onnx_holds_int8_weights(exported):
    import onnx

    results = exported["results"]
    for fmt in ("torch", "export", "onnx"):
        assert results["int8", fmt].bytes < 0.6 * results["masked", fmt].bytes, fmt
    graph = onnx.load(results["int8", "onnx"].path).graph
    int8 = [i for i in graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert len(int8) >= 3  # the conv and linear weights
    ops = {n.op_type for n in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops


def test_export_leaves_the_model_unchanged_and_swaps_package_classes_in_the_copy(compressed):
    model = compressed["models"]["low_rank"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kinds = [type(m) for m in model.modules()]
    plain = to_plain_torch(model.net)
    assert [type(m) for m in model.modules()] == kinds
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(type(m).__module__.startswith("lightning_compress") for m in plain.modules())
    assert sorted(plain.state_dict()) == sorted(model.net.state_dict())
    x = _images(16, 3)
    model.eval()
    with torch.no_grad():
        assert torch.equal(plain.eval()(x), model.net(x))


LOADER = r"""
import json, sys
sys.modules["lightning_compress"] = None
sys.modules["torchao"] = None
sys.modules["examples"] = None
sys.path = [p for p in sys.path if p not in ("", {repo!r})]
try:
    import lightning_compress  # noqa
    raise SystemExit("lightning_compress is importable")
except ImportError:
    pass
import onnxruntime
import torch
import torch.ao.quantization.fx._decomposed  # the quantized_decomposed ops of int8 graphs, part of torch

x = torch.load("inputs.pt")
report = {{}}
for name in {names!r}:
    expected = torch.load(f"{{name}}.expected.pt")
    loaded = {{
        "torch": torch.load(f"{{name}}.pt", weights_only=False),
        "export": torch.export.load(f"{{name}}.pt2").module(),
    }}
    for fmt, module in loaded.items():
        with torch.no_grad():
            report[f"{{name}}/{{fmt}}"] = float((module(x) - expected).abs().max())
    options = onnxruntime.SessionOptions()
    options.add_session_config_entry("session.x64quantprecision", "1")
    session = onnxruntime.InferenceSession(f"{{name}}.onnx", options, providers=["CPUExecutionProvider"])
    out = torch.from_numpy(session.run(None, {{session.get_inputs()[0].name: x.numpy()}})[0])
    report[f"{{name}}/onnx"] = float((out - expected).abs().max())
    report[f"{{name}}/onnx_agreement"] = float((out.argmax(1) == expected.argmax(1)).float().mean())
    report[f"{{name}}/torch_type"] = type(loaded["torch"]).__name__
print(json.dumps(report))
"""


def test_files_load_and_match_in_a_process_without_this_package(compressed, exported):
    root, x = exported["root"], exported["x"]
    names = ["pruned", "low_rank", "int8"]
    torch.save(x, root / "inputs.pt")
    for name in names:
        model = compressed["models"][name].eval()
        with torch.no_grad():
            torch.save(model(x), root / f"{name}.expected.pt")
    script = LOADER.format(repo=str(REPO), names=names)
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    for name in names:
        assert report[f"{name}/torch"] == 0.0 and report[f"{name}/export"] == 0.0, report
    assert report["pruned/onnx"] < 1e-4 and report["low_rank/onnx"] < 1e-4, report
    assert report["int8/onnx_agreement"] >= 0.98, report
    assert report["low_rank/torch_type"] == "Sequential" and report["int8/torch_type"].startswith(
        "GraphModule"
    )


# -- parity failures, atomic writes, paths ---------------------------------------------------------------


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def test_parity_failure_states_the_difference_and_keeps_the_previous_file(tmp_path, monkeypatch):
    model, x = _mlp(), torch.randn(6, 4)
    target = tmp_path / "model.pt2"
    first = export(model, target, "export", x)
    previous = target.read_bytes()
    loader = export_module._load

    def shifted(fmt, file, config):
        module = loader(fmt, file, config)
        return lambda *a, **k: module(*a, **k) + 0.5

    monkeypatch.setattr(export_module, "_load", shifted)
    with pytest.raises(ExportError, match=r"max \|difference\| 0\.5 .*argmax agreement 1\.0000") as info:
        export(model, target, "export", x)
    assert "Nothing was written" in str(info.value) and "atol" in str(info.value)
    assert target.read_bytes() == previous and os.listdir(tmp_path) == ["model.pt2"]
    # A looser tolerance accepts it and reports the difference.
    loose = export(model, target, "export", x, atol=0.6)
    assert loose.max_abs_diff == pytest.approx(0.5) and loose.tolerance == pytest.approx(0.6, abs=0.01)
    assert first.max_abs_diff == 0.0


@pytest.mark.parametrize("error", [RuntimeError("disk failure"), KeyboardInterrupt()])
@pytest.mark.parametrize("existing", [True, False])
def test_interrupted_write_leaves_the_previous_file_or_none_and_no_temporary(
    tmp_path, monkeypatch, error, existing
):
    model, x = _mlp(), torch.randn(6, 4)
    target = tmp_path / "model.pt"
    if existing:
        export(model, target, "torch", x)
    previous = target.read_bytes() if existing else None

    def broken(plain, args, kwargs, file):
        with open(file, "wb") as f:
            f.write(b"half a model")
        raise error

    monkeypatch.setitem(export_module._WRITERS, "torch", broken)
    with pytest.raises(type(error)):
        export(model, target, "torch", x)
    assert os.listdir(tmp_path) == (["model.pt"] if existing else [])
    if existing:
        assert target.read_bytes() == previous


def test_interrupted_save_quantized_keeps_the_previous_program(tmp_path, monkeypatch):
    model, x = _mlp().eval(), torch.randn(6, 4)
    target = tmp_path / "model.pt2"
    size = save_quantized(model, (x,), target)
    previous = target.read_bytes()

    def broken(program, file, **kwargs):
        Path(file).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch.export, "save", broken)
    with pytest.raises(OSError, match="No space"):
        save_quantized(model, (x,), target)
    assert target.read_bytes() == previous and len(previous) == size
    assert os.listdir(tmp_path) == ["model.pt2"]


def test_atomic_write_gives_the_file_the_usual_permissions(tmp_path):
    with atomic_write(tmp_path / "a.bin") as partial:
        Path(partial).write_bytes(b"x")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "a.bin").stat().st_mode & 0o777 == 0o666 & ~umask


def test_check_writable_names_the_argument_and_the_fix(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(
        ValueError, match=r"`report_path='.*'` is a directory; give a file path such as '.*model\.json'"
    ):
        check_writable(tmp_path, "report_path", ".json")
    with pytest.raises(ValueError, match=r"`export_path=.*` cannot be created: .*file\.txt' is a file"):
        check_writable(tmp_path / "file.txt" / "model.pt2", "export_path")
    with pytest.raises(TypeError, match=r"`export_path=3` must be a file path"):
        check_writable(3, "export_path")
    assert check_writable(tmp_path / "a" / "b" / "m.pt2", "export_path") == tmp_path / "a" / "b" / "m.pt2"
    assert sorted(os.listdir(tmp_path)) == ["file.txt"]  # nothing created, no probe left


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into read-only directories")
def test_check_writable_rejects_a_read_only_directory(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(ValueError, match="is not writable"):
            check_writable(locked / "m.pt2", "export_path")
    finally:
        locked.chmod(0o700)


@pytest.mark.parametrize(
    "where, match",
    [
        ("dir", r"`export_path='.*'` is a directory; give a file path such as '.*model\.pt2'"),
        ("under_file", r"`export_path='.*'` cannot be created: .* is a file"),
    ],
)
def test_unwritable_export_path_fails_at_construction(tmp_path, where, match):
    (tmp_path / "file.txt").write_text("x")
    path = tmp_path if where == "dir" else tmp_path / "file.txt" / "model.pt2"
    with pytest.raises(ValueError, match=match):
        QuantizationAwareTraining(module="net", export_path=path)


def test_bad_arguments_fail_before_writing(tmp_path):
    model, x = _mlp(), torch.randn(2, 4)
    with pytest.raises(ValueError, match=r"Unknown `format='tflite'`"):
        export(model, tmp_path / "m", "tflite", x)
    with pytest.raises(ValueError, match=r"`example_input` is needed"):
        export(model, tmp_path / "m.pt2")
    with pytest.raises(ValueError, match=r"`atol=-1` must be a finite number"):
        export(model, tmp_path / "m.pt2", example_input=x, atol=-1)
    with pytest.raises(TypeError, match=r"`check_inputs` must be a list"):
        export(model, tmp_path / "m.pt2", example_input=x, check_inputs=x)
    assert os.listdir(tmp_path) == []


def test_a_fake_quantized_graph_must_be_converted_first(tmp_path):
    prepared = prepare_int8_qat(_mlp(), (torch.randn(2, 4),))
    with pytest.raises(ValueError, match=r"fake-quantized .*convert_int8"):
        export(prepared, tmp_path / "m.pt2", "export", torch.randn(2, 4))
    assert os.listdir(tmp_path) == []


def _user_hook(module, args, output):
    return output


def test_hooks_registered_by_this_package_are_dropped_user_hooks_kept(tmp_path):
    from lightning_compress.quantization.qat import _ErrorRecorder

    model, x = _mlp(), torch.randn(3, 4)
    model.register_forward_hook(_ErrorRecorder())  # an object of this package
    model[0].register_forward_hook(_user_hook)
    plain = to_plain_torch(model)
    assert len(model._forward_hooks) == 1 and len(plain._forward_hooks) == 0
    assert len(plain[0]._forward_hooks) == 1
    result = export(model, tmp_path / "m.pt", "torch", x)
    loaded = torch.load(result.path, weights_only=False)
    assert len(loaded._forward_hooks) == 0 and len(loaded[0]._forward_hooks) == 1
    assert result.max_abs_diff == 0.0


def test_a_model_quantized_with_default_arguments_exports_in_every_format(tmp_path, digits):
    # `QuantizationAwareTraining()` replaces the child the forward calls (`net`) by its graph: export traces the
    # LightningModule's forward through it.
    model, trainer = _fit(tmp_path, digits, [QuantizationAwareTraining()])
    trainer.fit(model, datamodule=digits)
    x = _images(16, 3)
    with torch.no_grad():
        reference = model(x)
    for fmt in ("torch", "export", "onnx"):
        result = export(model, tmp_path / f"whole{export_module._SUFFIX[fmt]}", fmt, x)
        assert result.quantized and result.argmax_agreement == 1.0, fmt
        assert result.max_abs_diff <= result.tolerance, fmt
    loaded = torch.export.load(str(tmp_path / "whole.pt2")).module()
    assert torch.equal(loaded(x), reference)


def test_a_module_that_cannot_be_pickled_is_refused_by_the_torch_format_and_exports_in_the_others(tmp_path):
    from lightning_compress.quantization import quantize_low_bit

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))
    model = quantize_low_bit(net, "intx-weight-only", bits=4, group_size=32)
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match=r"`format='torch'` pickles the whole module.*`format='export'`"):
        export(model, tmp_path / "m.pt", "torch", x)
    assert os.listdir(tmp_path) == []
    assert export(model, tmp_path / "m.pt2", "export", x).max_abs_diff < 1e-5


def test_a_file_that_does_not_load_back_is_an_export_error_and_nothing_is_written(tmp_path, monkeypatch):
    # E.g. an int8 graph of an LSTM, whose pickle re-traces on `torch.load` and fails there.
    from lightning_compress.export import ExportError

    def fails(*args, **kwargs):
        raise RuntimeError("aten::zeros() Expected a value of type 'List[int]'")

    monkeypatch.setattr(torch, "load", fails)
    with pytest.raises(
        ExportError,
        match=r"'torch' file was written but does not load back \(RuntimeError: .*"
        r"Use `format='export' or 'onnx'`",
    ):
        export(nn.Linear(4, 2), tmp_path / "m.pt", "torch", torch.randn(2, 4))
    assert os.listdir(tmp_path) == []

    def missing(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'onnxruntime'")

    monkeypatch.setattr(torch, "load", missing)  # a missing runtime is not a file that does not load
    with pytest.raises(ModuleNotFoundError):
        export(nn.Linear(4, 2), tmp_path / "m.pt", "torch", torch.randn(2, 4))


class _Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.fc = nn.Embedding(10, 8), nn.Linear(8, 3)

    def forward(self, ids, mask):
        return self.fc(self.emb(ids) * mask.unsqueeze(-1)).sum(1)


@pytest.mark.parametrize("fmt", ["export", "onnx"])
def test_token_models_export_for_any_sequence_length(tmp_path, fmt):
    torch.manual_seed(0)
    model = _Tokens().eval()
    # Token ids and an integer attention mask, as a tokenizer gives them.
    example = (torch.randint(0, 10, (2, 6)), torch.ones(2, 6, dtype=torch.long))
    longer = (torch.randint(0, 10, (3, 11)), torch.ones(3, 11, dtype=torch.long))
    result = export(model, tmp_path / f"m.{fmt}", fmt, example, check_inputs=[longer])
    assert result.max_abs_diff < 1e-5


def test_an_int8_model_with_residual_adds_exports_to_onnx_and_loads_in_onnxruntime(tmp_path):
    import onnxruntime

    from examples.models import residual_cnn
    from lightning_compress.export import ONNX_QUANTIZED_SESSION_CONFIG
    from lightning_compress.quantization.pt2e import convert_int8

    torch.manual_seed(0)
    x = _images(16, 0)
    prepared = prepare_int8_qat(residual_cnn(widths=(8, 16)).eval(), (x,))
    for seed in range(4):  # the observers see a few batches
        prepared(_images(16, seed))
    converted = convert_int8(prepared)
    result = export(converted, tmp_path / "m.onnx", "onnx", x)
    assert result.quantized and result.argmax_agreement >= 0.98
    # The session options the check used, as deployment would (they made onnxruntime fail on shared parameters).
    options = onnxruntime.SessionOptions()
    for key, value in ONNX_QUANTIZED_SESSION_CONFIG.items():
        options.add_session_config_entry(key, value)
    session = onnxruntime.InferenceSession(result.path, options, providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert out.shape == (16, 10)


def test_an_int8_layer_called_twice_exports_to_onnx_and_loads_in_onnxruntime(tmp_path):
    from lightning_compress.quantization.pt2e import convert_int8

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.shared, self.out = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 4)

        def forward(self, x):
            return self.out(torch.relu(self.shared(torch.relu(self.shared(torch.relu(self.inp(x)))))))

    torch.manual_seed(0)
    x = torch.randn(32, 16)
    prepared = prepare_int8_qat(Twice().eval(), (x,))
    prepared(x)
    # The check loads the file with onnxruntime's `session.x64quantprecision`, which refused one DequantizeLinear
    # of the shared weight feeding both calls.
    result = export(convert_int8(prepared), tmp_path / "m.onnx", "onnx", x)
    assert result.quantized and result.argmax_agreement >= 0.98


@pytest.mark.parametrize("format", ["torch", "export", "onnx"])
def test_factorized_transformer_feed_forward_layers_export(tmp_path, format):
    # nn.TransformerEncoderLayer's eval path reads `linear1.weight`; the plain copy has no such attribute there.
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    layer.linear1, layer.linear2 = LowRankLinear(16, 32, rank=4), LowRankLinear(32, 16, rank=4)
    model = nn.Sequential(
        nn.Linear(8, 16), nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
    ).eval()
    x = torch.randn(2, 5, 8)
    path = tmp_path / f"model.{ {'torch': 'pt', 'export': 'pt2', 'onnx': 'onnx'}[format] }"
    export(model, path, format, x)  # raises when the file's outputs differ from the model's
    assert path.stat().st_size > 0 and isinstance(model[1].layers[0].linear1, LowRankLinear)
