"""The playground's parts without a server: rendering, validation, runs (throttling, cancellation, limits),
default-model fallback, examples, launcher flags."""
from __future__ import annotations

import os
import threading
import time

import pytest

from app import model_lifecycle, render
from app.backend import Backend
from app.checks import (
    cap_steps,
    check_fields,
    describe_error,
    parse_int_list,
    sampler_config,
    ui_edit,
    ui_value,
    with_span_length,
)
from app.tabs import TABS
from dlm import SamplerConfig, SamplerConfigError, Task
from dlm.fewshot import answer_of, load_examples, matches, parse_example
from dlm.quality import distinct_n
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


def test_a_speculative_step_shows_its_drafts_kept_rejected_and_new():
    """Forward 1 writes pos 2 and drafts pos 3 and 4; forward 2 keeps the draft at 3, rejects the one at 4 (14)
    and writes 12 there, and drafts pos 5 faintly."""
    frames = [Frame(step=1, total_steps=4, tokens=[1, 2, 12, M, M, M], revealed=[2], confidence=[0.9], start=2,
                    drafts=[[3, 13, 0.8], [4, 14, 0.3]]),
              Frame(step=2, total_steps=4, tokens=[1, 2, 12, 13, 12, M], revealed=[3, 4], confidence=[0.8, 0.5],
                    start=2, accepted=[3], rejected=[[4, 14]], drafts=[[5, 13, 0.1]])]
    t = _trace(frames)
    first, second = t.html(0), t.html(1)
    assert first.count('class="t dr"') == 2 and 'title="pos 3: draft, q=0.80"' in first
    assert 'opacity:0.87' in first and 'opacity:0.54' in first            # fainter for a less probable draft
    assert first.count('class="t m"') == 1                                 # pos 5: nothing drafted yet
    assert second.count('class="t new acc"') == 1 and second.count('class="t rj"') == 1
    assert second.count('class="t dr"') == 1 and "draft kept" in second
    assert "1 draft(s) kept, 1 rejected, 1 new" in t.counter(1) and "1.50 tokens per forward" in t.counter(1)
    assert "1.50 tokens per forward" in t.race_counter(1.0)
    past_end = _trace([Frame(step=1, total_steps=4, tokens=[1, 2, 12], revealed=[2], confidence=[0.9], start=2,
                             drafts=[[3, 13, 0.8], [4, 14, 0.3]])])          # the decoder cuts the canvas at its end
    assert past_end.html().count('class="t dr"') == 2
    plain = _trace()                                                       # other decoders: no draft legend
    assert "rejected" not in plain.html() and "tokens per forward" not in plain.counter()


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
def test_sampler_config_coerces_ui_values_and_rejects():
    s = sampler_config(dict(max_new_tokens=16.0, steps=8.0, block_length=0, remasking="margin", temperature=0.5,
                            top_p=0.9, top_k=0.0, threshold=0.0, seed=-1), SamplerConfig())
    assert (s.max_new_tokens, s.steps, s.top_k) == (16, 8, 0)
    assert s.block_length is None and s.threshold is None and s.seed is None  # the UI's off values
    with pytest.raises(ValueError, match="steps: must be a whole number"):
        sampler_config(dict(max_new_tokens=16, steps=2.5), SamplerConfig())


def test_sampler_config_starts_from_the_models_config_and_names_every_field():
    base = SamplerConfig(decoder="blocks", block_length=4, threshold=0.9, max_new_tokens=32)
    cfg = sampler_config({"temperature": "0.7", "seed": None, "steps": ""}, base)  # None / "" keep base's
    assert (cfg.decoder, cfg.block_length, cfg.threshold, cfg.temperature) == ("blocks", 4, 0.9, 0.7)
    bad = [({"seed": "abc"}, "seed: must be an integer, got 'abc'"),
           ({"seed": 10**30}, "seed: must be an integer between 0 and"),
           ({"steps": float("nan")}, "steps: must be a finite"),
           ({"temperature": "abc"}, "temperature: must be a number, got 'abc'"),
           ({"threshold": 2}, r"threshold: must be in \(0, 1\] \(or 0 = off\)"),  # the UI's off, not "None"
           ({"steps": 0}, "steps: must be an integer >= 1"),                  # a count: no "0 = off"
           ({"steps": 33}, "steps: must be between 1 and the generation length 32"),
           ({"remasking": "sideways"}, "remasking: must be one of"),
           ({"sideways": 1}, "unknown sampler setting 'sideways'")]
    for values, message in bad:
        with pytest.raises(SamplerConfigError, match=message):
            sampler_config(values, base)
    # infilling: the template fixes the length, steps >= 1 (above the masked tokens they are capped)
    assert sampler_config({"steps": 500}, SamplerConfig(), infill=True).steps == 500
    assert cap_steps(SamplerConfig(steps=500), 14).steps == 14
    with pytest.raises(SamplerConfigError, match="steps: must be an integer >= 1"):
        sampler_config({"steps": 0}, SamplerConfig(), infill=True)


