"""What a decoder works on (`DecodeRun`), what it yields (`Step`), and the step the certainty decoders share.

`propose_and_reveal` is one step's decision over a window: sample a proposal per eligible position, score its
certainty, let the config's reveal rule (`dlm.reveal`) keep some. `plan_blocks` splits a region and its steps
into blocks.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional

import torch

from ..reveal import Proposal, block_sizes, confidence_certainty, split_steps
from ..token_sampling import banned_token_ids, sample_tokens, sampling_settings
from .registry import REVEAL_RULES

if TYPE_CHECKING:
    from ..sampler_config import SamplerConfig


@dataclass
class Step:
    """One evaluation of a decoder.

    index / total: 1-based step number and the planned number of steps (a run may end earlier).
    reveal:        [B, L] bool, canvas positions decided at this step.
    confidence:    [B, L] untempered probability of the chosen token (meaningful where revealed).
    end:           canvas positions [0, end) are in use (the blocks decoder appends blocks as it goes).
    drafts:        speculative decoding, row 0: what this forward proposed and did not decide yet,
                   ((position, token, probability), ...); the canvas still holds masks there.
    accepted:      the revealed positions whose token was a draft the verifier kept.
    rejected:      ((position, draft token), ...) drafts the verifier rejected at this forward (the revealed token
                   at that position replaced them).
    """

    index: int
    total: int
    reveal: torch.Tensor
    confidence: torch.Tensor
    end: int
    drafts: tuple = ()
    accepted: tuple = ()
    rejected: tuple = ()


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


def propose_and_reveal(run: DecodeRun, logits: torch.Tensor, eligible: torch.Tensor, steps_left: int):
    """One step's decision over a window of n positions.

    logits [B, n, V] position-aligned for the window, eligible [B, n] bool -> (reveal [B, n] bool, tokens [B, n],
    confidence [B, n]). Proposals are sampled with the config's temperature / top-k / top-p; certainty always
    comes from the *untempered* distribution (tempered scores tie and collapse the order: Dream issue #72).
    """
    cfg = run.config
    picked = logits[eligible].float()                                                  # [N, V]
    picked[:, run.banned] = float("-inf")
    x0 = sample_tokens(picked, **sampling_settings(cfg), generator=run.generator)  # [N]
    probs = picked.softmax(-1)
    tokens = torch.zeros(eligible.shape, dtype=torch.long, device=eligible.device)
    tokens[eligible] = x0
    confidence = torch.zeros(eligible.shape, dtype=probs.dtype, device=eligible.device)
    confidence[eligible] = confidence_certainty(probs, x0)
    proposal = Proposal(eligible, tokens, probs, confidence, steps_left, cfg.threshold, run.generator)
    return REVEAL_RULES[cfg.remasking].load()(proposal) & eligible, tokens, confidence


def plan_blocks(cfg: "SamplerConfig", n: int) -> tuple[list[int], list[int]]:
    """Block sizes over n generated tokens (`block_length`; None = one block) and the steps of each block
    (`steps` split over them, `dlm.reveal.split_steps`)."""
    sizes = block_sizes(n, cfg.block_length)
    steps = cfg.steps_for(n)
    if steps < len(sizes):
        raise ValueError(f"steps={steps} is fewer than the {len(sizes)} blocks of block_length={cfg.block_length} "
                         f"over {n} tokens: every block needs at least one step")
    return sizes, split_steps(steps, sizes)
