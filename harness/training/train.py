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

import datetime as _dt
import logging
import os
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from harness.models import checkpoint as ckpt
from harness.models import flops
from harness.errors import HarnessError
from harness.training.evaluator import evaluate_step, pending_evals, save_grid
from harness.io import append_jsonl, atomic_write_json, file_lock, read_jsonl
from harness.config.layout import RunFolder, write_run_json
from harness.training.runtime import (Dist, all_reduce, barrier, bounded_barrier, derive_seed, peak_mem_mb, rng_state,
                             distributed, seed_everything, set_rng_state)
from harness.config.arguments import positive_int
from harness.config.registry import CONDITIONINGS
from harness.config.spec import (AUTOENCODERS, PRECISIONS, RunSpec, DataSpec, EvalSpec, TrainSpec, make_run_id,
                                 override_sections)
from harness.data.autoencoder import build_latent_cache, load_autoencoder
from harness.interop.convert import init_from_source
from harness.models.diffusion import sample_timesteps, create_diffusion
from harness.models.runmodel import build_run_model
from harness.sampling import npz
from harness.training.assemble import StepSettings, build_step, enable_tf32, fresh_state
from harness.training.runtime import peak_tflops, train_tflops
from harness.training.step import BatchGeometry, attention_backends, Batch, compiled_graphs

log = logging.getLogger(__name__)

_TAG_EPOCH, _TAG_STEP = 1, 2  # seed tags; evaluation uses harness.training.evaluation.TAG_EVAL
#: test hook: sleep this many seconds before each step, so tests that kill or requeue a job
#: mid-training do not race a tiny model that trains in a second or two.
STEP_DELAY_ENV = "HARNESS_TEST_STEP_DELAY_S"
#: how long other ranks wait for rank 0 to build a missing latent cache inside a training job
LATENT_BUILD_TIMEOUT = _dt.timedelta(hours=float(os.environ.get("HARNESS_LATENT_BUILD_TIMEOUT_H", "24")))


