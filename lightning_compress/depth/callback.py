"""StochasticDepth: skip residual blocks at random while fine-tuning, and remove the least important ones.

The work on the model is :mod:`lightning_compress.depth.core`; this callback decides when, draws the batches,
logs, and keeps the structure in checkpoints.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from lightning_compress import _checks
from lightning_compress._checkpoints import add_checkpoint_hint, drop_checkpoint_hints
from lightning_compress._events import record_event
from lightning_compress._lightning import float_view, replace_parameters
from lightning_compress.callback import (
    REMOVE_BLOCKS,
    CompressionCallback,
    compression_callbacks,
    preserved_rng,
    training_loader,
)
from lightning_compress.depth import core
from lightning_compress.depth.core import DepthConfig, DepthDrop, RemovalPlan
from lightning_compress.schedules import Point, validate_point
from lightning_compress.selection import Selector

__all__ = ["StochasticDepth"]


class StochasticDepth(CompressionCallback):
    """Stochastic depth (Huang et al., 2016) while fine-tuning, and removal of the least important residual blocks.

    Stochastic depth: while training, block ``l`` of ``L`` (forward order) is kept with probability
    ``1 - l/L * (1 - survival)``; a forward hook on the block rewrites its output ``y`` (input ``x``) to
    ``x + (y - x) / p`` when kept and to ``x`` when skipped, with draws seeded from ``(seed, step, block)``: the
    same on every process and after a resume, without touching the global random state. Evaluation is untouched.

    Block removal (``remove`` or ``target_macs``): every block is skipped alone on ``removal_batches`` training
    batches (eval mode; rank zero measures, the others take its choice), and the blocks whose skip raises the loss
    least are replaced by ``nn.Identity`` — a shallower model with fewer MACs. In ``setup`` by default (before the
    callbacks that select layers set up), or at the step ``remove_at`` from the weights trained so far. Stochastic
    depth then goes on over the remaining blocks. Checkpoints carry the removed blocks (callback state and a
    hint in the ``state_dict``); a resumed fit rebuilds them before the weights load, and
    :func:`~lightning_compress.depth.restore_depth` does it for a plain model. See ``docs/depth.md``.

    Args:
        blocks: name patterns and/or types of the residual blocks; ``None``: found from the example input (the
            rule: :func:`~lightning_compress.depth.find_blocks`).
        survival: the probability that the last block is kept, in ``(0, 1]`` (1: no stochastic depth).
        mode: ``"row"``: one draw per sample; ``"batch"``: one per block and step.
        seed: seeds the draws and the choice of the batches that rank the blocks.
        remove: the number of blocks to remove.
        target_macs: remove blocks until the MACs per sample are at most this fraction of the original's.
        remove_at: ``None``: remove in ``setup``; a point of training (fraction, ``"step:N"``, ``"epoch:N"``):
            at that step (single process, without callbacks that select layers).
        removal_batches: training batches the blocks are ranked on.
        loss_fn: ``loss_fn(model, batch) -> scalar``; default: cross entropy of ``model(x)`` against ``y``.
        example_input: input to find the blocks and count MACs (default ``example_input_array``, else the first
            training batch).
        verbose: print the blocks, and the removal table, on rank zero.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[StochasticDepth(survival=0.8, remove=1)], logger=False)
        >>> StochasticDepth(mode="layer")
        Traceback (most recent call last):
        ...
        ValueError: Unknown `mode='layer'`. Use one of 'row', 'batch'.
    """

    prefix = "depth/"
    effect_order = REMOVE_BLOCKS  # before every callback that selects or replaces layers
    changes_structure = True
    without_hooks = "Only remove blocks (`survival=1.0` with `remove` or `target_macs`)"  # see hooked_layers
    changes_weights = property(lambda self: self.config.removes)  # dropping only rewrites the outputs

    def __init__(
        self,
        blocks: Selector = None,
        survival: float = 0.8,
        mode: str = "row",
        seed: int = 0,
        remove: int | None = None,
        target_macs: float | None = None,
        remove_at: Point | None = None,
        removal_batches: int = 4,
        loss_fn: Callable[[nn.Module, Any], Tensor] | None = None,
        example_input: Any = None,
        verbose: bool = True,
    ) -> None:
        self.config = DepthConfig(blocks, survival, mode, seed, remove, target_macs, removal_batches)
        self.remove_at = None if remove_at is None else validate_point(remove_at, "remove_at")
        if remove_at is not None and not self.config.removes:
            raise ValueError(
                f"`remove_at={remove_at!r}` says when to remove blocks, but neither `remove` nor `target_macs` says "
                "how many: give one of them, or leave `remove_at` unset."
            )
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(
                f"`loss_fn={loss_fn!r}` must be callable as `loss_fn(model, batch) -> scalar tensor`."
            )
        self.loss_fn = loss_fn
        self._example_input = example_input
        self.verbose = _checks.check_bool(verbose, "verbose")
        # Kept in checkpoints: the blocks found, those removed, and the removal's measurements.
        self.load_state_dict({"blocks": [], "removed": [], "plan": None})
        self.release()

    def __getattr__(self, name: str) -> Any:  # the config's fields read as the callback's (`depth.survival`)
        config = self.__dict__.get("config")
        if config is not None and name in DepthConfig.__dataclass_fields__:
            return getattr(config, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    # -- lifecycle -----------------------------------------------------------------------------------

    def prepare_evaluation(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.track_hook(pl_module.register_load_state_dict_pre_hook(self._load_hook))

    def prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.prepare_evaluation(trainer, pl_module, "fit")
        self._example = CompressionCallback.example_input(trainer, pl_module, self._example_input, 1)
        if self._example is None:
            raise ValueError(
                "StochasticDepth finds the blocks and checks their shapes on an example input, and this fit has "
                "none: set `example_input_array` on the LightningModule, or pass `example_input`."
            )
        config = self.config
        self.blocks = core.find_blocks(pl_module, self._example, config.blocks, removable=config.removes)
        self._drop = DepthDrop(pl_module, self.blocks, config.survival, config.mode, config.seed)
        for handle in self._drop.handles:
            self.track_hook(handle)
        if self.verbose:
            rank_zero_info(f"StochasticDepth: {len(self.blocks)} blocks: {', '.join(self.blocks)}")
        if not config.removes:
            return
        others = compression_callbacks(trainer)
        selecting = [c for c in others if c is not self and getattr(c, "selects_layers", False)]
        earlier = [type(c).__name__ for c in selecting if others.index(c) < others.index(self)]
        names = [type(c).__name__ for c in selecting]
        core.check_neighbours(self.remove_at, trainer.world_size, names, earlier, REMOVE_BLOCKS)
        if self.remove_at is None:
            self._remove(trainer, pl_module)
            return
        self._remove_step = self.step_of(trainer, self.remove_at, "remove_at")
        fix = "Give an earlier `remove_at`, or leave it out to remove in `setup`."
        total, what = trainer.estimated_stepping_batches, "no block would be removed"
        _checks.check_start_within_fit(self.remove_at, self._remove_step, total, what, fix, "remove_at")
        core.check_removal(pl_module, self.blocks, self._example, config.remove, config.target_macs)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A resumed fit rebuilt the structure from the checkpoint: it must be the one its state records.
        with float_view(pl_module):  # the blocks by name, also when a graph runs them
            identity = core.removed_in(pl_module, self.blocks)
        if sorted(identity) != sorted(self.removed):
            raise RuntimeError(
                f"StochasticDepth recorded the removed blocks {self.removed}, but the model has {identity} as "
                "nn.Identity. The checkpoint and the callback's state disagree."
            )
        if self._drop is not None:
            self._drop.arrange(pl_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.removed:
            self.log_to_loggers(trainer, self._values())

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self._remove_step is not None and not self.removed and step >= self._remove_step:
            self._remove_step = None
            taken = self._remove(trainer, pl_module)
            # The optimizers drop the removed parameters and their state (momentum, moments).
            replace_parameters(trainer, {p: [] for module in taken.values() for p in module.parameters()})
            record_event(trainer, self, f"{len(taken)} blocks removed")
            self.log_to_loggers(trainer, self._values())
        # Batches within one step (gradient accumulation) draw apart.
        self._micro = self._micro + 1 if step == self._last_step else 0
        self._last_step = step
        if self._drop is not None:
            self._drop.set_step(step, self._micro)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        kept = None if self._drop is None else self._drop.kept_fraction()
        if kept is not None:
            self.log_values(pl_module, {"kept_fraction": kept})

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self.removed:
            add_checkpoint_hint(checkpoint, core.checkpoint_hint(self.removed))

    def hooked_layers(self) -> list[str]:
        """The blocks whose outputs the drop hooks rewrite while training (none with ``survival=1.0``)."""
        return [] if self._drop is None else [n for n, p in self._drop.probabilities.items() if p < 1.0]

    def unfinished(self, trainer: pl.Trainer) -> tuple[str, int, str] | None:
        if self._remove_step is not None and not self.removed:
            return "remove_at", self._remove_step, "no block was removed"
        return None

    def release(self) -> None:
        self._drop: DepthDrop | None = None
        self._kept: dict[str, nn.Module] = {}  # the blocks this process removed, to put back for a checkpoint
        self._example: Any = None
        self._remove_step: int | None = None
        self._last_step: int | None = None
        self._micro = 0

    # -- the removal ---------------------------------------------------------------------------------

    def _remove(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, nn.Module]:
        state: Any = None
        if trainer.is_global_zero:
            try:
                state = self._plan(trainer, pl_module).to_state()
            except Exception as error:  # the other ranks wait for the choice: they raise it too
                if trainer.world_size == 1:
                    raise
                state = error
        if trainer.world_size > 1:  # every rank removes the blocks rank zero chose
            state = trainer.strategy.broadcast(state, src=0)
        if isinstance(state, Exception):
            raise state
        self.plan = plan = RemovalPlan.from_state(state)  # type: ignore[arg-type]
        taken = core.replace_by_identity(pl_module, plan.removed)
        self._kept.update(taken)
        self.removed = list(plan.removed)
        if self._drop is not None:
            self._drop.arrange(pl_module)
        if self.verbose:
            rank_zero_info(plan.summary())
        return taken

    def _plan(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> RemovalPlan:
        loader = training_loader(trainer)
        if loader is None:
            raise ValueError(
                "StochasticDepth ranks the blocks on batches of the training data, and this fit has none."
            )
        with preserved_rng(loader):
            # The same batches whenever they are drawn (a shuffling sampler seeds itself from the global state).
            torch.default_generator.manual_seed(self.config.seed)
            batches = list(itertools.islice(iter(loader), self.config.removal_batches))
        config = self.config
        return core.plan_removal(
            pl_module, self.blocks, batches, self._example, config.remove, config.target_macs, self.loss_fn
        )

    def _load_hook(self, module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        """Before a state dict loads: give the model the removed blocks it was saved with (named by its hint, or,
        without one, the blocks it holds no state of), putting back those removed here that it holds."""
        names = core.hinted_blocks(state_dict, prefix)
        if names is None:
            names = core.absent_blocks(module, state_dict, self.blocks, prefix)
        drop_checkpoint_hints(state_dict, prefix)
        for name in [n for n in self.blocks if n not in names]:
            if core.removed_in(module, [name]) and any(
                key.startswith(f"{prefix}{name}.") for key in state_dict
            ):
                if name not in self._kept:
                    raise ValueError(
                        f"The state dict being loaded holds block {name!r}, which this model has as nn.Identity "
                        "(removed): it was saved before the removal or without it. Load it into the full model."
                    )
                core.put_back(module, {name: self._kept.pop(name)})
        self._kept.update(core.replace_by_identity(module, names))
        if self._drop is not None:
            self._drop.arrange(module)

    # -- reporting and checkpoints -------------------------------------------------------------------

    def _values(self) -> dict[str, float]:
        """Logged when blocks are removed: ``depth/macs_ratio`` (MACs per sample before / after) and
        ``depth/removed_blocks`` (how many)."""
        ratio = self.plan.macs_ratio if self.plan is not None else 1.0
        return {"macs_ratio": ratio, "removed_blocks": float(len(self.removed))}

    def state_dict(self) -> dict[str, Any]:
        plan = None if self.plan is None else self.plan.to_state()
        return copy.deepcopy({"blocks": self.blocks, "removed": self.removed, "plan": plan})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = copy.deepcopy(state_dict)
        self.blocks, self.removed = list(state["blocks"]), list(state["removed"])
        self.plan = None if state["plan"] is None else RemovalPlan.from_state(state["plan"])
