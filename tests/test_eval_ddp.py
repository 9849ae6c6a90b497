"""Sharded evaluation: two real processes (gloo, CPU) sample the same images and get the same
metrics as one; a rank that never arrives fails the others after the configured bound, not hours."""
from __future__ import annotations

import datetime as dt
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from harness.config.layout import RunFolder, samples_name
from harness.training.evaluation import eval_settings
from harness.training.evaluator import evaluate_step, pending_evals
from harness.io import read_jsonl
from harness.training.runtime import Dist, bounded_barrier, distributed
from train_tiny import nudged_tiny_dit, tiny_run

TESTS = str(Path(__file__).resolve().parent)
STEP = 2
# 22 samples in global batches of 5: 5 batches, the last one short, 3 on rank 0 and 2 on rank 1
EVAL = dict(num_samples=22, batch_size=5, sampler="ddpm", sampling_steps=[3], cfg_scales=[1.0, 2.0])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ema() -> torch.nn.Module:
    return nudged_tiny_dit().eval()


def _as_rank(rank: int, world: int, port: int) -> None:
    sys.path.insert(0, TESTS)
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def _join(rank: int, world: int, port: int) -> Any:
    """The product's process group for a `with` block (runtime.distributed: torn down on the way out; a worker
    that exits with a live gloo group can abort in its destructors)."""
    _as_rank(rank, world, port)
    return distributed()


def _eval_worker(rank: int, world: int, port: int, run_dir: str) -> None:
    with _join(rank, world, port) as dist:
        run, ema = tiny_run(at_steps=[STEP], eval=EVAL), _ema()
        pending_evals(run, Path(run_dir), ema, dist, upto=STEP, current=STEP)
        again = evaluate_step(run, Path(run_dir), ema, dist, STEP)  # every rank agrees nothing is left
    Path(run_dir, f"again.{rank}").write_text(str(again))


@pytest.mark.slow
def test_two_rank_evaluation_matches_one_rank(tmp_path):
    run = tiny_run(at_steps=[STEP], eval=EVAL)
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert evaluate_step(run, tmp_path / "one", _ema(), Dist(), STEP) == 2
    finally:
        torch.set_num_threads(old)
    mp.spawn(_eval_worker, args=(2, _free_port(), str(tmp_path / "two")), nprocs=2, join=True)

    assert [Path(tmp_path / "two", f"again.{r}").read_text() for r in (0, 1)] == ["0", "0"]
    one, two = (list(read_jsonl(tmp_path / d / "eval.jsonl")) for d in ("one", "two"))
    assert len(one) == len(two) == 2 and [r["ranks"] for r in one + two] == [1, 1, 2, 2]
    for a, b in zip(one, two):
        assert (a["cfg_scale"], a["sampling_steps"]) == (b["cfg_scale"], b["sampling_steps"])
        for key in ("fid", "sfid", "inception_score", "precision", "recall"):
            # exact by design: each batch's features come from bitwise-equal images (checked below), in a batch of
            # the same size, on one thread, whichever rank computes them; rank 0 concatenates them in the same order
            assert a[key] is not None and a[key] == b[key], (key, a[key], b[key])
    fids = [r["fid"] for r in one]
    assert fids[0] != fids[1]  # the two guidance scales give different samples: the check can fail
    for name in sorted(p.name for p in (tmp_path / "one" / "samples").glob("*.npz")):
        with np.load(tmp_path / "one" / "samples" / name) as a, np.load(tmp_path / "two" / "samples" / name) as b:
            assert a["arr_0"].shape == (22, 8, 8, 3) and np.array_equal(a["arr_0"], b["arr_0"]), name
            assert np.array_equal(a["arr_1"], b["arr_1"]) and np.array_equal(a["arr_1"], np.arange(22) % 10)
            assert len(np.unique(a["arr_0"].reshape(22, -1), axis=0)) == 22  # distinct noise per sample
        # the streamed file itself: the same bytes whichever ranks wrote it
        assert (tmp_path / "one" / "samples" / name).read_bytes() == (tmp_path / "two" / "samples" / name).read_bytes()


def _late_worker(rank: int, world: int, port: int, out: str) -> None:
    with _join(rank, world, port) as dist:
        if rank == 1:
            time.sleep(6)  # never arrives within rank 0's bound
        t0 = time.perf_counter()
        try:
            bounded_barrier(dist, "a test barrier", timeout=dt.timedelta(seconds=2))
            result = {"ok": True}
        except RuntimeError as err:
            result = {"ok": False, "error": str(err)}
        result["waited_s"] = time.perf_counter() - t0
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))