# ----------------------------------------------------------------------------- determinism
class DataOrder:
    """Global sample positions -> (dataset index, flip). Epoch e is a permutation and a flip draw
    seeded by (seed, e), so a position is a pure function of (seed, epoch, offset)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def epoch(self, e: int) -> tuple[np.ndarray, np.ndarray]:
        if e not in self._cache:
            g = torch.Generator().manual_seed(derive_seed(self.seed, e, tag=_TAG_EPOCH))
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
def load_training_arrays(run: RunSpec) -> tuple[np.ndarray, np.ndarray]:
    """The run's training set from the latent cache: latents (N, 2, C, h, w) (index 1 = flipped)
    and labels (N,). Built on first use (identity autoencoder on digits: pixels in [-1, 1])."""
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


# ----------------------------------------------------------------------------- data
class BatchSource:
    """Global batches in the run's data order: rank `dist.rank`'s slice of step s's global batch,
    as x0 (B, C, H, W) and y (B,) on the device. The next step's batch is read from the memmapped
    cache in a background thread (pinned memory, non-blocking copy on CUDA) while this one trains."""

    def __init__(self, latents: np.ndarray, labels: np.ndarray, order: DataOrder, geometry: BatchGeometry,
                 dist: Dist, flip: bool):
        from concurrent.futures import ThreadPoolExecutor

        self.latents, self.labels, self.order, self.global_batch = latents, labels, order, geometry.global_batch
        self.per_rank = geometry.per_rank
        self.lo, self.device, self.flip = geometry.rows(dist.rank)[0], dist.device, flip
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="batches")
        self._next: tuple[int, Any] | None = None

    def _read(self, data_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx, flip = self.order.take(data_pos, self.global_batch)
        idx, flip = idx[self.lo:self.lo + self.per_rank], flip[self.lo:self.lo + self.per_rank]
        if not self.flip:
            flip = np.zeros_like(flip)
        sel = np.argsort(idx, kind="stable")  # memmap reads in file order
        _, _, C, H, W = self.latents.shape
        x = torch.empty((self.per_rank, C, H, W), dtype=torch.float32,
                        pin_memory=self.device.type == "cuda")
        x.numpy()[sel] = self.latents[idx[sel], flip[sel]]
        return x, torch.from_numpy(np.asarray(self.labels[idx], np.int64))

    def get(self, data_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch at global data position `data_pos`; starts reading the one after it."""
        if self._next is not None and self._next[0] == data_pos:
            x, y = self._next[1].result()
        else:
            x, y = self._read(data_pos)
        nxt = data_pos + self.global_batch
        self._next = (nxt, self._pool.submit(self._read, nxt))
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def step_randomness(seed: int, step: int, global_batch: int, num_timesteps: int, shape: tuple[int, int, int],
                    class_dropout: float, gen: torch.Generator, lo: int, hi: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Timesteps (B,), noise (B, C, H, W) and label drops (B,) of rows lo:hi of step `step`'s global
    batch: drawn for the whole global batch from a generator seeded by (seed, step), so they do not
    depend on the number of ranks or on the micro-batch."""
    device = gen.device
    gen.manual_seed(derive_seed(seed, step, tag=_TAG_STEP))
    t = sample_timesteps(global_batch, num_timesteps, device, gen)[lo:hi]
    noise = torch.randn((global_batch, *shape), generator=gen, device=device)[lo:hi]
    drop = (torch.rand(global_batch, generator=gen, device=device) < class_dropout)[lo:hi]
    return t, noise, drop


# ----------------------------------------------------------------------------- the loop
def run_training(run: RunSpec, run_dir: str | Path, *, stop_at: int | None = None) -> None:
    """Train `run` (a RunSpec) in `run_dir`, resuming from the newest valid checkpoint.

    `stop_at`: stop (after checkpointing) once this step is reached, as a preemption would; the
    next call continues. Safe to call repeatedly; writes `run_dir/done` at the end.
    """
    run_dir = Path(run_dir)
    with distributed() as dist:
        # one trainer per run folder: a sweep job and a stray `harness train`, or an orphaned job of
        # a killed sweep and its replacement, never write the same checkpoints at once
        with file_lock(RunFolder(run_dir).lock) if dist.rank == 0 else nullcontext():
            trainer = Trainer(run, run_dir, dist)
            try:
                trainer.train(stop_at)
            finally:
                trainer.close()


class Trainer:
    """One run's training, in named steps: build -> resume -> (step -> log -> checkpoint -> evaluate)*."""

    def __init__(self, run: RunSpec, run_dir: Path, dist: Dist):
        self.run, self.run_dir, self.dist, self.device = run, run_dir, dist, dist.device
        self.folder = RunFolder(run_dir)
        self.ckpt_dir = self.folder.checkpoints
        self.step, self.data_pos = 0, 0
        self.source: BatchSource | None = None
        self.build()

    # -- build: data, model, EMA, optimizer ------------------------------------------------
    def build(self) -> None:
        run, tr, dist = self.run, self.run.train, self.dist
        self.geometry = BatchGeometry.of(tr.global_batch, dist.world, tr.micro_batch, source=f"{self.run_dir}/run.json: ")
        if dist.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if not self.folder.run_json.exists():  # a standalone `harness train`: the sweep's writer
                write_run_json(run, self.run_dir, *flops.model_gflops(run.model, run.conditioning, run.data.input_size,
                                                                 run.data.channels, run.data.num_classes))
            ckpt.clean_partial_writes(self.ckpt_dir)
            npz.clean_partial_writes(self.folder.samples)  # a killed evaluation's (up to 9.8 GB each)
        enable_tf32(self.device)
        if tr.steps == 0:  # evaluation of train.init_from's weights only: no training data needed
            self.latents = self.labels = None
            n, C, H, W = 0, run.data.channels, run.data.input_size, run.data.input_size
        else:
            if dist.main:  # build the latent cache once (if the latent stage has not); the others open it
                load_training_arrays(run)
            # a sweep's latent stage built the cache already; a run started by hand on an unbuilt cache
            # waits here while rank 0 encodes (`harness latents --tasks N` first uses every GPU)
            bounded_barrier(dist, "waiting for rank 0 to build the latent cache", LATENT_BUILD_TIMEOUT)
            self.latents, self.labels = load_training_arrays(run)
            n, _, C, H, W = self.latents.shape
        self.shape = (C, H, W)
        seed_everything(derive_seed(run.seed, 0))
        self.model = build_run_model(run, self.device)
        self.ema, self.opt = fresh_state(self.model, tr.lr, tr.weight_decay)
        self.diffusion = create_diffusion(None)
        self.order = DataOrder(n, run.seed)

    # -- resume: the newest valid checkpoint, and the evaluations it still owes ----------------
    def resume(self) -> None:
        dist, run = self.dist, self.run
        found = ckpt.load_latest_valid(self.ckpt_dir) if dist.main else None
        path_box = [str(found[1]) if found else None]
        if dist.world > 1:
            torch.distributed.broadcast_object_list(path_box, src=0)
        if path_box[0] is not None:
            state = found[0] if found else ckpt.load_checkpoint(path_box[0])
            self.step, self.data_pos = int(state["step"]), int(state["data_pos"])
            if "opt" not in state and self.step < run.train.steps:  # every rank raises: no rank waits
                raise HarnessError(_slim_resume_error(path_box[0], self.step))
            self.model.load_state_dict(state["model"])
            self.ema.load_state_dict(state["ema"])
            if "opt" in state:  # a slim one trains no further: evaluation (checkpoints_from) or a finished run
                self.opt.load_state_dict(state["opt"])
            if dist.world == 1:
                set_rng_state(state["rng"])
            else:
                seed_everything(derive_seed(run.seed, dist.rank, self.step))
            log.info("resumed %s at step %d", path_box[0], self.step)
        else:
            seed_everything(derive_seed(run.seed, dist.rank))
            if run.train.init_from:  # weights only: a fresh optimizer
                init_from_source(run, self.model, self.ema)
        # finish a slimming a crash cut short (before pending_evals, whose ranks read these checkpoints); a
        # checkpoints_from run's checkpoints are links to another run's, left as they are
        if dist.main and run.train.keep_optimizer == "newest" and not run.checkpoints_from:
            ckpt.slim_old_checkpoints(self.ckpt_dir, run.train.keep_last, run.eval.at_steps)
        # run pending evaluations of retained checkpoints (preempted mid-eval, or settings added)
        pending_evals(run, self.run_dir, self.ema, dist, upto=self.step, current=self.step)  # every rank samples
        barrier(dist)

    # -- the step machinery: micro-batch, compilation ------------------------------------------
    def prepare_step(self) -> None:
        run, tr = self.run, self.run.train
        self.model.grad_checkpointing = bool(tr.grad_checkpointing)
        self.model.train()
        self.train_step, self.geometry = build_step(StepSettings.of_run(run, self.shape), self.model, self.ema,
                                                    self.opt, self.diffusion, self.dist, self.geometry)
        self.gflops = _model_gflops(run, self.shape) if self.dist.main else None
        log.info("training %s: %s, %s, %s, attention: %s", run.run_id, self.geometry, tr.precision,
                 f"compiled ({tr.compile_mode})" if self.train_step.compiled else "eager",
                 attention_backends(self.device, tr.precision))

    # -- train ------------------------------------------------------------------------------
    def train(self, stop_at: int | None) -> None:
        run, tr, dist = self.run, self.run.train, self.dist
        self.resume()
        if self.step >= tr.steps:
            if dist.main:
                _write_done(self.run_dir, self.step)
            return
        self.prepare_step()
        # steps a resume redoes (between its checkpoint and the crash) are in train.jsonl already:
        # bitwise the same steps, so their first record stands and each step appears once
        self.logged = max((int(r.get("step", 0)) for r in read_jsonl(self.folder.train_log)), default=0) \
            if dist.main else 0
        self.source = BatchSource(self.latents, self.labels, self.order, self.geometry, dist, run.data.flip)
        gen = torch.Generator(device=self.device)
        lo, hi = self.geometry.rows(dist.rank)
        ckpt_steps = set(int(s) for s in run.eval.at_steps)
        self.sums = torch.zeros(3, device=self.device, dtype=torch.float64)
        self.bad = torch.full((), _NO_BAD, device=self.device, dtype=torch.long)
        self.count, self.t_log, self.wall0 = 0, time.perf_counter(), time.perf_counter()
        self.ckpt_clock = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        step_delay = float(os.environ.get(STEP_DELAY_ENV) or 0)
        while self.step < tr.steps:
            s = self.step + 1
            if step_delay:
                time.sleep(step_delay)
            x0, y = self.source.get(self.data_pos)
            t, noise, drop = step_randomness(run.seed, s, tr.global_batch, self.diffusion.num_timesteps,
                                             self.shape, tr.class_dropout, gen, lo, hi)
            sums = self.train_step(Batch(x0, y, t, noise, drop), _lr_at(s, tr.lr, tr.warmup_steps))
            self.step, self.data_pos = s, self.data_pos + tr.global_batch
            self.record(s, sums)
            is_ckpt = s % tr.ckpt_every == 0 or s in ckpt_steps or s == tr.steps or s == stop_at
            timed = not is_ckpt and s % tr.log_every == 0 and self.checkpoint_due()
            if s % tr.log_every == 0 or is_ckpt:
                _check_finite(self.bad, dist, self.run_dir)
            if s % tr.log_every == 0 or s == tr.steps:
                self.log(s)
            if is_ckpt or timed:
                self.checkpoint(s, ckpt_steps)
                if is_ckpt:
                    self.evaluate(s, ckpt_steps)
                self.t_log = time.perf_counter()  # checkpoint/eval time is not training throughput
                self.ckpt_clock = time.perf_counter()   # nor training time since the last checkpoint
            if stop_at is not None and s >= stop_at:
                log.info("stopping at step %d as asked (stop_at)", s)
                return
        if dist.main:
            _write_done(self.run_dir, self.step)

    def record(self, s: int, sums: torch.Tensor) -> None:
        """Accumulate the step's loss sums on the device, and the first non-finite step (no sync)."""
        with torch.no_grad():
            self.sums += sums / self.geometry.per_rank
            self.bad = torch.where((self.bad == _NO_BAD) & ~torch.isfinite(sums).all(),
                                   torch.full_like(self.bad, s), self.bad)
        self.count += 1

    # -- log: one train.jsonl line (the only host sync of the loop) ---------------------------
    def log(self, s: int) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        tot = all_reduce(self.sums.clone(), self.dist) / (self.count * self.dist.world)
        sps = self.count / max(now - self.t_log, 1e-9)
        if self.dist.main and s <= self.logged:
            log.info("step %d loss %.4f (redone after the resume; train.jsonl has it already)", s, tot[0].item())
        elif self.dist.main:
            tr = self.run.train
            images = sps * tr.global_batch
            tflops = train_tflops(self.gflops, images / self.dist.world) if self.gflops else None
            peak = peak_tflops(self.device, tr.precision)
            append_jsonl(self.folder.train_log, {
                "step": s, "loss": tot[0].item(), "mse": tot[1].item(), "vb": tot[2].item(),
                "lr": self.opt.param_groups[0]["lr"], "steps_per_s": sps, "images_per_s": images,
                "tflops_per_device": tflops, "mfu": (tflops / peak) if (tflops and peak) else None,
                "micro_batch": self.train_step.micro_batch, "compiled": self.train_step.compiled,
                "compile_mode": self.train_step.compile_mode if self.train_step.compiled else None,
                "graphs": compiled_graphs() if self.train_step.compiled else None,
                "peak_mem_mb": peak_mem_mb(self.device), "wall_s": now - self.wall0, "time": time.time()})
            log.info("step %d loss %.4f (%.2f steps/s)", s, tot[0].item(), sps)
        self.sums.zero_()
        self.count, self.t_log = 0, time.perf_counter()

    # -- checkpoint and evaluate ------------------------------------------------------------
    def checkpoint_due(self) -> bool:
        """train.ckpt_every_minutes of training since the last checkpoint (or the start) on any rank. Asked at log steps
        only, which every rank reaches together: with several ranks the answer is one all-reduce, so all agree."""
        minutes = self.run.train.ckpt_every_minutes
        if not minutes:
            return False
        due = time.perf_counter() - self.ckpt_clock >= 60.0 * minutes
        if self.dist.world > 1:
            due = all_reduce(torch.tensor([float(due)], device=self.device), self.dist).item() > 0
        if due:
            log.info("checkpoint after %.0f minutes of training (train.ckpt_every_minutes %g)",
                     (time.perf_counter() - self.ckpt_clock) / 60.0, minutes)
        return due

    def checkpoint(self, s: int, ckpt_steps: set[int]) -> None:
        if self.dist.main:
            ckpt.save_checkpoint(self.ckpt_dir, s, {
                "model": self.model.state_dict(), "ema": self.ema.state_dict(), "opt": self.opt.state_dict(),
                "step": s, "rng": rng_state(), "data_pos": self.data_pos, "run": self.run.to_dict(),
                "world_size": self.dist.world})
            ckpt.apply_retention(self.ckpt_dir, self.run.train.keep_last, ckpt_steps, self.run.train.keep_optimizer)

    def evaluate(self, s: int, ckpt_steps: set[int]) -> None:
        save_grid(self.run, self.run_dir, self.ema, self.dist, s)  # rank 0 only
        if s in ckpt_steps:
            evaluate_step(self.run, self.run_dir, self.ema, self.dist, s)  # every rank samples its share
        barrier(self.dist)

    def close(self) -> None:
        if self.source is not None:
            self.source.close()


def _slim_resume_error(path: str, step: int) -> str:
    """Why a run cannot go on from a slim checkpoint, and the fixes, in one line."""
    return (f"{path}: the newest valid checkpoint is slim (train.keep_optimizer: newest dropped its optimizer "
            f"state), so training cannot resume exactly from step {step}. Fix: put back a whole checkpoint of a "
            "later step (invalid ones were renamed *.corrupt), or move the run folder aside and run the sweep "
            "again to train the run anew; its weights and EMA still serve evaluation, `harness sample` and export.")


def _model_gflops(run: RunSpec, shape: tuple[int, int, int]) -> float | None:
    """The model's forward Gflops per image (fvcore, cached), for TFLOP/s and MFU in train.jsonl."""
    try:
        return flops.model_gflops(run.model, run.conditioning, shape[1], shape[0], run.data.num_classes)[0]
    except Exception as err:  # noqa: BLE001 - throughput bookkeeping must never stop training
        log.warning("no Gflops for %s (%s): train.jsonl records no TFLOP/s", run.model, err)
        return None


def _write_done(run_dir: Path, step: int) -> None:
    done = RunFolder(run_dir).done
    if not done.exists():
        atomic_write_json(done, {"step": step, "time": time.time()})


# ----------------------------------------------------------------------------- CLI
def add_train_arguments(s) -> None:
    s.add_argument("--run-dir", required=True, help="run folder; resumes from its newest checkpoint")
    s.add_argument("--config", default=None, help="run.json to train from (default: RUN_DIR/run.json)")
    s.add_argument("--model", default=None, help="standalone: model name (writes RUN_DIR/run.json)")
    s.add_argument("--conditioning", default="adaLN-Zero", choices=CONDITIONINGS)
    s.add_argument("--data", default="digits")
    s.add_argument("--image-size", type=positive_int, default=None)
    s.add_argument("--autoencoder", default=None, choices=AUTOENCODERS)
    s.add_argument("--steps", type=positive_int, default=None)
    s.add_argument("--batch", type=positive_int, default=None, help="global batch")
    s.add_argument("--lr", type=float, default=None)
    s.add_argument("--precision", choices=PRECISIONS, default=None)
    s.add_argument("--compile", action="store_true")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="standalone: data/train/eval values, e.g. train.lr=2e-4 train.warmup_steps=100")


