"""Issue 31 ("Reliability 4"): no request can take the machine's memory, the queue, or the user's browser origin.
One test (or a few) per defect, each failing before its fix; a server on a random port of 127.0.0.1 with the tiny
random model, clients sending from 127.0.0.2 / 127.0.0.3 where the address matters."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

import pytest
from helpers import slow_model

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"

import httpx  # noqa: E402
from gradio_client import Client  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    from app import ui
    demo = ui.build(model=str(tiny_llama_dir), device="cpu", dtype="float32", max_new_tokens=128)
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    yield demo, url
    demo.close()


def http(source: str = "127.0.0.1", timeout: float = 60) -> httpx.Client:
    """An HTTP client sending from `source` (any 127.0.0.x is this machine)."""
    return httpx.Client(transport=httpx.HTTPTransport(local_address=source), timeout=timeout)


def call(url: str, endpoint: str, body, source: str = "127.0.0.1", timeout: float = 120) -> tuple[str, object]:
    """A raw REST call (POST, then the event stream to its end): ("complete" / "error", payload), or
    ("http <status>", detail) when the POST itself is refused."""
    with http(source, timeout) as h:
        r = h.post(f"{url}gradio_api/call/{endpoint}", content=json.dumps(body),
                   headers={"Content-Type": "application/json"})
        if r.status_code != 200:
            return f"http {r.status_code}", r.json().get("detail")
        event = None
        with h.stream("GET", f"{url}gradio_api/call/{endpoint.removeprefix('v2/')}/{r.json()['event_id']}") as s:
            for line in s.iter_lines():
                if line.startswith("event:"):
                    event = line.split(":", 1)[1].strip()
                elif line.startswith("data:") and event in ("complete", "error"):
                    return event, json.loads(line.split(":", 1)[1].strip())
    return str(event), None


def wait_until(cond, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


class Stall:
    """A well-behaved client polling GET /config every 20 ms from 127.0.0.3: the worst latency it saw."""

    def __init__(self, url: str):
        self.url, self.worst, self._stop = url, 0.0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        with http("127.0.0.3", 30) as h:
            while not self._stop.is_set():
                t0 = time.monotonic()
                h.get(f"{self.url}config")
                self.worst = max(self.worst, time.monotonic() - t0)
                time.sleep(0.02)

    def __enter__(self):
        self.thread.start()
        time.sleep(0.2)
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self.thread.join(10)


# ------------------------------------------------------------------------ 1. the cost bounded before allocation
def test_the_length_is_bounded_by_the_server_before_any_block_list_or_canvas(tiny_llama_dir):
    """Before: max_new_tokens 8000 passed every check on a long-context model (RSS +12 GB), and 200000000 / 2**63
    with the blocks decoder built a block list first (6.7 s, +3.1 GB, or MemoryError)."""
    from app.backend import Backend
    b = Backend(max_new_tokens=64)
    b.load(str(tiny_llama_dir), device="cpu", dtype="float32")
    with pytest.raises(ValueError, match=r"max_new_tokens: 100 is over this server's limit of 64 new tokens per "
                                         r"request \(dlm-studio --max-new-tokens\)"):
        b.sampler(dict(max_new_tokens=100, steps=1, decoder="full", block_length=0))
    for n in (200_000_000, 2**63, 1e308, "1e308"):
        tracemalloc.start()
        t0 = time.monotonic()
        with pytest.raises(ValueError, match=r"^max_new_tokens: .* is over this server's limit of 64"):
            b.sampler(dict(max_new_tokens=n, decoder="blocks", block_length=4, steps=1))
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert time.monotonic() - t0 < 0.5 and peak < 1 << 20, (n, peak)
    fill = b.sampler(task="infill")
    with pytest.raises(ValueError, match=r"template: its spans hold 100 tokens, beyond this server's limit of 64"):
        b.infill(fill, template="a [MASK:40] b [MASK:60]")
    with pytest.raises(ValueError, match=r"template: the span \[MASK:100\] at position 2 is over this server's limit "
                                         r"of 64 new tokens per request \(dlm-studio --max-new-tokens\)"):
        b.infill(fill, template="a [MASK:100] b")
    with pytest.raises(ValueError, match=r"length: 100 is over this server's limit of 64"):
        b.infill(fill, prefix="a", suffix="b", length=100)
    with pytest.raises(ValueError, match=r"span lengths: 65 is over this server's limit of 64"):
        b.infill_sweep(fill, [2, 65], template="a [MASK] b")
    assert b.sampler(dict(max_new_tokens=64, steps=64)).max_new_tokens == 64  # the limit itself is allowed


def test_a_hundred_byte_request_cannot_ask_for_a_huge_canvas(server):
    url = server[1]
    event, data = call(url, "v2/denoise", {"prompt": "Hi", "max_new_tokens": 8000, "steps": 1, "decoder": "full",
                                           "block_length": 0})
    assert event == "error" and data["error"].startswith("max_new_tokens: 8000 is over this server's limit of 128")
    event, data = call(url, "v2/denoise", {"prompt": "Hi", "max_new_tokens": 2**63, "decoder": "blocks",
                                           "block_length": 4})
    assert event == "error" and "over this server's limit of 128 new tokens" in data["error"]


# ------------------------------------------------------------------------ 2. body caps, parsing off the event loop
def chunked(body: bytes, size: int = 1 << 16):
    for i in range(0, len(body), size):
        yield body[i:i + size]


def test_a_chunked_body_is_capped_on_the_bytes_read_per_route(server):
    """Before: the 4 MB cap read Content-Length only; a 12 MB chunked body passed and stalled others 6 s."""
    demo, url = server
    cap = demo.backend.bounds().body_bytes
    big = b'{"data": ["' + b"x" * (cap + 10) + b'"]}'
    with http() as h:
        for path in ("gradio_api/call/denoise", "gradio_api/queue/join", "gradio_api/run/predict"):
            r = h.post(f"{url}{path}", content=chunked(big), headers={"Content-Type": "application/json"})
            assert r.status_code == 413 and f"limit of {cap} bytes" in r.json()["detail"], (path, r.text[:200])
        # every other route: 64 KB
        r = h.post(f"{url}gradio_api/component_server", content=chunked(b"{" + b" " * (70 << 10) + b"}"),
                   headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and "limit of 65536 bytes" in r.json()["detail"]
    assert cap < 1 << 20  # sized to the largest real request (four text fields at their bound), not 4 MB


def test_big_lists_and_deep_nesting_are_refused_without_stalling_others(server):
    """Before: 1.3M empty lists in `edits` stalled every other client 6.9 s; JSON nested 10,000 deep was a 500."""
    demo, url = server
    cap = demo.backend.bounds().body_bytes
    many = b'{"data": ["Hi", [1, 2], [' + b"[]," * ((cap - 100) // 3) + b'[]]]}'
    deep = b'{"data": [' + b"[" * 10_000 + b"]" * 10_000 + b"]}"
    with Stall(url) as idle:  # this machine's own noise (a shared CPU): the same client with nothing hostile
        time.sleep(2.0)
    with Stall(url) as stall, http() as h:
        for body in (many, deep, many):
            r = h.post(f"{url}gradio_api/call/redenoise", content=chunked(body),
                       headers={"Content-Type": "application/json"})
            assert r.status_code in (400, 422), r.text[:300]
            detail = r.json()["detail"]
            assert detail.startswith("request body: ") and len(detail) < 200
    # The regression was a stall of seconds (6.9 s); the 0.5 s target is bench.server_probe's, on a quiet machine. A
    # shared test machine stalls a client ~0.5 s on its own now and then, so the bound here leaves room for that.
    assert stall.worst < max(1.0, 2 * idle.worst), f"another client waited {stall.worst:.2f} s (idle: " \
                                                   f"{idle.worst:.2f} s)"
    for path in ("gradio_api/queue/join", "gradio_api/call/v2/denoise"):
        r = httpx.post(f"{url}{path}", content=deep, headers={"Content-Type": "application/json"}, timeout=30)
        assert r.status_code == 422 and "nested deeper than 16 levels" in r.json()["detail"]


# ---------------------------------------------------------------------------- 3. fairness per client address
def test_new_session_ids_do_not_make_one_address_many_clients(server):
    """Before: one client sending many session ids filled the queue ("the server is busy") and another client's
    short request was refused. Now its waiting work is bounded per address and the other client is served."""
    demo, url = server
    outcomes: list = []

    def flood(i):
        outcomes.append(call(url, "denoise", {"data": ["A long story:", 64, 64], "session_hash": f"flood{i}"},
                             source="127.0.0.2", timeout=300))

    with slow_model(demo.backend, 0.01):
        threads = [threading.Thread(target=flood, args=(i,), daemon=True) for i in range(24)]
        for t in threads:
            t.start()
        wait_until(lambda: demo.backend.worker.active is not None)
        time.sleep(1.0)
        assert demo.backend.worker.waiting(client="127.0.0.2") <= demo.backend.worker.per_client
        t0 = time.monotonic()
        event, data = call(url, "denoise", {"data": ["Hello", 2, 2]}, source="127.0.0.3")
        assert event == "complete" and data[0]["done"], data
        assert time.monotonic() - t0 < 30
        for t in threads:
            demo.backend.stop(None)
        for run in list(demo.backend.worker._waiting) + [demo.backend.worker.active]:
            if run is not None:
                run.cancel()
        for t in threads:
            t.join(120)
    refused = [d for e, d in outcomes if e != "complete" and "queue:" in json.dumps(d)]
    assert refused, outcomes[:3]  # the flood's surplus was refused, with the queue's message


def test_a_flood_s_surplus_is_refused_at_the_gate_while_another_address_gets_through():
    """Before: the gate counted only events already in Gradio's queue, so 100 requests sent at once from one address
    all passed it while the first ones were still on their way in (each then building a session on the event loop),
    and other clients stalled 3.6-5.7 s. Now requests between the gate and Gradio's queue count too: the flood's
    surplus is refused before its body is read, and another address's request still gets through."""
    import asyncio
    import inspect

    from app.http_guard import ApiGuard

    async def main():
        release, reached = asyncio.Event(), []

        async def gradio(scope, receive, send):  # holds every request it is given, as a slow route would
            reached.append(scope["client"][0])
            await release.wait()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"{}"})

        prompt = inspect.Parameter("prompt", inspect.Parameter.POSITIONAL_OR_KEYWORD)
        guard = ApiGuard(gradio, {"denoise": inspect.Signature([prompt])}, per_client_events=10)

        def client(address):
            return httpx.AsyncClient(transport=httpx.ASGITransport(guard, client=(address, 1234)),
                                     base_url="http://127.0.0.1")

        async with client("127.0.0.2") as flood, client("127.0.0.3") as other:
            body = {"content": b'{"data": ["Hi"]}', "headers": {"Content-Type": "application/json"}}
            sent = [asyncio.ensure_future(flood.post("/gradio_api/call/denoise", **body)) for _ in range(40)]
            while len(reached) < 10 and not any(t.done() for t in sent):
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.2)
            refused = [t.result() for t in sent if t.done()]
            mine = asyncio.ensure_future(other.post("/gradio_api/call/denoise", **body))
            while "127.0.0.3" not in reached and not mine.done():
                await asyncio.sleep(0.01)
            release.set()
            answers = await asyncio.gather(*sent, mine)
        return reached, refused, answers

    reached, refused, answers = asyncio.run(main())
    assert reached.count("127.0.0.2") == 10, reached  # the address's bound, however many session ids it sends
    assert len(refused) == 30 and all(r.status_code == 429 for r in refused), [r.status_code for r in refused]
    assert "requests from your address" in refused[0].json()["detail"]
    assert "127.0.0.3" in reached and answers[-1].status_code == 200  # another address is not held back


