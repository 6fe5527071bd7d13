"""The benchmark runner: one configuration per published result, quick runs, result files and the results page."""

from __future__ import annotations

import copy
import gzip
import json
import struct
import types
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from benchmarks import common, runner
from benchmarks.common import Context, Digits28, image_data
from benchmarks.configs import BENCH, CONFIGS, Config
from benchmarks.low_rank_minilm import (
    HeldOutCosine,
    SentenceEmbedder,
    SentenceEncoder,
    Settings,
    Tokenized,
    collate,
    cosine,
    distillation,
    embed,
    model_input,
)
from lightning_compress import LowRankReplacement

RESULTS = Path(runner.__file__).parent / "results"


def test_every_published_result_has_a_configuration_and_every_configuration_a_result():
    published = {p.name.split(".")[0] for p in RESULTS.iterdir() if p.suffix in (".md", ".json")}
    assert published == set(CONFIGS)


def test_every_configuration_builds_its_settings_for_full_and_quick_runs():
    for name, config in CONFIGS.items():
        full, quick = config.build(), config.build(quick=True)
        assert type(full) is type(quick) is config.module.Settings, name
        assert config.module.TITLE and callable(config.module.run), name
        for field, value in config.module.QUICK.items():
            assert getattr(quick, field) == value, (name, field)


def test_quick_keeps_the_configuration_protocol_at_small_sizes():
    full = CONFIGS["low_rank_minilm_nodropout_long"].build()
    quick = CONFIGS["low_rank_minilm_nodropout_long"].build(quick=True)
    assert (full.distill_steps, full.dropout, full.augment, full.methods) == (6000, 0.0, True, ("whitened",))
    assert (quick.distill_steps, quick.dropout, quick.augment, quick.methods) == (8, 0.0, True, ("whitened",))


def test_an_unknown_setting_fails_when_the_configuration_is_built():
    with pytest.raises(TypeError, match="epoch"):
        Config("binary", {"epoch": 3}).build()
    with pytest.raises(ValueError, match="needs="):
        Config("binary", needs=("tpu",))


def test_bench_runs_one_configuration_per_benchmark():
    benchmarks = [CONFIGS[name].benchmark for name in BENCH]
    assert len(benchmarks) == len(set(benchmarks))
    assert set(benchmarks) == {config.benchmark for config in CONFIGS.values()}


def test_a_full_run_without_fashion_mnist_names_the_package_and_a_quick_run_uses_the_digits(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        image_data(Context("x", quick=False, data_dir=tmp_path))
    context = Context("x", quick=True, data_dir=tmp_path)
    dm = image_data(context, limit_train=100, flatten=True)
    assert isinstance(dm, Digits28)
    assert (len(dm.train_set), tuple(dm.train_set.tensors[0].shape[1:]), len(dm.test_set)) == (
        100,
        (784,),
        269,
    )
    assert "digits upsampled to 28x28 instead (1,259 training images" in context.notes[0]


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_a_quick_run_on_fashion_mnist_evaluates_on_the_first_images_only(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    for split, n in (("train", 30), ("t10k", 10)):
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, (n,)))
    monkeypatch.setattr(common, "QUICK_EVALUATION", 4)
    full = image_data(Context("x", data_dir=tmp_path), val_size=6, limit_train=20)
    assert (len(full.train_set), len(full.val_set), len(full.test_set)) == (20, 6, 10)
    context = Context("x", quick=True, data_dir=tmp_path)
    quick = image_data(context, val_size=6, limit_train=20)
    assert (len(quick.train_set), len(quick.val_set), len(quick.test_set)) == (20, 4, 4)
    assert torch.equal(quick.test_set.tensors[0], full.test_set.tensors[0][:4])
    assert context.notes == ["Quick run: validation and test on the first 4 images of each split only."]


def test_quick_run_writes_its_files_and_the_results_page(tmp_path, monkeypatch):
    tiny = Config("binary", quick={"limit_train": 256})
    monkeypatch.setitem(CONFIGS, "binary_tiny", tiny)
    page = tmp_path / "docs" / "results.md"
    page.parent.mkdir()
    [outcome] = runner.bench(["binary_tiny"], output=tmp_path / "out", page=page, data_dir=tmp_path / "none")

    assert outcome.skipped is None and outcome.markdown_path == tmp_path / "out" / "binary_tiny.md"
    stored = json.loads((tmp_path / "out" / "binary_tiny.json").read_text())
    assert (stored["quick"], stored["settings"]["limit_train"], stored["settings"]["epochs"]) == (
        True,
        256,
        1,
    )
    ratios = {row["variant"]: row["weight_ratio"] for row in stored["rows"]}
    assert ratios["fp32"] == 1.0
    assert 25 < ratios["binary"] < 32 and 12 < ratios["ternary"] < 16  # 1 and 2 bits per weight, plus scales
    assert "used scikit-learn's digits" in stored["notes"][0]

    text = page.read_text()
    assert "`python -m benchmarks run binary_tiny --quick`" in text
    assert "[binary](../../../benchmarks/results/binary.md)" not in text  # links are relative to the page
    link = Path(runner.os.path.relpath(RESULTS / "binary.md", page.parent)).as_posix()
    assert f"[binary]({link})" in text
    assert "| lenet_300_100 | binary |" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU check runs on this machine")
