"""Request checking: every field of a UI or API request coerced and bounded before any model work, with one-line
messages naming the field (`describe_error` turns any exception into the line users see).

Numbers and flags go through SamplerConfig's own coercion (`dlm.sampler_config`), the one the library, the CLI and
the sampler knobs use, so the playground accepts the same spellings everywhere ("8", 8.0, "yes", ...). Two layers:
`check_fields` / `sampler_config` need no model (the shape of a value); `Checker` holds one request against the
loaded model and this server's limits (prompt tokens, the context, template spans, edits).
"""
from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable, Optional

import dlm
from app import MAX_NEW_TOKENS, MAX_PROMPT_TOKENS
from dlm.decoders import DECODERS
from dlm.infill import edit_canvas, pair_canvas, split_template, template_canvas
from dlm.reveal import block_count
from dlm.sampler_config import SamplerConfig, _coerce, _number, read_by
from dlm.sampler_config import _short as short
from dlm.sampling import check_length, encode_prompt

log = logging.getLogger("dlm.app")


# ---------------------------------------------------------------------------------------------------- messages
MAX_MESSAGE_CHARS = 400  # a message to a user, at most (what it quotes of the input is an excerpt: `short`)


def describe_error(e: BaseException) -> str:
    """A one-line message for users. Bad input (ValueError, a SamplerConfigError, an unknown model) says what is
    wrong and names the field; out of memory says what to try; anything else is an internal error: its type is
    shown and its text goes to the server log, never a Python message such as "'int' object has no attribute"."""
    text = (str(e).strip() or type(e).__name__).splitlines()[0]
    if len(text) > MAX_MESSAGE_CHARS:  # messages quote short excerpts; this is the last guard
        text = text[:MAX_MESSAGE_CHARS] + "…"
    if "out of memory" in text.lower() or type(e).__name__ == "OutOfMemoryError":
        return ("Out of memory: try a shorter length, fewer concurrent runs, a smaller dtype (bfloat16) or "
                "quantization, or a smaller model. The server is still running.")
    if isinstance(e, KeyError):
        return text.strip("\"'")
    if isinstance(e, (ValueError, FileNotFoundError, dlm.LoadError)):
        return text
    log.exception("internal error", exc_info=e)
    return f"internal error ({type(e).__name__}); the details are in the server log. The server is still running."


# ----------------------------------------------------------------------------------------- one field, no model
def as_text(name: str, v) -> str:
    """Text, or a message naming the field: not a string, or not valid Unicode (a lone UTF-16 surrogate such as
    "\\ud800", which JSON lets through and no tokenizer can encode)."""
    if v is None:
        return ""
    if not isinstance(v, str):
        raise ValueError(f"{name}: must be text, got {short(v)}")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{name}: character {e.start} ({v[e.start]!r}) is not valid Unicode (a lone surrogate); "
                         f"send UTF-8 text") from None
    return v


def as_flag(name: str, v) -> bool:
    """None is false; otherwise SamplerConfig's coercion of a bool field (true/yes/on/1, false/no/off/0)."""
    return False if v is None else _coerce(SimpleNamespace(name=name, type=bool, metadata={}), v, ui=False)


def as_whole(name: str, v, minimum: int = 1) -> Optional[int]:
    """A whole number >= minimum (None or "" stays None: the caller's default). Parsed by SamplerConfig's number
    coercion; the message keeps saying what the field needs (a whole number >= minimum)."""
    if v is None or (isinstance(v, str) and not v.strip()):
        return None
    try:
        n = _number(name, v, integer=True)
    except ValueError:
        n = None
    if n is None or n < minimum:
        raise ValueError(f"{name}: must be a whole number >= {minimum}, got {short(v)}")
    return n


def as_count(name: str, v) -> Optional[int]:
    return as_whole(name, v, 1)


