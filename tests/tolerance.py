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


def adam_step_bound(steps: int, betas: tuple[float, float] = (0.9, 0.999)) -> float:
    """B, the most |m_hat / sqrt(v_hat)| can be in Adam's first `steps` steps (so one step moves a weight by
    at most lr * B). Cauchy-Schwarz on m_t = (1 - b1) sum_k b1^k g_{t-k} against v_t = (1 - b2) sum_k b2^k
    g_{t-k}^2, with both bias corrections: (1 - b1)/(1 - b1^t) * sqrt((1 - b2^t)/(1 - b2)) *
    sqrt(sum_{k<t} (b1^2/b2)^k). Exactly 1 at t = 1 (the sign of the gradient); 1.006 at t = 4."""
    b1, b2 = betas
    return max((1 - b1) / (1 - b1 ** t) * ((1 - b2 ** t) / (1 - b2)) ** 0.5
               * sum((b1 * b1 / b2) ** k for k in range(t)) ** 0.5 for t in range(1, steps + 1))


def adam_grad_max(exp_avg_sq: torch.Tensor, steps: int, betas: tuple[float, float] = (0.9, 0.999)) -> torch.Tensor:
    """G, per coordinate, an upper bound on |g| at every one of the `steps` steps, read from Adam's final
    second moment: v_T >= (1 - b2) b2^(T-1) g_t^2 for every t <= T."""
    b2 = betas[1]
    return (exp_avg_sq.double() / ((1 - b2) * b2 ** (steps - 1))).sqrt()


def adam_bound(lr: float, steps: int, grad_rel: float, exp_avg_sq: torch.Tensor, weights: torch.Tensor,
               betas: tuple[float, float] = (0.9, 0.999)) -> torch.Tensor:
    """Per-coordinate bound on |w_a - w_b| after `steps` Adam(W) steps from equal weights, where run b's
    gradients differ from run a's by at most `grad_rel` of the gradient tensor's scale (another summation order).

    The error scales with lr x steps, not with the weights: Adam normalises the update, d = m_hat/sqrt(v_hat),
    |d| <= B (`adam_step_bound`). Each step's gradient error is at most E = grad_rel * max G over the tensor
    (`adam_grad_max`). Perturbing every g by <= E moves m_hat by <= E and sqrt(v_hat) (a weighted L2 norm of
    the g's) by <= E, so d moves by <= (1 + B) E / (r - E), r = sqrt(v_hat) the coordinate's gradient RMS
    (taken from the final v_hat: the few steps keep a gradient's order of magnitude). Where r <= ~E (a gradient
    ~0) the sign can flip: d moves by up to 2B. Per step that is lr * min(2B, (1 + B) E / (r - E)); on top,
    each step rounds the weight twice (the decay product, the update) on each side: 4 float32 roundings of
    the weight, whose scale is at most max |w| (+ lr * B * steps). Second order (the Hessian times the
    weights' difference feeding the next gradient) is lr * grad_rel smaller and left out.
    """
    b2 = betas[1]
    B = adam_step_bound(steps, betas)
    r = (exp_avg_sq.double() / (1 - b2 ** steps)).sqrt()
    E = grad_rel * adam_grad_max(exp_avg_sq, steps, betas).max().item()
    flip = torch.full_like(r, 2 * B)
    dd = torch.where(r > 2 * E, torch.minimum(flip, (1 + B) * E / (r - E).clamp_min(E)), flip)
    w_scale = scale(weights) + lr * B * steps
    return steps * (lr * dd + 4 * FP32_U * w_scale)
