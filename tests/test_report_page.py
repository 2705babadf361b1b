"""`report.html` as people read it: self-contained, a summary on top, and, in a real headless
Chromium at 1400 px, nothing wider than the window, sortable and filterable tables, every figure
loaded and a table of contents that stays in view.

The browser test needs Debian's `chromium` and `chromium-driver` (scripts/test.sh installs them
when run as root on Debian) and selenium (a dev dependency); without them it skips, saying why.
"""
from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

import matplotlib
import pytest
from test_analysis import SYNTH, write_synthetic_study

from analysis import report
from benchmark import tables

matplotlib.use("Agg")

WIDTH = 1400
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync")


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("results")
    write_synthetic_study(root)
    return root


def test_the_summary_counts_cells_truncations_and_where_the_rows_came_from(synth_root):
    long, cell_table = tables.load(SYNTH, synth_root), tables.load_cells(SYNTH, synth_root)
    summary = report.overview(long, cell_table)
    assert summary.states == cell_table["state"].value_counts().to_dict()
    assert len(summary.truncated) == int(cell_table["truncated"].sum())
    assert summary.rows == len(long) and summary.axes["condition"] == long["condition"].nunique()
    sources = dict(dict(summary.provenance)["source"])
    assert sources == long.groupby("source")["cell_id"].nunique().to_dict()
    page = report.render(SYNTH, [], summary)
    assert f"{len(cell_table):,}</b>cells collected" in page and "torch" in page  # unrecorded versions named


def test_the_page_is_self_contained(synth_root):
    long = tables.load(SYNTH, synth_root)
    section = report.Section("Rows", notes=["a note"], tables=[("rows", long.head(30))])
    page = report.render(SYNTH, [section], report.overview(long, tables.load_cells(SYNTH, synth_root)))
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)  # nothing fetched from elsewhere
    assert "<script>" in page and "<style>" in page and "<link" not in page and "<script src" not in page
    assert page.count("<tr><td") == 30 and "type=search" in page  # one row per row, with a filter


# --- in a browser ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def page(synth_root, tmp_path_factory):
    """The synthetic study's report, built by the figures command's own code."""
    out = tmp_path_factory.mktemp("figures")
    return report.build(SYNTH, out, synth_root, log=lambda line: None)


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[dev]')")
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("Debian's chromium and chromium-driver are not installed (scripts/test.sh installs them as root "
                    "on Debian: apt-get install chromium chromium-driver)")
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    profile = tempfile.mkdtemp(prefix="chromium-profile-")  # fresh: nothing of another session
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={WIDTH},1000"):
        options.add_argument(flag)
    try:
        chrome = webdriver.Chrome(options=options, service=Service(driver))
    except WebDriverException as err:
        pytest.skip(f"headless Chromium did not start: {err.msg}")
    yield chrome
    chrome.quit()
    shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def opened(browser, page):
    browser.get(page.as_uri())
    return browser


def _table(browser, name: str):
    from selenium.webdriver.common.by import By

    return next(t for t in browser.find_elements(By.CSS_SELECTOR, ".tbl")
                if t.find_element(By.TAG_NAME, "h3").text == name)


def _column(browser, table, header: str) -> list[str]:
    """The visible rows' cells of the column `header` (data-v of numbers, else the text)."""
    return browser.execute_script("""
        const [tbl, name] = arguments, heads = [...tbl.querySelectorAll('th')].map(h => h.textContent);
        const i = heads.indexOf(name);
        return [...tbl.querySelectorAll('tbody tr')].filter(r => !r.hidden)
            .map(r => r.cells[i].dataset.v ?? r.cells[i].textContent);""", table, header)


@pytest.mark.slow
def test_nothing_is_wider_than_the_window_and_tables_scroll_in_their_box(opened):
    width, inner = opened.execute_script("return [document.documentElement.scrollWidth, window.innerWidth]")
    assert inner == WIDTH and width <= inner
    boxes = opened.execute_script("""return [...document.querySelectorAll('.box')].map(b => {
        const r = b.getBoundingClientRect(); return [r.right, b.scrollWidth > b.clientWidth]; });""")
    assert all(right <= inner for right, _ in boxes)
    assert any(scrolls for _, scrolls in boxes)  # the wide rankings scroll inside their box, not the page


@pytest.mark.slow
def test_every_figure_loads(opened, page):
    images = opened.execute_script(
        "return [...document.images].map(i => [i.getAttribute('src'), i.complete && i.naturalWidth > 0, "
        "i.getBoundingClientRect().right]);")
    plots = {f"plots/{p.name}" for p in (page.parent / "plots").glob("*.png")}
    assert {src for src, _, _ in images} == plots
    assert all(loaded for _, loaded, _ in images)
    assert all(right <= WIDTH for _, _, right in images)  # laid out to fit the width


@pytest.mark.slow
def test_clicking_a_column_header_sorts_the_table(opened):
    from selenium.webdriver.common.by import By

    table = _table(opened, "ranking_fft50")
    header = next(th for th in table.find_elements(By.TAG_NAME, "th") if th.text.startswith("mean_linf"))
    header.click()
    values = [float(v) for v in _column(opened, table, "mean_linf")]
    assert values == sorted(values) and header.get_attribute("aria-sort") == "ascending"
    header.click()
    assert [float(v) for v in _column(opened, table, "mean_linf")] == sorted(values, reverse=True)
    next(th for th in table.find_elements(By.TAG_NAME, "th") if th.text == "loss").click()
    losses = _column(opened, table, "loss")
    assert losses == sorted(losses) and len(set(losses)) > 1


@pytest.mark.slow
def test_the_filter_keeps_the_matching_rows(opened):
    from selenium.webdriver.common.by import By

    table = _table(opened, "ranking_fft50")
    box = table.find_element(By.CSS_SELECTOR, "input[type=search]")
    everything = len(_column(opened, table, "model"))
    box.send_keys("loss:trades mean_clean>0.5")
    losses, clean = _column(opened, table, "loss"), [float(v) for v in _column(opened, table, "mean_clean")]
    assert 0 < len(losses) < everything and set(losses) == {"trades"} and min(clean) > 0.5
    assert table.find_element(By.CLASS_NAME, "count").text == f"{len(losses)} of {everything} rows"
    box.clear()
    box.send_keys("nosuchcolumn:x")
    assert "bad" in box.get_attribute("class")
    box.clear()
    box.send_keys(" ")
    assert len(_column(opened, table, "model")) == everything


@pytest.mark.slow
def test_the_table_of_contents_stays_in_view(opened):
    opened.execute_script("window.scrollTo(0, document.body.scrollHeight)")
    top, links = opened.execute_script(
        "const nav = document.querySelector('nav'); return [nav.getBoundingClientRect().top, nav.querySelectorAll('a').length]")
    assert top == 0
    assert links == opened.execute_script("return document.querySelectorAll('main section').length")  # summary too
