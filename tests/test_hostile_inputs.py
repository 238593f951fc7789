"""Hostile input through train.py, val.py and detect.py.

Contract: no traceback, ever, for a user's files. A broken image or label row is skipped with one warning line that
names the file (and the scan summary counts it); an unusable input (a malformed data or model YAML, a damaged
checkpoint, a dataset with nothing to train on, weights for other classes) stops the script with exit code 2 and one
"ERROR: ..." line naming the file and key; a diverging loss stops training with exit code 3, keeping the last good
checkpoint. Every dataset path here contains a space and a non-ASCII character.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
import yaml

import train
import val
from models.yolo import DetectionModel, ModelConfigError
from tests.helpers import ROOT
from utils.checkpoint import CheckpointError, load_checkpoint
from utils.dataloaders import create_dataloader
from utils.datasets_check import DataConfigError, check_dataset
from utils.general import UserInputError
from utils.synthetic import CLASS_NAMES, generate_shapes

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "NO_COLOR": "1"}
BOX = "0 0.5 0.5 0.25 0.25\n"
LABEL_PROBLEMS = {  # label file stem -> (its rows after one good row, what the warning must say)
    "train_00004": ("1 0.5 0.5\n", ["line 2 ignored: 3 columns"]),
    "train_00005": ("1 nan 0.5 0.1 0.1\n", ["line 2 ignored: non-finite value"]),
    "train_00006": ("1 -0.2 0.5 0.1 0.1\n-1 0.5 0.5 0.1 0.1\n", ["line 2 ignored: coordinates outside [0, 1]",
                                                                "line 3 ignored: class -1 is not"]),
    "train_00007": ("1 0.5 1.7 0.1 0.1\n", ["line 2 ignored: coordinates outside [0, 1]"]),
    "train_00008": ("99 0.5 0.5 0.1 0.1\n", ["1 labels with class id >= nc=5 dropped"]),
    "train_00009": (BOX + BOX, ["2 duplicate labels removed"]),
}
CORRUPT = ("zero.jpg", "garbage.jpg", "train_00001.jpg", "truncated.png")
ODD_BUT_VALID = ("gray.png", "rgba.png", "deep16.png", "huge.jpg", "bild ü 1.jpg")
LABEL_DIRECTORY = "folder label"  # an image whose label path labels/<stem>.txt is a directory
SUMMARY = "16 images (2 without boxes), 5 corrupt"  # 21 files: 4 corrupt, 1 label directory; of 16 usable, 1 without,
# 1 with empty labels
REASONS = ("Scan summary: left out: corrupt image 4, label path is a directory 1; labels repaired: rows rejected 4, "
           "duplicate rows removed 1, class ids >= nc dropped 1; converted to 8-bit colour: 3")


def run(*args, timeout: int = 300) -> SimpleNamespace:
    out = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=ENV, capture_output=True, text=True,
                         timeout=timeout)
    return SimpleNamespace(rc=out.returncode, stdout=out.stdout, log=out.stdout + out.stderr)


def error_line(result: SimpleNamespace, rc: int = 2) -> str:
    """The one 'ERROR:' line of a run that must fail cleanly with exit code ``rc``."""
    assert result.rc == rc, result.log[-3000:]
    assert "Traceback" not in result.log, result.log[-3000:]
    lines = [line for line in result.log.splitlines() if line.startswith("ERROR:")]
    assert len(lines) == 1, result.log[-3000:]
    return lines[0]


def lines_naming(text: str, name: str) -> list[str]:
    return [line for line in text.splitlines() if name in line]


def write_data_yaml(file: Path, root: Path, **overrides) -> Path:
    cfg = {"path": str(root), "train": "images/train", "val": "images/val", "names": list(CLASS_NAMES), **overrides}
    file.write_text(yaml.safe_dump({k: v for k, v in cfg.items() if v is not None}, allow_unicode=True),
                    encoding="utf-8")
    return file


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> SimpleNamespace:
    """A dataset whose train split holds every kind of broken or odd image and label file; val is clean."""
    base = tmp_path_factory.mktemp("hostile")
    root = base / "data set ü"
    generate_shapes(root, n_train=12, n_val=4, imgsz=64, seed=5)
    images, labels = root / "images" / "train", root / "labels" / "train"
    for f in labels.iterdir():  # every image starts with at least one box, whatever the generator drew
        f.write_text(f.read_text() or BOX)
    photo = cv2.imread(str(images / "train_00003.jpg"))
    odd = {"gray.png": cv2.cvtColor(photo, cv2.COLOR_BGR2GRAY), "rgba.png": cv2.cvtColor(photo, cv2.COLOR_BGR2BGRA),
           "deep16.png": photo.astype(np.uint16) * 257, "huge.jpg": cv2.resize(photo, (6000, 4000)),
           "bild ü 1.jpg": photo}
    for name, pixels in odd.items():
        cv2.imencode(Path(name).suffix, pixels)[1].tofile(str(images / name))
        shutil.copy(labels / "train_00003.txt", labels / f"{Path(name).stem}.txt")
    (images / "zero.jpg").write_bytes(b"")
    (images / "garbage.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4)
    jpeg = (images / "train_00001.jpg").read_bytes()
    (images / "train_00001.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    png = cv2.imencode(".png", photo)[1].tobytes()
    (images / "truncated.png").write_bytes(png[: len(png) // 2])
    shutil.copy(labels / "train_00003.txt", labels / "truncated.txt")
    for stem, (rows, _) in LABEL_PROBLEMS.items():
        (labels / f"{stem}.txt").write_text(BOX + rows)
    (labels / "train_00010.txt").write_text("")
    shutil.copy(images / "train_00003.jpg", images / f"{LABEL_DIRECTORY}.jpg")
    (labels / f"{LABEL_DIRECTORY}.txt").mkdir()
    (labels / "train_00011.txt").unlink()
    return SimpleNamespace(root=root, images=images, yaml=write_data_yaml(base / "hostile ü.yaml", root))


@pytest.fixture(scope="module")
def trained(hostile, tmp_path_factory) -> SimpleNamespace:
    """One epoch of train.py on the hostile dataset."""
    project = tmp_path_factory.mktemp("runs")
    result = run("train.py", "--cfg", "yolov5n.yaml", "--data", hostile.yaml, "--img", "64", "--epochs", "1",
                 "--batch-size", "4", "--workers", "0", "--noplots", "--project", project, "--name", "exp")
    result.best = project / "exp" / "weights" / "best.pt"
    return result


@pytest.fixture(scope="module")
def clean_data(tmp_path_factory) -> Path:
    """4 train / 2 val clean images (2 batches of 2 per epoch)."""
    base = tmp_path_factory.mktemp("clean ü")
    generate_shapes(base / "shapes", n_train=4, n_val=2, imgsz=64, seed=6)
    return write_data_yaml(base / "clean.yaml", base / "shapes")


# ---------------------------------------------------------------------------------------------- images and labels


def test_train_skips_broken_images_and_label_rows_one_line_each(trained):
    assert trained.rc == 0 and "Traceback" not in trained.log, trained.log[-3000:]
    assert re.search(rf"train: Scanning .*data set ü.*{re.escape(SUMMARY)}", trained.log)
    for name in CORRUPT:
        lines = lines_naming(trained.stdout, f"train{os.sep}{name}")
        assert len(lines) == 1 and "ignoring corrupt image" in lines[0], (name, lines)
    for stem, (_, reasons) in LABEL_PROBLEMS.items():
        lines = lines_naming(trained.stdout, f"{stem}.txt")
        assert len(lines) == 1 and all(r in lines[0] for r in reasons), (stem, lines)
    for name in ODD_BUT_VALID:  # grayscale, RGBA, 16-bit, 6000x4000 and a non-ASCII name are all fine
        assert not lines_naming(trained.stdout, name), name
    lines = lines_naming(trained.stdout, f"{LABEL_DIRECTORY}.txt")  # named like a bad label file
    assert len(lines) == 1 and "is a directory, not a label file; image left out" in lines[0], lines
    assert f"train: {REASONS}" in trained.stdout  # every skipped or repaired file counted under its reason
    assert Path(trained.best).is_file()  # the epoch ran to its end and saved a checkpoint


def test_val_counts_the_same_problems(hostile, trained):
    result = run("val.py", "--weights", trained.best, "--data", hostile.yaml, "--task", "train", "--img", "64",
                 "--project", Path(trained.best).parents[2], "--name", "val ü")
    assert result.rc == 0 and "Traceback" not in result.log, result.log[-3000:]
    assert SUMMARY in result.log
    assert re.search(r"^\s+all\s+16\s+\d+", result.stdout, re.M)  # the 16 usable images


def test_val_rejects_weights_trained_on_other_classes(hostile, trained, tmp_path):
    other = write_data_yaml(tmp_path / "three.yaml", hostile.root, names=["a", "b", "c"])
    line = error_line(run("val.py", "--weights", trained.best, "--data", other, "--img", "64",
                          "--project", tmp_path))
    assert str(trained.best) in line and "5 classes" in line and "nc=3" in line


@pytest.mark.parametrize("case", ["empty folder", "only corrupt images", "no labels at all"])
def test_dataset_with_nothing_to_train_on_is_a_user_error(hostile, tmp_path, case):
    images = tmp_path / "set ü" / "images"
    images.mkdir(parents=True)
    if case == "only corrupt images":
        (images / "zero.jpg").write_bytes(b"")
    elif case == "no labels at all":
        shutil.copy(hostile.images / "gray.png", images)
    with pytest.raises(UserInputError, match=re.escape(str(images))):
        create_dataloader(images, 64, 2, 32, hyp={}, augment=True, workers=0)


# ------------------------------------------------------------------------------------------------------ data YAMLs

DATA_YAML_CASES = {  # overrides of a valid data YAML -> what the one-line error must name
    "names missing": ({"names": None}, "'names' is missing"),
    "train missing": ({"train": None}, "'train' is missing"),
    "names not a list": ({"names": 5}, "'names' must be"),
    "nc not a number": ({"nc": "five"}, "'nc' must be a positive integer"),
    "nc disagrees": ({"nc": 3}, "'nc' is 3 but 'names' has 5"),
    "train not a path": ({"train": 3}, "'train' must be a path"),
    "val does not exist": ({"val": "images/nowhere"}, "'val' path"),
    "path not a folder": ({"path": [1]}, "'path' must be a folder"),
}


@pytest.mark.parametrize("case", DATA_YAML_CASES)
def test_malformed_data_yaml_names_file_and_key(hostile, tmp_path, case):
    overrides, message = DATA_YAML_CASES[case]
    file = write_data_yaml(tmp_path / "bad data.yaml", hostile.root, **overrides)
    with pytest.raises(DataConfigError) as e:
        check_dataset(file)
    assert str(file) in str(e.value) and message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("text", ["path: [unclosed\nnames: x\n", "- just\n- a list\n", "\x00binary"])
def test_unparsable_data_yaml_names_file(tmp_path, text):
    file = tmp_path / "bad data.yaml"
    file.write_text(text)
    with pytest.raises(DataConfigError, match=re.escape(str(file))):
        check_dataset(file)


# ----------------------------------------------------------------------------------------------------- model YAMLs

MODEL_YAML_CASES = {  # (section, row index, new row) -> what the one-line error must name
    "unknown module": (("backbone", 1, [-1, 1, "Conv9", [128, 3, 2]]), "backbone row 1 (layer 1): unknown module"),
    "from after itself": (("backbone", 1, [3, 1, "Conv", [128, 3, 2]]), "'from' index 3 refers to no earlier"),
    "from out of range": (("head", 2, [[-1, 40], 1, "Concat", [1]]), "head row 2 (layer 12): 'from' index 40"),
    "from not a number": (("backbone", 1, ["x", 1, "Conv", [128, 3, 2]]), "'from' must be an integer"),
    "number not a number": (("backbone", 2, [-1, "three", "C3", [128]]), "'number' must be a positive integer"),
    "args not a list": (("backbone", 1, [-1, 1, "Conv", 128]), "args must be a list"),
    "channels not a number": (("backbone", 1, [-1, 1, "Conv", ["wide", 3, 2]]), "output channels args[0]"),
    "kernel not a number": (("backbone", 1, [-1, 1, "Conv", [128, "k", 2]]), "cannot build Conv"),
    "row not a row": (("head", 0, "Conv"), "head row 0 (layer 10): expected [from, number, module, args]"),
}


@pytest.mark.parametrize("case", MODEL_YAML_CASES)
def test_malformed_model_yaml_names_file_and_row(tmp_path, case):
    (section, index, row), message = MODEL_YAML_CASES[case]
    cfg = yaml.safe_load((ROOT / "models" / "yolov5n.yaml").read_text())
    cfg[section][index] = row
    file = tmp_path / "bad model.yaml"
    file.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ModelConfigError) as e:
        DetectionModel(file, verbose=False)
    assert str(e.value).startswith("bad model.yaml: ") and message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("cfg", [{"nc": 5, "head": []}, {"nc": "x", "backbone": [], "head": []}, ["not", "a", "dict"]])
def test_model_yaml_with_wrong_top_level_is_a_model_error(tmp_path, cfg):
    file = tmp_path / "bad model.yaml"
    file.write_text(yaml.safe_dump(cfg))
    with pytest.raises(UserInputError, match="bad model.yaml"):
        DetectionModel(file, verbose=False)


def test_train_script_reports_model_yaml_error_in_one_line(clean_data, tmp_path):
    cfg = yaml.safe_load((ROOT / "models" / "yolov5n.yaml").read_text())
    cfg["head"][3] = [-1, 1, "C4", [512, False]]
    file = tmp_path / "my model ü.yaml"
    file.write_text(yaml.safe_dump(cfg))
    line = error_line(run("train.py", "--cfg", file, "--data", clean_data, "--img", "64", "--project", tmp_path))
    assert line == "ERROR: my model ü.yaml: head row 3 (layer 13): unknown module 'C4'"


# ----------------------------------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("content", ["zero bytes", "text", "random bytes", "half a checkpoint", "a list"])
def test_damaged_checkpoint_is_a_checkpoint_error(trained, tmp_path, content):
    file = tmp_path / "w ü.pt"
    good = Path(trained.best).read_bytes()
    data = {"zero bytes": b"", "text": b"hello world\n", "random bytes": np.random.default_rng(0).bytes(4096),
            "half a checkpoint": good[: len(good) // 2]}
    if content == "a list":
        torch.save([1, 2], file)
    else:
        file.write_bytes(data[content])
    with pytest.raises(CheckpointError, match=re.escape(str(file))):
        load_checkpoint(file)
    with pytest.raises(CheckpointError, match=re.escape(str(file))):  # --resume path.pt
        train.prepare_resume(SimpleNamespace(resume=str(file)))


def test_val_reports_damaged_weights_as_checkpoint_error(clean_data, trained, tmp_path):
    file = tmp_path / "half ü.pt"
    good = Path(trained.best).read_bytes()
    file.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match=re.escape(f"{file}: not a readable checkpoint")):
        val.run(clean_data, weights=file, imgsz=64, device="cpu", project=tmp_path)


# ----------------------------------------------------------------------------------------------- diverging losses

# train.py as __main__ with the loss of the 3rd training batch (epoch 1, batch 0) replaced by NaN
NAN_AT_THIRD_BATCH = """
import runpy, sys
import torch
from utils import loss
compute_loss, calls = loss.ComputeLoss.__call__, []
def nan_loss(self, *args, **kwargs):
    total, items = compute_loss(self, *args, **kwargs)
    if torch.is_grad_enabled():
        calls.append(1)
        if len(calls) == 3:
            total = total * float("nan")
    return total, items
