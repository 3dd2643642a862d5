"""Decoders: the loops that turn a canvas of masks into text, one readable function each, in a registry.

A decoder is a generator function `decoder(run: DecodeRun) -> Iterator[Step]`. It fills the non-fixed positions of
`run.canvas` in place, calling the model only through `run.call` (which counts evaluations and model time), and
yields one `Step` (plain tensors: what was revealed, with what confidence) after each evaluation. It never builds
display records: the caller turns steps into `Frame`s only when it streams or asks for them.

    full         the paper's sampler (Algorithm 2 and its certainty-ordered variants) over the whole canvas with full
            attention: any order, any fixed positions (infilling), LLaDA-style semi-autoregressive blocks, and
            Fast-dLLM's approximate prefix cache.
    blocks       block diffusion (Fast-dLLM v2, BD3-LM): the continuation is decoded block by block, causal across
                 blocks and bidirectional inside one; finished blocks live in an exact KV cache (their keys/values
                 never depend on later tokens), each step recomputes only the current block, and generation stops
                 after the first block that holds an EOS. Needs a model trained with block attention.
    speculative  block diffusion drafting for itself: each forward verifies the pending drafts with the clean
                 (AR) rows of the same weights and drafts the next block in parallel; exact speculative sampling,
                 so the output is the clean path's own left-to-right distribution, at 1..block_length tokens per
                 forward. Needs token-causal clean attention.

A new decoder is one function here, registered with `@decoder("name")`; `SamplerConfig.decoder` then accepts it.
"""
from __future__ import annotations

import functools
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


def decoder(name: str, *, needs_block_length: bool = False) -> Callable[[Decoder], Decoder]:
    """Register a decoder under `name` (a value of `SamplerConfig.decoder`). `needs_block_length`: the config must
    give `block_length` (the decoder works block by block and has no sensible default size)."""
    def register(fn: Decoder) -> Decoder:
        fn.needs_block_length = needs_block_length
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


def nucleus_warper(top_p: float):
    """transformers' `TopPLogitsWarper` (same rule, same kept set) that sorts only the most probable candidates.

    Its full sort of the vocabulary costs ~3.4 ms a row for SmolLM2's 49,152 tokens on a 2-core CPU, about 8% of
    an AR step and more for the speculative decoder, which needs the distribution of 2-3 rows per forward. The
    rule is unchanged: a token is removed when the mass of the tokens no more probable than it, itself included,
    is <= 1 - top_p. That mass is 1 minus the mass of the more probable tokens, so it is decided from the
    `CANDIDATES` largest probabilities (torch.topk); when the nucleus might reach past them (a flat row) the
    parent's full sort decides. `ar_generate` passes it to Hugging Face `generate` as well (`sampling_warpers`),
    so both sides of a speed comparison filter the same way."""
    return _nucleus_class()(float(top_p))


@functools.lru_cache(maxsize=1)
def _nucleus_class():
    from transformers import TopPLogitsWarper   # (transformers is imported lazily throughout dlm)

    class NucleusWarper(TopPLogitsWarper):
        CANDIDATES = 1024   # SmolLM2 at T 0.7 / top-p 0.95: the full sort is needed for ~2% of calls (256: 12%)

        def __call__(self, input_ids, scores: torch.Tensor) -> torch.Tensor:
            k = max(self.CANDIDATES, self.min_tokens_to_keep)
            if scores.dim() != 2 or k >= scores.shape[-1]:
                return super().__call__(input_ids, scores)
            probs = scores.softmax(-1)
            top, idx = probs.topk(k, dim=-1)                                 # descending
            top = top.double()                                               # (no cancellation in the difference)
            total = probs.sum(-1, keepdim=True, dtype=torch.float64)
            from_here = total - (top.cumsum(-1) - top)                       # this token and all less probable
            kept = from_here > (1 - self.top_p)                              # the parent's rule
            kept[..., : self.min_tokens_to_keep] = True
            if kept[..., -1].any():                                    # the nucleus may go past the candidates
                return super().__call__(input_ids, scores)
            keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, idx, kept)
            return scores.masked_fill(~keep, self.filter_value)

    return NucleusWarper


