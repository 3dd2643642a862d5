"""AR vs DLM as a race: one click streams both models side by side — the DLM canvas denoising while the AR tokens
appear left to right — each with its own step counter, model-time clock, tokens/s and network evaluations. At the
end: who finished first in model time, and at what quality (judge-PPL under the AR model, distinct-2). The optional
sweep of one setting the decoder reads (steps for full / blocks, block length for speculative: DLM time and
quality against it, the AR model as a reference line) fills in afterwards."""
from __future__ import annotations

import gradio as gr

from app import render
from app.backend import LANES, Backend, RaceState, check_sweep, default_sweep, sweep_field, sweep_fields
from app.tabs.common import LIGHT, MODEL, SamplerControls, fail, offload, session
from dlm.decoders import DECODERS
from dlm.sampler_config import Task


def format_sweep(values) -> str:
    return ", ".join(f"{v:g}" for v in values)

PROMPT = "Once upon a time, in a small village by the sea,"

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
            self.controls = SamplerControls("race", backend.base_config(Task.WRITE))
            cfg = backend.base_config(Task.WRITE)
            with gr.Row():
                self.sweep_on = gr.Checkbox(True, label="Then sweep a setting of the DLM (time & quality chart)",
                                            elem_id="race-sweep-on")
                self.sweep_field = gr.Dropdown(sweep_fields(cfg.decoder), value=sweep_field(cfg),
                                               elem_id="race-sweep-field",
                                               label="Setting to sweep (those the decoder reads)")
                self.sweep = gr.Textbox(format_sweep(default_sweep(cfg)), elem_id="race-sweep",
                                        label="Values (each must fit the settings above)")
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

        async def run_race(request: gr.Request, prompt, chat, sweep_on, field, sweep, *knobs):
            try:
                cfg = backend.sampler(controls.values(knobs))
                run = await offload(backend.race, prompt, cfg, chat=chat, sweep_steps=sweep if sweep_on else None,
                                    sweep_field=field or None, session=session(request))
                race = RaceState.of(run)
                first = True
                async for batch in run.abatches():
                    race.fold(batch)
                    yield _race_outputs(race, first)
                    first = False
            except Exception as e:
                fail(e)

        go = self.go.click(run_race, [self.prompt, self.chat, self.sweep_on, self.sweep_field, self.sweep,
                                      *controls.components], self.outputs, **MODEL)
        self._wire_sweep()
        return [go]

    def _wire_sweep(self) -> None:
        backend, controls = self.backend, self.controls

        def follow(field, values, *knobs, keep=True):
            """The sweep follows the settings: the settings the decoder reads, and values that fit them (the
            shown ones while they still fit, else valid defaults)."""
            decoder = controls.values(knobs).get("decoder")
            if decoder not in DECODERS:
                return gr.skip(), gr.skip()
            fields = sweep_fields(decoder)
            if not fields:
                return gr.update(choices=[], value=None), ""
            if field not in fields:  # another setting: the values shown were for the old one
                field, keep = fields[0], False
            try:
                cfg = backend.sampler(controls.values(knobs))
            except Exception:  # not a valid config yet (e.g. no block length): the values wait for one
                return gr.update(choices=fields, value=field), gr.skip() if keep else ""
            try:
                fits = keep and bool(check_sweep(values, cfg, field)[1])
            except ValueError:
                fits = False
            return gr.update(choices=fields, value=field), \
                gr.skip() if fits else format_sweep(default_sweep(cfg, field))

        inputs, outputs = [self.sweep_field, self.sweep, *controls.components], [self.sweep_field, self.sweep]
        for name in ("decoder", "max_new_tokens", "block_length", "steps"):
            if name in controls.by_name:
                controls.by_name[name].change(follow, inputs, outputs, **LIGHT)
        self.sweep_field.input(lambda *a: follow(*a, keep=False), inputs, outputs, **LIGHT)


def _race_outputs(race: RaceState, first: bool) -> tuple:
    """One update of the race's outputs (each side's view, counter, text, stats; the summary; the chart) after a
    batch; `first`: the first update wipes the previous race's results."""
    keep = "" if first else gr.skip()
    out = []
    for lane in LANES:
        t, g = race.traces[lane], race.results.get(lane)
        out += [t.html(legend=False), t.race_counter(race.clock[lane], running=race.running(lane)),
                g.text if g is not None else keep,
                render.race_side_stats(race.summary[lane]) if race.new_summary else keep]
    if race.cancelled:
        if race.reason:
            gr.Warning(race.reason.replace("<", "&lt;"))
        out += [f"Stopped — {race.reason}" if race.reason else "Stopped.", gr.skip()]
    elif (race.new_summary or race.new_rows) and race.summary:  # plots: at the end / per sweep row
        ar = race.summary["ar"]
        out += [render.race_summary(race.summary) if race.new_summary else gr.skip(),
                render.compare_chart(race.sweep, dict(seconds=ar["seconds"], ppl=ar["gen_ppl"]))]
    else:
        out += [keep, render.compare_chart([], None) if first else gr.skip()]
    return tuple(out)
