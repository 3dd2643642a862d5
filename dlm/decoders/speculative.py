"""Self-speculative block decoding: block diffusion drafting for itself, verified by its own clean (AR) rows.

Needs token-causal clean attention (`clean_attention` "causal" in the model's dlm_config.json): every clean row is
then a next-token (AR) prediction of the same weights; with a row-gated draft adapter (`dlm.adapter_routing`) the
clean rows are the base model itself, so the output is the AR base's. Every forward (`DiffusionLM.block_verify`)
commits the newest final token and the pending drafts as clean tokens and denoises one noisy block after (or
beside) them, over the exact cache:

- The drafts are verified left to right by speculative sampling: a draft x is kept with probability
  min(1, p(x) / q(x)) (p the AR distribution, q the distribution it was drafted from; at temperature 0: kept iff
  it is the argmax), and the first rejected one is replaced by a draw from the residual max(0, p - q). The output
  is distributed exactly as left-to-right sampling with the clean path (greedy: identical to greedy AR decoding).
- If every draft was kept, the last clean row gives the next token (an exact AR draw) and a noisy block after the
  drafts (which saw them all) drafts the `block_length - 1` after it, all in parallel. The noisy block is
  `block_length - 1` masks starting at the next token's position: with the shift, mask row j predicts the token
  j + 1 places on, so the window's last token needs no mask of its own (a row fewer per forward than the trained
  block of `block_length` masks; measured on DiffuSmol v2: the same acceptance).
- If a draft was rejected, the drafts after it stay pending for the next forward: they were drawn in parallel from
  one noisy block, so none of them depends on the rejected token, and each is still a sample of its own q, which
  is all speculative sampling asks of a proposal (only the acceptance rate depends on how good it is). A noisy
  block after the drafts saw the rejected one, so its drafts would be poor ones; they are dropped.
- While most drafts are rejected (running acceptance below `SIBLING_BELOW`), the noisy block sits beside the
  pending drafts instead (a sibling of the first: it sees the final tokens only, `block_verify(noisy_from=)`), so
  its drafts stay usable whatever is rejected and the forward after a rejection still has a draft to verify (after
  a full accept it has none left for block_length 2). Per position the newest draft is used. Any draft is a valid
  proposal as long as it is drawn from the q it is tested with and whether it is used never depends on its value
  (only the acceptance rate depends on what q saw).

Each forward therefore yields between 1 and `block_length` final tokens. `threshold` (optional) ends a fresh
draft at the first row whose top probability is below it (fewer wasted rows; a cut on the row, not on the drawn
token, so exactness holds); `steps` and `remasking` do not apply. Stops at EOS or after max_new_tokens. One
sequence at a time (a batch has ragged acceptance): a batch runs one row at a time.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator, Optional

import torch

from ..token_sampling import draw_tokens, sampling_probs, sampling_settings
from .registry import decoder
from .run import DecodeRun, Step

if TYPE_CHECKING:
    from ..kv_cache import BlockCache

# Below this running draft acceptance the noisy block is a sibling of the pending drafts (the break-even for
# block_length 2, see `beside_drafts`); 0 = always after them, 1 = always beside them.
SIBLING_BELOW = 0.5


@dataclass
class Draft:
    """A proposed token for a position not final yet, and the distribution q it was drawn from."""

    token: int
    q: torch.Tensor


@dataclass
class Speculation:
    """The decoder's state between forwards (one sequence on a [1, L] canvas).

    cache:      the exact KV cache of the final tokens (`DiffusionLM.new_block_cache`).
    pos:        canvas[0, :pos] is final; the next token to decide sits at pos.
    commit:     [1, c] final tokens not in the cache yet (the prompt, then the newest final token).
    stop_ids:   tokens that end generation once written (EOS with stop_at_eos; none when EOS is suppressed).
    drafts:     proposals for positions pos, pos + 1, ..., not verified yet.
    kept/tried: drafts kept / verified so far, with a prior of 1 in 3 (decides where the next noisy block goes).
    done:       generation is over (a stop token written, or the canvas full).
    reveal / confidence: [1, L] what the current forward made final, with what probability (its `Step`).
    accepted / rejected: positions of the drafts the current forward kept, (position, token) of the one it
                rejected (its `Step`, for display).
    """

    cache: "BlockCache"
    pos: int
    commit: torch.Tensor
    stop_ids: frozenset = frozenset()
    drafts: list[Draft] = field(default_factory=list)
    kept: int = 1
    tried: int = 3
    done: bool = False
    reveal: Optional[torch.Tensor] = None
    confidence: Optional[torch.Tensor] = None
    accepted: list = field(default_factory=list)
    rejected: list = field(default_factory=list)

    def write(self, canvas: torch.Tensor, token: int, confidence: float) -> None:
        """Make canvas[0, pos] final (`token`, drawn with probability `confidence`) and move on."""
        canvas[0, self.pos] = token
        self.reveal[0, self.pos], self.confidence[0, self.pos] = True, confidence
        self.pos += 1
        self.done = token in self.stop_ids or self.pos >= canvas.shape[1]


@decoder("speculative", description="block drafts verified by the model's AR rows (the AR base itself with a "
                                    "draft adapter): exact speculative sampling, stops at EOS",
         uses=("block_length", "threshold", "stop_at_eos"), block_mode=True)
def decode_speculative(run: DecodeRun) -> Iterator[Step]:
    """Continue a prompt with block drafts verified by the clean rows of the same weights (see the module
    docstring): one `Step` per forward, revealing the 1..block_length tokens it made final."""
    model, cfg, canvas = run.model, run.config, run.canvas
    if not getattr(model, "clean_causal", False):
        raise ValueError("decoder: 'speculative' needs a model trained with token-causal clean attention "
                         "(dlm_config.json clean_attention = causal); use decoder 'blocks'")
    B, L = canvas.shape
    P = int(run.fixed[0].sum())
    if not (bool(run.fixed[:, :P].all()) and not bool(run.fixed[:, P:].any())) or P < 1:
        raise ValueError("the speculative decoder continues a prompt (all fixed tokens first, at least one)")
    if B > 1:  # ragged acceptance: decode the rows one by one on the same canvas, one Step per forward
        yield from _row_by_row(run)
        return
    canvas[:, P:] = int(model.mask_token_id)
    eos = frozenset(int(e) for e in model.eos_token_ids or []) if not cfg.suppress_eos else frozenset()
    s = Speculation(model.new_block_cache(), pos=P, commit=canvas[:, :P],
                    stop_ids=eos if cfg.stop_at_eos else frozenset())
    step = 0
    while not s.done:
        _forward(run, s)
        step += 1
        run.end = s.pos
        yield Step(step, L - P, s.reveal, s.confidence, s.pos,
                   drafts=tuple((s.pos + i, d.token, float(d.q[d.token])) for i, d in enumerate(s.drafts)),
                   accepted=tuple(s.accepted), rejected=tuple(s.rejected))


def _forward(run: DecodeRun, s: Speculation) -> None:
    """One forward: verify the pending drafts, make at least one more token final, draft the next ones."""
    model, canvas = run.model, run.canvas
    device, L = canvas.device, canvas.shape[1]
    sibling = beside_drafts(s)
    start = s.pos if sibling else s.pos + len(s.drafts)       # position of the noisy block's first mask
    n_noisy = min(int(run.config.block_length) - 1, L - start - 1)
    noisy = torch.full((1, n_noisy), int(model.mask_token_id), device=device) if n_noisy > 0 else None
    draft_ids = torch.tensor([[d.token for d in s.drafts]], device=device, dtype=torch.long)
    clean = torch.cat([s.commit, draft_ids], dim=1) if s.drafts else s.commit
    past, n_commit = s.cache.length, s.commit.shape[1]
    aligned, clean_logits = run.call(model.block_verify, s.cache, noisy, clean, clean_from=n_commit - 1,
                                     predict_after=True,
                                     noisy_from=n_commit if (sibling and noisy is not None) else None)
    verify = _probs(run, clean_logits[0])      # the AR distributions for positions pos .. pos + len(drafts)
    s.reveal = torch.zeros(canvas.shape, dtype=torch.bool, device=device)
    s.confidence = torch.zeros(canvas.shape, dtype=torch.float32, device=device)
    first = s.pos
    accepted = _keep_drafts(run, s, verify)
    rejected = not s.done and accepted < len(s.drafts)
    s.accepted = list(range(first, first + accepted))
    s.rejected = [(s.pos, s.drafts[accepted].token)] if rejected else []
    s.tried, s.kept = s.tried + accepted + int(rejected), s.kept + accepted
    pending: list[Draft] = []
    if rejected:   # a draw from the residual; the drafts after it stay pending (none of them depends on it)
        p = verify[accepted]
        token = _residual_draw(run, p, s.drafts[accepted].q)
        model.crop_block_cache(s.cache, past + n_commit + accepted)   # the rejected drafts leave the cache
        s.write(canvas, token, float(p[token]))
        pending = s.drafts[accepted + 1:]
    elif not s.done:  # all kept: the last clean row is the exact next distribution
        p = verify[len(s.drafts)]
        token = _draw(run, p)
        s.write(canvas, token, float(p[token]))
    fresh = []
    if aligned is not None and not s.done and (sibling or not rejected):   # else poor drafts (saw a rejected one)
        fresh = _new_drafts(run, aligned[0], start, s.pos)
    s.drafts = fresh + pending[len(fresh):]    # per position the newest draft (both are valid proposals)
    s.commit = canvas[:, s.pos - 1: s.pos]


def beside_drafts(s: Speculation) -> bool:
    """Whether the next noisy block is a sibling of the pending drafts (seeing only the final tokens, so its drafts
    survive any rejection) rather than after them (its drafts count only if all of those are kept): while drafts
    are mostly rejected. With one draft pending (block_length 2) and acceptance a, the sibling gives
    (1 + 2a) / (1 + a) tokens per forward against 2 / (2 - a): more for every a < 1/2."""
    return bool(s.drafts) and s.kept < SIBLING_BELOW * s.tried


def _keep_drafts(run: DecodeRun, s: Speculation, verify: torch.Tensor) -> int:
    """Test the pending drafts left to right against the verifier's distributions `verify` [>= len(drafts), V];
    the kept ones become final. Returns how many were kept (stops at the first rejection or when done)."""
    accepted = 0
    while accepted < len(s.drafts) and not s.done and _accepts(run, s.drafts[accepted], verify[accepted]):
        d = s.drafts[accepted]
        s.write(run.canvas, d.token, float(d.q[d.token]))
        accepted += 1
    return accepted


def _new_drafts(run: DecodeRun, rows: torch.Tensor, start: int, pos: int) -> list[Draft]:
    """Drafts from the noisy block's aligned rows [n, V] (row k predicts position start + k), from the first
    position not final yet (the rows before it are final, e.g. row 0 is the verify row just drawn from). A row
    whose top probability is below `threshold` ends the draft: a cut on the row, never on the drawn token, since
    which drafts exist must not depend on their values."""
    threshold, fresh = run.config.threshold, []
    for q in _probs(run, rows[pos - start:]):
        if threshold is not None and float(q.max()) < threshold:
            break
        fresh.append(Draft(_draw(run, q), q))
    return fresh


def _probs(run: DecodeRun, logits: torch.Tensor) -> torch.Tensor:
    """[N, V] logits -> the distributions tokens are drawn from (banned ids removed, the config's warpers)."""
    cfg = run.config
    logits = logits.float().clone()
    logits[:, run.banned] = float("-inf")
    return sampling_probs(logits, **sampling_settings(cfg))


def _draw(run: DecodeRun, p: torch.Tensor) -> int:
    """One token from the distribution p [V] (its argmax at temperature 0)."""
    if run.config.temperature == 0:
        return int(p.argmax())
    return int(draw_tokens(p[None], run.generator)[0])


def _accepts(run: DecodeRun, draft: Draft, p: torch.Tensor) -> bool:
    """Speculative sampling's test: keep the draft with probability min(1, p(x) / q(x)); at temperature 0, iff it
    is p's argmax (then no random number is drawn)."""
    if run.config.temperature == 0:
        return draft.token == int(p.argmax())
    u = float(torch.rand((), generator=run.generator, device=run.generator.device))
    return u < min(1.0, float(p[draft.token]) / max(float(draft.q[draft.token]), 1e-30))


def _residual_draw(run: DecodeRun, p: torch.Tensor, q: torch.Tensor) -> int:
    """The token that replaces a rejected draft: a draw from max(0, p - q), normalised (p itself when that is
    empty, and at temperature 0, where it is p's argmax)."""
    residual = (p - q).clamp(min=0) if run.config.temperature > 0 else p
    return _draw(run, residual / residual.sum() if float(residual.sum()) > 0 else p)


def _row_by_row(run: DecodeRun) -> Iterator[Step]:
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
            yield Step(step.index, step.total, reveal, conf, canvas.shape[1], drafts=step.drafts if b == 0 else (),
                       accepted=step.accepted if b == 0 else (), rejected=step.rejected if b == 0 else ())
        filler = int((run.model.eos_token_ids or [run.model.mask_token_id])[0])
        row = sub.canvas[0].clone()
        row[sub.end:] = filler  # a row that stopped at EOS: its unused tail holds EOS, never a mask id
        canvas[b, pad:] = row
        run.nfe += sub.nfe
        run.seconds += sub.seconds
