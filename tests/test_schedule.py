"""harness.cost.schedule: GPUs per run by the stated rule, the queue simulated deterministically, refusals in one
line; and the plan that carries them (run ids independent of the GPU count)."""
from __future__ import annotations

from pathlib import Path

import pytest

from harness.errors import HarnessError
from harness.cost.plan import format_table, plan_sweep
from harness.cost.schedule import EFFICIENT_TOKENS_PER_GPU, REQUEUES, gpus_for_run, simulate, summary
from harness.config.spec import load_spec

GFLOPS = Path(__file__).resolve().parents[1] / "sweeps" / "gflops.yaml"


def test_a_hand_computed_makespan():
    """One node of 2 GPUs: A (2 GPUs, 4 GPU-hours) runs 0-2 h on both; then B (3 h) on GPU 0 and C (1 h) on
    GPU 1, both from 2 h: makespan 5 h, 8 busy GPU-hours of 10."""
    slots = simulate([("A", "a", 2, 4.0), ("B", "b", 1, 3.0), ("C", "c", 1, 1.0)], nodes=1, gpus_per_node=2)
    assert [(s.run_id, s.start_h, s.end_h) for s in slots] == [("A", 0.0, 2.0), ("B", 2.0, 5.0), ("C", 2.0, 3.0)]
    assert summary(slots, 1, 2) == {"makespan_h": 5.0, "utilisation": 0.8, "gpu_hours": 8.0, "critical_run": "B",
                                    "nodes": 1, "gpus_per_node": 2}


def test_small_runs_pack_beside_each_other_and_large_ones_take_whole_nodes():
    slots = simulate([("big", "x", 16, 32.0), ("s1", "y", 1, 1.0), ("s2", "y", 1, 1.0), ("s3", "y", 4, 4.0)],
                     nodes=2, gpus_per_node=8)
    big, s1, s2, s3 = slots
    assert (big.start_h, big.end_h) == (0.0, 2.0)
    assert s1.start_h == s2.start_h == s3.start_h == 2.0 and s1.node == s2.node == s3.node == 0  # side by side


def test_the_schedule_is_deterministic():
    runs = [(f"r{i}", "m", 1 + i % 2, 1.0 + (i * 7) % 5) for i in range(20)]
    assert simulate(runs, 2, 4) == simulate(list(runs), 2, 4)
    a, b = plan_sweep(load_spec(GFLOPS), nodes=1, gpus_per_node=8), plan_sweep(load_spec(GFLOPS), nodes=1, gpus_per_node=8)
    assert a["schedule"] == b["schedule"] and [r["start_h"] for r in a["runs"]] == [r["start_h"] for r in b["runs"]]


def test_auto_gpus_follow_the_rule():
    # 110 GPU-hours, a day's time limit (96 h with 3 requeues), ideal makespan 44 h: 2 GPUs give 55 h > 44, so 4
    assert gpus_for_run("DiT-XL/2", 110.0, 256, 256, 1, 8, 1440, ideal_makespan_h=44.0) == 4
    assert gpus_for_run("DiT-XL/2", 110.0, 256, 256, 1, 8, 1440) == 2  # the time limit alone
    # DiT-S/8: 16 tokens an image, so 256 x 16 = 4,096 tokens a step: below one GPU's efficient share already
    assert 256 * 16 < EFFICIENT_TOKENS_PER_GPU
    assert gpus_for_run("DiT-S/8", 40.0, 256, 16, 1, 8, 1440, ideal_makespan_h=10.0) == 1
    # an override by size letter wins over auto
    assert gpus_for_run("DiT-XL/2", 1.0, 256, 256, 1, 8, 60, overrides={"XL": 8}) == 8


def test_refusals_name_the_model_and_the_fix():
    with pytest.raises(HarnessError, match=r"DiT-XL/2 asks for 16 GPUs; the cluster gives a run at most 8.*Fix: "):
        gpus_for_run("DiT-XL/2", 10.0, 256, 256, 1, 8, 1440, overrides={"DiT-XL/2": 16})
    with pytest.raises(HarnessError) as err:
        gpus_for_run("DiT-S/8", 500.0, 256, 16, 1, 8, 60)
    msg = str(err.value)
    assert "DiT-S/8 needs 500.0 h on 1 GPU(s)" in msg and f"with {REQUEUES} requeues" in msg and "\n" not in msg
    assert "Fix: raise launcher.timeout_min" in msg


def test_the_plan_schedules_every_run_and_gpu_counts_leave_run_ids_alone():
    spec = load_spec(GFLOPS)
    plan = plan_sweep(spec, nodes=1, gpus_per_node=8)
    sched = plan["schedule"]
    assert sched["makespan_h"] == max(r["end_h"] for r in plan["runs"])
    assert sched["gpu_hours"] == pytest.approx(plan["totals"]["accel_hours"], rel=1e-12)
    assert all(r["gpus"] >= 1 and r["end_h"] > r["start_h"] >= 0 for r in plan["runs"])
    text = format_table(plan)
    assert f"makespan {sched['makespan_h']:.1f} h" in text and "GPU utilisation" in text
    eight = load_spec(GFLOPS, ["launcher.gpus_per_run=8"])
    assert [r.run_id for r in eight.expand()] == [r.run_id for r in spec.expand()]
    assert "where no throughput was measured" in format_table(plan_sweep(eight, nodes=1, gpus_per_node=8))
