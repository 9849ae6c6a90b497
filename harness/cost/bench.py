"""`harness bench`: one model's throughput on this device (`harness.training.bench`, `harness.sampling.bench`),
or a suite of models whose JSON `harness plan --throughput-from` reads (`read_throughput`).

The suite measures the models in the order given (`paper`: the 12, largest Gflops first, so a suite cut short
has measured what dominates a sweep's hours) and rewrites its JSON, and the markdown table beside it, after
every measurement, atomically. Run again with the same `--out` and the same settings, it keeps what the file
holds and measures the rest: a job's time limit or a lent GPU's session cuts a suite short, not its results.
A file written with other settings (device, precision, batch, ...) is refused, naming the first that differs.

With `--sampling-steps` the suite times each model's evaluation end to end, whose forward rate the plan uses,
so the training configurations skip their own sampling-forward timing (one compilation fewer per model).

Configurations per model (the rule, fixed before any suite ran): the trainer's defaults (`micro_batch` and
`compile` auto); on CUDA, also recomputation (gradient checkpointing) with the whole batch in one pass, but
only where the defaults failed or split the batch into micro-batches of fewer than
`schedule.EFFICIENT_TOKENS_PER_GPU` tokens. Recomputation adds a forward to forward + backward (about 4/3 the
flops), so it can only win where micro-batches leave the device under-filled.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from harness.config.arguments import add_compile_mode_argument, auto_or_positive_int, positive_int
from harness.config.registry import CONDITIONINGS, VARIANTS, resolve_shape
from harness.config.spec import PRECISIONS
from harness.config.vocab import FEATURE_SPACES
from harness.cost.schedule import EFFICIENT_TOKENS_PER_GPU
from harness.errors import HarnessError
from harness.io import atomic_write_json, atomic_write_text
from harness.paper import paper_gflops
from harness.sampling.bench import bench_eval, format_eval
from harness.training.bench import (CONVENTION, BenchResult, bench, bench_latents, compiled_words, device_name,
                                    format_table)

log = logging.getLogger(__name__)

DEFAULTS = {"micro_batch": "auto", "grad_checkpointing": False}
RECOMPUTE = {"micro_batch": None, "grad_checkpointing": True}   # None: the whole batch in one pass


def paper_models() -> list[str]:
    """The paper's 12 variants, largest Gflops (Table 4) first."""
    return sorted(VARIANTS, key=lambda m: -(paper_gflops(m) or 0.0))


