"""The contract every compression callback keeps, checked case by case on one tiny model.

A *case* is a callback with small arguments that make it act within a 2-epoch fit of 2 batches per epoch on the
digits. For every case:

- bad arguments fail in the constructor (before any Trainer exists), with a message that names the argument;
- a fit resumed from the checkpoint of the first epoch, with a fresh model, callback and Trainer, ends with the
  same model and callback state as the uninterrupted fit, to the bit (and the callback did act);
- two DDP ranks (one 2-process gloo launch, ``tests/_ddp_contract.py``, fits every case in turn) end with the
  same model;
- nothing the callback attached outlives the fit: no module or optimizer hook, no instance attribute hiding a
  method of the model, and inductor's ``freezing`` setting as it was.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch._inductor.config as inductor_config
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.nn.modules import module as module_globals
from torch.optim import optimizer as optimizer_globals
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from lightning_compress import (
    BinaryWeights,
    CompactConvReplacement,
    CompressionBudget,
    CompressionMonitor,
    GradualPruning,
    KnowledgeDistillation,
    LowRankReplacement,
    QuantizationAwareTraining,
    StochasticDepth,
    WeightSharing,
)
from tests.conftest import RecordSteps, SGDClassifier, trainer_kwargs

EPOCHS = 2
BATCHES = 2  # training batches per epoch: the resumed fit starts at step 2

# A case is one callback, or a list whose first callback is the one under test and whose others it needs.
CASES: dict[str, Callable[[], Callback | list[Callback]]] = {
    "pruning-unstructured": lambda: GradualPruning(amount=0.5, end=1.0, frequency=1),
    "pruning-structured": lambda: GradualPruning(amount=0.5, mode="structured", end=1.0, frequency=1),
    "low-rank": lambda: LowRankReplacement(rank=0.5, calibration_batches=2, verbose=False),
    "qat-int8": lambda: QuantizationAwareTraining(start=0.25, freeze_observers=0.75),
    "qat-intx-4bit": lambda: QuantizationAwareTraining(scheme="intx-weight-only", bits=4),
    "distillation-self": lambda: KnowledgeDistillation(teacher="self"),
    "weight-sharing": lambda: WeightSharing(bits=2, start=0.25),
    "binary": lambda: BinaryWeights(start=0.25),
    "monitor": lambda: CompressionMonitor(log_every_n_steps=1, measure_latency=False, verbose=False),
    "compact-conv": lambda: CompactConvReplacement(refine=True, calibration_batches=2, verbose=False),
    "depth": lambda: StochasticDepth(survival=0.5, remove=1, removal_batches=2, verbose=False),
    "budget-pruning": lambda: [
        CompressionBudget("prune", target=0.5, metric="params", batches=1, verbose=False, plots=False),
        GradualPruning(end=1.0, frequency=1),
    ],
}


def made(case: str) -> list[Callback]:
    """The callbacks of ``case``, the one under test first."""
    callbacks = CASES[case]()
    return callbacks if isinstance(callbacks, list) else [callbacks]


# The monitor only measures: it acts by logging under its prefix, every other case by changing the model.
LOGS_ONLY = {"monitor": "compression/"}


class _Residual(nn.Module):
    """``x + fc2(relu(fc1(x)))``: a block whose skip keeps the shape (no batch norm: the DDP ranks compare every
    buffer)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(x)))


def tiny_model(case: str | None = None) -> pl.LightningModule:
    """LeNet-300-100 on the 8x8 digits (about 50,000 weights), trained with SGD and momentum; for the depth case,
    an MLP with two residual blocks; for the depthwise-separable case, a small CNN."""
    model = SGDClassifier("small_cnn" if case == "compact-conv" else "lenet_300_100")
    if case == "depth":
        model.net = nn.Sequential(
            nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), _Residual(64), _Residual(64), nn.Linear(64, 10)
        )
    return model


# -- 1. bad arguments fail at construction, naming the argument -------------------------------------------

