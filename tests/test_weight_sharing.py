import inspect
import math

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

from examples.models import ImageClassifier
from lightning_compress import BinaryWeights, CompressionMonitor, GradualPruning
from lightning_compress.quantization.weight_sharing import (
    WeightSharing,
    WeightSharingConfig,
    huffman_code_lengths,
    huffman_decode,
    huffman_encode,
    init_centroids,
    kmeans_1d,
    layer_storage,
    relative_positions,
    share_weights,
    share_weights_,
    shared_tensor,
)
from tests.conftest import RecordSteps, SGDClassifier, fit_or_resume, trainer_kwargs

# -- the functional core ---------------------------------------------------------------------------------


def test_kmeans_matches_scikit_learn_from_the_same_linear_initialization():
    from sklearn.cluster import KMeans

    values = torch.cat([torch.randn(3000) * 0.05, torch.randn(500) * 0.3 + 0.5, torch.randn(200) - 1.0])
    for k in (4, 16):
        ours, assignments = kmeans_1d(values, k, iterations=300)
        init = init_centroids(values, k).numpy()[:, None].astype(np.float64)
        reference = KMeans(k, init=init, n_init=1, max_iter=300, tol=0.0).fit(
            values.double().numpy()[:, None]
        )
        assert np.allclose(ours.numpy(), np.sort(reference.cluster_centers_.ravel()), atol=1e-4)
        # Every value sits in its nearest cluster.
        distances = (values[:, None] - ours[None, :]).abs()
        assert torch.equal(assignments, distances.argmin(1))


def test_linear_initialization_keeps_the_extreme_weights_density_does_not():
    values = torch.cat([torch.randn(10_000) * 0.01, torch.tensor([-1.0, 1.0])])
    linear = init_centroids(values, 8, "linear")
    density = init_centroids(values, 8, "density")
    assert linear.min() == -1.0 and linear.max() == 1.0
    assert density.abs().max() < 0.05
    shared, _ = kmeans_1d(values, 8, init="linear")
    assert shared.min() == -1.0 and shared.max() == 1.0  # the two large weights keep their own value


def test_shared_weights_keep_pruned_zeros_out_of_the_clusters():
    weight = torch.randn(64, 32)
    weight[weight.abs() < 0.8] = 0.0
    codebook, indices, kept = share_weights(weight, bits=3)
    shared = shared_tensor(codebook, indices, kept)
    assert torch.equal(shared == 0, weight == 0)
    assert len(shared[kept].unique()) <= 8 and codebook.numel() == 8
    assert (shared[kept] != 0).all()  # no kept weight is clustered to zero
    assert (shared - weight).norm() / weight.norm() < 0.15


def test_huffman_lengths_are_optimal_and_the_stream_decodes():
    counts = {0: 45, 1: 13, 2: 12, 3: 16, 4: 9, 5: 5}  # the textbook example
    lengths = huffman_code_lengths(counts)
    assert sum(counts[s] * lengths[s] for s in counts) == 224
    assert sum(2.0**-length for length in lengths.values()) == 1.0  # a complete prefix code
    generator = torch.Generator().manual_seed(0)
    symbols = torch.multinomial(torch.tensor([0.6, 0.2, 0.1, 0.05, 0.05]), 5000, True, generator=generator)
    data, lengths = huffman_encode(symbols)
    assert np.array_equal(huffman_decode(data, lengths, len(symbols)), symbols.numpy())
    coded_bits = sum(int((symbols == s).sum()) * length for s, length in lengths.items())
    assert len(data) == math.ceil(coded_bits / 8)
    entropy = -sum(p * math.log2(p) for p in (0.6, 0.2, 0.1, 0.05, 0.05))
    assert entropy <= coded_bits / len(symbols) <= entropy + 1


def test_relative_positions_rebuild_the_sparsity_pattern_with_fillers():
    kept = torch.rand(5000, generator=torch.Generator().manual_seed(1)) < 0.03
    gaps, fillers = relative_positions(kept, index_bits=4)
    assert gaps.min() >= 1 and gaps.max() <= 16
    positions = np.cumsum(gaps) - 1
    assert np.array_equal(positions[~fillers], np.flatnonzero(kept.numpy()))
    assert fillers.sum() > 0


