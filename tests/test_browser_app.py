"""The playground in a real headless Chromium (Debian's /usr/bin/chromium driven by Playwright): the live
animations, infilling, the AR vs DLM race, edit and re-denoise, export, the in-context scoreboard, model-aware
defaults, bad input to the controls, and the single-step runs that used to end in a Slider error.

Screenshots go to test-artifacts/ (gitignored). Skipped when Chromium or Playwright is absent.
"""
from __future__ import annotations

import io
import os
import socket
import time
from pathlib import Path

import pytest
from helpers import slow_model

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

# Records every distinct "step i / N … running" the page shows, with the number of masked cells at that moment,
# in window.__frames[sel] (sel = the elem_id prefix of a counter / view pair, e.g. '#denoise' or '#race-ar').
WATCH_COUNTER = """
(sel) => {
  window.__frames = window.__frames || {};
  window.__frames[sel] = [];
  const counter = document.querySelector(sel + '-counter');
  const view = document.querySelector(sel + '-view');
  const seen = new Set();
  new MutationObserver(() => {
    const t = counter.innerText;
    const m = t.match(/step (\\d+) \\/ (\\d+)/);
    if (m && t.includes('running') && !seen.has(m[1])) {
      seen.add(m[1]);
      window.__frames[sel].push({step: +m[1], total: +m[2], masked: view.querySelectorAll('.t.m').length});
    }
  }).observe(counter, {subtree: true, childList: true, characterData: true});
}
"""

TOASTS = "Array.from(document.querySelectorAll('[data-testid=\"toast-text\"]')).map(e => e.innerText)"


