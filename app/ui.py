"""The playground: assembles the tabs (one file each under app/tabs/) and the named API (app/api.py).

All model work goes through `app.backend` (validation, limits, cancellation, timing), all drawing through
`app.render`. Every model call shares the concurrency group "model" (one at a time; others wait in the queue)."""
from __future__ import annotations

from typing import Optional

import gradio as gr

from app import api
from app import MAX_PROMPT_TOKENS, TIME_LIMIT_S
from app.backend import Backend
from app.tabs.common import BANNER_CSS, LIGHT, banner
from app.tabs.denoise import DenoiseTab
from app.tabs.incontext import InContextTab
from app.tabs.infill import InfillTab
from app.tabs.model import ModelTab
from app.tabs.race import RaceTab


class Playground(gr.Blocks):
    """gr.Blocks whose named API endpoints take any leading part of their arguments over raw REST as well (the
    rest get their defaults), as they do through gradio_client — instead of Gradio's "didn't receive enough input
    values" message full of component reprs."""

    def validate_inputs(self, block_fn, inputs):
        if block_fn.api_name in api.ENDPOINTS and len(inputs) < len(block_fn.inputs):
            inputs.extend(block.value for block in block_fn.inputs[len(inputs):])
        return super().validate_inputs(block_fn, inputs)


def build(backend: Optional[Backend] = None, *, model: Optional[str] = None, ar_model: Optional[str] = None,
          quantization: str = "none", device: str = "auto", dtype: str = "auto", adapter: Optional[str] = None,
          queue_size: int = 16, min_frame_interval: float = 1 / 15,
          max_prompt_tokens: Optional[int] = MAX_PROMPT_TOKENS, time_limit: Optional[float] = TIME_LIMIT_S
          ) -> gr.Blocks:
    """Build the playground. Loads the model now (the default DLM, falling back with a notice) unless a ready
    `backend` is given. `queue_size` bounds the waiting requests; `min_frame_interval` throttles animation;
    `max_prompt_tokens` / `time_limit` bound what one request may cost (None = no limit)."""
    if backend is None:
        backend = Backend(min_frame_interval=min_frame_interval, max_prompt_tokens=max_prompt_tokens,
                          time_limit=time_limit)
        backend.load_default(model, ar_model, quantization=quantization, device=device, dtype=dtype,
                             adapter=adapter)

    with Playground(title="dlm-studio playground") as demo:
        gr.Markdown("## dlm-studio · diffusion language model playground\n"
                    "An autoregressive LM adapted into a masked-diffusion LM (An et al. 2024): it writes by "
                    "un-masking tokens in any order over a fixed number of steps.")
        banner_html = gr.HTML(banner(backend.notice()), css_template=BANNER_CSS, elem_id="banner", js_on_load=None)
        with gr.Tabs():
            denoise = DenoiseTab(backend)
            infill = InfillTab(backend)
            incontext = InContextTab(backend)
            race = RaceTab(backend)
            model_tab = ModelTab(backend, [denoise.controls, infill.controls, incontext.controls, race.controls],
                                 banner_html)

        # Stop: the session's running work ends before the next transformer layer and its handler shows what it
        # has ("Stopped after k steps"). (No `cancels=`: cancelling the handler would lose that last update; a
        # cancelled client job or a closed tab cancels the handler, which cancels the run just as well.)
        def stop(request: gr.Request):
            backend.stop(getattr(request, "session_hash", None))

        for tab in (denoise, infill, incontext, race):
            tab.stop.click(stop, None, None, queue=False, **LIGHT)
        demo.load(model_tab.page_load, None, model_tab.load_outputs, **LIGHT)
        api.register(backend)

    demo.queue(max_size=queue_size, default_concurrency_limit=1)
    demo.backend = backend  # for tests and scripts embedding the app
    return demo
