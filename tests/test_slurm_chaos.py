"""Chaos on the local Slurm (issue 28): a small sweep disturbed at random moments of its training by
`scontrol requeue`, `scancel` and `kill -9` of a training process, each failed run resubmitted by the
next `harness sweep`, then run to completion. Its models, EMA and FIDs equal an undisturbed sweep's
bitwise. The plan comes from a seeded random.Random: HARNESS_CHAOS_SEED=N replays plan N (the moments
are training steps, so a replay lands close to where the failure did)."""
from __future__ import annotations

import os
import random
import re
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from harness.launch.dispatch import dispatch
from harness.io import read_jsonl
from harness.config.spec import load_spec
from harness.config.layout import load_state, sweep_dir
from harness.launch.status import ACTIVE_STATES, run_statuses, sacct_states, train_progress
from slurm_tools import need_slurm, wait_until
from train_tiny import assert_bitwise_equal, final_state

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
STEPS = 60


def _spec(tmp_path: Path, kind: str) -> Path:
    """sweeps/smoke.yaml's two models and evaluation, 60 steps, a checkpoint every 5."""
    doc = yaml.safe_load((ROOT / "sweeps" / "smoke.yaml").read_text())
    doc["name"] = "chaos"
    doc["train"].update(steps=STEPS, ckpt_every=5, log_every=1)
    doc["eval"]["at_steps"] = [30, STEPS]
    doc["launcher"].update(kind=kind, mem_gb=2, timeout_min=10, array_parallelism=2)
    path = tmp_path / kind / "chaos.yaml"
    path.parent.mkdir(parents=True)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _plan(rng: random.Random) -> list[tuple[str, int, int]]:
    """(disturbance, run index, steps of training to wait for): each kind once in a random order, then
    one more at random (the last may find both runs finished)."""
    kinds = ["requeue", "scancel", "kill -9"]
    rng.shuffle(kinds)
    kinds += [rng.choice(kinds)]
    return [(k, rng.randrange(2), rng.randint(1, 12)) for k in kinds]


def _squeue_state(job_id: str) -> str:
    return subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True,
                          timeout=30).stdout.strip()


def _training_pids(job_id: str) -> list[str]:
    """The job's task processes (step 0, a local id: the python submitit started), from listpids."""
    shown = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, timeout=30).stdout
    raw = re.search(r"JobId=(\d+)", shown)
    if not raw:
        return []
    rows = subprocess.run(["scontrol", "listpids", raw.group(1)], capture_output=True, text=True, timeout=30)
    return [r.split()[0] for r in rows.stdout.splitlines()[1:]
            if len(r.split()) >= 4 and r.split()[2] == "0" and r.split()[3] != "-"]


def _disturb(kind: str, job_id: str, log: list[str]) -> None:
    if kind == "requeue":
        subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=30)
        wait_until(lambda: _squeue_state(job_id) == "PENDING", 120, f"job {job_id} pending after its requeue", 0.2)
        # Slurm holds a requeued job back (BeginTime): let it start again now
        subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True, timeout=30)
    elif kind == "scancel":
        subprocess.run(["scancel", job_id], check=True, timeout=30)
    else:
        pids: list[str] = []
        wait_until(lambda: bool(pids.extend(_training_pids(job_id)) or pids), 60, f"job {job_id}'s task", 0.2)
        subprocess.run(["kill", "-9", *pids], check=True, timeout=30)
    log.append(f"{time.strftime('%H:%M:%S')} {kind} job {job_id}")


def test_sweep_disturbed_by_requeue_scancel_and_kill_equals_an_undisturbed_one(tmp_path, monkeypatch):
    need_slurm()
    seed = int(os.environ.get("HARNESS_CHAOS_SEED") or random.SystemRandom().randrange(10**6))
    plan = _plan(random.Random(seed))
    log = [f"HARNESS_CHAOS_SEED={seed} plan={plan}"]
    print(log[0], flush=True)
    t0 = time.monotonic()
    monkeypatch.setenv("HARNESS_POLL_S", "1")

    ref_results = tmp_path / "undisturbed"
    reference = dispatch(load_spec(_spec(tmp_path, "debug")), ref_results, "debug")
    assert all(s.state == "done" for s in reference), reference

    spec = load_spec(_spec(tmp_path, "slurm"))
    results = tmp_path / "results"
    monkeypatch.setenv("HARNESS_TEST_STEP_DELAY_S", "0.25")  # >= 15 s of training per run: room to disturb
    statuses = dispatch(spec, results, wait=False)
    try:
        for kind, index, steps in plan:
            if statuses[index].state == "done":  # finished already: disturb the other run if it is not
                index = 1 - index
            run = statuses[index].run
            rdir = statuses[index].dir
            armed = train_progress(rdir)
            target: list = []

            def ready() -> bool:
                now = run_statuses(spec, results)[index]
                target[:] = [now]
                return now.state in ("done", "failed") or (now.state == "running" and
                                                            train_progress(rdir) >= armed + steps)

            wait_until(ready, 300, f"{run.run_id} to train {steps} more steps", poll_s=0.2)
            now = target[0]
            if now.state == "done":
                log.append(f"{kind}: skipped, {run.run_id} had finished")
                continue
            if now.state == "running":
                _disturb(kind, now.job_id, log)
                log[-1] += f" ({run.run_id} at step {train_progress(rdir)})"
                if kind != "requeue":  # submitit ignores scancel's SIGTERM: a run within KillWait of its end
                    #                        finishes before the SIGKILL comes, and is done, not failed
                    wait_until(lambda: run_statuses(spec, results)[index].state in ("failed", "done"), 120,
                               f"{run.run_id} to show as failed (or done) after {kind}", poll_s=0.5)
            failed = run_statuses(spec, results)[index]
            if kind == "kill -9" and failed.state == "failed":
                wait_until(lambda: "killed by signal 9 (SIGKILL)" in (run_statuses(spec, results)[index].reason
                                                                      or ""), 60, "the signal in the reason", 0.5)
            log.append(f"{run.run_id}: {run_statuses(spec, results)[index].reason}")
            statuses = dispatch(spec, results, wait=False)  # resubmits what failed, keeps what is queued
            log.append(f"resubmitted: {[(s.run.run_id, s.state, s.job_id) for s in statuses]}")
        monkeypatch.delenv("HARNESS_TEST_STEP_DELAY_S")
        final = dispatch(spec, results)  # run to completion
        # a job requeued during its last evaluation may restart after the run is done: let it end first
        ids = [e["job_id"] for e in load_state(sweep_dir(results, spec.name))["runs"].values()]
        wait_until(lambda: not ACTIVE_STATES & set(sacct_states(ids).values()), 120, "every job to end", 0.5)
    except BaseException:
        print("\n".join(log), flush=True)
        raise
    print("\n".join(log) + f"\nchaos sweep wall time {time.monotonic() - t0:.0f} s", flush=True)
    assert all(s.state == "done" for s in final), (final, log)

    for ref, got in zip(reference, final):
        assert ref.run.run_id == got.run.run_id
        assert_bitwise_equal(final_state(ref.dir, STEPS), final_state(got.dir, STEPS))
        fids = lambda d: sorted((r["step"], r["fid"]) for r in read_jsonl(d / "eval.jsonl"))  # noqa: E731
        assert fids(got.dir) == fids(ref.dir), (fids(got.dir), fids(ref.dir), log)  # each once, equal
