"""The dashboard in a real browser: Debian's chromium driven by playwright against
`streamlit run app.py` on 127.0.0.1. Loads a study made by the real runner, checks that the
Pareto chart and the trial table render, clicks a Pareto point and sees that trial drilled
into, and saves a screenshot (set DASHBOARD_SCREENSHOT=path to also copy it, e.g. to
docs/dashboard.png)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.dashboard_study import build

CHROMIUM = "/usr/bin/chromium"
APP = Path(__file__).resolve().parent.parent / "app.py"
# No background networking: this machine's closed network refuses Chromium's calls home.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-quic",
                 "--no-first-run", "--disable-component-update", "--disable-sync"]

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
if not Path(CHROMIUM).exists():
    pytest.skip(f"{CHROMIUM} is absent (apt-get install chromium)", allow_module_level=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"streamlit exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"streamlit did not answer on {url} in {timeout_s} s")


@pytest.fixture(scope="module")
def journal(tmp_path_factory) -> str:
    """A copy of the shared studies: the live-update test finishes a trial in it."""
    copy = tmp_path_factory.mktemp("browser") / "optuna.journal"
    shutil.copyfile(build(tmp_path_factory.getbasetemp() / "dashboard_studies"), copy)
    return str(copy)


@pytest.fixture(scope="module")
def server(journal, tmp_path_factory):
    port = _free_port()
    log = (tmp_path_factory.mktemp("streamlit") / "server.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(APP), "--server.headless", "true",
         "--server.address", "127.0.0.1", "--server.port", str(port), "--server.fileWatcherType", "none",
         "--client.toolbarMode", "viewer",
         "--browser.gatherUsageStats", "false", "--", "--storage", journal],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()


# The Pareto trace's first point: its trial number and its pixel centre on the page.
FIRST_PARETO_POINT = """() => {
  const gd = [...document.querySelectorAll('.js-plotly-plot')].find(g => g.data.some(t => t.name.startsWith('feasible Pareto')));
  const index = gd.data.findIndex(t => t.name.startsWith('feasible Pareto'));
  const point = gd.querySelectorAll('.scatterlayer .trace')[index].querySelector('path.point');
  const box = point.getBoundingClientRect();
  return {trial: gd.data[index].customdata[0], x: box.x + box.width / 2, y: box.y + box.height / 2};
}"""


def _open(pw, url: str, height: int):  # noqa: ANN001, ANN202 - playwright objects
    """Debian's chromium, one page at `url` (1440 px wide)."""
    browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    page = browser.new_page(viewport={"width": 1440, "height": height})
    page.goto(url, wait_until="domcontentloaded")
    return browser, page


def test_dashboard_in_chromium(server, tmp_path):
    with sync_api.sync_playwright() as pw:
        browser, page = _open(pw, f"{server}/?study=populated", height=1500)
        page.get_by_text("Study populated").first.wait_for(timeout=90_000)
        page.locator(".js-plotly-plot .scatterlayer path.point").first.wait_for(timeout=60_000)
        page.locator('[data-testid="stDataFrame"]').first.wait_for(timeout=30_000)
        assert page.get_by_text("4 of 4 trials").count() == 1  # the table holds every trial

        target = page.evaluate(FIRST_PARETO_POINT)
        page.mouse.click(target["x"], target["y"])
        page.get_by_text("1 of 4 trials").wait_for(timeout=30_000)  # the table follows the chart
        page.wait_for_timeout(1500)  # let the rerun settle before the picture
        page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=False)

        page.get_by_role("tab", name="Trial detail").click()
        page.get_by_text(f"Trial #{target['trial']}", exact=True).wait_for(timeout=30_000)
        page.get_by_text("throughput_tok_s").first.wait_for()
        page.screenshot(path=str(tmp_path / "trial_detail.png"), full_page=True)
        browser.close()
    assert (tmp_path / "dashboard.png").stat().st_size > 20_000
    if os.environ.get("DASHBOARD_SCREENSHOT"):
        shutil.copyfile(tmp_path / "dashboard.png", os.environ["DASHBOARD_SCREENSHOT"])


