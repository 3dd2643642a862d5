"""Plain data records passed between `dlm` and its callers (app, eval, CLI).

Everything here is made of Python ints / floats / strings / lists so it can be sent to a browser or written to
JSON without touching torch. The app and evaluation only ever see these; they never see logits or the shift.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional


@dataclass
class Frame:
    """One denoising step of one sequence.

    step:       1-based index of this step (frame k of `total_steps`).
    total_steps: number of steps the sampler planned (the last frame may come earlier with `threshold`).
    tokens:     the whole canvas after this step (prompt/prefix + generated region + suffix), mask ids included.
    revealed:   canvas positions whose token was decided at this step.
    confidence: per entry of `revealed`, the untempered probability the model gave to the chosen token.
    start:      index into `tokens` of the first generated (non-fixed) position; positions < start are the prompt.
    drafts:     self-speculative decoding: proposals of this step not decided yet, [position, token, probability]
                (their positions are still masks in `tokens`); accepted: revealed positions whose token was a draft
                the verifier kept; rejected: [position, draft token] drafts it rejected at this step.
    """

    step: int
    total_steps: int
    tokens: list[int]
    revealed: list[int]
    confidence: list[float]
    start: int = 0
    drafts: list = field(default_factory=list)
    accepted: list = field(default_factory=list)
    rejected: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Generation:
    """The result of one generation (DLM or AR).

    text:      decoded output (for `generate`: the new text only, cut at the first EOS; for `infill`/`fill`:
               the whole filled text).
    token_ids: the generated token ids (new tokens only for `generate`, the whole canvas for infill).
    frames:    one `Frame` per denoising step (empty for AR generation).
    nfe:       number of network (forward) evaluations.
    seconds:   wall time spent in model calls only (no tokenizing, no rendering).
    spans:     for infilling, the text generated for each masked span, in order.
    prompt:    the prompt text as the model saw it (after any chat template).
    """

    text: str
    token_ids: list[int]
    frames: list[Frame] = field(default_factory=list)
    nfe: int = 0
    seconds: float = 0.0
    spans: Optional[list[str]] = None
    prompt: str = ""

    @property
    def tokens_per_second(self) -> float:
        return len(self.token_ids) / self.seconds if self.seconds > 0 else float("nan")

    def to_dict(self, frames: bool = False) -> dict:
        d = asdict(self)
        if not frames:
            d.pop("frames")
        return d


@dataclass
class Score:
    """A log-likelihood estimate (nats) with its Monte-Carlo standard error (0 for exact AR scores)."""

    logprob: float
    stderr: float = 0.0
    n_tokens: int = 0

    def to_dict(self) -> dict:
        return asdict(self)