def parse_int_list(text, what: str = "values") -> list[int]:
    """'4, 8 16' (or [4, 8, 16]) -> [4, 8, 16]; raises ValueError naming the bad item."""
    items = [str(t) for t in text] if isinstance(text, (list, tuple)) else \
        [t for t in re.split(r"[,\s]+", str(text or "").strip()) if t]
    out = []
    for t in items:
        try:
            out.append(as_whole(what, t, 1))
        except ValueError:
            raise ValueError(f"{what}: {short(t)} is not a positive whole number (write e.g. 4, 8, 16)") from None
    if not out:
        raise ValueError(f"{what}: give at least one positive number, e.g. 4, 8, 16")
    if len(out) > MAX_LIST_VALUES:
        raise ValueError(f"{what}: at most {MAX_LIST_VALUES} values, got {len(out)}")
    return out


def as_pins(name: str, v) -> dict[int, str]:
    """'0: Paris; 5: France' (or {0: " Paris"}) -> {0: " Paris", 5: " France"}: text held fixed at offsets of the
    generated region; the text is what follows the colon, its leading space included (BPE words carry one)."""
    if v is None or (isinstance(v, (str, dict)) and not v):
        return {}
    if isinstance(v, dict):
        pairs = list(v.items())
    elif isinstance(v, str):
        pairs = []
        for part in re.split(r"[;\n]", as_text(name, v)):
            if part.strip():
                pos, colon, word = part.partition(":")
                if not colon:
                    raise ValueError(f"{name}: write position: word pairs such as '0: Paris; 5: France', "
                                     f"got {short(part.strip())}")
                pairs.append((pos, word.rstrip()))
    else:
        raise ValueError(f"{name}: write position: word pairs such as '0: Paris; 5: France', got {short(v)}")
    out = {}
    for pos, word in pairs:
        k = as_whole(f"{name} position", pos, 0)
        if k is None or not isinstance(word, str) or not word.strip():
            raise ValueError(f"{name}: each pin needs a position >= 0 and a word, got {short(pos)}: {short(word)}")
        if k in out:
            raise ValueError(f"{name}: position {k} is given twice ({short(out[k])} and {short(word)}); one word per "
                             f"position")
        out[k] = as_text(name, word)
    return out


def as_edits(name: str, v) -> list[tuple[int, int, Optional[int]]]:
    """[[start, end, new_length or None], ...]: offsets into the generated tokens, end exclusive."""
    if not isinstance(v, (list, tuple)) or not v:
        raise ValueError(f"{name}: give a list of [start, end, new_length or null] spans (offsets into the "
                         f"generated tokens, end exclusive), got {short(v)}")
    out = []
    for e in v:
        if not isinstance(e, (list, tuple)) or len(e) not in (2, 3):
            raise ValueError(f"{name}: each edit is [start, end] or [start, end, new_length], got {short(e)}")
        start, end = as_whole(f"{name} start", e[0], 0), as_whole(f"{name} end", e[1], 1)
        new = as_count(f"{name} new_length", e[2]) if len(e) == 3 else None
        if start is None or end is None or end <= start:
            raise ValueError(f"{name}: each edit needs 0 <= start < end, got {short(list(e))}")
        out.append((start, end, new))
    return out


def ui_edit(start, end, new_length) -> tuple[int, int, Optional[int]]:
    """The Edit panel's selection -> one edit: tokens `start` … `end` (inclusive, offsets into the generated
    region), remasked as `new_length` tokens (0 / empty = the same count)."""
    a, b = as_whole("edit from", start, 0), as_whole("edit to", end, 0)
    if a is None or b is None or b < a:
        raise ValueError(f"edit: select tokens first (from {short(start)} to {short(end)}: 'to' must be >= 'from')")
    n = as_whole("edit new length", new_length, 0)
    return a, b + 1, n or None


def as_token_ids(name: str, v) -> list[int]:
    if not isinstance(v, (list, tuple)) or not v:
        raise ValueError(f"{name}: give the generated token ids as a non-empty list of integers, got {short(v)}")
    ids = [as_whole(name, t, 0) for t in v]
    if None in ids:
        raise ValueError(f"{name}: must be whole numbers >= 0, got {short(v)}")
    return ids


