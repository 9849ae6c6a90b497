"""Forward-pass Gflops of DiT models with fvcore, counted as the paper counts them.

One fused multiply-add is one flop (fvcore's convention). fvcore skips
`aten::scaled_dot_product_attention` unless given a handle: ours counts its two matmuls,
Q K^T and A V, i.e. 2 * N * heads * T_q * T_k * d_head. LayerNorm follows fvcore's rule (4 flops per element, 5 with
affine parameters); other elementwise ops (softmax, GELU, adds, modulation) are not counted.
Counts are for one image. With these rules all 15 rows of the paper's Table 4 match within 0.4%.
"""
from __future__ import annotations

import json
import logging
import math
import warnings

import torch

from harness import paper
from harness.io import atomic_write_json, cache_dir
from harness.config.registry import CONDITIONINGS, VAE_CHANNELS, VAE_DOWNSAMPLE, VARIANTS, check_shape, resolve_shape
from harness.config.registry import check_conditioning
from harness.models.dit import DiT
from harness.config.arguments import positive_int

log = logging.getLogger(__name__)
_CACHE_VERSION = 2  # bump when the model code changes what is counted


def _shape(value) -> list[int]:
    return list(value.type().sizes())


def sdpa_flop_handle(inputs, outputs) -> int:
    """fvcore handle for scaled_dot_product_attention: MACs of Q K^T plus those of A V."""
    q, k, v = (_shape(inputs[i]) for i in range(3))
    rows = math.prod(q[:-1])  # N * heads * T_q
    return rows * k[-2] * q[-1] + rows * k[-2] * v[-1]


def count_flops(model: DiT, input_size: int, in_channels: int) -> tuple[float, int]:
    """(Gflops of one forward pass for one image, parameter count) of `model`.

    The values of the weights do not matter; `model` may hold uninitialised memory.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # fvcore imports the deprecated torch.jit.script
        from fvcore.nn import FlopCountAnalysis

    was_training = model.training
    model.eval()
    x = torch.zeros(1, in_channels, input_size, input_size)
    t = torch.zeros(1, dtype=torch.long)
    y = torch.zeros(1, dtype=torch.long)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        analysis = FlopCountAnalysis(model, (x, t, y))
        analysis.set_op_handle("aten::scaled_dot_product_attention", sdpa_flop_handle)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        flops = analysis.total()
    model.train(was_training)
    params = sum(p.numel() for p in model.parameters())
    return flops / 1e9, params


def _measure(name: str, conditioning: str, input_size: int, in_channels: int, num_classes: int,
             depth: int | None = None) -> tuple[float, int]:
    """fvcore count of the named model, optionally with its depth replaced. The model is built
    without initialising its weights (meta device, then uninitialised CPU memory)."""
    shape = resolve_shape(name)
    check_shape(shape, input_size)
    with torch.device("meta"):
        model = DiT(input_size=input_size, patch_size=shape.patch, in_channels=in_channels,
                    hidden_size=shape.hidden, depth=depth or shape.depth, num_heads=shape.heads,
                    num_classes=num_classes, conditioning=check_conditioning(conditioning),
                    class_dropout_prob=0.0, learn_sigma=True)  # dropout costs no flops; the paper learns sigma
    return count_flops(model.to_empty(device="cpu"), input_size, in_channels)


def model_gflops(name: str, conditioning: str = "adaLN-Zero", input_size: int = 32, in_channels: int = 4,
                 num_classes: int = 1000, use_cache: bool = True) -> tuple[float, int]:
    """Cached (Gflops, params) of a named model, measured by fvcore.

    Every block of a DiT is the same, so cost is affine in depth: fvcore measures the model at
    depth 1 and depth 2 and the difference is one block, exactly (tests check it against a full
    count). XL/2 then costs a fraction of a second instead of tracing 28 blocks.
    """
    key = f"v{_CACHE_VERSION}|{name}|{conditioning}|{input_size}|{in_channels}|{num_classes}"
    path = cache_dir("flops") / "flops.json"
    cache = {}
    if use_cache and path.exists():
        try:
            cache = json.loads(path.read_text())
        except json.JSONDecodeError:
            cache = {}
        if key in cache:
            return float(cache[key]["gflops"]), int(cache[key]["params"])
    depth = resolve_shape(name).depth
    g1, p1 = _measure(name, conditioning, input_size, in_channels, num_classes, depth=1)
    g2, p2 = _measure(name, conditioning, input_size, in_channels, num_classes, depth=2)
    gflops, params = g1 + (depth - 1) * (g2 - g1), p1 + (depth - 1) * (p2 - p1)
    if use_cache:
        cache[key] = {"gflops": gflops, "params": params}
        atomic_write_json(path, cache)
    return gflops, params


def flops_table(models: list[str] | None, conditionings: list[str] | None, image_size: int,
                pixel: bool = False, in_channels: int | None = None) -> list[dict]:
    """Rows for `harness flops`. With no models: the 12 variants with adaLN-Zero, then the
    other three blocks on DiT-XL/2 (the paper's Table 4)."""
    if models:
        pairs = [(m, c) for m in models for c in (conditionings or ["adaLN-Zero"])]
    else:
        pairs = [(m, "adaLN-Zero") for m in VARIANTS] + [("DiT-XL/2", c) for c in CONDITIONINGS if c != "adaLN-Zero"]
        if conditionings:
            pairs = [p for p in pairs if p[1] in conditionings]
    input_size = image_size if pixel else image_size // VAE_DOWNSAMPLE
    channels = in_channels or (3 if pixel else VAE_CHANNELS)
    rows = []
    for model, conditioning in pairs:
        gflops, params = model_gflops(model, conditioning, input_size, channels)
        ref = None if pixel else paper.paper_gflops(model, conditioning, image_size)
        rows.append({
            "model": model, "conditioning": conditioning, "image_size": image_size,
            "gflops": round(gflops, 3), "params_m": round(params / 1e6, 2),
            "paper_gflops": ref, "rel_err": None if ref is None else round(gflops / ref - 1, 5),
        })
    return rows


def add_flops_arguments(s) -> None:
    """`harness flops`'s flags."""
    s.add_argument("--model", action="append", help="e.g. DiT-XL/2 or DiT-4x64x2/2 (repeatable)")
    s.add_argument("--conditioning", action="append", choices=CONDITIONINGS, help="conditioning block (repeatable)")
    s.add_argument("--image-size", type=positive_int, default=256, help="pixels; the latent is size/8 unless --pixel")
    s.add_argument("--pixel", action="store_true", help="count in pixel space (no VAE downsampling)")
    s.add_argument("--in-channels", type=positive_int, default=None, help="default 4 (latent) or 3 (--pixel)")
    s.add_argument("--format", choices=["table", "csv", "json"], default="table")


def cli_flops(args) -> int:
    rows = flops_table(args.model, args.conditioning, args.image_size, args.pixel, args.in_channels)
    columns = ["model", "conditioning", "image_size", "gflops", "params_m", "paper_gflops", "rel_err"]
    if args.format == "json":
        print(json.dumps(rows, indent=2))
    elif args.format == "csv":
        print(",".join(columns))
        for row in rows:
            print(",".join("" if row[c] is None else str(row[c]) for c in columns))
    else:
        widths = {c: max(len(c), *(len(str(r[c] if r[c] is not None else "-")) for r in rows)) for c in columns}
        print("  ".join(c.ljust(widths[c]) for c in columns))
        for row in rows:
            print("  ".join(str(row[c] if row[c] is not None else "-").ljust(widths[c]) for c in columns))
    return 0
