"""Weights in and out of the harness: diffusers' DiT layout and the official DiT checkpoints.

Three layouts of the same adaLN-Zero DiT:

* ours = official: the keys of `harness.models.dit.DiT`, which are those of the released
  `DiT-XL-2-256x256.pt` (a plain state dict), so an official file loads as it is;
* harness checkpoints `step_XXXXXXX.pt` ({model, ema, step, run, ...}; EMA weights by default);
* diffusers: a `DiTPipeline` folder (`transformer/`, `scheduler/`, `vae/`, `model_index.json`) whose
  `DiTTransformer2DModel` repeats the timestep and label embedders inside every block and splits qkv.

One difference is not a matter of names: diffusers' `CombinedTimestepLabelEmbeddings` spaces the
256 timestep frequencies as 10000^(-i/127) (`downscale_freq_shift=1`), the official DiT (and ours)
as 10000^(-i/128). The weights map exactly, but the same weights give slightly different outputs
under the two codes; `timestep_frequency_gap` measures it and the README quotes the measured effect.

Shapes: state dicts map names to tensors; qkv (3D, D) <-> to_q, to_k, to_v (D, D) each.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from harness.errors import HarnessError
from harness.config.spec import DataSpec, RunSpec, expand_path
from harness.data.autoencoder import load_autoencoder
from harness.io import atomic_write
from harness.models.checkpoint import list_checkpoints, verify_checkpoint
from harness.models.diffusion import DIFFUSERS_PROCESS
from harness.models.runmodel import build_run_model, model_from_checkpoint, strip_wrappers

log = logging.getLogger(__name__)

#: per-block modules of ours -> diffusers (suffixes .weight and .bias follow)
_BLOCK_MAP = {
    "attn.proj": "attn1.to_out.0",
    "mlp.fc1": "ff.net.0.proj",
    "mlp.fc2": "ff.net.2",
    "adaLN_modulation.1": "norm1.linear",
}
_TOP_MAP = {"x_embedder.proj": "pos_embed.proj", "final_layer.adaLN_modulation.1": "proj_out_1",
            "final_layer.linear": "proj_out_2"}
#: the shared embedders of ours -> their copy inside block i of diffusers ({i} filled in)
_EMBED_MAP = {"t_embedder.mlp.0": "transformer_blocks.{i}.norm1.emb.timestep_embedder.linear_1",
              "t_embedder.mlp.2": "transformer_blocks.{i}.norm1.emb.timestep_embedder.linear_2",
              "y_embedder.embedding_table": "transformer_blocks.{i}.norm1.emb.class_embedder.embedding_table"}


def check_exportable(conditioning: str, what: str) -> None:
    """diffusers' DiT has only the adaLN-Zero block; the others are refused in one line."""
    if conditioning != "adaLN-Zero":
        raise HarnessError(f"{what}: conditioning {conditioning!r} has no diffusers counterpart "
                           "(DiTTransformer2DModel implements adaLN-Zero only); export an adaLN-Zero run.")


