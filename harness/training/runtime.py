"""Runtime helpers shared by training, evaluation and the benchmark: the process group, seeds,
the EMA update, peak memory. One home, public names; nothing here knows about specs or files."""
from __future__ import annotations

import datetime as _dt
import logging
import os
import random
import resource
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch

from harness.errors import HarnessError
from harness.paper import TRAIN_PASSES

log = logging.getLogger(__name__)

#: how long a rank waits in a training collective before the process group gives up; nothing
#: long (latent encoding, evaluation) runs on one rank while the others wait in the training group
PROCESS_GROUP_TIMEOUT = _dt.timedelta(minutes=int(os.environ.get("HARNESS_PG_TIMEOUT_MIN", "30")))
#: the longest any rank waits for the others at an evaluation gather or barrier (logged when used)
COLLECTIVE_TIMEOUT = _dt.timedelta(seconds=float(os.environ.get("HARNESS_COLLECTIVE_TIMEOUT_S", "900")))


# ----------------------------------------------------------------------------- distributed
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialised_here: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> Dist:
    """Read RANK/WORLD_SIZE/LOCAL_RANK (torchrun, or submitit's job environment) and join the group.

    Device: cuda:(LOCAL_RANK mod visible GPUs) when CUDA is present (correct whether or not the
    scheduler already narrowed CUDA_VISIBLE_DEVICES), else the CPU with the gloo backend.
    """
    import torch.distributed as tdist

    if "RANK" not in os.environ and os.environ.get("SUBMITIT_EXECUTOR"):
        try:
            from submitit.helpers import TorchDistributedEnvironment

            TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        except Exception as err:  # noqa: BLE001 - not inside a submitit job after all
            log.debug("no submitit distributed environment: %s", err)
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    here = False
    if world > 1 and not tdist.is_initialized():
        for key in ("MASTER_ADDR", "MASTER_PORT"):
            if key not in os.environ:
                raise HarnessError(f"WORLD_SIZE={world} but environment variable {key} is not set: launch "
                                   "with torchrun or submitit, or unset WORLD_SIZE for one process")
        backend = "nccl" if device.type == "cuda" else "gloo"
        tdist.init_process_group(backend, rank=rank, world_size=world,
                                 timeout=PROCESS_GROUP_TIMEOUT)
        here = True
    return Dist(rank, world, local_rank, device, here)


@contextmanager
def distributed() -> Iterator[Dist]:
    """`setup_distributed()` for the block; on the way out the process group it created, and the bounded groups
    made on it, are destroyed. A process that exits with a live gloo group can abort in its threads' destructors
    ("terminate called without an active exception"), and a cached group would outlive its process group."""
    dist = setup_distributed()
    try:
        yield dist
    finally:
        if dist.initialised_here:
            _BOUNDED_GROUPS.clear()
            torch.distributed.destroy_process_group()


def barrier(dist: Dist) -> None:
    if dist.world > 1:
        torch.distributed.barrier()


def all_reduce(t: torch.Tensor, dist: Dist, op: str = "sum") -> torch.Tensor:
    if dist.world > 1:
        rop = {"sum": torch.distributed.ReduceOp.SUM, "min": torch.distributed.ReduceOp.MIN}[op]
        torch.distributed.all_reduce(t, op=rop)
    return t


_BOUNDED_GROUPS: dict[float, Any] = {}


def _bounded_group(timeout: _dt.timedelta) -> Any:
    """A gloo group over every rank whose collectives fail after `timeout` (created once; every
    rank must reach the first call, as for any collective)."""
    key = timeout.total_seconds()
    if key not in _BOUNDED_GROUPS:
        _BOUNDED_GROUPS[key] = torch.distributed.new_group(backend="gloo", timeout=timeout)
    return _BOUNDED_GROUPS[key]


def bounded_barrier(dist: Dist, what: str, timeout: _dt.timedelta | None = None) -> None:
    """Wait for every rank, at most `timeout` (default COLLECTIVE_TIMEOUT); past it, fail naming
    the ranks that did not arrive (gloo's monitored barrier) instead of hanging."""
    if dist.world == 1:
        return
    timeout = timeout or COLLECTIVE_TIMEOUT
    try:
        torch.distributed.monitored_barrier(_bounded_group(timeout), timeout=timeout, wait_all_ranks=True)
    except RuntimeError as err:
        raise RuntimeError(f"rank {dist.rank}: {what}: the other ranks did not arrive within {timeout} "
                           f"(HARNESS_COLLECTIVE_TIMEOUT_S): {err}") from err


