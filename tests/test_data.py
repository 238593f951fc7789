"""Dataset scanning, label checks and cache, data YAML validation, dataloader behaviour, inference loaders."""

from __future__ import annotations

import glob
import json
import math
import os
import random
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from tests.helpers import ROOT, SHARED
from utils.dataloaders import (
    DatasetError,
    InfiniteDataLoader,
    LoadImages,
    LoadImagesAndLabels,
    LoadStreams,
    create_dataloader,
    img2label_paths,
    is_stream_source,
    parse_labels,
)
from utils.datasets_check import DataConfigError, check_dataset
from utils.general import LOGGER

HYP = yaml.safe_load((ROOT / "data" / "hyps" / "hyp.scratch-low.yaml").read_text())
BCCD = SHARED / "datasets" / "bccd"


def _jpeg(path: Path, hw=(48, 64), value=90, exif_orientation: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(np.full((*hw, 3), value, np.uint8))
    if exif_orientation:
        exif = im.getexif()
        exif[0x0112] = exif_orientation
        im.save(path, exif=exif)
    else:
        im.save(path)
    return path


def _label(image: Path, text: str) -> Path:
    label = Path(img2label_paths([str(image)])[0])
    label.parent.mkdir(parents=True, exist_ok=True)
    label.write_text(text, encoding="utf-8")
    return label


GOOD = "0 0.5 0.5 0.2 0.2\n"


@pytest.fixture
def odd_dataset(tmp_path: Path) -> Path:
    """15 images: 10 with label files (1 empty), 1 without, 4 corrupt; some with bad label rows."""
    images = tmp_path / "ds" / "images" / "train"
    _label(_jpeg(images / "good.jpg"), GOOD + "1 0.3 0.3 0.1 0.1\n")
    truncated = _jpeg(images / "truncated.jpg", value=10)
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    _label(truncated, GOOD)
    (images / "zero.jpg").write_bytes(b"")
    (images / "garbage.png").write_bytes(os.urandom(300))
    cv2.imwrite(str(images / "gray.png"), np.full((40, 50), 77, np.uint8))
    _label(images / "gray.png", GOOD)
    rgba = np.zeros((40, 50, 4), np.uint8)
    rgba[...] = (10, 20, 30, 0)  # BGRA, fully transparent
    cv2.imwrite(str(images / "rgba.png"), rgba)
    _label(images / "rgba.png", GOOD)
    cv2.imwrite(str(images / "deep16.png"), np.full((40, 50, 3), 51400, np.uint16))  # 51400 >> 8 = 200
    _label(images / "deep16.png", GOOD)
    _label(_jpeg(images / "rotated.jpg", hw=(20, 60), exif_orientation=6), GOOD)
    bad_rows = ["0 0.5 0.5 0.2", "0 nan 0.5 0.2 0.2", "0 1.5 0.5 0.2 0.2", "-1 0.5 0.5 0.2 0.2",
                "0 -0.1 0.5 0.2 0.2", "1.5 0.5 0.5 0.2 0.2", "a 0.5 0.5 0.2 0.2", "7 0.5 0.5 0.2 0.2", GOOD]
    _label(_jpeg(images / "badrows.jpg"), "\n".join(bad_rows))
    _label(_jpeg(images / "dupes.jpg"), GOOD + GOOD + "2 0.4 0.4 0.1 0.1\n")
    _label(_jpeg(images / "empty.jpg"), "")
    _jpeg(images / "nolabel.jpg")
    _label(_jpeg(images / "sub dir ünï [x]" / "名前 with space.jpg"), GOOD)
    _label(_jpeg(images / "polygon.jpg"), "2 0.1 0.2 0.5 0.2 0.3 0.6\n")
    cv2.imwrite(str(images / "tiny.png"), np.zeros((5, 5, 3), np.uint8))
    return images


def _dataset(path, **kwargs) -> LoadImagesAndLabels:
    return LoadImagesAndLabels(path, img_size=64, batch_size=4, **kwargs)


def _by_name(ds: LoadImagesAndLabels, name: str) -> int:
    return next(i for i, f in enumerate(ds.im_files) if f.endswith(name))


@pytest.fixture
def log(caplog, monkeypatch):
    """Capture the 'yolov5' logger's records exactly once, whatever its propagation setting."""
    monkeypatch.setattr(LOGGER, "propagate", False)
    LOGGER.addHandler(caplog.handler)
    yield caplog
    LOGGER.removeHandler(caplog.handler)


def test_scan_counts_and_label_checks(odd_dataset: Path, log):
    log.set_level("INFO", logger=LOGGER.name)
    ds = _dataset(odd_dataset, nc=3)
    cache = json.loads((odd_dataset.parents[1] / "labels" / "train.cache").read_text(encoding="utf-8"))
    assert cache["counts"] == {"found": 10, "missing": 1, "empty": 1, "corrupt": 4}
    assert cache["reasons"] == {"corrupt image": 4, "rows rejected": 1, "duplicate rows removed": 1,
                                "converted to 8-bit colour": 3}  # gray, rgba and deep16
    assert "Scan summary: left out: corrupt image 4; labels repaired: rows rejected 1, duplicate rows removed 1, " \
           "class ids >= nc dropped 1; converted to 8-bit colour: 3" in log.text
    assert len(ds) == 11 and len(ds.labels) == len(ds.shapes) == len(ds.label_files) == 11
    names = {Path(f).name for f in ds.im_files}
    assert not names & {"truncated.jpg", "zero.jpg", "garbage.png", "tiny.png"}
    assert {"nolabel.jpg", "empty.jpg", "名前 with space.jpg"} <= names
    warnings = log.text
    for bad in ("truncated.jpg", "zero.jpg", "garbage.png", "tiny.png", "badrows.txt", "dupes.txt"):
        assert bad in warnings
    # badrows: every malformed row rejected (7 of them), class 7 >= nc dropped, the good row kept
    lb = ds.labels[_by_name(ds, "badrows.jpg")]
    np.testing.assert_allclose(lb, [[0, 0.5, 0.5, 0.2, 0.2]])
    badrows = [r.getMessage() for r in log.records if "badrows.txt" in r.getMessage()]
    assert sum(m.count(" ignored: ") for m in badrows) == 7 and "class id >= nc=3 dropped" in badrows[-1]
    np.testing.assert_allclose(ds.labels[_by_name(ds, "dupes.jpg")], [[0, 0.5, 0.5, 0.2, 0.2], [2, 0.4, 0.4, 0.1, 0.1]])
    assert "1 duplicate labels removed" in warnings
    np.testing.assert_allclose(ds.labels[_by_name(ds, "polygon.jpg")], [[2, 0.3, 0.4, 0.4, 0.4]], atol=1e-6)
    assert ds.labels[_by_name(ds, "nolabel.jpg")].shape == (0, 5)
    assert ds.labels[_by_name(ds, "empty.jpg")].shape == (0, 5)
    assert len(ds.labels[_by_name(ds, "名前 with space.jpg")]) == 1


def test_odd_images_load_as_8bit_bgr(odd_dataset: Path):
    ds = LoadImagesAndLabels(odd_dataset, img_size=60, batch_size=4)

    def original(name: str) -> np.ndarray:
        ds.img_size = max(ds.shapes[_by_name(ds, name)])  # no resize
        im, _, _ = ds.load_image(_by_name(ds, name))
        assert im.dtype == np.uint8 and im.ndim == 3 and im.shape[2] == 3
        return im

    assert (original("gray.png") == 77).all()
    assert (original("rgba.png") == (10, 20, 30)).all()  # alpha dropped, BGR kept
    assert (original("deep16.png") == 200).all()
    assert original("名前 with space.jpg").shape == (48, 64, 3)
    i = _by_name(ds, "rotated.jpg")
    assert tuple(ds.shapes[i]) == (20, 60)  # (w, h) after the 90-degree EXIF rotation of a 60x20 image
    assert original("rotated.jpg").shape == (60, 20, 3)


def test_label_cache_reused_and_invalidated(odd_dataset: Path, monkeypatch):
    import utils.dataloaders as dl

    real_scan, scans = dl.scan_labels, []
    monkeypatch.setattr(dl, "scan_labels", lambda *a, **k: scans.append(1) or real_scan(*a, **k))
    _dataset(odd_dataset)
    _dataset(odd_dataset)
    assert scans == [1]  # the second dataset used the cache
    label = odd_dataset.parents[1] / "labels" / "train" / "good.txt"
    label.write_text(GOOD, encoding="utf-8")  # content, size and mtime change
    ds = _dataset(odd_dataset)
    assert scans == [1, 1]
    assert len(ds.labels[_by_name(ds, "good.jpg")]) == 1
    cache_file = odd_dataset.parents[1] / "labels" / "train.cache"
    cache_file.write_bytes(b"\x80\x04garbage")  # e.g. a pickle: never unpickled, just rebuilt
    _dataset(odd_dataset)
    assert scans == [1, 1, 1]
    assert json.loads(cache_file.read_text(encoding="utf-8"))["version"] == dl.CACHE_VERSION


def test_label_paths_follow_the_images_to_labels_rule():
    sep = os.sep
    paths = [f"{sep}d{sep}images{sep}train{sep}images{sep}a.b.jpg", f"{sep}d{sep}x.png", f"{sep}images{sep}y.JPG",
             f"{sep}d{sep}my_images{sep}z.jpg"]
    assert img2label_paths(paths) == [f"{sep}d{sep}images{sep}train{sep}labels{sep}a.b.txt", f"{sep}d{sep}x.txt",
                                      f"{sep}labels{sep}y.txt", f"{sep}d{sep}my_images{sep}z.txt"]


def test_parse_labels_rejects_each_malformed_kind():
    rows = ["0 0.5 0.5 0.2", "0 inf 0.5 0.2 0.2", "0 1.01 0.5 0.2 0.2", "-2 0.5 0.5 0.2 0.2", "3 0.5 0.5 0.2 -0.2",
            "0.5 0.5 0.5 0.2 0.2", "x 0.5 0.5 0.2 0.2", "0 0.1 0.1 0.2 0.2 0.3", "1 0.5 0.5 0.2 0.2"]
    labels, problems = parse_labels("\n".join(rows) + "\n\n")
    np.testing.assert_allclose(labels, [[1, 0.5, 0.5, 0.2, 0.2]])
    assert [p.split(":")[0] for p in problems] == [f"line {i} ignored" for i in range(1, 9)]


# ------------------------------------------------------------------------------------------------ check_dataset


def _write_yaml(tmp_path: Path, cfg: dict) -> Path:
    f = tmp_path / "data.yaml"
    f.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return f


@pytest.fixture
def tiny_yolo(tmp_path: Path) -> Path:
    root = tmp_path / "tiny"
    for split in ("train", "val"):
        _label(_jpeg(root / "images" / split / "a.jpg"), GOOD)
    return root


def test_check_dataset_resolves_paths_and_names(tmp_path: Path, tiny_yolo: Path):
    (tiny_yolo / "list.txt").write_text("./images/val/a.jpg\n", encoding="utf-8")
    f = _write_yaml(tmp_path, {"path": str(tiny_yolo), "train": ["images/train", "list.txt"], "val": "images/val",
                               "names": ["cat", "dog"]})
    d = check_dataset(f)
    assert d["train"] == [str(tiny_yolo / "images" / "train"), str(tiny_yolo / "list.txt")]
    assert d["val"] == str(tiny_yolo / "images" / "val") and d["test"] is None
    assert d["nc"] == 2 and d["names"] == {0: "cat", 1: "dog"} and d["yaml_file"] == str(f)
    assert check_dataset({"path": str(tiny_yolo), "train": "images/train", "val": "images/val",
                          "names": {0: "a"}, "nc": 1})["names"] == {0: "a"}
    relative = os.path.relpath(tiny_yolo, ROOT)  # a relative 'path' is relative to the repository root
    assert check_dataset({"path": relative, "train": "images/train", "val": "images/val", "nc": 1})["path"] == str(
        tiny_yolo
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"train": None}, "'train' is missing"),
        ({"val": None}, "'val' is missing"),
        ({"names": None}, "'names' is missing"),
        ({"nc": 3}, "'nc' is 3 but 'names' has 2"),
        ({"names": {0: "a", 2: "b"}}, "'names' ids must be"),
        ({"names": "cat"}, "'names' must be"),
        ({"val": 5}, "'val' must be a path"),
        ({"val": "images/nope", "download": "import os"}, "'val' path"),
        ({"test": "images/absent"}, "'test' path"),
        ({"nc": "3"}, "'nc' must be a positive integer"),
    ],
)
def test_check_dataset_errors_name_file_and_key(tmp_path: Path, tiny_yolo: Path, change: dict, message: str):
    cfg = {"path": str(tiny_yolo), "train": "images/train", "val": "images/val", "names": ["cat", "dog"], **change}
    f = _write_yaml(tmp_path, {k: v for k, v in cfg.items() if v is not None})
    with pytest.raises(DataConfigError, match=message) as e:
        check_dataset(f)
    assert str(f) in str(e.value) and "\n" not in str(e.value)
    assert isinstance(e.value, ValueError)


