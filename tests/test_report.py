"""The rendered report: files, HTML content, PDF pages (pdftoppm), the paper report, partial sweeps."""
from __future__ import annotations

import html
import json
import os
import stat
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from harness.cli import main
from harness.errors import HarnessError
from harness.report import figures as F
from harness.report.view import paper_setup_matches
from report_synth import rendered_partial_sweep, rendered_scaling_sweep

SWEEP_FIGURES = ["fid_vs_gflops", "fid_vs_steps", "fid_vs_train_compute", "training_loss", "metrics_vs_steps",
                 "metrics_vs_compute", "compute_optimal", "stop_early", "conditioning", "sampling_compute", "samples"]
DEJAVU_BOX_EM = 0.928 + 0.236  # DejaVu Sans ascent + descent: poppler's word box is this many em tall
MIN_PT = 8.0


@pytest.fixture(scope="session")
def sweep_report(tmp_path_factory):
    return rendered_partial_sweep(tmp_path_factory.mktemp("sweep-report"))


@pytest.fixture(scope="session")
def paper_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("paper-report")
    assert main(["report", "--paper", "--out", str(out)]) == 0
    return out / "paper"


def _pdf_pages(pdf: Path, tmp: Path) -> list[np.ndarray]:
    """Render every page with poppler's pdftoppm; grayscale arrays in page order."""
    if shutil.which("pdftoppm") is None:
        pytest.skip("pdftoppm absent: apt-get install -y poppler-utils")
    subprocess.run(["pdftoppm", "-r", "40", "-gray", "-png", str(pdf), str(tmp / "page")], check=True, timeout=120)
    files = sorted(tmp.glob("page-*.png"), key=lambda p: int(p.stem.rsplit("-", 1)[1]))
    return [np.asarray(Image.open(f).convert("L"), dtype=float) for f in files]


def _box(attrs: str) -> tuple[float, float, float, float]:
    return tuple(float(re.search(rf'{k}="([-\d.]+)"', attrs).group(1)) for k in ("xMin", "yMin", "xMax", "yMax"))


def pdf_font_sizes(pdf: Path) -> list[tuple[int, str, float]]:
    """(page, word, font size in pt) of every word, from poppler's `pdftotext -bbox-layout`: the word box's
    extent across the reading direction over DEJAVU_BOX_EM. A line of several words runs down the page (a
    rotated axis label) when it is taller than wide; a one-word line is read as horizontal, so a rotated
    one-word label is measured along its length (a short one reads too small, a long one is not checked)."""
    if shutil.which("pdftotext") is None:
        pytest.skip("pdftotext absent: apt-get install -y poppler-utils")
    xml = subprocess.run(["pdftotext", "-bbox-layout", str(pdf), "-"], capture_output=True, text=True, check=True,
                         timeout=120).stdout
    out = []
    for page_no, page in enumerate(xml.split("<page ")[1:], 1):
        for head, body in re.findall(r"<line ([^>]*)>(.*?)</line>", page, re.S):
            words = [(_box(a), html.unescape(t)) for a, t in re.findall(r"<word ([^>]*)>([^<]*)</word>", body)]
            x0, y0, x1, y1 = _box(head)
            vertical = len(words) > 1 and (y1 - y0) > (x1 - x0)
            for (wx0, wy0, wx1, wy1), text in words:
                out.append((page_no, text, ((wx1 - wx0) if vertical else (wy1 - wy0)) / DEJAVU_BOX_EM))
    return out


def pdf_page_sizes(pdf: Path) -> set[str]:
    info = subprocess.run(["pdfinfo", "-f", "1", "-l", "1000", str(pdf)], capture_output=True, text=True,
                          check=True).stdout
    return set(re.findall(r"Page\s+\d+ size:\s+(.*)", info))


def assert_printable(pdf: Path) -> list[tuple[int, str, float]]:
    """One page size (A4) and no word under MIN_PT, in DejaVu fonts only (what the size estimate assumes)."""
    fonts = subprocess.run(["pdffonts", str(pdf)], capture_output=True, text=True, check=True).stdout
    names = [ln.split()[0] for ln in fonts.splitlines()[2:] if ln.strip()]
    assert names and all("DejaVu" in n for n in names), names
    assert len(pdf_page_sizes(pdf)) == 1 and "A4" in next(iter(pdf_page_sizes(pdf)))
    sizes = pdf_font_sizes(pdf)
    small = [(p, w, round(s, 2)) for p, w, s in sizes if s < MIN_PT * 0.99]
    assert len(sizes) > 200 and not small, small[:20]
    return sizes


def _need_pdf(manifest: dict) -> None:
    if manifest["pdf"] is None:
        pytest.skip(manifest["pdf_note"])


def _assert_not_blank(pages: list[np.ndarray]) -> None:
    for i, px in enumerate(pages, 1):
        inked = (px < 200).mean()
        assert px.std() > 3.0 and inked > 0.002, f"page {i} looks blank (std {px.std():.2f}, inked {inked:.4f})"


