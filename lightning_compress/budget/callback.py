"""``CompressionBudget``: measure each layer's sensitivity in ``setup`` and hand per-layer levels to the callback
that applies the scheme, so that the whole model meets a target (MACs, parameters, stored size or latency)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from lightning_compress import _checks
from lightning_compress._inputs import first_batches, first_input, to_device
from lightning_compress._lightning import run_directory
from lightning_compress.budget import core
from lightning_compress.budget.allocation import ALLOCATED_ARGUMENT, Allocation
from lightning_compress.budget.core import BudgetConfig, BudgetPlan
from lightning_compress.budget.search import SearchResult
from lightning_compress.callback import (
    ALLOCATE,
    CompressionCallback,
    compression_callbacks,
    evaluation_loader,
    training_loader,
)
from lightning_compress.selection import Selector

# The callback that applies each scheme, for the error when none is in the fit.
APPLIED_BY = {
    "prune": "GradualPruning(mode='unstructured')",
    "prune_structured": "GradualPruning(mode='structured')",
    "low_rank": "LowRankReplacement()",
    "quantize": "QuantizationAwareTraining(scheme='intx-weight-only') (a low-bit scheme)",
}


class CompressionBudget(CompressionCallback):
    """Choose per-layer compression levels that meet a global target with the least predicted loss.

    In ``setup``, before the other compression callbacks set up, it evaluates the model on ``batches`` batches
    of the training data with each selected layer alone compressed at each level (the sensitivity), counts or
    measures what each layer costs at each level, and chooses one level per layer that meets ``target`` (a
    multiple-choice knapsack on those tables). For ``prune_structured`` the unit is the channel group (layers
    joined by a residual add lose the same channels; the next layers lose those inputs): one level per group,
    under the name of its root layer, and the cost counts what the whole model loses. The callback of the fit that applies ``scheme`` then uses these
    levels instead of one amount for all: ``GradualPruning`` (``layer_amounts``), ``LowRankReplacement``
    (``layer_ranks``), a low-bit ``QuantizationAwareTraining`` (``layer_bits``: its ``bits`` or float, by default
    the two levels measured). With ``max_drop``, it first searches for the most compression whose compressed and briefly
    fine-tuned model stays within ``max_drop`` of the uncompressed model's validation accuracy (or of
    ``evaluate``), and allocates that.

    A structured latency target is checked by measurement: the table's budget is bisected until a copy of the
    model with the channels removed, timed against the model, meets ``target`` (``measured_fraction``).

    Logged under ``budget/`` at step 0: ``target``, ``cost_fraction``, ``base_loss``, ``predicted_loss``,
    ``uniform_predicted_loss`` (one level for all at the same target, when one meets it) and
    ``per_layer/level/<layer>``; the sensitivity table and the allocation are printed (``verbose``), and the
    sensitivity plot is written in the run's directory and sent to TensorBoard/MLflow/W&B (``plots``).

    Args:
        scheme: ``"prune"``, ``"prune_structured"``, ``"low_rank"`` or ``"quantize"``.
        target: the cost kept, as a fraction of the uncompressed model's, in ``(0, 1]``.
        metric: what ``target`` counts: ``"macs"``, ``"params"``, ``"size"``, or ``"latency"`` (measured here,
            layer by layer; ``prune_structured`` and ``low_rank``).
        levels: the levels measured and chosen from (``None``: the scheme's defaults).
        modules, exclude, min_params: the layers to allocate (``"quantize"``: those the quantization callback
            selects).
        batches: batches of the training data each sensitivity probe evaluates.
        latency_repeats: ``metric="latency"``: timed calls per layer and level (more: steadier on a busy machine).
        loss_fn: ``loss_fn(model, batch) -> scalar``; default: cross entropy of ``model(x)`` against ``y``.
        example_input: input for MACs and latency, at the batch size the latency is measured at (default:
            ``example_input_array``, else one sample of the first batch).
        cache: a JSON file keeping the sensitivity between runs (delete it when the model or data change).
        max_drop: accuracy-aware mode: the largest accepted drop of the metric (``None``: off).
        evaluate: ``evaluate(model, batch) -> float`` averaged over ``eval_batches`` validation batches; default
            the accuracy of ``argmax(model(x))`` against ``y``.
        probes, probe_steps, probe_lr: accuracy-aware mode: the most targets tried, and the SGD steps and
            learning rate of the fine-tuning of each probe (``loss_fn`` on training batches).
        eval_batches: validation batches each probe is evaluated on.
        plots: write and log the sensitivity plot.
        verbose: print the sensitivity table and the allocation.

    Example::

        >>> from lightning_compress import GradualPruning
        >>> callbacks = [CompressionBudget("prune_structured", target=0.5), GradualPruning(mode="structured")]
    """

    prefix = "budget/"
    effect_order = ALLOCATE

    def __init__(
        self,
        scheme: str = "prune",
        target: float = 0.5,
        metric: str = "macs",
        levels: Sequence[float] | None = None,
        modules: Selector = (nn.Conv2d, nn.Linear),
        exclude: Selector = None,
        min_params: int = 0,
        batches: int = 4,
        latency_repeats: int = 20,
        loss_fn: Callable[[nn.Module, Any], Tensor] | None = None,
        example_input: Any = None,
        cache: str | os.PathLike | None = None,
        max_drop: float | None = None,
        evaluate: Callable[[nn.Module, Any], float] | None = None,
        probes: int = 5,
        probe_steps: int = 20,
        probe_lr: float = 0.01,
        eval_batches: int = 4,
        plots: bool = True,
        verbose: bool = True,
    ) -> None:
        self.config = BudgetConfig(
            scheme, target, metric, levels, modules, exclude, min_params, batches, latency_repeats
        )
        self._levels_given = levels is not None
        self.loss_fn, self.evaluate, self._example = loss_fn, evaluate, example_input
        self.cache = cache
        if max_drop is not None:
            _checks.check_number(
                max_drop, "max_drop", 0.0, low_open=True, hint="the accepted drop, e.g. 0.01."
            )
        self.max_drop = max_drop
        self.probes = _checks.check_int(probes, "probes", 1)
        self.probe_steps = _checks.check_int(probe_steps, "probe_steps", 0)
        self.probe_lr = _checks.check_number(probe_lr, "probe_lr", 0.0, low_open=True)
        self.eval_batches = _checks.check_int(eval_batches, "eval_batches", 1)
        self.plots = _checks.check_bool(plots, "plots")
        self.verbose = _checks.check_bool(verbose, "verbose")
        self.plan: BudgetPlan | None = None
        self.search: SearchResult | None = None
        self.allocation: Allocation | None = None
        self.figure_path: Path | None = None

    def state_key_fields(self) -> dict[str, Any]:
        return {"scheme": self.config.scheme, "target": self.config.target, "metric": self.config.metric}

    def prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        scheme = self.config.scheme
        takers = [c for c in compression_callbacks(trainer) if getattr(c, "budget_scheme", None) == scheme]
        if len(takers) != 1:
            found = ", ".join(type(c).__name__ for c in takers)
            raise ValueError(
                f"CompressionBudget(scheme={scheme!r}) hands its per-layer levels to one callback that applies "
                f"the scheme; this fit has {len(takers)}{f' ({found})' if found else ''}. Add exactly one "
                f"{APPLIED_BY[scheme]} to `Trainer(callbacks=...)`."
            )
        _checks.check_levels_not_given(takers[0], ALLOCATED_ARGUMENT[scheme])
        if scheme == "quantize":
            # The layers are those the low-bit callback selects; it quantizes a layer to its `bits` or leaves it
            # in float: the two levels to measure, unless given.
            taker = takers[0].config  # type: ignore[attr-defined]
            levels = self.config.levels if self._levels_given else (32.0, float(taker.bits))
            self.config = dataclasses.replace(
                self.config, modules=taker.modules, exclude=taker.exclude, levels=levels
            )
        # Where the plot goes: a collective call under DDP, made by every rank before rank zero chooses alone.
        self._folder = run_directory(trainer) if self.plots else None  # none without one: sent to the loggers
        levels = None
        if trainer.is_global_zero:
            levels = self._choose(trainer, pl_module)
        if trainer.world_size > 1:  # every rank applies the levels rank zero chose on its batches
            levels = trainer.strategy.broadcast(levels, src=0)
        assert levels is not None
        takers[0].accept_allocation({ALLOCATED_ARGUMENT[scheme]: dict(levels)})
        self.levels = dict(levels)

    def _choose(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        batches = first_batches(training_loader(trainer), max(self.config.batches, 1))
        if not batches:
            raise ValueError("CompressionBudget measures on batches of the training data, and it has none.")
        device = pl_module.device
        batches = [to_device(b, device) for b in batches]
        # A given input keeps its batch: the latency of each layer is measured at the size it runs at.
        example = CompressionCallback.example_input(
            trainer, pl_module, self._example, max_batch=None if self._example is not None else 1
        )
        progress = rank_zero_info if self.verbose else None
        self.plan = plan = core.plan_budget(
            pl_module, batches, self.config, example, self.loss_fn, progress, self.cache
        )
        allocation = plan.allocation
        if self.max_drop is not None:
            allocation = self._search(trainer, pl_module, plan, batches) or allocation
        self.allocation = allocation
        self._report(trainer, plan, allocation)
        return dict(allocation.levels)

    def _search(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, plan: BudgetPlan, batches: list[Any]
    ) -> Allocation | None:
        loader = evaluation_loader(trainer, "validate")
        held_out = [to_device(b, pl_module.device) for b in first_batches(loader, self.eval_batches)]
        if not held_out:
            raise ValueError(
                "CompressionBudget(max_drop=...) evaluates each probe on validation data, and this fit has none. "
                "Give the Trainer validation data, or leave `max_drop` unset."
            )
        score = self.evaluate or _accuracy
        loss_fn = self.loss_fn or _cross_entropy

        def evaluate(model: nn.Module) -> float:
            model.eval()
            with torch.no_grad():
                return sum(float(score(model, b)) for b in held_out) / len(held_out)

        def fine_tune(model: nn.Module, target: float) -> None:
            model.train()
            optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=self.probe_lr)
            for step in range(self.probe_steps):
                optimizer.zero_grad()
                loss_fn(model, batches[step % len(batches)]).backward()
                optimizer.step()

        progress = (
            (lambda probe: rank_zero_info(f"CompressionBudget probe: {probe}")) if self.verbose else None
        )
        self.search, accepted = core.accuracy_aware_budget(
            pl_module,
            plan,
            evaluate,
            self.max_drop,
            fine_tune,
            self.probes,
            progress=progress,  # type: ignore[arg-type]
        )
        if self.verbose:
            rank_zero_info(self.search.format_table())
        return accepted

    def _report(self, trainer: pl.Trainer, plan: BudgetPlan, allocation: Allocation) -> None:
        from lightning_compress.plots import send_figure, send_text

        tables = f"{plan.sensitivity.format_table()}\n\n{allocation.format_table()}"
        if self.verbose:
            rank_zero_info(tables)
        send_text(trainer.loggers, "budget/tables", tables)
        values = {
            "target": allocation.budget,
            "cost_fraction": allocation.fraction,
            "base_loss": plan.sensitivity.base_loss,
            "predicted_loss": allocation.predicted_loss,
        }
        if allocation.measured_fraction is not None:
            values["measured_fraction"] = allocation.measured_fraction
        if plan.uniform is not None:
            values["uniform_predicted_loss"] = plan.uniform.predicted_loss
        values.update({f"per_layer/level/{name}": float(v) for name, v in allocation.levels.items()})
        self.log_to_loggers(trainer, values)
        if self.plots:
            if self._folder is not None:
                self.figure_path = plan.sensitivity.plot(self._folder / "sensitivity.png")
            figure = plan.sensitivity.figure()
            send_figure(trainer.loggers, "budget/sensitivity", figure)
            import matplotlib.pyplot as plt

            plt.close(figure)

    def state_dict(self) -> dict[str, Any]:
        return {"levels": dict(getattr(self, "levels", {}))}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores a checkpoint after `setup`: the levels of this run are chosen by now.
        restored = {str(k): float(v) for k, v in (state_dict.get("levels") or {}).items()}
        if restored and restored != getattr(self, "levels", restored):
            raise ValueError(
                "CompressionBudget chose other per-layer levels than the run this checkpoint comes from (the "
                "sensitivity was measured on other weights or batches). Pass `cache=` a file so that every run "
                "reads the same measurement."
            )


def _accuracy(model: nn.Module, batch: Any) -> float:
    logits = model(first_input(batch))
    return float((logits.argmax(-1) == batch[-1]).float().mean())


def _cross_entropy(model: nn.Module, batch: Any) -> Tensor:
    return torch.nn.functional.cross_entropy(model(first_input(batch)), batch[-1])
