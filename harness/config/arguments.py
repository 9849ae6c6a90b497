"""What the command line's sub-commands share: argparse value types and the spec's KEY=VALUE overrides.

Each command declares its own flags beside its body (`add_<command>_arguments(parser)`), and
harness.cli composes them; these helpers sit here, torch-free and below every stage, so that each
of those modules can use them.
"""
from __future__ import annotations

import argparse

from harness.config.vocab import COMPILE_MODES


def positive_int(text: str) -> int:
    """argparse type for counts and sizes: an integer >= 1, else a one-line usage error."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def auto_or_positive_int(text: str) -> int | str:
    """argparse type: 'auto' or an integer >= 1."""
    return text if text == "auto" else positive_int(text)


def add_compile_mode_argument(parser: argparse.ArgumentParser) -> None:
    """--compile-mode: torch.compile's mode when compiled (train.compile_mode / eval.compile_mode)."""
    parser.add_argument("--compile-mode", choices=COMPILE_MODES, default="default",
                        help="torch.compile's mode when compiled: default, the max-autotune kernel searches "
                             "(minutes more compiling), or CUDA graphs (reduce-overhead, max-autotune)")


def csv_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def add_spec_arguments(parser: argparse.ArgumentParser, help: str | None = "sweeps/NAME.yaml") -> None:
    """The sweep spec and the KEY=VALUE overrides that follow it (plan, sweep, status)."""
    parser.add_argument("sweep", help=help)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="spec values to change, e.g. train.lr=2e-4 eval.at_steps=[1000,2000] "
                             "(validated like the file)")
