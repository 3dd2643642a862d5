"""Attention patterns for a decoder-only model used as a denoiser, through public transformers arguments only.

Three patterns, all materialised by `transformers.masking_utils` (so the mask has the format, dtype and padding
handling the model's attention implementation expects):

- full (ratio = 1): bidirectional attention via `config.is_causal = False` for the duration of the call;
  transformers' own mask builder then makes a bidirectional mask with padding handled (sdpa, eager, flash).
- annealed (0 < ratio < 1, paper §3.2): allowed = causal ∪ Bernoulli(ratio) over the strict upper triangle, one
  pattern shared by the batch, heads and layers (sdpa / eager; flash-attention cannot take an arbitrary mask).
  ratio = 0 is the base model's own causal attention: nothing is changed.
- blocks (block diffusion: BD3-LM, Fast-dLLM v2, SDAR): the sequence is cut into blocks; every token is *clean*
  (known) or *noisy* (its block is being denoised). A clean token sees the clean tokens of its own and earlier
  blocks (causal across blocks, bidirectional inside one); a noisy token sees the noisy tokens of its own block and
  the clean tokens of earlier blocks. Training puts [x_t; x_0] side by side (the staircase: every block of a
  sequence is denoised in one forward); decoding puts the finished blocks in the KV cache (their keys and values
  never depend on later tokens, so the cache is exact) and runs one noisy block over it.
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


def block_ids(length: int, block_length: int, offset: int = 0, device=None) -> torch.Tensor:
    """Block index of each of `length` positions -> [length] long. The first block holds `offset` tokens when
    0 < offset < block_length (so any boundary can be put at a chosen position), every later one `block_length`."""
    if block_length < 1:
        raise ValueError(f"block_length must be >= 1, got {block_length}")
    lead = (block_length - offset % block_length) % block_length
    return (torch.arange(length, device=device) + lead) // block_length


def block_pattern(q_noisy: torch.Tensor, q_block: torch.Tensor, k_noisy: torch.Tensor, k_block: torch.Tensor
                  ) -> torch.Tensor:
    """The block-diffusion rule as a [Q, K] bool pattern (True = may attend), from per-token (noisy?, block id):
    clean query -> clean keys of blocks <= its own; noisy query -> noisy keys of its own block + clean keys of
    earlier blocks. Cached tokens are clean keys of earlier blocks, visible to every new query."""
    qn, qb = q_noisy[:, None], q_block[:, None]
    kn, kb = k_noisy[None, :], k_block[None, :]
    clean_rule = ~kn & (kb <= qb)
    noisy_rule = (kn & (kb == qb)) | (~kn & (kb < qb))
    return torch.where(qn, noisy_rule, clean_rule)


def clean_ids(blocks: torch.Tensor, causal: bool) -> torch.Tensor:
    """The ids `block_pattern` gives clean tokens of the given blocks: their block (bidirectional inside a clean
    block) or, with `causal`, their own position (token-causal: every clean row is then an AR next-token predictor,
    which is what lets the speculative decoder verify drafts). Noisy tokens keep their block's first position as id
    in the causal layout (`noisy_ids`), so the rule "clean keys of earlier blocks" stays the same comparison."""
    return torch.arange(len(blocks), device=blocks.device) if causal else blocks


def noisy_ids(blocks: torch.Tensor, causal: bool) -> torch.Tensor:
    """Ids of noisy tokens: their block, or (causal layout) the position of their block's first token."""
    if not causal:
        return blocks
    starts = torch.ones_like(blocks, dtype=torch.bool)
    starts[1:] = blocks[1:] != blocks[:-1]
    first = torch.cummax(torch.where(starts, torch.arange(len(blocks), device=blocks.device), 0), 0).values
    return first


def staircase(seq_len: int, block_length: int, offset: int = 0, shift: bool = True, device=None,
              clean_causal: bool = False):
    """Layout of one block-diffusion training forward over [x_t; x_0] (2L tokens).

    Returns (pattern [2L, 2L] bool, position_ids [2L], rows [L]): row `rows[j]` of that forward's output predicts
    token j of x_0. Without the shift it is the noisy copy of j. With the shift (hidden state i predicts token
    i + 1) a block's first token is read from the *clean* row before it (the last token of the previous block, as
    the decoder will have it), the others from the noisy row before them inside the block. Row 0 predicts
    position 0 only without the shift (position 0 is never a target with it). `clean_causal`: clean tokens attend
    token-causally instead of block-causally (see `clean_ids`).
    """
    blk = block_ids(seq_len, block_length, offset, device)
    noisy = torch.cat([torch.ones(seq_len, dtype=torch.bool, device=device),
                       torch.zeros(seq_len, dtype=torch.bool, device=device)])
    both = torch.cat([noisy_ids(blk, clean_causal), clean_ids(blk, clean_causal)])
    pattern = block_pattern(noisy, both, noisy, both)
    positions = torch.arange(seq_len, device=device).repeat(2)
    j = torch.arange(seq_len, device=device)
    if not shift:
        return pattern, positions, j
    starts = torch.ones(seq_len, dtype=torch.bool, device=device)
    starts[1:] = blk[1:] != blk[:-1]
    rows = torch.where(starts, seq_len + j - 1, j - 1)
    rows[0] = 0  # position 0 has nothing before it: never a target under the shift
    return pattern, positions, rows


