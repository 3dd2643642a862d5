"""Token sampling: from logits to one token per row, the same way for every decoder and the AR baseline.

    banned_token_ids  ids never written (mask, pad unless it is EOS, EOS when suppressed)
    sampling_settings the SamplerConfig fields that shape the distribution, as keyword arguments of the three below
    sampling_warpers  temperature, top-k, top-p as transformers' logits processors (`ar_generate` hands them to
                      Hugging Face `generate`, so both sides of a speed comparison filter the same way)
    sampling_probs    the distribution a token is drawn from (one-hot argmax at temperature 0)
    draw_tokens       one draw per row by inverse CDF (no sort, no multinomial)
    sample_tokens     greedy or a seeded draw, per row

The generation front ends (prompt -> canvas -> decoder -> Generation) are `dlm.generation`.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch


def banned_token_ids(model, suppress_eos: bool = False) -> list[int]:
    """Ids the sampler may never write: the mask token, pad (unless pad doubles as EOS), EOS if suppressed."""
    banned = {int(model.mask_token_id)}
    pad = getattr(model.tokenizer, "pad_token_id", None)
    eos = [int(e) for e in (model.eos_token_ids or [])]
    if pad is not None and int(pad) not in eos:
        banned.add(int(pad))
    if suppress_eos:
        banned.update(eos)
    return sorted(banned)


def nucleus_warper(top_p: float):
    """transformers' `TopPLogitsWarper` (same rule, same kept set) that sorts only the tokens that can be in it.

    Its full sort of the vocabulary costs ~3.4 ms a row for SmolLM2's 49,152 tokens on a 2-core CPU, and a top-1024
    `torch.topk` still ~0.3 ms: several percent of a decoding step, more for the speculative decoder, which needs
    the distribution of 2-3 rows per forward. The rule is unchanged: a token is removed when the tokens more probable
    than it hold >= top_p of the mass. So if the tokens above a probability t hold more than top_p, no token at or
    below t is kept and only those candidates need sorting (SmolLM2 at T 0.7: ~100 above 1e-4, enough for ~99% of
    rows): `packed_linear.nucleus_filter` (C++, ~0.06 ms a row). Rows it cannot bound, and every row where the
    kernel is not built, take the parent's full sort. `ar_generate` passes it to Hugging Face `generate` as well
    (`sampling_warpers`), so both sides of a speed comparison filter the same way."""
    return _nucleus_class()(float(top_p))


@functools.lru_cache(maxsize=1)
def _nucleus_class():
    from transformers import TopPLogitsWarper  # (transformers is imported lazily throughout dlm)

    from .packed_linear import nucleus_filter

    class NucleusWarper(TopPLogitsWarper):
        def __call__(self, input_ids, scores: torch.Tensor) -> torch.Tensor:
            fast = None
            if scores.dim() == 2 and scores.dtype == torch.float32 and scores.device.type == "cpu":
                fast = nucleus_filter(scores, scores.softmax(-1), self.top_p, self.min_tokens_to_keep,
                                      self.filter_value)
            if fast is None:
                return super().__call__(input_ids, scores)
            out, decided = fast
            for r in (~decided).nonzero().flatten().tolist():     # a flat row: the full sort
                out[r] = super().__call__(input_ids, scores[r:r + 1])[0]
            return out

    return NucleusWarper


def sampling_settings(cfg) -> dict:
    """The `SamplerConfig` fields that shape the distribution tokens are drawn from, as keyword arguments of
    `sampling_warpers` / `sampling_probs` / `sample_tokens`: every decoder and the AR baseline pass
    `**sampling_settings(cfg)`, so a new distribution knob is its field, this line and its warper."""
    return dict(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)


def sampling_warpers(temperature: float, top_k: int = 0, top_p: float = 1.0):
    """The sampling transforms, in transformers' order: temperature, top-k, top-p (`nucleus_warper`); a
    `LogitsProcessorList` that the decoders apply and `ar_generate` hands to Hugging Face `generate`."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper
    warpers = LogitsProcessorList([TemperatureLogitsWarper(float(temperature))])
    if top_k:
        warpers.append(TopKLogitsWarper(int(top_k)))
    if top_p < 1.0:
        warpers.append(nucleus_warper(top_p))
    return warpers


def sampling_probs(logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0
                   ) -> torch.Tensor:
    """The distribution tokens are drawn from, per row of `logits [N, V]`: one-hot on the argmax at temperature 0,
    else `sampling_warpers` and a softmax."""
    if temperature == 0:
        return torch.zeros_like(logits, dtype=torch.float32).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    scores = logits.float().clone()
    for warper in sampling_warpers(temperature, top_k, top_p):   # (the list's own call inspects each signature)
        scores = warper(None, scores)
    return scores.softmax(-1)


def draw_tokens(probs: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One token per row of `probs [N, V]` (rows need not sum to 1) -> [N], by inverse CDF: the first token whose
    cumulative probability exceeds u * total, u uniform in [0, 1) from `generator`. The same distribution as
    `torch.multinomial(probs, 1)`, which costs ~1.1 ms a row over SmolLM2's 49,152 tokens on a 2-core CPU; this
    costs ~0.04 ms. Zero-probability tokens are never drawn (their cumulative sum does not rise)."""
    cdf = probs.float().cumsum(-1)
    u = torch.rand(cdf.shape[:-1] + (1,), generator=generator, device=cdf.device)
    return torch.searchsorted(cdf, u * cdf[..., -1:], right=True).clamp_(max=cdf.shape[-1] - 1).squeeze(-1)


def sample_tokens(logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Draw one token per row of `logits [N, V]` -> [N] (greedy at temperature 0, else a seeded `draw_tokens` from
    `sampling_probs`)."""
    if temperature == 0:
        return logits.argmax(-1)
    return draw_tokens(sampling_probs(logits, temperature, top_k, top_p), generator)
