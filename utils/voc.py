"""Pascal VOC (XML) -> YOLO dataset converter.

Reads ``<src>/Annotations/<id>.xml`` and ``<src>/JPEGImages/<id>.<ext>`` for the image ids listed in each split
file (e.g. ``ImageSets/Main/trainval.txt``) and writes ``<dst>/images/<split>/<id>.<ext>`` (a copy) and
``<dst>/labels/<split>/<id>.txt`` (``class x y w h`` normalized by the XML image size).

Pixel convention (the one of upstream YOLOv5's own VOC conversion, so that figures match upstream-trained ones):
VOC corners are 1-based, so both corners are shifted by -1 pixel, and the size is ``xmax - xmin`` (not + 1):
``x = ((xmin + xmax) / 2 - 1) / W``, ``w = (xmax - xmin) / W``, likewise in y. Boxes are then clipped to the
image ``[0, W] x [0, H]``; boxes left with zero or negative width or height are dropped and counted, objects
marked ``difficult`` are skipped (as upstream), and an object whose class is not in ``names`` is an error.

CLI: ``python -m utils.voc SRC DST --split train=ImageSets/Main/trainval.txt --split val=ImageSets/Main/test.txt
--names RBC WBC Platelets``
"""

from __future__ import annotations

import argparse
import shutil
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from utils.general import LOGGER


@dataclass
class VocStats:
    """What a conversion did, per split and in total."""

    images: dict[str, int] = field(default_factory=dict)
    boxes: int = 0
    clipped: int = 0
    degenerate: int = 0
    difficult: int = 0

    def __str__(self) -> str:
        split_counts = ", ".join(f"{k} {v}" for k, v in self.images.items())
        return (f"images: {split_counts}; boxes written {self.boxes}, clipped {self.clipped}, "
                f"degenerate dropped {self.degenerate}, difficult skipped {self.difficult}")


def voc_box_to_yolo(box: tuple[float, float, float, float], width: float, height: float
                    ) -> tuple[tuple[float, float, float, float] | None, bool]:
    """VOC (xmin, ymin, xmax, ymax) -> (normalized (x, y, w, h) or None if degenerate, whether it was clipped)."""
    x1, y1, x2, y2 = (v - 1 for v in box)  # 1-based -> 0-based corners
    cx1, cy1 = min(max(x1, 0), width), min(max(y1, 0), height)
    cx2, cy2 = min(max(x2, 0), width), min(max(y2, 0), height)
    clipped = (cx1, cy1, cx2, cy2) != (x1, y1, x2, y2)
    if cx2 <= cx1 or cy2 <= cy1:
        return None, clipped
    xywh = ((cx1 + cx2) / 2 / width, (cy1 + cy2) / 2 / height, (cx2 - cx1) / width, (cy2 - cy1) / height)
    return xywh, clipped


def _image_size(root: ET.Element, image: Path) -> tuple[int, int]:
    """(width, height) from the XML ``<size>``, or from the image when the XML has none."""
    size = root.find("size")
    if size is not None:
        w, h = int(float(size.findtext("width", "0"))), int(float(size.findtext("height", "0")))
        if w > 0 and h > 0:
            return w, h
    with Image.open(image) as im:
        return im.size


def _find_image(src: Path, image_id: str) -> Path:
    images = sorted((src / "JPEGImages").glob(f"{image_id}.*"))
    if not images:
        raise FileNotFoundError(f"no image for VOC id {image_id} in {src / 'JPEGImages'}")
    return images[0]


def convert_annotation(xml_file: Path, image: Path, class_ids: dict[str, int], stats: VocStats) -> list[str]:
    """YOLO label lines of one VOC annotation, updating ``stats``."""
    root = ET.parse(xml_file).getroot()
    width, height = _image_size(root, image)
    lines = []
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip()
        if name not in class_ids:
            raise ValueError(f"{xml_file}: class {name!r} is not in names {list(class_ids)}")
        if int(obj.findtext("difficult", "0") or 0) == 1:
            stats.difficult += 1
            continue
        bndbox = obj.find("bndbox")
        box = tuple(float(bndbox.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
        xywh, clipped = voc_box_to_yolo(box, width, height)
        stats.clipped += clipped
        if xywh is None:
            stats.degenerate += 1
            continue
        stats.boxes += 1
        lines.append(" ".join([str(class_ids[name]), *(str(v) for v in xywh)]))
    return lines


def convert_voc(src_root: str | Path, dst_root: str | Path, splits: dict[str, str], names: list[str]) -> VocStats:
    """Convert the VOC dataset at ``src_root`` into a YOLO dataset at ``dst_root``.

    ``splits`` maps an output split name to an image-id list file relative to ``src_root``, e.g.
    ``{'train': 'ImageSets/Main/trainval.txt', 'val': 'ImageSets/Main/test.txt'}``; class ids follow ``names``.
    """
    src, dst = Path(src_root), Path(dst_root)
    class_ids = {name: i for i, name in enumerate(names)}
    stats = VocStats()
    for split, list_file in splits.items():
        ids = (src / list_file).read_text(encoding="utf-8").split()
        (dst / "images" / split).mkdir(parents=True, exist_ok=True)
        (dst / "labels" / split).mkdir(parents=True, exist_ok=True)
        for image_id in ids:
            image = _find_image(src, image_id)
            lines = convert_annotation(src / "Annotations" / f"{image_id}.xml", image, class_ids, stats)
            shutil.copyfile(image, dst / "images" / split / image.name)
            label = "".join(f"{line}\n" for line in lines)
            (dst / "labels" / split / f"{image_id}.txt").write_text(label, encoding="utf-8")
        stats.images[split] = len(ids)
    LOGGER.info(f"VOC conversion {src} -> {dst}: {stats}")
    return stats


def main(argv: list[str] | None = None) -> VocStats:
    parser = argparse.ArgumentParser(description="Convert a Pascal VOC dataset to YOLO format")
    parser.add_argument("src", help="VOC root with Annotations/, JPEGImages/, ImageSets/")
    parser.add_argument("dst", help="output root (images/<split>, labels/<split>)")
    parser.add_argument("--split", action="append", required=True, metavar="NAME=LIST",
                        help="output split and its id list relative to src, e.g. train=ImageSets/Main/trainval.txt")
    parser.add_argument("--names", nargs="+", required=True, help="class names in class-id order")
    args = parser.parse_args(argv)
    splits = dict(s.split("=", 1) for s in args.split)
    stats = convert_voc(args.src, args.dst, splits, args.names)
    print(stats)
    return stats


if __name__ == "__main__":
    main()
