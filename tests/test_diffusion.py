"""Tests of harness.models.diffusion against closed forms.

Analytic oracle: for data from a Gaussian mixture, the noised marginal q(x_t) is again a
Gaussian mixture (component k: N(sqrt(abar_t) mu_k, abar_t Sigma_k + (1 - abar_t) I)), so the
optimal epsilon-predictor E[eps | x_t] = -sqrt(1 - abar_t) * grad log q(x_t) is exact. Plugged
into the samplers it must reproduce the data's mean and covariance; the tolerance is 5 standard
errors of the sample statistic (estimated from exact draws of the mixture) plus a small
allowance for the samplers' discretisation bias, stated next to each check.

For a single Gaussian N(mu, diag(s^2)) the exact model is linear, x0 given x_t is Gaussian with
variance s^2 (1 - abar) / (abar s^2 + 1 - abar), and every KL term of the variational bound has
a closed form that the test computes independently of the module's tables.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from harness.models.diffusion import (
    create_diffusion,
    discretized_gaussian_log_likelihood,
    guided_model_fn,
    linear_betas,
    sample_timesteps,
    space_timesteps,
)
from harness.errors import HarnessError
from diffusion_helpers import calc_bpd_loop, training_losses
from tolerance import fp32_bound, fp64_bound, rel_err, scale


def _abar_reference(T: int = 1000) -> np.ndarray:
    """alphas_cumprod by an explicit loop, independent of the module."""
    out, prod = [], 1.0
    for i in range(T):
        beta = 1e-4 + (2e-2 - 1e-4) * i / (T - 1)
        prod *= 1.0 - beta
        out.append(prod)
    return np.array(out)


# ----------------------------------------------------------------------------- oracles
class MixtureOracle:
    """Exact eps-predictor for a Gaussian mixture, on flattened (N, d) data of any shape."""

    def __init__(self, weights, means, covs, abar: np.ndarray, learn_sigma: bool, v: float = -1.0):
        self.logw = torch.log(torch.as_tensor(weights, dtype=torch.float64))
        self.means = torch.as_tensor(means, dtype=torch.float64)      # (K, d)
        self.covs = torch.as_tensor(covs, dtype=torch.float64)        # (K, d, d)
        self.abar = torch.as_tensor(abar, dtype=torch.float64)        # ORIGINAL schedule (1000,)
        self.learn_sigma, self.v = learn_sigma, v
        self.seen_t: set[int] = set()

    def sample(self, n: int, g: torch.Generator) -> torch.Tensor:
        k = torch.multinomial(self.logw.exp(), n, replacement=True, generator=g)
        z = torch.randn(n, self.means.shape[1], generator=g, dtype=torch.float64)
        chol = torch.linalg.cholesky(self.covs)
        return self.means[k] + torch.einsum("nij,nj->ni", chol[k], z)

    def mean_cov(self) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.logw.exp()
        m = (w[:, None] * self.means).sum(0)
        second = (w[:, None, None] * (self.covs + self.means[:, :, None] * self.means[:, None, :])).sum(0)
        return m, second - m[:, None] * m[None, :]

    def eps(self, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x = xt.reshape(xt.shape[0], -1).double()
        d = x.shape[1]
        out = torch.empty_like(x)
        for tv in torch.unique(t):
            self.seen_t.add(int(tv))
            rows = t == tv
            a = self.abar[int(tv)]
            xs = x[rows]
            logps, sols = [], []
            for k in range(self.means.shape[0]):
                c = a * self.covs[k] + (1 - a) * torch.eye(d, dtype=torch.float64)
                cinv = torch.linalg.inv(c)
                diff = xs - a.sqrt() * self.means[k]
                sol = diff @ cinv
                logps.append(self.logw[k] - 0.5 * torch.logdet(c) - 0.5 * (diff * sol).sum(1))
                sols.append(sol)
            resp = torch.softmax(torch.stack(logps, 1), dim=1)              # (n, K)
            out[rows] = (1 - a).sqrt() * (resp[:, :, None] * torch.stack(sols, 1)).sum(1)
        return out.reshape(xt.shape).to(xt.dtype)

    def __call__(self, xt: torch.Tensor, t: torch.Tensor, **kw) -> torch.Tensor:
        e = self.eps(xt, t)
        if self.learn_sigma:
            return torch.cat([e, torch.full_like(e, self.v)], dim=1)
        return e


def _mixture() -> MixtureOracle:
    g = torch.Generator().manual_seed(1)
    d = 4
    means = torch.tensor([[1.5, -1.0, 0.5, 0.0], [-1.5, 0.5, -0.5, 1.0], [0.0, 1.5, 1.0, -1.0]])
    covs = []
    for _ in range(3):
        a = torch.randn(d, d, generator=g, dtype=torch.float64) * 0.4
        covs.append(a @ a.T + 0.1 * torch.eye(d, dtype=torch.float64))
    return MixtureOracle([0.5, 0.3, 0.2], means, torch.stack(covs), _abar_reference(),
                         learn_sigma=True, v=-1.0)


def _moment_check(oracle: MixtureOracle, samples: torch.Tensor, rel_bias: float) -> None:
    """Sample mean and covariance vs the mixture's exact ones.

    Tolerance per entry: 5 standard errors of the statistic at this sample size (the SE is
    estimated from 200k exact draws of the mixture), plus a discretisation allowance of
    `rel_bias` times the data's largest variance (for covariance entries) or largest standard
    deviation (for means). Measured with 40k samples and this mixture (largest variance 2.48):
    DDPM-250 with the posterior variance under-disperses by up to 2.8% of it (500 steps: 1.4%),
    DDIM-50 by up to 5.1% (100 steps: 2.4%, 250: 1.2%); means are within sampling error."""
    x = samples.reshape(samples.shape[0], -1).double()
    n = x.shape[0]
    m_true, c_true = oracle.mean_cov()
    ref = oracle.sample(200_000, torch.Generator().manual_seed(7))
    rc = ref - ref.mean(0)
    se_mean = ref.std(0) / math.sqrt(n)
    se_cov = (rc[:, :, None] * rc[:, None, :]).std(0) / math.sqrt(n)
    vmax = c_true.diag().max()
    m, c = x.mean(0), torch.cov(x.T)
    assert torch.all((m - m_true).abs() <= 5 * se_mean + rel_bias * vmax.sqrt()), (m, m_true)
    assert torch.all((c - c_true).abs() <= 5 * se_cov + rel_bias * vmax), (c, c_true)


SHAPE = (2, 2, 1)   # C=2, H=2, W=1: four data dims, exercising the (N, C, H, W) layout


def test_oracle_ddpm_250_reproduces_mixture_moments():
    """DDPM, 250 respaced steps, learned-range v = -1 (the posterior variance)."""
    oracle = _mixture()
    diff = create_diffusion(250)
    n = 8000
    out = diff.p_sample_loop(oracle, (n, *SHAPE), generator=torch.Generator().manual_seed(0))
    assert out.shape == (n, *SHAPE) and torch.isfinite(out).all()
    # the model saw only original indices of the 250 kept steps
    assert oracle.seen_t == set(diff.timestep_map.tolist())
    _moment_check(oracle, out, rel_bias=0.04)


def test_oracle_ddim_50_reproduces_mixture_moments():
    oracle = _mixture()
    diff = create_diffusion("ddim50")
    n = 20000
    out = diff.ddim_sample_loop(oracle, (n, *SHAPE), generator=torch.Generator().manual_seed(1))
    assert oracle.seen_t == set(range(0, 1000, 20))
    _moment_check(oracle, out, rel_bias=0.07)


@pytest.mark.slow
def test_oracle_fixed_large_variance_sampling():
    """learn_sigma=False with DiT's fixed-large variance, same exact epsilon, DDPM-250."""
    oracle = _mixture()
    oracle.learn_sigma = False
    diff = create_diffusion(250, learn_sigma=False)
    out = diff.p_sample_loop(oracle, (12000, *SHAPE), generator=torch.Generator().manual_seed(2))
    _moment_check(oracle, out, rel_bias=0.04)


