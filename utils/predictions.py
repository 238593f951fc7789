"""Writing predictions to disk and scoring them: YOLO label files (detect.py/val.py --save-txt) and COCO JSON
(val.py --save-json, scored with pycocotools against a ground truth derived from the dataset's labels).

Predictions here are one image's ``(n, 6)`` rows ``[x1, y1, x2, y2, conf, class]`` in original-image pixels.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from utils.boxes import xyxy2xywh


def yolo_rows(predn: torch.Tensor, shape: tuple, with_conf: bool) -> list[str]:
    """Label-file lines ``class cx cy w h [conf]``, the box normalised by the image ``shape`` (h, w)."""
    height, width = shape[:2]
    centre_size = xyxy2xywh(predn[:, :4]) / predn.new_tensor([width, height, width, height])
    columns = [predn[:, 5:6], centre_size, predn[:, 4:5]] if with_conf else [predn[:, 5:6], centre_size]
    return [" ".join(f"{v:g}" for v in row) for row in torch.cat(columns, 1).tolist()]


def save_one_txt(predn: torch.Tensor, save_conf: bool, shape: tuple, file: Path) -> None:
    """Write one image's predictions as a YOLO label file (``save_conf`` adds the confidence column)."""
    file.write_text("".join(f"{line}\n" for line in yolo_rows(predn, shape, save_conf)))


def image_id(path: Path) -> int | str:
    """COCO image id of an image file: its stem as an int when it is all digits, else the stem."""
    stem = Path(path).stem
    return int(stem) if stem.isnumeric() else stem


def save_one_json(predn: torch.Tensor, jdict: list, path: Path) -> None:
    """Append one image's predictions to ``jdict`` as COCO result records (bbox = left, top, width, height)."""
    corner_size = torch.cat((predn[:, :2], predn[:, 2:4] - predn[:, :2]), 1)
    iid = image_id(path)
    for box, score, cls in zip(corner_size.tolist(), predn[:, 4].tolist(), predn[:, 5].tolist()):
        jdict.append({"image_id": iid, "category_id": int(cls), "bbox": [round(v, 3) for v in box],
                      "score": round(score, 5)})


def coco_ground_truth(dataset, names: dict) -> dict:
    """A COCO ground-truth dict from a dataset's labels (normalised xywh) and image sizes (w, h)."""
    images, annotations = [], []
    for file, (width, height), labels in zip(dataset.im_files, dataset.shapes, dataset.labels):
        iid = image_id(Path(file))
        images.append({"id": iid, "file_name": Path(file).name, "width": int(width), "height": int(height)})
        for cls, cx, cy, w, h in labels.tolist():
            box = [(cx - w / 2) * width, (cy - h / 2) * height, w * width, h * height]
            annotations.append({"id": len(annotations) + 1, "image_id": iid, "category_id": int(cls),
                                "iscrowd": 0, "bbox": box, "area": box[2] * box[3]})
    return {"images": images, "annotations": annotations,
            "categories": [{"id": k, "name": v} for k, v in names.items()]}


def coco_evaluate(gt_file: Path, pred_file: Path) -> tuple[float, float]:
    """(mAP@0.5:0.95, mAP@0.5) that pycocotools computes from the two JSON files."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    truth = COCO(str(gt_file))
    evaluation = COCOeval(truth, truth.loadRes(str(pred_file)), "bbox")
    for step in (evaluation.evaluate, evaluation.accumulate, evaluation.summarize):
        step()
    return float(evaluation.stats[0]), float(evaluation.stats[1])


def write_and_score_json(jdict: list, dataset, names: dict, save_dir: Path, stem: str) -> tuple[float, float]:
    """Save ``<stem>_predictions.json`` and ``ground_truth.json`` in ``save_dir`` and score them with pycocotools."""
    pred_file, gt_file = save_dir / f"{stem}_predictions.json", save_dir / "ground_truth.json"
    pred_file.write_text(json.dumps(jdict))
    gt_file.write_text(json.dumps(coco_ground_truth(dataset, names)))
    return coco_evaluate(gt_file, pred_file)
