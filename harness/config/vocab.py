"""The vocabularies the spec, the CLI and the records share, torch-free: metric and feature-space
names, samplers, guidance channels, and when a guidance scale turns guidance on. The code that
computes a metric or runs a sampler lives higher up (`harness.metrics`, `harness.sampling`)."""
from __future__ import annotations

import math
from typing import Iterable

from harness.errors import HarnessError

#: metric names as eval.metrics and --metrics spell them
METRICS = ("fid", "sfid", "is", "precision", "recall")
#: metric name -> its key in an evaluation record (eval.jsonl, the results table)
METRIC_KEYS = {"fid": "fid", "sfid": "sfid", "is": "inception_score", "precision": "precision", "recall": "recall"}
#: record key -> its label in tables and figures
METRIC_LABELS = {"fid": "FID", "sfid": "sFID", "inception_score": "IS", "precision": "Precision", "recall": "Recall"}
_ALIASES = {"inception_score": "is", "isc": "is", "prec": "precision", "rec": "recall"}
FEATURE_SPACES = ("inception", "digits")
#: the FID features each evaluation stores beside its record, per sample: (dimension, dtype) per feature space --
#: float16 in Inception's 2,048-d space (the FID from the float16 copy moves by far less than its standard error:
#: README, "Comparing two FIDs"), float32 in the 32-d digits space
FID_FEATURES = {"inception": (2048, "float16"), "digits": (32, "float32")}

#: sampler names as eval.sampler and --sampler spell them: ours (ddpm, ddim) and diffusers' schedulers
SAMPLERS = ("ddpm", "ddim", "dpm-solver++", "unipc", "euler", "heun")
#: the samplers that draw fresh noise at every step (per batch, so it depends on the batch: harness.sampling.sample)
STOCHASTIC_SAMPLERS = ("ddpm",)
#: train.compile_mode / eval.compile_mode / --compile-mode: torch.compile's modes. "default" as PyTorch; the
#: "max-autotune" ones search GEMM and kernel configurations when compiling (minutes longer); "reduce-overhead"
#: and "max-autotune" also replay CUDA graphs (no launch overhead; on the CPU they compile without graphs)
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "reduce-overhead", "max-autotune")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
#: eval.guidance_channels / --guidance-channels: guide the first 3 latent channels (the paper) or all
GUIDANCE_CHANNELS = (3, "all")


def normalize_metrics(metrics: Iterable[str]) -> list[str]:
    """Canonical metric names (fid, sfid, is, precision, recall) in a fixed order; HarnessError on others."""
    wanted = set()
    for m in metrics:
        key = _ALIASES.get(str(m).strip().lower(), str(m).strip().lower())
        if key not in METRICS:
            raise HarnessError(f"unknown metric {m!r} (--metrics / eval.metrics); choose from {', '.join(METRICS)}")
        wanted.add(key)
    if not wanted:
        raise HarnessError(f"no metrics requested (--metrics / eval.metrics); choose from {', '.join(METRICS)}")
    return [m for m in METRICS if m in wanted]


def guidance_on(cfg_scale: float | None) -> bool:
    """Classifier-free guidance is on for any scale other than 1 (1 = the conditional model alone;
    a missing scale means none was used). The one place this is decided."""
    if cfg_scale is None:
        return False
    scale = float(cfg_scale)
    return not math.isnan(scale) and not math.isclose(scale, 1.0)