@pytest.fixture(scope="module")
def app(tiny_llama_dir, tmp_path_factory):
    from app import ui
    from app.model_lifecycle import SwitchPolicy
    # the Model tab may load models from the tests' temporary folders (switching is off unless the operator allows)
    demo = ui.build(model=str(tiny_llama_dir), device="cpu", dtype="float32",
                    policy=SwitchPolicy(True, (str(tmp_path_factory.getbasetemp()),)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield demo, url
    demo.close()


@pytest.fixture(scope="module")
def app_url(app):
    return app[1]


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium for the module (Playwright's sync API allows one running instance per thread)."""
    sync_api = pytest.importorskip("playwright.sync_api")
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def page(browser, app_url):
    pg = browser.new_page(viewport={"width": 1280, "height": 1400})
    pg.set_default_timeout(90_000)
    pg.goto(app_url)
    pg.wait_for_selector("#denoise-generate")
    yield pg
    pg.close()


def set_number(page, elem_id: str, value) -> None:
    """Type into a slider's / number box's numeric input and commit it."""
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def open_settings(page, prefix: str) -> None:
    """Open a tab's (closed) sampler-settings accordion."""
    if not page.locator(f"#{prefix}-steps").is_visible():
        page.click(f"#{prefix}-sampler .label-wrap")
        page.wait_for_selector(f"#{prefix}-steps input[type=number]", state="visible")


def set_text(page, elem_id: str, value: str) -> None:
    page.locator(f"#{elem_id}").locator("textarea, input").first.fill(value)


def fresh(page, app_url, tab: str | None = None) -> None:
    """Reload the page (no toasts, no state from earlier tests) and open a tab."""
    page.goto(app_url)
    page.wait_for_selector("#denoise-generate")
    if tab:
        page.get_by_role("tab", name=tab).click()


def wait_stats(page, prefix: str) -> None:
    page.wait_for_function(f"document.querySelector('#{prefix}-stats').innerText.includes('network evaluations')")


def no_slider_error(page) -> None:
    toasts = page.evaluate(TOASTS)
    assert not any("Slider" in t or "minimum" in t for t in toasts), toasts


def test_denoise_animates_live_then_shows_the_final_text(page, app_url):
    page.fill("#denoise-prompt textarea", "Once upon a time")
    set_number(page, "denoise-max_new_tokens", LENGTH)
    set_number(page, "denoise-steps", LENGTH)
    page.evaluate(WATCH_COUNTER, "#denoise")
    page.click("#denoise-generate")
    page.wait_for_function("document.querySelector('#denoise-stats').innerText.includes('network evaluations')")
    page.screenshot(path=str(ARTIFACTS / "browser-denoise.png"), full_page=True)

    frames = page.evaluate("window.__frames['#denoise']")
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


def test_race_streams_both_sides_live(page, app_url):
    fresh(page, app_url, "AR vs DLM")
    set_text(page, "race-prompt", "Once upon a time")
    open_settings(page, "race")
    set_number(page, "race-max_new_tokens", LENGTH)
    set_number(page, "race-steps", LENGTH)
    set_text(page, "race-sweep", "8, 32")
    page.evaluate(WATCH_COUNTER, "#race-dlm")
    page.evaluate(WATCH_COUNTER, "#race-ar")
    page.click("#compare-run")
    page.wait_for_function("document.querySelector('#race-summary').innerText.includes('finished first')")
    page.wait_for_function("document.querySelectorAll('#race-sweep-plot .scatterlayer .point').length >= 4")
    page.screenshot(path=str(ARTIFACTS / "browser-race.png"), full_page=True)
    for side in ("#race-dlm", "#race-ar"):
        frames = page.evaluate(f"window.__frames['{side}']")
        intermediate = [f for f in frames if f["step"] < f["total"]]
        assert len(intermediate) >= 3, f"{side}: only {len(intermediate)} intermediate frames: {frames}"
    dlm = page.evaluate("window.__frames['#race-dlm']")
    assert all(a["masked"] > b["masked"] for a, b in zip(dlm, dlm[1:]))  # the canvas denoises
    for side in ("dlm", "ar"):
        assert page.input_value(f"#race-{side}-text textarea").strip(), f"no final {side} text"
        stats = page.inner_text(f"#race-{side}-stats")
        assert "judge-PPL" in stats and "distinct-2" in stats and "network evaluations" in stats
    assert "model time" in page.inner_text("#race-dlm-counter")
    assert page.locator("#race-dlm-view .t.m").count() == 0
    # the sweep chart labels every point
    labels = page.eval_on_selector_all("#race-sweep-plot .textpoint", "els => els.map(e => e.textContent)")
    assert any("8 steps" in t for t in labels) and any("32 steps" in t for t in labels)


def test_controls_follow_the_decoder_and_the_race_sweeps_what_it_reads(page, app_url):
    """Issue 23: a decoder's ignored knobs are disabled with a word why; the race's sweep follows the decoder."""
    fresh(page, app_url, "AR vs DLM")
    open_settings(page, "race")
    assert page.locator("#race-steps input[type=number]").is_enabled()
    assert page.input_value("#race-sweep-field input") == "steps"
    page.locator("#race-decoder input").fill("speculative")
    page.locator("#race-decoder input").press("Enter")
    page.wait_for_function("document.querySelector('#race-steps input[type=number]').disabled")
    assert "not used by the speculative decoder" in page.inner_text("#race-steps")
    assert page.locator("#race-block_length input[type=number]").is_enabled()
    page.wait_for_function("document.querySelector('#race-sweep-field input').value == 'block_length'")
    set_number(page, "race-block_length", 2)
    set_number(page, "race-max_new_tokens", 8)
    page.wait_for_function("document.querySelector('#race-sweep textarea, #race-sweep input').value == '2, 4, 8'")
    page.click("#compare-run")
    page.wait_for_function("document.querySelectorAll('#race-sweep-plot .scatterlayer .point').length >= 6")
    labels = page.eval_on_selector_all("#race-sweep-plot .textpoint", "els => els.map(e => e.textContent)")
    assert any("block 4" in t for t in labels), labels
    assert not page.evaluate(TOASTS)
    # an invalid combination is refused before anything runs, naming the field
    page.locator("#race-decoder input").fill("blocks")
    page.locator("#race-decoder input").press("Enter")
    page.wait_for_function("document.querySelector('#race-steps input[type=number]').disabled == false")
    assert page.input_value("#race-sweep-field input") == "block_length"  # blocks reads it too: kept
    set_number(page, "race-steps", 2)
    page.click("#compare-run")
    page.wait_for_function(f"{TOASTS}.some(t => t.includes('steps: 2 is fewer than the 4 blocks'))")


def chip_ids(page) -> list[str]:
    return page.eval_on_selector_all("#edit-chips [data-k]", "els => els.map(e => e.dataset.id)")


def test_edit_and_redenoise_keeps_every_unedited_token(page, app_url):
    fresh(page, app_url)
    page.fill("#denoise-prompt textarea", "The weather today is")
    set_number(page, "denoise-max_new_tokens", 16)
    set_number(page, "denoise-steps", 16)
    page.click("#denoise-generate")
    wait_stats(page, "denoise")
    page.wait_for_function("document.querySelectorAll('#edit-chips [data-k]').length == 16")
    before = chip_ids(page)
    page.click("#edit-chips [data-k='3']")
    page.wait_for_function("document.querySelector('#edit-start input').value == '3'")  # before the shift-click
    page.click("#edit-chips [data-k='5']", modifiers=["Shift"])
    page.wait_for_function("document.querySelectorAll('#edit-chips .chip.sel').length == 3")
    assert page.input_value("#edit-start input") == "3" and page.input_value("#edit-end input") == "5"
    set_number(page, "edit-length", 2)
    page.click("#edit-run")
    page.wait_for_function("document.querySelector('#edit-status').innerText.includes('version 2 of 2')")
    page.screenshot(path=str(ARTIFACTS / "browser-edit.png"), full_page=True)
    after = chip_ids(page)
    assert len(after) == 15 and after[:3] == before[:3] and after[5:] == before[6:]
    assert page.locator("#denoise-view .t.m").count() == 0
    assert page.locator("#denoise-view .t.fx").count() == 13  # the unedited tokens, drawn as fixed
    assert "step 2 / 2" in page.inner_text("#denoise-counter")
    page.click("#edit-undo")
    page.wait_for_function("document.querySelector('#edit-status').innerText.includes('version 1 of 2')")
    assert chip_ids(page) == before
    page.click("#edit-redo")
    page.wait_for_function("document.querySelector('#edit-status').innerText.includes('version 2 of 2')")
    assert chip_ids(page) == after
    no_slider_error(page)


def test_export_gives_a_gif_and_an_offline_html_replay(page, app_url, tmp_path):
    import httpx
    from PIL import Image
    fresh(page, app_url)
    set_number(page, "denoise-max_new_tokens", 12)
    set_number(page, "denoise-steps", 6)
    page.click("#denoise-generate")
    wait_stats(page, "denoise")
    page.click("#denoise-export")
    page.wait_for_function("document.querySelectorAll('#denoise-files a[href]').length >= 2")
    hrefs = page.eval_on_selector_all("#denoise-files a[href]", "els => els.map(e => e.href)")
    gif = next(h for h in hrefs if ".gif" in h)
    replay = next(h for h in hrefs if ".html" in h)
    with Image.open(io.BytesIO(httpx.get(gif, timeout=30).content)) as im:
        assert im.format == "GIF" and im.n_frames == 6
    path = tmp_path / "replay.html"
    path.write_bytes(httpx.get(replay, timeout=30).content)
    offline = page.context.browser.new_context(offline=True)
    try:
        p2 = offline.new_page()
        seen = []
        p2.on("request", lambda r: seen.append(r.url))
        p2.goto(path.as_uri())
        assert p2.inner_text("#counter") == "step 1 / 6"
        for k in range(2, 7):
            p2.click("#next")
            assert p2.inner_text("#counter") == f"step {k} / 6"
        assert p2.locator("#view .m").count() == 0
        p2.screenshot(path=str(ARTIFACTS / "browser-replay.png"), full_page=True)
        assert all(u.startswith("file:") for u in seen), seen
    finally:
        offline.close()


def test_scoreboard_fills_the_table(page, app_url):
    from dlm.fewshot import load_examples
    fresh(page, app_url, "In-context")
    scored = [e for e in load_examples() if e.expected]
    page.click("#icl-run-all")
    page.wait_for_function("(() => { const t = document.querySelector('#icl-scoreboard').innerText; "
                           "return t.includes('accuracy') && !t.includes('(after'); })()")
    page.screenshot(path=str(ARTIFACTS / "browser-scoreboard.png"), full_page=True)
    text = page.inner_text("#icl-scoreboard")
    for e in scored:
        assert e.title in text
    assert text.count("%)") == 2  # the accuracy of each model
    # one example side by side: DLM and AR each marked against the expected answer
    page.locator("#icl-examples").get_by_text(scored[0].title).click()
    page.wait_for_function("document.querySelector('#icl-ar-mark').innerText.includes('answer')")
    assert page.inner_text("#icl-dlm-mark").startswith(("✓", "✗")) and page.input_value("#icl-ar textarea")


def test_bad_input_to_the_new_controls_gets_a_message(page, app_url):
    fresh(page, app_url)
    set_text(page, "denoise-pins", "Paris")  # no position
    page.click("#denoise-generate")
    page.wait_for_function(f"{TOASTS}.some(t => t.includes('pins: write position: word pairs'))")
    set_text(page, "denoise-pins", "")
    set_number(page, "denoise-temperature", 9)  # typed past the slider: SamplerConfig's message, not Gradio's
    set_number(page, "denoise-top_p", 0)
    page.click("#denoise-generate")
    page.wait_for_function(f"{TOASTS}.some(t => t.includes('top_p: must be in (0, 1]'))")
    set_number(page, "denoise-top_p", 1)
    set_number(page, "edit-start", 999)
    set_number(page, "edit-end", 1000)
    page.click("#edit-run")
    page.wait_for_function(f"{TOASTS}.some(t => t.includes('edit: generate a text first'))")
    page.get_by_role("tab", name="AR vs DLM").click()
    set_text(page, "race-sweep", "4, x")
    page.click("#compare-run")
    page.wait_for_function(f"{TOASTS}.some(t => t.includes('not a positive whole number'))")
    page.screenshot(path=str(ARTIFACTS / "browser-bad-input.png"), full_page=True)
    # the server keeps serving
    page.get_by_role("tab", name="Denoise").click()
    set_number(page, "denoise-max_new_tokens", 4)
    set_number(page, "denoise-steps", 4)
    set_number(page, "denoise-temperature", 0)
    page.click("#denoise-generate")
    wait_stats(page, "denoise")


def test_single_step_runs_show_their_result(page, app_url, app):
    """Steps = 1, a single [MASK], a middle of length 1, and Stop during the first step: each shows its result
    (before: "Slider minimum must be less than maximum." and nothing)."""
    fresh(page, app_url)
    set_number(page, "denoise-max_new_tokens", 4)
    set_number(page, "denoise-steps", 1)
    page.click("#denoise-generate")
    wait_stats(page, "denoise")
    assert "step 1 / 1" in page.inner_text("#denoise-counter") and page.input_value("#denoise-text textarea")
    assert not page.locator("#denoise-scrub").is_visible()
    no_slider_error(page)

    page.get_by_role("tab", name="Infill").click()
    set_text(page, "infill-template", "The cat [MASK] on the mat.")
    page.click("#infill-generate")
    page.wait_for_function("document.querySelector('#infill-counter').innerText.includes('step 1 / 1')")
    wait_stats(page, "infill")
    assert page.input_value("#infill-text textarea").startswith("The cat")
    no_slider_error(page)

    page.locator("#infill-mode").get_by_text("prefix + suffix").click()
    set_number(page, "infill-length", 1)
    page.click("#infill-generate")
    page.wait_for_function("document.querySelector('#infill-text textarea').value.startsWith('The old fisherman')")
    assert "step 1 / 1" in page.inner_text("#infill-counter")
    no_slider_error(page)

    page.get_by_role("tab", name="Denoise").click()
    set_number(page, "denoise-max_new_tokens", 8)
    set_number(page, "denoise-steps", 8)
    demo = app[0]
    with slow_model(demo.backend, 1.0):  # the first forward takes seconds: Stop lands inside it
        page.click("#denoise-generate")
        deadline = time.monotonic() + 30
        while demo.backend.worker.active is None and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        page.click("#denoise-stop")
        page.wait_for_function("document.querySelector('#denoise-stats').innerText.includes('Stopped after 0 steps')")
    page.screenshot(path=str(ARTIFACTS / "browser-single-step.png"), full_page=True)
    no_slider_error(page)
    set_number(page, "denoise-steps", 2)
    page.click("#denoise-generate")
    wait_stats(page, "denoise")


def test_a_run_stopped_by_the_time_limit_keeps_its_canvas_to_export(page, app_url, app):
    """Issue 25: the time limit used to throw the frames away (an error, no partial canvas, nothing to export)."""
    demo = app[0]
    fresh(page, app_url)
    set_number(page, "denoise-max_new_tokens", 64)
    set_number(page, "denoise-steps", 64)
    demo.backend.worker.time_limit = 1.5
    try:
        with slow_model(demo.backend, 0.05):
            page.click("#denoise-generate")
            page.wait_for_function("document.querySelector('#denoise-stats').innerText.includes('time limit')")
    finally:
        demo.backend.worker.time_limit = 120.0
    stats = page.inner_text("#denoise-stats")
    assert stats.startswith("Stopped after ") and "dlm-studio --time-limit" in stats
    assert page.locator("#denoise-view .t.old, #denoise-view .t.new").count() > 0  # the partial canvas stays
    assert any("time limit" in t for t in page.evaluate(TOASTS))
    page.click("#denoise-export")
    page.wait_for_function("document.querySelectorAll('#denoise-files a[href]').length >= 2")


def test_loading_a_model_resets_the_widgets_to_its_recommended_config(page, app_url, app, tiny_llama_dir, tmp_path):
    import shutil

    from dlm import SamplerConfig
    from dlm.sampler_config import save_sampler_configs
    demo = app[0]
    d = tmp_path / "tiny-with-config"
    shutil.copytree(tiny_llama_dir, d)
    save_sampler_configs(d, SamplerConfig(max_new_tokens=24, threshold=0.5), SamplerConfig(steps=3, seed=7))
    fresh(page, app_url, "Model")
    set_text(page, "model-path", str(d))
    page.click("#model-load")
    page.wait_for_function(f"document.querySelector('#model-status').innerText.includes({d.name!r})")
    try:
        page.get_by_role("tab", name="Denoise").click()
        page.wait_for_function("document.querySelector('#denoise-max_new_tokens input[type=number]').value == '24'")
        assert page.input_value("#denoise-threshold input[type=number]") == "0.5"
        assert "threshold 0.5" in page.inner_text("#denoise-config")
        page.get_by_role("tab", name="Infill").click()
        open_settings(page, "infill")
        assert page.input_value("#infill-steps input[type=number]") == "3"
        assert page.input_value("#infill-seed input[type=number]") == "7"
        page.get_by_role("tab", name="Model").click()
        assert "Decoding modes" in page.inner_text("#model-status")
    finally:
        demo.backend.load(str(tiny_llama_dir), device="cpu", dtype="float32")


# ------------------------------------------------------------------------------------ the shipped default, untouched
# What a visitor of `make run` gets: the real default model (smollm2-135m-dlm on CPU), every tab's primary button
# clicked with every default untouched. A first click never errors.

# Like WATCH_COUNTER, also noting whether a step revealed a token after a position that is still masked (out of
# left-to-right order) and how many tokens each step revealed.
WATCH_ORDER = """
(sel) => {
  window.__order = [];
  const view = document.querySelector(sel + '-view');
  new MutationObserver(() => {
    const cells = Array.from(view.querySelectorAll('.t'));
    const firstMasked = cells.findIndex(c => c.classList.contains('m'));
    const fresh = cells.map((c, i) => c.classList.contains('new') ? i : -1).filter(i => i >= 0);
    const drafts = cells.filter(c => c.classList.contains('dr')).length;
    if (fresh.length) window.__order.push({revealed: fresh.length, drafts: drafts,
                                           late: firstMasked >= 0 && fresh.some(i => i > firstMasked)});
  }).observe(view, {subtree: true, childList: true});
}
"""


@pytest.fixture(scope="module")
def default_page(browser):
    """A browser page on the playground as `make run` serves it (no --model: the shipped default), on CPU."""
    from app import ui
    from app.model_lifecycle import DEFAULT_DLM
    from dlm import model_registry
    if not model_registry.is_available(DEFAULT_DLM):
        pytest.skip(f"the shipped default {DEFAULT_DLM} is not available here")
    demo = ui.build(device="cpu")
    assert demo.backend.info.source == DEFAULT_DLM, demo.backend.info.notice
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    pg = browser.new_page(viewport={"width": 1280, "height": 1400})
    pg.set_default_timeout(300_000)
    pg.url_ = url
    try:
        yield pg
    finally:
        pg.close()
        demo.close()


def no_errors(page) -> None:
    toasts = page.evaluate(TOASTS)
    assert not toasts, toasts
    shown = page.evaluate("Array.from(document.querySelectorAll('body *')).filter(e => !e.children.length && "
                          "e.offsetParent && e.innerText && e.innerText.trim() === 'Error').length")
    assert shown == 0, "an output box shows Error"


@pytest.mark.slow
def test_default_denoise_then_edit_then_export(default_page):
    page = default_page
    fresh(page, page.url_)
    page.evaluate(WATCH_ORDER, "#denoise")
    page.click("#denoise-generate")
    wait_stats(page, "denoise")
    page.screenshot(path=str(ARTIFACTS / "default-denoise.png"), full_page=True)
    no_errors(page)
    assert page.input_value("#denoise-text textarea").strip()
    assert page.locator("#denoise-view .t.m").count() == 0
    # the first screen shows what a diffusion LM does: several tokens per step, not left to right
    order = page.evaluate("window.__order")
    assert order and max(o["revealed"] for o in order) >= 2, order
    drafted = "verifies" in page.inner_text("#denoise-fast-note")   # a draft adapter: the base verifies drafts
    if drafted:   # each forward shows its drafts together, and some forwards keep several tokens
        assert max(o["drafts"] for o in order) >= 2, order
        assert "tokens per forward" in page.inner_text("#denoise-counter")
    else:
        assert any(o["late"] for o in order), f"every step revealed the leftmost masked tokens: {order}"
    # edit and re-denoise, the selection left as it is (token 0, same length)
    page.click("#edit-run")
    page.wait_for_function("document.querySelector('#edit-status').innerText.includes('version 2 of 2')")
    no_errors(page)
    # export
    page.click("#denoise-export")
    page.wait_for_function("document.querySelectorAll('#denoise-files a[href]').length >= 2")
    no_errors(page)
    if drafted:   # the tab already writes with the fast mode
        return
    # the line above the settings names the faster writing mode and its button switches to it
    assert "speculative" in page.inner_text("#denoise-fast-note")
    page.click("#denoise-fast")
    page.wait_for_function("document.querySelector('#denoise-decoder input').value == 'speculative'")
    page.wait_for_function("document.querySelector('#denoise-steps input[type=number]').disabled")


@pytest.mark.slow
def test_default_infill(default_page):
    page = default_page
    fresh(page, page.url_, "Infill")
    page.click("#infill-generate")
    wait_stats(page, "infill")
    page.wait_for_function("document.querySelector('#infill-ar textarea').value.length > 0")
    page.screenshot(path=str(ARTIFACTS / "default-infill.png"), full_page=True)
    no_errors(page)
    assert page.locator("#infill-view .t.m").count() == 0 and page.input_value("#infill-text textarea").strip()


@pytest.mark.slow
def test_default_incontext_run_and_run_all(default_page):
    page = default_page
    fresh(page, page.url_, "In-context")
    page.click("#icl-run")
    page.wait_for_function("document.querySelector('#icl-ar-mark').innerText.includes('answer')")
    assert page.inner_text("#icl-dlm-mark").startswith(("✓", "✗"))
    no_errors(page)
    page.click("#icl-run-all")
    page.wait_for_function("(() => { const t = document.querySelector('#icl-scoreboard').innerText; "
                           "return t.includes('accuracy') && !t.includes('(after'); })()")
    page.screenshot(path=str(ARTIFACTS / "default-incontext.png"), full_page=True)
    assert page.inner_text("#icl-scoreboard").count("%)") == 2
    no_errors(page)


@pytest.mark.slow
def test_default_race_with_its_sweep(default_page):
    page = default_page
    fresh(page, page.url_, "AR vs DLM")
    values = [v for v in page.input_value("#race-sweep textarea, #race-sweep input").split(",") if v.strip()]
    assert values, "the race opens without sweep values"
    page.click("#compare-run")
    page.wait_for_function("document.querySelector('#race-summary').innerText.includes('finished first')")
    page.wait_for_function(f"document.querySelectorAll('#race-sweep-plot .scatterlayer .point').length >= "
                           f"{2 * len(values)}")
    page.screenshot(path=str(ARTIFACTS / "default-race.png"), full_page=True)
    no_errors(page)
    for side in ("dlm", "ar"):
        assert page.input_value(f"#race-{side}-text textarea").strip(), f"no final {side} text"
