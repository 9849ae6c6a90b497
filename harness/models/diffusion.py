"""Gaussian diffusion as ADM (Dhariwal & Nichol 2021) and DiT (Peebles & Xie 2023) use it.

Conventions (all of them DiT's defaults, checked against the papers' descriptions):

* Linear beta schedule from 1e-4 to 2e-2 over T = 1000 steps, precomputed in float64 with
  numpy and cast to float32 torch tensors when indexed.
* The network predicts epsilon. With ``learn_sigma`` it outputs 2C channels: the first C are
  epsilon, the last C are ``v`` in [-1, 1] (raw, not squashed) that interpolates the log-variance
  between the posterior variance (v = -1) and beta_t (v = +1)::

      frac = (v + 1) / 2
      log sigma^2 = frac * log(beta_t) + (1 - frac) * log(posterior_variance_clipped_t)

  Without ``learn_sigma`` the variance is fixed: ``fixed_variance="large"`` (DiT's default when
  learn_sigma is off: beta_t, with the first entry replaced by the posterior variance of step 1)
  or ``"small"`` (the posterior variance, clipped at step 0).
* Training loss: ``loss = mse + vb`` where ``mse`` is the mean over all non-batch dims of
  ``(eps - eps_pred)^2`` and ``vb`` is the variational-bound term L_{t-1} in bits per dim computed
  with the predicted epsilon *detached* (so vb trains only the variance, the mean is trained by the
  MSE). DiT uses ADM's plain ``MSE`` loss type (``rescale_learned_sigmas=False``), so ``vb`` is
  not rescaled; ADM's ``RESCALED_MSE`` would multiply ``vb`` by T/1000, which is 1 for T = 1000
  anyway. At t = 0 the vb term is the discretised-Gaussian decoder NLL (data in [-1, 1], 256 bins).
* Timestep respacing (for sampling): a respaced object keeps a subset of the original steps,
  recomputes betas so the kept ``alphas_cumprod`` are unchanged, and calls the model with the
  ORIGINAL timestep indices (``timestep_map``). Timesteps are passed to the model as integers
  (no rescaling to [0, 1000)), as DiT does.
* Classifier-free guidance: :func:`guided_model_fn`.

Tensor shapes: x is (N, C, H, W) (any trailing dims work), t is (N,) long.
"""
from __future__ import annotations

import logging
import math
import re
from typing import Any, Callable

import numpy as np
import torch

from harness.errors import HarnessError

log = logging.getLogger(__name__)

ModelFn = Callable[..., torch.Tensor]

__all__ = [
    "NUM_TIMESTEPS",
    "BETA_START",
    "BETA_END",
    "DIFFUSERS_PROCESS",
    "linear_betas",
    "space_timesteps",
    "GaussianDiffusion",
    "sample_timesteps",
    "create_diffusion",
    "guided_model_fn",
    "normal_kl",
    "discretized_gaussian_log_likelihood",
    "mean_flat",
]


#: the training process: T steps of ADM's linear beta schedule from BETA_START to BETA_END
NUM_TIMESTEPS, BETA_START, BETA_END = 1000, 1e-4, 2e-2
#: the same process in diffusers' scheduler words (its "linear" schedule is ADM's at T = 1000; the
#: network predicts epsilon): harness.sampling.samplers and harness.interop derive theirs from it
DIFFUSERS_PROCESS = {"num_train_timesteps": NUM_TIMESTEPS, "beta_start": BETA_START, "beta_end": BETA_END,
                     "beta_schedule": "linear", "prediction_type": "epsilon"}


