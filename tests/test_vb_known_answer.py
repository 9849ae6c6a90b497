"""The training vb term against a closed-form Gaussian KL computed here, independently of
harness.models.diffusion (issue 16): float64 numpy, the schedule and posterior written out from ADM's
formulas, the learned variance interpolated in log space with v in [-1, 1]."""
from __future__ import annotations

import numpy as np
import torch
from scipy.stats import norm

from harness.models.diffusion import create_diffusion
from diffusion_helpers import training_losses

T = 1000


def _schedule():
    betas = np.linspace(1e-4, 2e-2, T, dtype=np.float64)
    abar = np.cumprod(1 - betas)
    abar_prev = np.append(1.0, abar[:-1])
    post_var = betas * (1 - abar_prev) / (1 - abar)
    post_logvar_clipped = np.log(np.append(post_var[1], post_var[1:]))
    return betas, abar, abar_prev, post_var, post_logvar_clipped


def expected_vb(x0: np.ndarray, noise: np.ndarray, t: np.ndarray, eps: np.ndarray, v: np.ndarray,
                clip: bool = False) -> np.ndarray:
    """L_{t-1} in bits per dim, (N,): KL(q(x_{t-1} | x_t, x_0) || p) for t > 0, the discretised
    decoder NLL at t = 0. Arrays (N, C, H, W) float64, t (N,). `clip`: the wrong variant, with
    the predicted x0 clipped to [-1, 1] (training must not clip)."""
    betas, abar, abar_prev, _, post_logvar = _schedule()
    shape = (-1,) + (1,) * (x0.ndim - 1)
    b, a, ap, plv = (arr[t].reshape(shape) for arr in (betas, abar, abar_prev, post_logvar))
    xt = np.sqrt(a) * x0 + np.sqrt(1 - a) * noise
    # the true posterior q(x_{t-1} | x_t, x_0)
    coef_x0, coef_xt = b * np.sqrt(ap) / (1 - a), (1 - ap) * np.sqrt(1 - b) / (1 - a)
    true_mean = coef_x0 * x0 + coef_xt * xt
    # the model's p(x_{t-1} | x_t): mean from the predicted x0 (unclipped), learned log-variance
    x0_pred = (xt - np.sqrt(1 - a) * eps) / np.sqrt(a)
    if clip:
        x0_pred = np.clip(x0_pred, -1, 1)
    model_mean = coef_x0 * x0_pred + coef_xt * xt
    frac = (v + 1) / 2
    model_logvar = frac * np.log(b) + (1 - frac) * plv
    kl = 0.5 * (-1 + model_logvar - plv + np.exp(plv - model_logvar)
                + (true_mean - model_mean) ** 2 * np.exp(-model_logvar))
    sd = np.exp(0.5 * model_logvar)
    lo = np.where(x0 < -0.999, -np.inf, x0 - 1 / 255)
    hi = np.where(x0 > 0.999, np.inf, x0 + 1 / 255)
    with np.errstate(divide="ignore"):  # far from x0 (only where t > 0, unused there) the bin mass is 0
        nll = -np.log(norm.cdf(hi, model_mean, sd) - norm.cdf(lo, model_mean, sd))
    per_dim = np.where((t == 0).reshape(shape), nll, kl)
    return per_dim.reshape(len(t), -1).mean(axis=1) / np.log(2)


def _case(seed: int = 0):
    g = np.random.default_rng(seed)
    t = np.array([0, 0, 1, 7, 60, 250, 500, 999, 999])
    n = len(t)
    x0 = np.clip(g.normal(0, 0.6, (n, 2, 3, 3)), -1, 1)
    x0[0, 0, 0, 0], x0[1, 1, 2, 2] = -1.0, 1.0  # the two edge bins of the decoder
    noise = g.normal(size=x0.shape)
    eps = noise + g.normal(0, 0.7, x0.shape)  # an imperfect epsilon: x0_pred leaves [-1, 1] at large t
    v = g.uniform(-1, 1, x0.shape)
    return x0, noise, t, eps, v


def test_training_vb_is_the_closed_form_gaussian_kl():
    x0, noise, t, eps, v = _case()
    raw = torch.from_numpy(np.concatenate([eps, v], axis=1)).float().requires_grad_(True)
    losses = training_losses(create_diffusion(), lambda x, tt: raw, torch.from_numpy(x0).float(),
                             torch.from_numpy(t), noise=torch.from_numpy(noise).float())
    want = expected_vb(x0, noise, t, eps.astype(np.float32).astype(np.float64),
                       v.astype(np.float32).astype(np.float64))
    np.testing.assert_allclose(losses["vb"].detach().double().numpy(), want, rtol=2e-3, atol=1e-6)
    # the case has teeth: a flipped v, or a clipped x0 prediction, gives another answer here,
    # by far more than the tolerance (v matters where beta_t and the posterior variance differ: small t)
    small_t = t < 10
    for wrong in (expected_vb(x0, noise, t, eps, -v), expected_vb(x0, noise, t, eps, v, clip=True)):
        assert (np.abs(wrong - want) / want)[small_t].max() > 0.02


def test_vb_trains_the_variance_channels_and_only_them():
    """d vb / d v is nonzero on every example; d vb / d eps is zero (the mean is the MSE's job);
    d mse / d v is zero."""
    x0, noise, t, eps, v = _case(1)
    raw = torch.from_numpy(np.concatenate([eps, v], axis=1)).float().requires_grad_(True)
    losses = training_losses(create_diffusion(), lambda x, tt: raw, torch.from_numpy(x0).float(),
                             torch.from_numpy(t), noise=torch.from_numpy(noise).float())
    (grad_vb,) = torch.autograd.grad(losses["vb"].sum(), raw, retain_graph=True)
    (grad_mse,) = torch.autograd.grad(losses["mse"].sum(), raw)
    C = x0.shape[1]
    assert torch.all(grad_vb[:, C:].abs().flatten(1).sum(1) > 0)
    assert torch.count_nonzero(grad_vb[:, :C]) == 0
    assert torch.count_nonzero(grad_mse[:, C:]) == 0
    # the gradient points the right way: one small step on v alone lowers vb
    v2 = torch.from_numpy(v).float() - 1e-2 * grad_vb[:, C:].sign()
    raw2 = torch.cat([torch.from_numpy(eps).float(), v2], dim=1)
    after = training_losses(create_diffusion(), lambda x, tt: raw2, torch.from_numpy(x0).float(),
                            torch.from_numpy(t), noise=torch.from_numpy(noise).float())
    assert after["vb"].sum() < losses["vb"].sum()