def test_a_configuration_this_machine_cannot_run_is_named_on_the_page(tmp_path):
    page = tmp_path / "results.md"
    [outcome] = runner.bench(["gpu_check"], output=tmp_path, page=page)
    assert outcome.result is None and "needs a CUDA GPU" in outcome.skipped
    assert "Not run here: gpu_check needs a CUDA GPU." in page.read_text()
    assert runner.main(["run", "gpu_check"]) == 2


def test_list_names_every_configuration(capsys):
    assert runner.main(["list"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == list(CONFIGS)


class TinyEncoder(nn.Module):
    """A stand-in for a transformers encoder: ``(input_ids, attention_mask) -> .last_hidden_state``."""

    def __init__(self) -> None:
        super().__init__()
        self.embeddings = nn.Embedding(40, 24)
        self.dense = nn.Linear(24, 24)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> types.SimpleNamespace:
        return types.SimpleNamespace(last_hidden_state=torch.tanh(self.dense(self.embeddings(input_ids))))


def test_minilm_protocol_recovers_the_embeddings_with_the_distillation_callback():
    """Factorized, then fine-tuned by KnowledgeDistillation alone: the embeddings move back towards the original's."""
    pl.seed_everything(0, verbose=False)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 40, (96, 6), generator=generator)
    tokens = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    train = Tokenized({k: v[:64] for k, v in tokens.items()})
    held_out = Tokenized({k: v[64:] for k, v in tokens.items()})
    original = SentenceEncoder(TinyEncoder()).eval()
    reference = embed(original, held_out)
    module = SentenceEmbedder(copy.deepcopy(original).train(), lr=1e-2)
    lowrank = LowRankReplacement(rank=2, modules=nn.Linear, calibration_input=model_input, verbose=False)
    at_start = HeldOutCosine(held_out, reference, held_out, reference)
    example = model_input(collate([held_out[i] for i in range(2)]))
    trainer = pl.Trainer(
        max_steps=24,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[lowrank, distillation(Settings(), layers=1, example=example), at_start],
    )
    trainer.fit(module, DataLoader(train, batch_size=16, shuffle=True, collate_fn=collate))

    assert (
        list(lowrank.layers) == ["student.encoder.dense"]
        and lowrank.layers["student.encoder.dense"]["rank"] == 2
    )
    before, after = at_start.cosine["held_out"], cosine(module.student, held_out, reference)
    assert before < 0.7 and after > before + 0.05  # 0.62 -> 0.74
    assert float(trainer.callback_metrics["distillation/task_loss"]) == 0.0
    assert float(trainer.callback_metrics["distillation/alpha"]) == 1.0


def test_every_published_result_names_its_configuration_and_what_it_came_from():
    for name, config in CONFIGS.items():
        path = RESULTS / f"{name}.md"
        if path.exists():
            text = path.read_text()
            assert f"`python -m benchmarks run {name}` regenerates this file" in text, name
            assert config.notes in text, name


def test_minilm_per_token_term_is_one_feature_per_layer_sharing_its_weight():
    example = {"input_ids": torch.ones(2, 3, dtype=torch.long), "attention_mask": torch.ones(2, 3)}
    last = distillation(Settings(token_weight=1.0), layers=6, example=example)
    every = distillation(Settings(token_weight=0.6, all_layers=True), layers=6, example=example)
    assert [(f.student, f.loss, f.weight) for f in last.features] == [
        ("", "cosine", 1.0),
        ("student.encoder.encoder.layer.5", "cosine", 1.0),
    ]
    assert [f.student for f in every.features[1:]] == [f"student.encoder.encoder.layer.{i}" for i in range(6)]
    assert sum(f.weight for f in every.features[1:]) == pytest.approx(0.6)
    assert (every.alpha, every.logits, every.teacher) == (1.0, False, "self")


def test_a_full_run_writes_the_line_that_names_its_configuration_and_command(tmp_path):
    config = CONFIGS["budget"]
    settings = config.build(quick=True)
    started = {**common.machine(), "load_average": (0.5, 0.5, 0.5)}
    texts = {}
    for quick in (False, True):
        outcome = runner.Outcome("budget", quick, "cmd", 1.0, common.Result({"x": 1}, "| a |\n|---|\n| 1 |"))
        texts[quick] = runner.write(outcome, config, settings, started, tmp_path / str(quick)).read_text()
    line = "Configuration `budget` (`benchmarks/configs.py`): `python -m benchmarks run budget` regenerates this file."
    assert texts[False].endswith("| 1 |\n\n" + line + "\n")
    assert line not in texts[True] and texts[True].endswith("| 1 |\n")


class LayeredEncoder(nn.Module):
    """A stand-in for a transformers encoder with its layers under ``encoder.layer`` (as BERT's)."""

    def __init__(self) -> None:
        super().__init__()
        self.embeddings = nn.Embedding(40, 32)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(
            nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32)) for _ in range(2)
        )

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> types.SimpleNamespace:
        hidden = self.embeddings(input_ids)
        for layer in self.encoder.layer:
            hidden = hidden + layer(hidden)
        return types.SimpleNamespace(last_hidden_state=hidden)


