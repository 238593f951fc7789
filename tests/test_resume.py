"""Crash-safe resume: a run SIGKILLed mid-epoch or mid-checkpoint-write resumes with --resume and reproduces the
uninterrupted run (same seed, CPU) within 1e-6: train losses, metrics, val losses, learning rates and weights.
Two persistent DataLoader workers, which prefetch the next epoch's first batches before the epoch starts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.helpers import ROOT
from train import latest_run
from utils.checkpoint import load_checkpoint
from utils.general import UserInputError
from utils.synthetic import CLASS_NAMES, generate_shapes

# One OpenMP thread: identical reductions in every run, and no spin-waiting on a shared, oversubscribed machine.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "NO_COLOR": "1"}
EPOCHS = 3
# Runs train.py as __main__, freezing it at a chosen moment so that the test can SIGKILL it there:
#   batch N  just before the loss of the N-th training batch (N = 6: batch 2 of 4 in epoch 1)
#   save N   in the N-th save of last.pt, after its temporary file is fully written and before the rename
FREEZE_AND_RUN_TRAIN = """
import os, runpy, sys, time
import torch
from utils import loss

moment, count = sys.argv[1], int(sys.argv[2])
calls = []
def reached():
    calls.append(moment)
    if len(calls) == count:
        print("FROZEN", moment, count, flush=True)
        time.sleep(600)
rename, compute_loss = os.replace, loss.ComputeLoss.__call__
def replace(src, dst):
    if moment == "save" and os.path.basename(dst) == "last.pt":
        reached()
    rename(src, dst)
def loss_call(self, *args, **kwargs):
    if moment == "batch" and torch.is_grad_enabled():
        reached()
    return compute_loss(self, *args, **kwargs)
os.replace, loss.ComputeLoss.__call__ = replace, loss_call
sys.argv = ["train.py", *sys.argv[3:]]
runpy.run_path("train.py", run_name="__main__")
"""


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    """8 train / 4 val synthetic images at 64 px: 4 batches of 2 per epoch."""
    root = tmp_path_factory.mktemp("resume")
    generate_shapes(root / "shapes", n_train=8, n_val=4, imgsz=64, seed=2)
    data = root / "tiny.yaml"
    data.write_text(yaml.safe_dump({"path": str(root / "shapes"), "train": "images/train", "val": "images/val",
                                    "names": list(CLASS_NAMES)}))
    return data


def train_args(data: Path, project: Path, name: str, plots: bool = False) -> list[str]:
    return ["--cfg", "yolov5n.yaml", "--data", str(data), "--img", "64", "--batch-size", "2", "--epochs", str(EPOCHS),
            "--workers", "2", "--seed", "7", "--save-period", "2", "--project", str(project), "--name", name,
            *([] if plots else ["--noplots"])]


def run(args: list[str], timeout: int = 300) -> str:
    out = subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout + out.stderr


def train_until_frozen(moment: str, count: int, args: list[str], timeout: float = 300) -> str:
    """Run train.py until it freezes at ``moment`` number ``count``, then SIGKILL it; returns its output."""
    proc = subprocess.Popen([sys.executable, "-c", FREEZE_AND_RUN_TRAIN, moment, str(count), *args], cwd=ROOT,
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = b""
    try:
        while b"FROZEN" not in output:
            chunk = os.read(proc.stdout.fileno(), 65536)
            assert chunk, f"exited (rc {proc.wait(timeout)}) before freezing:\n{output.decode()[-3000:]}"
            output += chunk
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout)
        proc.stdout.close()
    return output.decode(errors="replace")


def results_rows(run_dir: Path) -> dict[int, list[float]]:
    """results.csv as {epoch: values}; fails on a duplicated epoch."""
    lines = (run_dir / "results.csv").read_text().splitlines()[1:]
    rows = [[float(x) for x in line.split(",")] for line in lines]
    epochs = [int(r[0]) for r in rows]
    assert len(set(epochs)) == len(epochs), f"duplicated epochs in results.csv: {epochs}"
    return {int(r[0]): r[1:] for r in rows}


def assert_resumed_run_matches(resumed: Path, reference: Path) -> None:
    """Every epoch's results.csv row and the final epoch's weights (model, EMA, optimizer) agree within 1e-6."""
    got, want = results_rows(resumed), results_rows(reference)
    assert sorted(got) == sorted(want) == list(range(EPOCHS))
    for epoch in want:
        assert got[epoch] == pytest.approx(want[epoch], rel=0, abs=1e-6), f"epoch {epoch}"
    a, b = (load_checkpoint(r / "weights" / f"epoch{EPOCHS - 1}.pt") for r in (resumed, reference))
    for key in ("model", "ema"):
        for name, value in b[key].items():
            assert torch.allclose(a[key][name].float(), value.float(), rtol=0, atol=1e-6), f"{key} {name}"
    momenta = [s["momentum_buffer"] for s in b["optimizer"]["state"].values()]
    for x, y in zip([s["momentum_buffer"] for s in a["optimizer"]["state"].values()], momenta, strict=True):
        assert torch.allclose(x, y, rtol=0, atol=1e-6)
    assert (a["updates"], a["last_opt_step"], a["best_epoch"]) == (b["updates"], b["last_opt_step"], b["best_epoch"])


@pytest.fixture(scope="module")
def uninterrupted(tiny_data, tmp_path_factory) -> Path:
    project = tmp_path_factory.mktemp("runs")
    run(["train.py", *train_args(tiny_data, project, "full", plots=True)])  # plots must not shift any random draw
    return project / "full"


def test_resume_after_kill_mid_epoch_reproduces_uninterrupted_run(tiny_data, uninterrupted, tmp_path):
    out = train_until_frozen("batch", 6, train_args(tiny_data, tmp_path, "exp"))
    assert "Traceback" not in out
    last = tmp_path / "exp" / "weights" / "last.pt"
    assert load_checkpoint(last)["epoch"] == 0
    out = run(["train.py", "--resume", str(last)])
    assert f"Resuming {last}: epochs 1 to {EPOCHS - 1} of {EPOCHS} remain" in out
    assert_resumed_run_matches(tmp_path / "exp", uninterrupted)


def test_kill_while_writing_checkpoint_keeps_last_pt_and_resumes(tiny_data, uninterrupted, tmp_path):
    train_until_frozen("save", 2, train_args(tiny_data, tmp_path, "exp"))  # the end-of-epoch-1 save
    weights = tmp_path / "exp" / "weights"
    assert len(list(weights.glob(".last.pt.*.tmp"))) == 1  # the complete temporary file, never renamed
    assert load_checkpoint(weights / "last.pt")["epoch"] == 0  # the previous checkpoint, intact
    assert sorted(results_rows(tmp_path / "exp")) == [0, 1]  # epoch 1 was logged, not checkpointed
    run(["train.py", "--resume", str(weights / "last.pt")])
    assert not list(weights.glob(".*.tmp"))
    assert_resumed_run_matches(tmp_path / "exp", uninterrupted)


def test_resume_without_path_picks_the_newest_last_pt(tmp_path):
    with pytest.raises(UserInputError, match="no last.pt found"):
        latest_run(tmp_path)
    for i, run_dir in enumerate(("exp", "exp2", "exp3")):
        (tmp_path / run_dir / "weights").mkdir(parents=True)
        (tmp_path / run_dir / "weights" / "last.pt").touch()
        os.utime(tmp_path / run_dir / "weights" / "last.pt", (1e9 + i, 1e9 + [0, 2, 1][i]))
    assert latest_run(tmp_path) == tmp_path / "exp2" / "weights" / "last.pt"
