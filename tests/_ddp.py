"""Shared pieces of the DDP tests: each test runs a worker script in a fresh interpreter, which starts 2 CPU
processes (gloo) with Lightning's ``ddp`` strategy (processes launched as scripts, no shared-memory transfer
of results), and each rank writes what the test compares."""

import atexit
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl

ROOT = Path(__file__).resolve().parents[1]


def _leave_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def ddp_trainer(callbacks, **overrides) -> pl.Trainer:
    """A quiet 2-process CPU Trainer for the worker scripts: the tests' settings with the ``ddp`` strategy.

    The process group is left before the interpreter exits: torn down only at exit, gloo's threads can abort the
    process (``terminate called without an active exception``) after the work is done.
    """
    from tests.conftest import trainer_kwargs

    atexit.unregister(_leave_process_group)
    atexit.register(_leave_process_group)
    defaults = dict(devices=2, strategy="ddp", limit_val_batches=0)
    return pl.Trainer(callbacks=callbacks, **trainer_kwargs(None, **{**defaults, **overrides}))


def run_worker(name: str, out_dir: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``tests/<name>`` with 2 processes; fail with the worker's own error output if it fails (else return
    the finished process, its output captured)."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "tests" / name), str(out_dir)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, f"{name} exited with {result.returncode}:\n{result.stderr[-5000:]}"
    return result
