"""Checks of the scripts' command-line options, declared per script as a table of rules.

Each script lists ``{flag: rule}`` (a rule returns why a value is wrong, or None) and a few ``Combination``s of flags
that contradict each other; ``check_options`` applies them right after parsing, before any file is read or model
built, and raises a UserInputError whose one line reads ``--flag value: reason``. ``OptionParser`` reports argparse's
own errors (a wrong type, an unknown choice) as one ``ERROR:`` line too, and remembers how the user spelled each
flag (``--img`` or ``--imgsz``), so that messages name the flag as typed.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from utils.general import UserInputError

Rule = Callable[[object], Optional[str]]
DEVICE_PATTERN = re.compile(r"^(cpu|mps|(cuda:)?\d+(,\d+)*)?$")


class OptionParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors end in one ``ERROR: ...`` line (exit code 2) and that records each option's
    spellings, so that ``spelled(argv)`` can say which one the user typed."""

    def __init__(self, *args, **kwargs):
        self.spellings: dict[str, str] = {}  # option string -> dest (filled by add_argument, -h included)
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs):
        action = super().add_argument(*args, **kwargs)
        self.spellings.update({flag: action.dest for flag in action.option_strings})
        return action

    def error(self, message: str):
        self.print_usage(sys.stderr)
        sys.stderr.write(f"ERROR: {message}\n")
        sys.exit(2)

    def spelled(self, argv: list[str] | None = None) -> dict[str, str]:
        """{dest: the option string as typed in ``argv``} (abbreviations included) for the options given."""
        typed = {}
        for token in sys.argv[1:] if argv is None else argv:
            word = token.split("=", 1)[0]
            if not word.startswith("--"):
                continue
            dests = {dest for flag, dest in self.spellings.items() if flag == word} or \
                {dest for flag, dest in self.spellings.items() if flag.startswith(word)}
            if len(dests) == 1:
                typed[dests.pop()] = word
        return typed

    def parse_checked(self, argv: list[str] | None, check: Callable,
                      fill: Callable[[argparse.Namespace], None] | None = None) -> argparse.Namespace:
        """Parse ``argv``, run ``check(opt, spelled)``, then let ``fill(opt)`` complete defaults that depend on files
        (after the checks, so that a bad value is named even where the fill itself would fail)."""
        opt = self.parse_args(argv)
        check(opt, self.spelled(argv))
        if fill:
            fill(opt)
        return opt


@dataclass(frozen=True)
class Combination:
    """Flags that cannot be used together: ``applies(opt)`` says whether ``opt`` has the contradiction."""

    flags: tuple[str, ...]
    applies: Callable[[argparse.Namespace], bool]
    reason: str | Callable[[argparse.Namespace], str]  # text, or a function of the options giving it


def dest_of(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def shown(value) -> str:
    """A value as it would be typed on the command line."""
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value))
    return repr(value) if isinstance(value, str) and not value.strip() else str(value)


def check_options(opt: argparse.Namespace, rules: dict[str, Rule], combinations: tuple[Combination, ...] = (),
                  spelled: dict[str, str] | None = None) -> None:
    """Apply the rules in table order, then the combinations; the first failure raises one-line UserInputError.
    Options absent from ``opt`` or None (optional flags not given) are not checked."""
    spelled = spelled or {}

    def name(flag: str) -> str:
        return spelled.get(dest_of(flag), flag)

    for flag, rule in rules.items():
        value = getattr(opt, dest_of(flag), None)
        if value is not None and (reason := rule(value)):
            raise UserInputError(f"{name(flag)} {shown(value)}: {reason}")
    for combination in combinations:
        if combination.applies(opt):
            parts = []
            for flag in combination.flags:
                value = getattr(opt, dest_of(flag), None)
                parts.append(name(flag) if isinstance(value, bool) or value is None else f"{name(flag)} {shown(value)}")
            reason = combination.reason(opt) if callable(combination.reason) else combination.reason
            raise UserInputError(f"{' with '.join(parts)}: {reason}")


