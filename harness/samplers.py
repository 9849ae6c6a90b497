"""The sampling vocabulary, torch-free so the spec and the CLI can validate against it:
sampler names, guidance channel choices, and whether a guidance scale turns guidance on.

To add a sampler: add its name to SAMPLERS and its loop to `harness.sample.sample_images`
(the spec's eval.sampler and `harness sample --sampler` accept it from then on).
"""
from __future__ import annotations

import math

#: sampler name -> what it is
SAMPLERS: dict[str, str] = {
    "ddpm": "ancestral sampling (ADM's p_sample_loop), respaced",
    "ddim": "DDIM, eta = 0, respaced",
}
#: eval.guidance_channels / --guidance-channels: guide the first 3 latent channels (the paper) or all
GUIDANCE_CHANNELS = (3, "all")


def guidance_on(cfg_scale: float | None) -> bool:
    """Classifier-free guidance is on for any scale other than 1 (1 = the conditional model alone;
    a missing scale means none was used). The one place this is decided."""
    if cfg_scale is None:
        return False
    scale = float(cfg_scale)
    return not math.isnan(scale) and not math.isclose(scale, 1.0)
