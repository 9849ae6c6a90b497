"""End-to-end evaluation throughput: finished images/s as an evaluation produces them.

One sampling batch (eval.batch_size's resolution: `auto` probes the device) is sampled with DDPM,
decoded by the autoencoder and passed through the feature network, timed at two step counts after a
warm-up batch (which compiles). The time of a batch is linear in the step count, t(S) = fixed + S x
per_step (fixed: noise, decode, features; per_step: one network call on the batch), so two timings give
both terms, and a whole evaluation of N images at S steps is ceil(N / B) x t(S).

Weights do not change the speed: without weight files the SD-VAE and the Inception network are built
with random weights (their architectures, their speed).
"""
from __future__ import annotations

import logging
import math
import tempfile
import time
from typing import Any

import torch

from harness.data.autoencoder import SD_VAE_CONFIG, IdentityAutoencoder, VAEAutoencoder, load_autoencoder
from harness.metrics import get_feature_extractor
from harness.models.compiled import resolve_compile, resolve_precision
from harness.models.dit import build_model
from harness.sampling.batch import auto_sample_batch, find_decode_batch
from harness.sampling.sample import balanced_labels, sample_images

log = logging.getLogger(__name__)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sd_vae(path: str | None) -> Any:
    """The SD VAE from `path`, else its architecture with random weights (same speed)."""
    if path:
        return load_autoencoder("sd-vae-ft-ema", path)
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return VAEAutoencoder("sd-vae-ft-ema", AutoencoderKL(**SD_VAE_CONFIG))


def feature_network(features: str, inception_weights: str | None, device: torch.device) -> Any:
    """The evaluation's feature network; Inception with random weights when no weights file is given."""
    if features != "inception":
        return get_feature_extractor(features, device=device)
    if inception_weights is None:
        # torch-fidelity: only where no weights file is given
        from harness.metrics.inception import write_random_inception_weights

        inception_weights = str(write_random_inception_weights(tempfile.mkdtemp() + "/inception-random.pth"))
    return get_feature_extractor("inception", weights=inception_weights, device=device)


def bench_eval(model_name: str, conditioning: str = "adaLN-Zero", sampling_steps: int = 250,
               num_samples: int = 50_000, measure_steps: tuple[int, int] = (10, 20), precision: str = "auto",
               compile: bool | str = "auto", compile_mode: str = "default", batch: int | str = "auto",
               input_size: int = 32, in_channels: int = 4,
               num_classes: int = 1000, autoencoder_path: str | None = None, features: str = "inception",
               inception_weights: str | None = None, device: torch.device | None = None) -> dict:
    """Time one evaluation batch end to end (see the module doc); returns the measured terms and the
    projection to `num_samples` images at `sampling_steps` DDPM steps, unguided."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = resolve_precision(precision, device)
    compiled = resolve_compile(compile, device, where="--compile")
    torch.manual_seed(0)
    model = build_model(model_name, conditioning, input_size=input_size, in_channels=in_channels,
                        num_classes=num_classes).to(device).eval()
    ae = sd_vae(autoencoder_path) if in_channels == 4 else IdentityAutoencoder()
    ae.to(device)
    extractor = feature_network(features, inception_weights, device)
    b = auto_sample_batch(model, num_samples, False, precision, device) if batch == "auto" else int(batch)
    decode_batch = find_decode_batch(ae, extractor, (in_channels, input_size, input_size), b, precision, device)
    labels = balanced_labels(b, num_classes)
    kw = dict(sampler="ddpm", cfg_scale=1.0, device=device, batch_size=b, autoencoder=ae, precision=precision,
              compile=compiled, compile_mode=compile_mode, decode_batch=decode_batch)

    def one_batch(steps: int) -> float:
        _sync(device)
        t0 = time.perf_counter()
        extractor.extract(sample_images(model, None, labels, sampling_steps=steps, **kw), decode_batch)
        _sync(device)
        return time.perf_counter() - t0

    warm = one_batch(2)  # compiles; 1 step would respace to log(0)
    lo, hi = measure_steps
    t_lo, t_hi = one_batch(lo), one_batch(hi)
    per_step = max(t_hi - t_lo, 1e-9) / (hi - lo)
    fixed = max(t_lo - lo * per_step, 0.0)
    batch_s = fixed + sampling_steps * per_step
    total_s = math.ceil(num_samples / b) * batch_s
    result = {"stage": "evaluation", "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "model": model_name, "batch": b, "decode_batch": decode_batch, "precision": precision,
              "compiled": compiled, "compile_mode": compile_mode if compiled else None, "decode": ae.name, "features": extractor.name, "sampling_steps": sampling_steps,
              "measured_steps": [lo, hi], "measured_s": [t_lo, t_hi], "warmup_s": warm,
              "forward_images_per_s": b / per_step, "fixed_s_per_batch": fixed,
              "images_per_s": num_samples / total_s, "images_per_s_per_step": num_samples * sampling_steps / total_s,
              "num_samples": num_samples, "projected_h": total_s / 3600.0}
    log.info("%s: evaluation %.2f finished images/s at %d steps (batch %d, %s%s): %d images in %.2f h", model_name,
             result["images_per_s"], sampling_steps, b, precision, ", compiled" if compiled else "", num_samples,
             result["projected_h"])
    return result


def format_eval(r: dict) -> str:
    return (f"evaluation (e2e)    {r['images_per_s']:.2f} finished images/s at {r['sampling_steps']} DDPM steps "
            f"(decode {r['decode']}, features {r['features']}): {r['num_samples']:,} images in {r['projected_h']:.2f} h\n"
            f"                    batch {r['batch']} ({r['precision']}{', compiled' if r['compiled'] else ', eager'}), "
            f"{r['forward_images_per_s']:.0f} images/s per denoising step, {r['fixed_s_per_batch']:.2f} s per batch "
            f"for noise, decode (chunks of {r['decode_batch']}) and features; measured {r['measured_s'][0]:.2f} s "
            f"and {r['measured_s'][1]:.2f} s at {r['measured_steps'][0]} and {r['measured_steps'][1]} steps")