loss.ComputeLoss.__call__ = nan_loss
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path("train.py", run_name="__main__")
"""


def test_nan_loss_stops_training_and_keeps_last_good_checkpoint(clean_data, tmp_path):
    result = run("-c", NAN_AT_THIRD_BATCH, "--cfg", "yolov5n.yaml", "--data", clean_data, "--img", "64", "--epochs",
                 "3", "--batch-size", "2", "--workers", "0", "--noplots", "--project", tmp_path, "--name", "exp")
    last = tmp_path / "exp" / "weights" / "last.pt"
    line = error_line(result, rc=3)
    assert line.startswith("ERROR: training stopped: loss is nan at epoch 1, batch 0")
    assert f"the last good checkpoint is kept in {last}" in line
    ckpt = load_checkpoint(last)
    assert ckpt["epoch"] == 0 and ckpt["optimizer"] is not None  # not stripped: --resume can continue from it
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_huge_learning_rate_stops_before_saving_diverged_weights(clean_data, tmp_path):
    hyp = yaml.safe_load((ROOT / "data/hyps/hyp.scratch-low.yaml").read_text()) | {"lr0": 1e30}
    (tmp_path / "hyp.yaml").write_text(yaml.safe_dump(hyp))
    result = run("train.py", "--cfg", "yolov5n.yaml", "--data", clean_data, "--img", "64", "--epochs", "2",
                 "--batch-size", "2", "--workers", "0", "--noplots", "--hyp", tmp_path / "hyp.yaml",
                 "--project", tmp_path, "--name", "exp")
    line = error_line(result, rc=3)
    assert "at epoch 0; no checkpoint was saved" in line and "lower --hyp lr0" in line
    assert not (tmp_path / "exp" / "weights" / "last.pt").exists()


# ------------------------------------------------------------------------------------------------------- detect.py


def test_detect_skips_unreadable_images_with_one_warning_each(hostile, trained, tmp_path):
    (hostile.images / "broken.mp4").write_bytes(b"not a video")  # an unreadable video is skipped too
    n_files = len(list(hostile.images.iterdir()))
    try:
        result = run("detect.py", "--weights", trained.best, "--source", hostile.images, "--img", "64",
                     "--project", tmp_path, "--name", "exp ü")
    finally:
        (hostile.images / "broken.mp4").unlink()
    assert result.rc == 0 and "Traceback" not in result.log, result.log[-3000:]
    unreadable = (*CORRUPT, "broken.mp4")  # truncated JPEG and PNG files do not decode either
    for name in unreadable:
        assert len(lines_naming(result.stdout, f"{name}: ")) == 1, name
        assert not (tmp_path / "exp ü" / name).exists()
    assert f"{len(unreadable)} of {n_files} files" in result.stdout and "unreadable and skipped" in result.stdout
    for name in ODD_BUT_VALID:  # grayscale, RGBA, 16-bit, 6000x4000, non-ASCII name: all detected on
        assert (tmp_path / "exp ü" / name).is_file(), name


def test_detect_reports_missing_source_in_one_line(trained, tmp_path):
    missing = tmp_path / "nowhere ü"
    line = error_line(run("detect.py", "--weights", trained.best, "--source", missing, "--project", tmp_path))
    assert str(missing) in line
