"""The upper bound of every number in a sweep spec, each with the reason it follows from.

The one home of these bounds: spec.py's fields take them as validation metadata (`max`, `why`),
`harness.config.specfile` refuses a value beyond them (and NaN or inf anywhere) with one line naming the
reason, and `ranges_doc` appends the table to spec.py's docstring. The geometric bounds, which
depend on several keys at once (tokens per image, model size), are `check_geometry`.
"""
from __future__ import annotations

from dataclasses import fields
from typing import Any

from harness.errors import HarnessError


def _bound(top: float, why: str) -> dict:
    return {"max": top, "why": why}


#: the SD VAE's mid-block self-attention sees (size/8)^2 positions: 16,384 at 1024 px, a 1 GiB fp32
#: matrix per image; 2048 px would need 16 GiB per image
MAX_IMAGE_SIZE = 1024
#: tokens per image, (input_size / patch)^2: 1024 px through the VAE at patch 2 (a 64x64 grid); the
#: attention matrix per head and image grows as its square, and `harness plan` traces the model on the CPU
MAX_TOKENS = 4096
#: fp32 weights, gradients, AdamW's two moments and the EMA are 20 bytes a parameter, which DDP holds on
#: every GPU: 5e9 parameters are 100 GB of a 141 GB H200 (DiT-XL/2 has 0.68e9)
MAX_PARAMS = 5_000_000_000
MAX_STEPS = 10_000_000
MAX_RUNS = 10_000  # runs of one sweep, and hence the useful array_parallelism

IMAGE_SIZE = _bound(MAX_IMAGE_SIZE, "the SD VAE attends over (size/8)^2 positions: 16,384 at 1024 px")
NUM_CLASSES = _bound(100_000, "ImageNet-21k has 21,841; the label table holds one row per class")
STEPS = _bound(MAX_STEPS, "the paper's longest run, DiT-XL/2, trained 7M steps")
STEP_COUNT = _bound(MAX_STEPS, "a count of training steps, bounded as train.steps")
EMA_WHY = "a decay of 1 would never update the EMA"
DROPOUT_WHY = "dropping every label would leave nothing to guide with"
GLOBAL_BATCH = _bound(65_536, "256x the paper's 256; beyond it no DiT recipe's lr holds")
LR = _bound(1.0, "an AdamW step of 1 already moves every weight by about its own scale")
WEIGHT_DECAY = _bound(1.0, "AdamW shrinks weights by lr x weight_decay a step, which must stay below 1")
CKPT_MINUTES = _bound(10_080, "a week; a longer interval is no protection against preemption")
KEEP_LAST = _bound(1000, "a DiT-XL/2 checkpoint with its optimizer is 8 GB")
MICRO_BATCH = GLOBAL_BATCH
NUM_SAMPLES = _bound(200_000, "4x FID-50K; 200,000 images of 512 px are a 157 GB npz")
SAMPLING_STEPS = _bound(1000, "the diffusion has 1000 timesteps; fewer steps pick a subset of them")
CFG_SCALE = _bound(50.0, "the paper guides at 1.5 (FID) and 4.0 (images); samples saturate long before 50")
SAMPLE_BATCH = _bound(16_384, "images sampled at once on one GPU")
SEED = _bound(2**31 - 1, "a signed 32-bit integer, which every RNG and tool accepts")
PATCH = _bound(MAX_IMAGE_SIZE, "a patch is at most the largest image")
NODES = _bound(1024, "a training job's nodes; larger jobs need more than DDP")
GPUS_PER_NODE = _bound(16, "the largest GPU nodes hold 16")
GPUS_PER_RUN = _bound(16 * 1024, "16 GPUs a node on at most 1,024 nodes (launcher.nodes)")
TASKS_PER_NODE = _bound(256, "one rank per GPU or core of the largest nodes")
CPUS_PER_TASK = _bound(512, "the largest nodes have 2 x 128 cores with 2 threads each")
MEM_GB = _bound(16_384, "16 TB, above the largest node's memory")
TIMEOUT_MIN = _bound(525_600, "a year, longer than any partition's limit (`sinfo -o '%P %l'`)")
ARRAY_PARALLELISM = _bound(MAX_RUNS, "the most runs a sweep can have")
MAX_CONCURRENT_LOCAL = _bound(256, "local jobs on one machine: at most one per core of the largest")


def approx_params(depth: int, hidden: int) -> int:
    """A DiT's parameters, roughly: 18 hidden^2 a block (attention 4, MLP 8, adaLN modulation 6)."""
    return 18 * depth * hidden * hidden


def check_geometry(shape: Any, input_size: int) -> str | None:
    """Why a model of `shape` on inputs of side `input_size` is beyond the bounds, or None."""
    tokens = (input_size // shape.patch) ** 2
    if tokens > MAX_TOKENS:
        return (f"{tokens:,} tokens per image ((input {input_size} / patch {shape.patch})^2), over the limit "
                f"of {MAX_TOKENS:,}; use a larger patch or a smaller data.image_size")
    params = approx_params(shape.depth, shape.hidden)
    if params > MAX_PARAMS:
        return (f"about {params:.2g} parameters, over the limit of {MAX_PARAMS:.0e} (20 bytes each in "
                "training, on every GPU); use a smaller depth or hidden size")
    return None


def ranges_doc(*classes: type) -> str:
    """The ranges table of the spec's numeric keys, from their field metadata (for spec.py's docstring)."""
    lines = ["", "Ranges (generated from harness/config/limits.py; NaN and inf are refused everywhere)::", ""]
    for cls in classes:
        for f in fields(cls):
            meta = f.metadata
            lo = meta.get("min", meta.get("gt"))
            hi = meta.get("max", meta.get("lt"))
            if lo is None and hi is None:
                continue
            ops = (">" if "gt" in meta else ">=", "<" if "lt" in meta else "<=")
            why = f"  # {meta['why']}" if meta.get("why") else ""
            lines.append(f"    {cls.__name__}.{f.name}: {ops[0]} {lo}, {ops[1]} {hi}{why}")
    for key, lo, meta in (("seeds", 0, SEED), ("models.patches", 1, PATCH)):
        lines.append(f"    {key}: >= {lo}, <= {meta['max']}  # {meta['why']}")
    return "\n".join(lines) + "\n"


def refuse(where: Any, path: tuple, problem: str) -> HarnessError:
    """The spec error for a geometry problem "what; fix"."""
    what, _, fix = problem.partition("; ")
    return where.error(path, what, fix)