def test_check_dataset_never_runs_yaml_code(tmp_path: Path):
    marker = tmp_path / "pwned"
    f = tmp_path / "evil.yaml"
    f.write_text(f"train: !!python/object/apply:os.system ['touch {marker}']\nval: x\nnames: [a]\n", encoding="utf-8")
    with pytest.raises(DataConfigError, match="evil.yaml"):
        check_dataset(f)
    assert not marker.exists()
    with pytest.raises(DataConfigError, match="not found"):
        check_dataset(tmp_path / "missing.yaml")


def test_check_dataset_converts_bccd(tmp_path: Path):
    cfg = yaml.safe_load((ROOT / "data" / "BCCD.yaml").read_text())
    cfg["path"] = str(tmp_path / "BCCD")
    cfg["convert"]["source"] = str(BCCD)
    d = check_dataset(cfg)
    assert len(os.listdir(d["train"])) == 292 and len(os.listdir(d["val"])) == 72
    assert d["names"] == {0: "RBC", 1: "WBC", 2: "Platelets"}
    assert [p.name for p in tmp_path.iterdir()] == ["BCCD"]  # no temporary folder left behind
    val_labels = Path(d["path"]) / "labels" / "val"
    assert sum(len(f.read_text().splitlines()) for f in val_labels.iterdir()) == 945  # upstream's val instances