def _padded_sentences():
    """48 training and 32 held-out token sequences of 3 to 6 tokens, padded to 6."""
    ids = torch.randint(1, 40, (80, 6), generator=torch.Generator().manual_seed(0))
    lengths = torch.randint(3, 7, (80, 1), generator=torch.Generator().manual_seed(1))
    tokens = {"input_ids": ids, "attention_mask": (torch.arange(6) < lengths).long()}
    return Tokenized({k: v[:48] for k, v in tokens.items()}), Tokenized(
        {k: v[48:] for k, v in tokens.items()}
    )


def test_minilm_compress_protocol_prunes_quantizes_and_measures_every_arm():
    from benchmarks import minilm_compress

    torch.manual_seed(0)
    train, held_out = _padded_sentences()
    original = SentenceEncoder(LayeredEncoder()).eval().requires_grad_(False)
    settings = minilm_compress.Settings(**{**minilm_compress.QUICK, "threads": 1})
    results = minilm_compress.compare(settings, original, train, held_out)
    by = {row["arm"]: row for row in results["rows"]}
    expected = ["dense", "ptq_4bit", "qat_4bit"] + [
        f"{c}_{m}{suffix}"
        for c in ("l1", "wanda", "sparsegpt")
        for m in ("unstructured", "2of4")
        for suffix in ("_oneshot", "")
    ]
    assert list(by) == expected
    assert by["dense"]["cosine"] == pytest.approx(1.0) and by["dense"]["neighbours"] == 1.0
    for arm in expected[3:]:
        # Half of every layer's weights, exactly: the masks held through fine-tuning.
        assert by[arm]["sparsity"] == 0.5, arm
        assert 0.0 < by[arm]["degradation"] < 1.0, arm
    assert 0.0 < by["ptq_4bit"]["degradation"] < 0.05
    # The recovered share is computed from the table's degradations.
    ptq, qat = by["ptq_4bit"]["degradation"], by["qat_4bit"]["degradation"]
    assert results["recovered"]["4bit"] == pytest.approx((ptq - qat) / ptq)
    assert {"dense", "ptq_4bit", "qat_4bit"} == {arm for arm, row in by.items() if "speedup" in row}
    met = minilm_compress.targets(results)
    assert set(met) == {
        "wanda 2:4 one-shot: less degradation than magnitude",
        "wanda 2:4 one-shot: at most half the degradation of magnitude",
        "sparsegpt 2:4 one-shot: less degradation than magnitude",
        "sparsegpt 2:4 one-shot: at most half the degradation of magnitude",
        "4bit: QAT recovers >= 2/3 of the PTQ degradation",
    }
    # SparseGPT's one-shot reconstruction beats magnitude even on this random model.
    assert by["sparsegpt_2of4_oneshot"]["degradation"] < by["l1_2of4_oneshot"]["degradation"]


def test_calibration_mask_protocol_applies_every_arm_with_and_without_the_padding():
    from benchmarks import calibration_mask

    torch.manual_seed(0)
    train, held_out = _padded_sentences()
    original = SentenceEncoder(LayeredEncoder()).eval().requires_grad_(False)
    settings = calibration_mask.Settings(**{**calibration_mask.QUICK, "threads": 1})
    results = calibration_mask.compare(settings, original, train, held_out)
    assert [row["arm"] for row in results["rows"]] == list(calibration_mask.ARMS)
    assert 0.1 < results["padding_share"] < 0.5
    for row in results["rows"]:
        all_positions, tokens = row["degradation_all_positions"], row["degradation_tokens"]
        assert 0.0 < all_positions < 1.0 and 0.0 < tokens < 1.0, row["arm"]
        assert all_positions != tokens, row["arm"]  # the padding changed the statistics, and so the result
        assert row["change"] == pytest.approx(tokens / all_positions - 1)
    text = calibration_mask.report(results, settings)
    assert "| wanda_2of4 | prune_(mode='2:4', criterion='wanda') |" in text
    assert "| whitened | low_rank_(rank=0.5, method='whitened') |" in text


def test_training_length_prunes_each_snapshot_of_one_run_by_every_criterion():
    from benchmarks import training_length

    settings = training_length.Settings(**{**training_length.QUICK, "steps": (4, 8)})
    results = training_length.measure(settings)
    first, last = results["rows"]
    assert (first["step"], last["step"]) == (4, 8)
    assert last["dense"] < first["dense"] < 256  # the one run keeps training between the snapshots
    for row in results["rows"]:
        for criterion in training_length.CRITERIA:
            assert row[criterion] > row["dense"], (
                row["step"],
                criterion,
            )  # half of every weight matrix is gone
        assert row["wanda_share"] == pytest.approx((row["wanda"] - row["dense"]) / (row["l1"] - row["dense"]))
        assert row["spread_max"] >= row["spread_median"] >= 1.0
    assert "| 8 |" in training_length.report(results, settings)