def worth_recomputing(default: BenchResult, device: torch.device) -> bool:
    """The module doc's rule: on CUDA, where the defaults failed or their micro-batches under-fill the device."""
    if device.type != "cuda":
        return False
    if default.error is not None:
        return True
    tokens = (default.input_size // resolve_shape(default.model).patch) ** 2
    return default.micro_batch < default.batch and default.micro_batch * tokens < EFFICIENT_TOKENS_PER_GPU


def _failed(name: str, batch: int, cfg: dict, msg: str, kw: dict) -> BenchResult:
    return BenchResult(name, kw.get("conditioning", "adaLN-Zero"), "?", torch.__version__,
                       kw.get("precision", "fp32"), False, 0, cfg["grad_checkpointing"], batch,
                       kw.get("input_size", 32), kw.get("in_channels", 4), torch.get_num_threads(), 0.0, 0,
                       0.0, 0.0, 0.0, 0.0, 0.0, None, 0.0, None, "", error=msg,
                       compile_mode=kw.get("compile_mode", "default"))


def _measure(name: str, batch: int, cfg: dict, device: torch.device, kw: dict, time_sampling: bool) -> BenchResult:
    """One configuration; a failure (out of memory, nothing fits) is a result with its error and zero speed."""
    micro = batch if cfg["micro_batch"] is None else cfg["micro_batch"]
    try:
        r = bench(name, batch=batch, micro_batch=micro, grad_checkpointing=cfg["grad_checkpointing"], device=device,
                  time_sampling=time_sampling, **kw)
    except (HarnessError, torch.OutOfMemoryError) as err:
        msg = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        log.warning("%s %s: %s", name, cfg, msg)
        r = _failed(name, batch, cfg, msg, kw)
    log.info("%s: %.1f images/s (%s)", name, r.train_images_per_s, cfg)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return r


# ----------------------------------------------------------------------------- the suite file
def suite_settings(batch: int, kw: dict, eval_kw: dict | None, device: torch.device) -> dict:
    """What makes two suites' measurements comparable: the device and every flag but --out and --format
    (weight files excepted: they do not change the speed)."""
    ev = None if eval_kw is None else {k: v for k, v in eval_kw.items()
                                       if k not in ("autoencoder_path", "inception_weights")}
    return {"device": device_name(device), "torch": torch.__version__, "batch": batch,
            **{k: v for k, v in kw.items() if k != "device"}, "eval": ev}


def load_suite(path: Path, settings: dict) -> list[BenchResult]:
    """The results a suite file at `path` already holds (none when it does not exist); HarnessError naming
    the file, the first differing setting and the fix when it was written with other settings."""
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text())
        held = data.get("settings") if isinstance(data, dict) else None
        results = [_result(r) for r in data["results"]]
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as err:
        raise HarnessError(f"{path}: not a `harness bench --suite` JSON ({err}). Fix: another --out, or move "
                           "the file away") from err
    if held != settings:
        key = next((k for k in settings if not isinstance(held, dict) or held.get(k) != settings[k]), "settings")
        was = held.get(key) if isinstance(held, dict) else None
        raise HarnessError(f"{path}: a suite measured with {key} = {was!r}, this one has {settings.get(key)!r}; "
                           "the suite continues a file only with the same settings. Fix: another --out, or the "
                           "file's settings")
    return results


def _result(row: dict) -> BenchResult:
    return BenchResult(**{k: v for k, v in row.items() if k in BenchResult.__dataclass_fields__})


def _save(path: Path | None, settings: dict, results: list[BenchResult]) -> None:
    if path is None:
        return
    atomic_write_json(path, {"settings": settings, "results": [asdict(r) for r in results]})
    atomic_write_text(path.with_suffix(".md"), suite_markdown(results) + "\n")


