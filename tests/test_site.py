"""The report as a reader opens it: rendered from the committed notebooks' saved outputs, loaded in headless Chromium."""
import os
import shutil
import tempfile
from pathlib import Path

import nbformat
import pytest
import yaml

from cocomix_nb.publish import REPORT_PAGES, render_html, write_display_copies

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("COCOMIX_ARTIFACTS", ROOT / "test-artifacts"))
BROWSER_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-quic",
                 "--window-size=1400,1000"]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    pages = write_display_copies(ROOT / "nbs", out / "_pages")
    index = render_html(out / "_pages", pages, out / "_report", ROOT / "results" / "stages")
    return index, pages


@pytest.fixture(scope="module")
def browser():
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and chromedriver):
        message = "Debian's chromium and chromium-driver are not installed (bash tools/setup.sh installs them as root)."
        if os.environ.get("COCOMIX_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in BROWSER_FLAGS + [f"--user-data-dir={tempfile.mkdtemp()}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "SEVERE"})
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    yield driver
    driver.quit()


def test_every_notebook_has_a_page(report):
    index, pages = report
    names = sorted(p.stem for p in (ROOT / "nbs").glob("*.ipynb"))
    assert sorted(p["name"] for p in pages) == names
    for name in names:
        assert (index.parent / f"{name}.html").exists(), name
        assert f"href='{name}.html'" in index.read_text(), name


def saved_figures(name: str) -> int:
    "Count the PNG outputs saved in notebook `name`."
    nb = nbformat.read(ROOT / "nbs" / f"{name}.ipynb", as_version=4)
    return sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)


def test_report_pages_have_saved_figures():
    for name in REPORT_PAGES:
        assert saved_figures(name) > 0, f"{name}.ipynb has no saved figure; run cocomix-report --execute pages and commit it"


def test_no_notebook_saved_an_error():
    for path in sorted((ROOT / "nbs").glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        errors = [o.get("ename") for c in nb.cells if c.cell_type == "code" for o in c.outputs
                  if o.get("output_type") == "error"]
        assert not errors, f"{path.name} shows errors {errors}; execute it again and commit the result"


def test_quarto_config_lists_every_notebook():
    config = yaml.safe_load((ROOT / "_quarto.yml").read_text())
    assert config["project"]["type"] == "website"
    assert config["execute"]["enabled"] is False
    listed = []
    for entry in config["website"]["sidebar"]["contents"]:
        listed += entry["contents"] if isinstance(entry, dict) else [entry]
    assert listed[0] == "index.qmd"
    assert (ROOT / "index.qmd").exists()
    expected = sorted(f"_pages/{p.name}" for p in (ROOT / "nbs").glob("*.ipynb"))
    assert sorted(listed[1:]) == expected


def open_page(browser, url: str, timeout: float = 60.0):
    "Open `url` and wait until the document and all its images have finished loading."
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(url)
    loaded = "return document.readyState === 'complete' && Array.from(document.images).every(i => i.complete)"
    try:
        WebDriverWait(browser, timeout).until(lambda driver: driver.execute_script(loaded))
    except TimeoutException:
        pytest.fail(f"{url} did not finish loading within {timeout:.0f} s")


def test_pages_load_in_chromium(report, browser):
    index, pages = report
    for page in pages:
        open_page(browser, (index.parent / f"{page['name']}.html").as_uri())
        assert browser.title == page["title"], page["name"]
        images = browser.execute_script("return Array.from(document.images).map(i => [i.complete, i.naturalWidth])")
        broken = [i for i, (complete, width) in enumerate(images) if not complete or width == 0]
        assert not broken, f"{page['name']}: images {broken} of {len(images)} did not render"
        if page["name"] in REPORT_PAGES:
            assert len(images) == saved_figures(page["name"]), f"{page['name']}: {len(images)} images shown"
        errors = [entry["message"] for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
        assert not errors, f"{page['name']}: {errors}"


def test_results_table_in_chromium(report, browser):
    index, _ = report
    open_page(browser, (index.parent / "30_results.html").as_uri())
    headers = browser.execute_script(
        "return Array.from(document.querySelectorAll('table.results-table')[0].querySelectorAll('th')).map(h => h.textContent)")
    assert headers[0] == "variant"
    assert headers[-1] == "RSUM"
    rows = browser.execute_script("return document.querySelectorAll('table.results-table')[0].tBodies[0].rows.length")
    assert rows == 12
    bold = browser.execute_script("return document.querySelectorAll('table.results-table')[0].querySelectorAll('b').length")
    assert bold >= 7  # the best mean of each of the 7 metric columns
    assert "ΔRSUM [95% CI]" in browser.find_element("tag name", "body").text
    browser.execute_script("document.querySelector('table.results-table').scrollIntoView()")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    screenshot = ARTIFACTS / "report-results.png"
    assert browser.save_screenshot(str(screenshot))
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_index_links_resolve_in_chromium(report, browser):
    index, pages = report
    open_page(browser, index.as_uri())
    links = browser.execute_script("return Array.from(document.links).map(a => [a.href, a.textContent])")
    assert len(links) == len(pages)
    assert browser.execute_script("return document.querySelectorAll('table.results-table').length") == 1
    for href, text in links:
        open_page(browser, href)
        assert browser.title == text, href