def as_int_list(name: str, v) -> list[int]:
    """'2, 4, 8' (or [2, 4, 8]); empty = none."""
    if v is None or (isinstance(v, str) and not v.strip()):
        return []
    return parse_int_list(v, name.replace("_", " "))


FIELDS: dict[str, Callable[[str, Any], Any]] = dict(
    prompt=as_text, template=as_text, prefix=as_text, suffix=as_text, chat=as_flag, frames=as_flag, length=as_count,
    new_length=as_count, pins=as_pins, edits=as_edits, token_ids=as_token_ids, sweep_steps=as_int_list,
    span_lengths=as_int_list,
)

# ------------------------------------------------------------------------------------------------ size bounds
CHARS_PER_TOKEN = 40    # a text field may hold this many characters per allowed prompt token (real text: ~4-5)
MAX_LIST_VALUES = 8     # values of a sweep (steps, span lengths)
MAX_LIST_CHARS = 256    # characters of a sweep's list as text ("4, 8, 16"), checked before it is split
MAX_EDITS = 64          # spans of one /redenoise request
MAX_PINS = 64           # pinned words of one request
BIG_INT = 2**31 - 1      # integer knobs without a natural bound (top_k): beyond it a value means nothing more
TEXT_FIELDS = ("prompt", "template", "prefix", "suffix", "pins")
LIST_FIELDS = ("sweep_steps", "span_lengths")


@dataclass(frozen=True)
class Bounds:
    """How big each field of one request may be, checked on the raw value before any parsing, tokenizing or model
    work (`check_fields`): text by characters (CHARS_PER_TOKEN per allowed prompt token), lists by length, a
    sweep's list by its characters before it is split. A `Checker` holds the bounds of the loaded model and this
    server's limit; without a model, those of the default limit."""

    prompt_tokens: int = MAX_PROMPT_TOKENS
    token_ids: int = MAX_PROMPT_TOKENS + MAX_NEW_TOKENS  # a canvas: prompt + new tokens (within the context)
    new_tokens: int = MAX_NEW_TOKENS  # tokens one request may generate or fill (within the context)
    context: Optional[int] = None  # the loaded model's context (None: no model), for the messages

    def check(self, name: str, v) -> None:
        if name in TEXT_FIELDS and isinstance(v, str) and len(v) > CHARS_PER_TOKEN * self.prompt_tokens:
            raise ValueError(f"{name}: {len(v)} characters is far over this server's limit of {self.prompt_tokens} "
                             f"prompt tokens per request (dlm-studio --max-prompt-tokens); shorten it")
        if name in LIST_FIELDS:
            if isinstance(v, str) and len(v) > MAX_LIST_CHARS:
                raise ValueError(f"{name.replace('_', ' ')}: {len(v)} characters; give at most {MAX_LIST_VALUES} "
                                 f"values such as 4, 8, 16")
            if isinstance(v, (list, tuple)) and len(v) > MAX_LIST_VALUES:
                raise ValueError(f"{name.replace('_', ' ')}: at most {MAX_LIST_VALUES} values, got {len(v)}")
        limit = dict(token_ids=self.token_ids, edits=MAX_EDITS, pins=MAX_PINS).get(name)
        if limit is not None and isinstance(v, (list, tuple, dict)) and len(v) > limit:
            what = "tokens (prompt + new tokens)" if name == "token_ids" else "items"
            raise ValueError(f"{name}: {len(v)} items is over the limit of {limit} {what} per request")

    def knob(self, name: str, value) -> None:
        """A sampler knob's value against what one request may cost (before any config, block list or canvas is
        built from it): the length, steps and block length at most `new_tokens`, top_k at most BIG_INT."""
        limit = dict(max_new_tokens=self.new_tokens, steps=self.new_tokens, block_length=self.new_tokens,
                     top_k=BIG_INT).get(name)
        if limit is not None and isinstance(value, int) and value > limit:
            if limit == BIG_INT:
                raise ValueError(f"{name}: {short(value)} is out of range; give at most {BIG_INT}")
            if limit == self.context:
                raise ValueError(f"{name}: {short(value)} is beyond the model's context of {limit} tokens")
            raise ValueError(f"{name}: {short(value)} is over this server's limit of {limit} new tokens per request "
                             f"(dlm-studio --max-new-tokens)")

    @property
    def body_bytes(self) -> int:
        """The largest real HTTP request body (`app.http_guard.ApiGuard`'s cap for the model routes): four text fields
        at their bound, each character escaped as JSON's 6-byte \\uXXXX, a canvas of token ids, 64 KB for the
        rest (the other fields, the knobs, Gradio's envelope)."""
        return 4 * 6 * CHARS_PER_TOKEN * self.prompt_tokens + 8 * self.token_ids + (64 << 10)

    @property
    def list_items(self) -> int:
        """The longest list a real request holds (a canvas of token ids; everything else is shorter)."""
        return max(self.token_ids, 256)


