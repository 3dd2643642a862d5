"""Start the dlm-studio playground:  dlm-studio [--model NAME_OR_PATH] [--port 7860] ...   (or python app.py)

Binds 127.0.0.1 by default; the model goes to the GPU when there is one (else CPU). With no --model it loads the
project's adapted default (smollm2-135m-dlm), or, while that is missing, the un-adapted SmolLM2-135M with a notice.
"""
from __future__ import annotations

import argparse
import os
import sys

# No analytics / telemetry calls from Gradio or the hub client. (Not HF_HUB_OFFLINE: users with a network must
# still be able to fetch hub models such as DiffuGPT.)
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"

from app import MAX_PROMPT_TOKENS, TIME_LIMIT_S  # noqa: E402  (light: no torch)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="dlm-studio", description="dlm-studio: diffusion LM playground (Gradio)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1; 0.0.0.0 = LAN)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--model", default=None,
                   help="DLM: registry name, local directory / .gguf, or hub id (default: smollm2-135m-dlm)")
    p.add_argument("--ar-model", default=None, help="AR model to compare with (default: the registered counterpart)")
    p.add_argument("--adapter", default=None, help="optional LoRA adapter directory applied on top of --model")
    p.add_argument("--quantization", choices=["none", "8bit", "4bit"], default="none",
                   help="bitsandbytes quantization (default none; on CPU it saves memory but is slower)")
    p.add_argument("--device", default="auto", help="auto (GPU if present) / cpu / cuda / mps (default auto)")
    p.add_argument("--dtype", default="auto", help="auto / float32 / bfloat16 / float16 (default auto)")
    p.add_argument("--queue-size", type=int, default=16, help="max requests waiting in the queue (default 16)")
    p.add_argument("--max-prompt-tokens", type=int, default=MAX_PROMPT_TOKENS,
                   help=f"longest prompt (or infilling context) one request may have, in tokens (default "
                        f"{MAX_PROMPT_TOKENS}; 0 = the model's context)")
    p.add_argument("--time-limit", type=float, default=TIME_LIMIT_S,
                   help=f"seconds of model work one request may take before it is stopped with a message (default "
                        f"{TIME_LIMIT_S:g}; 0 = no limit)")
    p.add_argument("--share", action="store_true", help="also create a public gradio.live link")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    from app import ui  # imported after the environment is set

    print(f"loading {args.model or 'the default model'} …", file=sys.stderr, flush=True)
    demo = ui.build(model=args.model, ar_model=args.ar_model, adapter=args.adapter, quantization=args.quantization,
                    device=args.device, dtype=args.dtype, queue_size=args.queue_size,
                    max_prompt_tokens=args.max_prompt_tokens or None, time_limit=args.time_limit or None)
    notice = demo.backend.notice()
    if notice:
        print(f"NOTE: {notice}", file=sys.stderr, flush=True)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, show_error=True)


if __name__ == "__main__":
    main()
