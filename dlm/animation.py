"""Denoising animations as files: an animated GIF, or a self-contained HTML replay that opens offline.

    from dlm.animation import save_animation
    g = model.generate("Once upon a time", frames=True)
    save_animation(g.frames, "out.gif", model.tokenizer, model.mask_token_id)    # or "out.html"

Every frame shows the canvas after one step: masked positions are grey boxes, the tokens revealed at that step are
highlighted (colour = the model's confidence, red = unsure, green = sure), tokens revealed earlier are calm blue,
the prompt is grey and other fixed text (an infilling template, pinned words, the unedited part of a re-denoised
canvas) is plain. Both formats are built from the same per-frame cells (`frame_cells`), so they always agree.

Library layer: Pillow only (no gradio, no plotly). The HTML replay inlines its data, CSS and script: no network.
"""
from __future__ import annotations

import html
import io
import json
import pathlib
from dataclasses import dataclass
from typing import Union

from .types import Frame

SUFFIXES = (".gif", ".html")
PROMPT_TOKENS_SHOWN = 48   # prompt tokens drawn before the generated region (long few-shot prompts are cut)
MAX_GIF_FRAMES = 300       # longer runs are downsampled evenly (first and last step always kept)

# cell kinds, one letter each (also the CSS classes of the HTML replay)
PROMPT, MASK, NEW, OLD, FIXED = "p", "m", "n", "o", "f"


@dataclass
class Cell:
    kind: str               # PROMPT / MASK / NEW / OLD / FIXED
    text: str = ""          # the token's text ("" for a mask)
    confidence: float = 0.0  # for NEW: the probability the model gave the chosen token


def confidence_rgb(p: float) -> tuple[int, int, int]:
    """Red (p = 0) -> yellow -> green (p = 1), light enough for dark text on top."""
    p = min(max(float(p), 0.0), 1.0)
    if p < 0.5:
        return 245, int(150 + 190 * p), 140
    return int(245 - 290 * (p - 0.5)), 235, 140


def _piece(tokenizer, token_id: int, cache: dict[int, str]) -> str:
    if token_id not in cache:
        cache[token_id] = tokenizer.decode([int(token_id)], skip_special_tokens=False,
                                           clean_up_tokenization_spaces=False)
    return cache[token_id]


def frame_cells(frames: list[Frame], tokenizer, mask_token_id: int) -> list[list[Cell]]:
    """For each frame, the cells to draw: the last PROMPT_TOKENS_SHOWN prompt tokens, then every canvas position
    from `frame.start` on (the blocks decoder grows the canvas block by block, so rows may get longer)."""
    cache: dict[int, str] = {}
    revealed_at: dict[int, int] = {}   # canvas position -> index of the frame that revealed it
    confidence: dict[int, float] = {}
    out = []
    for k, f in enumerate(frames):
        for pos, conf in zip(f.revealed, f.confidence):
            revealed_at.setdefault(pos, k)
            confidence.setdefault(pos, float(conf))
        row = []
        for pos in range(max(0, f.start - PROMPT_TOKENS_SHOWN), len(f.tokens)):
            tok = int(f.tokens[pos])
            if tok == mask_token_id:
                row.append(Cell(MASK))
                continue
            text = _piece(tokenizer, tok, cache)
            if pos < f.start:
                row.append(Cell(PROMPT, text))
            elif pos not in revealed_at or revealed_at[pos] > k:
                row.append(Cell(FIXED, text))
            elif revealed_at[pos] == k:
                row.append(Cell(NEW, text, confidence[pos]))
            else:
                row.append(Cell(OLD, text))
        out.append(row)
    return out


def _check(frames) -> list[Frame]:
    frames = list(frames)
    if not frames:
        raise ValueError("frames: the animation needs at least one Frame (generate with frames=True)")
    return frames


# ------------------------------------------------------------------------------------------------------------ GIF
WIDTH, MARGIN, FONT_SIZE, LINE = 760, 14, 16, 26
COLOURS = dict(bg=(252, 252, 253), text=(31, 36, 48), prompt=(138, 143, 153), mask=(217, 220, 225),
               old=(230, 237, 247), header=(85, 85, 85))


def _font(size: int = FONT_SIZE):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


