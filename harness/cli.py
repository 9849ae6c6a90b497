"""The `harness` command line: one sub-command per stage of the data flow.

Each sub-command's body lives next to the code it drives and is imported only when called,
so `harness --help` and `harness plan` start fast.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from harness import hardware
from harness.errors import HarnessError
from harness.config.vocab import FEATURE_SPACES, GUIDANCE_CHANNELS, METRICS, SAMPLERS
from harness.config.registry import CONDITIONINGS
from harness.config.spec import AUTOENCODERS, LAUNCHERS, PRECISIONS

# The choices below come from the layer that owns each vocabulary; all of these import without torch.

# sub-command -> "module:function"; each function takes the parsed argparse.Namespace.
COMMANDS = {
    "flops": "harness.models.flops:cli_flops",
    "latents": "harness.data.latents:cli_latents",
    "train": "harness.training.train:cli_train",
    "bench": "harness.training.bench:cli_bench",
    "sample": "harness.sampling.sample:cli_sample",
    "evaluate": "harness.metrics.evaluate:cli_evaluate",
    "plan": "harness.cost.plan:cli_plan",
    "sweep": "harness.launch.dispatch:cli_sweep",
    "status": "harness.launch.status:cli_status",
    "report": "harness.report:cli_report",
    "forecast": "harness.study.forecast:cli_forecast",
    "export": "harness.interop.convert:cli_export",
    "import": "harness.interop.convert:cli_import",
}


def _positive_int(text: str) -> int:
    """argparse type for counts and sizes: an integer >= 1, else a one-line usage error."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _auto_or_positive_int(text: str) -> int | str:
    """argparse type: 'auto' or an integer >= 1."""
    return text if text == "auto" else _positive_int(text)


