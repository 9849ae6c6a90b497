"""`harness bench`: training and sampling throughput of one DiT on the present device.

Training: full steps of the real recipe (diffusion loss with the learned-variance term, backward,
AdamW, EMA update) on random latents. Sampling: one denoising step is one forward pass of the
model at the batch size (no classifier-free guidance; CFG doubles the batch), so "sampling
images/s" = forward passes/s x batch, for ONE denoising step; divide by the number of sampling
steps (e.g. 250) for finished images/s.

Achieved TFLOP/s = Gflops x 2 x 3 x images/s / 1000, where Gflops is the paper's (fvcore) count of
forward multiply-adds per image, x 2 flops per multiply-add, x 3 for forward + backward. Model-flops
utilisation (MFU) divides that by the device's dense peak for the precision, when known.
"""
from __future__ import annotations

import copy
import json
import logging
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Any

import torch

from harness import paper

log = logging.getLogger(__name__)

FLOPS_PER_MAC = 2
CONVENTION = ("TFLOP/s = Gflops (fvcore forward multiply-adds per image) x 2 flops/multiply-add "
              "x 3 (forward+backward) x images/s")

# Dense peak TFLOP/s by (device-name fragment, precision); fp32 training on these GPUs uses TF32.
PEAK_TFLOPS = [
    ("H200", "bf16", 989.0), ("H200", "fp32", 494.7),
    ("H100 PCIe", "bf16", 756.0), ("H100 PCIe", "fp32", 378.0),
    ("H100", "bf16", 989.0), ("H100", "fp32", 494.7),   # SXM
    ("A100", "bf16", 312.0), ("A100", "fp32", 156.0),
]


def peak_tflops(device: torch.device, precision: str) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for fragment, prec, peak in PEAK_TFLOPS:
        if fragment in name and prec == precision:
            return peak
    return None


