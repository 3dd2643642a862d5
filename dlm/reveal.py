"""Reveal rules: which of this step's proposals are kept, one small function each, in a registry.

Every decoder does the same thing at each step: the denoiser proposes a token x0 for every still-masked position
of the current window, and a *reveal rule* decides which proposals become final. A rule receives a `Proposal`
(plain tensors: which positions are eligible, the proposed tokens, their untempered probabilities, how many steps
are left) and returns a [B, n] bool mask of the positions to reveal. It must reveal at least one eligible position
per row when `steps_left == 1` (so a block always finishes in its planned steps).

    random      the paper's Algorithm 2: with s steps left, each still-masked position is revealed with
                probability 1/s (linear schedule t = s/T -> (s-1)/T); the last step reveals the rest.
    confidence  the k proposals with the highest probability of the chosen token,
    margin      ... the highest top-1 minus top-2 probability,
    entropy     ... the lowest predictive entropy,
                k from `tokens_this_step` (LLaDA: the block's tokens spread evenly over its steps).
Any certainty rule + `threshold` (Fast-dLLM parallel decoding) also reveals every eligible proposal whose
confidence >= threshold, so a block may finish early.

A new rule is one function here (its declaration is read without importing this module, so the decorator takes
literal arguments; `dlm.decoders.registry`):

    @reveal_rule("my-rule", description="what it keeps, in one line")
    def my_rule(p: Proposal) -> torch.Tensor:
        return scheduled(p, score=...)          # or any [B, n] bool mask inside p.eligible
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .decoders.registry import reveal_rule


@dataclass
class Proposal:
    """What a reveal rule sees at one step, over a window of n canvas positions.

    eligible:   [B, n] bool, still-masked positions of the current block (the only ones a rule may reveal).
    tokens:     [B, n] proposed token per position (meaningful where eligible).
    probs:      [N, V] untempered probabilities at the eligible positions, in row-major order of `eligible`.
    confidence: [B, n] probability of the proposed token (0 where not eligible).
    steps_left: steps left in the block, this one included (>= 1).
    threshold:  Fast-dLLM parallel-decoding threshold, or None.
    generator:  for rules that draw random numbers.
    """

    eligible: torch.Tensor
    tokens: torch.Tensor
    probs: torch.Tensor
    confidence: torch.Tensor
    steps_left: int
    threshold: Optional[float] = None
    generator: Optional[torch.Generator] = None

    def scatter(self, values: torch.Tensor, fill: float = float("-inf")) -> torch.Tensor:
        """[N] values at the eligible positions -> [B, n] (fill elsewhere)."""
        out = torch.full(self.eligible.shape, fill, dtype=values.dtype, device=values.device)
        out[self.eligible] = values
        return out


# ----- schedule --------------------------------------------------------------------------------------------------
def tokens_this_step(remaining, steps_left: int):
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


def block_sizes(n_masked: int, block_length: Optional[int]) -> list[int]:
    """Sizes of the blocks over `n_masked` positions; a short last block takes the rest."""
    if block_length is None or block_length >= n_masked:
        return [n_masked]
    full, rest = divmod(n_masked, block_length)
    return [block_length] * full + ([rest] if rest else [])


def block_count(n_masked: int, block_length: Optional[int]) -> int:
    """`len(block_sizes(n_masked, block_length))` by arithmetic: nothing is allocated, so a length of 2**63 (a
    request still to be refused) costs nothing to count."""
    if block_length is None or block_length >= n_masked:
        return 1
    return -(-n_masked // block_length)


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


# ----- certainty scores ------------------------------------------------------------------------------------------
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


# ----- building blocks of rules -------------------------------------------------------------------------------------
def reveal_top_k(score: torch.Tensor, eligible: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Reveal the `k[b]` eligible positions with the highest score in each row.
    score [B, n] float, eligible [B, n] bool, k [B] int -> reveal [B, n] bool."""
    k_max = int(k.max()) if k.numel() else 0
    if k_max == 0:
        return torch.zeros_like(eligible)
    score = score.masked_fill(~eligible, float("-inf"))
    top = torch.topk(score, min(k_max, score.shape[-1]), dim=-1).indices             # [B, k_max]
    keep = torch.arange(top.shape[-1], device=k.device)[None, :] < k[:, None]        # row b keeps its first k[b]
    reveal = torch.zeros_like(eligible)
    reveal.scatter_(1, top, keep)
    return reveal & eligible


def scheduled(p: Proposal, score: torch.Tensor) -> torch.Tensor:
    """The scheduled number of eligible positions with the highest `score` ([B, n]), plus (Fast-dLLM) every one
    whose confidence reaches the threshold; at least the schedule, so a block never needs more than its steps."""
    k = tokens_this_step(p.eligible.sum(-1), p.steps_left)
    reveal = reveal_top_k(score, p.eligible, k)
    if p.threshold is not None:
        reveal |= p.eligible & (p.confidence >= p.threshold)
    return reveal


# ----- the rules -----------------------------------------------------------------------------------------------------
@reveal_rule("confidence", description="the most probable proposals first")
def reveal_confidence(p: Proposal) -> torch.Tensor:
    return scheduled(p, p.confidence.masked_fill(~p.eligible, float("-inf")))


@reveal_rule("margin", description="the largest top-1 minus top-2 probability first")
def reveal_margin(p: Proposal) -> torch.Tensor:
    return scheduled(p, p.scatter(margin_certainty(p.probs, p.tokens[p.eligible])))


@reveal_rule("entropy", description="the lowest predictive entropy first")
def reveal_entropy(p: Proposal) -> torch.Tensor:
    return scheduled(p, p.scatter(entropy_certainty(p.probs, p.tokens[p.eligible])))


@reveal_rule("random", description="the paper's Algorithm 2: each masked position with probability "
                       "1 / steps left", uses_threshold=False)
def reveal_random_rule(p: Proposal) -> torch.Tensor:
    return reveal_random(p.eligible, p.steps_left, p.generator)


def reveal_random(eligible: torch.Tensor, steps_left: int, generator: Optional[torch.Generator] = None
                  ) -> torch.Tensor:
    """Algorithm 2 (Gong et al. 2024): going from t = s/T to (s-1)/T, each masked position is unmasked with
    probability (t - s')/t = 1/s, where s = `steps_left`; at the last step (s = 1) everything left is revealed.
    eligible [B, n] bool -> reveal [B, n] bool."""
    draw = torch.rand(eligible.shape, generator=generator,
                      device=generator.device if generator is not None else eligible.device).to(eligible.device)
    return eligible & (draw < 1.0 / steps_left)

