"""Budget-driven compression on Fashion-MNIST: CompressionBudget's per-layer levels vs one level for all.

Two dense models are trained; each case then fine-tunes them in several runs from the same dense weights,
each the same number of epochs with the same data order and schedule:

- *budget*: ``CompressionBudget(scheme, target, metric)`` measures each layer's sensitivity on training
  batches in ``setup`` and hands its per-layer levels to the callback that applies the scheme
  (``GradualPruning`` or ``LowRankReplacement``, given no amount or rank);
- *uniform*: the same callback with one amount (or rank fraction) for every layer, at the cost the budget run
  reached. Unstructured pruning and low rank: the least compressed level whose cost in the budget's cost model
  (``CostTable.total``, which is what these models reach) is at most the allocation's, searched on a fine grid.
  Structured pruning: the least compressed amount whose pruned model costs at most what the budget run's
  fine-tuned model measurably costs (MACs counted, or latency timed side by side), so that both arms are
  compared at equal *achieved* cost.

Cases: the residual CNN of the pruning benchmark with ``prune_structured`` at half the MACs and at half the
measured CPU latency; LeNet-300-100 with unstructured ``prune`` at a quarter of the stored size and with
``low_rank`` at 30% of the parameters. Reported per case: test accuracy, parameters, MACs per sample, stored
size, the CPU latency ratio to the dense model (side by side, medians of interleaved repeats), the
allocation's predicted cost fraction against the one reached, and the per-layer levels.

Configuration ``budget`` (about 20 minutes on 2 cores; ``python -m benchmarks run budget``; needs
``apt-get install -y dataset-fashion-mnist``)."""

from __future__ import annotations

import copy
import itertools
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.common import (
    Context,
    CosineClassifier,
    Result,
    check_known,
    fit,
    image_data,
    markdown_table,
    test_accuracy,
)
from lightning_compress import CompressionBudget, GradualPruning, LowRankReplacement
from lightning_compress.budget import BudgetPlan, CostTable, layer_costs
from lightning_compress.pruning import PruningConfig, prune_
from lightning_compress.stats import (
    compare_latency,
    compressed_size_bytes,
    count_macs_per_sample,
    count_nonzero,
    count_parameters,
    raw_size_bytes,
)

TITLE = (
    "Budget-driven compression on Fashion-MNIST: CompressionBudget's per-layer levels vs one level for all"
)


@dataclass(frozen=True)
class Case:
    """One comparison: a model, a scheme, and the target of ``CompressionBudget`` (the cost kept)."""

    arch: str
    scheme: str
    metric: str
    target: float


CASES: dict[str, Case] = {
    "cnn_macs": Case("residual_cnn", "prune_structured", "macs", 0.5),
    "cnn_latency": Case("residual_cnn", "prune_structured", "latency", 0.5),
    "lenet_size": Case("lenet_300_100", "prune", "size", 0.25),
    "lenet_params": Case("lenet_300_100", "low_rank", "params", 0.3),
}
LATENCY_SLACK = 1.05  # the latency case's target: measured ratio <= 1.05 x target


def grid(first: float, last: float, step: float) -> tuple[float, ...]:
    """Levels from ``first`` to ``last`` (both included) in steps of ``step``, rounded to 6 decimals.

    Example::

        >>> grid(0.5, 0.6, 0.025)
        (0.5, 0.525, 0.55, 0.575, 0.6)
    """
    count = round((last - first) / step)
    return tuple(round(first + i * step, 6) for i in range(count + 1))


@dataclass(frozen=True)
class Settings:
    """The full run's settings.

    The level grids are what ``CompressionBudget`` measures and chooses from (and, for a latency target,
    what the uniform run's level is taken from): fine grids let the allocation come close to the target.
    """

    cases: tuple[str, ...] = tuple(CASES)
    dense_epochs: int = 3
    finetune_epochs: int = 2
    limit_train: int | None = None  # LeNet-300-100: use only the first N training images
    cnn_limit_train: int | None = 15000  # the residual CNN: use only the first N training images
    batch_size: int = 128
    lr: float = 1e-3  # dense training (Adam, cosine to zero)
    finetune_lr: float = 5e-4  # each fine-tuning (Adam, cosine to zero)
    # Narrower, the convolutions are too small for pruned channels to save CPU time: half the latency is out
    # of reach.
    cnn_widths: tuple[int, ...] = (32, 64, 128)
    prune_end: float = 0.5  # GradualPruning reaches its amounts at this fraction of the fine-tuning
    round_to: int = 1  # structured: channel counts a multiple of this (1: exactly the budget's amounts)
    budget_batches: int = 4  # training batches each sensitivity probe evaluates
    structured_levels: tuple[float, ...] = grid(0.0625, 0.9375, 0.0625)
    prune_levels: tuple[float, ...] = grid(0.3, 0.975, 0.025)
    rank_levels: tuple[float, ...] = grid(0.05, 1.0, 0.025)
    latency_batch: int = 64  # the input of the budget's latency table and of the side-by-side timing
    repeats: int = 20  # timed calls per model and round (3 rounds)
    achieved_steps: int = (
        64  # structured: the uniform amount is searched among i / achieved_steps, up to 15/16
    )
    threads: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        check_known(self.cases, CASES, "cases")


