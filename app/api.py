"""The named API endpoints for `gradio_client` and raw REST: /denoise, /infill, /compare, /race, /redenoise.

Each endpoint's parameters are its own fields (prompt, template, chat, ...) plus one parameter per UI field of
`SamplerConfig.describe()`, so a new knob is in the API too with no change here. The historical parameters come
first in their historical order (positional callers keep working); the other knobs follow. A knob left out (None)
is the loaded model's recommended value; `off` values are those of the UI (threshold 0, seed -1, block_length 0).
Everything goes through the backend (validation, limits, cancellation), exactly like the UI.
"""
from __future__ import annotations

import inspect
from typing import Any, Optional

import gradio as gr

from app.backend import Backend, check_fields
from app.tabs.common import MODEL, fail, session
from dlm.sampler_config import SamplerConfig

KNOBS = {d["name"]: d for d in SamplerConfig.describe() if d.get("ui", True)}
ENDPOINTS = ("denoise", "infill", "compare", "race", "redenoise")


def _knob_type(name: str):
    return Optional[KNOBS[name]["type"]]


def endpoint(name: str, impl, head: list, first_knobs: list[str], middle: list, *, exclude=()):
    """An async-generator API function for `gr.api` with an explicit signature: `head` fields, then `first_knobs`,
    then `middle` fields, then every other knob; `impl(request, knobs, **fields)` does the work. Fields are
    (name, type, default) triples; knobs default to None (= the model's recommended value)."""
    rest = [k for k in KNOBS if k not in first_knobs and k not in exclude]
    knob_names = [*first_knobs, *rest]
    P = inspect.Parameter
    params = [P(n, P.POSITIONAL_OR_KEYWORD, default=d, annotation=t) for n, t, d in head]
    params += [P(k, P.POSITIONAL_OR_KEYWORD, default=None, annotation=_knob_type(k)) for k in first_knobs]
    params += [P(n, P.POSITIONAL_OR_KEYWORD, default=d, annotation=t) for n, t, d in middle]
    params += [P(k, P.POSITIONAL_OR_KEYWORD, default=None, annotation=_knob_type(k)) for k in rest]
    params.append(P("request", P.POSITIONAL_OR_KEYWORD, default=None, annotation=gr.Request))
    signature = inspect.Signature(params, return_annotation=dict)

    async def api_fn(*args, **kwargs):
        values = signature.bind(*args, **kwargs)
        values.apply_defaults()
        fields = dict(values.arguments)
        request = fields.pop("request", None)
        knobs = {k: fields.pop(k) for k in knob_names}
        try:
            async for out in impl(request, knobs, **fields):
                yield out
        except Exception as e:
            fail(e, for_browser=False)

    api_fn.__signature__ = signature
    api_fn.__annotations__ = {p.name: p.annotation for p in params} | {"return": dict}
    api_fn.__name__ = api_fn.__qualname__ = name
    api_fn.__doc__ = impl.__doc__
    return api_fn


def partial_text(frame, pieces: dict[int, str], decode, mask_id: int) -> str:
    """The generated region of a frame as text, masked tokens shown as '·' (`pieces` caches the token texts)."""
    region = frame.tokens[frame.start:]
    pieces.update(decode(sorted({t for t in region if t != mask_id and t not in pieces})))
    return "".join("·" if t == mask_id else pieces[t] for t in region)


