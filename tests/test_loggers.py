"""Logged names and steps as real trackers receive them: MLflow's file store, TensorBoard, CSV, W&B offline."""

import csv
import json
import struct
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
from lightning.pytorch.loggers import CSVLogger, Logger, MLFlowLogger, TensorBoardLogger
from torch import nn

from examples.models import ImageClassifier
from lightning_compress import (
    BinaryWeights,
    CompressionMonitor,
    GradualPruning,
    KnowledgeDistillation,
    LowRankReplacement,
    QuantizationAwareTraining,
    WeightSharing,
)
from lightning_compress.distillation.callback import FeatureLoss
from tests.conftest import trainer_kwargs


class RecordingLogger(Logger):
    """Keeps every ``(step, name, value)`` the Trainer and the callbacks write."""

    def __init__(self):
        super().__init__()
        self.records = []

    @property
    def name(self):
        return "recording"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.records.extend((step, name, float(value)) for name, value in metrics.items())

    def names(self):
        return {name for _, name, _ in self.records}

    def steps(self, name):
        return sorted({step for step, n, _ in self.records if n == name})

    def last(self, name):
        return [value for _, n, value in self.records if n == name][-1]


def _monitor(**kwargs):
    return CompressionMonitor(per_layer=True, measure_latency=False, verbose=False, **kwargs)


def _fit(tmp_path, digits, callbacks, logger, max_epochs=2, batches=3, log_every_n_steps=1):
    model = ImageClassifier("small_cnn")
    trainer = pl.Trainer(
        **trainer_kwargs(tmp_path, max_epochs=max_epochs, logger=logger, log_every_n_steps=log_every_n_steps),
        callbacks=callbacks,
        limit_train_batches=batches,
        limit_val_batches=1,
    )
    trainer.fit(model, datamodule=digits)
    return trainer, model


def _prefix_clashes(names):
    """Pairs (a, b) where metric ``a`` would have to be a directory holding metric ``b``."""
    names = set(names)
    return sorted(
        (name.rsplit("/", i)[0], name)
        for name in names
        for i in range(1, name.count("/") + 1)
        if name.rsplit("/", i)[0] in names
    )


# Every callback with its per-layer logging on, one short fit each, the monitor beside it.
SCENARIOS = {
    "unstructured": lambda: [GradualPruning(amount=0.5, end=0.5, frequency=1, per_layer=True)],
    "structured": lambda: [
        GradualPruning(amount=0.5, mode="structured", end=0.5, frequency=1, round_to=1, per_layer=True)
    ],
    "2:4": lambda: [GradualPruning(mode="2:4", exclude="net.0", per_layer=True)],
    "qat_int8": lambda: [QuantizationAwareTraining(module="net", start=0.0, log_every_n_steps=1)],
    "low_rank": lambda: [LowRankReplacement(rank=0.5, modules=nn.Linear, per_layer=True, verbose=False)],
    "weight_sharing": lambda: [WeightSharing(bits=3)],
    "binary": lambda: [BinaryWeights()],
    "distillation": lambda: [
        KnowledgeDistillation(
            "self", features=[FeatureLoss("net.3"), FeatureLoss("net.4", loss="attention", weight=10.0)]
        )
    ],
}


@pytest.fixture(scope="module")
def logged_names(tmp_path_factory, digits):
    names = {}
    for scenario, make in SCENARIOS.items():
        pl.seed_everything(0, verbose=False)
        logger = RecordingLogger()
        callbacks = [*make(), _monitor(log_every_n_steps=1)]
        # One epoch of 4 steps holds every kind of entry: step-wise, epoch-end and end-of-training.
        _fit(tmp_path_factory.mktemp(scenario), digits, callbacks, logger, max_epochs=1, batches=4)
        names[scenario] = logger.names()
    return names


def test_no_logged_name_is_the_parent_path_of_another_across_all_callbacks(logged_names):
    everything = set().union(*logged_names.values())
    assert _prefix_clashes(everything) == []


