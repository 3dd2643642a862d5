"""Decoders: the loops that turn a canvas of masks into text, one readable function each, in a registry.

A decoder is a generator function `decoder(run: DecodeRun) -> Iterator[Step]`. It fills the non-fixed positions of
`run.canvas` in place, calling the model only through `run.call` (which counts evaluations and model time), and
yields one `Step` (plain tensors: what was revealed, with what confidence) after each evaluation. It never builds
display records: the caller turns steps into `Frame`s only when it streams or asks for them.

    full    the paper's sampler (Algorithm 2 and its certainty-ordered variants) over the whole canvas with full
            attention: any order, any fixed positions (infilling), LLaDA-style semi-autoregressive blocks, and
            Fast-dLLM's approximate prefix cache.
    blocks  block diffusion (Fast-dLLM v2, BD3-LM): the continuation is decoded block by block, causal across
            blocks and bidirectional inside one; finished blocks live in an exact KV cache (their keys/values never
            depend on later tokens), each step recomputes only the current block, and generation stops after the
            first block that holds an EOS. Needs a model trained with block attention.

A new decoder is one function here, registered with `@decoder("name")`; `SamplerConfig.decoder` then accepts it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator, Optional

import torch

from .attention import block_ids
from .reveal import REVEAL_RULES, Proposal, block_sizes, confidence_certainty, split_steps

if TYPE_CHECKING:
    from .sampler_config import SamplerConfig


@dataclass
class Step:
    """One evaluation of a decoder.

    index / total: 1-based step number and the planned number of steps (a run may end earlier).
    reveal:        [B, L] bool, canvas positions decided at this step.
    confidence:    [B, L] untempered probability of the chosen token (meaningful where revealed).
    end:           canvas positions [0, end) are in use (the blocks decoder appends blocks as it goes).
    """

    index: int
    total: int
    reveal: torch.Tensor
    confidence: torch.Tensor
    end: int


@dataclass
class DecodeRun:
    """The state a decoder works on: the canvas, what may not change, the knobs, and the cost so far.

    canvas:         [B, L] token ids (filled in place; non-fixed positions start as mask ids).
    fixed:          [B, L] bool, positions never changed (prompt, infilling context, left padding).
    attention_mask: [B, L] 1 = token, 0 = left padding; None = no padding.
    nfe / seconds:  forward evaluations and wall time inside model calls only.
    end:            the canvas is in use up to here (the blocks decoder may stop early at EOS).
    """

    model: object
    canvas: torch.Tensor
    fixed: torch.Tensor
    config: "SamplerConfig"
    generator: torch.Generator
    attention_mask: Optional[torch.Tensor] = None
    nfe: int = 0
    seconds: float = 0.0
    end: int = 0
    banned: Optional[torch.Tensor] = field(default=None, repr=False)

    def __post_init__(self):
        self.end = self.canvas.shape[1]
        self.banned = torch.tensor(banned_token_ids(self.model, self.config.suppress_eos), device=self.canvas.device)

    def call(self, fn: Callable, *args, **kwargs):
        """Run one model evaluation, counting it and adding its wall time (synchronised on CUDA)."""
        cuda = self.canvas.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = fn(*args, **kwargs)
        if cuda:
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - t0
        self.nfe += 1
        return out


Decoder = Callable[[DecodeRun], Iterator[Step]]
DECODERS: dict[str, Decoder] = {}


def decoder(name: str) -> Callable[[Decoder], Decoder]:
    """Register a decoder under `name` (a value of `SamplerConfig.decoder`)."""
    def register(fn: Decoder) -> Decoder:
        DECODERS[name] = fn
        return fn
    return register


# ----- shared pieces --------------------------------------------------------------------------------------------------
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


def sample_tokens(logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Draw one token per row of `logits [N, V]` -> [N]: greedy at temperature 0, else transformers' temperature /
    top-k / top-p warpers and a seeded multinomial draw."""
    if temperature == 0:
        return logits.argmax(-1)
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
    warpers = LogitsProcessorList([TemperatureLogitsWarper(float(temperature))])
    if top_k:
        warpers.append(TopKLogitsWarper(int(top_k)))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(float(top_p)))
    probs = warpers(None, logits.clone()).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def propose_and_reveal(run: DecodeRun, logits: torch.Tensor, eligible: torch.Tensor, steps_left: int):
    """One step's decision over a window of n positions.

    logits [B, n, V] position-aligned for the window, eligible [B, n] bool -> (reveal [B, n] bool, tokens [B, n],
    confidence [B, n]). Proposals are sampled with the config's temperature / top-k / top-p; certainty always
    comes from the *untempered* distribution (tempered scores tie and collapse the order: Dream issue #72).
    """
    cfg = run.config
    picked = logits[eligible].float()                                                  # [N, V]
    picked[:, run.banned] = float("-inf")
    x0 = sample_tokens(picked, cfg.temperature, cfg.top_k, cfg.top_p, run.generator)  # [N]
    probs = picked.softmax(-1)
    tokens = torch.zeros(eligible.shape, dtype=torch.long, device=eligible.device)
    tokens[eligible] = x0
    confidence = torch.zeros(eligible.shape, dtype=probs.dtype, device=eligible.device)
    confidence[eligible] = confidence_certainty(probs, x0)
    proposal = Proposal(eligible, tokens, probs, confidence, steps_left, cfg.threshold, run.generator)
    return REVEAL_RULES[cfg.remasking](proposal) & eligible, tokens, confidence


