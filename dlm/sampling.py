"""Generation from a diffusion LM: the paper's Algorithm 2 and the modern certainty-based samplers.

Everything runs on one **canvas**: `input_ids [B, L]` (prompt ids, then mask ids) and `fixed [B, L]` (True where a
token may never change: prompt, infilling prefix/suffix, left padding). One core loop (`denoise_canvas`) serves
`generate`, `stream`, `generate_batch` and `dlm.infill`:

    for each block (LLaDA-style semi-autoregressive blocks over the masked positions, in order):
        for each of the block's steps:
            logits = model.denoise_logits(canvas)         # position-aligned: row i predicts token i
            x0     = sample(logits at masked positions)    # temperature / top-k / top-p, seeded
            reveal = rule(certainty, schedule)             # which masked positions keep their x0
            canvas[reveal] = x0[reveal]; emit a Frame per row

Reveal rules (one function each):
  random      the paper's Algorithm 2: with s steps left, each still-masked position is revealed with
              probability 1/s (linear schedule t = s/T -> (s-1)/T), so the last step reveals the rest.
  confidence  reveal the k positions with the highest top-1 probability of the chosen token,
  margin      ... highest top-1 minus top-2 probability,
  entropy     ... lowest predictive entropy,
              k from `reveal_schedule` (LLaDA: tokens split evenly over the block's steps).
  threshold   (Fast-dLLM parallel decoding, with any certainty rule): also reveal every masked position of the
              block whose confidence >= threshold; a block may then finish early, which saves evaluations.
Certainty always comes from the *untempered* distribution: tempered scores tie and collapse the order to
left-to-right decoding (Dream issue #72). The mask token (and pad, when it is not also EOS) is never predicted.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence, Union

import torch

from dlm.types import Frame, Generation

REMASKING = ("random", "confidence", "margin", "entropy")

Prompt = Union[str, Sequence[int]]


# ----------------------------------------------------------------------------------------------- options


@dataclass
class SamplerOptions:
    """Validated sampler knobs (see `generate` for their meaning); `steps` is resolved, never None."""

    steps: int
    block_length: Optional[int] = None
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    remasking: str = "confidence"
    threshold: Optional[float] = None
    suppress_eos: bool = False
    use_cache: bool = False


def resolve_options(
    n_masked: int,
    *,
    steps: Optional[int] = None,
    block_length: Optional[int] = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    remasking: str = "confidence",
    threshold: Optional[float] = None,
    suppress_eos: bool = False,
    use_cache: bool = False,
) -> SamplerOptions:
    """Check every knob against a generation region of `n_masked` tokens; raise ValueError with the reason."""
    if n_masked < 1:
        raise ValueError(f"nothing to generate: the number of new/masked tokens must be >= 1, got {n_masked}")
    if block_length is not None:
        if isinstance(block_length, bool) or not isinstance(block_length, int) or block_length < 1:
            raise ValueError(f"block_length must be a positive integer or None, got {block_length!r}")
        block_length = min(block_length, n_masked)
    n_blocks = len(block_sizes(n_masked, block_length))
    steps = n_masked if steps is None else steps
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise ValueError(f"steps must be an integer, got {steps!r}")
    if steps < 1 or steps > n_masked:
        raise ValueError(f"steps must be between 1 and the generation length {n_masked}, got {steps}")
    if steps < n_blocks:
        raise ValueError(
            f"steps={steps} is fewer than the {n_blocks} blocks of block_length={block_length} over {n_masked} "
            f"tokens: every block needs at least one step"
        )
    if remasking not in REMASKING:
        raise ValueError(f"unknown remasking {remasking!r}; choose one of {', '.join(REMASKING)}")
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if not (0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {top_k!r}")
    if threshold is not None:
        if not (0 < threshold <= 1):
            raise ValueError(f"threshold must be in (0, 1] or None, got {threshold!r}")
        if remasking == "random":
            raise ValueError("threshold needs a certainty-based remasking (confidence, margin or entropy), not random")
    return SamplerOptions(steps, block_length, float(temperature), float(top_p), top_k, remasking, threshold,
                          bool(suppress_eos), bool(use_cache))


# ---------------------------------------------------------------------------------------------- schedule


def block_sizes(n_masked: int, block_length: Optional[int]) -> list[int]:
    """Sizes of the semi-autoregressive blocks over `n_masked` positions; a short last block takes the rest."""
    if block_length is None or block_length >= n_masked:
        return [n_masked]
    full, rest = divmod(n_masked, block_length)
    return [block_length] * full + ([rest] if rest else [])


def split_steps(steps: int, sizes: Sequence[int]) -> list[int]:
    """Split `steps` over blocks of the given sizes: evenly for equal blocks (earlier blocks take the remainder),
    in proportion to size otherwise; each block gets between 1 and its size steps.

    Greedy: start at one step per block, then give each remaining step to the block with the most tokens per
    step (ties -> the earliest block). Requires len(sizes) <= steps <= sum(sizes).
    """
    if not len(sizes) <= steps <= sum(sizes):
        raise ValueError(f"cannot split {steps} steps over blocks of sizes {list(sizes)}")
    alloc = [1] * len(sizes)
    for _ in range(steps - len(sizes)):
        best = max((i for i in range(len(sizes)) if alloc[i] < sizes[i]), key=lambda i: (sizes[i] / alloc[i], -i))
        alloc[best] += 1
    return alloc


def tokens_this_step(remaining: torch.Tensor | int, steps_left: int):
    """How many masked tokens to reveal now so that `remaining` ones are spread evenly over `steps_left` steps
    (ceil division: the remainder goes to the earliest steps, exactly LLaDA's `get_num_transfer_tokens`).
    Recomputed every step, so a step that revealed extra tokens (threshold) shrinks the later ones."""
    return (remaining + steps_left - 1) // steps_left


def reveal_schedule(n_masked: int, steps: int) -> list[int]:
    """The planned number of tokens revealed at each of `steps` steps for a block of `n_masked` tokens."""
    out, remaining = [], n_masked
    for j in range(steps):
        k = tokens_this_step(remaining, steps - j)
        out.append(k)
        remaining -= k
    return out


# -------------------------------------------------------------------------------- proposals and certainty


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Keep the `top_k` largest logits (0 = all) and then the smallest set whose probability reaches `top_p`
    (1.0 = all); the rest become -inf. logits: [N, V]."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # [N, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # mass strictly before this token already exceeds top_p
        drop[..., 0] = False  # always keep the best token
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def sample_tokens(logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Draw one token per row of `logits [N, V]` -> [N]. temperature 0 = greedy (argmax; top-k/top-p moot)."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def confidence_certainty(probs: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """Probability of the chosen token. probs [N, V] (untempered), x0 [N] -> [N]."""
    return probs.gather(-1, x0[:, None]).squeeze(-1)


def margin_certainty(probs: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """Top-1 minus top-2 probability of the position (how clearly the model prefers one token) -> [N]."""
    top2 = torch.topk(probs, 2, dim=-1).values
    return top2[:, 0] - top2[:, 1]


def entropy_certainty(probs: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """Negative predictive entropy (higher = more certain) -> [N]."""
    return (probs * torch.log(probs.clamp_min(1e-30))).sum(-1)


CERTAINTY: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "confidence": confidence_certainty,
    "margin": margin_certainty,
    "entropy": entropy_certainty,
}


# ---------------------------------------------------------------------------------------------- reveal rules


def reveal_random(eligible: torch.Tensor, steps_left: int, generator: Optional[torch.Generator] = None
                  ) -> torch.Tensor:
    """Algorithm 2 (An et al. 2024): going from t = s/T to (s-1)/T, each masked position is unmasked with
    probability (t - s')/t = 1/s, where s = `steps_left`; at the last step (s = 1) everything left is revealed.
    eligible [B, L] bool (masked positions of the current block) -> reveal [B, L] bool."""
    draw = torch.rand(eligible.shape, generator=generator, device=eligible.device)
    return eligible & (draw < 1.0 / steps_left)


def reveal_top_k(score: torch.Tensor, eligible: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Reveal the `k[b]` eligible positions with the highest score in each row (confidence/margin/entropy rules).
    score [B, L] float, eligible [B, L] bool, k [B] int -> reveal [B, L] bool."""
    k_max = int(k.max())
    if k_max == 0:
        return torch.zeros_like(eligible)
    score = score.masked_fill(~eligible, float("-inf"))
    top = torch.topk(score, k_max, dim=-1).indices  # [B, k_max]
    keep = torch.arange(k_max, device=k.device)[None, :] < k[:, None]  # row b keeps its first k[b]
    reveal = torch.zeros_like(eligible)
    reveal.scatter_(1, top, keep)
    return reveal & eligible


def reveal_threshold(confidence: torch.Tensor, score: torch.Tensor, eligible: torch.Tensor, k: torch.Tensor,
                     threshold: float) -> torch.Tensor:
    """Fast-dLLM parallel decoding: every eligible position with confidence >= `threshold`, plus the scheduled
    top-k by `score` (so each step reveals >= 1 and the block never needs more than its planned steps)."""
    return (eligible & (confidence >= threshold)) | reveal_top_k(score, eligible, k)


# ------------------------------------------------------------------------------------------------ core loop


@dataclass
class DenoiseRun:
    """Mutable state of one run of `denoise_canvas`: the canvas being filled and the cost so far."""

    canvas: torch.Tensor  # [B, L] token ids
    nfe: int = 0  # forward evaluations (denoise_logits calls)
    seconds: float = 0.0  # wall time inside model calls only


def _model_call(model, run: DenoiseRun, fn, *args, **kwargs):
    """Run one model call, adding its wall time (synchronised on CUDA) to `run.seconds`."""
    cuda = torch.device(model.device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    if cuda:
        torch.cuda.synchronize()
    run.seconds += time.perf_counter() - t0
    return out


def banned_token_ids(model, suppress_eos: bool = False) -> list[int]:
    """Ids the sampler may never write: the mask token, pad (unless pad doubles as EOS), EOS if suppressed."""
    banned = {int(model.mask_token_id)}
    pad = getattr(model.tokenizer, "pad_token_id", None)
    eos = [int(e) for e in (model.eos_token_ids or [])]
    if pad is not None and int(pad) not in eos:
        banned.add(int(pad))
    if suppress_eos:
        banned.update(eos)
    return sorted(banned)


def make_generator(model, seed: Optional[int]) -> torch.Generator:
    """A torch.Generator on the model's device, seeded with `seed` (fresh entropy when None)."""
    gen = torch.Generator(device=torch.device(model.device))
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(int(seed))
    return gen


@torch.inference_mode()
def _denoise_step(model, run: DenoiseRun, masked: torch.Tensor, eligible: torch.Tensor, steps_left: int,
                  opts: SamplerOptions, banned: torch.Tensor, attention_mask, cache, generator, logits=None):
    """One evaluation + reveal. Updates run.canvas and `masked` in place; returns (reveal [B,L], conf [B,L]).
    `logits`: this step's position-aligned logits when already computed (the forward that built the cache)."""
    canvas = run.canvas
    offset = cache.length if cache is not None else 0
    if logits is None:
        logits = _model_call(model, run, model.denoise_logits, canvas, attention_mask=attention_mask,
                             prefix_cache=cache)  # [B, L - offset, V], row j predicts token offset + j
        run.nfe += 1
    picked = logits[eligible[:, offset:]].float()  # [N, V] only the positions we may reveal
    picked[:, banned] = float("-inf")
    x0 = sample_tokens(picked, opts.temperature, opts.top_k, opts.top_p, generator)  # [N]
    probs = picked.softmax(-1)  # untempered: certainty must not depend on temperature
    conf = confidence_certainty(probs, x0)  # [N]

    conf_full = torch.zeros(canvas.shape, dtype=conf.dtype, device=canvas.device)
    conf_full[eligible] = conf
    if opts.remasking == "random":
        reveal = reveal_random(eligible, steps_left, generator)
    else:
        score_full = torch.full(canvas.shape, float("-inf"), device=canvas.device)
        score_full[eligible] = CERTAINTY[opts.remasking](probs, x0)
        k = tokens_this_step(eligible.sum(-1), steps_left)  # [B]
        if opts.threshold is None:
            reveal = reveal_top_k(score_full, eligible, k)
        else:
            reveal = reveal_threshold(conf_full, score_full, eligible, k, opts.threshold)
    x0_full = torch.zeros_like(canvas)
    x0_full[eligible] = x0
    canvas[reveal] = x0_full[reveal]
    masked &= ~reveal
    return reveal, conf_full


@torch.inference_mode()
def _build_cache(model, run: DenoiseRun, prefix_length: int, attention_mask):
    """Build the prefix cache. Its forward sees the whole canvas, and its logits serve the block's first step,
    so it counts as that step's evaluation (nfe = steps with or without the cache, as in Fast-dLLM)."""
    cache = _model_call(model, run, model.build_prefix_cache, run.canvas, prefix_length,
                        attention_mask=attention_mask)
    run.nfe += 1
    return cache


def denoise_canvas(model, run: DenoiseRun, fixed: torch.Tensor, opts: SamplerOptions, *,
                   attention_mask: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
                   ) -> Iterator[list[Frame]]:
    """The one sampling loop. Fills every non-fixed position of `run.canvas` and yields, after each evaluation,
    one `Frame` per row (live: the caller may render it before the next step runs).

    run.canvas [B, L]: token ids; non-fixed positions are overwritten with the mask id first.
    fixed [B, L] bool: positions never changed (prompt, infilling context, left padding).
    opts: `SamplerOptions` (steps, blocks, sampling, remasking, threshold, cache).
    attention_mask [B, L]: 1 = token, 0 = left padding (batched prompts); None = all tokens.
    generator: torch.Generator for every random draw (sampling and the random rule).
    Every row must have the same number of non-fixed positions; blocks are taken over them in position order.
    Frames strip each row's left padding, so batched frames equal single-prompt frames.
    """
    canvas = run.canvas
    B, L = canvas.shape
    fixed = fixed.to(device=canvas.device, dtype=torch.bool)
    masked = ~fixed  # [B, L] positions still to decide (a mask id in fixed text is never "masked")
    n_per_row = masked.sum(-1)
    n = int(n_per_row[0])
    if bool((n_per_row != n).any()):
        raise ValueError(f"every row must have the same number of masked positions, got {n_per_row.tolist()}")
    if n == 0:
        raise ValueError("the canvas has no masked position to generate")
    if model.shift and bool(masked[:, 0].any()):
        raise ValueError("position 0 cannot be generated with the shift (nothing predicts it); "
                         "start the canvas with a fixed token such as BOS")
    with torch.inference_mode():
        canvas[masked] = int(model.mask_token_id)
    rank = torch.cumsum(masked.long(), dim=-1) - 1  # [B, L] order of each masked position in its row
    sizes = block_sizes(n, opts.block_length)
    block_steps = split_steps(opts.steps, sizes)
    banned = torch.tensor(banned_token_ids(model, opts.suppress_eos), device=canvas.device)
    pad_left = ((attention_mask.cumsum(-1) == 0).sum(-1).tolist() if attention_mask is not None else [0] * B)
    start = [int(masked[b].nonzero()[0]) for b in range(B)]

    step, first = 0, 0
    for size, n_steps in zip(sizes, block_steps):
        in_block = masked & (rank >= first) & (rank < first + size)  # [B, L]
        first += size
        cache = pending = None
        if opts.use_cache:
            # Prefix = everything before the block: already decided, so its keys/values can be reused
            # (approximate: they no longer see later tokens change; Fast-dLLM's prefix cache).
            prefix_length = int(in_block.float().argmax(-1).min())
            if prefix_length > 0:
                cache = _build_cache(model, run, prefix_length, attention_mask)
                pending = cache.logits  # [B, L - prefix_length, V]: the block's first step, already computed
        for j in range(n_steps):
            eligible = masked & in_block
            if not bool(eligible.any()):
                break  # threshold decoding finished the block early
            reveal, conf = _denoise_step(model, run, masked, eligible, n_steps - j, opts, banned,
                                         attention_mask, cache, generator, logits=pending)
            pending = None
            step += 1
            rows = canvas.tolist()
            frames = []
            for b in range(B):
                pos = reveal[b].nonzero().squeeze(-1)
                p0 = pad_left[b]
                frames.append(Frame(step=step, total_steps=opts.steps, tokens=rows[b][p0:],
                                    revealed=[p - p0 for p in pos.tolist()], confidence=conf[b, pos].tolist(),
                                    start=start[b] - p0))
            yield frames


# ---------------------------------------------------------------------------------------------- front ends


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
        raise ValueError("the prompt is empty: give a prompt (text or token ids) or chat messages=")
    if isinstance(prompt, str):
        return list(tok(prompt)["input_ids"]), prompt
    ids = [int(i) for i in prompt]
    return ids, tok.decode(ids)


def _check_length(model, n_prompt: int, max_new_tokens: int) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    limit = getattr(model, "max_length", None)
    if limit is not None and n_prompt + max_new_tokens > limit:
        raise ValueError(f"prompt of {n_prompt} tokens + max_new_tokens={max_new_tokens} = "
                         f"{n_prompt + max_new_tokens} exceeds the model's context of {limit} tokens")


def cut_at_eos(ids: Sequence[int], eos_ids: Sequence[int]) -> list[int]:
    """Token ids up to (not including) the first EOS."""
    eos = set(int(e) for e in eos_ids or [])
    for i, t in enumerate(ids):
        if t in eos:
            return list(ids[:i])
    return list(ids)


def _finish(model, frames: list[Frame], tokens: list[int], start: int, prompt_text: str, nfe: int,
            seconds: float) -> Generation:
    new = tokens[start:]
    text = model.tokenizer.decode(cut_at_eos(new, model.eos_token_ids), skip_special_tokens=True,
                                  clean_up_tokenization_spaces=False)
    return Generation(text=text, token_ids=new, frames=frames, nfe=nfe, seconds=seconds, prompt=prompt_text)


def stream(model, prompt: Optional[Prompt] = None, *, messages=None, max_new_tokens: int = 64,
           steps: Optional[int] = None, block_length: Optional[int] = None, temperature: float = 0.0,
           top_p: float = 1.0, top_k: int = 0, remasking: str = "confidence", threshold: Optional[float] = None,
           suppress_eos: bool = False, use_cache: bool = False, seed: Optional[int] = None,
           on_step: Optional[Callable[[Frame], None]] = None) -> Iterator[Union[Frame, Generation]]:
    """Like `generate`, but a generator: yields each step's `Frame` as soon as it is computed, and finally the
    `Generation` (so `*frames, result = stream(...)`). Arguments as for `generate`."""
    ids, prompt_text = encode_prompt(model, prompt, messages)
    _check_length(model, len(ids), max_new_tokens)
    opts = resolve_options(max_new_tokens, steps=steps, block_length=block_length, temperature=temperature,
                           top_p=top_p, top_k=top_k, remasking=remasking, threshold=threshold,
                           suppress_eos=suppress_eos, use_cache=use_cache)
    device = torch.device(model.device)
    canvas = torch.tensor([ids + [int(model.mask_token_id)] * max_new_tokens], device=device)  # [1, L]
    fixed = torch.zeros_like(canvas, dtype=torch.bool)
    fixed[:, : len(ids)] = True
    run = DenoiseRun(canvas)
    frames: list[Frame] = []
    for (frame,) in denoise_canvas(model, run, fixed, opts, generator=make_generator(model, seed)):
        frames.append(frame)
        if on_step is not None:
            on_step(frame)
        yield frame
    yield _finish(model, frames, canvas[0].tolist(), len(ids), prompt_text, run.nfe, run.seconds)


def generate(model, prompt: Optional[Prompt] = None, *, messages=None, max_new_tokens: int = 64,
             steps: Optional[int] = None, block_length: Optional[int] = None, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, remasking: str = "confidence", threshold: Optional[float] = None,
             suppress_eos: bool = False, use_cache: bool = False, seed: Optional[int] = None,
             on_step: Optional[Callable[[Frame], None]] = None) -> Generation:
    """Generate `max_new_tokens` tokens after a prompt by iterative unmasking.

    prompt:         text (tokenized with the tokenizer's special tokens) or a list of token ids.
    messages:       chat messages instead of a prompt; the tokenizer's chat template is applied
                    (add_generation_prompt=True). Exactly one of prompt / messages.
    max_new_tokens: length of the generated region (default 64); prompt + region must fit the model's context.
    steps:          denoising steps = forward evaluations (default max_new_tokens, one token per step);
                    1 <= steps <= max_new_tokens. The loop stops early once nothing is masked (threshold, or
                    the random rule revealing everything before its last step).
    block_length:   semi-autoregressive blocks (LLaDA): the region is split into blocks of this many tokens,
                    decoded left to right, steps split evenly over them; later blocks stay masked until the
                    earlier ones are complete. None (default) = one block. A short last block takes the rest.
    temperature:    0 (default) = greedy; > 0 samples from softmax(logits / temperature).
    top_p, top_k:   nucleus / top-k filtering of the sampling distribution (defaults 1.0 / 0 = off).
    remasking:      which proposals to keep each step: "confidence" (default), "margin", "entropy" (the most
                    certain first, a scheduled number per step) or "random" (the paper's Algorithm 2).
    threshold:      parallel decoding (Fast-dLLM): also reveal every masked position of the current block whose
                    confidence >= threshold; blocks may finish early, so nfe <= steps. None (default) = off.
    suppress_eos:   never generate an EOS token (default False). Otherwise `.text` stops at the first EOS.
    use_cache:      approximate prefix KV cache (Fast-dLLM): at each block start one full forward builds the
                    KV of everything before the block (and serves as the block's first step); the block's other
                    steps recompute only the positions from the block on (default False). nfe counts forwards
                    either way.
    seed:           seeds the torch.Generator for every random draw (default None = fresh randomness).
    on_step:        callback called with each `Frame` as soon as it is computed.

    Returns a `Generation`: `.text` (new text cut at the first EOS, special tokens dropped), `.token_ids` (all
    max_new_tokens new ids), `.frames` (one per step), `.nfe`, `.seconds` (model calls only), `.prompt`.
    """
    *_, result = stream(model, prompt, messages=messages, max_new_tokens=max_new_tokens, steps=steps,
                        block_length=block_length, temperature=temperature, top_p=top_p, top_k=top_k,
                        remasking=remasking, threshold=threshold, suppress_eos=suppress_eos, use_cache=use_cache,
                        seed=seed, on_step=on_step)
    return result


def generate_batch(model, prompts: Sequence[Union[Prompt, list[dict]]], *, max_new_tokens: int = 64,
                   steps: Optional[int] = None, block_length: Optional[int] = None, temperature: float = 0.0,
                   top_p: float = 1.0, top_k: int = 0, remasking: str = "confidence",
                   threshold: Optional[float] = None, suppress_eos: bool = False, use_cache: bool = False,
                   seed: Optional[int] = None, on_step: Optional[Callable[[list[Frame]], None]] = None
                   ) -> list[Generation]:
    """Generate for several prompts at once (left-padded to one canvas; the padding is masked out of attention).

    prompts: a list whose items are prompt texts, token-id lists, or chat message lists (chat template applied).
    Other arguments as for `generate`; `on_step` receives the list of this step's frames (one per prompt).
    At temperature 0 each result equals `generate` on that prompt alone (up to floating-point ties).
    `.nfe` of each result is the batch's number of evaluations; `.seconds` is the batch's model time divided
    evenly over the prompts (so the sum over results is the total).
    """
    if len(prompts) == 0:
        raise ValueError("prompts is empty: give at least one prompt")
    encoded = [encode_prompt(model, None, p) if isinstance(p, list) and p and isinstance(p[0], dict)
               else encode_prompt(model, p) for p in prompts]
    longest = max(len(ids) for ids, _ in encoded)
    _check_length(model, longest, max_new_tokens)
    opts = resolve_options(max_new_tokens, steps=steps, block_length=block_length, temperature=temperature,
                           top_p=top_p, top_k=top_k, remasking=remasking, threshold=threshold,
                           suppress_eos=suppress_eos, use_cache=use_cache)
    pad_id = model.tokenizer.pad_token_id
    pad_id = int(pad_id if pad_id is not None else model.eos_token_ids[0])
    B, L = len(encoded), longest + max_new_tokens
    canvas = torch.full((B, L), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, L), dtype=torch.long)
    fixed = torch.ones((B, L), dtype=torch.bool)
    for b, (ids, _) in enumerate(encoded):
        canvas[b, longest - len(ids): longest] = torch.tensor(ids, dtype=torch.long)
        attention_mask[b, longest - len(ids):] = 1
    fixed[:, longest:] = False
    device = torch.device(model.device)
    canvas, attention_mask, fixed = canvas.to(device), attention_mask.to(device), fixed.to(device)
    run = DenoiseRun(canvas)
    frames: list[list[Frame]] = [[] for _ in range(B)]
    for step_frames in denoise_canvas(model, run, fixed, opts, attention_mask=attention_mask,
                                      generator=make_generator(model, seed)):
        for b, f in enumerate(step_frames):
            frames[b].append(f)
        if on_step is not None:
            on_step(step_frames)
    rows = canvas.tolist()
    return [_finish(model, frames[b], rows[b][longest - len(ids):], len(ids), text, run.nfe, run.seconds / B)
            for b, (ids, text) in enumerate(encoded)]


# ---------------------------------------------------------------------------------------------- AR baseline


def ar_generate(model, prompt: Optional[Prompt] = None, *, messages=None, max_new_tokens: int = 64,
                temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: Optional[int] = None,
                ar_model=None) -> Generation:
    """Left-to-right baseline: Hugging Face `generate` on a causal model, timed like the diffusion sampler.

    ar_model:       a DiffusionLM whose `.base` is run causally (its registered AR counterpart, loaded by the
                    caller); default `model` itself, i.e. the same weights with causal attention.
    prompt/messages, max_new_tokens: as for `generate` (stops early at EOS).
    temperature:    0 (default) = greedy; > 0 samples, with top_p / top_k filtering (defaults off).
    seed:           seeds torch's RNG for this call only (the global RNG state is restored afterwards).
    The mask token is suppressed. `.nfe` = number of new tokens (one forward each), `.frames` is empty.
    """
    ar = model if ar_model is None else ar_model
    ids, prompt_text = encode_prompt(ar, prompt, messages)
    _check_length(ar, len(ids), max_new_tokens)
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if not (0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {top_k!r}")
    device = torch.device(ar.device)
    input_ids = torch.tensor([ids], device=device)
    eos = [int(e) for e in ar.eos_token_ids or []]
    pad = ar.tokenizer.pad_token_id
    kwargs = dict(max_new_tokens=max_new_tokens, min_new_tokens=0, attention_mask=torch.ones_like(input_ids),
                  suppress_tokens=[int(ar.mask_token_id)], eos_token_id=eos or None,
                  pad_token_id=int(pad if pad is not None else (eos[0] if eos else 0)))
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k or None)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    run = DenoiseRun(input_ids)
    cuda_devices = [device.index or 0] if device.type == "cuda" else []
    # `.base` is causal by default: DiffusionLM switches to bidirectional attention only inside its own calls.
    with torch.random.fork_rng(devices=cuda_devices), torch.inference_mode():
        if seed is not None:
            torch.manual_seed(int(seed))
        out = _model_call(ar, run, ar.base.generate, input_ids, **kwargs)
    new = out[0, len(ids):].tolist()
    text = ar.tokenizer.decode(cut_at_eos(new, eos), skip_special_tokens=True)
    return Generation(text=text, token_ids=new, frames=[], nfe=len(new), seconds=run.seconds, prompt=prompt_text)