def test_widgets_show_none_as_the_off_value_and_steps_as_the_length():
    cfg = SamplerConfig(max_new_tokens=24)
    assert [ui_value(cfg, n) for n in ("threshold", "seed", "block_length", "steps")] == [0.0, -1, 0, 24]
    assert ui_value(cfg.replace(steps=6), "steps") == 6
    # and back: the widget values give the same config (steps = the length: one token per step, as None)
    back = sampler_config({n: ui_value(cfg, n) for n in ("threshold", "seed", "block_length", "steps")}, cfg)
    assert back.replace(steps=None) == cfg and back.steps_for(24) == cfg.steps_for(24)


def test_check_fields_coerces_by_kind_with_messages_naming_the_field():
    out = check_fields(prompt=None, chat="no", frames=1, length="6", pins="0: Paris; 5:France", sweep_steps="2 4")
    assert out == dict(prompt="", chat=False, frames=True, length=6, pins={0: " Paris", 5: "France"},
                       sweep_steps=[2, 4])
    bad = [(dict(prompt=123), "prompt: must be text, got 123"),
           (dict(chat="maybe"), "chat: must be true or false"),
           (dict(length=2.5), "length: must be a whole number >= 1, got 2.5"),
           (dict(length="abc"), "length: must be a whole number >= 1, got 'abc'"),
           (dict(length=float("nan")), "length: must be a whole number"),
           (dict(pins="Paris"), "pins: write position: word pairs"),
           (dict(pins="-1: x"), "pins position: must be a whole number >= 0"),
           (dict(edits=[[3, 2]]), "edits: each edit needs 0 <= start < end"),
           (dict(token_ids=[1, "x"]), "token_ids: must be a whole number")]
    for values, message in bad:
        with pytest.raises(ValueError, match=message):
            check_fields(**values)
    assert ui_edit(2, 4, 0) == (2, 5, None) and ui_edit("1", 1.0, 3) == (1, 2, 3)
    with pytest.raises(ValueError, match="'to' must be >= 'from'"):
        ui_edit(4, 2, 0)


def test_distinct_2_is_the_one_definition_of_dlm_quality():
    import math
    assert distinct_n("a b c d") == 1.0 and distinct_n("a a a a") == pytest.approx(1 / 3)
    assert math.isnan(distinct_n("single"))


def test_parse_int_list_and_span_rewrite():
    assert parse_int_list("4, 8 16") == [4, 8, 16]
    with pytest.raises(ValueError, match="'x'"):
        parse_int_list("4, x")
    with pytest.raises(ValueError, match="at least one"):
        parse_int_list("  ")
    assert with_span_length("a [MASK] b [MASK:3] c [MASKED]", 5) == "a [MASK:5] b [MASK:5] c [MASKED]"


def _fake_stream(n: int, delay: float):
    def job():
        for i in range(n):
            time.sleep(delay)
            yield "dlm", Frame(step=i + 1, total_steps=n, tokens=[0], revealed=[0], confidence=[1.0])
        yield "dlm", Generation(text="done", token_ids=[0])
    return job


def test_throttle_delivers_every_frame_in_few_batches():
    b = Backend(min_frame_interval=0.2)
    batches = list(b.start(_fake_stream(200, 0.001), "s").batches())
    steps = [f.step for batch in batches for f in batch.frames()]
    assert steps == list(range(1, 201))  # nothing lost, in order
    assert len(batches) <= 4  # ~0.2-0.4 s of frames at one batch per 0.2 s
    assert len(batches[0].frames()) == 1  # the first frame goes out alone, at once
    assert batches[-1].result() is not None and batches[-1].result().text == "done"


def test_slow_streams_get_one_batch_per_frame():
    b = Backend(min_frame_interval=0.01)
    batches = list(b.start(_fake_stream(5, 0.05), "s").batches())
    assert [len(x.frames()) for x in batches[:5]] == [1, 1, 1, 1, 1]


def test_stop_and_closing_the_consumer_stop_the_worker():
    b = Backend(min_frame_interval=0.0)
    produced = []

    def job():
        for i in range(1000):
            time.sleep(0.005)
            produced.append(i)
            yield "dlm", Frame(step=i + 1, total_steps=1000, tokens=[0], revealed=[0], confidence=[1.0])

    it = b.start(job, "sess").batches()
    next(it)
    assert b.stop("sess") and not b.stop("other")
    rest = list(it)
    assert rest and rest[-1].cancelled
    assert len(produced) < 1000
    # closing the generator (a consumer that goes away) also stops the worker and releases the lock
    it = b.start(job, "sess2").batches()
    next(it)
    it.close()
    assert b.worker.lock.acquire(timeout=5)
    b.worker.lock.release()


