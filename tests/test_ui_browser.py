"""End to end: the studio in a real headless Chromium (Playwright), offline.

Starts the app on a free localhost port in this process, types two prompts, runs AND on the
bundled shapes-t2i model with 8 steps (started with Ctrl+Enter, the Generate button visible
without scrolling at 1920x1080), and checks that the images and the kappa / log q plot
appear. Two more tests: every error reaches the page (bad settings JSON, a foreign PNG,
out-of-range numbers, AND with one prompt), and a second tab's queued run shows its place
and is withdrawn by Cancel while the first (seed -1) runs, then Compare methods gives the
labelled grid and shows an OR/AND trace first. Saves the page to
test-artifacts/ui_studio.png; with
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


@pytest.fixture(scope="module")
def browser():
    sync_playwright = _require_browser()
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


def open_page(browser, url: str, width: int = 1920, height: int = 1080):
    page = browser.new_page(viewport={"width": width, "height": height})
    # offline: anything not on this machine is refused instead of waited for
    page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(
        ("http://127.0.0.1", "data:", "blob:")) else route.abort())
    page.goto(url, wait_until="domcontentloaded", timeout=30_000)
    page.locator("#generate").wait_for(state="visible", timeout=30_000)
    return page


#: the settings import's file input (the page has others, e.g. the LoRA upload)
SETTINGS_FILE = "input[type=file]:has(+ #settings-import)"  # gradio puts the input before its button


def field(page, elem_id: str):
    return page.locator(f"#{elem_id} textarea, #{elem_id} input").first


def set_number(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Tab")


def status_shows(page, pattern: str, timeout: float = 20_000, where: str = "#status") -> str:
    page.locator(where).get_by_text(re.compile(pattern)).first.wait_for(timeout=timeout)
    return page.locator(where).inner_text()


def test_studio_runs_and_in_chromium(studio_url, browser):
    studio_url, studio_out = studio_url
    t0 = time.perf_counter()
    ARTIFACTS.mkdir(exist_ok=True)
    page = open_page(browser, studio_url)
    try:
        box = page.locator("#generate").bounding_box()
        assert box and box["y"] + box["height"] <= 1080, f"Generate is below the fold at 1920x1080: {box}"

        page.locator("#prompt-1 textarea, #prompt-1 input").first.fill("a circle")
        page.locator("#prompt-2 textarea, #prompt-2 input").first.fill("something red")
        page.locator("#operator label").filter(has_text="AND (all prompts").click()
        set_number(page, "steps", 8)
        set_number(page, "num-images", 4)
        page.locator("#sampler input").click()
        page.get_by_role("option", name="ddpm", exact=True).click()
        field(page, "prompt-2").press("Control+Enter")  # starts Generate, as in A1111

        page.locator("#status").get_by_text(re.compile(r"^Done: ")).wait_for(timeout=180_000)
        images = page.locator("#results-gallery img")
        assert images.count() >= 4, f"expected 4 images in the gallery, found {images.count()}"
        plot = page.locator("#trace-plot img")
        plot.wait_for(state="visible", timeout=15_000)
        assert plot.get_attribute("src"), "the kappa / log q plot has no image"
        assert page.locator("#downloads").get_by_text(".png").count() >= 1, "no PNG downloads offered"
        status = page.locator("#status").inner_text()
        assert "AND" in status and "8 steps" in status, status
        # the trace is titled by the image (method and seed), not "sample 0"; captions are not cut
        assert page.locator("#trace-pick input").first.input_value() == "AND \u00b7 seed 0"
        cut = page.evaluate("""() => [...document.querySelectorAll('#results-gallery .caption-label')]
            .filter(e => e.scrollWidth > e.clientWidth + 1).length""")
        assert cut == 0, f"{cut} gallery caption(s) cut off"
        page.screenshot(path=str(ARTIFACTS / "ui_studio.png"), full_page=True)

        # import the second PNG: its embedded parameters refill the form (seed 0 + 1, one image)
        pngs = sorted(Path(studio_out).rglob("01_and_seed1.png"))
        assert pngs, "the run wrote no PNG for image 2"
        from superdiff.compose import read_png_composition

        rec = read_png_composition(pngs[0])
        assert (rec.prompts, rec.operator, rec.sampler, rec.steps, rec.seed) == (
            ["a circle", "something red"], "and", "ddpm", 8, 1), rec
        page.get_by_text("Settings JSON (export / import)").click()
        page.locator(SETTINGS_FILE).first.set_input_files(str(pngs[0]))
        page.locator("#status").get_by_text(re.compile(r"^Settings loaded from")).wait_for(timeout=20_000)
        assert page.locator("#seed input").first.input_value() == "1"
        assert page.locator("#prompt-2 textarea, #prompt-2 input").first.input_value() == "something red"
    finally:
        page.close()
    if os.environ.get("SUPERDIFF_UPDATE_SCREENSHOT") == "1":
        (ROOT / "docs").mkdir(exist_ok=True)
        shutil.copyfile(ARTIFACTS / "ui_studio.png", ROOT / "docs" / "studio.png")
    print(f"studio browser test: {time.perf_counter() - t0:.1f} s")


def apply_json(page, text: str) -> None:
    editor = page.locator("#settings-json .cm-content")
    editor.click()
    page.keyboard.press("Control+A")
    page.keyboard.press("Delete")
    editor.fill(text)
    page.get_by_role("button", name="Apply JSON above").click()


def test_every_error_reaches_the_page(studio_url, browser, tmp_path):
    from PIL import Image

    page = open_page(browser, studio_url[0])
    try:
        page.get_by_text("Settings JSON (export / import)").click()
        for text, expected in (("{not json", r"Settings: not valid JSON"),
                               ('{"colour": "red"}', r"unknown field\(s\) colour"),
                               ('{"operator": "xor"}', r"Operator: unknown operator 'xor'")):
            apply_json(page, text)
            status_shows(page, "^Error: " + expected)
            status_shows(page, expected, where="#settings-msg")  # also under the buttons
        Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
        page.locator(SETTINGS_FILE).first.set_input_files(str(tmp_path / "plain.png"))
        status_shows(page, r"^Error: plain.png carries no superdiff parameters")

        field(page, "prompt-1").fill("a circle")
        field(page, "prompt-2").fill("something red")
        set_number(page, "steps", 0)  # refused with a message, not clamped to 1
        page.locator("#generate").click()
        status_shows(page, r"^Error: Steps: must be between 1 and")
        set_number(page, "steps", 4)
        set_number(page, "num-images", 10000)  # not clamped to 8 either
        page.locator("#generate").click()
        status_shows(page, r"^Error: Images: at most 8 per request")
        set_number(page, "num-images", 1)
        field(page, "prompt-2").fill("")
        page.locator("#generate").click()  # AND of one prompt would run that prompt alone
        status_shows(page, r"^Error: Prompts: AND composes two or more experts, got 1")
    finally:
        page.close()


def test_queue_cancel_random_seed_and_compare_grid(studio_url, browser):
    url = studio_url[0]
    a, b = open_page(browser, url), open_page(browser, url)
    try:
        for page in (a, b):
            field(page, "prompt-1").fill("a circle")
            field(page, "prompt-2").fill("something red")
            set_number(page, "steps", 15)
        set_number(a, "seed", -1)
        set_number(a, "num-images", 2)
        # long enough (seconds, the studio's step limit) that b is still queued when it cancels:
        # at 15 steps the sampler now finishes before the cancel click lands
        set_number(a, "steps", 200)
        a.locator("#generate").click()
        status_shows(a, r"^Running AND")
        b.locator("#generate").click()  # the only slot is busy: b waits and says so
        status_shows(b, r"^Queued: waiting for the running job")
        b.locator("#cancel").click()
        status_shows(b, r"^Withdrawn from the queue: it will not run")
        text = status_shows(a, r"^Done: 2 image\(s\)", timeout=240_000)
        m = re.search(r"seed -1 drew seed (\d+)", text)
        assert m and f"seed {m.group(1)})" in text, text  # the seed drawn is the one recorded
        status_shows(b, r"^Withdrawn from the queue: it did not run", timeout=30_000)
        assert b.locator("#results-gallery img").count() == 0

        set_number(a, "seed", 0)
        set_number(a, "steps", 3)
        a.locator("#compare").click()
        status_shows(a, r"^Done: 8 image\(s\) \(joint prompt, average, OR, AND", timeout=240_000)
        # the first trace shown is a SuperDiff one (kappa moves), not the flat joint prompt
        assert a.locator("#trace-pick input").first.input_value() == "OR \u00b7 seed 0"
        assert a.locator("#downloads").get_by_text("superdiff-compare-grid").count() == 1, a.locator("#downloads").inner_text()
        assert a.locator("#results-gallery").get_by_text("grid: methods x seeds").count() >= 1
    finally:
        a.close()
        b.close()
