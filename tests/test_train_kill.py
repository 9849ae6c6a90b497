"""SIGKILL while a checkpoint is being written, or slimmed: the restart is still bitwise equal."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from harness.config.layout import RunFolder, sidecar_path
from harness.launch import repair
from harness.models.checkpoint import SLOW_SAVE_ENV, SLOW_SLIM_ENV, verify_checkpoint
from harness.io import read_jsonl
from train_tiny import assert_bitwise_equal, final_state, tiny_run

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import logging, sys, torch
logging.basicConfig(level=logging.INFO)
sys.path.insert(0, {tests!r})
torch.set_num_threads(1)
from pathlib import Path
from harness.training.train import run_training
from train_tiny import tiny_run
run_training({run}, Path(sys.argv[1]))
"""
#: evaluated at every checkpoint, keep_last 1: the save of step 4 slims step 2's checkpoint
SLIM_RUN = ("tiny_run(steps=6, keep_last=1, at_steps=[2, 4, 6], "
            "eval=dict(num_samples=7, batch_size=7, sampler='ddpm', sampling_steps=[2], metrics=['fid']))")


def _start(tmp_path: Path, run_dir: Path, env_extra: dict, run: str = "tiny_run(steps=6)") -> subprocess.Popen:
    script = tmp_path / "job.py"
    script.write_text(SCRIPT.format(tests=str(ROOT / "tests"), run=run))
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


@pytest.fixture(scope="module")
def clean_slim_run(tmp_path_factory):
    """SLIM_RUN trained without a kill, in its own process as the killed one."""
    tmp = tmp_path_factory.mktemp("clean")
    proc = _start(tmp, tmp / "run", {}, SLIM_RUN)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out
    return tmp / "run"


@pytest.mark.slow
@pytest.mark.parametrize("point", ["unsealed", "replaced"])
def test_sigkill_while_slimming_loses_nothing_and_the_restart_finishes_it(tmp_path, point, clean_slim_run):
    """Killed with step 2's old sidecar gone and its slim copy written but not in place ("unsealed"), or in place
    without its new sidecar yet ("replaced"): the checkpoint is whole either way and has no sidecar (never one
    that does not match); the restart seals and slims it and trains on, bitwise as the run never killed."""
    killed = tmp_path / "killed"
    proc = _start(tmp_path, killed, {SLOW_SLIM_ENV: f"2:{point}:60"}, SLIM_RUN)
    two, four = RunFolder(killed).checkpoint(2), RunFolder(killed).checkpoint(4)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if sidecar_path(four).exists() and two.exists() and not sidecar_path(two).exists():
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[0]
    assert not sidecar_path(two).exists(), "the slimming of step 2 never started"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    temps = list(two.parent.glob(".step_0000002.pt.*.tmp"))
    state = torch.load(two, weights_only=True)          # complete: whole before the rename, slim after it
    assert ("opt" in state, len(temps)) == ((True, 1) if point == "unsealed" else (False, 0))
    assert repair.damage(tiny_run(), killed).startswith("step_0000002.pt has no checksum file")

    resumed = _start(tmp_path, killed, {}, SLIM_RUN)
    out = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, out
    assert "step_0000002.pt had no checksum file (a slimming cut short?)" in out
    assert not list(two.parent.glob(".*.tmp"))
    for step in (2, 4):
        assert verify_checkpoint(RunFolder(killed).checkpoint(step)) is None
        got, want = final_state(killed, step), final_state(clean_slim_run, step)
        assert "opt" not in got and all(torch.equal(got[k][n], want[k][n]) for k in ("model", "ema") for n in got[k])
    assert_bitwise_equal(final_state(killed, 6), final_state(clean_slim_run, 6))
    records = [(r["step"], r["fid"]) for r in read_jsonl(RunFolder(killed).eval_log)]
    assert records == [(r["step"], r["fid"]) for r in read_jsonl(RunFolder(clean_slim_run).eval_log)]
    assert [step for step, _ in records] == [2, 4, 6]