def test_huffman_size_is_the_size_of_streams_that_decode_to_the_weight():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(40, 50, generator=generator)
    weight[torch.rand(40, 50, generator=generator) < 0.9] = 0  # irregular gaps, some longer than 2**4
    codebook, indices, kept = share_weights(weight, bits=3)
    shared = shared_tensor(codebook, indices, kept)
    storage = layer_storage(shared, indices, bits=3, index_bits=4)
    # Deep Compression's layout, coded here by hand: per stored entry a gap and a symbol (a cluster index, or
    # 8 = a filler zero), each stream Huffman-coded, plus one code-length byte per symbol value and the codebook.
    gaps, fillers = relative_positions(kept, index_bits=4)
    symbols = np.full(len(gaps), 8, dtype=np.int64)
    symbols[~fillers] = indices[kept].numpy()
    streams = [huffman_encode(symbols), huffman_encode(gaps - 1)]
    coded = sum(len(data) + max(lengths) + 1 for data, lengths in streams) + 8 * 4
    assert storage.huffman_bytes == coded and storage.entries == len(gaps)
    # The streams really hold the weight: decode them and rebuild it.
    (sym_data, sym_lengths), (gap_data, gap_lengths) = streams
    decoded_symbols = huffman_decode(sym_data, sym_lengths, len(gaps))
    positions = np.cumsum(huffman_decode(gap_data, gap_lengths, len(gaps)) + 1) - 1
    rebuilt = torch.zeros(weight.numel())
    stored = decoded_symbols != 8
    rebuilt[torch.from_numpy(positions[stored])] = codebook[torch.from_numpy(decoded_symbols[stored])]
    assert torch.equal(rebuilt.view_as(weight), shared)
    assert storage.huffman_bytes < storage.shared_bytes < storage.pruned_bytes < storage.dense_bytes


def test_layer_storage_counts_each_stage():
    weight = torch.zeros(100, 100)
    weight.view(-1)[::20] = torch.linspace(-1, 1, 500)
    codebook, indices, kept = share_weights(weight, bits=4)
    storage = layer_storage(shared_tensor(codebook, indices, kept), indices, bits=4, index_bits=5)
    assert storage.dense_bytes == 40_000 and storage.nonzero == 500 and storage.entries == 500
    assert storage.pruned_bytes == math.ceil(500 * (32 + 5) / 8)
    assert storage.shared_bytes == math.ceil(500 * (4 + 5) / 8) + 16 * 4
    # Gaps are all 20 and the 16 clusters are about equally used: Huffman saves little on the indices
    # but the constant gaps cost one bit each.
    assert storage.huffman_bytes < storage.shared_bytes
    dense = layer_storage(torch.randn(10, 10), torch.zeros(10, 10, dtype=torch.uint8), bits=2)
    assert dense.index_bits == 0 and dense.shared_bytes == math.ceil(100 * 2 / 8) + 4 * 4


@pytest.mark.parametrize(("bits", "dtype"), [(8, torch.uint8), (9, torch.int32), (16, torch.int32)])
def test_indices_hold_every_cluster_up_to_16_bits(bits, dtype):
    # More distinct values than clusters, spread evenly: with the linear initialization every cluster is used.
    weight = torch.linspace(0.01, 1.0, 2**bits + 4464 if bits == 16 else 2**bits * 2)
    codebook, indices, kept = share_weights(weight, bits=bits, iterations=2)
    assert indices.dtype == dtype and codebook.numel() == 2**bits
    assert int(indices.min()) == 0 and int(indices.max()) == 2**bits - 1
    assert len(indices.unique()) == 2**bits  # at 16 bits: 65,536 clusters, most above int16's 32,767
    shared = shared_tensor(codebook, indices, kept)
    # Each value lands on its own cluster's centroid, not on a wrapped-around negative index.
    assert float((shared - weight).abs().max()) < 2.0 / 2**bits
    assert torch.equal(shared.sort().values, shared)


