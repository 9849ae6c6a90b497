"""The command line: bad counts are one usage line, never a traceback."""
import subprocess
import sys

import pytest


@pytest.mark.parametrize("args", [
    ["train", "--run-dir", "RUN", "--model", "DiT-2x32x2/2", "--steps", "0"],
    ["train", "--run-dir", "RUN", "--model", "DiT-2x32x2/2", "--batch", "-4"],
    ["sample", "--checkpoint", "C.pt", "--out", "OUT", "--batch-size", "0"],
    ["bench", "--model", "DiT-S/8", "--batch", "many"],
])
def test_non_positive_counts_are_rejected_before_anything_runs(tmp_path, args):
    args = [a.replace("RUN", str(tmp_path / "run")) for a in args]
    out = subprocess.run([sys.executable, "-m", "harness", *args], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and ("at least 1" in out.stderr or "whole number" in out.stderr)
    assert not (tmp_path / "run").exists()