@pytest.mark.slow
def test_a_missing_rank_fails_the_barrier_after_the_bound(tmp_path):
    mp.spawn(_late_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    assert not r0["ok"] and r0["waited_s"] < 5, r0
    assert "did not arrive within 0:00:02" in r0["error"] and "1" in r0["error"], r0


def _train_run():
    return tiny_run(steps=4, at_steps=[2, 4], eval={**EVAL, "keep_samples": "last"})


def _train_worker(rank: int, world: int, port: int, run_dir: str) -> None:
    from harness.training.train import run_training

    _as_rank(rank, world, port)   # run_training joins the group and leaves it
    run_training(_train_run(), Path(run_dir))


@pytest.mark.slow
def test_two_rank_training_evaluates_on_both_ranks(tmp_path):
    """train.py's call sites: every rank enters the evaluation at each eval step, rank 0 records it (and, under
    eval.keep_samples: last, removes step 2's npz files once step 4 is recorded)."""
    mp.spawn(_train_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    records = list(read_jsonl(tmp_path / "eval.jsonl"))
    assert sorted((r["step"], r["cfg_scale"]) for r in records) == [(2, 1.0), (2, 2.0), (4, 1.0), (4, 2.0)]
    assert all(r["ranks"] == 2 and r["fid"] > 0 for r in records) and (tmp_path / "done").exists()
    assert (tmp_path / "samples" / "grid_step_0000004.png").exists()
    assert sorted(p.name for p in (tmp_path / "samples").glob("*.npz")) == sorted(
        samples_name(s) for s in eval_settings(_train_run(), 4))


# rank 0's host memory for images (issue 23): 60 samples in global batches of 5 on 2 ranks -- 6 rounds
MEMORY_EVAL = dict(num_samples=60, batch_size=5, sampler="ddpm", sampling_steps=[2], cfg_scales=[1.0])


def _memory_worker(rank: int, world: int, port: int, run_dir: str) -> None:
    """Evaluate on `world` ranks; rank 0 records the most image bytes (uint8 arrays from sampling or from
    the gather) alive at once, sampled whenever a new image array appears."""
    import weakref

    from harness.training import evaluator

    alive: dict[int, weakref.ref] = {}   # id -> a weak reference that leaves when the array dies
    peak = [0]

    def track(images) -> None:
        key = id(images)
        alive[key] = weakref.ref(images, lambda _, key=key: alive.pop(key, None))
        peak[0] = max(peak[0], sum(a.nbytes for a in (r() for r in list(alive.values())) if a is not None))

    sample_batch, gather = evaluator._sample_batch, evaluator.gather_to_main

    def tracked_sample(*args, **kwargs):
        out = sample_batch(*args, **kwargs)
        track(out[1])
        return out

    def tracked_gather(obj, *args, **kwargs):
        parts = gather(obj, *args, **kwargs)
        for part in parts or []:
            if part is not None:
                track(part[1])
        return parts

    with _join(rank, world, port) as dist:
        if dist.main:
            evaluator._sample_batch, evaluator.gather_to_main = tracked_sample, tracked_gather
        evaluate_step(tiny_run(at_steps=[STEP], eval=MEMORY_EVAL), Path(run_dir), _ema(), dist, STEP)
    if dist.main:
        Path(run_dir, "peak_image_bytes").write_text(str(peak[0]))


@pytest.mark.slow
def test_rank_zero_holds_one_gathered_batch_per_rank_not_every_image(tmp_path):
    mp.spawn(_memory_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    image = 8 * 8 * 3
    peak = int((tmp_path / "peak_image_bytes").read_text())
    (setting,) = eval_settings(tiny_run(at_steps=[STEP], eval=MEMORY_EVAL), STEP)
    with np.load(RunFolder(tmp_path).samples_npz(setting)) as f:
        assert f["arr_0"].shape == (60, 8, 8, 3) and np.array_equal(f["arr_1"], np.arange(60) % 10)
    assert 5 * image <= peak <= 2 * 5 * image, peak   # at least its own batch, at most one round (2 ranks x 5)
    assert peak < 60 * image / 3                      # the whole set would be 6 times the bound: the check can fail