def test_val_loader_matches_upstream_letterbox_recipe(tmp_path: Path):
    """rect val at 320: INTER_AREA resize to ceil(w*r) x ceil(h*r), batch shape ceil(s*320/32 + 0.5)*32, centred pad."""
    cfg = yaml.safe_load((ROOT / "data" / "BCCD.yaml").read_text())
    cfg.update(path=str(tmp_path / "BCCD"), convert={**cfg["convert"], "source": str(BCCD),
                                                       "splits": {"val": "ImageSets/Main/test.txt"}})
    cfg["train"] = cfg["val"]
    loader, ds = create_dataloader(check_dataset(cfg)["val"], 320, 8, 32, pad=0.5, rect=True, workers=0)
    imgs, targets, paths, shapes = next(iter(loader))
    assert imgs.shape == (8, 3, 256, 352) and imgs.dtype == torch.uint8
    assert (ds.batch_shapes == [256, 352]).all()
    for i in (0, 7):
        im0 = cv2.imread(paths[i])
        small = cv2.resize(im0, (math.ceil(640 * 0.5), math.ceil(480 * 0.5)), interpolation=cv2.INTER_AREA)
        expected = cv2.copyMakeBorder(small, 8, 8, 16, 16, cv2.BORDER_CONSTANT, value=(114, 114, 114))
        assert torch.equal(imgs[i], torch.from_numpy(expected[..., ::-1].transpose(2, 0, 1).copy()))
        assert shapes[i] == ((480, 640), ((0.5, 0.5), (16.0, 8.0)))
    cls, x, y, w, h = np.loadtxt(ds.label_files[0], ndmin=2).T
    expected = np.stack([cls, (x * 320 + 16) / 352, (y * 240 + 8) / 256, w * 320 / 352, h * 240 / 256], 1)
    np.testing.assert_allclose(targets[targets[:, 0] == 0][:, 1:].numpy(), expected, rtol=1e-5, atol=2e-3)


