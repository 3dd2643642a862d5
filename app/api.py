"""The named API endpoints for `gradio_client` and raw REST: /denoise, /infill, /compare, /race, /redenoise.

Each endpoint's parameters are its own fields (prompt, template, chat, ...) plus one parameter per UI field of
`SamplerConfig.describe()`, so a new knob is in the API too with no change here. The historical parameters come
first in their historical order (positional callers keep working); the other knobs follow. A knob left out (None)
is the loaded model's recommended value; `off` values are those of the UI (threshold 0, seed -1, block_length 0).
Everything goes through the backend (validation, limits, cancellation), exactly like the UI.
"""
from __future__ import annotations

import inspect
import json
import re
from typing import Optional

import gradio as gr

from app.backend import Backend, Prompted
from app.experiments import RaceState
from app.requests import check_fields
from app.tabs.common import MODEL, ended, fail, offload, session
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


def register(backend: Backend) -> dict[str, inspect.Signature]:
    """Define the named endpoints inside the current gr.Blocks; returns each one's signature (what
    `ApiGuard` below checks a named call against)."""

    async def denoise(request, knobs, prompt, chat, frames):
        """Continue `prompt` by iterative unmasking. Streams {"done": false, "step", "total_steps", "partial"}
        (masked tokens shown as '·'), then {"done": true, "text", "token_ids", "nfe", "seconds",
        "tokens_per_second", "steps", "prompt", "first_frame_seconds"} (+ "frames" when frames=true); a run stopped
        from elsewhere (the session's Stop) ends with {"done": false, "stopped": true, "step", "total_steps",
        "partial"}, one stopped by the time limit the same with "reason" (the message)."""
        f = check_fields(frames=frames)
        run = await offload(lambda: backend.generate(prompt, backend.sampler(knobs), chat=chat,
                                                     session=session(request)))
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

    async def infill(request, knobs, template, prefix, suffix, length):
        """Fill a template's [MASK] / [MASK:n] spans, or (template empty) `length` tokens between `prefix` and
        `suffix`, with the model's infilling config. Returns {"text", "spans", "nfe", "seconds"}; steps None =
        the config's (one token per step by default), more steps than masked tokens are capped."""
        run = await offload(lambda: backend.infill(backend.sampler(knobs, task="infill"), template=template,
                                                   prefix=prefix, suffix=suffix, length=length,
                                                   session=session(request)))
        done = await run.await_all()
        g = ended(done).result()
        yield dict(text=g.text, spans=g.spans or [], nfe=g.nfe, seconds=g.seconds) if g is not None else \
            dict(stopped=True)

    async def race_states(request, knobs, prompt, chat, sweep_steps):
        """The race's state after each batch (`RaceState`: the same reader as the race tab's)."""
        run = await offload(lambda: backend.race(prompt, backend.sampler(knobs), chat=chat,
                                                 sweep_steps=sweep_steps, session=session(request)))
        race = RaceState.of(run)
        async for batch in run.abatches():
            yield race.fold(batch)

    async def compare(request, knobs, prompt, sweep_steps, chat):
        """The same prompt through the DLM and its AR counterpart (taking turns, see /race). Returns {"dlm": run,
        "ar": run, "winner", "sweep": [{"steps", "seconds", "nfe", "ppl", "text", "distinct_2"}]}, a run being
        {"text", "seconds" (model only), "tokens", "nfe", "tokens_per_second", "gen_ppl", "distinct_2"};
        `sweep_steps` ("4, 8, 16") adds DLM runs at those step counts."""
        state = None
        async for state in race_states(request, knobs, prompt, chat, sweep_steps):
            pass
        if state is not None and state.reason:
            raise ValueError(state.reason)
        if state is None or state.summary is None:
            yield dict(stopped=True)
            return
        yield dict(state.result(), **(dict(stopped=True) if state.cancelled else {}))

    async def race(request, knobs, prompt, chat, sweep_steps):
        """The DLM against the AR model, both streaming: {"done": false, "dlm": side, "ar": side} while running
        (side = {"step", "total_steps", "partial", "seconds"}: its own model-time clock), then {"done": true,
        "dlm": run, "ar": run, "winner", "sweep": [...]} as /compare."""
        state = None
        async for state in race_states(request, knobs, prompt, chat, sweep_steps):
            sides = dict(dlm=state.side("dlm"), ar=state.side("ar"))
            if state.cancelled:
                yield dict(done=False, stopped=True, **sides, **(dict(reason=state.reason) if state.reason else {}))
            elif state.summary is None:
                yield dict(done=False, **sides)
        if state is not None and state.summary is not None:
            yield dict(done=True, **state.result())

    async def redenoise(request, knobs, prompt, token_ids, edits, chat):
        """Edit a finished generation: remask `edits` ([[start, end, new_length or null]], offsets into
        `token_ids`, end exclusive) and denoise only those positions with the model's infilling config; every
        other token stays identical. Returns {"text", "token_ids" (the new generated tokens), "spans", "nfe",
        "seconds"}."""
        run = await offload(lambda: backend.redenoise(Prompted(prompt, token_ids, chat), None, edits,
                                                      backend.sampler(knobs, task="infill"),
                                                      session=session(request)))
        g = ended(await run.await_all()).result()
        if g is None:
            yield dict(stopped=True)
            return
        new = g.token_ids[run.prompt_tokens:]
        yield dict(text=run.display.text_of(new), token_ids=new, spans=g.spans or [], nfe=g.nfe, seconds=g.seconds)

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
    return {fn.__name__: fn.__signature__ for fn in fns}


