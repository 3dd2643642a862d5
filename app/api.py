"""The named API endpoints for `gradio_client` and raw REST: /denoise, /infill, /compare, /race, /redenoise.

Each endpoint's parameters are its own fields (prompt, template, chat, ...) plus one parameter per UI field of
`SamplerConfig.describe()`, so a new knob is in the API too with no change here. The historical parameters come
first in their historical order (positional callers keep working); the other knobs follow. A knob left out (None)
is the loaded model's recommended value; `off` values are those of the UI (threshold 0, seed -1, block_length 0).
Everything goes through the backend (validation, limits, cancellation), exactly like the UI.
"""
from __future__ import annotations

import inspect
from typing import Optional

import gradio as gr

from app.backend import Backend, Prompted
from app.checks import check_fields
from app.events import MODEL, ended, fail, offload, session
from app.experiments import RaceState
from dlm.sampler_config import SamplerConfig, Task

KNOBS = {d["name"]: d for d in SamplerConfig.describe() if d.get("ui", True)}


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


class Endpoints:
    """The five endpoints' work over one backend: each method is `impl(request, knobs, **fields)` for `endpoint`
    (its docstring is the endpoint's API description)."""

    def __init__(self, backend: Backend):
        self.backend = backend

    async def denoise(self, request, knobs, prompt, chat, frames):
        """Continue `prompt` by iterative unmasking. Streams {"done": false, "step", "total_steps", "partial"}
        (masked tokens shown as '·'), then {"done": true, "text", "token_ids", "nfe", "seconds",
        "tokens_per_second", "steps", "prompt", "first_frame_seconds"} (+ "frames" when frames=true); a run stopped
        from elsewhere (the session's Stop) ends with {"done": false, "stopped": true, "step", "total_steps",
        "partial"}, one stopped by the time limit the same with "reason" (the message)."""
        f = check_fields(frames=frames)
        b = self.backend
        run = await offload(lambda: b.generate(prompt, b.sampler(knobs), chat=chat, session=session(request)))
        trace = run.display.trace()
        async for batch in run.abatches():
            for fr in batch.frames():
                trace.add(fr, run.display.decode)
            g = batch.result()
            if g is not None:
                out = dict(done=True, text=g.text, token_ids=g.token_ids, nfe=g.nfe, seconds=g.seconds,
                           tokens_per_second=g.tokens_per_second, steps=len(trace), prompt=g.prompt,
                           first_frame_seconds=run.first_event_seconds)
                if f["frames"]:
                    out["frames"] = [fr.to_dict() for fr in trace.frames]
                yield out
            elif batch.cancelled:
                last = trace.frames[-1] if trace.frames else None
                yield dict(done=False, stopped=True, step=last.step if last else 0,
                           total_steps=last.total_steps if last else 0, partial=trace.partial(),
                           **(dict(reason=batch.reason) if batch.reason else {}))
            elif batch.frames():
                last = trace.frames[-1]
                yield dict(done=False, step=last.step, total_steps=last.total_steps, partial=trace.partial())

    async def infill(self, request, knobs, template, prefix, suffix, length):
        """Fill a template's [MASK] / [MASK:n] spans, or (template empty) `length` tokens between `prefix` and
        `suffix`, with the model's infilling config. Returns {"text", "spans", "nfe", "seconds"}; steps None =
        the config's (one token per step by default), more steps than masked tokens are capped."""
        b = self.backend
        run = await offload(lambda: b.infill(b.sampler(knobs, task=Task.INFILL), template=template, prefix=prefix,
                                             suffix=suffix, length=length, session=session(request)))
        done = await run.await_all()
        g = ended(done).result()
        yield dict(text=g.text, spans=g.spans or [], nfe=g.nfe, seconds=g.seconds) if g is not None else \
            dict(stopped=True)

    async def race_states(self, request, knobs, prompt, chat, sweep_steps):
        """The race's state after each batch (`RaceState`: the same reader as the race tab's)."""
        b = self.backend
        run = await offload(lambda: b.race(prompt, b.sampler(knobs), chat=chat, sweep_steps=sweep_steps,
                                           session=session(request)))
        race = RaceState.of(run)
        async for batch in run.abatches():
            yield race.fold(batch)

    async def compare(self, request, knobs, prompt, sweep_steps, chat):
        """The same prompt through the DLM and its AR counterpart (taking turns, see /race). Returns {"dlm": run,
        "ar": run, "winner", "sweep": [{"steps", "seconds", "nfe", "ppl", "text", "distinct_2"}]}, a run being
        {"text", "seconds" (model only), "tokens", "nfe", "tokens_per_second", "gen_ppl", "distinct_2"};
        `sweep_steps` ("4, 8, 16") adds DLM runs at those step counts."""
        state = None
        async for state in self.race_states(request, knobs, prompt, chat, sweep_steps):
            pass
        if state is not None and state.reason:
            raise ValueError(state.reason)
        if state is None or state.summary is None:
            yield dict(stopped=True)
            return
        yield dict(state.result(), **(dict(stopped=True) if state.cancelled else {}))

    async def race(self, request, knobs, prompt, chat, sweep_steps):
        """The DLM against the AR model, both streaming: {"done": false, "dlm": side, "ar": side} while running
        (side = {"step", "total_steps", "partial", "seconds"}: its own model-time clock), then {"done": true,
        "dlm": run, "ar": run, "winner", "sweep": [...]} as /compare."""
        state = None
        async for state in self.race_states(request, knobs, prompt, chat, sweep_steps):
            sides = dict(dlm=state.side("dlm"), ar=state.side("ar"))
            if state.cancelled:
                yield dict(done=False, stopped=True, **sides, **(dict(reason=state.reason) if state.reason else {}))
            elif state.summary is None:
                yield dict(done=False, **sides)
        if state is not None and state.summary is not None:
            yield dict(done=True, **state.result())

    async def redenoise(self, request, knobs, prompt, token_ids, edits, chat):
        """Edit a finished generation: remask `edits` ([[start, end, new_length or null]], offsets into
        `token_ids`, end exclusive) and denoise only those positions with the model's infilling config; every
        other token stays identical. Returns {"text", "token_ids" (the new generated tokens), "spans", "nfe",
        "seconds"}."""
        b = self.backend
        run = await offload(lambda: b.redenoise(Prompted(prompt, token_ids, chat), None, edits,
                                                b.sampler(knobs, task=Task.INFILL), session=session(request)))
        g = ended(await run.await_all()).result()
        if g is None:
            yield dict(stopped=True)
            return
        new = g.token_ids[run.prompt_tokens:]
        yield dict(text=run.display.text_of(new), token_ids=new, spans=g.spans or [], nfe=g.nfe, seconds=g.seconds)


