"""Token facts every front end needs, in one place: the special tokens a tokenizer puts in front of a text, and the
token a canvas starts with when it has no text before its first prediction (the shift: row 0 predicts nothing)."""
from __future__ import annotations

from typing import Optional, Sequence


def leading_special_ids(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts in front of every text by default (LLaMA's BOS; none for GPT-2)."""
    plain = list(tokenizer("x", add_special_tokens=False)["input_ids"])
    full = list(tokenizer("x", add_special_tokens=True)["input_ids"])
    for k in range(len(full) - len(plain) + 1):
        if full[k:k + len(plain)] == plain:
            return full[:k]
    return []


def start_token_id(tokenizer, eos_ids: Sequence[int] = (), mask_token_id: Optional[int] = None) -> Optional[int]:
    """BOS, else the first EOS (GPT-2's <|endoftext|> doubles as a document separator); never the mask token.
    None when the tokenizer has neither."""
    candidates = [getattr(tokenizer, "bos_token_id", None), *eos_ids, getattr(tokenizer, "eos_token_id", None)]
    for tid in candidates:
        if isinstance(tid, int) and tid != mask_token_id:
            return int(tid)
    return None
