"""The sweep spec: one YAML file -> a validated `SweepSpec` -> a list of `RunSpec`, one per run.

Schema (every key optional unless marked; defaults are the dataclass defaults below)::

    name: mini                 # results/<name>/, reports/<name>/ (default: the file's stem)
    description: "..."
    models: [DiT-S/2, DiT-4x64x2/2]     # required: names (the paper's 12 or custom
                                        # DiT-<depth>x<hidden>x<heads>/<patch>), or a grid
                                        # {sizes: [S, B, L, XL], patches: [8, 4, 2]}
    conditioning: [adaLN-Zero] # in-context | cross-attention | adaLN | adaLN-Zero
    ablation: {models: [DiT-4x64x2/2], conditioning: [in-context, cross-attention, adaLN]}
                               # optional: more blocks on some of the models (the paper's ablation)
    seeds: [0]
    checkpoints_from: null     # name of another sweep whose final checkpoints this sweep evaluates
    data: {...}     train: {...}     eval: {...}     launcher: {...}   # see the dataclasses

Runs are the cross product models x conditioning x seeds. Each run's `run_id` is readable and stable,
e.g. "DiT-S-2_adaLN-Zero_s0_3f9a1c": the prefix names model, block and seed, the suffix hashes the
normalised training identity -- model, conditioning, seed, the data keys that change the pixels
(dataset, image_size, autoencoder, num_classes, flip) and the train keys that change the maths (global_batch,
lr, weight_decay, warmup_steps, ema_decay, class_dropout, precision, init_from: the sha256 of its file's
bytes). Deliberately excluded: the launcher, eval, file locations (data.path, data.autoencoder_path:
moving the data keeps the ids), bookkeeping (ckpt_every, ckpt_every_minutes, keep_last, keep_optimizer,
log_every, compile, compile_mode, micro_batch, grad_checkpointing) and train.steps (raising the step count
continues the same runs instead of starting new ones).
`train.init_from` (weights to start from) enters the identity as that hash, so moving or renaming the
file keeps the ids, changing its weights makes new runs; absent, ids are unchanged.

`checkpoints_from: gflops` (the sampling study): the sweep trains nothing; each of its runs evaluates
the checkpoints of the run with the same `run_id` in results/gflops/runs/<run_id>/. Because run ids
exclude eval, the sampling sweep copies the gflops sweep's models, data and train blocks and changes
only eval. When the named sweep's file sits next to this one (sweeps/gflops.yaml) `load_spec`
checks that every run id exists there.

Validation happens before anything runs: unknown keys (with a did-you-mean), wrong types, unknown
models or blocks, sizes that don't divide, empty lists, non-positive counts, duplicate YAML keys,
eval steps beyond train.steps, NaN or inf, numbers beyond their range. Every error is a HarnessError
"FILE:LINE: KEY: problem. Fix: ...". Every number has a finite range that follows from what it means
(the table at the end of this docstring, with each reason; the one home is harness/config/limits.py), and
each model must fit two geometric bounds: at most 4,096 tokens per image ((input side / patch)^2,
a 64x64 grid: 1024 px through the VAE at patch 2; attention grows as its square) and about 5e9
parameters (20 bytes each in training, held on every GPU by DDP: 100 GB of a 141 GB H200).
YAML is read by `harness.config.specfile`: a SafeLoader that also accepts `1e-4` as a float (YAML 1.1 would
read a string), within stated bounds (64 KiB, 16 levels, 10,000 values after alias expansion); a sweep
expands to at most MAX_RUNS runs.
`${VAR}` in data.path, data.autoencoder_path, eval.reference and eval.inception_weights is expanded
from the environment when a run starts (`DataSpec.resolved_path()`), not at load time.
"""
from __future__ import annotations

import copy
import difflib
import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from harness import hardware
from harness.config import limits as L
from harness.errors import HarnessError
from harness.io import path_digest
from harness.config.spec_checks import check_sweep, split_shape_error
from harness.config.specfile import Where, apply_overrides, check_keys, check_value, read_yaml, section, typename
from harness.config.registry import CONDITIONINGS, SIZES, VAE_CHANNELS, VAE_DOWNSAMPLE, VARIANTS, resolve_shape
from harness.config.vocab import COMPILE_MODES, FEATURE_SPACES, METRICS, SAMPLERS