def test_broken_model_fails_the_moment_check():
    """The check has teeth: the exact eps evaluated at the respaced index instead of the
    original one (a missing timestep map) gives visibly wrong moments."""
    oracle = _mixture()
    diff = create_diffusion("ddim50")

    def unmapped(x, t, **kw):
        return oracle(x, torch.div(t, 20, rounding_mode="floor"))
    out = diff.ddim_sample_loop(unmapped, (4000, *SHAPE), generator=torch.Generator().manual_seed(0))
    with pytest.raises(AssertionError):
        _moment_check(oracle, out, rel_bias=0.07)


def test_variational_bound_of_exact_gaussian_model_matches_closed_form():
    """Single Gaussian data N(mu, diag(s^2)), exact eps model, learned-range v = 0.3."""
    mu = np.array([0.3, -0.5, 0.1])
    s = np.array([0.5, 0.2, 0.8])
    v = 0.3
    T = 1000
    abar = _abar_reference(T)
    abar_prev = np.append(1.0, abar[:-1])
    beta = 1.0 - abar / abar_prev
    oracle = MixtureOracle([1.0], mu[None], np.diag(s ** 2)[None], abar, learn_sigma=True, v=v)
    diff = create_diffusion()
    n = 1000
    g = torch.Generator().manual_seed(3)
    x0 = (torch.as_tensor(mu) + torch.as_tensor(s) * torch.randn(n, 3, generator=g,
                                                                  dtype=torch.float64))
    x0 = x0.float().reshape(n, 3, 1, 1)
    res = calc_bpd_loop(diff, oracle, x0, generator=g)

    # closed form, t >= 1: E KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)), bits per dim
    t = np.arange(1, T)
    var_q = beta[t] * (1 - abar_prev[t]) / (1 - abar[t])
    frac = (v + 1) / 2
    logvar_p = frac * np.log(beta[t]) + (1 - frac) * np.log(var_q)
    c1 = beta[t] * np.sqrt(abar_prev[t]) / (1 - abar[t])
    post_x0 = (s[None] ** 2 * (1 - abar[t, None]) / (abar[t, None] * s[None] ** 2 + 1 - abar[t, None]))
    kl = 0.5 * (logvar_p[:, None] - np.log(var_q)[:, None] + (var_q / np.exp(logvar_p))[:, None]
                - 1 + c1[:, None] ** 2 * post_x0 / np.exp(logvar_p)[:, None])
    expected_terms = kl.mean(1) / math.log(2)                      # (T-1,)
    # prior KL(q(x_T|x0) || N(0, I)) given each x0, bits per dim
    a_T = abar[-1]
    x0d = x0.reshape(n, 3).double().numpy()
    expected_prior = (0.5 * (-1 - np.log(1 - a_T) + (1 - a_T) + a_T * x0d ** 2)).mean(1) / math.log(2)

    got = res["vb"][:, 1:].double().sum(1)
    se = got.std() / math.sqrt(n)
    assert abs(got.mean().item() - expected_terms.sum()) <= 5 * se.item() + 1e-3 * expected_terms.sum()
    # a few individual terms, including the smallest t where float32 matters most
    for i in (1, 10, 500, 999):
        col = res["vb"][:, i].double()
        tol = 5 * col.std().item() / math.sqrt(n) + 1e-3 * expected_terms[i - 1]
        assert abs(col.mean().item() - expected_terms[i - 1]) <= tol, i
    # The prior KL (~1e-5 bits) is a float32 sum of terms of order 1 that cancel (-1 - log(1 - a_T) + (1 - a_T)):
    # its error is a few roundings of those unit terms, absolute (times 0.5 / ln 2 for bits), not relative to it.
    prior_err = np.abs(res["prior_bpd"].double().numpy() - expected_prior).max()
    assert prior_err < fp32_bound(4) * 0.5 / math.log(2), prior_err
    assert torch.allclose(res["total_bpd"], res["vb"].sum(1) + res["prior_bpd"])


