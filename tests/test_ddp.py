"""DistributedDataParallel on CPU: torchrun with 2 gloo processes trains, and only rank 0 writes outputs."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import yaml

from tests.helpers import ROOT
from utils.checkpoint import load_checkpoint
from utils.synthetic import CLASS_NAMES, generate_shapes

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "NO_COLOR": "1"}


def run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def test_torchrun_two_cpu_processes_one_epoch(tmp_path):
    generate_shapes(tmp_path / "shapes", n_train=8, n_val=4, imgsz=64, seed=3)
    data = tmp_path / "tiny.yaml"
    data.write_text(yaml.safe_dump({"path": str(tmp_path / "shapes"), "train": "images/train", "val": "images/val",
                                    "names": list(CLASS_NAMES)}))
    project = tmp_path / "runs"
    out = run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py",
              "--cfg", "yolov5n.yaml", "--data", str(data), "--img", "64", "--epochs", "1", "--batch-size", "4",
              "--workers", "0", "--device", "cpu", "--noplots", "--project", str(project), "--name", "exp")
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert "Traceback" not in log
    assert "DDP: 2 processes, gloo backend, 2 images per batch each" in log
    assert log.count("Training done: 1 epoch(s)") == 1  # rank 0 alone logs, validates and saves

    assert [p.name for p in project.iterdir()] == ["exp"]
    rows = (project / "exp" / "results.csv").read_text().splitlines()
    assert len(rows) == 2 and rows[1].split(",")[0].strip() == "0"
    ckpt = load_checkpoint(project / "exp" / "weights" / "last.pt")
    assert ckpt["names"] == dict(enumerate(CLASS_NAMES)) and not any(k.startswith("module.") for k in ckpt["model"])

    val = run("val.py", "--weights", str(project / "exp" / "weights" / "best.pt"), "--data", str(data), "--img", "64",
              "--device", "cpu", "--project", str(tmp_path / "val"), "--name", "exp")
    assert val.returncode == 0, val.stdout[-3000:] + val.stderr[-3000:]
    assert re.search(r"^\s+all\s+4\s+\d+", val.stdout, re.M)


def test_several_devices_without_torchrun_explain_the_launch():
    out = run("train.py", "--cfg", "yolov5n.yaml", "--device", "0,1", "--epochs", "1")
    assert out.returncode == 2
    assert "Traceback" not in out.stderr + out.stdout
    assert "--device 0,1: several devices need one process each; launch with torchrun --nproc_per_node 2 " \
           "train.py --device 0,1 ..." in out.stdout
