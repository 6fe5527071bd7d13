"""Figures of a compression report: target vs reached compression over steps, per-layer view, size breakdown.

Needs matplotlib (``pip install 'lightning-compress[plots]'``); it is imported only when a figure is drawn.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "layer_figure",
    "report_figures",
    "require_matplotlib",
    "send_figure",
    "send_file",
    "send_text",
    "size_figure",
    "steps_figure",
    "write_figures",
]


def require_matplotlib() -> Any:
    """Import matplotlib with a non-interactive backend, or fail with the install command.

    Example::

        >>> require_matplotlib().get_backend().lower()
        'agg'
    """
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError(
            "Plotting the compression report needs matplotlib: install the `plots` extra "
            "(`pip install 'lightning-compress[plots]'`) or pass `plots=False`."
        ) from err
    # Figures are only written to files and loggers: no display is needed (or available on servers).
    matplotlib.use("Agg", force=False)
    return matplotlib


def _pyplot() -> Any:
    require_matplotlib()
    import matplotlib.pyplot as plt

    return plt


def steps_figure(history: Sequence[Mapping[str, Any]]) -> Any:
    """Reached sparsity and compression rate over optimizer steps, with the callbacks' targets.

    Args:
        history: one entry per logged step: ``step``, ``sparsity`` (all parameters), ``compression_rate``,
            and ``targets`` (target amount by callback name, for callbacks that expose ``current_amount``).

    Example::

        >>> fig = steps_figure([{"step": 0, "sparsity": 0.0, "compression_rate": 1.0, "targets": {"P": 0.0}},
        ...                     {"step": 10, "sparsity": 0.4, "compression_rate": 1.6, "targets": {"P": 0.5}}])
        >>> [ax.get_title() for ax in fig.axes]
        ['Sparsity: target vs reached', 'Compression rate (params / non-zero params)']
    """
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    steps = [entry["step"] for entry in history]
    left.plot(steps, [entry["sparsity"] for entry in history], marker=".", label="reached (all parameters)")
    names = sorted({name for entry in history for name in entry.get("targets", {})})
    for name in names:
        points = [(e["step"], e["targets"][name]) for e in history if name in e.get("targets", {})]
        left.step(
            [s for s, _ in points],
            [v for _, v in points],
            where="post",
            linestyle="--",
            label=f"target amount ({name}, selected layers)",
        )
    left.set_title("Sparsity: target vs reached")
    left.set_xlabel("optimizer step")
    left.set_ylabel("fraction of zeros")
    left.set_ylim(0.0, 1.0)
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    right.plot(steps, [entry["compression_rate"] for entry in history], marker=".", color="tab:green")
    right.set_title("Compression rate (params / non-zero params)")
    right.set_xlabel("optimizer step")
    right.set_ylabel("x")
    right.grid(alpha=0.3)
    return fig


def _layer_names(before: Mapping[str, Any], after: Mapping[str, Any], key: str) -> list[str]:
    names = list(before.get(key, {}))
    names += [name for name in after.get(key, {}) if name not in names]
    return names


def _short(name: str, width: int = 32) -> str:
    return name if len(name) <= width else "..." + name[-(width - 3) :]


def layer_figure(report: Mapping[str, Any]) -> Any:
    """Per weight, before and after: entries (smaller after structured pruning or factorization), fraction of
    zeros, and bits per stored value.

    Example::

        >>> before = {"layer_params": {"w": 8}, "layer_sparsity": {"w": 0.0}, "layer_bits": {"w": 32}}
        >>> after = {"layer_params": {"w": 4}, "layer_sparsity": {"w": 0.5}, "layer_bits": {"w": 8}}
        >>> [ax.get_title() for ax in layer_figure({"before": before, "after": after}).axes]
        ['Entries per weight', 'Sparsity per weight', 'Bits per stored value']
    """
    plt = _pyplot()
    before, after = report["before"], report["after"]
    names = _layer_names(before, after, "layer_sparsity")
    height = max(3.0, 0.3 * len(names) + 1.8)
    fig, axes = plt.subplots(1, 3, figsize=(15, height), sharey=True, constrained_layout=True)
    panels = [
        ("layer_params", "Entries per weight", "entries"),
        ("layer_sparsity", "Sparsity per weight", "fraction of zeros"),
        ("layer_bits", "Bits per stored value", "bits"),
    ]
    for ax, (key, title, label) in zip(axes, panels, strict=True):
        _paired_bars(ax, names, before.get(key, {}), after.get(key, {}))
        ax.set_title(title)
        ax.set_xlabel(label)
    axes[1].set_xlim(0.0, 1.0)
    _legend(fig, axes[0])
    return fig


def _legend(fig: Any, ax: Any) -> None:
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside upper right", ncols=2, fontsize=8)


def size_figure(report: Mapping[str, Any], top: int = 20) -> Any:
    """Stored bytes per tensor before and after (the ``top`` largest before; the rest summed as "other").

    Example::

        >>> before = {"layer_bytes": {"w": 400, "b": 40}}
        >>> after = {"layer_bytes": {"w": 100, "b": 40}}
        >>> size_figure({"before": before, "after": after}).axes[0].get_title()
        'Stored size per tensor: 440 -> 140 bytes'
    """
    plt = _pyplot()
    b, a = report["before"].get("layer_bytes", {}), report["after"].get("layer_bytes", {})
    names = sorted(set(b) | set(a), key=lambda n: -max(b.get(n, 0), a.get(n, 0)))
    shown, rest = names[:top], names[top:]
    before_values = {n: b.get(n, 0) for n in shown}
    after_values = {n: a.get(n, 0) for n in shown}
    if rest:
        shown = [*shown, "other"]
        before_values["other"] = sum(b.get(n, 0) for n in rest)
        after_values["other"] = sum(a.get(n, 0) for n in rest)
    fig, ax = plt.subplots(figsize=(9, max(3.0, 0.3 * len(shown) + 1.5)), constrained_layout=True)
    _paired_bars(ax, shown, before_values, after_values)
    ax.set_title(f"Stored size per tensor: {sum(b.values()):,} -> {sum(a.values()):,} bytes")
    ax.set_xlabel("bytes")
    _legend(fig, ax)
    return fig


def _paired_bars(ax: Any, names: list[str], before: Mapping[str, float], after: Mapping[str, float]) -> None:
    positions = range(len(names))
    ax.barh([p - 0.2 for p in positions], [before.get(n, 0) for n in names], height=0.4, label="before")
    ax.barh([p + 0.2 for p in positions], [after.get(n, 0) for n in names], height=0.4, label="after")
    ax.set_yticks(list(positions), [_short(n) for n in names], fontsize=8)
    ax.invert_yaxis()
    ax.grid(axis="x", alpha=0.3)


def report_figures(report: Mapping[str, Any], history: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """All figures of a report by name: ``steps`` (when a history was recorded), ``layers`` and ``sizes``.

    Example::

        >>> stats = {"layer_sparsity": {"w": 0.0}, "layer_bits": {"w": 32}, "layer_bytes": {"w": 4}}
        >>> sorted(report_figures({"before": stats, "after": stats}, history=[]))
        ['layers', 'sizes']
    """
    figures = {}
    if history:
        figures["steps"] = steps_figure(history)
    figures["layers"] = layer_figure(report)
    figures["sizes"] = size_figure(report)
    return figures


def write_figures(
    report: Mapping[str, Any],
    history: Sequence[Mapping[str, Any]],
    path: Path | None,
    loggers: Iterable[Any] = (),
    tag: str = "compression/report/",
    step: int = 0,
) -> dict[str, Path]:
    """Draw :func:`report_figures`, write each as ``<path stem>.<figure>.png`` beside ``path`` (atomically: an
    interrupted write leaves the previous file), and send it to the loggers that take figures (TensorBoard's
    ``add_figure``, MLflow's ``log_figure``) under ``<tag><figure>``.

    Returns:
        The files written, by figure name (none when ``path`` is ``None``).

    Example::

        >>> import tempfile
        >>> stats = {"layer_sparsity": {"w": 0.0}, "layer_bits": {"w": 32}, "layer_bytes": {"w": 4}}
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     files = write_figures({"before": stats, "after": stats}, [], Path(folder) / "report.json")
        ...     sorted(file.name for file in files.values())
        ['report.layers.png', 'report.sizes.png']
    """
    from lightning_compress.export import atomic_write

    plt = _pyplot()
    written = {}
    for name, figure in report_figures(report, history).items():
        if path is not None:
            file = path.with_name(f"{path.stem}.{name}.png")
            with atomic_write(file) as partial:
                figure.savefig(partial, dpi=100, format="png")
            written[name] = file
        send_figure(loggers, f"{tag}{name}", figure, step)
        plt.close(figure)
    return written


def _wandb(logger: Any) -> bool:
    from lightning.pytorch.loggers import WandbLogger

    return isinstance(logger, WandbLogger)


def send_figure(loggers: Iterable[Any], tag: str, figure: Any, step: int = 0) -> None:
    """Send ``figure`` to the loggers that take figures: TensorBoard's ``add_figure`` (under ``tag``), MLflow's
    ``log_figure`` (as ``<tag>.png``), W&B's ``log_image`` (under ``tag``); the others are skipped."""
    for logger in loggers:
        if _wandb(logger):
            logger.log_image(key=tag, images=[figure], step=step)
            continue
        experiment = getattr(logger, "experiment", None)
        if hasattr(experiment, "add_figure"):  # TensorBoard
            experiment.add_figure(tag, figure, global_step=step, close=False)
        elif hasattr(experiment, "log_figure") and getattr(logger, "run_id", None):  # MLflow
            experiment.log_figure(logger.run_id, figure, f"{tag}.png")


def send_text(loggers: Iterable[Any], tag: str, text: str, step: int = 0) -> None:
    """Send ``text`` (a table) to the loggers that take text: TensorBoard's ``add_text`` (under ``tag``, as a
    preformatted block), MLflow's ``log_text`` (as ``<tag>.txt``), W&B's ``log_text`` (a one-cell table under
    ``tag``); the others are skipped."""
    for logger in loggers:
        if _wandb(logger):
            logger.log_text(key=tag, columns=["text"], data=[[text]], step=step)
            continue
        experiment = getattr(logger, "experiment", None)
        if hasattr(experiment, "add_text"):  # TensorBoard
            block = "\n".join(f"    {line}" for line in text.splitlines())
            experiment.add_text(tag, block, global_step=step)
        elif hasattr(experiment, "log_text") and getattr(logger, "run_id", None):  # MLflow
            experiment.log_text(logger.run_id, text, f"{tag}.txt")


def send_file(loggers: Iterable[Any], path: Path, folder: str) -> None:
    """Attach the file ``path`` to the run of the loggers that keep files: an MLflow artifact under ``folder``, a
    W&B run file (``<name>`` at the top of the run's files); the others keep their files in their own directory."""
    for logger in loggers:
        if _wandb(logger):  # a copy in the run's own folder: W&B links the file it is given
            run_folder = Path(logger.experiment.dir)
            if path.parent.resolve() != run_folder.resolve():
                shutil.copyfile(path, run_folder / path.name)
            logger.experiment.save(str(run_folder / path.name), base_path=str(run_folder), policy="now")
        elif hasattr(getattr(logger, "experiment", None), "log_artifact") and getattr(logger, "run_id", None):
            logger.experiment.log_artifact(logger.run_id, str(path), folder)
