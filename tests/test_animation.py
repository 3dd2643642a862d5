"""dlm.animation: denoising frames -> an animated GIF / a self-contained HTML replay (tiny random model)."""
from __future__ import annotations

import io
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dlm.animation import MAX_GIF_FRAMES, animation_gif, animation_html, frame_cells, save_animation
from dlm.types import Frame

CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def run(tiny_llama_dir):
    import dlm
    model = dlm.load(tiny_llama_dir, device="cpu", dtype="float32")
    g = model.generate("Once upon a time", max_new_tokens=12, steps=6, frames=True)
    return model, g.frames


def test_gif_has_one_frame_per_step(run, tmp_path):
    from PIL import Image
    model, frames = run
    path = save_animation(frames, tmp_path / "out.gif", model.tokenizer, model.mask_token_id, fps=4)
    assert path == tmp_path / "out.gif" and path.stat().st_size > 0
    with Image.open(path) as im:
        assert im.format == "GIF" and im.n_frames == len(frames) == 6
        assert im.info.get("loop") == 0
        sizes = set()
        for k in range(im.n_frames):
            im.seek(k)
            sizes.add(im.size)
        assert len(sizes) == 1  # one canvas size for the whole animation
    data = animation_gif(frames, model.tokenizer, model.mask_token_id)
    assert data[:6] in (b"GIF87a", b"GIF89a")


def test_gif_frames_show_the_masks_going_away(run):
    """Masked cells are grey boxes: the first frame has many grey pixels, the last (nothing masked) none."""
    from PIL import Image
    model, frames = run
    with Image.open(io.BytesIO(animation_gif(frames, model.tokenizer, model.mask_token_id))) as im:
        grey = []
        for k in (0, im.n_frames - 1):
            im.seek(k)
            rgb = im.convert("RGB")
            grey.append(sum(1 for p in rgb.getdata() if p == (217, 220, 225)))
    assert grey[0] > 100 and grey[1] == 0


def test_long_runs_are_downsampled_keeping_first_and_last(tiny_llama_dir):
    from PIL import Image

    from dlm.loading import load_tokenizer
    tok = load_tokenizer(tiny_llama_dir)
    n = MAX_GIF_FRAMES + 40
    frames = [Frame(step=i + 1, total_steps=n, tokens=[1] + [0] * (n - i - 1) + [5] * (i + 1),
                    revealed=[n - i], confidence=[0.5], start=1) for i in range(n)]
    with Image.open(io.BytesIO(animation_gif(frames, tok, 0, fps=50))) as im:
        assert im.n_frames == MAX_GIF_FRAMES


def test_cells_follow_growing_block_canvases(run):
    """The blocks decoder's frames grow block by block; every frame is drawn with its own length."""
    model, _ = run
    g = model.generate("Hello", decoder="blocks", block_length=4, max_new_tokens=12, stop_at_eos=False,
                       frames=True)
    cells = frame_cells(g.frames, model.tokenizer, model.mask_token_id)
    lengths = [len(c) for c in cells]
    assert lengths == sorted(lengths) and lengths[0] < lengths[-1]
    for row, f in zip(cells, g.frames):
        assert sum(c.kind == "n" for c in row) == len(f.revealed)  # newly revealed tokens are highlighted
    assert animation_gif(g.frames, model.tokenizer, model.mask_token_id)


def test_html_replay_is_self_contained(run, tmp_path):
    model, frames = run
    text = save_animation(frames, tmp_path / "replay.html", model.tokenizer, model.mask_token_id).read_text()
    assert text.startswith("<!doctype html>") and "replay-data" in text
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text)  # no external scripts / CSS
    assert "<link" not in text and "@import" not in text
    assert animation_html(frames, model.tokenizer, model.mask_token_id).count('"step"') == len(frames)


def test_html_replay_escapes_token_text(tiny_llama_dir):
    from dlm.loading import load_tokenizer
    tok = load_tokenizer(tiny_llama_dir)
    ids = tok("</script><b>x</b>", add_special_tokens=False)["input_ids"]
    frames = [Frame(step=1, total_steps=1, tokens=[1] + ids, revealed=list(range(1, len(ids) + 1)),
                    confidence=[0.5] * len(ids), start=1)]
    text = animation_html(frames, tok, 0)
    assert text.count("</script>") == 2  # the two real script tags only; the data holds <\/script>


def test_unknown_suffix_is_refused(run, tmp_path):
    model, frames = run
    with pytest.raises(ValueError, match=r"\.gif, \.html.*'out\.mp4'"):
        save_animation(frames, tmp_path / "out.mp4", model.tokenizer, model.mask_token_id)
    with pytest.raises(ValueError, match="at least one Frame"):
        save_animation([], tmp_path / "out.gif", model.tokenizer, model.mask_token_id)


def test_the_library_module_does_not_import_gradio_or_plotly():
    code = "import sys, dlm.animation; sys.exit(int(any(m in sys.modules for m in ('gradio', 'plotly'))))"
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parent.parent).returncode == 0


@pytest.mark.browser
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} not installed")
def test_html_replay_opens_offline_and_steps_through_the_frames(run, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    model, frames = run
    path = save_animation(frames, tmp_path / "replay.html", model.tokenizer, model.mask_token_id)
    requests = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu"])
        context = browser.new_context(offline=True)
        page = context.new_page()
        page.on("request", lambda r: requests.append(r.url))
        page.goto(path.as_uri())
        assert page.inner_text("#counter") == f"step 1 / {frames[0].total_steps}"
        masked = [page.locator("#view .m").count()]
        for k in range(2, len(frames) + 1):
            page.click("#next")
            assert page.inner_text("#counter") == f"step {k} / {frames[0].total_steps}"
            masked.append(page.locator("#view .m").count())
        assert masked == sorted(masked, reverse=True) and masked[-1] == 0 and masked[0] > 0
        page.click("#prev")
        assert page.inner_text("#counter").startswith(f"step {len(frames) - 1} /")
        page.fill("#scrub", "1")
        page.dispatch_event("#scrub", "input")
        assert page.inner_text("#counter").startswith("step 1 /")
        page.click("#play")
        page.wait_for_function(f"document.querySelector('#counter').innerText.startsWith('step {len(frames)} /')")
        browser.close()
    assert all(u.startswith("file:") for u in requests), requests  # nothing but the file itself
