"""The playground in a real headless Chromium (Debian's /usr/bin/chromium driven by Playwright).

Screenshots go to test-artifacts/ (gitignored). Skipped when Chromium or Playwright is absent.
"""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run"]
LENGTH = 128  # long enough that even a fast machine streams several throttled (<= 15/s) frames with the tiny model

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} not installed (apt-get install chromium)"),
]

# Records every distinct "step i / N … running" the page shows, with the number of masked cells at that moment.
WATCH_COUNTER = """
(sel) => {
  window.__frames = [];
  const counter = document.querySelector(sel + '-counter');
  const view = document.querySelector(sel + '-view');
  const seen = new Set();
  new MutationObserver(() => {
    const t = counter.innerText;
    const m = t.match(/step (\\d+) \\/ (\\d+)/);
    if (m && t.includes('running') && !seen.has(m[1])) {
      seen.add(m[1]);
      window.__frames.push({step: +m[1], total: +m[2], masked: view.querySelectorAll('.t.m').length});
    }
  }).observe(counter, {subtree: true, childList: true, characterData: true});
}
"""


@pytest.fixture(scope="module")
def app_url(tiny_llama_dir):
    from app import ui
    demo = ui.build(model=str(tiny_llama_dir), device="cpu", dtype="float32")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield url
    demo.close()


@pytest.fixture(scope="module")
def page(app_url):
    sync_api = pytest.importorskip("playwright.sync_api")
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        pg = browser.new_page(viewport={"width": 1280, "height": 1400})
        pg.set_default_timeout(90_000)
        pg.goto(app_url)
        pg.wait_for_selector("#denoise-generate")
        yield pg
        browser.close()


def set_number(page, elem_id: str, value) -> None:
    """Type into a slider's / number box's numeric input and commit it."""
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def test_denoise_animates_live_then_shows_the_final_text(page, app_url):
    page.fill("#denoise-prompt textarea", "Once upon a time")
    set_number(page, "denoise-length", LENGTH)
    set_number(page, "denoise-steps", LENGTH)
    page.evaluate(WATCH_COUNTER, "#denoise")
    page.click("#denoise-generate")
    page.wait_for_function("document.querySelector('#denoise-stats').innerText.includes('network evaluations')")
    page.screenshot(path=str(ARTIFACTS / "browser-denoise.png"), full_page=True)

    frames = page.evaluate("window.__frames")
    intermediate = [f for f in frames if f["step"] < f["total"]]
    assert len(intermediate) >= 3, f"only {len(intermediate)} intermediate frames were seen: {frames}"
    assert all(f["total"] == LENGTH for f in frames)
    # masked cells drop as steps advance (one token per step here)
    assert all(a["masked"] > b["masked"] for a, b in zip(intermediate, intermediate[1:]))
    assert all(f["masked"] == LENGTH - f["step"] for f in intermediate)

    assert page.locator("#denoise-view .t.m").count() == 0  # nothing left masked
    assert f"step {LENGTH} / {LENGTH}" in page.inner_text("#denoise-counter")
    shown = page.input_value("#denoise-text textarea")
    # the same request through the API (greedy, seed 0) gives the same text
    from gradio_client import Client
    expected = Client(app_url, verbose=False).predict("Once upon a time", LENGTH, LENGTH, api_name="/denoise")
    assert shown == expected["text"]

    # the scrub slider appears after the run and re-draws an earlier step
    assert page.locator("#denoise-scrub").is_visible()
    page.wait_for_function("document.querySelectorAll('.plotly .main-svg').length >= 2")  # the end-of-run charts
    set_number(page, "denoise-scrub", 1)
    page.wait_for_function(f"document.querySelectorAll('#denoise-view .t.m').length == {LENGTH - 1}")
    assert "step 1 /" in page.inner_text("#denoise-counter")


def test_infill_keeps_the_fixed_text(page):
    page.get_by_role("tab", name="Infill").click()
    template = page.input_value("#infill-template textarea")
    assert "[MASK:" in template
    before, rest = template.split("[MASK:6]")
    middle, after = rest.split("[MASK:8]")
    page.click("#infill-generate")
    page.wait_for_function("document.querySelector('#infill-stats').innerText.includes('network evaluations')")
    page.wait_for_function("document.querySelector('#infill-ar textarea').value.length > 0")
    page.screenshot(path=str(ARTIFACTS / "browser-infill.png"), full_page=True)
    text = page.input_value("#infill-text textarea")
    assert text.startswith(before) and middle in text and text.endswith(after)
    assert page.locator("#infill-view .t.m").count() == 0
    fixed = "".join(page.locator("#infill-view .t.fx").all_inner_texts())
    assert middle.strip().split()[0] in fixed  # template text between the spans is drawn as fixed
    assert page.input_value("#infill-ar textarea").startswith(before.rstrip())


def test_other_tabs_render(page):
    for tab, selector, shot in [("In-context", "#icl-examples", "browser-icl.png"),
                                ("AR vs DLM", "#compare-run", "browser-compare.png"),
                                ("Model", "#model-status", "browser-model.png")]:
        page.get_by_role("tab", name=tab).click()
        page.wait_for_selector(selector, state="visible")
        time.sleep(0.3)
        page.screenshot(path=str(ARTIFACTS / shot), full_page=True)
    assert "Parameters" in page.inner_text("#model-status")
