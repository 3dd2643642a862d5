"""The training objectives of a `DiffusionLM` (its `diffusion_loss` / `block_diffusion_loss` methods call these).

diffusion_loss:       Eq. 7 (Gong et al. 2024): L = E_t [ 1/t * sum_{i masked} -log p_theta(x0_i | x_t) ], normalised
                      by the number of masked tokens, under full (or annealed) attention.
block_diffusion_loss: the same per block (BD3-LM / Fast-dLLM v2), every block in one [x_t; x_0] staircase forward,
                      with the optional terms that train a speculative decoder's drafts and verifier: the clean rows'
                      next-token CE, distillation from an AR teacher, and the draft objectives of
                      `dlm.draft_objectives` against the verifier's distribution.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from .attention import block_ids
from .draft_objectives import (
    DRAFT_LOSSES,
    acceptance,
    aligned_next_token,
    draft_token_loss,
    reach_weights,
    without_mask_id,
)
from .noise import q_sample, sample_t


class DiffusionLossOutput(NamedTuple):
    loss: torch.Tensor       # Eq. 7: (1/t)-weighted masked CE, normalised by the masked-token count
    masked_ce: torch.Tensor  # the same CE without the 1/t weight (a readable training signal)


def needs_verifier(draft_loss: str, reach: bool) -> bool:
    """Whether the masked tokens' loss reads the verifier's distribution (else it is the data's token, Eq. 7)."""
    return draft_loss != "ce" or bool(reach)


def _check_weighting(weighting: str) -> None:
    if weighting not in ("inverse_t", "none"):
        raise ValueError(f"weighting must be 'inverse_t' or 'none', got {weighting!r}")


def _nothing_masked(logits: torch.Tensor) -> DiffusionLossOutput:
    zero = logits.sum() * 0.0  # keeps the graph (and DDP) happy when nothing was masked
    return DiffusionLossOutput(zero, zero.detach())


def _eq7(ce: torch.Tensor, t: torch.Tensor, n: torch.Tensor, weighting: str) -> torch.Tensor:
    """Eq. 7's sum over the masked tokens: their CE [N], each weighted 1/t by its noise level t [N] ("inverse_t")
    or not ("none"), over the masked-token count n."""
    weight = 1.0 / t if weighting == "inverse_t" else torch.ones_like(ce)
    return (ce * weight).sum() / n


def _kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Mean KL(teacher || student) over rows of [N, V] logits (0 for no rows); -inf teacher logits (a banned id)
    carry no mass."""
    if teacher_logits.shape[0] == 0:
        return student_logits.sum() * 0.0
    teacher = teacher_logits.float().log_softmax(-1).clamp(min=-1e4)   # exp(-1e4) = 0: no mass, no nan
    return F.kl_div(student_logits.float().log_softmax(-1), teacher, log_target=True, reduction="batchmean")


def diffusion_loss(model, input_ids: torch.Tensor, t: Optional[torch.Tensor] = None,
                   maskable: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                   attention_mask_ratio: float = 1.0, weighting: str = "inverse_t", eps: float = 1e-3,
                   generator: Optional[torch.Generator] = None) -> DiffusionLossOutput:
    """Eq. 7 on a batch of clean sequences.

    input_ids: [B, L] clean tokens x0.
    t:         [B] noise levels; default t ~ U(eps, 1) per sequence.
    maskable:  [B, L] bool, positions that may be noised (SFT: the response only). Default: every real token
               except position 0 under the shift. Position 0 is never maskable under the shift.
    attention_mask_ratio: annealing ratio for this step (1 = bidirectional).
    weighting: "inverse_t" (Eq. 7) or "none" (ablation: plain masked CE).
    Returns (loss, masked_ce): both normalised by the number of masked tokens.
    """
    _check_weighting(weighting)
    B = input_ids.shape[0]
    maskable = model.default_maskable(input_ids, attention_mask, maskable)
    if t is None:
        t = sample_t(B, eps, generator=generator, device=input_ids.device)
    t = torch.as_tensor(t, dtype=torch.float32, device=input_ids.device).expand(B)
    x_t, masked = q_sample(input_ids, t, model.mask_token_id, maskable, generator=generator)
    logits = model.denoise_logits(x_t, attention_mask, attention_mask_ratio, generator=generator)  # [B, L, V]
    if not bool(masked.any()):
        return _nothing_masked(logits)
    ce = F.cross_entropy(logits[masked].float(), input_ids[masked], reduction="none")  # [N]
    n = masked.sum()
    return DiffusionLossOutput(_eq7(ce, t[:, None].expand_as(masked)[masked], n, weighting), ce.detach().sum() / n)


def block_diffusion_loss(model, input_ids: torch.Tensor, block_length: int, *, offset: Optional[int] = None,
                         t: Optional[torch.Tensor] = None, maskable: Optional[torch.Tensor] = None,
                         attention_mask: Optional[torch.Tensor] = None, weighting: str = "inverse_t",
                         eps: float = 1e-3, generator: Optional[torch.Generator] = None,
                         ar_weight: float = 0.0, teacher_logits: Optional[torch.Tensor] = None,
                         distill_weight: float = 0.0, draft_loss: str = "ce", reach: bool = False,
                         full_mask: float = 0.0, accept_temperature: float = 1.0) -> DiffusionLossOutput:
    """Block-diffusion training (BD3-LM / Fast-dLLM v2) on a batch of clean sequences, every block in one pass.

    The forward runs over [x_t; x_0] (2L tokens) with the staircase pattern (`dlm.attention.staircase`): noisy
    block b attends to itself and to the clean blocks before it, clean blocks attend block-causally. Each block
    gets its own t ~ U(eps, 1); the loss is Eq. 7 per block (1/t-weighted CE over its masked tokens), summed
    over blocks and normalised by the number of masked tokens. Clean positions carry no loss.
    input_ids:    [B, L] clean tokens x0.
    block_length: tokens per block (1 = the causal LM itself: every token predicted from the clean past).
    offset:       length of the first block (0 = a full one); None draws it uniformly from `generator`, so the
                  model learns every alignment (at decoding the prompt ends exactly at a block boundary).
    t:            [B, n_blocks] noise levels (default: drawn); maskable / attention_mask / weighting / eps /
                  generator: as for `diffusion_loss`.
    ar_weight:    > 0 adds ar_weight x the next-token CE of the clean rows (clean attention "causal": the clean
                  path stays a good AR model, the speculative decoder's verifier). 0 (default): only masked
                  tokens of x_t carry loss, as in BD3-LM.
    teacher_logits: [B, L, V] an AR teacher's next-token logits on the clean sequence (row i predicts token
                  i + 1; e.g. the frozen base: the LoRA adapter disabled) and `distill_weight` > 0: adds
                  distill_weight x KL(teacher || student), the mean over masked tokens of x_t (the drafts) plus
                  the mean over the clean rows (the verifier): a whole distribution per token instead of one id.
    draft_loss:   the masked tokens' loss (`dlm.draft_objectives`): "ce" (the data's token, 1/t-weighted), or
                  against the verifier's distribution: "kd", "accept" (1 - acceptance rate at
                  `accept_temperature`), "kd+accept". The verifier is the clean rows of this forward when the
                  model has a row-gated draft adapter (then they are the base model), else `teacher_logits`.
    reach:        weight each masked token by the chance that speculative decoding reaches it (the product of
                  the acceptance rates of the masked tokens before it in its block, detached).
    full_mask:    probability that a block is masked whole (t = 1): the speculative decoder's drafting case.
    """
    _check_block_args(weighting, block_length, draft_loss)
    B, L = input_ids.shape
    if offset is None:
        offset = int(torch.randint(block_length, (1,), generator=generator)) if block_length > 1 else 0
    blk = block_ids(L, block_length, offset, input_ids.device)
    maskable = model.default_maskable(input_ids, attention_mask, maskable)
    t_tok = _block_noise(t, B, blk, eps, full_mask, generator)                                        # [B, L]
    x_t, masked = q_sample(input_ids, t_tok, model.mask_token_id, maskable, generator=generator)
    distill = distill_weight > 0 and teacher_logits is not None
    verified = needs_verifier(draft_loss, reach)
    in_forward = model.routing is not None and verified   # a row-gated draft adapter: the clean rows are the base
    if verified and not in_forward and teacher_logits is None:
        raise ValueError("draft_loss / reach need a verifier: a row-gated draft adapter or teacher_logits")
    logits = model.block_denoise_logits(x_t, input_ids, block_length, offset, attention_mask,
                                        with_clean=ar_weight > 0 or distill or in_forward)     # [B, L(+L), V]
    if not bool(masked.any()):
        return _nothing_masked(logits)
    ce = F.cross_entropy(logits[:, :L][masked].float(), input_ids[masked], reduction="none")
    n = masked.sum()
    loss = (_draft_loss(model, logits[:, :L], logits[:, L:] if in_forward else teacher_logits, masked, ce, blk,
                        draft_loss, reach, accept_temperature) if verified
            else _eq7(ce, t_tok[masked], n, weighting))
    loss = _add_clean_row_terms(model, loss, logits, input_ids, attention_mask, masked, ar_weight,
                                teacher_logits if distill else None, distill_weight)
    return DiffusionLossOutput(loss, ce.detach().sum() / n)


def _check_block_args(weighting: str, block_length: int, draft_loss: str) -> None:
    _check_weighting(weighting)
    if isinstance(block_length, bool) or not isinstance(block_length, int) or block_length < 1:
        raise ValueError(f"block_length must be a positive integer, got {block_length!r}")
    if draft_loss not in DRAFT_LOSSES:
        raise ValueError(f"draft_loss must be one of {', '.join(DRAFT_LOSSES)}, got {draft_loss!r}")


def _block_noise(t: Optional[torch.Tensor], B: int, blk: torch.Tensor, eps: float, full_mask: float,
                 generator: Optional[torch.Generator]) -> torch.Tensor:
    """[B, L] each token's noise level: its block's t (given, or drawn per block with whole blocks at t = 1)."""
    n_blocks, device = int(blk[-1]) + 1, blk.device
    if t is None:
        t = sample_t(B * n_blocks, eps, generator=generator, device=device).view(B, n_blocks)
        if full_mask > 0:   # whole blocks masked: what the speculative decoder drafts
            whole = torch.rand(B, n_blocks, generator=generator, device=device) < full_mask
            t = torch.where(whole, torch.ones_like(t), t)
    return torch.as_tensor(t, dtype=torch.float32, device=device)[:, blk]


def _draft_loss(model, noisy_logits: torch.Tensor, verifier_rows: torch.Tensor, masked: torch.Tensor,
                ce: torch.Tensor, blk: torch.Tensor, draft_loss: str, reach: bool, temperature: float
                ) -> torch.Tensor:
    """The masked tokens' loss against the verifier (`dlm.draft_objectives`), optionally weighted by reach."""
    verifier = without_mask_id(model, aligned_next_token(verifier_rows)[masked])
    student = without_mask_id(model, noisy_logits[masked])
    per_token, alpha = ((ce, acceptance(verifier, student, temperature)) if draft_loss == "ce"
                        else draft_token_loss(student, verifier, draft_loss, temperature))
    weight = torch.ones_like(per_token)
    if reach:
        full_alpha = torch.ones(masked.shape, device=masked.device)
        full_alpha[masked] = alpha
        weight = reach_weights(full_alpha, blk)[masked]
    return (per_token * weight).sum() / weight.sum().clamp(min=1e-6)