# ----------------------------------------------------------------------------- helpers
def linear_betas(num_timesteps: int = NUM_TIMESTEPS, start: float = BETA_START, end: float = BETA_END) -> np.ndarray:
    """ADM's linear schedule, float64 (T,). For T != 1000 the end points are scaled by 1000/T,
    as ADM does, so the total noise stays comparable."""
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    scale = 1000.0 / num_timesteps
    return np.linspace(scale * start, scale * end, num_timesteps, dtype=np.float64)


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over all dims but the first: (N, ...) -> (N,)."""
    return x.reshape(x.shape[0], -1).mean(dim=1)


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor,
              logvar2: torch.Tensor) -> torch.Tensor:
    """Elementwise KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) in nats (broadcasting)."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _std_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor,
                                        log_scales: torch.Tensor) -> torch.Tensor:
    """Elementwise log-probability (nats) of x in [-1, 1] quantised to 256 bins under a Gaussian
    with the given mean and log standard deviation; the two edge bins extend to +-infinity."""
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = _std_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _std_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_mid = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus,
                       torch.where(x > 0.999, log_one_minus_cdf_min, log_mid))


def space_timesteps(num_timesteps: int, section_counts: int | str | list[int]) -> list[int]:
    """Which original steps a respaced process keeps (sorted list).

    ``section_counts``: an int or "250" (evenly spaced, both ends included); "ddim50" (stride
    T // 50 starting at 0, DDIM's spacing); or "10,15,20" / [10, 15, 20] (the process split into
    equal sections, each spaced evenly with that many steps).
    """
    if isinstance(section_counts, str):
        s = section_counts.strip()
        if s.startswith("ddim"):
            want = int(s[len("ddim"):])
            for stride in range(1, num_timesteps + 1):
                if len(range(0, num_timesteps, stride)) == want:
                    return list(range(0, num_timesteps, stride))
            raise ValueError(f"cannot take exactly {want} steps with an integer stride from "
                             f"{num_timesteps}")
        counts = [int(c) for c in s.split(",") if c.strip()]
    elif isinstance(section_counts, int):
        counts = [section_counts]
    else:
        counts = [int(c) for c in section_counts]
    if not counts:
        raise ValueError("empty timestep respacing")
    size_per, extra = divmod(num_timesteps, len(counts))
    start, kept = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if count < 1 or count > size:
            raise ValueError(f"cannot take {count} steps from a section of {size}")
        stride = (size - 1) / (count - 1) if count > 1 else 1.0
        position = 0.0
        for _ in range(count):  # accumulate the float stride as ADM does, so every count keeps ADM's steps
            kept.append(start + round(position))
            position += stride
        start += size
    return sorted(set(kept))


