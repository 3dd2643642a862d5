"""The KV caches a decoder carries between forwards, and the index arithmetic of one block forward.

PrefixCache: the Fast-dLLM approximate cache of a canvas prefix (full attention; `DiffusionLM.build_prefix_cache`).
BlockCache:  the exact cache of the clean tokens for block diffusion (`DiffusionLM.block_denoise` / `block_verify`);
             `block_layout` says, without a model, where the tokens of one such forward sit and which rows it reads.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch


def truncate_cache(cache, length: int) -> None:
    """Keep the first `length` positions of a transformers cache."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)  # negative = number of tokens to drop (transformers >= 4.4x and 5.x)


@dataclass
class PrefixCache:
    """KV of the first `length` canvas positions (Fast-dLLM-style approximate prefix cache).

    With the shift, the prediction for position `length` is read from row `length - 1`, so the cache holds the
    first `length - 1` positions and the forward re-feeds position `length - 1`.
    `logits`: position-aligned logits for positions >= length from the forward that built the cache
    ([B, L - length, V]); a sampler may use them for its first step instead of a second forward.
    """

    kv: object
    length: int
    n_cached: int
    attention_mask: Optional[torch.Tensor]
    logits: Optional[torch.Tensor] = None


@dataclass
class BlockCache:
    """Exact KV cache of the clean tokens for block-diffusion decoding (`DiffusionLM.block_denoise`).

    kv:          the transformers cache of every clean token so far (prompt + finished blocks).
    length:      number of clean tokens in it (including left padding, which is never attended to).
    n_blocks:    clean blocks so far (the next noisy block gets id `n_blocks`).
    padding:     [B, length] 1 = token, 0 = left padding; None = no padding.
    next_logits: [B, V] the prediction for the token right after the clean tokens, read from the last clean row
                 (the shift): the first token of the next block. It never changes while that block is denoised.
    """

    kv: object
    length: int = 0
    n_blocks: int = 0
    padding: Optional[torch.Tensor] = None
    next_logits: Optional[torch.Tensor] = None


class BlockLogits(NamedTuple):
    """What `DiffusionLM.block_verify` returns."""
    noisy: Optional[torch.Tensor]   # [B, n(+1), V] position-aligned logits of the noisy block, or None without one
    clean: torch.Tensor             # [B, c - clean_from, V] the clean rows (next-token predictions) from clean_from


@dataclass(frozen=True)
class BlockLayout:
    """Where the tokens of one block forward sit and which rows it reads (see `block_layout`).

    q_noisy / q_block: [c + n] per new token (c clean, then n noisy): noisy?, and its id for `block_pattern`.
    k_noisy / k_block: [past + c + n] the same per key: the cached tokens (clean, id -1), then the new ones.
    noisy_at:     the noisy block takes the position of new clean token `noisy_at` (c: right after all of them).
    keep:         rows of the new tokens whose logits are computed (the base model's `logits_to_keep`).
    n_clean_rows: how many of the kept rows are clean rows (they come first; the noisy rows follow).
    lead:         with the shift, the kept clean row that predicts the noisy block's first token; None = the
                  cache's `next_logits` (the last clean token's row, of this call or an earlier one).
    n_blocks:     the cache's clean block count after the call.
    """

    q_noisy: torch.Tensor
    q_block: torch.Tensor
    k_noisy: torch.Tensor
    k_block: torch.Tensor
    noisy_at: int
    keep: torch.Tensor
    n_clean_rows: int
    lead: Optional[int]
    n_blocks: int


def block_layout(past: int, n_blocks: int, n_clean: int, n_noisy: int, *, shift: bool, clean_causal: bool,
                 clean_blocks: Optional[torch.Tensor] = None, noisy_from: Optional[int] = None,
                 clean_from: Optional[int] = None, predict_after: bool = False, device=None) -> BlockLayout:
    """The index arithmetic of one block forward (`DiffusionLM.block_denoise` / `block_verify`), without a model.

    past / n_blocks: the cache's length and clean block count before the call.
    n_clean (c) / n_noisy (n): the new clean tokens, and the noisy block after them (0 = commit only).
    shift / clean_causal: the model's (`DiffusionLM.shift`, `DiffusionLM.clean_causal`). Token-causal clean tokens
                  are each their own block (id = position) and the noisy block's id is the position it starts at.
    clean_blocks: [c] relative block of each clean token (default one block), for block-wise clean attention.
    noisy_from:   the noisy block sees only the first `noisy_from` new clean tokens and sits at that token's
                  position (a sibling; needs the shift, token-causal clean attention and a noisy block); None = c.
    clean_from:   verify: the clean rows wanted, from this new clean token on; None = none (denoise / commit).
    predict_after: the row after the noisy block is wanted (needs the shift).
    Rows computed: the wanted clean rows, else only those read: with the shift the clean row before the noisy block
    (its first token's prediction) and the last clean row (the next call's), then the noisy rows. An impossible
    request raises ValueError naming the argument.
    """
    c, n = n_clean, n_noisy
    anchor = c if noisy_from is None else int(noisy_from)   # the noisy block sees new clean tokens [0, anchor)
    if anchor != c and not (clean_causal and shift and 1 <= anchor <= c and n):
        raise ValueError(f"noisy_from must be in 1..{c} and needs a noisy block, the shift and token-causal "
                         f"clean attention, got {noisy_from}")
    if predict_after and not shift:
        raise ValueError("predict_after needs the shift (without it no row predicts past the block)")
    if clean_from is not None and not 0 <= clean_from <= max(c - 1, 0):
        raise ValueError(f"clean_from must be in 0..{max(c - 1, 0)}, got {clean_from}")
    if clean_from is not None and anchor != c and clean_from > anchor - 1:
        raise ValueError(f"clean_from must be <= noisy_from - 1 = {anchor - 1} (that row predicts the noisy "
                         f"block's first token), got {clean_from}")
    cb = torch.zeros(c, dtype=torch.long, device=device) if clean_blocks is None else clean_blocks.to(device)
    if clean_causal:
        q_block = torch.cat([torch.arange(past, past + c, device=device),
                             torch.full((n,), past + anchor, dtype=torch.long, device=device)])
    else:
        noisy_block = int(cb.max()) + n_blocks + 1 if c else n_blocks
        q_block = torch.cat([cb + n_blocks, torch.full((n,), noisy_block, dtype=torch.long, device=device)])
    q_noisy = torch.cat([torch.zeros(c, dtype=torch.bool, device=device),
                         torch.ones(n, dtype=torch.bool, device=device)])
    k_noisy = torch.cat([torch.zeros(past, dtype=torch.bool, device=device), q_noisy])
    k_block = torch.cat([torch.full((past,), -1, dtype=torch.long, device=device), q_block])
    if clean_from is not None:
        first = clean_from
    elif shift and c:   # the clean row before the noisy block (or the sibling's), at least the last clean row
        first = max(min(c - 1, anchor - 1), 0) if n else c - 1
    else:               # the noisy rows (commit only without the shift: no row is read, the last is computed)
        first = c if n else c - 1
    return BlockLayout(q_noisy=q_noisy, q_block=q_block, k_noisy=k_noisy, k_block=k_block, noisy_at=anchor,
                       keep=torch.arange(first, c + n, device=device), n_clean_rows=max(c - first, 0),
                       lead=anchor - 1 - first if (shift and c and anchor != c) else None,
                       n_blocks=n_blocks + int(cb.max()) + 1 if c else n_blocks)
