"""All the playground's drawing: frames -> HTML token views, token chips, Markdown (stats, the race summary, the
Model tab's status, config summaries: written in `app.summaries`, re-exported here), tables, plotly figures and the
exported animation. Pure functions of plain data: no model, no Gradio.

A `Trace` collects the `Frame`s of one run (as they stream in) together with the display string of every token id
it has seen, so the whole run can be re-rendered at any step afterwards (the scrub slider) without the tokenizer.
It is plain data, safe to keep in a per-session `gr.State`.
"""
from __future__ import annotations

import atexit
import html
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from dlm.types import Frame

from .frame_log import FrameLog
from .summaries import (  # noqa: F401  (the tabs draw through app.render: re-exported)
    NO_MODEL,
    SCOREBOARD_HEADERS,
    config_origin,
    config_summary,
    decoding_modes,
    finite,
    model_status,
    race_side_stats,
    race_summary,
    run_stats,
    scoreboard_rows,
)

# How many prompt tokens to show before the generated region (long few-shot prompts would drown the answer).
PROMPT_TOKENS_SHOWN = 160

# Scoped to the gr.HTML component through its `css_template`.
TOKEN_CSS = """
.tokview { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 14px;
           line-height: 2.0; white-space: pre-wrap; word-break: break-word; padding: 10px 12px;
           border: 1px solid #d5d9e0; border-radius: 8px; background: #fcfcfd; color: #1f2430; min-height: 3em; }
.tokview .t { border-radius: 4px; padding: 1px 0; }
.tokview .p { color: #8a8f99; }
.tokview .fx { color: #1f2430; text-decoration: underline dotted #9aa0aa; }
.tokview .m { background: #d9dce1; color: #9aa0aa; display: inline-block; min-width: 1.3em; text-align: center;
              line-height: 1.3; margin: 0 1px; }
.tokview .old { background: #e6edf7; color: #22324a; }
.tokview .new { color: #111; font-weight: 600; box-shadow: 0 0 0 1px rgba(0,0,0,.25); }
.tokview .sp { color: #b0b4bb; font-size: 11px; }
.tokview .dr { color: #3b4a63; background: #eef3fb; border: 1px dashed #9db3d6; }
.tokview .acc { text-decoration: underline 2px #2e8b57; }
.tokview .rj { color: #b23a3a; text-decoration: line-through 2px #b23a3a; font-size: 12px; margin-right: 1px; }
.tokview .ell { color: #9aa0aa; }
.tokview .legend { font-family: system-ui, sans-serif; font-size: 12px; color: #555; margin-bottom: 6px; }
.tokview .legend span { padding: 1px 6px; margin-right: 8px; border-radius: 4px; }
.tokview .chip { cursor: pointer; border-radius: 4px; margin: 0 1px; background: #eef1f5; }
.tokview .chip:hover { outline: 1px solid #8a8f99; }
.tokview .chip.sel { background: #ffd36b; outline: 1px solid #c99a00; }
"""

# Token chips report clicks to the server (`trigger`), with the chip's offset and whether shift was held.
CHIPS_JS = """
element.addEventListener('click', function (e) {
  const chip = e.target.closest('[data-k]');
  if (chip) { trigger('click', {k: Number(chip.dataset.k), shift: e.shiftKey}); }
});
"""


def confidence_colour(p: float) -> str:
    """Background colour for a token revealed at this step: red (p=0) -> yellow -> green (p=1)."""
    p = min(max(float(p), 0.0), 1.0)
    return f"hsl({int(round(120 * p))}, 80%, 72%)"


def _display(piece: str) -> str:
    """HTML-escape a token's text, making newlines and tabs visible while keeping the line break."""
    s = html.escape(piece)
    return s.replace("\n", "↵\n").replace("\t", "⇥")