# ----------------------------------------------------------------------------- known answers
def test_linear_betas():
    b = linear_betas()
    assert b.dtype == np.float64 and b.shape == (1000,)
    assert b[0] == pytest.approx(1e-4) and b[-1] == pytest.approx(2e-2)
    # abar spans 1 .. 4e-5: relative per entry, float64 products of 1000 factors of ~4 roundings each
    np.testing.assert_allclose(np.cumprod(1 - b), _abar_reference(), rtol=fp64_bound(4 * 1000), atol=0)
    b250 = linear_betas(250)       # ADM scales the end points by 1000/T
    assert b250[0] == pytest.approx(4e-4) and b250[-1] == pytest.approx(8e-2)


def test_q_sample_known_answer():
    diff = create_diffusion()
    x0 = torch.tensor([[[[0.5]], [[-1.0]]]])      # (1, 2, 1, 1)
    noise = torch.tensor([[[[2.0]], [[1.0]]]])
    # t = 0: abar = 1 - 1e-4 exactly
    # float32 on both sides: a coefficient, a product and a sum, 3 roundings each, of terms up to max |input|
    bound = fp32_bound(6) * max(scale(x0), scale(noise))
    xt = diff.q_sample(x0, torch.tensor([0]), noise)
    assert (xt - (math.sqrt(0.9999) * x0 + 0.01 * noise)).abs().max() <= bound
    abar = _abar_reference()
    for t in (1, 499, 999):
        xt = diff.q_sample(x0, torch.tensor([t]), noise)
        want = math.sqrt(abar[t]) * x0 + math.sqrt(1 - abar[t]) * noise
        assert (xt - want).abs().max() <= bound
    assert abar[-1] == pytest.approx(diff.alphas_cumprod[-1], rel=1e-12)
    assert 4.0e-5 < abar[-1] < 4.1e-5    # x_T is pure noise to 4e-5


