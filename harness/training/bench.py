"""`harness bench`: training and sampling throughput of DiTs on the present device.

Training: full steps of the trainer's own step (`harness.training.step.TrainStep`: the diffusion loss with
the learned-variance term in micro-batches, backward, AdamW, EMA) on random latents, with the
trainer's defaults: `micro_batch` and `compile` both `auto` unless given. `batch` is the batch of
ONE device (the paper's global 256 on one GPU; 256 / N per GPU with N GPUs). Sampling: one
denoising step is one forward pass at the batch (no classifier-free guidance; CFG doubles the
batch), so "sampling images/s" = forward passes/s x batch for ONE step; divide by the number of
sampling steps (e.g. 250) for finished images/s.

Achieved TFLOP/s = Gflops x 2 x 3 x images/s / 1000, where Gflops is the paper's (fvcore) count of
forward multiply-adds per image, x 2 flops per multiply-add, x 3 for forward + backward. Model-flops
utilisation (MFU) divides that by the device's dense peak for the precision, when known.

`--suite` benches a list of models (default: the paper's 12) in each configuration worth trying
(on CUDA: the defaults, and gradient checkpointing with the whole batch in one pass) and writes
JSON plus a markdown table with the best configuration per model; `harness plan
--throughput-from FILE.json` reads that JSON.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from harness.errors import HarnessError
from harness.training.runtime import Dist, peak_mem_mb, peak_tflops, train_tflops
from harness.config.arguments import add_compile_mode_argument, auto_or_positive_int, positive_int
from harness.config.registry import CONDITIONINGS, VARIANTS
from harness.config.spec import PRECISIONS
from harness.config.vocab import FEATURE_SPACES
from harness.io import atomic_write_json, atomic_write_text
from harness.models.diffusion import create_diffusion
from harness.models.dit import build_model
from harness.models.flops import model_gflops
from harness.models.compiled import CompiledOrEager, set_attention_order
from harness.sampling.bench import bench_eval, format_eval, sd_vae
from harness.training.assemble import StepSettings, build_step, enable_tf32, fresh_state
from harness.training.step import Batch, BatchGeometry, TrainStep, resolve_compile, autocast

log = logging.getLogger(__name__)

CONVENTION = ("TFLOP/s = Gflops (fvcore forward multiply-adds per image) x 2 flops/multiply-add "
              "x 3 (forward+backward) x images/s")


@dataclass
class BenchResult:
    model: str
    conditioning: str
    device: str
    torch_version: str
    precision: str
    compile: bool
    micro_batch: int
    grad_checkpointing: bool
    batch: int
    input_size: int
    in_channels: int
    threads: int
    gflops: float
    params: int
    train_steps_per_s: float
    train_images_per_s: float
    sample_forward_per_s: float
    sample_images_per_s_one_step: float
    achieved_tflops: float
    mfu: float | None
    peak_mem_mb: float
    compile_s: float | None
    attention_kernel: str
    error: str | None = None
    convention: str = CONVENTION
    eval: dict | None = None  # harness.sampling.bench.bench_eval's end-to-end evaluation throughput, when measured
    compile_mode: str = "default"  # torch.compile's mode when compiled (--compile-mode)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _attention_kernel(fn: Any, device: torch.device) -> str:
    """The attention kernels one call of `fn` launched on CUDA (from the profiler), e.g. 'flash'."""
    if device.type != "cuda":
        return "cpu"
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        _sync(device)
    names = {e.key.lower() for e in prof.key_averages()}
    found = [label for label, frag in (("flash", "flash"), ("cudnn", "cudnn"), ("mem-efficient", "fmha"),
                                       ("mem-efficient", "efficient_attention"), ("math", "bmm"))
             if any(frag in n for n in names)]
    return ",".join(dict.fromkeys(found)) or "unknown"


def bench(model_name: str, conditioning: str = "adaLN-Zero", batch: int = 8, steps: int = 10, warmup: int = 2,
          precision: str = "fp32", compile: bool | str = "auto", micro_batch: int | str = "auto",
          grad_checkpointing: bool = False, input_size: int = 32, in_channels: int = 4,
          num_classes: int = 1000, device: torch.device | None = None, compile_mode: str = "default") -> BenchResult:
    """Time `steps` training steps and `steps` sampling forwards after `warmup` of each."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    enable_tf32(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    resolve_compile(compile, device, where="--compile")  # before anything is built: a refusal costs nothing
    set_attention_order()  # $HARNESS_ATTENTION, for measuring kernel orders (the kernel that ran is recorded)
    geometry = BatchGeometry.of(batch, 1, micro_batch, micro_key="--micro-batch")
    gflops, params = model_gflops(model_name, conditioning, input_size, in_channels, num_classes)
    settings = StepSettings(model_name, conditioning, (in_channels, input_size, input_size), num_classes, precision,
                            compile, ema_decay=0.9999, compile_key="--compile", compile_mode=compile_mode)
    model, step, data = _bench_step(settings, geometry, grad_checkpointing, device)

    model.train()
    for _ in range(warmup):
        step(data, 1e-4)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step(data, 1e-4)
    _sync(device)
    train_sps = steps / (time.perf_counter() - t0)
    log.info("%s: training %.1f images/s (%.3f steps/s), micro-batch %d, %s, compile %.0f s, peak %.0f MB",
             model_name, train_sps * batch, train_sps, step.micro_batch,
             "compiled" if step.compiled else "eager", step.compile_s or 0.0, peak_mem_mb(device))

    model.eval()
    t = torch.full((batch,), 500, device=device, dtype=torch.long)
    fwd = CompiledOrEager(model, step.compiled, f"the forward of {model_name}", mode=compile_mode)
    with torch.no_grad(), autocast(device, precision):
        for _ in range(warmup):
            fwd(data.x0, t, data.y)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            fwd(data.x0, t, data.y)
        _sync(device)
        fwd_ps = steps / (time.perf_counter() - t0)
        kernel = _attention_kernel(lambda: model(data.x0, t, data.y), device)

    images = train_sps * batch
    tflops = train_tflops(gflops, images)
    peak = peak_tflops(device, precision)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return BenchResult(model_name, conditioning, name, torch.__version__, precision, step.compiled, step.micro_batch,
                       grad_checkpointing, batch, input_size, in_channels, torch.get_num_threads(), gflops, params,
                       train_sps, images, fwd_ps, fwd_ps * batch, tflops, (tflops / peak) if peak else None,
                       peak_mem_mb(device), step.compile_s, kernel, compile_mode=compile_mode)