@dataclass
class Trace:
    """The frames of one run plus what is needed to draw them.

    mask_id:   the model's mask token id (drawn as a grey box).
    special:   token ids drawn as small labels (EOS, pad, chat markers) rather than text.
    prompt_end: canvas positions before it are the prompt (grey); default each frame's `start`. An edit's frames
               start at the first remasked position, and the generated tokens before it are drawn as fixed.
    frames:    every `Frame` received so far, in order (a `FrameLog`: whole canvases only every few steps).
    pieces:    token id -> display text, filled by `add` through the caller's `decode` function.
    reveal_step / reveal_conf: canvas position -> 1-based step at which it was revealed / its confidence.
    """

    mask_id: int
    special: set[int] = field(default_factory=set)
    prompt_end: Optional[int] = None
    frames: FrameLog = field(default_factory=FrameLog)
    pieces: dict[int, str] = field(default_factory=dict)
    reveal_step: dict[int, int] = field(default_factory=dict)
    reveal_conf: dict[int, float] = field(default_factory=dict)

    def add(self, frame: Frame, decode: Callable[[list[int]], dict[int, str]]) -> None:
        """Append one frame; `decode(ids)` returns the display text of token ids not seen before."""
        shown = [*frame.tokens, *(int(d[1]) for d in frame.drafts), *(int(r[1]) for r in frame.rejected)]
        missing = sorted({t for t in shown if t not in self.pieces and t != self.mask_id})
        if missing:
            self.pieces.update(decode(missing))
        self.frames.append(frame)
        for pos, conf in zip(frame.revealed, frame.confidence):
            self.reveal_step.setdefault(pos, frame.step)
            self.reveal_conf.setdefault(pos, float(conf))

    def __len__(self) -> int:
        return len(self.frames)

    # ---- token view -------------------------------------------------------------------------------------------
    def html(self, k: Optional[int] = None, *, legend: bool = True) -> str:
        """The canvas after frame `k` (0-based; default the last one) as HTML.

        Masked positions are grey boxes, tokens revealed at that very step are coloured by their confidence,
        tokens revealed earlier are a calm blue, prompt tokens grey, other fixed tokens (infill suffix / template
        text) plain and dotted-underlined. A speculative decoder's step also shows its drafts: the proposals not
        decided yet faint in dashed boxes (the fainter, the less probable), the drafts its verifier kept
        underlined green, a rejected draft struck through in red before the token that replaced it.
        """
        if not self.frames:
            return '<div class="tokview"><span class="ell">(nothing generated yet)</span></div>'
        k = len(self.frames) - 1 if k is None else min(max(int(k), 0), len(self.frames) - 1)
        frame = self.frames[k]
        out: list[str] = [self._legend()] if legend else []
        drafts = {int(p): (int(t), float(q)) for p, t, q in frame.drafts}
        prompt_end = frame.start if self.prompt_end is None else self.prompt_end
        first = max(0, prompt_end - PROMPT_TOKENS_SHOWN)
        if first > 0:
            out.append(f'<span class="ell">… ({first} prompt tokens) </span>')
        end = max(len(frame.tokens), 1 + max(drafts, default=-1))   # drafts may lie past the decided canvas
        for pos in range(first, end):
            tok = frame.tokens[pos] if pos < len(frame.tokens) else self.mask_id
            if tok == self.mask_id and pos in drafts:
                d, q = drafts[pos]
                out.append(f'<span class="t dr" style="opacity:{0.35 + 0.65 * min(max(q, 0.0), 1.0):.2f}" '
                           f'title="pos {pos}: draft, q={q:.2f}">{_display(self.pieces.get(d, "?"))}</span>')
            elif tok == self.mask_id:
                out.append(f'<span class="t m" title="pos {pos}: masked">·</span>')
            else:
                out.append(self._token(frame, pos, tok, prompt_end))
        return '<div class="tokview">' + "".join(out) + "</div>"

    def _legend(self) -> str:
        return ('<div class="legend"><span class="m">masked</span>'
                f'<span style="background:{confidence_colour(0.2)}">new, low p</span>'
                f'<span style="background:{confidence_colour(0.95)}">new, high p</span>'
                '<span class="old">earlier</span><span class="fx">fixed</span>'
                + ('<span class="dr">draft</span><span class="acc">draft kept</span>'
                   '<span class="rj">rejected</span>' if any(f.drafts or f.rejected for f in self.frames.headers())
                   else "")
                + '</div>')

    def _token(self, frame: Frame, pos: int, tok: int, prompt_end: int) -> str:
        """A decided token at `pos` in `frame`: prompt, fixed, new at this step (by confidence) or earlier; a
        rejected draft struck through before it."""
        rejected = {int(p): int(t) for p, t in frame.rejected}
        out = ""
        if pos in rejected:
            out = (f'<span class="t rj" title="pos {pos}: draft rejected">'
                   f'{_display(self.pieces.get(rejected[pos], "?"))}</span>')
        text = self.pieces.get(tok, "?")
        text = f'<span class="sp">{html.escape(text)}</span>' if tok in self.special else _display(text)
        if pos < prompt_end:
            return out + f'<span class="t p">{text}</span>'
        rs = self.reveal_step.get(pos)
        if rs is None or rs > frame.step:  # never revealed: a fixed token of an infill template / suffix
            return out + f'<span class="t fx" title="pos {pos}: fixed">{text}</span>'
        conf = self.reveal_conf[pos]
        if rs == frame.step:
            kept = " acc" if pos in frame.accepted else ""
            return out + (f'<span class="t new{kept}" style="background:{confidence_colour(conf)}" '
                          f'title="pos {pos}: step {rs}, p={conf:.2f}{", draft kept" if kept else ""}">{text}</span>')
        return out + f'<span class="t old" title="pos {pos}: step {rs}, p={conf:.2f}">{text}</span>'

    def counter(self, k: Optional[int] = None, *, running: bool = False) -> str:
        """'step i / N' plus how many tokens this step revealed and how many are still masked."""
        if not self.frames:
            return "step 0 / 0" + (" · running…" if running else "")
        k = len(self.frames) - 1 if k is None else min(max(int(k), 0), len(self.frames) - 1)
        f = self.frames[k]
        masked = sum(1 for t in f.tokens[f.start:] if t == self.mask_id)
        state = " · running…" if running else ""
        speculation = ""
        heads = self.frames.headers()[:k + 1]   # no canvases needed to count reveals and drafts
        if any(x.drafts or x.rejected or x.accepted for x in heads):
            done = sum(len(x.revealed) for x in heads)
            speculation = (f" · {len(f.accepted)} draft(s) kept, {len(f.rejected)} rejected, {len(f.drafts)} "
                           f"new · **{done / (k + 1):.2f} tokens per forward**")
        return (f"**step {f.step} / {f.total_steps}** · revealed {len(f.revealed)} this step{speculation} · "
                f"{masked} still masked{state}")

    def partial(self) -> str:
        """The generated region of the last frame as plain text, masked tokens as '·' (the API's live view)."""
        if not self.frames:
            return ""
        f = self.frames[-1]
        return "".join("·" if t == self.mask_id else self.pieces.get(t, "?") for t in f.tokens[f.start:])

    def revealed(self) -> int:
        """Tokens the run has decided so far."""
        return len(self.reveal_step)

    def race_counter(self, seconds: float, *, running: bool = False) -> str:
        """A race side's clock: step, its own model time, tokens/s and network evaluations so far."""
        if not self.frames:
            return "step 0 / 0" + (" · running…" if running else "")
        f = self.frames[-1]
        rate = self.revealed() / seconds if seconds > 0 else 0.0
        return (f"**step {f.step} / {f.total_steps}** · model time **{seconds:.2f} s** · {rate:.1f} tokens/s · "
                f"{len(self.frames)} NFE · {self.revealed() / len(self.frames):.2f} tokens per forward"
                + (" · running…" if running else ""))

    # ---- plots (built once at the end of a run: sending a figure per step stalls the browser) ------------------
    def reveal_heatmap(self) -> go.Figure:
        """Position x step heatmap: the cell (step s, position i) holds the confidence of token i if it was
        revealed at step s (empty otherwise). Positions are counted from the first generated token."""
        fig = go.Figure()
        if not self.frames:
            return _empty(fig, "no run yet")
        start = self.frames[-1].start
        n_pos = len(self.frames[-1].tokens) - start
        n_steps = len(self.frames)
        z: list[list[Optional[float]]] = [[None] * n_pos for _ in range(n_steps)]
        for row, f in enumerate(self.frames.headers()):
            for pos, conf in zip(f.revealed, f.confidence):
                if 0 <= pos - start < n_pos:
                    z[row][pos - start] = float(conf)
        fig.add_trace(
            go.Heatmap(
                z=z,
                x=list(range(n_pos)),
                y=[f.step for f in self.frames.headers()],
                colorscale="RdYlGn",
                zmin=0.0,
                zmax=1.0,
                colorbar=dict(title="p"),
                hovertemplate="position %{x}<br>step %{y}<br>p=%{z:.2f}<extra></extra>",
            )
        )
        fig.update_layout(
            title="When each token was revealed (colour = confidence)",
            xaxis_title="position in the generated region",
            yaxis_title="step",
            yaxis_autorange="reversed",
            height=330,
            margin=dict(l=50, r=20, t=50, b=45),
        )
        return fig

    def step_chart(self) -> go.Figure:
        """Bars: tokens revealed per step; line (right axis): mean confidence of the tokens revealed at that step."""
        fig = make_subplots(specs=[[{"secondary_y": True}]])
        if not self.frames:
            return _empty(fig, "no run yet")
        heads = self.frames.headers()
        steps = [f.step for f in heads]
        counts = [len(f.revealed) for f in heads]
        means = [sum(f.confidence) / len(f.confidence) if f.confidence else None for f in heads]
        fig.add_trace(go.Bar(x=steps, y=counts, name="revealed", marker_color="#8fb3e0"), secondary_y=False)
        fig.add_trace(
            go.Scatter(x=steps, y=means, name="mean p", mode="lines+markers", line=dict(color="#d0632b")),
            secondary_y=True,
        )
        fig.update_yaxes(title_text="tokens revealed", secondary_y=False)
        fig.update_yaxes(title_text="mean confidence", range=[0, 1.02], secondary_y=True)
        fig.update_layout(
            title="Tokens revealed per step and their mean confidence",
            xaxis_title="step",
            height=330,
            margin=dict(l=50, r=50, t=50, b=45),
            legend=dict(orientation="h", y=-0.25),
        )
        return fig


