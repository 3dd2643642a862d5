"""What the server keeps stays small and out of the collector's way. A session: a run's frames
(`app.frame_log.FrameLog`) read back exactly as they were given, in memory that grows with what changed per step,
not with steps x canvas; the edit history keeps its newest versions only. The heap the server starts with is frozen
out of full collections, and a model switch still frees the old model."""
from __future__ import annotations

import random

import pytest

from app.frame_log import FrameLog
from app.render import Trace
from dlm.types import Frame


@pytest.mark.parametrize("decoder", ["full", "blocks", "speculative"])
def test_frames_read_back_equal_to_what_the_decoder_gave(tiny_dlm, decoder, monkeypatch):
    monkeypatch.setattr(FrameLog, "KEY", 4)   # key frames and diffs both exercised on a short run
    steps = {} if decoder == "speculative" else {"steps": 40}
    g = tiny_dlm.generate("Once upon a time", max_new_tokens=40, block_length=4, decoder=decoder, frames=True,
                          seed=3, temperature=0.9, **steps)
    frames = g.frames
    assert len(frames) > 2 * FrameLog.KEY
    log = FrameLog(frames)
    assert len(log) == len(frames)
    assert list(log) == frames
    rng = random.Random(0)
    for k in rng.sample(range(len(frames)), 12) + [0, len(frames) - 1, -1, -len(frames)]:
        assert log[k] == frames[k]
    assert log[5:17] == frames[5:17] and log[::7] == frames[::7] and log[:0] == []
    assert [h.revealed for h in log.headers()] == [f.revealed for f in frames]
    assert all(h.tokens == [] for h in log.headers())
    with pytest.raises(IndexError):
        log[len(frames)]


def test_a_long_run_keeps_diffs_not_canvases():
    steps, length, mask = 512, 1536, 7
    canvas = [mask] * length
    frames = []
    for s in range(steps):
        canvas = list(canvas)
        canvas[1024 + s] = 1000 + s               # one reveal per step
        frames.append(Frame(step=s + 1, total_steps=steps, tokens=canvas, revealed=[1024 + s], confidence=[0.5],
                            start=1024))
    trace = Trace(mask_id=mask)
    for f in frames:
        trace.add(f, lambda ids: {i: "x" for i in ids})
    as_lists = steps * length * 8                  # the list pointers alone, without the int objects
    assert trace.frames.nbytes() < as_lists / 20
    assert trace.frames[300] == frames[300] and trace.frames[-1] == frames[-1]
    assert trace.frames[-1].tokens.count(mask) == length - steps


def test_canvas_length_may_change_between_frames():
    a = Frame(step=1, total_steps=3, tokens=[1, 2, 3], revealed=[], confidence=[])
    b = Frame(step=2, total_steps=3, tokens=[1, 2, 3, 4, 5], revealed=[3, 4], confidence=[0.1, 0.2])
    c = Frame(step=3, total_steps=3, tokens=[1, 9, 3, 4, 5], revealed=[1], confidence=[0.3])
    assert list(FrameLog([a, b, c])) == [a, b, c]


def test_edit_history_keeps_the_newest_versions_only():
    from app.tabs import denoise
    trace = Trace(mask_id=0)
    history = None
    for i in range(denoise.HISTORY_KEPT + 10):
        history = denoise._push(history, [1, 2, i], 2, f"v{i}", trace)
    assert len(history["entries"]) == denoise.HISTORY_KEPT
    assert history["index"] == denoise.HISTORY_KEPT - 1
    assert history["entries"][-1]["text"] == f"v{denoise.HISTORY_KEPT + 9}"
    assert history["entries"][0]["text"] == "v10"
    assert list(history["entries"][-1]["tokens"]) == [1, 2, denoise.HISTORY_KEPT + 9]


def test_sessions_kept_is_a_launcher_flag_checked_at_start():
    from app import MAX_SESSIONS
    from app.launch import parse_args
    assert parse_args([]).max_sessions == MAX_SESSIONS
    assert parse_args(["--max-sessions", "50"]).max_sessions == 50
    with pytest.raises(SystemExit):
        parse_args(["--max-sessions", "0"])


def test_a_frozen_heap_still_frees_the_old_model_on_a_switch(tiny_llama_dir, tiny_gpt2_dir, monkeypatch):
    """As a launched server runs (`app.launch` freezes the heap once started): a switch unfreezes, collects the
    old model and freezes again, so neither a leak nor a return of the full collections' stalls."""
    import gc
    import weakref

    from app import model_lifecycle
    from app.backend import Backend
    monkeypatch.setitem(model_lifecycle._HEAP, "frozen", False)
    b = Backend()
    b.load(str(tiny_llama_dir), device="cpu", dtype="float32")
    assert gc.get_freeze_count() == 0 or not model_lifecycle._HEAP["frozen"]   # tests never froze it: no freeze
    try:
        model_lifecycle.freeze_heap()
        assert gc.get_freeze_count() > 0
        old = weakref.ref(b.model)
        b.load(str(tiny_gpt2_dir), device="cpu", dtype="float32")
        gc.collect()
        assert old() is None, "the previous model stayed frozen after a switch"
        assert gc.get_freeze_count() > 0, "the new model's heap was not frozen again"
    finally:
        gc.unfreeze()
        b.free()
