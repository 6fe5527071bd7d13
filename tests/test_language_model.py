"""The small GPT example (corpus, windows, causal model), its compression (heads and MLP neurons removed, low-bit QAT
and PTQ, distillation of per-token logits) and the language-model benchmark's quick run."""

from __future__ import annotations

import copy
import json
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks import language_model
from benchmarks.common import Context, Result
from examples.language import (
    LanguageModel,
    TinyGPT,
    TokenWindows,
    causal_mask,
    language_loss,
    load_corpus,
    perplexity,
    stdlib_files,
)
from lightning_compress.distillation.core import DistillationCapture, DistillationConfig
from lightning_compress.distillation.losses import hinton_loss
from lightning_compress.pruning import PruningConfig, prune_
from lightning_compress.pruning.heads import PrunedMultiheadAttention
from lightning_compress.quantization import (
    QuantizationConfig,
    convert_qat,
    degradation_recovered,
    prepare_qat,
    quantize_low_bit,
)
from lightning_compress.stats import count_parameters


def tiny(seed: int = 0, **sizes: int) -> TinyGPT:
    torch.manual_seed(seed)
    return TinyGPT(**{"block_size": 16, "d_model": 64, "n_heads": 4, "n_layers": 2, **sizes}).eval()


def tokens(batch: int = 3, length: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


# -- the example -------------------------------------------------------------------------------------------------


def test_corpus_is_deterministic_and_split_by_file():
    first = load_corpus(train_bytes=30_000, val_bytes=6_000, seed=0)
    again = load_corpus(train_bytes=30_000, val_bytes=6_000, seed=0)
    assert torch.equal(first.train, again.train) and torch.equal(first.val, again.val)
    assert first.train_files == again.train_files and first.val_files == again.val_files
    assert len(first.train) == 30_000 and len(first.val) == 6_000
    assert not set(first.train_files) & set(first.val_files)
    # The bytes are the files' bytes, in the recorded order.
    files = {f.as_posix().split("/python3.11/", 1)[-1]: f for f in stdlib_files()}
    head = b"".join(files[name].read_bytes() + b"\n" for name in first.train_files)[:30_000]
    assert bytes(first.train.tolist()) == head
    other = load_corpus(train_bytes=30_000, val_bytes=6_000, seed=1)
    assert other.train_files != first.train_files


def test_corpus_rejects_a_bad_fraction_and_too_many_bytes(tmp_path):
    with pytest.raises(ValueError, match="val_fraction=1.5"):
        load_corpus(val_fraction=1.5)
    for i in range(4):
        (tmp_path / f"m{i}.py").write_text("x = 1\n" * 10)
    with pytest.raises(ValueError, match="hold only"):
        load_corpus(train_bytes=10_000, val_bytes=10, root=tmp_path)


def test_token_windows_shift_the_target_by_one():
    windows = TokenWindows(torch.arange(100), block_size=8, stride=4)
    assert len(windows) == (100 - 8 - 1) // 4 + 1 == 23
    x, y = windows[22]
    assert x.tolist() == list(range(88, 96)) and y.tolist() == list(range(89, 97))
    assert x.dtype == torch.long
    with pytest.raises(IndexError):
        windows[23]


def test_output_at_a_position_does_not_depend_on_later_tokens():
    model = tiny()
    x = tokens()
    changed = x.clone()
    changed[:, 9:] = (changed[:, 9:] + 17) % 256
    with torch.no_grad():
        a, b = model(x), model(changed)
    assert a.shape == (3, 16, 256)
    assert torch.allclose(a[:, :9], b[:, :9], atol=1e-6)
    assert (a[:, 9:] - b[:, 9:]).abs().max() > 1e-3
    assert causal_mask(4).sum() == 6


def test_gpt2_initialization_and_a_near_uniform_first_loss():
    model = tiny(n_layers=4)
    std = model.blocks[0].mlp.fc1.weight.std().item()
    residual = model.blocks[0].mlp.fc2.weight.std().item()
    assert std == pytest.approx(0.02, rel=0.05)
    assert residual == pytest.approx(0.02 / math.sqrt(8), rel=0.05)
    assert float(model.head.bias.detach().abs().sum()) == 0.0
    loss = language_loss(model(tokens()), tokens(seed=2))
    assert abs(float(loss) - math.log(256)) < 0.05


def test_language_model_logs_validation_perplexity():
    lm = LanguageModel(block_size=16, d_model=32, n_heads=2, n_layers=1)
    windows = TokenWindows(tokens(4, 40).flatten(), block_size=16)
    direct = perplexity(lm.model, windows, batch_size=3)
    lm._val = []
    lm.log = lambda name, value, **kw: setattr(lm, f"_{name}", value)  # type: ignore[method-assign]
    for i in range(len(windows)):
        x, y = windows[i]
        lm.validation_step((x[None], y[None]), i)
    lm.on_validation_epoch_end()
    assert lm._val_ppl == pytest.approx(direct, rel=1e-5)
    assert lm._val_loss == pytest.approx(math.log(direct), rel=1e-5)
    assert tuple(lm.example_input_array.shape) == (1, 16)


# -- compression of the GPT --------------------------------------------------------------------------------------


def test_width_pruning_removes_heads_and_neurons_and_matches_the_masked_model():
    model = tiny()
    x = tokens()
    config = PruningConfig(
        amount=0.5, mode="structured", modules=list(language_model.WIDTH_MODULES), round_to=1
    )
    plan = prune_(model, config, example_input=x[:1], finalize=False)
    with torch.no_grad():
        masked = model(x)
    before = count_parameters(model)
    diff = plan.finalize()
    for block in model.blocks:
        assert isinstance(block.attn, PrunedMultiheadAttention) and block.attn.num_heads == 2
        assert block.mlp.fc1.out_features == block.mlp.fc2.in_features == 128
    # q, k, v and out: 4 x (64 x 32) fewer per block (and 3 x 32 biases); fc1/fc2: 2 x 64 x 128 (+128).
    assert before - count_parameters(model) == 2 * (4 * 64 * 32 + 3 * 32 + 2 * 64 * 128 + 128)
    with torch.no_grad():
        removed = model(x)
    assert diff is not None and diff < 1e-5
    assert torch.allclose(masked, removed, atol=1e-5)


def test_ptq_and_qat_convert_to_the_same_kernels():
    float_model = tiny()
    x = tokens()
    quant = {"bits": 4, "group_size": 32, "exclude": ["*.out_proj"]}
    ptq = quantize_low_bit(copy.deepcopy(float_model), "int8-dynamic-intx", **quant)
    config = QuantizationConfig(scheme="int8-dynamic-intx", **quant)
    qat = prepare_qat(copy.deepcopy(float_model), config)
    with torch.no_grad():
        fake = qat(x)
    convert_qat(qat, config)
    with torch.no_grad():
        a, b, reference = ptq(x), qat(x), float_model(x)
    assert type(ptq.blocks[0].mlp.fc1.weight).__name__ == type(qat.blocks[0].mlp.fc1.weight).__name__
    assert torch.equal(a, b)  # no training in between: the same weights round to the same integers
    assert torch.allclose(fake, b, atol=1e-5)
    assert 1e-4 < float((a - reference).abs().max()) < 0.5
    assert isinstance(ptq.blocks[0].attn.out_proj.weight, nn.Parameter)  # excluded: float


def test_attention_output_projections_are_left_in_float_with_a_warning():
    model = tiny()
    with pytest.warns(UserWarning, match=r"leaves blocks.0.attn.out_proj, blocks.1.attn.out_proj in float"):
        quantize_low_bit(model, "intx-weight-only", bits=4, group_size=32)
    assert type(model.blocks[1].attn.out_proj.weight) is nn.Parameter
    assert type(model.head.weight).__name__ == "IntxUnpackedToInt8Tensor"
    with torch.no_grad():
        assert model(tokens()).isfinite().all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quantize_low_bit(tiny(), "intx-weight-only", bits=4, group_size=32, exclude="*.out_proj")


def test_quantize_low_bit_checks_its_arguments():
    with pytest.raises(ValueError, match="quantize_int8_ptq"):
        quantize_low_bit(tiny(), "int8")
    with pytest.raises(ValueError, match="group_size=48"):
        quantize_low_bit(tiny(), "intx-weight-only", group_size=48, exclude="*.out_proj")


def test_degradation_recovered_is_the_share_of_the_ptq_loss():
    assert degradation_recovered(10.0, 13.0, 11.0) == pytest.approx(2 / 3)
    assert degradation_recovered(10.0, 13.0, 13.0) == 0.0
    assert degradation_recovered(10.0, 13.0, 9.0) == pytest.approx(4 / 3)
    assert degradation_recovered(0.9, 0.8, 0.85) == pytest.approx(0.5)  # accuracy: higher is better
    assert math.isnan(degradation_recovered(10.0, 10.0, 11.0))


def test_distillation_of_sequence_logits_is_the_mean_per_token_kl():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 256), torch.randn(2, 5, 256)
    per_token = (
        F.softmax(teacher / 2, -1) * (F.log_softmax(teacher / 2, -1) - F.log_softmax(student / 2, -1))
    ).sum(-1)
    assert per_token.shape == (2, 5)
    assert float(hinton_loss(student, teacher, 2.0)) == pytest.approx(4 * float(per_token.mean()), rel=1e-5)
    # The softmax runs over the vocabulary: moving a position's logits by a constant changes nothing.
    shifted = student + torch.randn(2, 5, 1) * 10
    assert float(hinton_loss(shifted, teacher, 2.0)) == pytest.approx(
        float(hinton_loss(student, teacher, 2.0))
    )


