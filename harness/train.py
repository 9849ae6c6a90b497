"""The training loop: the paper's recipe, DDP, mixed precision, atomic checkpoints and exact resume.

One function, `run_training(run, run_dir)`, is the body of every sweep training job and of
`harness train`. It is safe to call again after a crash or a preemption: it resumes from the newest
valid checkpoint, reruns any evaluation that is missing, and writes `done` when the run is complete.

Determinism: everything random in a step is a pure function of (seed, step) or (seed, epoch):
the data order and flips come from a per-epoch permutation, the timesteps, noise and label drops
from a per-step generator over the *global* batch (each rank takes its slice). So a resumed run is
bitwise equal to an uninterrupted one, and N ranks train the same model as one rank with the same
global batch (up to floating-point reduction order).
"""
from __future__ import annotations

import copy
import logging
import os
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from harness import checkpoint as ckpt
from harness.errors import HarnessError
from harness.evaluation import evaluate_step, pending_evals, save_grid
from harness.io import append_jsonl, atomic_write_json, file_lock
from harness.runtime import (Dist, all_reduce, barrier, derive_seed, ema_update, peak_mem_mb, rng_state,
                             seed_everything, set_rng_state, setup_distributed)

log = logging.getLogger(__name__)

_TAG_EPOCH, _TAG_STEP = 1, 2  # seed tags; evaluation uses harness.evaluation.TAG_EVAL
RUN_LOCK = ".run.lock"
#: test hook: sleep this many seconds before each step, so tests that kill or requeue a job
#: mid-training do not race a tiny model that trains in a second or two.
STEP_DELAY_ENV = "HARNESS_TEST_STEP_DELAY_S"


