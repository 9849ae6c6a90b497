"""Per-run GPUs on the local Slurm (issue 25): the node of scripts/local-slurm.sh declares 2 GPUs as a count-only
gres (no device files: Slurm allocates and accounts them, nothing binds a device, and the jobs train on the CPU).
A smoke sweep whose runs are sized to one GPU each runs them side by side on the one node, and sacct shows each
job's gres and their overlap; the run ids are those of the same sweep with another GPU count."""
from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime

import pytest

from harness.config.layout import load_state, sweep_dir
from harness.config.spec import load_spec
from harness.launch.dispatch import dispatch
from slurm_tools import need_slurm
from test_sweep_e2e import ROOT, derived_spec, subprocess_env

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def node_gpus() -> int:
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%G"], capture_output=True, text=True).stdout
    return sum(int(g.split(":")[-1].split("(")[0]) for g in out.split() if g.startswith("gpu"))


def sacct_rows(job_ids: list[str]) -> dict[str, dict]:
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", ",".join(job_ids), "-o", "JobID,Start,End,AllocTRES,State"],
                         capture_output=True, text=True, check=True).stdout
    rows = {}
    for line in out.splitlines():
        job, start, end, tres, state = line.split("|")
        rows[job] = {"start": datetime.fromisoformat(start), "end": datetime.fromisoformat(end), "tres": tres,
                     "state": state}
    return rows


def test_two_one_gpu_runs_share_the_node_at_the_same_time(tmp_path):
    need_slurm()
    if node_gpus() < 2:
        pytest.fail("the local Slurm node declares fewer than 2 GPUs: rerun scripts/local-slurm.sh (it adds gpu:2)")
    spec = derived_spec(tmp_path, "gpus", train={"steps": 40, "ckpt_every": 20}, eval={"at_steps": [40]},
                        launcher={"kind": "slurm", "gpus_per_node": 2, "cpus_per_task": 1, "mem_gb": 1,
                                  "timeout_min": 10})
    env = subprocess_env(HARNESS_TEST_STEP_DELAY_S="0.25")  # each run trains >= 10 s: long enough to overlap
    proc = subprocess.run([sys.executable, "-m", "harness", "sweep", str(spec), "--results", str(tmp_path / "r"),
                           "--no-report"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    runs = load_spec(spec).expand()
    entries = load_state(sweep_dir(tmp_path / "r", "gpus"))["runs"]
    assert [entries[r.run_id]["gpus"] for r in runs] == [1, 1]
    rows = sacct_rows([entries[r.run_id]["job_id"] for r in runs])
    a, b = (rows[entries[r.run_id]["job_id"]] for r in runs)
    assert all(r["state"] == "COMPLETED" and "gres/gpu=1" in r["tres"] for r in (a, b)), rows
    assert a["start"] < b["end"] and b["start"] < a["end"], f"the two jobs did not overlap: {rows}"
    print(json.dumps({k: {**v, "start": str(v["start"]), "end": str(v["end"])} for k, v in rows.items()}))
    two = load_spec(spec, ["launcher.gpus_per_run=2"]).expand()
    assert [r.run_id for r in two] == [r.run_id for r in runs]


def test_arrays_queue_the_runs_in_the_planned_order(tmp_path):
    """Runs sized 2, 1, 2 GPUs in the plan's order (longest first) are submitted as three arrays in that
    order, so Slurm's queue (by job id at equal priority) matches the plan; one array per GPU count would
    have queued the third run before the second."""
    need_slurm()
    models = ["DiT-2x32x2/2", "DiT-2x32x2/4", "DiT-2x32x2/8"]   # longest first: 16, 4 and 1 tokens
    spec = derived_spec(tmp_path, "order", models=models, train={"steps": 10, "ckpt_every": 10},
                        eval={"at_steps": [10]},
                        launcher={"kind": "slurm", "gpus_per_node": 2, "cpus_per_task": 1, "mem_gb": 1,
                                  "timeout_min": 10, "gpus_per_model": {models[0]: 2, models[1]: 1, models[2]: 2}})
    runs = load_spec(spec).expand()
    try:
        dispatch(load_spec(spec), tmp_path / "r", wait=False)
        entries = load_state(sweep_dir(tmp_path / "r", "order"))["runs"]
        jobs = [entries[r.run_id]["job_id"] for r in runs]
        assert [entries[r.run_id]["gpus"] for r in runs] == [2, 1, 2]
        assert len({j.split("_")[0] for j in jobs}) == 3, jobs
        assert jobs == sorted(jobs, key=lambda j: tuple(int(x) for x in j.split("_"))), jobs
    finally:
        subprocess.run(["scancel", "--name", "order"], capture_output=True)
        ids = {e["job_id"].split("_")[0] for e in load_state(sweep_dir(tmp_path / "r", "order"))["runs"].values()
               if e.get("job_id")} if (tmp_path / "r").exists() else set()
        if ids:
            subprocess.run(["scancel", *ids], capture_output=True)