def _plan(cfg: "SamplerConfig", n: int) -> tuple[list[int], list[int]]:
    """Block sizes over n generated tokens and the steps of each block."""
    sizes = block_sizes(n, cfg.block_length)
    steps = cfg.steps_for(n)
    if steps < len(sizes):
        raise ValueError(f"steps={steps} is fewer than the {len(sizes)} blocks of block_length={cfg.block_length} "
                         f"over {n} tokens: every block needs at least one step")
    return sizes, split_steps(steps, sizes)


# ----- full attention (the paper) ---------------------------------------------------------------------------------------
@decoder("full")
def decode_full(run: DecodeRun) -> Iterator[Step]:
    """Fill every non-fixed position with full attention over the whole canvas.

    For each block (one block = the whole region; `block_length` = LLaDA's semi-autoregressive blocks over the
    masked positions in order) and each of its steps: one evaluation of the denoiser on the canvas, proposals at the
    block's masked positions, the reveal rule keeps some. With `use_cache`, a forward at each block start caches
    the keys/values of everything before the block (approximate: they no longer see later changes) and serves as
    the block's first step. Every row must have the same number of non-fixed positions.
    """
    model, cfg, canvas = run.model, run.config, run.canvas
    B, L = canvas.shape
    masked = ~run.fixed                                            # positions still to decide
    n_per_row = masked.sum(-1)
    n = int(n_per_row[0])
    if bool((n_per_row != n).any()):
        raise ValueError(f"every row must have the same number of masked positions, got {n_per_row.tolist()}")
    if n == 0:
        raise ValueError("the canvas has no masked position to generate")
    if bool(masked[:, : model.first_predictable].any()):
        raise ValueError("position 0 cannot be generated with the shift (nothing predicts it); "
                         "start the canvas with a fixed token such as BOS")
    canvas[masked] = int(model.mask_token_id)
    rank = torch.cumsum(masked.long(), dim=-1) - 1                 # order of each masked position in its row
    sizes, block_steps = _plan(cfg, n)
    total, step, first = sum(block_steps), 0, 0
    for size, n_steps in zip(sizes, block_steps):
        in_block = masked & (rank >= first) & (rank < first + size)
        first += size
        cache = pending = None
        if cfg.use_cache:
            prefix_length = int(in_block.float().argmax(-1).min())
            if prefix_length > 0:
                cache = run.call(model.build_prefix_cache, canvas, prefix_length, attention_mask=run.attention_mask)
                pending = cache.logits                            # the block's first step, already computed
        offset = cache.length if cache is not None else 0
        for j in range(n_steps):
            eligible = masked & in_block
            if not bool(eligible.any()):
                break                                             # threshold decoding finished the block early
            logits = pending if pending is not None else run.call(
                model.denoise_logits, canvas, attention_mask=run.attention_mask, prefix_cache=cache)
            pending = None
            reveal_w, tokens_w, conf_w = propose_and_reveal(run, logits, eligible[:, offset:], n_steps - j)
            reveal = torch.zeros_like(masked)
            reveal[:, offset:] = reveal_w
            conf = torch.zeros(canvas.shape, dtype=conf_w.dtype, device=canvas.device)
            conf[:, offset:] = conf_w
            canvas[:, offset:][reveal_w] = tokens_w[reveal_w]
            masked &= ~reveal
            step += 1
            yield Step(step, total, reveal, conf, L)