# --------------------------------------------------------------------------------------------------- dataloader


@pytest.fixture
def shapes_dataset(tmp_path: Path) -> Path:
    from utils.synthetic import generate_shapes

    generate_shapes(tmp_path / "shapes", n_train=12, n_val=0, imgsz=96, seed=1)
    return tmp_path / "shapes" / "images" / "train"


def _batches(loader, n=2) -> list:
    out = []
    for i, (imgs, targets, paths, _) in enumerate(loader):
        out.append((imgs.clone(), targets.clone(), paths))
        if i + 1 == n:
            break
    return out


def _assert_same_batches(a: list, b: list) -> None:
    assert len(a) == len(b)
    for (ia, ta, pa), (ib, tb, pb) in zip(a, b):
        assert torch.equal(ia, ib) and torch.equal(ta, tb) and pa == pb


def test_dataloader_seeded_workers_are_deterministic(shapes_dataset: Path):
    def run(seed: int, workers: int = 2, start_epoch: int = 0, epochs: int = 1) -> list:
        loader, _ = create_dataloader(shapes_dataset, 96, 4, 32, hyp=HYP, augment=True, workers=workers, shuffle=True,
                                      seed=seed, start_epoch=start_epoch)
        return [batch for _ in range(epochs) for batch in _batches(loader, len(loader))]

    a, b, c = run(3), run(3), run(4)
    _assert_same_batches(a, b)
    _assert_same_batches(a, run(3, workers=0))  # batches do not depend on the number of workers
    assert any(not torch.equal(x[0], y[0]) for x, y in zip(a, c))
    two_epochs = run(3, epochs=2)  # 12 images, batch 4: epochs of 3 batches, workers prefetching across the end
    _assert_same_batches(two_epochs[3:], run(3, workers=1, start_epoch=1))  # a resumed run's first epoch
    imgs, targets, _ = a[0]
    assert imgs.shape == (4, 3, 96, 96) and targets.shape[1] == 6
    loader, ds = create_dataloader(shapes_dataset, 64, 5, 32, hyp=HYP, augment=True, workers=2, shuffle=True)
    assert isinstance(loader, InfiniteDataLoader) and len(loader) == 3
    epochs = [[p for _, _, paths, _ in loader for p in paths] for _ in range(2)]  # workers reused across epochs
    assert all(sorted(e) == sorted(ds.im_files) for e in epochs) and epochs[0] != epochs[1]
    assert set(targets[:, 0].long().tolist()) <= {0, 1, 2, 3} and (targets[:, 2:] >= 0).all()
    assert (targets[:, 2:] <= 1).all()