def cli_train(args: Any) -> int:
    """`harness train`: train from RUN_DIR/run.json (or --config), or a standalone run from --model."""
    import json

    run_dir = Path(args.run_dir)
    config = Path(args.config) if args.config else run_dir / "run.json"
    overrides = {k: getattr(args, k) for k in ("steps", "batch", "lr", "precision") if getattr(args, k)}
    if config.exists():
        try:
            run = RunSpec.from_dict(json.loads(config.read_text()), config)
        except (OSError, ValueError, TypeError, KeyError) as err:
            raise HarnessError(f"{config}: not a valid run.json ({err}); regenerate it with `harness sweep` "
                               "or start a standalone run with --model") from err
        if overrides or args.compile or args.overrides:
            raise HarnessError(f"{config} exists: --steps/--batch/--lr/--precision/--compile and KEY=VALUE only "
                               "apply to a new standalone run; edit the sweep spec instead or use a new --run-dir")
    elif args.model:
        run = _standalone_run(args)
    else:
        raise HarnessError(f"{config} not found: pass --model for a standalone run, or --config RUN.json")
    run_training(run, run_dir)
    return 0


def _standalone_run(args: Any) -> RunSpec:
    """A RunSpec from the spec defaults and the CLI arguments (sweep name 'standalone')."""
    data = DataSpec()
    if args.data != "digits":
        data = DataSpec(dataset="imagefolder", path=args.data, image_size=args.image_size or 256,
                        autoencoder=args.autoencoder or "sd-vae-ft-ema", num_classes=1000)
    elif args.image_size or args.autoencoder:
        data = DataSpec(image_size=args.image_size or data.image_size,
                        autoencoder=args.autoencoder or data.autoencoder)
    train = TrainSpec()
    for key, attr in (("steps", "steps"), ("global_batch", "batch"), ("lr", "lr"), ("precision", "precision")):
        if getattr(args, attr) is not None:
            setattr(train, key, getattr(args, attr))
    train.compile = True if args.compile else "auto"
    ev = EvalSpec(at_steps=[train.steps])
    if args.overrides:  # validated like a spec file's sections; the run id follows what they change
        data, train, ev = override_sections(args.overrides, data, train, ev, "harness train")
    run_id = make_run_id(args.model, args.conditioning, args.seed, data, train)
    return RunSpec(run_id=run_id, sweep="standalone", model=args.model, conditioning=args.conditioning,
                   seed=args.seed, data=data, train=train, eval=ev)