def _add_clean_row_terms(model, loss: torch.Tensor, logits: torch.Tensor, input_ids: torch.Tensor,
                         attention_mask: Optional[torch.Tensor], masked: torch.Tensor, ar_weight: float,
                         teacher_logits: Optional[torch.Tensor], distill_weight: float) -> torch.Tensor:
    """`loss` plus the verifier's terms: ar_weight x the clean rows' next-token CE, and distill_weight x
    KL(teacher || student) over the drafts and the clean rows (`teacher_logits` None: no distillation)."""
    if ar_weight <= 0 and teacher_logits is None:
        return loss
    L = input_ids.shape[1]
    target = model.default_maskable(input_ids, attention_mask)[:, 1:]   # clean rows with a next token to predict
    if ar_weight > 0:  # the clean path as an AR model: next-token CE on every clean row (the verifier)
        loss = loss + ar_weight * F.cross_entropy(logits[:, L:-1][target].float(), input_ids[:, 1:][target])
    if teacher_logits is not None:  # the teacher's row i-1 is its distribution for token i (the shift)
        teacher_logits = teacher_logits.detach()
        teacher = model._align(teacher_logits) if model.shift else teacher_logits[:, :-1]
        student = logits[:, :L] if model.shift else logits[:, 1:L]
        drafts = masked if model.shift else masked[:, 1:]
        loss = loss + distill_weight * (_kl(teacher[drafts], student[drafts]) +
                                        _kl(teacher_logits[:, :-1][target], logits[:, L:-1][target]))
    return loss
