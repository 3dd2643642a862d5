"""One request held against the loaded model and this server's limits (`Checker`): tokenizing, the context,
template spans, pins, edits and sweeps, before any model work; the checked request as plain data (`Prompt`,
`Infill`, `Edit`). The checks that need no model (fields, sizes, sampler knobs) are `app.checks`."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from app import MAX_NEW_TOKENS
from app.checks import Bounds, check_fields, check_sweep, masked_tokens, with_span_length
from dlm.generation import check_length, encode_prompt
from dlm.infill import edit_canvas, pair_canvas, split_template, template_canvas
from dlm.sampler_config import SamplerConfig
from dlm.sampler_config import _short as short


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
