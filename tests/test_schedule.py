"""harness.cost.schedule: GPUs per run by the stated rule (the allowed counts, then the search for the shortest
makespan among them), the queue simulated deterministically, refusals in one line; and the plan that carries them
(run ids independent of the GPU count, fixed counts honoured exactly)."""
from __future__ import annotations

from pathlib import Path

import pytest

from harness.errors import HarnessError
from harness.cost.plan import format_table, plan_sweep
from harness.cost.schedule import (EFFICIENT_TOKENS_PER_GPU, REQUEUES, choose_gpus, gpu_options, gpus_for_run,
                                   schedule_runs, simulate, summary)
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


def _makespan(runs, counts, nodes, gpus_per_node):
    return max(s.end_h for s in schedule_runs(runs, counts, nodes, gpus_per_node))


def test_the_search_beats_the_rule_count_by_hand():
    """One node of 4 GPUs; A: 12 GPU-hours on 1, 2 or 4 GPUs; B, C, D: 4 GPU-hours on one GPU each. Ideal 24/4 = 6 h.
    The rule count gives A 2 GPUs (12/2 = 6 h <= 6): A on GPUs 0-1 from 0 to 6 h, B and C on GPUs 2 and 3 from 0 to
    4 h, D after B on GPU 2 from 4 to 8 h: makespan 8 h, 24 of 32 GPU-hours busy (75%). The search tries A on 1 GPU
    (12 h alone: makespan 12 h) and on 4 (3 h on them, so it is submitted after B, C, D: they run 0-4 h on GPUs 0,
    1, 2, then A 4-7 h on all four: makespan 7 h, 24 of 28 = 86%) and keeps 4; from 4 nothing is better (A on 2 or
    1 gives 8 or 12 h). 7 h is the best any counts give: with A on 2 GPUs one of the three 4-hour runs follows
    another (>= 8 h); on 4, A's 3 h and a 4-hour run cannot overlap (3 + 4)."""
    runs = [("A", "a", 12.0), ("B", "b", 4.0), ("C", "c", 4.0), ("D", "d", 4.0)]
    options = [[1, 2, 4], [1], [1], [1]]
    rule = [gpus_for_run("DiT-B/2", 12.0, 256, 256, 1, 4, 1440, ideal_makespan_h=6.0), 1, 1, 1]
    assert rule == [2, 1, 1, 1]
    old = schedule_runs(runs, rule, 1, 4)
    assert [(s.start_h, s.end_h) for s in old] == [(0.0, 6.0), (0.0, 4.0), (0.0, 4.0), (4.0, 8.0)]
    assert summary(old, 1, 4)["makespan_h"] == 8.0 and summary(old, 1, 4)["utilisation"] == 0.75
    counts = choose_gpus(runs, options, 1, 4)
    assert counts == [4, 1, 1, 1]
    new = schedule_runs(runs, counts, 1, 4)
    assert [(s.start_h, s.end_h, s.node) for s in new] == [(4.0, 7.0, 0), (0.0, 4.0, 0), (0.0, 4.0, 0), (0.0, 4.0, 0)]
    assert summary(new, 1, 4) == {"makespan_h": 7.0, "utilisation": 24 / 28, "gpu_hours": 24.0, "critical_run": "A",
                                  "nodes": 1, "gpus_per_node": 4}


def test_a_gpu_that_buys_no_makespan_is_not_taken():
    """Two 2-GPU-hour runs on 2 GPUs, each allowed 1 or 2: one GPU each (0-2 h) and both on both GPUs (0-1, 1-2 h)
    both end at 2 h; one wide and one narrow ends at 3 h. The tie goes to fewer GPUs, from either start."""
    runs = [("A", "a", 2.0), ("B", "b", 2.0)]
    assert _makespan(runs, [1, 1], 1, 2) == _makespan(runs, [2, 2], 1, 2) == 2.0 == _makespan(runs, [1, 2], 1, 2) - 1
    assert choose_gpus(runs, [[1, 2], [1, 2]], 1, 2) == [1, 1]


