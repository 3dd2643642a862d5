"""The playground's model owner: loads / switches / frees the DLM and its AR counterpart, serialises model calls
behind one lock, runs streams in a worker thread with throttled, cancellable delivery. No Gradio in here: errors
are plain exceptions, turned into messages by `describe_error` and shown by the UI.
"""
from __future__ import annotations

import gc
import importlib.util
import math
import queue
import re
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

import dlm
from dlm import registry
from dlm.infill import split_template, stream_infill
from dlm.types import Frame, Generation

DEFAULT_DLM = "smollm2-135m-dlm"
FALLBACK_DLM = "smollm2-135m"  # the un-adapted base, used as a DLM when the adapted model is missing
DEVICES = ["auto", "cpu", "cuda", "mps"]
DTYPES = ["auto", "float32", "bfloat16", "float16"]
QUANTIZATIONS = ["none", "8bit", "4bit"]
REMASKING = ["confidence", "margin", "entropy", "random"]
NOT_ADAPTED = "not diffusion-adapted yet: output is noise-like"


# ------------------------------------------------------------------------------------------------------- settings
@dataclass
class Sampler:
    """The sampler knobs the UI exposes (meanings as in `dlm.sampling.generate`).

    max_new_tokens: generated length (infill: ignored, the template fixes it)     default 64
    steps:          denoising steps, 1..length                                       default 64
    block_length:   semi-autoregressive block size, 0 = one block                   default 0
    remasking:      confidence / margin / entropy / random                          default confidence
    temperature:    0 = greedy                                                      default 0.0
    top_p, top_k:   nucleus / top-k filters (1.0 / 0 = off)                         defaults 1.0, 0
    threshold:      parallel decoding threshold in (0, 1], 0 = off                  default 0.0
    seed:           -1 = fresh randomness                                           default 0
    """

    max_new_tokens: int = 64
    steps: int = 64
    block_length: int = 0
    remasking: str = "confidence"
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    threshold: float = 0.0
    seed: int = 0

    @classmethod
    def from_ui(cls, max_new_tokens, steps, block_length, remasking, temperature, top_p, top_k, threshold, seed
                ) -> "Sampler":
        """Coerce the UI's numbers (floats from sliders/number boxes, None for a cleared box) to the right types."""
        def integer(name, v, default):
            if v is None or v == "":
                return default
            f = float(v)
            if not math.isfinite(f) or f != int(f):
                raise ValueError(f"{name} must be a whole number, got {v!r}")
            return int(f)

        def number(name, v, default):
            if v is None or v == "":
                return default
            f = float(v)
            if not math.isfinite(f):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
            return f

        return cls(
            max_new_tokens=integer("length", max_new_tokens, 64),
            steps=integer("steps", steps, 64),
            block_length=integer("block length", block_length, 0),
            remasking=str(remasking or "confidence"),
            temperature=number("temperature", temperature, 0.0),
            top_p=number("top-p", top_p, 1.0),
            top_k=integer("top-k", top_k, 0),
            threshold=number("threshold", threshold, 0.0),
            seed=integer("seed", seed, 0),
        )

    def kwargs(self, *, length: bool = True) -> dict:
        """Keyword arguments for `model.stream` / `generate` / `stream_fill` (0 / -1 mean 'off' in the UI)."""
        if self.block_length < 0:
            raise ValueError(f"block length must be >= 0 (0 = one block), got {self.block_length}")
        if self.threshold < 0:
            raise ValueError(f"threshold must be in (0, 1] or 0 for off, got {self.threshold}")
        kw = dict(steps=self.steps, block_length=self.block_length or None, remasking=self.remasking,
                  temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                  threshold=self.threshold or None, seed=None if self.seed < 0 else self.seed)
        if length:
            kw["max_new_tokens"] = self.max_new_tokens
        return kw


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
    """What a throttled stream delivers: the frames that arrived since the last batch, and the final result."""

    frames: list[Frame] = field(default_factory=list)
    result: Optional[Generation] = None
    cancelled: bool = False


# ---------------------------------------------------------------------------------------------------- helpers
def describe_error(e: BaseException) -> str:
    """A one-line message for the UI: bad input says what is wrong, out-of-memory says what to try."""
    text = str(e).strip() or type(e).__name__
    if "out of memory" in text.lower() or type(e).__name__ == "OutOfMemoryError":
        return ("Out of memory: try a shorter length, fewer concurrent runs, a smaller dtype (bfloat16) or "
                "quantization, or a smaller model. The server is still running.")
    if isinstance(e, (ValueError, KeyError, FileNotFoundError)):
        return text.strip("\"'") if isinstance(e, KeyError) else text
    return f"{type(e).__name__}: {text}"


