"""The samplers and one entry point; their names (`SAMPLERS`) live in `harness.config.vocab`.

* ``ddpm`` and ``ddim``: ours (harness.models.diffusion), on ADM's respaced process (`sampling_steps`
  evenly spaced steps, both ends kept), as the paper samples.
* ``dpm-solver++`` (2nd-order multistep), ``unipc``, ``euler``, ``heun``: diffusers' schedulers on
  the same linear-beta process (1e-4..0.02, 1000 steps), each with its own default timestep spacing.
  The network, its epsilon channels and classifier-free guidance are ours (`guided_model_fn`): only
  the update rule is diffusers'. Variance channels (learned sigma) are not used by these solvers.

`model_evaluations` says how many network calls one sample costs (Heun: two per step but the last),
so samplers can be compared at equal compute. `provenance` names the implementation and version.
"""
from __future__ import annotations

from importlib import metadata
from typing import TYPE_CHECKING, Any, Callable

from harness.models.diffusion import DIFFUSERS_PROCESS, create_diffusion

if TYPE_CHECKING:  # torch loads with the first sampler call, so `harness --help` stays fast
    import torch

#: sampler -> (diffusers scheduler class, extra config)
DIFFUSERS_SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "dpm-solver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
}
#: the training process, in diffusers' words (harness.models.diffusion, its one definition)
PROCESS = DIFFUSERS_PROCESS


def model_evaluations(sampler: str, steps: int) -> int:
    """Network evaluations per sample (a guided batch counts once: both halves run in one call)."""
    return 2 * int(steps) - 1 if sampler == "heun" else int(steps)


def provenance(sampler: str) -> dict[str, str]:
    """{sampler_impl, sampler_version}: the code that produced a sample and its library version."""
    if sampler in DIFFUSERS_SCHEDULERS:
        return {"sampler_impl": f"diffusers.{DIFFUSERS_SCHEDULERS[sampler][0]}",
                "sampler_version": metadata.version("diffusers")}
    try:
        version = metadata.version("dit-harness")
    except metadata.PackageNotFoundError:
        version = "unknown"
    return {"sampler_impl": f"harness.models.diffusion.{'p_sample_loop' if sampler == 'ddpm' else 'ddim_sample_loop'}",
            "sampler_version": version}


def make_scheduler(sampler: str) -> Any:
    """A fresh diffusers scheduler for `sampler` on the training process."""
    import diffusers

    name, extra = DIFFUSERS_SCHEDULERS[sampler]
    return getattr(diffusers, name)(**PROCESS, **extra)


def diffusers_sample_loop(sampler: str, model_fn: Callable[..., torch.Tensor], noise: torch.Tensor, steps: int,
                          model_kwargs: dict[str, Any], progress: bool = False) -> torch.Tensor:
    """x_T = noise (N, C, H, W) -> x_0 with a diffusers scheduler; model_fn(x, t (N,), **kwargs) returns
    (N, C or 2C, H, W) whose first C channels are epsilon."""
    from tqdm.auto import tqdm

    scheduler = make_scheduler(sampler)
    scheduler.set_timesteps(int(steps), device=noise.device)
    x = noise * scheduler.init_noise_sigma
    channels = noise.shape[1]
    for t in tqdm(scheduler.timesteps, disable=not progress, desc=sampler):
        model_in = scheduler.scale_model_input(x, t)
        eps = model_fn(model_in, t.expand(x.shape[0]).to(noise.device), **model_kwargs)[:, :channels]
        x = scheduler.step(eps.to(x.dtype), t, x).prev_sample
    return x


def sample_loop(sampler: str, model_fn: Callable[..., torch.Tensor], noise: torch.Tensor, steps: int,
                model_kwargs: dict[str, Any], learn_sigma: bool, generator: torch.Generator | None = None,
                progress: bool = False) -> torch.Tensor:
    """Run `sampler` for `steps` steps from x_T = noise (N, C, H, W); returns x_0 (N, C, H, W)."""
    if sampler in DIFFUSERS_SCHEDULERS:
        return diffusers_sample_loop(sampler, model_fn, noise, steps, model_kwargs, progress)
    diffusion = create_diffusion(str(int(steps)), learn_sigma=learn_sigma)
    loop = diffusion.p_sample_loop if sampler == "ddpm" else diffusion.ddim_sample_loop
    return loop(model_fn, tuple(noise.shape), noise=noise, model_kwargs=model_kwargs, device=noise.device,
                progress=progress, generator=generator)