def test_a_new_session_id_costs_no_copy_of_every_component(server):
    """Before: each new session id (and each REST call without one) made Gradio copy every component's config, on
    the event loop: ~50 ms and ~0.5 MB a session, kept for up to 10,000 sessions. The copy serves only deep links,
    which this app has none of: their route is closed."""
    demo, url = server
    event, data = call(url, "denoise", {"data": ["Hi", 2, 2], "session_hash": "lean-1"}, source="127.0.0.2")
    assert event == "complete", data
    assert "lean-1" in demo.state_holder
    tracemalloc.start()
    demo.state_holder["lean-2"]  # what a request with a new session id makes
    size = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert size < 64 << 10, size
    r = httpx.get(f"{url}gradio_api/deep_link", params={"session_hash": "lean-1"}, timeout=30)
    assert r.status_code == 404 and r.json()["detail"] == "deep links: this app has none"


def test_a_trusted_proxy_s_forwarded_address_is_the_client():
    from app.http_guard import Proxies

    def scope(peer, forwarded=None):
        return {"client": (peer, 1234), "headers": [(b"x-forwarded-for", forwarded.encode())] if forwarded else []}

    none, proxy = Proxies(), Proxies(["127.0.0.1", "10.0.0.0/8"])
    assert none.client(scope("127.0.0.1", "1.2.3.4")) == "127.0.0.1"  # nobody trusted: the header means nothing
    assert proxy.client(scope("127.0.0.1", "9.9.9.9, 1.2.3.4, 10.1.2.3")) == "1.2.3.4"  # the last untrusted hop
    assert proxy.client(scope("192.168.1.5", "1.2.3.4")) == "192.168.1.5"  # not a trusted proxy
    assert proxy.client(scope("127.0.0.1")) == "127.0.0.1"
    from app import launch
    assert launch.parse_args(["--trusted-proxies", "127.0.0.1, 10.0.0.0/8"]).trusted_proxies == \
        ["127.0.0.1", "10.0.0.0/8"]
    with pytest.raises(SystemExit):
        launch.parse_args(["--trusted-proxies", "not-an-address"])