def register(backend: Backend) -> None:
    """Define the named endpoints inside the current gr.Blocks (all in the one "model" concurrency group)."""

    async def denoise(request, knobs, prompt, chat, frames):
        """Continue `prompt` by iterative unmasking. Streams {"done": false, "step", "total_steps", "partial"}
        (masked tokens shown as '·'), then {"done": true, "text", "token_ids", "nfe", "seconds",
        "tokens_per_second", "steps", "prompt", "first_frame_seconds"} (+ "frames" when frames=true); a run stopped
        from elsewhere (the session's Stop) ends with {"done": false, "stopped": true, "step", "total_steps"}."""
        f = check_fields(frames=frames)
        run = backend.generate(prompt, backend.sampler(knobs), chat=chat, session=session(request))
        mask_id, decode = int(backend.require_model().mask_token_id), backend.piece_decoder()
        pieces, frames_seen = {}, []
        async for batch in run.abatches():
            frames_seen += batch.frames()
            g = batch.result()
            if g is not None:
                out = dict(done=True, text=g.text, token_ids=g.token_ids, nfe=g.nfe, seconds=g.seconds,
                           tokens_per_second=g.tokens_per_second, steps=len(frames_seen), prompt=g.prompt,
                           first_frame_seconds=run.first_event_seconds)
                if f["frames"]:
                    out["frames"] = [fr.to_dict() for fr in frames_seen]
                yield out
            elif batch.cancelled:
                last = frames_seen[-1] if frames_seen else None
                yield dict(done=False, stopped=True, step=last.step if last else 0,
                           total_steps=last.total_steps if last else 0)
            elif batch.frames():
                fr = batch.frames()[-1]
                yield dict(done=False, step=fr.step, total_steps=fr.total_steps,
                           partial=partial_text(fr, pieces, decode, mask_id))

    async def infill(request, knobs, template, prefix, suffix, length):
        """Fill a template's [MASK] / [MASK:n] spans, or (template empty) `length` tokens between `prefix` and
        `suffix`, with the model's infilling config. Returns {"text", "spans", "nfe", "seconds"}; steps None =
        the config's (one token per step by default), more steps than masked tokens are capped."""
        run = backend.infill(backend.sampler(knobs, task="infill"), template=template, prefix=prefix,
                             suffix=suffix, length=length, session=session(request))
        done = await run.await_all()
        g = done.result()
        yield dict(text=g.text, spans=g.spans or [], nfe=g.nfe, seconds=g.seconds) if g is not None else \
            dict(stopped=True)

    async def race_events(request, knobs, prompt, chat, sweep_steps):
        run = backend.race(prompt, backend.sampler(knobs), chat=chat, sweep_steps=sweep_steps,
                           session=session(request))
        async for batch in run.abatches():
            yield batch

    async def compare(request, knobs, prompt, sweep_steps, chat):
        """The same prompt through the DLM and its AR counterpart (taking turns, see /race). Returns {"dlm": run,
        "ar": run, "winner", "sweep": [{"steps", "seconds", "nfe", "ppl", "text", "distinct_2"}]}, a run being
        {"text", "seconds" (model only), "tokens", "nfe", "tokens_per_second", "gen_ppl", "distinct_2"};
        `sweep_steps` ("4, 8, 16") adds DLM runs at those step counts."""
        summary, sweep, stopped = None, [], False
        async for batch in race_events(request, knobs, prompt, chat, sweep_steps):
            summary = batch.result("summary") or summary
            sweep += batch.items("sweep")
            stopped |= batch.cancelled
        if summary is None:
            yield dict(stopped=True)
            return
        yield dict(dlm=summary["dlm"], ar=summary["ar"], winner=summary["winner"], sweep=sweep,
                   **(dict(stopped=True) if stopped else {}))

    async def race(request, knobs, prompt, chat, sweep_steps):
        """The DLM against the AR model, both streaming: {"done": false, "dlm": side, "ar": side} while running
        (side = {"step", "total_steps", "partial", "seconds"}: its own model-time clock), then {"done": true,
        "dlm": run, "ar": run, "winner", "sweep": [...]} as /compare."""
        decode = backend.piece_decoder()
        pieces: dict[int, str] = {}
        sides: dict[str, Any] = {"dlm": {}, "ar": {}}
        summary, sweep = None, []
        mask_id = int(backend.require_model().mask_token_id)
        async for batch in race_events(request, knobs, prompt, chat, sweep_steps):
            clock = batch.result("clock") or {}
            for lane in sides:
                frames = batch.frames(lane)
                if frames:
                    fr = frames[-1]
                    sides[lane] = dict(step=fr.step, total_steps=fr.total_steps,
                                       partial=partial_text(fr, pieces, decode, mask_id))
                if lane in clock:
                    sides[lane]["seconds"] = clock[lane]
            summary = batch.result("summary") or summary
            sweep += batch.items("sweep")
            if batch.cancelled:
                yield dict(done=False, stopped=True, **sides)
            elif summary is None:
                yield dict(done=False, **sides)
        if summary is not None:
            yield dict(done=True, dlm=summary["dlm"], ar=summary["ar"], winner=summary["winner"], sweep=sweep)

    async def redenoise(request, knobs, prompt, token_ids, edits, chat):
        """Edit a finished generation: remask `edits` ([[start, end, new_length or null]], offsets into
        `token_ids`, end exclusive) and denoise only those positions with the model's infilling config; every
        other token stays identical. Returns {"text", "token_ids" (the new generated tokens), "spans", "nfe",
        "seconds"}."""
        ids = backend.prompt_ids(prompt, chat)
        f = check_fields(token_ids=token_ids)
        run = backend.redenoise(ids + f["token_ids"], len(ids), edits, backend.sampler(knobs, task="infill"),
                                session=session(request))
        g = (await run.await_all()).result()
        if g is None:
            yield dict(stopped=True)
            return
        new = g.token_ids[len(ids):]
        yield dict(text=backend.text_of(new), token_ids=new, spans=g.spans or [], nfe=g.nfe, seconds=g.seconds)

    fns = [
        endpoint("denoise", denoise, [("prompt", str, inspect.Parameter.empty)],
                 ["max_new_tokens", "steps", "block_length", "remasking", "temperature", "top_p", "top_k",
                  "threshold", "seed"], [("chat", bool, False), ("frames", bool, False)]),
        endpoint("infill", infill, [("template", str, ""), ("prefix", str, ""), ("suffix", str, ""),
                                    ("length", int, 16)],
                 ["steps", "remasking", "temperature", "seed"], [], exclude=("max_new_tokens",)),
        endpoint("compare", compare, [("prompt", str, inspect.Parameter.empty)],
                 ["max_new_tokens", "steps", "remasking", "temperature", "seed"],
                 [("sweep_steps", str, ""), ("chat", bool, False)]),
        endpoint("race", race, [("prompt", str, inspect.Parameter.empty)],
                 ["max_new_tokens", "steps", "remasking", "temperature", "seed"],
                 [("chat", bool, False), ("sweep_steps", str, "")]),
        endpoint("redenoise", redenoise, [("prompt", str, inspect.Parameter.empty), ("token_ids", list[int], None),
                                          ("edits", list, None)],
                 ["steps", "remasking", "temperature", "seed"], [("chat", bool, False)],
                 exclude=("max_new_tokens",)),
    ]
    for fn in fns:
        gr.api(fn, api_name=fn.__name__, **{**MODEL, "api_visibility": "public"})
