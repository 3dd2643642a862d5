"""Generation front ends: prompt -> canvas -> a decoder (`dlm.decoders`) -> `Generation` (+ `Frame`s on request).

    model.generate("Once upon a time", max_new_tokens=48)               # the model's recommended SamplerConfig
    model.generate("...", SamplerConfig(decoder="blocks", block_length=4, threshold=0.9))
    for item in model.stream("..."): ...                                 # Frames live, then the Generation

The public call style is the model's methods (`model.generate / stream / generate_batch / ar_generate`); the
functions here are what they run (they take the model first, so tests can drive them with a stand-in model).
Every knob is a `SamplerConfig` field: a call takes a whole config (default: `model.sampler_config`, the one saved
with the model, else the library default) plus keyword overrides of single fields.
"""
from __future__ import annotations

import time
from typing import Callable, Iterator, Optional, Sequence, Union

import torch

from .adapter_routing import route
from .decoders.registry import DECODERS
from .decoders.run import DecodeRun, Step
from .noise import seeded_generator
from .sampler_config import SamplerConfig
from .token_sampling import sample_tokens, sampling_settings
from .types import Frame, Generation

Prompt = Union[str, Sequence[int]]


# ----- config and randomness -----------------------------------------------------------------------------------------
def resolve_config(model, config: Optional[SamplerConfig] = None, **overrides) -> SamplerConfig:
    """The config a call runs with: `config`, else the model's recommended one, else the default; then the
    keyword overrides (validated, unknown names refused)."""
    base = config if config is not None else getattr(model, "sampler_config", None) or SamplerConfig()
    if not isinstance(base, SamplerConfig):
        raise ValueError(f"config must be a SamplerConfig, got {type(base).__name__}")
    return base.replace(**overrides)


def fixed_position_decoders() -> str:
    """The registered decoders that keep any positions fixed (infilling, pins, edits), for messages."""
    return ", ".join(name for name, spec in DECODERS.items() if spec.fixed_positions)


def make_generator(model, seed: Optional[int]) -> torch.Generator:
    """The sampler's generator: on the model's device, seeded with `seed` (fresh entropy when None)."""
    return seeded_generator(seed, model.device)


# ----- prompts -------------------------------------------------------------------------------------------------------
def encode_prompt(model, prompt: Optional[Prompt] = None, messages=None) -> tuple[list[int], str]:
    """Prompt text (or ids) or chat `messages` -> (token ids, the prompt text as the model sees it)."""
    tok = model.tokenizer
    if messages is not None:
        if prompt is not None:
            raise ValueError("pass either prompt or messages, not both")
        if not messages:
            raise ValueError("messages is empty: give at least one {'role': ..., 'content': ...} message")
        text = tok.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
        ids = tok(text, add_special_tokens=False)["input_ids"]  # the template already holds any BOS
        return list(ids), text
    if prompt is None or (isinstance(prompt, str) and prompt == "") or len(prompt) == 0:
        raise ValueError("prompt: it is empty; give a prompt (text or token ids) or chat messages=")
    if isinstance(prompt, str):
        return list(tok(prompt)["input_ids"]), prompt
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in prompt):
        raise ValueError("prompt: must be text or a list of token ids")
    ids = [int(i) for i in prompt]
    return ids, tok.decode(ids)


def check_length(model, n_prompt: int, max_new_tokens: int) -> None:
    limit = getattr(model, "max_length", None)
    if limit is not None and n_prompt + max_new_tokens > limit:
        raise ValueError(f"max_new_tokens: a prompt of {n_prompt} tokens + max_new_tokens={max_new_tokens} = "
                         f"{n_prompt + max_new_tokens} exceeds the model's context of {limit} tokens")


def cut_at_eos(ids: Sequence[int], eos_ids: Sequence[int]) -> list[int]:
    """Token ids up to (not including) the first EOS."""
    eos = set(int(e) for e in eos_ids or [])
    for i, t in enumerate(ids):
        if t in eos:
            return list(ids[:i])
    return list(ids)