def test_running_study_updates_without_a_click(server, journal):
    """A trial that finishes while the page is open shows up on its own (the live watcher)."""
    import optuna

    from tuner.storage import open_storage

    with sync_api.sync_playwright() as pw:
        browser, page = _open(pw, f"{server}/?study=running", height=1000)
        page.get_by_text("running now").first.wait_for(timeout=90_000)
        live = optuna.load_study(study_name="running", storage=open_storage(journal))
        running = live.get_trials(states=(optuna.trial.TrialState.RUNNING,))[0]
        live.tell(running.number, state=optuna.trial.TrialState.FAIL)  # as a worker would
        page.get_by_text("running now").first.wait_for(state="detached", timeout=60_000)
        browser.close()


# The page's width and each figure's box, in CSS pixels.
LAYOUT = """() => ({width: document.documentElement.scrollWidth,
  plots: [...document.querySelectorAll('.js-plotly-plot')].map(g => {
    const r = g.getBoundingClientRect(); return {left: r.left, right: r.right, top: r.top + window.scrollY}; }),
  recommended: document.querySelector('.recommended').getBoundingClientRect().top + window.scrollY,
  axes: [...document.querySelectorAll('.js-plotly-plot .xtitle, .js-plotly-plot .ytitle')].map(t => t.textContent)})"""


def test_report_fits_a_1280_px_window(tmp_path):
    from reports.cli import load_study, write_all
    from tests.report_study import build

    journal = build(tmp_path / "study")
    write_all(load_study("report_demo", journal), tmp_path / "report")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto((tmp_path / "report" / "report.html").as_uri())
        page.locator(".js-plotly-plot").first.wait_for(timeout=30_000)
        page.wait_for_timeout(1000)  # responsive figures resize once after load
        layout = page.evaluate(LAYOUT)
        page.screenshot(path=str(tmp_path / "report.png"), full_page=False)
        browser.close()
    assert layout["width"] <= 1280  # no horizontal scrolling
    assert layout["plots"] and all(p["left"] >= 0 and p["right"] <= 1280 for p in layout["plots"])
    assert layout["recommended"] < min(p["top"] for p in layout["plots"])  # what to run comes first
    assert "throughput (tok/s) ↑ better" in layout["axes"] and "p99 latency (ms) ↓ better" in layout["axes"]
    if os.environ.get("REPORT_SCREENSHOT"):
        shutil.copyfile(tmp_path / "report.png", os.environ["REPORT_SCREENSHOT"])


def test_filter_box_refuses_code_and_filters(server, journal, tmp_path):
    """Typed into the real page: an injection is refused (and runs nothing), a comparison filters."""
    import optuna

    from reports.frames import trials_frame
    from tuner.storage import open_storage

    frame = trials_frame(optuna.load_study(study_name="populated", storage=open_storage(journal)))
    expected = int(((frame["param_batch_size"] >= 4) & (frame["latency_p99_ms"] < 500)).sum())
    target = tmp_path / "pwned"
    with sync_api.sync_playwright() as pw:
        browser, page = _open(pw, f"{server}/?study=populated", height=1500)
        page.get_by_text("4 of 4 trials").wait_for(timeout=90_000)
        box = page.get_by_label("Filter (columns, comparisons, and/or/not)")
        box.fill(f'@os.system("touch {target}")')
        box.press("Enter")
        page.get_by_text("filter ignored:").first.wait_for(timeout=30_000)
        box.fill("batch_size >= 4 and latency_p99_ms < 500")
        box.press("Enter")
        page.get_by_text(f"{expected} of 4 trials").wait_for(timeout=30_000)
        browser.close()
    assert not target.exists()