def bench_suite(models: list[str], batch: int, out: Path | None = None, eval_kw: dict | None = None,
                device: torch.device | None = None, **kw: Any) -> list[BenchResult]:
    """Each model of `models`, in order: its configurations (the module doc's rule), then, with `eval_kw`
    (`bench_eval`'s arguments), its evaluation end to end; written to `out` after each measurement, and
    continued from `out` when it holds a suite of the same settings."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    settings = suite_settings(batch, kw, eval_kw, device)
    results = load_suite(out, settings) if out is not None else []
    if results:
        log.info("%s: continuing a suite of %d measured models", out, len({r.model for r in results}))
    timed_forward = eval_kw is None   # with evaluation measured, the training forward's own graph is not needed
    for name in models:
        rows = [r for r in results if r.model == name]
        if not any(not r.grad_checkpointing for r in rows):
            rows.append(_measure(name, batch, DEFAULTS, device, kw, timed_forward))
            results.append(rows[-1])
            _save(out, settings, results)
        default = next(r for r in rows if not r.grad_checkpointing)
        if worth_recomputing(default, device) and not any(r.grad_checkpointing for r in rows):
            results.append(_measure(name, batch, RECOMPUTE, device, kw, timed_forward))
            _save(out, settings, results)
        if eval_kw is not None and default.eval is None:
            # once per model, at the evaluation's own settings (not per training configuration)
            default.eval = bench_eval(name, kw.get("conditioning", "adaLN-Zero"), device=device, **eval_kw)
            _save(out, settings, results)
    return results


def best_per_model(results: list[BenchResult]) -> dict[str, BenchResult]:
    best: dict[str, BenchResult] = {}
    for r in results:
        if r.error is None and (r.model not in best or r.train_images_per_s > best[r.model].train_images_per_s):
            best[r.model] = r
    return best


def _config_words(r: BenchResult) -> str:
    return f"{compiled_words(r)}, micro-batch {r.micro_batch}{', grad checkpointing' if r.grad_checkpointing else ''}"


def suite_markdown(results: list[BenchResult]) -> str:
    """One row per configuration, the best per model in bold."""
    best = best_per_model(results)
    first = next((r for r in results if r.error is None), results[0])
    lines = [f"Device: {first.device}, torch {first.torch_version}, {first.precision}, batch {first.batch} per "
             f"device, {first.in_channels}x{first.input_size}x{first.input_size} inputs. {CONVENTION}.", "",
             "| model | config | images/s | steps/s | MFU | TFLOP/s | peak memory | attention | evaluation |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        ev = (f"{r.eval['images_per_s']:.2f} images/s at {r.eval['sampling_steps']} steps, batch {r.eval['batch']}: "
              f"{r.eval['num_samples']:,} in {r.eval['projected_h']:.2f} h") if r.eval else ""
        if r.error:
            lines.append(f"| {r.model} | {_config_words(r)} | failed: {r.error} | | | | | | {ev} |")
            continue
        mfu = f"{100 * r.mfu:.1f}%" if r.mfu is not None else "n/a"
        cells = [r.model, _config_words(r), f"{r.train_images_per_s:,.1f}", f"{r.train_steps_per_s:.3f}", mfu,
                 f"{r.achieved_tflops:.3g}", f"{r.peak_mem_mb / 1024:.1f} GB", r.attention_kernel, ev]
        if best.get(r.model) is r:
            cells = [f"**{c}**" if c else c for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def read_throughput(path: str | Path) -> dict[str, tuple[float, float, float]]:
    """{model: (training images/s, sampling images/s for one denoising step, evaluation s per image beyond the
    network)} from the best configuration of each model in a `harness bench --suite` JSON (or one `harness
    bench --out` result). Sampling: the end-to-end evaluation's forward rate and per-image cost (noise, decode,
    features) when measured (`--sampling-steps`), else the training configuration's forward and 0.
    HarnessError naming the file if it is not one."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        rows = data["results"] if isinstance(data, dict) and "results" in data else [data]
        results = [_result(r) for r in rows]
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise HarnessError(f"{path}: not a `harness bench` JSON ({err}). Fix: write one with "
                           "`harness bench --suite MODELS --out FILE.json`") from err
    per_model: dict[str, tuple[float, float, float]] = {}
    for m, r in best_per_model(results).items():
        ev = next((x.eval for x in results if x.model == m and x.eval), None)
        if ev is None and not r.sample_images_per_s_one_step:
            raise HarnessError(f"{path}: {m} has no sampling measurement (a suite cut before its evaluation). Fix: "
                               "run the same `harness bench --suite ... --out` again; it measures what the file lacks")
        per_model[m] = ((r.train_images_per_s, ev["forward_images_per_s"], ev["fixed_s_per_batch"] / ev["batch"])
                        if ev else (r.train_images_per_s, r.sample_images_per_s_one_step, 0.0))
    return per_model


# ----------------------------------------------------------------------------- CLI
def format_stage(r: dict) -> str:
    if r["stage"] == "evaluation":
        return format_eval(r)
    return (f"latent stage        {r['encodes_per_s']:.2f} VAE encodes/s ({r['image_size']}px, batch {r['batch']}, "
            f"{r['precision']}, {r['device']}); the stage encodes each image and its flip")


def _eval_kwargs(args: Any) -> dict:
    return dict(sampling_steps=args.sampling_steps, num_samples=args.eval_samples, batch=args.eval_batch,
                precision=args.eval_precision, compile={"auto": "auto", "on": True, "off": False}[args.compile],
                compile_mode=args.compile_mode,
                input_size=args.input_size, in_channels=args.in_channels, autoencoder_path=args.autoencoder_path,
                features=args.eval_features, inception_weights=args.inception_weights)
