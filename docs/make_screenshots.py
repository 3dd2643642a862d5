"""Regenerate docs/screenshots/*.png: every tab of the playground after one default click, on the shipped model.

Starts `dlm-studio` on a free local port (offline, the model `make run` serves), drives Debian's Chromium through
Playwright, presses each tab's primary button with every setting untouched, waits for the run to finish and
saves one PNG per tab (docs/app.md shows them).

    .venv/bin/python docs/make_screenshots.py            # ~3 min on a 2-core CPU
    .venv/bin/python docs/make_screenshots.py Infill     # only the named tabs
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "docs" / "screenshots"
# tab label -> (element id of its primary button or None, seconds to let the run finish)
TABS = {"Denoise": ("denoise-generate", 60), "Infill": ("infill-generate", 60), "In-context": ("icl-run", 60),
        "AR vs DLM": ("compare-run", 120), "Model": (None, 2)}


# the Denoise step also saved on its own (denoise-step.png): early enough that most of the canvas is still ahead
STEP_SHOWN = 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_idle(page, timeout_s: float) -> None:
    """Until the run's status line stops saying "running" / "waiting" and Gradio shows no pending event (its
    progress overlays), or the timeout."""
    end = time.monotonic() + timeout_s
    page.wait_for_timeout(2000)
    busy = page.locator(".progress-text, .eta-bar, .generating, .pending, :text('running…'), :text('waiting')")
    while time.monotonic() < end and busy.count():
        page.wait_for_timeout(500)
    page.wait_for_timeout(1500)   # the last frame and the charts settle


def main(names: list[str]) -> None:
    from playwright.sync_api import sync_playwright
    unknown = set(names) - set(TABS)
    if unknown:
        raise SystemExit(f"unknown tab(s) {', '.join(sorted(unknown))}: choose from {', '.join(TABS)}")
    OUT.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    app = subprocess.Popen([sys.executable, "-m", "app.launch", "--host", "127.0.0.1", "--port", str(port)],
                           cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
                break
            except OSError:
                time.sleep(1)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium",
                                        args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
            page = browser.new_page(viewport={"width": 1400, "height": 1800})
            page.goto(f"http://127.0.0.1:{port}/", wait_until="load")
            page.wait_for_timeout(5000)
            for tab, (button, wait_s) in TABS.items():
                if names and tab not in names:
                    continue
                page.get_by_role("tab", name=tab).click()
                page.wait_for_timeout(1000)
                if button:
                    page.locator(f"#{button}").click()
                    _wait_idle(page, wait_s)
                path = OUT / f"{tab.lower().replace(' ', '-')}.png"
                page.screenshot(path=str(path), full_page=True)
                print(path)
                if tab == "Denoise":   # also one step of the run: what a step shows (drafts kept and rejected)
                    slider = page.locator("#denoise-scrub input[type=number]")
                    if slider.count():
                        slider.fill(str(STEP_SHOWN))
                        slider.press("Enter")
                        page.wait_for_timeout(2000)
                        step = OUT / "denoise-step.png"
                        page.locator("#denoise-view").screenshot(path=str(step))
                        print(step)
            browser.close()
    finally:
        app.terminate()
        app.wait(timeout=30)


if __name__ == "__main__":
    main(sys.argv[1:])