def test_the_verb_shares_the_weights_of_a_plain_module_and_keeps_them_shared_through_a_step():
    generator = torch.Generator().manual_seed(3)
    model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 5))
    with torch.no_grad():
        model[0].weight[model[0].weight.abs() < 0.05] = 0.0  # pruned entries
    pruned = model[0].weight == 0
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    shared = share_weights_(model, WeightSharingConfig(bits=3, modules=nn.Linear))
    params = {name: p for name, p in model.named_parameters() if name in shared.codebooks}
    assert sorted(params) == ["0.weight", "2.weight"]
    for name, param in params.items():
        codebook, indices, kept = shared.codebooks[name], shared.indices[name], shared.kept[name]
        assert torch.equal(param.detach(), shared_tensor(codebook, indices, kept))
        assert len(param[kept].unique()) == 8 and codebook.numel() == 8
    assert torch.equal(model[0].weight == 0, pruned) and int(pruned.sum()) > 10
    assert torch.equal(model[0].bias, before["0.bias"])  # only the weights are shared
    changed = sum(float((params[n].detach() - before[n]).norm() ** 2) for n in params)
    norm = sum(float(before[n].norm() ** 2) for n in params)
    assert shared.quantization_error == pytest.approx(math.sqrt(changed / norm), rel=1e-6)
    # One SGD step by hand: each shared value moves by the learning rate times its members' summed gradient.
    model(torch.randn(16, 20, generator=generator)).pow(2).sum().backward()
    grads = {name: p.grad.clone() for name, p in params.items()}
    codebooks = {name: c.clone() for name, c in shared.codebooks.items()}
    shared.sum_gradients_(params)
    with torch.no_grad():
        for param in params.values():
            param -= 0.1 * param.grad
    shared.snap_(params)
    for name, param in params.items():
        indices, kept = shared.indices[name].long(), shared.kept[name]
        for k in range(8):
            members = (indices == k) & kept
            summed = float(grads[name][members].sum())
            assert torch.allclose(param.grad[members], torch.full((int(members.sum()),), summed), atol=1e-6)
            assert float(shared.codebooks[name][k]) == pytest.approx(
                float(codebooks[name][k]) - 0.1 * summed, abs=1e-6
            )
        assert torch.equal(param.detach(), shared.spread(name, shared.codebooks[name]))
    assert shared.storage_formats()["2.weight"].bits == 3


# -- the callback -----------------------------------------------------------------------------------------


class RecordSharedStep(Callback):
    """Listed after WeightSharing: sees the summed gradients and the codebook around one optimizer step."""

    def __init__(self, sharing, name):
        self.sharing, self.name, self.records = sharing, name, []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.sharing.clustered:
            param = dict(pl_module.named_parameters())[self.name]
            self._before = (self.sharing.codebooks[self.name].clone(), param.grad.clone())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.sharing.clustered and hasattr(self, "_before"):
            self.records.append((*self._before, self.sharing.codebooks[self.name].clone()))


def test_each_shared_value_moves_by_the_sum_of_its_members_gradients(tmp_path, digits):
    sharing = WeightSharing(bits=3, start="step:2", modules="net.8")
    record = RecordSharedStep(sharing, "net.8.weight")
    model = SGDClassifier("small_cnn", lr=0.1, momentum=0.0)
    initial = model.net[8].weight.detach().clone()
    pl.Trainer(**trainer_kwargs(tmp_path), callbacks=[sharing, record], limit_train_batches=6).fit(
        model, datamodule=digits
    )
    assert len(record.records) == 4
    indices, kept = sharing.indices["net.8.weight"].long(), sharing.kept["net.8.weight"]
    for before, grad, after in record.records:
        for k in range(8):
            members = (indices == k) & kept
            if members.any():
                # Every member carries the cluster's summed gradient; the shared value takes one SGD step.
                assert torch.allclose(grad[members], grad[members][0].expand(int(members.sum())))
                assert after[k] == pytest.approx(float(before[k] - 0.1 * grad[members][0]), abs=1e-6)
    weight = model.net[8].weight.detach()
    assert torch.equal(weight, sharing.codebooks["net.8.weight"][indices])
    assert len(weight.unique()) == 8 and not torch.equal(weight, initial)


