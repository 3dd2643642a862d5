"""Issue 25, without a server: a playground that strangers cannot take over or freeze. Model switching guarded by
the operator's policy, every field bounded by size before any parsing or tokenizing, the AR counterpart loaded and
checked with the DLM, one prompt-token limit everywhere, the worker's fair order (per-session cap, Stop of a queued
run), bounded exports, one-line messages. The server-level checks (REST, fn_index, uploads, 4xx) are in
tests/test_app.py ("security and limits")."""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from app import render
from app.backend import Backend, Prompted
from app.checks import check_fields
from app.model_lifecycle import SwitchPolicy
from app.worker import Worker
from dlm.types import Frame


@pytest.fixture(scope="module")
def b(tiny_llama_dir):
    backend = Backend(max_prompt_tokens=64)
    backend.load(str(tiny_llama_dir), device="cpu", dtype="float32")
    return backend


def never(*_a, **_k):
    raise AssertionError("tokenized / parsed / loaded what it must not")


def only_small(fn):
    """`fn`, failing the test when any argument is big (over 100k items or characters)."""
    def wrapped(*args, **kwargs):
        if any(hasattr(v, "__len__") and len(v) > 100_000 for v in (*args, *kwargs.values())):
            never()
        return fn(*args, **kwargs)
    return wrapped


# ------------------------------------------------------------------------------------------ 1. model switching
def test_switching_is_refused_unless_the_operator_allows_it(tiny_llama_dir, tiny_gpt2_dir):
    b = Backend()
    b.load(str(tiny_llama_dir), device="cpu", dtype="float32")
    loads = b.loads
    with pytest.raises(ValueError, match=r"model switching is off on this server .*--allow-model-switch"):
        b.switch(str(tiny_gpt2_dir), device="cpu", dtype="float32")
    assert b.loads == loads and b.info.source == str(tiny_llama_dir)


def test_the_allow_list_takes_registry_names_and_the_operators_folders_only(tmp_path, tiny_gpt2_dir):
    allowed = tmp_path / "models"
    allowed.mkdir()
    (allowed / "escape").symlink_to("/etc")
    policy = SwitchPolicy(True, (str(allowed),))
    policy.check("model", "smollm2-135m")  # a registry name
    policy.check("model", str(allowed / "my-dlm"))  # inside the folder (whether it exists is dlm.load's business)
    messages = []
    for source in ("/etc", "/no/such/dir", str(allowed / "escape"), str(allowed / ".." / "x"), "org/some-hub-id"):
        with pytest.raises(ValueError) as e:
            policy.check("model", source)
        messages.append(str(e.value).replace(repr(source), "SOURCE"))
    # the same words for a path that exists and one that does not: nothing tells which paths are on the disk
    assert len(set(messages)) == 1 and "neither a registry model nor inside a folder this server allows" in messages[0]
    b = Backend(policy=policy)
    with pytest.raises(ValueError, match="AR model: '/etc' is neither"):
        b.switch("smollm2-135m", ar_source="/etc")
    with pytest.raises(ValueError, match="adapter: "):
        b.switch("smollm2-135m", adapter=str(tiny_gpt2_dir))
    assert b.model is None  # nothing was loaded


def test_the_attention_implementation_reaches_dlm_load_and_the_status(tiny_llama_dir):
    b = Backend(attn_implementation="eager")
    info = b.load(str(tiny_llama_dir), device="cpu", dtype="float32")
    assert info.attn_implementation == "eager" and b.model.attn_implementation == "eager"
    assert "**attention:** eager" in b.status_markdown()


