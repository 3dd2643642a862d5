"""The worker that runs one request's model work: a thread holding the model lock, a cancel event, the time limit
per request, and throttled delivery of its events to the consumer (a Gradio handler or a script).

    worker = Worker(min_frame_interval=1 / 15, time_limit=120)
    run = worker.start(job, session="s1")       # job(): a generator of (lane, item) events that calls the model
    for batch in run.batches(): ...              # throttled; errors raised here; closing early cancels the run
    worker.stop("s1")                            # the session's Stop

No model and no Gradio in here: `install_hooks(model)` is all the worker knows of a model (the layer hooks through
which a cancel or the time limit ends even one long forward).
"""
from __future__ import annotations

import asyncio
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

from dlm.types import Frame

Job = Callable[[], Iterator[tuple[str, Any]]]


@dataclass
class Batch:
    """What a run delivers at once (throttled): the events since the last batch, each `(lane, item)`.

    Lanes name the streams of one run: "dlm" (the diffusion model's Frames, then its Generation), "ar" (the AR
    model's), and plain records such as "clock", "summary", "sweep" or "row" (dicts). `cancelled`: the run was
    stopped (Stop, a closed tab, a cancelled client job, or the time limit: then `reason` says so) after these
    events; what it delivered before stays (a partial canvas to show and export).
    """

    events: list[tuple[str, Any]] = field(default_factory=list)
    cancelled: bool = False
    reason: str = ""  # why the run ended early when not by Stop (the time limit), a one-line message


    def frames(self, lane: str = "dlm") -> list[Frame]:
        return [item for name, item in self.events if name == lane and isinstance(item, Frame)]

    def items(self, lane: str) -> list:
        """The lane's records (everything but Frames), in order."""
        return [item for name, item in self.events if name == lane and not isinstance(item, Frame)]

    def result(self, lane: str = "dlm"):
        """The lane's last record (for "dlm" / "ar": the Generation), or None."""
        items = self.items(lane)
        return items[-1] if items else None

    def extend(self, other: "Batch") -> None:
        self.events += other.events
        self.cancelled |= other.cancelled
        self.reason = other.reason or self.reason


class Cancelled(Exception):
    """Raised inside the worker (between steps or before a transformer layer) once a run's cancel event is set."""


class TimeLimitExceeded(ValueError):
    """A run went past the server's time limit per request (it ends like a Stop, with this message as reason)."""


class Busy(ValueError):
    """A request refused before it waits: its client address has `per_client` requests waiting already, or
    `max_waiting` wait in all. Nothing was started; the message says so (information, not a failure of the run)."""


class Caller(str):
    """A session id (what Stop and a closed tab act on) that also carries its client's address (what the fair order
    and the bound on waiting work count by): `caller(request)` makes one from a Gradio request."""

    address: str

    def __new__(cls, session: str, address: str):
        obj = super().__new__(cls, session)
        obj.address = address
        return obj


def caller(request) -> Optional[str]:
    """The `Caller` of a Gradio request (its session id and its client's address; `app.http_guard.ApiGuard` has already
    put the forwarded address there when the connection comes from a proxy the operator trusts); None without a
    request, the bare session id without an address."""
    session = getattr(request, "session_hash", None) if request is not None else None
    if session is None:
        return None
    try:
        host = request.client.host
    except Exception:  # noqa: BLE001  (no connection: a request built in a test or a script)
        host = None
    return Caller(session, host) if host else session


def lane(name: str, stream) -> Iterator[tuple[str, Any]]:
    """A model stream (Frames, then the Generation) as events of one lane."""
    for item in stream:
        yield name, item


