import copy
import csv
import inspect
import io
import json
import tempfile
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from examples.models import ImageClassifier
from lightning_compress import CompressionMonitor
from lightning_compress.callback import CompressionCallback
from lightning_compress.stats import TensorFormat, count_parameters
from tests._ddp import run_worker
from tests.conftest import NetClassifier, RecordSteps, trainer_kwargs


class ZeroHalfOfFirstLinear(CompressionCallback):
    """Stands in for a pruning callback: zeroes half of a layer's weights at every batch end, and declares the
    layer stored at 8 bits (the monitor reads the declarations of compression callbacks)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        with torch.no_grad():
            w = pl_module.net[8].weight
            w.view(-1)[: w.numel() // 2] = 0.0

    def storage_formats(self, pl_module):
        return {"net.8.weight": TensorFormat(bits=8)}


def _read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def _fit(tmp_path, digits, logger, monitor, extra=()):
    model = ImageClassifier("small_cnn", input_shape=(1, 8, 8))
    trainer = pl.Trainer(
        **trainer_kwargs(tmp_path, max_epochs=2, logger=logger, log_every_n_steps=1),
        callbacks=[monitor, *extra],
        limit_train_batches=6,
        limit_val_batches=1,
    )
    trainer.fit(model, datamodule=digits)
    return trainer, model


def test_csv_logger_receives_step_and_epoch_metrics(tmp_path, digits):
    logger = CSVLogger(tmp_path, name="csv")
    monitor = CompressionMonitor(log_every_n_steps=2, per_layer=True, measure_latency=False, verbose=False)
    trainer, model = _fit(tmp_path, digits, logger, monitor, extra=[ZeroHalfOfFirstLinear()])
    rows = _read_csv(f"{logger.log_dir}/metrics.csv")
    step_rows = [r for r in rows if r.get("compression/macs")]
    # 2 epochs x 6 steps, logged after optimizer steps 2, 4, ..., 12 under Lightning's 0-based index of the
    # step just taken (where the loss goes too); the two epoch-end entries fall on steps 5 and 11.
    logged_steps = sorted({int(r["step"]) for r in step_rows})
    assert logged_steps == [1, 3, 5, 7, 9, 11]
    first_linear = model.net[8].weight
    expected_layer_sparsity = (first_linear == 0).float().mean().item()
    last = step_rows[-1]
    assert float(last["compression/per_layer/sparsity/net.8.weight"]) == pytest.approx(
        expected_layer_sparsity, abs=1e-6
    )
    total = count_parameters(model)
    nonzero = sum(int((p != 0).sum()) for p in model.parameters())
    assert float(last["compression/params"]) == total
    assert float(last["compression/nonzero_params"]) == nonzero
    assert float(last["compression/sparsity"]) == pytest.approx(1 - nonzero / total, abs=1e-6)
    # small_cnn on 8x8: conv 1->16 (64*9*16) + conv 16->32 (64*9*16*32) + fc 512->64 + fc 64->10
    assert float(last["compression/macs"]) == 64 * 9 * 16 + 64 * 9 * 16 * 32 + 512 * 64 + 64 * 10
    assert float(last["compression/compression_rate"]) == pytest.approx(total / nonzero, rel=1e-6)
    # The epoch-end values also reach callback_metrics (usable by ModelCheckpoint / EarlyStopping).
    assert trainer.callback_metrics["compression/nonzero_params"].item() == nonzero


def test_tensorboard_event_file_holds_the_metrics(tmp_path, digits):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb")
    monitor = CompressionMonitor(log_every_n_steps=3, measure_latency=False, verbose=False)
    _, model = _fit(tmp_path, digits, logger, monitor, extra=[ZeroHalfOfFirstLinear()])
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    tags = events.Tags()["scalars"]
    assert "compression/sparsity" in tags and "compression/final/compression_rate" in tags
    sparsity = events.Scalars("compression/sparsity")
    assert sorted({e.step for e in sparsity}) == [2, 5, 8, 11]
    total = count_parameters(model)
    nonzero = sum(int((p != 0).sum()) for p in model.parameters())
    final_rate = events.Scalars("compression/final/compression_rate")[-1].value
    assert final_rate == pytest.approx(total / nonzero, rel=1e-5)


def test_report_before_after_json_and_storage_formats(tmp_path, digits, caplog):
    logger = CSVLogger(tmp_path, name="report")
    monitor = CompressionMonitor(latency_repeats=3, latency_threads=1)
    _, model = _fit(tmp_path, digits, logger, monitor, extra=[ZeroHalfOfFirstLinear()])
    path = tmp_path / "report" / "version_0" / "compression_report.json"
    report = json.loads(path.read_text())
    assert report == json.loads(json.dumps(monitor.report))
    before, after, summary = report["before"], report["after"], report["summary"]
    total = count_parameters(model)
    assert before["total_params"] == after["total_params"] == total
    w = model.net[8].weight
    half = w.numel() // 2
    assert after["layer_sparsity"]["net.8.weight"] == pytest.approx(half / w.numel())
    # net.8.weight is stored at 8 bits with a bitmask (sparse) or dense, whichever is smaller:
    dense_8bit = w.numel()
    sparse_8bit = (w.numel() - half) * 8 // 8 + (w.numel() + 7) // 8
    assert min(dense_8bit, sparse_8bit) == sparse_8bit
    assert after["raw_bytes"] == before["raw_bytes"]
    others = after["raw_bytes"] - w.numel() * 4
    assert after["compressed_bytes"] <= others + sparse_8bit
    assert summary["size_ratio"] == pytest.approx(before["raw_bytes"] / after["compressed_bytes"])
    (latency,) = report["latency"]
    assert latency["before_ms"] > 0 and latency["after_ms"] > 0
    assert (latency["batch_size"], latency["mode"]) == (1, "eager")
    table = next(r.getMessage() for r in caplog.records if "Compression report" in r.getMessage())
    assert f"{total:,}" in table and f"{summary['size_ratio']:.2f}x" in table


def test_monitor_reports_after_other_callbacks_whatever_the_order(tmp_path, digits):
    class ZeroAtTrainEnd(Callback):
        def on_train_end(self, trainer, pl_module):
            with torch.no_grad():
                pl_module.net[10].weight.zero_()

    monitor = CompressionMonitor(measure_latency=False, verbose=False)
    _fit(tmp_path, digits, False, monitor, extra=[ZeroAtTrainEnd()])
    assert monitor.report["after"]["layer_sparsity"]["net.10.weight"] == 1.0


def test_monitor_state_survives_checkpoint(tmp_path):
    monitor = CompressionMonitor(measure_latency=False)
    from lightning_compress.stats import compression_stats

    monitor.before = compression_stats(torch.nn.Linear(3, 2))
    restored = CompressionMonitor()
    restored.load_state_dict(monitor.state_dict())
    assert restored.before == monitor.before


# Every constructor argument; docs/monitor.md ("What fails early") lists the same rows. `example_input` needs
# the model: see the setup tests below.
BAD_ARGUMENTS = [
    ({"log_every_n_steps": 0}, ValueError, "`log_every_n_steps=0` must be a positive integer or None"),
    (
        {"log_every_n_steps": True},
        ValueError,
        "`log_every_n_steps=True` must be a positive integer or None",
    ),
    ({"log_on_epoch_end": "yes"}, TypeError, "`log_on_epoch_end='yes'` must be True or False"),
    ({"per_layer": 1}, TypeError, "`per_layer=1` must be True or False"),
    ({"metrics": "val_acc"}, TypeError, "`metrics='val_acc'` must be a list of logged names"),
    (
        {"metrics": ["val_acc", ""]},
        TypeError,
        "`metrics=\\['val_acc', ''\\]` must be a list of logged names",
    ),
    ({"measure_latency": None}, TypeError, "`measure_latency=None` must be True or False"),
    ({"latency_batch_size": 0}, ValueError, "`latency_batch_size=0` must be a positive integer or None"),
    (
        {"latency_mode": "jit"},
        ValueError,
        "`latency_mode='jit'` must be one of 'auto', 'eager', 'compiled'",
    ),
    ({"latency_repeats": 0}, ValueError, "`latency_repeats=0` must be a positive integer"),
    ({"latency_repeats": True}, ValueError, "`latency_repeats=True` must be a positive integer"),
    ({"latency_threads": 0}, ValueError, "`latency_threads=0` must be a positive integer or None"),
    (
        {"report_path": 3},
        TypeError,
        "`report_path=3` must be a file path \\(str or os.PathLike\\), or None",
    ),
    ({"report_path": "."}, ValueError, "`report_path='.'` is a directory; give a file name, e.g. "),
    ({"plots": "yes"}, TypeError, "`plots='yes'` must be True or False"),
    ({"prefix": None}, TypeError, "`prefix=None` must be a string such as 'compression/'"),
    ({"verbose": "no"}, TypeError, "`verbose='no'` must be True or False"),
]


@pytest.mark.parametrize(("kwargs", "error", "match"), BAD_ARGUMENTS)
def test_bad_arguments_fail_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        CompressionMonitor(**kwargs)


def test_every_constructor_argument_has_a_row():
    covered = {name for kwargs, _, _ in BAD_ARGUMENTS for name in kwargs}
    covered.add("example_input")  # needs the model: checked at setup, tested below
    assert covered == set(inspect.signature(CompressionMonitor).parameters)


class TinyNet(NetClassifier):
    """Conv 1->2 (3x3) on 1x5x5 then Linear 18->3: 2*3*3 positions * 9 + 18*3 = 216 MACs per sample."""

    def __init__(self, example_batch=1):
        net = torch.nn.Sequential(
            torch.nn.Conv2d(1, 2, 3, bias=False), torch.nn.Flatten(), torch.nn.Linear(18, 3)
        )
        super().__init__(net, example_input_array=torch.zeros(example_batch, 1, 5, 5))


def _tiny_loader():
    generator = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(
        torch.randn(16, 1, 5, 5, generator=generator), torch.randint(0, 3, (16,), generator=generator)
    )
    return torch.utils.data.DataLoader(data, batch_size=8)


def _tiny_fit(tmp_path, monitor, model=None, extra=(), **overrides):
    model = model or TinyNet()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, **overrides), callbacks=[monitor, *extra])
    trainer.fit(model, train_dataloaders=_tiny_loader())
    return trainer, model


def test_the_report_core_compares_two_plain_modules_without_a_trainer():
    from lightning_compress.reporting import (
        ModelMeter,
        assemble_report,
        final_values,
        format_report,
        measure_latency_pair,
    )

    original = TinyNet().net  # conv 1->2 (no bias, 18 weights), linear 18->3 (54 weights, 3 biases)
    final = copy.deepcopy(original)
    with torch.no_grad():
        final[2].weight[:, :9] = 0.0  # 27 of the 54 linear weights
    meter = ModelMeter(torch.zeros(1, 1, 5, 5))
    before, after = meter.stats(original), meter.stats(final, {"2.weight": TensorFormat(bits=8)})
    latency = measure_latency_pair(original, final, meter.example, batch_size=2, repeats=2)
    report = assemble_report(before, after, {"val_acc": {"before": 0.5, "after": 0.75}}, latency)
    assert before.macs == after.macs == 216
    assert report["summary"]["compression_rate"] == pytest.approx(75 / 48)
    # conv weight 18 fp32 = 72 bytes; linear weight at 8 bits with a bitmask: 27 * 8 + 54 bits = 34 bytes; bias 12
    assert after.compressed_bytes == 72 + 34 + 12 and report["summary"]["size_ratio"] == pytest.approx(
        300 / 118
    )
    assert [(row["batch_size"], row["mode"]) for row in latency] == [(1, "eager"), (2, "eager")]
    values = final_values(report)
    assert values["final/params_after"] == 48 and values["final/val_acc_after"] == 0.75
    assert values["final/speedup_batch2"] == latency[1]["speedup"]
    table = format_report(report)
    assert "val_acc 0.5000 0.7500" in " ".join(table.split()) and "latency ms, batch 2 (eager)" in table


@pytest.mark.parametrize("example_batch", [1, 2, 5])
def test_macs_are_counted_for_one_sample_whatever_the_example_batch(tmp_path, example_batch):
    monitor = CompressionMonitor(measure_latency=False, verbose=False)
    _tiny_fit(tmp_path, monitor, TinyNet(example_batch))
    hand_count = (2 * 3 * 3) * (3 * 3) + 18 * 3
    assert monitor.report["before"]["macs"] == monitor.report["after"]["macs"] == hand_count == 216


class InstallConvertedGraph(Callback):
    """Stands in for QuantizationAwareTraining(scheme="int8"): leaves a converted graph in the final model."""

    def on_train_end(self, trainer, pl_module):
        from lightning_compress.quantization.pt2e import QuantizedGraphModule

        pl_module.net = QuantizedGraphModule(torch.fx.symbolic_trace(pl_module.net), converted=True)


def _record_compiles(monkeypatch):
    import lightning_compress.quantization.pt2e as pt2e

    compiled = []

    def fake_compile(module, dynamic=False):
        compiled.append(module)
        return module

    monkeypatch.setattr(pt2e, "compile_for_cpu", fake_compile)
    return compiled


def test_int8_converted_model_is_timed_compiled_and_the_original_alike(tmp_path, monkeypatch, caplog):
    compiled = _record_compiles(monkeypatch)
    monitor = CompressionMonitor(latency_batch_size=4, latency_repeats=2)
    _, model = _tiny_fit(tmp_path, monitor, extra=[InstallConvertedGraph()])
    # Both the original and the final model go through compile_for_cpu, once each.
    assert len(compiled) == 2
    assert type(compiled[0].net) is torch.nn.Sequential and compiled[1] is model
    rows = monitor.report["latency"]
    assert [(r["batch_size"], r["mode"]) for r in rows] == [(1, "compiled"), (4, "compiled")]
    assert all(r["speedup"] == pytest.approx(r["before_ms"] / r["after_ms"]) for r in rows)
    table = next(r.getMessage() for r in caplog.records if "Compression report" in r.getMessage())
    assert "latency ms, batch 1 (compiled)" in table and "latency ms, batch 4 (compiled)" in table


def test_float_model_is_timed_eager_at_batch_one_and_the_chosen_batch(tmp_path, monkeypatch):
    compiled = _record_compiles(monkeypatch)
    logger = CSVLogger(tmp_path, name="csv")
    monitor = CompressionMonitor(latency_batch_size=3, latency_repeats=2, verbose=False)
    _tiny_fit(tmp_path, monitor, logger=logger)
    assert compiled == []
    rows = monitor.report["latency"]
    assert [(r["batch_size"], r["mode"]) for r in rows] == [(1, "eager"), (3, "eager")]
    final = _read_csv(f"{logger.log_dir}/metrics.csv")[-1]
    assert float(final["compression/final/speedup"]) == pytest.approx(rows[0]["speedup"], rel=1e-6)
    assert float(final["compression/final/speedup_batch3"]) == pytest.approx(rows[1]["speedup"], rel=1e-6)


def test_latency_mode_compiled_on_request(tmp_path, monkeypatch):
    compiled = _record_compiles(monkeypatch)
    monitor = CompressionMonitor(latency_mode="compiled", latency_repeats=1, verbose=False)
    _tiny_fit(tmp_path, monitor)
    assert len(compiled) == 2
    assert [r["mode"] for r in monitor.report["latency"]] == ["compiled"]


def _accuracy(model, digits, limit):
    model.eval()
    hits = total = 0
    with torch.no_grad():
        for i, (x, y) in enumerate(digits.val_dataloader()):
            if i == limit:
                break
            hits += int((model(x).argmax(1) == y).sum())
            total += len(y)
    return hits / total


def test_metrics_before_and_after_equal_an_independent_evaluation(tmp_path, digits, caplog):
    import copy

    model = ImageClassifier("small_cnn", input_shape=(1, 8, 8), lr=1e-2)
    untrained = copy.deepcopy(model)
    monitor = CompressionMonitor(metrics=["val_acc"], measure_latency=False)
    trainer = pl.Trainer(
        **trainer_kwargs(tmp_path, max_epochs=1),
        callbacks=[monitor, ZeroHalfOfFirstLinear()],
        limit_train_batches=10,
        limit_val_batches=2,
    )
    trainer.fit(model, datamodule=digits)
    values = monitor.report["metrics"]["val_acc"]
    assert values["before"] == pytest.approx(_accuracy(untrained, digits, limit=2), abs=1e-6)
    assert values["after"] == pytest.approx(_accuracy(model, digits, limit=2), abs=1e-6)
    assert values["after"] > values["before"] + 0.2  # ten steps of training on digits
    table = next(r.getMessage() for r in caplog.records if "Compression report" in r.getMessage())
    assert f"val_acc {values['before']:.4f}" in " ".join(table.split())
    assert f"{values['after']:.4f}" in table


def test_unknown_metric_fails_at_the_first_validation(tmp_path, digits):
    monitor = CompressionMonitor(metrics=["val_accuracy"], measure_latency=False, verbose=False)
    steps = RecordSteps()
    model = ImageClassifier("small_cnn", input_shape=(1, 8, 8))
    trainer = pl.Trainer(
        **trainer_kwargs(tmp_path, max_epochs=3),
        callbacks=[monitor, steps],
        limit_train_batches=2,
        limit_val_batches=1,
    )
    with pytest.raises(ValueError, match=r"`metrics`: \['val_accuracy'\] not logged.*'val_acc'"):
        trainer.fit(model, datamodule=digits)
    assert steps.steps == [0, 1]


def test_metrics_without_validation_fail_at_setup(tmp_path):
    monitor = CompressionMonitor(metrics=["val_acc"], measure_latency=False)
    with pytest.raises(ValueError, match="has no `validation_step`"):
        _tiny_fit(tmp_path, monitor)


def test_metrics_with_validation_turned_off_fail_at_setup(tmp_path, digits):
    steps = RecordSteps()
    monitor = CompressionMonitor(metrics=["val_acc"], measure_latency=False)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, limit_val_batches=0), callbacks=[monitor, steps])
    with pytest.raises(
        ValueError,
        match="`metrics=\\['val_acc'\\]` are read from validation, but `limit_val_batches=0` turns it off",
    ):
        trainer.fit(ImageClassifier("small_cnn"), datamodule=digits)
    assert steps.steps == []


def test_without_logger_no_report_file_is_written_to_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    reports = []
    for _ in range(2):
        monitor = CompressionMonitor(measure_latency=False, verbose=False)
        _tiny_fit(tmp_path, monitor, default_root_dir=None)
        reports.append(monitor.report)
    assert sorted(p.name for p in tmp_path.rglob("*")) == []
    assert reports[0]["after"]["macs"] == 216 and reports[1] is not reports[0]


def test_report_path_is_written_where_asked(tmp_path):
    path = tmp_path / "out" / "report.json"
    monitor = CompressionMonitor(measure_latency=False, verbose=False, report_path=path)
    _tiny_fit(tmp_path, monitor)
    assert json.loads(path.read_text())["after"]["macs"] == 216


def test_report_path_to_a_directory_fails_at_construction(tmp_path):
    with pytest.raises(
        ValueError, match=f"`report_path='{tmp_path}'` is a directory; give a file name, e.g. "
    ):
        CompressionMonitor(report_path=tmp_path)


@pytest.mark.parametrize("kind", ["under_a_file", "read_only_directory"])
def test_unwritable_report_path_fails_at_setup(tmp_path, monkeypatch, kind):
    if kind == "under_a_file":
        (tmp_path / "file").write_text("")
        path = tmp_path / "file" / "report.json"
        match = f"`report_path='{path}'` cannot be created: '{tmp_path / 'file'}' is a file, not a directory"
    else:
        path = tmp_path / "locked" / "report.json"
        path.parent.mkdir()
        match = f"`report_path='{path}'` is not writable: files cannot be created in '{path.parent}'"
    monitor = CompressionMonitor(measure_latency=False, report_path=path)
    if kind == "read_only_directory":
        # A read-only directory, also when the tests run as root (who may write anywhere).
        real_mkstemp = tempfile.mkstemp

        def refuse(*args, dir=None, **kwargs):
            if dir is not None and Path(dir) == path.parent:
                raise PermissionError(13, "Permission denied")
            return real_mkstemp(*args, dir=dir, **kwargs)

        monkeypatch.setattr(tempfile, "mkstemp", refuse)
    steps = RecordSteps()
    with pytest.raises(ValueError, match=match):
        _tiny_fit(tmp_path, monitor, extra=[steps])
    assert steps.steps == []
    assert not path.exists() and (kind == "under_a_file" or list(path.parent.iterdir()) == [])


@pytest.mark.parametrize("where", ["example_input", "example_input_array"])
def test_example_input_the_model_rejects_fails_at_setup(tmp_path, where):
    model = TinyNet()
    wrong = torch.zeros(4, 1, 4, 4)  # the model takes 1x5x5 images
    if where == "example_input":
        monitor = CompressionMonitor(example_input=wrong, measure_latency=False)
    else:
        model.example_input_array = wrong
        monitor = CompressionMonitor(measure_latency=False)
    steps = RecordSteps()
    with pytest.raises(
        ValueError,
        match=f"`{where}` of shape \\(1, 1, 4, 4\\) \\(its first sample\\) was rejected by TinyNet: "
        "RuntimeError: mat1 and mat2 shapes cannot be multiplied .* Pass an input the model's forward accepts",
    ):
        _tiny_fit(tmp_path, monitor, model=model, extra=[steps])
    assert steps.steps == []


def _write_text_half(self, data, *args, **kwargs):
    # Half of the text reaches the file, then the disk is full.
    with open(self, "w") as f:
        f.write(data[: len(data) // 2])
    raise OSError(28, "No space left on device")


def _savefig_half(real_savefig):
    def savefig(self, target, *args, **kwargs):
        buffer = io.BytesIO()
        real_savefig(self, buffer, *args, **kwargs)
        Path(target).write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        raise OSError(28, "No space left on device")

    return savefig


def test_an_interrupted_report_write_leaves_the_previous_report_and_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "out" / "report.json"
    monitor = CompressionMonitor(measure_latency=False, verbose=False, report_path=path)
    _tiny_fit(tmp_path, monitor)
    previous = path.read_text()
    assert json.loads(previous)["after"]["macs"] == 216
    monkeypatch.setattr(Path, "write_text", _write_text_half)
    monitor = CompressionMonitor(measure_latency=False, verbose=False, report_path=path)
    with pytest.raises(OSError, match="No space left on device"):
        _tiny_fit(tmp_path, monitor, max_epochs=2)
    assert path.read_text() == previous
    assert sorted(p.name for p in path.parent.iterdir()) == ["report.json"]


def test_an_interrupted_plot_write_leaves_the_previous_plot_and_no_temporary_file(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    path = tmp_path / "out" / "report.json"
    monitor = CompressionMonitor(measure_latency=False, verbose=False, report_path=path, plots=True)
    _tiny_fit(tmp_path, monitor)
    names = ["report.json", "report.layers.png", "report.sizes.png", "report.steps.png"]
    assert sorted(p.name for p in path.parent.iterdir()) == names
    previous = {name: (path.parent / name).read_bytes() for name in names}
    monkeypatch.setattr(Figure, "savefig", _savefig_half(Figure.savefig))
    monitor = CompressionMonitor(measure_latency=False, verbose=False, report_path=path, plots=True)
    with pytest.raises(OSError, match="No space left on device"):
        _tiny_fit(tmp_path, monitor, max_epochs=2)
    assert sorted(p.name for p in path.parent.iterdir()) == names
    for name in names[1:]:
        assert (path.parent / name).read_bytes() == previous[name]
    # The report itself was complete and moved into place before the plots.
    assert json.loads(path.read_text())["before"] == json.loads(previous["report.json"])["before"]


class FakePruning(Callback):
    """Zeroes a growing share of the Linear weight and exposes the amount asked for, as GradualPruning does."""

    current_amount = 0.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.current_amount = min(0.5, 0.25 * trainer.global_step)
        with torch.no_grad():
            w = pl_module.net[2].weight.view(-1)
            w[: int(w.numel() * self.current_amount)] = 0.0


def test_plots_are_written_beside_the_report_and_sent_to_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb")
    monitor = CompressionMonitor(log_every_n_steps=1, measure_latency=False, verbose=False, plots=True)
    _tiny_fit(tmp_path, monitor, extra=[FakePruning()], logger=logger, max_epochs=2)
    assert [e["step"] for e in monitor.history] == [1, 2, 3, 4]
    assert [e["targets"]["FakePruning"] for e in monitor.history] == [0.25, 0.5, 0.5, 0.5]
    total = 18 + 54 + 3
    assert monitor.history[-1]["sparsity"] == pytest.approx(27 / total)
    for name in ("steps", "layers", "sizes"):
        file = tmp_path / "tb" / "version_0" / f"compression_report.{name}.png"
        assert monitor.figures[name] == file and file.stat().st_size > 10_000
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    assert sorted(events.Tags()["images"]) == [
        "compression/report/layers",
        "compression/report/sizes",
        "compression/report/steps",
    ]
    image = events.Images("compression/report/steps")[-1]
    assert image.step == 4 and image.width > 500 and len(image.encoded_image_string) > 10_000


def test_ddp_writes_the_report_into_the_loggers_directory_without_stalling(tmp_path):
    # `trainer.log_dir` is a collective call: resolved on rank zero alone at the end, the ranks would stall.
    result = run_worker("_ddp_monitor.py", tmp_path, timeout=240)
    # The epoch-level values are the same on both ranks, and reduced: Lightning does not ask for `sync_dist`.
    assert "sync_dist=True" not in result.stderr
    report = json.loads((tmp_path / "logs" / "run" / "version_0" / "compression_report.json").read_text())
    assert report["before"]["macs"] == report["after"]["macs"] == 216
    assert [torch.load(tmp_path / f"rank{r}.pt")["report"] for r in (0, 1)] == [True, True]


def test_a_monitor_reused_for_another_model_measures_that_model_before(tmp_path):
    # One monitor in a loop over models: each fit's report starts from its own model, not the first one's.
    monitor = CompressionMonitor(measure_latency=False, verbose=False)
    _tiny_fit(tmp_path / "first", monitor, max_steps=1)
    assert monitor.before.total_params == 2 * 9 + 18 * 3 + 3 and monitor.before.macs == 216
    wider = TinyNet()
    wider.net[2] = torch.nn.Linear(18, 5)
    _tiny_fit(tmp_path / "second", monitor, model=wider, max_steps=1)
    assert monitor.before.total_params == 2 * 9 + 18 * 5 + 5 and monitor.before.macs == 18 * 9 + 18 * 5
    assert monitor.report["before"]["total_params"] == monitor.before.total_params
