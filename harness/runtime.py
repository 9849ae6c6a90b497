"""Runtime helpers shared by training, evaluation and the benchmark: the process group, seeds,
the EMA update, peak memory. One home, public names; nothing here knows about specs or files."""
from __future__ import annotations

import datetime as _dt
import logging
import os
import random
import resource
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from harness.errors import HarnessError

log = logging.getLogger(__name__)

#: how long a rank waits in a collective before the process group gives up
PROCESS_GROUP_TIMEOUT = _dt.timedelta(minutes=int(os.environ.get("HARNESS_PG_TIMEOUT_MIN", "120")))


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


def barrier(dist: Dist) -> None:
    if dist.world > 1:
        torch.distributed.barrier()


def all_reduce(t: torch.Tensor, dist: Dist, op: str = "sum") -> torch.Tensor:
    if dist.world > 1:
        rop = {"sum": torch.distributed.ReduceOp.SUM, "min": torch.distributed.ReduceOp.MIN}[op]
        torch.distributed.all_reduce(t, op=rop)
    return t


# ----------------------------------------------------------------------------- seeds
def derive_seed(*parts: int) -> int:
    """A 63-bit seed that is a pure function of the integers given (numpy SeedSequence mixing)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> 1)


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
    if isinstance(n, dict):
        n = ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    np.random.set_state(n)  # else a tuple: a checkpoint from before the states were tensors
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
