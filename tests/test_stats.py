"""Tests for lightning_compress.stats: exact counts and sizes on hand-built models."""

import json
import math

import pytest
import torch
from torch import nn

from lightning_compress.stats import (
    CompressionStats,
    LatencyResult,
    TensorFormat,
    compare_latency,
    compressed_size_bytes,
    compression_stats,
    compression_summary,
    count_macs,
    count_macs_per_sample,
    count_nonzero,
    count_parameters,
    dense_size_bytes,
    layer_sparsity,
    measure_latency,
    repeat_sample,
    sparsity,
    tensor_sizes,
    tensor_storage_bits,
)


def _zero_first(tensor: torch.Tensor, k: int) -> None:
    with torch.no_grad():
        tensor.view(-1)[:k] = 0.0


def _filled_linear(in_features: int, out_features: int, bias: bool = True) -> nn.Linear:
    layer = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        layer.weight.fill_(0.5)
        if bias:
            layer.bias.fill_(1.0)
    return layer


class TwoInputs(nn.Module):
    """Adds two projections; records whether it ran in training mode."""

    def __init__(self) -> None:
        super().__init__()
        self.left = nn.Linear(6, 5)
        self.right = nn.Linear(3, 5)
        self.seen_training: list[bool] = []

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        self.seen_training.append(self.training)
        return self.left(a) + self.right(b)


class TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids))


# --- counting -------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [0, 1, 7, 40])
def test_count_nonzero_and_sparsity_exact(k):
    layer = _filled_linear(10, 4)
    _zero_first(layer.weight, k)
    assert count_parameters(layer) == 44
    assert count_nonzero(layer) == 44 - k
    assert sparsity(layer) == pytest.approx(k / 44)


def test_layer_sparsity_per_name_and_order():
    model = nn.Sequential(_filled_linear(10, 4), nn.ReLU(), _filled_linear(4, 2))
    _zero_first(model[0].weight, 20)
    _zero_first(model[2].bias, 1)
    assert layer_sparsity(model) == {"0.weight": 0.5, "2.weight": 0.0}
    with_bias = layer_sparsity(model, include_bias=True)
    assert list(with_bias) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert with_bias["2.bias"] == 0.5
    assert with_bias["0.bias"] == 0.0


def test_module_without_parameters():
    module = nn.ReLU()
    assert count_parameters(module) == 0
    assert count_nonzero(module) == 0
    assert sparsity(module) == 0.0
    assert layer_sparsity(module) == {}
    assert compressed_size_bytes(module) == 0


def test_shared_parameter_counted_once():
    model = TiedLM()
    assert count_parameters(model) == 40
    _zero_first(model.embed.weight, 10)
    assert count_nonzero(model) == 30
    assert sparsity(model) == pytest.approx(0.25)
    # state_dict lists the tensor under both names; its storage is paid once.
    assert set(model.state_dict()) == {"embed.weight", "head.weight"}
    with torch.no_grad():
        model.embed.weight.fill_(1.0)
    assert compressed_size_bytes(model) == 40 * 4
    # A format given under either name applies to the shared tensor.
    assert compressed_size_bytes(model, {"head.weight": TensorFormat(bits=8)}) == 40


# --- MACs -----------------------------------------------------------------------------------------


def test_count_macs_linear():
    assert count_macs(nn.Linear(10, 4), torch.randn(3, 10)) == 3 * 10 * 4


@pytest.mark.parametrize(
    ("size", "stride", "padding", "out_hw"),
    [(16, 1, 1, 16), (17, 2, 0, 8), (9, 1, 0, 7)],
)
def test_count_macs_conv2d(size, stride, padding, out_hw):
    conv = nn.Conv2d(3, 8, kernel_size=3, stride=stride, padding=padding)
    batch = 2
    expected = out_hw * out_hw * 8 * 3 * 3 * 3 * batch
    assert count_macs(conv, torch.randn(batch, 3, size, size)) == expected