DATASETS = ("digits", "imagefolder")
AUTOENCODERS = ("identity", "sd-vae-ft-ema", "sd-vae-ft-mse")
PRECISIONS = ("fp32", "bf16")
LAUNCHERS = ("slurm", "local", "debug")
#: which evaluation npz files a run keeps (eval.keep_samples; harness.training.evaluation applies it)
KEEP_SAMPLES = ("all", "last", "none")
#: which retained checkpoints keep AdamW's state (train.keep_optimizer; harness.models.checkpoint applies it)
KEEP_OPTIMIZER = ("newest", "all")
#: the most runs one sweep may expand to (a bound, so a typo cannot plan a million runs)
MAX_RUNS = L.MAX_RUNS
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


# --------------------------------------------------------------------------- the dataclasses
def _opt(default: Any, **meta: Any) -> Any:
    """A field with a default and validation metadata (choices, min, gt, nonempty, ...)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DataSpec:
    dataset: str = _opt("digits", kind=str, choices=DATASETS)
    path: str | None = _opt(None, kind=str, nullable=True)
    image_size: int = _opt(8, kind=int, min=1, **L.IMAGE_SIZE)
    autoencoder: str = _opt("identity", kind=str, choices=AUTOENCODERS)
    autoencoder_path: str | None = _opt(None, kind=str, nullable=True)
    num_classes: int = _opt(10, kind=int, min=1, **L.NUM_CLASSES)
    flip: bool = _opt(True, kind=bool)  # random horizontal flips (the paper's only augmentation);
    #                                     off for data that is not mirror-symmetric, such as digits

    @property
    def channels(self) -> int:
        """Channels the DiT sees: 4 through an SD VAE, else the images' own (1 digits, 3 RGB)."""
        if self.autoencoder != "identity":
            return VAE_CHANNELS
        return 1 if self.dataset == "digits" else 3

    @property
    def input_size(self) -> int:
        """Side of the DiT's input: image_size / 8 through an SD VAE, else image_size."""
        return self.image_size // VAE_DOWNSAMPLE if self.autoencoder != "identity" else self.image_size

    def resolved_path(self) -> str | None:
        """data.path with ${VAR} and ~ expanded; HarnessError if a variable is unset."""
        return expand_path(self.path, "data.path")

    def resolved_autoencoder_path(self) -> str | None:
        return expand_path(self.autoencoder_path, "data.autoencoder_path")


@dataclass
class TrainSpec:
    steps: int = _opt(2000, kind=int, min=0, **L.STEPS)  # 0: evaluate train.init_from's weights, train nothing
    global_batch: int = _opt(64, kind=int, min=1, **L.GLOBAL_BATCH)
    lr: float = _opt(1.0e-4, kind=float, gt=0.0, **L.LR)
    weight_decay: float = _opt(0.0, kind=float, min=0.0, **L.WEIGHT_DECAY)
    warmup_steps: int = _opt(0, kind=int, min=0, **L.STEP_COUNT)
    ema_decay: float = _opt(0.9999, kind=float, min=0.0, lt=1.0, why=L.EMA_WHY)
    class_dropout: float = _opt(0.1, kind=float, min=0.0, lt=1.0, why=L.DROPOUT_WHY)
    precision: str = _opt("fp32", kind=str, choices=PRECISIONS)
    compile: bool | str = _opt("auto", kind="auto_bool")  # auto: compiled on CUDA, eager on the CPU
    compile_mode: str = _opt("default", kind=str, choices=COMPILE_MODES)  # torch.compile's mode when compiled
    # per-GPU micro-batch; auto: the largest that fits
    micro_batch: int | str = _opt("auto", kind="auto_int", min=1, **L.MICRO_BATCH)
    grad_checkpointing: bool = _opt(False, kind=bool)
    ckpt_every: int = _opt(500, kind=int, min=1, **L.STEP_COUNT)
    # also a checkpoint after this many minutes of training since the last one (a preempted or failed job loses
    # at most that much); 0: only every ckpt_every steps
    ckpt_every_minutes: float = _opt(30.0, kind=float, min=0.0, **L.CKPT_MINUTES)
    keep_last: int = _opt(2, kind=int, min=1, **L.KEEP_LAST)
    # newest: an evaluated step's checkpoint, once not among the newest keep_last, is rewritten without the
    # optimizer state (weights and EMA: half the bytes; resuming needs only the newest); all: every one kept whole
    keep_optimizer: str = _opt("newest", kind=str, choices=KEEP_OPTIMIZER)
    log_every: int = _opt(50, kind=int, min=1, **L.STEP_COUNT)
    # weights to start from (harness checkpoint, official-layout state dict, diffusers DiT folder); the run id
    # hashes the file's content, not its path; a fresh optimizer. See harness.interop.convert.
    init_from: str | None = _opt(None, kind=str, nullable=True)


