"""Sampling from a trained DiT: batched, any sampler of harness.sampling.samplers, classifier-free guidance, decoded
to uint8 images, written as an image grid (PNG) and an ADM-layout .npz (arr_0: N x H x W x 3 uint8, arr_1:
labels int64).

Determinism: for a given seed, each sample's starting noise comes from its own generator (seeded by
seed and the sample's global index), so DDIM (eta = 0) gives the same image for sample i whatever the
batch size. DDPM also draws noise at every step, from a generator seeded by the global index of the
batch's first sample, so it is reproducible for a (seed, batch_size) (compiled sampling pads a short
last batch to the full size, so that batch's DDPM noise differs from eager sampling's). A slice of a larger set (one
rank's share, `first_index` = global index of its first label) gives the images the whole set would.
"""
from __future__ import annotations

import hashlib
import logging
import math
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import torch

from harness.errors import HarnessError
from harness.io import atomic_write
from harness.sampling.npz import save_npz
from harness.sampling.batch import auto_sample_batch, find_decode_batch
from harness.config.arguments import add_compile_mode_argument, auto_or_positive_int, positive_int
from harness.config.vocab import GUIDANCE_CHANNELS, SAMPLERS, guidance_on
from harness.sampling.samplers import sample_loop
from harness.config.spec import PRECISIONS, DataSpec, RunSpec
from harness.data.autoencoder import decode_uint8, load_autoencoder
from harness.models.compiled import CompiledOrEager, autocast, resolve_compile, resolve_precision
from harness.models.diffusion import guided_model_fn
from harness.models.runmodel import model_from_checkpoint

log = logging.getLogger(__name__)

_AUTOENCODERS: dict[tuple[str, str | None], Any] = {}  # loaded once per process


#: eval.jsonl's `labels`: sample i of an evaluation has label balanced_labels(N, K)[i] = i mod K
LABELS_BALANCED = "balanced"
#: eval.jsonl's `noise_scheme`: how sample i's noise derives from (seed, i) -- _sample_seed, _initial_noise and
#: the DDPM step noise below. Change it with them: two sample sets are paired only under one scheme.
NOISE_SCHEME = 1


def balanced_labels(n: int, num_classes: int) -> torch.Tensor:
    """(n,) long: 0, 1, ..., K-1, 0, 1, ... so every class appears n // K or n // K + 1 times."""
    return torch.arange(n, dtype=torch.long) % num_classes


def random_labels(n: int, num_classes: int, seed: int) -> torch.Tensor:
    """(n,) long labels drawn uniformly from the classes with a seeded generator."""
    return torch.randint(0, num_classes, (n,), generator=torch.Generator().manual_seed(seed))


def autoencoder_for(run: RunSpec | None) -> Any:
    """The run's autoencoder (data.autoencoder, data.autoencoder_path; identity without a run), loaded once
    per process."""
    data = run.data if run is not None else DataSpec()
    key = (data.autoencoder, data.resolved_autoencoder_path())
    if key not in _AUTOENCODERS:
        _AUTOENCODERS[key] = load_autoencoder(*key)
    return _AUTOENCODERS[key]


def _channels_arg(guidance_channels: int | str | None) -> int | None:
    if guidance_channels in (None, "all"):
        return None
    try:
        return int(guidance_channels)
    except (TypeError, ValueError):
        raise HarnessError(f"guidance_channels={guidance_channels!r} (key eval.guidance_channels or "
                           "--guidance-channels): use 3 (the paper's choice) or 'all'.") from None


def _sample_seed(seed: int, index: int) -> int:
    return int.from_bytes(hashlib.sha256(f"sample:{seed}:{index}".encode()).digest()[:8], "little") >> 1


