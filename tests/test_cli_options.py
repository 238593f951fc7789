"""Every bad command-line value of train.py, val.py, detect.py and export.py stops the script before any work.

Contract: exit code 2, exactly one ``ERROR:`` line naming the flag(s), no traceback, and nothing started (no device
selected, no dataset scanned, no model built). The command lines run through the scripts' real ``__main__`` code, each
in its own process: ``tests/cli_prefork.py`` imports the scripts once and forks a child per command line (a plain
``python script.py ...`` per case would spend minutes importing torch on a 2-core machine); one test checks that a
forked run and a plain subprocess give the same result.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "NO_COLOR": "1"}
MODEL = ("--cfg", "yolov5n.yaml")

# id -> (script, arguments, flags the ERROR line must name)
CASES = {
    # train.py: one value at a time
    "train batch 0": ("train.py", (*MODEL, "--batch-size", "0"), ("--batch-size",)),
    "train batch -2": ("train.py", (*MODEL, "--batch-size", "-2"), ("--batch-size",)),
    "train batch text": ("train.py", (*MODEL, "--batch-size", "many"), ("--batch-size",)),
    "train batch abbreviated": ("train.py", (*MODEL, "--batch", "0"), ("--batch",)),
    "train epochs 0": ("train.py", (*MODEL, "--epochs", "0"), ("--epochs",)),
    "train epochs float": ("train.py", (*MODEL, "--epochs", "1.5"), ("--epochs",)),
    "train img -64": ("train.py", (*MODEL, "--img", "-64"), ("--img",)),
    "train img-size 0": ("train.py", (*MODEL, "--img-size", "0"), ("--img-size",)),
    "train workers -3": ("train.py", (*MODEL, "--workers", "-3"), ("--workers",)),
    "train patience -1": ("train.py", (*MODEL, "--patience", "-1"), ("--patience",)),
    "train label smoothing 1": ("train.py", (*MODEL, "--label-smoothing", "1"), ("--label-smoothing",)),
    "train label smoothing -0.1": ("train.py", (*MODEL, "--label-smoothing", "-0.1"), ("--label-smoothing",)),
    "train label smoothing nan": ("train.py", (*MODEL, "--label-smoothing", "nan"), ("--label-smoothing",)),
    "train evolve 0": ("train.py", (*MODEL, "--evolve", "0"), ("--evolve",)),
    "train cache gpu": ("train.py", (*MODEL, "--cache", "gpu"), ("--cache",)),
    "train seed -1": ("train.py", (*MODEL, "--seed", "-1"), ("--seed",)),
    "train freeze -1": ("train.py", (*MODEL, "--freeze", "10", "-1"), ("--freeze",)),
    "train save period 0": ("train.py", (*MODEL, "--save-period", "0"), ("--save-period",)),
    "train local rank -2": ("train.py", (*MODEL, "--local_rank", "-2"), ("--local_rank",)),
    "train optimizer": ("train.py", (*MODEL, "--optimizer", "Nadam"), ("--optimizer",)),
    "train device": ("train.py", (*MODEL, "--device", "gpu0"), ("--device",)),
    "train name empty": ("train.py", (*MODEL, "--name", ""), ("--name",)),
    "train weights onnx": ("train.py", (*MODEL, "--weights", "best.onnx"), ("--weights",)),
    "train cfg missing": ("train.py", ("--cfg", "no_such_model.yaml"), ("--cfg",)),
    "train data missing": ("train.py", (*MODEL, "--data", "no_such_data.yaml"), ("--data",)),
    "train hyp missing": ("train.py", (*MODEL, "--hyp", "no_such_hyp.yaml"), ("--hyp",)),
    "train resume missing": ("train.py", ("--resume", "no_such_run/last.pt"), ("--resume",)),
    # train.py: contradictions
    "train no model": ("train.py", ("--cfg", "", "--weights", ""), ("--cfg", "--weights")),
    "train rect image weights": ("train.py", (*MODEL, "--rect", "--image-weights"), ("--rect", "--image-weights")),
    "train nosave save period": ("train.py", (*MODEL, "--nosave", "--save-period", "2"), ("--nosave", "--save-period")),
    "train quad small batch": ("train.py", (*MODEL, "--quad", "--batch-size", "2"), ("--quad", "--batch-size")),
    "train devices without torchrun": ("train.py", (*MODEL, "--device", "0,1"), ("--device",)),
    # val.py
    "val batch 0": ("val.py", ("--batch-size", "0"), ("--batch-size",)),
    "val batch text": ("val.py", ("--batch-size", "x"), ("--batch-size",)),
    "val img -64": ("val.py", ("--img", "-64"), ("--img",)),
    "val conf 1.5": ("val.py", ("--conf-thres", "1.5"), ("--conf-thres",)),
    "val conf nan": ("val.py", ("--conf-thres", "nan"), ("--conf-thres",)),
    "val iou -0.1": ("val.py", ("--iou-thres", "-0.1"), ("--iou-thres",)),
    "val max det 0": ("val.py", ("--max-det", "0"), ("--max-det",)),
    "val task": ("val.py", ("--task", "testing"), ("--task",)),
    "val device": ("val.py", ("--device", "cuda:x"), ("--device",)),
    "val workers -1": ("val.py", ("--workers", "-1"), ("--workers",)),
    "val name empty": ("val.py", ("--name", " "), ("--name",)),
    "val weights suffix": ("val.py", ("--weights", "best.engine"), ("--weights",)),
    "val data missing": ("val.py", ("--data", "no_such_data.yaml"), ("--data",)),
    "val save conf alone": ("val.py", ("--save-conf",), ("--save-conf",)),
    "val half on cpu": ("val.py", ("--half", "--device", "cpu"), ("--half", "--device")),
    # detect.py
    "detect img 0": ("detect.py", ("--img", "0"), ("--img",)),
    "detect img three sizes": ("detect.py", ("--imgsz", "64", "64", "64"), ("--imgsz",)),
    "detect img text": ("detect.py", ("--imgsz", "big"), ("--imgsz",)),
    "detect conf 2": ("detect.py", ("--conf-thres", "2"), ("--conf-thres",)),
    "detect iou -1": ("detect.py", ("--iou-thres", "-1"), ("--iou-thres",)),
    "detect max det 0": ("detect.py", ("--max-det", "0"), ("--max-det",)),
    "detect max det text": ("detect.py", ("--max-det", "all"), ("--max-det",)),
    "detect classes -1": ("detect.py", ("--classes", "0", "-1"), ("--classes",)),
    "detect line thickness 0": ("detect.py", ("--line-thickness", "0"), ("--line-thickness",)),
    "detect vid stride 0": ("detect.py", ("--vid-stride", "0"), ("--vid-stride",)),
    "detect two models": ("detect.py", ("--weights", "a.pt", "b.pt"), ("--weights",)),
    "detect weights suffix": ("detect.py", ("--weights", "best.tflite"), ("--weights",)),
    "detect data missing": ("detect.py", ("--data", "no_such_data.yaml"), ("--data",)),
    "detect device": ("detect.py", ("--device", "gpu"), ("--device",)),
    "detect name empty": ("detect.py", ("--name", ""), ("--name",)),
    "detect save conf alone": ("detect.py", ("--save-conf",), ("--save-conf",)),
    "detect half on cpu": ("detect.py", ("--half", "--device", "cpu"), ("--half", "--device")),
    # export.py
    "export batch 0": ("export.py", ("--batch-size", "0"), ("--batch-size",)),
    "export img -1": ("export.py", ("--img", "-1"), ("--img",)),
    "export img three sizes": ("export.py", ("--imgsz", "64", "64", "64"), ("--imgsz",)),
    "export opset 7": ("export.py", ("--opset", "7"), ("--opset",)),
    "export opset 99": ("export.py", ("--opset", "99"), ("--opset",)),
    "export opset text": ("export.py", ("--opset", "latest"), ("--opset",)),
    "export include": ("export.py", ("--include", "onnx", "tflite"), ("--include",)),
    "export weights suffix": ("export.py", ("--weights", "best.onnx"), ("--weights",)),
    "export device": ("export.py", ("--device", "tpu"), ("--device",)),
    "export data missing": ("export.py", ("--data", "no_such_data.yaml"), ("--data",)),
    "export half on cpu": ("export.py", ("--half", "--device", "cpu"), ("--half", "--device")),
    "export half dynamic": ("export.py", ("--half", "--dynamic", "--device", "0"), ("--half", "--dynamic")),
    "export simplify without onnx": ("export.py", ("--simplify", "--include", "torchscript"), ("--simplify",)),
}


def command(case: str, project: Path) -> tuple[str, list[str]]:
    """The case's script and arguments; runs go under ``project`` should a check ever let one start."""
    script, args, _ = CASES[case]
    return script, [*args, *(["--project", str(project)] if script != "export.py" else [])]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[str, dict]:
    """Every case's exit code and output, from one warm process that forks a child per command line."""
    folder = tmp_path_factory.mktemp("cli")
    (folder / "cases.json").write_text(json.dumps([command(case, folder / "runs") for case in CASES]))
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "cli_prefork.py"), str(folder / "cases.json"),
                           str(folder / "results.json")], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return dict(zip(CASES, json.loads((folder / "results.json").read_text())))


@pytest.mark.parametrize("case", CASES)
def test_bad_option_is_one_error_line(outcomes, case):
    outcome, flags = outcomes[case], CASES[case][2]
    output = outcome["output"]
    assert outcome["rc"] == 2, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("ERROR:")]
    assert len(errors) == 1, output[-3000:]
    assert all(flag in errors[0] for flag in flags), errors[0]
    assert "YOLOv5 torch-" not in output, output[-3000:]  # stopped before choosing a device: nothing was started


def test_forked_run_matches_a_plain_subprocess(outcomes, tmp_path):
    for case in ("train batch 0", "detect conf 2"):
        script, args = command(case, tmp_path / "runs")
        plain = subprocess.run([sys.executable, script, *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                               timeout=300)
        assert plain.returncode == outcomes[case]["rc"] == 2
        error = [line for line in plain.stdout.splitlines() if line.startswith("ERROR:")]
        assert error == [line for line in outcomes[case]["output"].splitlines() if line.startswith("ERROR:")]