def _empty(fig: go.Figure, message: str) -> go.Figure:
    fig.update_layout(
        height=330,
        plot_bgcolor="white",
        annotations=[dict(text=message, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper",
                          font=dict(color="#888"))],
    )
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return fig


def empty_figure(message: str = "run a generation to see this chart") -> go.Figure:
    return _empty(go.Figure(), message)


def segments_html(segments: Iterable[tuple[str, bool]]) -> str:
    """Inline HTML of (text, generated?) segments: generated spans highlighted, template text plain."""
    return "".join(f'<span class="t old">{_display(t)}</span>' if gen else _display(t) for t, gen in segments)


def sweep_html(rows: list[dict]) -> str:
    """Span-length sweep: one line per n with the filled text, generated spans highlighted.
    rows: [{n, nfe, seconds, segments: [(text, generated?)]}]."""
    if not rows:
        return ""
    parts = ['<div class="tokview" style="white-space:normal">']
    for r in rows:
        parts.append(
            f'<div style="margin:4px 0"><b>n = {r["n"]}</b> '
            f'<span class="ell">({r["nfe"]} NFE, {r["seconds"]:.2f} s)</span><br>'
            f'<span style="white-space:pre-wrap">{segments_html(r["segments"])}</span></div>'
        )
    parts.append("</div>")
    return "".join(parts)


