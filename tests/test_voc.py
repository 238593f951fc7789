"""Pascal VOC -> YOLO conversion on real BCCD annotations (read-only shared copy)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import ROOT, SHARED
from utils.voc import convert_voc, voc_box_to_yolo

BCCD = SHARED / "datasets" / "bccd"
NAMES = ["RBC", "WBC", "Platelets"]


def test_pixel_convention_matches_upstream():
    """Upstream: x = ((xmin + xmax) / 2 - 1) / W, w = (xmax - xmin) / W (1-based corners, no +1 on the size)."""
    xywh, clipped = voc_box_to_yolo((260, 177, 491, 376), 640, 480)
    expected = (((260 + 491) / 2 - 1) / 640, ((177 + 376) / 2 - 1) / 480, (491 - 260) / 640, (376 - 177) / 480)
    assert np.allclose(xywh, expected, rtol=0, atol=1e-15) and not clipped
    xywh, clipped = voc_box_to_yolo((-9, 0, 700, 480), 640, 480)  # outside on 3 sides: clipped to the image
    assert clipped and np.allclose(xywh, (0.5, 479 / 2 / 480, 1.0, 479 / 480))
    assert voc_box_to_yolo((504, 337, 504, 337), 640, 480) == (None, False)  # zero size: degenerate
    assert voc_box_to_yolo((700, 10, 720, 20), 640, 480)[0] is None  # entirely outside: degenerate after clipping


@pytest.fixture
def mini_voc(tmp_path: Path) -> Path:
    """Real BCCD files: two images with a degenerate box each, one normal, one edited to stick out of the image."""
    src = tmp_path / "voc"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (src / sub).mkdir(parents=True)
    for image_id in ("BloodImage_00000", "BloodImage_00338", "BloodImage_00343"):
        shutil.copy(BCCD / "Annotations" / f"{image_id}.xml", src / "Annotations")
        shutil.copy(BCCD / "JPEGImages" / f"{image_id}.jpg", src / "JPEGImages")
    tree = ET.parse(BCCD / "Annotations" / "BloodImage_00000.xml")
    first_box = next(tree.getroot().iter("object")).find("bndbox")
    first_box.find("xmax").text = "700"  # beyond the 640-px width
    tree.write(src / "Annotations" / "edited.xml")
    shutil.copy(BCCD / "JPEGImages" / "BloodImage_00000.jpg", src / "JPEGImages" / "edited.jpg")
    (src / "ImageSets/Main/a.txt").write_text("BloodImage_00000\nBloodImage_00338\n")
    (src / "ImageSets/Main/b.txt").write_text("BloodImage_00343\nedited\n")
    return src


def _objects(xml: Path) -> int:
    return len(list(ET.parse(xml).getroot().iter("object")))


def test_convert_counts_clips_and_drops(mini_voc: Path, tmp_path: Path):
    dst = tmp_path / "yolo"
    stats = convert_voc(mini_voc, dst, {"train": "ImageSets/Main/a.txt", "val": "ImageSets/Main/b.txt"}, NAMES)
    n_objects = sum(_objects(f) for f in (mini_voc / "Annotations").iterdir())
    assert stats.images == {"train": 2, "val": 2}
    assert stats.degenerate == 2 and stats.clipped == 1 and stats.boxes == n_objects - 2
    assert sorted(p.name for p in (dst / "images" / "train").iterdir()) == ["BloodImage_00000.jpg",
                                                                             "BloodImage_00338.jpg"]
    rows = np.loadtxt(dst / "labels" / "train" / "BloodImage_00000.txt", ndmin=2)
    assert len(rows) == _objects(mini_voc / "Annotations" / "BloodImage_00000.xml")
    assert rows[0, 0] == 1 and np.allclose(rows[0, 1:], voc_box_to_yolo((260, 177, 491, 376), 640, 480)[0])
    assert set(rows[:, 0]) <= {0, 1, 2} and (rows[:, 1:] > 0).all() and (rows[:, 1:] <= 1).all()
    edited = np.loadtxt(dst / "labels" / "val" / "edited.txt", ndmin=2)
    assert np.isclose(edited[0, 1] + edited[0, 3] / 2, 1.0)  # right edge clipped to the image border
    assert (dst / "images" / "val" / "edited.jpg").read_bytes() == (mini_voc / "JPEGImages/edited.jpg").read_bytes()


def test_unknown_class_is_an_error(mini_voc: Path, tmp_path: Path):
    with pytest.raises(ValueError, match="BloodImage_00000.xml.*'WBC'"):
        convert_voc(mini_voc, tmp_path / "out", {"train": "ImageSets/Main/a.txt"}, ["RBC", "Platelets"])


def test_full_bccd_via_cli(tmp_path: Path):
    """`python -m utils.voc` on the whole dataset: 292/72 images, 4,888 boxes of which 2 are degenerate."""
    result = subprocess.run(
        [sys.executable, "-m", "utils.voc", str(BCCD), str(tmp_path / "bccd"), "--split",
         "train=ImageSets/Main/trainval.txt", "--split", "val=ImageSets/Main/test.txt", "--names", *NAMES],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "train 292, val 72; boxes written 4886, clipped 0, degenerate dropped 2" in result.stdout
    val_rows = sum(len(f.read_text().splitlines()) for f in (tmp_path / "bccd" / "labels" / "val").iterdir())
    assert val_rows == 945
