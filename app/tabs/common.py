"""What every tab shares: the event helpers (`app.events`, re-exported), the sampler widgets (built from
`SamplerConfig.describe()`, so a new knob in dlm/sampler_config.py appears here with no app change) and the
animated token view with its scrub slider, end-of-run charts and export."""
from __future__ import annotations

import html
from typing import Callable, Optional

import gradio as gr

from app import render
from app.backend import Run, ui_value
from app.events import LIGHT, MODEL, ended, fail, offload, session  # noqa: F401  (the tabs' one import)
from dlm.decoders import DECODERS
from dlm.sampler_config import SamplerConfig, Task

SLIDER_MAX_INT = 512      # the UI's range for integer knobs the config leaves unbounded (length, steps, top-k)
SLIDER_MAX_FLOAT = 2.0    # ... and for unbounded floats (temperature)
NUMBER_BOX_SPAN = 10_000  # wider ranges (the seed) get a number box instead of a slider


def banner(text: str) -> str:
    return f'<div class="banner">⚠️ {html.escape(text)}</div>' if text else ""


BANNER_CSS = """
.banner { background: #fff4e5; border: 1px solid #f0b35a; color: #6b3f00; border-radius: 8px; padding: 8px 12px;
          font-family: system-ui, sans-serif; font-size: 14px; }
"""


# --------------------------------------------------------------------------------------------- sampler widgets
class KnobSlider(gr.Slider):
    """A slider that hands its value over as sent: ranges and types are checked in one place, by
    `app.checks.sampler_config` (SamplerConfig's messages name the field; Gradio's own range check would not)."""

    is_template = True  # drawn by the frontend's Slider (gr.Blocks.get_block_name uses the base class)

    def preprocess(self, payload):
        return payload


class KnobNumber(gr.Number):
    """A number box that hands its value over as sent (see KnobSlider)."""

    is_template = True

    def preprocess(self, payload):
        return payload


def usage(d: dict, decoder: str) -> dict:
    """Whether a knob is live for `decoder`, by the decoder's declaration (`DECODERS[decoder].uses`): a
    per-decoder setting it does not read is disabled, its info saying why; any other is enabled with its help."""
    help_ = d.get("help") or None
    if d.get("per_decoder") and d["name"] not in DECODERS[decoder].uses:
        return dict(interactive=False, info=f"not used by the {decoder} decoder (it reads: "
                                            f"{', '.join(DECODERS[decoder].uses) or 'none of these'})")
    return dict(interactive=True, info=help_)


def knob_widget(d: dict, value, elem_id: str, decoder: Optional[str] = None):
    """One widget for one `SamplerConfig.describe()` entry: a dropdown for choices, a checkbox for a flag, a
    slider for a bounded number (its range includes the `off` value), a number box for a very wide one; disabled
    with a word why when `decoder` does not read it (`usage`)."""
    label = d.get("label") or d["name"]
    live = usage(d, decoder) if decoder else dict(info=d.get("help") or None)
    if d.get("choices"):
        return gr.Dropdown(d["choices"], value=value, label=label, elem_id=elem_id, **live)
    if d["type"] is bool:
        return gr.Checkbox(bool(value), label=label, elem_id=elem_id, **live)
    if d["type"] is str:
        return gr.Textbox(value or "", label=label, elem_id=elem_id, **live)
    integer = d["type"] is int
    lo, hi, off = d.get("minimum"), d.get("maximum"), d.get("off")
    lo = 0 if lo is None else lo
    if off is not None:
        lo = min(lo, off)
    if hi is None:
        hi = max(SLIDER_MAX_INT if integer else SLIDER_MAX_FLOAT, value or 0)
    if hi - lo > NUMBER_BOX_SPAN:
        return KnobNumber(value, label=label, elem_id=elem_id, **live)
    return KnobSlider(lo, hi, value=value, step=d.get("step") or (1 if integer else 0.05), label=label,
                      elem_id=elem_id, **live)


