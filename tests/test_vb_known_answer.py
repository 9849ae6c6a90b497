"""The training vb term against a closed-form Gaussian KL computed here, independently of
harness.models.diffusion (issue 16): float64 numpy, the schedule and posterior written out from ADM's
formulas, the learned variance interpolated in log space with v in [-1, 1]."""
from __future__ import annotations

import numpy as np
import torch
from scipy.stats import norm

from harness.models.diffusion import create_diffusion
from diffusion_helpers import training_losses
from tolerance import FP32_U

T = 1000


def _schedule():
    betas = np.linspace(1e-4, 2e-2, T, dtype=np.float64)
    abar = np.cumprod(1 - betas)
    abar_prev = np.append(1.0, abar[:-1])
    post_var = betas * (1 - abar_prev) / (1 - abar)
    post_logvar_clipped = np.log(np.append(post_var[1], post_var[1:]))
    return betas, abar, abar_prev, post_var, post_logvar_clipped


def _reference(x0: np.ndarray, noise: np.ndarray, t: np.ndarray, eps: np.ndarray, v: np.ndarray,
               clip: bool = False) -> dict[str, np.ndarray]:
    """Every quantity of L_{t-1}, float64: arrays (N, C, H, W), the per-step ones (N, 1, 1, 1)."""
    betas, abar, abar_prev, _, post_logvar = _schedule()
    shape = (-1,) + (1,) * (x0.ndim - 1)
    b, a, ap, plv = (arr[t].reshape(shape) for arr in (betas, abar, abar_prev, post_logvar))
    q = dict(b=b, a=a, plv=plv, xt=np.sqrt(a) * x0 + np.sqrt(1 - a) * noise)
    # the true posterior q(x_{t-1} | x_t, x_0)
    q["c1"], q["c2"] = b * np.sqrt(ap) / (1 - a), (1 - ap) * np.sqrt(1 - b) / (1 - a)
    q["true_mean"] = q["c1"] * x0 + q["c2"] * q["xt"]
    # the model's p(x_{t-1} | x_t): mean from the predicted x0 (unclipped), learned log-variance
    q["x0_pred"] = (q["xt"] - np.sqrt(1 - a) * eps) / np.sqrt(a)
    if clip:
        q["x0_pred"] = np.clip(q["x0_pred"], -1, 1)
    q["model_mean"] = q["c1"] * q["x0_pred"] + q["c2"] * q["xt"]
    frac = (v + 1) / 2
    q["model_logvar"] = frac * np.log(b) + (1 - frac) * plv
    return q


def expected_vb(x0: np.ndarray, noise: np.ndarray, t: np.ndarray, eps: np.ndarray, v: np.ndarray,
                clip: bool = False) -> np.ndarray:
    """L_{t-1} in bits per dim, (N,): KL(q(x_{t-1} | x_t, x_0) || p) for t > 0, the discretised
    decoder NLL at t = 0. Arrays (N, C, H, W) float64, t (N,). `clip`: the wrong variant, with
    the predicted x0 clipped to [-1, 1] (training must not clip)."""
    q = _reference(x0, noise, t, eps, v, clip)
    plv, mlv = q["plv"], q["model_logvar"]
    kl = 0.5 * (-1 + mlv - plv + np.exp(plv - mlv) + (q["true_mean"] - q["model_mean"]) ** 2 * np.exp(-mlv))
    sd = np.exp(0.5 * mlv)
    lo = np.where(x0 < -0.999, -np.inf, x0 - 1 / 255)
    hi = np.where(x0 > 0.999, np.inf, x0 + 1 / 255)
    with np.errstate(divide="ignore"):  # far from x0 (only where t > 0, unused there) the bin mass is 0
        nll = -np.log(norm.cdf(hi, q["model_mean"], sd) - norm.cdf(lo, q["model_mean"], sd))
    per_dim = np.where((t == 0).reshape(-1, *[1] * (x0.ndim - 1)), nll, kl)
    return per_dim.reshape(len(t), -1).mean(axis=1) / np.log(2)


