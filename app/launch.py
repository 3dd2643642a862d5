"""Start the dlm-studio playground:  dlm-studio [--model NAME_OR_PATH] [--port 7860] ...   (or python app.py)

Binds 127.0.0.1 by default; the model goes to the GPU when there is one (else CPU). With no --model it loads the
project's adapted default (smollm2-135m-dlm), or, while that is missing, the un-adapted SmolLM2-135M with a notice.

Security (docs/app.md, "Security and limits"): users cannot switch models unless --allow-model-switch (then registry
names and folders under --model-dir only); the hub is offline (HF_HUB_OFFLINE=1) unless --online, so no request
starts a download; uploads are bounded; --auth user:pass guards a server reachable beyond this machine, and binding
beyond 127.0.0.1 without it prints a warning.
"""
from __future__ import annotations

import argparse
import os
import sys

# No analytics / telemetry calls from Gradio or the hub client. Offline mode is set in main() from --online, before
# anything imports huggingface_hub.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
LOOPBACK = ("127.0.0.1", "localhost", "::1")

from app import MAX_PROMPT_TOKENS, TIME_LIMIT_S  # noqa: E402  (light: no torch)
from dlm.load_options import ATTN_IMPLEMENTATIONS, QUANTIZATIONS  # noqa: E402  (no torch either)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="dlm-studio", description="dlm-studio: diffusion LM playground (Gradio)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1; 0.0.0.0 = LAN)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--model", default=None,
                   help="DLM: registry name, local directory / .gguf, or hub id (default: smollm2-135m-dlm)")
    p.add_argument("--ar-model", default=None, help="AR model to compare with (default: the registered counterpart)")
    p.add_argument("--adapter", default=None, help="optional LoRA adapter directory applied on top of --model")
    p.add_argument("--quantization", choices=QUANTIZATIONS, default="none",
                   help="bitsandbytes quantization (default none; on CPU it saves memory but is slower)")
    p.add_argument("--device", default="auto", help="auto (GPU if present) / cpu / cuda / mps (default auto)")
    p.add_argument("--dtype", default="auto", help="auto / float32 / bfloat16 / float16 (default auto)")
    p.add_argument("--queue-size", type=int, default=16, help="max requests waiting in the queue (default 16)")
    p.add_argument("--queue-per-session", type=int, default=1,
                   help="requests one session (browser tab / API client) may have waiting besides its running one; "
                        "a newer one replaces the oldest (default 1)")
    p.add_argument("--max-prompt-tokens", type=int, default=MAX_PROMPT_TOKENS,
                   help=f"longest prompt (or infilling context) one request may have, in tokens (default "
                        f"{MAX_PROMPT_TOKENS}; 0 = the model's context)")
    p.add_argument("--time-limit", type=float, default=TIME_LIMIT_S,
                   help=f"seconds of model work one request may take before it is stopped with a message (default "
                        f"{TIME_LIMIT_S:g}; 0 = no limit)")
    p.add_argument("--attn-implementation", choices=ATTN_IMPLEMENTATIONS, default="auto",
                   help="attention kernel for every model (flash_attention_2 falls back to sdpa with a warning "
                        "without flash-attn or CUDA; default auto)")
    p.add_argument("--share", action="store_true", help="also create a public gradio.live link")
    p.add_argument("--allow-model-switch", action="store_true",
                   help="let users load another model from the Model tab (registry names and --model-dir folders "
                        "only); off by default: the model you start with serves everyone")
    p.add_argument("--model-dir", action="append", default=[], metavar="DIR",
                   help="a folder whose models users may load when switching is allowed (repeatable)")
    p.add_argument("--online", action="store_true",
                   help="allow hub downloads (default: HF_HUB_OFFLINE=1, so no request can start a download)")
    p.add_argument("--auth", default=None, metavar="USER:PASS",
                   help="require this login (use it whenever --host is not 127.0.0.1)")
    p.add_argument("--max-file-size", default="1mb", help="largest upload Gradio accepts (default 1mb)")
    args = p.parse_args(argv)
    if args.auth is not None:
        user, colon, password = args.auth.partition(":")
        if not (user and colon and password):
            p.error("--auth: write USER:PASS (both non-empty)")
    return args


def exposure_warning(args: argparse.Namespace) -> str:
    """The start-up warning when the server is reachable beyond this machine without a login ('' when not)."""
    if args.auth:
        return ""
    if args.share:
        return "WARNING: --share publishes this server on a public gradio.live link without --auth: anyone with " \
               "the link can use it."
    if args.host not in LOOPBACK:
        return f"WARNING: binding {args.host} without --auth: anyone who can reach this machine on port " \
               f"{args.port} can use the playground (add --auth USER:PASS)."
    return ""


def main(argv=None) -> None:
    args = parse_args(argv)
    if not args.online:
        os.environ["HF_HUB_OFFLINE"] = "1"  # a hub id, the operator's or a user's, never starts a download
    from app import ui  # imported after the environment is set
    from app.models import SwitchPolicy

    warning = exposure_warning(args)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    print(f"loading {args.model or 'the default model'} …", file=sys.stderr, flush=True)
    demo = ui.build(model=args.model, ar_model=args.ar_model, adapter=args.adapter, quantization=args.quantization,
                    device=args.device, dtype=args.dtype, queue_size=args.queue_size,
                    queue_per_session=args.queue_per_session,
                    max_prompt_tokens=args.max_prompt_tokens or None, time_limit=args.time_limit or None,
                    policy=SwitchPolicy(args.allow_model_switch, tuple(args.model_dir)),
                    attn_implementation=args.attn_implementation)
    from dlm.cpu_kernel import native_bf16
    model = getattr(demo.backend, "model", None)
    if args.dtype in ("auto", "float32", "fp32") and getattr(getattr(model, "device", None), "type", "") == "cpu" \
            and native_bf16():
        print("NOTE: this CPU multiplies bf16 natively (AMX / AVX512-BF16): --dtype bfloat16 makes the DLM's "
              "multi-token steps up to ~2x faster at a small cost in fluency (docs/app.md, bench.cpu_step)",
              file=sys.stderr, flush=True)
    notice = demo.backend.notice()
    if notice:
        print(f"NOTE: {notice}", file=sys.stderr, flush=True)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, show_error=True,
                auth=tuple(args.auth.split(":", 1)) if args.auth else None, max_file_size=args.max_file_size)


if __name__ == "__main__":
    main()