P = inspect.Parameter
# Each endpoint's parameters, in their historical order: (head fields, the knobs that follow them, middle fields,
# knobs left out); every other knob follows in SamplerConfig's order. Fields are (name, type, default) triples.
SIGNATURES = {
    "denoise": ([("prompt", str, P.empty)],
                ["max_new_tokens", "steps", "block_length", "remasking", "temperature", "top_p", "top_k",
                 "threshold", "seed"], [("chat", bool, False), ("frames", bool, False)], ()),
    "infill": ([("template", str, ""), ("prefix", str, ""), ("suffix", str, ""), ("length", int, 16)],
               ["steps", "remasking", "temperature", "seed"], [], ("max_new_tokens",)),
    "compare": ([("prompt", str, P.empty)], ["max_new_tokens", "steps", "remasking", "temperature", "seed"],
                [("sweep_steps", str, ""), ("chat", bool, False)], ()),
    "race": ([("prompt", str, P.empty)], ["max_new_tokens", "steps", "remasking", "temperature", "seed"],
             [("chat", bool, False), ("sweep_steps", str, "")], ()),
    "redenoise": ([("prompt", str, P.empty), ("token_ids", list[int], None), ("edits", list, None)],
                  ["steps", "remasking", "temperature", "seed"], [("chat", bool, False)], ("max_new_tokens",)),
}
ENDPOINTS = tuple(SIGNATURES)


def register(backend: Backend) -> dict[str, inspect.Signature]:
    """Define the named endpoints inside the current gr.Blocks; returns each one's signature (what
    `app.http_guard.ApiGuard` checks a named call against)."""
    impls = Endpoints(backend)
    fns = [endpoint(name, getattr(impls, name), head, first, middle, exclude=exclude)
           for name, (head, first, middle, exclude) in SIGNATURES.items()]
    for fn in fns:
        gr.api(fn, api_name=fn.__name__, **{**MODEL, "api_visibility": "public"})
    return {fn.__name__: fn.__signature__ for fn in fns}