# ----------------------------------------------------------------------------- state dict mapping
def to_diffusers_state_dict(ours: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """Our (official) adaLN-Zero state dict -> DiTTransformer2DModel's (pos_embed buffer left out:
    diffusers rebuilds the same fixed sin-cos table)."""
    out: dict[str, torch.Tensor] = {}
    for src, dst in _TOP_MAP.items():
        for p in ("weight", "bias"):
            out[f"{dst}.{p}"] = ours[f"{src}.{p}"]
    for i in range(depth):
        for src, dst in _EMBED_MAP.items():
            for p in (("weight",) if "embedding_table" in src else ("weight", "bias")):
                out[f"{dst.format(i=i)}.{p}"] = ours[f"{src}.{p}"]
        for src, dst in _BLOCK_MAP.items():
            for p in ("weight", "bias"):
                out[f"transformer_blocks.{i}.{dst}.{p}"] = ours[f"blocks.{i}.{src}.{p}"]
        for p in ("weight", "bias"):
            for name, part in zip(("to_q", "to_k", "to_v"), ours[f"blocks.{i}.attn.qkv.{p}"].chunk(3, dim=0)):
                out[f"transformer_blocks.{i}.attn1.{name}.{p}"] = part.clone()
    return out


def from_diffusers_state_dict(theirs: dict[str, torch.Tensor], depth: int, where: str) -> dict[str, torch.Tensor]:
    """DiTTransformer2DModel's state dict -> ours (no pos_embed: the caller keeps the model's own).
    The per-block copies of the embedders must agree; `where` names the source in errors."""
    def get(key: str) -> torch.Tensor:
        if key not in theirs:
            raise HarnessError(f"{where}: missing tensor {key!r}; not a DiTTransformer2DModel of depth {depth}.")
        return theirs[key]

    ours: dict[str, torch.Tensor] = {}
    for dst, src in _TOP_MAP.items():
        for p in ("weight", "bias"):
            ours[f"{dst}.{p}"] = get(f"{src}.{p}")
    for dst, src in _EMBED_MAP.items():
        for p in (("weight",) if "embedding_table" in dst else ("weight", "bias")):
            first = get(f"{src.format(i=0)}.{p}")
            for i in range(1, depth):
                if not torch.equal(get(f"{src.format(i=i)}.{p}"), first):
                    raise HarnessError(f"{where}: block {i} has its own {src.format(i=i)}.{p}; the harness DiT "
                                       "shares one embedder across blocks, so it cannot hold these weights.")
            ours[f"{dst}.{p}"] = first
    for i in range(depth):
        for dst, src in _BLOCK_MAP.items():
            for p in ("weight", "bias"):
                ours[f"blocks.{i}.{dst}.{p}"] = get(f"transformer_blocks.{i}.{src}.{p}")
        for p in ("weight", "bias"):
            ours[f"blocks.{i}.attn.qkv.{p}"] = torch.cat(
                [get(f"transformer_blocks.{i}.attn1.{n}.{p}") for n in ("to_q", "to_k", "to_v")], dim=0)
    return ours


def diffusers_config(model: torch.nn.Module) -> dict[str, Any]:
    """DiTTransformer2DModel config of one of our adaLN-Zero DiTs."""
    hidden = int(model.pos_embed.shape[-1])
    heads = int(model.blocks[0].attn.heads)
    return {"num_attention_heads": heads, "attention_head_dim": hidden // heads,
            "in_channels": int(model.in_channels), "out_channels": int(model.out_channels),
            "num_layers": len(model.blocks), "sample_size": int(model.input_size),
            "patch_size": int(model.patch_size), "num_embeds_ada_norm": int(model.num_classes),
            "norm_type": "ada_norm_zero", "norm_elementwise_affine": False, "norm_eps": 1e-6,
            "activation_fn": "gelu-approximate", "attention_bias": True}


def model_args_from_diffusers(config: dict[str, Any], where: str) -> dict[str, Any]:
    """Our DiT constructor arguments from a DiTTransformer2DModel config.json."""
    if config.get("norm_type", "ada_norm_zero") != "ada_norm_zero" or config.get("num_embeds_ada_norm") is None:
        raise HarnessError(f"{where}: norm_type {config.get('norm_type')!r} is not adaLN-Zero; only class-conditional "
                           "DiT transformers (ada_norm_zero) can be imported.")
    try:
        heads, head_dim = int(config["num_attention_heads"]), int(config["attention_head_dim"])
        in_ch = int(config.get("in_channels", 4))
        out_ch = int(config.get("out_channels") or in_ch)
        args = dict(input_size=int(config["sample_size"]), patch_size=int(config["patch_size"]), in_channels=in_ch,
                    hidden_size=heads * head_dim, depth=int(config["num_layers"]), num_heads=heads,
                    num_classes=int(config["num_embeds_ada_norm"]), learn_sigma=out_ch == 2 * in_ch)
    except (KeyError, TypeError, ValueError) as err:
        raise HarnessError(f"{where}: config.json lacks or garbles {err}; not a DiTTransformer2DModel config.") from None
    if out_ch not in (in_ch, 2 * in_ch):
        raise HarnessError(f"{where}: out_channels {out_ch} is neither in_channels {in_ch} nor twice it.")
    return args


def timestep_frequency_gap(freq_dim: int = 256) -> float:
    """Largest relative gap between diffusers' DiT timestep frequencies and the official ones."""
    half = freq_dim // 2
    i = torch.arange(half, dtype=torch.float64)
    ours = torch.exp(-torch.log(torch.tensor(10000.0, dtype=torch.float64)) * i / half)
    theirs = torch.exp(-torch.log(torch.tensor(10000.0, dtype=torch.float64)) * i / (half - 1))
    return float(((ours - theirs).abs() / ours).max())


# ----------------------------------------------------------------------------- reading sources
def load_weights_file(path: Path) -> Any:
    """torch.load with weights_only=True: tensors and plain values (a harness checkpoint's RNG states too)."""
    try:
        try:  # mmap: a shape check of a 675 MB DiT-XL/2 reads only what it touches
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) torch.save format
    except Exception as err:  # noqa: BLE001 - any unpickling failure means the file is unusable
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise HarnessError(f"{path}: cannot be read as a weights file ({first[:160]}); "
                           "it is corrupt, truncated or not a PyTorch state dict.") from None