QUICK = {
    "dense_epochs": 2,
    "finetune_epochs": 1,
    "limit_train": 2048,
    "cnn_limit_train": 512,
    "budget_batches": 1,
    "structured_levels": (0.25, 0.5, 0.75, 0.875, 0.9375),
    "prune_levels": grid(0.5, 0.95, 0.05),
    "rank_levels": grid(0.1, 1.0, 0.05),
    "repeats": 3,
    "achieved_steps": 16,
}
# The levels the uniform run's single level is searched on, by counted cost (structured: by measured cost).
UNIFORM_GRID: dict[str, tuple[float, ...]] = {
    "prune": tuple(i / 400 for i in range(1, 400)),
    "low_rank": tuple(i / 400 for i in range(1, 401)),
}


def levels_of(args: Settings, scheme: str) -> tuple[float, ...]:
    """The level grid of ``scheme``."""
    return {
        "prune": args.prune_levels,
        "prune_structured": args.structured_levels,
        "low_rank": args.rank_levels,
    }[scheme]


def level_text(levels: Mapping[str, float]) -> str:
    """Per-layer levels in one cell: ``"net.1 0.8, net.3 0.5"``; one value when every layer has the same.

    Example::

        >>> level_text({"net.1": 0.8, "net.3": 0.5}), level_text({"net.1": 0.5, "net.3": 0.5})
        ('net.1 0.8, net.3 0.5', 'all 0.5')
    """
    values = set(levels.values())
    if len(values) == 1:
        return f"all {next(iter(values)):g}"
    return ", ".join(f"{name} {level:g}" for name, level in levels.items())


def head_name(model: nn.Module) -> str:
    """The name of the last ``nn.Linear`` of ``model``: the classifier, whose outputs are the classes.

    Example::

        >>> head_name(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))
        '2'
    """
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)][-1]


def achieved_fraction(
    model: nn.Module, dense: nn.Module, metric: str, scheme: str, example: torch.Tensor
) -> float:
    """What ``model`` costs as a fraction of ``dense`` on ``metric`` ("params", "macs" or "size"), counted as
    the budget's cost tables count it: unstructured pruning keeps the non-zero parameters and stores the
    cheapest sparse layout; MACs per sample of ``example``.

    Example::

        >>> dense = nn.Linear(10, 10, bias=False)
        >>> pruned = copy.deepcopy(dense)
        >>> with torch.no_grad():
        ...     pruned.weight[:, :7] = 0
        >>> achieved_fraction(pruned, dense, "params", "prune", torch.zeros(1, 10))
        0.3
    """
    if metric == "params":
        kept = count_nonzero(model) if scheme == "prune" else count_parameters(model)
        return kept / count_parameters(dense)
    if metric == "macs":
        return count_macs_per_sample(model, example) / count_macs_per_sample(dense, example)
    if metric == "size":
        return compressed_size_bytes(model) / raw_size_bytes(dense)
    raise ValueError(
        f"`metric={metric!r}`: measured side by side, not counted; use 'params', 'macs' or 'size'."
    )


def _model(arch: str, args: Settings, lr: float) -> CosineClassifier:
    widths = {"widths": args.cnn_widths} if arch == "residual_cnn" else None
    return CosineClassifier(arch, input_shape=(1, 28, 28), lr=lr, arch_kwargs=widths)


