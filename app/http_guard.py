"""The HTTP guard in front of Gradio (`ApiGuard`, an ASGI middleware): what reaches Gradio is addressed to this
server (`Hosts`), from the client it says (`Proxies`), bounded in size and JSON shape, and shaped like a request of
this app; what Gradio would answer with a 500 gets a 4xx with one line. `guard(blocks, launch_kwargs)` builds it
for the playground as `launch` serves it (`app.ui.Playground`)."""
from __future__ import annotations

import asyncio
import inspect
import ipaddress
import json
import logging
import os
import re
from typing import Callable, Iterable, Optional

import gradio as gr

from app.checks import DEFAULT_BOUNDS, Bounds

log = logging.getLogger("dlm.app")
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
WILDCARDS = ("0.0.0.0", "::", "")


def host_of(header: str) -> str:
    """The name in a Host header: port, IPv6 brackets and a trailing dot removed, lower case."""
    h = header.strip().lower()
    if h.startswith("["):
        h = h[1:h.find("]")] if "]" in h else h[1:]
    elif h.count(":") == 1:
        h = h.rsplit(":", 1)[0]
    return h.rstrip(".")


def is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


class Hosts:
    """The names this server answers to (the Host header of every request): the bound host, localhost,
    127.0.0.1, ::1 and the names the operator adds (`dlm-studio --allowed-hosts`); bound to every interface
    (0.0.0.0), any IP address too (a page cannot be same-origin with an address it was not loaded from), and with
    --share the gradio.live tunnel's names. Anything else is a page that made its own name resolve here (DNS
    rebinding) and is refused."""

    def __init__(self, bound: Optional[str], extra: Iterable[str] = (), share: bool = False):
        self.bound = (bound or "127.0.0.1").strip().lower()
        self.names = {host_of(n) for n in (self.bound, *LOOPBACK_NAMES, *extra) if n and n.strip()}
        self.any_ip = self.bound in WILDCARDS
        self.share = share

    def allows(self, header: Optional[str]) -> bool:
        if header is None:  # HTTP/1.0 without a Host: no browser sends that
            return True
        name = host_of(header)
        return name in self.names or (self.any_ip and is_ip(name)) or (self.share and name.endswith(".gradio.live"))


class Proxies:
    """The reverse proxies the operator trusts (`dlm-studio --trusted-proxies`, addresses or networks): a request
    from one of them is the client named last in X-Forwarded-For that is not itself a trusted proxy; any other
    request is its connection's address (a client cannot pick its own by sending the header)."""

    def __init__(self, proxies: Iterable[str] = ()):
        self.nets = [ipaddress.ip_network(p.strip(), strict=False) for p in proxies if p and p.strip()]

    def trusted(self, address: Optional[str]) -> bool:
        try:
            ip = ipaddress.ip_address(address or "")
        except ValueError:
            return False
        return any(ip in n for n in self.nets)

    def client(self, scope) -> Optional[str]:
        peer = (scope.get("client") or (None, None))[0]
        if not self.nets or not self.trusted(peer):
            return peer
        header = b",".join(v for k, v in scope["headers"] if k == b"x-forwarded-for").decode("latin-1")
        for hop in reversed([h.strip() for h in header.split(",") if h.strip()]):
            if not self.trusted(hop):
                return hop if is_ip(hop) else peer
        return peer


def json_shape(data, max_depth: int, max_items: int) -> str:
    """What is wrong with the shape of a parsed JSON body ('' when nothing): nesting deeper than `max_depth`, a
    list or object of more than `max_items` entries, more than 4 x max_items values in all. Iterative, and it
    stops at the first problem: a million-item list costs one len()."""
    stack, values = [(data, 1)], 0
    while stack:
        v, depth = stack.pop()
        if isinstance(v, (list, dict)):
            if depth > max_depth:
                return f"request body: JSON nested deeper than {max_depth} levels; no request of this app needs that"
            if len(v) > max_items:
                return f"request body: a JSON {'list' if isinstance(v, list) else 'object'} of {len(v)} entries; " \
                       f"this server takes at most {max_items} per list (a canvas of token ids)"
            values += len(v)
            if values > 4 * max_items:
                return f"request body: more than {4 * max_items} JSON values; no request of this app needs that"
            stack.extend((x, depth + 1) for x in (v.values() if isinstance(v, dict) else v))
    return ""


JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')


def json_prescan(body: bytes, max_depth: int, max_items: int) -> str:
    """The shape of a JSON body from its bytes, before any parsing (a few ms a megabyte, where `json.loads` of a
    million tiny lists holds the interpreter for 50-200 ms): strings blanked out, then the lists / objects and the
    commas counted and a run of more than `max_depth` nested openings looked for. '' when it may be parsed."""
    bare = JSON_STRING.sub(b'""', body)
    if re.search(rb"[\[{](?:[^\[\]{}]*[\[{]){%d}" % max_depth, bare):
        return f"request body: JSON nested deeper than {max_depth} levels; no request of this app needs that"
    containers = bare.count(b"[") + bare.count(b"{")
    if containers > max_items:
        return f"request body: {containers} JSON lists / objects; no request of this app has more than {max_items}"
    if bare.count(b",") > 4 * max_items:
        return f"request body: more than {4 * max_items} JSON values; no request of this app needs that"
    return ""


def parse_json(body: bytes, max_depth: int, max_items: int):
    """(the parsed body, '') or (None, a one-line problem): run in a thread, never on the event loop; a body
    whose bytes already show a shape no request has (`json_prescan`) is not parsed at all."""
    problem = json_prescan(body, max_depth, max_items)
    if problem:
        return None, problem
    try:
        data = json.loads(body or b"null")
    except RecursionError:
        return None, f"request body: JSON nested deeper than {max_depth} levels; no request of this app needs that"
    except (ValueError, UnicodeDecodeError) as e:
        return None, f"request body: not valid JSON ({str(e).splitlines()[0][:80]})"
    return data, json_shape(data, max_depth, max_items)


class SessionView:
    """The playground as Gradio's `SessionState` sees it when a request brings a new session id: its config (each
    session's own copy of the component and event tables) but no components to copy the configs of. Otherwise Gradio
    copies every component's config for each new session id, on the event loop (the playground's ~340 blocks: ~50 ms
    and ~0.5 MB a session, kept for up to 10,000 sessions): a client sending new session ids, or REST calls without
    one (each its own session), stalled every other client and grew the server's memory. The copy serves only deep
    links, which this app has none of (their route is closed); a session's entry for a component is made when the
    component changes in that session (Gradio's own path for a missing entry)."""

    blocks: dict = {}

    def __init__(self, real):
        self._real = real

    def __getattr__(self, name):
        return getattr(self._real, name)


def lean_sessions(blocks) -> None:
    """New sessions of `blocks` (its Gradio app's state holder) start without the copy of every component's config."""
    holder = getattr(blocks, "state_holder", None)
    if holder is not None and getattr(holder, "blocks", None) is blocks:
        holder.blocks = SessionView(blocks)


