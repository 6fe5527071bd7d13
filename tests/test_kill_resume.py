"""Kill the composed pipeline (low-rank, structured pruning, self-distillation, int8 QAT) at chosen points and
resume from the last checkpoint: the result equals the uninterrupted fit to the bit.

The killed fits run in subprocesses (``tests/_kill_resume_run.py``) that end themselves with SIGKILL from a hook,
so no Python cleanup runs; the uninterrupted fit and the resumed fits run in this process.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_compress import GradualPruning, QuantizationAwareTraining
from tests import _kill_resume_run as run

REPO = Path(__file__).resolve().parents[1]
# The point: the checkpoint the resumed fit starts from (the last one written before the kill), the first
# optimizer step it takes, and the step the killed fit died at.
KILLS = {
    "pruning_update": ("epoch=0-step=2.ckpt", 2, run.PRUNING_UPDATE_STEP),
    "epoch_boundary": ("epoch=1-step=4.ckpt", 4, 4),
    "qat_convert": (f"epoch=2-step={run.TOTAL_STEPS}.ckpt", run.TOTAL_STEPS, run.TOTAL_STEPS),
}


def _start_killed_fit(root: Path, dense: Path, point: str) -> subprocess.Popen:
    root.mkdir()
    env = dict(os.environ, KILL_AT=point, PYTHONPATH=str(REPO))
    with open(root / "output.log", "w") as log:  # a file, not a pipe: nobody reads while the reference runs
        return subprocess.Popen(
            [sys.executable, "-m", "tests._kill_resume_run", str(root), str(dense)],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def _wait(process: subprocess.Popen, timeout: float) -> int:
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The killed fits (started first, in parallel) and the uninterrupted fit, from the same dense weights."""
    root = tmp_path_factory.mktemp("kill_resume")
    pl.seed_everything(0, verbose=False)
    dense = run.ResidualNet()
    pl.Trainer(
        accelerator="cpu",
        max_epochs=2,
        deterministic=True,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    ).fit(dense, run.DigitsSubset())
    dense_path = root / "dense.pt"
    torch.save(dense.state_dict(), dense_path)

    killed = {point: _start_killed_fit(root / point, dense_path, point) for point in KILLS}
    try:
        model, callbacks, trainer = run.fit(root / "reference", dense_path)
    finally:
        returncodes = {point: _wait(process, timeout=900) for point, process in killed.items()}
    return {
        "root": root,
        "dense": dense_path,
        "reference": (model, callbacks, trainer),
        "killed": {
            point: (code, (root / point / "output.log").read_text()) for point, code in returncodes.items()
        },
    }


