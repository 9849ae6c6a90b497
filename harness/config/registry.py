"""Named DiT shapes: the paper's 12 variants and custom depth x hidden x heads sizes.

The one home for model shapes. A name is either one of the paper's, "DiT-{S,B,L,XL}/{2,4,8}",
or a custom size "DiT-<depth>x<hidden>x<heads>/<patch>", e.g. "DiT-4x64x2/2".
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from harness.errors import HarnessError

# size -> (depth, hidden, heads), Table 1 of the paper
SIZES: dict[str, tuple[int, int, int]] = {
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}
PATCH_SIZES = (8, 4, 2)
#: the paper's latent geometry: the SD VAE maps an image to (VAE_CHANNELS, size/8, size/8)
VAE_DOWNSAMPLE = 8
VAE_CHANNELS = 4
CONDITIONINGS = ("in-context", "cross-attention", "adaLN", "adaLN-Zero")
_CUSTOM = re.compile(r"^DiT-(\d+)x(\d+)x(\d+)/(\d+)$")


@dataclass(frozen=True)
class ModelShape:
    name: str
    size: str  # "S" | "B" | "L" | "XL", or "<depth>x<hidden>x<heads>" for a custom size
    depth: int
    hidden: int
    heads: int
    patch: int

    def to_dict(self) -> dict:
        return asdict(self)


VARIANTS: dict[str, ModelShape] = {
    f"DiT-{size}/{patch}": ModelShape(f"DiT-{size}/{patch}", size, *SIZES[size], patch)
    for size in SIZES
    for patch in PATCH_SIZES
}


def resolve_shape(name: str) -> ModelShape:
    """Shape of a model name; raises HarnessError naming the valid choices."""
    if name in VARIANTS:
        return VARIANTS[name]
    match = _CUSTOM.match(str(name))
    if not match:
        raise HarnessError(
            f"unknown model {name!r}: use one of {', '.join(VARIANTS)}, "
            f"or a custom size 'DiT-<depth>x<hidden>x<heads>/<patch>' such as 'DiT-4x64x2/2'"
        )
    depth, hidden, heads, patch = (int(g) for g in match.groups())
    shape = ModelShape(name, f"{depth}x{hidden}x{heads}", depth, hidden, heads, patch)
    check_shape(shape)
    return shape


def check_shape(shape: ModelShape, input_size: int | None = None) -> None:
    """Raise HarnessError if the shape cannot be built (optionally for a given input side)."""
    if min(shape.depth, shape.hidden, shape.heads, shape.patch) < 1:
        raise HarnessError(f"model {shape.name!r}: depth, hidden, heads and patch must be positive")
    if shape.hidden % shape.heads:
        raise HarnessError(
            f"model {shape.name!r}: hidden size {shape.hidden} is not divisible by {shape.heads} heads; "
            f"choose heads among the divisors of {shape.hidden}")
    if shape.hidden % 4:
        raise HarnessError(
            f"model {shape.name!r}: hidden size {shape.hidden} must be a multiple of 4 "
            "(2-D sin-cos positional embedding)")
    if input_size is not None and input_size % shape.patch:
        divisors = [p for p in (1, 2, 4, 8, 16) if input_size % p == 0]
        raise HarnessError(
            f"model {shape.name!r}: patch size {shape.patch} does not divide the input side {input_size}; "
            f"patch sizes that divide it: {divisors}")


def check_conditioning(conditioning: str) -> str:
    if conditioning not in CONDITIONINGS:
        raise HarnessError(f"unknown conditioning {conditioning!r}: use one of {', '.join(CONDITIONINGS)}")
    return conditioning
