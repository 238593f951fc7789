"""Data YAML loading and validation (``check_dataset``), with declarative dataset preparation.

A data YAML has upstream YOLOv5's keys: ``path`` (dataset root; relative paths are relative to the repository
root), ``train``, ``val``, optional ``test`` (each a folder, a .txt list of images, or a list of those, relative to
``path``), ``names`` (list, or dict {id: name} with ids 0..nc-1) and optional ``nc`` (must agree with names).
It is read with ``yaml.safe_load``: no code in a YAML is ever executed, so upstream's ``download`` scripts are
not supported. Instead, when the dataset root is missing, one of two declarative blocks builds it atomically
(into a temporary folder beside it, then renamed):

    convert:                      # a Pascal VOC dataset -> YOLO (utils/voc.py)
      format: voc
      source: ../shared/datasets/bccd          # relative to the repository root
      splits: {train: ImageSets/Main/trainval.txt, val: ImageSets/Main/test.txt}

    generate:                     # the synthetic shapes dataset (utils/synthetic.py)
      kind: shapes
      train: 256
      val: 64
      imgsz: 320
      seed: 0
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from utils.general import LOGGER, ROOT, UserInputError, yaml_load
from utils.synthetic import CLASS_NAMES as SHAPES_NAMES
from utils.synthetic import generate_shapes
from utils.voc import convert_voc

SPLIT_KEYS = ("train", "val", "test")


class DataConfigError(UserInputError):
    """A data YAML is missing, malformed, or points at missing data; the message names the file and key."""


def data_yaml_file(data: str | Path) -> Path:
    """The data YAML as given, else under the repository root or its data/ folder."""
    for candidate in (Path(data), ROOT / data, ROOT / "data" / data):
        if candidate.is_file():
            return candidate.resolve()
    raise DataConfigError(f"{data}: data YAML not found")


def _parse_names(cfg: dict, src: str) -> dict[int, str]:
    """``names`` (list or {id: name}) -> {0: name0, ...}; checked against ``nc`` when given."""
    names, nc = cfg.get("names"), cfg.get("nc")
    if nc is not None and (not isinstance(nc, int) or isinstance(nc, bool) or nc < 1):
        raise DataConfigError(f"{src}: 'nc' must be a positive integer, got {nc!r}")
    if names is None:
        if nc is None:
            raise DataConfigError(f"{src}: 'names' is missing")
        return {i: f"class{i}" for i in range(nc)}
    if isinstance(names, list):
        names = dict(enumerate(names))
    if not isinstance(names, dict) or not names:
        raise DataConfigError(f"{src}: 'names' must be a non-empty list or a {{id: name}} mapping")
    if sorted(names) != list(range(len(names))):
        raise DataConfigError(f"{src}: 'names' ids must be the integers 0..{len(names) - 1}, got {sorted(names)}")
    if nc is not None and nc != len(names):
        raise DataConfigError(f"{src}: 'nc' is {nc} but 'names' has {len(names)} entries")
    return {i: str(names[i]) for i in range(len(names))}


def _dataset_root(cfg: dict, src: str) -> Path:
    path = cfg.get("path") or ""
    if not isinstance(path, (str, Path)):
        raise DataConfigError(f"{src}: 'path' must be a folder path, got {path!r}")
    path = Path(path)
    return Path(os.path.abspath(path if path.is_absolute() else ROOT / path))


def _split_paths(cfg: dict, root: Path, src: str) -> dict[str, str | list[str] | None]:
    """Absolute train/val/test paths (str, or list of str when the YAML gives a list); test may be None."""
    splits = {}
    for key in SPLIT_KEYS:
        value = cfg.get(key)
        if value is None and key != "test":
            raise DataConfigError(f"{src}: '{key}' is missing")
        items = value if isinstance(value, list) else [value]
        if value is not None and (not items or not all(isinstance(x, str) and x for x in items)):
            raise DataConfigError(f"{src}: '{key}' must be a path or a list of paths, got {value!r}")
        resolved = [os.path.abspath(root / x) for x in items] if value is not None else None
        splits[key] = resolved if isinstance(value, list) or resolved is None else resolved[0]
    return splits


def _missing(splits: dict) -> list[tuple[str, str]]:
    """(key, path) of every split path that does not exist."""
    out = []
    for key, value in splits.items():
        for p in [] if value is None else value if isinstance(value, list) else [value]:
            if not os.path.exists(p):
                out.append((key, p))
    return out


def build_atomically(root: Path, build: Callable[[Path], object]) -> None:
    """Run ``build`` into a temporary sibling of ``root`` and rename it to ``root`` (a concurrent winner is kept)."""
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private
        build(tmp)
        os.rename(tmp, root)
    except OSError:
        if not root.is_dir():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _voc_builder(block: dict, names: dict[int, str], src: str) -> Callable[[Path], object]:
    if block.get("format") != "voc":
        raise DataConfigError(f"{src}: 'convert.format' must be 'voc', got {block.get('format')!r}")
    source, splits = block.get("source"), block.get("splits")
    if not isinstance(source, str):
        raise DataConfigError(f"{src}: 'convert.source' must be a folder path")
    if not isinstance(splits, dict) or not splits or not all(isinstance(v, str) for v in splits.values()):
        raise DataConfigError(f"{src}: 'convert.splits' must map split names to id list files")
    source_root = (Path(source) if Path(source).is_absolute() else ROOT / source).resolve()
    if not source_root.is_dir():
        raise DataConfigError(f"{src}: 'convert.source' folder {source_root} does not exist")
    return lambda dst: convert_voc(source_root, dst, splits, list(names.values()))


def _shapes_builder(block: dict, names: dict[int, str], src: str) -> Callable[[Path], object]:
    if block.get("kind") != "shapes":
        raise DataConfigError(f"{src}: 'generate.kind' must be 'shapes', got {block.get('kind')!r}")
    params = {"train": 256, "val": 64, "imgsz": 320, "seed": 0}
    for key in params:
        value = block.get(key, params[key])
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise DataConfigError(f"{src}: 'generate.{key}' must be a non-negative integer, got {value!r}")
        params[key] = value
    if tuple(names.values()) != SHAPES_NAMES:
        raise DataConfigError(f"{src}: 'names' must be {list(SHAPES_NAMES)} for the shapes generator")
    return lambda dst: generate_shapes(dst, params["train"], params["val"], params["imgsz"], params["seed"])


def _prepare(cfg: dict, root: Path, names: dict[int, str], src: str) -> None:
    """Build a missing dataset root from its ``convert``/``generate`` block."""
    for key, make_builder in (("convert", _voc_builder), ("generate", _shapes_builder)):
        if key in cfg:
            if not isinstance(cfg[key], dict):
                raise DataConfigError(f"{src}: '{key}' must be a mapping")
            builder = make_builder(cfg[key], names, src)
            LOGGER.info(f"Dataset {root} not found, building it from the '{key}' block of {src} ...")
            build_atomically(root, builder)
            return


def check_dataset(data: str | Path | dict) -> dict:
    """Load and validate a data YAML (path or already-loaded dict); build the dataset if declared and missing.

    Returns the YAML's keys with absolute ``path``, ``train``, ``val``, ``test`` (None when absent), ``nc``,
    ``names`` as {id: name} and ``yaml_file``. Raises DataConfigError (one line, naming the file and key).
    """
    if isinstance(data, dict):
        cfg, src = dict(data), str(data.get("yaml_file", "<data dict>"))
    else:
        yaml_file = data_yaml_file(data)
        try:
            cfg, src = yaml_load(yaml_file), str(yaml_file)
        except UserInputError as e:
            raise DataConfigError(str(e)) from None
    names = _parse_names(cfg, src)
    root = _dataset_root(cfg, src)
    splits = _split_paths(cfg, root, src)
    if _missing(splits) and not root.exists():
        _prepare(cfg, root, names, src)
    if missing := _missing(splits):
        key, path = missing[0]
        hint = " ('download' is not supported: YAML code is never run)" if "download" in cfg else ""
        raise DataConfigError(f"{src}: '{key}' path {path} does not exist{hint}")
    return {**cfg, **splits, "path": str(root), "nc": len(names), "names": names, "yaml_file": src}
