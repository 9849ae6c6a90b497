"""`harness plan SWEEP`: the runs of a sweep with their cost, before anything runs.

Per run: Gflops and parameters (fvcore, cached by `harness.flops.model_gflops`), the paper's Gflops
where Table 4 has the model, training compute = Gflops x global_batch x steps x 3 (the paper's
definition: forward + backward ~ 3 forward passes), the number of evaluation samples, and sampling
compute = Gflops x sampling steps x samples (x 2 with classifier-free guidance, scale > 1), summed over
every evaluation (eval.at_steps x sampling_steps x cfg_scales). Runs of a `checkpoints_from` sweep
train nothing: their training compute is 0.

With `--throughput T` (training images/s per accelerator, from `harness bench`), accelerator-hours:
training = global_batch x steps / T; sampling = forward passes / (3 T), since a training image costs
about three forward passes. Without `--throughput-model M` one T applies to every run; with it, T is
M's throughput and each run's is scaled by Gflops(M) / Gflops(run) (compute-bound estimate). Either
way it is an estimate, labelled as such. `--throughput-from BENCH.json` (from `harness bench --suite
... --out BENCH.json`) gives every run the measured speed of its own model instead.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from harness import paper
from harness.errors import HarnessError
from harness.samplers import guidance_on
from harness.spec import RunSpec, SweepSpec, load_spec

log = logging.getLogger(__name__)


@dataclass
class RunPlan:
    run_id: str
    model: str
    conditioning: str
    seed: int
    input_size: int
    in_channels: int
    gflops: float
    params: int
    paper_gflops: float | None
    train_steps: int
    global_batch: int
    train_gflops: float          # total training compute, Gflops
    eval_points: int             # evaluations: at_steps x sampling_steps x cfg_scales
    eval_samples: int            # images sampled over all evaluations
    sampling_forwards: int       # network forward passes (per image) over all evaluations
    sampling_gflops: float
    train_accel_hours: float | None = None
    sampling_accel_hours: float | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def plan_run(run: RunSpec, throughput: float | None = None, reference_gflops: float | None = None) -> RunPlan:
    """The cost of one run. `throughput`: training images/s per accelerator, or None; measured on a
    model of `reference_gflops` when given (scaled to this run's Gflops), else taken as this run's."""
    from harness.flops import model_gflops  # imports torch and fvcore; keep `harness --help` fast

    data, train, ev = run.data, run.train, run.eval
    gflops, params = model_gflops(run.model, run.conditioning, data.input_size, data.channels,
                                  data.num_classes)
    image_size = data.image_size if data.autoencoder != "identity" else None
    paper_g = paper.paper_gflops(run.model, run.conditioning, image_size) if image_size else None
    trains = run.checkpoints_from is None
    train_images = train.global_batch * train.steps if trains else 0
    forwards = 0
    for steps in ev.sampling_steps:
        for cfg in ev.cfg_scales:
            forwards += steps * (2 if guidance_on(cfg) else 1) * ev.num_samples * len(ev.at_steps)
    points = len(ev.at_steps) * len(ev.sampling_steps) * len(ev.cfg_scales)
    plan = RunPlan(
        run_id=run.run_id, model=run.model, conditioning=run.conditioning, seed=run.seed,
        input_size=data.input_size, in_channels=data.channels, gflops=gflops, params=params,
        paper_gflops=paper_g, train_steps=train.steps if trains else 0, global_batch=train.global_batch,
        train_gflops=paper.train_compute(gflops, train.global_batch, train.steps) if trains else 0.0, eval_points=points,
        eval_samples=points * ev.num_samples, sampling_forwards=forwards, sampling_gflops=gflops * forwards)
    if throughput is not None:
        if reference_gflops:
            throughput = throughput * reference_gflops / gflops
        plan.train_accel_hours = train_images / throughput / 3600.0
        plan.sampling_accel_hours = forwards / (paper.TRAIN_PASSES * throughput) / 3600.0
    return plan


def plan_sweep(spec: SweepSpec, throughput: float | None = None, throughput_model: str | None = None,
               throughput_from: str | None = None) -> dict:
    """{"sweep", "description", "checkpoints_from", "throughput_images_per_s", "throughput_model",
    "runs": [RunPlan dicts], "totals"}. `throughput_model`: the model `throughput` was measured on.
    `throughput_from`: a `harness bench` JSON with each run's own model measured."""
    if throughput_from is not None:
        return _plan_measured(spec, throughput_from)
    if throughput is not None and not throughput > 0:
        raise HarnessError(f"--throughput: must be a positive number of images/s, got {throughput}. "
                           "Fix: measure it with `harness bench --model ...` and pass its images/s.")
    reference = None
    if throughput_model is not None:
        from harness.flops import model_gflops
        from harness.models import resolve_shape

        if throughput is None:
            raise HarnessError("--throughput-model: needs --throughput. Fix: pass the images/s that "
                               "`harness bench` measured on that model.")
        model = resolve_shape(throughput_model).name
        d = spec.data
        reference = model_gflops(model, spec.conditioning[0], d.input_size, d.channels, d.num_classes)[0]
    plans = [plan_run(run, throughput, reference) for run in spec.expand()]
    totals = {
        "runs": len(plans),
        "train_gflops": sum(p.train_gflops for p in plans),
        "eval_samples": sum(p.eval_samples for p in plans),
        "sampling_gflops": sum(p.sampling_gflops for p in plans),
    }
    totals["total_gflops"] = totals["train_gflops"] + totals["sampling_gflops"]
    if throughput is not None:
        totals["train_accel_hours"] = sum(p.train_accel_hours for p in plans)
        totals["sampling_accel_hours"] = sum(p.sampling_accel_hours for p in plans)
        totals["accel_hours"] = totals["train_accel_hours"] + totals["sampling_accel_hours"]
    return {"sweep": spec.name, "spec": str(spec.path), "description": spec.description,
            "checkpoints_from": spec.checkpoints_from, "throughput_images_per_s": throughput,
            "throughput_model": throughput_model,
            "runs": [p.to_dict() for p in plans], "totals": totals}


def _plan_measured(spec: SweepSpec, bench_json: str) -> dict:
    """plan_sweep with each run's training images/s read from `bench_json` for its own model."""
    from harness.bench import read_throughput

    measured = read_throughput(bench_json)
    runs = spec.expand()
    missing = sorted({r.model for r in runs} - set(measured))
    if missing:
        raise HarnessError(f"{bench_json}: no measurement for {', '.join(missing)}. Fix: "
                           f"`harness bench --suite {','.join(missing)} --out {bench_json}` on the same device")
    plans = [plan_run(run, measured[run.model]) for run in runs]
    out = plan_sweep(spec)
    out["runs"] = [p.to_dict() for p in plans]
    out["throughput_images_per_s"] = {m: measured[m] for m in sorted({r.model for r in runs})}
    out["throughput_model"] = f"measured per model ({bench_json})"
    totals = out["totals"]
    totals["train_accel_hours"] = sum(p.train_accel_hours for p in plans)
    totals["sampling_accel_hours"] = sum(p.sampling_accel_hours for p in plans)
    totals["accel_hours"] = totals["train_accel_hours"] + totals["sampling_accel_hours"]
    return out


def _sci(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}" if abs(x) < 1e4 else f"{x:.3e}"


def format_table(plan: dict) -> str:
    """A fixed-width text table of a plan, one row per run plus a totals row."""
    hours = plan["throughput_images_per_s"] is not None
    cols = ["run_id", "gflops", "paper", "params_m", "train_gflops", "eval_samples", "sampling_gflops"]
    if hours:
        cols += ["train_h", "sampling_h"]
    rows = []
    for r in plan["runs"]:
        row = [r["run_id"], f"{r['gflops']:.2f}" if r["gflops"] >= 0.1 else f"{r['gflops']:.2g}", "-" if r["paper_gflops"] is None else f"{r['paper_gflops']:.2f}",
               f"{r['params'] / 1e6:.1f}", _sci(r["train_gflops"]), str(r["eval_samples"]),
               _sci(r["sampling_gflops"])]
        if hours:
            row += [f"{r['train_accel_hours']:.1f}", f"{r['sampling_accel_hours']:.1f}"]
        rows.append(row)
    t = plan["totals"]
    total = [f"total ({t['runs']} runs)", "", "", "", _sci(t["train_gflops"]), str(t["eval_samples"]),
             _sci(t["sampling_gflops"])]
    if hours:
        total += [f"{t['train_accel_hours']:.1f}", f"{t['sampling_accel_hours']:.1f}"]
    widths = [max(len(c), *(len(r[i]) for r in rows + [total])) for i, c in enumerate(cols)]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    out = [f"sweep {plan['sweep']}: {plan['description']}".rstrip(": ")]
    if plan["checkpoints_from"]:
        out.append(f"evaluates the checkpoints of sweep '{plan['checkpoints_from']}' (no training)")
    out += [line(cols), line(["-" * w for w in widths])] + [line(r) for r in rows]
    out += [line(["-" * w for w in widths]), line(total)]
    out.append("gflops: forward pass per image (fvcore, multiply-add = 1); train = gflops x batch x steps x 3; "
               "sampling = gflops x steps x samples (x2 with guidance, cfg != 1)")
    if hours and isinstance(plan["throughput_images_per_s"], dict):
        speeds = ", ".join(f"{m} {v:,.0f}" for m, v in plan["throughput_images_per_s"].items())
        out.append(f"accelerator-hours from training images/s {plan['throughput_model']}: {speeds}; "
                   f"total {t['accel_hours']:.1f} h")
    elif hours:
        on = f" on {plan['throughput_model']}, scaled by Gflops" if plan["throughput_model"] else ""
        out.append(f"accelerator-hours estimated from {plan['throughput_images_per_s']:g} training images/s "
                   f"per accelerator{on}; total {t['accel_hours']:.1f} h")
    return "\n".join(out)


def cli_plan(args) -> int:
    spec = load_spec(args.sweep)
    plan = plan_sweep(spec, getattr(args, "throughput", None), getattr(args, "throughput_model", None),
                      getattr(args, "throughput_from", None))
    if args.format == "json":
        print(json.dumps(plan, indent=2))
    else:
        print(format_table(plan))
    return 0
