"""Start the dlm-studio playground:  dlm-studio [--model NAME_OR_PATH] [--port 7860] ...   (or python app.py)

Binds 127.0.0.1 by default; the model goes to the GPU when there is one (else CPU). With no --model it loads the
project's adapted default (smollm2-135m-dlm), or, while that is missing, the un-adapted SmolLM2-135M with a notice.

Security (docs/app.md, "Security and limits"): users cannot switch models unless --allow-model-switch (then registry
names and folders under --model-dir only); the hub is offline (HF_HUB_OFFLINE=1) unless --online, so no request
starts a download; requests to another host name are refused and the upload route is closed; --auth user:pass
guards a server reachable beyond this machine, and binding beyond 127.0.0.1 without it prints a warning.
"""
from __future__ import annotations

import argparse
import atexit
import os
import shutil
import signal
import sys
import tempfile

# No analytics / telemetry calls from Gradio or the hub client. Offline mode is set in main() from --online, before
# anything imports huggingface_hub.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
LOOPBACK = ("127.0.0.1", "localhost", "::1")

from app import MAX_NEW_TOKENS, MAX_PROMPT_TOKENS, MAX_SESSIONS, TIME_LIMIT_S  # noqa: E402  (light: no torch)
from dlm.load_options import ATTN_IMPLEMENTATIONS, QUANTIZATIONS  # noqa: E402  (no torch either)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dlm-studio", description="dlm-studio: diffusion LM playground (Gradio)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1; 0.0.0.0 = LAN)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--model", default=None,
                   help="DLM: registry name, local directory / .gguf, or hub id (default: smollm2-135m-dlm)")
    p.add_argument("--ar-model", default=None, help="AR model to compare with (default: the registered counterpart)")
    p.add_argument("--adapter", default=None, help="optional LoRA adapter directory applied on top of --model")
    p.add_argument("--quantization", choices=QUANTIZATIONS, default="auto",
                   help="auto (default): int4 on a CPU where it is exact (the embedded default), else none; int8 / "
                        "int4: dlm's packed CPU formats; 8bit / 4bit: bitsandbytes; none: full precision")
    p.add_argument("--device", default="auto", help="auto (GPU if present) / cpu / cuda / mps (default auto)")
    p.add_argument("--dtype", default="auto", help="auto / float32 / bfloat16 / float16 (default auto)")
    p.add_argument("--queue-size", type=int, default=16, help="max requests waiting in the queue (default 16)")
    p.add_argument("--queue-per-client", type=int, default=4,
                   help="requests one client address may have waiting besides its running one (two tabs, a small "
                        "batch of API jobs); more are refused before they wait (default 4)")
    p.add_argument("--trusted-proxies", default="", metavar="ADDR[,ADDR...]",
                   help="reverse proxies (addresses or networks) whose X-Forwarded-For names the client; fairness "
                        "and the per-client bound then count the forwarded address (default: none)")
    p.add_argument("--allowed-hosts", default="", metavar="NAME[,NAME...]",
                   help="more names this server answers to (the Host header) besides the bound host, localhost "
                        "and 127.0.0.1; other names are refused (DNS rebinding)")
    p.add_argument("--max-prompt-tokens", type=int, default=MAX_PROMPT_TOKENS,
                   help=f"longest prompt (or infilling context) one request may have, in tokens (default "
                        f"{MAX_PROMPT_TOKENS}; 0 = the model's context)")
    p.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS,
                   help=f"most tokens one request may generate or fill (default {MAX_NEW_TOKENS}; 0 = the model's "
                        f"context); with --max-prompt-tokens it bounds every request's canvas")
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
    p.add_argument("--max-sessions", type=int, default=MAX_SESSIONS,
                   help=f"browser / API sessions whose state (each tab's last run, the edit history) is kept; the "
                        f"least recently used beyond it are dropped (default {MAX_SESSIONS}: a few hundred MB at "
                        f"most, since a session keeps its runs as diffs)")
    p.add_argument("--max-file-size", default="1mb",
                   help="largest upload Gradio accepts (default 1mb; the app takes no file, its upload route is "
                        "closed)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """The flags, with the lists split and --trusted-proxies / --auth checked (a usage error names the flag)."""
    p = build_parser()
    args = p.parse_args(argv)
    args.trusted_proxies = [a.strip() for a in args.trusted_proxies.split(",") if a.strip()]
    args.allowed_hosts = [a.strip() for a in args.allowed_hosts.split(",") if a.strip()]
    try:
        import ipaddress
        for a in args.trusted_proxies:
            ipaddress.ip_network(a, strict=False)
    except ValueError as e:
        p.error(f"--trusted-proxies: {e}")
    if args.max_sessions < 1:
        p.error(f"--max-sessions: must be at least 1, got {args.max_sessions}")
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


def temp_dirs() -> list[str]:
    """This process's temporary folders: Gradio's (its upload and file cache, one per process: GRADIO_TEMP_DIR
    set by `own_temp_dir`) and the exports' (`app.render.EXPORT_DIR`)."""
    return [os.path.join(tempfile.gettempdir(), f"dlm-studio-gradio-{os.getpid()}"),
            os.path.join(tempfile.gettempdir(), f"dlm-studio-exports-{os.getpid()}")]


def remove_temp_dirs() -> None:
    for d in temp_dirs():
        shutil.rmtree(d, ignore_errors=True)


def own_temp_dir() -> None:
    """Gradio's temp folder becomes one of this process (unless the operator set GRADIO_TEMP_DIR), and this
    process's temp folders are removed at exit, on SIGTERM too (the default SIGTERM ends Python without its exit
    handlers: it becomes the KeyboardInterrupt Gradio's server loop ends on)."""
    if not os.environ.get("GRADIO_TEMP_DIR"):
        os.environ["GRADIO_TEMP_DIR"] = temp_dirs()[0]
    atexit.register(remove_temp_dirs)

    def terminate(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    try:
        signal.signal(signal.SIGTERM, terminate)
    except ValueError:  # not the main thread (an embedding script): its own handlers stay
        pass


def main(argv=None) -> None:
    args = parse_args(argv)
    if not args.online:
        os.environ["HF_HUB_OFFLINE"] = "1"  # a hub id, the operator's or a user's, never starts a download
    own_temp_dir()  # before Gradio is imported: it reads GRADIO_TEMP_DIR then
    from app import ui  # imported after the environment is set
    from app.model_lifecycle import SwitchPolicy

    warning = exposure_warning(args)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    print(f"loading {args.model or 'the default model'} …", file=sys.stderr, flush=True)
    demo = ui.build(model=args.model, ar_model=args.ar_model, adapter=args.adapter, quantization=args.quantization,
                    device=args.device, dtype=args.dtype, queue_size=args.queue_size,
                    queue_per_client=args.queue_per_client, max_new_tokens=args.max_new_tokens or None,
                    max_prompt_tokens=args.max_prompt_tokens or None, time_limit=args.time_limit or None,
                    policy=SwitchPolicy(args.allow_model_switch, tuple(args.model_dir)),
                    attn_implementation=args.attn_implementation)
    from app.model_lifecycle import freeze_heap
    freeze_heap()   # once the model is loaded and the UI built: their objects leave the collector's walks
    notice = demo.backend.notice()
    if notice:
        print(f"NOTE: {notice}", file=sys.stderr, flush=True)
    demo.allowed_hosts, demo.trusted_proxies = args.allowed_hosts, args.trusted_proxies  # for app.http_guard.guard
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, show_error=True,
                auth=tuple(args.auth.split(":", 1)) if args.auth else None, max_file_size=args.max_file_size,
                state_session_capacity=args.max_sessions)


if __name__ == "__main__":
    main()
