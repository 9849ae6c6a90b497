"""The HTML report in a real headless browser (Debian chromium + chromium-driver, through selenium)."""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from report_synth import rendered_partial_sweep, rendered_scaling_sweep

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                       reason="needs Debian chromium + chromium-driver: apt-get install -y chromium chromium-driver"),
]


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = CHROMIUM
    profile = tmp_path_factory.mktemp("chromium-profile")
    for arg in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", f"--user-data-dir={profile}", "--window-size=1400,900"]:
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


IMAGES_JS = """return Array.from(document.images).map(i => ({src: i.getAttribute('src'),
    complete: i.complete, w: i.naturalWidth, h: i.naturalHeight}));"""


def _open(driver, page: Path) -> list[dict]:
    driver.get(page.resolve().as_uri())
    deadline = time.time() + 20
    images = driver.execute_script(IMAGES_JS)
    while not all(i["complete"] for i in images) and time.time() < deadline:
        time.sleep(0.2)
        images = driver.execute_script(IMAGES_JS)
    return images


def _severe(driver) -> list[dict]:
    return [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]


ORDER_JS = """const main = document.querySelector('main');
return Array.from(main.children).filter(e => e.offsetHeight > 0).map(e => ({id: e.id, tag: e.tagName,
    top: e.getBoundingClientRect().top + window.scrollY, open: e.open === true}));"""


def reading_order(driver) -> list[dict]:
    """The report's top-level blocks as a person scrolls through them (visible ones, top to bottom)."""
    return sorted(driver.execute_script(ORDER_JS), key=lambda b: b["top"])


def assert_opens_with_headline(driver) -> None:
    """Headline figure first, in the first screen at 1400 px; then the findings table; the details collapsed."""
    blocks = reading_order(driver)
    assert [b["id"] for b in blocks[:2]] == ["headline", "findings"], blocks
    head = driver.find_element("css selector", "#headline img")
    assert head.get_attribute("src").endswith("figures/fid_vs_gflops.png") and head.size["width"] > 600
    assert head.location["y"] < driver.execute_script("return window.innerHeight")
    details = next(b for b in blocks if b["id"] == "details")
    assert not details["open"] and details is blocks[-1]


def test_checks_catch_a_broken_page(browser, tmp_path):
    """Negative control: a missing image is seen by both checks, so their passing below means something."""
    (tmp_path / "broken.html").write_text('<!DOCTYPE html><html><head><link rel="icon" href="data:,"></head>'
                                          '<body><img src="figures/absent.png"></body></html>')
    browser.get_log("browser")  # drain
    images = _open(browser, tmp_path / "broken.html")
    assert images and images[0]["w"] == 0
    assert _severe(browser), "a missing image should log a SEVERE console error"


def test_report_in_headless_chromium(browser, tmp_path_factory, tmp_path):
    folder, manifest, ids = rendered_partial_sweep(tmp_path_factory.mktemp("browser-sweep"))
    browser.get_log("browser")  # drain anything from earlier pages
    images = _open(browser, folder / "index.html")
    assert len(images) == len(manifest["figures"]) > 0
    broken = [i["src"] for i in images if not i["complete"] or i["w"] == 0 or i["h"] == 0]
    assert not broken, f"images that did not load: {broken}"
    assert not _severe(browser), _severe(browser)
    text = browser.find_element("tag name", "body").text
    assert "Missing runs" in text and all(rid in text for rid in ids["missing"])
    assert_opens_with_headline(browser)
    # full-page screenshot
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(1280, min(int(height) + 50, 16000))
    shot = tmp_path / "report.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    if os.environ.get("REPORT_SCREENSHOT_DIR"):  # let a person look at it
        shutil.copy(shot, Path(os.environ["REPORT_SCREENSHOT_DIR"]) / "report_screenshot.png")


def test_forecast_figures_in_headless_chromium(browser, tmp_path_factory):
    """The forecast section's figures (back-test, isoFLOP) load and the findings table is shown."""
    folder, manifest = rendered_scaling_sweep(tmp_path_factory.mktemp("browser-scaling"))
    browser.get_log("browser")
    images = _open(browser, folder / "index.html")
    srcs = {i["src"]: i for i in images}
    for name in ("forecast_backtest", "compute_optimal"):
        img = srcs[f"figures/{name}.png"]
        assert img["complete"] and img["w"] > 300 and img["h"] > 200, img
    assert not _severe(browser), _severe(browser)
    text = browser.find_element("tag name", "body").text
    assert "Findings and their uncertainty" in text and "llo err" not in text  # the candidate laws: collapsed
    browser.find_element("css selector", "#details > summary").click()
    assert "llo err" in browser.find_element("tag name", "body").text
    assert browser.find_element("css selector", 'a[href="#fig-forecast_backtest"]').is_displayed()
    assert browser.find_element("css selector", "#fig-forecast_backtest img").is_displayed()


def test_paper_report_in_headless_chromium(browser, tmp_path):
    from harness.cli import main
    assert main(["report", "--paper", "--out", str(tmp_path)]) == 0
    browser.get_log("browser")
    images = _open(browser, tmp_path / "paper" / "index.html")
    assert len(images) == 3 and all(i["complete"] and i["w"] > 0 for i in images), images
    assert not _severe(browser), _severe(browser)
    assert "r = -0.930" in browser.find_element("tag name", "body").text
