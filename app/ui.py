"""The playground: assembles the tabs (one file each under app/tabs/) and the named API (app/api.py).

All model work goes through `app.backend.Backend` (checking, limits, cancellation, timing), all drawing through
`app.render`. Every model call shares the concurrency group "model" (one at a time; others wait in the queue)."""
from __future__ import annotations

from typing import Optional

import gradio as gr

from app import MAX_NEW_TOKENS, MAX_PROMPT_TOKENS, TIME_LIMIT_S, api, http_guard
from app.backend import Backend
from app.model_lifecycle import SwitchPolicy
from app.tabs import TABS
from app.tabs.common import BANNER_CSS, LIGHT, banner

MAX_FILE_SIZE = "1mb"  # uploads (Gradio's /upload route: the app itself takes no file)
CACHE_CLEANUP = (600, 3600)  # Gradio's file cache (exports served): every 10 min, files older than an hour


class Playground(gr.Blocks):
    """gr.Blocks whose named API endpoints take any leading part of their arguments over raw REST as well (the
    rest get their defaults), as they do through gradio_client — instead of Gradio's "didn't receive enough input
    values" message full of component reprs; and whose `launch` bounds uploads (`max_file_size`) and puts
    `http_guard.ApiGuard` in front (request bodies bounded, 4xx with a message where Gradio would answer 500)."""

    api_signatures: dict = {}

    def launch(self, *args, **kwargs):
        kwargs.setdefault("max_file_size", MAX_FILE_SIZE)
        app_kwargs = dict(kwargs.get("app_kwargs") or {})
        app_kwargs["middleware"] = [*app_kwargs.get("middleware", []), http_guard.guard(self, kwargs)]
        kwargs["app_kwargs"] = app_kwargs
        return super().launch(*args, **kwargs)

    def validate_inputs(self, block_fn, inputs):
        if block_fn.api_name in api.ENDPOINTS and len(inputs) < len(block_fn.inputs):
            inputs.extend(block.value for block in block_fn.inputs[len(inputs):])
        return super().validate_inputs(block_fn, inputs)


def build(backend: Optional[Backend] = None, *, model: Optional[str] = None, ar_model: Optional[str] = None,
          quantization: str = "none", device: str = "auto", dtype: str = "auto", adapter: Optional[str] = None,
          queue_size: int = 16, min_frame_interval: float = 1 / 15,
          max_prompt_tokens: Optional[int] = MAX_PROMPT_TOKENS, time_limit: Optional[float] = TIME_LIMIT_S,
          queue_per_client: int = 4, policy: SwitchPolicy = SwitchPolicy(), attn_implementation: str = "auto",
          max_new_tokens: Optional[int] = MAX_NEW_TOKENS) -> gr.Blocks:
    """Build the playground. Loads the model now (the default DLM, falling back with a notice) unless a ready
    `backend` is given. `queue_size` bounds the requests waiting in all, `queue_per_client` those of one client
    address (more are refused before they wait); `min_frame_interval` throttles animation; `max_prompt_tokens` /
    `max_new_tokens` / `time_limit` bound what one request may cost (None = no limit); `policy` says which models
    users may switch to (default: none); `attn_implementation` goes to every `dlm.load`."""
    if backend is None:
        backend = Backend(min_frame_interval=min_frame_interval, max_prompt_tokens=max_prompt_tokens,
                          time_limit=time_limit, per_client=queue_per_client, max_waiting=queue_size,
                          policy=policy, attn_implementation=attn_implementation, max_new_tokens=max_new_tokens)
        backend.load_default(model, ar_model, quantization=quantization, device=device, dtype=dtype,
                             adapter=adapter)

    with Playground(title="dlm-studio playground", delete_cache=CACHE_CLEANUP) as demo:
        gr.Markdown("## dlm-studio · diffusion language model playground\n"
                    "An autoregressive LM adapted into a masked-diffusion LM (Gong et al. 2024): it writes by "
                    "un-masking tokens in any order over a fixed number of steps.")
        banner_html = gr.HTML(banner(backend.notice()), css_template=BANNER_CSS, elem_id="banner", js_on_load=None)
        with gr.Tabs():  # in `app.tabs.TABS` order; the model tab (config None) last, seeing the others' widgets
            runs = [spec.load()(backend) for spec in TABS if spec.config is not None]
            (model_spec,) = [spec for spec in TABS if spec.config is None]
            model_tab = model_spec.load()(backend, [tab.controls for tab in runs], banner_html)

        # Stop: the session's running work ends before the next transformer layer and its handler shows what it
        # has ("Stopped after k steps"). (No `cancels=`: cancelling the handler would lose that last update; a
        # cancelled client job or a closed tab cancels the handler, which cancels the run just as well.)
        def stop(request: gr.Request):
            backend.stop(getattr(request, "session_hash", None))

        for tab in runs:
            tab.stop.click(stop, None, None, queue=False, **LIGHT)
        demo.load(model_tab.page_load, None, model_tab.load_outputs, **LIGHT)
        demo.api_signatures = api.register(backend)

    # Model events start at once (MODEL: no Gradio limit); the worker queues their model work fairly and bounds it
    # (queue_size in all, queue_per_client per client address). Gradio's queue bounds what is left (light events).
    demo.queue(max_size=4 * queue_size, default_concurrency_limit=1)
    demo.backend = backend  # for tests and scripts embedding the app
    return demo
