"""Denoise: a prompt continued by iterative unmasking, animated live; words pinned at positions before generating;
and what only a DLM can do afterwards: select tokens of the finished canvas, remask them (optionally with another
count) and denoise just those positions with everything else fixed, with undo / redo through the edit history."""
from __future__ import annotations

from array import array

import gradio as gr

from app import render
from app.backend import Backend, ui_edit
from app.tabs.common import LIGHT, MODEL, SamplerControls, StreamView, fail, offload, session
from dlm.decoders import DECODERS
from dlm.sampler_config import Task

PROMPT = "The capital of France is"


HISTORY_KEPT = 64   # canvas versions undo can go back to


def _entry(history):
    return history["entries"][history["index"]] if history else None


def _push(history, tokens: list[int], n_prompt: int, text: str, trace: render.Trace) -> dict:
    """A new canvas version after the current one (a new run or an edit drops the versions that were undone).
    Each version keeps its text, and the history the token texts and special ids of the runs that made it, so
    undo / redo and the chips never ask the (possibly since switched) model. The newest HISTORY_KEPT versions are
    kept (a session's memory stays bounded however many edits it makes)."""
    entries = (history["entries"][: history["index"] + 1] if history else []) + \
        [dict(tokens=array("i", tokens), n_prompt=int(n_prompt), text=text)]   # 4 bytes a token, not ~36
    entries = entries[-HISTORY_KEPT:]
    return dict(entries=entries, index=len(entries) - 1,
                pieces={**(history or {}).get("pieces", {}), **trace.pieces},
                special=set((history or {}).get("special", ())) | set(trace.special))


def _chips(history, selection=None) -> str:
    e = _entry(history)
    return render.chips_html(e["tokens"], e["n_prompt"], history["pieces"], history["special"], selection)


def _after_run(trace, history, n_prompt: int, text: str):
    """A finished run (a new text: a new history) or edit (the next version): push the canvas."""
    canvas = trace.frames[-1].tokens if trace.frames else []
    history = _push(history, canvas, n_prompt, text, trace)
    return history, _chips(history), _status(history)


def _status(history) -> str:
    if not history:
        return ""
    e = _entry(history)
    return (f"Canvas version {history['index'] + 1} of {len(history['entries'])} · "
            f"{len(e['tokens']) - e['n_prompt']} generated tokens")


def fast_mode_note(backend: Backend) -> str:
    """One line saying what the model's faster writing mode is, when the tab opens on another one ("" if not)."""
    write, shown = backend.base_config(Task.WRITE), backend.base_config(Task.DENOISE)
    if shown.decoder == "speculative":
        return ("Each forward pass drafts the next tokens at once (faint, in dashed boxes) and the AR base verifies "
                "them in the same pass: kept drafts turn solid and underlined, a rejected one is struck through "
                "and replaced. The text is distributed exactly as the AR base's sampling.")
    if write == shown:
        return ""
    return (f"This tab opens on the **{shown.decoder}** decoder so you can watch tokens appear in parallel and out "
            f"of order. The model writes faster with its own mode — the **{write.decoder}** decoder "
            f"({DECODERS[write.decoder].description}) — which reveals a few tokens at a time, left to right.")


def fast_mode_differs(backend: Backend) -> bool:
    """Whether the tab opens on another decoder than the model's writing one (then a button switches to it)."""
    return backend.model is not None and \
        backend.base_config(Task.WRITE).decoder != backend.base_config(Task.DENOISE).decoder


def pins_usage(decoder: str) -> dict:
    """Pinned words need a decoder that keeps any positions fixed (its declaration's `fixed_positions`)."""
    if decoder in DECODERS and DECODERS[decoder].fixed_positions:
        return dict(interactive=True, info=None)
    able = ", ".join(n for n, spec in DECODERS.items() if spec.fixed_positions)
    return dict(interactive=False, info=f"not with the {decoder} decoder: it cannot hold words at positions "
                                        f"({able} can)")


