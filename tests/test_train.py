"""Training and validation end to end: overfitting a few images, train.py/val.py as subprocesses, upstream parity."""

from __future__ import annotations

import csv
import re
import subprocess
import sys

import pytest
import torch
import yaml

import val as validate
from models.yolo import DetectionModel
from tests.helpers import ROOT, SHARED
from utils.dataloaders import create_dataloader
from utils.datasets_check import check_dataset
from utils.loss import ComputeLoss
from utils.synthetic import generate_shapes

NO_AUGMENT = {"hsv_h": 0, "hsv_s": 0, "hsv_v": 0, "degrees": 0, "translate": 0, "scale": 0, "shear": 0,
              "perspective": 0, "flipud": 0, "fliplr": 0, "mosaic": 0, "mixup": 0, "copy_paste": 0}


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """8 train / 4 val synthetic images at 128 px and a data YAML for them."""
    root = tmp_path_factory.mktemp("tiny")
    generate_shapes(root / "shapes", n_train=8, n_val=4, imgsz=128, seed=1)
    names = {0: "circle", 1: "square", 2: "triangle", 3: "star", 4: "ellipse"}
    data = root / "tiny.yaml"
    data.write_text(yaml.safe_dump({"path": str(root / "shapes"), "train": "images/train", "val": "images/val",
                                    "names": names}))
    return data


def run_script(*args: str, timeout: int = 600) -> str:
    out = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout + out.stderr


def test_overfits_a_few_images(tiny_data):
    """Training on 4 images without augmentation must fit them: catches bugs in targets, loss and decoding."""
    torch.manual_seed(0)
    data = check_dataset(tiny_data)
    hyp = yaml.safe_load((ROOT / "data/hyps/hyp.scratch-low.yaml").read_text()) | NO_AUGMENT
    loader, dataset = create_dataloader(data["val"], 128, 4, 32, hyp=hyp, augment=False, workers=0, shuffle=True)
    model = DetectionModel("yolov5n.yaml", nc=5, verbose=False)
    hyp.update(box=0.05, cls=0.5 * 5 / 80, obj=1.0 * (128 / 640) ** 2)
    model.hyp, model.names = hyp, data["names"]
    compute_loss = ComputeLoss(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    val_loader = create_dataloader(data["val"], 128, 4, 32, rect=True, pad=0.5, workers=0)[0]
    map50 = 0.0
    for step in range(1, 301):
        model.train()
        for imgs, targets, _, _ in loader:
            loss, _ = compute_loss(model(imgs.float() / 255), targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if step % 50 == 0:
            (_, _, map50, _, *_), _, _ = validate.run(data, model=model.eval(), dataloader=val_loader, plots=False)
            if map50 >= 0.9:
                break
    assert map50 >= 0.9, f"mAP@0.5 {map50:.3f} after {step} steps"


def test_train_and_val_scripts_one_epoch(tiny_data, tmp_path):
    out = run_script("train.py", "--cfg", "yolov5n.yaml", "--data", str(tiny_data), "--img", "64", "--epochs", "1",
                     "--batch-size", "4", "--workers", "0", "--project", str(tmp_path), "--name", "exp")
    run = tmp_path / "exp"
    assert "1 epochs completed" in out
    for name in ("weights/best.pt", "weights/last.pt", "results.csv", "results.png", "hyp.yaml", "opt.yaml",
                 "labels.jpg", "train_batch0.jpg", "confusion_matrix.png", "val_batch0_pred.jpg"):
        assert (run / name).is_file(), name
    assert list(run.glob("events.out.tfevents.*"))
    header = next(csv.reader(open(run / "results.csv")))
    assert [h.strip() for h in header][:8] == ["epoch", "train/box_loss", "train/obj_loss", "train/cls_loss",
                                               "metrics/precision", "metrics/recall", "metrics/mAP_0.5",
                                               "metrics/mAP_0.5:0.95"]
    ckpt = torch.load(run / "weights/best.pt", weights_only=True)
    assert ckpt["names"][3] == "star" and ckpt["optimizer"] is None  # stripped at the end
    out = run_script("val.py", "--weights", str(run / "weights/best.pt"), "--data", str(tiny_data), "--img", "64",
                     "--project", str(tmp_path), "--name", "val", "--save-txt", "--save-json", "--verbose")
    assert re.search(r"^\s+all\s+4\s+\d+", out, re.M)
    assert (tmp_path / "val" / "best_predictions.json").is_file()


def test_val_reproduces_upstream_figures_on_bccd():
    """Our val.py on upstream's own BCCD checkpoint matches upstream's val.py figures (fixture) within 0.003."""
    reference = (SHARED / "fixtures" / "upstream_yolov5n_bccd_val.txt").read_text()
    up = re.search(r"^\s+all\s+72\s+945\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)", reference, re.M)
    results, _, _ = validate.run(ROOT / "data/BCCD.yaml", weights=SHARED / "fixtures" / "upstream_yolov5n_bccd.pt",
                                 imgsz=320, batch_size=8, device="cpu", plots=False, workers=2,
                                 project=ROOT / "runs/test-val", exist_ok=True)
    mp, mr, map50, map5095 = results[:4]
    assert abs(map50 - float(up[3])) <= 0.003
    assert abs(map5095 - float(up[4])) <= 0.003


def test_evolve_two_generations(tiny_data, tmp_path):
    run_script("train.py", "--cfg", "yolov5n.yaml", "--data", str(tiny_data), "--img", "64", "--epochs", "1",
               "--batch-size", "4", "--workers", "0", "--evolve", "2", "--project", str(tmp_path), "--name", "evo",
               "--noautoanchor")
    rows = (tmp_path / "evo" / "evolve.csv").read_text().splitlines()
    assert len(rows) == 3 and "lr0" in rows[0]
    best = yaml.safe_load((tmp_path / "evo" / "hyp_evolve.yaml").read_text())
    assert 1e-5 <= best["lr0"] <= 0.1 and "mosaic" in best


def test_fine_tune_from_upstream_checkpoint(tiny_data, tmp_path):
    out = run_script("train.py", "--weights", str(SHARED / "fixtures" / "upstream_yolov5n_bccd.pt"), "--data",
                     str(tiny_data), "--img", "64", "--epochs", "1", "--batch-size", "4", "--workers", "0",
                     "--project", str(tmp_path), "--name", "ft", "--noplots")
    # every tensor but the 3 class-dependent head convs (weights + biases) transfers to the 5-class model
    found = re.search(r"Transferred (\d+)/(\d+) items", out)
    assert found and int(found[1]) == int(found[2]) - 6
    assert torch.load(tmp_path / "ft" / "weights" / "last.pt", weights_only=True)["nc"] == 5
