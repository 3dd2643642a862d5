"""AR vs DLM as a race: one click streams both models side by side — the DLM canvas denoising while the AR tokens
appear left to right — each with its own step counter, model-time clock, tokens/s and network evaluations. At the
end: who finished first in model time, and at what quality (judge-PPL under the AR model, distinct-2). The optional
steps sweep (DLM time and quality against its step count, the AR model as a reference line) fills in afterwards."""
from __future__ import annotations

import gradio as gr

from app import render
from app.backend import Backend
from app.tabs.common import MODEL, SamplerControls, fail, new_trace, session

PROMPT = "Once upon a time, in a small village by the sea,"
LANES = ("dlm", "ar")

CLOCK_NOTE = ("**The race clock is each side's model time** (its own forward passes only: no tokenizing, no "
              "drawing). On one device the two models take turns — whichever clock is behind makes the next step — "
              "so both clocks advance fairly and *who finished first* is decided in model time, not wall time.")


class RaceTab:
    def __init__(self, backend: Backend):
        self.backend = backend
        with gr.Tab("AR vs DLM", id="compare"):
            with gr.Row():
                self.prompt = gr.Textbox(PROMPT, lines=3, scale=4, label="Prompt (the same for both models)",
                                         elem_id="race-prompt")
                with gr.Column(scale=1, min_width=160):
                    self.chat = gr.Checkbox(False, label="Chat template", elem_id="race-chat")
                    self.go = gr.Button("Race", variant="primary", elem_id="compare-run")
                    self.stop = gr.Button("Stop", variant="stop", elem_id="race-stop")
            self.controls = SamplerControls("race", backend.base_config("write"))
            with gr.Row():
                self.sweep_on = gr.Checkbox(True, label="Then sweep the DLM's steps (time & quality chart)",
                                            elem_id="race-sweep-on")
                self.sweep = gr.Textbox("4, 8, 16, 32", label="Step counts (each ≤ length)", elem_id="race-sweep")
            gr.Markdown(CLOCK_NOTE)
            self.sides = {}
            with gr.Row():
                for lane, title in (("dlm", "Diffusion LM"), ("ar", "AR counterpart")):
                    with gr.Column():
                        gr.Markdown(f"### {title}")
                        self.sides[lane] = dict(
                            counter=gr.Markdown("step 0 / 0", elem_id=f"race-{lane}-counter"),
                            view=gr.HTML(render.Trace(mask_id=-1).html(legend=False), css_template=render.TOKEN_CSS,
                                         js_on_load=None, elem_id=f"race-{lane}-view"),
                            text=gr.Textbox(label="Output", lines=4, interactive=False, elem_id=f"race-{lane}-text"),
                            stats=gr.Markdown(elem_id=f"race-{lane}-stats"))
            self.summary = gr.Markdown(elem_id="race-summary")
            self.plot = gr.Plot(render.compare_chart([], None), show_label=False, elem_id="race-sweep-plot")
        self.events = self._wire()

    @property
    def outputs(self) -> list:
        side = [self.sides[lane][k] for lane in LANES for k in ("view", "counter", "text", "stats")]
        return side + [self.summary, self.plot]

    def _wire(self) -> list:
        backend, controls = self.backend, self.controls

        async def run_race(request: gr.Request, prompt, chat, sweep_on, sweep, *knobs):
            try:
                cfg = backend.sampler(controls.values(knobs))
                run = backend.race(prompt, cfg, chat=chat, sweep_steps=sweep if sweep_on else None,
                                   session=session(request))
                decode = backend.piece_decoder()
                traces = {lane: new_trace(backend, run.prompt_tokens) for lane in LANES}
                clock, done, summary, rows = {"dlm": 0.0, "ar": 0.0}, {}, None, []
                first = True
                async for batch in run.abatches():
                    keep = "" if first else gr.skip()  # the first update wipes the previous race's results
                    for lane in LANES:
                        for f in batch.frames(lane):
                            traces[lane].add(f, decode)
                        if batch.result(lane) is not None:
                            done[lane] = batch.result(lane)
                    clock = batch.result("clock") or clock
                    summary_now, new_rows = batch.result("summary"), batch.items("sweep")
                    summary = summary_now or summary
                    rows += new_rows
                    out = []
                    for lane in LANES:
                        t, g = traces[lane], done.get(lane)
                        out += [t.html(legend=False), t.race_counter(clock[lane], running=g is None and
                                                                     not batch.cancelled),
                                g.text if g is not None else keep,
                                render.race_side_stats(summary[lane]) if summary_now else keep]
                    if batch.cancelled:
                        out += ["Stopped.", gr.skip()]
                    elif (summary_now or new_rows) and summary:  # plots only at the end of the race / per row
                        out += [render.race_summary(summary) if summary_now else gr.skip(),
                                render.compare_chart(rows, dict(seconds=summary["ar"]["seconds"],
                                                                ppl=summary["ar"]["gen_ppl"]))]
                    else:
                        out += [keep, render.compare_chart([], None) if first else gr.skip()]
                    first = False
                    yield tuple(out)
            except Exception as e:
                fail(e)

        go = self.go.click(run_race, [self.prompt, self.chat, self.sweep_on, self.sweep, *controls.components],
                           self.outputs, **MODEL)
        return [go]
