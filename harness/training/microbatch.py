"""`train.micro_batch: auto`: the largest micro-batch that fits this device, found by trying it.

Candidates are the divisors of the per-rank batch, largest first. On CUDA each candidate gets a
real forward and backward with the optimizer's state already counted (AdamW's two moments are
allocated as a placeholder if the optimizer has none yet); a candidate fits if it neither runs out
of memory nor peaks above `1 - HEADROOM` of the device's memory. On the CPU a real forward and
backward at the smallest candidate measures the activation bytes saved for backward, which grow
linearly with the micro-batch, and the largest candidate whose estimate fits half the available
RAM wins. The budget is `harness.sampling.batch.budget_bytes`, the one sampling's batch probe uses
(HEADROOM also leaves room for NCCL's buffers); `HARNESS_MEMORY_BUDGET_MB` overrides it (CPU or GPU),
for tests and shared nodes.

The probe runs eagerly (compiled steps use less memory than eager ones, so the answer is safe for
them), draws its inputs from its own generator, leaves no gradient behind and does not touch the
training RNG streams. Answers are cached per (model, block, shapes, device, precision, compile,
per-rank batch) in $HARNESS_CACHE/micro_batch.json.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from harness.errors import HarnessError
from harness.io import atomic_write_json, cache_dir, file_lock
from harness.sampling.batch import BUDGET_ENV, budget_bytes, fits_cuda  # one budget, one CUDA fit test
from harness.training.runtime import Dist, all_reduce
from harness.training.step import Batch, BatchGeometry, TrainStep

log = logging.getLogger(__name__)


def divisors_desc(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


def _cache_file() -> Path:
    return cache_dir() / "micro_batch.json"


def cache_key(model: str, conditioning: str, shape: tuple[int, int, int], num_classes: int,
              device: torch.device, precision: str, compile: bool | str, per_rank: int) -> str:
    """`compile`: False (eager), or the compile mode (True: the default mode; CUDA graphs keep memory pools)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    budget = os.environ.get(BUDGET_ENV, "")
    mode = "eager" if not compile else "compiled" if compile in (True, "default") else f"compiled-{compile}"
    return "|".join(str(x) for x in (model, conditioning, "x".join(map(str, shape)), num_classes, name,
                                     precision, mode, per_rank, budget))


def _probe_batch(step: TrainStep, m: int, shape: tuple[int, int, int], num_classes: int) -> Batch:
    g = torch.Generator(device=step.device).manual_seed(0)
    C, H, W = shape
    dev = step.device
    return Batch(torch.randn(m, C, H, W, generator=g, device=dev), torch.randint(0, num_classes, (m,), generator=g, device=dev),
                 torch.randint(0, step.diffusion.num_timesteps, (m,), generator=g, device=dev),
                 torch.randn(m, C, H, W, generator=g, device=dev), torch.zeros(m, dtype=torch.bool, device=dev))


def _state_bytes(step: TrainStep) -> int:
    """Bytes the training state holds beyond the probe: AdamW's moments when not yet allocated."""
    if step.opt.state:
        return 0
    return 2 * sum(p.numel() * p.element_size() for p in step.model.parameters() if p.requires_grad)


def _fits_cuda(step: TrainStep, m: int, shape: tuple[int, int, int], num_classes: int, budget: float) -> bool:
    """A real forward and backward at micro-batch m, with AdamW's moments counted (a placeholder until the
    optimizer has state), fits the budget; leaves no gradient behind."""
    placeholder = torch.empty(_state_bytes(step), dtype=torch.uint8, device=step.device)
    try:
        return fits_cuda(lambda n: step.forward_backward(_probe_batch(step, n, shape, num_classes), n), m,
                         step.device, budget, "micro-batch")
    finally:
        step.opt.zero_grad(set_to_none=True)
        del placeholder
        torch.cuda.empty_cache()