def _bench_step(settings: StepSettings, geometry: BatchGeometry, grad_checkpointing: bool,
                device: torch.device) -> tuple[torch.nn.Module, TrainStep, Batch]:
    """The model (seed 0), the trainer's step for it (harness.training.assemble) and one random batch to time."""
    torch.manual_seed(0)
    s, batch = settings, geometry.global_batch
    model = build_model(s.model, s.conditioning, input_size=s.shape[1], in_channels=s.shape[0],
                        num_classes=s.num_classes).to(device)
    ema, opt = fresh_state(model, lr=1e-4, weight_decay=0.0)
    model.grad_checkpointing = grad_checkpointing
    diffusion = create_diffusion(None)
    step, geometry = build_step(settings, model, ema, opt, diffusion, Dist(device=device), geometry)
    g = torch.Generator(device=device).manual_seed(0)
    data = Batch(torch.randn(batch, *s.shape, generator=g, device=device),
                 torch.randint(0, s.num_classes, (batch,), generator=g, device=device),
                 torch.randint(0, diffusion.num_timesteps, (batch,), generator=g, device=device),
                 torch.randn(batch, *s.shape, generator=g, device=device),
                 torch.rand(batch, generator=g, device=device) < 0.1)
    return model, step, data


# ----------------------------------------------------------------------------- the suite
def suite_configs(device: torch.device) -> list[dict]:
    """Configurations worth trying per model: the trainer's defaults; on CUDA also recomputation
    with the whole batch in one pass (fits where activations would not)."""
    configs = [{"micro_batch": "auto", "grad_checkpointing": False}]
    if device.type == "cuda":
        configs.append({"micro_batch": None, "grad_checkpointing": True})
    return configs