@pytest.mark.parametrize(
    ("scenario", "expected"),
    [
        (
            "unstructured",
            {
                "pruning/weight_sparsity",
                "pruning/target_weight_sparsity",
                "pruning/per_layer/weight_sparsity/net.0.weight",
                "pruning/per_layer/weight_sparsity/net.10.weight",
                "compression/sparsity",
                "compression/per_layer/sparsity/net.0.weight",
            },
        ),
        (
            "structured",
            {
                "pruning/weight_sparsity",
                "pruning/target_removed_channel_fraction",
                "pruning/removed_channel_fraction",
                "pruning/removed_channels",
                "pruning/macs_after_removal",
                "pruning/per_layer/weight_sparsity/net.3.weight",
            },
        ),
        ("2:4", {"pruning/weight_sparsity", "pruning/target_weight_sparsity"}),
        (
            "qat_int8",
            {
                "quantization/fake_quant",
                "quantization/weight_error",
                "quantization/per_layer/bits/net.0.weight",
                "quantization/parity_argmax_agreement",
            },
        ),
        (
            "low_rank",
            {
                "low_rank/params_ratio",
                "low_rank/per_layer/rank/net.8",
                "low_rank/per_layer/weight_error/net.10",
                "low_rank/per_layer/params_ratio/net.8",
            },
        ),
        ("weight_sharing", {"weight_sharing/quantization_error", "weight_sharing/compression_ratio"}),
        ("binary", {"binary/weight_error", "binary/weight_bits"}),
        ("distillation", {"distillation/loss", "distillation/kl", "distillation/hint/net.3"}),
    ],
)
def test_each_callback_logs_its_documented_names(logged_names, scenario, expected):
    assert expected <= logged_names[scenario], expected - logged_names[scenario]
    # Names of other conventions are gone.
    assert not {n for n in logged_names[scenario] if n in {"pruning/sparsity", "pruning/target_sparsity"}}


def test_mlflow_file_store_cannot_hold_a_metric_beneath_another(tmp_path, monkeypatch):
    from mlflow.exceptions import MlflowException

    # Why no name may be the parent path of another: the store keeps each metric as a file.
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    logger = MLFlowLogger(experiment_name="clash", tracking_uri=f"file:{tmp_path / 'mlruns'}")
    logger.log_metrics({"pruning/sparsity": 0.5}, step=0)
    with pytest.raises(MlflowException, match="Not a directory"):
        logger.log_metrics({"pruning/sparsity/net.0.weight": 0.5}, step=0)


def test_per_layer_metrics_reach_mlflow_and_tensorboard_and_read_back(tmp_path, digits, monkeypatch):
    import mlflow
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = f"file:{tmp_path / 'mlruns'}"
    mlflow_logger = MLFlowLogger(experiment_name="compress", tracking_uri=uri)
    tb_logger = TensorBoardLogger(tmp_path, name="tb")
    pruning = GradualPruning(amount=0.6, end=0.5, frequency=1, modules=nn.Conv2d, per_layer=True)
    lowrank = LowRankReplacement(rank=0.5, modules=nn.Linear, per_layer=True, verbose=False)
    monitor = _monitor(log_every_n_steps=2)
    _, model = _fit(tmp_path, digits, [pruning, lowrank, monitor], [mlflow_logger, tb_logger], batches=4)
    conv = model.net[3].weight
    assert float((conv == 0).float().mean()) == pytest.approx(0.6, abs=1e-3)

    client = mlflow.tracking.MlflowClient(uri)
    run = mlflow_logger.run_id

    def mlflow_last(name):
        return client.get_metric_history(run, name)[-1].value

    tb = EventAccumulator(tb_logger.log_dir)
    tb.Reload()

    def tb_last(name):
        return tb.Scalars(name)[-1].value

    for last in (mlflow_last, tb_last):
        assert last("pruning/weight_sparsity") == pytest.approx(0.6, abs=1e-3)
        assert last("pruning/target_weight_sparsity") == pytest.approx(0.6, abs=1e-6)
        assert last("pruning/per_layer/weight_sparsity/net.3.weight") == pytest.approx(0.6, abs=1e-3)
        assert last("compression/per_layer/sparsity/net.3.weight") == pytest.approx(0.6, abs=1e-3)
        assert last("compression/sparsity") == pytest.approx(
            1
            - sum(int((p != 0).sum()) for p in model.parameters())
            / sum(p.numel() for p in model.parameters()),
            abs=1e-6,
        )
        assert last("low_rank/per_layer/rank/net.8") == lowrank.layers["net.8"]["rank"]
        assert last("low_rank/params_ratio") == pytest.approx(lowrank.totals["params_ratio"], rel=1e-6)
    # 2 epochs x 4 steps, the monitor every 2 steps: Lightning's 0-based index of the step just taken.
    assert sorted({m.step for m in client.get_metric_history(run, "compression/sparsity")}) == [1, 3, 5, 7]
    assert sorted({e.step for e in tb.Scalars("compression/sparsity")}) == [1, 3, 5, 7]