SWEEP_UNITS = {"steps": ("steps", "denoising steps"), "block_length": ("block", "block length"),
               "threshold": ("threshold", "parallel-decoding threshold")}


def sweep_label(field: str, value) -> str:
    """A sweep point's label: "8 steps", "block 4", "threshold 0.9"."""
    short = SWEEP_UNITS.get(field, (field, field))[0]
    return f"{value:g} {short}" if field == "steps" else f"{short} {value:g}"


def compare_chart(sweep: list[dict], ar: Optional[dict]) -> go.Figure:
    """DLM model time and quality (gen-PPL under the AR model, lower is better) against the swept setting (steps,
    block length or threshold: each row's "field"), with the AR model's values as horizontal dashed lines.
    `sweep` rows: {field, value, seconds, ppl} (a row without "field" is a steps row); `ar`: {seconds, ppl} or
    None."""
    fig = make_subplots(rows=1, cols=2,
                        subplot_titles=("model time (s)", "gen-PPL under the AR model (lower = better)"))
    if not sweep:
        return _empty(fig, "tick 'then sweep' and race to draw this chart (it fills in as the sweep runs)")
    field = sweep[0].get("field", "steps")
    xs = [r.get("value", r.get("steps")) for r in sweep]
    ppl = [finite(r.get("ppl")) for r in sweep]
    fig.add_trace(go.Scatter(x=xs, y=[r["seconds"] for r in sweep], mode="lines+markers+text", name="DLM",
                             text=[f"{sweep_label(field, x)}, {r['seconds']:.2f} s" for x, r in zip(xs, sweep)],
                             textposition="top center", line=dict(color="#2b6cb0")), row=1, col=1)
    fig.add_trace(go.Scatter(x=xs, y=ppl, mode="lines+markers+text", name="DLM", showlegend=False,
                             text=[f"{sweep_label(field, x)}, PPL {p:.0f}" if p is not None else sweep_label(field, x)
                                   for x, p in zip(xs, ppl)],
                             textposition="top center", line=dict(color="#2b6cb0")), row=1, col=2)
    if ar:
        for col, key, unit in ((1, "seconds", " s"), (2, "ppl", "")):
            y = finite(ar.get(key))
            if y is not None:  # the AR model as a reference line, labelled at its right end
                fig.add_trace(go.Scatter(x=[min(xs), max(xs)], y=[y, y], mode="lines+text", name="AR",
                                         text=["", f"AR {y:.2f}{unit}" if unit else f"AR {y:.0f}"],
                                         textposition="bottom left",
                                         line=dict(color="#c05621", dash="dash"), showlegend=(col == 1)),
                              row=1, col=col)
    lo, hi = min(xs), max(xs)
    pad = max((hi - lo) * 0.15, 0.5 * max(lo, 1))  # room for the labels of the first and last points
    fig.update_xaxes(title_text=SWEEP_UNITS.get(field, (field, field))[1], range=[lo - pad, hi + pad])
    fig.update_traces(cliponaxis=False, selector=dict(type="scatter"))
    fig.update_layout(height=340, margin=dict(l=50, r=20, t=50, b=45), legend=dict(orientation="h", y=-0.3))
    return fig


