"""Mask updates stay cheap: unstructured ranking selects a threshold instead of sorting, with identical masks."""

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from examples.models import ImageClassifier
from lightning_compress import GradualPruning
from lightning_compress.pruning import masks as masks_module
from lightning_compress.pruning import structured
from lightning_compress.pruning.masks import unstructured_masks
from tests.conftest import trainer_kwargs


def _reference(weights, amount, scope, previous=None):
    """The masks by definition: a stable ascending sort of |w| (pruned entries first), the first k pruned."""
    previous = previous or {}
    scores = {
        n: w.abs().reshape(-1).masked_fill(~previous[n].reshape(-1), float("-inf"))
        if n in previous
        else w.abs().reshape(-1)
        for n, w in weights.items()
    }

    def kept(s, k):
        keep = torch.ones(s.numel(), dtype=torch.bool)
        keep[torch.sort(s, stable=True).indices[:k]] = False
        return keep

    if scope == "layer":
        return {n: kept(s, round(amount * s.numel())).reshape(weights[n].shape) for n, s in scores.items()}
    flat = kept(torch.cat(list(scores.values())), round(amount * sum(s.numel() for s in scores.values())))
    out, offset = {}, 0
    for n, w in weights.items():
        out[n] = flat[offset : offset + w.numel()].reshape(w.shape)
        offset += w.numel()
    return out


def _small_cnn_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.Conv2d(16, 32, 3), nn.Linear(32, 10))
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("weight")}
    # Ties at the threshold: repeated values, exact zeros, rounded weights.
    weights["0.weight"] = (weights["0.weight"] * 4).round() / 4
    weights["1.weight"][:4] = 0.0
    weights["2.weight"][:, :8] = 0.125
    return weights


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("amount", [0.0, 0.3, 0.5, 0.77, 0.95])
def test_masks_equal_the_stable_sort_reference_exactly(scope, amount):
    weights = _small_cnn_weights()
    first = unstructured_masks(weights, amount / 2, scope=scope)
    assert all(torch.equal(first[n], m) for n, m in _reference(weights, amount / 2, scope).items())
    later = unstructured_masks(weights, amount, scope=scope, previous=first)
    expected = _reference(weights, amount, scope, previous=first)
    assert all(torch.equal(later[n], m) for n, m in expected.items())
    total = sum(m.numel() for m in later.values())
    pruned = sum(int((~m).sum()) for m in later.values())
    if scope == "global":
        assert pruned == round(amount * total)


def test_nan_scores_keep_the_sort_order():
    weights = {"w": torch.tensor([float("nan"), 0.5, 0.5, -0.1, float("nan"), 2.0])}
    for amount in (0.2, 0.5, 0.7, 0.9):
        assert torch.equal(
            unstructured_masks(weights, amount)["w"], _reference(weights, amount, "layer")["w"]
        )
    assert unstructured_masks(weights, 0.7)["w"].tolist() == [True, False, False, False, True, False]


def test_unstructured_update_selects_a_threshold_instead_of_sorting(monkeypatch):
    calls = []
    real_sort = torch.sort

    def counting_sort(*args, **kwargs):
        calls.append(args[0].numel())
        return real_sort(*args, **kwargs)

    monkeypatch.setattr(masks_module.torch, "sort", counting_sort)
    weights = _small_cnn_weights()
    layer = unstructured_masks(weights, 0.6)
    unstructured_masks(weights, 0.6, scope="global", previous=layer)
    assert calls == []
    # A NaN weight (which the threshold cannot order) falls back to the sort, for that tensor only.
    weights["2.weight"][0, 0] = float("nan")
    unstructured_masks(weights, 0.6)
    assert calls == [weights["2.weight"].numel()]


class _CountUpdates(pl.Callback):
    def __init__(self, pruning):
        self.pruning, self.updates, self._seen = pruning, 0, None

    def on_train_batch_end(self, trainer, pl_module, *args):
        if self.pruning.masks is not self._seen:
            self.updates += 1
            self._seen = self.pruning.masks


@pytest.mark.parametrize("frequency", [1, 8])
def test_structured_updates_reuse_the_dependency_graph_traced_in_setup(
    tmp_path, digits, monkeypatch, frequency
):
    traces = []
    real_build = structured._build_graph
    monkeypatch.setattr(structured, "_build_graph", lambda *a, **k: traces.append(1) or real_build(*a, **k))
    pruning = GradualPruning(
        amount=0.5, mode="structured", start=0.0, end=0.9, frequency=frequency, finalize=False
    )
    counter = _CountUpdates(pruning)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path), callbacks=[pruning, counter])
    trainer.fit(ImageClassifier("small_cnn"), datamodule=digits)
    assert counter.updates >= (10 if frequency == 1 else 2)
    # Two traces in `setup` (the model, and a copy with one channel of each group removed, which must still run),
    # one per epoch for the statistics of the model with the channels removed, whatever the number of updates.
    assert len(traces) == 3