def test_posterior_mean_variance_is_bayes_rule():
    """Against Bayes' rule for q(x_{t-1}|x0) q(x_t|x_{t-1}), derived independently."""
    diff = create_diffusion()
    abar = _abar_reference()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 2, 3, 3, generator=g)
    xt = torch.randn(4, 2, 3, 3, generator=g)
    t = torch.tensor([1, 7, 300, 999])
    mean, var, logvar = diff.q_posterior_mean_variance(x0, xt, t)
    for i, ti in enumerate(t.tolist()):
        ap, a = abar[ti - 1], abar[ti]
        alpha = a / ap
        beta = 1 - alpha
        prec = 1 / (1 - ap) + alpha / beta
        want_var = 1 / prec
        want_mean = want_var * (math.sqrt(ap) * x0[i] / (1 - ap) + math.sqrt(alpha) * xt[i] / beta)
        # float32 both sides: ~5 roundings in the module (2 tables, 2 products, a sum), ~6 here, of terms
        # no larger than the inputs (both coefficients are below 1)
        assert (mean[i] - want_mean).abs().max() <= fp32_bound(12) * max(scale(x0[i]), scale(xt[i]))
        assert var[i].flatten()[0].item() == pytest.approx(want_var, rel=1e-5)
        assert logvar[i].flatten()[0].item() == pytest.approx(math.log(want_var), rel=1e-5)
    # t = 0: the posterior is a point mass at x0; the log variance is clipped to step 1's
    mean0, var0, logvar0 = diff.q_posterior_mean_variance(x0[:1], xt[:1], torch.tensor([0]))
    # coef1 = 1 up to a float32 rounding, coef2 = 0: x0 back within two roundings
    assert rel_err(mean0, x0[:1]) <= fp32_bound(2) and var0.abs().max() == 0
    assert logvar0.flatten()[0].item() == pytest.approx(math.log(diff.posterior_variance[1]), rel=1e-6)


def test_respaced_betas_keep_alphas_cumprod():
    base = create_diffusion()
    for spec, n in ((250, 250), ("250", 250), ("ddim50", 50), (16, 16), ("10,20", 30)):
        d = create_diffusion(spec)
        assert d.num_timesteps == n
        # atol=0: numpy's default atol (1e-8) would swamp rtol on abar down to 4e-5 and betas down to 1e-4
        assert np.allclose(d.alphas_cumprod, base.alphas_cumprod[d.timestep_map], rtol=1e-12, atol=0)
        prev = np.append(1.0, base.alphas_cumprod[d.timestep_map[:-1]])
        assert np.allclose(d.betas, 1 - base.alphas_cumprod[d.timestep_map] / prev, rtol=1e-12, atol=0)
    d250 = create_diffusion(250)
    assert d250.timestep_map[0] == 0 and d250.timestep_map[-1] == 999
    assert set(np.diff(d250.timestep_map).tolist()) <= {4, 5}
    assert list(create_diffusion("ddim50").timestep_map) == list(range(0, 1000, 20))
    assert space_timesteps(1000, "10,20")[:2] == [0, 55]
    assert create_diffusion(None).num_timesteps == 1000
    assert create_diffusion(1000).num_timesteps == 1000


@pytest.mark.parametrize("bad", ["fast", "0", "2000", "ddim999"])
def test_bad_respacing_is_a_harness_error(bad):
    with pytest.raises(HarnessError, match="sampling_steps"):
        create_diffusion(bad)