DEFAULT_BOUNDS = Bounds()
MAX_BODY_BYTES = DEFAULT_BOUNDS.body_bytes  # an HTTP request body of a model route under the default limits


def check_fields(bounds: Bounds = DEFAULT_BOUNDS, **values) -> dict:
    """The one validation of a request's non-sampler fields (prompt, template, prefix, suffix, length, chat,
    frames, pins, edits, token_ids, sweep_steps, span_lengths): each bounded by size (`bounds`) before it is
    parsed, then coerced by its kind, or a ValueError naming the field."""
    for name, v in values.items():
        bounds.check(name, v)
    return {name: FIELDS[name](name, v) for name, v in values.items()}


# ------------------------------------------------------------------------------------------------ sampler knobs
PER_DECODER = {d["name"] for d in SamplerConfig.describe() if d.get("per_decoder")}
DECODER_FIELD = next(f for f in dataclasses.fields(SamplerConfig) if f.name == "decoder")
KNOB_FIELDS = {f.name: f for f in dataclasses.fields(SamplerConfig)}


def sampler_config(values: dict, base: SamplerConfig, *, infill: bool = False, bounds: Bounds = DEFAULT_BOUNDS
                   ) -> SamplerConfig:
    """The one conversion of UI / API sampler values into a validated SamplerConfig on top of `base` (the loaded
    model's recommended config): `SamplerConfig.from_dict(..., ui=True)`, so strings and floats are coerced, each
    field's `off` sentinel means None (threshold 0, seed -1, block_length 0) and a value left out or None keeps
    base's. Messages name the field (SamplerConfig's own). For infilling (`infill`) the template fixes the length,
    so the shared steps slider is capped at the masked tokens (`cap_steps`) instead of refused. Each knob is held
    against what one request may cost (`bounds.knob`: the length at most the server's new tokens) as soon as it
    is coerced, before anything is built from it.
    """
    given = {k: v for k, v in (values or {}).items() if not (v is None or (isinstance(v, str) and not v.strip()))}
    decoder = _coerce(DECODER_FIELD, given.get("decoder", base.decoder), ui=True)
    given = read_by(decoder, given)  # a widget the decoder ignores still sends its value: base's is kept
    for name, value in given.items():
        f = KNOB_FIELDS.get(name)
        if f is not None:
            bounds.knob(name, _coerce(f, value, ui=True))
    cfg = SamplerConfig.from_dict({**base.to_dict(), **given}, ui=True)
    if not infill:
        bounds.knob("max_new_tokens", cfg.max_new_tokens)
        check_combination(cfg)  # steps above the length, fewer than the blocks: before any work
    return cfg