def add_bench_arguments(s) -> None:
    s.add_argument("--model", default=None, help="one model, e.g. DiT-XL/2")
    s.add_argument("--suite", nargs="?", const="paper", default=None,
                   help="bench several models, in order, in each configuration worth trying: 'paper' (the 12, "
                        "largest first; the default) or M1,M2,...; prints a markdown table with the best "
                        "configuration per model")
    s.add_argument("--out", default=None,
                   help="write the JSON here; a suite also writes the .md table beside it, after every model, and "
                        "continues a file of the same settings (measuring only what it lacks)")
    s.add_argument("--conditioning", default="adaLN-Zero", choices=CONDITIONINGS)
    s.add_argument("--batch", type=positive_int, default=8, help="batch per device (the paper: 256 on one GPU)")
    s.add_argument("--micro-batch", type=auto_or_positive_int, default="auto",
                   help="auto (the largest that fits, as training does) or a divisor of --batch")
    s.add_argument("--steps", type=positive_int, default=10)
    s.add_argument("--warmup", type=positive_int, default=2)
    s.add_argument("--precision", choices=PRECISIONS, default="fp32")
    s.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                   help="auto: compiled on CUDA, eager on the CPU (as training)")
    add_compile_mode_argument(s)
    s.add_argument("--grad-checkpointing", action="store_true")
    s.add_argument("--input-size", type=positive_int, default=32, help="latent side (32 = 256px through the SD VAE)")
    s.add_argument("--in-channels", type=positive_int, default=4)
    s.add_argument("--latents", action="store_true",
                   help="also time the latent stage: SD VAE encodes/s at input-size x 8 px, --batch images")
    s.add_argument("--sampling-steps", type=positive_int, default=None,
                   help="also time evaluation end to end (DDPM with this many steps, VAE decode, features) as "
                        "eval.* resolve here; with --suite, once per model (what `harness plan --throughput-from` uses)")
    s.add_argument("--eval-samples", type=positive_int, default=50_000, help="images of the projected evaluation")
    s.add_argument("--eval-batch", type=auto_or_positive_int, default="auto", help="eval.batch_size: auto or images")
    s.add_argument("--eval-precision", choices=("auto",) + tuple(PRECISIONS), default="auto",
                   help="eval.precision (auto: bf16 on CUDA, fp32 on the CPU)")
    s.add_argument("--eval-features", choices=FEATURE_SPACES, default="inception")
    s.add_argument("--inception-weights", default=None,
                   help="FID Inception weights for --sampling-steps (default: its architecture, random weights)")
    s.add_argument("--autoencoder-path", default=None,
                   help="SD VAE weights for --latents/--sampling-steps (default: its architecture, random weights)")
    s.add_argument("--format", choices=["table", "json"], default="table")


def cli_bench(args: Any) -> int:
    compile_ = {"auto": "auto", "on": True, "off": False}[args.compile]
    kw = dict(steps=args.steps, warmup=args.warmup, precision=args.precision, compile=compile_,
              compile_mode=args.compile_mode,
              input_size=args.input_size, in_channels=args.in_channels, conditioning=args.conditioning)
    if args.suite is not None:
        models = paper_models() if args.suite in ("", "paper") else [m.strip() for m in args.suite.split(",")]
        results = bench_suite(models, args.batch, Path(args.out) if args.out else None,
                              _eval_kwargs(args) if args.sampling_steps else None, **kw)
        print(json.dumps([asdict(r) for r in results], indent=2) if args.format == "json"
              else suite_markdown(results))
        return 0 if best_per_model(results) else 1
    if not args.model:
        raise HarnessError("harness bench: give --model NAME, or --suite [paper | M1,M2,...]")
    r = bench(args.model, batch=args.batch, micro_batch=args.micro_batch,
              grad_checkpointing=args.grad_checkpointing, **kw)
    stages = []
    if args.latents:
        stages.append(bench_latents(args.input_size * 8, args.batch, args.steps, autoencoder_path=args.autoencoder_path))
    if args.sampling_steps:
        stages.append(bench_eval(args.model, args.conditioning, **_eval_kwargs(args)))
    record = {**asdict(r), "stages": stages}
    if args.out:
        atomic_write_json(Path(args.out), record)
    print(json.dumps(record, indent=2) if args.format == "json" else "\n".join([format_table(r), *map(format_stage, stages)]))
    return 0
