"""OpenVINO and INT8 export, and the OpenVINO/INT8 backends: the cases in tests/isolated_openvino.py, run in their own
pytest process.

After OpenVINO and NNCF have converted, compiled and quantized models inside the main pytest process, later tests
that use DataLoader worker processes and DDP subprocesses crashed it (a corrupted Python heap, segfault), also when
these cases ran last. Reproduce: rename isolated_openvino.py to test_*.py and run
``pytest tests/isolated_openvino.py tests/test_data.py tests/test_ddp.py``. The cause is not found yet (not the import
alone, not OpenVINO's shared input buffers); a single val.py or detect.py run on an OpenVINO model is unaffected.
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