def test_count_macs_tuple_list_and_dict_inputs_restore_training_flags():
    model = TwoInputs()
    model.train()
    model.right.eval()  # a mixed state must come back exactly as it was
    a, b = torch.randn(2, 6), torch.randn(2, 3)
    expected = 2 * 6 * 5 + 2 * 3 * 5
    assert count_macs(model, (a, b)) == expected
    assert count_macs(model, [a, b]) == expected
    assert count_macs(model, {"a": a, "b": b}) == expected
    assert model.seen_training == [False, False, False]
    assert model.training and model.left.training and not model.right.training


def test_count_macs_runs_without_autograd():
    class GradProbe(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(2, 2)
            self.grad_enabled: bool | None = None

        def forward(self, x):
            self.grad_enabled = torch.is_grad_enabled()
            return self.fc(x)

    probe = GradProbe()
    count_macs(probe, torch.randn(1, 2))
    assert probe.grad_enabled is False


# --- sizes ----------------------------------------------------------------------------------------


def test_tensor_storage_bits_picks_cheapest_layout():
    dense = torch.ones(100)
    assert tensor_storage_bits(dense) == 100 * 32

    half = torch.ones(100)
    half[:50] = 0.0
    # bitmask 50*32 + 100 = 1700 beats coordinates 50*(32+7) = 1950 and dense 3200
    assert tensor_storage_bits(half) == 1700

    sparse = torch.zeros(100)
    sparse[:10] = 3.0
    # coordinates 10*(32+7) = 390 beat bitmask 10*32 + 100 = 420
    assert tensor_storage_bits(sparse) == 390

    assert tensor_storage_bits(torch.zeros(100)) == 0
    assert tensor_storage_bits(torch.ones(5, dtype=torch.float16)) == 5 * 16
    assert tensor_storage_bits(torch.ones(1)) == 32  # a single value needs no index bits


def test_compressed_size_of_90_percent_sparse_fp32_weight():
    layer = _filled_linear(10, 10, bias=False)
    _zero_first(layer.weight, 90)
    nnz, numel = 10, 100
    by_hand = min(numel * 32, nnz * 32 + numel, nnz * (32 + math.ceil(math.log2(numel))))
    assert by_hand == 390
    assert compressed_size_bytes(layer) == math.ceil(by_hand / 8) == 49
    assert compressed_size_bytes(layer) < 100 * 4


def test_codebook_format_bits():
    fmt = TensorFormat(bits=4, codebook_entries=16)
    weight = torch.ones(16, 16)
    assert tensor_storage_bits(weight, fmt) == 256 * 4 + 16 * 32

    _zero_first(weight, 128)
    # dense 1024, bitmask 128*4 + 256 = 768, coordinates 128*(4+8) = 1536; plus the codebook
    assert tensor_storage_bits(weight, fmt) == 768 + 16 * 32

    layer = _filled_linear(16, 16, bias=False)
    assert compressed_size_bytes(layer, {"weight": fmt}) == (256 * 4 + 16 * 32) // 8


def test_compressed_size_counts_buffers_and_integer_buffers_dense():
    bn = nn.BatchNorm1d(4)
    # weight = ones (16 B), bias = zeros (0 B), running_mean = zeros (0 B), running_var = ones (16 B),
    # num_batches_tracked = int64 scalar 0, kept dense (8 B)
    assert compressed_size_bytes(bn) == 16 + 0 + 0 + 16 + 8


def test_compressed_size_rounds_up_per_tensor():
    model = nn.Sequential(_filled_linear(3, 1, bias=False), _filled_linear(1, 3, bias=False))
    fmt = TensorFormat(bits=1)
    # 3 bits each, rounded up to one byte per tensor
    assert compressed_size_bytes(model, {"0.weight": fmt, "1.weight": fmt}) == 2


def test_tensor_format_validation():
    with pytest.raises(ValueError):
        TensorFormat(bits=0)
    with pytest.raises(ValueError):
        TensorFormat(bits=4, codebook_entries=-1)


def test_dense_size_bytes_covers_the_raw_data():
    size = dense_size_bytes(nn.Linear(100, 100))
    raw = (100 * 100 + 100) * 4
    assert raw < size < raw + 4096


def test_wrapper_subclass_weights_count_their_inner_tensors():
    pytest.importorskip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    model = nn.Sequential(nn.Linear(64, 32))
    fp32_bytes = compressed_size_bytes(model)
    assert fp32_bytes == (64 * 32 + 32) * 4
    quantize_(model, Int8WeightOnlyConfig())
    quantized = compressed_size_bytes(model)
    # int8 codes alone take 64*32 bytes; per-row scales add a little on top
    assert 64 * 32 + 32 * 4 <= quantized < fp32_bytes / 3
    assert count_parameters(model) == 64 * 32 + 32


# --- snapshots and summaries ----------------------------------------------------------------------


def test_compression_stats_and_summary_by_hand():
    before_model = _filled_linear(10, 10, bias=False)
    after_model = _filled_linear(10, 10, bias=False)
    _zero_first(after_model.weight, 90)
    x = torch.randn(2, 10)

    before = compression_stats(before_model, x)
    after = compression_stats(after_model, x)
    assert before.total_params == after.total_params == 100
    assert after.nonzero_params == 10
    assert after.sparsity == pytest.approx(0.9)
    assert before.macs == after.macs == 2 * 10 * 10
    assert before.compressed_bytes == 400
    assert after.compressed_bytes == 49
    assert after.layer_sparsity == {"weight": pytest.approx(0.9)}

    summary = compression_summary(before, after)
    assert summary["params_before"] == 100
    assert summary["params_after"] == 10
    assert summary["compression_rate"] == pytest.approx(10.0)
    assert before.raw_bytes == 400
    assert before.dense_bytes > before.raw_bytes  # the file adds pickle overhead
    assert summary["size_before"] == before.raw_bytes
    assert summary["size_after"] == 49
    assert summary["size_ratio"] == pytest.approx(400 / 49)
    assert summary["macs_before"] == summary["macs_after"] == 200
    assert summary["macs_ratio"] == pytest.approx(1.0)
    assert summary["sparsity_after"] == pytest.approx(0.9)


def test_compression_summary_without_macs_and_with_zero_denominators():
    before = CompressionStats(100, 100, 0.0, None, 700, 400, 400, {})
    after = CompressionStats(100, 0, 1.0, 50, 700, 400, 0, {})
    summary = compression_summary(before, after)
    assert summary["macs_ratio"] is None
    assert summary["compression_rate"] == math.inf
    assert summary["size_ratio"] == math.inf


def test_stats_without_example_input_and_to_dict_is_json():
    stats = compression_stats(nn.Sequential(_filled_linear(2, 2), nn.BatchNorm1d(2)))
    assert stats.macs is None
    data = json.loads(json.dumps(stats.to_dict()))
    assert data["total_params"] == 6 + 4
    assert data["layer_sparsity"] == {"0.weight": 0.0, "1.weight": 0.0}


# --- latency --------------------------------------------------------------------------------------


def test_measure_latency_restores_threads_and_training():
    model = TwoInputs().train()
    threads_before = torch.get_num_threads()
    result = measure_latency(
        model, {"a": torch.randn(4, 6), "b": torch.randn(4, 3)}, repeats=5, warmup=2, threads=1
    )
    assert isinstance(result, LatencyResult)
    assert result.repeats == 5
    assert result.threads == 1
    assert result.batch_size == 4
    assert 0 < result.min_ms <= result.median_ms
    assert result.mean_ms > 0 and result.stdev_ms >= 0
    assert torch.get_num_threads() == threads_before
    assert model.training and model.left.training
    assert model.seen_training == [False] * 7


def test_measure_latency_runs_in_inference_mode_and_restores_on_error():
    class Failing(nn.Module):
        def forward(self, x):
            assert torch.is_inference_mode_enabled()
            raise RuntimeError("boom")

    module = Failing().train()
    threads_before = torch.get_num_threads()
    with pytest.raises(RuntimeError, match="boom"):
        measure_latency(module, torch.zeros(1), repeats=1, warmup=0, threads=1)
    assert torch.get_num_threads() == threads_before
    assert module.training


def test_measure_latency_batch_size_and_validation():
    result = measure_latency(nn.Identity(), (torch.zeros(7, 2),), repeats=1, warmup=0)
    assert result.batch_size == 7
    assert result.stdev_ms == 0.0
    assert result.threads == torch.get_num_threads()
    assert measure_latency(nn.Identity(), torch.tensor(1.0), repeats=1, warmup=0).batch_size is None
    with pytest.raises(ValueError):
        measure_latency(nn.Identity(), torch.zeros(1), repeats=0)
    with pytest.raises(ValueError):
        measure_latency(nn.Identity(), torch.zeros(1), threads=0)


def test_compare_latency_interleaves_all_models():
    small, big = _filled_linear(8, 8).train(), _filled_linear(8, 128)
    threads_before = torch.get_num_threads()
    results = compare_latency({"small": small, "big": big}, torch.randn(3, 8), repeats=4, warmup=1, rounds=3)
    assert list(results) == ["small", "big"]
    for result in results.values():
        assert result.repeats == 3 * 4
        assert result.batch_size == 3
        assert result.median_ms > 0
    assert torch.get_num_threads() == threads_before
    assert small.training and big.training
    assert compare_latency({}, torch.zeros(1)) == {}
    with pytest.raises(ValueError):
        compare_latency({"m": nn.Identity()}, torch.zeros(1), rounds=0)


def test_count_macs_counts_attention_in_eval_mode():
    layer = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, batch_first=True)
    x = torch.randn(1, 8, 32)
    # q, k, v and out projections (4 * 8 * 32 * 32), scores and weighted sum (2 * 8 * 8 * 32), FFN (2 * 8 * 32 * 64)
    expected = 4 * 8 * 32 * 32 + 2 * 8 * 8 * 32 + 2 * 8 * 32 * 64
    assert count_macs(layer, x) == expected
    assert torch.backends.mha.get_fastpath_enabled()  # restored


