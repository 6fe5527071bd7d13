import csv
import json

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from examples.models import ImageClassifier
from lightning_compress import CompressionMonitor
from lightning_compress.stats import TensorFormat, count_parameters
from tests.conftest import trainer_kwargs


class ZeroHalfOfFirstLinear(Callback):
    """Stands in for a pruning callback: zeroes half of a layer's weights at every batch end."""

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
    # 2 epochs x 6 steps, logged at steps 2, 4, ..., 12 (step metrics) plus the two epoch-end entries.
    logged_steps = sorted({int(r["step"]) for r in step_rows})
    assert {2, 4, 6, 8, 10, 12} <= set(logged_steps)
    first_linear = model.net[8].weight
    expected_layer_sparsity = (first_linear == 0).float().mean().item()
    last = step_rows[-1]
    assert float(last["compression/sparsity/net.8.weight"]) == pytest.approx(
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
    assert [e.step for e in sparsity if e.step % 3 == 0][:4] == [3, 6, 9, 12]
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
    assert report["latency"]["before_ms"] > 0 and report["latency"]["after_ms"] > 0
    assert report["latency"]["batch_size"] == 1
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


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"log_every_n_steps": 0}, "log_every_n_steps"),
        ({"latency_repeats": 0}, "latency_repeats"),
        ({"latency_threads": 0}, "latency_threads"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CompressionMonitor(**kwargs)
