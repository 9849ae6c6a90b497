"""How runs share GPUs: each run's GPU count, and the queue simulated into a schedule with a makespan.

GPUs per run (`launcher.gpus_per_run`): an integer for every run, or `auto`. A run's allowed counts are the
powers of two, at most the cluster's (`launcher.nodes` x `gpus_per_node`), such that
  1. each GPU still gets at least EFFICIENT_TOKENS_PER_GPU tokens a step (per-GPU batch x tokens per
     image): the official DiT recipe trains XL/2 at 32 images x 256 tokens per GPU; below that a step
     waits on kernel launches more than it computes (DiT-S/8, 16 tokens an image, at 32 images per GPU
     is 512 tokens), so the measured throughputs would not hold; the batch splits evenly over them,
     and a run spans several nodes only in whole nodes, and
  2. its planned accelerator-hours, spread over those GPUs, finish within launcher.timeout_min x
     (1 + REQUEUES): a job checkpoints and requeues at its time limit, and a run that needs more
     than REQUEUES requeues is a run the plan should not promise.
Among those, `auto` picks the counts that give the shortest simulated makespan (below): a local search
over the runs' counts together (`choose_gpus`). It starts twice, from
  a. the rule count: each run's fewest allowed GPUs that finish within the sweep's ideal makespan (its
     accelerator-hours over the cluster's GPUs; a run longer than that sets the makespan alone), and
  b. every run at its most allowed GPUs,
and from each start repeatedly makes the best single change of one run to another allowed count, judged by
(makespan, then fewer GPUs in all: perfect scaling is optimistic for wide runs, so a GPU that buys no
makespan is not taken), until no change improves it or it has simulated its share of MAX_SIMULATIONS schedules; the
better end wins (start a on a tie). Changes are tried in spec order, counts ascending, and only a strictly
better one is taken, so the choice is deterministic. Makespans are compared rounded to MAKESPAN_TOL_H.
`launcher.gpus_per_model` overrides the rule per model name (DiT-XL/2) or size letter (XL), and an integer
`gpus_per_run` fixes every run: the search never changes a fixed count. A run no count can finish in time,
or whose override exceeds a node, is refused at plan time in one line.
The global batch is fixed, so a run's id and maths do not depend on its GPU count.

The schedule: runs are placed in the order `harness sweep` submits them, longest first (hours on their
GPUs; the LPT rule, within 4/3 of the best makespan for one-GPU jobs), each at the earliest time its GPUs
are free, taking (its accelerator-hours) / (its GPUs) hours, i.e. perfect scaling (rule 1 keeps runs in
the regime where the measured throughputs were taken). A gap a GPU leaves is not filled by a later run
(no backfill into the past): Slurm's backfill scheduler judges a job by its time limit
(launcher.timeout_min, a day in sweeps/gflops.yaml), not by its planned hours, and would not start it in a
gap shorter than that; so the makespan is an upper bound of Slurm's. Deterministic: ties go to the lowest
node and the lowest GPU.
"""
from __future__ import annotations

from dataclasses import dataclass

from harness.config.spec_checks import batch_split
from harness.errors import HarnessError

EFFICIENT_TOKENS_PER_GPU = 32 * 256
REQUEUES = 3
MAX_SIMULATIONS = 4000  # schedules the GPU-count search may simulate (~2 s at 100 runs on 4 x 8 GPUs)
MAKESPAN_TOL_H = 1e-6  # makespans closer than this (hours) count as equal in the search


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