def test_sweep_report_files_and_figures(sweep_report):
    folder, manifest, _ = sweep_report
    assert manifest["figures"] == SWEEP_FIGURES
    for name in SWEEP_FIGURES:
        png = Image.open(folder / "figures" / f"{name}.png")
        assert png.width > 300 and png.height > 200
        assert (folder / "figures" / f"{name}.svg").read_text().lstrip().startswith("<?xml")
    table = pd.read_csv(folder / "results.csv")
    assert table["run_id"].nunique() == 4 and len(table) == 25
    assert not list(folder.glob(".*.tmp"))  # atomic writes left no temporaries behind


def test_sweep_report_html_content(sweep_report):
    folder, manifest, ids = sweep_report
    html = (folder / "index.html").read_text()
    for src in re.findall(r'<img src="([^"]+)"', html):
        assert (folder / src).is_file(), src
    assert len(re.findall(r"<img ", html)) == len(SWEEP_FIGURES)
    # the report opens with the headline figure and the findings table, each finding linked to its figure
    assert html.index('id="headline"') < html.index('id="findings"') < html.index('id="scaling"')
    assert html.index('id="fig-fid_vs_gflops"') < html.index("<h2")
    assert 'href="#fig-fid_vs_gflops"' in html and 'href="#fig-conditioning"' in html
    assert re.search(r'<details id="details">', html)  # collapsed on screen
    assert "nan" not in re.sub(r"<details.*</details>", "", html, flags=re.S).lower().replace("nano", "")
    assert "Missing runs" in html
    for rid in ids["missing"]:
        assert rid in html and rid in manifest["missing"]
    assert "name: synth" in html                      # the spec text
    assert manifest["git_revision"] in html
    assert "matplotlib" in html and "scipy" in html   # package versions
    assert "<td>digits</td>" in html                  # the feature space of the metrics
    assert "Pearson r between log10(Gflops) and FID" in html


def test_digits_sweep_has_no_paper_overlay(sweep_report):
    folder, manifest, _ = sweep_report
    assert any("not overlaid" in n for n in manifest["notes"])
    for name in ("fid_vs_gflops", "fid_vs_train_compute", "fid_vs_steps"):
        assert "paper, Table 4" not in (folder / "figures" / f"{name}.svg").read_text()


def test_paper_overlay_only_where_setup_matches():
    base = dict(feature_space="inception", image_size=256, num_classes=1000, dataset="imagefolder",
                num_samples=50000, cfg_scale=1.0)
    assert paper_setup_matches(pd.DataFrame([base, base]))
    for key, bad in [("feature_space", "digits"), ("image_size", 8), ("num_classes", 10), ("dataset", "digits"),
                     ("feature_space", "inception-custom-1a2b3c4d"), ("num_samples", 10000), ("cfg_scale", 1.5)]:
        assert not paper_setup_matches(pd.DataFrame([base, {**base, key: bad}])), key
    models = pd.DataFrame({"label": ["DiT-S/2"], "gflops": [6.06], "fid": [70.0], "size": ["S"], "patch": [2]})
    fig = F.fid_vs_gflops(models, None, None, 400000, paper_rows=[{"gflops": 6.06, "fid50k": 68.4}])
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert "paper, Table 4 (400K steps)" in labels


@pytest.mark.system
def test_sweep_pdf_is_printable(sweep_report, tmp_path):
    """The PDF Chromium printed: A4 throughout, no text under 8 pt, page 1 the headline and findings,
    the figures as vectors (their labels are text), the collapsed details printed open."""
    folder, manifest, _ = sweep_report
    _need_pdf(manifest)
    pdf = folder / "report.pdf"
    sizes = assert_printable(pdf)
    page1 = " ".join(w for p, w, _ in sizes if p == 1)
    assert "FID vs transformer Gflops" in page1 and "Findings and their uncertainty" in page1
    assert "Pearson" in page1  # the figure's own text box: a vector figure, not a picture of one
    words = " ".join(w for _, w, _ in sizes)
    assert "Sweep spec" in words and "Environment" in words and "Training loss" in words
    _assert_not_blank(_pdf_pages(pdf, tmp_path))