# ------------------------------------------------------------------------------------------------------ rules


def whole(minimum: int, *, also: tuple = (), hint: str = "") -> Rule:
    """An integer >= ``minimum``, or one of the special values ``also`` (explained by ``hint``)."""

    def rule(value) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int):
            return "must be an integer"
        if value < minimum and value not in also:
            return f"must be {'a positive integer' if minimum == 1 else f'an integer >= {minimum}'}{hint}"
        return None

    return rule


def whole_or(*words: str) -> Rule:
    """An integer >= 0, or one of ``words``."""

    def rule(value) -> str | None:
        if value in words:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            return f"must be an integer >= 0 or {' or '.join(repr(w) for w in words)}"
        return None

    return rule


def freeze_item(text: str) -> int | str:
    """argparse type of one --freeze item: an integer when it reads as one, else the word as given."""
    try:
        return int(text)
    except ValueError:
        return text


def between(low: int, high: int) -> Rule:
    """An integer in [low, high]."""

    def rule(value) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            return f"must be an integer from {low} to {high}"
        return None

    return rule


def fraction(*, open_high: bool = False, what: str = "") -> Rule:
    """A finite number in [0, 1], or [0, 1) with ``open_high``."""
    interval = "[0, 1)" if open_high else "[0, 1]"

    def rule(value) -> str | None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return f"must be a number in {interval}{what}"
        if not (0 <= value < 1 if open_high else 0 <= value <= 1):
            return f"must be in {interval}{what}"
        return None

    return rule


def each(rule: Rule, counts: tuple[int, ...] = ()) -> Rule:
    """A list whose every item passes ``rule`` (and whose length is one of ``counts``, when given)."""

    def check(values) -> str | None:
        values = values if isinstance(values, (list, tuple)) else [values]
        if counts and len(values) not in counts:
            return f"expected {' or '.join(map(str, counts))} value{'s' * (max(counts) > 1)}, got {len(values)}"
        for value in values:
            if reason := rule(value):
                return f"{value}: {reason}" if len(values) > 1 else reason
        return None

    return check


def one_of(*choices: str) -> Rule:
    def rule(value) -> str | None:
        return None if value in choices else f"expected one of {', '.join(choices)}"

    return rule


def not_empty(value) -> str | None:
    return "must not be empty" if not str(value).strip() else None


def device_spec(value) -> str | None:
    """'' (automatic), 'cpu', 'mps', or CUDA indices such as 0, 0,1 or cuda:0."""
    spec = str(value).strip().lower().replace(" ", "")
    if not DEVICE_PATTERN.match(spec):
        return "expected cpu, or CUDA device indices such as 0 or 0,1"
    return None


def suffix(*suffixes: str, what: str = "") -> Rule:
    """A path ending in one of ``suffixes`` (an empty value passes: the flag was left out)."""

    def rule(value) -> str | None:
        paths = value if isinstance(value, (list, tuple)) else [value]
        for path in map(str, paths):
            if path and Path(path).suffix.lower() not in suffixes:
                listed = f"{', '.join(suffixes[:-1])} or {suffixes[-1]}" if len(suffixes) > 1 else suffixes[0]
                return f"expected {what or f'a {listed} file'}"
        return None

    return rule


def found(finder: Callable, what: str) -> Rule:
    """A file that ``finder`` resolves (it raises UserInputError when it cannot); empty values and dicts pass."""

    def rule(value) -> str | None:
        if isinstance(value, dict) or not str(value):
            return None
        try:
            finder(value)
        except UserInputError:
            return what
        return None

    return rule


def existing_file(value) -> str | None:
    """A path to a file (True, the flag without a value, and '', the flag left out, pass)."""
    if isinstance(value, str) and value and not Path(value).is_file():
        return "no such file"
    return None


def on_cpu(device_flag: str) -> bool:
    """Whether ``--device`` means the CPU: 'cpu', or automatic on a machine without CUDA."""
    spec = str(device_flag).strip().lower()
    return spec == "cpu" or (spec == "" and not torch.cuda.is_available())