# ------------------------------------------------------------------------------- 4. Host allow-list, uploads
def test_requests_for_another_host_name_are_refused(server):
    """Before: `Host: evil.example` was served, /call/denoise included (DNS rebinding)."""
    url = server[1]
    port = url.rstrip("/").rsplit(":", 1)[1]
    with http() as h:
        for method, path in (("GET", ""), ("GET", "config"), ("POST", "gradio_api/call/denoise")):
            r = h.request(method, f"{url}{path}", headers={"Host": f"evil.example:{port}"}, json={"data": ["Hi"]})
            assert r.status_code == 403 and "'evil.example' is not a name this server answers to" in r.text
        for name in ("127.0.0.1", "localhost", "LOCALHOST."):
            assert h.get(f"{url}config", headers={"Host": f"{name}:{port}"}).status_code == 200
    from app.http_guard import Hosts
    hosts = Hosts("127.0.0.1", ["studio.lan"])
    assert hosts.allows("studio.lan:7860") and hosts.allows("[::1]:7860") and not hosts.allows("evil.example")
    assert not hosts.allows("192.168.1.5:7860")
    lan = Hosts("0.0.0.0")
    assert lan.allows("192.168.1.5:7860") and lan.allows("[fe80::1]:7860") and not lan.allows("evil.example")
    from app import launch
    assert launch.parse_args(["--allowed-hosts", "studio.lan,box"]).allowed_hosts == ["studio.lan", "box"]