@dataclass
class EvalSpec:
    at_steps: list[int] = _opt([2000], kind=list, item=int, min=0, nonempty=True, **L.STEP_COUNT)
    num_samples: int = _opt(1000, kind=int, min=1, **L.NUM_SAMPLES)
    sampling_steps: list[int] = _opt([50], kind=list, item=int, min=1, nonempty=True, **L.SAMPLING_STEPS)
    sampler: str = _opt("ddim", kind=str, choices=tuple(SAMPLERS))
    cfg_scales: list[float] = _opt([1.0], kind=list, item=float, min=1.0, nonempty=True, **L.CFG_SCALE)
    guidance_channels: int | str = _opt(3, kind="guidance")
    metrics: list[str] = _opt(list(METRICS), kind=list, item=str, choices=METRICS, nonempty=True)
    features: str = _opt("digits", kind=str, choices=FEATURE_SPACES)
    reference: str = _opt("digits", kind=str)
    # images per sampling batch (the network sees twice as many under guidance); auto: the largest that fits
    batch_size: int | str = _opt("auto", kind="auto_int", min=1, **L.SAMPLE_BATCH)
    inception_weights: str | None = _opt(None, kind=str, nullable=True)
    # the network's and the decoder's autocast; auto: bf16 on CUDA, fp32 on the CPU (features stay fp32)
    precision: str = _opt("auto", kind=str, choices=("auto",) + PRECISIONS)
    compile: bool | str = _opt("auto", kind="auto_bool")  # auto: compiled on CUDA, eager on the CPU
    compile_mode: str = _opt("default", kind=str, choices=COMPILE_MODES)  # torch.compile's mode when compiled
    # the ADM npz of each setting (FID-50K at 256 px: 9.8 GB): all; last (the highest evaluated step's only, older
    # ones deleted once a later step is recorded); none (never written: the metrics come from features gathered
    # while sampling). The records in eval.jsonl are the same whatever it is.
    keep_samples: str = _opt("all", kind=str, choices=KEEP_SAMPLES)

    def resolved_reference(self) -> str:
        """eval.reference with ${VAR} and ~ expanded ('digits' stays 'digits')."""
        return expand_path(self.reference, "eval.reference")

    def resolved_inception_weights(self) -> str | None:
        return expand_path(self.inception_weights, "eval.inception_weights")


@dataclass
class LauncherSpec:
    kind: str = _opt("local", kind=str, choices=LAUNCHERS)
    partition: str | None = _opt(None, kind=str, nullable=True)
    account: str | None = _opt(None, kind=str, nullable=True)
    qos: str | None = _opt(None, kind=str, nullable=True)
    nodes: int = _opt(1, kind=int, min=1, **L.NODES)
    gpus_per_node: int = _opt(0, kind=int, min=0, **L.GPUS_PER_NODE)
    # training ranks per node; default gpus_per_node (one rank per GPU), or 1 without GPUs
    tasks_per_node: int | None = _opt(None, kind=int, min=1, nullable=True, **L.TASKS_PER_NODE)
    cpus_per_task: int = _opt(2, kind=int, min=1, **L.CPUS_PER_TASK)
    mem_gb: float = _opt(8.0, kind=float, gt=0.0, **L.MEM_GB)
    timeout_min: int = _opt(60, kind=int, min=1, **L.TIMEOUT_MIN)
    array_parallelism: int = _opt(16, kind=int, min=1, **L.ARRAY_PARALLELISM)
    max_concurrent_local: int = _opt(1, kind=int, min=1, **L.MAX_CONCURRENT_LOCAL)
    additional: dict = _opt({}, kind=dict)
    # GPUs of each run's own Slurm job: auto (the allowed counts with the shortest planned makespan, harness.cost.schedule) or a count;
    # gpus_per_model {model name or size letter: GPUs} overrides it; gpu_kind: whose measured speed sizes runs
    gpus_per_run: int | str = _opt("auto", kind="auto_int", min=1, **L.GPUS_PER_RUN,
                                   auto_fix="write auto (the GPU counts with the shortest planned makespan) or a GPU count")
    gpus_per_model: dict = _opt({}, kind=dict)
    gpu_kind: str = _opt(hardware.DEFAULT_GPU, kind=str, choices=tuple(hardware.gpus()))

    @property
    def ranks_per_node(self) -> int:
        """Training processes per node: tasks_per_node, else one per GPU, else 1."""
        return self.tasks_per_node or max(1, self.gpus_per_node)