def test_launcher_flags_offline_auth_and_the_exposure_warning(monkeypatch, capsys):
    from app import launch
    args = launch.parse_args([])
    assert (args.allow_model_switch, args.model_dir, args.online, args.auth, args.queue_per_client,
            args.attn_implementation, args.max_file_size) == (False, [], False, None, 4, "auto", "1mb")
    assert launch.exposure_warning(args) == ""
    assert "without --auth" in launch.exposure_warning(launch.parse_args(["--host", "0.0.0.0"]))
    assert launch.exposure_warning(launch.parse_args(["--host", "0.0.0.0", "--auth", "u:p"])) == ""
    with pytest.raises(SystemExit):
        launch.parse_args(["--auth", "nopassword"])
    with pytest.raises(SystemExit):
        launch.parse_args(["--attn-implementation", "fast"])
    # main(): offline unless --online, the policy, the login and the upload bound reach the server
    seen = {}

    class FakeDemo:
        class backend:
            @staticmethod
            def notice():
                return ""

        def launch(self, **kw):
            seen["launch"] = kw

    def fake_build(**kw):
        seen["build"] = kw
        return FakeDemo()

    import app.ui
    monkeypatch.setattr(app.ui, "build", fake_build)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    launch.main(["--host", "0.0.0.0", "--allow-model-switch", "--model-dir", "/srv/models", "--auth", "u:p:w",
                 "--attn-implementation", "eager", "--queue-per-client", "2"])
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert seen["build"]["policy"] == SwitchPolicy(True, ("/srv/models",))
    assert seen["build"]["attn_implementation"] == "eager" and seen["build"]["queue_per_client"] == 2
    assert seen["launch"]["auth"] == ("u", "p:w") and seen["launch"]["max_file_size"] == "1mb"
    assert "WARNING" not in capsys.readouterr().err  # --auth given
    launch.main(["--host", "0.0.0.0"])
    assert "WARNING: binding 0.0.0.0 without --auth" in capsys.readouterr().err
    assert seen["build"]["policy"] == SwitchPolicy(False, ())


# ------------------------------------------------------------------------------ 2. bounded before any parsing
def test_every_field_is_bounded_by_size_before_parsing_or_tokenizing(b, monkeypatch):
    import app.checker as ck
    import app.checks as rq
    for name in ("encode_prompt", "template_canvas", "pair_canvas", "edit_canvas"):
        monkeypatch.setattr(ck, name, only_small(getattr(ck, name)))
    for name, fn in list(rq.FIELDS.items()):  # the parsers of every field
        monkeypatch.setitem(rq.FIELDS, name, only_small(fn))
    big = "x" * 1_000_000
    write, fill = b.sampler(dict(max_new_tokens=8, steps=8)), b.sampler(task="infill")
    cases = [
        (lambda: b.infill(fill, template=big + "[MASK]"), r"template: 1000006 characters is far over"),
        (lambda: b.infill(fill, prefix=big, length=2), r"prefix: 1000000 characters is far over"),
        (lambda: b.generate(big, write), r"prompt: 1000000 characters is far over"),
        (lambda: b.generate("hi", write, pins=big), r"pins: 1000000 characters is far over"),
        (lambda: b.redenoise([1] * 10, 2, [[0, 1]] * 400_000, fill), r"edits: 400000 items is over the limit of 64"),
        (lambda: b.redenoise([1] * 1_200_000, 2, [[0, 1]], fill), r"token_ids: 1200000 items is over the limit"),
        (lambda: b.race("hi", write, sweep_steps="4," * 2_000_000), r"sweep steps: 4000000 characters; give at most 8"),
        (lambda: b.race("hi", write, sweep_steps=[4] * 2_000_000), r"sweep steps: at most 8 values"),
        (lambda: b.infill_sweep(fill, "2 " * 1_000_000, template="a [MASK]"), r"span lengths: 2000000 characters"),
    ]
    for call, message in cases:
        t0 = time.perf_counter()
        with pytest.raises(ValueError, match=message):
            call()
        assert time.perf_counter() - t0 < 0.5


# ----------------------------------------------------------------------------------- 3. the AR counterpart
def test_a_bad_ar_counterpart_is_reported_at_load_and_turns_ar_vs_dlm_off(tiny_llama_dir):
    b = Backend()
    info = b.load(str(tiny_llama_dir), device="cpu", dtype="float32", ar_source="/etc")
    assert info.ar_error.startswith("AR counterpart /etc could not be loaded: ") and \
        info.ar_error.endswith("; AR vs DLM is off")
    assert info.ar_error in b.notice() and info.ar_error in b.status_markdown()
    cfg = b.sampler(dict(max_new_tokens=4, steps=4))
    for call in (lambda: b.race("hi", cfg), lambda: b.ar_continue("hi", 4, cfg),
                 lambda: b.scoreboard([type("E", (), dict(expected="x"))()])):
        with pytest.raises(ValueError, match="AR counterpart /etc could not be loaded"):
            call()  # refused before any work
    assert b.generate("hi", cfg).wait().result() is not None  # the DLM itself still serves