def test_self_distillation_of_a_gpt_mixes_per_token_kl_with_the_language_loss():
    teacher, student = tiny(seed=0), tiny(seed=1)
    x, y = tokens(), tokens(seed=2)
    with DistillationCapture(student, teacher, DistillationConfig(alpha=0.25, temperature=2.0)) as capture:
        logits = student(x)
        loss = capture.loss(language_loss(logits, y))
    with torch.no_grad():
        soft = F.softmax(teacher(x) / 2, -1)
    per_token = (soft * (soft.log() - F.log_softmax(logits.detach() / 2, -1))).sum(-1)
    expected = 0.75 * language_loss(logits, y) + 0.25 * 4 * per_token.mean()
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    loss.backward()
    assert student.head.weight.grad is not None and teacher.head.weight.grad is None


# -- the benchmark -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    folder = tmp_path_factory.mktemp("language_model")
    context = Context("language_model", quick=True, output=folder)
    threads = torch.get_num_threads()
    try:
        result = language_model.run(language_model.Settings(**language_model.QUICK), context)
    finally:
        torch.set_num_threads(threads)
    return result, context


def test_quick_run_reports_every_arm(quick):
    result, context = quick
    rows = {row["arm"]: row for row in result.payload["rows"]}
    assert language_model.CRITERIA == ["l1", "wanda", "sparsegpt"]
    sparse = [
        f"{criterion}_{mode}{suffix}"
        for criterion in language_model.CRITERIA
        for mode in ("unstructured", "2of4")
        for suffix in ("_oneshot", "")
    ]
    quant = [f"{kind}_int8-dynamic-intx_{bits}bit" for bits in (4, 3) for kind in ("ptq", "qat")]
    expected = ["dense", "dense_ft", *quant, "width", "width_kd"]
    assert list(rows) == expected + sparse
    for arm, row in rows.items():
        for column in ("val_ppl", "params", "macs_per_token", "latency_ms", "speedup"):
            assert math.isfinite(row[column]) and row[column] > 0, (arm, column)
        assert 1 < row["val_ppl"] < 256, arm
    assert rows["dense"]["speedup"] == rows["dense"]["macs_ratio"] == 1.0
    assert rows["width"]["macs_ratio"] >= 2.0 and rows["width"]["params"] < rows["dense"]["params"]
    assert rows["width_kd"]["macs_per_token"] == rows["width"]["macs_per_token"]
    assert rows["dense"]["widths"] == "heads 4,4; mlp 128,128" != rows["width"]["widths"]
    for parity in result.payload["qat_parity"].values():
        assert parity["max_abs_diff"] < 1e-4  # the converted model computes what the fake-quantized one did
    # Every sparsity arm holds its mask: half of the blocks' weight matrices are zero, the same share whatever the
    # criterion (embeddings, norms and the output head stay dense).
    shares = {rows[name]["sparsity"] for name in sparse}
    assert len(shares) == 1 and 0.15 < shares.pop() < 0.5
    by = {k: v["val_ppl"] for k, v in rows.items()}
    for tag in ("int8-dynamic-intx_4bit", "int8-dynamic-intx_3bit"):
        share = (by[f"ptq_{tag}"] - by[f"qat_{tag}"]) / (by[f"ptq_{tag}"] - by["dense_ft"])
        assert result.payload["recovered"][tag] == pytest.approx(share)
    assert "| dense_ft | none |" in result.markdown
    for target, met in result.payload["targets"].items():
        assert f"{target}: {'met' if met else 'NOT met'}" in result.markdown
    assert not context.notes  # pretrained now, cached for the next run


