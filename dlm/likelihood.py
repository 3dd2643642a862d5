"""Likelihood under a diffusion LM: Monte-Carlo ELBO, DiffuLLaMA's grid estimator, exact AR scores.

A masked diffusion LM has no exact likelihood; what it has is the ELBO of the absorbing process (paper Eq. 7 without
the normalisation by the masked count):

    log p(x0) >= E_{t ~ U(0,1)} [ (1/t) * sum_{i masked in x_t} log p_theta(x0_i | x_t) ],  x_t ~ q(x_t | x0, t).

Integrating t out given the number l of masked tokens (of m maskable ones) gives the equivalent form LLaDA uses
(its Eq. 12 vs 14; integral of Binom(l; m, t) / t over t = 1/l):

    ELBO = E_{l ~ U{1..m}} [ (m/l) * E_{l positions chosen uniformly} sum_{i masked} log p_theta(x0_i | x_t) ].

We estimate the second form: it never draws an empty mask and its weights m/l are bounded by m (the 1/t form has
unbounded weights near t = 0). The n samples are stratified: sample j takes s_j = (j + u_j)/n with u_j ~ U(0,1) and
l_j = floor(s_j * m) + 1, so every region of the noise range is covered once per n samples (unbiased; the reported
standard error std/sqrt(n) treats the samples as independent, so it is conservative).

All functions take the `DiffusionLM` first, use its position-aligned `denoise_logits` (row i predicts token i; the
shift lives in the model) and are deterministic for a fixed `seed` (one CPU `torch.Generator` drives every draw, so
results do not depend on the device or on `batch_size`).
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator, Optional

import torch
import torch.nn.functional as F

from .noise import q_sample, seeded_generator
from .tokens import leading_special_ids
from .types import Score

METHODS = ("elbo", "paper")


# ----- shared helpers ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _eval_mode(model) -> Iterator[None]:
    """No dropout and no autograd while scoring; the caller's train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def encode_pair(model, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Tokenize (context, continuation) so that context_ids + continuation_ids is a faithful tokenization of the text.

    - Trailing whitespace of the context moves to the continuation ("Answer: " + "yes" -> "Answer:" + " yes"), so
      the boundary falls where BPE tokenizers put it (as lm-evaluation-harness does).
    - The continuation ids are the tail of the tokenization of the whole text when the context's own ids are its
      head; otherwise (a merge across the boundary) the two parts are tokenized separately.
    - The tokenizer's default leading special tokens (LLaMA's BOS) go first; when the context is still empty a start
      token (BOS, else EOS) is put there: something must predict the first continuation token (the shift: row 0
      is never predicted; causally, row i predicts token i+1).
    Returns (context_ids, continuation_ids); the start token, if any, is part of context_ids.
    """
    if not isinstance(context, str) or not isinstance(continuation, str):
        raise TypeError("context and continuation must be strings")
    n_space = len(context) - len(context.rstrip())
    if n_space and context.strip():
        context, continuation = context[:-n_space], context[-n_space:] + continuation
    tok = model.tokenizer
    ctx = _encode(tok, context)
    whole = _encode(tok, context + continuation)
    cont = whole[len(ctx):] if whole[:len(ctx)] == ctx else _encode(tok, continuation)
    ctx = leading_special_ids(tok) + ctx
    if not ctx:
        start = model.start_token_id
        ctx = [start] if start is not None else []
    return ctx, cont


def _check_pair(model, ctx: list[int], cont: list[int]) -> None:
    if not cont:
        raise ValueError("continuation is empty: nothing to score")
    if not ctx:
        raise ValueError("context is empty and the tokenizer has neither a BOS nor an EOS token to start with")
    total = len(ctx) + len(cont)
    if total > model.max_length:
        raise ValueError(f"context ({len(ctx)} tokens) + continuation ({len(cont)} tokens) = {total} tokens, more "
                         f"than the model's context size of {model.max_length} tokens")


def _check_counts(n_samples: int, batch_size: int) -> None:
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples must be an integer >= 1, got {n_samples!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")


def stratified_counts(n_maskable: torch.Tensor, n_samples: int, generator: torch.Generator) -> torch.Tensor:
    """Stratified numbers of masked tokens: [B] maskable counts m -> [B, n] counts l in 1..m (0 where m = 0).

    Sample j uses s_j = (j + u_j) / n, u_j ~ U(0, 1) (one draw per stratum, shared by the rows), l = floor(s*m) + 1:
    l is uniform on 1..m marginally over the strata, and the n samples cover the noise range evenly.
    """
    u = torch.rand(n_samples, generator=generator)                                   # [n]
    s = (torch.arange(n_samples, dtype=torch.float64) + u.double()) / n_samples      # [n] in [0, 1)
    m = n_maskable.detach().cpu().long()[:, None]                                    # [B, 1]
    counts = torch.floor(s[None, :] * m.double()).long() + 1                         # [B, n]
    return torch.minimum(counts, m)                                                  # l <= m; 0 where m = 0


def mask_exact_count(maskable: torch.Tensor, counts: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """[N, L] bool maskable, [N] counts -> [N, L] bool: exactly counts[r] maskable positions of row r, uniformly."""
    keys = torch.rand(maskable.shape, generator=generator)                           # [N, L] on CPU
    keys = keys.masked_fill(~maskable.cpu(), 2.0)                                    # never pick a fixed position
    ranks = keys.argsort(dim=1).argsort(dim=1)                                       # rank of each position's key
    return (ranks < counts.cpu()[:, None]) & maskable.cpu()


def _masked_logprob_sums(model, x0: torch.Tensor, masked: torch.Tensor,
                         attention_mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward on x_t = x0 with `masked` replaced by [MASK]; per row: (sum of log p(x0_i | x_t) over masked i,
    number of masked i). x0, masked: [N, L] -> ([N] float64 on CPU, [N] long on CPU)."""
    device = model.device
    x0 = x0.to(device)
    masked = masked.to(device)
    x_t = x0.masked_fill(masked, model.mask_token_id)
    am = attention_mask.to(device) if attention_mask is not None else None
    logits = model.denoise_logits(x_t, attention_mask=am, attention_mask_ratio=1.0)      # [N, L, V]
    rows = masked.nonzero(as_tuple=True)
    logp = -F.cross_entropy(logits[rows].float(), x0[rows], reduction="none")           # [n_masked]
    sums = torch.zeros(x0.shape[0], dtype=torch.float64, device=device)
    sums.index_add_(0, rows[0], logp.double())
    return sums.cpu(), masked.sum(dim=1).cpu()


