"""Distillation over the positions that count (``loss_mask``): on padded token batches the terms equal those of the
real tokens run without padding, in the core and in the callback; a batch masked entirely adds nothing; bad masks
fail before the first step."""

import copy

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

from lightning_compress import KnowledgeDistillation
from lightning_compress.distillation import (
    DistillationCapture,
    DistillationConfig,
    FeatureLoss,
    distill,
    embedding_loss,
    hinton_loss,
)
from tests.conftest import PaddedAttention, RecordSteps, dict_batches, trainer_kwargs

VOCABULARY = 16


def _real(x):
    return x["attention_mask"]


def _batch():
    batch = next(iter(dict_batches(n=8)))
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def _pair(batch_first, seed=0):
    torch.manual_seed(seed)
    return PaddedAttention(batch_first, classes=VOCABULARY), PaddedAttention(batch_first, classes=VOCABULARY)


def _rows(model, inputs, batch_first):
    """Each sample run alone on its real tokens (no padding): the logits and the `embed` and `attn` outputs, one row
    per real token, concatenated."""
    seen = {}
    hooks = [
        getattr(model, name).register_forward_hook(lambda m, a, out, name=name: seen.__setitem__(name, out))
        for name in ("embed", "attn")
    ]
    rows = {"logits": [], "embed": [], "attn": []}
    for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"], strict=True):
        real = int(mask.sum())
        logits = model(ids[None, :real], mask[None, :real])
        first = (lambda x: x[0]) if batch_first else (lambda x: x[:, 0])
        rows["logits"].append(first(logits))
        rows["embed"].append(seen["embed"][0])  # the embedding is batch first in both layouts
        rows["attn"].append(first(seen["attn"][0]))
    for hook in hooks:
        hook.remove()
    return {name: torch.cat(parts) for name, parts in rows.items()}


FEATURES = [FeatureLoss("embed", loss="mse"), FeatureLoss("attn", loss="cosine")]


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "positions_first"])
def test_the_masked_terms_and_gradients_are_those_of_the_real_tokens_without_padding(batch_first):
    student, teacher = _pair(batch_first)
    inputs = _batch()
    assert int(inputs["attention_mask"].sum()) < inputs["attention_mask"].numel()  # the batch has padding
    config = DistillationConfig(temperature=2.0, features=FEATURES, loss_mask=_real)
    capture = distill(student, teacher, config, example_input=inputs)
    student(**inputs)
    masked = capture.distill()
    assert capture.layouts == {"logits": "batch_first" if batch_first else "positions_first", "0": "batch_first",
                               "1": "batch_first" if batch_first else "positions_first"}  # fmt: skip
    capture.remove()
    s, t = _rows(student, inputs, batch_first), _rows(teacher, inputs, batch_first)
    reference = {
        "kl": hinton_loss(s["logits"], t["logits"], 2.0),
        "mse/embed": F.mse_loss(s["embed"], t["embed"]),
        "cosine/attn": embedding_loss(s["attn"], t["attn"], "cosine"),
    }
    for name, value in reference.items():
        torch.testing.assert_close(masked.terms[name], value, rtol=1e-5, atol=1e-6)
    # The gradient too: that of the loss over the real tokens alone.
    params = list(student.parameters())
    got = torch.autograd.grad(masked.loss, params)
    expected = torch.autograd.grad(sum(reference.values()), params)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)
    # Without the mask every term counts the padded positions as well, and differs.
    with distill(student, teacher, DistillationConfig(temperature=2.0, features=FEATURES), inputs) as whole:
        student(**inputs)
        unmasked = whole.distill()
    for name in reference:
        assert abs(float(unmasked.terms[name]) - float(masked.terms[name])) > 1e-3 * float(masked.terms[name])


def test_a_batch_masked_entirely_adds_nothing_and_leaves_no_nan():
    student, teacher = _pair(True)
    inputs = _batch()
    keep = {"real": 1}
    config = DistillationConfig(features=FEATURES, loss_mask=lambda x: x["attention_mask"] * keep["real"])
    capture = distill(student, teacher, config, example_input=inputs)
    keep["real"] = 0  # from now on the mask keeps no position
    student(**inputs)
    distilled = capture.distill()
    capture.remove()
    assert float(distilled.loss) == 0.0 and all(float(v) == 0.0 for v in distilled.terms.values())
    assert "agreement" not in distilled.metrics(0.5, 1.0)
    grads = torch.autograd.grad(distilled.loss, list(student.parameters()), allow_unused=True)
    assert all(g is None or float(g.abs().sum()) == 0.0 for g in grads)


