"""Hostile requests against a running playground (issue 31): does any of them stall the other clients or take the
machine's memory? The server (`app.py`, a subprocess bound to 127.0.0.1) is probed from 127.0.0.2 while a
well-behaved client on 127.0.0.5 polls `GET /config` every 50 ms; every client sends from its own 127.0.0.x (the
server is fair per address), every request goes to 127.0.0.1 only, and every loop is bounded.

    python -m bench.server_probe                         # the shipped default model, a 60 s mixed load
    python -m bench.server_probe --tiny --duration 120   # a tiny random model (no model work to speak of)
    python -m bench.server_probe --model PATH --duration 600 --json out.json
    python -m bench.server_probe --repo /tmp/other-checkout      # another checkout's app.py (same probe)

Part 1, one hostile request at a time: what the server answered (status, first words), how long it took, and the
worst latency the polling client saw meanwhile (its stall; `idle` is the same client with nothing hostile).
Part 2, `--duration` seconds of mixed load: two well-behaved clients (127.0.0.3, 127.0.0.4) each sending short
/denoise requests one after another, the poller, and the hostile requests of part 1 cycled from 127.0.0.2 (one at
a time); the server's RSS sampled every second (start, max, end, and once a minute), how many well-formed requests
were answered (and how many were not), their latency p50 / p95, and the poller's worst stall.

Measured: see docs/app.md ("Security and limits") for the numbers of the last run.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

REPO = Path(__file__).resolve().parent.parent
HOSTILE, GOOD_A, GOOD_B, POLLER = "127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"  # one client per address


_TLS = []


def client(source: str, timeout: float = 60.0):
    """An HTTP client sending from `source` (127.0.0.x). One TLS context for all (plain HTTP here, but httpx makes
    one per client otherwise: ~40 ms of this process's CPU each, which a 100-connection flood would take from the
    server on a 2-core machine and count as the server's stall)."""
    import ssl

    import httpx
    if not _TLS:
        _TLS.append(ssl.create_default_context())
    return httpx.Client(transport=httpx.HTTPTransport(local_address=source, verify=_TLS[0]), verify=_TLS[0],
                        timeout=timeout)


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def tiny_model(directory: Path) -> Path:
    """A tiny random LLaMA with a BPE learned from the repo's tiny corpus (as tests/conftest.py builds it)."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2048, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train([str(REPO / "train" / "data" / "tiny_corpus.txt")], trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                                bos_token="<|endoftext|>")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                                   tie_word_embeddings=True, bos_token_id=fast.bos_token_id,
                                   eos_token_id=fast.eos_token_id)
    transformers.LlamaForCausalLM(cfg).save_pretrained(directory, safe_serialization=True)
    fast.save_pretrained(directory)
    return directory


class Server:
    def __init__(self, model: Optional[str], port: int, time_limit: float, repo: Path = REPO):
        cmd = [sys.executable, "app.py", "--port", str(port), "--device", "cpu", "--time-limit", str(time_limit)]
        if model:
            cmd += ["--model", model]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1"}
        self.url = f"http://127.0.0.1:{port}/"
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def wait(self, timeout: float = 600.0) -> None:
        import httpx
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise SystemExit(f"app.py exited: {self.log.read()[-2000:].decode(errors='replace')}")
            try:
                if httpx.get(self.url + "config", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        raise SystemExit("app.py did not start in time")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def tracebacks(self) -> int:
        self.log.seek(0)
        return self.log.read().count(b"Traceback (most recent call last)")


def _poll(url: str, window, overall, stop) -> None:
    with client(POLLER, 60) as h:
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                h.get(url + "config")
            except Exception:  # noqa: BLE001  (a refused poll counts as its full wait)
                pass
            dt = time.monotonic() - t0
            with window.get_lock():
                window.value = max(window.value, dt)
            with overall.get_lock():
                overall.value = max(overall.value, dt)
            time.sleep(0.05)


class Poller:
    """The well-behaved client polling GET /config every 50 ms, in its own process (so the probe's own threads
    cannot slow it down); `mark()` starts a new window of its worst latency."""

    def __init__(self, url: str):
        import multiprocessing as mp
        ctx = mp.get_context("spawn")
        self._window, self._overall, self.stop_ = ctx.Value("d", 0.0), ctx.Value("d", 0.0), ctx.Event()
        self.thread = ctx.Process(target=_poll, args=(url, self._window, self._overall, self.stop_), daemon=True)

    @property
    def window(self) -> float:
        return self._window.value

    def mark(self) -> None:
        with self._window.get_lock():
            self._window.value = 0.0


def sse_result(h, url: str, endpoint: str, event_id: str) -> tuple[str, str]:
    event = None
    with h.stream("GET", f"{url}gradio_api/call/{endpoint}/{event_id}") as s:
        for line in s.iter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and event in ("complete", "error"):
                return event, line.split(":", 1)[1].strip()
    return str(event), ""


def post_call(url: str, endpoint: str, content, source: str = HOSTILE, headers=None, timeout=300.0
              ) -> tuple[str, str]:
    """POST /gradio_api/call/<endpoint> (content: bytes or an iterator of chunks), then its result: (status or
    event, the first words of the answer)."""
    with client(source, timeout) as h:
        r = h.post(f"{url}gradio_api/call/{endpoint}", content=content,
                   headers={"Content-Type": "application/json", **(headers or {})})
        if r.status_code != 200:
            return f"HTTP {r.status_code}", r.text
        event, data = sse_result(h, url, endpoint.removeprefix("v2/"), r.json()["event_id"])
        return event, data


def chunks(body: bytes, size: int = 1 << 16):
    for i in range(0, len(body), size):
        yield body[i:i + size]


def hostile_requests(url: str) -> list[tuple[str, Callable[[], tuple[str, str]]]]:
    """Each hostile request of issue 31's probe, as (name, a function that sends it and returns the answer)."""
    j = lambda d: json.dumps(d).encode()  # noqa: E731

    def raw(method, path, **kw):
        def send():
            with client(HOSTILE, 120) as h:
                r = h.request(method, url + path, **kw)
                return f"HTTP {r.status_code}", r.text
        return send

    def flood():  # 100 session ids from one address, bounded
        answers: list[str] = []
        lock = threading.Lock()

        def one(i):
            a = post_call(url, "denoise", j({"data": ["A long story about the sea:", 48, 48],
                                             "session_hash": f"flood-{i}"}), timeout=600)
            with lock:
                answers.append(a[0] if a[0] != "error" else a[1][:40])
        threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(100)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
        counts: dict[str, int] = {}
        for a in answers:
            counts[a] = counts.get(a, 0) + 1
        return "flood", ", ".join(f"{v} x {k}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))

    lists = b'{"data": ["Hi", [1, 2], [' + b"[]," * 1_300_000 + b'[]]]}'
    edits = b'{"data": ["Hi", [1, 2], [' + b"[0, 1]," * 400_000 + b'[0, 1]]]}'
    return [
        ("canvas 8000 (full)", lambda: post_call(url, "v2/denoise", j({"prompt": "Hi", "max_new_tokens": 8000,
                                                                      "steps": 1, "decoder": "full",
                                                                      "block_length": 0}))),
        ("blocks 200000000", lambda: post_call(url, "v2/denoise", j({"prompt": "Hi", "max_new_tokens": 200000000,
                                                                    "decoder": "blocks", "block_length": 4}))),
        ("blocks 2**63", lambda: post_call(url, "v2/denoise", j({"prompt": "Hi", "max_new_tokens": 2**63,
                                                                "decoder": "blocks", "block_length": 4}))),
        ("400k edits", lambda: post_call(url, "redenoise", chunks(edits))),
        ("1.3M empty lists (chunked)", lambda: post_call(url, "redenoise", chunks(lists))),
        ("12 MB chunked body", lambda: post_call(url, "denoise", chunks(b'{"data": ["' + b"x" * (12 << 20) +
                                                                        b'"]}'))),
        ("JSON 10,000 deep", lambda: post_call(url, "v2/denoise", b"[" * 10_000 + b"]" * 10_000)),
        ("1e308 temperature", lambda: post_call(url, "v2/denoise", b'{"prompt": "Hi", "temperature": 1e308}')),
        ("10**400 top_p", lambda: post_call(url, "v2/denoise",
                                            b'{"prompt": "Hi", "top_p": 1' + b"0" * 400 + b"}")),
        ("temperature 5e-324", lambda: post_call(url, "v2/denoise", j({"prompt": "Hi", "temperature": 5e-324}))),
        ("[MASK:<5000 digits>]", lambda: post_call(url, "infill", j({"data": ["a [MASK:" + "9" * 5000 + "] b"]}))),
        ("3.8 MB list as prompt", lambda: post_call(url, "denoise", j({"data": [["x" * 100] * 36_000]}))),
        ("Host: evil.example", raw("POST", "gradio_api/call/denoise", json={"data": ["Hi"]},
                                   headers={"Host": "evil.example"})),
        ("30 MB upload", raw("POST", "gradio_api/upload", files={"files": ("a.bin", b"\0" * (30 << 20))},
                             headers={"Origin": "http://evil.example"})),
        ("/run/nope", raw("POST", "gradio_api/run/nope", json={"data": []})),
        ("/run/predict fn_index 9999", raw("POST", "gradio_api/run/predict", json={"data": [], "fn_index": 9999})),
        ("100 session ids, one address", flood),
    ]


def one_line(text: str, n: int = 90) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[:n] + "…"


def short_requests(url: str, source: str, until: float, out: list, errors: list) -> None:
    body = json.dumps({"data": ["The capital of France is", 4, 4]}).encode()
    while time.monotonic() < until:
        t0 = time.monotonic()
        try:
            event, data = post_call(url, "denoise", body, source=source, timeout=600)
        except Exception as e:  # noqa: BLE001
            event, data = "exception", repr(e)
        if event == "complete":
            out.append(time.monotonic() - t0)
        else:
            errors.append(one_line(f"{event}: {data}", 80))
            time.sleep(0.5)


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(round(q / 100 * len(s) + 0.5)) - 1))] if s else float("nan")


