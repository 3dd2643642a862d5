"""The playground's only path to a model, for the UI and the named API alike: it loads / switches / frees the DLM
and its AR counterpart, validates every request (one function for the sampler knobs, one for the other fields),
bounds what one request may cost (prompt tokens, seconds), and runs the model work in a worker thread that checks a
cancel event before every transformer layer. No Gradio in here: errors are plain exceptions with one-line messages
naming the field (`describe_error`), shown by the UI.

    b = Backend(); b.load("smollm2-135m-dlm")
    cfg = b.sampler({"max_new_tokens": 32, "steps": 16})          # UI / API values on the model's recommended config
    run = b.generate("Once upon a time", cfg, session="s1")         # a Run: the work has started in its worker
    for batch in run.batches(): ...                                  # throttled Frames, then the Generation
"""
from __future__ import annotations

import asyncio
import gc
import importlib.util
import logging
import math
import os
import queue
import re
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import dlm
from app import MAX_PROMPT_TOKENS, TIME_LIMIT_S
from app.examples import answer_of, matches
from dlm import registry
from dlm.infill import edit_canvas, pair_canvas, split_template, template_canvas
from dlm.quality import distinct_n, judge_ppl
from dlm.sampler_config import SamplerConfig
from dlm.sampling import check_length, cut_at_eos, encode_prompt
from dlm.types import Frame, Generation

log = logging.getLogger("dlm.app")

DEFAULT_DLM = "smollm2-135m-dlm"
FALLBACK_DLM = "smollm2-135m"  # the un-adapted base, used as a DLM when the adapted model is missing
DEVICES = ["auto", "cpu", "cuda", "mps"]
DTYPES = ["auto", "float32", "bfloat16", "float16"]
QUANTIZATIONS = ["none", "8bit", "4bit"]
NOT_ADAPTED = "not diffusion-adapted yet: output is noise-like"


# ------------------------------------------------------------------------------------------------------- records
@dataclass
class ModelInfo:
    """What the Model tab shows about the loaded models."""

    name: str = ""
    source: str = ""
    kind: str = ""  # registry kind, "" for a local path / hub id
    adapter: str = ""
    quantization: str = "none"
    device: str = ""
    dtype: str = ""
    parameters: int = 0
    weights_mb: float = 0.0
    load_seconds: float = 0.0
    mask_token_id: int = -1
    max_length: int = 0
    ar_name: str = ""  # "" = the same weights run causally
    ar_load_seconds: float = 0.0
    notice: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Batch:
    """What a run delivers at once (throttled): the events since the last batch, each `(lane, item)`.

    Lanes name the streams of one run: "dlm" (the diffusion model's Frames, then its Generation), "ar" (the AR
    model's), and plain records such as "clock", "summary", "sweep" or "row" (dicts). `cancelled`: the run was
    stopped (Stop, a closed tab, a cancelled client job) after these events.
    """

    events: list[tuple[str, Any]] = field(default_factory=list)
    cancelled: bool = False

    def frames(self, lane: str = "dlm") -> list[Frame]:
        return [item for name, item in self.events if name == lane and isinstance(item, Frame)]

    def items(self, lane: str) -> list:
        """The lane's records (everything but Frames), in order."""
        return [item for name, item in self.events if name == lane and not isinstance(item, Frame)]

    def result(self, lane: str = "dlm"):
        """The lane's last record (for "dlm" / "ar": the Generation), or None."""
        items = self.items(lane)
        return items[-1] if items else None


class Cancelled(Exception):
    """Raised inside the worker (between steps or before a transformer layer) once a run's cancel event is set."""


class TimeLimitExceeded(ValueError):
    """A run went past the server's time limit per request."""


# ---------------------------------------------------------------------------------------------------- messages
def describe_error(e: BaseException) -> str:
    """A one-line message for users. Bad input (ValueError, a SamplerConfigError, an unknown model) says what is
    wrong and names the field; out of memory says what to try; anything else is an internal error: its type is
    shown and its text goes to the server log, never a Python message such as "'int' object has no attribute"."""
    text = (str(e).strip() or type(e).__name__).splitlines()[0]
    if "out of memory" in text.lower() or type(e).__name__ == "OutOfMemoryError":
        return ("Out of memory: try a shorter length, fewer concurrent runs, a smaller dtype (bfloat16) or "
                "quantization, or a smaller model. The server is still running.")
    if isinstance(e, KeyError):
        return text.strip("\"'")
    if isinstance(e, (ValueError, FileNotFoundError, dlm.LoadError)):
        return text
    log.exception("internal error", exc_info=e)
    return f"internal error ({type(e).__name__}); the details are in the server log. The server is still running."


def parse_int_list(text, what: str = "values") -> list[int]:
    """'4, 8 16' (or [4, 8, 16]) -> [4, 8, 16]; raises ValueError naming the bad item."""
    items = [str(t) for t in text] if isinstance(text, (list, tuple)) else \
        [t for t in re.split(r"[,\s]+", str(text or "").strip()) if t]
    out = []
    for t in items:
        if not re.fullmatch(r"\d+", t.strip()) or int(t) < 1:
            raise ValueError(f"{what}: {t!r} is not a positive whole number (write e.g. 4, 8, 16)")
        out.append(int(t))
    if not out:
        raise ValueError(f"{what}: give at least one positive number, e.g. 4, 8, 16")
    if len(out) > 8:
        raise ValueError(f"{what}: at most 8 values, got {len(out)}")
    return out


# -------------------------------------------------------------------------------------------------- validation
def _text(name: str, v) -> str:
    if v is None:
        return ""
    if not isinstance(v, str):
        raise ValueError(f"{name}: must be text, got {v!r}")
    return v


def _flag(name: str, v) -> bool:
    if v is None:
        return False
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.strip().lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
        return v.strip().lower() in ("true", "yes", "on", "1")
    raise ValueError(f"{name}: must be true or false, got {v!r}")


