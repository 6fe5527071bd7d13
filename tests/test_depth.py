"""StochasticDepth and block removal: finding the blocks, the draws, the removal, checkpoints and composition."""

from __future__ import annotations

import copy
from collections import OrderedDict
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.nn import functional as F

from examples.models import ResidualBlock
from lightning_compress import GradualPruning, KnowledgeDistillation
from lightning_compress.depth import (
    DepthDrop,
    StochasticDepth,
    check_neighbours,
    draw_keep,
    find_blocks,
    plan_removal,
    removed_in,
    replace_by_identity,
    restore_depth,
    survival_probabilities,
)
from lightning_compress.stats import count_macs_per_sample
from tests.conftest import RecordSteps, trainer_kwargs

BLOCKS = ["net.block1", "net.block2", "net.block3"]


class TinyResNet(pl.LightningModule):
    """Stem, two 8-channel blocks, a downsampling block to 16 channels (its shapes change), one 16-channel block
    and a head; trained with SGD and momentum (optimizer state that a resume must restore)."""

    def __init__(self) -> None:
        super().__init__()
        stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
        self.net = nn.Sequential(
            OrderedDict(
                stem=stem,
                block1=ResidualBlock(8, 8),
                block2=ResidualBlock(8, 8),
                down=ResidualBlock(8, 16, stride=2),
                block3=ResidualBlock(16, 16),
                head=head,
            )
        )
        self.example_input_array = torch.zeros(1, 1, 8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


@pytest.fixture(scope="module")
def trained_state(digits) -> dict[str, torch.Tensor]:
    """The weights of a TinyResNet trained for two epochs on the digits (plain torch)."""
    torch.manual_seed(0)
    model = TinyResNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(2):
        for x, y in digits.train_dataloader():
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
    return copy.deepcopy(model.state_dict())


def trained(state: dict[str, torch.Tensor], zeroed: str | None = "block2") -> TinyResNet:
    """A trained TinyResNet; the residual of block ``zeroed`` is made exactly zero (its last BatchNorm outputs
    zeros), so skipping it changes nothing: its input is a ReLU's output, and ``relu(x + 0) == x``."""
    model = TinyResNet()
    model.load_state_dict(state)
    if zeroed is not None:
        bn = model.net.get_submodule(f"{zeroed}.bn2")
        with torch.no_grad():
            bn.weight.zero_()
            bn.bias.zero_()
    return model


class MemoryLogger(Logger):
    """Keeps every logged value: ``{name: [values]}``."""

    def __init__(self) -> None:
        super().__init__()
        self.values: dict[str, list[float]] = {}

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        for key, value in metrics.items():
            self.values.setdefault(key, []).append(float(value))


def _hooks(model: nn.Module) -> dict[str, int]:
    kinds = ("_forward_hooks", "_forward_pre_hooks", "_load_state_dict_pre_hooks")
    return {f"{n} {k}": len(getattr(m, k)) for n, m in model.named_modules() for k in kinds if getattr(m, k)}


def _fit(
    root: Path,
    digits,
    model: pl.LightningModule,
    make,
    ckpt_path: Path | None = None,
    probe=None,
    **overrides,
):
    """Fit 2 epochs of 2 batches; from scratch writing a checkpoint per epoch, or resumed from ``ckpt_path``."""
    pl.seed_everything(0, verbose=False)
    steps, logger = RecordSteps(), MemoryLogger()
    checkpoints = (
        [] if ckpt_path else [ModelCheckpoint(dirpath=root / "ckpt", save_top_k=-1, every_n_epochs=1)]
    )
    settings = dict(
        max_epochs=2, limit_train_batches=2, limit_val_batches=1, logger=logger, log_every_n_steps=1
    )
    settings.update(overrides)
    callback = make()
    trainer = pl.Trainer(
        **trainer_kwargs(root, **settings, enable_checkpointing=not ckpt_path),
        callbacks=[callback, steps, *checkpoints, *([probe(callback)] if probe else [])],
    )
    trainer.fit(model, datamodule=digits, ckpt_path=ckpt_path)
    return trainer, callback, steps.steps, logger


def _assert_same_state(a: nn.Module, b: nn.Module) -> None:
    state, other = a.state_dict(), b.state_dict()
    assert list(state) == list(other)
    for key, value in state.items():
        assert torch.equal(value, other[key]), key


# -- finding the blocks ---------------------------------------------------------------------------------------


class Stage(nn.Module):
    """A stage that is a module of its own (not a container), holding blocks: it keeps the shape too."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([ResidualBlock(8, 8), ResidualBlock(8, 8)])

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def test_auto_detection_finds_exactly_the_shape_preserving_blocks():
    model = TinyResNet()
    assert find_blocks(model, model.example_input_array) == BLOCKS  # not `net.down`, the stages or the model
    # A same-padding convolution keeps the shape but is a single layer; a stage module holding blocks is
    # passed over for the blocks inside it.
    nested = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), Stage())
    assert find_blocks(nested, torch.zeros(1, 1, 8, 8)) == ["2.blocks.0", "2.blocks.1"]
    with pytest.raises(ValueError, match="Found no residual block in Sequential"):
        find_blocks(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), torch.zeros(1, 4))


def test_naming_the_downsampling_block_fails_before_the_first_step(tmp_path, digits):
    steps = RecordSteps()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path), callbacks=[StochasticDepth(blocks="net.down"), steps])
    with pytest.raises(ValueError) as raised:
        trainer.fit(TinyResNet(), datamodule=digits)
    message = str(raised.value)
    assert "'net.down'" in message and "(1, 16, 4, 4)" in message and "(1, 8, 8, 8)" in message
    assert steps.steps == []
    with pytest.raises(ValueError, match="Did you mean 'net.block1'"):
        find_blocks(TinyResNet(), torch.zeros(1, 1, 8, 8), blocks="net.blok1")


# -- stochastic depth -----------------------------------------------------------------------------------------


def test_eval_output_is_bit_exact_and_training_rewrites_each_block(trained_state):
    model, reference = trained(trained_state, None), trained(trained_state, None)
    x = torch.rand(64, 1, 8, 8)
    drop = DepthDrop(model, BLOCKS, survival=0.5, mode="row", seed=3)
    assert torch.equal(model.eval()(x), reference.eval()(x))
    # Training mode: capture the input and the unrewritten output of block 2 (this hook runs before the drop's).
    seen = {}
    block = model.net.block2
    block._forward_hooks.move_to_end(
        block.register_forward_hook(lambda m, a, y: seen.update(x=a[0], y=y)).id, last=False
    )
    rewritten = {}
    model.net.block2.register_forward_hook(lambda m, a, y: rewritten.update(out=y))
    drop.set_step(5)
    model.train()(x)
    p = survival_probabilities(3, 0.5)[1]  # block 2 of 3: 1 - 2/3 * (1 - 0.5)
    keep = draw_keep(3, 5, 2, 64, p)
    assert 0 < keep.sum() < 64 and p == pytest.approx(2 / 3)
    inp, out = seen["x"], rewritten["out"]
    assert torch.equal(out[~keep], inp[~keep])  # skipped rows: the input
    assert torch.equal(out[keep], inp[keep] + (seen["y"][keep] - inp[keep]) / p)  # kept: x + f / p
    drop.remove()
    assert _hooks(model) == {"net.block2 _forward_hooks": 2}  # the two hooks of this test


def test_survival_frequencies_match_the_linear_decay_without_touching_the_global_rng():
    blocks = nn.Sequential(*[_Residual() for _ in range(4)])
    names = ["0", "1", "2", "3"]
    expected = survival_probabilities(4, 0.5)
    assert expected == [0.875, 0.75, 0.625, 0.5]
    drop = DepthDrop(blocks, names, survival=0.5, mode="batch", seed=1)
    x = torch.randn(2, 3)
    rng = torch.get_rng_state()
    kept = torch.zeros(4)
    steps = 2000
    with torch.no_grad():
        for step in range(steps):
            drop.set_step(step)
            blocks(x)
            kept += torch.tensor([float(drop.kept[n]) for n in names])
    frequencies = kept / steps
    assert torch.allclose(frequencies, torch.tensor(expected), atol=0.035), frequencies  # 3 sigma at p = 0.5
    assert torch.equal(torch.get_rng_state(), rng)
    # Row mode: one draw per sample.
    drop.mode = "row"
    drop.set_step(0)
    with torch.no_grad():
        blocks(torch.randn(20_000, 3))
    rows = torch.tensor([float(drop.kept[n]) for n in names])
    assert torch.allclose(rows, torch.tensor(expected), atol=0.015), rows
    # The same step draws the same; another step draws otherwise.
    assert torch.equal(draw_keep(1, 7, 2, 100, 0.75), draw_keep(1, 7, 2, 100, 0.75))
    assert not torch.equal(draw_keep(1, 7, 2, 100, 0.75), draw_keep(1, 8, 2, 100, 0.75))


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        return x + self.fc(x)


# -- block removal and checkpoints ----------------------------------------------------------------------------


def test_removal_picks_the_block_whose_skip_costs_least_and_makes_the_model_shallower(trained_state, digits):
    model = trained(trained_state)
    batches = list(digits.train_dataloader())[:2]
    example = model.example_input_array
    plan = plan_removal(model, BLOCKS, batches, example, remove=1)
    assert plan.increase["net.block2"] == 0.0
    assert min(plan.increase["net.block1"], plan.increase["net.block3"]) > 0.01, plan.increase
    assert plan.removed == ("net.block2",)
    before = count_macs_per_sample(model, example)
    replace_by_identity(model, plan.removed)
    assert isinstance(model.net.block2, nn.Identity)
    assert plan.macs_before == before > plan.macs_after == count_macs_per_sample(model, example)
    # A target: blocks in the order of their loss increase, until the MACs fit.
    full = trained(trained_state)
    target = plan_removal(full, BLOCKS, batches, example, target_macs=0.6)
    assert target.macs_after <= 0.6 * target.macs_before
    order = sorted(BLOCKS, key=target.increase.__getitem__)
    assert set(target.removed) == set(order[: len(target.removed)])
    with pytest.raises(ValueError, match="`target_macs=0.1` cannot be reached"):
        plan_removal(full, BLOCKS, batches, example, target_macs=0.1)
    with pytest.raises(ValueError, match="`remove=4` blocks, but TinyResNet has 3"):
        plan_removal(full, BLOCKS, batches, example, remove=4)


@pytest.fixture(scope="module")
def removal_fits(trained_state, digits, tmp_path_factory):
    """Removal in setup (with stochastic depth): the uninterrupted fit, and the fit resumed from its first epoch's
    checkpoint with a fresh model that would remove another block (block1 zeroed instead)."""
    root = tmp_path_factory.mktemp("removal")

    def make():
        return StochasticDepth(survival=0.5, remove=1, removal_batches=2, verbose=False)

    full = _fit(root, digits, trained(trained_state), make)
    ckpt = root / "ckpt" / "epoch=0-step=2.ckpt"
    resumed = _fit(root / "resumed", digits, trained(trained_state, "block1"), make, ckpt, RecordSetupRemoval)
    return full, resumed, ckpt


class RecordSetupRemoval(Callback):
    """The blocks a StochasticDepth removed in its setup, before the checkpoint (if any) loaded."""

    def __init__(self, depth: StochasticDepth) -> None:
        self.depth, self.removed = depth, None

    def setup(self, trainer, pl_module, stage):
        self.removed = list(self.depth.removed)


def test_removal_in_setup_logs_and_resumes_bit_exactly(removal_fits, trained_state):
    (trainer, callback, steps, logger), (trainer2, callback2, steps2, _), _ = removal_fits
    assert callback.removed == ["net.block2"] and callback.plan.increase["net.block2"] == 0.0
    model, resumed = trainer.lightning_module, trainer2.lightning_module
    assert isinstance(model.net.block2, nn.Identity) and isinstance(resumed.net.block2, nn.Identity)
    # The resumed fit's setup removed another block, put back when the checkpoint (which holds it) loaded.
    probe = next(c for c in trainer2.callbacks if isinstance(c, RecordSetupRemoval))
    assert probe.removed not in (None, ["net.block2"])
    assert removed_in(resumed, BLOCKS) == ["net.block2"]
    assert logger.values["depth/macs_ratio"][0] == callback.plan.macs_before / callback.plan.macs_after > 1.0
    assert logger.values["depth/removed_blocks"][0] == 1.0
    kept = logger.values["depth/kept_fraction"]  # 2 blocks left: 0.75 and 0.5 of the rows
    assert len(kept) == 4 and all(0.0 < k < 1.0 for k in kept)
    assert steps == [0, 1, 2, 3] and steps2 == [2, 3]
    _assert_same_state(model, resumed)
    assert callback.state_dict() == callback2.state_dict()
    for fitted in (model, resumed):
        assert _hooks(fitted) == {}
    # Not the unchanged model: the fit trained the remaining blocks.
    assert not torch.equal(model.net.block1.conv1.weight, trained(trained_state).net.block1.conv1.weight)


def test_restore_depth_loads_the_checkpoint_into_a_plain_model(removal_fits, digits, tmp_path):
    _, _, ckpt = removal_fits
    checkpoint = torch.load(ckpt, weights_only=False)
    fresh = TinyResNet()
    with pytest.raises(RuntimeError, match="restore_depth"):
        fresh.load_state_dict(copy.deepcopy(checkpoint["state_dict"]))
    assert restore_depth(fresh, checkpoint) == ["net.block2"]
    fresh.load_state_dict(checkpoint["state_dict"])
    assert isinstance(fresh.net.block2, nn.Identity)
    assert restore_depth(TinyResNet(), ckpt) == ["net.block2"]  # from the path
    # Through a Trainer that lists the callback, outside a fit.
    model = TinyResNet()
    validate = pl.Trainer(
        **trainer_kwargs(tmp_path, limit_val_batches=1), callbacks=[StochasticDepth(verbose=False)]
    )
    validate.validate(model, datamodule=digits, ckpt_path=ckpt, verbose=False)
    assert isinstance(model.net.block2, nn.Identity) and _hooks(model) == {}


def test_removal_at_a_step_drops_the_optimizer_state_and_resumes_bit_exactly(trained_state, digits, tmp_path):
    def make():
        return StochasticDepth(survival=0.5, mode="batch", remove=1, remove_at="step:1", verbose=False)

    trainer, callback, _, logger = _fit(tmp_path, digits, trained(trained_state), make)
    ckpt = tmp_path / "ckpt" / "epoch=0-step=2.ckpt"
    trainer2, callback2, steps2, _ = _fit(tmp_path / "resumed", digits, trained(trained_state), make, ckpt)
    model = trainer.lightning_module
    assert callback.removed == ["net.block2"] and isinstance(model.net.block2, nn.Identity)
    held = [p for group in trainer.optimizers[0].param_groups for p in group["params"]]
    assert [id(p) for p in held] == [id(p) for p in model.parameters()]  # the removed block's are gone
    assert set(trainer.optimizers[0].state) <= set(held)
    assert logger.values["depth/removed_blocks"] == [1.0]
    assert steps2 == [2, 3]
    _assert_same_state(model, trainer2.lightning_module)
    assert callback.state_dict() == callback2.state_dict()
    assert (
        trainer.optimizers[0].state_dict()["state"].keys()
        == trainer2.optimizers[0].state_dict()["state"].keys()
    )


def test_removal_next_to_callbacks_that_select_layers_is_refused_with_their_names(tmp_path, digits):
    steps = RecordSteps()
    callbacks = [StochasticDepth(remove=1, remove_at=0.5, verbose=False), GradualPruning(amount=0.5), steps]
    trainer = pl.Trainer(**trainer_kwargs(tmp_path), callbacks=callbacks)
    with pytest.raises(ValueError, match="remove_at=0.5.*GradualPruning set up on the layers"):
        trainer.fit(TinyResNet(), datamodule=digits)
    assert steps.steps == []
    # Removing in setup comes before the callbacks that select layers; the same effect order, listed before: refused.
    check_neighbours(None, 1, ["GradualPruning"], [], 0)
    with pytest.raises(
        ValueError, match="LowRankReplacement set up before StochasticDepth.*List StochasticDepth"
    ):
        check_neighbours(None, 1, ["LowRankReplacement"], ["LowRankReplacement"], 0)


class RecordTeacher(Callback):
    """The kinds of the teacher's and the student's block2 seen during training, and whether the student's eval
    output (its stochastic-depth hooks attached) equals that of a plain model with its weights."""

    def __init__(self, distillation: KnowledgeDistillation) -> None:
        self.distillation, self.kinds, self.same_eval = distillation, set(), []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        teacher = self.distillation._teacher
        self.kinds.add((type(teacher.net.block2).__name__, type(pl_module.net.block2).__name__))
        plain = TinyResNet()
        replace_by_identity(plain, ["net.block2"])
        plain.load_state_dict(pl_module.state_dict())
        x = batch[0]
        with torch.no_grad():
            self.same_eval.append(torch.equal(pl_module.eval()(x), plain.eval()(x)))
        pl_module.train()


def test_distillation_from_the_unremoved_model_and_eval_output_is_untouched(trained_state, digits, tmp_path):
    distillation = KnowledgeDistillation(teacher="self")
    record = RecordTeacher(distillation)
    callbacks = [distillation, StochasticDepth(remove=1, verbose=False), record]  # listed after: set up first
    trainer = pl.Trainer(
        **trainer_kwargs(tmp_path, limit_train_batches=2, limit_val_batches=0), callbacks=callbacks
    )
    trainer.fit(trained(trained_state), datamodule=digits)
    assert record.kinds == {("ResidualBlock", "Identity")}
    assert record.same_eval == [True, True]
    loss = trainer.callback_metrics["distillation/loss"]
    assert torch.isfinite(loss) and float(loss) > 0.0


@pytest.mark.parametrize(
    ("kwargs", "error", "phrase"),
    [
        ({"survival": 0.0}, ValueError, "`survival=0.0` must be a number > 0 and <= 1"),
        ({"survival": 1.5}, ValueError, "`survival=1.5` must be a number > 0 and <= 1"),
        ({"remove": 0}, ValueError, "`remove=0` must be a positive integer"),
        ({"remove": 1, "target_macs": 0.5}, ValueError, "give one of them"),
        ({"mode": "layer"}, ValueError, "Unknown `mode='layer'`"),
        ({"target_macs": 1.0}, ValueError, "`target_macs=1.0` must be a number > 0 and < 1"),
        ({"remove_at": 0.5}, ValueError, "neither `remove` nor `target_macs`"),
        ({"remove_at": "later", "remove": 1}, ValueError, "`remove_at='later'`"),
        ({"removal_batches": 0}, ValueError, "`removal_batches=0`"),
        ({"blocks": 3}, TypeError, "`blocks=3` must be name patterns"),
        ({"seed": -1}, ValueError, "`seed=-1`"),
    ],
)
def test_bad_argument_fails_at_construction_naming_it(kwargs, error, phrase):
    with pytest.raises(error) as raised:
        StochasticDepth(**kwargs)
    assert phrase in str(raised.value)
    assert f"`{next(iter(kwargs))}" in str(raised.value)