__doc__ += L.ranges_doc(DataSpec, TrainSpec, EvalSpec, LauncherSpec)

# train keys that do not change the maths, hence not the run id
_TRAIN_ID_EXCLUDED = ("steps", "compile", "compile_mode", "micro_batch", "grad_checkpointing", "ckpt_every",
                      "ckpt_every_minutes", "keep_last", "keep_optimizer", "log_every")
_DATA_ID_EXCLUDED = ("path", "autoencoder_path")


#: keys the planner adds to a run's to_dict() in run.json (harness.config.layout.write_run_json; from_dict ignores them)
RUN_JSON_PLAN_KEYS = ("size", "patch", "depth", "hidden", "heads", "gflops", "params", "input_size", "in_channels")
DEFAULT_CONDITIONING = "adaLN-Zero"  # the block of a sweep or run record that names none
#: keys run.json must have (its identity); a partial record (a checkpoint's: required=("model",)) gets these defaults
RECORD_KEYS = ("run_id", "sweep", "model", "conditioning", "seed", "data", "train", "eval")
_RECORD_DEFAULTS = {"run_id": "?", "sweep": "?", "conditioning": DEFAULT_CONDITIONING, "seed": 0}


@dataclass
class RunSpec:
    """One training run (or, with checkpoints_from, one evaluation of another sweep's run)."""

    run_id: str
    sweep: str
    model: str
    conditioning: str
    seed: int
    data: DataSpec
    train: TrainSpec
    eval: EvalSpec
    checkpoints_from: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str | Path = "run.json", *, required: tuple[str, ...] = RECORD_KEYS
                  ) -> "RunSpec":
        """A run record back from its dict (run.json, a checkpoint's "run"); `where`: the file it came from,
        named in errors. Keys beyond `required` that a record lacks (one written before the key existed)
        take the dataclasses' defaults; a checkpoint's record needs only its model (`required=("model",)`)."""
        known = {f.name for f in fields(cls)}
        extra = set(d) - known - set(RUN_JSON_PLAN_KEYS)
        if extra:
            raise HarnessError(f"{where}: unknown keys {sorted(extra)}. Fix: regenerate it with `harness sweep`.")
        try:
            for key in (k for k in required if k not in d):
                raise KeyError(key)
            d = {**_RECORD_DEFAULTS, **d}
            return cls(
                run_id=d["run_id"], sweep=d["sweep"], model=d["model"], conditioning=d["conditioning"],
                seed=int(d["seed"]), data=DataSpec(**d.get("data") or {}), train=TrainSpec(**d.get("train") or {}),
                eval=EvalSpec(**d.get("eval") or {}), checkpoints_from=d.get("checkpoints_from"))
        except (KeyError, TypeError, ValueError) as err:
            raise HarnessError(f"{where}: malformed run record ({err}). Fix: regenerate it with `harness sweep`.")

    @property
    def shape(self):
        """The model's ModelShape (depth, hidden, heads, patch)."""
        return resolve_shape(self.model)

    def identity(self) -> dict:
        """The normalised configuration the run id hashes."""
        return run_identity(self.model, self.conditioning, self.seed, self.data, self.train)