def gather_to_main(obj: Any, dist: Dist, what: str, timeout: _dt.timedelta | None = None) -> list | None:
    """Every rank calls; rank 0 gets [obj of rank 0, obj of rank 1, ...], the others None. Picklable
    CPU objects only (numpy arrays); bounded by `timeout` like bounded_barrier. Rank 0's own entry is
    `obj` itself, not the unpickled copy the collective makes of it (one copy fewer held)."""
    if dist.world == 1:
        return [obj]
    timeout = timeout or COLLECTIVE_TIMEOUT
    bounded_barrier(dist, what, timeout)  # names a missing rank; the gather itself is then quick
    out: list | None = [None] * dist.world if dist.main else None
    torch.distributed.gather_object(obj, out, dst=0, group=_bounded_group(timeout))
    if out is not None:
        out[0] = obj
    return out


def broadcast_from_main(obj: Any, dist: Dist, what: str, timeout: _dt.timedelta | None = None) -> Any:
    """Rank 0's `obj` on every rank (so all ranks take the same decision), bounded like bounded_barrier."""
    if dist.world == 1:
        return obj
    timeout = timeout or COLLECTIVE_TIMEOUT
    bounded_barrier(dist, what, timeout)
    box = [obj if dist.main else None]
    torch.distributed.broadcast_object_list(box, src=0, group=_bounded_group(timeout))
    return box[0]


# ----------------------------------------------------------------------------- seeds
def derive_seed(*parts: int, tag: int | None = None) -> int:
    """A 63-bit seed that is a pure function of the integers given (numpy SeedSequence mixing).

    Untagged calls are a rank's seeds, (seed, rank[, step]); `tag` names what any other seed is for
    (the epoch's data order, a step's noise, an evaluation) and has its own slot, SeedSequence's
    spawn key, which untagged calls leave empty. numpy appends the key after the parts padded to its
    4-word pool, so a tagged input is at least 5 words and an untagged one (a seed below 2**31, a
    rank and a step) at most 3: derive_seed(s, 1, tag=1) is not derive_seed(s, 1) or (s, 1, 0)."""
    key = () if tag is None else (int(tag),)
    return int(np.random.SeedSequence([int(p) for p in parts], spawn_key=key).generate_state(2, np.uint64)[0] >> 1)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def rng_state() -> dict[str, Any]:
    """Every global RNG's state as tensors and plain values only, so a checkpoint holding it loads
    with torch.load(weights_only=True): torch (uint8 tensor), cuda (list of tensors or None),
    numpy's MT19937 {keys: int64 tensor (624,), pos, has_gauss, cached_gaussian}, python's
    [version, [625 ints], gauss_next]."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "python": [version, list(internal), gauss_next]}


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned (bitwise: the next draws are those the saved run made)."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


# ----------------------------------------------------------------------------- training state
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, on parameters; buffers are copied."""
    with torch.no_grad():
        e = [p for p in ema.parameters()]
        m = [p.detach() for p in model.parameters()]
        torch._foreach_mul_(e, decay)
        torch._foreach_add_(e, m, alpha=1.0 - decay)
        for be, bm in zip(ema.buffers(), model.buffers()):
            be.copy_(bm)


def peak_mem_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB -> MiB


# ----------------------------------------------------------------------------- throughput
FLOPS_PER_MAC = 2
# Dense peak TFLOP/s by (device-name fragment, precision), first match wins; fp32 training on these
# GPUs runs its matmuls in TF32.
PEAK_TFLOPS = [
    ("H200", "bf16", 989.0), ("H200", "fp32", 494.7),
    ("H100 PCIe", "bf16", 756.0), ("H100 PCIe", "fp32", 378.0),
    ("H100", "bf16", 989.0), ("H100", "fp32", 494.7),   # SXM
    ("A100", "bf16", 312.0), ("A100", "fp32", 156.0),
]


def peak_tflops(device: torch.device, precision: str) -> float | None:
    """The device's dense peak TFLOP/s for `precision`, or None (CPU, unknown GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for frag, prec, peak in PEAK_TFLOPS if frag in name and prec == precision), None)


def train_tflops(gflops: float, images_per_s: float) -> float:
    """Achieved training TFLOP/s: Gflops (forward multiply-adds per image) x 2 x 3 x images/s / 1000."""
    return gflops * FLOPS_PER_MAC * TRAIN_PASSES * images_per_s / 1e3