@pytest.mark.parametrize("batch", [1, 2, 7])
def test_count_macs_per_sample_does_not_grow_with_the_batch(batch):
    # Conv 3->4 (3x3, no padding) on 6x6: 4*4 positions * 4 channels * 27 = 1,728; Linear 64->5: 320.
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(64, 5))
    example = torch.randn(batch, 3, 6, 6)
    assert count_macs_per_sample(model, example) == 4 * 4 * 4 * 27 + 64 * 5 == 2048
    assert count_macs(model, example) == 2048 * batch


def test_repeat_sample_repeats_the_first_sample_of_every_tensor():
    x = torch.arange(6.0).reshape(3, 2)
    out = repeat_sample((x, {"mask": torch.tensor([[1], [0], [0]])}, 5), 4)
    assert out[0].tolist() == [[0.0, 1.0]] * 4 and out[1]["mask"].tolist() == [[1]] * 4 and out[2] == 5
    with pytest.raises(ValueError, match="batch_size"):
        repeat_sample(x, 0)


def test_tensor_sizes_and_bits_per_tensor_add_up_to_the_compressed_size():
    model = nn.Sequential(nn.Linear(10, 10), nn.BatchNorm1d(10))
    _zero_first(model[0].weight, 90)  # 10 non-zero of 100: coordinate list 10 * (32 + 7) bits
    formats = {"0.bias": TensorFormat(bits=8)}
    sizes = tensor_sizes(model, formats)
    assert sizes == {
        "0.weight": math.ceil(10 * 39 / 8),
        "0.bias": 10,
        "1.weight": 40,
        "1.bias": 0,  # all zeros: an empty coordinate list
        "1.running_mean": 0,
        "1.running_var": 40,
        "1.num_batches_tracked": 8,
    }
    stats = compression_stats(model, formats=formats)
    assert stats.layer_bytes == sizes and stats.compressed_bytes == sum(sizes.values()) == 147
    assert stats.layer_bits == {
        "0.weight": 32,
        "0.bias": 8,
        "1.weight": 32,
        "1.bias": 32,
        "1.running_mean": 32,
        "1.running_var": 32,
    }