def rounding_bound(x0: np.ndarray, noise: np.ndarray, t: np.ndarray, eps: np.ndarray, v: np.ndarray) -> np.ndarray:
    """(N,) bound, bits per dim, on |the harness's float32 vb - expected_vb| given the same float32 inputs.

    First order: a float32 rounding moves its result r by at most u|r| (u = 2^-24), and that error reaches
    the answer times the answer's derivative in r; the float64 reference adds nothing that shows. The terms
    cancel: x_t - sqrt(1 - abar) eps (x0_pred, up to 1/sqrt(abar) = 157 times x_t), the two means (both
    contain the same float32 c2 x_t, which drops out of their difference dm, but each is rounded at its own
    magnitude ~|x_t| while dm is ~1e-2 at large t), and the KL's order-one terms -1 + lv2 - lv1 +
    exp(lv1 - lv2), which leave ~d^2/2 for d = lv2 - lv1 (~1e-6 at t = 999). So the bound is relative to
    those magnitudes, not to vb: 1e-5 to 2e-4 of vb, per example (measured: at most 0.04 of the bound in
    this case, 0.23 over 300 random cases).
    """
    u, w = FP32_U, 1 / 255
    q = _reference(x0, noise, t, eps, v)
    a, xt, c1, c2, lv1, lv2 = q["a"], q["xt"], q["c1"], q["c2"], q["plv"], q["model_logvar"]
    x0_pred, m_true, m_model = q["x0_pred"], q["true_mean"], q["model_mean"]
    sr, srm1 = 1 / np.sqrt(a), np.sqrt(1 / a - 1)
    # x_t and x0_pred: two table values, two products and a sum each
    d_xt = 3 * u * (np.sqrt(a) * np.abs(x0) + np.sqrt(1 - a) * np.abs(noise))
    d_x0_pred = sr * d_xt + 3 * u * (sr * np.abs(xt) + srm1 * np.abs(eps))
    # the model mean (c1's table value, two products, a sum), and the means' difference
    d_mean = c1 * d_x0_pred + c2 * d_xt + u * (2 * np.abs(c1 * x0_pred) + 2 * np.abs(c2 * xt) + np.abs(m_model))
    dm = m_true - m_model
    d_dm = c1 * d_x0_pred + u * (np.abs(c1 * x0) + np.abs(c1 * x0_pred) + np.abs(m_true) + np.abs(m_model)
                                 + 2 * np.abs(dm))
    # lv1 one table value; lv2 = f log(beta) + (1 - f) lv1, f = (v + 1) / 2: float32 beta and its log, f, 1 - f,
    # two products and the sum, at most 5u(1 + L) for L = max(|log beta|, |lv1|)
    d_lv1, d_lv2 = u * np.abs(lv1), 5 * u * (1 + np.maximum(np.abs(np.log(q["b"])), np.abs(lv1)))
    # t > 0: 2 KL = (((-1 + lv2) - lv1) + E) + M, E = exp(lv1 - lv2), M = dm^2 exp(-lv2). lv1 and lv2 reach it
    # through their derivatives |E - 1| and |1 - E - M| (small where the variances agree), each of the four
    # sums is rounded at its own magnitude (-1 + lv2 the largest), E at E, M's square, exp and product at M
    E, M = np.exp(lv1 - lv2), dm ** 2 * np.exp(-lv2)
    two_kl = -1 + lv2 - lv1 + E + M
    d_kl = 0.5 * (np.abs(E - 1) * d_lv1 + np.abs(1 - E - M) * d_lv2 + M * (3 * u + 2 * d_dm / np.abs(dm))
                  + u * (1 + np.abs(lv2) + np.abs(lv2 - lv1 - 1) + E * (1 + np.abs(lv1 - lv2))
                         + np.abs(two_kl - M) + np.abs(two_kl)))
    # t = 0: -log p, p = Phi(z+) - Phi(z-) (an edge bin: one of them), z+- = (c +- 1/255) / sd, c = x0 - mean,
    # sd = exp(lv2 / 2). The errors of c and of sd move z+ and z- together, so they reach p through the
    # difference of the two sides' derivatives g+-; then each side's own: the float32 1/255 and c +- 1/255,
    # the product with 1/sd, Phi(z) = (1 + erf(z / sqrt 2)) / 2 (sqrt 2 in float32, the quotient, erf's 2 ulp,
    # the sum); and the difference of the two sides
    sd, c = np.exp(lv2 / 2), x0 - m_model
    zp, zm = (c + w) / sd, (c - w) / sd
    edge_lo, edge_hi = x0 < -0.999, x0 > 0.999
    gp, gm = np.where(edge_hi, 0, norm.pdf(zp)), np.where(edge_lo, 0, norm.pdf(zm))
    p = np.where(edge_lo, norm.cdf(zp), np.where(edge_hi, norm.sf(zm), norm.cdf(zp) - norm.cdf(zm)))
    d_p = (np.abs(gp - gm) * (d_mean + u * np.abs(c)) / sd + np.abs(gp * zp - gm * zm) * (d_lv2 / 2 + u)
           + sum(g * (u * (w + np.abs(c + s * w)) / sd + 3 * u * np.abs(z)) + 3 * u * (g > 0)
                 for g, z, s in ((gp, zp, 1), (gm, zm, -1)))
           + u * p)
    with np.errstate(divide="ignore", invalid="ignore"):  # p = 0 only where t > 0, where this is unused
        nll, d_nll = -np.log(p), d_p / p + u * np.abs(np.log(p))  # and the log's rounding
    at_0 = (t == 0).reshape(-1, *[1] * (x0.ndim - 1))
    value, err = np.where(at_0, nll, 0.5 * two_kl), np.where(at_0, d_nll, d_kl)
    # mean_flat: the float32 sum of n terms (n - 1 roundings at most |sum|) and / n; then / ln 2 (2 roundings)
    n = value[0].size
    value, err = value.reshape(len(t), -1), err.reshape(len(t), -1)
    return (err.mean(axis=1) + n * u * np.abs(value).mean(axis=1) + 2 * u * np.abs(value.mean(axis=1))) / np.log(2)


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
    x0_, noise_, eps_, v_ = (a.astype(np.float32).astype(np.float64) for a in (x0, noise, eps, v))  # as the harness
    want, bound = expected_vb(x0_, noise_, t, eps_, v_), rounding_bound(x0_, noise_, t, eps_, v_)
    err = np.abs(losses["vb"].detach().double().numpy() - want)
    assert (err <= bound).all(), (err, bound)
    # the case has teeth: a flipped v, or a clipped x0 prediction, gives another answer here,
    # by far more than the bound (v matters where beta_t and the posterior variance differ: small t)
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
