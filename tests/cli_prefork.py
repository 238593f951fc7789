"""Run many command lines of the repository's scripts, each in its own process, without paying the imports each time.

    python tests/cli_prefork.py cases.json results.json

``cases.json`` is a list of [script, [args...]]. This process imports the scripts' modules once, then forks one child
per case; the child runs the script as ``python script args...`` would (``runpy`` with ``__name__ == "__main__"``,
``sys.argv`` set, stdout and stderr going to one file) and exits with the script's exit status. An exception that
escapes the script is printed as the interpreter prints it, with exit status 1. ``results.json`` receives
[{"rc": status, "output": text}] in case order.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import tempfile
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(script: str, args: list[str], output: str) -> None:
    """In the forked child: the script's run, then the process ends with its exit status (never returns)."""
    fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.argv = [script, *args]
    code = 0
    try:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001  what the interpreter does with an uncaught exception
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def run_case(script: str, args: list[str], folder: str) -> dict:
    output = os.path.join(folder, "output.txt")
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        child(script, args, output)
    _, status = os.waitpid(pid, 0)
    return {"rc": os.waitstatus_to_exitcode(status), "output": Path(output).read_text(errors="replace")}


def main(cases_file: str, results_file: str) -> None:
    os.chdir(ROOT)
    sys.path.insert(0, str(ROOT))
    import detect  # noqa: F401  the expensive imports, shared by every child
    import export  # noqa: F401
    import train  # noqa: F401
    import val  # noqa: F401

    cases = json.loads(Path(cases_file).read_text())
    with tempfile.TemporaryDirectory() as folder:
        results = [run_case(script, args, folder) for script, args in cases]
    Path(results_file).write_text(json.dumps(results))


if __name__ == "__main__":
    main(*sys.argv[1:3])
