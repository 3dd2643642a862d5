"""Infilling: `[MASK]` / `[MASK:n]` templates -> a canvas with fixed positions, filled by the core sampler.

A template is literal text with masked spans: `[MASK]` is one token, `[MASK:n]` is n tokens, any number of
spans anywhere. Literal pieces are tokenized one by one (no special tokens, whitespace kept), so the canvas is
exactly their ids with mask ids in between, and every literal token is marked *fixed*: the sampler never touches
it. With the shift (hidden state i predicts token i+1) position 0 is never predicted, so a template that starts
with a mask gets a start token (BOS, or EOS used as a document separator) in front.

    infill(model, "def add(a, b):\n    return", "\n", 4)     # prefix + 4 tokens + suffix
    fill(model, "The [MASK:2] sat on the [MASK].")            # any number of spans
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterator, Optional, Union

import torch

from .decoders.registry import DECODERS
from .decoders.run import DecodeRun
from .generation import fixed_position_decoders, resolve_config, run_decoder
from .sampler_config import SamplerConfig
from .tokens import leading_special_ids, start_token_id
from .types import Frame, Generation

MARKER = "[MASK"
_LENGTH = re.compile(r"\s*-?\d+\s*")


@dataclass
class InfillCanvas:
    """A tokenized template.

    input_ids: canvas token ids (the mask token id is filled in by the sampler; placeholders here are 0).
    fixed:     per position, True for template text (never changed), False for masked positions.
    spans:     (start, end) canvas positions of each masked span, in order (end exclusive).
    n_added:   leading tokens the parser added (BOS / start token) that are not part of the template text.
    pieces:    the template split into literal strings and span lengths, in order (to rebuild the text).
    lead_space: per span, whether the space written right before its marker belongs to it (see `build_canvas`).
    """

    input_ids: list[int]
    fixed: list[bool]
    spans: list[tuple[int, int]]
    n_added: int = 0
    pieces: list[Union[str, int]] = field(default_factory=list)
    lead_space: list[bool] = field(default_factory=list)

    def span_text(self, k: int, decoded: str) -> str:
        """Span k's text from its decoded tokens: the template's space before the marker is kept even when the
        model starts the span with a token that carries none."""
        if k < len(self.lead_space) and self.lead_space[k] and not decoded[:1].isspace():
            return " " + decoded
        return decoded


def split_template(template: str) -> list[tuple[int, Union[str, int]]]:
    """Template -> [(character position, literal text | span length)]. Raises ValueError naming the position of
    a malformed marker: unclosed (`[MASK:3`), non-integer (`[MASK:abc]`) or n <= 0 (`[MASK:0]`). Text such as
    `[MASKED]` that is neither `[MASK]` nor `[MASK:...` is literal."""
    if not isinstance(template, str):
        raise ValueError(f"the template must be a string, got {type(template).__name__}")
    parts: list[tuple[int, Union[str, int]]] = []
    i = text_start = 0
    while True:
        j = template.find(MARKER, i)
        if j < 0:
            break
        after = template[j + len(MARKER): j + len(MARKER) + 1]
        if after == "]":
            n, end = 1, j + len(MARKER) + 1
        elif after == ":" or after == "":
            close = template.find("]", j)
            if after == "" or close < 0 or "[" in template[j + 1: close]:
                raise ValueError(f"unclosed mask marker at position {j}: {template[j: j + 12]!r} "
                                 f"(write [MASK] or [MASK:n])")
            arg = template[j + len(MARKER) + 1: close]
            if not _LENGTH.fullmatch(arg):
                raise ValueError(f"invalid span length {arg!r} in the mask marker at position {j} "
                                 f"(expected a positive integer, as in [MASK:5])")
            n, end = int(arg), close + 1
            if n < 1:
                raise ValueError(f"span length must be >= 1, got {n} in the mask marker at position {j}")
        else:  # e.g. "[MASKED]": literal text
            i = j + 1
            continue
        if j > text_start:
            parts.append((text_start, template[text_start:j]))
        parts.append((j, n))
        i = text_start = end
    if text_start < len(template):
        parts.append((text_start, template[text_start:]))
    return parts


def attach_spaces(parts: list[tuple[int, Union[str, int]]]) -> tuple[list[tuple[int, Union[str, int]]], list[bool]]:
    """Split template parts with a space right before a marker moved into its span -> (parts, per span: had one).

    BPE / SentencePiece vocabularies carry a word's leading space in its token (" sea"), so a lone space token
    before the masks leaves the model an out-of-distribution canvas (measured on the shipped model: "to the  sal,,
    and every" vs "to the shore, and every"); the span is generated with its space instead, and the text keeps it
    (`InfillCanvas.span_text`)."""
    out: list[tuple[int, Union[str, int]]] = []
    lead: list[bool] = []
    for k, (pos, piece) in enumerate(parts):
        if isinstance(piece, int):
            before = parts[k - 1][1] if k else None
            lead.append(isinstance(before, str) and before.endswith(" "))
        elif k + 1 < len(parts) and isinstance(parts[k + 1][1], int) and piece.endswith(" "):
            piece = piece[:-1]
        out.append((pos, piece))
    return out, lead


def build_canvas(parts: list[tuple[int, Union[str, int]]], tokenizer, max_length: Optional[int] = None,
                 shift: bool = True) -> InfillCanvas:
    """Tokenize split template parts into an `InfillCanvas` (see `parse_template`)."""
    if not any(isinstance(p, int) for _, p in parts):
        raise ValueError("the template has no masked span: mark what to generate with [MASK] or [MASK:n]")
    ids = leading_special_ids(tokenizer)
    first_mask = next(k for k, (_, p) in enumerate(parts) if isinstance(p, int))
    starts_with_mask = all(isinstance(p, str) and not tokenizer(p, add_special_tokens=False)["input_ids"]
                           for _, p in parts[:first_mask])
    if shift and not ids and starts_with_mask:
        start = start_token_id(tokenizer)
        if start is None:
            raise ValueError("the tokenizer has neither a BOS nor an EOS token to start a canvas that begins with a "
                             "mask; put some text before the first [MASK]")
        ids = [start]
    n_added = len(ids)
    fixed = [True] * n_added
    spans: list[tuple[int, int]] = []
    parts, lead_space = attach_spaces(parts)
    for pos, piece in parts:
        if isinstance(piece, int):
            spans.append((len(ids), len(ids) + piece))
            ids += [0] * piece
            fixed += [False] * piece
        else:
            piece_ids = list(tokenizer(piece, add_special_tokens=False)["input_ids"])
            ids += piece_ids
            fixed += [True] * len(piece_ids)
        if max_length is not None and len(ids) > max_length:
            what = "the masked span" if isinstance(piece, int) else "the text"
            raise ValueError(f"the template is too long: {what} starting at position {pos} reaches token "
                             f"{len(ids)}, beyond the model's context of {max_length} tokens")
    return InfillCanvas(ids, fixed, spans, n_added, [p for _, p in parts], lead_space)


def parse_template(template: str, tokenizer, max_length: Optional[int] = None, shift: bool = True
                   ) -> InfillCanvas:
    """Parse a `[MASK]` / `[MASK:n]` template into canvas ids, fixed flags and span positions.

    template:   literal text with masked spans: `[MASK]` = 1 token, `[MASK:n]` = n tokens.
    tokenizer:  a Hugging Face tokenizer; each literal piece is tokenized separately without special tokens,
                so joining the pieces' ids reproduces the text faithfully, except that a space right before a
                marker belongs to the span: the model generates the word with its leading space, as BPE and
                SentencePiece vocabularies do (`The [MASK] sat` -> " cat"), and the space stays in the text.
    max_length: the model's context size; a longer canvas raises ValueError (None = no limit).
    shift:      the model's shift flag: position 0 can then never be generated, so a template that starts with
                a mask gets a start token (BOS, else EOS) in front (default True).
    The tokenizer's default leading special tokens (e.g. LLaMA BOS) are prepended too. Malformed markers, no
    marker at all, or a canvas beyond max_length raise ValueError naming the character position.
    """
    return build_canvas(split_template(template), tokenizer, max_length, shift)


# ------------------------------------------------------------------------------------------------ sampling


def infill_config(model, config: Optional[SamplerConfig] = None, **overrides) -> SamplerConfig:
    """The config an infilling call runs with: `config`, else the model's recommended infilling config (full
    attention), then the overrides. Infilling needs a decoder that keeps fixed positions (text after the gap),
    such as the full-attention decoder."""
    base = config if config is not None else getattr(model, "infill_config", None)
    cfg = resolve_config(model, base if base is not None else SamplerConfig(), **overrides)
    if not DECODERS[cfg.decoder].fixed_positions:
        raise ValueError(f"decoder: infilling needs the full-attention decoder or another that keeps fixed positions "
                         f"({fixed_position_decoders()}; text after the gap must be seen), got {cfg.decoder!r}")
    return cfg


def _stream_canvas(model, ic: InfillCanvas, prompt: str, config: SamplerConfig, on_step=None, frames_on: bool = True
                   ) -> Iterator[Union[Frame, Generation]]:
    device = torch.device(model.device)
    canvas = torch.tensor([ic.input_ids], dtype=torch.long, device=device)  # [1, L]
    fixed = torch.tensor([ic.fixed], dtype=torch.bool, device=device)
    frames: list[Frame] = []
    for item in run_decoder(model, canvas, fixed, config, frames=frames_on or on_step is not None):
        if isinstance(item, DecodeRun):
            run = item
            break
        frames.append(item[0])
        if on_step is not None:
            on_step(item[0])
        yield item[0]
    tokens = canvas[0].tolist()
    decode = model.tokenizer.decode
    span_texts = [ic.span_text(k, decode(tokens[a:b], skip_special_tokens=True, clean_up_tokenization_spaces=False))
                  for k, (a, b) in enumerate(ic.spans)]
    yield Generation(text=join_pieces(ic.pieces, span_texts), token_ids=tokens, frames=frames, nfe=run.nfe,
                     seconds=run.seconds, spans=span_texts, prompt=prompt)


def join_pieces(pieces: list[Union[str, int]], span_texts) -> str:
    """A template's text with span k replaced by span_texts[k]: the literal pieces themselves, so the template's
    text survives byte for byte."""
    it = iter(span_texts)
    return "".join(p if isinstance(p, str) else next(it) for p in pieces)


def template_canvas(model, template: str) -> InfillCanvas:
    """Parse a `[MASK]` / `[MASK:n]` template for this model (its tokenizer, context size and shift)."""
    return parse_template(template, model.tokenizer, getattr(model, "max_length", None),
                          model.first_predictable > 0)


def pair_canvas(model, prefix: str, suffix: str, length) -> tuple[InfillCanvas, str]:
    """prefix + `length` masks + suffix as a canvas, and the equivalent template text."""
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"length: must be a positive integer (tokens to generate), got {length!r}")
    if not isinstance(prefix, str) or not isinstance(suffix, str):
        raise ValueError("prefix / suffix: must be strings (use '' for none)")
    if not (prefix or suffix):
        raise ValueError("prefix / suffix: give a prefix and/or a suffix around the span to fill")
    parts = [(0, prefix)] if prefix else []
    parts += [(len(prefix), length)] + ([(len(prefix), suffix)] if suffix else [])
    ic = build_canvas(parts, model.tokenizer, getattr(model, "max_length", None), model.first_predictable > 0)
    return ic, f"{prefix}[MASK:{length}]{suffix}"


def stream_fill(model, template: str, config: Optional[SamplerConfig] = None, *, on_step=None, **overrides
                ) -> Iterator[Union[Frame, Generation]]:
    """Like `fill`, but yields each step's `Frame` live and finally the `Generation`."""
    cfg = infill_config(model, config, **overrides)
    yield from _stream_canvas(model, template_canvas(model, template), template, cfg, on_step)