# ----- the driver: decoder steps -> frames -> generation --------------------------------------------------------------
def frames_of(step: Step, canvas: torch.Tensor, starts: Sequence[int], pad_left: Sequence[int]) -> list[Frame]:
    """One `Frame` per row for a decoder `Step` (canvas up to `step.end`, each row's left padding stripped)."""
    rows = canvas[:, : step.end].tolist()
    out = []
    for b, row in enumerate(rows):
        pos = step.reveal[b].nonzero().squeeze(-1)
        p0 = pad_left[b]
        speculation = {} if b else dict(   # a speculative decoder's drafts (one sequence per Step)
            drafts=[[p - p0, t, q] for p, t, q in step.drafts], accepted=[p - p0 for p in step.accepted],
            rejected=[[p - p0, t] for p, t in step.rejected])
        out.append(Frame(step=step.index, total_steps=step.total, tokens=row[p0:],
                         revealed=[p - p0 for p in pos.tolist()], confidence=step.confidence[b, pos].tolist(),
                         start=starts[b] - p0, **speculation))
    return out


def run_decoder(model, canvas: torch.Tensor, fixed: torch.Tensor, config: SamplerConfig, *,
                attention_mask: Optional[torch.Tensor] = None, frames: bool = True
                ) -> Iterator[Union[list[Frame], DecodeRun]]:
    """Run `config.decoder` on a canvas. Yields each step's frames (one per row) when `frames`, and finally the
    finished `DecodeRun` (canvas, nfe, model time)."""
    fixed = fixed.to(device=canvas.device, dtype=torch.bool)
    run = DecodeRun(model, canvas, fixed, config, make_generator(model, config.seed), attention_mask)
    B = canvas.shape[0]
    pad_left = ((attention_mask.cumsum(-1) == 0).sum(-1).tolist() if attention_mask is not None else [0] * B)
    starts = [int(r.nonzero()[0]) if bool(r.any()) else canvas.shape[1] for r in ~fixed]
    for step in DECODERS[config.decoder].load()(run):
        if frames:
            yield frames_of(step, canvas, starts, pad_left)
    yield run


def _finish(model, frames: list[Frame], tokens: list[int], start: int, prompt_text: str, run: DecodeRun,
            seconds: Optional[float] = None) -> Generation:
    new = tokens[start:]
    text = model.tokenizer.decode(cut_at_eos(new, model.eos_token_ids), skip_special_tokens=True,
                                  clean_up_tokenization_spaces=False)
    return Generation(text=text, token_ids=new, frames=frames, nfe=run.nfe,
                      seconds=run.seconds if seconds is None else seconds, prompt=prompt_text)


def prompt_canvas(model, ids: list[int], cfg: SamplerConfig, pins=None) -> tuple[torch.Tensor, torch.Tensor]:
    """prompt ids + max_new_tokens masks -> (canvas [1, L], fixed [1, L]).

    pins: LLaDA-style word constraints, {offset in the generated region: token id or text}; a text is tokenized
    without special tokens and fills consecutive positions. Pinned positions are fixed: the decoder writes around
    them (decoders that keep fixed positions only, such as "full")."""
    check_length(model, len(ids), cfg.max_new_tokens)
    new = [int(model.mask_token_id)] * cfg.max_new_tokens
    fixed_new = [False] * cfg.max_new_tokens
    for offset, value in sorted((pins or {}).items()):
        if not DECODERS[cfg.decoder].fixed_positions:
            raise ValueError(f"pins: pinned words need the full-attention decoder or another that keeps fixed "
                             f"positions ({fixed_position_decoders()}), not {cfg.decoder!r}")
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise ValueError(f"pins: positions must be integers >= 0 (offsets into the new tokens), got {offset!r}")
        piece = [int(value)] if isinstance(value, int) and not isinstance(value, bool) else \
            list(model.tokenizer(str(value), add_special_tokens=False)["input_ids"])
        if not piece or offset + len(piece) > cfg.max_new_tokens:
            raise ValueError(f"pins: {value!r} at {offset} does not fit in max_new_tokens={cfg.max_new_tokens}")
        for k, t in enumerate(piece):
            if fixed_new[offset + k]:
                raise ValueError(f"pins: position {offset + k} is pinned twice")
            new[offset + k], fixed_new[offset + k] = t, True
    if all(fixed_new):
        raise ValueError("pins: every new position is pinned; nothing is left to generate")
    device = torch.device(model.device)
    canvas = torch.tensor([ids + new], device=device)
    fixed = torch.tensor([[True] * len(ids) + fixed_new], device=device)
    return canvas, fixed


