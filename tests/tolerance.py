"""Tolerances that hold on any machine: errors measured against the scale of the values compared.

Two float32 computations of the same maths in a different order (another BLAS, another kernel,
another summation order) differ by a few units in the last place of the values they produce, so
the difference grows with the values. An absolute bound passes or fails with the scale of the
tensors (latents of a random model reach ~100s); a bound relative to that scale does not.

`scale` and `rel_err` take torch tensors or numpy arrays. The bounds are unit roundoffs times a
count of roundings, stated (and derived) next to each check that uses them.
"""
from __future__ import annotations

import torch

#: float32's unit roundoff (2^-24); a chain of k roundings in a different order moves a result by ~k of them.
FP32_U = 2.0 ** -24
#: float64's unit roundoff (2^-53).
FP64_U = 2.0 ** -53
#: float16's unit roundoff (2^-11): one rounding to float16 moves a value by at most this, relative.
FP16_U = 2.0 ** -11


def _tensor(t) -> torch.Tensor:
    return t.detach() if isinstance(t, torch.Tensor) else torch.as_tensor(t)


def scale(t) -> float:
    """max |t|, the scale a float32 rounding error is proportional to (float32's tiny for an all-zero tensor)."""
    return max(_tensor(t).abs().max().item(), torch.finfo(torch.float32).tiny)


def rel_err(actual, expected) -> float:
    """max |actual - expected| / max |expected|: the worst error in units of the expected values' scale."""
    return (_tensor(actual).double() - _tensor(expected).double()).abs().max().item() / scale(expected)


def fp32_bound(roundings: int) -> float:
    """Relative bound for float32 results that went through `roundings` differently-ordered roundings."""
    return roundings * FP32_U


def fp64_bound(roundings: int) -> float:
    """The same for float64 results."""
    return roundings * FP64_U


def fp16_bound(roundings: int) -> float:
    """The same for values stored in float16."""
    return roundings * FP16_U