class SamplerControls:
    """The sampler knobs of one tab, in an accordion: one widget per UI field of `SamplerConfig.describe()`
    (elem_ids `{prefix}-{field}`), starting from `config` (the loaded model's recommended config), with a line
    saying what that config is. The knobs the chosen decoder does not read are disabled with a word why
    (`usage`, from the decoders' declarations), following the decoder dropdown. `values(knobs)` is the dict
    `backend.sampler` takes; `updates(cfg)` resets the widgets to another model's config (the Model tab's Load)."""

    PER_ROW = 4

    def __init__(self, prefix: str, config: SamplerConfig, *, task: Task = Task.WRITE, exclude=(), open_: bool = False,
                 title: str = "Sampler settings"):
        self.task = Task.parse(task)
        self.fields = [d for d in SamplerConfig.describe() if d.get("ui", True) and d["name"] not in exclude]
        self.names = [d["name"] for d in self.fields]
        self.components: list = []
        with gr.Accordion(title, open=open_, elem_id=f"{prefix}-sampler"):
            self.summary = gr.Markdown(self._summary(config), elem_id=f"{prefix}-config")
            for i in range(0, len(self.fields), self.PER_ROW):
                with gr.Row():
                    for d in self.fields[i:i + self.PER_ROW]:
                        self.components.append(knob_widget(d, ui_value(config, d["name"]), f"{prefix}-{d['name']}",
                                                           config.decoder))
        self.by_name = dict(zip(self.names, self.components))
        self.decoder = self.by_name.get("decoder")
        if self.decoder is not None:
            self.decoder.change(self.usage_updates, self.decoder, self.components, **LIGHT)

    def usage_updates(self, decoder: str) -> list:
        """Every widget enabled or disabled (with its why) for `decoder`."""
        if decoder not in DECODERS:
            return [gr.skip()] * len(self.components)
        return [gr.update(**usage(d, decoder)) for d in self.fields]

    def _summary(self, cfg: SamplerConfig) -> str:
        return f"Starts from {render.config_origin(self.task)}: {render.config_summary(cfg)}."

    def values(self, knobs) -> dict:
        return dict(zip(self.names, knobs))

    @property
    def outputs(self) -> list:
        return [*self.components, self.summary]

    def updates(self, cfg: SamplerConfig) -> list:
        return [gr.update(value=ui_value(cfg, d["name"]), **usage(d, cfg.decoder)) for d in self.fields] + \
            [self._summary(cfg)]


