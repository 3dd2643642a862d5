"""Block diffusion with an exact cache (Fast-dLLM v2, BD3-LM): a prompt continued block by block.

Causal across blocks and bidirectional inside one; finished blocks live in an exact KV cache (their keys/values
never depend on later tokens), each step recomputes only the current block (`DiffusionLM.block_denoise`), and
generation stops after the first block that holds an EOS. Needs a model trained with block attention.
"""
from __future__ import annotations

from typing import Iterator

import torch

from ..attention import block_ids
from .registry import decoder
from .run import DecodeRun, Step, plan_blocks, propose_and_reveal


@decoder("blocks", description="block diffusion: block by block over an exact KV cache, stops at EOS",
         uses=("steps", "block_length", "remasking", "threshold", "stop_at_eos"), block_mode=True)
def decode_blocks(run: DecodeRun) -> Iterator[Step]:
    """Continue a prompt block by block (Fast-dLLM v2 / BD3-LM decoding).

    The canvas is prompt + masks (left-padded rows of equal length). The prompt goes into an exact KV cache cut into
    blocks that end at the prompt's end; then for each block of `block_length` masks and each of its steps: one
    forward of only that block over the cache (the first step also commits the previous finished block, in the same
    forward), proposals, the reveal rule (+ threshold) keeps some. After a block is complete, generation stops if
    every row has written an EOS (`stop_at_eos`), so the length is not fixed.
    """
    model, cfg, canvas = run.model, run.config, run.canvas
    B, L = canvas.shape
    P = int((run.fixed.sum(-1)).min())
    if not (bool(run.fixed[:, :P].all()) and not bool(run.fixed[:, P:].any())):
        raise ValueError("the blocks decoder continues a prompt (all fixed tokens first); use decoder 'full' to "
                         "fill masks between fixed text (infilling)")
    if P < 1:
        raise ValueError("the blocks decoder needs a prompt (or a start token) before the first block")
    n = L - P
    canvas[:, P:] = int(model.mask_token_id)
    sizes, block_steps = plan_blocks(cfg, n)
    total, step, start = sum(block_steps), 0, P
    eos = torch.tensor(sorted(set(int(e) for e in model.eos_token_ids or [])), device=canvas.device)
    stop = cfg.stop_at_eos and not cfg.suppress_eos and eos.numel() > 0
    finished = torch.zeros(B, dtype=torch.bool, device=canvas.device)
    cache = model.new_block_cache()
    padding = run.attention_mask[:, :P] if run.attention_mask is not None else None
    commit = (canvas[:, :P], block_ids(P, cfg.block_length, P % cfg.block_length, canvas.device), padding)
    for size, n_steps in zip(sizes, block_steps):
        window = slice(start, start + size)
        masked = torch.ones(B, size, dtype=torch.bool, device=canvas.device)
        for j in range(n_steps):
            if not bool(masked.any()):
                break
            clean, clean_blocks, clean_pad = commit if commit is not None else (None, None, None)
            logits = run.call(model.block_denoise, cache, canvas[:, window], clean_ids=clean,
                              clean_blocks=clean_blocks, clean_padding=clean_pad)
            commit = None
            reveal_b, tokens_b, conf_b = propose_and_reveal(run, logits, masked, n_steps - j)
            canvas[:, window][reveal_b] = tokens_b[reveal_b]
            masked &= ~reveal_b
            reveal = torch.zeros(canvas.shape, dtype=torch.bool, device=canvas.device)
            reveal[:, window] = reveal_b
            conf = torch.zeros(canvas.shape, dtype=conf_b.dtype, device=canvas.device)
            conf[:, window] = conf_b
            step += 1
            run.end = start + size
            yield Step(step, total, reveal, conf, start + size)
        commit = (canvas[:, window], torch.zeros(size, dtype=torch.long, device=canvas.device), None)
        start += size
        if stop:
            finished |= torch.isin(canvas[:, window], eos).any(-1)
            if bool(finished.all()):
                break
