"""The playground's parts without a server: rendering, throttled streaming, default-model fallback, examples."""
from __future__ import annotations

import os
import time

import pytest

from app import backend as backend_mod
from app import render
from app.backend import Backend, Sampler, parse_int_list, with_span_length
from app.examples import load_examples, parse_example
from dlm.types import Frame, Generation

M = 99  # mask id of the synthetic frames


def _frames() -> list[Frame]:
    # canvas: 2 prompt tokens, 3 generated positions; step 1 reveals pos 3, step 2 reveals pos 2 and 4
    return [
        Frame(step=1, total_steps=2, tokens=[1, 2, M, 13, M], revealed=[3], confidence=[0.9], start=2),
        Frame(step=2, total_steps=2, tokens=[1, 2, 12, 13, 14], revealed=[2, 4], confidence=[0.5, 0.1], start=2),
    ]


def _trace(frames=None) -> render.Trace:
    pieces = {1: "A", 2: " <b>", 12: " x", 13: " y", 14: "\n", 7: " fixed"}
    t = render.Trace(mask_id=M)
    for f in frames or _frames():
        t.add(f, lambda ids: {i: pieces[i] for i in ids})
    return t


# ---------------------------------------------------------------------------------------------- render
def test_token_view_marks_masked_new_and_earlier_tokens():
    t = _trace()
    first, last = t.html(0), t.html(1)
    assert first.count('class="t m"') == 2 and first.count('class="t new"') == 1
    assert 'class="t old"' not in first
    assert last.count('class="t m"') == 0 and last.count('class="t new"') == 2 and last.count('class="t old"') == 1
    assert "&lt;b&gt;" in last and "<b>" not in last  # token text is escaped
    assert "↵" in last  # newlines are made visible
    assert render.confidence_colour(0.9) in first  # coloured by its confidence


def test_counter_reports_the_step_and_masked_count():
    t = _trace()
    assert t.counter(0).startswith("**step 1 / 2**") and "2 still masked" in t.counter(0)
    assert "0 still masked" in t.counter() and "running" in t.counter(running=True)


def test_fixed_tokens_inside_the_generated_region_are_drawn_as_fixed():
    frames = [Frame(step=1, total_steps=1, tokens=[1, 12, 7, 13], revealed=[1, 3], confidence=[0.4, 0.6], start=1)]
    html = _trace(frames).html()
    assert html.count('class="t fx"') == 1 and html.count('class="t new"') == 2


def test_heatmap_holds_each_confidence_at_its_reveal_step():
    fig = _trace().reveal_heatmap()
    z = fig.data[0].z
    assert [list(r) for r in z] == [[None, 0.9, None], [0.5, None, 0.1]]


def test_step_chart_counts_reveals_and_mean_confidence():
    fig = _trace().step_chart()
    bars, line = fig.data
    assert list(bars.y) == [1, 2]
    assert list(line.y) == pytest.approx([0.9, 0.3])


def test_sweep_html_highlights_exactly_the_generated_segments():
    rows = [dict(n=2, nfe=2, seconds=0.1, segments=[("to the", False), (" the the", True), (" <end>", False)])]
    out = render.sweep_html(rows)
    assert out.count('class="t old"') == 1 and '<span class="t old"> the the</span>' in out
    assert "to the" in out and "&lt;end&gt;" in out


def test_compare_chart_draws_dlm_points_and_ar_lines():
    fig = render.compare_chart([dict(steps=4, seconds=0.1, ppl=50.0), dict(steps=8, seconds=0.2, ppl=30.0)],
                               dict(seconds=0.3, ppl=20.0))
    names = [d.name for d in fig.data]
    assert names.count("DLM") == 2 and names.count("AR") == 2
    assert list(fig.data[0].y) == [0.1, 0.2]


# ---------------------------------------------------------------------------------------------- backend helpers
def test_sampler_from_ui_coerces_and_rejects():
    s = Sampler.from_ui(16.0, 8.0, 0, "margin", 0.5, 0.9, 0.0, 0.0, -1)
    assert (s.max_new_tokens, s.steps, s.top_k) == (16, 8, 0)
    kw = s.kwargs()
    assert kw["block_length"] is None and kw["threshold"] is None and kw["seed"] is None
    with pytest.raises(ValueError, match="steps must be a whole number"):
        Sampler.from_ui(16, 2.5, 0, "confidence", 0, 1, 0, 0, 0)