def _applying(case: Case, args: Settings, exclude: list[str], level: float | None) -> Any:
    """The callback that applies ``case.scheme``: ``level`` for every layer, or (None) the budget's levels."""
    if case.scheme == "low_rank":
        return LowRankReplacement(rank=level, exclude=exclude or None, verbose=False)
    return GradualPruning(
        amount=level,
        mode="structured" if case.scheme == "prune_structured" else "unstructured",
        start=0.0,
        end=args.prune_end,
        round_to=args.round_to,
        exclude=exclude or None,
    )


def _costs(model: nn.Module, dense: nn.Module, scheme: str, example: torch.Tensor) -> dict[str, Any]:
    return {
        "params": count_parameters(model),
        "nonzero_params": count_nonzero(model),
        "macs": count_macs_per_sample(model, example),
        "size_bytes": compressed_size_bytes(model),
        "size_kb": compressed_size_bytes(model) / 1000,
        "params_fraction": achieved_fraction(model, dense, "params", scheme, example),
        "macs_fraction": achieved_fraction(model, dense, "macs", scheme, example),
        "size_fraction": achieved_fraction(model, dense, "size", scheme, example),
    }


def uniform_level(table: CostTable, cost: float) -> float | None:
    """The least compressed level of ``table`` whose cost with every layer at it is at most ``cost`` (None: no
    level is cheap enough).

    Example::

        >>> costs = {"a": [100.0, 75.0, 50.0], "b": [20.0, 15.0, 10.0]}
        >>> table = CostTable("params", (0.0, 0.25, 0.5), costs, fixed=0.0)
        >>> uniform_level(table, 90.0), uniform_level(table, 50.0)
        (0.25, None)
    """
    for level in table.levels:
        if table.total(dict.fromkeys(table.cost, level)) <= cost * (1 + 1e-9):
            return level
    return None


def _allocation_rows(
    name: str, plan: BudgetPlan, table: CostTable | None, level: float
) -> list[dict[str, Any]]:
    """One row per layer (structured: per channel group): its weights, the budget's level, loss increase and
    cost, and the uniform run's level and cost (in ``table``; ``None``: not counted). A cost shared by two
    groups (a layer between them) counts half for each."""
    allocation, rows = plan.allocation, []
    uniform = dict.fromkeys(allocation.levels, level)
    for layer, chosen in allocation.levels.items():
        row = {
            "case": name,
            "layer": layer,
            "weights": plan.sensitivity.params.get(layer, 0),
            "budget_level": chosen,
            "budget_loss_increase": allocation.deltas[layer],
            "budget_layer_cost": allocation.layer_costs[layer],
            "dense_layer_cost": plan.costs.layer_cost(layer, {}),
            "uniform_level": level,
            "uniform_layer_cost": None if table is None else table.layer_cost(layer, uniform),
        }
        rows.append(row)
    return rows