def test_model_is_called_with_original_timesteps():
    d = create_diffusion(10)
    seen = []

    def model(x, t, **kw):
        seen.append(int(t[0]))
        assert kw == {"y": "label"}
        return torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:])
    d.p_sample_loop(model, (2, 1, 1, 1), model_kwargs={"y": "label"})
    assert seen == sorted(d.timestep_map.tolist(), reverse=True)
    assert seen[0] == 999 and seen[-1] == 0


def test_learned_range_variance_interpolation():
    d = create_diffusion()
    x = torch.zeros(3, 1, 2, 2)
    t = torch.tensor([0, 10, 999])
    pv = d.posterior_variance
    lo = np.log(np.array([pv[1], pv[10], pv[999]]))                   # clipped at t = 0
    hi = np.log(d.betas[[0, 10, 999]])
    for v, frac in ((-1.0, 0.0), (1.0, 1.0), (0.0, 0.5), (0.5, 0.75)):
        out = d.p_mean_variance(lambda x_, t_: torch.cat([torch.zeros_like(x_), torch.full_like(x_, v)], 1), x, t)
        want = frac * hi + (1 - frac) * lo
        got = out["log_variance"][:, 0, 0, 0].double().numpy()
        assert np.allclose(got, want, rtol=1e-5), (v, got, want)
        assert torch.equal(out["variance"], out["log_variance"].exp())   # the same op by design
    # fixed variances
    dl = create_diffusion(learn_sigma=False)
    out = dl.p_mean_variance(lambda x_, t_: torch.zeros_like(x_), x, t)
    # variances of 5e-5 .. 2e-2: relative only (numpy's default atol 1e-8 is 2e-4 of the smallest); one rounding
    # of the float64 table to float32
    assert np.allclose(out["variance"][:, 0, 0, 0].numpy(), [pv[1], d.betas[10], d.betas[999]], rtol=fp32_bound(2),
                       atol=0)
    ds = create_diffusion(learn_sigma=False, fixed_variance="small")
    out = ds.p_mean_variance(lambda x_, t_: torch.zeros_like(x_), x, t)
    assert np.allclose(out["log_variance"][:, 0, 0, 0].numpy(), lo, rtol=1e-5)


def test_pred_xstart_and_clip():
    d = create_diffusion()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 2, 2, 2, generator=g)
    eps = torch.randn(5, 2, 2, 2, generator=g)
    t = torch.tensor([0, 3, 100, 600, 999])
    xt = d.q_sample(x0, t, eps)
    out = d.p_mean_variance(lambda x_, t_: torch.cat([eps, torch.zeros_like(eps)], 1), xt, t)
    # x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar): ~8 float32 roundings (q_sample's and the tables') of terms
    # up to max(|x_t|, |eps|), amplified by 1 / sqrt(abar) (157 at t = 999)
    kappa = 1 / math.sqrt(d.alphas_cumprod[999])
    assert (out["pred_xstart"] - x0).abs().max() <= fp32_bound(8) * kappa * max(scale(xt), scale(eps))
    assert torch.allclose(out["eps"], eps)
    clipped = d.p_mean_variance(lambda x_, t_: torch.cat([eps, torch.zeros_like(eps)], 1), xt, t,
                                clip_denoised=True)
    assert clipped["pred_xstart"].abs().max() <= 1.0
    assert torch.allclose(clipped["pred_xstart"], out["pred_xstart"].clamp(-1, 1))