@dataclass
class BenchResult:
    model: str
    conditioning: str
    device: str
    precision: str
    compile: bool
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
    convention: str = CONVENTION


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(model_name: str, conditioning: str = "adaLN-Zero", batch: int = 8, steps: int = 10, warmup: int = 2,
          precision: str = "fp32", compile: bool = False, grad_checkpointing: bool = False,
          input_size: int = 32, in_channels: int = 4, num_classes: int = 1000,
          device: torch.device | None = None) -> BenchResult:
    """Time `steps` training steps and `steps` sampling forwards after `warmup` of each."""
    from harness.diffusion import create_diffusion
    from harness.flops import model_gflops
    from harness.models import build_model
    from harness.runtime import ema_update, peak_mem_mb

    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.cuda.reset_peak_memory_stats(device)
    gflops, params = model_gflops(model_name, conditioning, input_size, in_channels, num_classes)
    torch.manual_seed(0)
    model = build_model(model_name, conditioning, input_size=input_size, in_channels=in_channels,
                        num_classes=num_classes).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    model.grad_checkpointing = grad_checkpointing
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0,
                            **({"fused": True} if device.type == "cuda" else {}))
    fwd = torch.compile(model) if compile else model
    diffusion = create_diffusion(None)
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    x0 = torch.randn(batch, in_channels, input_size, input_size, device=device)
    y = torch.randint(0, num_classes, (batch,), device=device)

    def train_step() -> None:
        t = torch.randint(0, diffusion.num_timesteps, (batch,), device=device)
        with amp:
            loss = diffusion.training_losses(fwd, x0, t, {"y": y})["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema_update(ema, model, 0.9999)

    model.train()
    for _ in range(warmup):
        train_step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        train_step()
    _sync(device)
    train_sps = steps / (time.perf_counter() - t0)

    model.eval()
    t = torch.full((batch,), 500, device=device, dtype=torch.long)
    with torch.no_grad(), amp:
        for _ in range(warmup):
            fwd(x0, t, y)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            fwd(x0, t, y)
        _sync(device)
    fwd_ps = steps / (time.perf_counter() - t0)

    images = train_sps * batch
    tflops = gflops * FLOPS_PER_MAC * paper.TRAIN_PASSES * images / 1e3
    peak = peak_tflops(device, precision)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return BenchResult(model_name, conditioning, name, precision, compile, grad_checkpointing, batch, input_size,
                       in_channels, torch.get_num_threads(), gflops, params, train_sps, images, fwd_ps,
                       fwd_ps * batch, tflops, (tflops / peak) if peak else None, peak_mem_mb(device))


def format_table(r: BenchResult) -> str:
    mfu = f"{100 * r.mfu:.1f}%" if r.mfu is not None else "n/a (peak unknown for this device)"
    lines = [
        f"model               {r.model} ({r.conditioning}), {r.params / 1e6:.1f}M params, {r.gflops:.3f} Gflops",
        f"input               batch {r.batch} x {r.in_channels}x{r.input_size}x{r.input_size}",
        f"device              {r.device} ({r.threads} CPU threads), {r.precision}"
        f"{', torch.compile' if r.compile else ''}{', grad checkpointing' if r.grad_checkpointing else ''}",
        f"training            {r.train_steps_per_s:.3f} steps/s, {r.train_images_per_s:.2f} images/s",
        f"sampling            {r.sample_forward_per_s:.3f} forward passes/s = "
        f"{r.sample_images_per_s_one_step:.2f} images/s for ONE denoising step (no CFG)",
        f"achieved            {r.achieved_tflops:.4f} TFLOP/s   [{r.convention}]",
        f"MFU                 {mfu}",
        f"peak memory         {r.peak_mem_mb:.0f} MB",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- latent stage and sampling
def _sd_vae(path: str | None) -> Any:
    """The SD VAE from `path`, else its architecture with random weights (same speed)."""
    from harness.autoencoder import SD_VAE_CONFIG, VAEAutoencoder, load_autoencoder

    if path:
        return load_autoencoder("sd-vae-ft-ema", path)
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return VAEAutoencoder("sd-vae-ft-ema", AutoencoderKL(**SD_VAE_CONFIG))


def bench_latents(image_size: int = 256, batch: int = 4, steps: int = 3, warmup: int = 1,
                  autoencoder_path: str | None = None, device: torch.device | None = None) -> dict:
    """VAE encodes/s as the latent stage runs them (posterior sample; bf16 autocast on a GPU) on
    random (batch, 3, image_size, image_size) images. Image decoding and cropping (the loader
    workers' job) are not included."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ae = _sd_vae(autoencoder_path).to(device)
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


def bench_sampling(model_name: str, conditioning: str = "adaLN-Zero", sampling_steps: int = 4, batch: int = 8,
                   input_size: int = 32, in_channels: int = 4, num_classes: int = 1000,
                   autoencoder_path: str | None = None, device: torch.device | None = None) -> dict:
    """Finished images/s of harness.sample.sample_images (DDPM, no guidance, VAE decode included when
    in_channels is 4) with `sampling_steps` steps, after one warm-up batch; images/s per denoising
    step = that x sampling_steps (what `harness plan --sampling-throughput` takes)."""
    from harness.autoencoder import IdentityAutoencoder
    from harness.models import build_model
    from harness.sample import balanced_labels, sample_images

    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = build_model(model_name, conditioning, input_size=input_size, in_channels=in_channels,
                        num_classes=num_classes).to(device)
    ae = _sd_vae(autoencoder_path) if in_channels == 4 else IdentityAutoencoder()
    labels = balanced_labels(batch, num_classes)
    kw = dict(sampler="ddpm", cfg_scale=1.0, device=device, batch_size=batch, autoencoder=ae)
    sample_images(model, None, labels, sampling_steps=2, **kw)  # warm-up (1 step would respace to log(0))
    _sync(device)
    t0 = time.perf_counter()
    sample_images(model, None, labels, sampling_steps=sampling_steps, **kw)
    _sync(device)
    images_per_s = batch / (time.perf_counter() - t0)
    return {"stage": "sampling", "device": _device_name(device), "model": model_name, "batch": batch,
            "sampling_steps": sampling_steps, "decode": ae.name, "precision": "fp32",
            "images_per_s": images_per_s, "images_per_s_per_step": images_per_s * sampling_steps}


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"


def format_stage(r: dict) -> str:
    if r["stage"] == "latents":
        return (f"latent stage        {r['encodes_per_s']:.2f} VAE encodes/s ({r['image_size']}px, batch {r['batch']}, "
                f"{r['precision']}, {r['device']}); the stage encodes each image and its flip")
    return (f"sampling (e2e)      {r['images_per_s']:.3f} finished images/s at {r['sampling_steps']} DDPM steps = "
            f"{r['images_per_s_per_step']:.2f} images/s per denoising step (batch {r['batch']}, decode "
            f"{r['decode']}, {r['precision']}, {r['device']})")


def cli_bench(args: Any) -> int:
    r = bench(args.model, args.conditioning, batch=args.batch, steps=args.steps, warmup=args.warmup,
              precision=args.precision, compile=args.compile, grad_checkpointing=args.grad_checkpointing,
              input_size=args.input_size, in_channels=args.in_channels)
    stages = []
    if getattr(args, "latents", False):
        stages.append(bench_latents(args.input_size * 8, args.batch, args.steps, autoencoder_path=args.autoencoder_path))
    if getattr(args, "sampling_steps", None):
        stages.append(bench_sampling(args.model, args.conditioning, args.sampling_steps, args.batch, args.input_size,
                                     args.in_channels, autoencoder_path=args.autoencoder_path))
    if args.format == "json":
        print(json.dumps({**asdict(r), "stages": stages}, indent=2))
    else:
        print("\n".join([format_table(r), *map(format_stage, stages)]))
    return 0