def test_cache_modes_give_identical_items(shapes_dataset: Path):
    plain = _dataset(shapes_dataset)
    ram = _dataset(shapes_dataset, cache_images="ram")
    disk = _dataset(shapes_dataset, cache_images="disk")
    assert all(Path(f).with_suffix(".npy").is_file() for f in disk.im_files)
    np.load(Path(disk.im_files[0]).with_suffix(".npy"), allow_pickle=False)
    for i in (0, 5):
        assert torch.equal(plain[i][0], ram[i][0]) and torch.equal(plain[i][0], disk[i][0])
    assert ram.ims[0] is not None
    with pytest.raises(ValueError, match="cache"):
        _dataset(shapes_dataset, cache_images="gpu")


def test_nothing_usable_is_a_one_line_dataset_error(tmp_path: Path):
    images = tmp_path / "images"
    images.mkdir()
    with pytest.raises(DatasetError, match="no images found"):
        _dataset(images)
    (images / "zero.jpg").write_bytes(b"")
    with pytest.raises(DatasetError, match="no usable images"):
        _dataset(images)
    _jpeg(images / "a.jpg")  # a background image: fine for validation, nothing to train on
    assert len(_dataset(images)) == 1
    with pytest.raises(DatasetError, match="all labels are empty"):
        _dataset(images, augment=True, hyp=HYP)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        _dataset(tmp_path / "nowhere")


