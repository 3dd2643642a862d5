"""In-context: the few-shot prompts shipped in `dlm/examples/`. One click loads and runs an example with the DLM
(animated) and then the AR model, side by side, each marked against the expected answer; "Run all" fills a
scoreboard of every example and the accuracy of each model."""
from __future__ import annotations

import gradio as gr

from app import render
from app.backend import Backend
from app.tabs import TAB
from app.tabs.common import LIGHT, MODEL, SamplerControls, StreamView, ended, fail, offload, session
from dlm.fewshot import Example, answer_of, load_examples, matches
from dlm.sampler_config import Task, read_by


def mark(expected: str, output: str) -> str:
    if not expected:
        return "no expected answer for this prompt"
    return f"{'✓' if matches(expected, output) else '✗'} answer `{answer_of(output) or '(empty)'}`"


class InContextTab:
    def __init__(self, backend: Backend, examples: list[Example] | None = None):
        self.backend = backend
        self.examples = load_examples() if examples is None else examples
        # the tab opens on an example the shipped model does well (the hard ones stay, marked as such)
        first = next((e for e in self.examples if not e.hard), self.examples[0] if self.examples else None)
        with gr.Tab(TAB["icl"].title, id="icl"):
            gr.Markdown("Few-shot prompts written for this project (`dlm/examples/`). Click one to load and run it "
                        "with both models; edit the prompt and press *Run* to try your own. *Run all* scores every "
                        "example against its expected answer (the answer = the first line of the output).")
            self.pick = gr.Dataset(components=[gr.Textbox(visible=False)], type="index", label="Examples",
                                   samples=[[e.label] for e in self.examples], elem_id="icl-examples")
            self.prompt = gr.Textbox(first.prompt if first else "", lines=10, label="Prompt (editable)",
                                     elem_id="icl-prompt")
            self.expected = gr.State(first.expected if first else "")
            self.expected_md = gr.Markdown(self._expected(first.expected if first else ""), elem_id="icl-expected")
            with gr.Row():
                self.go = gr.Button("Run", variant="primary", elem_id="icl-run")
                self.run_all = gr.Button("Run all (scoreboard)", elem_id="icl-run-all")
                self.stop = gr.Button("Stop", variant="stop", elem_id="icl-stop")
            cfg = backend.base_config(Task.WRITE)
            if first:
                cfg = cfg.replace(**read_by(cfg.decoder, dict(max_new_tokens=first.max_new_tokens,
                                                              steps=first.steps)))
            self.controls = SamplerControls("icl", cfg)
            with gr.Row():
                with gr.Column():
                    gr.Markdown("### Diffusion LM")
                    self.dlm_mark = gr.Markdown(elem_id="icl-dlm-mark", render=False)
                    self.out = StreamView("icl", plots=False, extra=[self.dlm_mark])
                    self.dlm_mark.render()
                with gr.Column():
                    gr.Markdown("### AR model")
                    self.ar_text = gr.Textbox(label="AR output", lines=3, interactive=False, elem_id="icl-ar")
                    self.ar_mark = gr.Markdown(elem_id="icl-ar-mark")
            self.board = gr.Dataframe(headers=render.SCOREBOARD_HEADERS, value=None, interactive=False,
                                      label="Scoreboard", elem_id="icl-scoreboard")
        self.events = self._wire()

    @staticmethod
    def _expected(expected: str) -> str:
        return f"Expected: `{expected}`" if expected else ""

    def _wire(self) -> list:
        backend, out, controls = self.backend, self.out, self.controls
        length, steps = controls.by_name["max_new_tokens"], controls.by_name["steps"]

        def pick(index):
            e = self.examples[int(index)]
            return e.prompt, e.max_new_tokens, e.steps, e.expected, self._expected(e.expected)

        async def run_dlm(request: gr.Request, prompt, expected, *knobs):
            try:
                cfg = backend.sampler(controls.values(knobs))
                run = await offload(backend.generate, prompt, cfg, session=session(request))
                async for outputs in out.animate(run, extra_fn=lambda g, t: [mark(expected, g.text)]):
                    yield outputs
            except Exception as e:
                fail(e)

        async def run_ar(request: gr.Request, prompt, expected, *knobs):
            try:
                cfg = backend.sampler(controls.values(knobs))
                run = await offload(backend.ar_continue, prompt, cfg.max_new_tokens, cfg, session=session(request))
                g = ended(await run.await_all()).result("ar")
                return (g.text, mark(expected, g.text)) if g is not None else ("", "stopped")
            except Exception as e:
                fail(e)

        inputs = [self.prompt, self.expected, *controls.components]
        picked = self.pick.click(pick, self.pick, [self.prompt, length, steps, self.expected, self.expected_md],
                                 **LIGHT)
        auto = picked.then(run_dlm, inputs, out.outputs, **MODEL)
        auto_ar = auto.success(run_ar, inputs, [self.ar_text, self.ar_mark], **MODEL)
        go = self.go.click(run_dlm, inputs, out.outputs, **MODEL)
        go_ar = go.success(run_ar, inputs, [self.ar_text, self.ar_mark], **MODEL)
        out.wire(backend)

        async def scoreboard(request: gr.Request):
            try:
                run = await offload(backend.scoreboard, self.examples, session=session(request))
                total = sum(1 for e in self.examples if e.expected)
                rows = []
                yield render.scoreboard_rows([], total)
                async for batch in run.abatches():
                    rows += batch.items("row")
                    if batch.reason:  # the time limit: the rows so far stay
                        gr.Warning(batch.reason.replace("<", "&lt;"))
                    yield render.scoreboard_rows(rows, total)
            except Exception as e:
                fail(e)

        board = self.run_all.click(scoreboard, None, self.board, **MODEL)
        return [auto, auto_ar, go, go_ar, board]
