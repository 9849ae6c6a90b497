"""How a model runs on a device: compilation, its eager fallback, and the autocast precision.

Shared by training (`harness.training.step`) and sampling (`harness.sampling.sample`), so that both
compile the same way: fixed shapes, one graph per input shape, and one line in the log (then eager)
if the compiler fails on the first call.
"""
from __future__ import annotations

import logging
import shutil
import time
from contextlib import nullcontext
from typing import Any, Callable

import torch

from harness.config.vocab import CUDA_GRAPH_MODES
from harness.errors import HarnessError

log = logging.getLogger(__name__)


def compile_support(device: torch.device) -> str | None:
    """None if torch.compile can run here, else why not (one phrase)."""
    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        return "torch.compile does not support this Python or platform"
    if device.type == "cpu" and not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        return "inductor's CPU backend needs a C++ compiler and none is on PATH"
    return None


def resolve_compile(setting: bool | str, device: torch.device, where: str = "train.compile") -> bool:
    """`auto`: compile on CUDA (where it pays), not on the CPU. `true` where compiling is impossible
    is a HarnessError naming the key."""
    if setting == "auto":
        return device.type == "cuda" and compile_support(device) is None
    if setting is True:
        why = compile_support(device)
        if why:
            raise HarnessError(f"{where}: true, but {why}. Fix: set {where}: auto (compiles on CUDA only) "
                               "or false")
    return bool(setting)


def resolve_precision(setting: str, device: torch.device) -> str:
    """`auto`: bf16 on CUDA (tensor cores), fp32 on the CPU (where bf16 is emulated and slower)."""
    if setting == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return setting


def compile_options(mode: str) -> dict:
    """torch.compile's keyword arguments for a compile mode (harness.config.vocab.COMPILE_MODES): none for
    "default", so that the default graph is PyTorch's own."""
    return {} if mode == "default" else {"mode": mode}


def new_graph_step(mode: str) -> None:
    """Before each call of a CUDA-graph-replaying function (mode reduce-overhead or max-autotune): tell the
    graph trees that the previous call's outputs are no longer read (training: each micro-batch)."""
    if mode in CUDA_GRAPH_MODES:
        torch.compiler.cudagraph_mark_step_begin()


def autocast(device: torch.device, precision: str) -> Any:
    """bf16 autocast for `precision: bf16`, else nothing (fp32 weights either way)."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


class FirstCall:
    """Runs `run()` the first time: times it when compiled, and on a compiler failure logs one warning line
    naming `what`, calls `fall_back()` (which switches the caller to eager) and runs `run()` again eagerly.
    An out-of-memory error is not a compiler failure and propagates; so does any error of an eager run.
    Shared by `CompiledOrEager` (sampling) and the training step."""

    def __init__(self, what: str):
        self.what, self.pending, self.compile_s = what, True, None

    def __call__(self, run: Callable[[], Any], compiled: bool, fall_back: Callable[[], None], sync: Callable[[], None]
                 = lambda: None) -> Any:
        self.pending = False
        t0 = time.perf_counter()
        try:
            out = run()
        except torch.OutOfMemoryError:
            raise
        except Exception as err:  # noqa: BLE001 - any compiler failure: run eagerly instead
            if not compiled:
                raise
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            log.warning("torch.compile failed for %s (%s: %s); running eagerly", self.what, type(err).__name__, first)
            fall_back()
            return run()
        if compiled:
            sync()
            self.compile_s = time.perf_counter() - t0
            log.info("compiled %s in %.1f s (first call)", self.what, self.compile_s)
        return out


class CompiledOrEager:
    """`fn` compiled (when `compile`, in `mode`), falling back to eager `fn` for good if the first call fails
    (`FirstCall`). `compile_s` is the first compiled call's wall time (compilation included). Under a CUDA-graph
    mode each call starts a new graph step and returns a copy of the output, which the next replay overwrites.
    """

    def __init__(self, fn: Callable[..., Any], compile: bool, what: str, mode: str = "default", **options: Any):
        self.eager, self.compiled, self.mode = fn, compile, mode
        self.fn: Callable[..., Any] = torch.compile(fn, **compile_options(mode), **options) if compile else fn
        self._first = FirstCall(what)

    @property
    def compile_s(self) -> float | None:
        return self._first.compile_s

    def _call(self, *args: Any, **kwargs: Any) -> Any:
        if not (self.compiled and self.mode in CUDA_GRAPH_MODES):
            return self.fn(*args, **kwargs)
        new_graph_step(self.mode)
        out = self.fn(*args, **kwargs)
        return out.clone() if isinstance(out, torch.Tensor) else out

    def _fall_back(self) -> None:
        self.compiled, self.fn = False, self.eager

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self._first.pending:
            return self._call(*args, **kwargs)
        return self._first(lambda: self._call(*args, **kwargs), self.compiled, self._fall_back)


#: attention kernel orders to try on CUDA (HARNESS_ATTENTION); "default" leaves PyTorch's own order
ATTENTION_ORDERS = {"default": None, "cudnn": ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH"),
                    "flash": ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION", "MATH")}
ATTENTION_ENV = "HARNESS_ATTENTION"


def set_attention_order(name: str | None = None) -> str:
    """Put scaled-dot-product attention's kernels in the order `name` (default: $HARNESS_ATTENTION, else
    PyTorch's own) for this process; a compiled graph keeps the kernel chosen when it was traced."""
    import os

    name = name or os.environ.get(ATTENTION_ENV, "default")
    if name not in ATTENTION_ORDERS:
        raise HarnessError(f"{ATTENTION_ENV}={name}: not an attention order. Fix: one of {', '.join(ATTENTION_ORDERS)}")
    order = ATTENTION_ORDERS[name]
    if order is not None:
        from torch.nn.attention import SDPBackend

        wanted = [int(getattr(SDPBackend, b)) for b in order]
        rest = [b for b in torch._C._get_sdp_priority_order() if b not in wanted]
        torch._C._set_sdp_priority_order(wanted + rest)
    return name