# (callback, arguments, exception, message fragment). The first argument is the bad one; any others are what
# it conflicts with, or what the callback needs anyway.
BAD_ARGUMENTS = [
    (GradualPruning, {"amount": 1.0}, ValueError, "`amount=1.0`"),
    (GradualPruning, {"mode": "blocks", "amount": 0.5}, ValueError, "`mode='blocks'`"),
    (GradualPruning, {"amount": 0.5, "mode": "2:4"}, ValueError, "leave `amount` unset"),
    (GradualPruning, {"frequency": 0, "amount": 0.5}, ValueError, "`frequency=0`"),
    (
        GradualPruning,
        {"end": 0.2, "start": 0.8, "amount": 0.5},
        ValueError,
        "`end=0.2` is before `start=0.8`",
    ),
    (GradualPruning, {"seed": "0", "amount": 0.5}, TypeError, "`seed='0'`"),
    (LowRankReplacement, {"rank": 0}, ValueError, "`rank=0`"),
    (LowRankReplacement, {"energy": 0.9, "rank": 0.5}, ValueError, "exactly one of `rank`"),
    (LowRankReplacement, {"method": "pca", "rank": 0.5}, ValueError, "`method='pca'`"),
    (LowRankReplacement, {"calibration_batches": 0, "rank": 0.5}, ValueError, "`calibration_batches=0`"),
    (LowRankReplacement, {"verbose": "yes", "rank": 0.5}, TypeError, "`verbose='yes'`"),
    (QuantizationAwareTraining, {"scheme": "int3"}, ValueError, "`scheme='int3'`"),
    (QuantizationAwareTraining, {"bits": 4}, ValueError, "`bits=4`"),
    (QuantizationAwareTraining, {"bits": 9, "scheme": "intx-weight-only"}, ValueError, "`bits=9`"),
    (QuantizationAwareTraining, {"start": 1.5}, ValueError, "`start=1.5`"),
    (QuantizationAwareTraining, {"convert": "yes"}, TypeError, "`convert='yes'`"),
    (KnowledgeDistillation, {"temperature": 0, "teacher": "self"}, ValueError, "`temperature=0`"),
    (KnowledgeDistillation, {"alpha": 1.5, "teacher": "self"}, ValueError, "`alpha=1.5`"),
    (KnowledgeDistillation, {"teacher": "missing.ckpt"}, ValueError, "`teacher='missing.ckpt'`"),
    (KnowledgeDistillation, {"logits": False, "teacher": "self"}, ValueError, "Nothing to distill"),
    (KnowledgeDistillation, {"end": 0.2, "start": 0.8, "teacher": "self"}, ValueError, "`end=0.2` is before"),
    (WeightSharing, {"bits": 0}, ValueError, "`bits=0`"),
    (WeightSharing, {"init": "kmeans++"}, ValueError, "`init='kmeans++'`"),
    (WeightSharing, {"iterations": 0}, ValueError, "`iterations=0`"),
    (WeightSharing, {"start": "later"}, ValueError, "`start='later'`"),
    (BinaryWeights, {"mode": "quaternary"}, ValueError, "`mode='quaternary'`"),
    (BinaryWeights, {"start": -0.5}, ValueError, "`start=-0.5`"),
    (BinaryWeights, {"finalize": 1}, TypeError, "`finalize=1`"),
    (CompressionMonitor, {"log_every_n_steps": 0}, ValueError, "`log_every_n_steps=0`"),
    (CompressionMonitor, {"latency_repeats": 0}, ValueError, "`latency_repeats=0`"),
    (CompressionMonitor, {"latency_mode": "jit"}, ValueError, "`latency_mode='jit'`"),
    (CompressionMonitor, {"metrics": "val_acc"}, TypeError, "`metrics='val_acc'`"),
    (StochasticDepth, {"survival": 1.5}, ValueError, "`survival=1.5`"),
    (StochasticDepth, {"remove": 0}, ValueError, "`remove=0`"),
    (StochasticDepth, {"remove": 1, "target_macs": 0.5}, ValueError, "give one of them"),
    (StochasticDepth, {"mode": "layer"}, ValueError, "`mode='layer'`"),
    (StochasticDepth, {"remove_at": 0.5}, ValueError, "neither `remove`"),
    (CompactConvReplacement, {"depth_multiplier": 0}, ValueError, "`depth_multiplier=0`"),
    (CompactConvReplacement, {"refine": "yes"}, TypeError, "`refine='yes'`"),
    (CompressionBudget, {"target": 0.0}, ValueError, "`target=0.0`"),
    (CompressionBudget, {"scheme": "prune", "metric": "latency"}, ValueError, "`metric='latency'`"),
    (CompressionBudget, {"batches": 0}, ValueError, "`batches=0`"),
    (CompressionBudget, {"max_drop": -1.0}, ValueError, "`max_drop=-1.0`"),
]


@pytest.mark.parametrize(
    ("callback", "kwargs", "error", "phrase"),
    [
        pytest.param(*row, id=f"{row[0].__name__}-{'-'.join(f'{k}={v}' for k, v in row[1].items())}")
        for row in BAD_ARGUMENTS
    ],
)
def test_bad_argument_fails_at_construction_naming_it(callback, kwargs, error, phrase):
    with pytest.raises(error) as raised:
        callback(**kwargs)
    message = str(raised.value)
    assert phrase in message
    assert f"`{next(iter(kwargs))}" in message  # the bad argument, by name