def test_cancelling_an_async_consumer_cancels_the_run():
    """What Gradio does on Stop / a cancelled client job / a closed tab: cancel the handler's task."""
    import asyncio
    b = Backend(min_frame_interval=0.0)
    started = threading.Event()

    def job():
        started.set()
        for i in range(100000):
            time.sleep(0.005)
            yield "dlm", Frame(step=i + 1, total_steps=100000, tokens=[0], revealed=[0], confidence=[1.0])

    async def consume(run):
        async for _ in run.abatches():
            pass

    async def main():
        run = b.start(job, "a")
        task = asyncio.ensure_future(consume(run))
        await asyncio.sleep(0.2)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return run

    run = asyncio.run(main())
    assert started.is_set() and run.cancel_event.is_set()
    run.thread.join(timeout=5)
    assert not run.thread.is_alive()


def test_worker_errors_reach_the_consumer():
    def job():
        raise ValueError("steps must be between 1 and 8")
        yield  # pragma: no cover

    with pytest.raises(ValueError, match="steps must be"):
        list(Backend().start(job, None).batches())


def test_the_time_limit_stops_a_run_with_a_message_naming_it():
    def job():
        for i in range(1000):
            time.sleep(0.01)
            yield "dlm", Frame(step=i + 1, total_steps=1000, tokens=[0], revealed=[0], confidence=[1.0])

    b = Backend(time_limit=0.2)
    t0 = time.monotonic()
    batches = list(b.start(job, None).batches())
    assert time.monotonic() - t0 < 5
    # issue 25: it ends like a Stop, with the message, and keeps what it delivered (a partial canvas to export)
    assert batches[-1].cancelled
    assert batches[-1].reason.startswith("time limit: ") and \
        "limit of 0.2 s per request (dlm-studio --time-limit)" in batches[-1].reason
    assert sum(len(x.frames()) for x in batches) >= 5


def test_describe_error_gives_one_line_messages():
    assert describe_error(ValueError("bad steps")) == "bad steps"
    assert "Out of memory" in describe_error(RuntimeError("CUDA out of memory. Tried to allocate"))
    # internal errors: the type and "server log", never Python's own text
    message = describe_error(AttributeError("'int' object has no attribute 'strip'"))
    assert "strip" not in message and "internal error (AttributeError)" in message


# ---------------------------------------------------------------------------------------------- default model
def test_default_falls_back_to_the_unadapted_base_with_a_notice(monkeypatch, tiny_llama_dir):
    import dlm
    real_load = dlm.load
    calls = []

    def fake_load(source, **kw):
        calls.append(source)
        if source == model_lifecycle.DEFAULT_DLM:
            raise dlm.LoadError("adapter_model.safetensors is corrupt")
        assert source == model_lifecycle.FALLBACK_DLM
        return real_load(tiny_llama_dir, device="cpu", dtype="float32")

    monkeypatch.setattr(model_lifecycle.dlm, "load", fake_load)
    monkeypatch.setattr(model_lifecycle.model_registry, "is_available", lambda name: True)
    b = Backend()
    info = b.load_default()
    assert calls == [model_lifecycle.DEFAULT_DLM, model_lifecycle.FALLBACK_DLM]
    assert info.source == model_lifecycle.FALLBACK_DLM
    assert "not diffusion-adapted yet: output is noise-like" in info.notice
    assert "corrupt" in info.notice
    assert b.ar_model() is b.model  # AR counterpart = the same base weights, no second copy


def test_default_absent_artifact_is_said_without_trying_to_load(monkeypatch, tiny_llama_dir):
    import dlm
    real_load = dlm.load
    calls = []
    monkeypatch.setattr(model_lifecycle.dlm, "load",
                        lambda source, **kw: calls.append(source) or real_load(tiny_llama_dir, device="cpu"))
    monkeypatch.setattr(model_lifecycle.model_registry, "is_available", lambda name: False)
    info = Backend().load_default()
    assert calls == [model_lifecycle.FALLBACK_DLM]
    assert "not in assets/ yet" in info.notice and "noise-like" in info.notice


def test_quantization_without_bitsandbytes_says_how_to_get_it(monkeypatch):
    monkeypatch.setattr(model_lifecycle, "bitsandbytes_available", lambda: False)
    with pytest.raises(ValueError, match="pip install bitsandbytes"):
        Backend().load("smollm2-135m", quantization="4bit")