def test_report_without_chromium_still_writes_the_html(tmp_path, monkeypatch, capsys):
    """No browser on a laptop: index.html and the figures are written, the PDF is not, one line says why."""
    from report_synth import write_sweep

    write_sweep(tmp_path / "results", "nobrowser", conditioning_ablation=False, sampling=False)
    monkeypatch.setenv("HARNESS_CHROMIUM", str(tmp_path / "no-such-browser"))
    assert main(["report", "nobrowser", "--results", str(tmp_path / "results"), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert any(line.startswith("report.pdf not written: no Chromium found") for line in out), out
    assert (tmp_path / "nobrowser" / "index.html").is_file() and not (tmp_path / "nobrowser" / "report.pdf").exists()
    assert not (tmp_path / "nobrowser" / ".print.html").exists()


@pytest.mark.system
def test_paper_report(paper_report, tmp_path):
    manifest = json.loads((paper_report / "manifest.json").read_text())
    note = manifest["notes"][0]
    r = float(re.search(r"r = (-?\d\.\d+)", note).group(1))
    assert r == pytest.approx(-0.930, abs=5e-4)        # the paper reports -0.93
    assert "-0.93" in note
    assert manifest["figures"] == ["fid_vs_gflops", "fid_vs_train_compute", "conditioning"]
    svg = (paper_report / "figures" / "fid_vs_gflops.svg").read_text()
    assert "-0.930" in svg and "DiT-XL/2" in svg
    _need_pdf(manifest)
    assert_printable(paper_report / "report.pdf")
    _assert_not_blank(_pdf_pages(paper_report / "report.pdf", tmp_path))
    tidy = pd.read_csv(paper_report / "table4_tidy.csv")
    xl = tidy[(tidy["model"] == "DiT-XL/2") & (tidy["step"] == 400000) & (tidy["conditioning"] == "adaLN-Zero")
              & (tidy["image_size"] == 256)]
    assert xl["train_compute"].iloc[0] == pytest.approx(118.64 * 256 * 400000 * 3)


def test_report_cli_errors(tmp_path, capsys):
    assert main(["report", "--out", str(tmp_path)]) == 2
    assert "--paper" in capsys.readouterr().err
    (tmp_path / "results" / "none" / "runs").mkdir(parents=True)
    assert main(["report", "none", "--results", str(tmp_path / "results"), "--out", str(tmp_path)]) == 2
    assert "no evaluation records" in capsys.readouterr().err
    with pytest.raises(HarnessError):
        from harness.report import render_sweep_report
        render_sweep_report(tmp_path / "results", "none", tmp_path)


@pytest.mark.parametrize("models,steps", [(["DiT-S/2"], [250, 500, 1000]), (["DiT-S/4", "DiT-S/2"], [500])])
def test_degenerate_sweeps_still_report(tmp_path, models, steps):
    """One model, or one evaluated step: no crash; fits without enough runs carry no interval."""
    from harness.report.sweep import build_sweep_report
    from harness.study.results import load_sweep
    from report_synth import write_run
    rng = np.random.default_rng(0)
    for m in models:
        write_run(tmp_path / "tiny" / "runs", m, "adaLN-Zero", 0, rng, steps=steps, grid=False)
    rep = build_sweep_report(load_sweep(tmp_path, "tiny"), n_boot=20)
    names = [f.name for f in rep.figures]
    assert names[:2] == ["fid_vs_gflops", "fid_vs_steps"] and rep.headline == "fid_vs_gflops"
    assert "samples" not in names
    fits = next(t for t in rep.tables if t.title == "Fits")
    for row in fits.rows:  # < 3 runs: the interval is reported as unknown, never as a fake zero width
        assert "CI n/a" in row[3] and "nan" not in row[3]


def test_scaling_sweep_report_has_the_forecast_section(tmp_path_factory):
    """Six models: the report back-tests the laws (largest:1), shows the isoFLOP view, the forecast for
    a larger model, and states every comparison as resolved or not; no fitted number is printed for a
    parameter that is not identified."""
    folder, manifest = rendered_scaling_sweep(tmp_path_factory.mktemp("scaling-report"))
    assert {"forecast_backtest", "compute_optimal", "fid_vs_gflops", "stop_early"} <= set(manifest["figures"])
    html = (folder / "index.html").read_text()
    assert "Forecast back-test" in html and "Findings and their uncertainty" in html
    assert 'href="#fig-forecast_backtest"' in html
    notes = " ".join(manifest["notes"])
    assert "Back-test (step 2,000): holding out largest:1" in notes
    assert "Forecast for a larger model" in notes and "Compute-optimal model size" in notes
    assert "Stop early? Each run's FID at step 2,000 forecast from its checkpoints up to step 1,000" in notes
    assert re.search(r"\((resolved|not resolved at this budget)\)", notes)
    assert "F_inf" not in html
    for m in re.finditer(r"E = (\S+)", notes):  # the saturating offset: an interval or 'not identified'
        assert m.group(1) == "not" or "[" in notes[m.end():m.end() + 40]
    assert manifest["headline"] == "fid_vs_gflops"
    findings = re.search(r'<section id="findings">.*?</section>', html, re.S).group(0)
    assert "back-test" not in findings.lower() or "predicts held-out" in findings
    assert "forecast:" not in findings and "E ended on a bound" not in findings and " | " not in findings


@pytest.mark.slow
def test_report_written_under_umask_022_is_readable_by_the_group(tmp_path):
    """index.html, report.pdf, results.csv and the figures: 0644 under umask 022 (issue 14)."""
    from report_synth import write_sweep

    from harness.report import render_sweep_report

    write_sweep(tmp_path / "results", "umask", conditioning_ablation=False, sampling=False)
    old = os.umask(0o022)
    try:
        render_sweep_report(tmp_path / "results", "umask", tmp_path / "reports", n_boot=20)
    finally:
        os.umask(old)
    out = tmp_path / "reports" / "umask"
    files = [out / "index.html", *[out / "report.pdf"][:(out / "report.pdf").exists()], out / "results.csv",
             *sorted((out / "figures").iterdir())]
    assert len(files) > 5
    assert {f.name: oct(stat.S_IMODE(f.stat().st_mode)) for f in files} == {f.name: "0o644" for f in files}