def sampling_warpers(temperature: float, top_k: int = 0, top_p: float = 1.0):
    """The sampling transforms, in transformers' order: temperature, top-k, top-p (`nucleus_warper`); a
    `LogitsProcessorList` that the decoders apply and `ar_generate` hands to Hugging Face `generate`."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper
    warpers = LogitsProcessorList([TemperatureLogitsWarper(float(temperature))])
    if top_k:
        warpers.append(TopKLogitsWarper(int(top_k)))
    if top_p < 1.0:
        warpers.append(nucleus_warper(top_p))
    return warpers


def sampling_probs(logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0
                   ) -> torch.Tensor:
    """The distribution tokens are drawn from, per row of `logits [N, V]`: one-hot on the argmax at temperature 0,
    else `sampling_warpers` and a softmax."""
    if temperature == 0:
        return torch.zeros_like(logits, dtype=torch.float32).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    return sampling_warpers(temperature, top_k, top_p)(None, logits.float().clone()).softmax(-1)


def draw_tokens(probs: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One token per row of `probs [N, V]` (rows need not sum to 1) -> [N], by inverse CDF: the first token whose
    cumulative probability exceeds u * total, u uniform in [0, 1) from `generator`. The same distribution as
    `torch.multinomial(probs, 1)`, which costs ~1.1 ms a row over SmolLM2's 49,152 tokens on a 2-core CPU; this
    costs ~0.04 ms. Zero-probability tokens are never drawn (their cumulative sum does not rise)."""
    cdf = probs.float().cumsum(-1)
    u = torch.rand(cdf.shape[:-1] + (1,), generator=generator, device=cdf.device)
    return torch.searchsorted(cdf, u * cdf[..., -1:], right=True).clamp_(max=cdf.shape[-1] - 1).squeeze(-1)