def test_training_losses_mse_and_detached_vb():
    d = create_diffusion()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 2, 2, 2, generator=g)
    noise = torch.randn(6, 2, 2, 2, generator=g)
    t = torch.tensor([0, 1, 50, 400, 800, 999])
    raw = torch.randn(6, 4, 2, 2, generator=g).requires_grad_(True)
    seen = {}

    def model(x, tt, y):
        seen["t"], seen["y"] = tt, y
        return raw
    losses = training_losses(d, model, x0, t, model_kwargs={"y": torch.arange(6)}, noise=noise)
    assert set(losses) == {"loss", "mse", "vb"} and all(v.shape == (6,) for v in losses.values())
    assert torch.equal(seen["t"], t)
    want_mse = ((noise - raw[:, :2].detach()) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(losses["mse"], want_mse)
    assert torch.allclose(losses["loss"], losses["mse"] + losses["vb"])
    assert torch.all(losses["vb"] > 0)
    losses["loss"].sum().backward()
    # the vb term does not move the epsilon channels: their gradient is the MSE's alone
    want_grad = -2 * (noise - raw[:, :2].detach()) / 8
    # noise - raw rounds once on each side; 2 and 1/8 are powers of two
    assert rel_err(raw.grad[:, :2], want_grad) <= fp32_bound(2)
    assert raw.grad[:, 2:].abs().sum() > 0
    # exact epsilon -> mse 0; without learn_sigma the vb is 0
    dl = create_diffusion(learn_sigma=False)
    l2 = training_losses(dl, lambda x, tt: noise, x0, t, noise=noise)
    assert torch.equal(l2["loss"], torch.zeros(6))   # noise - noise is exactly 0


def test_decoder_nll_matches_scipy():
    x = torch.tensor([-1.0, -0.5, 0.0, 0.3, 1.0], dtype=torch.float64)
    mean = torch.tensor([-0.9, -0.45, 0.1, 0.3, 0.8], dtype=torch.float64)
    log_scale = torch.log(torch.tensor([0.05, 0.1, 0.2, 0.01, 0.3], dtype=torch.float64))
    got = discretized_gaussian_log_likelihood(x, mean, log_scale).numpy()
    sd = log_scale.exp().numpy()
    want = [
        norm.logcdf(-1 + 1 / 255, -0.9, sd[0]),
        np.log(norm.cdf(-0.5 + 1 / 255, -0.45, sd[1]) - norm.cdf(-0.5 - 1 / 255, -0.45, sd[1])),
        np.log(norm.cdf(1 / 255, 0.1, sd[2]) - norm.cdf(-1 / 255, 0.1, sd[2])),
        np.log(norm.cdf(0.3 + 1 / 255, 0.3, sd[3]) - norm.cdf(0.3 - 1 / 255, 0.3, sd[3])),
        norm.logsf(1 - 1 / 255, 0.8, sd[4]),
    ]
    assert np.allclose(got, want, rtol=1e-6)


def test_sample_timesteps_uniform():
    g = torch.Generator().manual_seed(0)
    t = sample_timesteps(20000, 10, "cpu", generator=g)
    assert t.dtype == torch.long and t.shape == (20000,) and t.min() == 0 and t.max() == 9
    counts = torch.bincount(t, minlength=10).double()
    chi2 = ((counts - 2000) ** 2 / 2000).sum().item()
    assert chi2 < 33.7     # 99.99th percentile of chi-square with 9 dof


def test_samplers_are_reproducible_and_ddim_deterministic():
    d = create_diffusion("ddim10")
    model = lambda x, t, **kw: torch.cat([0.5 * x, torch.zeros_like(x)], 1)  # noqa: E731
    noise = torch.randn(3, 2, 2, 2, generator=torch.Generator().manual_seed(5))
    a = d.ddim_sample_loop(model, noise.shape, noise=noise)
    b = d.ddim_sample_loop(model, noise.shape, noise=noise.clone())
    assert torch.equal(a, b)
    c = d.ddim_sample_loop(model, noise.shape, noise=noise, eta=1.0,
                           generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(a, c)
    p1 = d.p_sample_loop(model, (3, 2, 2, 2), generator=torch.Generator().manual_seed(9))
    p2 = d.p_sample_loop(model, (3, 2, 2, 2), generator=torch.Generator().manual_seed(9))
    assert torch.equal(p1, p2)
    with torch.inference_mode():
        p3 = d.p_sample_loop(model, (3, 2, 2, 2), generator=torch.Generator().manual_seed(9))
    assert torch.equal(p1, p3)


# ----------------------------------------------------------------------------- guidance
def _cond_model(x, t, y):
    """A toy model whose output depends on the label: (N, 2C, H, W), C = x.shape[1]."""
    scale = (y.float() + 1.0).reshape(-1, 1, 1, 1)
    eps = x * scale + t.float().reshape(-1, 1, 1, 1) * 1e-3
    v = torch.tanh(x) * scale / 20
    return torch.cat([eps, v], dim=1)


def _guided_inputs(c: int = 4):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, c, 2, 2, generator=g)
    x = torch.cat([z, z])
    y = torch.cat([torch.tensor([0, 3, 7]), torch.full((3,), 10)])
    t = torch.tensor([5, 5, 5, 5, 5, 5])
    return z, x, y, t


def test_guidance_scale_one_is_conditional():
    z, x, y, t = _guided_inputs()
    out = guided_model_fn(_cond_model, 1.0)(x, t, y=y)
    cond = _cond_model(z, t[:3], y[:3])
    assert out.shape == (6, 8, 2, 2)
    # uncond + 1 * (cond - uncond): the difference (up to 2M) and the sum (M) round, M the larger half's scale (~25)
    bound = fp32_bound(3) * max(scale(cond), scale(_cond_model(z, t[:3], y[3:])))
    assert (out[:3] - cond).abs().max() <= bound and (out[3:] - cond).abs().max() <= bound


def test_guidance_three_channels_vs_all():
    z, x, y, t = _guided_inputs(c=4)
    s = 4.0
    cond = _cond_model(z, t[:3], y[:3])
    uncond = _cond_model(z, t[:3], y[3:])
    three = guided_model_fn(_cond_model, s)(x, t, y=y)[:3]
    allc = guided_model_fn(_cond_model, s, guidance_channels=None)(x, t, y=y)[:3]
    guided = uncond + s * (cond - uncond)
    # values reach ~60, so the error is relative to the halves' scale M, not absolute: per side, uncond + s * (cond -
    # uncond) rounds the difference (2M, then amplified by s), the product (2sM) and the sum ((2s + 1)M): (6s + 1) M u
    bound = fp32_bound(2 * (6 * int(s) + 1)) * max(scale(cond), scale(uncond))
    assert (three[:, :3] - guided[:, :3]).abs().max() <= bound
    assert torch.allclose(three[:, 3], cond[:, 3])                 # 4th eps channel unguided
    assert (allc[:, :4] - guided[:, :4]).abs().max() <= bound
    assert not torch.allclose(three[:, 3], allc[:, 3])
    for o in (three, allc):
        assert torch.allclose(o[:, 4:], cond[:, 4:])                # variance from cond half
    # the second half of x is ignored (DiT's convention): both halves use the first
    x2 = x.clone()
    x2[3:] = 100.0
    assert torch.allclose(guided_model_fn(_cond_model, s)(x2, t, y=y)[:3], three)
    with pytest.raises(ValueError):
        guided_model_fn(_cond_model, s)(x[:5], t[:5], y=y[:5])


def test_guided_sampling_runs_through_the_sampler():
    d = create_diffusion("ddim5")
    z, x, y, t = _guided_inputs()
    fn = guided_model_fn(_cond_model, 1.5)
    with torch.inference_mode():
        out = d.ddim_sample_loop(fn, x.shape, noise=x, model_kwargs={"y": y})
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert torch.allclose(out[:3], out[3:])    # deterministic DDIM: halves identical


def test_respacing_keeps_the_steps_adm_keeps_for_odd_counts():
    # ADM accumulates a float stride; for 21 of 1000 its 11th step is 499 (j * stride would round 499.5 to 500)
    from harness.models.diffusion import space_timesteps

    kept = space_timesteps(1000, 21)
    assert len(kept) == 21 and kept[0] == 0 and kept[-1] == 999 and kept[10] == 499


# ----------------------------------------------------------------------------- known answers (issue 16)
def _respaced_abar(steps: int) -> tuple[list[int], np.ndarray]:
    """ADM's even spacing over 1000 steps and alphas_cumprod at the kept steps, by hand."""
    kept = space_timesteps(1000, f"ddim{steps}")
    return kept, _abar_reference()[kept]


def test_predict_eps_from_xstart_is_the_forward_process_solved_for_eps():
    d = create_diffusion()
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([1, 10, 500, 999])
    abar = torch.as_tensor(_abar_reference()[t.numpy()]).reshape(-1, 1, 1, 1)
    xt = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    got = d.predict_eps_from_xstart(xt, t, x0)
    # the module's tables are float32: at t = 1 their rounding is amplified by 1 / sqrt(1 - abar) ~ 68. Bound:
    # 4 roundings (2 tables, the product, the quotient) of terms up to |x_t|, times that amplification
    bound = fp32_bound(4) * (1 / (1 - abar).sqrt()).max().item() * scale(xt)
    assert (got - (xt - abar.sqrt() * x0) / (1 - abar).sqrt()).abs().max() <= bound
    assert (got - eps).abs().max() <= bound


def test_one_stochastic_ddim_step_is_song_et_al_eq_12():
    """eta > 0: x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps + sigma z, with
    sigma = eta sqrt((1 - abar_prev) / (1 - abar)) sqrt(1 - abar / abar_prev), z from the generator."""
    steps, eta = 10, 0.7
    d = create_diffusion(f"ddim{steps}")
    kept, abar_kept = _respaced_abar(steps)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 2, 2, generator=g, dtype=torch.float64)
    eps = torch.randn(3, 2, 2, 2, generator=g, dtype=torch.float64)
    model = lambda x_, t_: torch.cat([eps, torch.zeros_like(eps)], 1)  # noqa: E731
    for i in (5, 1, 0):
        t = torch.full((3,), i)
        a, a_prev = abar_kept[i], (abar_kept[i - 1] if i > 0 else 1.0)
        x0_hat = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a)) * math.sqrt(1 - a / a_prev)
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(42), dtype=torch.float64)
        want = math.sqrt(a_prev) * x0_hat + math.sqrt(max(1 - a_prev - sigma ** 2, 0.0)) * eps
        want = want + (sigma * z if i > 0 else 0.0)
        got = d.ddim_sample(model, x, t, eta=eta, generator=torch.Generator().manual_seed(42))
        # float32 tables in float64 maths: ~8 float32 roundings in the coefficients, and sigma's
        # sqrt(1 - abar / abar_prev) amplifies that ratio's rounding by 1 / (1 - abar / abar_prev) (9.5 at i = 1)
        kappa = 1 / (1 - a / a_prev) if i > 0 else 1.0
        assert rel_err(got["sample"], want) <= fp32_bound(8) * kappa, i
        assert rel_err(got["pred_xstart"], x0_hat) <= fp32_bound(8) * kappa, i
    assert sigma == 0.0  # at t = 0 the step is deterministic whatever eta


