"""One model's training and sampling throughput on the present device: what `harness bench` measures
(the command, its suite and the reader `harness plan --throughput-from` uses: `harness.cost.bench`).

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
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from harness.training.runtime import Dist, peak_mem_mb, peak_tflops, train_tflops
from harness.models.diffusion import create_diffusion
from harness.models.dit import build_model
from harness.models.flops import model_gflops
from harness.models.compiled import CompiledOrEager, set_attention_order
from harness.sampling.bench import sd_vae
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
          num_classes: int = 1000, device: torch.device | None = None, compile_mode: str = "default",
          time_sampling: bool = True) -> BenchResult:
    """Time `steps` training steps and, with `time_sampling`, `steps` sampling forwards (a graph of their own
    to compile) after `warmup` of each; without, the sampling fields are 0 (the suite times evaluation instead)."""
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
    fwd_ps = 0.0
    with torch.no_grad(), autocast(device, precision):
        if time_sampling:
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


# ----------------------------------------------------------------------------- one result as text
def compiled_words(r: BenchResult) -> str:
    """'eager', 'compiled' or 'compiled (<mode>)'."""
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
        f", {compiled_words(r)}{', grad checkpointing' if r.grad_checkpointing else ''}",
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
    return {"stage": "latents", "device": device_name(device), "image_size": image_size, "batch": batch,
            "precision": "bf16" if device.type == "cuda" else "fp32", "encodes_per_s": steps * batch / wall}


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
