"""report.pdf: the report's print page, printed by a local headless Chromium (A4, vector figures).

Chromium is found as $HARNESS_CHROMIUM, `chromium`, `chromium-browser` or `google-chrome`. Without one
the report still has its HTML; `print_pdf` says why there is no PDF in one line. The browser may not
reach the network: every resource of the page is a local file.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from harness.io import atomic_write

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
PRINT_TIMEOUT_S = 180


def find_chromium() -> str | None:
    override = os.environ.get("HARNESS_CHROMIUM")
    if override:
        return shutil.which(override) or (override if Path(override).is_file() else None)
    return next((p for p in map(shutil.which, CHROMIUM_NAMES) if p), None)


def print_pdf(html: Path, pdf: Path) -> str | None:
    """Print `html` to `pdf` (written atomically); None on success, else one line saying why not."""
    browser = find_chromium()
    if browser is None:
        return ("report.pdf not written: no Chromium found (apt-get install chromium, or set HARNESS_CHROMIUM "
                "to the browser); index.html is complete")
    with tempfile.TemporaryDirectory(prefix="harness-print-") as tmp:
        out = Path(tmp) / "report.pdf"
        cmd = [browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--no-first-run", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--host-resolver-rules=MAP * ~NOTFOUND", f"--user-data-dir={Path(tmp) / 'profile'}",
               "--no-pdf-header-footer", f"--print-to-pdf={out}", Path(html).resolve().as_uri()]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PRINT_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as err:
            return f"report.pdf not written: {browser} failed to print ({type(err).__name__}: {err})"
        if not out.is_file() or out.stat().st_size == 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            return f"report.pdf not written: {browser} exited {proc.returncode} ({tail[0][:200]})"
        data = out.read_bytes()
    atomic_write(pdf, lambda f: f.write(data), mode="wb")
    return None