def sample_images(model: torch.nn.Module, run: RunSpec | None, labels: torch.Tensor | np.ndarray, sampling_steps: int = 250,
                  sampler: str = "ddpm", cfg_scale: float = 1.0, guidance_channels: int | str | None = 3,
                  seed: int = 0, device: str | torch.device | None = None, batch_size: int = 64,
                  autoencoder: Any = None, progress: bool = False, first_index: int = 0,
                  precision: str = "fp32", compile: bool = False, decode_batch: int | None = None,
                  compile_mode: str = "default") -> np.ndarray:
    """Sample one image per label: uint8 (N, H, W, 3) in the ADM layout (grey replicated to RGB).

    model: a DiT on `device` (default: the model's device; its in_channels/input_size give the latent
    shape; label `model.num_classes` is the null class). run: the RunSpec naming data.autoencoder, unless
    `autoencoder` is given. labels[j] is sample first_index + j of the set (its noise seeds).
    Guidance runs the conditional and null halves in one batch when
    cfg_scale != 1, on the first `guidance_channels` latent channels (None/'all': every channel).
    precision: the network's and the decoder's autocast ("bf16" or "fp32"); the sampler's own arithmetic
    (means, variances, guidance) stays in float32. compile: the network compiled in `compile_mode` (see
    `compiled_forward`), a short last batch padded to `batch_size` so one graph serves every batch.
    decode_batch: images per decode (default: the whole batch).
    """
    if sampler not in SAMPLERS:
        raise HarnessError(f"sampler {sampler!r} (key eval.sampler or --sampler): use one of {', '.join(SAMPLERS)}.")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    ae = autoencoder if autoencoder is not None else autoencoder_for(run)
    ae.to(device)
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    num_classes = int(model.num_classes)
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise HarnessError(f"labels must lie in 0..{num_classes - 1} for this model.")
    shape = (int(model.in_channels), int(model.input_size), int(model.input_size))
    learn_sigma = int(model.out_channels) == 2 * shape[0]
    guided = guidance_on(cfg_scale)
    forward = compiled_forward(model, compile, compile_mode)

    def net(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with autocast(device, precision):
            return forward(x, t, y).float()

    model_fn = guided_model_fn(net, float(cfg_scale), _channels_arg(guidance_channels)) if guided else net
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.inference_mode():
            for start in range(0, len(labels), batch_size):
                y = labels[start : start + batch_size]
                real = len(y)
                if compile and real < batch_size:  # pad (class 0, the next indices' noise; discarded): one graph
                    y = torch.cat([y, torch.zeros(batch_size - real, dtype=torch.long)])
                y = y.to(device)
                first = first_index + start
                noise = _initial_noise(shape, seed, first, len(y), device)
                gen = torch.Generator().manual_seed(_sample_seed(seed, -1 - first))
                if guided:
                    noise = torch.cat([noise, noise])
                    y = torch.cat([y, torch.full_like(y, num_classes)])
                z = sample_loop(sampler, model_fn, noise, sampling_steps, {"y": y}, learn_sigma, gen, progress)
                z, chunk = z[:real], decode_batch or real
                out += [decode_uint8(ae, z[lo : lo + chunk], device, precision) for lo in range(0, real, chunk)]
    finally:
        model.train(was_training)
    if not out:
        return np.zeros((0, shape[1] * ae.downsample, shape[2] * ae.downsample, 3), dtype=np.uint8)
    return np.concatenate(out)


def _initial_noise(shape: tuple[int, int, int], seed: int, first: int, n: int, device: torch.device) -> torch.Tensor:
    """x_T (n, C, H, W) of samples first..first+n-1, each from its own generator (batch-size independent)."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(_sample_seed(seed, i)))
                        for i in range(first, first + n)]).to(device)


_COMPILED: "weakref.WeakKeyDictionary[torch.nn.Module, dict[str, CompiledOrEager]]" = weakref.WeakKeyDictionary()


def compiled_forward(model: torch.nn.Module, compile: bool, mode: str = "default") -> Any:
    """`model` itself, or its compiled forward in `mode` (fixed shapes: one graph per input shape), made once
    per module and mode so that every evaluation of a run reuses the graphs; eager for good if compiling fails."""
    if not compile:
        return model
    per_mode = _COMPILED.setdefault(model, {})
    if mode not in per_mode:
        per_mode[mode] = CompiledOrEager(model, True, f"the sampling forward of {type(model).__name__}", mode=mode,
                                         dynamic=False)
    return per_mode[mode]


def make_grid(images: np.ndarray, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """uint8 (N, H, W, 3) -> one uint8 image with the samples in rows of `nrow` (default ~sqrt N)."""
    n, h, w, c = images.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i, im in enumerate(images):
        r, col = divmod(i, nrow)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + col * (w + pad) : pad + col * (w + pad) + w] = im
    return grid


def save_grid(images: np.ndarray, path: str | Path, nrow: int | None = None, scale: int | None = None) -> Path:
    """Write a PNG grid of uint8 (N, H, W, 3) images atomically. Small images (< 64 px) are
    enlarged (nearest) so an 8x8 digit is visible."""
    from PIL import Image

    images = np.asarray(images)
    if images.ndim != 4 or images.dtype != np.uint8 or len(images) == 0:
        raise ValueError(f"save_grid wants a non-empty uint8 (N, H, W, C) array, got {images.dtype} {images.shape}")
    scale = scale or max(1, 64 // images.shape[1])
    if scale > 1:
        images = images.repeat(scale, axis=1).repeat(scale, axis=2)
    img = Image.fromarray(make_grid(images, nrow))
    return atomic_write(path, lambda f: img.save(f, format="PNG"))


def _latent(model: torch.nn.Module) -> tuple[int, int, int]:
    return int(model.in_channels), int(model.input_size), int(model.input_size)


def add_sample_arguments(s) -> None:
    s.add_argument("--checkpoint", required=True)
    s.add_argument("--num-samples", type=positive_int, default=64)
    s.add_argument("--labels", choices=["balanced", "random"], default="balanced")
    s.add_argument("--cfg-scale", type=float, default=1.0)
    s.add_argument("--guidance-channels", choices=[str(c) for c in GUIDANCE_CHANNELS], default="3")
    s.add_argument("--steps", type=positive_int, default=250, help="sampling steps (respaced)")
    s.add_argument("--sampler", choices=list(SAMPLERS), default="ddpm")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--batch-size", type=auto_or_positive_int, default="auto",
                   help="images per batch; auto: the largest that fits (as eval.batch_size)")
    s.add_argument("--precision", choices=("auto",) + tuple(PRECISIONS), default="auto",
                   help="the network's and decoder's autocast; auto: bf16 on CUDA, fp32 on the CPU")
    s.add_argument("--compile", choices=["auto", "on", "off"], default="auto", help="auto: compiled on CUDA only")
    add_compile_mode_argument(s)
    s.add_argument("--no-ema", action="store_true", help="use the raw weights, not the EMA")
    s.add_argument("--out", required=True, help="output folder (grid.png, samples.npz)")


def cli_sample(args) -> int:
    """`harness sample`: a grid PNG and an ADM npz from a checkpoint (EMA weights by default)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, run, ckpt = model_from_checkpoint(args.checkpoint, use_ema=not args.no_ema, device=device)
    k = model.num_classes
    if args.num_samples < 1:
        raise HarnessError(f"--num-samples must be at least 1, got {args.num_samples}.")
    labels = (balanced_labels(args.num_samples, k) if args.labels == "balanced"
              else random_labels(args.num_samples, k, args.seed))
    precision = resolve_precision(args.precision, device)
    compiled = resolve_compile({"auto": "auto", "on": True, "off": False}[args.compile], device, where="--compile")
    batch = (auto_sample_batch(model, args.num_samples, guidance_on(args.cfg_scale), precision, device)
             if args.batch_size == "auto" else int(args.batch_size))
    images = sample_images(model, run, labels, sampling_steps=args.steps, sampler=args.sampler,
                           cfg_scale=args.cfg_scale, guidance_channels=args.guidance_channels, seed=args.seed,
                           device=device, batch_size=batch, progress=True, precision=precision, compile=compiled,
                           compile_mode=args.compile_mode, decode_batch=find_decode_batch(autoencoder_for(run), None, _latent(model), batch,
                                                          precision, device))
    out = Path(args.out)
    grid = save_grid(images[:256], out / "grid.png")
    npz = save_npz(images, labels, out / "samples.npz")
    print(f"{npz}: {images.shape[0]} samples {images.shape[1]}x{images.shape[2]} (step {ckpt.get('step')}, "
          f"{'raw' if args.no_ema else 'EMA'} weights, {args.sampler} {args.steps} steps, cfg {args.cfg_scale:g})\n"
          f"{grid}: grid of the first {min(len(images), 256)}")
    return 0