def _whole(name: str, v, minimum: int = 1) -> Optional[int]:
    """A whole number >= minimum (None or "" stays None: the caller's default)."""
    if v is None or (isinstance(v, str) and not v.strip()):
        return None
    n = None
    if isinstance(v, int) and not isinstance(v, bool):
        n = v
    elif isinstance(v, float) and math.isfinite(v) and v.is_integer():
        n = int(v)
    elif isinstance(v, str) and re.fullmatch(r"\s*[+-]?\d+\s*", v):
        n = int(v)
    if n is None or n < minimum:
        raise ValueError(f"{name}: must be a whole number >= {minimum}, got {v!r}")
    return n


def _count(name: str, v) -> Optional[int]:
    return _whole(name, v, 1)


def _pins(name: str, v) -> dict[int, str]:
    """'0: Paris; 5: France' (or {0: " Paris"}) -> {0: " Paris", 5: " France"}: text held fixed at offsets of the
    generated region; the text is what follows the colon, its leading space included (BPE words carry one)."""
    if v is None or (isinstance(v, (str, dict)) and not v):
        return {}
    if isinstance(v, dict):
        pairs = list(v.items())
    elif isinstance(v, str):
        pairs = []
        for part in re.split(r"[;\n]", v):
            if part.strip():
                pos, colon, word = part.partition(":")
                if not colon:
                    raise ValueError(f"{name}: write position: word pairs such as '0: Paris; 5: France', "
                                     f"got {part.strip()!r}")
                pairs.append((pos, word.rstrip()))
    else:
        raise ValueError(f"{name}: write position: word pairs such as '0: Paris; 5: France', got {v!r}")
    out = {}
    for pos, word in pairs:
        k = _whole(f"{name} position", pos, 0)
        if k is None or not isinstance(word, str) or not word.strip():
            raise ValueError(f"{name}: each pin needs a position >= 0 and a word, got {pos!r}: {word!r}")
        out[k] = word
    return out


def _edits(name: str, v) -> list[tuple[int, int, Optional[int]]]:
    """[[start, end, new_length or None], ...]: offsets into the generated tokens, end exclusive."""
    if not isinstance(v, (list, tuple)) or not v:
        raise ValueError(f"{name}: give a list of [start, end, new_length or null] spans (offsets into the "
                         f"generated tokens, end exclusive), got {v!r}")
    out = []
    for e in v:
        if not isinstance(e, (list, tuple)) or len(e) not in (2, 3):
            raise ValueError(f"{name}: each edit is [start, end] or [start, end, new_length], got {e!r}")
        start, end = _whole(f"{name} start", e[0], 0), _whole(f"{name} end", e[1], 1)
        new = _count(f"{name} new_length", e[2]) if len(e) == 3 else None
        if start is None or end is None or end <= start:
            raise ValueError(f"{name}: each edit needs 0 <= start < end, got {list(e)!r}")
        out.append((start, end, new))
    return out


def ui_edit(start, end, new_length) -> tuple[int, int, Optional[int]]:
    """The Edit panel's selection -> one edit: tokens `start` … `end` (inclusive, offsets into the generated
    region), remasked as `new_length` tokens (0 / empty = the same count)."""
    a, b = _whole("edit from", start, 0), _whole("edit to", end, 0)
    if a is None or b is None or b < a:
        raise ValueError(f"edit: select tokens first (from {start!r} to {end!r}: 'to' must be >= 'from')")
    n = _whole("edit new length", new_length, 0)
    return a, b + 1, n or None


def _token_ids(name: str, v) -> list[int]:
    if not isinstance(v, (list, tuple)) or not v:
        raise ValueError(f"{name}: give the generated token ids as a non-empty list of integers, got {v!r}")
    ids = [_whole(name, t, 0) for t in v]
    if None in ids:
        raise ValueError(f"{name}: must be whole numbers >= 0, got {v!r}")
    return ids


FIELDS: dict[str, Callable[[str, Any], Any]] = dict(
    prompt=_text, template=_text, prefix=_text, suffix=_text, chat=_flag, frames=_flag, length=_count,
    new_length=_count, pins=_pins, edits=_edits, token_ids=_token_ids,
    sweep_steps=lambda name, v: [] if v is None or (isinstance(v, str) and not v.strip()) else parse_int_list(v, name),
)


def check_fields(**values) -> dict:
    """The one validation of a request's non-sampler fields (prompt, template, prefix, suffix, length, chat,
    frames, pins, edits, sweep_steps): each coerced by its kind, or a ValueError naming the field."""
    return {name: FIELDS[name](name, v) for name, v in values.items()}


def sampler_config(values: dict, base: SamplerConfig, *, infill: bool = False) -> SamplerConfig:
    """The one conversion of UI / API sampler values into a validated SamplerConfig on top of `base` (the loaded
    model's recommended config): `SamplerConfig.from_dict(..., ui=True)`, so strings and floats are coerced, each
    field's `off` sentinel means None (threshold 0, seed -1, block_length 0) and a value left out or None keeps
    base's. Messages name the field (SamplerConfig's own). For infilling (`infill`) the template fixes the length,
    so the shared steps slider is capped at the masked tokens (`cap_steps`) instead of refused.
    """
    given = {k: v for k, v in (values or {}).items() if not (v is None or (isinstance(v, str) and not v.strip()))}
    cfg = SamplerConfig.from_dict({**base.to_dict(), **given}, ui=True)
    if not infill and cfg.steps is not None:
        cfg.steps_for(cfg.max_new_tokens)  # steps above the length: the library's message, before any work
    return cfg


def cap_steps(config: SamplerConfig, n_masked: int) -> SamplerConfig:
    """Infilling: the template fixes the number of masked tokens, so the UI's steps are capped at it."""
    return config.replace(steps=min(config.steps, n_masked)) if config.steps and config.steps > n_masked else config