def stream(model, prompt: Optional[Prompt] = None, config: Optional[SamplerConfig] = None, *, messages=None,
           pins=None, on_step: Optional[Callable[[Frame], None]] = None, **overrides
           ) -> Iterator[Union[Frame, Generation]]:
    """Like `generate`, but a generator: yields each step's `Frame` as soon as it is computed, and finally the
    `Generation` (so `*frames, result = stream(...)`)."""
    cfg = resolve_config(model, config, **overrides)
    ids, prompt_text = encode_prompt(model, prompt, messages)
    canvas, fixed = prompt_canvas(model, ids, cfg, pins)
    frames: list[Frame] = []
    for item in run_decoder(model, canvas, fixed, cfg):
        if isinstance(item, DecodeRun):
            yield _finish(model, frames, canvas[0, : item.end].tolist(), len(ids), prompt_text, item)
            return
        frames.append(item[0])
        if on_step is not None:
            on_step(item[0])
        yield item[0]


def generate(model, prompt: Optional[Prompt] = None, config: Optional[SamplerConfig] = None, *, messages=None,
             pins=None, frames: bool = False, on_step: Optional[Callable[[Frame], None]] = None, **overrides
             ) -> Generation:
    """Generate after a prompt with a diffusion decoder.

    prompt:    text (tokenized with the tokenizer's special tokens) or a list of token ids.
    config:    a `SamplerConfig` (every knob, see its docstring); default `model.sampler_config`.
    messages:  chat messages instead of a prompt (the tokenizer's chat template, add_generation_prompt=True).
    pins:      word constraints {offset in the new tokens: token id or text} held fixed (decoder "full").
    frames:    keep one `Frame` per step in `.frames` (default False: evals and benchmarks never read them);
               `on_step` (called with each Frame) implies it.
    overrides: single SamplerConfig fields, e.g. max_new_tokens=32, steps=16, temperature=0.7.
    Returns a `Generation`: `.text` (new text cut at the first EOS, special tokens dropped), `.token_ids` (the new
    ids: max_new_tokens of them, or fewer when the blocks decoder stopped at EOS), `.frames`, `.nfe`, `.seconds`
    (model calls only), `.prompt`.
    """
    if frames or on_step is not None:
        *_, result = stream(model, prompt, config, messages=messages, pins=pins, on_step=on_step, **overrides)
        return result
    cfg = resolve_config(model, config, **overrides)
    ids, prompt_text = encode_prompt(model, prompt, messages)
    canvas, fixed = prompt_canvas(model, ids, cfg, pins)
    *_, run = run_decoder(model, canvas, fixed, cfg, frames=False)
    return _finish(model, [], canvas[0, : run.end].tolist(), len(ids), prompt_text, run)


def generate_batch(model, prompts: Sequence[Union[Prompt, list[dict]]], config: Optional[SamplerConfig] = None, *,
                   frames: bool = False, on_step: Optional[Callable[[list[Frame]], None]] = None, **overrides
                   ) -> list[Generation]:
    """Generate for several prompts at once (left-padded to one canvas; the padding is masked out of attention).

    prompts: prompt texts, token-id lists, or chat message lists (chat template applied).
    config / frames / overrides: as for `generate`; `on_step` receives the list of this step's frames.
    At temperature 0 each result equals `generate` on that prompt alone (token for token; probabilities agree to
    float rounding). `.nfe` of each result is the batch's; `.seconds` is the batch's model time split evenly.
    """
    if len(prompts) == 0:
        raise ValueError("prompts: it is empty; give at least one prompt")
    cfg = resolve_config(model, config, **overrides)
    encoded = [encode_prompt(model, None, p) if isinstance(p, list) and p and isinstance(p[0], dict)
               else encode_prompt(model, p) for p in prompts]
    longest = max(len(ids) for ids, _ in encoded)
    check_length(model, longest, cfg.max_new_tokens)
    pad_id = model.tokenizer.pad_token_id
    pad_id = int(pad_id if pad_id is not None else model.eos_token_ids[0])
    B, L = len(encoded), longest + cfg.max_new_tokens
    canvas = torch.full((B, L), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, L), dtype=torch.long)
    fixed = torch.ones((B, L), dtype=torch.bool)
    for b, (ids, _) in enumerate(encoded):
        canvas[b, longest - len(ids): longest] = torch.tensor(ids, dtype=torch.long)
        attention_mask[b, longest - len(ids):] = 1
    fixed[:, longest:] = False
    device = torch.device(model.device)
    canvas, attention_mask, fixed = canvas.to(device), attention_mask.to(device), fixed.to(device)
    keep = frames or on_step is not None
    per_row: list[list[Frame]] = [[] for _ in range(B)]
    for item in run_decoder(model, canvas, fixed, cfg, attention_mask=attention_mask, frames=keep):
        if isinstance(item, DecodeRun):
            run = item
            break
        for b, f in enumerate(item):
            per_row[b].append(f)
        if on_step is not None:
            on_step(item)
    rows = canvas[:, : run.end].tolist()
    return [_finish(model, per_row[b], rows[b][longest - len(ids):], len(ids), text, run, run.seconds / B)
            for b, (ids, text) in enumerate(encoded)]


