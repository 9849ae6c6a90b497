"""Report rendering: figures (matplotlib), index.html (jinja2), report.pdf, the tidy CSV.

`harness report SWEEP` -> reports/<sweep>/; `harness report --paper` -> reports/paper/.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from harness.errors import HarnessError

log = logging.getLogger(__name__)

__all__ = ["cli_report", "report_sweep", "render_sweep_report", "render_paper_report"]


def render_sweep_report(results_root, sweep, out_root, n_boot: int = 500) -> dict:
    from harness.report.sweep import render_sweep_report as _render  # matplotlib and torch: only when rendering
    return _render(results_root, sweep, out_root, n_boot=n_boot)


def render_paper_report(out_root, n_boot: int = 1000) -> dict:
    from harness.report.paper import render_paper_report as _render  # matplotlib and torch: only when rendering
    return _render(out_root, n_boot=n_boot)


def add_report_arguments(s: argparse.ArgumentParser) -> None:
    """`harness report`'s flags."""
    s.add_argument("sweep", nargs="?", help="sweeps/NAME.yaml or a sweep name")
    s.add_argument("--paper", action="store_true", help="render the paper's own Table 4 numbers")
    s.add_argument("--results", default="results")
    s.add_argument("--out", default="reports", help="reports root")


def cli_report(args: argparse.Namespace) -> int:
    """`harness report [SWEEP] [--paper] [--results ROOT] [--out ROOT]`."""
    if not args.paper and not args.sweep:
        raise HarnessError("harness report: name a sweep (sweeps/NAME.yaml or NAME), or pass --paper")
    if args.paper:
        manifest = render_paper_report(args.out)
        print(f"wrote {Path(args.out) / manifest['name'] / 'index.html'}" + (" and report.pdf" if manifest["pdf"] else ""))
        if manifest["pdf_note"]:
            print(manifest["pdf_note"])
        for note in manifest["notes"][:1]:
            print(note)
    if args.sweep:
        report_sweep(args.results, args.sweep, args.out)
    return 0


def report_sweep(results_root, sweep, out_root) -> dict:
    """Render a sweep's report and say on stdout where it is and which runs are missing."""
    manifest = render_sweep_report(results_root, sweep, out_root)
    out = Path(out_root) / manifest["name"]
    print(f"wrote {out / 'index.html'}, " + (f"{out / 'report.pdf'}, " if manifest["pdf"] else "") + f"{out / manifest['csv']}")
    if manifest["pdf_note"]:
        print(manifest["pdf_note"])
    if manifest["missing"]:
        print(f"partial sweep: {len(manifest['missing'])} run(s) missing: {', '.join(manifest['missing'])}")
    return manifest