def ui_value(cfg: SamplerConfig, name: str, *, steps_default: Optional[int] = None):
    """What a widget shows for a config field: None as the field's `off` value (the inverse of `sampler_config`);
    steps None (one per token) as the length."""
    value = getattr(cfg, name)
    if value is None:
        if name == "steps":
            return steps_default if steps_default is not None else cfg.max_new_tokens
        off = next((d.get("off") for d in SamplerConfig.describe() if d["name"] == name), None)
        return off
    return value


def with_span_length(template: str, n: int) -> str:
    """Set every `[MASK]` / `[MASK:k]` span of a template to `n` tokens (for the span-length sweep)."""
    return "".join(p if isinstance(p, str) else f"[MASK:{n}]" for _, p in split_template(template))


def _finite(x: float) -> Optional[float]:
    return x if isinstance(x, float) and math.isfinite(x) else None


def bitsandbytes_available() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def _memory_mb(model) -> float:
    """Bytes held by the model's parameters and buffers (quantized weights counted at their packed size)."""
    try:
        return model.base.get_memory_footprint() / 2**20
    except Exception:
        tensors = list(model.base.parameters()) + list(model.base.buffers())
        return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def process_memory() -> str:
    """Resident memory of this process, plus CUDA memory when a GPU is in use."""
    parts = []
    try:
        import psutil
        parts.append(f"process RSS {psutil.Process().memory_info().rss / 2**30:.2f} GiB")
    except Exception:
        try:
            pages = int(Path("/proc/self/statm").read_text().split()[1])
            parts.append(f"process RSS {pages * os.sysconf('SC_PAGE_SIZE') / 2**30:.2f} GiB")
        except Exception:
            pass
    try:
        import torch
        if torch.cuda.is_available():
            parts.append(f"CUDA allocated {torch.cuda.memory_allocated() / 2**30:.2f} GiB "
                         f"(reserved {torch.cuda.memory_reserved() / 2**30:.2f} GiB)")
    except Exception:
        pass
    return " · ".join(parts)


# --------------------------------------------------------------------------------------------------------- runs
class Run:
    """One request's model work: a worker thread that holds the model lock and runs `job()` (a generator of
    `(lane, item)` events), a cancel event, the time limit, and throttled delivery.

    The worker never waits for the consumer, so the model's timing is not affected by rendering. Cancellation
    (`cancel()`, the session's Stop, a consumer that goes away) and the time limit are checked between events and
    before every transformer layer (the backend's layer hooks), so even one long forward pass stops promptly.
    `first_event_seconds`: from the start of the work to its first event (time to first frame).
    """

    def __init__(self, backend: "Backend", job: Callable[[], Iterator[tuple[str, Any]]], session: Optional[str]):
        self.backend = backend
        self.session = session or uuid.uuid4().hex
        self.cancel_event = threading.Event()
        self.time_limit = backend.time_limit
        self.started: Optional[float] = None
        self.prompt_tokens: Optional[int] = None  # set by the backend where a run continues a prompt
        self.first_event_seconds: Optional[float] = None
        self._q: queue.Queue = queue.Queue()
        self._last: Optional[float] = None
        self._finished = False
        backend._register(self)
        self.thread = threading.Thread(target=self._work, args=(job,), name="dlm-run", daemon=True)
        self.thread.start()

    # ---- worker side
    def check(self) -> None:
        """Raise Cancelled / TimeLimitExceeded when the run must end now."""
        if self.cancel_event.is_set():
            raise Cancelled()
        if self.time_limit and self.started is not None and time.monotonic() - self.started > self.time_limit:
            raise TimeLimitExceeded(
                f"time limit: the request ran past this server's limit of {self.time_limit:g} s per request "
                f"(app.py --time-limit); try a shorter length, fewer steps or a shorter prompt")

    def _work(self, job) -> None:
        try:
            with self.backend.lock:
                self.started = time.monotonic()
                self.backend._active = self
                events = None
                try:
                    self.check()
                    events = job()
                    for lane, item in events:
                        if self.first_event_seconds is None:
                            self.first_event_seconds = time.monotonic() - self.started
                        self._q.put(("item", lane, item))
                        self.check()
                finally:
                    self.backend._active = None
                    if events is not None:
                        events.close()
        except Cancelled:
            self._q.put(("cancelled", None, None))
        except BaseException as e:  # delivered to the consumer, raised there
            self._q.put(("error", None, e))
        finally:
            self.backend._unregister(self)
            self._q.put(("end", None, None))

    # ---- consumer side
    def cancel(self) -> None:
        self.cancel_event.set()

    def _next(self, poll: Optional[float] = None) -> Optional[Batch]:
        """The next batch: the first event at once, then whatever arrived within `min_frame_interval`; an empty
        batch after `poll` seconds without events; None once the run has ended."""
        if self._finished:
            return None
        interval = self.backend.min_frame_interval
        batch, due = Batch(), None
        polled = None if poll is None else time.monotonic() + poll
        while True:
            now = time.monotonic()
            ends = [t for t in (due, polled if not batch.events else None) if t is not None]
            timeout = max(0.0, min(ends) - now) if ends else None
            try:
                kind, lane, item = self._q.get(timeout=timeout)
            except queue.Empty:
                if batch.events:
                    self._last = time.monotonic()
                return batch
            if kind == "item":
                batch.events.append((lane, item))
                if self._last is None:  # the first event goes out at once
                    self._last = time.monotonic()
                    return batch
                due = self._last + interval
                if time.monotonic() >= due:
                    self._last = time.monotonic()
                    return batch
            elif kind == "cancelled":
                batch.cancelled = True
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
            out.events += b.events
            out.cancelled |= b.cancelled
        return out

    async def await_all(self) -> Batch:
        out = Batch()
        async for b in self.abatches():
            out.events += b.events
            out.cancelled |= b.cancelled
        return out


def _lane(name: str, stream) -> Iterator[tuple[str, Any]]:
    for item in stream:
        yield name, item


