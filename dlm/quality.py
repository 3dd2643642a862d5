"""Generation quality, computed one way for the app, the evaluations and the benchmarks.

- `judge_nll`: negative log-likelihood (nats) of a continuation given its prompt under an AR judge model (exact,
  causal); `judge_ppl` = exp(NLL per token), the generative perplexity of the paper (lower = more fluent).
- `distinct_n`: unique word n-grams / all word n-grams of one text (Li et al. 2016); whitespace words, so it is
  comparable across tokenizers.
- `has_loop`: the text repeats some word n-gram `repeats` times or more (the degenerate loops of an under-trained
  or badly decoded model: "the capital of the capital of the capital ...").
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Optional


def judge_nll(judge, prompt: str, text: str) -> tuple[float, int]:
    """(NLL in nats, number of scored tokens) of `text` after `prompt` under the AR `judge` (a DiffusionLM run
    causally); (0.0, 0) for an empty text."""
    if not text.strip():
        return 0.0, 0
    score = judge.ar_score(prompt, text)
    return -float(score.logprob), int(score.n_tokens)


def judge_ppl(judge, prompt: str, text: str) -> Optional[float]:
    """Perplexity of `text` given `prompt` under the judge; None for an empty text."""
    nll, n = judge_nll(judge, prompt, text)
    return math.exp(nll / n) if n else None


def corpus_ppl(nlls: list[tuple[float, int]]) -> float:
    """exp(sum NLL / sum tokens) over several (nll, n_tokens) pairs (NaN when nothing was scored)."""
    tokens = sum(n for _, n in nlls)
    return math.exp(sum(v for v, _ in nlls) / tokens) if tokens else float("nan")


def ppl_ratio_interval(a: list[tuple[float, int]], b: list[tuple[float, int]], n_boot: int = 2000,
                       seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """corpus_ppl(a) / corpus_ppl(b) for texts paired by prompt (a[i] and b[i] continue the same prompt), with a
    paired percentile bootstrap interval over prompts: (ratio, low, high)."""
    import random
    if len(a) != len(b) or not a:
        raise ValueError("ppl_ratio_interval needs two equally long, non-empty lists paired by prompt")
    rng, n = random.Random(seed), len(a)
    ratios = []
    for _ in range(n_boot):
        idx = [rng.randrange(n) for _ in range(n)]
        r = corpus_ppl([a[i] for i in idx]) / corpus_ppl([b[i] for i in idx])
        if not math.isnan(r):
            ratios.append(r)
    if not ratios:
        return float("nan"), float("nan"), float("nan")
    ratios.sort()
    lo = ratios[int((1 - level) / 2 * len(ratios))]
    hi = ratios[min(len(ratios) - 1, int((1 + level) / 2 * len(ratios)))]
    return corpus_ppl(a) / corpus_ppl(b), lo, hi


def distinct_n(text: str, n: int = 2) -> float:
    """Distinct-n of one text: unique word n-grams / all word n-grams (NaN when there are none)."""
    words = text.split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else float("nan")


def has_loop(text: str, n: int = 3, repeats: int = 3) -> bool:
    """True when some word n-gram occurs `repeats` times or more in the text (a looping output)."""
    words = text.split()
    grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    return bool(grams) and max(grams.values()) >= repeats