def test_image_weights_indices_quad_single_cls_min_items(shapes_dataset: Path):
    ds = _dataset(shapes_dataset, single_cls=True, min_items=2)
    assert all(len(lb) >= 2 and (lb[:, 0] == 0).all() for lb in ds.labels)
    ds.indices = np.zeros(len(ds), dtype=int)  # train.py's --image-weights resampling hook
    assert {ds[i][2] for i in range(3)} == {ds.im_files[0]}
    loader, _ = create_dataloader(shapes_dataset, 64, 8, 32, workers=0, quad=True)
    imgs, targets, paths, shapes = next(iter(loader))
    assert imgs.shape in {(2, 3, 128, 128)} and len(paths) == len(shapes) == 2
    assert (targets[:, 2:] >= 0).all() and (targets[:, 2:] <= 1).all() and set(targets[:, 0].tolist()) <= {0, 1}


def test_collate_numbers_targets_and_quad_tiles_them():
    def item(value: int, boxes: list) -> tuple:
        targets = torch.tensor([[9.0, 1, *b] for b in boxes]).reshape(-1, 6)
        return torch.full((3, 4, 4), value, dtype=torch.uint8), targets, f"{value}.jpg", None

    batch = [item(0, [[0.5, 0.5, 0.2, 0.2]]), item(1, []), item(2, [[0.25, 0.75, 0.1, 0.4]]), item(3, [[0, 0, 1, 1]])]
    imgs, targets, paths, _ = LoadImagesAndLabels.collate_fn(batch)
    assert imgs.shape == (4, 3, 4, 4) and targets[:, 0].tolist() == [0, 2, 3] and paths == tuple(b[2] for b in batch)
    assert batch[0][1][0, 0] == 9  # the items themselves are left alone
    seen = set()
    for seed in range(20):
        random.seed(seed)
        imgs, targets, paths, _ = LoadImagesAndLabels.collate_fn4(batch + batch[:2])  # 2 spare items dropped
        assert imgs.shape == (1, 3, 8, 8) and paths == ("0.jpg",) and (targets[:, 0] == 0).all()
        if len(targets) == 1:  # the first image, upscaled
            seen.add("upscaled")
            assert (imgs == 0).all() and torch.equal(targets[0, 2:], batch[0][1][0, 2:])
        else:  # 2x2 grid, column by column: items 0 and 1 on the left, 2 and 3 on the right
            seen.add("grid")
            assert imgs[0, 0, :4, :4].eq(0).all() and imgs[0, 0, 4:, :4].eq(1).all()
            assert imgs[0, 0, :4, 4:].eq(2).all() and imgs[0, 0, 4:, 4:].eq(3).all()
            np.testing.assert_allclose(targets[:, 2:].numpy(), [[0.25, 0.25, 0.1, 0.1], [0.625, 0.375, 0.05, 0.2],
                                                                [0.5, 0.5, 0.5, 0.5]])
    assert seen == {"upscaled", "grid"}