# ----- AR baseline ----------------------------------------------------------------------------------------------------
def ar_generate(model, prompt: Optional[Prompt] = None, config: Optional[SamplerConfig] = None, *, messages=None,
                ar_model=None, **overrides) -> Generation:
    """Left-to-right baseline: one KV-cached forward per token, timed like the diffusion decoders (`ar_stream`
    without its frames). Uses the config's max_new_tokens, temperature, top_p, top_k, suppress_eos and seed (the
    diffusion knobs do not apply); tokens are drawn by the decoders' own sampler (`dlm.token_sampling`), so both
    sides of a speed comparison run the same kernels and the same sampling.

    ar_model: a DiffusionLM whose `.base` is run causally (its registered AR counterpart, loaded by the caller);
              default `model` itself, i.e. the same weights with causal attention and no adapter.
    The mask token is suppressed; `.nfe` = number of new tokens (one forward each), `.frames` is empty.
    """
    result = None
    for result in ar_stream(model, prompt, config, messages=messages, ar_model=ar_model, **overrides):
        pass
    return result


def ar_stream(model, prompt: Optional[Prompt] = None, config: Optional[SamplerConfig] = None, *, messages=None,
              ar_model=None, **overrides) -> Iterator[Union[Frame, Generation]]:
    """Left to right, one token per step, as a stream of `Frame`s (each reveals the next position) and finally the
    `Generation`, so an AR model can be animated and raced step by step against a diffusion decoder.

    One KV-cached forward per token, sampled with transformers' logits processors (the config's temperature /
    top-k / top-p, the mask token suppressed, EOS too with suppress_eos); stops at EOS. `.seconds` counts model
    calls only. Same arguments as `ar_generate`.
    """
    from transformers import DynamicCache
    cfg = resolve_config(model, config, **overrides)
    ar = model if ar_model is None else ar_model
    ids, prompt_text = encode_prompt(ar, prompt, messages)
    check_length(ar, len(ids), cfg.max_new_tokens)
    device = torch.device(ar.device)
    eos = [int(e) for e in ar.eos_token_ids or []]
    # what transformers' SuppressTokensLogitsProcessor does, without its isin over the vocabulary each step
    suppressed = torch.tensor([int(ar.mask_token_id)] + (eos if cfg.suppress_eos else []), device=device)
    generator = make_generator(ar, cfg.seed)
    cache, seconds, tokens, new = DynamicCache(config=ar.base.config), 0.0, list(ids), []
    feed = torch.tensor([ids], device=device)
    for step in range(1, cfg.max_new_tokens + 1):
        t0 = time.perf_counter()
        with torch.inference_mode(), route(ar, "ar"):   # a DLM's AR side: without a draft adapter
            logits = ar.base(input_ids=feed, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1].float()
            logits.index_fill_(-1, suppressed, -float("inf"))
            token = int(sample_tokens(logits, **sampling_settings(cfg), generator=generator)[0])
            p = float(logits.softmax(-1)[0, token])
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds += time.perf_counter() - t0
        tokens.append(token)
        new.append(token)
        yield Frame(step=step, total_steps=cfg.max_new_tokens, tokens=list(tokens), revealed=[len(tokens) - 1],
                    confidence=[p], start=len(ids))
        if token in eos:
            break
        feed = torch.tensor([[token]], device=device)
    text = ar.tokenizer.decode(cut_at_eos(new, eos), skip_special_tokens=True)
    yield Generation(text=text, token_ids=new, frames=[], nfe=len(new), seconds=seconds, prompt=prompt_text)
