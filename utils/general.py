"""Small general utilities shared by the entry scripts: logging, paths, YAML, printing."""

from __future__ import annotations

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
RANK = int(os.getenv("RANK", -1))


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
    """Entry point of a script: logging, the argument echo, and user errors as one ERROR line with exit code 2."""
    set_logging()
    options = parse_opt()
    print_args(vars(options), name)
    try:
        main(options)
    except (UserInputError, *errors) as e:
        LOGGER.error(f"ERROR: {e}")
        sys.exit(2)


def make_divisible(x: float, divisor: int) -> int:
    """Smallest multiple of ``divisor`` that is >= x."""
    return int(math.ceil(x / divisor) * divisor)


def check_img_size(imgsz: int | list, s: int = 32, floor: int = 0) -> int | list:
    """Round image size(s) up to a multiple of stride ``s`` and warn when changed."""
    if isinstance(imgsz, int):
        new = max(make_divisible(imgsz, int(s)), floor)
    else:
        new = [max(make_divisible(x, int(s)), floor) for x in imgsz]
    if new != imgsz:
        LOGGER.warning(f"WARNING --img-size {imgsz} must be multiple of max stride {s}, updating to {new}")
    return new


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


def yaml_save(file: str | Path, data: dict) -> None:
    """Write a dict to YAML, converting Paths to strings."""
    with open(file, "w", encoding="utf-8") as f:
        yaml.safe_dump({k: str(v) if isinstance(v, Path) else v for k, v in data.items()}, f, sort_keys=False)


def increment_path(path: str | Path, exist_ok: bool = False, sep: str = "", mkdir: bool = False) -> Path:
    """runs/exp -> runs/exp2, runs/exp3, ... unless ``exist_ok``."""
    path = Path(path)
    if path.exists() and not exist_ok:
        stem, suffix = (path.with_suffix(""), path.suffix) if path.is_file() else (path, "")
        n = 2
        while Path(f"{stem}{sep}{n}{suffix}").exists():
            n += 1
        path = Path(f"{stem}{sep}{n}{suffix}")
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