@dataclass
class SweepSpec:
    name: str
    path: Path
    models: list[str]
    description: str = ""
    conditioning: list[str] = field(default_factory=lambda: [DEFAULT_CONDITIONING])
    seeds: list[int] = field(default_factory=lambda: [0])
    checkpoints_from: str | None = None
    # the conditioning ablation: these blocks also run on these models (already in `models`)
    ablation_models: list[str] = field(default_factory=list)
    ablation_conditioning: list[str] = field(default_factory=list)
    data: DataSpec = field(default_factory=DataSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)
    launcher: LauncherSpec = field(default_factory=LauncherSpec)
    text: str = ""  # the spec as run: the file's text, or with overrides the merged YAML (spec.yaml records it)

    def expand(self) -> list[RunSpec]:
        """All runs: models x conditioning x seeds, in that nesting order, then the ablation's
        ablation_models x ablation_conditioning x seeds that the cross product does not hold."""
        pairs = [(m, c) for m in self.models for c in self.conditioning]
        pairs += [(m, c) for m in self.ablation_models for c in self.ablation_conditioning if (m, c) not in pairs]
        runs = []
        for model, cond in pairs:
            for seed in self.seeds:
                runs.append(RunSpec(
                    run_id=make_run_id(model, cond, seed, self.data, self.train), sweep=self.name,
                    model=model, conditioning=cond, seed=seed, data=copy.deepcopy(self.data),
                    train=copy.deepcopy(self.train), eval=copy.deepcopy(self.eval),
                    checkpoints_from=self.checkpoints_from))
        return runs


def run_identity(model: str, conditioning: str, seed: int, data: DataSpec, train: TrainSpec) -> dict:
    d = {k: v for k, v in asdict(data).items() if k not in _DATA_ID_EXCLUDED}
    t = {k: (float(v) if isinstance(v, float) else v) for k, v in asdict(train).items()
         if k not in _TRAIN_ID_EXCLUDED}
    if t.pop("init_from", None) is not None:  # by content (sha256), so moving the file keeps the id
        t["init_from_sha256"] = init_from_digest(expand_path(train.init_from, "train.init_from"))
    return {"model": model, "conditioning": conditioning, "seed": int(seed), "data": d, "train": t}


def init_from_digest(path: str | Path) -> str:
    """sha256 of train.init_from's weights (a file's bytes; a folder's names and bytes), cached per mtime."""
    if not Path(path).exists():
        raise HarnessError(f"{path}: no such file or folder (key train.init_from); point it at a checkpoint, "
                           "a state dict or a diffusers DiT folder.")
    return path_digest(path)


def make_run_id(model: str, conditioning: str, seed: int, data: DataSpec, train: TrainSpec) -> str:
    """Readable, stable id: "<model with / as ->_<conditioning>_s<seed>_<6 hex of the identity>"."""
    blob = json.dumps(run_identity(model, conditioning, seed, data, train), sort_keys=True,
                      separators=(",", ":"))
    digest = hashlib.sha256(blob.encode()).hexdigest()[:6]
    return f"{model.replace('/', '-')}_{conditioning}_s{seed}_{digest}"


def override_sections(overrides: list[str], data: DataSpec, train: TrainSpec, ev: EvalSpec,
                      where_name: str) -> tuple[DataSpec, TrainSpec, EvalSpec]:
    """data/train/eval with "section.key=value" overrides applied and validated like a spec's sections."""
    where = Where(where_name)
    raw = apply_overrides({"data": asdict(data), "train": asdict(train), "eval": asdict(ev)}, overrides, where)
    check_keys(raw, ["data", "train", "eval"], (), where)
    return (section(DataSpec, raw["data"], "data", where), section(TrainSpec, raw["train"], "train", where),
            section(EvalSpec, raw["eval"], "eval", where))


