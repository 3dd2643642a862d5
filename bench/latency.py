"""Fairness of the shared playground: how long does a short request wait while other clients keep the model busy
with long ones? A server is started in this process (the playground as `dlm-studio` builds it) and driven over
HTTP (REST, `/gradio_api/call/v2/denoise`): `--long-clients` clients each keep one long request in flight
(sending the next as soon as one ends), while one more client sends `--short` short requests one after another;
each short request's latency (send -> result) is measured. The server is fair per client *address*, so each
client sends from its own loopback address (long ones from 127.0.0.10, .11, ...; the short one from 127.0.0.3);
from one address they would all be one client.

    python -m bench.latency                                   # the default model, 10 long clients, 8 short requests
    python -m bench.latency --model PATH --long-clients 10 --short 8 --time-limit 20
    python -m bench.latency --same-address                    # the long requests all come from ONE address

Target: p95 of a short request under 10 long ones <= the server's time limit per request.

Measured (default model smollm2-135m-dlm in the CPU default (int4), 2-core Xeon with a niced training run in the
background; long = 48 tokens x 48 steps with the full decoder, 20.0 s alone; short = 4 tokens x 4 steps, 0.53 s
alone; time limit 20 s; 10 long clients, each from its own address; the server in this process):

    short p50 3.2 s, p95 5.9 s, max 5.9 s (8 requests; 3 long ones finished meanwhile)  -> yes

Earlier designs, measured through gradio_client with every client on 127.0.0.1 (fair per session then) and the
fp32 model on a more loaded machine: Gradio's FIFO queue, a short request waited behind every long one queued ahead
of it (165.7 s, 192.9 s, then stopped); the worker's fair order run by run, one whole long run (p95 20.1 s); fair
order with the running request pausing between steps for a waiting one whose key is lower (the design measured
above), p95 2.7 s.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import threading
import time
from typing import Optional, Sequence

LONG = dict(prompt="Once upon a time, in a small village by the sea,", max_new_tokens=48, steps=48, decoder="full",
            block_length=0, threshold=0)
SHORT = dict(prompt="The capital of France is", max_new_tokens=4, steps=4, decoder="full", block_length=0,
             threshold=0)
SHORT_FROM, ALONE_FROM = "127.0.0.3", "127.0.0.4"


def long_from(i: int, same_address: bool) -> str:
    """The source address of long client `i`: its own, or 127.0.0.10 for all with --same-address."""
    return f"127.0.0.{10 + (0 if same_address else i)}"


def denoise(url: str, source: str, settings: dict) -> float:
    """One /denoise request from `source` to its result: its seconds; raises with the server's message."""
    from bench.server_probe import post_call
    t0 = time.monotonic()
    event, data = post_call(url, "v2/denoise", json.dumps(settings).encode(), source=source, timeout=600)
    if event != "complete":
        raise RuntimeError(f"{event}: {data[:200]}")
    return time.monotonic() - t0


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) by the nearest-rank method."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(round(q / 100 * len(s) + 0.5)) - 1))]


def main(argv: Optional[Sequence[str]] = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="bench.latency", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="default: the playground's default DLM")
    p.add_argument("--device", default="cpu")
    p.add_argument("--long-clients", type=int, default=10)
    p.add_argument("--short", type=int, default=8, help="short requests to time")
    p.add_argument("--time-limit", type=float, default=20.0, help="the server's time limit per request (s)")
    p.add_argument("--same-address", action="store_true", help="all long requests from one address (127.0.0.10)")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    from app import ui

    demo = ui.build(model=args.model, device=args.device, time_limit=args.time_limit, queue_size=64)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    stop = threading.Event()
    long_done: list[float] = []

    def keep_busy(source):
        while not stop.is_set():
            try:
                long_done.append(denoise(url, source, LONG))
            except Exception:  # refused or stopped by the server's limits: send the next one a little later
                time.sleep(0.5)

    try:
        denoise(url, ALONE_FROM, SHORT)  # warm-up
        alone_short = denoise(url, ALONE_FROM, SHORT)  # alone (its own address: the short client's history
        alone_long = denoise(url, ALONE_FROM, LONG)    # holds only its short requests)
        threads = [threading.Thread(target=keep_busy, args=(long_from(i, args.same_address),), daemon=True)
                   for i in range(args.long_clients)]
        for t in threads:
            t.start()
        time.sleep(2 * alone_long)  # the long requests fill the queue
        latencies = []
        for _ in range(args.short):
            latencies.append(denoise(url, SHORT_FROM, SHORT))
            print(f"  short request: {latencies[-1]:.2f} s", flush=True)
            time.sleep(0.5)
    finally:
        stop.set()
        demo.close()
    p50, p95 = statistics.median(latencies), percentile(latencies, 95)
    row = dict(long_clients=args.long_clients, same_address=args.same_address, alone_short=alone_short,
               alone_long=alone_long, p50=p50, p95=p95, max=max(latencies), time_limit=args.time_limit,
               long_finished=len(long_done))
    print(f"# {demo.backend.info.name}: short request alone {alone_short:.2f} s, long alone {alone_long:.2f} s; under "
          f"{args.long_clients} long {'requests from one address' if args.same_address else 'clients'}: short "
          f"p50 {p50:.1f} s, p95 {p95:.1f} s, max {max(latencies):.1f} s ({len(latencies)} requests; "
          f"{len(long_done)} long ones finished); target p95 <= the time limit {args.time_limit:g} s: "
          f"{'yes' if p95 <= args.time_limit else 'NO'}")
    return [row]


if __name__ == "__main__":
    main()
