"""Checks of a whole sweep spec across its keys, after each key was validated on its own (harness.config.spec).

Each takes the SweepSpec being built (typed Any: spec.py imports this module, not the reverse) and raises the
usual HarnessError "FILE:LINE: KEY: problem. Fix: ..." through the spec's `Where`.
"""
from __future__ import annotations

from typing import Any

from harness.config import limits as L
from harness.config.registry import VAE_DOWNSAMPLE, check_shape, resolve_shape
from harness.config.specfile import Where
from harness.errors import HarnessError


def split_shape_error(msg: str, name: str) -> tuple[str, str]:
    """"model 'X': problem; fix" (harness.models wording) -> (problem, fix)."""
    msg = msg.replace(f"model {name!r}: ", "")
    problem, _, fix = msg.partition("; ")
    return problem, fix


def batch_split(global_batch: int, ranks: int, micro: int | None) -> tuple[str, str, str] | None:
    """How `global_batch` fails to split over `ranks`, each rank's share in micro-batches of `micro` (None:
    auto, not chosen yet): (train key at fault, problem, fix), or None. The one rule of this spec check and
    of harness.training.step.BatchGeometry; each caller adds where the numbers came from."""
    if ranks < 1 or global_batch % ranks:
        return "global_batch", f"{global_batch} does not split over {ranks} ranks", f"use a multiple of {ranks}"
    per_rank = global_batch // ranks
    if micro is not None and (micro < 1 or per_rank % micro):
        divisors = [d for d in range(1, per_rank + 1) if per_rank % d == 0]
        return "micro_batch", f"{micro} does not divide the per-GPU batch of {per_rank}", \
            f"use one of {divisors[-6:]}, or auto"
    return None


#: where a spec's ranks and per-GPU batch come from, for batch_split's problems
_SPLIT_FROM = {"global_batch": " (launcher.nodes x launcher.tasks_per_node, default gpus_per_node)",
               "micro_batch": " (train.global_batch / GPUs)"}


def check_sweep(spec: Any, where: Where) -> None:
    """What no single key shows: sizes that must divide, steps in order and in range, batch splits, GPUs."""
    d, t, e, launch = spec.data, spec.train, spec.eval, spec.launcher
    if d.autoencoder != "identity" and d.image_size % VAE_DOWNSAMPLE:
        raise where.error(("data", "image_size"), f"{d.image_size} is not divisible by {VAE_DOWNSAMPLE}, "
                          f"the {d.autoencoder} downsampling factor", "use a multiple of 8 such as 256")
    if d.dataset == "imagefolder" and not d.path and t.steps > 0:
        raise where.error(("data", "path"), "dataset imagefolder needs a path",
                          "set data.path to the ImageNet train folder (root/<class>/<image>)")
    if d.dataset == "digits" and d.num_classes < 10:
        raise where.error(("data", "num_classes"), f"digits has 10 classes, got {d.num_classes}",
                          "set num_classes: 10")
    for i, model in enumerate(spec.models):
        try:
            check_shape(resolve_shape(model), d.input_size)
        except HarnessError as err:
            problem, fix = split_shape_error(str(err), model)
            raise where.error(("models", i), f"{problem} (image_size {d.image_size}, autoencoder "
                              f"{d.autoencoder})", fix or "change the model or data.image_size")
        if (beyond := L.check_geometry(resolve_shape(model), d.input_size)) is not None:
            raise L.refuse(where, ("models", i), beyond)
    for i, step in enumerate(e.at_steps):
        if step > t.steps:
            raise where.error(("eval", "at_steps", i), f"step {step} is beyond train.steps {t.steps}",
                              f"use steps <= {t.steps} or raise train.steps")
    if t.steps == 0 and not t.init_from:
        raise where.error(("train", "steps"), "0 steps trains nothing from nothing",
                          "set train.init_from to the weights to evaluate, or train for at least one step")
    if e.at_steps != sorted(e.at_steps):
        raise where.error(("eval", "at_steps"), "steps are not in increasing order", "sort them")
    if t.warmup_steps > t.steps:
        raise where.error(("train", "warmup_steps"), f"{t.warmup_steps} is beyond train.steps {t.steps}",
                          "use a shorter warmup")
    gpus = launch.nodes * launch.ranks_per_node
    if split := batch_split(t.global_batch, gpus, None if t.micro_batch == "auto" else t.micro_batch):
        key, problem, fix = split
        raise where.error(("train", key), problem + _SPLIT_FROM[key], fix)
    if e.features == "inception" and e.reference == "digits" and d.dataset != "digits":
        raise where.error(("eval", "reference"), "reference 'digits' does not match the dataset",
                          "point eval.reference at an ADM reference npz or an image folder")
    _check_gpus_per_model(spec, where)
    if launch.kind == "slurm" and launch.array_parallelism < 1:
        raise where.error(("launcher", "array_parallelism"), "must be >= 1", "use 1 or more")


def _check_gpus_per_model(spec: Any, where: Where) -> None:
    """launcher.gpus_per_model: keys are this sweep's models or size letters, values GPU counts a run can use."""
    launch, path = spec.launcher, ("launcher", "gpus_per_model")
    sizes = {m.removeprefix("DiT-").split("/")[0] for m in spec.models}
    cluster = launch.nodes * max(launch.gpus_per_node, 1)
    for key, gpus in launch.gpus_per_model.items():
        if key not in spec.models and key not in sizes:
            raise where.error(path + (key,), f"{key!r} is neither a model of this sweep nor its size letter",
                              f"use one of {', '.join(spec.models + sorted(sizes))}")
        if isinstance(gpus, bool) or not isinstance(gpus, int) or not 1 <= gpus <= cluster:
            raise where.error(path + (key,), f"{gpus!r} is not a GPU count between 1 and {cluster} "
                              "(launcher.nodes x gpus_per_node)", "write a whole number of GPUs")
        if batch_split(spec.train.global_batch, gpus, None):
            raise where.error(path + (key,), f"train.global_batch {spec.train.global_batch} does not split over "
                              f"{gpus} GPUs", "use a divisor of the global batch, such as a power of two")
