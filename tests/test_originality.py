"""The clean-room promise, kept by the test suite: the team's originality check (shared/originality/check.py) finds
no code region and no string that follows upstream YOLOv5 or Ultralytics, in the product or in the tests."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers import ROOT, SHARED


def test_originality_check_is_clean():
    check = SHARED / "originality" / "check.py"
    assert check.is_file(), f"{check} is missing: the check needs the team's shared folder beside the repository"
    out = subprocess.run([sys.executable, str(check), "--include-tests", str(ROOT)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