def test_pruning_monitor_and_loss_share_the_same_steps(tmp_path, digits):
    logger = CSVLogger(tmp_path, name="steps")
    pruning = GradualPruning(amount=0.5, end=0.5, frequency=1)
    monitor = _monitor(log_every_n_steps=3)
    _fit(tmp_path, digits, [pruning, monitor], logger, batches=6, log_every_n_steps=3)
    with open(f"{logger.log_dir}/metrics.csv") as f:
        rows = list(csv.DictReader(f))

    def steps(name):
        return sorted({int(r["step"]) for r in rows if r.get(name)})

    # 2 epochs x 6 steps, every 3rd step: the epoch-end monitor entries fall on the epochs' last steps.
    assert steps("pruning/weight_sparsity") == steps("compression/sparsity") == [2, 5, 8, 11]
    assert steps("train_loss") == [2, 5, 8, 11]


def test_structured_mode_reaches_the_channel_target_while_weight_sparsity_differs(tmp_path, digits):
    logger = RecordingLogger()
    pruning = GradualPruning(
        amount=0.5, mode="structured", end=0.5, frequency=1, round_to=1, materialize=False
    )
    _, model = _fit(tmp_path, digits, [pruning], logger)
    # small_cnn: 16 + 32 + 64 prunable channels (two convs and the hidden linear layer).
    assert logger.last("pruning/target_removed_channel_fraction") == pytest.approx(0.5)
    assert logger.last("pruning/removed_channel_fraction") == pytest.approx(0.5)
    assert logger.last("pruning/removed_channels") == 8 + 16 + 32
    params = dict(model.named_parameters())
    zeros = sum(int((params[name] == 0).sum()) for name in pruning.masks)
    total = sum(params[name].numel() for name in pruning.masks)
    assert logger.last("pruning/weight_sparsity") == pytest.approx(zeros / total, abs=1e-6)
    # A removed channel zeroes its producer's outputs and its consumer's inputs: about 1 - 0.5 * 0.5 of the weights.
    assert zeros / total == pytest.approx(0.7435, abs=1e-3)
    assert "pruning/target_weight_sparsity" not in logger.names()


def test_structured_mode_counts_attention_heads_apart_from_channels(tmp_path, digits):
    from tests.test_gradual_pruning import TinyTransformer

    logger = RecordingLogger()
    pruning = GradualPruning(
        amount=0.5, mode="structured", end=0.5, frequency=1, modules=["encoder.self_attn", "encoder.linear1"]
    )
    model = TinyTransformer()
    trainer = pl.Trainer(
        **trainer_kwargs(tmp_path, max_epochs=1, logger=logger, log_every_n_steps=1),
        callbacks=[pruning],
        limit_train_batches=3,
        limit_val_batches=1,
    )
    trainer.fit(model, datamodule=digits)
    # 2 of 4 heads and 32 of 64 feed-forward neurons.
    assert logger.last("pruning/removed_heads") == 2
    assert logger.last("pruning/removed_head_fraction") == pytest.approx(0.5)
    assert logger.last("pruning/removed_channels") == 32
    assert logger.last("pruning/removed_channel_fraction") == pytest.approx(0.5)
    assert logger.last("pruning/target_removed_channel_fraction") == pytest.approx(0.5)