# ---------------------------------------------------------------------------------------------- examples, launcher
def test_shipped_examples_parse_and_cover_the_issue_categories():
    examples = load_examples()
    cats = {e.category for e in examples}
    assert {"arithmetic", "analogy", "sentiment", "translation", "story"} <= cats
    for e in examples:
        assert e.prompt.strip() and 1 <= e.steps <= e.max_new_tokens <= 256


def test_the_scoreboard_mark_reads_the_first_line_as_the_answer():
    assert answer_of("\n cat\nhot is to cold") == "cat"
    assert matches("cat", " Cat.\nmore") and not matches("cat", " category\ncat")
    assert matches("18", " She reads 6 * 3 = 18 pages.\n") and not matches("18", " 180 pages")
    assert not matches("", "anything")


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
    import app.launch
    importlib.reload(app.launch)  # importing the launcher (as app.py does) is what sets the environment
    spec.loader.exec_module(mod)
    args = mod.parse_args([])
    assert (args.host, args.port, args.model, args.quantization, args.share) == ("127.0.0.1", 7860, None, "auto",
                                                                              False)
    assert (args.max_prompt_tokens, args.time_limit) == (1024, 120.0)  # the limits per request
    args = mod.parse_args(["--max-prompt-tokens", "64", "--time-limit", "5"])
    assert (args.max_prompt_tokens, args.time_limit) == (64, 5.0)
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


def test_a_run_draws_with_the_display_of_the_model_it_started_with(tiny_llama_dir, tiny_gpt2_dir, tmp_path):
    """The display context (mask id, special ids, piece decoder, text_of) is captured when a run starts, so a model
    switched afterwards cannot mix its tokenizer into that run's drawing, text or export."""
    b = Backend()
    b.load(str(tiny_llama_dir), device="cpu", dtype="float32")
    llama = b.model
    run = b.generate("Hello", b.sampler(dict(max_new_tokens=4, steps=4)))
    frames = run.wait().frames()
    b.load(str(tiny_gpt2_dir), device="cpu", dtype="float32", mask_token_id=5)  # another mask id
    d = run.display
    assert d.mask_id == llama.mask_token_id != b.model.mask_token_id
    assert set(llama.eos_token_ids) <= d.special
    ids = frames[-1].tokens[frames[-1].start:]
    assert d.text_of(ids) == llama.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    trace = d.trace(run.prompt_tokens)
    for f in frames:
        trace.add(f, d.decode)
    assert trace.mask_id == d.mask_id and trace.partial() and "·" not in trace.partial()
    b.free()  # an export needs no model: the trace holds what the run showed
    files = render.export_animation(trace, str(tmp_path))
    assert [p.rsplit(".", 1)[1] for p in files] == ["gif", "html"]


def test_infill_sweep_sets_every_span_to_n_and_keeps_the_text(tiny_llama_dir):
    b = Backend()
    b.load(str(tiny_llama_dir), device="cpu", dtype="float32")
    template = "Alice went to the [MASK:4] and bought [MASK] apples."
    cfg = b.sampler(dict(steps=64), task="infill")
    rows = b.infill_sweep(cfg, [1, 3], template=template).wait().items("sweep")
    assert [r["n"] for r in rows] == [1, 3]
    for r in rows:
        assert len(r["spans"]) == 2 and r["nfe"] == 2 * r["n"]  # steps capped at the masked tokens
        assert r["text"] == f"Alice went to the{r['spans'][0]} and bought{r['spans'][1]} apples."
        assert all(span.startswith(" ") for span in r["spans"])   # the space before each marker is the span's
        assert "".join(t for t, _ in r["segments"]) == r["text"]
        assert [t for t, gen in r["segments"] if gen] == r["spans"]
    rows = b.infill_sweep(cfg, [2], prefix="The sky is", suffix=".").wait().items("sweep")
    assert rows[0]["text"].startswith("The sky is") and rows[0]["text"].endswith(".") and rows[0]["nfe"] == 2


# ---------------------------------------------------------------------------------------------- limits, hooks
@pytest.fixture(scope="module")
def loaded(tiny_llama_dir):
    b = Backend(max_prompt_tokens=64)
    b.load(str(tiny_llama_dir), device="cpu", dtype="float32")
    return b


