"""Training drafts to be accepted: per-token objectives for the noisy rows of block diffusion, and the expected
tokens per forward they buy the speculative decoder.

The speculative decoder (`dlm.decoders.speculative`) keeps a draft x ~ q with probability min(1, p(x) / q(x)),
p the verifier's distribution; the chance that a draft row is accepted is alpha = sum_x min(p(x), q(x)) = 1 - TV(p,
q) (Leviathan et al. 2023). Draft j of a block is reached only if drafts 1..j-1 were accepted, so a forward yields
1 + sum_j prod_{i<=j} alpha_i tokens. The objectives (`diffusion.draft_loss`, per masked token of x_t):

    ce      the data's token (Eq. 7's cross-entropy, 1/t-weighted): what v1/v2 trained.
    kd      KL(p || q) to the verifier's whole distribution p (soft targets, as DFlash distils the target's logits).
    accept  1 - alpha at `temperature`: the acceptance rate itself as the loss (SpecForge's LK loss).
    kd+accept  both.

`reach=True` weights each draft by prod_{i<j} alpha_i (detached): the chance that decoding gets to it.
p is the verifier: with a row-gated draft adapter, the clean rows of the same forward are the base model's
own next-token distributions (`dlm.adapter_routing`), so the teacher costs nothing extra.
"""
from __future__ import annotations

from typing import Optional

import torch

DRAFT_LOSSES = ("ce", "kd", "accept", "kd+accept")


def aligned_next_token(logits: torch.Tensor) -> torch.Tensor:
    """AR logits [B, L, V] (row i predicts token i + 1) -> position-aligned (row i predicts token i; row 0 zeros)."""
    return torch.cat([torch.zeros_like(logits[:, :1]), logits[:, :-1]], dim=1)


def without_mask_id(model, logits: torch.Tensor) -> torch.Tensor:
    """`logits` [..., V] in float32 with an added [MASK] id's logit at -inf (no decoder ever draws it), as a copy."""
    logits = logits.float().clone()
    if model.config.added_mask_token:
        logits[..., model.mask_token_id] = float("-inf")
    return logits


def acceptance(p_logits: torch.Tensor, q_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """[N] sum_x min(p(x), q(x)) for rows of logits at `temperature` (0 = greedy: argmax q == argmax p).
    -inf logits (banned ids) carry no mass."""
    if temperature == 0:
        return (p_logits.argmax(-1) == q_logits.argmax(-1)).float()
    p = (p_logits.float() / temperature).softmax(-1)
    q = (q_logits.float() / temperature).softmax(-1)
    return torch.minimum(p, q).sum(-1)


def reach_weights(alpha: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """[B, L] prod of alpha over the earlier positions of the same block (exclusive), the chance that decoding
    reaches each one. alpha: [B, L] (1 where nothing is drafted); block: [L] nondecreasing block ids."""
    la = alpha.detach().float().clamp(min=1e-6).log()
    before = la.cumsum(-1) - la                                           # sum over positions < i
    start = torch.searchsorted(block, block)                              # first index of each position's block
    return (before - before[:, start]).exp()


def draft_token_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str, temperature: float = 1.0
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row loss [N] of the drafts' logits `student` against the verifier's `teacher` ([N, V] each) for `kind`
    ("kd", "accept", "kd+accept"), and the rows' acceptance alpha [N] (detached) at `temperature`."""
    if kind not in DRAFT_LOSSES or kind == "ce":
        raise ValueError(f"draft loss must be one of kd, accept, kd+accept here, got {kind!r}")
    teacher = teacher.detach().float()
    alpha = acceptance(teacher, student.float(), temperature if temperature > 0 else 1.0)
    loss = torch.zeros_like(alpha)
    if "kd" in kind:
        t_log = teacher.log_softmax(-1).clamp(min=-1e4)               # exp(-1e4) = 0: a banned id, no nan
        s_log = student.float().log_softmax(-1).clamp(min=-1e4)
        loss = loss + (t_log.exp() * (t_log - s_log)).sum(-1)
    if "accept" in kind:
        loss = loss + 1.0 - alpha
    return loss, alpha.detach()


@torch.no_grad()
def expected_tokens_per_forward(model, input_ids: torch.Tensor, block_length: int, temperature: float = 0.7,
                                attention_mask: Optional[torch.Tensor] = None) -> dict:
    """What the speculative decoder would get per forward with blocks of `block_length`, teacher-forced on text.

    Every block of the text is fully masked (offset 0) and denoised in one staircase forward beside its clean
    copy; the clean rows are the verifier (the base with a row-gated draft adapter, else the model's own causal
    rows). Within each block the first token is the verifier's own draw and rows 2.. are drafts: tokens per
    forward = 1 + sum_j prod_{i<=j} alpha_i, averaged over blocks; at `temperature` (top-p ignored) and greedy.
    Returns {"tpf": ..., "tpf_greedy": ..., "alpha": mean acceptance of the first draft, "blocks": n}.
    """
    B, L = input_ids.shape
    x0 = input_ids
    maskable = model.default_maskable(x0, attention_mask)
    x_t = torch.where(maskable, torch.full_like(x0, int(model.mask_token_id)), x0)
    logits = model.block_denoise_logits(x_t, x0, block_length, 0, attention_mask, with_clean=True)
    student, teacher = without_mask_id(model, logits[:, :L]), without_mask_id(model, aligned_next_token(logits[:, L:]))
    n_blocks = L // block_length
    out = {}
    for name, temp in (("tpf", temperature), ("tpf_greedy", 0.0)):
        alpha = acceptance(teacher, student, temp).view(B, L)[:, :n_blocks * block_length]
        ok = maskable[:, :n_blocks * block_length].float()
        alpha = (alpha * ok + (1 - ok)).view(B, n_blocks, block_length)[:, :, 1:]    # the drafts of each block
        whole = ok.view(B, n_blocks, block_length).all(-1)                           # blocks fully in the text
        reach = alpha.cumprod(-1).sum(-1)
        out[name] = float(1 + reach[whole].mean()) if bool(whole.any()) else float("nan")
        if name == "tpf":
            out["alpha"] = float(alpha[..., 0][whole].mean()) if bool(whole.any()) else float("nan")
    out["blocks"] = int(whole.sum())
    return out