def test_report_plots_reach_mlflow_as_image_artifacts(tmp_path, digits, monkeypatch):
    import mlflow
    from PIL import Image

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = f"file:{tmp_path / 'mlruns'}"
    logger = MLFlowLogger(experiment_name="plots", tracking_uri=uri)
    monitor = CompressionMonitor(log_every_n_steps=1, measure_latency=False, verbose=False, plots=True)
    pruning = GradualPruning(amount=0.5, end=0.5, frequency=1, modules=nn.Conv2d)
    _fit(tmp_path, digits, [pruning, monitor], logger, batches=2)

    client = mlflow.tracking.MlflowClient(uri)
    listed = client.list_artifacts(logger.run_id, "compression/report")
    assert sorted(a.path for a in listed) == [
        "compression/report/compression_report.json",
        "compression/report/layers.png",
        "compression/report/sizes.png",
        "compression/report/steps.png",
    ]
    local = client.download_artifacts(logger.run_id, "compression/report/steps.png", str(tmp_path / "get"))
    with Image.open(local) as image:
        assert image.format == "PNG" and image.width > 500
    assert all(a.file_size > 10_000 for a in listed if a.path.endswith(".png"))
    # The report file is the run's: in its own directory (where Lightning puts the run's checkpoints), and an
    # artifact of the run.
    run_folder = tmp_path / "mlruns" / logger.experiment_id / logger.run_id
    assert monitor._report_target == run_folder / "compression_report.json"
    local = client.download_artifacts(
        logger.run_id, "compression/report/compression_report.json", str(tmp_path)
    )
    assert json.loads(Path(local).read_text())["summary"] == monitor.report["summary"]