def test_a_prompt_over_the_token_limit_is_refused_before_any_model_work(loaded):
    long = "word " * 200
    for call in (lambda: loaded.generate(long, loaded.sampler(dict(max_new_tokens=8, steps=4))),
                 lambda: loaded.infill(loaded.sampler(task="infill"), template=long + "[MASK]"),
                 lambda: loaded.infill(loaded.sampler(task="infill"), prefix=long, suffix="", length=2),
                 lambda: loaded.race(long, loaded.sampler(dict(max_new_tokens=4)))):
        with pytest.raises(ValueError, match=r"tokens is over this server's limit of 64 prompt tokens per request "
                                             r"\(dlm-studio --max-prompt-tokens\)"):
            call()
    with pytest.raises(ValueError, match="far over this server's limit"):
        loaded.generate("x" * 100_000, loaded.sampler(dict(max_new_tokens=8)))
    # huge spans are refused before a canvas is allocated
    with pytest.raises(ValueError, match="beyond the model's context"):
        loaded.infill(loaded.sampler(task="infill"), template="a [MASK:100000000]")
    with pytest.raises(ValueError, match="length: 100000000 is beyond the model's context"):
        loaded.infill(loaded.sampler(task="infill"), prefix="a", length=10**8)


def test_stop_ends_even_one_long_forward_within_a_layer(loaded):
    """The layer hooks check the cancel event: a slow forward (here: every layer sleeps) stops after one layer."""
    import torch
    layers = [m for lst in loaded.model.base.modules() if isinstance(lst, torch.nn.ModuleList) for m in lst]
    handles = [m.register_forward_pre_hook(lambda *a: time.sleep(0.5)) for m in layers]
    try:
        run = loaded.generate("Hello", loaded.sampler(dict(max_new_tokens=8, steps=8)), session="slow")
        time.sleep(0.3)  # inside the first forward of 8 x len(layers) x 0.5 s
        t0 = time.monotonic()
        assert loaded.stop("slow")
        batches = list(run.batches())
        assert time.monotonic() - t0 < 1.5
        assert batches[-1].cancelled and not any(b.frames() for b in batches)
    finally:
        for h in handles:
            h.remove()


def test_time_to_first_frame_is_measured(loaded):
    s = loaded.time_to_first_frame("Hello", max_new_tokens=16, steps=16)
    assert 0 < s < 30
    run = loaded.generate("Hello", loaded.sampler(dict(max_new_tokens=4, steps=4)))
    run.wait()
    assert 0 < run.first_event_seconds < 30


def test_redenoise_keeps_every_unedited_token(loaded):
    g = loaded.generate("Hello there", loaded.sampler(dict(max_new_tokens=10, steps=10))).wait().result()
    ids = loaded.prompt_ids("Hello there")
    run = loaded.redenoise(ids + g.token_ids, len(ids), [(2, 5, 2)], loaded.sampler(task="infill"))
    new = run.wait().result().token_ids
    assert new[:len(ids) + 2] == ids + g.token_ids[:2] and new[len(ids) + 4:] == g.token_ids[5:]
    assert len(new) == len(ids) + 9
    with pytest.raises(ValueError, match="edits: span 8..12 is outside the 10 generated tokens"):
        loaded.redenoise(ids + g.token_ids, len(ids), [(8, 12, None)], loaded.sampler(task="infill"))


def test_the_race_takes_turns_by_model_time_and_reports_quality(loaded):
    batch = loaded.race("Once upon a time", loaded.sampler(dict(max_new_tokens=6, steps=6)),
                        sweep_steps="2, 3").wait()
    lanes = [lane for lane, _ in batch.events if lane in ("dlm", "ar")]
    assert lanes[:2] == ["dlm", "ar"] or lanes[:2] == ["ar", "dlm"]  # both start: turns, not one after the other
    assert len(batch.frames("dlm")) == 6 and 1 <= len(batch.frames("ar")) <= 6
    summary = batch.result("summary")
    assert summary["winner"] in ("dlm", "ar")
    for side in ("dlm", "ar"):
        assert summary[side]["seconds"] > 0 and summary[side]["gen_ppl"] > 0 and 0 < summary[side]["distinct_2"] <= 1
    assert [r["steps"] for r in batch.items("sweep")] == [2, 3]
    with pytest.raises(ValueError, match="sweep steps: 1 is fewer than the 2 blocks"):
        loaded.race("Hi", loaded.sampler(dict(max_new_tokens=8, block_length=4)), sweep_steps="1")


def test_one_race_state_reads_the_race_for_the_tab_and_the_api(loaded):
    from app.experiments import RaceState
    run = loaded.race("Once upon a time", loaded.sampler(dict(max_new_tokens=4, steps=4)), sweep_steps="2")
    race = RaceState.of(run)
    seen_summary = seen_rows = 0
    for batch in run.batches():
        race.fold(batch)
        seen_summary += race.new_summary
        seen_rows += race.new_rows
    assert seen_summary == 1 and seen_rows == 1 and not race.cancelled
    assert set(race.results) == {"dlm", "ar"} and not race.running("dlm")
    side = race.side("dlm")
    assert side["step"] == side["total_steps"] == 4 and side["seconds"] == race.summary["dlm"]["seconds"]
    assert len(side["partial"]) > 0 and "·" not in side["partial"]
    out = race.result()
    assert out["winner"] in ("dlm", "ar") and [r["steps"] for r in out["sweep"]] == [2]
    assert len(race.traces["dlm"]) == 4 and race.traces["dlm"].prompt_end == run.prompt_tokens