def test_distributed_sampler_when_rank_given(shapes_dataset: Path, tmp_path: Path):
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        loader, _ = create_dataloader(shapes_dataset, 64, 4, 32, rank=0, workers=0, shuffle=True)
        assert isinstance(loader.batch_sampler.batches.sampler, torch.utils.data.distributed.DistributedSampler)
    finally:
        torch.distributed.destroy_process_group()
    loader, _ = create_dataloader(shapes_dataset, 64, 4, 32, workers=0)
    assert not isinstance(loader.batch_sampler.batches.sampler, torch.utils.data.distributed.DistributedSampler)


def test_rect_sorts_by_aspect_ratio_and_pads_batches(tmp_path: Path):
    images = tmp_path / "r" / "images"
    sizes = {"a.jpg": (100, 200), "b.jpg": (200, 100), "c.jpg": (150, 150), "d.jpg": (120, 200)}  # (h, w)
    for name, hw in sizes.items():
        _label(_jpeg(images / name, hw=hw), GOOD)
    ds = LoadImagesAndLabels(images, img_size=64, batch_size=2, rect=True, stride=32, pad=0.5)
    assert [Path(f).name for f in ds.im_files] == ["a.jpg", "d.jpg", "c.jpg", "b.jpg"]  # h/w ascending
    # batch 0 (h/w 0.5, 0.6): [0.6, 1] * 64 / 32 + 0.5 -> ceil -> [2, 3] * 32; batch 1 (1.0, 2.0) spans 1: square
    assert ds.batch_shapes.tolist() == [[64, 96], [96, 96]]
    assert tuple(ds[1][0].shape[1:]) == tuple(ds.batch_shapes[0])


# ---------------------------------------------------------------------------------------------- inference loaders


def test_load_images_files_folders_videos(tmp_path: Path):
    folder = tmp_path / "in put ü [1]"
    _jpeg(folder / "b.jpg", hw=(48, 64))
    _jpeg(folder / "a.png", hw=(30, 90))
    video = folder / "clip.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    for k in range(6):
        writer.write(np.full((48, 64, 3), k * 40, np.uint8))
    writer.release()
    items = list(LoadImages(folder, img_size=64, stride=32, vid_stride=2))
    assert [Path(p).name for p, *_ in items] == ["a.png", "b.jpg", "clip.avi", "clip.avi", "clip.avi"]
    path, im, im0, cap, info = items[0]
    assert im.shape == (3, 32, 64) and im0.shape == (30, 90, 3) and cap is None
    assert info.startswith("image 1/3 ") and info.endswith(": ")
    assert items[2][4].startswith("video 3/3 (1/3) ") and items[2][3] is not None
    assert [Path(p).name for p, *_ in LoadImages(os.path.join(glob.escape(str(folder)), "*.jpg"))] == ["b.jpg"]
    (tmp_path / "list.txt").write_text(f"{folder / 'a.png'}\n", encoding="utf-8")
    assert len(list(LoadImages(tmp_path / "list.txt"))) == 1
    with pytest.raises(FileNotFoundError, match="nothing_here"):
        LoadImages(tmp_path / "nothing_here")
    with pytest.raises(FileNotFoundError, match="URL"):
        LoadImages("https://example.com/x.jpg")


def test_streams_fail_fast_and_read_files(tmp_path: Path):
    assert is_stream_source("0") and is_stream_source("rtsp://host/live") and not is_stream_source("a.jpg")
    assert not is_stream_source("https://host/a.jpg")
    for source in ("http://127.0.0.1:9/stream.mjpg", "99"):
        start = time.time()
        with pytest.raises(ConnectionError, match=source.split(":")[0]):
            LoadStreams(source, timeout=2.0)
        assert time.time() - start < 5
    video = tmp_path / "v.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    for _ in range(3):
        writer.write(np.full((48, 64, 3), 60, np.uint8))
    writer.release()
    streams = LoadStreams(str(video), img_size=64)
    sources, ims, im0s, _, _ = next(iter(streams))
    streams.close()
    assert sources == [str(video)] and ims.shape == (1, 3, 64, 64) and im0s[0].shape == (48, 64, 3)