def expand_path(value: str | None, key: str) -> str | None:
    """Expand ~ and ${VAR} in a path from the spec; HarnessError naming the key if a var is unset."""
    if value is None:
        return None
    missing = [m for m in re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", value) if m not in os.environ]
    if missing:
        raise HarnessError(f"{key}: {value!r} uses the unset environment variable {missing[0]}. "
                           f"Fix: export {missing[0]}=/your/path, or write the path into the spec.")
    return os.path.expanduser(os.path.expandvars(value))


def _str_list(raw: Any, key: str, where: Where, choices: tuple | None = None) -> list[str]:
    meta = {"kind": list, "item": str, "nonempty": True}
    if choices:
        meta["choices"] = choices
    return check_value(raw, meta, (key,), where)


def _models(raw: Any, where: Where) -> list[str]:
    path = ("models",)
    if raw is None:
        raise where.error(path, "no models", "list model names, e.g. models: [DiT-S/2, DiT-B/4]")
    if isinstance(raw, dict):
        check_keys(raw, ["sizes", "patches"], path, where)
        for key in ("sizes", "patches"):
            if key not in raw:
                raise where.error(path, f"a model grid needs `{key}`",
                                  "write {sizes: [S, B, L, XL], patches: [8, 4, 2]}")
        sizes = check_value(raw["sizes"], {"kind": list, "item": str, "nonempty": True, "choices": tuple(SIZES)},
                       path + ("sizes",), where)
        patches = check_value(raw["patches"], {"kind": list, "item": int, "nonempty": True, "min": 1, **L.PATCH},
                         path + ("patches",), where)
        return [f"DiT-{s}/{p}" for s in sizes for p in patches]
    names = _str_list(raw, "models", where)
    out = []
    for i, name in enumerate(names):
        try:
            out.append(resolve_shape(name).name)
        except HarnessError as err:
            msg = str(err)
            if msg.startswith("unknown model"):
                close = difflib.get_close_matches(name, list(VARIANTS), n=1, cutoff=0.6)
                fix = f"did you mean '{close[0]}'?" if close else (
                    f"use one of {', '.join(VARIANTS)} or DiT-<depth>x<hidden>x<heads>/<patch>")
                raise where.error(path + (i,), f"unknown model {name!r}", fix)
            problem, fix = split_shape_error(msg, name)
            raise where.error(path + (i,), problem, fix or "fix the model's sizes")
    return out


#: what to do about a train.init_from that does not exist or does not fit
INIT_FROM_FIX = ("point train.init_from at weights of this sweep's model (a checkpoint, `harness import` output "
                 "or an official DiT .pt)")


def _check_init_from(spec: SweepSpec, where: Where) -> None:
    """train.init_from names a file or folder that exists (whether it fits every run's model is torch's
    business: `harness.launch.preflight.require_init_weights` checks it before anything is submitted)."""
    path = ("train", "init_from")
    unset = [v for v in re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", spec.train.init_from) if v not in os.environ]
    if unset:
        raise where.error(path, f"{spec.train.init_from!r} uses the unset environment variable {unset[0]}",
                          f"export {unset[0]}=/path/to/the/weights (the run id hashes the file, so it must be here)")
    source = expand_path(spec.train.init_from, "train.init_from")
    if not Path(source).exists():
        raise where.error(path, f"{source}: no such file or folder", INIT_FROM_FIX)


def _check_source_sweep(spec: SweepSpec, where: Where) -> None:
    """checkpoints_from: every run id must exist in the named sweep (when its file is next door)."""
    source = spec.path.parent / f"{spec.checkpoints_from}.yaml"
    if spec.checkpoints_from == spec.name:
        raise where.error(("checkpoints_from",), "a sweep cannot reuse its own checkpoints",
                          "name the sweep that trained the models, e.g. gflops")
    if not source.exists():
        return
    have = {r.run_id for r in load_spec(source).expand()}
    for run in spec.expand():
        if run.run_id not in have:
            raise where.error(("checkpoints_from",),
                              f"run {run.run_id} ({run.model}, {run.conditioning}, seed {run.seed}) is not in {source}",
                              f"copy models, conditioning, seeds, data and train from {source.name}; "
                              "only eval may differ")


TOP_KEYS = ["name", "description", "models", "conditioning", "seeds", "ablation", "checkpoints_from",
            "data", "train", "eval", "launcher"]


def _ablation(raw: Any, models: list[str], where: Where) -> tuple[list[str], list[str]]:
    """`ablation: {models: [...], conditioning: [...]}` -> (models, blocks); models must be in the sweep."""
    if raw is None:
        return [], []
    path = ("ablation",)
    if not isinstance(raw, dict):
        raise where.error(path, f"expected a mapping, got {typename(raw)}",
                          "write ablation: {models: [DiT-XL/2], conditioning: [in-context, cross-attention, adaLN]}")
    check_keys(raw, ["models", "conditioning"], path, where)
    for key in ("models", "conditioning"):
        if key not in raw:
            raise where.error(path, f"the ablation needs `{key}`",
                              "write ablation: {models: [...], conditioning: [...]}")
    names = check_value(raw["models"], {"kind": list, "item": str, "nonempty": True}, path + ("models",), where)
    for i, name in enumerate(names):
        if name not in models:
            raise where.error(path + ("models", i), f"{name} is not one of this sweep's models",
                              f"add it to `models` or choose among {', '.join(models)}")
    blocks = check_value(raw["conditioning"], {"kind": list, "item": str, "nonempty": True, "choices": CONDITIONINGS},
                    path + ("conditioning",), where)
    return names, blocks


def load_spec(path: str | Path, overrides: list[str] | tuple = ()) -> SweepSpec:
    """Read and validate a sweep spec, with command-line "dotted.key=value" `overrides` applied before
    validation; HarnessError "FILE:LINE: KEY: problem. Fix: ..." (or "FILE: override 'K=V': ...") otherwise."""
    path = Path(path)
    where = Where(str(path))
    raw = read_yaml(path, where)
    if not isinstance(raw, dict):
        raise where.error((), f"the spec must be a mapping of keys, got {typename(raw)}",
                          "start with `name:` and `models:` lines (see sweeps/smoke.yaml)")
    text = path.read_text(encoding="utf-8")
    if overrides:
        apply_overrides(raw, list(overrides), where)
        raw.setdefault("name", path.stem)  # spec.yaml keeps the sweep's name whatever its own file is called
        text = (f"# {path} with overrides: {' '.join(overrides)}\n"
                + yaml.safe_dump(raw, sort_keys=False, default_flow_style=None))
    check_keys(raw, TOP_KEYS, (), where)
    if "models" not in raw:
        raise where.error((), "missing key `models`", "add e.g. models: [DiT-S/2]")
    name = raw.get("name", path.stem)
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise where.error(("name",), f"{name!r} is not a usable folder name",
                          "use letters, digits, '-', '_' or '.' only")
    description = raw.get("description", "") or ""
    if not isinstance(description, str):
        raise where.error(("description",), f"expected a string, got {typename(description)}", "quote it")
    source = raw.get("checkpoints_from")
    if source is not None and (not isinstance(source, str) or not _NAME_RE.match(source)):
        raise where.error(("checkpoints_from",), f"{source!r} is not a sweep name",
                          "write the name of the sweep that trained the models, e.g. gflops")
    spec = SweepSpec(
        name=name, path=path, description=description, models=_models(raw["models"], where),
        conditioning=_str_list(raw.get("conditioning", [DEFAULT_CONDITIONING]), "conditioning", where, CONDITIONINGS),
        seeds=check_value(raw.get("seeds", [0]), {"kind": list, "item": int, "min": 0, "nonempty": True, **L.SEED},
                     ("seeds",), where),
        checkpoints_from=source,
        data=section(DataSpec, raw.get("data"), "data", where),
        train=section(TrainSpec, raw.get("train"), "train", where),
        eval=section(EvalSpec, raw.get("eval"), "eval", where),
        launcher=section(LauncherSpec, raw.get("launcher"), "launcher", where),
        text=text,
    )
    if "eval" not in raw or "at_steps" not in (raw.get("eval") or {}):
        spec.eval.at_steps = [spec.train.steps]
    first: dict[str, int] = {}
    for i, model in enumerate(spec.models):
        if first.setdefault(model, i) != i:
            raise where.error(("models", i), f"{model} is listed twice", "remove the duplicate")
    spec.ablation_models, spec.ablation_conditioning = _ablation(raw.get("ablation"), spec.models, where)
    n_runs = (len(spec.models) * len(spec.conditioning) + len(spec.ablation_models) * len(spec.ablation_conditioning)) * len(spec.seeds)
    if n_runs > MAX_RUNS:
        raise where.error(("models",), f"{n_runs:,} runs (models x conditioning x seeds), over the limit of {MAX_RUNS:,}",
                          "split the study into several sweeps")
    check_sweep(spec, where)
    if spec.train.init_from is not None:
        _check_init_from(spec, where)
    if source is not None:
        _check_source_sweep(spec, where)
    return spec