def test_the_upload_route_is_closed_and_nothing_is_written(server):
    """Before: any page wrote 30 MB into /tmp/gradio in 0.6 s (multipart needs no CORS preflight)."""
    from gradio.utils import get_upload_folder
    url = server[1]
    folder = Path(get_upload_folder())
    before = {p for p in folder.rglob("*")} if folder.exists() else set()
    with http() as h:
        for path in ("gradio_api/upload", "upload"):
            r = h.post(f"{url}{path}", files={"files": ("a.txt", b"x" * 1000)},
                       headers={"Origin": "http://evil.example"})
            assert r.status_code == 403 and "accepts no uploads" in r.json()["detail"]
    after = {p for p in folder.rglob("*")} if folder.exists() else set()
    assert after == before


# ------------------------------------------------------------------------------- 5. cancel one queued job
def test_cancelling_a_queued_job_leaves_the_running_job_of_the_same_client(server):
    """Before: job.cancel() on the waiting job cancelled every running event of that session on that endpoint:
    the running job was killed and its client waited forever."""
    demo, url = server
    c = Client(url, verbose=False)
    with slow_model(demo.backend, 0.01):
        running = c.submit("A long story:", 24, 24, api_name="/denoise")
        wait_until(lambda: demo.backend.worker.active is not None)
        queued = c.submit("Hello", 4, 4, api_name="/denoise")
        wait_until(lambda: demo.backend.worker.waiting(c.session_hash) == 1)
        queued.cancel()
        wait_until(lambda: demo.backend.worker.waiting(c.session_hash) == 0)
    out = running.result(timeout=60)
    assert out["done"] is True and len(out["token_ids"]) == 24