def sliding_windows(config) -> dict[str, Optional[int]]:
    """The attention kinds of a model's layers and the window of each: {"full_attention": None} for most models;
    {"full_attention": None, "sliding_attention": W} for models that mix sliding-window layers in (Gemma 3, Qwen2 /
    Qwen3 with `use_sliding_window`: their forward takes one mask per kind, as a dict); {"": W} for a model whose
    every layer slides and that takes a single mask (Mistral with `sliding_window`)."""
    window = getattr(config, "sliding_window", None)
    kinds = set(getattr(config, "layer_types", None) or ())
    if "sliding_attention" in kinds and window:
        return {"full_attention": None, "sliding_attention": int(window)} if "full_attention" in kinds else \
            {"sliding_attention": int(window)}
    if getattr(config, "model_type", "") == "mistral" and window:
        return {"": int(window)}
    return {"full_attention": None}


def _window_rule(window: Optional[int]):
    """Keys a query may see inside a sliding window of W: the W - 1 before it and itself (the causal rule the layer
    was trained with, transformers' `sliding_window_overlay`) and, when the pattern lets it look ahead, the W
    after it (transformers' bidirectional sliding overlay, |q - kv| <= W)."""
    if window is None:
        return None
    return lambda q, kv: (kv > q - window) & (kv <= q + window)