def parse_int_list(text: str, what: str = "values") -> list[int]:
    """'4, 8 16' -> [4, 8, 16]; raises ValueError naming the bad item."""
    items = [t for t in re.split(r"[,\s]+", (text or "").strip()) if t]
    out = []
    for t in items:
        if not re.fullmatch(r"\d+", t) or int(t) < 1:
            raise ValueError(f"{what}: {t!r} is not a positive whole number (write e.g. 4, 8, 16)")
        out.append(int(t))
    if not out:
        raise ValueError(f"{what}: give at least one positive number, e.g. 4, 8, 16")
    if len(out) > 8:
        raise ValueError(f"{what}: at most 8 values, got {len(out)}")
    return out


_MASK_MARKER = re.compile(r"\[MASK(?::\s*\d+\s*)?\]")


def with_span_length(template: str, n: int) -> str:
    """Set every `[MASK]` / `[MASK:k]` span of a template to `n` tokens (for the span-length sweep)."""
    return _MASK_MARKER.sub(f"[MASK:{n}]", template)


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
            import os
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


# ---------------------------------------------------------------------------------------------------- backend
class Backend:
    """Owns the loaded DLM and its AR counterpart; every model call goes through `self.lock`.

    min_frame_interval: at most one UI update per this many seconds while streaming (default 1/15 s); the first
                        frame and the final result are always delivered at once.
    """

    def __init__(self, min_frame_interval: float = 1 / 15):
        self.lock = threading.RLock()
        self.min_frame_interval = float(min_frame_interval)
        self.model = None  # DiffusionLM
        self.ar = None  # DiffusionLM used causally; None = not loaded yet (lazy)
        self.ar_source: Optional[str] = None  # None = the DLM's own weights run causally
        self.info = ModelInfo()
        self._load_args: Optional[dict] = None
        self._cancel: dict[str, threading.Event] = {}
        self._cancel_lock = threading.Lock()

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
        source = (source or "").strip()
        if not source:
            raise ValueError("choose a registry model or type a local model path")
        adapter = (adapter or "").strip() or None
        quantization = (quantization or "none").strip().lower()
        if quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {quantization!r}")
        if quantization != "none" and not bitsandbytes_available():
            raise ValueError(f"{quantization} quantization needs the optional package bitsandbytes "
                             "(pip install bitsandbytes). Note: on a CPU it only saves memory; it runs slower "
                             "than float32 / bfloat16.")
        if adapter is not None and not Path(adapter).expanduser().is_dir():
            raise ValueError(f"LoRA adapter directory not found: {adapter}")
        if mask_token_id is not None and mask_token_id < 0:
            mask_token_id = None
        args = dict(source=source, adapter=adapter, quantization=quantization, device=device or "auto",
                    dtype=dtype or "auto", mask_token_id=mask_token_id, ar_source=(ar_source or "").strip() or None,
                    notice=notice)
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
        spec = registry.get(source) if registry.is_registered(source) else None
        if not notice and spec is not None and spec.kind == "ar" and adapter is None:
            notice = (f"{source} is an autoregressive model used as a diffusion LM without adaptation — "
                      f"{NOT_ADAPTED}.")
        counterpart = ar_source or model.ar_counterpart
        same = counterpart is None or counterpart in (source, getattr(model, "source", None), model.name)
        self.model = model
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
        available = registry.is_available(DEFAULT_DLM) if hasattr(registry, "is_available") else True
        if available:
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
            raise ValueError("no model is loaded: load one in the Model tab")
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
                self.ar = dlm.load(self.ar_source, device=args.get("device", "auto"), dtype=args.get("dtype", "auto"),
                                   quantization=None if args.get("quantization", "none") == "none"
                                   else args["quantization"])
            except Exception as e:
                raise ValueError(f"could not load the AR model {self.ar_source!r}: {describe_error(e)}") from None
            self.info.ar_load_seconds = time.perf_counter() - t0
        return self.ar

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
        ]
        return "\n\n".join(lines)

    def notice(self) -> str:
        return self.info.notice

    # ---------------------------------------------------------------------------------------- decoding helpers
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
        tok = self.require_model().tokenizer
        return set(getattr(tok, "all_special_ids", []) or []) | set(self.model.eos_token_ids)

    # ---------------------------------------------------------------------------------------- cancellation
    def _begin(self, session: Optional[str]) -> tuple[str, threading.Event]:
        key = session or uuid.uuid4().hex
        ev = threading.Event()
        with self._cancel_lock:
            old = self._cancel.get(key)
            if old is not None:
                old.set()  # one run per session: a new run supersedes the previous one
            self._cancel[key] = ev
        return key, ev

    def _end(self, key: str, ev: threading.Event) -> None:
        with self._cancel_lock:
            if self._cancel.get(key) is ev:
                del self._cancel[key]

    def stop(self, session: Optional[str]) -> bool:
        """Ask the session's running generation to stop after its current step; True if one was running."""
        with self._cancel_lock:
            ev = self._cancel.get(session or "")
        if ev is None:
            return False
        ev.set()
        return True

    # ---------------------------------------------------------------------------------------- streaming
    def _throttled(self, make_stream: Callable[[], Iterator[Union[Frame, Generation]]], session: Optional[str]
                   ) -> Iterator[Batch]:
        """Run `make_stream()` in a worker thread holding the model lock; yield `Batch`es at most every
        `min_frame_interval` seconds. The worker never waits for the consumer, so the model's timing is not
        affected by rendering, and closing this generator (Stop, a closed browser tab) stops the worker after
        its current step."""
        key, cancel = self._begin(session)
        q: queue.Queue = queue.Queue()

        def worker():
            try:
                with self.lock:
                    if cancel.is_set():
                        q.put(("cancelled", None))
                        return
                    stream = make_stream()
                    try:
                        for item in stream:
                            q.put(("item", item))
                            if cancel.is_set():
                                q.put(("cancelled", None))
                                return
                    finally:
                        stream.close()
            except BaseException as e:  # delivered to the consumer, raised there
                q.put(("error", e))
            finally:
                q.put(("end", None))

        threading.Thread(target=worker, name="dlm-stream", daemon=True).start()
        last = 0.0
        pending = Batch()
        try:
            while True:
                wait = None if not pending.frames else max(0.0, last + self.min_frame_interval - time.monotonic())
                try:
                    kind, item = q.get(timeout=wait)
                except queue.Empty:  # throttle window over: deliver what we have
                    last = time.monotonic()
                    yield pending
                    pending = Batch()
                    continue
                if kind == "item":
                    if isinstance(item, Generation):
                        pending.result = item
                    else:
                        pending.frames.append(item)
                        if last == 0.0:  # the first frame goes out at once
                            last = time.monotonic()
                            yield pending
                            pending = Batch()
                elif kind == "cancelled":
                    pending.cancelled = True
                elif kind == "error":
                    raise item
                elif kind == "end":
                    if pending.frames or pending.result is not None or pending.cancelled:
                        yield pending
                    return
        finally:
            cancel.set()
            self._end(key, cancel)

    def stream_generate(self, prompt: str, sampler: Sampler, *, chat: bool = False,
                        session: Optional[str] = None) -> Iterator[Batch]:
        """Denoise a continuation of `prompt` (or of a one-message chat when `chat`), throttled batches."""
        model = self.require_model()
        if not (prompt or "").strip():
            raise ValueError("the prompt is empty: type some text for the model to continue")
        kw = sampler.kwargs()
        if chat:
            if not getattr(model.tokenizer, "chat_template", None):
                raise ValueError(f"{model.name} has no chat template: untick 'chat' and give a plain prompt")
            return self._throttled(lambda: model.stream(messages=[{"role": "user", "content": prompt}], **kw),
                                   session)
        return self._throttled(lambda: model.stream(prompt, **kw), session)

    def stream_infill(self, template: str, prefix: str, suffix: str, length: int, sampler: Sampler, *,
                      use_template: bool, session: Optional[str] = None) -> Iterator[Batch]:
        """Fill a `[MASK:n]` template (or prefix + `length` tokens + suffix); throttled batches. `sampler.steps` is
        capped at the number of masked tokens."""
        model = self.require_model()
        kw = sampler.kwargs(length=False)
        if use_template:
            if not (template or "").strip():
                raise ValueError("the template is empty: write text with [MASK] or [MASK:n] spans to fill")
            n_masked = sum(p for _, p in split_template(template) if isinstance(p, int))
            kw["steps"] = min(kw["steps"], max(n_masked, 1))  # the UI's steps slider is capped, not an error
            return self._throttled(lambda: model.stream_fill(template, **kw), session)
        if not (prefix or suffix):
            raise ValueError("give a prefix and/or a suffix around the span to fill")
        kw["steps"] = min(kw["steps"], max(int(length), 1))
        return self._throttled(lambda: stream_infill(model, prefix or "", suffix or "", int(length), **kw), session)

    # ---------------------------------------------------------------------------------------- one-shot calls
    def infill_sweep(self, template: str, prefix: str, suffix: str, lengths: list[int], sampler: Sampler, *,
                     use_template: bool, session: Optional[str] = None) -> list[dict]:
        """Fill the same template with every span set to each n in `lengths`; steps are capped at the number of
        masked tokens of each run. Returns [{n, text, spans, segments: [(text, generated?)], nfe, seconds}]."""
        model = self.require_model()
        if use_template and not (template or "").strip():
            raise ValueError("the template is empty: write text with [MASK] or [MASK:n] spans to fill")
        if not use_template and not (prefix or suffix):
            raise ValueError("give a prefix and/or a suffix around the span to fill")
        n_spans = len(_MASK_MARKER.findall(template)) if use_template else 1
        if use_template and n_spans == 0:
            raise ValueError("the template has no [MASK] or [MASK:n] span to sweep")
        key, cancel = self._begin(session)
        rows = []
        try:
            with self.lock:
                for n in lengths:
                    if cancel.is_set():
                        break
                    kw = sampler.kwargs(length=False)
                    kw["steps"] = min(kw["steps"], n * n_spans)
                    if use_template:
                        filled = with_span_length(template, n)
                        g = model.fill(filled, **kw)
                        spans = iter(g.spans or [])
                        segments = [(p, False) if isinstance(p, str) else (next(spans, ""), True)
                                    for _, p in split_template(filled)]
                    else:
                        g = model.infill(prefix or "", suffix or "", n, **kw)
                        segments = [(prefix or "", False), ((g.spans or [""])[0], True), (suffix or "", False)]
                    rows.append(dict(n=n, text=g.text, spans=g.spans or [], segments=segments, nfe=g.nfe,
                                     seconds=g.seconds))
        finally:
            self._end(key, cancel)
        return rows

    def ar_continue(self, prompt: str, max_new_tokens: int, sampler: Sampler) -> Generation:
        """The AR counterpart continuing `prompt` (for infilling: the prefix only, as in the paper's Table 1)."""
        model = self.require_model()
        if not (prompt or "").strip():
            raise ValueError("the AR model needs a non-empty prefix to continue")
        with self.lock:
            ar = self.ar_model()
            return model.ar_generate(prompt, max_new_tokens=int(max_new_tokens), temperature=sampler.temperature,
                                     top_p=sampler.top_p, top_k=sampler.top_k,
                                     seed=None if sampler.seed < 0 else sampler.seed, ar_model=ar)

    def gen_ppl(self, prompt: str, continuation: str) -> Optional[float]:
        """Perplexity of `continuation` given `prompt` under the AR model (gen-PPL, lower = more fluent);
        None for an empty continuation."""
        if not continuation.strip():
            return None
        with self.lock:
            s = self.ar_model().ar_score(prompt, continuation)
        return math.exp(-s.logprob / s.n_tokens) if s.n_tokens else None

    def compare(self, prompt: str, sampler: Sampler, sweep_steps: Optional[list[int]] = None, *,
                chat: bool = False, session: Optional[str] = None) -> Iterator[dict]:
        """The same prompt through the DLM and the AR model; yields a growing result dict: first both runs
        ({"dlm": ..., "ar": ...}), then one more "sweep" row per step count (DLM time and gen-PPL vs steps).
        Times are the models' own `.seconds` (model calls only)."""
        model = self.require_model()
        if not (prompt or "").strip():
            raise ValueError("the prompt is empty: type some text for both models to continue")
        if chat and not getattr(model.tokenizer, "chat_template", None):
            raise ValueError(f"{model.name} has no chat template: untick 'chat' and give a plain prompt")
        for s in sweep_steps or []:
            if s > sampler.max_new_tokens:
                raise ValueError(f"sweep steps {s} exceeds the length {sampler.max_new_tokens}")
        inp = dict(messages=[{"role": "user", "content": prompt}]) if chat else dict(prompt=prompt)
        key, cancel = self._begin(session)

        def summary(g: Generation, ppl) -> dict:
            return dict(text=g.text, seconds=g.seconds, tokens=len(g.token_ids), nfe=g.nfe,
                        tokens_per_second=g.tokens_per_second, gen_ppl=ppl)

        try:
            with self.lock:
                d = model.generate(**inp, **sampler.kwargs())
                ar_model = self.ar_model()
                a = model.ar_generate(**inp, max_new_tokens=sampler.max_new_tokens,
                                      temperature=sampler.temperature, top_p=sampler.top_p, top_k=sampler.top_k,
                                      seed=None if sampler.seed < 0 else sampler.seed, ar_model=ar_model)
                context = d.prompt
                result = dict(dlm=summary(d, self.gen_ppl(context, d.text)),
                              ar=summary(a, self.gen_ppl(context, a.text)), sweep=[])
            yield result
            for s in sweep_steps or []:
                if cancel.is_set():
                    break
                kw = sampler.kwargs()
                kw["steps"] = s
                with self.lock:
                    g = model.generate(**inp, **kw)
                    ppl = self.gen_ppl(context, g.text)
                result["sweep"].append(dict(steps=s, seconds=g.seconds, nfe=g.nfe, ppl=ppl, text=g.text))
                yield result
        finally:
            cancel.set()
            self._end(key, cancel)
