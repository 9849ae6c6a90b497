"""`harness plan SWEEP`: the runs of a sweep with their cost, before anything runs.

Per run: Gflops and parameters (fvcore, cached by `harness.models.flops.model_gflops`), the paper's Gflops
where Table 4 has the model, training compute = Gflops x global_batch x steps x 3 (the paper's
definition: forward + backward ~ 3 forward passes), the number of evaluation samples, and sampling
compute = Gflops x sampling steps x samples (x 2 with classifier-free guidance, scale > 1), summed over
every evaluation (eval.at_steps x sampling_steps x cfg_scales). Runs of a `checkpoints_from` sweep
train nothing: their training compute is 0.

With `--throughput T` (training images/s per accelerator, from `harness bench`), accelerator-hours:
training = global_batch x steps / T; evaluation = forward passes / S, where S is the measured sampling
throughput (`--sampling-throughput`: images/s for one denoising step, `harness bench`'s figure, VAE
decode included) or, without it, 3 T (a training image costs about three forward passes). Without
`--throughput-model M` T and S apply to every run; with it, they are M's and each run's are scaled by
Gflops(M) / Gflops(run) (compute-bound estimate). The latent stage (`--latent-throughput L`: VAE
encodes/s per accelerator, `harness bench --latents`) encodes each training image and its flip once
per (dataset, autoencoder, image size): 2 N / L hours, shared equally by the runs that train on that
cache (identity autoencoder: 0). N is the image folder's count, or ImageNet-1k's 1,281,167 when the
folder is not reachable here and the data has 1000 classes. Every hour is an estimate, labelled as such.
`--throughput-from BENCH.json` (`harness bench --suite ... --out BENCH.json`) gives every run the
measured training and sampling speed of its own model instead of T and S.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable

from harness import hardware, paper
from harness.config import layout
from harness.config.arguments import add_spec_arguments, positive_int
from harness.config.registry import resolve_shape
from harness.study import forecast
from harness.study.results import load_sweep
from harness.cost import disk, schedule
from harness.errors import HarnessError
from harness.config.spec import RunSpec, SweepSpec, load_spec

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
    tokens: int = 0              # tokens per image: (input_size / patch)^2
    latent_images: int | None = None        # images in the run's latent cache (each encoded twice: flip)
    train_accel_hours: float | None = None
    sampling_accel_hours: float | None = None   # evaluation: sampling (and its VAE decode)
    latent_accel_hours: float | None = None     # this run's share of its latent stage
    gpus: int | None = None                  # the run's own job's GPUs (harness.cost.schedule), with hours
    start_h: float | None = None             # its place in the simulated queue (hours from the start)
    end_h: float | None = None
    forecast_fid: float | None = None        # with --forecast-from: the chosen law's FID and interval
    forecast_lo: float | None = None
    forecast_hi: float | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def plan_run(run: RunSpec, throughput: float | None = None, reference_gflops: float | None = None,
             sampling_throughput: float | None = None, eval_s_per_image: float = 0.0) -> RunPlan:
    """The cost of one run. `throughput` (training images/s per accelerator) and `sampling_throughput`
    (images/s for one denoising step), or None; measured on a model of `reference_gflops` when given
    (scaled to this run's Gflops), else taken as this run's. `eval_s_per_image`: what each evaluated image
    costs beyond the network (noise, decode, features; the same for every model at one geometry)."""
    from harness.models.flops import model_gflops  # imports torch and fvcore; keep `harness --help` fast

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
            forwards += steps * (2 if cfg > 1.0 else 1) * ev.num_samples * len(ev.at_steps)
    points = len(ev.at_steps) * len(ev.sampling_steps) * len(ev.cfg_scales)
    plan = RunPlan(
        run_id=run.run_id, model=run.model, conditioning=run.conditioning, seed=run.seed,
        input_size=data.input_size, in_channels=data.channels, gflops=gflops, params=params,
        paper_gflops=paper_g, train_steps=train.steps if trains else 0, global_batch=train.global_batch,
        train_gflops=paper.train_compute(gflops, train.global_batch, train.steps) if trains else 0.0, eval_points=points,
        eval_samples=points * ev.num_samples, sampling_forwards=forwards, sampling_gflops=gflops * forwards,
        tokens=(data.input_size // run.shape.patch) ** 2)
    if throughput is not None:
        scale = reference_gflops / gflops if reference_gflops else 1.0
        per_step = sampling_throughput * scale if sampling_throughput else paper.TRAIN_PASSES * throughput * scale
        plan.train_accel_hours = train_images / (throughput * scale) / 3600.0
        plan.sampling_accel_hours = (forwards / per_step + plan.eval_samples * eval_s_per_image) / 3600.0
    return plan


def record_run(run: RunSpec, rdir: Path) -> RunPlan:
    """Write the run's run.json (`layout.write_run_json`) with its planned Gflops and params; its plan."""
    p = plan_run(run)
    layout.write_run_json(run, rdir, p.gflops, p.params)
    return p


def latent_images(run: RunSpec, scan: bool = True) -> int | None:
    """Images in the run's training set, for the latent stage's cost (None: unknown here); `scan`: count an
    image folder's files when it is here (else ImageNet's count for 1,000 classes)."""
    import os

    from harness.data.datasets import list_image_files, load_digits  # torch: only to count a data set's images

    d = run.data
    if d.dataset == "digits":
        return len(load_digits()[1])
    try:
        root = d.resolved_path()
    except HarnessError:
        root = None
    if scan and root and os.path.isdir(root):
        return len(list_image_files(root))
    return IMAGENET_TRAIN_IMAGES if d.num_classes == 1000 else None


IMAGENET_TRAIN_IMAGES = 1_281_167


def _latent_hours(plans: list[RunPlan], runs: list[RunSpec], latent_throughput: float) -> None:
    """Fill each plan's share of its latent stage: 2 N / L hours per stage, split over its runs."""
    groups: dict = {}
    for plan, run in zip(plans, runs):  # one stage per cache (the spec's own strings: nothing resolved)
        d = run.data
        groups.setdefault((d.dataset, d.path, d.autoencoder, d.autoencoder_path, d.image_size), []).append((plan, run))
    for members in groups.values():
        n = latent_images(members[0][1])
        for plan, run in members:
            plan.latent_images = n
            if run.data.autoencoder == "identity":
                plan.latent_accel_hours = 0.0
            elif n is not None:
                plan.latent_accel_hours = 2 * n / latent_throughput / 3600.0 / len(members)


def _measured(bench_json: str, runs: list[RunSpec]) -> dict[str, tuple[float, float, float]]:
    """{model: (training images/s, sampling images/s per step, evaluation s per image beyond the network)}
    for every run's model, from a bench JSON."""
    from harness.cost.bench import read_throughput  # torch: only with --throughput-from

    measured = read_throughput(bench_json)
    missing = sorted({r.model for r in runs} - set(measured))
    if missing:
        raise HarnessError(f"{bench_json}: no measurement for {', '.join(missing)}. Fix: "
                           f"`harness bench --suite {','.join(missing)} --out {bench_json}` on the same device")
    return measured


def _nearest(rows: list, gflops: float, gflops_of) -> Any:
    """The row whose model's Gflops is nearest to `gflops` on a log scale."""
    return min(rows, key=lambda m: abs(math.log(gflops_of(m.model) / gflops)))


def _table_speeds(runs: list[RunSpec], gpu: str) -> tuple[dict[str, tuple[float, float, float]], dict]:
    """({run_id: (training images/s, sampling images/s per denoising step, evaluation s per image beyond the
    network)}, basis) from the packaged table of `gpu`: a measured model at the table's geometry takes its own
    figures; any other run those of the nearest measured model (by Gflops), scaled by Gflops(that model) /
    Gflops(run) -- all but the per-image term, which does not depend on the model."""
    from harness.models.flops import model_gflops  # torch and fvcore: only where a plan needs them

    rows = hardware.measured(gpu)
    side, channels, classes = hardware.GEOMETRY
    ref = {m.model: model_gflops(m.model, "adaLN-Zero", side, channels, classes)[0] for m in rows}
    sampled = [m for m in rows if m.sample_images_per_s_one_step]
    speeds, own, scaled = {}, set(), set()
    for run in runs:
        d = run.data
        g = model_gflops(run.model, run.conditioning, d.input_size, d.channels, d.num_classes)[0]
        t, s = _nearest(rows, g, ref.get), _nearest(sampled, g, ref.get)
        speeds[run.run_id] = (t.train_images_per_s * ref[t.model] / g,
                              s.sample_images_per_s_one_step * ref[s.model] / g, (s.eval_ms_per_image or 0.0) / 1e3)
        (own if ref[t.model] == g and t.model == run.model else scaled).add(run.model)
    basis = {"gpu": gpu, "measured": sorted(own), "scaled_by_gflops": sorted(scaled - own),
             "sampling": "; ".join(f"{m.model}: {m.sample_config} ({m.measured})" for m in sampled),
             "training": "; ".join(f"{m.model}: {m.train_config} ({m.measured})" for m in rows)}
    return speeds, basis


def _schedule(spec: SweepSpec, plans: list[RunPlan], nodes: int, gpus_per_node: int) -> dict:
    """Each run's GPUs (chosen for the shortest simulated makespan) and place in the simulated queue
    (`harness.cost.schedule`); the sweep's makespan."""
    L = spec.launcher
    hours = [p.train_accel_hours + p.sampling_accel_hours + (p.latent_accel_hours or 0.0) for p in plans]
    options = [schedule.gpu_options(p.model, h, p.global_batch, p.tokens, nodes, gpus_per_node, L.timeout_min,
                                    L.gpus_per_run, L.gpus_per_model, where=str(spec.path),
                                    micro_batch=spec.train.micro_batch) for p, h in zip(plans, hours)]
    runs = [(p.run_id, p.model, h) for p, h in zip(plans, hours)]
    counts = schedule.choose_gpus(runs, options, nodes, gpus_per_node)
    slots = schedule.schedule_runs(runs, counts, nodes, gpus_per_node)
    for p, gpus, slot in zip(plans, counts, slots):
        p.gpus, p.start_h, p.end_h = gpus, slot.start_h, slot.end_h
    out = schedule.summary(slots, nodes, gpus_per_node)
    out["below_efficient"] = [p.model for p in plans
                              if p.gpus * schedule.EFFICIENT_TOKENS_PER_GPU > p.global_batch * p.tokens and p.gpus > 1]
    return out


def _check_throughputs(throughput: float | None, sampling_throughput: float | None,
                       latent_throughput: float | None, throughput_from: str | None) -> None:
    """The measured speeds a plan is given must be positive and go together: one line for each mistake."""
    if throughput_from is not None and (throughput is not None or sampling_throughput is not None):
        raise HarnessError("--throughput-from: gives every run its own measured speed; drop --throughput and "
                           "--sampling-throughput, or drop --throughput-from")
    for flag, value in (("--throughput", throughput), ("--sampling-throughput", sampling_throughput),
                        ("--latent-throughput", latent_throughput)):
        if value is not None and not value > 0:
            raise HarnessError(f"{flag}: must be a positive number of images/s, got {value}. "
                               "Fix: measure it with `harness bench --model ...` and pass its images/s.")
    if sampling_throughput is not None and throughput is None:
        raise HarnessError("--sampling-throughput: needs --throughput (training images/s) as well. Fix: pass "
                           "both figures of `harness bench`.")


def _reference_gflops(spec: SweepSpec, throughput_model: str | None, throughput: float | None) -> float | None:
    """The Gflops of the model --throughput was measured on (other runs scale by theirs), or None."""
    if throughput_model is None:
        return None
    from harness.models.flops import model_gflops  # torch and fvcore: only where a plan needs them

    if throughput is None:
        raise HarnessError("--throughput-model: needs --throughput. Fix: pass the images/s that "
                           "`harness bench` measured on that model.")
    model = resolve_shape(throughput_model).name
    d = spec.data
    return model_gflops(model, spec.conditioning[0], d.input_size, d.channels, d.num_classes)[0]


def _totals(plans: list[RunPlan], latent_throughput: float | None) -> dict:
    """The sweep's sums: runs, Gflops, samples and (when every run has them) accelerator-hours."""
    totals = {
        "runs": len(plans),
        "train_gflops": sum(p.train_gflops for p in plans),
        "eval_samples": sum(p.eval_samples for p in plans),
        "sampling_gflops": sum(p.sampling_gflops for p in plans),
    }
    totals["total_gflops"] = totals["train_gflops"] + totals["sampling_gflops"]
    if all(p.train_accel_hours is not None for p in plans):
        totals["train_accel_hours"] = sum(p.train_accel_hours for p in plans)
        totals["sampling_accel_hours"] = sum(p.sampling_accel_hours for p in plans)
        totals["accel_hours"] = totals["train_accel_hours"] + totals["sampling_accel_hours"]
    if latent_throughput is not None:
        known = [p.latent_accel_hours for p in plans if p.latent_accel_hours is not None]
        totals["latent_accel_hours"] = sum(known) if len(known) == len(plans) else None
        if totals.get("accel_hours") is not None and totals["latent_accel_hours"] is not None:
            totals["accel_hours"] += totals["latent_accel_hours"]
    return totals


def plan_sweep(spec: SweepSpec, throughput: float | None = None, throughput_model: str | None = None,
               sampling_throughput: float | None = None, latent_throughput: float | None = None,
               throughput_from: str | None = None, gpu: str | None = hardware.DEFAULT_GPU,
               nodes: int | None = None, gpus_per_node: int | None = None) -> dict:
    """{"sweep", "description", "checkpoints_from", "throughput_images_per_s", "throughput_model",
    "sampling_images_per_s", "latent_encodes_per_s", "runs": [RunPlan dicts], "totals"}.
    `throughput_model`: the model `throughput` and `sampling_throughput` were measured on.
    `throughput_from`: a `harness bench` JSON measuring each run's own model (instead of both).
    Without any of them, the packaged measurements of `gpu` (`harness.hardware`; None: no hours).
    With hours and GPUs (`nodes` x `gpus_per_node`, default the spec's launcher), each run's GPU count and
    the simulated queue: "schedule" holds the makespan, utilisation and the run that ends last."""
    _check_throughputs(throughput, sampling_throughput, latent_throughput, throughput_from)
    reference = _reference_gflops(spec, throughput_model, throughput)
    runs = spec.expand()
    basis = None
    if throughput_from is not None:
        measured = _measured(throughput_from, runs)
        plans = [plan_run(run, measured[run.model][0], None, *measured[run.model][1:]) for run in runs]
    elif throughput is None and gpu is not None:
        speeds, basis = _table_speeds(runs, gpu)
        plans = [plan_run(run, speeds[run.run_id][0], None, *speeds[run.run_id][1:]) for run in runs]
    else:
        plans = [plan_run(run, throughput, reference, sampling_throughput) for run in runs]
    if latent_throughput is not None:
        _latent_hours(plans, runs, latent_throughput)
    nodes = nodes or spec.launcher.nodes
    gpus_per_node = spec.launcher.gpus_per_node if gpus_per_node is None else gpus_per_node
    timed = all(p.train_accel_hours is not None for p in plans)
    sched = _schedule(spec, plans, nodes, gpus_per_node) if timed and gpus_per_node > 0 else None
    images = [p.latent_images if p.latent_images is not None else latent_images(r, scan=False)
              for p, r in zip(plans, runs)]
    return {"sweep": spec.name, "spec": str(spec.path), "description": spec.description,
            "checkpoints_from": spec.checkpoints_from,
            "throughput_images_per_s": ({m: measured[m][0] for m in sorted({r.model for r in runs})}
                                        if throughput_from is not None else throughput),
            "throughput_model": f"measured per model ({throughput_from})" if throughput_from else throughput_model,
            "sampling_images_per_s": sampling_throughput,
            "latent_encodes_per_s": latent_throughput, "table": basis, "schedule": sched,
            "runs": [p.to_dict() for p in plans], "totals": _totals(plans, latent_throughput),
            "disk": disk.sweep_disk(runs, plans, images)}


def _sci(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}" if abs(x) < 1e4 else f"{x:.3e}"


def _optional_columns(plan: dict) -> list[tuple[list[str], Callable[[dict], list[str]], list[str]]]:
    """The table's optional column groups, each (headers, a run's cells, the totals row's cells):
    accelerator-hours, latent hours, the simulated schedule, the forecast FID."""
    t, sched = plan["totals"], plan.get("schedule")
    groups = []
    if "accel_hours" in t:
        groups.append((["train_h", "eval_h"],
                       lambda r: [f"{r['train_accel_hours']:.1f}", f"{r['sampling_accel_hours']:.1f}"],
                       [f"{t['train_accel_hours']:.1f}", f"{t['sampling_accel_hours']:.1f}"]))
    if plan.get("latent_encodes_per_s") is not None:
        groups.append((["latent_h"], lambda r: [_hours(r["latent_accel_hours"])], [_hours(t["latent_accel_hours"])]))
    if sched:
        groups.append((["gpus", "start_h", "end_h"],
                       lambda r: [str(r["gpus"]), f"{r['start_h']:.1f}", f"{r['end_h']:.1f}"],
                       ["", "", f"{sched['makespan_h']:.1f}"]))
    if plan.get("forecast_from") is not None:
        groups.append((["forecast_fid"],
                       lambda r: [f"{r['forecast_fid']:.3g} [{r['forecast_lo']:.3g}, {r['forecast_hi']:.3g}]"
                                  if r["forecast_fid"] is not None else "-"],
                       [""]))
    return groups


def _table_rows(plan: dict) -> tuple[list[str], list[list[str]], list[str]]:
    """(headers, one row per run, the totals row) of the plan's table."""
    groups = _optional_columns(plan)
    cols = ["run_id", "gflops", "paper", "params_m", "train_gflops", "eval_samples", "sampling_gflops"]
    rows = []
    for r in plan["runs"]:
        rows.append([r["run_id"], f"{r['gflops']:.2f}" if r["gflops"] >= 0.1 else f"{r['gflops']:.2g}",
                     "-" if r["paper_gflops"] is None else f"{r['paper_gflops']:.2f}",
                     f"{r['params'] / 1e6:.1f}", _sci(r["train_gflops"]), str(r["eval_samples"]),
                     _sci(r["sampling_gflops"])])
    t = plan["totals"]
    total = [f"total ({t['runs']} runs)", "", "", "", _sci(t["train_gflops"]), str(t["eval_samples"]),
             _sci(t["sampling_gflops"])]
    for headers, cells, total_cells in groups:
        cols += headers
        for row, r in zip(rows, plan["runs"]):
            row += cells(r)
        total += total_cells
    return cols, rows, total


def _hours_notes(plan: dict) -> list[str]:
    """Where the accelerator-hours come from, and a note when evaluation takes much of them."""
    t = plan["totals"]
    if "accel_hours" not in t:
        return []
    out = []
    if plan.get("table"):
        b = plan["table"]
        out.append(f"accelerator-hours on one {b['gpu'].upper()} each, from the packaged measurements "
                   f"(harness/hardware/throughput.csv; --gpu picks another kind, --throughput-from your own "
                   f"`harness bench --suite`): training measured for {', '.join(b['measured']) or 'none of these models'}"
                   + (f", scaled by Gflops from the nearest measured model for {', '.join(b['scaled_by_gflops'])}"
                      if b["scaled_by_gflops"] else "")
                   + f"; evaluation's network calls scaled by Gflops (its per-image decode and features not) from {b['sampling']}; total {t['accel_hours']:.1f} h")
    elif isinstance(plan["throughput_images_per_s"], dict):
        speeds = ", ".join(f"{m} {v:,.0f}" for m, v in plan["throughput_images_per_s"].items())
        out.append(f"accelerator-hours from the training and sampling images/s {plan['throughput_model']}: "
                   f"training {speeds}; total {t['accel_hours']:.1f} h")
    else:
        on = f" on {plan['throughput_model']}, scaled by Gflops" if plan["throughput_model"] else ""
        sampling = (f"{plan['sampling_images_per_s']:g} sampling images/s per denoising step"
                    if plan.get("sampling_images_per_s") else "3x that per denoising step (no --sampling-throughput)")
        out.append(f"accelerator-hours estimated from {plan['throughput_images_per_s']:g} training images/s and "
                   f"{sampling} per accelerator{on}; total {t['accel_hours']:.1f} h")
    if t["sampling_accel_hours"] > t["accel_hours"] / 3:
        out.append(f"note: evaluation is {t['sampling_accel_hours'] / t['accel_hours']:.0%} of the accelerator-hours "
                   f"({t['sampling_accel_hours']:.1f} of {t['accel_hours']:.1f} h). To cut it: evaluate fewer "
                   "eval.at_steps, fewer sampling_steps or cfg_scales, or FID-10K at intermediate steps (a second "
                   "sweep with checkpoints_from and eval.num_samples: 10000) and FID-50K only at the last step")
    return out


def _column_notes(plan: dict) -> list[str]:
    """What the schedule, latent_h and forecast_fid columns mean, where the table has them."""
    out = []
    sched = plan.get("schedule")
    if sched:
        out.append(f"schedule on {sched['nodes']} node(s) x {sched['gpus_per_node']} GPUs, each run its own job in "
                   f"submission order (harness.cost.schedule): makespan {sched['makespan_h']:.1f} h, GPU utilisation "
                   f"{sched['utilisation']:.0%}, last to finish {sched['critical_run']}; --nodes and --gpus-per-node "
                   "plan another cluster, launcher.gpus_per_run / gpus_per_model fix the GPUs per run")
        if sched["below_efficient"]:
            out.append(f"note: {', '.join(sched['below_efficient'])} get fewer than "
                       f"{schedule.EFFICIENT_TOKENS_PER_GPU:,} tokens per GPU a step, where no throughput was measured: "
                       "their hours assume perfect scaling and are optimistic (launcher.gpus_per_run: auto avoids this)")
    if plan.get("latent_encodes_per_s") is not None:
        out.append(f"latent_h: this run's share of its latent stage at {plan['latent_encodes_per_s']:g} VAE "
                   "encodes/s per accelerator (each image and its flip)")
    if plan.get("forecast_from") is not None:
        f = plan["forecast_from"]
        out.append(f"forecast_fid: {f['law']} fitted to sweep '{f['sweep']}' ({f['runs']} runs at step {f['step']:,}, "
                   f"{f['feature_space']} features), {f['level']:.0%} interval; comparable only with that sweep's "
                   "protocol and training length")
    return out


def format_table(plan: dict) -> str:
    """A fixed-width text table of a plan, one row per run plus a totals row, then what its numbers rest on."""
    cols, rows, total = _table_rows(plan)
    widths = [max(len(c), *(len(r[i]) for r in rows + [total])) for i, c in enumerate(cols)]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    out = [f"sweep {plan['sweep']}: {plan['description']}".rstrip(": ")]
    if plan["checkpoints_from"]:
        out.append(f"evaluates the checkpoints of sweep '{plan['checkpoints_from']}' (no training)")
    out += [line(cols), line(["-" * w for w in widths])] + [line(r) for r in rows]
    out += [line(["-" * w for w in widths]), line(total)]
    out.append("gflops: forward pass per image (fvcore, multiply-add = 1); train = gflops x batch x steps x 3; "
               "sampling = gflops x steps x samples (x2 with guidance, cfg != 1)")
    return "\n".join(out + _hours_notes(plan) + _column_notes(plan) + [disk.format_disk(plan["disk"])])


def add_forecast(plan: dict, results_root: str, source: str) -> dict:
    """Add each planned run's forecast FID from the chosen law of a finished smaller sweep `source`."""
    import numpy as np

    res = load_sweep(results_root, source)
    points, step = forecast.sweep_points(res.frame)
    nxt = forecast.forecast_next(points)  # chooses and fits the law on all of the source's runs
    fit = nxt["fit"]
    X = {"compute": np.array([r["gflops"] for r in plan["runs"]], float),
         "params": np.array([r["params"] for r in plan["runs"]], float),
         "tokens": np.array([r["tokens"] for r in plan["runs"]], float)}
    pred, (lo, hi) = fit.predict(X), fit.interval(X, nxt["level"])
    for r, p, a, b in zip(plan["runs"], pred, lo, hi):
        r.update(forecast_fid=float(p), forecast_lo=float(a), forecast_hi=float(b))
    spaces = sorted(res.frame["feature_space"].dropna().astype(str).unique())
    plan["forecast_from"] = {"sweep": res.name, "law": nxt["law"], "step": step, "runs": len(points),
                             "feature_space": ", ".join(spaces) or "unknown", "level": nxt["level"]}
    return plan


def _hours(h: float | None) -> str:
    return "-" if h is None else f"{h:.1f}"


def add_plan_arguments(s) -> None:
    """`harness plan`'s flags."""
    add_spec_arguments(s)
    s.add_argument("--format", choices=["table", "json"], default="table")
    s.add_argument("--throughput", type=float, default=None,
                   help="measured training images/s per accelerator (from `harness bench`)")
    s.add_argument("--throughput-model", default=None,
                   help="the model --throughput was measured on; other runs scale by its Gflops")
    s.add_argument("--forecast-from", default=None, metavar="SWEEP",
                   help="a finished smaller sweep: show each run's forecast FID from its chosen scaling law")
    s.add_argument("--results", default="results", help="results root of --forecast-from")
    s.add_argument("--throughput-from", default=None,
                   help="a `harness bench --suite ... --out FILE.json`: each run gets its own model's measured speed")
    s.add_argument("--gpu", type=str.lower, default=None,
                   help=f"GPU kind of the packaged throughput table behind the hours (have: {', '.join(hardware.gpus())}; "
                        "default launcher.gpu_kind)")
    s.add_argument("--nodes", type=positive_int, default=None, help="plan the queue on this many nodes (default launcher.nodes)")
    s.add_argument("--gpus-per-node", type=positive_int, default=None, help="GPUs a node (default launcher.gpus_per_node)")
    s.add_argument("--sampling-throughput", type=float, default=None,
                   help="measured sampling images/s per accelerator for one denoising step (`harness bench`)")
    s.add_argument("--latent-throughput", type=float, default=None,
                   help="measured VAE encodes/s per accelerator (`harness bench --latents`)")


def cli_plan(args) -> int:
    spec = load_spec(args.sweep, args.overrides)
    plan = plan_sweep(spec, args.throughput, args.throughput_model, args.sampling_throughput,
                      args.latent_throughput, args.throughput_from, args.gpu or spec.launcher.gpu_kind,
                      args.nodes, args.gpus_per_node)
    if args.forecast_from:
        add_forecast(plan, args.results, args.forecast_from)
    if args.format == "json":
        print(json.dumps(plan, indent=2))
    else:
        print(format_table(plan))
    return 0