@dataclass
class Source:
    """Weights read from a file or folder, in our (official) layout."""

    path: Path
    kind: str  # "harness-checkpoint" | "state-dict" | "diffusers"
    state_dict: dict[str, torch.Tensor]
    model_args: dict[str, Any] | None = None  # constructor args, when the source says (diffusers)


def _transformer_folder(path: Path) -> Path | None:
    for folder in (path / "transformer", path):
        cfg = folder / "config.json"
        if cfg.exists():
            return folder
    return None


def read_diffusers(path: Path) -> Source:
    """A DiTPipeline folder or its transformer/ folder -> our state dict and constructor args."""
    folder = _transformer_folder(path)
    if folder is None:
        raise HarnessError(f"{path}: no transformer/config.json or config.json; not a diffusers DiT folder.")
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise HarnessError(f"{folder / 'config.json'}: unreadable ({err}).") from None
    args = model_args_from_diffusers(config, str(folder / "config.json"))
    weights = folder / "diffusion_pytorch_model.safetensors"
    if weights.exists():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            theirs = load_file(str(weights))
        except (SafetensorError, OSError, ValueError) as err:
            raise HarnessError(f"{weights}: corrupt or truncated safetensors file ({err}).") from None
    elif (folder / "diffusion_pytorch_model.bin").exists():
        theirs = load_weights_file(folder / "diffusion_pytorch_model.bin")
    else:
        raise HarnessError(f"{folder}: no diffusion_pytorch_model.safetensors (or .bin) next to config.json.")
    return Source(path, "diffusers", from_diffusers_state_dict(theirs, args["depth"], str(weights)), args)


def read_source(path: str | Path, use_ema: bool = True) -> Source:
    """Weights from a harness checkpoint (EMA unless use_ema=False), a plain state dict in the
    official layout (DiT-XL-2-256x256.pt, or what `harness import` writes) or a diffusers folder."""
    path = Path(path)
    if not path.exists():
        raise HarnessError(f"{path}: no such file or folder (weights to import or train.init_from).")
    if path.is_dir():
        return read_diffusers(path)
    obj = load_weights_file(path)
    if isinstance(obj, dict) and "model" in obj and "step" in obj:
        weights = obj.get("ema") if use_ema else obj["model"]
        if weights is None:
            weights = obj["model"]
        sd, kind = weights, "harness-checkpoint"
    elif isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        sd, kind = obj, "state-dict"
    else:
        raise HarnessError(f"{path}: neither a harness checkpoint nor a state dict of tensors.")
    return Source(path, kind, strip_wrappers(sd))


def source_conditioning(sd: dict[str, torch.Tensor]) -> str:
    """Which block a state dict in our layout holds, from its keys."""
    if "blocks.0.cross_attn.q.weight" in sd:
        return "cross-attention"
    mod = sd.get("blocks.0.adaLN_modulation.1.weight")
    if mod is not None:
        return "adaLN-Zero" if mod.shape[0] == 6 * mod.shape[1] else "adaLN"
    return "in-context"