class Run:
    """One request's model work: a worker thread that holds the model lock and runs `job()` (a generator of
    `(lane, item)` events), a cancel event, the time limit, and throttled delivery.

    The worker never waits for the consumer, so the model's timing is not affected by rendering. Cancellation
    (`cancel()`, the session's Stop, a consumer that goes away) and the time limit are checked between events and
    before every transformer layer (the worker's layer hooks), so even one long forward pass stops promptly.
    `first_event_seconds`: from the start of the work to its first event (time to first frame).
    `display`: how this run's tokens are shown (`app.model_lifecycle.Display`), captured from the model the run uses
    when it was asked for, so a model switched meanwhile cannot mix another tokenizer or mask id into its drawing.
    """

    def __init__(self, worker: "Worker", job: Job, session: Optional[str], display=None, cost: float = 0.0):
        self.worker = worker
        self.session = session or uuid.uuid4().hex
        # the fair order and the bound on waiting work are per client address (`Caller.address`, set from the
        # HTTP connection, or the forwarded address from a trusted proxy); without one, per session
        self.client = str(getattr(session, "address", None) or self.session)
        self.display = display
        self.cost = float(cost)  # estimated work (token-forwards; 0 = unknown), for the worker's order
        self.cancel_event = threading.Event()
        self.time_limit = worker.time_limit
        self.started: Optional[float] = None  # when it first got the model
        self.used = 0.0  # seconds it held the model in its finished turns (the time limit counts these)
        self._since: Optional[float] = None  # when its current turn began (None: not holding the model)
        self.epoch = worker.epoch  # the model generation it was asked for (a switch since then refuses it)
        self.prompt_tokens: Optional[int] = None  # set where a run continues a prompt
        self.first_event_seconds: Optional[float] = None
        self._q: queue.Queue = queue.Queue()
        self._last: Optional[float] = None
        self._finished = False
        worker._register(self)
        self.thread = threading.Thread(target=self._work, args=(job,), name="dlm-run", daemon=True)
        self.thread.start()

    # ---- worker side
    def elapsed(self) -> float:
        """Seconds it has held the model (its turns so far, the current one included)."""
        return self.used + (time.monotonic() - self._since if self._since is not None else 0.0)

    def check(self) -> None:
        """Raise Cancelled / TimeLimitExceeded when the run must end now."""
        if self.cancel_event.is_set():
            raise Cancelled()
        if self.time_limit and self.elapsed() > self.time_limit:
            raise TimeLimitExceeded(
                f"time limit: the request ran past this server's limit of {self.time_limit:g} s per request "
                f"(dlm-studio --time-limit); try a shorter length, fewer steps or a shorter prompt")

    def _turn_begins(self) -> None:
        """Wait for its turn in the worker's order, then hold the model (the lock)."""
        self.worker._wait_turn(self)  # Cancelled while waiting
        self.worker.lock.acquire()
        self._since = time.monotonic()
        self.started = self.started or self._since
        self.worker.active = self
        if self.epoch != self.worker.epoch:
            raise ValueError("model: another model was loaded since this request was made; run it again")

    def _turn_ends(self, requeue: bool = False) -> None:
        """Let go of the model (and with `requeue`, wait for the next turn in the worker's order)."""
        if self._since is None:
            return
        turn = time.monotonic() - self._since
        self.used += turn
        self._since = None
        self.worker.active = None
        self.worker.lock.release()
        self.worker._release(self, turn, requeue=requeue)

    def _work(self, job: Job) -> None:
        events = None
        try:
            try:
                self._turn_begins()
                self.check()
                events = job()
                for name, item in events:
                    if self.first_event_seconds is None:
                        self.first_event_seconds = time.monotonic() - self.started
                    self._q.put(("item", name, item))
                    self.check()
                    if self.worker._should_pause(self):  # a lighter request waits: it goes first
                        self._turn_ends(requeue=True)
                        self._turn_begins()
                        self.check()
            finally:
                if events is not None:
                    events.close()
                self._turn_ends()
        except Cancelled:
            self._q.put(("cancelled", None, None))
        except TimeLimitExceeded as e:  # ends like a Stop: what was delivered stays, with the message
            self._q.put(("cancelled", None, str(e)))
        except BaseException as e:  # delivered to the consumer, raised there
            self._q.put(("error", None, e))
        finally:
            self.worker._unregister(self)
            self._q.put(("end", None, None))

    # ---- consumer side
    def cancel(self) -> None:
        self.cancel_event.set()
        self.worker._wake()

    def _next(self, poll: Optional[float] = None) -> Optional[Batch]:
        """The next batch: the first event at once, then whatever arrived within `min_frame_interval`; an empty
        batch after `poll` seconds without events; None once the run has ended."""
        if self._finished:
            return None
        interval = self.worker.min_frame_interval
        batch, due = Batch(), None
        polled = None if poll is None else time.monotonic() + poll
        while True:
            now = time.monotonic()
            ends = [t for t in (due, polled if not batch.events else None) if t is not None]
            timeout = max(0.0, min(ends) - now) if ends else None
            try:
                kind, name, item = self._q.get(timeout=timeout)
            except queue.Empty:
                if batch.events:
                    self._last = time.monotonic()
                return batch
            if kind == "item":
                batch.events.append((name, item))
                if self._last is None:  # the first event goes out at once
                    self._last = time.monotonic()
                    return batch
                due = self._last + interval
                if time.monotonic() >= due:
                    self._last = time.monotonic()
                    return batch
            elif kind == "cancelled":
                batch.cancelled = True
                batch.reason = item or ""
            elif kind == "error":
                self._finished = True
                raise item
            elif kind == "end":
                self._finished = True
                return batch if batch.events or batch.cancelled else None

    def batches(self) -> Iterator[Batch]:
        """Throttled batches until the run ends (errors raised here); closing early cancels the run."""
        try:
            while (batch := self._next()) is not None:
                yield batch
        finally:
            self.cancel()

    async def abatches(self):
        """`batches` for async event handlers: when Gradio cancels the handler (Stop, a cancelled client job, a
        closed tab) the CancelledError lands here and the run is cancelled at once, whatever it is doing."""
        try:
            while True:
                batch = await asyncio.to_thread(self._next, 0.5)
                if batch is None:
                    return
                if batch.events or batch.cancelled:
                    yield batch
        finally:
            self.cancel()

    def wait(self) -> Batch:
        """Every event of the run in one Batch (blocking; errors raised)."""
        out = Batch()
        for b in self.batches():
            out.extend(b)
        return out

    async def await_all(self) -> Batch:
        out = Batch()
        async for b in self.abatches():
            out.extend(b)
        return out