class TokenTagger(pl.LightningModule):
    """Tags each real token of a padded batch (:func:`dict_batches`) with the next token id."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = PaddedAttention(classes=VOCABULARY)
        inputs = _batch()
        # Keywords here, positional arguments in `training_step`: `loss_mask` gets them by name either way.
        self.example_input_array = {k: v[:2] for k, v in inputs.items()}

    def forward(self, input_ids, attention_mask):
        return self.net(input_ids, attention_mask)

    def training_step(self, batch, batch_idx):
        logits = self(batch["input_ids"], batch["attention_mask"])
        real = batch["attention_mask"].bool()
        return F.cross_entropy(logits[real], batch["input_ids"].roll(-1, 1)[real])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Logged(Callback):
    def __init__(self):
        self.rows = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.rows.append(
            {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("distillation/")}
        )


def test_the_callback_distills_the_real_tokens_as_the_core_does(tmp_path):
    model, teacher = TokenTagger(), TokenTagger(seed=1)
    start = copy.deepcopy(model)
    features = [FeatureLoss("net.embed", loss="mse"), FeatureLoss("net.attn", loss="cosine")]
    options = dict(module="net", temperature=2.0, features=features, loss_mask=_real)
    logged = Logged()
    trainer = pl.Trainer(
        **trainer_kwargs(tmp_path, max_steps=2), callbacks=[KnowledgeDistillation(teacher, **options), logged]
    )
    trainer.fit(model, dict_batches())
    # The core on the first batch, with the student as it was before the first step.
    batch = next(iter(dict_batches()))
    inputs = (batch["input_ids"], batch["attention_mask"])
    with distill(start, copy.deepcopy(teacher), DistillationConfig(**options), inputs) as capture:
        start(*inputs)
        expected = capture.distill()
    for name in ("kl", "mse/net.embed", "cosine/net.attn"):
        assert logged.rows[0][f"distillation/{name}"] == pytest.approx(float(expected.terms[name]), rel=1e-5)
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        s, t = start(*inputs), teacher(*inputs)
    agreement = float((s[real].argmax(-1) == t[real].argmax(-1)).float().mean())
    assert logged.rows[0]["distillation/agreement"] == pytest.approx(agreement)
    everywhere = float((s.argmax(-1) == t.argmax(-1)).float().mean())
    assert abs(agreement - everywhere) > 0.01, (agreement, everywhere)  # the padded positions would change it


class PooledClassifier(TokenTagger):
    """Classifies a whole sequence: logits (batch, classes), no positions left to mask."""

    def forward(self, input_ids, attention_mask):
        return self.net(input_ids, attention_mask).mean(1)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch["input_ids"], batch["attention_mask"]), batch["labels"])


class NoExample(TokenTagger):
    def __init__(self):
        super().__init__()
        self.example_input_array = None


@pytest.mark.parametrize(
    ("model_class", "loss_mask", "match"),
    [
        (
            NoExample,
            _real,
            "`loss_mask` needs the student to run once on an example input .* set `example_input_array` on the "
            "LightningModule or pass `example_input`",
        ),
        (TokenTagger, lambda x: x["mask"], "`loss_mask` failed on the model input: KeyError: 'mask'"),
        (
            TokenTagger,
            lambda x: x["attention_mask"].sum(1),
            r"`loss_mask` must return a \(batch, positions\) tensor .* shape \(1,\)",
        ),
        (PooledClassifier, _real, "neither the logits nor a feature holds those positions"),
    ],
    ids=["no_example", "fails", "not_2d", "pooled"],
)
def test_a_bad_loss_mask_fails_at_setup_before_any_step(tmp_path, model_class, loss_mask, match):
    counter = RecordSteps()
    kd = KnowledgeDistillation("self", loss_mask=loss_mask)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=2), callbacks=[kd, counter])
    with pytest.raises(ValueError, match=match):
        trainer.fit(model_class(), dict_batches())
    assert counter.steps == []


def test_the_core_needs_an_example_and_rejects_a_mask_that_does_not_fit_the_outputs():
    student, teacher = _pair(True)
    config = DistillationConfig(loss_mask=_real)
    with pytest.raises(ValueError, match="`loss_mask` needs the student to run once .* pass `example_input`"):
        distill(student, teacher, config)
    inputs = _batch()
    capture = DistillationCapture(student, teacher, config)
    with capture, pytest.raises(RuntimeError, match="`loss_mask` needs the layouts of the outputs"):
        student(**inputs)
        capture.distill()
    shorter = DistillationConfig(loss_mask=lambda x: x["attention_mask"][:, :-1])
    capture = DistillationCapture(student, teacher, shorter, layouts={"logits": "batch_first"})
    with (
        capture,
        pytest.raises(ValueError, match=r"the logits of shape \(8, 6, 16\) does not hold them laid out"),
    ):
        student(**inputs)
        capture.distill()
