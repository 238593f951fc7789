"""hubconf.py through torch.hub.load(source='local'): custom weights, named YAML models, the Detections API."""

from __future__ import annotations

import importlib.util
import logging
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from export import export_metadata, export_onnx, prepare_for_export
from tests.helpers import ROOT
from tests.test_detect import trained_checkpoint
from models.backend import SPEED_PATTERN, AutoShape, Detections
from utils.boxes import xyxy2xywh
from models.loading import build_model
from utils.checkpoint import load_checkpoint
from utils.general import LOGGER, UserInputError
from utils.plots import crop_region

IMAGES = [str(p) for p in sorted((ROOT / "data/images").glob("*.jpg"))]
SIZE = 320


def hub_load(model: str, **kwargs):
    return torch.hub.load(str(ROOT), model, source="local", trust_repo=True, **kwargs)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return trained_checkpoint(tmp_path_factory.mktemp("hub") / "best.pt")


@pytest.fixture(scope="module")
def model(weights) -> AutoShape:
    return hub_load("custom", path=str(weights), _verbose=False)


@pytest.fixture(scope="module")
def results(model) -> Detections:
    return model(IMAGES[:2], size=SIZE)


def test_detections_api(results: Detections, tmp_path: Path):
    assert len(results) == 2 and results.files == ["shapes1.jpg", "shapes2.jpg"]
    assert all(len(d) > 0 and d.shape[1] == 6 for d in results.xyxy)
    gain = torch.tensor([320, 320, 320, 320, 1, 1])
    for xyxy, xywh, xyxyn, xywhn in zip(results.xyxy, results.xywh, results.xyxyn, results.xywhn):
        torch.testing.assert_close(xywh[:, :4], xyxy2xywh(xyxy[:, :4]))
        torch.testing.assert_close(xywh[:, 4:], xyxy[:, 4:])  # confidence and class columns carried over
        torch.testing.assert_close(xyxyn * gain, xyxy)
        torch.testing.assert_close(xywhn * gain, xywh)
        assert (xyxy[:, 4] >= 0.25).all() and (xyxy[:, :4] >= 0).all() and (xyxy[:, :4] <= 320).all()
    frame = results.pandas().xyxy[0]
    assert list(frame.columns) == ["xmin", "ymin", "xmax", "ymax", "confidence", "class", "name"]
    assert len(frame) == len(results.xyxy[0])
    assert set(frame["name"]) <= {"RBC", "WBC", "Platelets"}
    np.testing.assert_allclose(frame[["xmin", "ymin", "xmax", "ymax"]].to_numpy(), results.xyxy[0][:, :4].numpy(),
                               rtol=1e-6)
    assert list(results.pandas().xywhn[1].columns)[:4] == ["xcenter", "ycenter", "width", "height"]
    singles = results.tolist()
    assert [len(s) for s in singles] == [1, 1] and torch.equal(singles[1].xyxy[0], results.xyxy[1])
    text = str(results)
    assert text.startswith("image 1/2: 320x320 ") and f"input (2, 3, {SIZE}, {SIZE})" in text
    speed = SPEED_PATTERN.search(text)
    assert speed and tuple(map(float, speed.groups())) == tuple(round(t, 1) for t in results.t)
    saved = results.save(save_dir=tmp_path / "exp")
    assert sorted(p.name for p in saved.iterdir()) == ["shapes1.jpg", "shapes2.jpg"]
    assert cv2.imread(str(saved / "shapes1.jpg")).shape == (320, 320, 3)


def test_detections_crop_and_show(results: Detections, tmp_path: Path, monkeypatch, caplog):
    crops = results.crop(save_dir=tmp_path / "exp")
    assert len(crops) == sum(len(d) for d in results.xyxy) > 0
    first = crops[0]
    assert set(first) == {"box", "conf", "cls", "label", "im"}
    torch.testing.assert_close(torch.cat((first["box"], first["conf"][None], first["cls"][None])), results.xyxy[0][0])
    assert first["label"] == f"{results.names[int(first['cls'])]} {float(first['conf']):.2f}"
    rows, columns = crop_region(first["box"].tolist(), results.ims[0].shape[:2])  # what detect.py --save-crop cuts
    np.testing.assert_array_equal(first["im"], results.ims[0][rows, columns])  # RGB, like results.ims
    saved = sorted((tmp_path / "exp" / "crops").rglob("*.jpg"))
    assert Counter(p.parent.name for p in saved) == Counter(results.names[int(c["cls"])] for c in crops)
    assert len(results.crop(save=False, save_dir=tmp_path / "unsaved")) == len(crops)
    assert not (tmp_path / "unsaved").exists()

    shown = []
    monkeypatch.setattr(Image.Image, "show", lambda im, title=None: shown.append((title, im.size)))
    for variable in ("DISPLAY", "WAYLAND_DISPLAY"):
        monkeypatch.delenv(variable, raising=False)
    LOGGER.addHandler(caplog.handler)  # the yolov5 logger does not propagate to the root logger
    try:
        results.show()  # no display: one warning, no window, no exception
    finally:
        LOGGER.removeHandler(caplog.handler)
    assert not shown and "no display available" in caplog.text
    monkeypatch.setenv("DISPLAY", ":0")
    results.show()
    assert shown == [(name, (SIZE, SIZE)) for name in results.files]