class ApiGuard:
    """ASGI middleware in front of Gradio: what reaches Gradio is addressed to this server, bounded, and shaped
    like a request of this app; what Gradio would answer with a 500 (and a traceback in the log) gets a 4xx with
    one line. For every HTTP request:

    - a Host header that is not one of this server's names (`Hosts`) -> 403 (DNS rebinding: a page of another
      site that resolves its own name to 127.0.0.1 would otherwise be same-origin with the app);
    - the client address: the connection's, or from a trusted proxy the forwarded one (`Proxies`); written into
      the request, so Gradio's `request.client.host` and the worker's fairness see it;
    - uploads (`/upload`): refused (403): the app takes no file, so no page can write into the temp directory;
      deep links (`/deep_link`): 404, the app has none (and new sessions keep no config copy for them: `SessionView`);
    - a model route's request from a client address that already has `per_client_events` requests in flight here
      or events in Gradio's queue -> 429, before its body is read: new session ids do not make one address many
      clients, and a flood's surplus costs the server a refusal, not a parse or a session;
    - a request body over its route's cap -> 413, counted on the bytes read (chunked bodies too): the model
      routes (`/call`, `/queue/join`, `/run`, `/api`) take the largest real request (`Bounds.body_bytes`: four
      text fields at their bound), every other route 64 KB;
    - a JSON body is parsed in a thread (never on the event loop) and refused when nested deeper than 16 levels,
      with a list over `Bounds.list_items` entries, or too many values in all (422): so Gradio's own parsing
      and validation, on the event loop, only ever see small, plain bodies;
    - `/call/<name>` (and `/call/v2/<name>`, and the GET of its result), `/run/<name>`, `/api/<name>` for a name
      the app does not have -> 404 naming the endpoints; an `fn_index` it does not have -> 404;
    - Gradio's named form `/call/v2/<name>` with an unknown argument, a missing required one (the prompt) or a
      body that is not a JSON object -> 422 naming the argument and what the endpoint takes;
    - a dropdown's value outside its choices (the Model tab's loader called by `fn_index`) -> 422 naming the
      field and its choices (Gradio would log a traceback each time);
    - `/cancel` ends only the event it names (Gradio's cancels every running event of that session on that
      endpoint: cancelling a queued job killed the running one);
    - anything else that would still raise -> 500 with one line, one line in the log.
    Answers are JSON {"detail": one line}, as Gradio's own 4xx.
    """

    CALL = re.compile(r"/gradio_api/call/(v2/)?([^/]+)(/[^/]*)?/?")
    RUN = re.compile(r"/gradio_api/(?:run|api)/([^/]+)/?")
    UPLOAD = re.compile(r"(?:/gradio_api)?/upload/?")
    DEEP_LINK = re.compile(r"(?:/gradio_api)?/deep_link/?")
    JOIN = "/gradio_api/queue/join"
    CANCEL = "/gradio_api/cancel"
    SMALL_BODY = 64 << 10
    MAX_DEPTH = 16

    def __init__(self, app, endpoints: dict[str, inspect.Signature], blocks=None, *,
                 limits: Callable[[], Bounds] = lambda: DEFAULT_BOUNDS, hosts: Optional[Hosts] = None,
                 proxies: Optional[Proxies] = None, per_client_events: int = 20, fn_ids=None):
        self.app, self.blocks, self.limits = app, blocks, limits
        self.hosts, self.proxies = hosts or Hosts("127.0.0.1"), proxies or Proxies()
        self.per_client_events = per_client_events
        self.fn_ids = fn_ids or (lambda: set(blocks.fns) if blocks is not None else None)
        self.params = {name: [p for p in sig.parameters.values() if p.name != "request"]
                       for name, sig in endpoints.items()}
        self._logged: set[str] = set()
        self._in_flight: dict[str, int] = {}  # client address -> its model-route requests between this gate and Gradio
        lean_sessions(blocks)  # built with the app, after Gradio's state holder (Starlette builds it on first use)

    # ---- the gate
    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        host = headers.get(b"host")
        if not self.hosts.allows(host.decode("latin-1") if host is not None else None):
            if scope["type"] == "websocket":
                return await send({"type": "websocket.close", "code": 1008})
            name = host_of(host.decode("latin-1"))[:60]
            return await self._answer(send, 403, f"host: {name!r} is not a name this server answers to (it answers "
                                                 f"to {', '.join(sorted(self.hosts.names))}; the operator adds "
                                                 f"one with dlm-studio --allowed-hosts NAME)")
        client = self.proxies.client(scope)
        if client != (scope.get("client") or (None,))[0]:
            scope = dict(scope, client=(client, 0))
        if scope["type"] == "websocket":
            return await self.app(scope, receive, send)
        try:
            return await self._http(scope, receive, send, headers, client)
        except Exception as e:  # noqa: BLE001  (the last guard: one line, never a traceback flood)
            self._log(scope, e)
            if not scope.get("dlm.started"):
                return await self._answer(send, 500, f"internal error ({type(e).__name__}); the server is still "
                                                     f"running")

    async def _http(self, scope, receive, send, headers, client):
        method, path = scope["method"], scope["path"]

        async def tracked(message):
            if message["type"] == "http.response.start":
                scope["dlm.started"] = True
            await send(message)

        m = self.CALL.fullmatch(path)
        if m is not None and m.group(2) not in self.params:
            return await self._answer(send, 404, f"unknown endpoint /{m.group(2)[:60]}; the endpoints are "
                                                 f"{', '.join('/' + n for n in self.params)}")
        run = self.RUN.fullmatch(path)
        if run is not None and run.group(1) != "predict" and run.group(1) not in self._api_names():
            return await self._answer(send, 404, f"unknown endpoint /{run.group(1)[:60]}; the endpoints are "
                                                 f"{', '.join('/' + n for n in self.params)}")
        if self.DEEP_LINK.fullmatch(path):
            return await self._answer(send, 404, "deep links: this app has none")
        if method in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, tracked)
        if self.UPLOAD.fullmatch(path):
            return await self._answer(send, 403, "uploads: this app takes no files, so this server accepts no "
                                                 "uploads")
        model_route = m is not None or run is not None or path.rstrip("/") == self.JOIN
        if not (model_route and client):
            return await self._forward(scope, receive, tracked, send, headers, m, model_route)
        busy = self._busy(client)  # checked and counted with no await between: concurrent requests see each other
        if busy:
            return await self._answer(send, 429, busy)
        self._in_flight[client] = self._in_flight.get(client, 0) + 1
        try:
            return await self._forward(scope, receive, tracked, send, headers, m, model_route)
        finally:
            self._in_flight[client] -= 1
            if not self._in_flight[client]:
                del self._in_flight[client]

    async def _forward(self, scope, receive, tracked, send, headers, m, model_route: bool):
        """The body read within its route's cap, parsed in a thread and checked, then handed to Gradio."""
        path = scope["path"]
        bounds = self.limits()
        cap = bounds.body_bytes if model_route else self.SMALL_BODY
        size = headers.get(b"content-length", b"")
        if size.isdigit() and int(size) > cap:
            return await self._answer(send, 413, f"request body: {int(size)} bytes is over this server's limit of "
                                                 f"{cap} bytes for {path[:60]}")
        body = await self._body(receive, cap)
        if body is None:
            return await self._answer(send, 413, f"request body: over this server's limit of {cap} bytes for "
                                                 f"{path[:60]}")
        ctype = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        data = None
        if body and (not ctype or ctype.endswith(b"json")):
            data, problem = await asyncio.to_thread(parse_json, body, self.MAX_DEPTH, bounds.list_items)
            if problem:
                return await self._answer(send, 400 if problem.startswith("request body: not valid") else 422,
                                          problem)
        if model_route or path.rstrip("/") == self.CANCEL:
            status, problem = self._check(path, m, data)
            if problem:
                return await self._answer(send, status, problem)
        if path.rstrip("/") == self.CANCEL and isinstance(data, dict):
            body = await self._cancel_one(data, body)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()
        return await self.app(scope, replay, tracked)

    # ---- the checks
    def _check(self, path: str, m, data) -> tuple[int, str]:
        if m is not None:
            return (422, self._check_named(m.group(2), data)) if m.group(1) and not m.group(3) else (0, "")
        if path.rstrip("/") == self.CANCEL:
            return 0, ""
        return self._check_event(data)

    def _api_names(self) -> set[str]:
        fns = getattr(self.blocks, "fns", None) or {}
        return {fn.api_name for fn in fns.values() if getattr(fn, "api_name", None)}

    def _check_named(self, name: str, data) -> str:
        params = self.params[name]
        if data is None:
            data = {}
        if not isinstance(data, dict):
            return f"/{name}: the body must be a JSON object of arguments such as {{\"prompt\": \"Hello\"}}"
        names = [p.name for p in params]
        unknown = [k for k in data if k not in names and k != "oauth_token"]  # Gradio drops that one
        if unknown:
            return f"/{name}: unknown argument {str(unknown[0])[:40]!r}; the arguments are {', '.join(names)}"
        missing = [p.name for p in params if p.default is inspect.Parameter.empty and p.name not in data]
        if missing:
            return f"{missing[0]}: missing; /{name} needs it (e.g. {{\"{missing[0]}\": \"Hello\"}})"
        return ""

    def _check_event(self, data) -> tuple[int, str]:
        """/queue/join, /run/predict: an fn_index the app does not have (404), a dropdown value outside its
        choices (422); (0, '') when fine or for Gradio to refuse."""
        if not isinstance(data, dict):
            return 0, ""
        index = data.get("fn_index")
        known = self.fn_ids()
        if index is None or known is None:
            return 0, ""
        if not isinstance(index, int) or isinstance(index, bool) or index not in known:
            return 404, f"fn_index: {str(index)[:20]} is not an event of this app"
        values = data.get("data")
        fn = self.blocks.fns.get(index) if self.blocks is not None else None
        if fn is None or not isinstance(values, list):
            return 0, ""
        for component, value in zip(fn.inputs, values):
            problem = self._check_choice(component, value)
            if problem:
                return 422, problem
        return 0, ""

    @staticmethod
    def _check_choice(component, value) -> str:
        if not isinstance(component, (gr.Dropdown, gr.Radio)) or getattr(component, "allow_custom_value", False) \
                or value is None:
            return ""
        choices = [c[1] if isinstance(c, (list, tuple)) else c for c in component.choices or []]
        given = value if getattr(component, "multiselect", False) and isinstance(value, list) else [value]
        for v in given:
            if v not in choices:
                shown = ", ".join(repr(c) for c in choices[:8]) + (", …" if len(choices) > 8 else "")
                label = component.label or "value"
                return f"{label}: {str(v)[:40]!r} is not one of its choices ({shown})"
        return ""

    def _busy(self, client: str) -> str:
        """'' unless the client address already has `per_client_events` model-route requests in flight through
        this gate (on their way into Gradio's queue) and events in Gradio's queue (waiting or running)."""
        queue = getattr(self.blocks, "_queue", None)
        events = getattr(queue, "event_ids_to_events", None) or {}
        mine = self._in_flight.get(client, 0)
        for event in list(events.values()):
            request = getattr(event, "request", None)
            peer = getattr(getattr(request, "client", None), "host", None)
            mine += peer == client
        if mine >= self.per_client_events:
            return f"queue: {mine} requests from your address are waiting or running (this server takes at most " \
                   f"{self.per_client_events} per client: dlm-studio --queue-per-client); send more when they finish"
        return ""

    async def _cancel_one(self, data: dict, body: bytes) -> bytes:
        """Cancel the one event named (its task), then let Gradio finish the cancel (the completion message, the
        queue, the iterator) with an fn_index that matches no other task."""
        name = f"{data.get('session_hash')}_{data.get('fn_index')}<gradio-sep>{data.get('event_id')}"
        tasks = [t for t in asyncio.all_tasks() if t.get_name() == name]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        return json.dumps(dict(data, fn_index=-1)).encode()

    @staticmethod
    async def _body(receive, cap: int) -> Optional[bytes]:
        """The whole request body, or None once more than `cap` bytes have arrived (Content-Length or chunked)."""
        chunks, n = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            n += len(chunk)
            if n > cap:
                return None
            chunks.append(chunk)
            if not message.get("more_body"):
                return b"".join(chunks)

    def _log(self, scope, e: BaseException) -> None:
        key = f"{type(e).__name__}:{scope.get('path', '')[:40]}"
        if key in self._logged:
            log.warning("internal error on %s %s: %s", scope.get("method"), scope.get("path", "")[:80],
                        type(e).__name__)
        else:  # the first of its kind with the traceback, then one line each
            self._logged.add(key)
            log.error("internal error on %s %s", scope.get("method"), scope.get("path", "")[:80], exc_info=e)

    @staticmethod
    async def _answer(send, status: int, detail: str) -> None:
        body = json.dumps({"detail": detail}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def guard(blocks, launch_kwargs: dict):
    """The `ApiGuard` middleware for `blocks` (the playground) as `launch` is about to serve it: the bound host,
    the operator's extra names and trusted proxies (`blocks.allowed_hosts`, `blocks.trusted_proxies`, set by the
    launcher), the request limits of its backend, and its queue."""
    from starlette.middleware import Middleware
    backend = getattr(blocks, "backend", None)
    bound = launch_kwargs.get("server_name") or os.environ.get("GRADIO_SERVER_NAME") or "127.0.0.1"
    worker = getattr(backend, "worker", None)
    per_client = getattr(worker, "per_client", 4)
    return Middleware(ApiGuard, endpoints=blocks.api_signatures, blocks=blocks,
                      limits=backend.bounds if backend is not None else (lambda: DEFAULT_BOUNDS),
                      hosts=Hosts(bound, getattr(blocks, "allowed_hosts", ()), bool(launch_kwargs.get("share"))),
                      proxies=Proxies(getattr(blocks, "trusted_proxies", ())),
                      per_client_events=2 * (per_client + 1))
