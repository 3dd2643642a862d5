"""Request checking: every field of a UI or API request coerced and bounded before any model work, with one-line
messages naming the field (`describe_error` turns any exception into the line users see).

Numbers and flags go through SamplerConfig's own coercion (`dlm.sampler_config`), the one the library, the CLI and
the sampler knobs use, so the playground accepts the same spellings everywhere ("8", 8.0, "yes", ...). Two layers:
`check_fields` / `sampler_config` (here) need no model (the shape of a value); `app.checker.Checker` holds one
request against the loaded model and this server's limits (prompt tokens, the context, template spans, edits).
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
from dlm.infill import split_template
from dlm.reveal import block_count
from dlm.sampler_config import SamplerConfig, _coerce, _number, read_by
from dlm.sampler_config import _short as short

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