class DenoiseTab:
    def __init__(self, backend: Backend):
        self.backend = backend
        with gr.Tab("Denoise", id="denoise"):
            with gr.Row():
                self.prompt = gr.Textbox(PROMPT, label="Prompt", lines=3, scale=4, elem_id="denoise-prompt")
                with gr.Column(scale=1, min_width=160):
                    self.chat = gr.Checkbox(False, label="Chat template (instruct models)", elem_id="denoise-chat")
                    self.go = gr.Button("Generate", variant="primary", elem_id="denoise-generate")
                    self.stop = gr.Button("Stop", variant="stop", elem_id="denoise-stop")
            self.pins = gr.Textbox("", elem_id="denoise-pins",
                                   label="Pinned words: position: word; … — e.g. `0: Paris` holds ' Paris' as the "
                                         "first generated token(s)",
                                   **pins_usage(backend.base_config(Task.DENOISE).decoder))
            self.fast_note = gr.Markdown(fast_mode_note(backend), elem_id="denoise-fast-note")
            self.fast = gr.Button("Use the fast writing mode", size="sm", elem_id="denoise-fast",
                                  visible=fast_mode_differs(backend))
            self.controls = SamplerControls("denoise", backend.base_config(Task.DENOISE), task=Task.DENOISE, open_=True)
            self.history = gr.State(None)
            self.chips = gr.HTML(render.chips_html([], 0, {}), css_template=render.TOKEN_CSS,
                                 js_on_load=render.CHIPS_JS, elem_id="edit-chips", render=False)
            self.edit_status = gr.Markdown(elem_id="edit-status", render=False)
            self.out = StreamView("denoise", extra=[self.history, self.chips, self.edit_status])
            with gr.Accordion("Edit and re-denoise (what an AR model cannot do)", open=True):
                gr.Markdown("Click a token to select it, shift-click another to select the span in between (or type "
                            "the positions), then remask it — with the same or another number of tokens — and the "
                            "model denoises only those positions; every other token stays exactly as it is. Edits "
                            "use the model's infilling config (full attention).")
                self.chips.render()
                with gr.Row():
                    self.start = gr.Number(0, label="From token #", elem_id="edit-start")
                    self.end = gr.Number(0, label="To token # (inclusive)", elem_id="edit-end")
                    self.new_length = gr.Number(0, label="New length (0 = the same count)", elem_id="edit-length")
                with gr.Row():
                    self.remask = gr.Button("Remask and re-denoise", variant="primary", elem_id="edit-run")
                    self.undo = gr.Button("Undo", elem_id="edit-undo")
                    self.redo = gr.Button("Redo", elem_id="edit-redo")
                self.edit_status.render()
        self.events = self._wire()

    def _wire(self) -> list:
        go, submit = self._wire_run()
        edit = self._wire_edit()
        self._wire_selection()
        self._wire_history()
        return [go, submit, edit]

    def _wire_run(self):
        """Generate: the prompt (with pins) continued and animated; the faster-mode note and button."""
        backend, out, controls = self.backend, self.out, self.controls

        async def run_denoise(request: gr.Request, prompt, chat, pins, *knobs):
            try:
                run = await offload(lambda: backend.generate(prompt, backend.sampler(controls.values(knobs)),
                                                             chat=chat, pins=pins, session=session(request)))
                n_prompt = run.prompt_tokens
                async for outputs in out.animate(run, prompt_end=n_prompt,
                                                 extra_fn=lambda g, t: _after_run(t, None, n_prompt, g.text)):
                    yield outputs
            except Exception as e:
                fail(e)

        self.fast.click(lambda: controls.updates(backend.base_config(Task.WRITE)), None, controls.outputs, **LIGHT)

        def note():  # another model loaded (its configs reset the settings and their summary): its own line
            text = fast_mode_note(backend) if backend.model is not None else ""
            return text, gr.update(visible=bool(text) and fast_mode_differs(backend))

        controls.summary.change(note, None, [self.fast_note, self.fast], **LIGHT)
        if controls.decoder is not None:
            controls.decoder.change(lambda d: gr.update(**pins_usage(d)), controls.decoder, self.pins, **LIGHT)
        inputs = [self.prompt, self.chat, self.pins, *controls.components]
        go = self.go.click(run_denoise, inputs, out.outputs, **MODEL)
        submit = self.prompt.submit(run_denoise, inputs, out.outputs, **MODEL)
        out.wire(backend)
        return go, submit

    def _wire_edit(self):
        """Remask the selected tokens and re-denoise them (the infilling config), as the next canvas version."""
        backend, out = self.backend, self.out

        async def run_edit(request: gr.Request, history, start, end, new_length):
            try:
                entry = _entry(history)
                if entry is None:
                    raise ValueError("edit: generate a text first, then select tokens of it to remask")
                edit = ui_edit(start, end, new_length)
                run = await offload(backend.redenoise, list(entry["tokens"]), entry["n_prompt"], [edit],
                                    backend.sampler(task=Task.INFILL), session=session(request))
                n_prompt = entry["n_prompt"]

                def text(g):  # the whole canvas comes back: its generated part, in the run's own tokenizer
                    return run.display.text_of(g.token_ids[n_prompt:])

                async for outputs in out.animate(run, prompt_end=n_prompt, text_fn=text,
                                                 extra_fn=lambda g, t: _after_run(t, history, n_prompt, text(g))):
                    yield outputs
            except Exception as e:
                fail(e)

        return self.remask.click(run_edit, [self.history, self.start, self.end, self.new_length], out.outputs,
                                 **MODEL)

    def _wire_selection(self):
        """A click on a chip selects it (shift-click: the span from the start box); typed bounds redraw the chips."""
        def select(evt: gr.EventData, history, start):
            if _entry(history) is None:
                return gr.skip(), gr.skip(), gr.skip()
            k = int(getattr(evt, "k", 0))   # the payload of CHIPS_JS's trigger('click', {k, shift})
            a, b = k, k
            if getattr(evt, "shift", False) and isinstance(start, (int, float)):
                a, b = min(int(start), k), max(int(start), k)
            return a, b, _chips(history, (a, b))

        self.chips.click(select, [self.history, self.start], [self.start, self.end, self.chips], **LIGHT)

        def show_selection(history, start, end):
            if _entry(history) is None:
                return gr.skip()
            try:
                a, b, _ = ui_edit(start, end, None)
                sel = (a, b - 1)
            except ValueError:
                sel = None
            return _chips(history, sel)

        for box in (self.start, self.end):
            box.input(show_selection, [self.history, self.start, self.end], self.chips, **LIGHT)

    def _wire_history(self):
        """Undo / redo: move through the canvas versions."""
        def move(history, delta):
            if not history:
                return gr.skip(), gr.skip(), gr.skip(), gr.skip()
            index = min(max(history["index"] + delta, 0), len(history["entries"]) - 1)
            history = {**history, "index": index}
            return history, _chips(history), _entry(history)["text"], _status(history)

        history_outputs = [self.history, self.chips, self.out.text, self.edit_status]
        self.undo.click(lambda h: move(h, -1), self.history, history_outputs, **LIGHT)
        self.redo.click(lambda h: move(h, +1), self.history, history_outputs, **LIGHT)