def gpu_options(model: str, accel_h: float, global_batch: int, tokens: int, nodes: int, gpus_per_node: int,
                timeout_min: int, gpus_per_run: int | str = "auto", overrides: dict | None = None,
                where: str = "launcher", micro_batch: int | str = "auto") -> list[int]:
    """The GPU counts rules 1 and 2 of the module docstring allow one run, fewest first (the one count where
    an override or an integer gpus_per_run fixes it); HarnessError (one line) if none fits. Every count splits
    the global batch, and each GPU's share into micro-batches of an integer `micro_batch` (one rank per GPU):
    a fixed count that does not is refused here, before any job starts."""
    micro = None if micro_batch == "auto" else int(micro_batch)
    node, cluster = max(1, gpus_per_node), max(1, nodes) * max(1, gpus_per_node)
    budget_h = timeout_min * (1 + REQUEUES) / 60.0
    fixed = _override(model, overrides or {})
    fixed = gpus_per_run if fixed is None and gpus_per_run != "auto" else fixed
    if fixed is not None:
        if fixed > cluster or (fixed > node and fixed % node):
            raise HarnessError(f"{where}: {model} asks for {fixed} GPUs; the cluster gives a run at most {cluster}, "
                               f"and more than one node only in whole nodes of {node}. Fix: change "
                               "launcher.gpus_per_model / gpus_per_run, or launcher.nodes and gpus_per_node.")
        if split := batch_split(global_batch, fixed, micro):
            key, problem, fix = split
            raise HarnessError(f"{where}: {model} on {fixed} GPUs: train.{key} {problem}. Fix: {fix}, or change "
                               "launcher.gpus_per_model / gpus_per_run.")
        counts = [fixed]
    else:  # powers of two, never below the efficient per-GPU batch
        most = max(1, min(cluster, global_batch * tokens // EFFICIENT_TOKENS_PER_GPU))
        counts = [1]
        while (counts[-1] * 2 <= most and batch_split(global_batch, counts[-1] * 2, micro) is None
               and (counts[-1] * 2 <= node or counts[-1] * 2 % node == 0)):
            counts.append(counts[-1] * 2)
    fit = [c for c in counts if accel_h / c <= budget_h]
    if not fit:
        raise HarnessError(f"{where}: {model} needs {accel_h / counts[-1]:.1f} h on {counts[-1]} GPU(s), over the "
                           f"{budget_h:.0f} h that launcher.timeout_min {timeout_min} allows with {REQUEUES} requeues. "
                           "Fix: raise launcher.timeout_min, give it more GPUs (launcher.gpus_per_model), or train "
                           "fewer steps.")
    return fit


def _rule_count(accel_h: float, options: list[int], ideal_makespan_h: float) -> int:
    """Start a of the search: the fewest allowed GPUs that finish within the ideal makespan, else the most."""
    return next((c for c in options if accel_h / c <= ideal_makespan_h), options[-1])


def gpus_for_run(model: str, accel_h: float, global_batch: int, tokens: int, nodes: int, gpus_per_node: int,
                 timeout_min: int,
                 gpus_per_run: int | str = "auto", overrides: dict | None = None, where: str = "launcher",
                 ideal_makespan_h: float = float("inf")) -> int:
    """One run's rule count (start a in the module docstring), alone; HarnessError (one line) if none fits."""
    options = gpu_options(model, accel_h, global_batch, tokens, nodes, gpus_per_node, timeout_min, gpus_per_run,
                          overrides, where)
    return _rule_count(accel_h, options, ideal_makespan_h)


def schedule_runs(runs: list[tuple[str, str, float]], counts: list[int], nodes: int,
                  gpus_per_node: int) -> list[Slot]:
    """(run_id, model, accel_h) on `counts` GPUs each, simulated in submission order; Slots in the runs' order."""
    order = submission_order([h / c for (_, _, h), c in zip(runs, counts)])
    slots = simulate([(runs[i][0], runs[i][1], counts[i], runs[i][2]) for i in order], nodes, gpus_per_node)
    out: list[Slot | None] = [None] * len(runs)
    for i, slot in zip(order, slots):
        out[i] = slot
    return out  # type: ignore[return-value]


def choose_gpus(runs: list[tuple[str, str, float]], options: list[list[int]], nodes: int,
                gpus_per_node: int) -> list[int]:
    """Each run's GPU count among its `options` (fewest first), by the search in the module docstring."""
    ideal = sum(h for _, _, h in runs) / (nodes * gpus_per_node)
    simulated = 0

    def judge(counts: list[int]) -> tuple[float, int]:
        nonlocal simulated
        simulated += 1
        makespan = max((s.end_h for s in schedule_runs(runs, counts, nodes, gpus_per_node)), default=0.0)
        return round(makespan / MAKESPAN_TOL_H) * MAKESPAN_TOL_H, sum(counts)

    starts = [[_rule_count(h, opts, ideal) for (_, _, h), opts in zip(runs, options)], [o[-1] for o in options]]
    best: tuple[tuple[float, int], list[int]] | None = None
    starts = starts if starts[0] != starts[1] else starts[:1]
    for n, start in enumerate(starts, 1):
        limit = MAX_SIMULATIONS * n // len(starts)  # each start its equal share
        current, score = start, judge(start)
        while simulated < limit:
            move = None
            for i, opts in enumerate(options):
                for c in opts:
                    if c == current[i] or simulated >= limit:
                        continue
                    trial = current[:i] + [c] + current[i + 1:]
                    got = judge(trial)
                    if got < (move[0] if move else score):
                        move = (got, trial)
            if move is None:
                break
            score, current = move
        if best is None or score < best[0]:
            best = (score, current)
    return best[1] if best else []


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
            # a node can start it when its gpus-th earliest-free GPU is free; the earliest such node, lowest first
            start, node = min((sorted(gpu_free)[gpus - 1], n) for n, gpu_free in enumerate(free_at))
            chosen = [(node, g) for g in sorted(range(gpus_per_node), key=lambda g: (free_at[node][g], g))[:gpus]]
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