def chips_html(tokens: list[int], n_prompt: int, pieces: dict[int, str], special: set[int] = frozenset(),
               selection: Optional[tuple[int, int]] = None) -> str:
    """A finished canvas as clickable chips, one per generated token (`data-k` = its offset in the generated
    region, `data-id` = the token id); the selected span [a, b] (inclusive) is highlighted. The prompt's tail is
    shown grey and is not selectable."""
    if not tokens:
        return ('<div class="tokview"><span class="ell">(run a generation, then click tokens to select them)'
                '</span></div>')
    a, b = selection if selection is not None else (-1, -2)
    out = ['<div class="tokview">']
    first = max(0, n_prompt - PROMPT_TOKENS_SHOWN)
    if first:
        out.append(f'<span class="ell">… ({first} prompt tokens) </span>')
    for pos in range(first, n_prompt):
        out.append(f'<span class="t p">{_display(pieces.get(tokens[pos], "?"))}</span>')
    for k, tok in enumerate(tokens[n_prompt:]):
        text = pieces.get(tok, "?")
        text = f'<span class="sp">{html.escape(text)}</span>' if tok in special else _display(text)
        sel = " sel" if a <= k <= b else ""
        out.append(f'<span class="t chip{sel}" data-k="{k}" data-id="{tok}" title="#{k}">{text}</span>')
    out.append("</div>")
    return "".join(out)