# -------------------------------------------------------------------------------------- 6. no 500s
HUGE = ["1e308", "1" + "0" * 400]  # as JSON number literals: a float at the edge, an integer past float's range


@pytest.mark.parametrize("field", ["max_new_tokens", "block_length", "temperature", "top_p", "threshold", "seed",
                                   "steps", "top_k"])
def test_huge_numbers_are_one_line_messages_naming_the_field(server, field, caplog):
    """Before: 1e308 or 10**400 in these fields was "internal error (OverflowError)"."""
    url = server[1]
    for literal in HUGE:
        body = f'{{"prompt": "Hi", "{field}": {literal}}}'.encode()
        with http() as h:
            r = h.post(f"{url}gradio_api/call/v2/denoise", content=body, headers={"Content-Type": "application/json"})
            assert r.status_code == 200, r.text[:200]
            event_id = r.json()["event_id"]
            text = h.get(f"{url}gradio_api/call/denoise/{event_id}").text
        assert "event: error" in text and f'"{field}: ' in text and "internal error" not in text, text[:300]
        assert len(text) < 600
    assert not [r for r in caplog.records if r.exc_info]


def test_unknown_routes_fn_indexes_mask_digits_and_dropdown_values_are_4xx_without_tracebacks(server, capfd):
    """Before: /run/nope, /api/nope and /run/predict {"fn_index": 9999} were 500s with a traceback; `[MASK:<5000
    digits>]` got Python's int-digits message naming no field; a loader name outside the dropdown logged a full
    traceback each time."""
    demo, url = server
    capfd.readouterr()
    with http() as h:
        for path in ("gradio_api/run/nope", "gradio_api/api/nope"):
            r = h.post(f"{url}{path}", json={"data": []})
            assert r.status_code == 404 and "unknown endpoint /nope" in r.json()["detail"]
        r = h.post(f"{url}gradio_api/run/predict", json={"data": [], "fn_index": 9999})
        assert r.status_code == 404 and r.json()["detail"] == "fn_index: 9999 is not an event of this app"
        index = next(i for i, fn in demo.fns.items() if getattr(fn.fn, "__name__", "") == "load_model")
        for _ in range(3):
            r = h.post(f"{url}gradio_api/queue/join",
                       json=dict(data=["/etc/passwd", "", "", "", -1, "none", "cpu", "float32"], fn_index=index,
                                 session_hash="probe", event_data=None, trigger_id=None))
            assert r.status_code == 422 and r.json()["detail"].startswith("Registry model: '/etc/passwd' is not one "
                                                                          "of its choices ('smollm2-135m', ")
    event, data = call(url, "infill", {"data": ["a [MASK:" + "9" * 5000 + "] b"]})
    assert event == "error" and data["error"].startswith("template: the span [MASK:") and len(data["error"]) < 300
    err = capfd.readouterr().err
    assert "Traceback" not in err, err[-2000:]


# ----------------------------------------------------------------------- 7. text out, short messages
def test_temperature_is_zero_or_at_least_the_minimum_and_output_is_text(server):
    """Before: temperature 5e-324 (or 1e-300) "finished" with mask tokens."""
    demo, url = server
    c = Client(url, verbose=False)
    for t in (5e-324, 1e-300, 1e-4, 1e9):
        event, data = call(url, "v2/denoise", {"prompt": "Hi", "max_new_tokens": 4, "steps": 4, "temperature": t})
        assert event == "error" and data["error"].startswith("temperature: must be 0 (greedy) or between 0.001 and 100")
    out = c.predict("Hi", 6, 6, temperature=1e-3, seed=1, api_name="/denoise")
    mask = demo.backend.model.mask_token_id
    assert out["done"] and mask not in out["token_ids"] and "<|mask|>" not in out["text"]