def test_every_callback_has_bad_arguments_and_a_case():
    classes = {type(made(case)[0]) for case in CASES}
    assert classes == {row[0] for row in BAD_ARGUMENTS}
    assert len(classes) == 10


# -- the fits every other check reads ---------------------------------------------------------------------

MODULE_HOOKS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


def _global_hooks() -> dict[str, int]:
    """The hooks torch applies to every module and every optimizer."""
    return {
        "module forward": len(module_globals._global_forward_hooks),
        "module forward pre": len(module_globals._global_forward_pre_hooks),
        "module backward": len(module_globals._global_backward_hooks),
        "module backward pre": len(module_globals._global_backward_pre_hooks),
        "optimizer step pre": len(optimizer_globals._global_optimizer_pre_hooks),
        "optimizer step post": len(optimizer_globals._global_optimizer_post_hooks),
    }


def _shadowed_methods(model: nn.Module) -> list[str]:
    """The model's instance attributes named like one of its methods (a patched ``forward``, a wrapped
    ``training_step``)."""
    return sorted(name for name in vars(model) if callable(getattr(type(model), name, None)))


class RecordShadowedMethods(Callback):
    """The model's shadowed methods (see :func:`_shadowed_methods`) seen at the end of any training batch."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen.update(_shadowed_methods(pl_module))


def _attachments(model: nn.Module) -> dict[str, Any]:
    """What a fit could leave attached: the hooks of the model's modules (by module name and kind, only where
    there are any), the model's instance attributes named like one of its methods, torch's global hooks and
    inductor's ``freezing`` setting."""
    hooks = {
        f"{name or '<model>'} {kind}": len(getattr(module, kind))
        for name, module in model.named_modules()
        for kind in MODULE_HOOKS
        if getattr(module, kind)
    }
    return {
        "hooks": hooks,
        "shadowed methods": _shadowed_methods(model),
        "global hooks": _global_hooks(),
        "inductor freezing": inductor_config.freezing,
    }


@dataclass
class Fit:
    """A finished fit of a case, and what was recorded around it."""

    model: pl.LightningModule
    callback: Callback
    companions: list[Callback]
    trainer: pl.Trainer
    steps: list[int]  # the global step at the start of every training batch
    before: dict[str, Any]  # `_attachments` of the model before the fit
    shadowed_while_training: set[str]


def _fit(root: Path, digits, case: str | None, ckpt_path: Path | None = None) -> Fit:
    """Fit ``case`` (``None``: no compression) for EPOCHS epochs of BATCHES batches: from scratch, writing a
    checkpoint at the end of every epoch, or resumed from ``ckpt_path`` with a fresh model, callback and
    Trainer."""
    pl.seed_everything(0, verbose=False)
    model, steps, shadows = tiny_model(case), RecordSteps(), RecordShadowedMethods()
    callback, *companions = [Callback()] if case is None else made(case)
    before = _attachments(model)
    checkpoints = (
        [] if ckpt_path else [ModelCheckpoint(dirpath=root / "ckpt", save_top_k=-1, every_n_epochs=1)]
    )
    settings = dict(max_epochs=EPOCHS, limit_train_batches=BATCHES, limit_val_batches=1)
    trainer = pl.Trainer(
        **trainer_kwargs(root, **settings, enable_checkpointing=not ckpt_path),
        callbacks=[callback, *companions, steps, shadows, *checkpoints],
    )
    trainer.fit(model, datamodule=digits, ckpt_path=ckpt_path)
    return Fit(model, callback, companions, trainer, steps.steps, before, shadows.seen)


@pytest.fixture(scope="module")
def plain_fit(digits, tmp_path_factory) -> Fit:
    """The same fit without compression."""
    return _fit(tmp_path_factory.mktemp("plain"), digits, None)