class Worker:
    """Runs requests one at a time, in a fair order, and bounds them.

    lock:               held by the running request (and by model loading, which so waits for running work).
    min_frame_interval: at most one delivery per this many seconds while streaming (default 1/15 s); the first
                        event and the end are always delivered at once.
    time_limit:         seconds of model work one request may take (None = no limit).
    per_client:         requests one client address may have waiting (not started) besides its running one
                        (default 4: two tabs, a small batch of API jobs); one more is refused before it waits
                        (`Busy`), nothing it sent is dropped. A client is its address, not an id it picks
                        (`Run.client`); a run without one is its own session.
    max_waiting:        requests allowed to wait in all (None = no bound); more are refused with a message.
    active:             the run holding the lock (its thread runs the forwards), None when idle.

    Fair order: when the model frees, the waiting run with the smallest (model time its client used recently,
    decaying with a half-life of `USAGE_HALF_LIFE_S`) + (its own expected seconds: its `cost` x the seconds per
    token-forward measured on the runs so far) goes next, ties in arrival order. Between two events (a denoising
    step), the running request pauses for a waiting one whose key is lower than its own (its client's usage with
    this turn's time) by more than `PAUSE_MARGIN_S`, and resumes in its turn; so a short request of a light client
    waits about one step, not for the run in progress, however many long ones other clients keep queued, while two
    long ones still take turns a run at a time. A request paused or waiting when another model is loaded ends with
    a message (it was asked of the other model).
    """

    USAGE_HALF_LIFE_S = 60.0
    PAUSE_MARGIN_S = 0.5

    def __init__(self, min_frame_interval: float = 1 / 15, time_limit: Optional[float] = None, *,
                 per_client: int = 4, max_waiting: Optional[int] = None):
        self.lock = threading.RLock()
        self.min_frame_interval = float(min_frame_interval)
        self.time_limit = time_limit
        self.per_client = max(1, int(per_client))
        self.max_waiting = max_waiting
        self.active: Optional[Run] = None
        self.epoch = 0  # the model generation: `app.model_lifecycle.Models` counts it up on every load
        self._cv = threading.Condition()
        self._waiting: list[Run] = []  # arrival order
        self._turn: Optional[Run] = None  # the run given the model (from its turn to its end)
        self._usage: dict[str, tuple[float, float]] = {}  # client -> (decayed model seconds, as of when)
        self._rate = 0.0  # seconds per token-forward, averaged over the finished runs with a cost
        self._runs: dict[str, list[Run]] = {}  # session -> its runs (waiting or running), arrival order

    def start(self, job: Job, session: Optional[str] = None, display=None, cost: float = 0.0) -> Run:
        """Run `job` (a generator function of (lane, item) events that calls the model) in a worker thread, in
        the worker's fair order; `cost`: its estimated work in token-forwards (0 = unknown). Refused (`Busy`)
        when its client has `per_client` runs waiting already, or `max_waiting` wait in all."""
        with self._cv:
            self.admit(session)
            return Run(self, job, session, display, cost)

    def admit(self, session: Optional[str] = None) -> None:
        """Raise `Busy` when a request of `session`'s client would be refused now (its client has `per_client`
        runs waiting, or `max_waiting` wait in all): checked again by `start`, and first of all by the backend,
        before a request is tokenized."""
        client = str(getattr(session, "address", None) or session or "")
        with self._cv:
            mine = self.waiting(client=client) if client else 0
            if client and mine >= self.per_client:
                raise Busy(f"queue: not started: {mine} of your requests are already waiting for the model (this "
                           f"server keeps at most {self.per_client} waiting per client: dlm-studio "
                           f"--queue-per-client); send it again when one of them has finished")
            waiting = self.waiting()
            if self.max_waiting is not None and waiting >= self.max_waiting:
                raise Busy(f"queue: the server is busy ({waiting} requests waiting, its limit "
                           f"(dlm-studio --queue-size)); try again in a moment")

    def stop(self, session: Optional[str]) -> bool:
        """Ask the session's work to stop now: its running run before the next transformer layer, its waiting
        runs before they start. True if it had any."""
        with self._cv:
            runs = list(self._runs.get(session or "", ()))
        for run in runs:
            run.cancel()
        return bool(runs)

    def waiting(self, session: Optional[str] = None, *, client: Optional[str] = None) -> int:
        """Runs waiting that have not started yet (of one session, of one client address, or in all); paused ones
        are not counted."""
        with self._cv:
            return sum(1 for r in self._waiting
                       if r.started is None and not r.cancel_event.is_set() and session in (None, r.session)
                       and client in (None, r.client))

    # ---- the schedule
    def _register(self, run: Run) -> None:
        """A new run of its session waits (its client's bound was held by `start`)."""
        with self._cv:
            self._runs.setdefault(run.session, []).append(run)
            self._waiting.append(run)
            self._cv.notify_all()

    def _unregister(self, run: Run) -> None:
        with self._cv:
            mine = self._runs.get(run.session, [])
            if run in mine:
                mine.remove(run)
            if not mine:
                self._runs.pop(run.session, None)
            if run in self._waiting:
                self._waiting.remove(run)
            self._cv.notify_all()

    def _wake(self) -> None:
        with self._cv:
            self._cv.notify_all()

    def _usage_of(self, client: str, now: float) -> float:
        used, when = self._usage.get(client, (0.0, now))
        return used * 0.5 ** ((now - when) / self.USAGE_HALF_LIFE_S)

    def _key(self, run: Run, now: float) -> float:
        """A waiting run's place in the order: its client's recent model time + its own expected seconds."""
        return self._usage_of(run.client, now) + max(run.cost * self._rate - run.used, 0.0)

    def _next(self) -> Optional[Run]:
        now = time.monotonic()
        live = [r for r in self._waiting if not r.cancel_event.is_set()]
        return min(live, key=lambda r: self._key(r, now)) if live else None  # min: the first of ties

    def _should_pause(self, run: Run) -> bool:
        """Whether the running `run` should let a waiting one go first now (see the class notes)."""
        with self._cv:
            best = self._next()
            if best is None:
                return False
            now = time.monotonic()
            mine = self._usage_of(run.client, now) + (now - run._since if run._since is not None else 0.0)
            return self._key(best, now) + self.PAUSE_MARGIN_S < mine

    def _wait_turn(self, run: Run) -> None:
        """Block until it is `run`'s turn (the model free and `run` first in the fair order); raise Cancelled when
        it is cancelled meanwhile (it then never touches the model)."""
        with self._cv:
            while True:
                if run.cancel_event.is_set():
                    if run in self._waiting:
                        self._waiting.remove(run)
                    self._cv.notify_all()
                    raise Cancelled()
                if self._turn is None and self._next() is run:
                    self._waiting.remove(run)
                    self._turn = run
                    return
                self._cv.wait(timeout=0.5)

    def _release(self, run: Run, turn: float, *, requeue: bool = False) -> None:
        """`run` let go of the model after a turn of `turn` seconds: charge its client, learn the seconds per
        token-forward when it is done, give the model to the next one (and with `requeue`, `run` waits again)."""
        with self._cv:
            if self._turn is run:
                self._turn = None
            now = time.monotonic()
            self._usage[run.client] = (self._usage_of(run.client, now) + turn, now)
            if requeue:
                self._waiting.append(run)
            elif run.cost > 0 and not run.cancel_event.is_set():
                rate = run.used / run.cost
                self._rate = rate if self._rate == 0 else 0.8 * self._rate + 0.2 * rate
            for client in [c for c in self._usage if self._usage_of(c, now) < 0.01]:
                del self._usage[client]  # forgotten: the table stays as small as the active clients
            self._cv.notify_all()

    def install_hooks(self, model) -> None:
        """A forward pre-hook on every transformer layer of `model` that checks the active run's cancel event and
        time limit: Stop, a cancelled client job and the limit end even one long forward within a layer's time."""
        import torch
        layers = [m for lst in model.base.modules() if isinstance(lst, torch.nn.ModuleList) for m in lst]
        for m in layers or [model.base]:
            m.register_forward_pre_hook(self._check_active)

    def _check_active(self, module, args) -> None:
        run = self.active
        if run is not None and threading.current_thread() is run.thread:
            run.check()
