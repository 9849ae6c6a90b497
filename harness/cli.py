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

# sub-command -> (module, help); the module holds cli_<command> (its body, which takes the parsed
# argparse.Namespace) and add_<command>_arguments (its flags).
COMMANDS = {
    "flops": ("harness.models.flops", "Gflops and parameters of DiT variants (fvcore)"),
    "latents": ("harness.data.latents", "pre-extract autoencoder latents into the shared cache"),
    "train": ("harness.training.train", "train one model (standalone, or the body of a sweep job)"),
    "bench": ("harness.cost.bench", "training and sampling throughput on this device"),
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


def _add_arguments(command: str, parser: argparse.ArgumentParser) -> None:
    """`command`'s flags onto its sub-parser: declared beside its body (importing that module)."""
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