def _layout(cells: list[Cell], font) -> tuple[list[tuple[int, int, int, Cell, str]], int]:
    """Word-wrap the cells: [(x, y, width, cell, text to draw)] and the total height."""
    x, y, boxes = MARGIN, MARGIN + LINE + 6, []
    for cell in cells:
        text = "" if cell.kind == MASK else cell.text.replace("\t", "  ")
        pieces = text.split("\n")
        for j, piece in enumerate(pieces):
            shown = piece + ("\\n" if j < len(pieces) - 1 else "")  # a visible newline (the font has no ↵)
            w = 18 if cell.kind == MASK else max(int(font.getlength(shown)), 4 if shown else 0)
            if shown or cell.kind == MASK:
                if x + w > WIDTH - MARGIN and x > MARGIN:
                    x, y = MARGIN, y + LINE
                boxes.append((x, y, w, cell, shown))
                x += w + (2 if cell.kind == MASK else 0)
            if j < len(pieces) - 1:  # a newline inside the token: continue on the next line
                x, y = MARGIN, y + LINE
    return boxes, y + LINE + MARGIN


def _draw(cells: list[Cell], header: str, height: int, font, small):
    from PIL import Image, ImageDraw
    im = Image.new("RGB", (WIDTH, height), COLOURS["bg"])
    d = ImageDraw.Draw(im)
    d.text((MARGIN, MARGIN), header, fill=COLOURS["header"], font=small)
    for x, y, w, cell, shown in _layout(cells, font)[0]:
        if cell.kind == MASK:
            d.rounded_rectangle((x, y + 3, x + w, y + LINE - 5), radius=3, fill=COLOURS["mask"])
            continue
        if cell.kind in (NEW, OLD):
            fill = confidence_rgb(cell.confidence) if cell.kind == NEW else COLOURS["old"]
            d.rectangle((x, y + 1, x + w, y + LINE - 3), fill=fill)
        colour = COLOURS["prompt"] if cell.kind == PROMPT else COLOURS["text"]
        d.text((x, y + 3), shown, fill=colour, font=font)
        if cell.kind == FIXED:
            d.line((x, y + LINE - 4, x + w, y + LINE - 4), fill=COLOURS["prompt"], width=1)
    return im


def animation_gif(frames: list[Frame], tokenizer, mask_token_id: int, fps: float = 8.0) -> bytes:
    """An animated GIF of the frames, one GIF frame per step (runs longer than MAX_GIF_FRAMES steps are
    downsampled evenly, keeping the first and the last step). `fps` frames per second; the last one is held 2 s."""
    frames = _check(frames)
    if not fps > 0:
        raise ValueError(f"fps: must be > 0, got {fps!r}")
    if len(frames) > MAX_GIF_FRAMES:
        keep = sorted({round(i * (len(frames) - 1) / (MAX_GIF_FRAMES - 1)) for i in range(MAX_GIF_FRAMES)})
        frames = [frames[i] for i in keep]
    font, small = _font(), _font(12)
    rows = frame_cells(frames, tokenizer, mask_token_id)
    height = max(_layout(r, font)[1] for r in rows)
    images = [_draw(r, f"step {f.step} / {f.total_steps}    grey = masked, colour = revealed at this step",
                    height, font, small) for f, r in zip(frames, rows)]
    duration = [max(int(round(1000 / fps)), 20)] * len(images)
    duration[-1] = max(duration[-1], 2000)
    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=duration, loop=0,
                   optimize=False)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------------------- HTML