def test_model_tab_status_says_the_limits_and_modes(loaded):
    md = loaded.status_markdown()
    assert "64 prompt tokens" in md and "120 s" in md
    assert "Denoise, In-context and AR vs DLM use the writing config" in md
    assert "**full** decoder (the paper's sampler" in md


def test_scoreboard_marks_every_example_with_an_answer(loaded):
    examples = [e for e in load_examples() if e.name in ("plural", "sentiment")]
    rows = loaded.scoreboard(examples).wait().items("row")
    assert [r["name"] for r in rows] == ["plural", "sentiment"]
    assert all(isinstance(r["dlm_ok"], bool) and isinstance(r["ar_ok"], bool) for r in rows)
    table = render.scoreboard_rows(rows, 2)
    assert table[-1][0] == "accuracy" and table[-1][3].endswith("%)")


def test_scoreboard_and_dlm_eval_incontext_agree(loaded):
    """The In-context scoreboard and `dlm-eval --tasks incontext` run one function (dlm.fewshot.run_example):
    on the same examples and greedy settings, their answers and marks are the same, for the DLM and the AR side;
    an expected answer the model does write is marked right by both, one it does not write wrong by both."""
    from evals.data import ICLExample
    from evals.eval_model import EvalModel, EvalSettings
    from evals.tasks import eval_incontext
    model = loaded.require_model()
    base = loaded.base_config("write").replace(temperature=0.0)
    probe = parse_example("max_new_tokens: 6\nsteps: 6\n---\nThe list: one, two,", "probe")
    from dlm.fewshot import answer_of, run_example
    written = answer_of(run_example(model, probe, base, "dlm")[0]).split()
    assert written, "the tiny model wrote nothing to expect"
    examples = [parse_example(f"expected: {written[0]}\nmax_new_tokens: 6\nsteps: 6\n---\nThe list: one, two,", "hit"),
                parse_example("expected: zzzqqq\nmax_new_tokens: 6\nsteps: 6\n---\nThe list: one, two,", "miss")]
    cfg = model.sampler_config
    model.sampler_config = cfg.replace(temperature=0.0)
    loaded_base = loaded.base_config
    loaded.base_config = lambda task="write": base
    try:
        rows = loaded.scoreboard(examples).wait().items("row")
        for kind in ("dlm", "ar"):
            recs = [eval_incontext(EvalModel(model, EvalSettings(kind=kind)), ICLExample(i, e))
                    for i, e in enumerate(examples)]
            assert [r["pred"] for r in recs] == [r[kind] for r in rows]
            assert [bool(r["acc"]) for r in recs] == [r[f"{kind}_ok"] for r in rows]
        assert [r["dlm_ok"] for r in rows] == [True, False]
    finally:
        model.sampler_config, loaded.base_config = cfg, loaded_base


# ---------------------------------------------------------------------------------------------- widgets
def test_sampler_widgets_are_built_from_describe(tiny_llama_dir):
    """Every UI field of SamplerConfig.describe() becomes a widget (so a new knob needs no app change), starting
    from the model's config; range checks are left to sampler_config (its messages name the field)."""
    import gradio as gr

    from app.tabs.common import KnobSlider, SamplerControls
    cfg = SamplerConfig(decoder="full", max_new_tokens=24, threshold=0.9)
    with gr.Blocks():
        c = SamplerControls("t", cfg)
    names = [d["name"] for d in SamplerConfig.describe() if d.get("ui", True)]
    assert c.names == names and len(c.components) == len(names)
    assert c.by_name["threshold"].value == 0.9 and c.by_name["steps"].value == 24 and c.by_name["seed"].value == -1
    assert c.by_name["decoder"].choices and c.by_name["max_new_tokens"].elem_id == "t-max_new_tokens"
    assert isinstance(c.by_name["temperature"], KnobSlider)
    assert c.by_name["temperature"].preprocess(7.5) == 7.5  # no Gradio range error: sampler_config says it
    assert c.by_name["temperature"].get_block_name() == "slider"
    updates = c.updates(cfg.replace(threshold=None, max_new_tokens=8))
    assert updates[c.names.index("threshold")]["value"] == 0.0 and "Starts from" in updates[-1]