def sample_tokens(logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Draw one token per row of `logits [N, V]` -> [N] (greedy at temperature 0, else a seeded `draw_tokens` from
    `sampling_probs`)."""
    if temperature == 0:
        return logits.argmax(-1)
    return draw_tokens(sampling_probs(logits, temperature, top_k, top_p), generator)


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
@decoder("blocks", needs_block_length=True)
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


# ----- self-speculative block decoding ------------------------------------------------------------------------------------
# Below this running draft acceptance the speculative decoder's noisy block is a sibling of the pending drafts (the
# break-even for block_length 2, see decode_speculative); 0 = always after them, 1 = always beside them.
SIBLING_BELOW = 0.5


@decoder("speculative", needs_block_length=True)
def decode_speculative(run: DecodeRun) -> Iterator[Step]:
    """Block diffusion as its own drafter and verifier (needs token-causal clean attention, `clean_attention`
    "causal" in the model's dlm_config.json): every forward commits the newest final token and the pending drafts
    as clean tokens and denoises one noisy block after (or beside) them, in one call over the exact cache.

    - The clean rows are next-token (AR) predictions of the same weights, so the drafts are verified left to right
      by speculative sampling: a draft x is kept with probability min(1, p(x) / q(x)) (p the AR distribution, q
      the distribution it was drafted from; at temperature 0: kept iff it is the argmax), and the first rejected
      one is replaced by a draw from the residual max(0, p - q). The output is distributed exactly as
      left-to-right sampling with the clean path (greedy: identical to greedy AR decoding).
    - If every draft was kept, the last clean row gives the next token (an exact AR draw) and a noisy block after
      the drafts (which saw them all) drafts the `block_length - 1` after it, all in parallel. The
      noisy block is `block_length - 1` masks starting at the next token's position: with the shift, mask row j
      predicts the token j + 1 places on, so the window's last token needs no mask of its own (a row fewer per
      forward than the trained block of `block_length` masks; measured on DiffuSmol v2: the same acceptance).
    - If a draft was rejected, the drafts after it stay pending for the next forward: they were drawn in parallel
      from one noisy block, so none of them depends on the rejected token, and each is still a sample of its own
      q, which is all speculative sampling asks of a proposal (only the acceptance rate depends on how good it
      is). A noisy block after the drafts saw the rejected one, so its drafts would be poor ones; they are dropped.
    - While most drafts are rejected (running acceptance below 1/2), the noisy block sits beside the pending
      drafts instead (a sibling of the first: it sees the final tokens only, `block_step(noisy_from=)`), so its
      drafts stay usable whatever is rejected and the forward after a rejection still has a draft to verify (after a
      full accept it has none left for block_length 2). Per position the newest draft is used. Any draft is a valid
      proposal as long as it is drawn from the q it is tested with and whether it is used never depends on its
      value (only the acceptance rate depends on what q saw).
    Each forward therefore yields between 1 and `block_length` final tokens. `threshold` (optional) ends a fresh
    draft at the first row whose top probability is below it (fewer wasted rows; a cut on the row, not on the
    drawn token, so exactness holds); `steps` and `remasking` do not apply. Stops at EOS or after
    max_new_tokens. One sequence at a time (a batch has ragged acceptance): a batch runs one row at a time.
    """
    model, cfg, canvas = run.model, run.config, run.canvas
    if not getattr(model, "clean_causal", False):
        raise ValueError("decoder: 'speculative' needs a model trained with token-causal clean attention "
                         "(dlm_config.json clean_attention = causal); use decoder 'blocks'")
    B, L = canvas.shape
    P = int(run.fixed[0].sum())
    if not (bool(run.fixed[:, :P].all()) and not bool(run.fixed[:, P:].any())) or P < 1:
        raise ValueError("the speculative decoder continues a prompt (all fixed tokens first, at least one)")
    if B > 1:  # ragged acceptance: decode the rows one by one on the same canvas, one Step per forward
        yield from _speculative_rows(run)
        return
    mask_id = int(model.mask_token_id)
    canvas[:, P:] = mask_id
    width = int(cfg.block_length)
    eos = set(int(e) for e in model.eos_token_ids or []) if not cfg.suppress_eos else set()
    stop = cfg.stop_at_eos and bool(eos)
    device = canvas.device

    def probs_of(logits: torch.Tensor) -> torch.Tensor:   # [N, V] -> the distributions drawn from
        logits = logits.float().clone()
        logits[:, run.banned] = float("-inf")
        return sampling_probs(logits, cfg.temperature, cfg.top_k, cfg.top_p)

    def draw(p: torch.Tensor) -> int:
        if cfg.temperature == 0:
            return int(p.argmax())
        return int(draw_tokens(p[None], run.generator)[0])

    def uniform() -> float:
        return float(torch.rand((), generator=run.generator, device=run.generator.device))

    def kept(token: int, p: torch.Tensor, q: torch.Tensor) -> bool:
        if cfg.temperature == 0:
            return token == int(p.argmax())
        return uniform() < min(1.0, float(p[token]) / max(float(q[token]), 1e-30))

    cache = model.new_block_cache()
    pos = P                      # canvas[:, :pos] is final
    commit = canvas[:, :P]       # final tokens not in the cache yet (the prompt, then the newest final token)
    drafts: list[tuple[int, torch.Tensor]] = []   # (token, q) for positions pos, pos + 1, ...: not verified yet
    kept_n, tried_n = 1, 3       # drafts kept / verified so far (prior 1/3): where the next noisy block goes
    step, done, total = 0, False, L - P
    while not done:
        # The noisy block goes after the pending drafts (its drafts then count only if all of those are kept) or,
        # while drafts are mostly rejected, beside them: a sibling of the first one, seeing only the final tokens,
        # so its drafts survive any rejection. With one draft pending (block_length 2) and acceptance a the
        # sibling gives (1 + 2a) / (1 + a) tokens per forward against 2 / (2 - a), more for every a < 1/2.
        sibling = bool(drafts) and kept_n < SIBLING_BELOW * tried_n
        start = pos if sibling else pos + len(drafts)          # position of the first mask
        n_noisy = min(width - 1, L - start - 1)
        noisy = torch.full((1, n_noisy), mask_id, device=device) if n_noisy > 0 else None
        draft_ids = torch.tensor([[t for t, _ in drafts]], device=device, dtype=torch.long)
        clean = torch.cat([commit, draft_ids], dim=1) if drafts else commit
        past, n_commit = cache.length, commit.shape[1]
        aligned, clean_logits = run.call(model.block_step, cache, noisy, clean_ids=clean, return_clean=True,
                                         clean_from=n_commit - 1, predict_after=True,
                                         noisy_from=n_commit if (sibling and noisy is not None) else None)
        verify = probs_of(clean_logits[0])   # AR distributions for positions pos .. pos + len(drafts)
        reveal = torch.zeros(canvas.shape, dtype=torch.bool, device=device)
        conf = torch.zeros(canvas.shape, dtype=torch.float32, device=device)

        def write(token: int, confidence: float) -> bool:   # make canvas[pos] final; True = generation is over
            nonlocal pos
            canvas[0, pos] = token
            reveal[0, pos], conf[0, pos] = True, confidence
            pos += 1
            return (stop and token in eos) or pos >= L

        accepted = 0
        while accepted < len(drafts) and not done and kept(drafts[accepted][0], verify[accepted], drafts[accepted][1]):
            token, q = drafts[accepted]
            done = write(token, float(q[token]))
            accepted += 1
        rejected = not done and accepted < len(drafts)
        tried_n, kept_n = tried_n + accepted + int(rejected), kept_n + accepted
        pending = []
        if rejected:   # a draw from the residual; the drafts after it stay pending (none of them depends on it)
            p, q = verify[accepted], drafts[accepted][1]
            residual = (p - q).clamp(min=0) if cfg.temperature > 0 else p
            token = draw(residual / residual.sum() if float(residual.sum()) > 0 else p)
            model.crop_block_cache(cache, past + n_commit + accepted)   # the rejected drafts leave the cache
            done = write(token, float(p[token]))
            pending = drafts[accepted + 1:]
        elif not done:  # all kept: the last clean row is the exact next distribution
            p = verify[len(drafts)]
            token = draw(p)
            done = write(token, float(p[token]))
        fresh = []
        if aligned is not None and not done and (sibling or not rejected):   # else poor drafts (saw a rejected one)
            # aligned row k predicts position start + k: only the rows from the first position not final yet
            # (the ones before it are final, e.g. row 0 is the verify row just drawn from)
            for q in probs_of(aligned[0, pos - start:]):
                # a cut on the row, never on the drawn token: which drafts exist must not depend on their values
                if cfg.threshold is not None and float(q.max()) < cfg.threshold:
                    break
                fresh.append((draw(q), q))
        drafts = fresh + pending[len(fresh):]   # per position the newest draft (both are valid proposals)
        commit = canvas[:, pos - 1: pos]
        step += 1
        run.end = pos
        yield Step(step, total, reveal, conf, pos)


def _speculative_rows(run: DecodeRun) -> Iterator[Step]:
    """The speculative decoder over a batch: each row decoded on its own (acceptance lengths differ per row)."""
    canvas, fixed, mask = run.canvas, run.fixed, run.attention_mask
    for b in range(canvas.shape[0]):
        pad = int((mask[b] == 0).sum()) if mask is not None else 0
        sub = DecodeRun(run.model, canvas[b:b + 1, pad:].clone(), fixed[b:b + 1, pad:], run.config, run.generator)
        for step in decode_speculative(sub):
            reveal = torch.zeros(canvas.shape, dtype=torch.bool, device=canvas.device)
            reveal[b, pad:] = step.reveal[0]
            conf = torch.zeros(canvas.shape, dtype=step.confidence.dtype, device=canvas.device)
            conf[b, pad:] = step.confidence[0]
            canvas[b, pad:] = sub.canvas[0]
            yield Step(step.index, step.total, reveal, conf, canvas.shape[1])
        filler = int((run.model.eos_token_ids or [run.model.mask_token_id])[0])
        row = sub.canvas[0].clone()
        row[sub.end:] = filler  # a row that stopped at EOS: its unused tail holds EOS, never a mask id
        canvas[b, pad:] = row
        run.nfe += sub.nfe
        run.seconds += sub.seconds
