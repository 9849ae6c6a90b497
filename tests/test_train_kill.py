"""SIGKILL while a checkpoint is being written: the restart is still bitwise equal."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.models.checkpoint import SLOW_SAVE_ENV
from harness.io import read_jsonl
from train_tiny import assert_bitwise_equal, final_state

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import logging, sys, torch
logging.basicConfig(level=logging.INFO)
sys.path.insert(0, {tests!r})
torch.set_num_threads(1)
from pathlib import Path
from harness.training.train import run_training
from train_tiny import tiny_run
run_training(tiny_run(steps=6), Path(sys.argv[1]))
"""


def _start(tmp_path: Path, run_dir: Path, env_extra: dict) -> subprocess.Popen:
    script = tmp_path / "job.py"
    script.write_text(SCRIPT.format(tests=str(ROOT / "tests")))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **env_extra)
    return subprocess.Popen([sys.executable, str(script), str(run_dir)], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_sigkill_during_checkpoint_write_then_resume_is_bitwise_equal(tmp_path):
    killed = tmp_path / "killed"
    proc = _start(tmp_path, killed, {SLOW_SAVE_ENV: "4:60"})  # the save of step 4 stalls half-written
    ckpt_dir = killed / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline:
        partial = [p for p in ckpt_dir.glob(".step_0000004.pt.*.tmp") if p.stat().st_size > 0] \
            if ckpt_dir.exists() else []
        if partial or proc.poll() is not None:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[0]
    assert partial, "the checkpoint of step 4 never started"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (ckpt_dir / "step_0000004.pt").exists()  # never renamed into place
    assert (ckpt_dir / "step_0000002.pt").exists()

    resumed = _start(tmp_path, killed, {})
    out = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, out
    assert "resumed" in out and "step_0000002.pt" in out
    assert not list(ckpt_dir.glob(".*.tmp"))  # the partial write was cleaned up
    steps = [r["step"] for r in read_jsonl(killed / "train.jsonl")]
    assert steps == [1, 2, 3, 4, 5, 6], steps  # steps 3 and 4, redone after the kill, recorded once

    clean = _start(tmp_path, tmp_path / "clean", {})
    out = clean.communicate(timeout=300)[0]
    assert clean.returncode == 0, out
    assert_bitwise_equal(final_state(killed, 6), final_state(tmp_path / "clean", 6))