def prepared_mask(config, pattern: torch.Tensor, batch_size: int, dtype: torch.dtype,
                  padding_mask: Optional[torch.Tensor] = None, positions: Optional[torch.Tensor] = None):
    """A [Q, K] bool pattern (queries are the last Q of K positions; the first K - Q are cached) + an optional
    [B, K] padding mask (1 = token) -> the 4D mask the model's attention implementation expects, built by
    `transformers.masking_utils` (bool for sdpa, additive for eager). Every query keeps its own key, so rows of
    padding stay finite.

    Models with sliding-window layers (Gemma 3, Qwen2 / Qwen3 with `use_sliding_window`; `sliding_windows`) get one
    mask per layer kind, {"full_attention": ..., "sliding_attention": ...}, the form their forward accepts: the
    pattern reaches every layer and the sliding ones also keep their window. This assumes the keys are all
    positions 0..K-1 (an uncached forward, or a cache that keeps every token: `full_length_cache`). `positions`
    ([K] long, the keys' position ids; the queries are the last Q) measures the window in positions where they
    differ from the order of the tokens (the [x_t; x_0] staircase repeats positions); None = 0..K-1."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    impl = getattr(config, "_attn_implementation", None) or "sdpa"
    if impl.startswith("flash"):
        raise ValueError("block and annealed attention need attn_implementation 'sdpa' or 'eager'; "
                         "flash-attention supports only full attention")
    Q, K = pattern.shape
    past = K - Q
    pad = padding_mask.bool() if padding_mask is not None else None
    builder = ALL_MASK_ATTENTION_FUNCTIONS[impl if impl in ALL_MASK_ATTENTION_FUNCTIONS else "sdpa"]

    pos = positions.to(pattern.device) if positions is not None else None

    def build(window: Optional[int]):
        rule = _window_rule(window)

        def mask_function(b, h, q, kv):
            allowed = pattern[q - past, kv]
            if rule is not None:
                allowed = allowed & (rule(q, kv) if pos is None else rule(pos[q], pos[kv]))
            if pad is not None:
                allowed = allowed & pad[b, kv]
            return allowed | (q == kv)

        return builder(batch_size=batch_size, q_length=Q, kv_length=K, q_offset=past, kv_offset=0,
                       mask_function=mask_function, attention_mask=None, allow_is_causal_skip=False,
                       allow_is_bidirectional_skip=False, dtype=dtype, device=pattern.device, config=config)

    kinds = sliding_windows(config)
    if list(kinds) == ["full_attention"]:
        return build(None)
    if "" in kinds:
        return build(kinds[""])
    return {kind: build(window) for kind, window in kinds.items()}


def full_length_cache(config):
    """A transformers cache that keeps every token on every layer. `DynamicCache(config=...)` keeps only the last
    W - 1 tokens of a sliding-window layer, which breaks the block decoders' masks (built over all cached positions)
    and their crop of the noisy block; for models without sliding layers the two are the same."""
    from transformers import DynamicCache
    if list(sliding_windows(config)) == ["full_attention"]:
        return DynamicCache(config=config)
    return DynamicCache()


@contextlib.contextmanager
def bidirectional(config) -> Iterator[None]:
    """Make a transformers model attend in both directions while inside the block (restores the old value)."""
    old = getattr(config, "is_causal", True)
    config.is_causal = False
    try:
        yield
    finally:
        config.is_causal = old


# ----- grouped-query attention for a few masked query rows, without copying the cache -------------------------------
PACKED_SDPA = "dlm_packed_sdpa"   # the attention implementation name a model selects (transformers' registry)


def packed_gqa_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None,
                    **kwargs):
    """transformers' "sdpa" attention, except in inference, where every call (a 1-row step, a block, a prompt's
    prefill) takes one path whose rows do not depend on each other:

    - fp32 on a CPU (where the packed kernel is built): `packed_linear.row_attention`, each row's softmax over its
      own allowed keys in a fixed order, so a position's output is the same bits whether its row came alone, with
      other rows, or beside keys its mask hides. Exact speculative decoding compares an AR step with a verify
      forward, and the packed kernel's int8 rows turn any last-bit difference into a rounding step that grows;
      torch's SDPA blocks its GEMMs by the call's shape.
    - elsewhere, for grouped-query heads: transformers repeats the cached keys and values for every query head
      (`repeat_kv`: 60 copies per SmolLM2 forward). This folds the heads of a group into query rows instead: head
      h = group g * n_rep + r becomes rows r * q .. r * q + q - 1 of kv head g, the head-shared mask repeated along
      rows (a single row without a mask takes none). Same attention, no copy of the cache.

    Training, other masks (float, per head) and other arguments go to transformers' function."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from .packed_linear import row_attention
    groups = getattr(module, "num_key_value_groups", 1)
    B, H, q, D = query.shape
    plain = (not torch.is_grad_enabled() and kwargs.get("position_bias") is None and kwargs.get("softcap") is None
             and not kwargs.get("output_attentions", False) and (dropout == 0.0 or not module.training))
    m = attention_mask
    if plain and (m is None or m.dtype == torch.bool and m.dim() == 4 and m.shape[1] == 1) and \
            query.device.type == "cpu" and query.dtype == key.dtype == value.dtype == torch.float32 and \
            key.shape[2] >= q:
        causal = getattr(module, "is_causal", True) if is_causal is None else is_causal   # transformers' rule
        if m is None and q > 1 and not causal:
            m = torch.ones(1, 1, q, key.shape[2], dtype=torch.bool)
        elif m is not None and m.shape[3] != key.shape[2]:
            m = m[:, :, :, :key.shape[2]]   # as transformers' sdpa path slices a longer (static-cache) mask
        out = row_attention(query, key, value, m, D ** -0.5 if scaling is None else scaling)
        if out is not None:
            return out, None
    if not (groups > 1 and plain and (m is None and q == 1 or m is not None and m.dim() == 4 and m.shape[1] == 1)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    rows = query.reshape(B, H // groups, groups * q, D)
    if m is not None:
        m = m.unsqueeze(2).expand(-1, -1, groups, -1, -1).reshape(m.shape[0], 1, groups * q, m.shape[-1])
    out = torch.nn.functional.scaled_dot_product_attention(rows, key, value, attn_mask=m, dropout_p=dropout,
                                                           scale=scaling)
    return out.reshape(out.shape[0], H, q, D).transpose(1, 2).contiguous(), None


def enable_packed_gqa(model: torch.nn.Module) -> int:
    """Select `packed_gqa_sdpa` for `model` when it runs sdpa with grouped-query heads: it is registered under its
    own name (with sdpa's mask builder) and chosen per model with `set_attn_implementation`, as transformers
    documents for custom attention; transformers' own "sdpa" and every other model are untouched. Returns the
    attention modules that now take the packed path (0: nothing changed)."""
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return 0
    grouped = sum(getattr(m, "num_key_value_groups", 1) > 1 for m in model.modules())
    if grouped:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
        AttentionInterface.register(PACKED_SDPA, packed_gqa_sdpa)
        AttentionMaskInterface.register(PACKED_SDPA, sdpa_mask)
        model.set_attn_implementation(PACKED_SDPA)
    return grouped