# ------------------------------------------------------------------------------------------------------ backend
class Backend:
    """Owns the loaded DLM and its AR counterpart; every model call runs in a `Run` holding `self.lock`.

    min_frame_interval: at most one delivery per this many seconds while streaming (default 1/15 s); the first
                        event and the end are always delivered at once.
    max_prompt_tokens:  the longest prompt (or infilling context) one request may have (None = the model's context).
    time_limit:         seconds of model work one request may take (None = no limit).
    """

    def __init__(self, min_frame_interval: float = 1 / 15, *, max_prompt_tokens: Optional[int] = MAX_PROMPT_TOKENS,
                 time_limit: Optional[float] = TIME_LIMIT_S):
        self.lock = threading.RLock()
        self.min_frame_interval = float(min_frame_interval)
        self.max_prompt_tokens = max_prompt_tokens
        self.time_limit = time_limit
        self.model = None  # DiffusionLM
        self.ar = None  # DiffusionLM used causally; None = not loaded yet (lazy)
        self.ar_source: Optional[str] = None  # None = the DLM's own weights run causally
        self.info = ModelInfo()
        self._load_args: Optional[dict] = None
        self.loads = 0  # models loaded so far (pages built earlier refresh their widgets when it changes)
        self._runs: dict[str, Run] = {}
        self._runs_lock = threading.Lock()
        self._active: Optional[Run] = None  # the run holding the lock (its worker thread runs the forwards)

    # ---------------------------------------------------------------------------------------- loading
    def load(self, source: str, *, adapter: Optional[str] = None, quantization: Optional[str] = "none",
             device: str = "auto", dtype: str = "auto", mask_token_id: Optional[int] = None,
             ar_source: Optional[str] = None, notice: str = "") -> ModelInfo:
        """Load `source` (registry name, local path or hub id) as the DLM, freeing the current models first.

        adapter:      optional peft LoRA directory applied on top.
        quantization: none / 8bit / 4bit (bitsandbytes; on CPU it saves memory but runs slower than float32).
        device/dtype: as for `dlm.load` ("auto" = GPU with bf16 when there is one, else CPU float32).
        ar_source:    the AR model to compare with; None = the DLM's registered counterpart, and when that is
                      the DLM's own base (or unknown) the same weights are run causally (no second copy).
        If loading fails the previous model is loaded back, and the error is raised.
        """
        source = _text("model", source).strip()
        if not source:
            raise ValueError("model: choose a registry model or type a local model path")
        adapter = _text("adapter", adapter).strip() or None
        quantization = _text("quantization", quantization).strip().lower() or "none"
        if quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization: must be one of {', '.join(QUANTIZATIONS)}, got {quantization!r}")
        if quantization != "none" and not bitsandbytes_available():
            raise ValueError(f"quantization: {quantization} needs the optional package bitsandbytes "
                             "(pip install bitsandbytes). Note: on a CPU it only saves memory; it runs slower "
                             "than float32 / bfloat16.")
        if adapter is not None and not Path(adapter).expanduser().is_dir():
            raise ValueError(f"adapter: LoRA adapter directory not found: {adapter}")
        mask_token_id = _whole("mask token id", mask_token_id, -1)
        if mask_token_id is not None and mask_token_id < 0:
            mask_token_id = None
        args = dict(source=source, adapter=adapter, quantization=quantization, device=device or "auto",
                    dtype=dtype or "auto", mask_token_id=mask_token_id,
                    ar_source=_text("AR model", ar_source).strip() or None, notice=notice)
        with self.lock:
            previous = self._load_args
            self.free()
            try:
                self._load(**args)
            except BaseException:
                if previous is not None and previous != args:
                    try:
                        self._load(**previous)
                    except Exception:
                        self.free()
                raise
            return self.info

    def _load(self, source, adapter, quantization, device, dtype, mask_token_id, ar_source, notice) -> None:
        t0 = time.perf_counter()
        model = dlm.load(source, mask_token_id=mask_token_id, device=device, dtype=dtype,
                         quantization=None if quantization == "none" else quantization, adapter=adapter)
        seconds = time.perf_counter() - t0
        self._install_checkpoints(model)
        spec = registry.get(source) if registry.is_registered(source) else None
        if not notice and spec is not None and spec.kind == "ar" and adapter is None:
            notice = (f"{source} is an autoregressive model used as a diffusion LM without adaptation — "
                      f"{NOT_ADAPTED}.")
        counterpart = ar_source or model.ar_counterpart
        same = counterpart is None or counterpart in (source, getattr(model, "source", None), model.name)
        self.model = model
        self.loads += 1
        self.ar, self.ar_source = (None, None) if same else (None, counterpart)
        self._load_args = dict(source=source, adapter=adapter, quantization=quantization, device=device,
                               dtype=dtype, mask_token_id=mask_token_id, ar_source=ar_source, notice=notice)
        self.info = ModelInfo(
            name=model.name, source=source, kind=spec.kind if spec else "", adapter=adapter or "",
            quantization=quantization, device=str(model.device), dtype=str(model.dtype).replace("torch.", ""),
            parameters=model.num_parameters(), weights_mb=_memory_mb(model), load_seconds=seconds,
            mask_token_id=int(model.mask_token_id), max_length=int(model.max_length),
            ar_name=self.ar_source or "", notice=notice,
        )

    def load_default(self, model: Optional[str] = None, ar_model: Optional[str] = None, *,
                     quantization: str = "none", device: str = "auto", dtype: str = "auto",
                     adapter: Optional[str] = None) -> ModelInfo:
        """Load what `app.py` asked for; with no `model`, the project's adapted default, falling back to the
        un-adapted base (with a visible notice) when the adapted artifact is absent or fails to load."""
        if model:
            return self.load(model, adapter=adapter, quantization=quantization, device=device, dtype=dtype,
                             ar_source=ar_model)
        reason = ""
        if registry.is_available(DEFAULT_DLM):
            try:
                return self.load(DEFAULT_DLM, adapter=adapter, quantization=quantization, device=device,
                                 dtype=dtype, ar_source=ar_model)
            except Exception as e:  # corrupt / incompatible artifact: say so and keep going
                reason = f"it failed to load ({describe_error(e)})"
        else:
            reason = "its files are not in assets/ yet"
        notice = (f"The project's adapted model {DEFAULT_DLM} is unavailable ({reason}); using the un-adapted "
                  f"{FALLBACK_DLM} as a diffusion LM instead — {NOT_ADAPTED}.")
        return self.load(FALLBACK_DLM, adapter=adapter, quantization=quantization, device=device, dtype=dtype,
                         ar_source=ar_model or FALLBACK_DLM, notice=notice)

    def free(self) -> None:
        """Drop both models and return their memory (to the CUDA allocator's pool as well)."""
        with self.lock:
            self.model = None
            self.ar = None
            self.info = ModelInfo()
            gc.collect()
            try:
                import torch
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            except Exception:
                pass

    def require_model(self):
        if self.model is None:
            raise ValueError("model: none is loaded; load one in the Model tab")
        return self.model

    def ar_model(self):
        """The AR model to compare with, loaded on first use (same device/dtype/quantization as the DLM)."""
        model = self.require_model()
        if self.ar_source is None:
            return model
        if self.ar is None:
            args = self._load_args or {}
            t0 = time.perf_counter()
            try:
                ar = dlm.load(self.ar_source, device=args.get("device", "auto"), dtype=args.get("dtype", "auto"),
                              quantization=None if args.get("quantization", "none") == "none"
                              else args["quantization"])
            except Exception as e:
                raise ValueError(f"AR model: could not load {self.ar_source!r}: {describe_error(e)}") from None
            self._install_checkpoints(ar)
            self.ar = ar
            self.info.ar_load_seconds = time.perf_counter() - t0
        return self.ar

    def _install_checkpoints(self, model) -> None:
        """A forward pre-hook on every transformer layer that checks the active run's cancel event and time
        limit: Stop, a cancelled client job and the limit end even one long forward within a layer's time."""
        import torch
        layers = [m for lst in model.base.modules() if isinstance(lst, torch.nn.ModuleList) for m in lst]
        for m in layers or [model.base]:
            m.register_forward_pre_hook(self._checkpoint)

    def _checkpoint(self, module, args) -> None:
        run = self._active
        if run is not None and threading.current_thread() is run.thread:
            run.check()

    # ---------------------------------------------------------------------------------------- describing
    def status_markdown(self) -> str:
        """The Model tab's summary of what is loaded."""
        i = self.info
        if self.model is None:
            return "**No model loaded.** Choose one below and press *Load*."
        ar = i.ar_name or f"{i.name} (same weights, causal attention)"
        lines = [
            f"**DLM:** `{i.name}`" + (f" ({i.kind})" if i.kind else "")
            + (f" + LoRA `{i.adapter}`" if i.adapter else ""),
            f"**Parameters:** {i.parameters / 1e6:.1f} M · **weights:** {i.weights_mb:.0f} MB · "
            f"**device:** {i.device} · **dtype:** {i.dtype} · **quantization:** {i.quantization}",
            f"**Load time:** {i.load_seconds:.1f} s · **context:** {i.max_length} tokens · "
            f"**mask token id:** {i.mask_token_id}",
            f"**AR counterpart:** `{ar}`" + (f" (loaded in {i.ar_load_seconds:.1f} s)" if i.ar_load_seconds else
                                            " (loaded on first use)" if i.ar_name else ""),
            f"**Memory in use:** {process_memory()}",
            f"**Limits per request:** {self._prompt_limit()} prompt tokens · "
            + (f"{self.time_limit:g} s of model time" if self.time_limit else "no time limit"),
            self.modes_markdown(),
        ]
        return "\n\n".join(lines)

    def modes_markdown(self) -> str:
        """Which decoder each tab starts from (the model's recommended configs)."""
        if self.model is None:
            return ""
        return (f"**Decoding modes:** Denoise, In-context and AR vs DLM use the writing config — "
                f"{config_summary(self.model.sampler_config)}; Infill and edits use the infilling config — "
                f"{config_summary(self.model.infill_config)}.")

    def notice(self) -> str:
        return self.info.notice

    # ---------------------------------------------------------------------------------------- configs
    def base_config(self, task: str = "write") -> SamplerConfig:
        """The loaded model's recommended config: "write" (Denoise, In-context, race) or "infill" (Infill, edits:
        always the full-attention decoder)."""
        model = self.require_model()
        cfg = model.infill_config if task == "infill" else model.sampler_config
        return cfg or SamplerConfig()

    def sampler(self, values: Optional[dict] = None, task: str = "write") -> SamplerConfig:
        """UI / API sampler values -> a validated SamplerConfig on the model's recommended one (`sampler_config`)."""
        return sampler_config(values or {}, self.base_config(task), infill=task == "infill")

    # ---------------------------------------------------------------------------------------- tokens
    def piece_decoder(self) -> Callable[[list[int]], dict[int, str]]:
        """A function giving the display text of single token ids (a BPE piece decoded alone; special tokens by
        their name), bound to the current model's tokenizer (a later model switch does not affect it)."""
        tok = self.require_model().tokenizer
        special = set(getattr(tok, "all_special_ids", []) or [])

        def decode(ids: list[int]) -> dict[int, str]:
            return {i: tok.convert_ids_to_tokens(int(i)) if i in special else
                    tok.decode([int(i)], skip_special_tokens=False, clean_up_tokenization_spaces=False)
                    for i in ids}
        return decode

    def special_ids(self) -> set[int]:
        model = self.require_model()
        return set(getattr(model.tokenizer, "all_special_ids", []) or []) | set(model.eos_token_ids)

    def text_of(self, ids: list[int]) -> str:
        """Generated token ids -> text, cut at the first EOS (as `Generation.text`)."""
        model = self.require_model()
        return model.tokenizer.decode(cut_at_eos(list(ids), model.eos_token_ids), skip_special_tokens=True,
                                      clean_up_tokenization_spaces=False)

    # ---------------------------------------------------------------------------------------- limits
    def _prompt_limit(self) -> int:
        model = self.require_model()
        return min(self.max_prompt_tokens or model.max_length, model.max_length)

    def _check_prompt_tokens(self, n: int, what: str = "prompt") -> None:
        limit = self._prompt_limit()
        if n > limit:
            raise ValueError(f"{what}: {n} tokens is over this server's limit of {limit} prompt tokens per request "
                             f"(app.py --max-prompt-tokens); shorten it")

    def _inputs(self, prompt: str, chat: bool, what: str = "prompt") -> tuple[dict, int]:
        """(keyword arguments for model.stream / ar_stream, prompt token count) for a prompt, after the limits."""
        model = self.require_model()
        if not prompt.strip():
            raise ValueError(f"{what} is empty: type some text for the model to continue")
        if len(prompt) > 40 * self._prompt_limit():  # far over the limit: refuse before tokenizing it
            raise ValueError(f"{what}: {len(prompt)} characters is far over this server's limit of "
                             f"{self._prompt_limit()} prompt tokens per request (app.py --max-prompt-tokens)")
        if chat:
            if not getattr(model.tokenizer, "chat_template", None):
                raise ValueError(f"chat: {model.name} has no chat template; untick 'chat' and give a plain prompt")
            inp = dict(prompt=None, messages=[{"role": "user", "content": prompt}])
        else:
            inp = dict(prompt=prompt, messages=None)
        ids, _ = encode_prompt(model, inp["prompt"], inp["messages"])
        self._check_prompt_tokens(len(ids), what)
        return inp, len(ids)

    # ---------------------------------------------------------------------------------------- runs
    def _register(self, run: Run) -> None:
        """One run per session: a new one supersedes (cancels) the session's previous run."""
        with self._runs_lock:
            old = self._runs.get(run.session)
            if old is not None:
                old.cancel()
            self._runs[run.session] = run

    def _unregister(self, run: Run) -> None:
        with self._runs_lock:
            if self._runs.get(run.session) is run:
                del self._runs[run.session]

    def stop(self, session: Optional[str]) -> bool:
        """Ask the session's running work to stop now (before the next transformer layer); True if one was
        running."""
        with self._runs_lock:
            run = self._runs.get(session or "")
        if run is None:
            return False
        run.cancel()
        return True

    def start(self, job: Callable[[], Iterator[tuple[str, Any]]], session: Optional[str] = None) -> Run:
        """Run `job` (a generator function of (lane, item) events that calls the model) in a worker."""
        return Run(self, job, session)

    # ---------------------------------------------------------------------------------------- model work
    def generate(self, prompt, config: SamplerConfig, *, chat=False, pins=None, session: Optional[str] = None
                 ) -> Run:
        """Denoise a continuation of `prompt` (a one-message chat when `chat`; `pins` = {offset: word} held fixed,
        full decoder only). Lane "dlm": Frames, then the Generation."""
        model = self.require_model()
        f = check_fields(prompt=prompt, chat=chat, pins=pins)
        inp, n_prompt = self._inputs(f["prompt"], f["chat"])
        check_length(model, n_prompt, config.max_new_tokens)
        run = self.start(lambda: _lane("dlm", model.stream(inp["prompt"], config, messages=inp["messages"],
                                                           pins=f["pins"] or None)), session)
        run.prompt_tokens = n_prompt
        return run

    def prompt_ids(self, prompt, chat=False) -> list[int]:
        """The token ids of a prompt (or a one-message chat) as the model sees it, after the limits."""
        f = check_fields(prompt=prompt, chat=chat)
        inp, _ = self._inputs(f["prompt"], f["chat"])
        return encode_prompt(self.require_model(), inp["prompt"], inp["messages"])[0]

    def infill(self, config: SamplerConfig, *, template=None, prefix=None, suffix=None, length=None,
               use_template: Optional[bool] = None, session: Optional[str] = None) -> Run:
        """Fill a `[MASK:n]` template, or prefix + `length` tokens + suffix (use_template None: a template when one
        is given). Steps above the masked tokens are capped. Lane "dlm": Frames, then the Generation."""
        model = self.require_model()
        f = check_fields(template=template, prefix=prefix, suffix=suffix, length=length)
        if use_template is None:
            use_template = bool(f["template"].strip())
        if use_template:
            if not f["template"].strip():
                raise ValueError("template is empty: write text with [MASK] or [MASK:n] spans to fill")
            masked = sum(p for _, p in split_template(f["template"]) if isinstance(p, int))
            if masked > model.max_length:
                raise ValueError(f"template: its spans hold {masked} tokens, beyond the model's context of "
                                 f"{model.max_length} tokens")
            canvas = template_canvas(model, f["template"])
            self._check_prompt_tokens(sum(canvas.fixed), "template")
            config = cap_steps(config, masked)
            return self.start(lambda: _lane("dlm", model.stream_fill(f["template"], config)), session)
        if not (f["prefix"] or f["suffix"]):
            raise ValueError("prefix / suffix: give a template, or a prefix and/or a suffix around the span to fill")
        n = f["length"] or 16
        if n > model.max_length:
            raise ValueError(f"length: {n} is beyond the model's context of {model.max_length} tokens")
        canvas, _ = pair_canvas(model, f["prefix"], f["suffix"], n)
        self._check_prompt_tokens(sum(canvas.fixed), "prefix / suffix")
        config = cap_steps(config, n)
        return self.start(lambda: _lane("dlm", model.stream_infill(f["prefix"], f["suffix"], n, config)), session)

    def redenoise(self, tokens: list[int], n_prompt: int, edits, config: SamplerConfig, *,
                  session: Optional[str] = None) -> Run:
        """Remask spans of a finished canvas (`tokens` = prompt ids + generated ids, the first `n_prompt` fixed) and
        denoise only them, everything else identical. `edits`: [(start, end, new_length or None)] offsets into the
        generated tokens, end exclusive. Lane "dlm": Frames, then the Generation (whole canvas)."""
        model = self.require_model()
        f = check_fields(edits=edits, token_ids=tokens)
        edits, tokens = f["edits"], f["token_ids"]
        if max(tokens) >= model.vocab_size:
            raise ValueError(f"token_ids: {max(tokens)} is outside the vocabulary (0..{model.vocab_size - 1})")
        n_gen = len(tokens) - n_prompt
        for a, b, new in edits:
            if b > n_gen:
                raise ValueError(f"edits: span {a}..{b} is outside the {n_gen} generated tokens")
            if new is not None and new > model.max_length:
                raise ValueError(f"edits: new length {new} is beyond the model's context of {model.max_length}")
        fixed = [True] * n_prompt + [False] * n_gen
        canvas_edits = [(n_prompt + a, n_prompt + b, new) for a, b, new in edits]
        ids, _, _ = edit_canvas(tokens, fixed, canvas_edits)  # validates overlaps and the prompt boundary
        if len(ids) > model.max_length:
            raise ValueError(f"edits: the edited canvas has {len(ids)} tokens, beyond the model's context of "
                             f"{model.max_length}")
        remasked = sum(b - a if n is None else n for a, b, n in edits)
        self._check_prompt_tokens(len(ids) - remasked, "canvas")
        config = cap_steps(config, remasked)
        return self.start(lambda: _lane("dlm", model.stream_redenoise(tokens, fixed, canvas_edits, config)),
                          session)

    def ar_continue(self, prompt, max_new_tokens: int, config: SamplerConfig, *, session: Optional[str] = None
                    ) -> Run:
        """The AR counterpart continuing `prompt` (for infilling: the prefix only, as in the paper's Table 1).
        Lane "ar": Frames, then the Generation."""
        model = self.require_model()
        inp, n_prompt = self._inputs(_text("prefix", prompt), False, "prefix")
        n = _count("length", max_new_tokens) or config.max_new_tokens
        check_length(model, n_prompt, n)
        cfg = config.replace(max_new_tokens=n)

        def job():
            yield from _lane("ar", model.ar_stream(inp["prompt"], cfg, ar_model=self.ar_model()))
        return self.start(job, session)

    def gen_ppl(self, prompt: str, continuation: str) -> Optional[float]:
        """Judge-PPL: perplexity of `continuation` given `prompt` under the AR model (lower = more fluent);
        None for an empty continuation."""
        with self.lock:
            return judge_ppl(self.ar_model(), prompt, continuation)

    def _summary(self, g: Generation, context: str) -> dict:
        return dict(text=g.text, seconds=g.seconds, tokens=len(g.token_ids), nfe=g.nfe,
                    tokens_per_second=g.tokens_per_second, gen_ppl=self.gen_ppl(context, g.text),
                    distinct_2=_finite(distinct_n(g.text, 2)))

    def race(self, prompt, config: SamplerConfig, *, chat=False, sweep_steps=None, session: Optional[str] = None
             ) -> Run:
        """The DLM against the AR model on one prompt, both streaming. On one device the two take turns: the side
        whose model-time clock is behind makes the next step, so both clocks advance fairly and "who finished
        first" is decided in model time. Lanes: "dlm" / "ar" (Frames, then the Generation), "clock" ({"dlm": s,
        "ar": s}, after every step), "summary" ({"dlm": run, "ar": run, "winner"}, each run with judge-PPL and
        distinct-2), then one "sweep" row per step count in `sweep_steps` ({steps, seconds, nfe, ppl, text})."""
        model = self.require_model()
        f = check_fields(prompt=prompt, chat=chat, sweep_steps=sweep_steps)
        inp, n_prompt = self._inputs(f["prompt"], f["chat"])
        check_length(model, n_prompt, config.max_new_tokens)
        blocks = math.ceil(config.max_new_tokens / config.block_length) if config.block_length else 1
        for s in f["sweep_steps"]:
            if s > config.max_new_tokens:
                raise ValueError(f"sweep steps: {s} exceeds the length {config.max_new_tokens}")
            if s < blocks:
                raise ValueError(f"sweep steps: {s} is fewer than the {blocks} blocks (length "
                                 f"{config.max_new_tokens} / block length {config.block_length}); every block "
                                 f"needs at least one step")

        def job():
            ar = self.ar_model()
            sides = {"dlm": model.stream(inp["prompt"], config, messages=inp["messages"]),
                     "ar": model.ar_stream(inp["prompt"], config, messages=inp["messages"], ar_model=ar)}
            clock, results = {"dlm": 0.0, "ar": 0.0}, {}
            while sides:
                lane = min(sides, key=clock.get)  # the side behind in model time goes next
                t0 = time.perf_counter()
                item = next(sides[lane])
                clock[lane] += time.perf_counter() - t0
                if isinstance(item, Generation):
                    del sides[lane]
                    clock[lane] = item.seconds  # the exact model time replaces the measured one
                    results[lane] = item
                yield lane, item
                yield "clock", dict(clock)
            context = results["dlm"].prompt
            summary = {lane: self._summary(g, context) for lane, g in results.items()}
            summary["winner"] = min(("dlm", "ar"), key=lambda k: summary[k]["seconds"])
            yield "summary", summary
            for s in f["sweep_steps"]:
                g = model.generate(inp["prompt"], config.replace(steps=s), messages=inp["messages"])
                yield "sweep", dict(steps=s, seconds=g.seconds, nfe=g.nfe, ppl=self.gen_ppl(context, g.text),
                                    text=g.text, distinct_2=_finite(distinct_n(g.text, 2)))
        run = self.start(job, session)
        run.prompt_tokens = n_prompt
        return run

    def infill_sweep(self, config: SamplerConfig, lengths, *, template=None, prefix=None, suffix=None,
                     use_template: Optional[bool] = None, session: Optional[str] = None) -> Run:
        """Fill the same template with every span set to each n in `lengths` (steps capped at the masked tokens of
        each run). Lane "sweep": {n, text, spans, segments: [(text, generated?)], nfe, seconds} per n."""
        model = self.require_model()
        f = check_fields(template=template, prefix=prefix, suffix=suffix)
        lengths = parse_int_list(lengths, "span lengths")
        if use_template is None:
            use_template = bool(f["template"].strip())
        if use_template:
            if not f["template"].strip():
                raise ValueError("template is empty: write text with [MASK] or [MASK:n] spans to fill")
            if not any(isinstance(p, int) for _, p in split_template(f["template"])):
                raise ValueError("template: it has no [MASK] or [MASK:n] span to sweep")
        elif not (f["prefix"] or f["suffix"]):
            raise ValueError("prefix / suffix: give a template, or a prefix and/or a suffix around the span to fill")
        if max(lengths) > model.max_length:
            raise ValueError(f"span lengths: {max(lengths)} is beyond the model's context of {model.max_length}")

        def job():
            for n in lengths:
                if use_template:
                    filled = with_span_length(f["template"], n)
                    spans_n = sum(p for _, p in split_template(filled) if isinstance(p, int))
                    g = model.fill(filled, cap_steps(config, spans_n))
                    spans = iter(g.spans or [])
                    segments = [(p, False) if isinstance(p, str) else (next(spans, ""), True)
                                for _, p in split_template(filled)]
                else:
                    g = model.infill(f["prefix"], f["suffix"], n, cap_steps(config, n))
                    segments = [(f["prefix"], False), ((g.spans or [""])[0], True), (f["suffix"], False)]
                yield "sweep", dict(n=n, text=g.text, spans=g.spans or [], segments=segments, nfe=g.nfe,
                                    seconds=g.seconds)
        return self.start(job, session)

    def scoreboard(self, examples, *, session: Optional[str] = None) -> Run:
        """Every example with an expected answer through the DLM (its writing config with the example's length and
        steps) and the AR model. Lane "row": {name, title, expected, dlm, dlm_ok, ar, ar_ok} per example."""
        model = self.require_model()
        scored = [e for e in examples if e.expected]
        if not scored:
            raise ValueError("examples: none has an expected answer to score")
        base = self.base_config("write")

        def job():
            ar = self.ar_model()
            for e in scored:
                cfg = base.replace(max_new_tokens=e.max_new_tokens, steps=min(e.steps, e.max_new_tokens))
                d = model.generate(e.prompt, cfg)
                *_, a = model.ar_stream(e.prompt, cfg, ar_model=ar)
                yield "row", dict(name=e.name, title=e.title, expected=e.expected,
                                  dlm=answer_of(d.text), dlm_ok=matches(e.expected, d.text),
                                  ar=answer_of(a.text), ar_ok=matches(e.expected, a.text))
        return self.start(job, session)

    # ---------------------------------------------------------------------------------------- measuring, export
    def time_to_first_frame(self, prompt: str, config: Optional[SamplerConfig] = None, **overrides) -> float:
        """Seconds from asking for a generation to its first animated frame, as a user of the playground waits
        for it (tokenizing, the worker start and the first forward; the rest of the run is cancelled). For
        bench/: e.g. `Backend().load("smollm2-135m-dlm"); b.time_to_first_frame("…", max_new_tokens=64)`."""
        cfg = (config or self.base_config("write")).replace(**overrides)
        t0 = time.perf_counter()
        run = self.generate(prompt, cfg)
        try:
            for batch in run.batches():
                if batch.frames():
                    return time.perf_counter() - t0
        finally:
            run.cancel()
        raise ValueError("the run ended without a frame")

    def export_animation(self, frames: list[Frame], directory: Optional[str] = None) -> list[str]:
        """The run's animation as an animated GIF and a self-contained HTML replay (`dlm.animation`)."""
        from dlm.animation import save_animation
        if not frames:
            raise ValueError("export: run a generation first; there is no animation to export yet")
        model = self.require_model()
        out = Path(directory or tempfile.mkdtemp(prefix="dlm-animation-"))
        return [str(save_animation(frames, out / f"denoising{suffix}", model.tokenizer, int(model.mask_token_id)))
                for suffix in (".gif", ".html")]


