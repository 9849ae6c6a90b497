"""The DiT model family: the backbone, its four conditioning blocks and the named variants."""
from harness.models.dit import DiT, build_model
from harness.models.registry import CONDITIONINGS, PATCH_SIZES, SIZES, VARIANTS, ModelShape, check_shape, resolve_shape

__all__ = ["DiT", "build_model", "CONDITIONINGS", "PATCH_SIZES", "SIZES", "VARIANTS", "ModelShape",
           "check_shape", "resolve_shape"]