def test_a_single_frame_run_keeps_the_scrub_slider_valid():
    """A one-step run (steps = 1, a single [MASK], Stop in the first step) must not send minimum == maximum."""
    import gradio as gr

    from app.tabs.common import StreamView
    with gr.Blocks():
        view = StreamView("t", plots=False, export=False)
    for frames in ([], _frames()[:1]):
        t = _trace(frames) if frames else render.Trace(mask_id=M)
        g = Generation(text="x", token_ids=[1], nfe=1, seconds=0.1)

        class R:
            first_event_seconds = 0.01
        scrub = view._final(t, g if frames else None, R, None, None, 0)[2]
        assert scrub["visible"] is False and scrub["minimum"] < scrub["maximum"]
        gr.Slider(scrub["minimum"], scrub["maximum"], value=scrub["value"])  # accepted by Gradio


# --------------------------------------------------------------------------------- decoder-aware controls (issue 23)
def test_the_race_sweeps_what_the_decoder_reads_with_defaults_that_fit():
    from app.checks import check_sweep, default_sweep, sweep_field
    from dlm.decoders import DECODERS, decoder
    shipped = SamplerConfig(decoder="speculative", block_length=2, max_new_tokens=64)
    assert sweep_field(shipped) == "block_length" and default_sweep(shipped) == [2, 4, 8]
    blocks = SamplerConfig(decoder="blocks", block_length=2, max_new_tokens=64)
    assert sweep_field(blocks) == "steps" and default_sweep(blocks) == [32, 64]   # at least one step per block
    full = SamplerConfig(max_new_tokens=64)
    assert sweep_field(full) == "steps" and default_sweep(full) == [8, 16, 32, 64]
    for cfg in (shipped, blocks, full):  # every default passes the check the race makes before it runs
        assert check_sweep(", ".join(map(str, default_sweep(cfg))), cfg)[1] == default_sweep(cfg)
    # the issue's first click: a steps sweep 4 .. 32 cannot fit blocks of 2 over 64 tokens; refused, naming it
    with pytest.raises(ValueError, match=r"^sweep steps: 4 is fewer than the 32 blocks"):
        check_sweep("4, 8, 16, 32", blocks)
    with pytest.raises(ValueError, match="sweep: the speculative decoder does not use steps"):
        check_sweep("4", shipped, "steps")
    assert check_sweep("0.5 0.9", shipped, "threshold") == ("threshold", [0.5, 0.9])
    # the choice follows the declaration, not a list of decoder names
    @decoder("only-threshold-test", uses=("threshold",))
    def _only_threshold(run):  # pragma: no cover - never run
        yield from ()
    try:
        cfg = SamplerConfig(decoder="only-threshold-test")
        assert sweep_field(cfg) == "threshold" and default_sweep(cfg) == [0.5, 0.7, 0.9]
    finally:
        DECODERS.remove("only-threshold-test")


def test_an_invalid_combination_is_refused_before_any_work_naming_the_field():
    base = SamplerConfig(decoder="blocks", block_length=2, max_new_tokens=64)
    with pytest.raises(ValueError, match=r"^steps: 4 is fewer than the 32 blocks \(length 64 / block length 2\)"):
        sampler_config({"steps": 4}, base)
    assert sampler_config({"steps": 32}, base).steps == 32
    # a widget the decoder ignores still sends its value: the model's is kept (no note about an ignored setting)
    spec = SamplerConfig(decoder="speculative", block_length=2)
    cfg = sampler_config({"steps": 4, "use_cache": True, "block_length": 4}, spec)
    assert (cfg.steps, cfg.use_cache, cfg.block_length) == (None, False, 4) and not cfg.ignored_settings()


def test_widgets_a_decoder_ignores_are_disabled_with_a_word_why():
    import gradio as gr

    from app.tabs.common import SamplerControls
    from dlm.decoders import DECODERS
    with gr.Blocks():
        c = SamplerControls("t", SamplerConfig(decoder="speculative", block_length=2))
    uses = DECODERS["speculative"].uses
    for d, widget in zip(c.fields, c.components):
        ignored = bool(d.get("per_decoder")) and d["name"] not in uses
        assert (widget.interactive is False) == ignored, d["name"]
        if ignored:
            assert "not used by the speculative decoder" in widget.info
    assert {d["name"] for d, w in zip(c.fields, c.components) if w.interactive is False} == \
        {"steps", "remasking", "use_cache"}
    # switching the decoder re-enables what the new one reads
    ups = dict(zip(c.names, c.usage_updates("full")))
    assert ups["steps"]["interactive"] is True and ups["use_cache"]["interactive"] is True
    assert ups["stop_at_eos"]["interactive"] is False and "full decoder" in ups["stop_at_eos"]["info"]


