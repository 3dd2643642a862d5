"""The Gradio layout and its events. All work happens in `app.backend` (models) and `app.render` (drawing).

Named API endpoints for `gradio_client` (see docs/app.md): `/denoise`, `/infill`, `/compare`. The UI's own events
are private. Every model call shares the concurrency group "model" (one at a time; others wait in the queue)."""
from __future__ import annotations

import html
from typing import Optional

import gradio as gr

from app import render
from app.backend import (DEVICES, DTYPES, QUANTIZATIONS, REMASKING, Backend, Sampler, describe_error,
                         parse_int_list)
from app.examples import load_examples
from dlm import registry
from dlm.infill import split_template

MODEL = dict(concurrency_id="model", concurrency_limit=1)  # every event that runs a model
LIGHT = dict(concurrency_limit=None, api_visibility="private", show_progress="hidden")  # render-only events

BANNER_CSS = """
.banner { background: #fff4e5; border: 1px solid #f0b35a; color: #6b3f00; border-radius: 8px; padding: 8px 12px;
          font-family: system-ui, sans-serif; font-size: 14px; }
"""

INFILL_TEMPLATE = ("The old fisherman walked down to the [MASK:6] every morning before sunrise. "
                   "He [MASK:8] and came home with a basket full of fish.")


def _banner(text: str) -> str:
    return f'<div class="banner">⚠️ {html.escape(text)}</div>' if text else ""


def _session(request: Optional[gr.Request]) -> Optional[str]:
    return getattr(request, "session_hash", None) if request is not None else None


def _fail(e: BaseException, *, for_browser: bool = True):
    """Re-raise anything as a gr.Error with a one-line message (the server keeps serving). The browser renders
    error messages as HTML, so `<` is escaped there (messages may quote user input); API clients get it raw."""
    if isinstance(e, gr.Error):
        raise e
    message = describe_error(e)
    raise gr.Error(message.replace("<", "&lt;") if for_browser else message, print_exception=False) from None


# --------------------------------------------------------------------------------------------- shared widgets
def sampler_controls(prefix: str, length: int = 64, steps: int = 64, *, open_: bool = True,
                     show_length: bool = True) -> list:
    """The sampler knobs in an accordion, in `Sampler.from_ui` order (elem_ids `{prefix}-length`, ...)."""
    with gr.Accordion("Sampler settings", open=open_):
        with gr.Row():
            c_len = gr.Slider(1, 512, value=length, step=1, label="Length (new tokens)", visible=show_length,
                              elem_id=f"{prefix}-length")
            c_steps = gr.Slider(1, 512, value=steps, step=1, elem_id=f"{prefix}-steps",
                                label="Steps (1 … length)" if show_length else "Steps (capped at the masked tokens)")
            c_block = gr.Slider(0, 512, value=0, step=1, label="Block length (0 = one block)",
                                elem_id=f"{prefix}-block")
        with gr.Row():
            c_rem = gr.Dropdown(REMASKING, value="confidence", label="Remasking order",
                                elem_id=f"{prefix}-remasking")
            c_temp = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="Temperature (0 = greedy)",
                               elem_id=f"{prefix}-temperature")
            c_top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p")
            c_top_k = gr.Number(0, precision=0, label="Top-k (0 = off)", minimum=0)
            c_thr = gr.Slider(0.0, 1.0, value=0.0, step=0.05, label="Parallel-decoding threshold (0 = off)")
            c_seed = gr.Number(0, precision=0, label="Seed (-1 = random)", elem_id=f"{prefix}-seed")
    return [c_len, c_steps, c_block, c_rem, c_temp, c_top_p, c_top_k, c_thr, c_seed]


