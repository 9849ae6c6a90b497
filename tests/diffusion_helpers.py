"""What only the tests need of a GaussianDiffusion: the training loss of a model function in one call
(the trainer runs q_sample, the model and loss_terms itself) and the whole variational bound
(the harness never computes a likelihood). Both compose the diffusion's own primitives."""
from __future__ import annotations

import math
from typing import Any

import torch

from harness.models.diffusion import GaussianDiffusion, ModelFn, _randn, mean_flat, normal_kl


def training_losses(d: GaussianDiffusion, model_fn: ModelFn, x0: torch.Tensor, t: torch.Tensor,
                    model_kwargs: dict[str, Any] | None = None,
                    noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """dict(loss, mse, vb), each (N,). loss = mse + vb (vb is 0 without learn_sigma)."""
    if noise is None:
        noise = torch.randn_like(x0)
    xt = d.q_sample(x0, t, noise)
    raw = model_fn(xt, d._model_t(t), **(model_kwargs or {}))
    return d.loss_terms(raw, x0, xt, t, noise)


def prior_bpd(d: GaussianDiffusion, x0: torch.Tensor) -> torch.Tensor:
    """KL(q(x_T | x_0) || N(0, I)) in bits per dim, (N,)."""
    t = torch.full((x0.shape[0],), d.num_timesteps - 1, dtype=torch.long, device=x0.device)
    mean, _, logvar = d.q_mean_variance(x0, t)
    return mean_flat(normal_kl(mean, logvar, torch.zeros_like(mean),
                               torch.zeros_like(logvar))) / math.log(2.0)


def calc_bpd_loop(d: GaussianDiffusion, model_fn: ModelFn, x0: torch.Tensor,
                  model_kwargs: dict[str, Any] | None = None, clip_denoised: bool = False,
                  generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """The whole variational bound per example, in bits per dim.

    Returns dict(total_bpd (N,), prior_bpd (N,), vb (N, T) with vb[:, t] = L_t, and
    xstart_mse (N, T)). Fresh noise is drawn for each t."""
    N, T = x0.shape[0], d.num_timesteps
    vb = torch.empty(N, T, device=x0.device)
    xstart_mse = torch.empty(N, T, device=x0.device)
    for i in reversed(range(T)):
        t = torch.full((N,), i, dtype=torch.long, device=x0.device)
        noise = _randn(x0.shape, generator, x0.device, x0.dtype)
        xt = d.q_sample(x0, t, noise)
        out = d.p_mean_variance(model_fn, xt, t, model_kwargs, clip_denoised)
        vb[:, i] = d._vb_from_output(out, x0, xt, t)
        xstart_mse[:, i] = mean_flat((out["pred_xstart"] - x0) ** 2)
    prior = prior_bpd(d, x0)
    return {"total_bpd": vb.sum(dim=1) + prior, "prior_bpd": prior, "vb": vb,
            "xstart_mse": xstart_mse}
