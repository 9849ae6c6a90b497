"""When each run ran: a Gantt chart of the sweep's runs from their own clocks, beside the plan's schedule.

Measured: a run's attempts, each from its first train.jsonl line's time less its wall_s (the attempt's clock
starts with its process) to its last line, and the evaluations to the last eval.jsonl line; gaps are queueing or
a kill. Planned (when the sweep's spec.yaml asks for GPUs): `harness plan`'s simulated queue
(`harness.cost.schedule`), drawn from the same origin. Bars are labelled with the run's GPUs.
"""
from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure

from harness.config import layout
from harness.errors import HarnessError
from harness.cost.plan import plan_sweep
from harness.report.training import runs_by_gflops
from harness.report.render import FigureSpec, Report
from harness.config.spec import load_spec


def attempts(log: pd.DataFrame) -> list[tuple[float, float]]:
    """(start, end) unix times of each attempt in one run's train.jsonl (wall_s restarts at each attempt)."""
    if log is None or log.empty or not {"time", "wall_s"} <= set(log):
        return []
    spans, start, last_wall, end = [], None, None, None
    for t, wall in zip(log["time"], log["wall_s"]):
        if last_wall is None or wall < last_wall:  # a new attempt
            if start is not None:
                spans.append((start, end))
            start = t - wall
        last_wall, end = wall, t
    spans.append((start, end))
    return spans


def measured_spans(res) -> dict[str, list[tuple[float, float, str]]]:
    """{run_id: [(start, end, 'train' | 'eval')]} in unix seconds."""
    out: dict[str, list[tuple[float, float, str]]] = {}
    for run in res.runs:
        rid = run.get("run_id", "")
        spans = [(a, b, "train") for a, b in attempts(res.train_logs.get(rid))]
        ev = res.frame[res.frame["run_id"] == rid]
        if spans and ev["eval_time"].notna().any():
            spans.append((spans[-1][1], float(ev["eval_time"].max()), "eval"))
        if spans:
            out[rid] = spans
    return out


def timeline_figure(res, planned: dict[str, tuple[float, float, int]] | None) -> Figure | None:
    """Rows: runs (by Gflops); solid bars: measured training, hatched: evaluation, hollow: the plan (hours)."""
    spans = measured_spans(res)
    if not spans:
        return None
    origin = min(s[0] for v in spans.values() for s in v)
    order = [r["run_id"] for r in runs_by_gflops(res.runs) if r.get("run_id") in spans]
    fig = Figure(figsize=(7.0, max(2.4, 0.9 + 0.32 * len(order))), dpi=110, layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    unit, label = (3600.0, "hours") if max(s[1] for v in spans.values() for s in v) - origin > 3 * 3600 else (60.0, "minutes")
    for y, rid in enumerate(order):
        for start, end, kind in spans[rid]:
            ax.barh(y, (end - start) / unit, left=(start - origin) / unit, height=0.36,
                    color="C0" if kind == "train" else "C1", hatch=None if kind == "train" else "//")
        if planned and rid in planned:
            p0, p1, gpus = planned[rid]
            ax.barh(y + 0.36, (p1 - p0) * 3600 / unit, left=p0 * 3600 / unit, height=0.3, fill=False,
                    edgecolor="0.3", linestyle="--")
            ax.text((p1 * 3600) / unit, y + 0.36, f" {gpus} GPU", va="center", fontsize=8)
    ax.set_yticks(range(len(order)), [r.split("_s")[0] for r in order], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(f"{label} since the first run started")
    ax.grid(True, axis="x", alpha=0.3)
    return fig


def planned_schedule(res) -> dict[str, tuple[float, float, int]] | None:
    """{run_id: (start h, end h, GPUs)} of `harness plan` on the sweep's recorded spec.yaml, or None when the
    spec asks for no GPUs or cannot be planned here (a variable it names is unset, its table lacks a GPU)."""
    path = res.root / layout.SPEC_YAML
    if not path.is_file():
        return None
    try:
        plan = plan_sweep(load_spec(path))
    except HarnessError:
        return None
    if not plan.get("schedule"):
        return None
    return {r["run_id"]: (r["start_h"], r["end_h"], r["gpus"]) for r in plan["runs"]}


def timeline_section(res, rep: Report) -> None:
    planned = planned_schedule(res)
    fig = timeline_figure(res, planned)
    if fig is None:
        return
    plan_note = (" Hollow dashed bars: the plan's schedule (`harness plan`, harness.cost.schedule) from the same origin, "
                 "labelled with each run's GPUs." if planned else " No planned schedule: the sweep asks for no GPUs.")
    rep.figures.append(FigureSpec(
        "timeline", "When each run ran",
        "One row per run, smallest model first. Solid: training attempts measured from train.jsonl (each from its "
        "process's start to its last log line; a gap is queueing, a kill or a resume); hatched: evaluation, to the "
        "last eval.jsonl record." + plan_note, fig, section="cost"))
