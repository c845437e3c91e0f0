"""End to end in a real browser: `streamlit run` + headless Debian Chromium driven by Playwright.

Opens the app with ?span=2:4, sets small windows on the Setup page, goes to the per-token KL page, enters a
sentence, computes and checks that the coloured tokens are visible; saves tests/artifacts/kl.png. With
LFT_SCREENSHOTS=1 it also trains two small demo flows and saves screenshots of the main views to
docs/screenshots/ for the README. Skipped (with the reason) when /usr/bin/chromium or playwright is missing.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from app_fixtures import APP, REPO, small_cache, tiny_flow  # noqa: F401 (fixtures)

CHROMIUM = Path("/usr/bin/chromium")
DEMO_SPAN = "4:12"
ARTIFACTS = REPO / "tests" / "artifacts"
SCREENSHOTS = REPO / "docs" / "screenshots"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1440, "height": 1000}
SENTENCE = "The old lighthouse keeper climbed the stairs every evening to light the lamp for the ships."


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(tiny_flow, small_cache, session_cache, smol, tmp_path_factory):
    """A `streamlit run` server on a free port over the test session's cache; killed afterwards."""
    if not CHROMIUM.exists():
        pytest.skip("/usr/bin/chromium is missing (apt-get install -y chromium)")
    pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
    if os.environ.get("LFT_SCREENSHOTS") == "1":
        _train_demo_flows(smol)
    port = _free_port()
    log_path = tmp_path_factory.mktemp("streamlit") / "server.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "LFT_CACHE_DIR": str(session_cache)}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", str(APP), "--server.address", "127.0.0.1",
             "--server.port", str(port), "--server.headless", "true", "--browser.gatherUsageStats", "false",
             "--server.fileWatcherType", "none"],  # toolbar: the repo's .streamlit/config.toml
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                    if r.read().strip() == b"ok":
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail("streamlit did not start:\n" + log_path.read_text(errors="replace")[-3000:])
            time.sleep(0.3)
        yield url
    finally:
        from lft_core.jobs import list_jobs, stop_job

        for job in list_jobs():  # jobs this test started from the UI (the cache folder is this session's)
            if job.status in ("running", "stopping"):
                stop_job(job.id, kill_after=15)
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # our server and nothing else (its own session)
            proc.wait(timeout=15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
        if proc.returncode not in (0, -signal.SIGTERM, -signal.SIGKILL):
            print(log_path.read_text(errors="replace")[-3000:])


def _train_demo_flows(teacher) -> None:
    """Two flows for span 4:12 trained by the default recipe (FW, and SFM with the same distillation stage), so
    the screenshots show what a user's first flows look like (~20 min on 2 CPU cores; LFT_SCREENSHOTS=1 only)."""
    from lft_core.store import list_flows
    from lft_core.training import TrainConfig, train_flow

    have = {f.name for f in list_flows()}
    for method in ("sfm", "fw"):
        if f"demo-{method}" not in have:
            train_flow(TrainConfig(span=(4, 12), method=method, name=f"demo-{method}"),
                       teacher=teacher, verbose=False)


def wait_idle(page, timeout: float = 180.0, settle: float = 0.8) -> None:
    """Wait until the app's script has been idle (stApp data-test-script-state=notRunning) for `settle` s."""
    page.wait_for_selector('[data-testid="stApp"]', timeout=timeout * 1000)
    time.sleep(0.3)  # a click reaches the server a moment later
    deadline = time.time() + timeout
    idle_since = None
    while time.time() < deadline:
        state = page.get_attribute('[data-testid="stApp"]', "data-test-script-state")
        running = state in ("running", "rerunRequested", "initial") or page.locator(
            '[data-testid="stSpinner"]').count() > 0
        if running:
            idle_since = None
        elif idle_since is None:
            idle_since = time.time()
        elif time.time() - idle_since >= settle:
            return
        time.sleep(0.1)
    raise AssertionError(f"the app stayed busy for {timeout} s")


def go(page, title: str) -> None:
    page.locator('[data-testid="stSidebarNav"]').get_by_role("link", name=title, exact=True).click()
    wait_idle(page)
    page.get_by_role("heading", name=title.split(" (")[0]).first.wait_for(timeout=30_000)


def capture(page, path: Path) -> None:
    """A screenshot of the whole page: Streamlit scrolls inside its main section, so the viewport is grown to
    the content's height first (and restored)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    height = page.evaluate("""() => { const m = document.querySelector('[data-testid="stMain"]');
                                     return m ? m.scrollHeight : document.body.scrollHeight; }""")
    page.set_viewport_size({"width": VIEWPORT["width"], "height": max(VIEWPORT["height"], min(int(height) + 20, 4000))})
    page.evaluate("() => document.activeElement && document.activeElement.blur()")
    page.mouse.move(0, 0)
    time.sleep(1.5)  # plotly redraws at the new size
    page.screenshot(path=str(path))
    page.set_viewport_size(VIEWPORT)


def set_number(page, label: str, value: int) -> None:
    box = page.get_by_role("spinbutton", name=label)
    box.fill(str(value))
    box.press("Enter")
    wait_idle(page)


def open_app(page, url: str, span: str) -> None:
    """A new browser session at ?span=..., with the small test windows chosen on the Setup page."""
    page.goto(f"{url}/?span={span}", timeout=60_000)
    wait_idle(page)
    page.get_by_role("heading", name="LFT Explorer").wait_for(timeout=60_000)
    set_number(page, "Window length (tokens)", 32)
    set_number(page, "Windows to cache", 8)
    page.get_by_text("All layers of 8 × 32 tokens are cached").wait_for(timeout=30_000)


def readme_screenshots(page, url: str) -> None:
    """The main views at span 4:12 (where tokens do cross) with the demo flows, into docs/screenshots/."""
    open_app(page, url, DEMO_SPAN)
    capture(page, SCREENSHOTS / "setup.png")
    views = (("Choose a span", "span", "Compute skip-k KL"), ("Train", "train", None),
             ("Latent trajectories", "trajectories", None), ("Coupling crossings", "crossings", None),
             ("Per-token KL", "kl", None), ("Compare spans", "compare", "Evaluate"),
             ("Teaching lab (2-D)", "toy", "Train SFM and FW"))
    for title, name, button in views:
        go(page, title)
        if name == "train":
            live_training(page)
            continue
        if button:
            page.get_by_role("button", name=button).click()
            wait_idle(page)
        if name != "train":
            page.locator('[data-testid="stPlotlyChart"]').first.wait_for(state="visible", timeout=120_000)
        assert page.locator('[data-testid="stException"]').count() == 0, title
        capture(page, SCREENSHOTS / f"{name}.png")


def live_training(page) -> None:
    """Start a training job from the form, screenshot its live curves, then stop it with the Stop button."""
    # inside a form: fill without Enter (Enter would submit the form)
    page.get_by_role("spinbutton", name="Flow steps").fill("400")
    page.get_by_role("spinbutton", name="Batch (windows)").fill("4")
    page.get_by_text("More settings").click()
    page.get_by_role("spinbutton", name="Training windows").fill("16")
    page.get_by_role("spinbutton", name="Held-out windows").fill("4")
    page.get_by_role("spinbutton", name="Evaluate every (steps)").fill("5")
    page.get_by_role("textbox", name="Flow name (optional)").fill("demo-live")
    page.get_by_role("button", name="Start training").click()
    wait_idle(page)
    page.get_by_text("Held-out NMSE").first.wait_for(timeout=180_000)  # appears with the first step's metrics
    deadline = time.time() + 120
    while time.time() < deadline and page.locator('[data-testid="stPlotlyChart"]').count() == 0:
        time.sleep(1)
    time.sleep(20)  # a few evaluation points on the curves
    capture(page, SCREENSHOTS / "train.png")
    page.locator('[data-testid="stMain"]').get_by_role("button", name="Stop").first.click()
    page.get_by_text("Stopped; the flow was saved").wait_for(timeout=120_000)


def test_kl_page_in_a_real_browser(app_url, tmp_path):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True,
            viewport=VIEWPORT,
        )
        try:
            page = context.new_page()
            open_app(page, app_url, "2:4")
            # the project's config gives a viewer's toolbar: no Deploy button on a local research app
            assert page.get_by_role("button", name="Deploy").count() == 0
            go(page, "Per-token KL")
            assert "span=2%3A4" in page.url or "span=2:4" in page.url
            page.get_by_role("textbox", name="Text").fill(SENTENCE)
            page.get_by_role("button", name="Compute KL").click()
            wait_idle(page)
            tokens = page.locator(".lft-token")
            tokens.first.wait_for(state="visible", timeout=60_000)
            assert tokens.count() >= 15
            assert tokens.nth(tokens.count() - 1).is_visible()
            text = "".join(tokens.all_text_contents())
            assert "lighthouse" in text and "ships" in text, text
            assert "top 5" in (tokens.nth(3).get_attribute("title") or "")
            assert page.locator('[data-testid="stPlotlyChart"]').first.is_visible()
            assert page.locator('[data-testid="stException"]').count() == 0
            capture(page, ARTIFACTS / "kl.png")
            # the teaching lab: SFM and FW side by side, animated
            go(page, "Teaching lab (2-D)")
            page.get_by_role("button", name="Train SFM and FW").click()
            wait_idle(page)
            charts = page.locator('[data-testid="stPlotlyChart"]')
            charts.first.wait_for(state="visible", timeout=120_000)
            assert charts.count() >= 2 and charts.nth(1).is_visible()
            assert page.locator('[data-testid="stException"]').count() == 0
            capture(page, ARTIFACTS / "toy.png")
            if os.environ.get("LFT_SCREENSHOTS") == "1":
                readme_screenshots(page, app_url)
        finally:
            context.close()
