"""What every event handler does around the backend, a tab's or an API endpoint's alike: its concurrency settings,
the caller's session, starting the work off the event loop, and turning a failure into one line for the browser or
an API client. No layout here: the tabs (`app/tabs/`) and the endpoints (`app/api.py`) both import it."""
from __future__ import annotations

import asyncio
from typing import Callable, Optional

import gradio as gr

from app.checks import describe_error
from app.worker import Busy, Run, caller

# Every event using a model. Its handler starts at once: the worker (app/worker.py) queues the model work in its fair
# order, bounds what waits (per session, in all) and says so; Gradio's own FIFO queue would let one client's
# requests hold the model for everyone.
MODEL = dict(concurrency_id="model", concurrency_limit=None, api_visibility="private")
LIGHT = dict(concurrency_limit=None, api_visibility="private", show_progress="hidden")  # render-only events


def session(request: Optional[gr.Request]) -> Optional[str]:
    """The request's session id, carrying its client's address (`app.worker.caller`: fairness is per address)."""
    return caller(request)


async def offload(fn: Callable, *args, **kwargs):
    """Run `fn` (checking a request, tokenizing it, starting its run) in a thread: never on the event loop, which
    serves every page, every Stop and every other request. A handler cancelled meanwhile (Stop, a closed tab, a
    cancelled job) cancels the run `fn` starts, so no run is left without a consumer."""
    task = asyncio.ensure_future(asyncio.to_thread(fn, *args, **kwargs))
    try:
        run = await asyncio.shield(task)
        if isinstance(run, Run) and queued_behind_own(run):
            gr.Info("Queued: your other request is using the model; this one starts when it ends or pauses.")
        return run
    except asyncio.CancelledError:
        def orphan(t):
            if not t.cancelled() and t.exception() is None and isinstance(t.result(), Run):
                t.result().cancel()
        task.add_done_callback(orphan)
        raise


def queued_behind_own(run: Run) -> bool:
    """Whether `run` waits for a run of its own client (a second click while the first one runs)."""
    active = run.worker.active
    return active is not None and active is not run and active.client == run.client and run.started is None


def ended(batch):
    """A whole run's events (`Run.await_all`); a run ended by the time limit raises its message (the endpoints
    and handlers that return one result have no partial one to show)."""
    if batch.reason:
        raise ValueError(batch.reason)
    return batch


def fail(e: BaseException, *, for_browser: bool = True):
    """Re-raise anything as a gr.Error with a one-line message (the server keeps serving). The browser renders
    error messages as HTML, so `<` is escaped there (messages may quote user input); API clients get it raw."""
    if isinstance(e, gr.Error):
        raise e
    message = describe_error(e)
    if for_browser and isinstance(e, Busy):  # nothing was started or lost: information, not an error
        gr.Warning(message.replace("<", "&lt;"))
        return
    raise gr.Error(message.replace("<", "&lt;") if for_browser else message, print_exception=False) from None