# ----------------------------------------------------------------------------- diffusion
class GaussianDiffusion:
    """Forward process q, reverse process p, losses, DDPM and DDIM samplers.

    ``betas`` (T,) float64. ``timestep_map`` (T,) gives, for each step of this (possibly
    respaced) process, the original timestep index the model is called with; default identity.
    """

    def __init__(self, betas: np.ndarray, learn_sigma: bool = True,
                 timestep_map: np.ndarray | None = None, fixed_variance: str = "large") -> None:
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0) & (betas <= 1)).all():
            raise ValueError("betas must be a 1-D array in (0, 1]")
        if fixed_variance not in ("large", "small"):
            raise ValueError(f"fixed_variance must be 'large' or 'small', got {fixed_variance!r}")
        self.betas = betas
        self.learn_sigma = learn_sigma
        self.fixed_variance = fixed_variance
        self.num_timesteps = int(betas.shape[0])
        T = self.num_timesteps
        self.timestep_map = (np.arange(T, dtype=np.int64) if timestep_map is None
                             else np.asarray(timestep_map, dtype=np.int64))
        if self.timestep_map.shape != (T,):
            raise ValueError("timestep_map must have one entry per step")

        alphas = 1.0 - betas
        acp = np.cumprod(alphas)
        acp_prev = np.append(1.0, acp[:-1])
        self.alphas_cumprod = acp
        self.alphas_cumprod_prev = acp_prev
        self.alphas_cumprod_next = np.append(acp[1:], 0.0)
        self.sqrt_alphas_cumprod = np.sqrt(acp)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - acp)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - acp)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / acp)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / acp - 1.0)
        # q(x_{t-1} | x_t, x_0)
        self.posterior_variance = betas * (1.0 - acp_prev) / (1.0 - acp)
        # The posterior variance is 0 at t = 0; the log is clipped to the value at t = 1.
        pv1 = self.posterior_variance[1] if T > 1 else self.posterior_variance[0]
        self.posterior_log_variance_clipped = np.log(np.append(pv1, self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(acp_prev) / (1.0 - acp)
        self.posterior_mean_coef2 = (1.0 - acp_prev) * np.sqrt(alphas) / (1.0 - acp)
        # fixed-large variance: beta_t with the first entry set to the posterior variance at 1
        self.fixed_large_variance = np.append(pv1, betas[1:])
        self._cache: dict[tuple[str, torch.device], torch.Tensor] = {}

    # -- table lookup ---------------------------------------------------------------
    def _table(self, name: str, device: torch.device) -> torch.Tensor:
        key = (name, device)
        if key not in self._cache:
            self._cache[key] = torch.as_tensor(getattr(self, name), dtype=torch.float32,
                                               device=device)
        return self._cache[key]

    def _extract(self, name: str, t: torch.Tensor, ndim: int) -> torch.Tensor:
        """Table `name` at steps t (N,), shaped (N, 1, ..., 1) with `ndim` dims."""
        vals = self._table(name, t.device)[t]
        return vals.reshape(vals.shape[0], *([1] * (ndim - 1)))

    def _model_t(self, t: torch.Tensor) -> torch.Tensor:
        """Original timestep indices the model sees for steps t of this process."""
        key = ("timestep_map", t.device)
        if key not in self._cache:
            self._cache[key] = torch.as_tensor(self.timestep_map, dtype=torch.long, device=t.device)
        return self._cache[key][t]

    # -- forward process ------------------------------------------------------------
    def q_mean_variance(self, x0: torch.Tensor, t: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance, log-variance of q(x_t | x_0)."""
        mean = self._extract("sqrt_alphas_cumprod", t, x0.ndim) * x0
        var = self._extract("alphas_cumprod", t, x0.ndim).neg().add(1.0).expand_as(x0)
        logvar = self._extract("log_one_minus_alphas_cumprod", t, x0.ndim).expand_as(x0)
        return mean, var, logvar

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor,
                 noise: torch.Tensor | None = None) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
        if noise is None:
            noise = torch.randn_like(x0)
        return (self._extract("sqrt_alphas_cumprod", t, x0.ndim) * x0
                + self._extract("sqrt_one_minus_alphas_cumprod", t, x0.ndim) * noise)

    def q_posterior_mean_variance(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor
                                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = (self._extract("posterior_mean_coef1", t, xt.ndim) * x0
                + self._extract("posterior_mean_coef2", t, xt.ndim) * xt)
        var = self._extract("posterior_variance", t, xt.ndim).expand_as(xt)
        logvar = self._extract("posterior_log_variance_clipped", t, xt.ndim).expand_as(xt)
        return mean, var, logvar

    # -- reverse process ------------------------------------------------------------
    def p_mean_variance(self, model_fn: ModelFn, x: torch.Tensor, t: torch.Tensor,
                        model_kwargs: dict[str, Any] | None = None,
                        clip_denoised: bool = False) -> dict[str, torch.Tensor]:
        """p(x_{t-1} | x_t): dict(mean, variance, log_variance, pred_xstart, eps), each like x."""
        out = model_fn(x, self._model_t(t), **(model_kwargs or {}))
        return self._p_from_output(out, x, t, clip_denoised)

    def _p_from_output(self, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor,
                       clip_denoised: bool) -> dict[str, torch.Tensor]:
        C = x.shape[1]
        out = out.to(x.dtype)
        if self.learn_sigma:
            if out.shape[1] != 2 * C:
                raise ValueError(f"learn_sigma: model must output {2 * C} channels, got "
                                 f"{out.shape[1]}")
            eps, v = out[:, :C], out[:, C:]
            min_log = self._extract("posterior_log_variance_clipped", t, x.ndim)
            max_log = self._extract("betas", t, x.ndim).log()
            frac = (v + 1.0) / 2.0
            log_variance = frac * max_log + (1.0 - frac) * min_log
            variance = log_variance.exp()
        else:
            if out.shape[1] != C:
                raise ValueError(f"model must output {C} channels, got {out.shape[1]}")
            eps = out
            name = "fixed_large_variance" if self.fixed_variance == "large" else "posterior_variance"
            variance = self._extract(name, t, x.ndim).expand_as(x)
            log_variance = (self._extract(name, t, x.ndim).log().expand_as(x)
                            if self.fixed_variance == "large" else
                            self._extract("posterior_log_variance_clipped", t, x.ndim).expand_as(x))
        pred_xstart = self.predict_xstart_from_eps(x, t, eps)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1.0, 1.0)
            eps = self.predict_eps_from_xstart(x, t, pred_xstart)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {"mean": mean, "variance": variance, "log_variance": log_variance,
                "pred_xstart": pred_xstart, "eps": eps}

    def predict_xstart_from_eps(self, xt: torch.Tensor, t: torch.Tensor,
                                eps: torch.Tensor) -> torch.Tensor:
        return (self._extract("sqrt_recip_alphas_cumprod", t, xt.ndim) * xt
                - self._extract("sqrt_recipm1_alphas_cumprod", t, xt.ndim) * eps)

    def predict_eps_from_xstart(self, xt: torch.Tensor, t: torch.Tensor,
                                pred_xstart: torch.Tensor) -> torch.Tensor:
        return ((self._extract("sqrt_recip_alphas_cumprod", t, xt.ndim) * xt - pred_xstart)
                / self._extract("sqrt_recipm1_alphas_cumprod", t, xt.ndim))

    # -- losses ---------------------------------------------------------------------
    def _vb_from_output(self, out: dict[str, torch.Tensor], x0: torch.Tensor, xt: torch.Tensor,
                        t: torch.Tensor) -> torch.Tensor:
        """L_{t-1} in bits per dim (N,): KL(q(x_{t-1}|x_t,x_0) || p) for t > 0, the decoder
        NLL at t = 0."""
        true_mean, _, true_logvar = self.q_posterior_mean_variance(x0, xt, t)
        kl = mean_flat(normal_kl(true_mean, true_logvar, out["mean"], out["log_variance"]))
        nll = -mean_flat(discretized_gaussian_log_likelihood(
            x0, out["mean"], 0.5 * out["log_variance"]))
        return torch.where(t == 0, nll, kl) / math.log(2.0)

    def loss_terms(self, raw: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor,
                   noise: torch.Tensor) -> dict[str, torch.Tensor]:
        """The training losses from the model's output `raw` (N, C or 2C, H, W) at xt = q_sample(x0,
        t, noise): dict(loss, mse, vb), each (N,), in fp32. Separate from the model call so that
        the trainer can compile it on its own."""
        raw = raw.float()
        C = x0.shape[1]
        eps_pred = raw[:, :C]
        mse = mean_flat((noise.float() - eps_pred) ** 2)
        if self.learn_sigma:
            # The vb term must not move the mean: detach the epsilon part, keep v.
            frozen = torch.cat([eps_pred.detach(), raw[:, C:]], dim=1)
            out = self._p_from_output(frozen, xt.float(), t, clip_denoised=False)
            vb = self._vb_from_output(out, x0.float(), xt.float(), t)
        else:
            vb = torch.zeros_like(mse)
        return {"loss": mse + vb, "mse": mse, "vb": vb}

    # -- samplers -------------------------------------------------------------------
    def p_sample(self, model_fn: ModelFn, x: torch.Tensor, t: torch.Tensor,
                 model_kwargs: dict[str, Any] | None = None, clip_denoised: bool = False,
                 generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """One ancestral step x_t -> x_{t-1}; no noise is added at t = 0."""
        out = self.p_mean_variance(model_fn, x, t, model_kwargs, clip_denoised)
        noise = _randn(x.shape, generator, x.device, x.dtype)
        nonzero = (t != 0).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        sample = out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_sample(self, model_fn: ModelFn, x: torch.Tensor, t: torch.Tensor,
                    model_kwargs: dict[str, Any] | None = None, clip_denoised: bool = False,
                    eta: float = 0.0, generator: torch.Generator | None = None
                    ) -> dict[str, torch.Tensor]:
        """One DDIM step (Song et al. 2021, eq. 12); eta = 0 is deterministic."""
        out = self.p_mean_variance(model_fn, x, t, model_kwargs, clip_denoised)
        eps = out["eps"]
        abar = self._extract("alphas_cumprod", t, x.ndim)
        abar_prev = self._extract("alphas_cumprod_prev", t, x.ndim)
        sigma = (eta * torch.sqrt((1 - abar_prev) / (1 - abar))
                 * torch.sqrt(1 - abar / abar_prev))
        mean = (out["pred_xstart"] * torch.sqrt(abar_prev)
                + torch.sqrt((1 - abar_prev - sigma ** 2).clamp(min=0.0)) * eps)
        nonzero = (t != 0).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        sample = mean
        if eta > 0:
            sample = mean + nonzero * sigma * _randn(x.shape, generator, x.device, x.dtype)
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def _loop(self, step: Callable[..., dict[str, torch.Tensor]], shape: tuple[int, ...],
              noise: torch.Tensor | None, device: torch.device | str | None, progress: bool,
              generator: torch.Generator | None, **kw: Any) -> torch.Tensor:
        if device is None:
            device = noise.device if noise is not None else torch.device("cpu")
        x = noise.to(device) if noise is not None else _randn(shape, generator, device,
                                                                torch.float32)
        steps = list(reversed(range(self.num_timesteps)))
        if progress:
            from tqdm.auto import tqdm
            steps = tqdm(steps, desc="sampling", leave=False)
        for i in steps:
            t = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
            x = step(x=x, t=t, generator=generator, **kw)["sample"]
        return x

    def p_sample_loop(self, model_fn: ModelFn, shape: tuple[int, ...],
                      noise: torch.Tensor | None = None,
                      model_kwargs: dict[str, Any] | None = None,
                      device: torch.device | str | None = None, progress: bool = False,
                      generator: torch.Generator | None = None,
                      clip_denoised: bool = False) -> torch.Tensor:
        """DDPM ancestral sampling from x_T = noise (or fresh N(0, I)) to x_0; returns x_0.

        ``generator`` draws every random number (on its own device, then moved)."""
        return self._loop(lambda **kw: self.p_sample(model_fn, **kw), shape, noise, device,
                          progress, generator, model_kwargs=model_kwargs,
                          clip_denoised=clip_denoised)

    def ddim_sample_loop(self, model_fn: ModelFn, shape: tuple[int, ...],
                         noise: torch.Tensor | None = None,
                         model_kwargs: dict[str, Any] | None = None,
                         device: torch.device | str | None = None, progress: bool = False,
                         generator: torch.Generator | None = None,
                         clip_denoised: bool = False, eta: float = 0.0) -> torch.Tensor:
        """DDIM sampling over this process's steps; returns x_0."""
        return self._loop(lambda **kw: self.ddim_sample(model_fn, eta=eta, **kw), shape, noise,
                          device, progress, generator, model_kwargs=model_kwargs,
                          clip_denoised=clip_denoised)


def _randn(shape: tuple[int, ...] | torch.Size, generator: torch.Generator | None,
           device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
    if generator is None:
        return torch.randn(tuple(shape), device=device, dtype=dtype)
    return torch.randn(tuple(shape), generator=generator, device=generator.device,
                       dtype=dtype).to(device)


# ----------------------------------------------------------------------------- factories
def sample_timesteps(n: int, num_timesteps: int, device: torch.device | str = "cpu",
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """n timesteps drawn uniformly from {0, ..., T-1}: (n,) long."""
    if generator is None:
        return torch.randint(0, num_timesteps, (n,), device=device)
    return torch.randint(0, num_timesteps, (n,), generator=generator,
                         device=generator.device).to(device)


def create_diffusion(timestep_respacing: int | str | None = None, num_timesteps: int = NUM_TIMESTEPS,
                     learn_sigma: bool = True, fixed_variance: str = "large") -> GaussianDiffusion:
    """The DiT diffusion (linear schedule, T = 1000), optionally respaced for sampling.

    ``timestep_respacing``: None / "" (all steps), an int or "250" (evenly spaced), "ddim50",
    or "10,15,20" (sections). The respaced process keeps ``alphas_cumprod`` at the kept steps
    and calls the model with the original indices.
    """
    betas = linear_betas(num_timesteps)
    if timestep_respacing in (None, "") or str(timestep_respacing) == str(num_timesteps):
        return GaussianDiffusion(betas, learn_sigma=learn_sigma, fixed_variance=fixed_variance)
    spec = str(timestep_respacing)
    if not re.fullmatch(r"(ddim)?\d+(\s*,\s*\d+)*", spec.strip()):
        raise HarnessError(
            f"timestep respacing {spec!r} is not understood (key eval.sampling_steps in the sweep "
            f"spec): use a number of steps such as 250, or 'ddim50'")
    try:
        kept = space_timesteps(num_timesteps, spec)
    except ValueError as e:
        raise HarnessError(
            f"timestep respacing {spec!r}: {e} (key eval.sampling_steps in the sweep spec): use "
            f"between 1 and {num_timesteps} steps") from None
    acp = np.cumprod(1.0 - betas)
    new_betas, last = [], 1.0
    for i in kept:
        new_betas.append(1.0 - acp[i] / last)
        last = acp[i]
    return GaussianDiffusion(np.array(new_betas), learn_sigma=learn_sigma,
                             timestep_map=np.array(kept, dtype=np.int64),
                             fixed_variance=fixed_variance)


def guided_model_fn(model_fn: ModelFn, cfg_scale: float,
                    guidance_channels: int | None = 3) -> ModelFn:
    """Classifier-free guidance with the conditional and unconditional halves in one batch.

    The caller passes x = cat([z, z]) and y = cat([labels, null_labels]) (any model kwargs are
    passed through). Only the first half of x is used (as in DiT), so both halves of the batch
    follow the same trajectory input. For the epsilon part (first C output channels)::

        eps = uncond + cfg_scale * (cond - uncond)   on the first `guidance_channels` channels
                                                      (None = all C channels)
        eps = cond                                    on the remaining epsilon channels

    The variance channels (if any) are the conditional half's. The output has the input's batch
    layout with both halves equal to the guided result: (N, C_out, H, W).
    """
    def fn(x: torch.Tensor, t: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        n = x.shape[0]
        if n % 2:
            raise ValueError(f"guided sampling needs an even batch (cond, uncond), got {n}")
        half = x[: n // 2]
        out = model_fn(torch.cat([half, half]), t, **kwargs)
        C = x.shape[1]
        g = C if guidance_channels is None else min(int(guidance_channels), C)
        cond, uncond = out[: n // 2], out[n // 2:]
        guided = cond.clone()
        guided[:, :g] = uncond[:, :g] + cfg_scale * (cond[:, :g] - uncond[:, :g])
        return torch.cat([guided, guided])
    return fn