def test_a_config_is_asked_for_by_task_and_an_unknown_task_is_refused_in_one_line():
    backend = Backend()
    with pytest.raises(ValueError, match=r"^task: must be one of write, infill, denoise, got 'infil'$"):
        backend.base_config("infil")  # refused before asking for a model
    with pytest.raises(ValueError, match="task: must be one of"):
        backend.sampler({}, task="generate")
    assert render.config_origin("infill") == render.config_origin(Task.INFILL)
    assert {t.config for t in TABS} == {*Task, None}  # every task has a tab that starts from it


def test_the_denoise_tab_opens_on_any_order_reveals_for_a_block_wise_model():
    from app.model_lifecycle import denoise_config
    write = SamplerConfig(decoder="speculative", block_length=2, max_new_tokens=64, temperature=0.7)
    shown = denoise_config(write)
    assert shown.decoder == "full" and shown.block_length is None
    assert (shown.max_new_tokens, shown.steps) == (32, 16)  # two tokens per step, short enough for a CPU
    assert shown.temperature == 0.7 and shown.top_p == write.top_p  # the rest is the model's
    full = SamplerConfig(max_new_tokens=24)
    assert denoise_config(full) == full  # already any order: unchanged
    drafted = denoise_config(write, drafts_verified_by_base=True)   # a draft adapter: its own parallel drafts
    assert drafted.decoder == "speculative" and drafted.block_length == 4 and drafted.temperature == 0.7
    from app.tabs.denoise import fast_mode_note

    class B:
        def __init__(self, write):
            self.write = write

        def base_config(self, task="write"):
            return self.write if task == "write" else denoise_config(self.write)
    assert "**speculative** decoder" in fast_mode_note(B(write)) and fast_mode_note(B(full)) == ""


def test_a_race_of_the_speculative_decoder_sweeps_its_block_length(loaded):
    cfg = loaded.sampler(dict(decoder="speculative", block_length=2, max_new_tokens=8))
    rows = loaded.race("Once upon a time", cfg, sweep_steps="2, 4").wait().items("sweep")
    assert [(r["field"], r["value"], r["block_length"]) for r in rows] == [("block_length", 2, 2),
                                                                         ("block_length", 4, 4)]
    labels = render.compare_chart(rows, None).data[0].text
    assert labels[0].startswith("block 2, ")


def test_hard_examples_stay_marked_and_the_tab_opens_on_one_the_model_does_well():
    import gradio as gr

    from app.tabs.incontext import InContextTab
    e = parse_example("title: T\nexpected: x\nhard: missed 3 of 3\n---\nprompt", "t")
    assert e.hard == "missed 3 of 3" and e.label == "T (hard for the shipped model)"
    shipped = load_examples()
    assert any(x.hard for x in shipped) and any(x.expected and not x.hard for x in shipped)

    class B:  # the tab needs only the configs
        def base_config(self, task="write"):
            return SamplerConfig()
    with gr.Blocks():
        tab = InContextTab(B(), [e, parse_example("title: U\n---\neasy", "u")])
    assert tab.prompt.value == "easy" and [s[0] for s in tab.pick.samples][0].endswith("(hard for the shipped model)")


def test_infill_examples_are_scorable_and_the_tab_opens_on_a_good_one():
    """Every shipped Infill template parses, has one expected span per marker (what bench.infill_examples scores
    the fill against), the hard ones say why; the tab opens on a template that is not hard and lists them all."""
    from app.tabs import infill
    from bench.infill_examples import reference_text
    from dlm.fewshot import INFILL_EXAMPLES_DIR
    from dlm.infill import split_template
    shipped = load_examples(INFILL_EXAMPLES_DIR)
    assert len(shipped) >= 4 and any(e.hard for e in shipped) and any(not e.hard for e in shipped)
    for e in shipped:
        spans = [p for _, p in split_template(e.prompt) if isinstance(p, int)]
        expected = e.expected.split("|")
        assert spans and len(expected) == len(spans), e.name
        filled = reference_text(e.prompt, expected)
        assert "[MASK" not in filled and all(x.strip() in filled for x in expected)
    assert reference_text("Go to the [MASK:2] now.", [" shore "]) == "Go to the shore now."
    opening = next(e for e in shipped if e.prompt == infill.TEMPLATE)
    assert not opening.hard
    assert not {e.name for e in shipped} & {e.name for e in load_examples()}    # the In-context list stays apart

    import gradio as gr

    class B:
        def base_config(self, task="write"):
            return SamplerConfig()
    with gr.Blocks():
        tab = infill.InfillTab(B())
    labels = [s[0] for s in tab.pick.samples]
    assert tab.template.value == infill.TEMPLATE and len(labels) == len(shipped)
    assert sum(label.endswith("(hard for the shipped model)") for label in labels) == sum(bool(e.hard) for e in shipped)