def _wandb_records(folder):
    """The records of the W&B offline run under ``folder``: its ``.wandb`` file, a LevelDB-style log of 32 KiB
    blocks of protobuf ``Record`` fragments after a 7-byte file header."""
    from wandb.proto import wandb_internal_pb2

    (path,) = Path(folder).glob("wandb/offline-run-*/run-*.wandb")
    data, position, pending = path.read_bytes(), 7, b""
    while position + 7 <= len(data):
        left = 32768 - position % 32768
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if left < 7 or (length == 0 and kind == 0):
            position += left  # the block's zero padding
            continue
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a whole record, or its last fragment
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def test_metrics_the_report_and_its_plots_reach_wandb_and_read_back(tmp_path, digits, monkeypatch):
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    for variable in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(variable, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = WandbLogger(project="compress", save_dir=str(tmp_path), offline=True)
    monitor = CompressionMonitor(log_every_n_steps=1, measure_latency=False, verbose=False, plots=True)
    pruning = GradualPruning(amount=0.5, end=0.5, frequency=1, modules=nn.Conv2d)
    _, model = _fit(tmp_path, digits, [pruning, monitor], logger, batches=2)
    run_id = logger.version
    wandb.finish()
    # The run's service writes the file; its last record says the run is complete.
    for _ in range(120):
        records = list(_wandb_records(tmp_path))
        if any(record.WhichOneof("record_type") == "exit" for record in records):
            break
        time.sleep(0.5)

    history, files = {}, []
    for record in records:
        if record.WhichOneof("record_type") == "history":
            items = record.history.item
            history.update(
                {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}
            )
        elif record.WhichOneof("record_type") == "files":
            files += [file.path for file in record.files.files]
    nonzero = sum(int((p != 0).sum()) for p in model.parameters())
    assert "compression/nonzero_params" in history, sorted(history)
    assert history["compression/nonzero_params"] == nonzero
    assert history["pruning/weight_sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert history["compression/final/size_ratio"] == pytest.approx(monitor.report["summary"]["size_ratio"])
    for figure in ("steps", "layers", "sizes"):
        assert history[f"compression/report/{figure}/_type"] == "images/separated"
        (image,) = history[f"compression/report/{figure}/filenames"]
        assert image.startswith(f"media/images/compression/report/{figure}_") and image in files
    assert "compression_report.json" in files
    assert monitor._report_target == tmp_path / "compress" / run_id / "compression_report.json"
    (uploaded,) = tmp_path.glob("wandb/offline-run-*/files/compression_report.json")
    assert json.loads(uploaded.read_text())["summary"] == monitor.report["summary"]


def test_with_gradient_accumulation_every_callback_logs_on_the_steps_of_the_loss(tmp_path, digits):
    logger = CSVLogger(tmp_path, name="accumulate")
    pruning = GradualPruning(amount=0.5, end=0.5, frequency=1)
    monitor = _monitor(log_every_n_steps=2)
    model = ImageClassifier("small_cnn")
    trainer = pl.Trainer(
        **trainer_kwargs(
            tmp_path, max_epochs=2, logger=logger, log_every_n_steps=2, accumulate_grad_batches=2
        ),
        callbacks=[pruning, monitor],
        limit_train_batches=8,
        limit_val_batches=1,
    )
    trainer.fit(model, datamodule=digits)
    assert trainer.global_step == 8  # 2 epochs x 8 batches / 2 accumulated
    with open(f"{logger.log_dir}/metrics.csv") as f:
        rows = list(csv.DictReader(f))

    def steps(name):
        return sorted({int(r["step"]) for r in rows if r.get(name)})

    # Every second optimizer step, under the index of the step just taken; nothing before the first step.
    assert steps("train_loss") == [1, 3, 5, 7]
    assert steps("pruning/weight_sparsity") == steps("compression/sparsity") == [1, 3, 5, 7]


def test_a_logger_without_an_experiment_gets_no_figure_text_or_file(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lightning_compress.plots import send_figure, send_file, send_text

    logger = RecordingLogger()  # a Logger with metrics only
    assert not hasattr(logger, "experiment")
    (tmp_path / "report.json").write_text("{}")
    figure = plt.figure()
    send_figure([logger], "compression/report/steps", figure)
    send_text([logger], "budget/tables", "a table")
    send_file([logger], tmp_path / "report.json", "compression/report")
    plt.close(figure)
    assert logger.records == []


@pytest.mark.parametrize("wandb_first", [False, True])
def test_the_report_is_attached_to_an_mlflow_run_kept_in_a_database(
    tmp_path, digits, monkeypatch, wandb_first
):
    import mlflow
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    for variable in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(variable, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"  # no local run directory: the report goes up as an artifact
    logger = MLFlowLogger(
        experiment_name="db", tracking_uri=uri, artifact_location=str(tmp_path / "artifacts")
    )
    assert logger.save_dir is None
    second = WandbLogger(project="db", save_dir=str(tmp_path), offline=True)
    monitor = CompressionMonitor(measure_latency=False, verbose=False)
    pruning = GradualPruning(amount=0.5, end=0.5)
    loggers = (
        [second, logger] if wandb_first else [logger, second]
    )  # the artifact's folder, whatever the order
    _fit(tmp_path, digits, [pruning, monitor], loggers, max_epochs=1, batches=2)
    wandb.finish()
    client = mlflow.tracking.MlflowClient(uri)
    local = client.download_artifacts(
        logger.run_id, "compression/report/compression_report.json", str(tmp_path)
    )
    assert json.loads(Path(local).read_text())["summary"] == monitor.report["summary"]
    assert (
        monitor._report_target is not None
    ) == wandb_first  # W&B first: its run directory holds the report
    # The W&B run keeps a file of its own (not a link to the temporary file, gone after the fit).
    (kept,) = tmp_path.glob("wandb/offline-run-*/files/compression_report.json")
    assert json.loads(kept.read_text())["summary"] == monitor.report["summary"]
