"""Held-out evaluation during training: masked-token accuracy at fixed mask ratios and the ELBO perplexity bound.

Both come from `dlm.likelihood` (the same estimators the eval harness uses) on a fixed set of held-out blocks with
fixed seeds, so successive evaluations of one run (and of different runs on the same data) are comparable.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from dlm.draft_objectives import expected_tokens_per_forward
from dlm.likelihood import elbo_nll, masked_token_accuracy


def scored_mask(model, input_ids: torch.Tensor, maskable, attention_mask) -> torch.Tensor:
    """[B, L] bool: the positions the metrics score (the model decides: `DiffusionLM.default_maskable`)."""
    return model.default_maskable(input_ids, attention_mask, maskable).cpu()


@torch.no_grad()
def evaluate(model, eval_data, *, n_items: int, batch_size: int, mask_ratios, elbo_samples: int,
             seed: int = 1234, block_length: Optional[int] = None) -> dict:
    """Metrics on the first `n_items` held-out items (blocks or SFT canvases).

    model:        the unwrapped `DiffusionLM` (full parameters on this process).
    eval_data:    `PackedBlocks` / `SFTData` (anything with `len` and `.batch(indices)`).
    n_items:      how many held-out items (capped by what exists).
    batch_size:   rows per forward pass.
    mask_ratios:  masked-token accuracy is reported at each ratio (e.g. 0.15, 0.5, 0.9).
    elbo_samples: Monte-Carlo masks per item for the ELBO bound (0 = skip).
    seed:         fixed seed for the masks.
    block_length: also report block-diffusion accuracy with blocks of this size ("eval/block_acc@r").
    Returns {"eval/acc@0.15": ..., "eval/elbo_nll": nats per scored token, "eval/elbo_ppl": exp of it,
             "eval/items": n, "eval/tokens": scored tokens}.
    """
    n = min(n_items, len(eval_data))
    batch = eval_data.batch(list(range(n)))
    input_ids, maskable, attention_mask = batch["input_ids"], batch.get("maskable"), batch.get("attention_mask")
    out: dict = {"eval/items": n}
    for i, ratio in enumerate(mask_ratios):
        out[f"eval/acc@{float(ratio):g}"] = masked_token_accuracy(
            model, input_ids, float(ratio), seed=seed + i, maskable=maskable, attention_mask=attention_mask,
            batch_size=batch_size)
        if block_length is not None:
            out[f"eval/block_acc@{float(ratio):g}"] = masked_token_accuracy(
                model, input_ids, float(ratio), seed=seed + i, maskable=maskable, attention_mask=attention_mask,
                batch_size=batch_size, block_length=block_length)
    if block_length is not None and block_length > 1 and getattr(model, "clean_causal", False):
        # what the speculative decoder would get: teacher-forced expected tokens per forward at T 0.7 and greedy
        tpf = [expected_tokens_per_forward(model, input_ids[i:i + batch_size], block_length, 0.7,
                                           None if attention_mask is None else attention_mask[i:i + batch_size])
               for i in range(0, n, batch_size)]
        blocks = sum(t["blocks"] for t in tpf)
        for key in ("tpf", "tpf_greedy", "alpha"):
            out[f"eval/{key}@{block_length}"] = sum(t[key] * t["blocks"] for t in tpf) / max(blocks, 1)
    if elbo_samples > 0:
        nll = elbo_nll(model, input_ids, maskable=maskable, n_samples=elbo_samples, seed=seed + 100,
                       attention_mask=attention_mask, batch_size=batch_size)   # [B] nats per sequence
        tokens = int(scored_mask(model, input_ids, maskable, attention_mask).sum())
        per_token = float(nll.sum()) / max(tokens, 1)
        out["eval/elbo_nll"] = per_token
        out["eval/elbo_ppl"] = math.exp(min(per_token, 50.0))
        out["eval/tokens"] = tokens
    return out
