"""The DiT model family: the backbone, its four conditioning blocks and the named variants.

The registry (shapes, names, validation) imports without torch, so a spec is checked in
milliseconds; `DiT` and `build_model` load torch on first use.
"""
from harness.models.registry import (CONDITIONINGS, PATCH_SIZES, SIZES, VAE_CHANNELS, VAE_DOWNSAMPLE, VARIANTS, ModelShape,
                                     check_shape, resolve_shape)

__all__ = ["DiT", "build_model", "CONDITIONINGS", "PATCH_SIZES", "SIZES", "VAE_CHANNELS", "VAE_DOWNSAMPLE", "VARIANTS", "ModelShape",
           "check_shape", "resolve_shape"]


def __getattr__(name: str):
    if name in ("DiT", "build_model"):
        from harness.models import dit

        return getattr(dit, name)
    raise AttributeError(f"module 'harness.models' has no attribute {name!r}")