def test_second_run_reuses_the_cached_pretrained_weights(quick):
    result, context = quick
    settings = language_model.Settings(**{**language_model.QUICK, "sparse_modes": (), "schemes": ()})
    again = language_model.run(settings, context)
    assert any("Pretrained weights reused" in note for note in context.notes)
    assert again.payload["rows"][0]["val_ppl"] == result.payload["rows"][0]["val_ppl"]


def test_sparsity_arms_follow_the_criteria_list(monkeypatch):
    monkeypatch.setattr(language_model, "CRITERIA", ["l1", "random"])
    assert language_model.criteria(language_model.Settings()) == ["l1", "random"]
    assert language_model.criteria(language_model.Settings(criteria=("l2",))) == ["l2"]
    two_four = language_model.sparse_pruning("2:4", "l2", 0.3, 0.0)
    assert two_four.amount == 0.5 and two_four.criterion == "l2"  # N:M fixes the amount
    assert language_model.sparse_pruning("unstructured", "l1", 0.3, 0.5).amount == 0.3


def test_benchmark_is_registered():
    from benchmarks import runner

    assert runner.CONFIGS["language_model"].module is language_model
    with pytest.raises(ValueError, match="schemes"):
        language_model.Settings(schemes=("int3",))


def test_width_option_runs_the_configuration_at_another_size(tmp_path, monkeypatch):
    seen = []

    def fake_run(settings, context):
        seen.append((settings, context.name))
        return Result({"rows": []}, "the table")

    monkeypatch.setattr(language_model, "run", fake_run)
    assert language_model.main(["--quick", "--width", "64", "--heads", "8", "--output", str(tmp_path)]) == 0
    settings, name = seen[0]
    assert (settings.d_model, settings.n_heads, settings.n_layers) == (
        64,
        8,
        language_model.QUICK["n_layers"],
    )
    assert name == "language_model_width64_heads8"
    stored = json.loads((tmp_path / f"{name}.json").read_text())
    assert stored["settings"]["d_model"] == 64 and stored["quick"] is True
    assert (tmp_path / f"{name}.md").read_text().rstrip().endswith("the table")


def test_every_fit_gets_the_same_batches_in_the_same_order():
    windows = TokenWindows(torch.arange(400), block_size=8)
    settings = language_model.Settings(batch_size=4)
    first = [x[:, 0].tolist() for x, _ in language_model.train_loader(windows, settings)]
    again = [x[:, 0].tolist() for x, _ in language_model.train_loader(windows, settings)]
    assert first == again and first != sorted(first)  # shuffled, identically
    shared = language_model.train_loader(windows, settings)
    list(shared)
    assert [x[:, 0].tolist() for x, _ in shared] != first  # a reused loader would move on