def config_summary(cfg: SamplerConfig) -> str:
    """One line saying how a config decodes, e.g. "blocks decoder (block diffusion, blocks of 4), threshold 0.9"."""
    if cfg.decoder == "blocks":
        mode = f"**blocks** decoder (block diffusion, blocks of {cfg.block_length}, exact KV cache, stops at EOS)"
    elif cfg.decoder == "full":
        mode = "**full** attention (the paper's sampler" + (
            f", semi-autoregressive blocks of {cfg.block_length})" if cfg.block_length else ")")
    elif cfg.decoder == "speculative":
        mode = (f"**speculative** block decoder (up to {cfg.block_length} tokens per forward: drafts verified by "
                "the model's own AR rows, stops at EOS)")
    else:
        mode = f"**{cfg.decoder}** decoder"
    extra = [f"{cfg.max_new_tokens} tokens"]
    if cfg.decoder != "speculative":  # steps and the reveal order do not apply to speculative decoding
        extra += [f"{cfg.steps} steps" if cfg.steps else "one token per step", cfg.remasking]
    if cfg.threshold:
        extra.append(f"threshold {cfg.threshold:g}")
    extra.append("greedy" if cfg.temperature == 0 else f"temperature {cfg.temperature:g}")
    return mode + ", " + ", ".join(extra)