def test_pruning_then_sharing_keeps_zeros_and_a_few_values_per_layer(tmp_path, digits):
    pruning = GradualPruning(amount=0.8, start=0.0, end=0.4)
    sharing = WeightSharing(bits=4, start=0.5)
    monitor = CompressionMonitor(measure_latency=False, verbose=False)
    model = ImageClassifier("small_cnn")
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=4), callbacks=[pruning, sharing, monitor])
    trainer.fit(model, datamodule=digits)
    for name, param in model.named_parameters():
        if name in sharing.codebooks:
            values = param.detach()
            assert (values == 0).float().mean() == pytest.approx(0.8, abs=2e-3)
            assert torch.equal(values == 0, ~sharing.kept[name])
            assert len(values[values != 0].unique()) <= 16
    assert trainer.callback_metrics["val_acc"] > 0.8
    report = sharing.storage_report(model)
    ratios = report["ratios"]
    assert ratios["dense"] == 1.0 and ratios["pruned"] < ratios["shared"] < ratios["huffman"]
    assert ratios["shared"] > 6
    assert float(trainer.callback_metrics["weight_sharing/compression_ratio"]) == pytest.approx(
        ratios["huffman"], rel=1e-4
    )
    assert 0.0 < float(trainer.callback_metrics["weight_sharing/quantization_error"]) < 0.2
    # CompressionMonitor counts the shared weights at 4 bits plus their codebook.
    assert monitor.report["summary"]["size_ratio"] > 5


class TiedLanguageModel(pl.LightningModule):
    """A next-token model whose output layer reuses the embedding's weight (tied weights)."""

    def __init__(self, vocab=12, dim=6):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.hidden = nn.Linear(dim, dim)
        self.decoder = nn.Linear(dim, vocab, bias=False)
        self.decoder.weight = self.embed.weight

    def forward(self, tokens):
        return self.decoder(torch.tanh(self.hidden(self.embed(tokens))))

    def training_step(self, batch, batch_idx):
        tokens = batch[0]
        logits = self(tokens[:, :-1])
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


@pytest.mark.parametrize("modules", [nn.Linear, [nn.Embedding, nn.Linear], "decoder"])
def test_tied_weights_are_shared_once_and_stay_tied(tmp_path, modules):
    tokens = torch.randint(0, 12, (32, 5), generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(tokens), batch_size=8)
    model = TiedLanguageModel()
    sharing = WeightSharing(bits=2, start="step:1", modules=modules)
    monitor = CompressionMonitor(measure_latency=False, verbose=False)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=2), callbacks=[sharing, monitor])
    trainer.fit(model, loader)
    assert model.decoder.weight is model.embed.weight
    # One tensor, clustered once under its first name, with 2**bits shared values.
    tied = "embed.weight"
    assert sorted(sharing.codebooks) == ([tied] if modules == "decoder" else [tied, "hidden.weight"])
    assert sharing.codebooks[tied].numel() == 4
    weight = model.embed.weight.detach()
    assert torch.equal(weight, sharing.codebooks[tied][sharing.indices[tied].long()])
    assert set(weight.unique().tolist()) <= set(sharing.codebooks[tied].tolist())
    # The tied tensor is stored once: 12 x 6 entries at 2 bits plus 4 fp32 centroids.
    report = sharing.storage_report(model)
    assert report["layers"][tied]["numel"] == 72 and report["layers"][tied]["shared_bytes"] == 18 + 16
    assert report["total"]["dense_bytes"] == (72 + 36 + 6) * 4  # tied weight, hidden weight and bias
    assert float(trainer.callback_metrics["weight_sharing/compression_ratio"]) == pytest.approx(
        report["ratios"]["huffman"], rel=1e-4
    )


def _resume_run(tmp_path, digits, ckpt_path=None, checkpoint=None, steps=None):
    pl.seed_everything(5, verbose=False)
    sharing = WeightSharing(bits=3, start="step:3", modules=nn.Linear)
    model = ImageClassifier("small_cnn")
    callbacks = [sharing, steps or RecordSteps()]
    fit_or_resume(
        tmp_path, digits, model, callbacks, ckpt_path, checkpoint, max_epochs=3, limit_train_batches=5
    )
    return model, sharing


def test_resume_after_clustering_is_bit_exact(tmp_path, digits):
    full, _ = _resume_run(tmp_path / "full", digits)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    _resume_run(tmp_path / "first", digits, checkpoint=ckpt)
    steps = RecordSteps()
    resumed, sharing = _resume_run(
        tmp_path / "second", digits, ckpt_path=tmp_path / "ckpt" / "epoch=0-step=5.ckpt", steps=steps
    )
    assert steps.steps == list(range(5, 15))  # continued from the checkpoint
    assert sharing.clustered
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