def bench_suite(models: list[str], batch: int, **kw: Any) -> list[BenchResult]:
    """Every model in every configuration of `suite_configs`; a configuration that fails (out of
    memory, nothing fits) is kept as a result with its error and zero throughput."""
    device = kw.get("device") or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = []
    for name in models:
        for cfg in suite_configs(device):
            micro = batch if cfg["micro_batch"] is None else cfg["micro_batch"]
            try:
                r = bench(name, batch=batch, micro_batch=micro, grad_checkpointing=cfg["grad_checkpointing"], **kw)
            except (HarnessError, torch.OutOfMemoryError) as err:
                msg = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
                log.warning("%s %s: %s", name, cfg, msg)
                r = _failed(name, batch, cfg, msg, kw)
            log.info("%s: %.1f images/s (%s)", name, r.train_images_per_s, cfg)
            out.append(r)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return out


def _failed(name: str, batch: int, cfg: dict, msg: str, kw: dict) -> BenchResult:
    return BenchResult(name, kw.get("conditioning", "adaLN-Zero"), "?", torch.__version__,
                       kw.get("precision", "fp32"), False, 0, cfg["grad_checkpointing"], batch,
                       kw.get("input_size", 32), kw.get("in_channels", 4), torch.get_num_threads(), 0.0, 0,
                       0.0, 0.0, 0.0, 0.0, 0.0, None, 0.0, None, "", error=msg,
                       compile_mode=kw.get("compile_mode", "default"))


def best_per_model(results: list[BenchResult]) -> dict[str, BenchResult]:
    best: dict[str, BenchResult] = {}
    for r in results:
        if r.error is None and (r.model not in best or r.train_images_per_s > best[r.model].train_images_per_s):
            best[r.model] = r
    return best


def suite_markdown(results: list[BenchResult]) -> str:
    """One row per configuration, the best per model in bold."""
    best = best_per_model(results)
    first = next((r for r in results if r.error is None), results[0])
    lines = [f"Device: {first.device}, torch {first.torch_version}, {first.precision}, batch {first.batch} per "
             f"device, {first.in_channels}x{first.input_size}x{first.input_size} inputs. {CONVENTION}.", "",
             "| model | config | images/s | steps/s | MFU | TFLOP/s | peak memory | attention |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        cfg = (f"{_compiled_words(r)}, micro-batch {r.micro_batch}"
               f"{', grad checkpointing' if r.grad_checkpointing else ''}")
        if r.error:
            lines.append(f"| {r.model} | {cfg} | failed: {r.error} | | | | | |")
            continue
        mfu = f"{100 * r.mfu:.1f}%" if r.mfu is not None else "n/a"
        cells = [r.model, cfg, f"{r.train_images_per_s:,.1f}", f"{r.train_steps_per_s:.3f}", mfu,
                 f"{r.achieved_tflops:.3g}", f"{r.peak_mem_mb / 1024:.1f} GB", r.attention_kernel]
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
        results = [BenchResult(**{k: v for k, v in r.items() if k in BenchResult.__dataclass_fields__})
                   for r in rows]
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise HarnessError(f"{path}: not a `harness bench` JSON ({err}). Fix: write one with "
                           "`harness bench --suite MODELS --out FILE.json`") from err
    per_model: dict[str, tuple[float, float, float]] = {}
    for m, r in best_per_model(results).items():
        ev = next((x.eval for x in results if x.model == m and x.eval), None)
        per_model[m] = ((r.train_images_per_s, ev["forward_images_per_s"], ev["fixed_s_per_batch"] / ev["batch"])
                        if ev else (r.train_images_per_s, r.sample_images_per_s_one_step, 0.0))
    return per_model