_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>dlm denoising replay</title>
<style>
body { font-family: system-ui, sans-serif; margin: 20px; color: #1f2430; background: #fff; }
#bar { display: flex; gap: 8px; align-items: center; margin-bottom: 10px; }
#bar button { font-size: 14px; padding: 3px 10px; }
#scrub { flex: 1; }
#view { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 14px; line-height: 2.0;
        white-space: pre-wrap; word-break: break-word; border: 1px solid #d5d9e0; border-radius: 8px;
        padding: 10px 12px; background: #fcfcfd; }
.t { border-radius: 4px; }
.p { color: #8a8f99; }
.m { background: #d9dce1; color: #9aa0aa; display: inline-block; min-width: 1.3em; text-align: center;
     line-height: 1.3; margin: 0 1px; }
.o { background: #e6edf7; color: #22324a; }
.n { font-weight: 600; box-shadow: 0 0 0 1px rgba(0,0,0,.25); }
.f { text-decoration: underline dotted #9aa0aa; }
</style></head>
<body>
<h3>__TITLE__</h3>
<div id="bar"><button id="prev" title="previous step">&#9664;</button><button id="play">play</button>
<button id="next" title="next step">&#9654;</button><input id="scrub" type="range" min="1" max="1" value="1">
<span id="counter"></span></div>
<div id="view"></div>
<p style="color:#777;font-size:12px">grey box = masked · coloured = revealed at this step (red = unsure, green =
sure) · blue = revealed earlier · grey text = prompt · dotted = fixed text</p>
<script id="replay-data" type="application/json">__DATA__</script>
<script>
(function () {
  const data = JSON.parse(document.getElementById('replay-data').textContent);
  const view = document.getElementById('view'), scrub = document.getElementById('scrub');
  const counter = document.getElementById('counter'), play = document.getElementById('play');
  const n = data.frames.length;
  let k = 0, timer = null;
  scrub.max = String(n);
  function colour(p) { return 'hsl(' + Math.round(120 * Math.max(0, Math.min(1, p))) + ', 80%, 72%)'; }
  function show(i) {
    k = Math.max(0, Math.min(n - 1, i));
    const f = data.frames[k];
    view.textContent = '';
    f.cells.forEach(function (c) {
      const s = document.createElement('span');
      s.className = 't ' + c[0];
      if (c[0] === 'm') { s.textContent = '\\u00b7'; }
      else { s.textContent = c[1].replace(/\\n/g, '\\u21b5\\n').replace(/\\t/g, '\\u21e5'); }
      if (c[0] === 'n') { s.style.background = colour(c[2]); }
      view.appendChild(s);
    });
    counter.textContent = 'step ' + f.step + ' / ' + f.total;
    scrub.value = String(k + 1);
  }
  function stop() { if (timer) { clearInterval(timer); timer = null; play.textContent = 'play'; } }
  play.onclick = function () {
    if (timer) { stop(); return; }
    if (k >= n - 1) { show(0); }
    play.textContent = 'pause';
    timer = setInterval(function () { if (k >= n - 1) { stop(); } else { show(k + 1); } }, data.interval);
  };
  document.getElementById('prev').onclick = function () { stop(); show(k - 1); };
  document.getElementById('next').onclick = function () { stop(); show(k + 1); };
  scrub.oninput = function () { stop(); show(Number(scrub.value) - 1); };
  show(0);
})();
</script>
</body></html>
"""


def animation_html(frames: list[Frame], tokenizer, mask_token_id: int, *, fps: float = 8.0,
                   title: str = "Diffusion LM denoising, step by step") -> str:
    """A self-contained HTML page replaying the frames (play / pause, previous / next step, a scrub slider).
    Data, CSS and script are inline: it opens offline and loads nothing from the network."""
    frames = _check(frames)
    rows = frame_cells(frames, tokenizer, mask_token_id)
    data = dict(interval=max(int(round(1000 / fps)), 20) if fps > 0 else 125, frames=[
        dict(step=f.step, total=f.total_steps,
             cells=[[c.kind] if c.kind == MASK else [c.kind, c.text] + ([round(c.confidence, 3)] if c.kind == NEW
                                                                         else []) for c in row])
        for f, row in zip(frames, rows)])
    blob = json.dumps(data, ensure_ascii=False).replace("</", "<\\/")  # no early </script> inside the data
    return _HTML.replace("__TITLE__", html.escape(title)).replace("__DATA__", blob)


def save_animation(frames: list[Frame], path: Union[str, pathlib.Path], tokenizer, mask_token_id: int, *,
                   fps: float = 8.0) -> pathlib.Path:
    """Write the animation to `path`: an animated GIF for `.gif`, a self-contained HTML replay for `.html`
    (chosen by the suffix; anything else is a ValueError). Returns the path."""
    path = pathlib.Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise ValueError(f"animation path: the suffix must be one of {', '.join(SUFFIXES)}, got {path.name!r}")
    if suffix == ".gif":
        path.write_bytes(animation_gif(frames, tokenizer, mask_token_id, fps=fps))
    else:
        path.write_text(animation_html(frames, tokenizer, mask_token_id, fps=fps), encoding="utf-8")
    return path


__all__ = ["save_animation", "animation_gif", "animation_html", "frame_cells", "Cell", "MAX_GIF_FRAMES"]
