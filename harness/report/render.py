"""Writing a report: figures folder, index.html (jinja2 template), report.pdf (PdfPages), manifest.

A report is described by a `Report` (figures, tables, notes); `write_report` turns it into files.
Every file is written atomically (harness.io).
"""
from __future__ import annotations

import datetime as _dt
import html
import io
import logging
import platform
import subprocess
import textwrap
from dataclasses import dataclass, field
from importlib import metadata, resources
from pathlib import Path

import jinja2
from matplotlib.backends.backend_pdf import PdfPages
from matplotlib.figure import Figure

from harness.io import atomic_write, atomic_write_json, atomic_write_text
from harness.report.figures import save_figure

log = logging.getLogger(__name__)

PACKAGES = ["dit-harness", "numpy", "scipy", "pandas", "matplotlib", "torch", "torchvision", "diffusers",
            "fvcore", "torch-fidelity", "submitit", "jinja2"]
LINES_PER_PAGE = 58
WRAP = 112  # characters per line of monospace text on an A4 page


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]]
    note: str = ""


@dataclass
class FigureSpec:
    name: str          # file stem under figures/
    title: str
    caption: str
    figure: Figure


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
    headline: str | None = None                 # name of the figure on the PDF's first page
    findings: Table | None = None               # the findings with their intervals, on that page


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


def _text_pages(title: str, lines: list[str], size: tuple[float, float] = (8.27, 11.69)) -> list[Figure]:
    """Monospace text on A4 pages, LINES_PER_PAGE lines each."""
    pages = []
    chunks = [lines[i:i + LINES_PER_PAGE] for i in range(0, max(len(lines), 1), LINES_PER_PAGE)]
    for k, chunk in enumerate(chunks):
        fig = Figure(figsize=size, dpi=100)
        head = title if len(chunks) == 1 else f"{title} ({k + 1}/{len(chunks)})"
        fig.text(0.06, 0.965, head, fontsize=13, weight="bold", va="top")
        longest = max([len(x) for x in chunk] + [WRAP])
        fig.text(0.06, 0.93, "\n".join(chunk) if chunk else "(empty)", fontsize=max(7.2 * WRAP / longest, 4.0),
                 family="monospace",
                 va="top", linespacing=1.35)
        pages.append(fig)
    return pages


def _table_lines(t: Table, width: int = WRAP) -> list[str]:
    cols = [str(c) for c in t.columns]
    widths = [max([len(c)] + [len(str(r[i])) for r in t.rows]) for i, c in enumerate(cols)]
    fmt = "  ".join("{:<%d}" % w for w in widths)
    lines = [fmt.format(*cols), "-" * (sum(widths) + 2 * len(widths) - 2)]
    lines += [fmt.format(*[str(x) for x in r]) for r in t.rows]
    if t.note:
        lines += ["", *textwrap.wrap(t.note, width)]
    return lines


def _summary_lines(rep: Report, versions, rev: str, when: str) -> list[str]:
    lines = [f"generated {when}", f"git revision: {rev}", ""]
    lines += ["Findings:"]
    for n in rep.notes:
        lines += textwrap.wrap(n, WRAP, initial_indent="  - ", subsequent_indent="    ")
    lines += [""]
    if rep.missing:
        lines += [f"Missing runs ({len(rep.missing)} of {rep.expected_runs or '?'} expected have no evaluation):"]
        for rid, why in rep.missing:
            lines += textwrap.wrap(f"{rid}: {why}", WRAP, initial_indent="  - ", subsequent_indent="    ")
        lines += [""]
    elif rep.expected_runs:
        lines += [f"All {rep.expected_runs} expected runs have evaluations.", ""]
    if rep.provenance is not None:
        lines += ["Feature space of every metric:"] + ["  " + ln for ln in _table_lines(rep.provenance)] + [""]
    lines += textwrap.wrap("Package versions: " + ", ".join(f"{n} {v}" for n, v in versions), WRAP,
                           subsequent_indent="  ")
    return lines