@pytest.fixture(scope="module")
def fits(digits, tmp_path_factory):
    """Per case, once: the uninterrupted fit, and the fit resumed from the checkpoint of its first epoch (what a
    fit of that one epoch writes: the same seed, data and Trainer settings up to there)."""
    done: dict[str, tuple[Fit, Fit]] = {}

    def run(case: str) -> tuple[Fit, Fit]:
        if case not in done:
            root = tmp_path_factory.mktemp(case)
            full = _fit(root, digits, case)
            resumed = _fit(root / "resumed", digits, case, root / "ckpt" / f"epoch=0-step={BATCHES}.ckpt")
            done[case] = full, resumed
        return done[case]

    return run


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-exact equality of two tensors; of a tensor subclass such as torchao's quantized weights (which need
    not implement ``torch.equal``), its inner tensors and metadata."""
    if type(a) is not type(b) or a.dtype != b.dtype or a.shape != b.shape:
        return False
    if not is_traceable_wrapper_subclass(a):
        return torch.equal(a, b)
    (names, meta), (names_b, meta_b) = a.__tensor_flatten__(), b.__tensor_flatten__()
    return names == names_b and meta == meta_b and all(_same(getattr(a, n), getattr(b, n)) for n in names)


def _state_diff(a: Any, b: Any, where: str = "") -> str | None:
    """Where two nested states first differ (tensors compared with :func:`_same`, other values with ``==``), or
    None."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and _same(a, b)
        return None if same else where
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return f"{where} keys {sorted(map(str, set(a) ^ set(b)))}"
        pairs = [(a[k], b[k], f"{where}.{k}") for k in a]
    elif isinstance(a, list | tuple) and isinstance(b, list | tuple):
        if len(a) != len(b):
            return f"{where} length {len(a)} != {len(b)}"
        pairs = [(x, y, f"{where}[{i}]") for i, (x, y) in enumerate(zip(a, b, strict=True))]
    else:
        return None if a == b else f"{where}: {a!r} != {b!r}"
    return next((d for x, y, w in pairs if (d := _state_diff(x, y, w)) is not None), None)


# -- 2. a resumed fit ends where the uninterrupted fit ends, to the bit -----------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_resumed_fit_ends_bit_exactly_where_the_uninterrupted_fit_ends(fits, plain_fit, case):
    full, resumed = fits(case)
    if case in LOGS_ONLY:
        assert any(name.startswith(LOGS_ONLY[case]) for name in full.trainer.callback_metrics)
    else:  # the case acted: nothing to resume otherwise
        assert _state_diff(full.model.state_dict(), plain_fit.model.state_dict()) is not None
    assert full.steps == list(range(EPOCHS * BATCHES))
    assert resumed.steps == list(range(BATCHES, EPOCHS * BATCHES))  # it continued from the checkpoint
    assert full.trainer.global_step == resumed.trainer.global_step == EPOCHS * BATCHES
    state, resumed_state = full.model.state_dict(), resumed.model.state_dict()
    assert list(state) == list(resumed_state)
    for key, value in state.items():
        assert _same(value, resumed_state[key]), key
    assert _state_diff(full.callback.state_dict(), resumed.callback.state_dict(), "state_dict()") is None
    for mine, theirs in zip(full.companions, resumed.companions, strict=True):
        assert _state_diff(mine.state_dict(), theirs.state_dict(), type(mine).__name__) is None


# -- 3. DDP ranks take the same decisions -------------------------------------------------------------------


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    """Every case fitted by 2 DDP processes in one launch: ``{case: (rank 0 result, rank 1 result)}``."""
    from tests._ddp import run_worker

    out = tmp_path_factory.mktemp("ddp_contract")
    run_worker("_ddp_contract.py", out)
    return {
        case: tuple(torch.load(out / f"{case}.rank{rank}.pt", weights_only=False) for rank in (0, 1))
        for case in CASES
    }


BATCH_NORM_STATISTICS = (".running_mean", ".running_var", ".num_batches_tracked")


@pytest.mark.parametrize("case", list(CASES))
def test_ddp_ranks_end_with_identical_models(ddp_results, case):
    rank0, rank1 = ddp_results[case]
    assert rank0.get("error") is None, rank0["error"]
    assert rank1.get("error") is None, rank1["error"]
    assert rank0["world_size"] == rank1["world_size"] == 2
    assert rank0["global_step"] == rank1["global_step"] == EPOCHS * BATCHES
    assert list(rank0["state"]) == list(rank1["state"])
    for key, value in rank0["state"].items():
        if key.endswith(BATCH_NORM_STATISTICS):
            continue  # each rank's own batches, by design of DDP without sync_batchnorm
        assert _same(value, rank1["state"][key]), key


# -- 4. nothing attached outlives the fit -----------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_fit_leaves_no_hooks_and_replaces_no_method(fits, case):
    for fit in fits(case):  # the uninterrupted fit and the resumed one (which loaded a checkpoint)
        assert fit.before["shadowed methods"] == []
        # Nothing replaces a method of the model, not even for the time of the fit.
        assert fit.shadowed_while_training == set()
        after = _attachments(fit.model)
        assert "forward" not in vars(fit.model) and "training_step" not in vars(fit.model)
        assert after == fit.before
        optimizers = fit.trainer.optimizers
        assert len(optimizers) == 1
        for optimizer in optimizers:
            assert len(optimizer._optimizer_step_pre_hooks) == 0
            assert len(optimizer._optimizer_step_post_hooks) == 0