# --------------------------------------------------------------------------------------------- the token view
class StreamView:
    """Token animation + step counter + scrub slider + final text + stats + the two end-of-run plots + export."""

    def __init__(self, prefix: str, *, plots: bool = True, export: bool = True, extra: Optional[list] = None):
        self.prefix = prefix
        self.counter = gr.Markdown("step 0 / 0", elem_id=f"{prefix}-counter")
        self.view = gr.HTML(render.Trace(mask_id=-1).html(legend=False), css_template=render.TOKEN_CSS,
                            elem_id=f"{prefix}-view", js_on_load=None)
        self.scrub = gr.Slider(1, 2, value=1, step=1, label="Scrub through the steps", visible=False,
                               elem_id=f"{prefix}-scrub")
        self.text = gr.Textbox(label="Output text", lines=3, interactive=False, buttons=["copy"],
                               elem_id=f"{prefix}-text")
        self.stats = gr.Markdown(elem_id=f"{prefix}-stats")
        self.heat = self.chart = None
        if plots:
            with gr.Row():
                self.heat = gr.Plot(render.empty_figure(), label="Reveal heatmap", show_label=False)
                self.chart = gr.Plot(render.empty_figure(), label="Per-step reveals", show_label=False)
        self.export_button = self.files = None
        if export:
            with gr.Row():
                self.export_button = gr.Button("Export the animation (GIF + HTML replay)", size="sm",
                                               elem_id=f"{prefix}-export", scale=1)
                self.files = gr.File(label="Animation files", file_count="multiple", interactive=False,
                                     elem_id=f"{prefix}-files", scale=3, visible=False)
        self.trace = gr.State(None)
        self.extra = list(extra or [])  # more outputs, filled at the end by animate(extra_fn=...)

    @property
    def outputs(self) -> list:
        outs = [self.view, self.counter, self.scrub, self.text, self.stats]
        if self.heat is not None:
            outs += [self.heat, self.chart]
        return outs + [self.trace] + self.extra

    def wire(self, backend) -> None:
        """The view's own events: scrubbing re-draws a step from the trace; export writes the files (from the
        trace alone: what the run showed, whatever model is loaded by then) as work of the backend's worker:
        queued fairly, under the time limit, its frames x tokens bounded."""
        def scrub(k, trace):
            if trace is None:
                return gr.skip(), gr.skip()
            return trace.html(int(k) - 1), trace.counter(int(k) - 1)

        self.scrub.input(scrub, [self.scrub, self.trace], [self.view, self.counter], trigger_mode="always_last",
                         **LIGHT)
        if self.export_button is not None:
            async def export(request: gr.Request, trace):
                try:
                    run = await offload(backend.export, trace, session=session(request))
                    files = ended(await run.await_all()).result("files")
                    return gr.update(value=files, visible=True) if files else gr.skip()
                except Exception as e:
                    fail(e)

            self.export_button.click(export, self.trace, self.files, **MODEL)

    async def animate(self, run: Run, *, extra_fn: Optional[Callable] = None, text_fn: Optional[Callable] = None,
                      prompt_end: Optional[int] = None):
        """Turn a run's batches into output tuples: the token view on every (throttled) batch; the plots, the
        scrub slider and the text once at the end, plus `extra_fn(generation, trace)` for the extra outputs.
        `text_fn(generation)` overrides the shown text; `prompt_end` as for `render.Trace`. Tokens are drawn with
        the run's own display context (`run.display`)."""
        trace = run.display.trace(prompt_end)
        decode = run.display.decode
        n_plots = 2 if self.heat is not None else 0
        skip_rest = [gr.skip()] * (n_plots + 1 + len(self.extra))
        first = True
        async for batch in run.abatches():
            for f in batch.frames():
                trace.add(f, decode)
            g = batch.result()
            if batch.reason:  # the time limit: the partial canvas stays (to scrub and export), the message says so
                gr.Warning(batch.reason.replace("<", "&lt;"))
                yield self._final(trace, None, run, extra_fn, text_fn, n_plots, batch.reason)
                return
            if g is None and not batch.cancelled:
                clear = ("", "") if first else (gr.skip(), gr.skip())  # wipe the previous run's text and stats
                first = False
                yield (trace.html(), trace.counter(running=True), gr.update(visible=False), *clear, *skip_rest)
                continue
            yield self._final(trace, g, run, extra_fn, text_fn, n_plots)
            return
        yield self._final(trace, None, run, extra_fn, text_fn, n_plots)  # ended without a result

    def _final(self, trace, g, run, extra_fn, text_fn, n_plots, reason: str = ""):
        if g is None:
            stats, text = f"Stopped after {len(trace)} steps" + (f" — {reason}" if reason else "."), ""
        else:
            stats = render.run_stats(g, trace.revealed(), run.first_event_seconds)
            text = text_fn(g) if text_fn is not None else g.text
        n = len(trace)
        plots = [trace.reveal_heatmap(), trace.step_chart()] if n_plots else []
        extra = [gr.skip()] * len(self.extra) if g is None or extra_fn is None else list(extra_fn(g, trace))
        # A one-step (or stopped-at-once) run has nothing to scrub: the slider stays hidden, and its range stays
        # valid (Gradio refuses minimum == maximum), so the result still shows.
        scrub = gr.update(visible=n > 1, minimum=1, maximum=max(n, 2), value=max(n, 1))
        return (trace.html(), trace.counter(), scrub, text, stats, *plots, trace, *extra)
