"""Small general utilities shared by the entry scripts: logging, paths, YAML, printing."""

from __future__ import annotations

import itertools
import logging
import math
import os
import platform
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]  # repository root (folder of train.py)
LOGGER = logging.getLogger("yolov5")
RANK = int(os.getenv("RANK", -1))  # this process's rank under torchrun (-1: not distributed)
LOCAL_RANK = int(os.getenv("LOCAL_RANK", -1))
WORLD_SIZE = int(os.getenv("WORLD_SIZE", 1))
TQDM_BAR_FORMAT = "{l_bar}{bar:10}{r_bar}"  # every progress bar: description, 10-character bar, counts, rate


def set_logging(verbose: bool = True) -> logging.Logger:
    """Configure the 'yolov5' logger once: plain messages to stdout, INFO on rank -1/0 only."""
    if not LOGGER.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        LOGGER.addHandler(handler)
        LOGGER.propagate = False
    LOGGER.setLevel(logging.INFO if verbose and RANK in {-1, 0} else logging.WARNING)
    return LOGGER


class UserInputError(ValueError):
    """Bad user input (a file, a YAML key, a flag); the message is one line that names the culprit."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message, or its type's name when empty (torch's errors span many lines)."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def run_cli(main, parse_opt, name: str, errors: tuple = ()) -> None:
    """Entry point of a script: logging, the argument echo, and user errors (a bad option included) as one ERROR
    line with exit code 2."""
    set_logging()
    try:
        options = parse_opt()
        print_args(vars(options), name)
        main(options)
    except (UserInputError, *errors) as e:
        LOGGER.error(f"ERROR: {e}")
        sys.exit(2)


def make_divisible(x: float, divisor: int) -> int:
    """Smallest multiple of ``divisor`` that is >= x."""
    return int(math.ceil(x / divisor) * divisor)


def check_img_size(imgsz: int | list, s: int = 32, floor: int = 0) -> int | list:
    """``imgsz`` (an int or a list of ints) with every size rounded up to a multiple of the model's largest stride
    ``s`` and raised to at least ``floor``; a warning says so when that changes anything."""
    stride = int(s)
    sizes = [imgsz] if isinstance(imgsz, int) else list(imgsz)
    fitted = [max(make_divisible(size, stride), floor) for size in sizes]
    result = fitted[0] if isinstance(imgsz, int) else fitted
    if fitted != sizes:
        at_least = f" and at least {floor}" if floor else ""
        LOGGER.warning(f"WARNING image size {imgsz} changed to {result}: sizes must be multiples of the model's "
                       f"stride {stride}{at_least}")
    return result


def colorstr(*args: str) -> str:
    """Wrap a string in ANSI colour codes: colorstr('blue', 'bold', 'text'); plain when not a terminal."""
    *codes, text = args if len(args) > 1 else ("blue", "bold", args[0])
    table = {"black": 30, "red": 31, "green": 32, "yellow": 33, "blue": 34, "magenta": 35, "cyan": 36,
             "white": 37, "bold": 1, "underline": 4}
    if not sys.stdout.isatty() or os.getenv("NO_COLOR"):
        return str(text)
    return "".join(f"\033[{table[c]}m" for c in codes) + f"{text}\033[0m"


def yaml_load(file: str | Path) -> dict:
    """Load a YAML mapping; a missing file or a YAML syntax error becomes a one-line UserInputError."""
    file = Path(file)
    if not file.is_file():
        raise UserInputError(f"{file}: file not found")
    try:
        with open(file, errors="ignore", encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UserInputError(f"{file}{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise UserInputError(f"{file}: expected a YAML mapping at the top level, got {type(data).__name__}")
    return data


def _yaml_ready(value):
    """``value`` with Paths turned into strings and tuples into lists, at any depth, for ``yaml.safe_dump``."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {key: _yaml_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_yaml_ready(item) for item in value]
    return value


def yaml_save(file: str | Path, data: dict) -> None:
    """Write a dict to a YAML file in its own key order (Paths written as strings)."""
    Path(file).write_text(yaml.safe_dump(_yaml_ready(data), sort_keys=False), encoding="utf-8")


def increment_path(path: str | Path, exist_ok: bool = False, sep: str = "", mkdir: bool = False) -> Path:
    """``path`` itself if it is free (or ``exist_ok``), else the first free one of path{sep}2, path{sep}3, ...

    For an existing file the number goes before its suffix (runs/a.jpg -> runs/a2.jpg). ``mkdir`` creates the
    result as a folder.
    """
    path = Path(path)
    if path.exists() and not exist_ok:
        suffix = path.suffix if path.is_file() else ""
        base = str(path)[: -len(suffix)] if suffix else str(path)
        path = next(c for c in (Path(f"{base}{sep}{n}{suffix}") for n in itertools.count(2)) if not c.exists())
    if mkdir:
        path.mkdir(parents=True, exist_ok=True)
    return path


def print_args(args: dict, name: str = "") -> None:
    """Log 'name: k1=v1, k2=v2' like upstream's argument echo."""
    LOGGER.info(colorstr(f"{name}: ") + ", ".join(f"{k}={v}" for k, v in args.items()))


def is_url(text: str) -> bool:
    return bool(re.match(r"^(https?|rtsp|rtmp|ftp)://", str(text)))


def machine_summary() -> str:
    """One line naming the platform and Python, for logs and benchmark reports."""
    return f"{platform.platform()} Python-{platform.python_version()}"