class StreamView:
    """Token animation + step counter + scrub slider + final text + stats + the two end-of-run plots."""

    def __init__(self, prefix: str, plots: bool = True, extra: Optional[list] = None):
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
        self.trace = gr.State(None)
        self.extra = list(extra or [])  # more outputs, filled from the final Generation by animate(extra_fn=...)

    @property
    def outputs(self) -> list:
        outs = [self.view, self.counter, self.scrub, self.text, self.stats]
        if self.heat is not None:
            outs += [self.heat, self.chart]
        return outs + [self.trace] + self.extra

    def wire_scrub(self) -> None:
        def scrub(k, trace):
            if trace is None:
                return gr.skip(), gr.skip()
            return trace.html(int(k) - 1), trace.counter(int(k) - 1)

        self.scrub.input(scrub, [self.scrub, self.trace], [self.view, self.counter], trigger_mode="always_last",
                         **LIGHT)

    def animate(self, backend: Backend, batches, extra_fn=None):
        """Turn backend batches into output tuples: the token view on every (throttled) batch; the plots, the
        scrub slider and the text once at the end, plus `extra_fn(generation)` for the extra outputs."""
        model = backend.require_model()
        trace = render.Trace(mask_id=int(model.mask_token_id), special=backend.special_ids())
        decode = backend.piece_decoder()
        n_plots = 2 if self.heat is not None else 0
        first = True
        for batch in batches:
            for f in batch.frames:
                trace.add(f, decode)
            if batch.result is None and not batch.cancelled:
                clear = ("", "") if first else (gr.skip(), gr.skip())  # wipe the previous run's text and stats
                first = False
                yield (trace.html(), trace.counter(running=True), gr.update(visible=False), *clear,
                       *([gr.skip()] * (n_plots + 1 + len(self.extra))))
                continue
            g = batch.result
            if g is None:
                stats, text = f"Stopped after {len(trace)} steps.", ""
            else:
                stats = (f"**{g.nfe}** network evaluations · model time **{g.seconds:.2f} s** · "
                         f"**{g.tokens_per_second:.1f}** tokens/s · {len(g.token_ids)} tokens")
                text = g.text
            n = max(len(trace), 1)
            plots = [trace.reveal_heatmap(), trace.step_chart()] if n_plots else []
            extra = [gr.skip()] * len(self.extra) if g is None or extra_fn is None else list(extra_fn(g))
            yield (trace.html(), trace.counter(), gr.update(visible=n > 1, minimum=1, maximum=n, value=n),
                   text, stats, *plots, trace, *extra)
            return


