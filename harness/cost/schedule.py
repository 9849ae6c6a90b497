"""How runs share GPUs: each run's GPU count, and the queue simulated into a schedule with a makespan.

GPUs per run (`launcher.gpus_per_run`): an integer for every run, or `auto`, which gives each run the
fewest GPUs that are a power of two, at most the cluster's (`launcher.nodes` x `gpus_per_node`), such that
  1. each GPU still gets at least EFFICIENT_TOKENS_PER_GPU tokens a step (per-GPU batch x tokens per
     image): the official DiT recipe trains XL/2 at 32 images x 256 tokens per GPU; below that a step
     waits on kernel launches more than it computes (DiT-S/8, 16 tokens an image, at 32 images per GPU
     is 512 tokens), so the measured throughputs would not hold; the batch splits evenly over them,
     and a run spans several nodes only in whole nodes, and
  2. its planned accelerator-hours, spread over those GPUs, finish within launcher.timeout_min x
     (1 + REQUEUES): a job checkpoints and requeues at its time limit, and a run that needs more
     than REQUEUES requeues is a run the plan should not promise, and
  3. they finish within the sweep's ideal makespan, its accelerator-hours over the cluster's GPUs: a
     run longer than that sets the makespan alone, however well the others pack (the critical-path
     bound of list scheduling).
`launcher.gpus_per_model` overrides the rule per model name (DiT-XL/2) or size letter (XL). A run no
count can finish in time, or whose override exceeds a node, is refused at plan time in one line.
The global batch is fixed, so a run's id and maths do not depend on its GPU count.

The schedule: runs are placed in the order `harness sweep` submits them, longest first (hours on their
GPUs; the LPT rule, within 4/3 of the best makespan for one-GPU jobs), each at the earliest time its GPUs
are free, taking (its accelerator-hours) / (its GPUs) hours, i.e. perfect scaling (rule 1 keeps runs in
the regime where the measured throughputs were taken). A gap a GPU leaves is not
filled by a later run (no backfill into the past), so the makespan is an upper bound of Slurm's.
Deterministic: ties go to the lowest node and the lowest GPU.
"""
from __future__ import annotations

from dataclasses import dataclass

from harness.errors import HarnessError

EFFICIENT_TOKENS_PER_GPU = 32 * 256
REQUEUES = 3


@dataclass
class Slot:
    run_id: str
    model: str
    gpus: int
    node: int
    start_h: float
    end_h: float
    accel_h: float


def _override(model: str, overrides: dict) -> int | None:
    size = model.removeprefix("DiT-").split("/")[0]
    return overrides.get(model, overrides.get(size))


def gpus_for_run(model: str, accel_h: float, global_batch: int, tokens: int, nodes: int, gpus_per_node: int,
                 timeout_min: int,
                 gpus_per_run: int | str = "auto", overrides: dict | None = None, where: str = "launcher",
                 ideal_makespan_h: float = float("inf")) -> int:
    """The GPU count of one run by the rule in the module docstring; HarnessError (one line) if none fits."""
    node, cluster = max(1, gpus_per_node), max(1, nodes) * max(1, gpus_per_node)
    budget_h = timeout_min * (1 + REQUEUES) / 60.0
    target_h = min(budget_h, ideal_makespan_h)
    fixed = _override(model, overrides or {})
    fixed = gpus_per_run if fixed is None and gpus_per_run != "auto" else fixed
    if fixed is not None:
        if fixed > cluster or (fixed > node and fixed % node):
            raise HarnessError(f"{where}: {model} asks for {fixed} GPUs; the cluster gives a run at most {cluster}, "
                               f"and more than one node only in whole nodes of {node}. Fix: change "
                               "launcher.gpus_per_model / gpus_per_run, or launcher.nodes and gpus_per_node.")
        count = fixed
    else:  # the fewest powers of two that finish in time, never below the efficient per-GPU batch
        most = max(1, min(cluster, global_batch * tokens // EFFICIENT_TOKENS_PER_GPU))
        count = 1
        while (count * 2 <= most and global_batch % (count * 2) == 0 and (count * 2 <= node or count * 2 % node == 0)
               and accel_h / count > target_h):
            count *= 2
    if accel_h / count > budget_h:
        raise HarnessError(f"{where}: {model} needs {accel_h / count:.1f} h on {count} GPU(s), over the "
                           f"{budget_h:.0f} h that launcher.timeout_min {timeout_min} allows with {REQUEUES} requeues. "
                           "Fix: raise launcher.timeout_min, give it more GPUs (launcher.gpus_per_model), or train "
                           "fewer steps.")
    return count


def simulate(runs: list[tuple[str, str, int, float]], nodes: int, gpus_per_node: int) -> list[Slot]:
    """Place (run_id, model, gpus, accel_h) in order on `nodes` x `gpus_per_node` GPUs; one Slot per run.
    A run of at most a node's GPUs takes the earliest-free GPUs of one node; a larger one whole nodes."""
    free_at = [[0.0] * gpus_per_node for _ in range(nodes)]  # when each GPU is next free
    slots = []
    for run_id, model, gpus, accel_h in runs:
        if gpus > nodes * gpus_per_node:
            raise HarnessError(f"{model} needs {gpus} GPUs, the cluster has {nodes} x {gpus_per_node}. Fix: more "
                               "--nodes or --gpus-per-node, or fewer GPUs for it (launcher.gpus_per_model).")
        if gpus <= gpus_per_node:
            options = []
            for n, gpu_free in enumerate(free_at):
                chosen = sorted(range(gpus_per_node), key=lambda g: (gpu_free[g], g))[:gpus]
                options.append((max(gpu_free[g] for g in chosen), n, [(n, g) for g in chosen]))
            start, node, chosen = min(options, key=lambda o: (o[0], o[1]))
        else:  # whole nodes, those free soonest
            order = sorted(range(nodes), key=lambda n: (max(free_at[n]), n))[:gpus // gpus_per_node]
            start, node = max(max(free_at[n]) for n in order), order[0]
            chosen = [(n, g) for n in order for g in range(gpus_per_node)]
        end = start + accel_h / gpus
        for n, g in chosen:
            free_at[n][g] = end
        slots.append(Slot(run_id, model, gpus, node, start, end, accel_h))
    return slots


def summary(slots: list[Slot], nodes: int, gpus_per_node: int) -> dict:
    """Makespan (h), GPU utilisation (busy GPU-hours over makespan x GPUs) and the run that ends last."""
    makespan = max((s.end_h for s in slots), default=0.0)
    busy = sum(s.accel_h for s in slots)
    critical = max(slots, key=lambda s: s.end_h).run_id if slots else None
    return {"makespan_h": makespan, "utilisation": busy / (makespan * nodes * gpus_per_node) if makespan else 0.0,
            "gpu_hours": busy, "critical_run": critical, "nodes": nodes, "gpus_per_node": gpus_per_node}


def submission_order(durations: list[float]) -> list[int]:
    """Indices in the order `harness sweep` submits runs: longest (hours on their GPUs, or Gflops where no
    hours are known) first, ties in spec order."""
    return sorted(range(len(durations)), key=lambda i: -durations[i])