def fill(model, template: str, config: Optional[SamplerConfig] = None, *, frames: bool = False, **overrides
         ) -> Generation:
    """Fill every `[MASK]` / `[MASK:n]` span of `template` (see `parse_template`); the rest never changes.

    config / overrides: a `SamplerConfig` and single fields (steps default = the total masked tokens; the decoder
    must be "full"); default `model.infill_config`. frames: keep one Frame per step (default False).
    Returns a `Generation`: `.text` = the template with its spans filled, `.spans` = the generated pieces,
    `.token_ids` = the whole canvas, `.frames` / `.nfe` / `.seconds`.
    """
    cfg = infill_config(model, config, **overrides)
    *_, result = _stream_canvas(model, template_canvas(model, template), template, cfg, frames_on=frames)
    return result


def stream_infill(model, prefix: str, suffix: str, length: int, config: Optional[SamplerConfig] = None, *,
                  on_step=None, **overrides) -> Iterator[Union[Frame, Generation]]:
    """Like `infill`, but yields each step's `Frame` live and finally the `Generation`."""
    cfg = infill_config(model, config, **overrides)
    ic, template = pair_canvas(model, prefix, suffix, length)
    yield from _stream_canvas(model, ic, template, cfg, on_step)


def infill(model, prefix: str, suffix: str, length: int, config: Optional[SamplerConfig] = None, *,
           frames: bool = False, **overrides) -> Generation:
    """Generate `length` tokens between `prefix` and `suffix` (either may be ''); both stay exactly as given.

    config / frames / overrides as for `fill`. `.text` = prefix + middle + suffix, `.spans` = [middle].
    """
    cfg = infill_config(model, config, **overrides)
    ic, template = pair_canvas(model, prefix, suffix, length)
    *_, result = _stream_canvas(model, ic, template, cfg, frames_on=frames)
    return result