def check_combination(cfg: SamplerConfig) -> SamplerConfig:
    """Refuse, before any model work, a config whose settings cannot run together: more steps than tokens, or
    (for a decoder that reads steps and block_length) fewer steps than blocks (`dlm.reveal.block_sizes`, as the
    decoders plan them). The message names the field."""
    uses = DECODERS[cfg.decoder].uses
    if "steps" in uses and cfg.steps is not None:
        cfg.steps_for(cfg.max_new_tokens)
        blocks = block_count(cfg.max_new_tokens, cfg.block_length) if "block_length" in uses else 1
        if cfg.steps < blocks:
            raise ValueError(f"steps: {cfg.steps} is fewer than the {blocks} blocks (length {cfg.max_new_tokens} / "
                             f"block length {cfg.block_length}); every block needs at least one step")
    return cfg


SWEEPABLE = ("steps", "block_length", "threshold")  # settings a race may sweep, in order of preference


def sweep_fields(decoder: str) -> list[str]:
    """The settings of SWEEPABLE that a decoder reads (by its declaration, `DECODERS[decoder].uses`)."""
    return [f for f in SWEEPABLE if f in DECODERS[decoder].uses]


def sweep_field(cfg: SamplerConfig) -> str:
    """What the race sweeps for this decoder: the first of `sweep_fields` (steps for full / blocks, block_length
    for speculative)."""
    fields_ = sweep_fields(cfg.decoder)
    if not fields_:
        raise ValueError(f"sweep: the {cfg.decoder} decoder reads none of {', '.join(SWEEPABLE)}; nothing to sweep")
    return fields_[0]


