"""What every benchmark task shares: the machine header, the matmul reference rate and the efficiency formulas,
round-robin timing, peak memory, logged subprocesses, and the CSV / Markdown writers."""

from __future__ import annotations

import argparse
import csv
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from utils.general import ROOT, machine_summary

MIB = 2**20
RunResult = tuple[int, float, float, str]  # exit code, wall seconds, peak resident MiB, output text
OUTPUT_FOLDER = ROOT / "runs/benchmarks"


# ------------------------------------------------------------------------------------------------------ machine


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (the processor name elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def available_cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def command_line() -> str:
    """The command that started this run, as a user would type it from the repository root."""
    return f"python -m benchmarks {shlex.join(sys.argv[1:])}".rstrip()


def header_lines(threads: int) -> list[str]:
    """The exact command line and a machine summary, printed and written above every table."""
    return [f"command: {command_line()}",
            f"machine: {machine_summary()}, {cpu_model()}, {available_cores()} cores, "
            f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
            f"torch {torch.__version__}, threads: {threads}, {time.strftime('%Y-%m-%d %H:%M:%S')}"]


# ------------------------------------------------------------------------------------------------------- timing


def interleaved_medians(fns: dict[str, Callable[[], object]], runs: int, warmup: int,
                        clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Median ``clock`` seconds of each function; the timed runs go round-robin so a change of load hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            start = clock()
            fn()
            times[name].append(clock() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def matmul_gflops(size: int = 2048, runs: int = 10) -> float:
    """float32 GFLOP/s of a size x size x size matrix product (median of ``runs``, current torch threads)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    out = torch.empty(size, size)
    seconds = interleaved_medians({"mm": lambda: torch.mm(a, b, out=out)}, runs, warmup=1)["mm"]
    return 2 * size**3 / seconds / 1e9


def efficiency(gflop: float | None, seconds: float, matmul: float) -> float | None:
    """Achieved FLOP rate of ``gflop`` done in ``seconds``, as a fraction of the matmul rate."""
    return None if gflop is None else gflop / seconds / matmul


def train_efficiency(images_per_s: float, forward_gflops: float, matmul: float) -> float:
    """Training efficiency: images/s x 3 x forward GFLOPs (backward ~ 2 x forward) / matmul GFLOP/s."""
    return images_per_s * 3 * forward_gflops / matmul


# ------------------------------------------------------------------------------------------------------- memory


def maxrss_mib(ru_maxrss: int) -> float:
    """A getrusage/wait4 ``ru_maxrss`` in MiB (the kernel reports KiB on Linux, bytes on macOS)."""
    return ru_maxrss / MIB if sys.platform == "darwin" else ru_maxrss / 1024


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far."""
    return maxrss_mib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def run_logged(command: list[str], log: Path, cwd: Path = ROOT, env: dict | None = None) -> RunResult:
    """Run ``command`` with its output (stdout and stderr) going to ``log``.

    Returns (exit code, wall seconds, peak resident MiB of the child, output text). The peak comes from the
    child's own resource usage (``os.wait4``), so the parent's memory does not count.
    """
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except KeyboardInterrupt:
            proc.kill()
            raise
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.perf_counter() - start, maxrss_mib(usage.ru_maxrss), log.read_text(errors="replace")


# ------------------------------------------------------------------------------------------------------ reports


def fmt(value, digits: int = 3) -> str:
    """A table cell: numbers to ``digits`` significant figures, missing values as '-'."""
    if value is None or value == "":
        return "-"
    if not isinstance(value, float):
        return str(value)
    return f"{value:.0f}" if abs(value) >= 10**digits else f"{value:.{digits}g}"


def markdown_row(cells: Iterable) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def markdown_rule(align: str) -> str:
    """The separator line under a header: one letter per column, 'l' left (plain) or 'r' right aligned."""
    return "|" + "".join("---:|" if a == "r" else "---|" for a in align)


def markdown_table(header: list[str], rows: Iterable[Iterable], align: str | None = None) -> list[str]:
    """Lines of a Markdown table; ``align`` as in ``markdown_rule`` (default: every column plain)."""
    return [markdown_row(header), markdown_rule(align or "l" * len(header)), *(markdown_row(r) for r in rows)]


def write_csv(file: Path, rows: list[dict], columns: list[str]) -> None:
    """``rows`` under ``columns`` (keys outside them left out, missing ones empty); the folder is created."""
    file.parent.mkdir(parents=True, exist_ok=True)
    with open(file, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def write_text(file: Path, lines: list[str]) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text("\n".join(lines) + "\n")


def standard_options(parser: argparse.ArgumentParser, name: str, threads: bool = True) -> None:
    """--threads (unless ``threads`` is False), and --csv / --md, by default runs/benchmarks/<name>.csv and .md."""
    if threads:
        parser.add_argument("--threads", type=int, default=available_cores(), help="torch threads (default: all cores)")
    parser.add_argument("--csv", type=Path, default=OUTPUT_FOLDER / f"{name}.csv", help="CSV output path")
    parser.add_argument("--md", type=Path, default=OUTPUT_FOLDER / f"{name}.md", help="Markdown output path")