def test_the_ar_counterpart_is_loaded_with_the_dlm_never_inside_a_run(tiny_llama_dir, tiny_gpt2_dir, monkeypatch):
    b = Backend()
    info = b.load(str(tiny_llama_dir), device="cpu", dtype="float32", ar_source=str(tiny_gpt2_dir))
    assert b.models.ar is not None and info.ar_load_seconds > 0 and not info.ar_error
    import app.model_lifecycle
    monkeypatch.setattr(app.model_lifecycle.dlm, "load", never)  # a run must not load anything
    batch = b.race("Once upon a time", b.sampler(dict(max_new_tokens=4, steps=4))).wait()
    assert batch.result("summary")["ar"]["tokens"] >= 1


# --------------------------------------------------------------------------------- 4. one prompt-token limit
def test_the_span_length_sweep_keeps_the_prompt_token_limit(b):
    long = "word " * 200
    fill = b.sampler(task="infill")
    for kwargs in (dict(template=long + "[MASK]"), dict(prefix=long, suffix="."), dict(prefix="a", suffix=long)):
        with pytest.raises(ValueError, match=r"tokens is over this server's limit of 64 prompt tokens"):
            b.infill_sweep(fill, [2, 4], **kwargs)
    with pytest.raises(ValueError, match="beyond the model's context"):
        b.infill_sweep(fill, [400], template="a [MASK] b [MASK]")  # 2 spans x 400 > 512


# ------------------------------------------------------------------------------- 5 / 6. fair order, Stop
def _job(log, name, gate=None, steps=1):
    def job():
        log.append(f"{name} start")
        for i in range(steps):
            if gate is not None:
                gate.wait(10)
            yield "dlm", Frame(step=i + 1, total_steps=steps, tokens=[0], revealed=[0], confidence=[1.0])
        log.append(f"{name} end")
    return job


