"""One optimizer step of the paper's recipe, shared by the trainer and `harness bench` (both build it
through harness.training.assemble), and the batch geometry it runs on (`BatchGeometry`).

A step takes one rank's share of a global batch (B = global_batch / ranks) in B / m micro-batches
of m. Each micro-batch's per-sample losses are summed and divided by B before backward, so the
accumulated gradient is the gradient of the mean loss over the whole batch (equal to one pass over
B up to floating-point rounding); under DDP the gradient all-reduce runs once, with the last
micro-batch (`no_sync` on the others), and averages over ranks: the mean over the global batch.
Then one AdamW step (fused on CUDA) and one EMA update (foreach). Nothing reads a loss on the
host: the step returns its sums on the device, and the trainer reads them at log steps only.

Compilation (`train.compile`, in `train.compile_mode`): the model's forward (DDP-wrapped when distributed)
and the loss terms are compiled separately with fixed shapes (m is fixed for a run, so there is one graph
of each after warm-up); under a CUDA-graph mode each micro-batch starts a new graph step. If compiling
fails at the first step, the step says so in one line and runs eagerly from then on; the failed attempt
leaves no gradient behind.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch

from harness.config.spec_checks import batch_split
from harness.errors import HarnessError
# compile_support, resolve_compile: their home is harness.models.compiled; the trainer imports them from here
from harness.models.compiled import (FirstCall, autocast, compile_options, compile_support,  # noqa: F401
                                     new_graph_step, resolve_compile)
from harness.training.runtime import Dist, ema_update



@dataclass
class Batch:
    """One rank's share of a global batch, on the device: x0 (B, C, H, W) clean latents, y (B,)
    labels, t (B,) timesteps, noise (B, C, H, W), drop (B,) bool (label replaced by the null class)."""
    x0: torch.Tensor
    y: torch.Tensor
    t: torch.Tensor
    noise: torch.Tensor
    drop: torch.Tensor

    def __len__(self) -> int:
        return int(self.x0.shape[0])

    def slice(self, lo: int, hi: int) -> "Batch":
        return Batch(self.x0[lo:hi], self.y[lo:hi], self.t[lo:hi], self.noise[lo:hi], self.drop[lo:hi])


# ----------------------------------------------------------------------------- settings
def check_micro_batch(micro_batch: int, per_rank: int, where: str = "train.micro_batch") -> None:
    """HarnessError naming `where` unless `micro_batch` divides `per_rank`."""
    BatchGeometry(per_rank, 1, micro_batch, micro_key=where)


@dataclass(frozen=True)
class BatchGeometry:
    """How one optimizer step's batch splits, derived and validated once: `global_batch` over `ranks`, each
    rank's `per_rank` in micro-batches of `micro` (None until `auto` is resolved by harness.training.microbatch).

    `source` prefixes the error about the ranks (the run.json the batch came from); `micro_key` names the
    micro-batch's key or flag in its error (train.micro_batch, or bench's --micro-batch)."""
    global_batch: int
    ranks: int = 1
    micro: int | None = None
    source: str = field(default="", compare=False, repr=False)
    micro_key: str = field(default="train.micro_batch", compare=False, repr=False)

    def __post_init__(self) -> None:
        if split := batch_split(self.global_batch, self.ranks, self.micro):  # the spec check's rule
            key, problem, fix = split
            raise HarnessError(f"{self.source}{self.micro_key if key == 'micro_batch' else 'train.' + key}: "
                               f"{problem}. Fix: {fix}.")

    @classmethod
    def of(cls, global_batch: int, ranks: int, micro: int | str, **names: str) -> "BatchGeometry":
        """From a spec's (or bench's) micro-batch setting: an int, or 'auto' (chosen later)."""
        return cls(global_batch, ranks, None if micro == "auto" else int(micro), **names)

    @property
    def per_rank(self) -> int:
        return self.global_batch // self.ranks

    def rows(self, rank: int) -> tuple[int, int]:
        """The rows lo:hi of the global batch that rank `rank` trains on."""
        return rank * self.per_rank, (rank + 1) * self.per_rank

    def with_micro(self, micro: int) -> "BatchGeometry":
        return replace(self, micro=micro)

    def __str__(self) -> str:
        return (f"per-GPU batch {self.per_rank} in micro-batches of {self.micro} "
                f"(global batch {self.global_batch} over {self.ranks} rank{'s' if self.ranks > 1 else ''})")


# ----------------------------------------------------------------------------- the step
class TrainStep:
    """`step(batch, lr) -> sums`: one optimizer step over `batch` in micro-batches of `micro_batch`.

    `model` is the raw module (its parameters are the optimizer's), `ema` its EMA copy. Returns a
    (3,) float64 device tensor: the sums over the batch of the per-sample loss, mse and vb.
    """

    def __init__(self, model: torch.nn.Module, ema: torch.nn.Module, opt: torch.optim.Optimizer,
                 diffusion: Any, dist: Dist, *, precision: str, micro_batch: int, compile: bool,
                 ema_decay: float, compile_mode: str = "default"):
        self.model, self.ema, self.opt, self.diffusion, self.dist = model, ema, opt, diffusion, dist
        self.precision, self.micro_batch, self.ema_decay = precision, micro_batch, ema_decay
        self.device = dist.device
        self.ddp: torch.nn.Module | None = None
        if dist.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.ddp = DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.compiled, self.compile_mode = compile, compile_mode
        self._set_functions()
        self._first = FirstCall("the model and the loss")

    @property
    def compile_s(self) -> float | None:
        """The first (compiling) step's wall time, when compiled."""
        return self._first.compile_s

    def _set_functions(self) -> None:
        net = self.ddp if self.ddp is not None else self.model
        opts = compile_options(self.compile_mode)
        self.forward: Callable[..., torch.Tensor] = torch.compile(net, **opts) if self.compiled else net
        self.loss_terms: Callable[..., dict] = (torch.compile(self.diffusion.loss_terms, **opts) if self.compiled
                                                else self.diffusion.loss_terms)

    def forward_backward(self, b: Batch, total: int) -> torch.Tensor:
        """Forward and backward of one micro-batch, its losses scaled by 1/total; returns the (3,)
        float64 sums of loss, mse and vb over the micro-batch (detached)."""
        d = self.diffusion
        if self.compiled:
            new_graph_step(self.compile_mode)
        with autocast(self.device, self.precision):
            xt = d.q_sample(b.x0, b.t, b.noise)
            raw = self.forward(xt, d._model_t(b.t), y=b.y, force_drop=b.drop)
            terms = self.loss_terms(raw, b.x0, xt, b.t, b.noise)
        (terms["loss"].sum() / total).backward()
        with torch.no_grad():
            return torch.stack([terms[k].detach().sum() for k in ("loss", "mse", "vb")]).double()

    def accumulate(self, batch: Batch) -> torch.Tensor:
        """Gradients of the mean loss over `batch`, accumulated micro-batch by micro-batch."""
        n, m = len(batch), self.micro_batch
        check_micro_batch(m, n)
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        for i in range(n // m):
            last = i == n // m - 1
            sync = nullcontext() if (self.ddp is None or last) else self.ddp.no_sync()
            with sync:
                sums += self.forward_backward(batch.slice(i * m, (i + 1) * m), n)
        return sums

    def __call__(self, batch: Batch, lr: float) -> torch.Tensor:
        for group in self.opt.param_groups:
            group["lr"] = lr
        if self._first.pending:
            sums = self._first(lambda: self.accumulate(batch), self.compiled, self._fall_back, self._sync)
        else:
            sums = self.accumulate(batch)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        ema_update(self.ema, self.model, self.ema_decay)
        return sums

    def _fall_back(self) -> None:
        """Eager from now on; the failed compiled attempt leaves no gradient behind."""
        self.opt.zero_grad(set_to_none=True)
        self.compiled = False
        self._set_functions()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def compiled_graphs() -> int:
    """How many graphs dynamo has compiled in this process (a rise after warm-up is a recompile)."""
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except Exception:  # noqa: BLE001 - counters are internal; absent means unknown
        return 0


def attention_backends(device: torch.device, precision: str) -> str:
    """Which scaled-dot-product-attention kernels PyTorch may pick here, in its priority order."""
    if device.type != "cuda":
        return "math/cpu-fused (CPU)"
    b = torch.backends.cuda
    on = [name for name, enabled in (("cudnn", b.cudnn_sdp_enabled()), ("flash", b.flash_sdp_enabled()),
                                     ("mem-efficient", b.mem_efficient_sdp_enabled()),
                                     ("math", b.math_sdp_enabled())) if enabled]
    note = "" if precision == "bf16" else " (flash needs bf16/fp16: fp32 uses mem-efficient or math)"
    return ", ".join(on) + note
