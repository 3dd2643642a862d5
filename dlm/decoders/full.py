"""The paper's sampler: every masked position of the canvas decided with full attention, in any order.

Algorithm 2 of Gong et al. 2024 (reveal rule "random") and its certainty-ordered variants, over any canvas whose
fixed positions may sit anywhere (prompts, infilling templates, pinned words, edits); LLaDA's semi-autoregressive
blocks (`block_length`) and Fast-dLLM's approximate prefix cache (`use_cache`) and parallel decoding (`threshold`).
"""
from __future__ import annotations

from typing import Iterator

import torch

from .registry import decoder
from .run import DecodeRun, Step, plan_blocks, propose_and_reveal


@decoder("full", description="the paper's sampler: full attention over the whole canvas, any order, infilling",
         uses=("steps", "block_length", "remasking", "threshold", "use_cache"), fixed_positions=True)
def decode_full(run: DecodeRun) -> Iterator[Step]:
    """Fill every non-fixed position with full attention over the whole canvas.

    For each block (one block = the whole region; `block_length` = LLaDA's semi-autoregressive blocks over the
    masked positions in order) and each of its steps: one evaluation of the denoiser on the canvas, proposals at the
    block's masked positions, the reveal rule keeps some. With `use_cache`, a forward at each block start caches
    the keys/values of everything before the block (approximate: they no longer see later changes) and serves as
    the block's first step. Every row must have the same number of non-fixed positions.
    """
    model, cfg, canvas = run.model, run.config, run.canvas
    B, L = canvas.shape
    masked = ~run.fixed                                            # positions still to decide
    n_per_row = masked.sum(-1)
    n = int(n_per_row[0])
    if bool((n_per_row != n).any()):
        raise ValueError(f"every row must have the same number of masked positions, got {n_per_row.tolist()}")
    if n == 0:
        raise ValueError("the canvas has no masked position to generate")
    if bool(masked[:, : model.first_predictable].any()):
        raise ValueError("position 0 cannot be generated with the shift (nothing predicts it); "
                         "start the canvas with a fixed token such as BOS")
    canvas[masked] = int(model.mask_token_id)
    rank = torch.cumsum(masked.long(), dim=-1) - 1                 # order of each masked position in its row
    sizes, block_steps = plan_blocks(cfg, n)
    total, step, first = sum(block_steps), 0, 0
    for size, n_steps in zip(sizes, block_steps):
        in_block = masked & (rank >= first) & (rank < first + size)
        first += size
        cache = pending = None
        if cfg.use_cache:
            prefix_length = int(in_block.float().argmax(-1).min())
            if prefix_length > 0:
                cache = run.call(model.build_prefix_cache, canvas, prefix_length, attention_mask=run.attention_mask)
                pending = cache.logits                            # the block's first step, already computed
        offset = cache.length if cache is not None else 0
        for j in range(n_steps):
            eligible = masked & in_block
            if not bool(eligible.any()):
                break                                             # threshold decoding finished the block early
            rows = eligible.any(0).nonzero().squeeze(1)           # only these positions' logits are computed
            logits = pending[:, rows - offset] if pending is not None else run.call(
                model.denoise_logits, canvas, attention_mask=run.attention_mask, prefix_cache=cache, rows=rows)
            pending = None
            reveal_r, tokens_r, conf_r = propose_and_reveal(run, logits, eligible[:, rows], n_steps - j)
            reveal = torch.zeros_like(masked)
            reveal[:, rows] = reveal_r
            conf = torch.zeros(canvas.shape, dtype=conf_r.dtype, device=canvas.device)
            conf[:, rows] = conf_r
            canvas[:, rows] = torch.where(reveal_r, tokens_r, canvas[:, rows])
            masked &= ~reveal
            step += 1
            yield Step(step, total, reveal, conf, L)
