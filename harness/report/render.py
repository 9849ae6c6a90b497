"""Writing a report: figures folder, index.html (jinja2 template), report.pdf (the same template's
print page, printed by Chromium: harness.report.pdf), manifest.

A report is described by a `Report` (figures, tables, notes, each figure and table in a section);
`write_report` turns it into files. Every file is written atomically (harness.io).
"""
from __future__ import annotations

import datetime as _dt
import logging
import platform
import subprocess
from dataclasses import dataclass, field
from importlib import metadata, resources
from pathlib import Path

import jinja2
from matplotlib.figure import Figure

from harness.io import atomic_write_json, atomic_write_text
from harness.report.figures import save_figure
from harness.report.pdf import print_pdf

log = logging.getLogger(__name__)

PACKAGES = ["dit-harness", "numpy", "scipy", "pandas", "matplotlib", "torch", "torchvision", "diffusers",
            "fvcore", "torch-fidelity", "submitit", "jinja2"]
#: the report body's sections, in reading order: (key, heading). Figures and tables name their section;
#: "details" is the collapsed part below (fit diagnostics, candidate laws, provenance).
SECTIONS = [("scaling", "Scaling with model size and compute"), ("training", "Training curves"),
            ("forecast", "Forecast"), ("ablations", "Conditioning and sampling"), ("samples", "Samples"),
            ("cost", "Cost"), ("details", "Details")]
PRINT_PAGE = ".print.html"  # the print page, next to index.html while Chromium prints it


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]]
    note: str = ""
    section: str = "details"


@dataclass
class FigureSpec:
    name: str          # file stem under figures/
    title: str
    caption: str
    figure: Figure
    section: str = "scaling"


@dataclass
class Report:
    title: str
    name: str                                   # folder under the reports root
    notes: list[str] = field(default_factory=list)        # the closing notes (correlation, fits)
    figures: list[FigureSpec] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    missing: list[tuple[str, str]] = field(default_factory=list)
    expected_runs: int | None = None
    provenance: Table | None = None             # feature space of every metric
    spec_text: str | None = None
    csv_name: str | None = None
    csv_text: str | None = None
    headline: str | None = None                 # name of the figure the report opens with
    findings: Table | None = None               # the findings table under it; last column: a figure name


def package_versions() -> list[tuple[str, str]]:
    out = [("python", platform.python_version())]
    for name in PACKAGES:
        try:
            out.append((name, metadata.version(name)))
        except metadata.PackageNotFoundError:
            out.append((name, "not installed"))
    return out


def git_revision() -> str:
    """`git describe --always --dirty` of the checkout holding this package, or 'unknown'."""
    here = Path(__file__).resolve().parent
    try:
        res = subprocess.run(["git", "-C", str(here), "describe", "--always", "--dirty", "--abbrev=12"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown (git not available)"
    rev = res.stdout.strip()
    return rev if res.returncode == 0 and rev else "unknown (not a git checkout or no commit yet)"


def _template() -> jinja2.Template:
    folder = resources.files("harness.report").joinpath("templates")
    env = jinja2.Environment(autoescape=jinja2.select_autoescape(["html"]), undefined=jinja2.StrictUndefined)
    env.globals["css"] = folder.joinpath("report.css").read_text()
    env.globals["print_css"] = folder.joinpath("print.css").read_text()
    return env.from_string(folder.joinpath("report.html").read_text())


def layout_context(rep: Report) -> dict:
    """What the template places where: the headline figure, then each section's other figures and tables
    (body: key -> {"figures", "tables"}, only sections with content; "details" always)."""
    head = next((f for f in rep.figures if f.name == rep.headline), None)
    known = {k for k, _ in SECTIONS}
    body: dict[str, dict] = {"details": {"figures": [], "tables": []}}
    for f in rep.figures:
        if f is not head:
            body.setdefault(f.section if f.section in known else "details", {"figures": [], "tables": []})[
                "figures"].append(f)
    for t in rep.tables:
        body.setdefault(t.section if t.section in known else "details", {"figures": [], "tables": []})[
            "tables"].append(t)
    return {"head": head, "body": body, "sections": SECTIONS, "figure_names": {f.name for f in rep.figures},
            "figure_titles": {f.name: f.title for f in rep.figures}}


def write_report(rep: Report, out_root: str | Path) -> dict:
    """Write figures/*.png|svg, index.html, report.pdf, the CSV and manifest.json under out_root/name.
    Without Chromium there is no PDF: manifest["pdf"] is None and manifest["pdf_note"] says why."""
    out = Path(out_root) / rep.name
    (out / "figures").mkdir(parents=True, exist_ok=True)
    versions, rev = package_versions(), git_revision()
    when = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    for f in rep.figures:
        save_figure(f.figure, out / "figures", f.name)
    if rep.csv_name and rep.csv_text is not None:
        atomic_write_text(out / rep.csv_name, rep.csv_text)
    page, context = _template(), layout_context(rep)
    for name, printing in ((PRINT_PAGE, True), ("index.html", False)):
        atomic_write_text(out / name, page.render(rep=rep, versions=versions, rev=rev, when=when,
                                                  printing=printing, **context))
    try:
        pdf_note = print_pdf(out / PRINT_PAGE, out / "report.pdf")
    finally:
        (out / PRINT_PAGE).unlink(missing_ok=True)
    if pdf_note:
        log.warning("%s", pdf_note)
    manifest = {
        "name": rep.name, "title": rep.title, "generated": when, "git_revision": rev,
        "figures": [f.name for f in rep.figures], "headline": rep.headline,
        "sections": {f.name: f.section for f in rep.figures},
        "pdf": None if pdf_note else "report.pdf", "pdf_note": pdf_note,
        "missing": dict(rep.missing), "notes": rep.notes, "csv": rep.csv_name,
    }
    atomic_write_json(out / "manifest.json", manifest)
    log.info("report written: %s (%d figures)", out / "index.html", len(rep.figures))
    return manifest