def achieved_uniform_amount(
    dense: nn.Module,
    reference: nn.Module,
    metric: str,
    exclude: list[str],
    timing_input: torch.Tensor,
    args: Settings,
) -> float | None:
    """Structured pruning: the least compressed single amount ``i / args.achieved_steps`` (up to 15/16)
    whose pruned model costs at most what ``reference`` costs, measured: MACs per sample counted, or
    (``metric="latency"``) latency timed side by side with ``reference``; ``None`` when even the last amount
    costs more.

    Channel counts follow from the amount alone, so ``dense`` pruned at once has the shapes, MACs and speed
    of a model pruned gradually to that amount. A bisection: the cost falls as the amount grows.
    """
    example = torch.zeros(1, 1, 28, 28)
    reference_macs = count_macs_per_sample(reference, example)

    def affordable(amount: float) -> bool:
        pruned = copy.deepcopy(dense)
        config = PruningConfig(amount, "structured", round_to=args.round_to, exclude=exclude or None)
        prune_(pruned, config, example_input=example)
        if metric != "latency":
            return count_macs_per_sample(pruned, example) <= reference_macs
        timed = compare_latency(
            {"reference": reference, "pruned": pruned},
            timing_input,
            repeats=args.repeats,
            rounds=3,
            threads=args.threads,
        )
        return timed["pruned"].median_ms <= timed["reference"].median_ms

    amounts = [i / args.achieved_steps for i in range(1, args.achieved_steps * 15 // 16 + 1)]
    low, high = 0, len(amounts) - 1
    if not affordable(amounts[high]):
        return None
    while low < high:
        middle = (low + high) // 2
        if affordable(amounts[middle]):
            high = middle
        else:
            low = middle + 1
    return amounts[low]


def _fine_tune(
    arch: str, weights: dict[str, Any], dm: Any, callbacks: list[Any], args: Settings
) -> CosineClassifier:
    model = _model(arch, args, args.finetune_lr)
    model.load_state_dict(weights)
    fit(model, dm, args.finetune_epochs, callbacks, seed=args.seed)
    return model


def run_case(
    name: str,
    dense: CosineClassifier,
    dense_acc: float,
    dm: Any,
    cache: Path,
    args: Settings,
    context: Context,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Fine-tune the runs of case ``name`` from ``dense`` (test accuracy ``dense_acc``): their rows and the
    per-layer rows; none when ``CompressionBudget`` finds the target out of the levels' reach (noted)."""
    case, arch = CASES[name], dense.hparams.arch
    weights = copy.deepcopy(dense.state_dict())
    exclude = [f"net.{head_name(dense.net)}"] if case.scheme == "prune_structured" else []
    timing_input = torch.randn(
        args.latency_batch, 1, 28, 28, generator=torch.Generator().manual_seed(args.seed)
    )
    budget = CompressionBudget(
        case.scheme,
        case.target,
        case.metric,
        levels=levels_of(args, case.scheme),
        exclude=exclude or None,
        batches=args.budget_batches,
        example_input=timing_input,
        cache=cache,
        plots=False,
        verbose=False,
    )
    try:
        models = {
            "budget": _fine_tune(arch, weights, dm, [budget, _applying(case, args, exclude, None)], args)
        }
    except ValueError as err:
        if "out of reach" not in str(err):
            raise
        context.note(
            f"`{name}`: CompressionBudget found the target out of reach, so the case did not run: {err}"
        )
        return [], []
    plan, allocation = budget.plan, budget.allocation
    assert plan is not None and allocation is not None
    if allocation.measured_fraction is not None:
        context.note(
            f"`{name}`: the budget's latency table priced its levels at {allocation.fraction:.3g} of the dense "
            f"latency; the pruned copy it timed at setup measured {allocation.measured_fraction:.3g} (the "
            "table's budget is bisected on that measurement)."
        )
    layers = list(allocation.levels)
    table: CostTable | None
    if case.scheme == "prune_structured":
        # One amount for all at the cost the budget run's model reached, measured.
        level = achieved_uniform_amount(dense, models["budget"], case.metric, exclude, timing_input, args)
        if level is None:
            level = args.achieved_steps * 15 // 16 / args.achieved_steps
            context.note(f"`{name}`: no single amount costs as little as the budget's model; took {level:g}.")
        table = None
        if case.metric != "latency":
            table = layer_costs(dense, timing_input, case.scheme, [level], case.metric, layers)
    else:
        # Counted costs: the cost model counts what these models reach; a fine grid of levels.
        table = layer_costs(dense, timing_input, case.scheme, UNIFORM_GRID[case.scheme], case.metric, layers)
        level = uniform_level(table, allocation.cost)
        if level is None:
            level = table.levels[-1]
            context.note(
                f"`{name}`: no single level costs at most what the allocation costs in the cost model, so the "
                f"uniform run takes the most compressed level, {level:g}."
            )
    predicted: dict[str, tuple[float | None, str]] = {
        "budget": (allocation.fraction, level_text(allocation.levels)),
        "uniform": (
            None if table is None else table.total(dict.fromkeys(layers, level)) / table.full(),
            f"all {level:g}",
        ),
    }
    models["uniform"] = _fine_tune(arch, weights, dm, [_applying(case, args, exclude, level)], args)
    latency = compare_latency(
        {"dense": dense, **models}, timing_input, repeats=args.repeats, rounds=3, threads=args.threads
    )
    rows = []
    for method, model in models.items():
        ratio = latency[method].median_ms / latency["dense"].median_ms
        costs = _costs(model, dense, case.scheme, torch.zeros(1, 1, 28, 28))
        accuracy = test_accuracy(model, dm)
        row = {
            "case": name,
            "model": arch,
            "method": method,
            "scheme": case.scheme,
            "metric": case.metric,
            "target": case.target,
            "epochs": args.finetune_epochs,
            "levels": predicted[method][1],
            "test_acc": accuracy,
            "accuracy_drop_points": 100 * (dense_acc - accuracy),
            **costs,
            "latency_ms": latency[method].median_ms,
            "dense_latency_ms": latency["dense"].median_ms,
            "latency_ratio": ratio,
            "predicted_fraction": predicted[method][0],
            "achieved_fraction": ratio if case.metric == "latency" else costs[f"{case.metric}_fraction"],
            "predicted_loss": allocation.predicted_loss if method == "budget" else None,
        }
        print(row, flush=True)
        rows.append(row)
    return rows, _allocation_rows(name, plan, table, level)


def compare(
    arch: str, names: list[str], args: Settings, context: Context
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Train ``arch`` dense, then run its cases: the result rows (the dense model's first) and the per-layer
    rows."""
    limit = args.cnn_limit_train if arch == "residual_cnn" else args.limit_train
    dm = image_data(context, batch_size=args.batch_size, limit_train=limit)
    dense = _model(arch, args, args.lr)
    fit(dense, dm, args.dense_epochs, seed=args.seed)
    row = {
        "case": arch,
        "model": arch,
        "method": "dense",
        "train_images": len(dm.train_set),
        "epochs": args.dense_epochs,
        "test_acc": test_accuracy(dense, dm),
        **_costs(dense, dense, "", torch.zeros(1, 1, 28, 28)),
    }
    print(row, flush=True)
    rows, layers = [row], []
    # The cases of one model and scheme measure the same weights on the same batches: the sensitivity is
    # measured once and read back from a file of this run.
    with tempfile.TemporaryDirectory() as folder:
        for name in names:
            cache = Path(folder) / f"sensitivity_{CASES[name].scheme}.json"
            case_rows, case_layers = run_case(name, dense, row["test_acc"], dm, cache, args, context)
            rows += case_rows
            layers += case_layers
    return rows, layers


def targets(results: dict[str, Any]) -> dict[str, bool]:
    """The benchmark's targets, checked on the stored rows: per case, the budget run's accuracy is at least
    the uniform run's; for a latency target, the budget run's measured latency ratio is at most
    :data:`LATENCY_SLACK` times the target. A case without the runs (a target out of reach) misses them.

    Example::

        >>> rows = [
        ...     {"case": "cnn_latency", "method": "budget", "test_acc": 0.90, "latency_ratio": 0.52},
        ...     {"case": "cnn_latency", "method": "uniform", "test_acc": 0.91, "latency_ratio": 0.50},
        ... ]
        >>> for target, met in targets({"cases": ["cnn_latency", "lenet_size"], "rows": rows}).items():
        ...     print(f"{target}: {met}")
        cnn_latency: budget accuracy >= uniform accuracy at equal budget: False
        cnn_latency: measured latency ratio <= 1.05 x 0.5: True
        lenet_size: budget accuracy >= uniform accuracy at equal budget: False
    """
    met: dict[str, bool] = {}
    by = {(r["case"], r["method"]): r for r in results["rows"]}
    for name in results["cases"]:
        case, budget, uniform = CASES[name], by.get((name, "budget")), by.get((name, "uniform"))
        met[f"{name}: budget accuracy >= uniform accuracy at equal budget"] = (
            budget is not None and uniform is not None and budget["test_acc"] >= uniform["test_acc"]
        )
        if case.metric == "latency":
            met[f"{name}: measured latency ratio <= {LATENCY_SLACK:g} x {case.target:g}"] = (
                budget is not None and budget["latency_ratio"] <= LATENCY_SLACK * case.target
            )
    return met


def report(results: dict[str, Any], settings: Settings) -> str:
    """The Markdown tables, the settings and the targets of a results dictionary."""
    rows = results["rows"]
    dense = [r for r in rows if r["method"] == "dense"]
    cases = [r for r in rows if r["method"] != "dense"]
    widths = "-".join(map(str, settings.cnn_widths))
    uniform = ", ".join(f"{scheme} {_span(levels)}" for scheme, levels in UNIFORM_GRID.items())
    tables = [
        "## Budget vs uniform, per case\n\n"
        + markdown_table(
            cases,
            [
                "case",
                "scheme",
                "metric",
                "target",
                "method",
                "test_acc",
                "accuracy_drop_points",
                "predicted_fraction",
                "achieved_fraction",
                "params_fraction",
                "macs_fraction",
                "latency_ratio",
                "params",
                "macs",
                "size_kb",
                "levels",
            ],
        )
        + "\n\n`predicted_fraction`: what the levels cost in the budget's cost model, as a fraction of the "
        "dense model's cost on the case's metric (empty: not predicted; the structured uniform run's amount is "
        "chosen by measurement); `achieved_fraction`: the same metric measured on the fine-tuned model "
        "(params: non-zero parameters for unstructured pruning; size: each tensor stored in the cheapest of "
        "dense, bitmask and coordinate layouts; latency: the measured ratio). `params_fraction`, "
        "`macs_fraction`: parameters and MACs per sample of the fine-tuned model over the dense model's. "
        f"`latency_ratio`: median latency over the dense model's at batch {settings.latency_batch}, timed "
        "side by side. `accuracy_drop_points`: dense test accuracy minus this one, in points. `macs`: "
        "per sample.",
        "## Dense models\n\n"
        + markdown_table(dense, ["model", "train_images", "epochs", "test_acc", "params", "macs", "size_kb"]),
        "## Levels per layer\n\n"
        + markdown_table(
            results["layers"],
            [
                "case",
                "layer",
                "weights",
                "budget_level",
                "budget_loss_increase",
                "uniform_level",
                "dense_layer_cost",
                "budget_layer_cost",
                "uniform_layer_cost",
            ],
        )
        + "\n\nLevels: the amount removed for pruning (of the weights, or of a channel group's channels for "
        "`prune_structured`, where a row is a group named by its root layer), the fraction of the full rank "
        "kept for `low_rank`. `budget_loss_increase`: the training loss with that layer (group) alone "
        "compressed at its level, minus the dense model's, on the budget's batches. Layer costs in the case's "
        "metric (MACs per sample, bytes, ms or parameters); a group's cost includes the inputs its consumers "
        "lose, a cost shared by two groups counts half for each.",
        f"Settings: dense models trained {_epochs(settings.dense_epochs)} (Adam lr {settings.lr:g}, cosine "
        f"to zero, batch {settings.batch_size}), then each run of a case fine-tuned "
        f"{_epochs(settings.finetune_epochs)} from the same dense weights (Adam lr "
        f"{settings.finetune_lr:g}, cosine to zero, the same seed and data order). Residual CNN {widths} (3 "
        "stages, skip connections, BatchNorm); LeNet-300-100 (784-300-100-10). Budget run: "
        f"`CompressionBudget(scheme, target, metric, levels=..., batches={settings.budget_batches})` with "
        f"`GradualPruning(mode=..., start=0, end={settings.prune_end:g}, round_to={settings.round_to})` or "
        "`LowRankReplacement()`, given no amount or rank; the classifier is left out of structured "
        f"pruning. Budget levels: structured amounts {_span(settings.structured_levels)} per channel group, "
        f"unstructured amounts {_span(settings.prune_levels)}, rank fractions {_span(settings.rank_levels)}. "
        "Uniform run: the same callback with one level for every layer at the cost the budget run reached: "
        "unstructured and low rank, the least compressed level whose cost in the budget's cost table "
        f"(`CostTable.total`, what these models reach) is at most the allocation's, on a fine grid ({uniform}); "
        "structured, the least compressed amount whose pruned model costs at most what the budget run's "
        "model measurably costs (MACs counted, or latency timed side by side; bisection over the amounts "
        f"i/{settings.achieved_steps}). The "
        f"budget's latency table and the side-by-side timing use batch {settings.latency_batch} and "
        f"{results['latency_threads']} torch thread(s); timing: eval mode, inference_mode, 3 interleaved "
        f"rounds x {settings.repeats} calls after warm-up, medians.",
        "Targets: "
        + "; ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in results["targets"].items())
        + ".",
    ]
    return "\n\n".join(tables)


def _epochs(count: int) -> str:
    return f"{count} epoch{'' if count == 1 else 's'}"


def _span(levels: tuple[float, ...]) -> str:
    steps = sorted({round(b - a, 6) for a, b in itertools.pairwise(levels)})
    step = f" in steps of {steps[0]:g}" if len(steps) == 1 else ""
    return f"{levels[0]:g} to {levels[-1]:g}{step}" if len(levels) > 1 else f"{levels[0]:g}"


def run(args: Settings, context: Context) -> Result:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    results: dict[str, Any] = {"cases": list(args.cases), "rows": [], "layers": []}
    for arch in dict.fromkeys(CASES[name].arch for name in args.cases):
        names = [name for name in args.cases if CASES[name].arch == arch]
        rows, layers = compare(arch, names, args, context)
        results["rows"] += rows
        results["layers"] += layers
    results["latency_threads"] = torch.get_num_threads()
    results["targets"] = targets(results)
    return Result(results, report(results, args))