# ----------------------------------------------------------------------------- CLI
def _compiled_words(r: BenchResult) -> str:
    if not r.compile:
        return "eager"
    return "compiled" if r.compile_mode == "default" else f"compiled ({r.compile_mode})"


def format_table(r: BenchResult) -> str:
    mfu = f"{100 * r.mfu:.1f}%" if r.mfu is not None else "n/a (peak unknown for this device)"
    lines = [
        f"model               {r.model} ({r.conditioning}), {r.params / 1e6:.1f}M params, {r.gflops:.3f} Gflops",
        f"input               batch {r.batch} (micro-batches of {r.micro_batch}) x "
        f"{r.in_channels}x{r.input_size}x{r.input_size}",
        f"device              {r.device} ({r.threads} CPU threads), torch {r.torch_version}, {r.precision}"
        f", {_compiled_words(r)}{', grad checkpointing' if r.grad_checkpointing else ''}",
        f"training            {r.train_steps_per_s:.3f} steps/s, {r.train_images_per_s:.2f} images/s",
        f"sampling            {r.sample_forward_per_s:.3f} forward passes/s = "
        f"{r.sample_images_per_s_one_step:.2f} images/s for ONE denoising step (no CFG)",
        f"achieved            {r.achieved_tflops:.4f} TFLOP/s   [{r.convention}]",
        f"MFU                 {mfu}",
        f"peak memory         {r.peak_mem_mb:.0f} MB",
        f"attention kernel    {r.attention_kernel}",
    ]
    if r.compile_s is not None:
        lines.append(f"compile time        {r.compile_s:.1f} s (first step)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- latent stage and sampling
def bench_latents(image_size: int = 256, batch: int = 4, steps: int = 3, warmup: int = 1,
                  autoencoder_path: str | None = None, device: torch.device | None = None) -> dict:
    """VAE encodes/s as the latent stage runs them (posterior sample; bf16 autocast on a GPU) on
    random (batch, 3, image_size, image_size) images. Image decoding and cropping (the loader
    workers' job) are not included."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ae = sd_vae(autoencoder_path).to(device)
    x = torch.rand(batch, 3, image_size, image_size, device=device) * 2 - 1
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for _ in range(warmup):
            ae.encode(x, gen)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            ae.encode(x, gen)
        _sync(device)
    wall = time.perf_counter() - t0
    return {"stage": "latents", "device": _device_name(device), "image_size": image_size, "batch": batch,
            "precision": "bf16" if device.type == "cuda" else "fp32", "encodes_per_s": steps * batch / wall}


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"


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
                   help="bench several models in each configuration worth trying: 'paper' (the 12, default) "
                        "or M1,M2,...; prints a markdown table with the best configuration per model")
    s.add_argument("--out", default=None, help="write the JSON here (a suite also writes the .md table beside it)")
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
        models = list(VARIANTS) if args.suite in ("", "paper") else [m.strip() for m in args.suite.split(",")]
        results = bench_suite(models, args.batch, **kw)
        if args.sampling_steps:
            for name in models:   # once per model, at the evaluation's own settings (not per training config)
                measured = bench_eval(name, args.conditioning, **_eval_kwargs(args))
                next(r for r in results if r.model == name).eval = measured
        table = suite_markdown(results)
        if args.out:
            out = Path(args.out)
            atomic_write_json(out, {"results": [asdict(r) for r in results]})
            atomic_write_text(out.with_suffix(".md"), table + "\n")
        print(json.dumps([asdict(r) for r in results], indent=2) if args.format == "json" else table)
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
