"""Infill: a `[MASK]` / `[MASK:n]` template (any number of spans) or a prefix, a suffix and a length, filled with
the model's infilling config (full attention: the text after a gap is seen). The AR model is run on the text before
the first span only, as in the paper's Table 1; the span-length sweep refills the template with every span set to n.
"""
from __future__ import annotations

import gradio as gr

from app import render
from app.backend import Backend
from app.tabs import TAB
from app.tabs.common import LIGHT, MODEL, SamplerControls, StreamView, ended, fail, offload, session
from dlm.fewshot import INFILL_EXAMPLES_DIR, load_examples
from dlm.infill import attach_spaces, split_template
from dlm.sampler_config import Task

# The shipped templates (`dlm/examples/infill/`, scored by `python -m bench.infill_examples`): the tab opens on
# the first one the shipped model does well; the hard ones stay in the list, marked.
EXAMPLES = load_examples(INFILL_EXAMPLES_DIR)
TEMPLATE = next((e.prompt for e in EXAMPLES if not e.hard), EXAMPLES[0].prompt if EXAMPLES else "")


def ar_side(mode: str, template, prefix, length) -> tuple[str, int]:
    """What the AR model gets for an infilling request: the text before the first span and the tokens to write
    (all the spans hold, in total): the paper's Table 1 setting, the AR model sees the prefix only."""
    if mode != "template":
        return prefix or "", length
    parts = attach_spaces(split_template(template or ""))[0]   # the space goes to the words
    first = parts[0][1] if parts and isinstance(parts[0][1], str) else ""
    return first, sum(p for _, p in parts if isinstance(p, int))


class InfillTab:
    def __init__(self, backend: Backend):
        self.backend = backend
        with gr.Tab(TAB["infill"].title, id="infill"):
            self.pick = gr.Dataset(components=[gr.Textbox(visible=False)], type="index", label="Examples",
                                   samples=[[e.label] for e in EXAMPLES], elem_id="infill-examples")
            self.mode = gr.Radio(["template", "prefix + suffix"], value="template", label="Input",
                                 elem_id="infill-mode")
            self.template = gr.Textbox(TEMPLATE, lines=3, elem_id="infill-template",
                                       label="Template: [MASK] = one token, [MASK:n] = n tokens")
            with gr.Row(visible=False) as self.pair:
                self.prefix = gr.Textbox("The old fisherman walked down to the", label="Prefix", lines=2,
                                         elem_id="infill-prefix")
                self.suffix = gr.Textbox(" every morning before sunrise.", label="Suffix", lines=2,
                                         elem_id="infill-suffix")
                self.length = gr.Number(8, label="Length of the middle (tokens)", elem_id="infill-length")
            with gr.Row():
                self.with_ar = gr.Checkbox(True, label="Also run the AR model on the prefix only")
                self.go = gr.Button("Fill", variant="primary", elem_id="infill-generate")
                self.stop = gr.Button("Stop", variant="stop", elem_id="infill-stop")
            self.controls = SamplerControls("infill", backend.base_config(Task.INFILL), task=Task.INFILL,
                                            exclude=("max_new_tokens",))
            self.spans = gr.JSON(label="Generated spans", elem_id="infill-spans", render=False)
            self.out = StreamView("infill", extra=[self.spans])
            self.spans.render()
            self.ar_text = gr.Textbox(label="AR model, prefix only (as in the paper's Table 1)", lines=2,
                                      interactive=False, elem_id="infill-ar")
            with gr.Accordion("Span-length sweep", open=False):
                with gr.Row():
                    self.sweep_n = gr.Textbox("2, 4, 8", label="Span lengths n to try (every span set to n)",
                                              elem_id="infill-sweep-n")
                    self.sweep_go = gr.Button("Sweep", elem_id="infill-sweep")
                self.sweep_out = gr.HTML(css_template=render.TOKEN_CSS, js_on_load=None, elem_id="infill-sweep-out")
        self.events = self._wire()

    def _wire(self) -> list:
        backend, out, controls = self.backend, self.out, self.controls
        fields = [self.mode, self.template, self.prefix, self.suffix, self.length]

        def request(mode, template, prefix, suffix, length):
            if mode == "template":
                return dict(template=template, use_template=True)
            return dict(prefix=prefix, suffix=suffix, length=length, use_template=False)

        async def run_infill(req: gr.Request, mode, template, prefix, suffix, length, *knobs):
            try:
                cfg = backend.sampler(controls.values(knobs), task=Task.INFILL)
                run = await offload(backend.infill, cfg, **request(mode, template, prefix, suffix, length),
                                    session=session(req))
                async for outputs in out.animate(run, extra_fn=lambda g, t: [g.spans or []]):
                    yield outputs
            except Exception as e:
                fail(e)

        async def run_ar_prefix(req: gr.Request, mode, template, prefix, length, with_ar, *knobs):
            """The AR model sees only the text before the first span and writes as many tokens as the spans hold
            in total (the paper's Table 1 setting)."""
            if not with_ar:
                return ""
            try:
                ar_prefix, n_new = ar_side(mode, template, prefix, length)
                if not ar_prefix.strip():
                    return "(no text before the first span: nothing for the AR model to continue)"
                cfg = backend.sampler(controls.values(knobs), task=Task.INFILL)
                run = await offload(backend.ar_continue, ar_prefix, n_new, cfg, session=session(req))
                g = ended(await run.await_all()).result("ar")
                return ar_prefix + g.text if g is not None else "(stopped)"
            except Exception as e:
                fail(e)

        fill = self.go.click(run_infill, [*fields, *controls.components], out.outputs, **MODEL)
        ar = fill.success(run_ar_prefix, [self.mode, self.template, self.prefix, self.length, self.with_ar,
                                          *controls.components], self.ar_text, **MODEL)
        self.pick.click(lambda i: ("template", EXAMPLES[int(i)].prompt), self.pick, [self.mode, self.template],
                        **LIGHT)
        self.mode.change(lambda m: (gr.update(visible=m == "template"), gr.update(visible=m != "template")),
                         self.mode, [self.template, self.pair], **LIGHT)
        out.wire(backend)

        async def run_sweep(req: gr.Request, mode, template, prefix, suffix, ns, *knobs):
            try:
                cfg = backend.sampler(controls.values(knobs), task=Task.INFILL)
                r = request(mode, template, prefix, suffix, None)
                r.pop("length", None)
                run = await offload(backend.infill_sweep, cfg, ns, **r, session=session(req))
                return render.sweep_html(ended(await run.await_all()).items("sweep"))
            except Exception as e:
                fail(e)

        sweep = self.sweep_go.click(run_sweep, [self.mode, self.template, self.prefix, self.suffix, self.sweep_n,
                                                *controls.components], self.sweep_out, **MODEL)
        return [fill, ar, sweep]