# ----------------------------------------------------------------------------- determinism
class DataOrder:
    """Global sample positions -> (dataset index, flip). Epoch e is a permutation and a flip draw
    seeded by (seed, e), so a position is a pure function of (seed, epoch, offset)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def epoch(self, e: int) -> tuple[np.ndarray, np.ndarray]:
        if e not in self._cache:
            g = torch.Generator().manual_seed(derive_seed(self.seed, _TAG_EPOCH, e))
            perm = torch.randperm(self.n, generator=g).numpy()
            flips = torch.randint(0, 2, (self.n,), generator=g).numpy()
            self._cache = {k: v for k, v in self._cache.items() if k >= e - 1}
            self._cache[e] = (perm, flips)
        return self._cache[e]

    def take(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """Indices (count,) and flips (count,) of global positions start .. start+count-1."""
        pos = np.arange(start, start + count)
        idx = np.empty(count, np.int64)
        flip = np.empty(count, np.int64)
        for e in np.unique(pos // self.n):
            sel = pos // self.n == e
            perm, flips = self.epoch(int(e))
            idx[sel], flip[sel] = perm[pos[sel] % self.n], flips[pos[sel] % self.n]
        return idx, flip


# ----------------------------------------------------------------------------- pieces
def _spec_dict(run: Any) -> dict:
    return run.to_dict() if hasattr(run, "to_dict") else dict(run)


def load_training_arrays(run: Any) -> tuple[np.ndarray, np.ndarray]:
    """The run's training set from the latent cache: latents (N, 2, C, h, w) (index 1 = flipped)
    and labels (N,). Built on first use (identity autoencoder on digits: pixels in [-1, 1])."""
    from harness.autoencoder import build_latent_cache, load_autoencoder

    d = run.data
    source = d.resolved_path() if d.dataset == "imagefolder" else d.dataset
    cache = build_latent_cache(source, load_autoencoder(d.autoencoder, d.resolved_autoencoder_path()), d.image_size)
    latents, labels = cache.arrays()
    return latents, labels


def _lr_at(step: int, lr: float, warmup: int) -> float:
    """Learning rate for optimizer step `step` (1-based): linear warmup over `warmup` steps, then flat."""
    return lr if warmup <= 0 else lr * min(1.0, step / warmup)


def _check_finite(bad: torch.Tensor, dist: Dist, run_dir: Path) -> None:
    first = int(all_reduce(bad.clone(), dist, "min").item())
    if first < _NO_BAD:
        raise HarnessError(
            f"{run_dir}: the training loss became NaN or Inf at step {first}. Fix: lower train.lr in the "
            "sweep spec, add train.warmup_steps, or use train.precision: fp32; the run resumes from the "
            "last checkpoint before that step (checkpoints/).")


_NO_BAD = 2**62


# ----------------------------------------------------------------------------- the loop
def run_training(run: Any, run_dir: str | Path, *, stop_at: int | None = None) -> None:
    """Train `run` (a RunSpec) in `run_dir`, resuming from the newest valid checkpoint.

    `stop_at`: stop (after checkpointing) once this step is reached, as a preemption would; the
    next call continues. Safe to call repeatedly; writes `run_dir/done` at the end.
    """
    run_dir = Path(run_dir)
    dist = setup_distributed()
    try:
        # one trainer per run folder: a sweep job and a stray `harness train`, or an orphaned job of
        # a killed sweep and its replacement, never write the same checkpoints at once
        with file_lock(run_dir / RUN_LOCK) if dist.rank == 0 else nullcontext():
            _train(run, run_dir, dist, stop_at)
    finally:
        if dist.initialised_here:
            torch.distributed.destroy_process_group()


def _train(run: Any, run_dir: Path, dist: Dist, stop_at: int | None) -> None:
    from harness.diffusion import create_diffusion, sample_timesteps
    from harness.models import build_model

    tr, ev = run.train, run.eval
    ckpt_dir = run_dir / "checkpoints"
    device = dist.device
    if dist.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not (run_dir / "run.json").exists():
            atomic_write_json(run_dir / "run.json", _spec_dict(run))
        ckpt.clean_partial_writes(ckpt_dir)
    if tr.global_batch % dist.world:
        raise HarnessError(f"{run_dir}/run.json: train.global_batch={tr.global_batch} is not divisible by "
                           f"the {dist.world} ranks; choose a batch that is a multiple of the GPU count")
    local_batch = tr.global_batch // dist.world
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    if tr.steps == 0:  # evaluation of train.init_from's weights only: no training data needed
        n, C, H, W = 0, run.data.channels, run.data.input_size, run.data.input_size
    else:
        if dist.main:  # build the latent cache once; the other ranks then open it
            load_training_arrays(run)
        barrier(dist)
        latents, labels = load_training_arrays(run)
        n, _, C, H, W = latents.shape
    seed_everything(derive_seed(run.seed, 0))
    model = build_model(run.model, run.conditioning, input_size=H, in_channels=C,
                        num_classes=run.data.num_classes, class_dropout_prob=tr.class_dropout).to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=tr.lr, weight_decay=tr.weight_decay,
                            **({"fused": True} if device.type == "cuda" else {}))

    # resume: rank 0 picks the newest valid checkpoint (quarantining bad ones); all ranks load it
    step, data_pos = 0, 0
    found = ckpt.load_latest_valid(ckpt_dir) if dist.main else None
    path_box = [str(found[1]) if found else None]
    if dist.world > 1:
        torch.distributed.broadcast_object_list(path_box, src=0)
    if path_box[0] is not None:
        state = found[0] if found else ckpt.load_checkpoint(path_box[0])
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        step, data_pos = int(state["step"]), int(state["data_pos"])
        if dist.world == 1:
            set_rng_state(state["rng"])
        else:
            seed_everything(derive_seed(run.seed, dist.rank, step))
        log.info("resumed %s at step %d", path_box[0], step)
        del state, found
    else:
        seed_everything(derive_seed(run.seed, dist.rank))
        if tr.init_from:
            from harness.interop import init_from_source

            init_from_source(run, model, ema)

    # run pending evaluations of retained checkpoints (preempted mid-eval, or settings added)
    if dist.main:
        pending_evals(run, run_dir, ema, device, upto=step, current=step)
    barrier(dist)
    if step >= tr.steps:
        if dist.main:
            _write_done(run_dir, step)
        return

    model.grad_checkpointing = bool(tr.grad_checkpointing)
    model.train()
    train_model: torch.nn.Module = model
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if tr.compile:
        train_model = torch.compile(train_model)
    diffusion = create_diffusion(None)
    order = DataOrder(n, run.seed)
    amp = (torch.autocast(device.type, dtype=torch.bfloat16) if tr.precision == "bf16" else nullcontext())
    gen = torch.Generator(device=device)
    lo, hi = dist.rank * local_batch, (dist.rank + 1) * local_batch
    ckpt_steps = set(int(s) for s in ev.at_steps)
    sums = torch.zeros(3, device=device, dtype=torch.float64)
    bad = torch.full((), _NO_BAD, device=device, dtype=torch.long)
    count, t_log, wall0 = 0, time.perf_counter(), time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    step_delay = float(os.environ.get(STEP_DELAY_ENV) or 0)
    while step < tr.steps:
        s = step + 1
        if step_delay:
            time.sleep(step_delay)
        idx, flip = order.take(data_pos, tr.global_batch)
        idx, flip = idx[lo:hi], flip[lo:hi]
        if not run.data.flip:
            flip = np.zeros_like(flip)
        sel = np.argsort(idx, kind="stable")  # memmap reads in file order
        x_np = np.empty((local_batch, C, H, W), np.float32)
        x_np[sel] = latents[idx[sel], flip[sel]]
        x0 = torch.from_numpy(x_np).to(device, non_blocking=True)
        y = torch.from_numpy(np.asarray(labels[idx], np.int64)).to(device)
        gen.manual_seed(derive_seed(run.seed, _TAG_STEP, s))
        t = sample_timesteps(tr.global_batch, diffusion.num_timesteps, device, gen)[lo:hi]
        noise = torch.randn((tr.global_batch, C, H, W), generator=gen, device=device)[lo:hi]
        drop = (torch.rand(tr.global_batch, generator=gen, device=device) < tr.class_dropout)[lo:hi]
        for group in opt.param_groups:
            group["lr"] = _lr_at(s, tr.lr, tr.warmup_steps)
        with amp:
            losses = diffusion.training_losses(train_model, x0, t, {"y": y, "force_drop": drop}, noise=noise)
        loss = losses["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema_update(ema, model, tr.ema_decay)
        step, data_pos = s, data_pos + tr.global_batch
        with torch.no_grad():
            parts = torch.stack([loss.detach(), losses["mse"].detach().mean(), losses["vb"].detach().mean()])
            sums += parts.double()
            bad = torch.where((bad == _NO_BAD) & ~torch.isfinite(parts).all(), torch.full_like(bad, s), bad)
        count += 1

        is_ckpt = s % tr.ckpt_every == 0 or s in ckpt_steps or s == tr.steps or s == stop_at
        if s % tr.log_every == 0 or is_ckpt:
            _check_finite(bad, dist, run_dir)
        if s % tr.log_every == 0 or s == tr.steps:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            now = time.perf_counter()
            tot = all_reduce(sums.clone(), dist) / (count * dist.world)
            sps = count / max(now - t_log, 1e-9)
            if dist.main:
                append_jsonl(run_dir / "train.jsonl", {
                    "step": s, "loss": tot[0].item(), "mse": tot[1].item(), "vb": tot[2].item(),
                    "lr": opt.param_groups[0]["lr"], "steps_per_s": sps, "images_per_s": sps * tr.global_batch,
                    "peak_mem_mb": peak_mem_mb(device), "wall_s": now - wall0, "time": time.time()})
                log.info("step %d loss %.4f (%.2f steps/s)", s, tot[0].item(), sps)
            sums.zero_()
            count, t_log = 0, time.perf_counter()
        if is_ckpt:
            if dist.main:
                ckpt.save_checkpoint(ckpt_dir, s, {
                    "model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                    "step": s, "rng": rng_state(), "data_pos": data_pos, "run": _spec_dict(run),
                    "world_size": dist.world})
                ckpt.apply_retention(ckpt_dir, tr.keep_last, ckpt_steps)
                save_grid(run, run_dir, ema, device, s)
                if s in ckpt_steps:
                    evaluate_step(run, run_dir, ema, device, s)
            barrier(dist)
            t_log = time.perf_counter()  # checkpoint/eval time is not training throughput
        if stop_at is not None and s >= stop_at:
            log.info("stopping at step %d as asked (stop_at)", s)
            return
    if dist.main:
        _write_done(run_dir, step)


def _write_done(run_dir: Path, step: int) -> None:
    if not (run_dir / "done").exists():
        atomic_write_json(run_dir / "done", {"step": step, "time": time.time()})


# ----------------------------------------------------------------------------- CLI
def cli_train(args: Any) -> int:
    """`harness train`: train from RUN_DIR/run.json (or --config), or a standalone run from --model."""
    import json

    from harness.spec import RunSpec

    run_dir = Path(args.run_dir)
    config = Path(args.config) if args.config else run_dir / "run.json"
    overrides = {k: getattr(args, k) for k in ("steps", "batch", "lr", "precision") if getattr(args, k, None)}
    if config.exists():
        try:
            run = RunSpec.from_dict(json.loads(config.read_text()))
        except (OSError, ValueError, TypeError, KeyError) as err:
            raise HarnessError(f"{config}: not a valid run.json ({err}); regenerate it with `harness sweep` "
                               "or start a standalone run with --model") from err
        if overrides or args.compile:
            raise HarnessError(f"{config} exists: --steps/--batch/--lr/--precision/--compile only apply to a new "
                               "standalone run; edit the sweep spec instead or use a new --run-dir")
    elif args.model:
        run = _standalone_run(args)
    else:
        raise HarnessError(f"{config} not found: pass --model for a standalone run, or --config RUN.json")
    run_training(run, run_dir)
    return 0


def _standalone_run(args: Any) -> Any:
    """A RunSpec from the spec defaults and the CLI arguments (sweep name 'standalone')."""
    from harness.spec import DataSpec, EvalSpec, RunSpec, TrainSpec, make_run_id

    data = DataSpec()
    if args.data != "digits":
        data = DataSpec(dataset="imagefolder", path=args.data, image_size=args.image_size or 256,
                        autoencoder=args.autoencoder or "sd-vae-ft-ema", num_classes=1000)
    elif args.image_size or args.autoencoder:
        data = DataSpec(image_size=args.image_size or data.image_size,
                        autoencoder=args.autoencoder or data.autoencoder)
    train = TrainSpec()
    for key, attr in (("steps", "steps"), ("global_batch", "batch"), ("lr", "lr"), ("precision", "precision")):
        if getattr(args, attr, None) is not None:
            setattr(train, key, getattr(args, attr))
    train.compile = bool(args.compile)
    ev = EvalSpec(at_steps=[train.steps])
    run_id = make_run_id(args.model, args.conditioning, args.seed, data, train)
    return RunSpec(run_id=run_id, sweep="standalone", model=args.model, conditioning=args.conditioning,
                   seed=args.seed, data=data, train=train, eval=ev)
