"""`eval.batch_size: auto`: the largest sampling batch that fits this device, found by trying it.

A sampling batch of B images runs the DiT on B inputs, or 2B under classifier-free guidance (the
conditional and null halves in one call): the probe runs the forward at that doubled size when any
guidance scale asks for it. Candidates are powers of two up to MAX_BATCH (and num_samples itself
when smaller), largest first.

* CUDA: each candidate gets a real forward (inference mode, the evaluation's precision) and fits if
  it neither runs out of memory nor peaks above `1 - HEADROOM` of the device's memory.
* CPU: one forward at one and at two images measures the peak bytes of live activations (every
  tensor an operator creates, counted until its last reference dies); activations grow linearly with
  the batch, and the largest candidate whose estimate fits half the available RAM wins.

`HARNESS_MEMORY_BUDGET_MB` overrides the budget (CPU or GPU), as for `train.micro_batch: auto`.
The probe runs eagerly (a compiled forward uses no more memory) and draws its inputs from its own
generator, leaving every RNG stream untouched. Answers are cached per (model, block, shapes, device,
precision, guidance, budget) in $HARNESS_CACHE/sample_batch.json.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import weakref
from pathlib import Path
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from harness.data.autoencoder import decode_uint8
from harness.errors import HarnessError
from harness.io import atomic_write_json, cache_dir, file_lock
from harness.models.compiled import autocast

log = logging.getLogger(__name__)

MAX_BATCH = 1024    # beyond this a batch only delays the first finished image (the device is full long before)
HEADROOM = 0.08     # fraction of GPU memory kept free for the allocator's fragmentation
BUDGET_ENV = "HARNESS_MEMORY_BUDGET_MB"


def candidates(num_samples: int) -> list[int]:
    """Powers of two up to MAX_BATCH, and num_samples when smaller than the largest; largest first."""
    out = [b for b in (2**k for k in range(11)) if b <= MAX_BATCH and b < num_samples]
    return sorted(set(out + [min(num_samples, MAX_BATCH)]), reverse=True)


def budget_bytes(device: torch.device) -> float:
    if os.environ.get(BUDGET_ENV):
        return float(os.environ[BUDGET_ENV]) * 2**20
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory * (1 - HEADROOM)
    try:
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        return int(meminfo["MemAvailable"].split()[0]) * 1024 * 0.5
    except (OSError, KeyError, ValueError):
        return 8 * 2**30


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of the storages that operators create while active, each until the last
    tensor viewing it dies; `peak` is the most alive at once (device-independent, CPU included)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self.refs: dict[int, list[int]] = {}   # storage pointer -> [live tensors, bytes]

    def _release(self, key: int) -> None:
        entry = self.refs[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self.refs[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr():
                key = t.untyped_storage().data_ptr()
                if key not in self.refs:
                    self.refs[key] = [0, t.untyped_storage().nbytes()]
                    self.live += self.refs[key][1]
                    self.peak = max(self.peak, self.live)
                self.refs[key][0] += 1
                weakref.finalize(t, self._release, key)
        return out


def forward_probe(model: torch.nn.Module, precision: str, device: torch.device) -> Callable[[int], None]:
    """forward(n): one forward of `model` (eval mode) on n random inputs, under inference mode."""
    shape = (int(model.in_channels), int(model.input_size), int(model.input_size))

    def forward(n: int) -> None:
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(n, *shape, generator=g, device=device)
        t = torch.randint(0, 1000, (n,), generator=g, device=device)
        y = torch.randint(0, int(model.num_classes) + 1, (n,), generator=g, device=device)
        with torch.inference_mode(), autocast(device, precision):
            model(x, t, y)
    return forward


def fits_cuda(run_one: Callable[[int], None], n: int, device: torch.device, budget: float, what: str) -> bool:
    """Whether `run_one(n)` neither runs out of CUDA memory nor peaks above `budget` bytes (logged as
    "`what` n: ..."); shared by this probe and the training micro-batch probe."""
    try:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        run_one(n)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        log.info("%s %d: peak %.1f GB of a %.1f GB budget", what, n, peak / 2**30, budget / 2**30)
        return peak <= budget
    except torch.OutOfMemoryError:
        log.info("%s %d: out of memory", what, n)
        return False
    finally:
        torch.cuda.empty_cache()


def cpu_bytes(run_one: Callable[[int], None], n: int) -> int:
    """Peak live bytes of the tensors `run_one(n)` creates (see LiveBytes)."""
    with LiveBytes() as counter:
        run_one(n)
    return counter.peak


def largest_fitting(run_one: Callable[[int], None], batches: list[int], per_batch: int, device: torch.device,
                    budget: float) -> int | None:
    """The largest b in `batches` (largest first) whose `run_one(b * per_batch)` fits `budget` bytes."""
    if device.type == "cuda":
        return next((b for b in batches if fits_cuda(run_one, b * per_batch, device, budget, "sampling probe, inputs")), None)
    one, two = cpu_bytes(run_one, per_batch), cpu_bytes(run_one, 2 * per_batch)
    slope, fixed = max(two - one, 1), max(2 * one - two, 0)
    log.info("sampling batch probe on the CPU: %.3f MB of activations per image", slope / 2**20)
    return next((b for b in batches if fixed + slope * b <= budget), None)


def cache_key(model: torch.nn.Module, device: torch.device, precision: str, guided: bool, num_samples: int) -> str:
    """The probe's answer depends on the network's structure (its repr names every layer's shape), the
    device, the precision, guidance (doubles the forward), the candidates (num_samples) and the budget."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    arch = hashlib.sha256(repr(model).encode()).hexdigest()[:12]
    return "|".join(str(x) for x in (type(model).__name__, arch, model.in_channels, model.input_size, name, precision,
                                     "guided" if guided else "unguided", min(num_samples, MAX_BATCH),
                                     os.environ.get(BUDGET_ENV, "")))


def find_sample_batch(model: torch.nn.Module, num_samples: int, guided: bool, precision: str,
                      device: torch.device) -> int:
    """The largest candidate batch whose forward (doubled under guidance) fits this device."""
    budget = budget_bytes(device)
    batches = candidates(num_samples)
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            chosen = largest_fitting(forward_probe(model, precision, device), batches, 2 if guided else 1, device,
                                     budget)
    finally:
        model.train(was_training)
    if chosen is None:
        raise HarnessError(f"eval.batch_size: auto found no sampling batch that fits this device's memory "
                           f"({budget / 2**30:.2f} GB budget); the smallest tried was {batches[-1]}. Fix: free the "
                           "device, or set eval.precision: bf16")
    return chosen


def auto_sample_batch(model: torch.nn.Module, num_samples: int, guided: bool, precision: str,
                      device: torch.device) -> int:
    """find_sample_batch's answer, cached (see cache_key) in $HARNESS_CACHE/sample_batch.json."""
    key = cache_key(model, device, precision, guided, num_samples)
    path = cache_dir() / "sample_batch.json"
    with file_lock(path.with_suffix(".lock")):
        cached = json.loads(path.read_text()) if path.exists() else {}
        if key in cached:
            log.info("sampling batch %d (auto, cached for %s)", cached[key], key)
            return int(cached[key])
        b = find_sample_batch(model, num_samples, guided, precision, device)
        cached[key] = b
        atomic_write_json(path, cached)
    log.info("sampling batch %d (auto: the largest that fits %s)", b, key)
    return b


def decode_probe(autoencoder, extractor, latent: tuple[int, int, int], precision: str,
                 device: torch.device) -> Callable[[int], None]:
    """decode(n): the evaluation's decode (`decode_uint8`) of n random latents (C, h, w) and the images' features."""
    def decode(n: int) -> None:
        z = torch.randn(n, *latent, generator=torch.Generator(device=device).manual_seed(0), device=device)
        with torch.inference_mode():
            images = decode_uint8(autoencoder, z, device, precision)
        if extractor is not None:
            extractor.extract(images, n)
    return decode


def find_decode_batch(autoencoder, extractor, latent: tuple[int, int, int], batch: int, precision: str,
                      device: torch.device) -> int:
    """The largest power of two <= `batch` (or `batch`) whose decode and feature pass fit this device:
    the VAE's activations at full resolution, not the DiT's, bound this one."""
    if getattr(autoencoder, "name", "") == "identity" and device.type == "cpu":
        return batch
    budget = budget_bytes(device)
    sizes = [b for b in candidates(batch) if b <= batch]
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        chosen = largest_fitting(decode_probe(autoencoder, extractor, latent, precision, device), sizes, 1, device,
                                 budget)
    if chosen is None:
        raise HarnessError(f"evaluation: no decode batch fits this device's memory ({budget / 2**30:.2f} GB budget) "
                           "even at one image. Fix: free the device")
    log.info("decode and features in chunks of %d images", chosen)
    return chosen