def test_parse_int_list_and_span_rewrite():
    assert parse_int_list("4, 8 16") == [4, 8, 16]
    with pytest.raises(ValueError, match="'x'"):
        parse_int_list("4, x")
    with pytest.raises(ValueError, match="at least one"):
        parse_int_list("  ")
    assert with_span_length("a [MASK] b [MASK:3] c [MASKED]", 5) == "a [MASK:5] b [MASK:5] c [MASKED]"


def _fake_stream(n: int, delay: float):
    def make():
        for i in range(n):
            time.sleep(delay)
            yield Frame(step=i + 1, total_steps=n, tokens=[0], revealed=[0], confidence=[1.0])
        yield Generation(text="done", token_ids=[0])
    return make


def test_throttle_delivers_every_frame_in_few_batches():
    b = Backend(min_frame_interval=0.2)
    batches = list(b._throttled(_fake_stream(200, 0.001), "s"))
    steps = [f.step for batch in batches for f in batch.frames]
    assert steps == list(range(1, 201))  # nothing lost, in order
    assert len(batches) <= 4  # ~0.2-0.4 s of frames at one batch per 0.2 s
    assert len(batches[0].frames) == 1  # the first frame goes out alone, at once
    assert batches[-1].result is not None and batches[-1].result.text == "done"


def test_slow_streams_get_one_batch_per_frame():
    b = Backend(min_frame_interval=0.01)
    batches = list(b._throttled(_fake_stream(5, 0.05), "s"))
    assert [len(x.frames) for x in batches[:5]] == [1, 1, 1, 1, 1]


def test_stop_and_closing_the_consumer_stop_the_worker():
    b = Backend(min_frame_interval=0.0)
    produced = []

    def make():
        for i in range(1000):
            time.sleep(0.005)
            produced.append(i)
            yield Frame(step=i + 1, total_steps=1000, tokens=[0], revealed=[0], confidence=[1.0])

    it = b._throttled(make, "sess")
    next(it)
    assert b.stop("sess") and not b.stop("other")
    rest = list(it)
    assert rest and rest[-1].cancelled
    assert len(produced) < 1000
    # closing the generator (what Gradio does on cancel) also stops the worker and releases the lock
    it = b._throttled(make, "sess2")
    next(it)
    it.close()
    assert b.lock.acquire(timeout=5)
    b.lock.release()


def test_worker_errors_reach_the_consumer():
    def make():
        raise ValueError("steps must be between 1 and 8")
        yield  # pragma: no cover

    with pytest.raises(ValueError, match="steps must be"):
        list(Backend()._throttled(make, None))


def test_describe_error_gives_one_line_messages():
    assert backend_mod.describe_error(ValueError("bad steps")) == "bad steps"
    assert "Out of memory" in backend_mod.describe_error(RuntimeError("CUDA out of memory. Tried to allocate"))


# ---------------------------------------------------------------------------------------------- default model
def test_default_falls_back_to_the_unadapted_base_with_a_notice(monkeypatch, tiny_llama_dir):
    import dlm
    real_load = dlm.load
    calls = []

    def fake_load(source, **kw):
        calls.append(source)
        if source == backend_mod.DEFAULT_DLM:
            raise dlm.LoadError("adapter_model.safetensors is corrupt")
        assert source == backend_mod.FALLBACK_DLM
        return real_load(tiny_llama_dir, device="cpu", dtype="float32")

    monkeypatch.setattr(backend_mod.dlm, "load", fake_load)
    monkeypatch.setattr(backend_mod.registry, "is_available", lambda name: True)
    b = Backend()
    info = b.load_default()
    assert calls == [backend_mod.DEFAULT_DLM, backend_mod.FALLBACK_DLM]
    assert info.source == backend_mod.FALLBACK_DLM
    assert "not diffusion-adapted yet: output is noise-like" in info.notice
    assert "corrupt" in info.notice
    assert b.ar_model() is b.model  # AR counterpart = the same base weights, no second copy