# --------------------------------------------------------------------------------------------- the app
def build(backend: Optional[Backend] = None, *, model: Optional[str] = None, ar_model: Optional[str] = None,
          quantization: str = "none", device: str = "auto", dtype: str = "auto", adapter: Optional[str] = None,
          queue_size: int = 16, min_frame_interval: float = 1 / 15) -> gr.Blocks:
    """Build the playground. Loads the model now (the default DLM, falling back with a notice) unless a ready
    `backend` is given. `queue_size` bounds the waiting requests; `min_frame_interval` throttles animation."""
    if backend is None:
        backend = Backend(min_frame_interval=min_frame_interval)
        backend.load_default(model, ar_model, quantization=quantization, device=device, dtype=dtype,
                             adapter=adapter)
    examples = load_examples()
    specs = registry.list_models()

    with gr.Blocks(title="dlm-studio playground") as demo:
        gr.Markdown("## dlm-studio · diffusion language model playground\n"
                    "An autoregressive LM adapted into a masked-diffusion LM (An et al. 2024): it writes by "
                    "un-masking tokens in any order over a fixed number of steps.")
        banner = gr.HTML(_banner(backend.notice()), css_template=BANNER_CSS, elem_id="banner", js_on_load=None)

        with gr.Tabs():
            # ---------------------------------------------------------------- 1. Denoise
            with gr.Tab("Denoise", id="denoise"):
                with gr.Row():
                    d_prompt = gr.Textbox("The capital of France is", label="Prompt", lines=3, scale=4,
                                          elem_id="denoise-prompt")
                    with gr.Column(scale=1, min_width=160):
                        d_chat = gr.Checkbox(False, label="Chat template (instruct models)")
                        d_go = gr.Button("Generate", variant="primary", elem_id="denoise-generate")
                        d_stop = gr.Button("Stop", variant="stop", elem_id="denoise-stop")
                d_sampler = sampler_controls("denoise", 64, 64)
                d_out = StreamView("denoise")

            # ---------------------------------------------------------------- 2. Infill
            with gr.Tab("Infill", id="infill"):
                i_mode = gr.Radio(["template", "prefix + suffix"], value="template", label="Input",
                                  elem_id="infill-mode")
                i_template = gr.Textbox(INFILL_TEMPLATE, lines=3, elem_id="infill-template",
                                        label="Template: [MASK] = one token, [MASK:n] = n tokens")
                with gr.Row(visible=False) as i_pair:
                    i_prefix = gr.Textbox("The old fisherman walked down to the", label="Prefix", lines=2)
                    i_suffix = gr.Textbox(" every morning before sunrise.", label="Suffix", lines=2)
                    i_length = gr.Slider(1, 256, value=8, step=1, label="Length of the middle (tokens)")
                with gr.Row():
                    i_ar = gr.Checkbox(True, label="Also run the AR model on the prefix only")
                    i_go = gr.Button("Fill", variant="primary", elem_id="infill-generate")
                    i_stop = gr.Button("Stop", variant="stop")
                i_sampler = sampler_controls("infill", 14, 64, open_=False, show_length=False)
                i_spans = gr.JSON(label="Generated spans", elem_id="infill-spans", render=False)
                i_out = StreamView("infill", extra=[i_spans])
                i_spans.render()
                i_ar_text = gr.Textbox(label="AR model, prefix only (as in the paper's Table 1)", lines=2,
                                       interactive=False, elem_id="infill-ar")
                with gr.Accordion("Span-length sweep", open=False):
                    with gr.Row():
                        i_sweep_n = gr.Textbox("2, 4, 8", label="Span lengths n to try (every span set to n)")
                        i_sweep_go = gr.Button("Sweep")
                    i_sweep_out = gr.HTML(css_template=render.TOKEN_CSS, js_on_load=None)

            # ---------------------------------------------------------------- 3. In-context
            with gr.Tab("In-context", id="icl"):
                gr.Markdown("Few-shot prompts written for this project (`assets/examples/`). Click one to load and "
                            "run it; edit the prompt and press *Run* to try your own.")
                c_pick = gr.Dataset(components=[gr.Textbox(visible=False)], type="index", label="Examples",
                                    samples=[[f"{e.title}"] for e in examples], elem_id="icl-examples")
                c_prompt = gr.Textbox(examples[0].prompt if examples else "", lines=10, label="Prompt (editable)",
                                      elem_id="icl-prompt")
                c_expected = gr.Markdown(f"Expected: `{examples[0].expected}`" if examples and examples[0].expected
                                         else "")
                with gr.Row():
                    c_go = gr.Button("Run", variant="primary", elem_id="icl-run")
                    c_stop = gr.Button("Stop", variant="stop")
                c_sampler = sampler_controls("icl", examples[0].max_new_tokens if examples else 32,
                                             examples[0].steps if examples else 32, open_=False)
                c_out = StreamView("icl", plots=False)

            # ---------------------------------------------------------------- 4. AR vs DLM
            with gr.Tab("AR vs DLM", id="compare"):
                with gr.Row():
                    a_prompt = gr.Textbox("Once upon a time, in a small village by the sea,", lines=3, scale=4,
                                          label="Prompt (the same for both models)")
                    with gr.Column(scale=1, min_width=160):
                        a_chat = gr.Checkbox(False, label="Chat template")
                        a_go = gr.Button("Compare", variant="primary", elem_id="compare-run")
                        a_stop = gr.Button("Stop", variant="stop")
                a_sampler = sampler_controls("compare", 32, 32, open_=False)
                with gr.Row():
                    a_sweep_on = gr.Checkbox(True, label="Sweep DLM steps (time & quality chart)")
                    a_sweep = gr.Textbox("4, 8, 16, 32", label="Step counts (each ≤ length)")
                with gr.Row():
                    with gr.Column():
                        gr.Markdown("### Diffusion LM")
                        a_dlm_text = gr.Textbox(label="DLM output", lines=5, interactive=False)
                        a_dlm_stats = gr.Markdown()
                    with gr.Column():
                        gr.Markdown("### AR counterpart")
                        a_ar_text = gr.Textbox(label="AR output", lines=5, interactive=False)
                        a_ar_stats = gr.Markdown()
                a_plot = gr.Plot(render.compare_chart([], None), show_label=False)
                gr.Markdown("Times are model calls only (no tokenizing or rendering). Quality is gen-PPL: the "
                            "perplexity the AR model assigns to each output (lower = more fluent).")

            # ---------------------------------------------------------------- 5. Model
            with gr.Tab("Model", id="model"):
                m_status = gr.Markdown(backend.status_markdown(), elem_id="model-status")
                with gr.Row():
                    m_name = gr.Dropdown([(f"{s.name} ({s.kind}, {s.params})", s.name) for s in specs],
                                         value=backend.info.source if registry.is_registered(backend.info.source)
                                         else None, label="Registry model", scale=2)
                    m_path = gr.Textbox("" if registry.is_registered(backend.info.source) else backend.info.source,
                                        label="…or a local path / hub id (overrides the registry choice)",
                                        scale=3)
                m_notes = gr.Markdown()
                with gr.Row():
                    m_adapter = gr.Textbox("", label="LoRA adapter directory (optional)")
                    m_ar = gr.Textbox("", label="AR counterpart (empty = the registered one)")
                    m_mask = gr.Number(-1, precision=0, label="Mask token id (-1 = automatic)")
                with gr.Row():
                    m_quant = gr.Radio(QUANTIZATIONS, value=backend.info.quantization or "none",
                                       label="Quantization (bitsandbytes; on CPU it saves memory but is slower)")
                    m_device = gr.Dropdown(DEVICES, value="auto", label="Device")
                    m_dtype = gr.Dropdown(DTYPES, value="auto", label="Dtype")
                m_go = gr.Button("Load (frees the current model)", variant="primary")
                gr.Markdown("The loaded model is shared by everyone using this server; loading waits for running "
                            "generations to finish.")

        # =================================================================== events
        # ---- Denoise
        def run_denoise(request: gr.Request, prompt, chat, *knobs):
            try:
                sampler = Sampler.from_ui(*knobs)
                yield from d_out.animate(backend, backend.stream_generate(prompt, sampler, chat=chat,
                                                                          session=_session(request)))
            except Exception as e:
                _fail(e)

        d_event = d_go.click(run_denoise, [d_prompt, d_chat, *d_sampler], d_out.outputs, api_visibility="private",
                             **MODEL)
        d_prompt_event = d_prompt.submit(run_denoise, [d_prompt, d_chat, *d_sampler], d_out.outputs,
                                         api_visibility="private", **MODEL)
        d_out.wire_scrub()

        # ---- Infill
        def run_infill(request: gr.Request, mode, template, prefix, suffix, length, *knobs):
            try:
                sampler = Sampler.from_ui(*knobs)
                batches = backend.stream_infill(template, prefix, suffix, length, sampler,
                                                use_template=mode == "template", session=_session(request))
                yield from i_out.animate(backend, batches, extra_fn=lambda g: [g.spans or []])
            except Exception as e:
                _fail(e)

        def run_ar_prefix(request: gr.Request, mode, template, prefix, length, with_ar, *knobs):
            """The AR model sees only the text before the first span and writes as many tokens as the spans hold
            in total (the paper's Table 1 setting)."""
            if not with_ar:
                return ""
            try:
                if mode == "template":
                    parts = split_template(template or "")
                    ar_prefix = template.split("[MASK", 1)[0]
                    n_new = sum(p for _, p in parts if isinstance(p, int))
                else:
                    ar_prefix, n_new = prefix or "", int(length)
                if not ar_prefix.strip() or n_new < 1:
                    return "(no text before the first span: nothing for the AR model to continue)"
                return ar_prefix + backend.ar_continue(ar_prefix, n_new, Sampler.from_ui(*knobs)).text
            except Exception as e:
                _fail(e)

        i_event = i_go.click(run_infill, [i_mode, i_template, i_prefix, i_suffix, i_length, *i_sampler],
                             i_out.outputs, api_visibility="private", **MODEL)
        i_ar_event = i_event.success(run_ar_prefix, [i_mode, i_template, i_prefix, i_length, i_ar, *i_sampler],
                                     i_ar_text, api_visibility="private", **MODEL)
        i_mode.change(lambda m: (gr.update(visible=m == "template"), gr.update(visible=m != "template")),
                      i_mode, [i_template, i_pair], **LIGHT)
        i_out.wire_scrub()

        def run_sweep(request: gr.Request, mode, template, prefix, suffix, ns, *knobs):
            try:
                rows = backend.infill_sweep(template, prefix, suffix, parse_int_list(ns, "span lengths"),
                                            Sampler.from_ui(*knobs), use_template=mode == "template",
                                            session=_session(request))
                return render.sweep_html(rows)
            except Exception as e:
                _fail(e)

        i_sweep_event = i_sweep_go.click(run_sweep, [i_mode, i_template, i_prefix, i_suffix, i_sweep_n, *i_sampler],
                                         i_sweep_out, api_visibility="private", **MODEL)

        # ---- In-context
        def pick_example(index):
            e = examples[int(index)]
            return (e.prompt, gr.update(value=e.max_new_tokens), gr.update(value=e.steps),
                    f"Expected: `{e.expected}`" if e.expected else "")

        def run_icl(request: gr.Request, prompt, *knobs):
            try:
                sampler = Sampler.from_ui(*knobs)
                yield from c_out.animate(backend, backend.stream_generate(prompt, sampler,
                                                                          session=_session(request)))
            except Exception as e:
                _fail(e)

        c_pick_event = c_pick.click(pick_example, c_pick, [c_prompt, c_sampler[0], c_sampler[1], c_expected],
                                    **LIGHT)
        c_auto_event = c_pick_event.then(run_icl, [c_prompt, *c_sampler], c_out.outputs, api_visibility="private",
                                         **MODEL)
        c_event = c_go.click(run_icl, [c_prompt, *c_sampler], c_out.outputs, api_visibility="private", **MODEL)
        c_out.wire_scrub()

        # ---- AR vs DLM
        def run_compare(request: gr.Request, prompt, chat, sweep_on, sweep, *knobs):
            try:
                sampler = Sampler.from_ui(*knobs)
                steps = parse_int_list(sweep, "step counts") if sweep_on else []
                for r in backend.compare(prompt, sampler, steps, chat=chat, session=_session(request)):
                    yield (r["dlm"]["text"], _run_stats(r["dlm"]), r["ar"]["text"], _run_stats(r["ar"]),
                           render.compare_chart(r["sweep"], r["ar"]))
            except Exception as e:
                _fail(e)

        a_event = a_go.click(run_compare, [a_prompt, a_chat, a_sweep_on, a_sweep, *a_sampler],
                             [a_dlm_text, a_dlm_stats, a_ar_text, a_ar_stats, a_plot], api_visibility="private",
                             **MODEL)

        # ---- Stop buttons: ask the backend to stop this session's run, and drop queued requests
        def stop(request: gr.Request):
            backend.stop(_session(request))

        running = [d_event, d_prompt_event, i_event, i_ar_event, i_sweep_event, c_auto_event, c_event, a_event]
        for btn in (d_stop, i_stop, c_stop, a_stop):
            btn.click(stop, None, None, cancels=running, queue=False, **LIGHT)

        # ---- Model
        def show_notes(name):
            if not name or not registry.is_registered(name):
                return ""
            s = registry.get(name)
            avail = registry.is_available(name) if hasattr(registry, "is_available") else True
            where = "available offline" if avail else "not available offline (needs the network once, or its files)"
            return f"*{s.notes}* — {where}."

        m_name.change(show_notes, m_name, m_notes, **LIGHT)

        def load_model(name, path, adapter, ar, mask, quant, device, dtype):
            source = (path or "").strip() or name
            try:
                backend.load(source, adapter=adapter, quantization=quant, device=device, dtype=dtype,
                             mask_token_id=None if mask is None or int(mask) < 0 else int(mask), ar_source=ar)
            except Exception as e:
                gr.Warning(f"Could not load {source!r}: {describe_error(e)}".replace("<", "&lt;"))
                return backend.status_markdown(), _banner(backend.notice())
            return backend.status_markdown(), _banner(backend.notice())

        m_go.click(load_model, [m_name, m_path, m_adapter, m_ar, m_mask, m_quant, m_device, m_dtype],
                   [m_status, banner], api_visibility="private", **MODEL)
        demo.load(lambda: (backend.status_markdown(), _banner(backend.notice())), None, [m_status, banner],
                  **LIGHT)

        # =================================================================== API endpoints (gradio_client)
        def denoise(prompt: str, max_new_tokens: int = 64, steps: int = 64, block_length: int = 0,
                    remasking: str = "confidence", temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                    threshold: float = 0.0, seed: int = 0, chat: bool = False, frames: bool = False,
                    request: gr.Request = None) -> dict:
            """Continue `prompt` by iterative unmasking. Streams {"done": false, "step", "total_steps",
            "partial"} while running (masked tokens shown as '·'), then {"done": true, "text", "token_ids", "nfe",
            "seconds", "tokens_per_second", "steps", "prompt"} (+ "frames" when frames=True); a run stopped from
            elsewhere (the session's Stop) ends with {"done": false, "stopped": true, "step", "total_steps"}."""
            try:
                sampler = Sampler.from_ui(max_new_tokens, steps, block_length, remasking, temperature, top_p,
                                          top_k, threshold, seed)
                model = backend.require_model()
                mask_id, pieces, all_frames = int(model.mask_token_id), {}, []
                decode = backend.piece_decoder()
                for batch in backend.stream_generate(prompt, sampler, chat=chat, session=_session(request)):
                    all_frames += batch.frames
                    if batch.result is not None:
                        g = batch.result
                        out = dict(done=True, text=g.text, token_ids=g.token_ids, nfe=g.nfe, seconds=g.seconds,
                                   tokens_per_second=g.tokens_per_second, steps=len(all_frames), prompt=g.prompt)
                        if frames:
                            out["frames"] = [f.to_dict() for f in all_frames]
                        yield out
                    elif batch.cancelled:
                        last = all_frames[-1] if all_frames else None
                        yield dict(done=False, stopped=True, step=last.step if last else 0,
                                   total_steps=last.total_steps if last else 0)
                    elif batch.frames:
                        f = batch.frames[-1]
                        new = [t for t in f.tokens[f.start:] if t != mask_id and t not in pieces]
                        pieces.update(decode(sorted(set(new))))
                        partial = "".join("·" if t == mask_id else pieces[t] for t in f.tokens[f.start:])
                        yield dict(done=False, step=f.step, total_steps=f.total_steps, partial=partial)
            except Exception as e:
                _fail(e, for_browser=False)

        def infill(template: str = "", prefix: str = "", suffix: str = "", length: int = 16,
                   steps: Optional[int] = None, remasking: str = "confidence", temperature: float = 0.0,
                   seed: int = 0, request: gr.Request = None) -> dict:
            """Fill a template's [MASK] / [MASK:n] spans, or (template empty) `length` tokens between `prefix`
            and `suffix`. Returns {"text", "spans", "nfe", "seconds"}; steps None = one token per step."""
            try:
                use_template = bool((template or "").strip())
                model = backend.require_model()
                kw = dict(steps=steps if steps else None, remasking=remasking, temperature=float(temperature),
                          seed=None if seed is None or seed < 0 else int(seed))
                with backend.lock:
                    if use_template:
                        g = model.fill(template, **kw)
                    else:
                        if not (prefix or suffix):
                            raise ValueError("give a template, or a prefix and/or a suffix")
                        g = model.infill(prefix or "", suffix or "", int(length), **kw)
                return dict(text=g.text, spans=g.spans or [], nfe=g.nfe, seconds=g.seconds)
            except Exception as e:
                _fail(e, for_browser=False)

        def compare(prompt: str, max_new_tokens: int = 32, steps: int = 32, remasking: str = "confidence",
                    temperature: float = 0.0, seed: int = 0, sweep_steps: str = "", chat: bool = False,
                    request: gr.Request = None) -> dict:
            """The same prompt through the DLM and its AR counterpart. Returns {"dlm": {...}, "ar": {...},
            "sweep": [...]}, each run with text, seconds (model only), tokens, nfe, tokens_per_second, gen_ppl;
            `sweep_steps` ("4, 8, 16") adds DLM runs at those step counts."""
            try:
                sampler = Sampler.from_ui(max_new_tokens, steps, 0, remasking, temperature, 1.0, 0, 0.0, seed)
                sweep = parse_int_list(sweep_steps, "sweep_steps") if (sweep_steps or "").strip() else []
                result = {}
                for result in backend.compare(prompt, sampler, sweep, chat=chat, session=_session(request)):
                    pass
                return result
            except Exception as e:
                _fail(e, for_browser=False)

        gr.api(denoise, api_name="denoise", **MODEL)
        gr.api(infill, api_name="infill", **MODEL)
        gr.api(compare, api_name="compare", **MODEL)

    demo.queue(max_size=queue_size, default_concurrency_limit=1)
    demo.backend = backend  # for tests and scripts embedding the app
    return demo


def _run_stats(r: dict) -> str:
    ppl = f"{r['gen_ppl']:.1f}" if r.get("gen_ppl") is not None else "n/a"
    return (f"model time **{r['seconds']:.2f} s** · **{r['tokens_per_second']:.1f}** tokens/s · "
            f"**{r['nfe']}** network evaluations · {r['tokens']} tokens · gen-PPL {ppl}")
