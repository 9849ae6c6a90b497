"""The training step assembled in one place, for the trainer and `harness bench` alike.

`fresh_state(model, lr, weight_decay)` is the paper's EMA copy and AdamW (fused on CUDA) of a model;
`build_step(settings, ...)` resolves `compile`, has the micro-batch probe answer (harness.training.microbatch)
before the step exists, and only then builds the one `TrainStep` (DDP-wrapped with several ranks) with that
micro-batch. The trainer passes its run's train keys (`StepSettings.of_run`), bench its flags.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch

from harness.config.spec import RunSpec
from harness.training.microbatch import cache_key, probe_step, resolve_micro_batch
from harness.training.runtime import Dist
from harness.training.step import BatchGeometry, TrainStep, resolve_compile


@dataclass(frozen=True)
class StepSettings:
    """What a training step is built from besides its model: the model's name, block and input (for the
    micro-batch cache key and the probe's inputs), and the spec's precision, compile (and its mode) and EMA decay."""
    model: str
    conditioning: str
    shape: tuple[int, int, int]
    num_classes: int
    precision: str = "fp32"
    compile: bool | str = "auto"
    ema_decay: float = 0.9999
    compile_key: str = "train.compile"  # named in the error when compiling is asked for but impossible
    compile_mode: str = "default"

    @classmethod
    def of_run(cls, run: RunSpec, shape: tuple[int, int, int]) -> "StepSettings":
        tr = run.train
        return cls(run.model, run.conditioning, shape, run.data.num_classes, tr.precision, tr.compile, tr.ema_decay,
                   compile_mode=tr.compile_mode)


def enable_tf32(device: torch.device) -> None:
    """TF32 matmuls and convolutions on CUDA (the trainer's and bench's setting); nothing on the CPU."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def fresh_state(model: torch.nn.Module, lr: float, weight_decay: float) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The model's EMA (a frozen copy in eval mode) and its AdamW optimizer (fused on CUDA)."""
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    cuda = next(model.parameters()).device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, **({"fused": True} if cuda else {}))
    return ema, opt


def build_step(settings: StepSettings, model: torch.nn.Module, ema: torch.nn.Module, opt: torch.optim.Optimizer,
               diffusion: Any, dist: Dist, geometry: BatchGeometry) -> tuple[TrainStep, BatchGeometry]:
    """(the training step, the geometry with its micro-batch): compile resolved, the micro-batch chosen (as
    set, cached or probed) before the step is built, then the step with that micro-batch."""
    s, device = settings, dist.device
    compiled = resolve_compile(s.compile, device, s.compile_key)
    if geometry.micro is None:
        key = cache_key(s.model, s.conditioning, s.shape, s.num_classes, device, s.precision,
                        s.compile_mode if compiled else False, geometry.per_rank)
        geometry = resolve_micro_batch(geometry, probe_step(model, opt, diffusion, device, s.precision), key,
                                       s.shape, s.num_classes, dist)
    step = TrainStep(model, ema, opt, diffusion, dist, precision=s.precision, micro_batch=geometry.micro,
                     compile=compiled, ema_decay=s.ema_decay, compile_mode=s.compile_mode)
    return step, geometry