def test_the_search_is_deterministic_never_worse_than_the_rule_and_leaves_fixed_counts_alone():
    import random
    rng = random.Random(25)
    for _ in range(20):
        runs = [(f"r{i}", "m", rng.uniform(0.5, 40.0)) for i in range(rng.randint(1, 14))]
        options = [rng.choice([[1], [1, 2], [1, 2, 4], [2, 4, 8], [8], [4]]) for _ in runs]
        ideal = sum(h for *_, h in runs) / 8
        rule = [next((c for c in o if h / c <= ideal), o[-1]) for (*_, h), o in zip(runs, options)]
        counts = choose_gpus(runs, options, 1, 8)
        assert counts == choose_gpus(list(runs), [list(o) for o in options], 1, 8)
        assert all(c in o for c, o in zip(counts, options))
        assert _makespan(runs, counts, 1, 8) <= _makespan(runs, rule, 1, 8) + 1e-6


def test_allowed_counts_follow_rules_1_and_2():
    # DiT-XL/2: 256 x 256 tokens a step = 8 GPUs' efficient share; 110 h needs 2 GPUs for the 96 h budget
    assert gpu_options("DiT-XL/2", 110.0, 256, 256, 1, 8, 1440) == [2, 4, 8]
    assert gpu_options("DiT-XL/4", 10.0, 256, 64, 1, 8, 1440) == [1, 2]  # 64 tokens: 2 GPUs' share
    assert gpu_options("DiT-XL/8", 10.0, 256, 16, 1, 8, 1440) == [1]
    assert gpu_options("DiT-XL/2", 10.0, 256, 256, 2, 4, 1440) == [1, 2, 4, 8]  # 8 = two whole nodes of 4
    assert gpu_options("DiT-XL/2", 10.0, 256, 256, 2, 6, 1440) == [1, 2, 4]  # 8 is no whole number of 6-GPU nodes
    assert gpu_options("DiT-XL/2", 10.0, 256, 256, 1, 8, 1440, gpus_per_run=2) == [2]
    assert gpu_options("DiT-S/8", 1.0, 256, 16, 1, 8, 1440, overrides={"S": 4}) == [4]


def test_gpu_counts_keep_an_integer_micro_batch_whole():
    """train.micro_batch: 64 of a global 256 allows at most 4 GPUs (a share of 64 each); a fixed count whose
    share it does not divide is refused at plan time, naming the key, instead of at the job's start."""
    assert gpu_options("DiT-XL/2", 110.0, 256, 256, 1, 8, 1440, micro_batch=64) == [2, 4]
    assert gpu_options("DiT-XL/2", 110.0, 256, 256, 1, 8, 1440, micro_batch="auto") == [2, 4, 8]
    with pytest.raises(HarnessError, match=r"DiT-XL/2 on 8 GPUs: train.micro_batch 64 does not divide the per-GPU "
                                           r"batch of 32.*launcher.gpus_per_model / gpus_per_run"):
        gpu_options("DiT-XL/2", 110.0, 256, 256, 1, 8, 1440, overrides={"XL": 8}, micro_batch=64)
    with pytest.raises(HarnessError, match=r"gflops.yaml: DiT-XL/[248] on 8 GPUs: train.micro_batch 64"):
        # one rank per node at spec time: the spec check sees a share of 256, which 64 divides
        plan_sweep(load_spec(GFLOPS, ["train.micro_batch=64", "launcher.gpus_per_model={XL: 8}",
                                      "launcher.tasks_per_node=1"]), gpu="h200", nodes=1, gpus_per_node=8)


def test_the_plan_honours_fixed_gpu_counts_exactly():
    spec = load_spec(GFLOPS, ["launcher.gpus_per_model={XL: 8, DiT-S/2: 2}"])
    runs = plan_sweep(spec, gpu="h200", nodes=1, gpus_per_node=8)["runs"]
    assert all(r["gpus"] == 8 for r in runs if r["model"].startswith("DiT-XL/"))
    assert [r["gpus"] for r in runs if r["model"] == "DiT-S/2"] == [2]
    eight = plan_sweep(load_spec(GFLOPS, ["launcher.gpus_per_run=4"]), gpu="h200", nodes=1, gpus_per_node=8)
    assert {r["gpus"] for r in eight["runs"]} == {4}


def test_the_gflops_study_fits_one_h200_node_in_a_day():
    """Issue 25's goal at the packaged H200 measurements: <= 24 h makespan, >= 90% of the GPUs busy."""
    sched = plan_sweep(load_spec(GFLOPS), gpu="h200", nodes=1, gpus_per_node=8)["schedule"]
    assert sched["makespan_h"] <= 24.0 and sched["utilisation"] >= 0.9, sched


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