# ------------------------------------------------------------------------------------------------- the HTTP guard
class ApiGuard:
    """ASGI middleware in front of Gradio for what Gradio would answer with a bare 500 or not bound at all:

    - a request body over `max_body` bytes (Content-Length, or counted while a checked body is read) -> 413,
      before anything parses it (file uploads are bounded by launch's `max_file_size` instead);
    - `/gradio_api/call/<name>` (and `/call/v2/<name>`, and the GET of its result) for a name that is not one of
      the named endpoints -> 404 naming the endpoints;
    - Gradio's named form `/call/v2/<name>` with an unknown argument, a missing required one (the prompt) or a
      body that is not a JSON object -> 422 naming the argument and what the endpoint takes;
    - `/gradio_api/queue/join` for an `fn_index` the app does not have -> 404.
    Answers are JSON {"detail": one line}, as Gradio's own 4xx. Everything else passes through untouched.
    """

    CALL = re.compile(r"/gradio_api/call/(v2/)?([^/]+)(/[^/]*)?/?")
    JOIN = "/gradio_api/queue/join"

    def __init__(self, app, endpoints: dict[str, inspect.Signature], max_body: int, fn_ids=lambda: None):
        self.app, self.max_body, self.fn_ids = app, max_body, fn_ids
        self.params = {name: [p for p in sig.parameters.values() if p.name != "request"]
                       for name, sig in endpoints.items()}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        method, path = scope["method"], scope["path"]
        size = dict(scope["headers"]).get(b"content-length", b"")
        if method == "POST" and size.isdigit() and int(size) > self.max_body and not path.endswith("/upload"):
            return await self._answer(send, 413, f"request body: {int(size)} bytes is over this server's limit of "
                                                 f"{self.max_body} bytes")
        m = self.CALL.fullmatch(path)
        if m is not None:
            v2, name, tail = m.groups()
            if name not in self.params:
                return await self._answer(send, 404, f"unknown endpoint /{name}; the endpoints are "
                                                     f"{', '.join('/' + n for n in self.params)}")
            if method != "POST" or not v2 or tail:
                return await self.app(scope, receive, send)
        elif not (method == "POST" and path.rstrip("/") == self.JOIN):
            return await self.app(scope, receive, send)
        body = await self._body(receive)
        if body is None:
            return await self._answer(send, 413, f"request body: over this server's limit of {self.max_body} bytes")
        status, problem = (422, self._check_named(m.group(2), body)) if m is not None else (404, self._check_join(body))
        if problem:
            return await self._answer(send, status, problem)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()
        return await self.app(scope, replay, send)

    async def _body(self, receive) -> Optional[bytes]:
        """The whole request body, or None once it passes `max_body`."""
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if len(body) > self.max_body:
                return None
            if not message.get("more_body"):
                return body

    def _check_named(self, name: str, body: bytes) -> str:
        params = self.params[name]
        try:
            data = json.loads(body or b"{}")
        except ValueError:
            data = None
        if not isinstance(data, dict):
            return f"/{name}: the body must be a JSON object of arguments such as {{\"prompt\": \"Hello\"}}"
        names = [p.name for p in params]
        unknown = [k for k in data if k not in names and k != "oauth_token"]  # Gradio drops that one
        if unknown:
            return f"/{name}: unknown argument {unknown[0]!r}; the arguments are {', '.join(names)}"
        missing = [p.name for p in params if p.default is inspect.Parameter.empty and p.name not in data]
        if missing:
            return f"{missing[0]}: missing; /{name} needs it (e.g. {{\"{missing[0]}\": \"Hello\"}})"
        return ""

    def _check_join(self, body: bytes) -> str:
        """An fn_index the app does not have ('' when it has it, or when the body is for Gradio to refuse)."""
        try:
            index = json.loads(body or b"{}").get("fn_index")
        except (ValueError, AttributeError):
            return ""
        known = self.fn_ids()
        if isinstance(index, int) and known is not None and index not in known:
            return f"fn_index: {index} is not an event of this app"
        return ""

    @staticmethod
    async def _answer(send, status: int, detail: str) -> None:
        body = json.dumps({"detail": detail}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