def _mean_stderr(values: torch.Tensor) -> tuple[float, float]:
    n = values.numel()
    mean = float(values.mean())
    stderr = float(values.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")
    return mean, stderr


# ----- continuation scores -----------------------------------------------------------------------------------------
def score(model, context: str, continuation: str, n_samples: int = 32, method: str = "elbo",
          seed: Optional[int] = None, batch_size: int = 16) -> Score:
    """Log-likelihood estimate (nats) of `continuation` given `context` under the diffusion LM.

    model:        a `DiffusionLM`.
    context:      conditioning text; never masked (may be "" -> a start token is used).
    continuation: the text scored (usually starts with a space); must not be empty.
    n_samples:    method="elbo": Monte-Carlo samples (default 32); method="paper": the grid size T of noise levels
                  (DiffuLLaMA's `diffusion_steps`, 32 in its eval scripts), one forward per level.
    method:       "elbo"  - stratified Monte-Carlo ELBO (module docstring): logprob = mean over samples of
                            (m/l) * sum_{masked} log p(x_i | x_t); a lower bound on log p in expectation.
                  "paper" - DiffuLLaMA's multiple-choice score (see `paper_score`): logprob = minus the mean, over
                            T noise levels, of the per-masked-token CE; a per-token figure, not a sequence total.
    seed:         int for reproducible masks (default None = fresh randomness).
    batch_size:   masked copies per forward pass (default 16); does not change the result for a fixed seed.
    Returns Score(logprob, stderr, n_tokens): stderr = std/sqrt(n) over the samples (NaN when n_samples = 1),
    n_tokens = number of continuation tokens.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    _check_counts(n_samples, batch_size)
    ctx, cont = encode_pair(model, context, continuation)
    _check_pair(model, ctx, cont)
    if method == "paper":
        return paper_score(model, ctx, cont, n_levels=n_samples, seed=seed, batch_size=batch_size)
    x0 = torch.tensor([ctx + cont], dtype=torch.long)                                 # [1, L]
    maskable = torch.zeros_like(x0, dtype=torch.bool)
    maskable[:, len(ctx):] = True                                                     # context is never masked
    estimates = _elbo_samples(model, x0, maskable, n_samples, seeded_generator(seed), batch_size)[0]   # [n]
    logprob, stderr = _mean_stderr(estimates)
    return Score(logprob=logprob, stderr=stderr, n_tokens=len(cont))


def _elbo_samples(model, x0: torch.Tensor, maskable: torch.Tensor, n_samples: int, generator: torch.Generator,
                  batch_size: int, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[B, L] clean ids + [B, L] maskable -> [B, n] per-sample ELBO estimates (m/l) * sum_masked log p (nats)."""
    B, L = x0.shape
    m = maskable.sum(dim=1)                                                           # [B]
    counts = stratified_counts(m, n_samples, generator)                               # [B, n]
    rows_x0 = x0.cpu().repeat_interleave(n_samples, dim=0)                            # [B*n, L] (row b*n + j)
    rows_maskable = maskable.cpu().repeat_interleave(n_samples, dim=0)
    rows_am = attention_mask.cpu().repeat_interleave(n_samples, dim=0) if attention_mask is not None else None
    masked = mask_exact_count(rows_maskable, counts.reshape(-1), generator)           # [B*n, L]
    sums = torch.zeros(B * n_samples, dtype=torch.float64)
    with _eval_mode(model):
        for lo in range(0, B * n_samples, batch_size):
            hi = min(lo + batch_size, B * n_samples)
            if not bool(masked[lo:hi].any()):
                continue  # rows with nothing maskable contribute 0
            am = rows_am[lo:hi] if rows_am is not None else None
            sums[lo:hi] = _masked_logprob_sums(model, rows_x0[lo:hi], masked[lo:hi], am)[0]
    weight = m.cpu().double()[:, None] / counts.double().clamp(min=1)                # [B, n]  m / l
    return sums.reshape(B, n_samples) * weight


def paper_score(model, context_ids: list[int], continuation_ids: list[int], n_levels: int = 32,
                seed: Optional[int] = None, batch_size: int = 16) -> Score:
    """DiffuLLaMA's likelihood score for multiple-choice tasks, on token ids.

    Reproduces the arithmetic of `eval_forward` in DiffuLLaMA's LLaMA-Factory/src/llamafactory/train/ddm/trainer.py
    (called from evaluation/eval-diffullama.py and eval-diffugpt.py for HellaSwag / WinoGrande / SIQA / PIQA, where
    the choice with the lowest value wins):
      for k = T, T-1, ..., 1 (rate r_k = k/T, one forward and one random mask per level):
        mask each continuation token independently with probability r_k (context never masked), full attention;
        u_k = sum of CE over masked tokens / number of masked tokens (u_k = 0 when nothing was masked);
      value = (1/T) * sum_k u_k     (unweighted: the 1/t-weighted total is computed there but not returned).
    Differences: masked positions come from the sampled mask, not `x_t == mask_id` (DiffuLLaMA issue #11), and
    position 0 is never masked under the shift (nothing predicts it).

    n_levels: T (default 32).  seed / batch_size: as in `score`.
    Returns Score(logprob=-value, stderr=std(u)/sqrt(T) treating the levels as samples, n_tokens).
    """
    _check_counts(n_levels, batch_size)
    _check_pair(model, context_ids, continuation_ids)
    generator = seeded_generator(seed)
    x0 = torch.tensor([context_ids + continuation_ids], dtype=torch.long)             # [1, L]
    maskable = torch.zeros_like(x0, dtype=torch.bool)
    maskable[:, len(context_ids):] = True
    maskable = model.default_maskable(x0, None, maskable).cpu()
    rates = torch.arange(n_levels, 0, -1, dtype=torch.float32) / n_levels             # [T]: T/T .. 1/T
    per_level = torch.zeros(n_levels, dtype=torch.float64)                            # u_k
    with _eval_mode(model):
        for lo in range(0, n_levels, batch_size):
            hi = min(lo + batch_size, n_levels)
            rows = x0.expand(hi - lo, -1)
            _, masked = q_sample(rows, rates[lo:hi], model.mask_token_id, maskable.expand(hi - lo, -1),
                                 generator=generator)                                 # Bernoulli(r_k) per token
            if not bool(masked.any()):
                continue
            sums, counts = _masked_logprob_sums(model, rows, masked)
            per_level[lo:hi] = torch.where(counts > 0, -sums / counts.clamp(min=1).double(), 0.0)
    value, stderr = _mean_stderr(per_level)
    return Score(logprob=-value, stderr=stderr, n_tokens=len(continuation_ids))


def ar_score(model, context: str, continuation: str) -> Score:
    """Exact causal log-likelihood (nats) of `continuation` given `context` with the same weights used causally
    (`model.ar_logits`, row i predicts token i+1): the AR rows of the evaluation table. stderr is 0."""
    ctx, cont = encode_pair(model, context, continuation)
    _check_pair(model, ctx, cont)
    ids = torch.tensor([ctx + cont], dtype=torch.long, device=model.device)           # [1, L]
    with _eval_mode(model):
        logits = model.ar_logits(ids)                                                 # [1, L, V]
    P = len(ctx)
    pred = logits[0, P - 1:-1].float()                                                # rows predicting P..L-1
    logp = -F.cross_entropy(pred, ids[0, P:], reduction="sum")
    return Score(logprob=float(logp), stderr=0.0, n_tokens=len(cont))


# ----- whole-sequence metrics (training / held-out evaluation) -----------------------------------------------------
def _default_maskable(model, input_ids: torch.Tensor, maskable: Optional[torch.Tensor],
                      attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
    if maskable is not None and maskable.shape != input_ids.shape:
        raise ValueError(f"maskable has shape {tuple(maskable.shape)}, input_ids {tuple(input_ids.shape)}")
    return model.default_maskable(input_ids, attention_mask, maskable).cpu()


def elbo_nll(model, input_ids: torch.Tensor, maskable: Optional[torch.Tensor] = None, n_samples: int = 8,
             seed: Optional[int] = None, attention_mask: Optional[torch.Tensor] = None,
             batch_size: int = 8) -> torch.Tensor:
    """ELBO upper bound on the NLL (nats) of each sequence: -(stratified Monte-Carlo ELBO), see the module docstring.

    input_ids:      [B, L] clean token ids.
    maskable:       [B, L] bool, tokens that are scored (default: every real token; position 0 is never scored
                    under the shift). Perplexity bound = exp(sum(nll) / maskable.sum()).
    n_samples:      masks per sequence (default 8).
    seed:           int for reproducible masks (default None).
    attention_mask: [B, L] 1 = token, 0 = padding (default None = no padding).
    batch_size:     masked rows per forward pass (default 8).
    Returns [B] float32 tensor on CPU (0 for a sequence with nothing maskable).
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, L], got shape {tuple(input_ids.shape)}")
    _check_counts(n_samples, batch_size)
    maskable = _default_maskable(model, input_ids, maskable, attention_mask)
    estimates = _elbo_samples(model, input_ids, maskable, n_samples, seeded_generator(seed), batch_size,
                              attention_mask)                                         # [B, n]
    return (-estimates.mean(dim=1)).float()


def masked_token_accuracy(model, input_ids: torch.Tensor, mask_ratio: float, seed: Optional[int] = None,
                          maskable: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                          batch_size: int = 8, block_length: Optional[int] = None) -> float:
    """Fraction of masked tokens the denoiser's argmax gets right, with round(mask_ratio * m) of each row's m
    maskable tokens masked (at least 1), chosen uniformly at random.

    mask_ratio: in (0, 1].  seed: int for reproducible masks.  maskable / attention_mask / batch_size: as elbo_nll.
    block_length: None = the full-attention denoiser (the paper); an int = block diffusion with blocks of that
    size (each masked token predicted from its noisy block and the clean blocks before it).
    """
    if not 0.0 < float(mask_ratio) <= 1.0:
        raise ValueError(f"mask_ratio must be in (0, 1], got {mask_ratio}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, L], got shape {tuple(input_ids.shape)}")
    _check_counts(1, batch_size)
    maskable = _default_maskable(model, input_ids, maskable, attention_mask)
    m = maskable.sum(dim=1)
    counts = torch.where(m > 0, torch.clamp(torch.round(m.double() * float(mask_ratio)).long(), min=1), 0)
    masked = mask_exact_count(maskable, torch.minimum(counts, m), seeded_generator(seed))    # [B, L]
    correct = total = 0
    device = model.device
    with _eval_mode(model):
        for lo in range(0, input_ids.shape[0], batch_size):
            hi = min(lo + batch_size, input_ids.shape[0])
            mk = masked[lo:hi].to(device)
            if not bool(mk.any()):
                continue
            x0 = input_ids[lo:hi].to(device)
            am = attention_mask[lo:hi].to(device) if attention_mask is not None else None
            x_t = x0.masked_fill(mk, model.mask_token_id)
            logits = (model.denoise_logits(x_t, attention_mask=am) if block_length is None else
                      model.block_denoise_logits(x_t, x0, block_length, 0, am))               # [b, L, V]
            correct += int((logits[mk].argmax(dim=-1) == x0[mk]).sum())
            total += int(mk.sum())
    if total == 0:
        raise ValueError("no maskable tokens in input_ids")
    return correct / total