def _headline_page(rep: Report, fig: FigureSpec, when: str, size=(8.27, 11.69)) -> Figure:
    """Page 1: the title, the headline figure and the findings with their intervals as a table."""
    from matplotlib.image import imread

    page = Figure(figsize=size, dpi=100)
    page.text(0.06, 0.965, rep.title, fontsize=14, weight="bold", va="top")
    page.text(0.06, 0.94, f"generated {when}", fontsize=8, color="0.4", va="top")
    buf = io.BytesIO()
    fig.figure.savefig(buf, format="png", dpi=150)
    buf.seek(0)
    ax = page.add_axes((0.04, 0.52, 0.92, 0.40))
    ax.imshow(imread(buf))
    ax.axis("off")
    page.text(0.06, 0.515, textwrap.fill(f"{fig.title}. {fig.caption}", 120), fontsize=7.5, va="top", color="0.2")
    if rep.findings is not None and rep.findings.rows:
        tab = page.add_axes((0.04, 0.06, 0.92, 0.40))
        tab.axis("off")
        tab.set_title(rep.findings.title, fontsize=10, loc="left")
        rows = [[textwrap.shorten(str(x), 60) for x in r] for r in rep.findings.rows[:24]]
        t = tab.table(cellText=rows, colLabels=rep.findings.columns, loc="upper left", cellLoc="left",
                      colWidths=[0.44, 0.17, 0.2, 0.19])
        t.auto_set_font_size(False)
        t.set_fontsize(6.5)
        t.scale(1, 1.25)
        page.text(0.06, 0.04, textwrap.fill(rep.findings.note, 130), fontsize=6.5, color="0.3", va="top")
    return page


def pdf_pages(rep: Report, versions, rev: str, when: str) -> list[tuple[str, Figure]]:
    """(page title, Figure) in order: the headline page (when the report names a headline figure),
    summary, one page per other figure, tables, the spec."""
    head = next((f for f in rep.figures if f.name == rep.headline), None)
    pages = [("headline", _headline_page(rep, head, when))] if head is not None else []
    pages += [(f"summary {i}", p) for i, p in enumerate(_text_pages(rep.title, _summary_lines(rep, versions, rev, when)))]
    for f in rep.figures:
        if f is not head:
            pages.append((f"figure {f.name}", f.figure))
    lines: list[str] = []
    for t in rep.tables:
        lines += [t.title.upper(), *_table_lines(t), ""]
    if lines:
        pages += [(f"tables {i}", p) for i, p in enumerate(_text_pages("Tables", lines))]
    if rep.spec_text:
        pages += [(f"spec {i}", p) for i, p in enumerate(_text_pages("Sweep spec", rep.spec_text.splitlines()))]
    return pages


def _template() -> jinja2.Template:
    folder = resources.files("harness.report").joinpath("templates")
    env = jinja2.Environment(autoescape=jinja2.select_autoescape(["html"]), undefined=jinja2.StrictUndefined)
    env.globals["css"] = folder.joinpath("report.css").read_text()
    return env.from_string(folder.joinpath("report.html").read_text())


def write_report(rep: Report, out_root: str | Path) -> dict:
    """Write figures/*.png|svg, index.html, report.pdf, the CSV and manifest.json under out_root/name."""
    out = Path(out_root) / rep.name
    (out / "figures").mkdir(parents=True, exist_ok=True)
    versions, rev = package_versions(), git_revision()
    when = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    for f in rep.figures:
        save_figure(f.figure, out / "figures", f.name)
    if rep.csv_text is not None and rep.csv_name:
        atomic_write_text(out / rep.csv_name, rep.csv_text)
    page_list = pdf_pages(rep, versions, rev, when)
    buf = io.BytesIO()
    with PdfPages(buf) as pdf:
        for _, fig in page_list:
            pdf.savefig(fig)
        info = pdf.infodict()
        info["Title"] = rep.title
    pdf_bytes = buf.getvalue()
    atomic_write(out / "report.pdf", lambda f: f.write(pdf_bytes), mode="wb")
    text = _template().render(rep=rep, versions=versions, rev=rev, when=when, escape=html.escape)
    atomic_write_text(out / "index.html", text)
    manifest = {
        "name": rep.name, "title": rep.title, "generated": when, "git_revision": rev,
        "figures": [f.name for f in rep.figures], "pdf_pages": [t for t, _ in page_list],
        "missing": dict(rep.missing), "notes": rep.notes, "csv": rep.csv_name,
    }
    atomic_write_json(out / "manifest.json", manifest)
    log.info("report written: %s (%d figures, %d PDF pages)", out / "index.html", len(rep.figures), len(page_list))
    return manifest