# ------------------------------------------------------------------------------------------ edit and re-denoise


def edit_canvas(tokens: list[int], fixed: list[bool], edits: list[tuple[int, int, Optional[int]]]
                ) -> tuple[list[int], list[bool], list[tuple[int, int]]]:
    """Remask spans of a finished canvas: each edit (start, end, new_length) replaces tokens[start:end] with
    `new_length` masks (None = the same count). Edits must not overlap and may not touch fixed positions
    (the prompt). Returns (new tokens with placeholders 0 at the masks, new fixed flags, the new spans)."""
    if not edits:
        raise ValueError("edits: select at least one span to remask")
    spans = sorted(edits, key=lambda e: e[0])
    out_ids, out_fixed, new_spans, pos = [], [], [], 0
    for start, end, new_len in spans:
        if not (isinstance(start, int) and isinstance(end, int)) or not 0 <= start < end <= len(tokens):
            raise ValueError(f"edits: span ({start}, {end}) is outside the canvas of {len(tokens)} tokens")
        if start < pos:
            raise ValueError(f"edits: span ({start}, {end}) overlaps the previous one")
        if any(fixed[start:end]):
            raise ValueError(f"edits: span ({start}, {end}) touches fixed text (the prompt or template)")
        n = end - start if new_len is None else new_len
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"edits: the new length of span ({start}, {end}) must be a positive integer, got {n!r}")
        out_ids += tokens[pos:start]
        out_fixed += [True] * (start - pos)  # everything that is not edited stays exactly as it is
        new_spans.append((len(out_ids), len(out_ids) + n))
        out_ids += [0] * n
        out_fixed += [False] * n
        pos = end
    out_ids += tokens[pos:]
    out_fixed += [True] * (len(tokens) - pos)
    return out_ids, out_fixed, new_spans