def test_default_absent_artifact_is_said_without_trying_to_load(monkeypatch, tiny_llama_dir):
    import dlm
    real_load = dlm.load
    calls = []
    monkeypatch.setattr(backend_mod.dlm, "load",
                        lambda source, **kw: calls.append(source) or real_load(tiny_llama_dir, device="cpu"))
    monkeypatch.setattr(backend_mod.registry, "is_available", lambda name: False)
    info = Backend().load_default()
    assert calls == [backend_mod.FALLBACK_DLM]
    assert "not in assets/ yet" in info.notice and "noise-like" in info.notice


def test_quantization_without_bitsandbytes_says_how_to_get_it(monkeypatch):
    monkeypatch.setattr(backend_mod, "bitsandbytes_available", lambda: False)
    with pytest.raises(ValueError, match="pip install bitsandbytes"):
        Backend().load("smollm2-135m", quantization="4bit")


# ---------------------------------------------------------------------------------------------- examples, launcher
def test_shipped_examples_parse_and_cover_the_issue_categories():
    examples = load_examples()
    cats = {e.category for e in examples}
    assert {"arithmetic", "analogy", "sentiment", "translation", "story"} <= cats
    for e in examples:
        assert e.prompt.strip() and 1 <= e.steps <= e.max_new_tokens <= 256


def test_example_parse_errors_name_the_file():
    with pytest.raises(ValueError, match="'x'.*---"):
        parse_example("title: t\nno separator", "x")
    with pytest.raises(ValueError, match="must be integers"):
        parse_example("max_new_tokens: many\n---\nprompt", "y")


def test_launcher_defaults_bind_localhost_and_disable_analytics(monkeypatch):
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location("app_main", Path(__file__).resolve().parent.parent / "app.py")
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "True")
    monkeypatch.delenv("HF_HUB_DISABLE_TELEMETRY", raising=False)
    spec.loader.exec_module(mod)
    args = mod.parse_args([])
    assert (args.host, args.port, args.model, args.quantization, args.share) == ("127.0.0.1", 7860, None, "none",
                                                                              False)
    assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False" and os.environ["HF_HUB_DISABLE_TELEMETRY"] == "1"
    with pytest.raises(SystemExit):
        mod.parse_args(["--quantization", "3bit"])


def test_switching_models_frees_the_old_one(tiny_llama_dir, tiny_gpt2_dir):
    import gc
    import weakref
    b = Backend()
    b.load(str(tiny_llama_dir), device="cpu", dtype="float32")
    old = weakref.ref(b.model)
    info = b.load(str(tiny_gpt2_dir), device="cpu", dtype="float32")
    gc.collect()
    assert old() is None, "the previous model is still referenced after switching"
    assert info.source == str(tiny_gpt2_dir) and info.parameters == b.model.num_parameters() > 0
    assert info.weights_mb > 0 and info.load_seconds > 0
    assert "Parameters" in b.status_markdown() and "process RSS" in b.status_markdown()


def test_infill_sweep_sets_every_span_to_n_and_keeps_the_text(tiny_llama_dir):
    b = Backend()
    b.load(str(tiny_llama_dir), device="cpu", dtype="float32")
    template = "Alice went to the [MASK:4] and bought [MASK] apples."
    rows = b.infill_sweep(template, "", "", [1, 3], Sampler(steps=64), use_template=True)
    assert [r["n"] for r in rows] == [1, 3]
    for r in rows:
        assert len(r["spans"]) == 2 and r["nfe"] == 2 * r["n"]  # steps capped at the masked tokens
        assert r["text"] == f"Alice went to the {r['spans'][0]} and bought {r['spans'][1]} apples."
        assert "".join(t for t, _ in r["segments"]) == r["text"]
        assert [t for t, gen in r["segments"] if gen] == r["spans"]
    rows = b.infill_sweep("", "The sky is", ".", [2], Sampler(steps=64), use_template=False)
    assert rows[0]["text"].startswith("The sky is") and rows[0]["text"].endswith(".") and rows[0]["nfe"] == 2