def _csv_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def build_parser() -> argparse.ArgumentParser:
    # Long on purpose: one flat declaration per sub-command, read as a table of the CLI's options.
    p = argparse.ArgumentParser(prog="harness", description="DiT scaling-study harness.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("flops", help="Gflops and parameters of DiT variants (fvcore)")
    s.add_argument("--model", action="append", help="e.g. DiT-XL/2 or DiT-4x64x2/2 (repeatable)")
    s.add_argument("--conditioning", action="append", choices=CONDITIONINGS, help="conditioning block (repeatable)")
    s.add_argument("--image-size", type=_positive_int, default=256, help="pixels; the latent is size/8 unless --pixel")
    s.add_argument("--pixel", action="store_true", help="count in pixel space (no VAE downsampling)")
    s.add_argument("--in-channels", type=_positive_int, default=None, help="default 4 (latent) or 3 (--pixel)")
    s.add_argument("--format", choices=["table", "csv", "json"], default="table")

    s = sub.add_parser("latents", help="pre-extract autoencoder latents into the shared cache")
    s.add_argument("--data", required=True, help="'digits' or an ImageFolder path (ImageNet train layout)")
    s.add_argument("--autoencoder", default="sd-vae-ft-ema", choices=AUTOENCODERS)
    s.add_argument("--autoencoder-path", default=None, help="local folder of the VAE weights")
    s.add_argument("--image-size", type=_positive_int, default=256)
    s.add_argument("--batch-size", type=_positive_int, default=32)
    s.add_argument("--allow-download", action="store_true", help="let diffusers fetch the VAE from the hub")
    s.add_argument("--shard", default=None, help="I/N: encode only task I's share of N (shards I, I+N, ...); "
                   "'slurm': this Slurm task's (SLURM_PROCID/SLURM_NTASKS)")
    s.add_argument("--tasks", type=_positive_int, default=1, help="run N tasks here (one per GPU), then finish")
    s.add_argument("--workers", type=int, default=None,
                   help="DataLoader workers per task (default: the task's CPUs less one)")

    s = sub.add_parser("train", help="train one model (standalone, or the body of a sweep job)")
    s.add_argument("--run-dir", required=True, help="run folder; resumes from its newest checkpoint")
    s.add_argument("--config", default=None, help="run.json to train from (default: RUN_DIR/run.json)")
    s.add_argument("--model", default=None, help="standalone: model name (writes RUN_DIR/run.json)")
    s.add_argument("--conditioning", default="adaLN-Zero", choices=CONDITIONINGS)
    s.add_argument("--data", default="digits")
    s.add_argument("--image-size", type=_positive_int, default=None)
    s.add_argument("--autoencoder", default=None, choices=AUTOENCODERS)
    s.add_argument("--steps", type=_positive_int, default=None)
    s.add_argument("--batch", type=_positive_int, default=None, help="global batch")
    s.add_argument("--lr", type=float, default=None)
    s.add_argument("--precision", choices=PRECISIONS, default=None)
    s.add_argument("--compile", action="store_true")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="standalone: data/train/eval values, e.g. train.lr=2e-4 train.warmup_steps=100")

    s = sub.add_parser("bench", help="training and sampling throughput on this device")
    s.add_argument("--model", default=None, help="one model, e.g. DiT-XL/2")
    s.add_argument("--suite", nargs="?", const="paper", default=None,
                   help="bench several models in each configuration worth trying: 'paper' (the 12, default) "
                        "or M1,M2,...; prints a markdown table with the best configuration per model")
    s.add_argument("--out", default=None, help="write the JSON here (a suite also writes the .md table beside it)")
    s.add_argument("--conditioning", default="adaLN-Zero", choices=CONDITIONINGS)
    s.add_argument("--batch", type=_positive_int, default=8, help="batch per device (the paper: 256 on one GPU)")
    s.add_argument("--micro-batch", type=_auto_or_positive_int, default="auto",
                   help="auto (the largest that fits, as training does) or a divisor of --batch")
    s.add_argument("--steps", type=_positive_int, default=10)
    s.add_argument("--warmup", type=_positive_int, default=2)
    s.add_argument("--precision", choices=PRECISIONS, default="fp32")
    s.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                   help="auto: compiled on CUDA, eager on the CPU (as training)")
    s.add_argument("--grad-checkpointing", action="store_true")
    s.add_argument("--input-size", type=_positive_int, default=32, help="latent side (32 = 256px through the SD VAE)")
    s.add_argument("--in-channels", type=_positive_int, default=4)
    s.add_argument("--latents", action="store_true",
                   help="also time the latent stage: SD VAE encodes/s at input-size x 8 px, --batch images")
    s.add_argument("--sampling-steps", type=_positive_int, default=None,
                   help="also time evaluation end to end (DDPM with this many steps, VAE decode, features) as "
                        "eval.* resolve here; with --suite, once per model (what `harness plan --throughput-from` uses)")
    s.add_argument("--eval-samples", type=_positive_int, default=50_000, help="images of the projected evaluation")
    s.add_argument("--eval-batch", type=_auto_or_positive_int, default="auto", help="eval.batch_size: auto or images")
    s.add_argument("--eval-precision", choices=("auto",) + tuple(PRECISIONS), default="auto",
                   help="eval.precision (auto: bf16 on CUDA, fp32 on the CPU)")
    s.add_argument("--eval-features", choices=FEATURE_SPACES, default="inception")
    s.add_argument("--inception-weights", default=None,
                   help="FID Inception weights for --sampling-steps (default: its architecture, random weights)")
    s.add_argument("--autoencoder-path", default=None,
                   help="SD VAE weights for --latents/--sampling-steps (default: its architecture, random weights)")
    s.add_argument("--format", choices=["table", "json"], default="table")

    s = sub.add_parser("sample", help="sample images from a checkpoint into a grid and an ADM npz")
    s.add_argument("--checkpoint", required=True)
    s.add_argument("--num-samples", type=_positive_int, default=64)
    s.add_argument("--labels", choices=["balanced", "random"], default="balanced")
    s.add_argument("--cfg-scale", type=float, default=1.0)
    s.add_argument("--guidance-channels", choices=[str(c) for c in GUIDANCE_CHANNELS], default="3")
    s.add_argument("--steps", type=_positive_int, default=250, help="sampling steps (respaced)")
    s.add_argument("--sampler", choices=list(SAMPLERS), default="ddpm")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--batch-size", type=_auto_or_positive_int, default="auto",
                   help="images per batch; auto: the largest that fits (as eval.batch_size)")
    s.add_argument("--precision", choices=("auto",) + tuple(PRECISIONS), default="auto",
                   help="the network's and decoder's autocast; auto: bf16 on CUDA, fp32 on the CPU")
    s.add_argument("--compile", choices=["auto", "on", "off"], default="auto", help="auto: compiled on CUDA only")
    s.add_argument("--no-ema", action="store_true", help="use the raw weights, not the EMA")
    s.add_argument("--out", required=True, help="output folder (grid.png, samples.npz)")

    s = sub.add_parser("evaluate", help="FID, sFID, IS, precision and recall of an npz of samples")
    s.add_argument("--samples", required=True, help="npz in the ADM layout (arr_0: N x H x W x 3 uint8)")
    s.add_argument("--reference", required=True, help="ADM reference npz, an image folder, or 'digits'")
    s.add_argument("--metrics", type=_csv_list, default=list(METRICS), help=f"comma-separated: {','.join(METRICS)}")
    s.add_argument("--features", choices=FEATURE_SPACES, default="inception")
    s.add_argument("--inception-weights", default=None, help="local FID Inception weights file")
    s.add_argument("--batch-size", type=_positive_int, default=100)
    s.add_argument("--json", default=None, help="write the metrics here too")

    s = sub.add_parser("plan", help="runs, Gflops and compute of a sweep, without running it")
    s.add_argument("sweep", help="sweeps/NAME.yaml")
    s.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="spec values to change, e.g. train.lr=2e-4 eval.at_steps=[1000,2000] (validated like the file)")
    s.add_argument("--format", choices=["table", "json"], default="table")
    s.add_argument("--throughput", type=float, default=None,
                   help="measured training images/s per accelerator (from `harness bench`)")
    s.add_argument("--throughput-model", default=None,
                   help="the model --throughput was measured on; other runs scale by its Gflops")
    s.add_argument("--forecast-from", default=None, metavar="SWEEP",
                   help="a finished smaller sweep: show each run's forecast FID from its chosen scaling law")
    s.add_argument("--results", default="results", help="results root of --forecast-from")
    s.add_argument("--throughput-from", default=None,
                   help="a `harness bench --suite ... --out FILE.json`: each run gets its own model's measured speed")
    s.add_argument("--gpu", type=str.lower, default=None,
                   help=f"GPU kind of the packaged throughput table behind the hours (have: {', '.join(hardware.gpus())}; "
                        "default launcher.gpu_kind)")
    s.add_argument("--nodes", type=_positive_int, default=None, help="plan the queue on this many nodes (default launcher.nodes)")
    s.add_argument("--gpus-per-node", type=_positive_int, default=None, help="GPUs a node (default launcher.gpus_per_node)")
    s.add_argument("--sampling-throughput", type=float, default=None,
                   help="measured sampling images/s per accelerator for one denoising step (`harness bench`)")
    s.add_argument("--latent-throughput", type=float, default=None,
                   help="measured VAE encodes/s per accelerator (`harness bench --latents`)")

    s = sub.add_parser("sweep", help="dispatch a sweep's training and evaluation jobs")
    s.add_argument("sweep", help="sweeps/NAME.yaml")
    s.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="spec values to change, e.g. train.lr=2e-4 eval.at_steps=[1000,2000] (validated like the file)")
    s.add_argument("--launcher", choices=LAUNCHERS, default=None,
                   help="override the spec's launcher.kind")
    s.add_argument("--results", default="results", help="results root")
    s.add_argument("--no-wait", action="store_true", help="submit and return (Slurm)")
    s.add_argument("--no-report", action="store_true", help="do not render the report at the end")
    s.add_argument("--dry-run", action="store_true",
                   help="check every input (data, weights, reference, folders, Slurm's sbatch --test-only), submit nothing")
    s.add_argument("--reports", default="reports", help="reports root of the closing report")

    s = sub.add_parser("status", help="state and progress of each run of a sweep")
    s.add_argument("sweep")
    s.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="spec values to change, e.g. train.lr=2e-4 eval.at_steps=[1000,2000] (validated like the file)")
    s.add_argument("--results", default="results")

    s = sub.add_parser("export", help="write a checkpoint as a diffusers DiTPipeline folder")
    s.add_argument("source", help="a checkpoint step_XXXXXXX.pt or a run folder (its newest valid checkpoint)")
    s.add_argument("--to", choices=["diffusers"], default="diffusers", help="the target layout")
    s.add_argument("out", help="new folder to write")
    s.add_argument("--raw", action="store_true", help="the trained weights instead of the EMA")

    s = sub.add_parser("import", help="turn diffusers or official DiT weights into a state dict for train.init_from")
    s.add_argument("source", help="a DiTPipeline (or transformer/) folder, or an official DiT .pt")
    s.add_argument("--from", dest="fmt", choices=["diffusers", "official"], required=True)
    s.add_argument("out", help="the .pt file to write (official layout)")

    s = sub.add_parser("report", help="render the HTML and PDF report of a sweep")
    s.add_argument("sweep", nargs="?", help="sweeps/NAME.yaml or a sweep name")
    s.add_argument("--paper", action="store_true", help="render the paper's own Table 4 numbers")
    s.add_argument("--results", default="results")
    s.add_argument("--out", default="reports", help="reports root")

    s = sub.add_parser("forecast", help="back-test scaling laws (fit on the smaller runs, predict the held-out "
                       "ones), or forecast a run's FID at a later step from its first checkpoints")
    s.add_argument("sweep", nargs="?", help="sweeps/NAME.yaml or a sweep name")
    s.add_argument("--paper", action="store_true", help="back-test on the paper's Table 4 (12 models, 400K steps)")
    s.add_argument("--table", default=None, metavar="FILE.csv",
                   help="back-test on any table: one row per model (name, params, gflops, tokens or input_size + "
                        "patch, steps or images_seen, fid, optional fid_se, size)")
    s.add_argument("--hold-out", default=None,
                   help="largest:K (by Gflops), size:S, patch:P, comma-separated model names / run ids, or all "
                        "(every family, pooled)")
    s.add_argument("--law", choices=["two-factor", "saturating", "power"], default=None,
                   help="fit this law instead of the default rule's choice (log FID, squares, offset free)")
    s.add_argument("--at-step", type=_positive_int, default=None,
                   help="with a sweep: forecast each run's FID at this training step from its early checkpoints")
    s.add_argument("--from-steps", type=_positive_int, default=None, metavar="K",
                   help="with --at-step: use the checkpoints at steps <= K (default: all evaluated ones)")
    s.add_argument("--step", type=_positive_int, default=None, help="evaluated step (default: the last most runs reached)")
    s.add_argument("--n-boot", type=_positive_int, default=200, help="bootstrap resamples for parameter intervals")
    s.add_argument("--results", default="results")
    s.add_argument("--format", choices=["table", "json"], default="table")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # KEY=VALUE overrides may follow options too (`harness plan SPEC --nodes 1 train.lr=2e-4`), which a
    # positional nargs="*" cannot take once an option has come between
    if hasattr(args, "overrides"):
        args.overrides += [x for x in extra if "=" in x and not x.startswith("-")]
        extra = [x for x in extra if not ("=" in x and not x.startswith("-"))]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    module_name, func_name = COMMANDS[args.command].split(":")
    try:
        func = getattr(importlib.import_module(module_name), func_name)
        return int(func(args) or 0)
    except HarnessError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