def _edited_canvas(model, tokens: list[int], fixed: list[bool], edits) -> InfillCanvas:
    ids, new_fixed, spans = edit_canvas(list(tokens), list(fixed), edits)
    limit = getattr(model, "max_length", None)
    if limit is not None and len(ids) > limit:
        raise ValueError(f"edits: the edited canvas has {len(ids)} tokens, beyond the model's context of {limit}")
    decode = model.tokenizer.decode
    pieces: list[Union[str, int]] = []
    last = 0
    for a, b in spans:  # literal text between the spans, so the text is rebuilt exactly as infilling does
        pieces.append(decode(ids[last:a], skip_special_tokens=True, clean_up_tokenization_spaces=False))
        pieces.append(b - a)
        last = b
    pieces.append(decode(ids[last:], skip_special_tokens=True, clean_up_tokenization_spaces=False))
    return InfillCanvas(ids, new_fixed, spans, 0, pieces)


def stream_redenoise(model, tokens: list[int], fixed: list[bool], edits: list[tuple[int, int, Optional[int]]],
                     config: Optional[SamplerConfig] = None, *, on_step=None, **overrides
                     ) -> Iterator[Union[Frame, Generation]]:
    """Like `redenoise`, yielding each step's Frame live and finally the Generation."""
    cfg = infill_config(model, config, **overrides)
    ic = _edited_canvas(model, tokens, fixed, edits)
    yield from _stream_canvas(model, ic, model.tokenizer.decode(list(tokens), skip_special_tokens=True), cfg, on_step)


def redenoise(model, tokens: list[int], fixed: list[bool], edits: list[tuple[int, int, Optional[int]]],
              config: Optional[SamplerConfig] = None, *, frames: bool = False, **overrides) -> Generation:
    """Edit a finished canvas (what an AR model cannot do): remask the `edits` spans (start, end, new_length or
    None = same length) of `tokens` and denoise only those positions with full attention, everything else fixed.

    tokens / fixed: a canvas and its fixed flags (e.g. a Generation's prompt ids + token_ids, the prompt fixed).
    Returns a Generation over the whole edited canvas (`.token_ids`); `.spans` = the new text of each span.
    """
    cfg = infill_config(model, config, **overrides)
    ic = _edited_canvas(model, tokens, fixed, edits)
    *_, result = _stream_canvas(model, ic, model.tokenizer.decode(list(tokens), skip_special_tokens=True), cfg,
                                frames_on=frames)
    return result