def test_input_forms_give_the_same_boxes(model: AutoShape, results: Detections):
    """A file path, a PIL image, an RGB array (cv2's BGR flipped) and a CHW array are the same image."""
    reference = model(IMAGES[0], size=SIZE).xyxy[0]
    torch.testing.assert_close(reference, results.xyxy[0], atol=1e-3, rtol=1e-5)  # batch of 2 vs 1
    rgb = cv2.imread(IMAGES[0])[..., ::-1]
    for image in (Image.open(IMAGES[0]), rgb, np.ascontiguousarray(rgb.transpose(2, 0, 1))):
        torch.testing.assert_close(model(image, size=SIZE).xyxy[0], reference)
    bgr = model(cv2.imread(IMAGES[0]), size=SIZE).xyxy[0]
    assert bgr.shape != reference.shape or not torch.allclose(bgr, reference)
    grey = model(cv2.imread(IMAGES[0], cv2.IMREAD_GRAYSCALE), size=SIZE)
    assert grey.ims[0].shape == (320, 320, 3)


def test_tensors_pass_through_raw(model: AutoShape):
    y = model(torch.zeros(1, 3, 64, 64))
    assert isinstance(y, torch.Tensor) and y.shape == (1, 3 * (8 * 8 + 4 * 4 + 2 * 2), 8)


def test_custom_onnx_matches_pytorch(weights: Path, results: Detections, tmp_path: Path):
    pytorch = build_model(load_checkpoint(weights)).eval().fuse()
    x = torch.zeros(1, 3, SIZE, SIZE)
    folded = prepare_for_export(pytorch, x)
    file = export_onnx(folded, x, tmp_path / "best.onnx", export_metadata(folded, x, dynamic=False))
    onnx_results = hub_load("custom", path=str(file), _verbose=False)(IMAGES[:2], size=SIZE)
    for a, b in zip(onnx_results.xyxy, results.xyxy):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-4)


def test_every_model_yaml_is_an_entry_point():
    spec = importlib.util.spec_from_file_location("hubconf_listing", ROOT / "hubconf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    listed = {name for name in dir(module) if callable(getattr(module, name)) and not name.startswith("_")}
    assert listed == {p.stem for p in (ROOT / "models").glob("*.yaml")} | {"custom"}


def test_named_model_random_init(caplog):
    LOGGER.addHandler(caplog.handler)  # the yolov5 logger does not propagate to the root logger
    try:
        with caplog.at_level(logging.INFO, logger=LOGGER.name):
            model = hub_load("yolov5n", pretrained=False, classes=3)
    finally:
        LOGGER.removeHandler(caplog.handler)
    assert "yolov5n: randomly initialized weights (pretrained=False)" in caplog.text
    assert isinstance(model, AutoShape) and len(model.names) == 3
    assert len(model(IMAGES[0], size=128)) == 1
    bare = hub_load("yolov5s_RepVGG", pretrained=False, autoshape=False, _verbose=False)
    assert bare.yaml["nc"] == 80 and bare.training


def test_named_model_pretrained_needs_local_weights(weights: Path, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserInputError, match=r"yolov5n: pretrained=True needs local weights yolov5n\.pt"):
        hub_load("yolov5n", _verbose=False)
    (tmp_path / "yolov5n.pt").write_bytes(weights.read_bytes())
    assert hub_load("yolov5n", _verbose=False).names == {0: "RBC", 1: "WBC", 2: "Platelets"}
    two_classes = hub_load("yolov5n", classes=2, autoshape=False, _verbose=False)
    assert two_classes.yaml["nc"] == 2
