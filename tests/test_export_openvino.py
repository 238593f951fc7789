"""OpenVINO and INT8 export, and the OpenVINO/INT8 backends: the cases in tests/isolated_openvino.py, run in their own
pytest process.

After OpenVINO has converted, compiled and run models inside the main pytest process, later tests that use
DataLoader worker processes and DDP subprocesses crashed it (segfault), also when these cases ran last. Reproduce:
rename isolated_openvino.py to test_*.py and run ``pytest <it> tests/test_data.py tests/test_ddp.py``. NNCF is not
needed: the five float32 OpenVINO cases together crash it (3 of 3 runs), none of them alone does. Under gdb the main
thread takes the SIGSEGV while it waits in poll() for the torchrun subprocess (faulthandler prints nothing;
OpenVINO's TBB threads are alive); turning off subprocess's vfork changes nothing. The cause is not found; a single
val.py or detect.py run on an OpenVINO model is unaffected.
"""

from __future__ import annotations

import subprocess
import sys

from tests.helpers import ROOT


def test_openvino_cases_in_their_own_process():
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/isolated_openvino.py"],
                         cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and "failed" not in out.stdout