def test_messages_quote_a_short_excerpt_of_the_input(server):
    """Before: a 3.8 MB list sent as the prompt got a 5.7 MB error echoing it."""
    url = server[1]
    event, data = call(url, "denoise", {"data": [["x" * 1000] * 400, 4, 4]})  # 400 KB, within the body cap
    assert event == "error" and data["error"].startswith("prompt: must be text, got ['xxxx")
    assert len(data["error"]) < 200
    event, data = call(url, "denoise", {"data": ["Hi", "9" * 5000]})
    assert event == "error" and data["error"].startswith("max_new_tokens: must be an integer") and \
        len(data["error"]) < 200


# ------------------------------------------------------------------------------------------- 8. no litter
def test_sigterm_removes_the_export_and_gradio_temp_folders(tiny_llama_dir):
    """Before: /tmp/dlm-studio-exports-<pid> and /tmp/gradio stayed after SIGTERM."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "GRADIO_TEMP_DIR"} | {"HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "app.py", "--model", str(tiny_llama_dir), "--port", str(port),
                             "--device", "cpu"], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    tmp = Path(tempfile.gettempdir())
    exports, gradio_dir = tmp / f"dlm-studio-exports-{proc.pid}", tmp / f"dlm-studio-gradio-{proc.pid}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, f"app.py exited: {proc.stderr.read()[-2000:]}"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/config", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "app.py did not start serving within 180 s"
            time.sleep(0.5)
        for d in (exports, gradio_dir):  # what an export and Gradio's file cache leave while it serves
            (d / "sub").mkdir(parents=True, exist_ok=True)
            (d / "sub" / "file.gif").write_bytes(b"GIF89a")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) is not None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=20)
    assert not exports.exists() and not gradio_dir.exists()


# ----------------------------------------------------------------------------- 9. a second click is no error
def test_four_concurrent_jobs_of_one_client_all_complete(server):
    """Before: an API user submitting 4 jobs at once through one Client got "AppError: queue: replaced by a newer
    request of this session" for the jobs in between (and a browser's second click an "Error" toast)."""
    demo, url = server
    c = Client(url, verbose=False)
    with slow_model(demo.backend, 0.005):
        jobs = [c.submit(f"Prompt {i}", 4 + i, 4 + i, api_name="/denoise") for i in range(4)]
        results = [j.result(timeout=120) for j in jobs]
    assert [len(r["token_ids"]) for r in results] == [4, 5, 6, 7] and all(r["done"] for r in results)


def test_a_queued_request_is_information_and_a_flood_is_refused_as_a_warning(tiny_llama_dir, monkeypatch):
    """The UI side: a request waiting behind the same client's running one says so with gr.Info; one beyond the
    client's bound is refused with gr.Warning, never a gr.Error."""
    import asyncio

    import gradio as gr

    from app import events
    from app.backend import Backend
    from app.worker import Busy, Caller
    shown = []
    monkeypatch.setattr(gr, "Info", lambda m, *a, **k: shown.append(("info", m)))
    monkeypatch.setattr(gr, "Warning", lambda m, *a, **k: shown.append(("warning", m)))
    b = Backend(per_client=1)
    b.load(str(tiny_llama_dir), device="cpu", dtype="float32")
    cfg = b.sampler(dict(max_new_tokens=16, steps=16))
    with slow_model(b, 0.02):
        first = b.generate("A long story:", cfg, session=Caller("tab1", "127.0.0.9"))
        wait_until(lambda: b.worker.active is first)
        second = asyncio.run(events.offload(b.generate, "Hi", cfg, session=Caller("tab2", "127.0.0.9")))
        assert shown and shown[-1][0] == "info" and "Queued" in shown[-1][1]
        with pytest.raises(Busy):
            b.generate("Hi", cfg, session=Caller("tab3", "127.0.0.9"))
        try:
            b.generate("Hi", cfg, session=Caller("tab3", "127.0.0.9"))
        except Busy as e:
            assert events.fail(e) is None  # no gr.Error raised
        assert shown[-1][0] == "warning" and "queue: not started" in shown[-1][1]
        b.stop("tab1"), b.stop("tab2")
    first.wait(), second.wait()