# --------------------------------------------------------------------------------------------------- export
class _Pieces:
    """The `tokenizer.decode` that `dlm.animation` needs, answered from a Trace's own token texts: an export
    draws exactly what the run showed, whatever model is loaded by then."""

    def __init__(self, pieces: dict[int, str]):
        self.pieces = pieces

    def decode(self, ids, **_) -> str:
        return "".join(self.pieces.get(int(i), "?") for i in ids)


EXPORT_CELLS = 16_384  # frames x tokens one export may draw (a 64-token, 64-step run of a short prompt: ~5k)
EXPORTS_KEPT = 16      # exports kept in the one export folder (older ones are removed)
EXPORT_DIR = Path(tempfile.gettempdir()) / f"dlm-studio-exports-{os.getpid()}"


def export_cells(trace: Optional[Trace]) -> list[Frame]:
    """The frames an export draws: every frame when frames x tokens fits in EXPORT_CELLS, else the first, the
    last and evenly spaced ones between (at least two); refused when even two are too big."""
    if trace is None or not trace.frames:
        raise ValueError("export: run a generation first; there is no animation to export yet")
    frames = trace.frames
    tokens = max(len(f.tokens) for f in frames)
    keep = EXPORT_CELLS // max(tokens, 1)
    if keep < 2:
        raise ValueError(f"export: a canvas of {tokens} tokens is too big to animate (at most {EXPORT_CELLS // 2} "
                         f"tokens per frame)")
    if len(frames) <= keep:
        return list(frames)
    idx = sorted({round(i * (len(frames) - 1) / (keep - 1)) for i in range(keep)})
    return [frames[i] for i in idx]


def _export_folder() -> Path:
    """A new folder for one export inside EXPORT_DIR (one per process, removed at exit), the oldest beyond
    EXPORTS_KEPT removed: exports never pile up in the temp directory."""
    EXPORT_DIR.mkdir(parents=True, exist_ok=True)
    if not getattr(_export_folder, "registered", False):
        atexit.register(shutil.rmtree, EXPORT_DIR, True)
        _export_folder.registered = True
    old = sorted((p for p in EXPORT_DIR.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
    for p in old[:max(0, len(old) + 1 - EXPORTS_KEPT)]:
        shutil.rmtree(p, ignore_errors=True)
    return Path(tempfile.mkdtemp(dir=EXPORT_DIR))


def export_animation(trace: Optional[Trace], directory: Optional[str] = None) -> list[str]:
    """A run's animation as an animated GIF and a self-contained HTML replay (`dlm.animation`), its frames
    bounded by `export_cells`; in `directory`, else in a new folder of the one bounded export folder."""
    from dlm.animation import save_animation
    frames = export_cells(trace)
    out = Path(directory) if directory else _export_folder()
    return [str(save_animation(frames, out / f"denoising{suffix}", _Pieces(trace.pieces), trace.mask_id))
            for suffix in (".gif", ".html")]