def main(argv: Optional[Sequence[str]] = None) -> dict:
    p = argparse.ArgumentParser(prog="bench.server_probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="default: the playground's default DLM")
    p.add_argument("--tiny", action="store_true", help="a tiny random model instead (built in a temp folder)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of mixed load in part 2 (default 60)")
    p.add_argument("--port", type=int, default=7871)
    p.add_argument("--time-limit", type=float, default=30.0, help="the server's --time-limit (default 30)")
    p.add_argument("--skip", default="", help="comma-separated hostile request names to leave out")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--repo", type=Path, default=REPO, help="the checkout whose app.py is probed (default: this one)")
    args = p.parse_args(argv)
    model = args.model
    tmp = None
    if args.tiny:
        tmp = tempfile.TemporaryDirectory()
        model = str(tiny_model(Path(tmp.name)))
    server = Server(model, args.port, args.time_limit, args.repo)
    out: dict = dict(model=model or "default", duration=args.duration, rows=[])
    try:
        server.wait()
        url = server.url
        poller = Poller(url)
        poller.thread.start()
        time.sleep(2.0)
        poller.mark()
        time.sleep(3.0)
        out["idle_stall_s"] = round(poller.window, 3)
        out["rss_start_mb"] = round(rss_mb(server.proc.pid), 1)
        print(f"idle: poller worst {out['idle_stall_s']:.3f} s; server RSS {out['rss_start_mb']:.0f} MB", flush=True)
        skip = {s.strip() for s in args.skip.split(",") if s.strip()}
        requests = [(n, f) for n, f in hostile_requests(url) if n not in skip]
        print(f"{'hostile request':32s} {'answer':>10s} {'s':>6s} {'stall s':>8s}  first words", flush=True)
        for name, send in requests:
            poller.mark()
            t0 = time.monotonic()
            try:
                status, text = send()
            except Exception as e:  # noqa: BLE001
                status, text = "exception", repr(e)
            seconds = time.monotonic() - t0
            time.sleep(0.5)
            row = dict(request=name, answer=status, seconds=round(seconds, 2), stall_s=round(poller.window, 3),
                       text=one_line(text), rss_mb=round(rss_mb(server.proc.pid), 1))
            out["rows"].append(row)
            print(f"{name:32s} {status:>10s} {seconds:6.2f} {row['stall_s']:8.3f}  {row['text']}", flush=True)
        # part 2: mixed load
        poller.mark()
        until = time.monotonic() + args.duration
        latencies: list[float] = []
        errors: list[str] = []
        goods = [threading.Thread(target=short_requests, args=(url, src, until, latencies, errors), daemon=True)
                 for src in (GOOD_A, GOOD_B)]
        for t in goods:
            t.start()
        rss = [rss_mb(server.proc.pid)]
        cycle = [f for n, f in requests if n != "100 session ids, one address"]
        hostile_sent = 0

        def hostile_loop():
            nonlocal hostile_sent
            k = 0
            while time.monotonic() < until and cycle:
                try:
                    cycle[k % len(cycle)]()
                except Exception:  # noqa: BLE001
                    pass
                hostile_sent += 1
                k += 1
                time.sleep(0.2)
        h = threading.Thread(target=hostile_loop, daemon=True)
        h.start()
        while time.monotonic() < until:
            time.sleep(1.0)
            rss.append(rss_mb(server.proc.pid))
        for t in (*goods, h):
            t.join(max(60.0, args.time_limit * 3))
        out["mixed"] = dict(seconds=args.duration, well_formed_answered=len(latencies), well_formed_failed=len(errors),
                            failures=sorted(set(errors))[:5], latency_p50_s=round(percentile(latencies, 50), 2),
                            latency_p95_s=round(percentile(latencies, 95), 2), poller_worst_stall_s=round(
                                poller.window, 3), hostile_sent=hostile_sent, rss_start_mb=round(rss[0], 1),
                            rss_max_mb=round(max(rss), 1), rss_end_mb=round(rss[-1], 1),
                            rss_by_minute_mb=[round(r) for r in rss[::60]])
        out["server_tracebacks"] = server.tracebacks()
        print(json.dumps(out["mixed"], indent=1), flush=True)
        print(f"tracebacks in the server log: {out['server_tracebacks']}", flush=True)
        poller.stop_.set()
        poller.thread.join(10)
    finally:
        server.stop()
        if tmp is not None:
            tmp.cleanup()
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