def default_sweep(cfg: SamplerConfig, field: Optional[str] = None) -> list:
    """Sweep values that are valid for `cfg` (the loaded model's config): steps from a few per block to one per
    token; block lengths from the config's own up to 4x; a few thresholds. Invalid ones are left out."""
    field = field or sweep_field(cfg)
    n = cfg.max_new_tokens
    if field == "steps":
        candidates = [n // 8, n // 4, n // 2, n]
    elif field == "block_length":
        b = cfg.block_length or 2
        candidates = [b, 2 * b, 4 * b]
    else:
        candidates = [0.5, 0.7, 0.9]
    out = []
    for v in candidates:
        if v and v not in out and (field != "block_length" or v <= n):
            try:
                check_combination(cfg.replace(**{field: v}))
                out.append(v)
            except (ValueError, dlm.SamplerConfigError):
                pass
    return out


def check_sweep(values, config: SamplerConfig, field: Optional[str] = None, bounds: Bounds = DEFAULT_BOUNDS
                ) -> tuple[str, list]:
    """The race's sweep: (the swept setting, its values); needs no model. `field` None / "" = the decoder's own
    (`sweep_field`); each value must make a valid config with `config` (`check_combination`), else one line
    naming the sweep and the value."""
    field = field or sweep_field(config)
    if field not in sweep_fields(config.decoder):
        raise ValueError(f"sweep: the {config.decoder} decoder does not use {field}; it can sweep "
                         f"{', '.join(sweep_fields(config.decoder)) or 'nothing'}")
    what = f"sweep {field.replace('_', ' ')}"
    if field == "threshold":  # numbers in (0, 1]; the others are whole numbers
        bounds.check("sweep_steps", values)
        items = [t for t in re.split(r"[,\s]+", str(values or "").strip()) if t] \
            if not isinstance(values, (list, tuple)) else list(values)
        out = []
        for t in items:
            try:
                out.append(_number(what, t, integer=False))
            except dlm.SamplerConfigError as e:
                raise ValueError(str(e)) from None
    else:
        out = check_fields(bounds, sweep_steps=values)["sweep_steps"]
    for v in out:
        if field == "steps" and v > config.max_new_tokens:
            raise ValueError(f"{what}: {v} exceeds the length {config.max_new_tokens}")
        try:
            check_combination(config.replace(**{field: v}))
        except (ValueError, dlm.SamplerConfigError) as e:
            why = str(e).removeprefix(f"{field}: ")
            raise ValueError(f"{what}: {why}" if why.startswith(f"{v:g} ") else f"{what}: {v:g} — {why}") \
                from None
    return field, out


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
        return next((d.get("off") for d in SamplerConfig.describe() if d["name"] == name), None)
    return value


def with_span_length(template: str, n: int) -> str:
    """Set every `[MASK]` / `[MASK:k]` span of a template to `n` tokens (for the span-length sweep)."""
    return "".join(p if isinstance(p, str) else f"[MASK:{n}]" for _, p in split_template(template))


def masked_tokens(template: str) -> int:
    """How many tokens a template's spans hold."""
    return sum(p for _, p in split_template(template) if isinstance(p, int))


# ---------------------------------------------------------------------------------- one request, loaded model
def prompt_limit(model, max_prompt_tokens: Optional[int]) -> int:
    """The longest prompt one request may have: the server's limit, never beyond the model's context."""
    return min(max_prompt_tokens or model.max_length, model.max_length)


@dataclass
class Prompt:
    """A checked prompt: the text (or a one-message chat) as `model.stream` / `ar_stream` take it, and its tokens."""

    text: Optional[str]
    messages: Optional[list]
    ids: list[int]

    @property
    def n_tokens(self) -> int:
        return len(self.ids)


@dataclass
class Infill:
    """A checked infilling request: a template, or prefix + `masked` tokens + suffix."""

    use_template: bool
    template: str
    prefix: str
    suffix: str
    masked: int  # tokens to fill (the template's spans, or the length between prefix and suffix)
    fixed: int = 0  # tokens of fixed text (the template's, or prefix + suffix)
    spans: int = 1  # masked spans (the span-length sweep sets each to n)


@dataclass
class Edit:
    """A checked edit of a finished canvas, in canvas coordinates (what `model.stream_redenoise` takes)."""

    tokens: list[int]
    fixed: list[bool]
    edits: list[tuple[int, int, Optional[int]]]
    remasked: int


class Checker:
    """One request held against the loaded model and this server's limit on prompt tokens: every field bounded by
    size first (`Bounds`, before any parsing or tokenizing), then every check that needs the model (tokenizing,
    the context, template spans, pins, edits), before any model work. The one place for a request's limits."""

    def __init__(self, model, max_prompt_tokens: Optional[int], max_new_tokens: Optional[int] = MAX_NEW_TOKENS):
        self.model = model
        self.limit = prompt_limit(model, max_prompt_tokens)
        context = int(model.max_length)
        self.new_limit = min(max_new_tokens or context, context)  # tokens one request may generate or fill
        self.canvas = min(context, self.limit + self.new_limit)  # prompt + new tokens: what a forward covers
        self.bounds = Bounds(prompt_tokens=self.limit, token_ids=self.canvas, new_tokens=self.new_limit,
                             context=context)

    def fields(self, **values) -> dict:
        """`check_fields` under this request's bounds."""
        return check_fields(self.bounds, **values)

    def tokens(self, n: int, what: str = "prompt") -> None:
        if n > self.limit:
            raise ValueError(f"{what}: {n} tokens is over this server's limit of {self.limit} prompt tokens per "
                             f"request (dlm-studio --max-prompt-tokens); shorten it")

    def new_tokens(self, n: int, what: str = "max_new_tokens") -> None:
        """`n` tokens to generate or fill, within this server's limit and the model's context (checked before any
        canvas or block list is built)."""
        if n > self.new_limit:
            if self.new_limit == self.model.max_length:
                raise ValueError(f"{what}: {short(n)} is beyond the model's context of {self.model.max_length} "
                                 f"tokens")
            raise ValueError(f"{what}: {short(n)} is over this server's limit of {self.new_limit} new tokens per "
                             f"request (dlm-studio --max-new-tokens)")

    def spans(self, template: str) -> None:
        """Every `[MASK:n]` of a template within the new-token limit, read from its digits before any integer is
        made of them (`[MASK:<5000 digits>]` is a message naming the template, not Python's digit limit)."""
        for m in re.finditer(r"\[MASK:\s*[-+]?(\d+)", template):
            digits = m.group(1)
            if len(digits) > 9 or int(digits) > self.new_limit:
                shown = m.group(0) if len(m.group(0)) <= 20 else m.group(0)[:17] + "…"
                where = f"beyond the model's context of {self.new_limit} tokens" \
                    if self.new_limit == self.model.max_length else \
                    f"over this server's limit of {self.new_limit} new tokens per request (dlm-studio --max-new-tokens)"
                raise ValueError(f"template: the span {shown}] at position {m.start()} is {where}")

    def prompt(self, prompt, chat=False, *, new_tokens: Optional[int] = None, what: str = "prompt") -> Prompt:
        """A prompt (a one-message chat when `chat`) within the limit; with `new_tokens`, prompt + new tokens
        within the model's context."""
        f = self.fields(**{what: prompt, "chat": chat})
        text, chat, model = f[what], f["chat"], self.model
        if not text.strip():
            raise ValueError(f"{what} is empty: type some text for the model to continue")
        if chat:
            if not getattr(model.tokenizer, "chat_template", None):
                raise ValueError(f"chat: {model.name} has no chat template; untick 'chat' and give a plain prompt")
            text, messages = None, [{"role": "user", "content": text}]
        else:
            messages = None
        ids = encode_prompt(model, text, messages)[0]
        self.tokens(len(ids), what)
        if new_tokens is not None:
            self.new_tokens(new_tokens)
            check_length(model, len(ids), new_tokens)
        return Prompt(text, messages, ids)

    def pins(self, pins, config: SamplerConfig) -> dict[int, int]:
        """Pinned words ('0: Paris; 5: France') -> {position in the generated region: token id}: each word
        tokenized as the library would, and held against the generated length, the other pins and the mask
        token, with messages in the user's own positions."""
        words = self.fields(pins=pins)["pins"]
        n, mask = config.max_new_tokens, int(self.model.mask_token_id)
        out: dict[int, int] = {}
        owner: dict[int, str] = {}
        for offset, word in sorted(words.items()):
            ids = list(self.model.tokenizer(word, add_special_tokens=False)["input_ids"])
            what = f"{short(word)} at {offset} ({len(ids)} token{'s' if len(ids) != 1 else ''}: positions " \
                   f"{offset}..{offset + len(ids) - 1})"
            if not ids:
                raise ValueError(f"pins: {short(word)} at {offset} has no tokens; pin a word")
            if mask in ids:
                raise ValueError(f"pins: {short(word)} at {offset} holds the mask token; pin ordinary text")
            if offset + len(ids) > n:
                raise ValueError(f"pins: {what} does not fit in the {n} generated tokens (positions 0..{n - 1})")
            for k, t in enumerate(ids, offset):
                if k in owner:
                    raise ValueError(f"pins: {what} overlaps {owner[k]} at position {k}")
                out[k], owner[k] = t, f"{short(word)} at {offset}"
        if out and len(out) >= n:
            raise ValueError(f"pins: they cover all {n} generated tokens; nothing is left to generate")
        return out

    def _context(self, n: int, what: str) -> None:
        if n > self.model.max_length:
            raise ValueError(f"{what}: {n} is beyond the model's context of {self.model.max_length} tokens")

    def infill(self, template=None, prefix=None, suffix=None, length=None, use_template: Optional[bool] = None, *,
               lengths: Optional[list[int]] = None) -> Infill:
        """A template (use_template None: when one is given) or prefix / suffix around `length` tokens (default
        16). `lengths`: the span-length sweep's (from `span_lengths`), which set every span themselves: the
        context is checked at the longest, the prompt tokens (the fixed text, the same for every n) as always."""
        f = self.fields(template=template, prefix=prefix, suffix=suffix, length=length)
        use_template = bool(f["template"].strip()) if use_template is None else use_template
        if use_template:
            if not f["template"].strip():
                raise ValueError("template is empty: write text with [MASK] or [MASK:n] spans to fill")
            probe = f["template"]
            self.spans(probe)
            if lengths:
                if not any(isinstance(p, int) for _, p in split_template(probe)):
                    raise ValueError("template: it has no [MASK] or [MASK:n] span to sweep")
                probe = with_span_length(probe, max(lengths))
            masked = masked_tokens(probe)
            if masked > self.new_limit:
                where = f"the model's context of {self.model.max_length} tokens" \
                    if self.new_limit == self.model.max_length else \
                    f"this server's limit of {self.new_limit} new tokens per request (dlm-studio --max-new-tokens)"
                raise ValueError(f"template: its spans hold {masked} tokens, beyond {where}")
            fixed = sum(template_canvas(self.model, probe).fixed)
            self.tokens(fixed, "template")
            spans = sum(isinstance(p, int) for _, p in split_template(f["template"]))
            return Infill(True, f["template"], "", "", masked_tokens(f["template"]), fixed, spans)
        if not (f["prefix"] or f["suffix"]):
            raise ValueError("prefix / suffix: give a template, or a prefix and/or a suffix around the span to fill")
        n = f["length"] or 16
        longest = max(lengths) if lengths else n
        self.new_tokens(longest, "span lengths" if lengths else "length")
        canvas, _ = pair_canvas(self.model, f["prefix"], f["suffix"], longest)
        fixed = sum(canvas.fixed)
        self.tokens(fixed, "prefix / suffix")
        return Infill(False, "", f["prefix"], f["suffix"], n, fixed)

    def span_lengths(self, lengths) -> list[int]:
        """The span-length sweep's lengths ('2, 4, 8'), each within the model's context."""
        out = self.fields(span_lengths=lengths)["span_lengths"]
        if not out:
            raise ValueError("span lengths: give at least one positive number, e.g. 4, 8, 16")
        self.new_tokens(max(out), "span lengths")
        return out

    def edit(self, tokens, n_prompt: int, edits) -> Edit:
        """Edits of a finished canvas (`tokens` = prompt ids + generated ids, the first `n_prompt` fixed), given as
        offsets into the generated tokens, end exclusive; messages in those offsets."""
        model = self.model
        f = self.fields(edits=edits, token_ids=tokens)
        edits, tokens = f["edits"], f["token_ids"]
        if max(tokens) >= model.vocab_size:
            raise ValueError(f"token_ids: {max(tokens)} is outside the vocabulary (0..{model.vocab_size - 1})")
        mask = int(model.mask_token_id)
        if mask in tokens[n_prompt:]:
            raise ValueError(f"token_ids: position {tokens.index(mask, n_prompt) - n_prompt} is the mask token "
                             f"({mask}); give the tokens of a finished text")
        n_gen = len(tokens) - n_prompt
        previous = None
        for a, b, new in sorted(edits):
            if b > n_gen:
                raise ValueError(f"edits: span {a}..{b} is outside the {n_gen} generated tokens")
            if new is not None:
                self.new_tokens(new, "edits new_length")
            if previous is not None and a < previous[1]:
                raise ValueError(f"edits: span {a}..{b} overlaps span {previous[0]}..{previous[1]} (offsets into "
                                 f"the generated tokens, end exclusive)")
            previous = (a, b)
        fixed = [True] * n_prompt + [False] * n_gen
        canvas_edits = [(n_prompt + a, n_prompt + b, new) for a, b, new in edits]
        ids, _, _ = edit_canvas(tokens, fixed, canvas_edits)
        if len(ids) > self.canvas:
            raise ValueError(f"edits: the edited canvas has {len(ids)} tokens, over the limit of {self.canvas} "
                             f"tokens per request (prompt + new tokens)")
        remasked = sum(b - a if n is None else n for a, b, n in edits)
        self.tokens(len(ids) - remasked, "canvas")
        return Edit(tokens, fixed, canvas_edits, remasked)

    def sweep(self, values, config: SamplerConfig, field: Optional[str] = None) -> tuple[str, list]:
        """`check_sweep` under this request's bounds."""
        return check_sweep(values, config, field, self.bounds)
