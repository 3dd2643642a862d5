"""Attention patterns for a decoder-only model used as a denoiser, through public transformers arguments only.

- ratio = 0: the base model's own causal attention (nothing is changed, logits identical to the AR model).
- ratio = 1: full bidirectional attention, via `config.is_causal = False` for the duration of the call: transformers'
  own mask builder then makes a bidirectional mask with padding handled, under sdpa, eager and flash-attention-2.
- 0 < ratio < 1 (paper §3.2, attention-mask annealing): allowed = causal ∪ Bernoulli(ratio) over the strict upper
  triangle, one pattern shared by the batch, heads and layers, given to the model as a prepared 4D additive mask
  (sdpa and eager; flash-attention cannot take an arbitrary mask).

Measured with transformers 5.23: a 4D mask is used as-is by GPT-2 / LLaMA / Qwen2, and `config.is_causal=False`
gives exactly the same logits as the equivalent all-ones 4D mask, with left padding.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch


def anneal_attention_mask(seq_len: int, ratio: float, *, generator: Optional[torch.Generator] = None,
                          device=None) -> torch.Tensor:
    """Boolean [L, L] pattern, True = query i may attend to key j: causal ∪ Bernoulli(ratio) above the diagonal."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"attention_mask_ratio must be in [0, 1], got {ratio}")
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()
    if ratio == 0.0:
        return causal
    if ratio == 1.0:
        return torch.ones_like(causal)
    gen_device = generator.device if generator is not None else device
    extra = torch.rand(seq_len, seq_len, generator=generator, device=gen_device).to(causal.device) < ratio
    return causal | (extra & ~causal)


def additive_4d_mask(allowed: torch.Tensor, padding_mask: Optional[torch.Tensor], batch_size: int,
                     dtype: torch.dtype) -> torch.Tensor:
    """[L, L] bool pattern (+ [B, L] padding, 1 = token) -> [B, 1, L, L] additive float mask (0 / dtype min).

    Every query keeps its own key so that fully padded rows stay finite (no NaN from an all -inf softmax).
    """
    L = allowed.shape[-1]
    keep = allowed[None, None].expand(batch_size, 1, L, L)
    if padding_mask is not None:
        keep = keep & padding_mask.bool()[:, None, None, :]
    keep = keep | torch.eye(L, dtype=torch.bool, device=allowed.device)[None, None]
    out = torch.zeros(keep.shape, dtype=dtype, device=allowed.device)
    return out.masked_fill_(~keep, torch.finfo(dtype).min)


@contextlib.contextmanager
def bidirectional(config) -> Iterator[None]:
    """Make a transformers model attend in both directions while inside the block (restores the old value)."""
    old = getattr(config, "is_causal", True)
    config.is_causal = False
    try:
        yield
    finally:
        config.is_causal = old