def test_ddim_and_ddpm_loops_honour_clip_denoised():
    """A model whose x0 estimate lies far outside [-1, 1]: the last step returns that estimate, clipped
    only when asked."""
    d = create_diffusion("ddim5")
    model = lambda x_, t_: torch.cat([-3.0 * torch.ones_like(x_), torch.zeros_like(x_)], 1)  # noqa: E731
    noise = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    free = d.ddim_sample_loop(model, noise.shape, noise=noise)
    clipped = d.ddim_sample_loop(model, noise.shape, noise=noise, clip_denoised=True)
    assert free.abs().max() > 1.5 and clipped.abs().max() <= 1.0
    p = create_diffusion("5").p_sample_loop(model, noise.shape, noise=noise, clip_denoised=True,
                                            generator=torch.Generator().manual_seed(0))
    assert p.abs().max() <= 1.0 + 1e-6


def test_training_losses_draw_their_own_noise_like_randn_like_and_feed_the_model_xt():
    d = create_diffusion()
    x0 = torch.randn(4, 2, 2, 2, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([3, 30, 300, 900])
    seen = []

    def model(x, tt):
        seen.append(x)
        return torch.zeros(4, 4, 2, 2)
    torch.manual_seed(123)
    drawn = training_losses(d, model, x0, t)
    torch.manual_seed(123)
    noise = torch.randn_like(x0)
    given = training_losses(d, model, x0, t, noise=noise)
    assert torch.equal(drawn["loss"], given["loss"])
    assert torch.allclose(seen[1], d.q_sample(x0, t, noise))


def test_sample_timesteps_without_a_generator_uses_the_global_rng_and_the_device():
    torch.manual_seed(5)
    t = sample_timesteps(20000, 10)
    assert t.device.type == "cpu" and t.dtype == torch.long and int(t.min()) == 0 and int(t.max()) == 9
    chi2 = ((torch.bincount(t, minlength=10).double() - 2000) ** 2 / 2000).sum().item()
    assert chi2 < 33.7     # 99.99th percentile of chi-square with 9 dof
    torch.manual_seed(5)
    assert torch.equal(t, torch.randint(0, 10, (20000,)))
    g = sample_timesteps(7, 1000, "cpu", generator=torch.Generator().manual_seed(2))
    assert torch.equal(g, torch.randint(0, 1000, (7,), generator=torch.Generator().manual_seed(2)))


def test_guidance_defaults_to_the_first_three_channels_as_dit_does():
    z, x, y, t = _guided_inputs(c=4)
    default = guided_model_fn(_cond_model, 4.0)(x, t, y=y)
    assert torch.equal(default, guided_model_fn(_cond_model, 4.0, 3)(x, t, y=y))
    assert not torch.allclose(default, guided_model_fn(_cond_model, 4.0, None)(x, t, y=y))