def check_fits(source: Source, model: torch.nn.Module, conditioning: str, what: str) -> None:
    """HarnessError naming the source and the first mismatch if its weights do not fit `model`."""
    have = source_conditioning(source.state_dict)
    if have != conditioning:
        raise HarnessError(f"{source.path}: holds the {have!r} block, but {what} asks for {conditioning!r}.")
    want = {k: tuple(v.shape) for k, v in model.state_dict().items() if k != "pos_embed"}
    got = {k: tuple(v.shape) for k, v in source.state_dict.items() if k != "pos_embed"}
    for key in sorted(set(want) | set(got)):
        if key not in got:
            raise HarnessError(f"{source.path}: lacks {key}; not the {what} architecture.")
        if key not in want:
            raise HarnessError(f"{source.path}: has {key}, which the {what} model does not; "
                               "a deeper model or another block?")
        if got[key] != want[key]:
            raise HarnessError(f"{source.path}: {key} has shape {list(got[key])}, {what} wants "
                               f"{list(want[key])} (another model size, class count or input size).")


def load_into(model: torch.nn.Module, source: Source, conditioning: str, what: str) -> torch.nn.Module:
    """Copy the source's weights into `model` (its own fixed pos_embed kept) after check_fits."""
    check_fits(source, model, conditioning, what)
    sd = {k: v for k, v in source.state_dict.items() if k != "pos_embed"}
    sd["pos_embed"] = model.state_dict()["pos_embed"]
    model.load_state_dict(sd)
    return model


# ----------------------------------------------------------------------------- export and import
#: the diffusion DiT trains with (harness.models.diffusion.DIFFUSERS_PROCESS), as a DDIM scheduler
SCHEDULER_CONFIG = {**DIFFUSERS_PROCESS, "clip_sample": False, "set_alpha_to_one": True, "steps_offset": 0,
                    "timestep_spacing": "leading"}


def _run_checkpoint(path: Path) -> Path:
    """A checkpoint file as given, or the newest verified checkpoint of a run folder."""
    if path.is_file():
        return path
    found = list_checkpoints(path / "checkpoints") if path.is_dir() else []
    if found and (problem := verify_checkpoint(found[-1][1])) is not None:  # never an older step in silence
        older = [c for _, c in found[:-1] if verify_checkpoint(c) is None]
        alt = f"or pass {older[-1]} to export that step" if older else "or retrain the run"
        raise HarnessError(f"{found[-1][1]}: the run's newest checkpoint is not valid ({problem}). Fix: run "
                           f"`harness sweep` on its spec, which re-verifies or quarantines it, {alt}.")
    if found:
        return found[-1][1]
    raise HarnessError(f"{path}: neither a checkpoint file nor a run folder with a valid checkpoints/step_*.pt.")


def _id2label(data: DataSpec) -> dict[str, str]:
    """Class names: the digits, or an ImageFolder's class folder names (WordNet ids) when it is here."""
    if data.dataset == "digits":
        return {str(i): str(i) for i in range(data.num_classes)}
    try:
        root = Path(data.resolved_path() or "")
        names = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    except (OSError, HarnessError):
        names = []
    return {str(i): n for i, n in enumerate(names)} if len(names) == data.num_classes else {}


