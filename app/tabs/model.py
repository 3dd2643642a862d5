"""Model: pick a registry model or a local path, an optional LoRA adapter, the AR counterpart, the mask token id,
quantization, device and dtype. Shows what is loaded, its memory, the limits per request and which decoding mode
each tab uses; before loading, what the chosen registry model's weights need in each precision (`memory_table`,
from its config through the backend); loading another model resets every tab's sampler widgets to its recommended
configs.

Switching is the operator's choice (dlm-studio --allow-model-switch, --model-dir): when it is off the loader is
shown disabled and refused by the server (`Models.switch`), whoever calls it."""
from __future__ import annotations

import gradio as gr

from app.backend import DEVICES, DTYPES, QUANTIZATIONS, Backend
from app.events import describe_error
from app.tabs import TAB
from app.tabs.common import LIGHT, MODEL, SamplerControls, banner
from dlm import model_registry

# The precisions of the memory table: (key of `memory_estimate`, the quantization choice / dtype that gives it)
PRECISIONS = (("fp32", "`none` on a CPU (float32)"), ("bf16", "`none` on a GPU (bfloat16)"),
              ("8bit", "`8bit`: bitsandbytes LLM.int8"), ("4bit", "`4bit`: bitsandbytes NF4"),
              ("int8", "`int8`: packed for CPUs, 8.5 bits a weight"),
              ("int4", "`int4`: packed for CPUs, 5 bits a weight, head int8"))


def memory_table(est) -> str:
    """A Markdown table of `Backend.memory_estimate`'s GiB per precision ("" when unknown)."""
    if not est:
        return ""
    extra = est.get("overhead_gib", 0.0)
    rows = [f"| {key} | {est[key]:.2f} GiB | ~{est[key] + extra:.1f} GiB | {how} |"
            for key, how in PRECISIONS if key in est]
    return "\n".join([f"**Memory before loading** ({est['parameters_b']:.2f} B parameters, from its config): ",
                      "", "| precision | weights | with activations + KV cache | quantization |",
                      "|---|---|---|---|", *rows, "",
                      f"*Weights only in the second column; the third adds a rule of thumb ({extra:.1f} GiB: the "
                      "runtime, activations and a few thousand tokens of KV cache). 8bit / 4bit keep the "
                      "embeddings and head in bf16; int8 / int4 keep the input embedding in fp32.*"])


def model_notes(backend: Backend, name: str) -> str:
    """The registry entry's notes, whether it loads offline, and its memory table."""
    if not name or not model_registry.is_registered(name):
        return ""
    s = model_registry.get(name)
    where = "available offline" if model_registry.is_available(name) else \
        "not available offline (needs the network once, or its files)"
    table = memory_table(backend.memory_estimate(name))
    return f"*{s.notes}* — {where}." + (f"\n\n{table}" if table else "")


class ModelTab:
    def __init__(self, backend: Backend, controls: list[SamplerControls], banner_html: gr.HTML):
        self.backend, self.controls, self.banner = backend, controls, banner_html
        specs = model_registry.list_models()
        source = backend.info.source
        policy = backend.switching
        on = dict(interactive=policy.allowed)
        with gr.Tab(TAB["model"].title, id="model"):
            self.status = gr.Markdown(backend.status_markdown(), elem_id="model-status")
            gr.Markdown(self._policy_note(policy), elem_id="model-policy")
            with gr.Row():
                self.name = gr.Dropdown([(f"{s.name} ({s.kind}, {s.params})", s.name) for s in specs],
                                        value=source if model_registry.is_registered(source) else None,
                                        label="Registry model", scale=2, elem_id="model-name", **on)
                self.path = gr.Textbox("" if model_registry.is_registered(source) else "", scale=3,
                                       label="…or a local path in an allowed folder (overrides the registry choice)",
                                       elem_id="model-path", **on)
            self.notes = gr.Markdown(model_notes(backend, source) if model_registry.is_registered(source) else "",
                                     elem_id="model-notes")
            with gr.Row():
                self.adapter = gr.Textbox("", label="LoRA adapter directory (optional)", **on)
                self.ar = gr.Textbox("", label="AR counterpart (empty = the registered one)", **on)
                self.mask = gr.Number(-1, label="Mask token id (-1 = automatic)", **on)
            with gr.Row():
                self.quant = gr.Radio(list(QUANTIZATIONS), value="auto",
                                      label="Quantization (auto: int4 on a CPU where exact; int8 / int4 packed for "
                                            "CPUs; 8bit / 4bit bitsandbytes)", **on)
                self.device = gr.Dropdown(DEVICES, value="auto", label="Device", **on)
                self.dtype = gr.Dropdown(DTYPES, value="auto", label="Dtype", **on)
            self.go = gr.Button("Load (frees the current model)", variant="primary", elem_id="model-load", **on)
            gr.Markdown("The loaded model is shared by everyone using this server; loading waits for running "
                        "generations to finish.")
        self._wire()

    @staticmethod
    def _policy_note(policy) -> str:
        if not policy.allowed:
            return ("*Switching models is off on this server* (the operator enables it with `dlm-studio "
                    "--allow-model-switch`).")
        dirs = ", ".join(f"`{d}`" for d in policy.dirs) or "none"
        return f"Registry models, or local folders inside: {dirs} (`--model-dir`)."

    def _wire(self) -> None:
        backend = self.backend

        def show_notes(name):
            return model_notes(backend, name)

        self.name.change(show_notes, self.name, self.notes, **LIGHT)

        def widget_updates() -> list:
            out = []
            for c in self.controls:
                out += c.updates(backend.base_config(c.task)) if backend.model is not None else \
                    [gr.skip()] * len(c.outputs)
            return out

        def load_model(name, path, adapter, ar, mask, quant, device, dtype):
            source = (path or "").strip() or name
            try:
                info = backend.switch(source, adapter=adapter, quantization=quant, device=device, dtype=dtype,
                                      mask_token_id=mask, ar_source=ar)
                if info.ar_error:
                    gr.Warning(info.ar_error.replace("<", "&lt;"))
            except Exception as e:
                gr.Warning(f"Could not load {source!r}: {describe_error(e)}".replace("<", "&lt;"))
            return (backend.status_markdown(), banner(backend.notice()), *widget_updates())

        outputs = [self.status, self.banner] + [o for c in self.controls for o in c.outputs]
        self.go.click(load_model, [self.name, self.path, self.adapter, self.ar, self.mask, self.quant, self.device,
                                   self.dtype], outputs, **MODEL)
        self.load_outputs = outputs
        built_with = backend.loads

        def page_load():
            """A fresh page shows what is loaded now; its widgets follow a model loaded after the app was built."""
            ups = widget_updates() if backend.loads != built_with else [gr.skip()] * (len(outputs) - 2)
            return (backend.status_markdown(), banner(backend.notice()), *ups)

        self.page_load = page_load