# ----- block diffusion with an exact cache ----------------------------------------------------------------------------------
@decoder("blocks")
def decode_blocks(run: DecodeRun) -> Iterator[Step]:
    """Continue a prompt block by block (Fast-dLLM v2 / BD3-LM decoding).

    The canvas is prompt + masks (left-padded rows of equal length). The prompt goes into an exact KV cache cut into
    blocks that end at the prompt's end; then for each block of `block_length` masks and each of its steps: one
    forward of only that block over the cache (the first step also commits the previous finished block, in the same
    forward), proposals, the reveal rule (+ threshold) keeps some. After a block is complete, generation stops if
    every row has written an EOS (`stop_at_eos`), so the length is not fixed.
    """
    model, cfg, canvas = run.model, run.config, run.canvas
    B, L = canvas.shape
    P = int((run.fixed.sum(-1)).min())
    if not (bool(run.fixed[:, :P].all()) and not bool(run.fixed[:, P:].any())):
        raise ValueError("the blocks decoder continues a prompt (all fixed tokens first); use decoder 'full' to "
                         "fill masks between fixed text (infilling)")
    if P < 1:
        raise ValueError("the blocks decoder needs a prompt (or a start token) before the first block")
    n = L - P
    canvas[:, P:] = int(model.mask_token_id)
    sizes, block_steps = _plan(cfg, n)
    total, step, start = sum(block_steps), 0, P
    eos = torch.tensor(sorted(set(int(e) for e in model.eos_token_ids or [])), device=canvas.device)
    stop = cfg.stop_at_eos and not cfg.suppress_eos and eos.numel() > 0
    finished = torch.zeros(B, dtype=torch.bool, device=canvas.device)
    cache = model.new_block_cache()
    padding = run.attention_mask[:, :P] if run.attention_mask is not None else None
    commit = (canvas[:, :P], block_ids(P, cfg.block_length, P % cfg.block_length, canvas.device), padding)
    for size, n_steps in zip(sizes, block_steps):
        window = slice(start, start + size)
        masked = torch.ones(B, size, dtype=torch.bool, device=canvas.device)
        for j in range(n_steps):
            if not bool(masked.any()):
                break
            clean, clean_blocks, clean_pad = commit if commit is not None else (None, None, None)
            logits = run.call(model.block_step, cache, canvas[:, window], clean_ids=clean, clean_blocks=clean_blocks,
                              clean_padding=clean_pad)
            commit = None
            reveal_b, tokens_b, conf_b = propose_and_reveal(run, logits, masked, n_steps - j)
            canvas[:, window][reveal_b] = tokens_b[reveal_b]
            masked &= ~reveal_b
            reveal = torch.zeros(canvas.shape, dtype=torch.bool, device=canvas.device)
            reveal[:, window] = reveal_b
            conf = torch.zeros(canvas.shape, dtype=conf_b.dtype, device=canvas.device)
            conf[:, window] = conf_b
            step += 1
            run.end = start + size
            yield Step(step, total, reveal, conf, start + size)
        commit = (canvas[:, window], torch.zeros(size, dtype=torch.long, device=canvas.device), None)
        start += size
        if stop:
            finished |= torch.isin(canvas[:, window], eos).any(-1)
            if bool(finished.all()):
                break