def export_diffusers(src: str | Path, out: str | Path, raw: bool = False) -> Path:
    """Write a DiTPipeline folder (transformer, scheduler, vae or a note, id2label) from a checkpoint or
    run folder; the folder appears whole or not at all."""
    import shutil
    import tempfile

    import diffusers
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    out = Path(out)
    if out.exists():
        raise HarnessError(f"{out}: already exists; export writes a new folder (remove it or pick another name).")
    ckpt = _run_checkpoint(Path(src))
    model, run, _ = model_from_checkpoint(ckpt, use_ema=not raw, arg="CHECKPOINT_OR_RUN", raw_flag="--raw")
    check_exportable(run.conditioning, str(ckpt))
    data = run.data
    transformer = DiTTransformer2DModel(**diffusers_config(model))
    missing, unexpected = transformer.load_state_dict(to_diffusers_state_dict(model.state_dict(), len(model.blocks)),
                                                      strict=False)
    if unexpected or set(missing) - {"pos_embed.pos_embed"}:
        raise HarnessError(f"{ckpt}: diffusers {diffusers.__version__} expects other tensors "
                           f"(missing {missing[:3]}, unexpected {unexpected[:3]}).")
    scheduler = DDIMScheduler(**SCHEDULER_CONFIG)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        if data.autoencoder != "identity":  # a whole DiTPipeline: transformer, scheduler, vae
            vae = load_autoencoder(data.autoencoder, data.resolved_autoencoder_path()).vae
            DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler).save_pretrained(tmp, safe_serialization=True)
            index = json.loads((tmp / "model_index.json").read_text())
            index["id2label"] = _id2label(data)
            (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        else:  # pixel space: DiTPipeline cannot load without a VAE, so the two parts a sampling loop needs
            transformer.save_pretrained(tmp / "transformer", safe_serialization=True)
            scheduler.save_pretrained(tmp / "scheduler")
        (tmp / "README.md").write_text(export_readme(run, ckpt, raw))
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _pipeline_snippet(run: RunSpec) -> str:
    """Python that loads a latent-space export with DiTPipeline and samples it (run in the export folder)."""
    labels = [0, 1, 2, 3] if run.data.num_classes >= 4 else [0]
    return ("import torch\n"
            "from diffusers import DiTPipeline\n\n"
            'EXPORT = "."  # this folder\n'
            "pipe = DiTPipeline.from_pretrained(EXPORT, local_files_only=True)\n"
            "generator = torch.Generator().manual_seed(0)\n"
            f"images = pipe(class_labels={labels}, num_inference_steps=25, guidance_scale=1.0,\n"
            '              generator=generator, output_type="np").images  # N x H x W x 3 floats in [0, 1]\n')


def _pixel_snippet(run: RunSpec) -> str:
    """Python that samples a pixel-space export with its transformer and DDIM scheduler (in the export folder)."""
    data = run.data
    channels = data.channels  # pixel space: 1 for digits, else 3
    labels = list(range(min(4, data.num_classes)))
    return ("import torch\n"
            "from diffusers import DDIMScheduler, DiTTransformer2DModel\n\n"
            'EXPORT = "."  # this folder\n'
            'transformer = DiTTransformer2DModel.from_pretrained(f"{EXPORT}/transformer", local_files_only=True)\n'
            'scheduler = DDIMScheduler.from_pretrained(f"{EXPORT}/scheduler", local_files_only=True)\n'
            f"labels = torch.tensor({labels})\n"
            f"x = torch.randn(len(labels), {channels}, {data.image_size}, {data.image_size}, "
            "generator=torch.Generator().manual_seed(0))\n"
            "scheduler.set_timesteps(50)\n"
            "with torch.no_grad():\n"
            "    for t in scheduler.timesteps:\n"
            "        out = transformer(x, timestep=t.expand(len(x)), class_labels=labels).sample\n"
            f"        eps = out[:, :{channels}]  # the other half is the learned variance, which DDIM does not use\n"
            "        x = scheduler.step(eps, t, x).prev_sample\n"
            "images = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # N x C x H x W, the pixels themselves\n")


def export_readme(run: RunSpec, ckpt: Path, raw: bool) -> str:
    """The exported folder's README: what it holds, and a loading snippet that runs from inside the folder."""
    data = run.data
    pixel = data.autoencoder == "identity"
    holds = ("transformer/ and scheduler/ only: this model works in pixel space (identity autoencoder), and "
             "DiTPipeline needs a VAE to load, so sample with the transformer and the scheduler as below; the "
             "samples are the pixels." if pixel else
             f"a DiTPipeline: transformer/, scheduler/ and vae/ (the run's {data.autoencoder} weights; latents "
             "are scaled by 0.18215).")
    return (f"# {run.model} ({run.conditioning}) from the DiT scaling harness\n\n"
            f"- checkpoint: {ckpt.name} (step {ckpt.stem.removeprefix('step_').lstrip('0') or 0}) of run "
            f"{run.run_id}, {'raw (trained)' if raw else 'EMA'} weights\n"
            f"- data: {data.dataset} at {data.image_size} px, {data.num_classes} classes "
            f"(null class {data.num_classes}; DiTPipeline hard-codes 1000, so guidance_scale > 1 needs a 1000-class model)\n"
            f"- holds {holds}\n"
            "- The weights are copied exactly. diffusers' DiT spaces its timestep frequencies as 10000^(-i/127), the "
            "official DiT (where these weights were trained) as 10000^(-i/128), so diffusers' outputs differ slightly "
            "from the harness's for the same weights (see the harness README, 'diffusers').\n\n"
            "## Sampling, offline (run from this folder)\n\n"
            f"```python\n{_pixel_snippet(run) if pixel else _pipeline_snippet(run)}```\n")


def import_weights(src: str | Path, fmt: str, out: str | Path) -> Path:
    """Write our (official-layout) state dict from a diffusers folder or an official .pt, atomically."""
    src, out = Path(src), Path(out)
    if fmt == "diffusers":
        if not src.is_dir():
            raise HarnessError(f"{src}: --from diffusers wants a DiTPipeline folder or its transformer/ folder.")
        source = read_diffusers(src)
    elif fmt == "official":
        source = read_source(src)
        if source.kind != "state-dict":
            raise HarnessError(f"{src}: --from official wants a plain state dict such as DiT-XL-2-256x256.pt.")
        if "x_embedder.proj.weight" not in source.state_dict:
            raise HarnessError(f"{src}: no x_embedder.proj.weight; not a DiT state dict in the official layout.")
    else:
        raise HarnessError(f"--from {fmt!r}: use diffusers or official.")
    sd = {k: v.contiguous() for k, v in source.state_dict.items()}
    atomic_write(out, lambda f: torch.save(sd, f), mode="wb")
    return out


def add_export_arguments(s) -> None:
    """`harness export`'s flags."""
    s.add_argument("source", help="a checkpoint step_XXXXXXX.pt or a run folder (its newest valid checkpoint)")
    s.add_argument("--to", choices=["diffusers"], default="diffusers", help="the target layout")
    s.add_argument("out", help="new folder to write")
    s.add_argument("--raw", action="store_true", help="the trained weights instead of the EMA")


def add_import_arguments(s) -> None:
    """`harness import`'s flags."""
    s.add_argument("source", help="a DiTPipeline (or transformer/) folder, or an official DiT .pt")
    s.add_argument("--from", dest="fmt", choices=["diffusers", "official"], required=True)
    s.add_argument("out", help="the .pt file to write (official layout)")


def cli_export(args: Any) -> int:
    """`harness export CHECKPOINT_OR_RUN --to diffusers OUT [--raw]`."""
    out = export_diffusers(args.source, args.out, raw=args.raw)
    weights = "raw" if args.raw else "EMA"
    if (out / "model_index.json").exists():
        print(f"{out}: DiTPipeline folder ({weights} weights); "
              f"load with DiTPipeline.from_pretrained({str(out)!r}, local_files_only=True)")
    else:
        print(f"{out}: pixel-space DiTTransformer2DModel and DDIMScheduler ({weights} weights; DiTPipeline needs a "
              f"VAE, so it does not load this one); {out / 'README.md'} has the sampling loop")
    return 0


def cli_import(args: Any) -> int:
    """`harness import SOURCE --from diffusers|official OUT.pt`."""
    out = import_weights(args.source, args.fmt, args.out)
    print(f"{out}: state dict in the official DiT layout; use it as train.init_from or load it in the official code")
    return 0


# ----------------------------------------------------------------------------- train.init_from
def check_init_source(path: str, runs: list[RunSpec]) -> None:
    """HarnessError (naming the file and the first mismatch) unless `path` fits every run's model."""
    source = read_source(path)
    for run in runs:
        with torch.device("meta"):
            model = build_run_model(run, "meta")
        check_fits(source, model, run.conditioning, f"run {run.run_id} ({run.model}, {run.conditioning})")


def init_from_source(run: RunSpec, model: torch.nn.Module, ema: torch.nn.Module) -> None:
    """Start `model` and its EMA from train.init_from (weights only; the optimizer starts fresh)."""
    source = read_source(expand_path(run.train.init_from, "train.init_from"))
    load_into(model, source, run.conditioning, f"run {run.run_id} ({run.model}, {run.conditioning})")
    ema.load_state_dict(model.state_dict())
    log.info("initialised %s from %s (%s)", run.run_id, source.path, source.kind)