# Every constructor argument; docs/quantization.md ("What fails early") lists the same rows.
BAD_ARGUMENTS = [
    ({"bits": 0}, ValueError, "`bits=0` is out of range: weight sharing supports 1 to 16 bits"),
    ({"bits": 17}, ValueError, "`bits=17` is out of range"),
    ({"bits": 2.5}, TypeError, "`bits=2.5` must be an integer"),
    ({"start": 1.5}, ValueError, "`start=1.5` is outside \\[0, 1\\]"),
    ({"start": "batch:3"}, ValueError, "`start='batch:3'` is not understood"),
    ({"modules": [3]}, TypeError, "`modules` got 3, which is neither a module name pattern"),
    ({"exclude": [3]}, TypeError, "`exclude` got 3, which is neither a module name pattern"),
    ({"min_params": -1}, ValueError, "`min_params=-1` must be a non-negative integer"),
    (
        {"init": "kmeans++"},
        ValueError,
        "Unknown `init='kmeans\\+\\+'`. Use one of 'linear', 'density', 'random'",
    ),
    ({"index_bits": 0}, ValueError, "`index_bits=0` must be an integer from 1 to 16"),
    ({"index_bits": 17}, ValueError, "`index_bits=17` must be an integer from 1 to 16"),
    ({"iterations": 0}, ValueError, "`iterations=0` must be a positive integer"),
    ({"seed": -1}, ValueError, "`seed=-1` must be a non-negative integer"),
    ({"seed": "0"}, ValueError, "`seed='0'` must be a non-negative integer"),
]


@pytest.mark.parametrize(("kwargs", "error", "match"), BAD_ARGUMENTS)
def test_bad_arguments_fail_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        WeightSharing(**kwargs)


def test_every_constructor_argument_has_a_row():
    covered = {name for kwargs, _, _ in BAD_ARGUMENTS for name in kwargs}
    assert covered == set(inspect.signature(WeightSharing).parameters)


def test_selection_without_weights_fails_at_setup(tmp_path, digits):
    trainer = pl.Trainer(**trainer_kwargs(tmp_path), callbacks=[WeightSharing(modules="decoder.*")])
    with pytest.raises(ValueError, match="`modules`: no name 'decoder.\\*'"):
        trainer.fit(ImageClassifier("small_cnn"), datamodule=digits)


def test_with_pruning_and_default_arguments_the_sharing_waits_for_the_amount(tmp_path, digits):
    # Clustered at step 0, the weights pruned later were set back to their shared values after every step.
    pruning, sharing = GradualPruning(amount=0.5, modules=nn.Linear), WeightSharing(modules=nn.Linear)
    model = ImageClassifier("small_cnn")
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=1), callbacks=[sharing, pruning])
    trainer.fit(model, datamodule=digits)
    assert sharing._start_step == pruning.ramp_end > 0
    for name in ("net.8.weight", "net.10.weight"):
        weight = dict(model.named_parameters())[name].detach()
        assert float((weight == 0).float().mean()) == pytest.approx(0.5, abs=1e-3), name
        assert torch.equal(weight == 0, ~sharing.kept[name])


@pytest.mark.parametrize(
    ("sharing", "match"),
    [
        (
            lambda: WeightSharing(modules=nn.Linear, start=0.1),
            r"`start=0.1` clusters the weights at step 2, before GradualPruning reaches its amount at step 8.*"
            r"Leave `start` unset",
        ),
        (
            lambda: WeightSharing(start="step:40"),
            r"`start='step:40'` is step 40, but this fit ends after 20 steps",
        ),
        (
            lambda: BinaryWeights(start="epoch:3"),
            r"`start='epoch:3'` is step 60, but this fit ends after 20 steps",
        ),
    ],
    ids=["before_the_pruning_ends", "sharing_past_the_fit", "binary_past_the_fit"],
)
def test_a_start_that_would_leave_the_weights_unshared_fails_at_setup(tmp_path, digits, sharing, match):
    pruning = GradualPruning(amount=0.5, modules=nn.Linear, end=0.4)
    record = RecordSteps()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=1), callbacks=[pruning, sharing(), record])
    with pytest.raises(ValueError, match=match):
        trainer.fit(ImageClassifier("small_cnn"), datamodule=digits)
    assert record.steps == []