def _until(cond, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_a_client_keeps_a_few_waiting_requests_and_one_more_is_refused_before_it_waits():
    """Issue 31: nothing a client sent is dropped (before, a newer request replaced the waiting one with an
    error); beyond `per_client` waiting, a new one is refused before it waits."""
    w, log, gate = Worker(0.0, per_client=2), [], threading.Event()
    running = w.start(_job(log, "a1", gate), "A")
    _until(lambda: w.active is running)
    a2, a3 = w.start(_job(log, "a2"), "A"), w.start(_job(log, "a3"), "A")
    assert w.waiting("A") == 2
    with pytest.raises(ValueError, match=r"queue: not started: 2 of your requests are already waiting .*"
                                         r"dlm-studio --queue-per-client"):
        w.start(_job(log, "a4"), "A")
    gate.set()
    running.wait(), a2.wait(), a3.wait()
    assert log == ["a1 start", "a1 end", "a2 start", "a2 end", "a3 start", "a3 end"]


def test_the_session_that_used_least_model_time_goes_next():
    w, log, gate = Worker(0.0), [], threading.Event()
    first = w.start(_job(log, "long1", gate), "L")
    _until(lambda: w.active is first)
    time.sleep(0.2)  # L has now used model time
    long2 = w.start(_job(log, "long2"), "L")
    short = w.start(_job(log, "short"), "S")  # arrives after long2
    gate.set()
    for r in (first, long2, short):
        r.wait()
    assert log.index("short start") < log.index("long2 start")


def _steps(log, name, steps, seconds):
    def job():
        log.append(f"{name} start")
        for i in range(steps):
            time.sleep(seconds)
            yield "dlm", Frame(step=i + 1, total_steps=steps, tokens=[0], revealed=[0], confidence=[1.0])
        log.append(f"{name} end")
    return job


def test_a_long_run_pauses_between_steps_for_a_short_one_and_then_finishes():
    """Interleaving: the short request waits about one step, not for the whole long run; the long run loses
    nothing (every step delivered, in order) and its time limit counts only its own turns."""
    w, log = Worker(0.0, time_limit=30), []
    long = w.start(_steps(log, "long", 60, 0.05), "L", cost=60)
    _until(lambda: w.active is long)
    time.sleep(1.0)  # L has held the model for a second: more than the margin
    t0 = time.monotonic()
    short = w.start(_steps(log, "short", 2, 0.01), "S", cost=2)
    short.wait()
    assert time.monotonic() - t0 < 1.0
    frames = [f.step for b in long.batches() for f in b.frames()]
    assert frames == list(range(1, 61))
    assert log.index("short end") < log.index("long end")
    assert long.elapsed() < time.monotonic() - long.started  # the paused time is not its own


def test_a_request_asked_of_a_model_since_replaced_is_refused():
    w, gate = Worker(0.0), threading.Event()
    busy = w.start(_job([], "busy", gate), "B")
    _until(lambda: w.active is busy)
    stale = w.start(_job([], "stale"), "S")
    w.epoch += 1  # what Models.load does
    gate.set()
    with pytest.raises(ValueError, match="model: another model was loaded since this request was made"):
        stale.wait()
    busy.wait()


def test_stop_removes_a_queued_run_before_it_starts():
    w, log, gate = Worker(0.0), [], threading.Event()
    running = w.start(_job(log, "other", gate), "O")
    _until(lambda: w.active is running)
    queued = w.start(_job(log, "queued", steps=24), "Q")
    assert w.waiting("Q") == 1 and w.stop("Q")
    batches = list(queued.batches())
    assert batches[-1].cancelled and not any(x.frames() for x in batches) and w.waiting() == 0
    gate.set()
    running.wait()
    assert "queued start" not in log


def test_the_server_refuses_new_work_when_its_queue_is_full():
    w, gate = Worker(0.0, max_waiting=2), threading.Event()
    running = w.start(_job([], "r", gate), "R")
    _until(lambda: w.active is running)
    waiting = [w.start(_job([], f"w{i}"), f"S{i}") for i in range(2)]
    with pytest.raises(ValueError, match=r"queue: the server is busy \(2 requests waiting"):
        w.start(_job([], "x"), "X")
    gate.set()
    for r in [running, *waiting]:
        r.wait()


# ---------------------------------------------------------------------------------------------- 7. exports
def _long_trace(steps=300, tokens=200) -> render.Trace:
    t = render.Trace(mask_id=99)
    for s in range(steps):
        t.add(Frame(step=s + 1, total_steps=steps, tokens=[s % 50] * tokens, revealed=[s % tokens],
                    confidence=[0.5], start=0), lambda ids: {i: f" t{i}" for i in ids})
    return t


def test_exports_are_bounded_and_leave_no_folders_behind(b, tmp_path, monkeypatch):
    import tempfile
    before = set(Path(tempfile.gettempdir()).glob("dlm-animation-*"))
    monkeypatch.setattr(render, "EXPORT_DIR", tmp_path / "exports")
    trace = _long_trace()
    frames = render.export_cells(trace)
    assert len(frames) * 200 <= render.EXPORT_CELLS and frames[0] == trace.frames[0] and \
        frames[-1] == trace.frames[-1]
    small = _long_trace(steps=3, tokens=10)
    for _ in range(render.EXPORTS_KEPT + 4):
        files = b.export(small).wait().result("files")  # the worker's run: its queue, lock and time limit
    assert [Path(f).suffix for f in files] == [".gif", ".html"] and all(Path(f).is_file() for f in files)
    assert len(list((tmp_path / "exports").iterdir())) == render.EXPORTS_KEPT
    assert set(Path(tempfile.gettempdir()).glob("dlm-animation-*")) == before
    huge = _long_trace(steps=2, tokens=render.EXPORT_CELLS)
    with pytest.raises(ValueError, match="export: a canvas of 16384 tokens is too big to animate"):
        b.export(huge)


def test_an_export_waits_its_turn_in_the_worker(b):
    gate = threading.Event()
    busy = b.start(_job([], "busy", gate), "someone")
    _until(lambda: b.worker.active is busy)
    run = b.export(_long_trace(steps=2, tokens=4), session="me")
    assert b.worker.waiting("me") == 1
    gate.set()
    assert run.wait().result("files")


# -------------------------------------------------------------------------------------- 8 / 9. messages
def test_a_lone_surrogate_is_a_one_line_message_naming_the_field(b, caplog):
    cfg = b.sampler(dict(max_new_tokens=4, steps=4))
    fill = b.sampler(task="infill")
    cases = [(lambda: b.generate("\ud800 x", cfg), "prompt"), (lambda: b.infill(fill, template="\ud800 [MASK]"),
                                                                "template"),
             (lambda: b.infill(fill, prefix="a", suffix="\ud800"), "suffix"), (lambda: b.race("\ud800 x", cfg),
                                                                               "prompt"),
             (lambda: b.redenoise(Prompted("\ud800 x", [5, 6, 7]), None, [[0, 1]], fill), "prompt"),
             (lambda: b.generate("hi", cfg, pins="0: \ud800"), "pins")]
    for call, field in cases:
        with pytest.raises(ValueError, match=rf"^{field}: character \d+ \('\\ud800'\) is not valid Unicode"):
            call()
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


def test_edit_messages_speak_in_the_users_offsets(b):
    g = b.generate("Hello there", b.sampler(dict(max_new_tokens=10, steps=10))).wait().result()
    ids = b.prompt_ids("Hello there")
    fill = b.sampler(task="infill")
    with pytest.raises(ValueError, match=r"^edits: span 4\.\.6 overlaps span 2\.\.5 \(offsets into the generated"):
        b.redenoise(ids + g.token_ids, len(ids), [[2, 5], [4, 6]], fill)
    masked = list(g.token_ids)
    masked[3] = b.model.mask_token_id
    with pytest.raises(ValueError, match=rf"^token_ids: position 3 is the mask token \({b.model.mask_token_id}\)"):
        b.redenoise(ids + masked, len(ids), [[0, 1]], fill)


def test_pin_messages_name_the_pins_and_their_positions(b):
    tok = b.model.tokenizer
    word = next(w for w in (" unbelievable", " extraordinarily", " fisherman", " Parisian", " mornings")
                if 2 <= len(tok(w, add_special_tokens=False)["input_ids"]) <= 5)
    n = len(tok(word, add_special_tokens=False)["input_ids"])
    full = b.sampler(dict(max_new_tokens=8, steps=8, decoder="full", block_length=0, threshold=0))
    other = next(w for w in (" the", " a", " and", ".") if len(tok(w, add_special_tokens=False)["input_ids"]) == 1)
    with pytest.raises(ValueError, match=rf"^pins: '{other}' at {n - 1} \(1 token: positions {n - 1}\.\.{n - 1}\) "
                                         rf"overlaps '{word}' at 0 at position {n - 1}$"):
        b.generate("Hi", full, pins={0: word, n - 1: other})
    with pytest.raises(ValueError, match=rf"^pins: '{word}' at 7 \({n} tokens: .*\) does not fit in the 8 "
                                         rf"generated tokens \(positions 0\.\.7\)"):
        b.generate("Hi", full, pins={7: word})
    with pytest.raises(ValueError, match=r"^pins: position 0 is given twice \(' Paris' and ' London'\)"):
        check_fields(pins="0: Paris; 0: London")
    with pytest.raises(ValueError, match=r"^pins: '<\|mask\|>' at 2 holds the mask token"):
        b.generate("Hi", full, pins={2: "<|mask|>"})
    # a pin that leaves fewer positions than the steps: the steps are capped, the run is fine
    g = b.generate("Hi", full, pins={0: word}).wait().result()
    assert g.nfe == 8 - n and g.token_ids[:n] == tok(word, add_special_tokens=False)["input_ids"]


def test_a_mask_token_id_that_breaks_the_model_says_so(b, tiny_llama_dir):
    with pytest.raises(ValueError, match=r"^mask token id: .* does not load with mask token id 100000 .*leave it at "
                                         r"-1 \(automatic\)"):
        Backend().load(str(tiny_llama_dir), device="cpu", dtype="float32", mask_token_id=100000)
