"""When two evaluations' samples are paired: sample i of both began from the same noise with the same label.

Within a sweep, every run with the same seed samples an evaluation at a step and sampling steps from one noise
seed (harness.training.evaluator), with balanced labels; two sweeps over the same checkpoints with another
sampler do too. Their FIDs then move together, and the error of their difference is the paired bootstrap's
(harness.metrics.stats.fid_difference, whose docstring holds the verdict rule), smaller than the two errors
combined. The records must prove the pairing: `pairing_problem` says why two do not, or None.

What proves it (eval.jsonl's keys, as the evaluator writes them; older records lack them and are not paired):
the number of samples; the noise seed, the scheme deriving sample i's noise from it and the noise's shape; the
label scheme and class count; for a sampler that draws noise at every step, the sampling batch and compilation
too (that noise is drawn per batch); and one feature space and reference, so the two FIDs are comparable at all.
The sampler, model and step may differ: they are what is compared.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

from harness.config.vocab import STOCHASTIC_SAMPLERS

#: keys whose values must be equal (and recorded) in both records
PAIRED_KEYS = ("num_samples", "noise_seed", "noise_scheme", "noise_shape", "labels", "num_classes", "feature_space",
               "reference")
#: also equal when either sampler draws noise at every step
STEP_NOISE_KEYS = ("sampler", "sample_batch", "sample_compiled")


def _norm(value: Any) -> str | None:
    """A recorded value as comparable text: None for missing (None, NaN); [1, 8, 8] -> '1x8x8'; 1000.0 -> '1000'."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, (list, tuple)):
        return "x".join(str(v) for v in value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def pairing_problem(a: Mapping, b: Mapping) -> str | None:
    """None when records (or tidy-frame rows) `a` and `b` prove their samples paired, else why not (a few words)."""
    keys = PAIRED_KEYS
    if a.get("sampler") in STOCHASTIC_SAMPLERS or b.get("sampler") in STOCHASTIC_SAMPLERS:
        keys += STEP_NOISE_KEYS
    for key in keys:
        va, vb = _norm(a.get(key)), _norm(b.get(key))
        if va is None or vb is None:
            return f"no {key} recorded"
        if va != vb:
            return f"{key} differs" + (" (step noise not shared)" if key in STEP_NOISE_KEYS else "")
    return None
