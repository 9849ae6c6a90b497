"""train.ckpt_every_minutes: a checkpoint after that much training time as well as every ckpt_every steps, so a
preempted or failed job loses minutes, not the hours between step checkpoints (sweeps/gflops.yaml saves every
50,000 steps). Asked at log steps; with several ranks any rank's clock decides for all."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import harness.training.train as train_mod
from harness.models.checkpoint import list_checkpoints
from harness.training.train import STEP_DELAY_ENV, run_training
from train_tiny import as_rank, final_state, free_port, tiny_run

TESTS = str(Path(__file__).resolve().parent)
# 12 steps, a log step every 2, a step checkpoint only at the end: every other checkpoint is a timed one
RUN = dict(steps=12, ckpt_every=1000, log_every=2, keep_last=100)


def steps_saved(run_dir: Path) -> list[int]:
    return [s for s, _ in list_checkpoints(run_dir / "checkpoints")]


def test_timed_checkpoints_land_on_log_steps_and_resume_exactly(tmp_path, monkeypatch):
    monkeypatch.setenv(STEP_DELAY_ENV, "0.06")        # > 0.1 s between log steps: every one is due at 0.1 s
    run_training(tiny_run(**RUN, ckpt_every_minutes=0.1 / 60), tmp_path / "timed")
    assert steps_saved(tmp_path / "timed") == [2, 4, 6, 8, 10, 12]
    run_training(tiny_run(**RUN, ckpt_every_minutes=0), tmp_path / "off")
    assert steps_saved(tmp_path / "off") == [12]
    # a job killed after the timed checkpoint at step 10 resumes from it, bitwise on the uninterrupted path
    (tmp_path / "timed" / "checkpoints" / "step_0000012.pt").unlink()
    (tmp_path / "timed" / "done").unlink()
    run_training(tiny_run(**RUN, ckpt_every_minutes=0.1 / 60), tmp_path / "timed")
    a, b = final_state(tmp_path / "timed", 12), final_state(tmp_path / "off", 12)
    for part in ("model", "ema"):
        for name, w in a[part].items():
            assert torch.equal(w, b[part][name]), (part, name)


def test_no_timed_checkpoint_before_the_interval(tmp_path):
    run_training(tiny_run(**RUN, ckpt_every_minutes=60), tmp_path / "run")   # seconds of training
    assert steps_saved(tmp_path / "run") == [12]


class _FastClock:
    """`time` whose perf_counter clock runs 10^7 times fast on rank 1 only: a millisecond of training reads as 2.8 hours
    there, so only rank 1 finds a checkpoint due."""

    def __getattr__(self, name):
        return getattr(time, name)

    @staticmethod
    def perf_counter() -> float:
        return time.perf_counter() * (1e7 if os.environ.get("RANK") == "1" else 1.0)


def _worker(rank: int, world: int, port: int, run_dir: str) -> None:
    sys.path.insert(0, TESTS)
    as_rank(rank, world, port)
    train_mod.time = _FastClock()
    run_training(tiny_run(**RUN, ckpt_every_minutes=60), Path(run_dir))


@pytest.mark.slow
def test_any_ranks_clock_decides_for_all(tmp_path):
    """Rank 1 is due at every log step, rank 0 never: rank 0, the one that writes, still saves them all."""
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path / "ddp")), nprocs=2, join=True)
    assert steps_saved(tmp_path / "ddp") == [2, 4, 6, 8, 10, 12]