def _activation_bytes(step: TrainStep, m: int, shape: tuple[int, int, int], num_classes: int) -> int:
    """Bytes of the tensors autograd saves for backward in one forward at micro-batch m (+ backward)."""
    saved = [0]
    # weights (and views of them, such as a transposed weight a linear layer saves) are not activations
    seen: set[int] = {p.untyped_storage().data_ptr() for p in step.model.parameters()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            saved[0] += t.untyped_storage().nbytes()
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            step.forward_backward(_probe_batch(step, m, shape, num_classes), m)
    finally:
        step.opt.zero_grad(set_to_none=True)
    return saved[0]


def probe_step(model: torch.nn.Module, opt: torch.optim.Optimizer, diffusion: Any, device: torch.device,
               precision: str) -> TrainStep:
    """What the probe runs: the training step's forward and backward, eager and on this rank alone (a probe must
    not all-reduce gradients; see the module doc for why eager), on the model and optimizer the step will train."""
    return TrainStep(model, model, opt, diffusion, Dist(device=device), precision=precision, micro_batch=1,
                     compile=False, ema_decay=0.0)


def find_micro_batch(probe: TrainStep, per_rank: int, shape: tuple[int, int, int], num_classes: int) -> int:
    """The largest divisor of `per_rank` whose forward and backward fit this device (see module doc), tried with
    `probe` (a `probe_step`). HarnessError naming the smallest size tried if none fits."""
    budget = budget_bytes(probe.device)
    candidates = divisors_desc(per_rank)
    with torch.random.fork_rng(devices=[probe.device] if probe.device.type == "cuda" else []):
        if probe.device.type == "cuda":
            chosen = next((m for m in candidates if _fits_cuda(probe, m, shape, num_classes, budget)), None)
        else:
            smallest = candidates[-1]
            per_sample = _activation_bytes(probe, smallest, shape, num_classes) / smallest
            fixed = 4 * sum(p.numel() * p.element_size() for p in probe.model.parameters())  # w, grad, 2 moments
            chosen = next((m for m in candidates if fixed + per_sample * m <= budget), None)
            log.info("micro-batch probe on the CPU: %.2f MB of activations per sample, %.0f MB budget",
                     per_sample / 2**20, budget / 2**20)
    if chosen is None:
        raise HarnessError(f"train.micro_batch: auto found no micro-batch that fits this device's memory "
                           f"({budget / 2**30:.2f} GB budget); the smallest tried was {candidates[-1]}. Fix: "
                           "set train.grad_checkpointing: true, use train.precision: bf16, or more GPUs")
    return chosen


def resolve_micro_batch(geometry: BatchGeometry, probe: TrainStep, key: str, shape: tuple[int, int, int],
                        num_classes: int, dist: Dist | None = None) -> BatchGeometry:
    """`geometry` with its micro-batch, before the training step is built: as set, or for `auto` (micro None)
    the cached answer, else the probe's. With several ranks (`dist`) each probes its own device and all take
    the smallest answer."""
    if geometry.micro is not None:
        return geometry
    m = _auto_micro_batch(probe, geometry.per_rank, key, shape, num_classes)
    if dist is not None and dist.world > 1:
        m = int(all_reduce(torch.tensor(m, device=dist.device), dist, "min").item())
    return geometry.with_micro(m)


def _auto_micro_batch(step: TrainStep, per_rank: int, key: str, shape: tuple[int, int, int],
                      num_classes: int) -> int:
    path = _cache_file()
    with file_lock(path.with_suffix(".lock")):
        cached = json.loads(path.read_text()) if path.exists() else {}
        if key in cached:
            log.info("micro-batch %d (auto, cached for %s)", cached[key], key)
            return int(cached[key])
        m = find_micro_batch(step, per_rank, shape, num_classes)
        cached[key] = m
        atomic_write_json(path, cached)
    log.info("micro-batch %d of a per-GPU batch of %d (auto: the largest that fits %s)", m, per_rank, key)
    return m