def _equal(a, b, where=""):
    """Exact equality of nested states (tensors with ``torch.equal``); returns the first difference or None."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
        return None if same and torch.equal(a, b) else where
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return f"{where} keys {sorted(set(a) ^ set(b))[:5]}"
        for key in a:
            diff = _equal(a[key], b[key], f"{where}.{key}")
            if diff is not None:
                return diff
        return None
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        if len(a) != len(b):
            return f"{where} length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            diff = _equal(x, y, f"{where}[{i}]")
            if diff is not None:
                return diff
        return None
    return None if a == b else f"{where}: {a!r} != {b!r}"


def _outputs(model):
    x = run.digits()[1].tensors[0]
    model.eval()
    with torch.no_grad():
        return model(x)


@pytest.fixture(scope="module")
def resumed(runs, tmp_path_factory):
    """Resume the fit killed at a point from the last checkpoint it wrote (once per point)."""
    done = {}

    def resume(point):
        if point not in done:
            root = tmp_path_factory.mktemp(f"resumed_{point}")
            ckpt = runs["root"] / point / "ckpt" / "last.ckpt"
            done[point] = (root, *run.fit(root, runs["dense"], ckpt_path=ckpt))
        return done[point]

    return resume


def _checkpoint(path):
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.mark.parametrize("point", list(KILLS))
def test_killed_fit_resumed_from_its_last_checkpoint_equals_the_uninterrupted_fit(runs, resumed, point):
    returncode, output = runs["killed"][point]
    assert returncode == -signal.SIGKILL, output[-3000:]
    ckpt_name, first_step, _ = KILLS[point]
    killed_root = runs["root"] / point
    died = json.loads((killed_root / "killed.json").read_text())
    assert died["point"] == point and died["global_step"] == KILLS[point][2]
    assert died.get("channels_removed", True)
    assert _checkpoint(killed_root / "ckpt" / "last.ckpt")["global_step"] == first_step
    assert (killed_root / "ckpt" / ckpt_name).exists()

    root, model, callbacks, trainer = resumed(point)
    ref_model, ref_callbacks, ref_trainer = runs["reference"]

    assert trainer.global_step == ref_trainer.global_step == run.TOTAL_STEPS
    # The steps the resumed fit took are the uninterrupted fit's steps, loss for loss.
    assert sorted(model.losses) == list(range(first_step, run.TOTAL_STEPS))
    assert model.losses == {step: ref_model.losses[step] for step in model.losses}
    if first_step < run.TOTAL_STEPS:
        # The checkpoint of the last step (masked, fake-quantized, before the end of training) is the same file
        # content: weights, quantizer ranges, optimizer moments, callback states.
        name = f"epoch={run.EPOCHS - 1}-step={run.TOTAL_STEPS}.ckpt"
        mine, theirs = (
            _checkpoint(root / "ckpt" / name),
            _checkpoint(runs["root"] / "reference" / "ckpt" / name),
        )
        for key in ("state_dict", "optimizer_states", "global_step", "epoch"):
            assert _equal(mine[key], theirs[key], key) is None
        # ModelCheckpoint's own state holds its paths, which differ.
        states = [
            {k: v for k, v in c["callbacks"].items() if not k.startswith("ModelCheckpoint")}
            for c in (mine, theirs)
        ]
        assert len(states[0]) == 4
        assert _equal(*states, "callbacks") is None
    # The same converted int8 model: weights and outputs.
    qat, _, pruning, low_rank = callbacks
    ref_qat, _, ref_pruning, ref_low_rank = ref_callbacks
    assert qat.converted and ref_qat.converted
    assert _equal(model.state_dict(), ref_model.state_dict(), "state_dict") is None
    assert torch.equal(_outputs(model), _outputs(ref_model))
    # The callbacks' recorded state.
    for mine, theirs in zip(callbacks, ref_callbacks, strict=True):
        assert _equal(mine.state_dict(), theirs.state_dict(), type(mine).__name__) is None
    assert pruning.materialized and pruning.plan == ref_pruning.plan
    assert qat.parity == ref_qat.parity
    assert low_rank.layers == ref_low_rank.layers
    if first_step < run.TOTAL_STEPS:
        assert pruning.materialize_max_abs_diff == ref_pruning.materialize_max_abs_diff


def test_resumed_at_the_last_step_records_the_same_channel_removal_check(runs, resumed):
    _, _, callbacks, _ = resumed("qat_convert")
    pruning, ref_pruning = callbacks[2], runs["reference"][1][2]
    assert pruning.materialize_max_abs_diff == ref_pruning.materialize_max_abs_diff


def _fit_then_resume_from_the_last_step(tmp_path, make_callback):
    """A `max_steps` fit, then the same fit resumed from the checkpoint of its last step: (model, callback) each."""
    fits = []
    for ckpt in (None, tmp_path / "first" / "last.ckpt"):
        pl.seed_everything(0, verbose=False)
        model, callback = run.ResidualNet(), make_callback()
        checkpoint = ModelCheckpoint(
            dirpath=tmp_path / ("first" if ckpt is None else "second"), every_n_train_steps=2, save_last=True
        )
        trainer = pl.Trainer(
            accelerator="cpu",
            max_steps=4,
            deterministic=True,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[callback, checkpoint],
        )
        trainer.fit(model, run.DigitsSubset(), ckpt_path=ckpt)
        fits.append((model, callback))
    return fits


def test_resumed_from_the_last_step_with_max_steps_still_removes_the_channels(tmp_path):
    (model, pruning), (resumed, resumed_pruning) = _fit_then_resume_from_the_last_step(
        tmp_path, lambda: GradualPruning(amount=0.5, mode="structured")
    )
    assert pruning.materialized
    assert sum(p.numel() for p in model.parameters()) == 2626  # 5,122 before the channels are removed
    assert resumed_pruning.materialized
    assert sum(p.numel() for p in resumed.parameters()) == 2626


def test_resumed_from_the_last_step_with_max_steps_still_converts_to_int8(tmp_path):
    (model, qat), (resumed, resumed_qat) = _fit_then_resume_from_the_last_step(
        tmp_path, QuantizationAwareTraining
    )
    assert qat.converted and resumed_qat.converted
    x = torch.linspace(0, 1, 4 * 64).reshape(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x), resumed(x))
