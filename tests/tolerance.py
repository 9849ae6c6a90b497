"""Tolerances that hold on any machine: errors measured against the scale of the values compared.

Two float32 computations of the same maths in a different order (another BLAS, another kernel,
another summation order) differ by a few units in the last place of the values they produce, so
the difference grows with the values. An absolute bound passes or fails with the scale of the
tensors (latents of a random model reach ~100s); a bound relative to that scale does not.
"""
from __future__ import annotations

import torch

#: float32's unit roundoff (2^-24); a chain of k roundings in a different order moves a result by ~k of them.
FP32_U = 2.0 ** -24


def scale(t: torch.Tensor) -> float:
    """max |t|, the scale a float32 rounding error is proportional to (1 for an all-zero tensor)."""
    return max(t.detach().abs().max().item(), torch.finfo(torch.float32).tiny)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|: the worst error in units of the expected values' scale."""
    return (actual.detach().double() - expected.detach().double()).abs().max().item() / scale(expected)


def fp32_bound(roundings: int) -> float:
    """Relative bound for float32 results that went through `roundings` differently-ordered roundings."""
    return roundings * FP32_U
