"""The `harness` command line: one sub-command per stage of the data flow.

Each sub-command's body and flags live next to the code it drives (`cli_<command>(args)` and
`add_<command>_arguments(parser)`); this module composes them. A command's module is imported only
when that command is called (or its --help asked for), so `harness --help` and `harness plan` start fast.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from harness.errors import HarnessError
from harness.config.arguments import auto_or_positive_int, positive_int
from harness.config.vocab import FEATURE_SPACES, GUIDANCE_CHANNELS, SAMPLERS
from harness.config.registry import CONDITIONINGS
from harness.config.spec import AUTOENCODERS, PRECISIONS

# sub-command -> (module, help); the module holds cli_<command> (its body, which takes the parsed
# argparse.Namespace) and add_<command>_arguments (its flags), except where _FLAGS_HERE says otherwise.
COMMANDS = {
    "flops": ("harness.models.flops", "Gflops and parameters of DiT variants (fvcore)"),
    "latents": ("harness.data.latents", "pre-extract autoencoder latents into the shared cache"),
    "train": ("harness.training.train", "train one model (standalone, or the body of a sweep job)"),
    "bench": ("harness.training.bench", "training and sampling throughput on this device"),
    "sample": ("harness.sampling.sample", "sample images from a checkpoint into a grid and an ADM npz"),
    "evaluate": ("harness.metrics.evaluate", "FID, sFID, IS, precision and recall of an npz of samples"),
    "plan": ("harness.cost.plan", "runs, Gflops and compute of a sweep, without running it"),
    "sweep": ("harness.launch.dispatch", "dispatch a sweep's training and evaluation jobs"),
    "status": ("harness.launch.status", "state and progress of each run of a sweep"),
    "export": ("harness.interop.convert", "write a checkpoint as a diffusers DiTPipeline folder"),
    "import": ("harness.interop.convert", "turn diffusers or official DiT weights into a state dict for "
                                          "train.init_from"),
    "report": ("harness.report", "render the HTML and PDF report of a sweep"),
    "forecast": ("harness.study.forecast", "back-test scaling laws (fit on the smaller runs, predict the held-out "
                                           "ones), or forecast a run's FID at a later step from its first checkpoints"),
}


# The flags of train, bench and sample are still declared here: their modules are being reworked
# beside this change (issue 22, the one model builder and batch geometry); they move next to their
# bodies with that work.
def _train_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("--run-dir", required=True, help="run folder; resumes from its newest checkpoint")
    s.add_argument("--config", default=None, help="run.json to train from (default: RUN_DIR/run.json)")
    s.add_argument("--model", default=None, help="standalone: model name (writes RUN_DIR/run.json)")
    s.add_argument("--conditioning", default="adaLN-Zero", choices=CONDITIONINGS)
    s.add_argument("--data", default="digits")
    s.add_argument("--image-size", type=positive_int, default=None)
    s.add_argument("--autoencoder", default=None, choices=AUTOENCODERS)
    s.add_argument("--steps", type=positive_int, default=None)
    s.add_argument("--batch", type=positive_int, default=None, help="global batch")
    s.add_argument("--lr", type=float, default=None)
    s.add_argument("--precision", choices=PRECISIONS, default=None)
    s.add_argument("--compile", action="store_true")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="standalone: data/train/eval values, e.g. train.lr=2e-4 train.warmup_steps=100")


def _bench_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("--model", default=None, help="one model, e.g. DiT-XL/2")
    s.add_argument("--suite", nargs="?", const="paper", default=None,
                   help="bench several models in each configuration worth trying: 'paper' (the 12, default) "
                        "or M1,M2,...; prints a markdown table with the best configuration per model")
    s.add_argument("--out", default=None, help="write the JSON here (a suite also writes the .md table beside it)")
    s.add_argument("--conditioning", default="adaLN-Zero", choices=CONDITIONINGS)
    s.add_argument("--batch", type=positive_int, default=8, help="batch per device (the paper: 256 on one GPU)")
    s.add_argument("--micro-batch", type=auto_or_positive_int, default="auto",
                   help="auto (the largest that fits, as training does) or a divisor of --batch")
    s.add_argument("--steps", type=positive_int, default=10)
    s.add_argument("--warmup", type=positive_int, default=2)
    s.add_argument("--precision", choices=PRECISIONS, default="fp32")
    s.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                   help="auto: compiled on CUDA, eager on the CPU (as training)")
    s.add_argument("--grad-checkpointing", action="store_true")
    s.add_argument("--input-size", type=positive_int, default=32, help="latent side (32 = 256px through the SD VAE)")
    s.add_argument("--in-channels", type=positive_int, default=4)
    s.add_argument("--latents", action="store_true",
                   help="also time the latent stage: SD VAE encodes/s at input-size x 8 px, --batch images")
    s.add_argument("--sampling-steps", type=positive_int, default=None,
                   help="also time evaluation end to end (DDPM with this many steps, VAE decode, features) as "
                        "eval.* resolve here; with --suite, once per model (what `harness plan --throughput-from` uses)")
    s.add_argument("--eval-samples", type=positive_int, default=50_000, help="images of the projected evaluation")
    s.add_argument("--eval-batch", type=auto_or_positive_int, default="auto", help="eval.batch_size: auto or images")
    s.add_argument("--eval-precision", choices=("auto",) + tuple(PRECISIONS), default="auto",
                   help="eval.precision (auto: bf16 on CUDA, fp32 on the CPU)")
    s.add_argument("--eval-features", choices=FEATURE_SPACES, default="inception")
    s.add_argument("--inception-weights", default=None,
                   help="FID Inception weights for --sampling-steps (default: its architecture, random weights)")
    s.add_argument("--autoencoder-path", default=None,
                   help="SD VAE weights for --latents/--sampling-steps (default: its architecture, random weights)")
    s.add_argument("--format", choices=["table", "json"], default="table")


def _sample_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("--checkpoint", required=True)
    s.add_argument("--num-samples", type=positive_int, default=64)
    s.add_argument("--labels", choices=["balanced", "random"], default="balanced")
    s.add_argument("--cfg-scale", type=float, default=1.0)
    s.add_argument("--guidance-channels", choices=[str(c) for c in GUIDANCE_CHANNELS], default="3")
    s.add_argument("--steps", type=positive_int, default=250, help="sampling steps (respaced)")
    s.add_argument("--sampler", choices=list(SAMPLERS), default="ddpm")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--batch-size", type=auto_or_positive_int, default="auto",
                   help="images per batch; auto: the largest that fits (as eval.batch_size)")
    s.add_argument("--precision", choices=("auto",) + tuple(PRECISIONS), default="auto",
                   help="the network's and decoder's autocast; auto: bf16 on CUDA, fp32 on the CPU")
    s.add_argument("--compile", choices=["auto", "on", "off"], default="auto", help="auto: compiled on CUDA only")
    s.add_argument("--no-ema", action="store_true", help="use the raw weights, not the EMA")
    s.add_argument("--out", required=True, help="output folder (grid.png, samples.npz)")


_FLAGS_HERE = {"train": _train_arguments, "bench": _bench_arguments, "sample": _sample_arguments}


def _add_arguments(command: str, parser: argparse.ArgumentParser) -> None:
    """`command`'s flags onto its sub-parser: declared beside its body (importing that module)."""
    if command in _FLAGS_HERE:
        _FLAGS_HERE[command](parser)
        return
    module = importlib.import_module(COMMANDS[command][0])
    getattr(module, f"add_{command}_arguments")(parser)


def _command_of(argv: list[str]) -> str | None:
    """The sub-command argv names (its first word that is not an option: the top level's only
    option, -v/--verbose, takes no value), or None."""
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser with every sub-command listed; the flags of the one `argv` names, or of every
    command when argv is None."""
    p = argparse.ArgumentParser(prog="harness", description="DiT scaling-study harness.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    wanted = set(COMMANDS) if argv is None else {_command_of(argv)}
    for command, (_, help_) in COMMANDS.items():
        s = sub.add_parser(command, help=help_)
        if command in wanted:
            _add_arguments(command, s)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
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
    try:
        func = getattr(importlib.import_module(COMMANDS[args.command][0]), f"cli_{args.command}")
        return int(func(args) or 0)
    except HarnessError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
