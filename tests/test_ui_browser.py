"""End to end: the studio in a real headless Chromium (Playwright), offline.

Starts the app on a free localhost port in this process, types two prompts, runs AND on the
bundled shapes-t2i model with 8 steps, and checks that the images and the kappa / log q
plot appear. Saves the page to test-artifacts/ui_studio.png; with
SUPERDIFF_UPDATE_SCREENSHOT=1 it also refreshes docs/studio.png, the README's screenshot
(`SUPERDIFF_UPDATE_SCREENSHOT=1 bash scripts/run.sh test tests/test_ui_browser.py`), so that
an ordinary test run leaves the working tree clean.

Needs Debian's chromium (/usr/bin/chromium) and the `playwright` Python package; when
either is missing the test FAILS (CI must run it) with the command that installs it.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import time
from pathlib import Path

import pytest

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("SUPERDIFF_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = ROOT / "test-artifacts"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _require_browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"Chromium not found at {CHROMIUM}: install it with `apt-get install -y chromium` "
                    "(Debian), or point SUPERDIFF_CHROMIUM at a Chromium binary", pytrace=False)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the `playwright` Python package is missing: `pip install playwright` (or install the test "
                    "extra); the browser itself comes from Debian's chromium package, never `playwright install`",
                    pytrace=False)
    return sync_playwright


@pytest.fixture(scope="module")
def studio_url(tmp_path_factory):
    try:
        from superdiff.ui.app import Studio, build_app, launch
    except ImportError as e:
        pytest.fail(f"the studio cannot be imported ({e}); install the ui extra: `pip install -e '.[ui]'`",
                    pytrace=False)
    from superdiff.compose import DEFAULT_COMPOSITION

    out = tmp_path_factory.mktemp("studio-out")
    studio = Studio(allow_roots=[], allow_hub=False, out_root=out)
    default = DEFAULT_COMPOSITION.replace(prompts=["", ""], steps=25)
    app = build_app(studio, default=default)
    port = _free_port()
    launch(app, host="127.0.0.1", port=port, block=False, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/", out
    finally:
        app.close()


def test_studio_runs_and_in_chromium(studio_url):
    sync_playwright = _require_browser()
    studio_url, studio_out = studio_url
    t0 = time.perf_counter()
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1200})
            # offline: anything not on this machine is refused instead of waited for
            page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(
                ("http://127.0.0.1", "data:", "blob:")) else route.abort())
            page.goto(studio_url, wait_until="domcontentloaded", timeout=30_000)
            page.locator("#generate").wait_for(state="visible", timeout=30_000)

            page.locator("#prompt-1 textarea, #prompt-1 input").first.fill("a circle")
            page.locator("#prompt-2 textarea, #prompt-2 input").first.fill("something red")
            page.locator("#operator label").filter(has_text="AND (all prompts").click()
            steps = page.locator("#steps input[type=number]")
            steps.fill("8")
            steps.press("Enter")
            n = page.locator("#num-images input[type=number]")
            n.fill("4")
            n.press("Enter")
            page.locator("#sampler input").click()
            page.get_by_role("option", name="ddpm", exact=True).click()
            page.locator("#generate").click()

            page.locator("#status").get_by_text(re.compile(r"^Done: ")).wait_for(timeout=75_000)
            images = page.locator("#results-gallery img")
            assert images.count() >= 4, f"expected 4 images in the gallery, found {images.count()}"
            plot = page.locator("#trace-plot img")
            plot.wait_for(state="visible", timeout=15_000)
            assert plot.get_attribute("src"), "the kappa / log q plot has no image"
            assert page.locator("#downloads").get_by_text(".png").count() >= 1, "no PNG downloads offered"
            status = page.locator("#status").inner_text()
            assert "AND" in status and "8 steps" in status, status
            page.screenshot(path=str(ARTIFACTS / "ui_studio.png"), full_page=True)

            # import the second PNG: its embedded parameters refill the form (seed 0 + 1, one image)
            pngs = sorted(Path(studio_out).rglob("01_and_seed1.png"))
            assert pngs, "the run wrote no PNG for image 2"
            from superdiff.compose import read_png_composition

            rec = read_png_composition(pngs[0])
            assert (rec.prompts, rec.operator, rec.sampler, rec.steps, rec.seed) == (
                ["a circle", "something red"], "and", "ddpm", 8, 1), rec
            page.get_by_text("Settings JSON (export / import)").click()
            page.locator("input[type=file]").first.set_input_files(str(pngs[0]))
            page.locator("#status").get_by_text(re.compile(r"^Settings loaded from")).wait_for(timeout=20_000)
            assert page.locator("#seed input").first.input_value() == "1"
            assert page.locator("#prompt-2 textarea, #prompt-2 input").first.input_value() == "something red"
        finally:
            browser.close()
    if os.environ.get("SUPERDIFF_UPDATE_SCREENSHOT") == "1":
        (ROOT / "docs").mkdir(exist_ok=True)
        shutil.copyfile(ARTIFACTS / "ui_studio.png", ROOT / "docs" / "studio.png")
    print(f"studio browser test: {time.perf_counter() - t0:.1f} s")
